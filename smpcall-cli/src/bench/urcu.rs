//! liburcu, the reference user-space RCU (Debian's `liburcu-dev`, ABI 8: liburcu 0.13),
//! loaded at run time with `dlopen`/`dlsym` — no link-time dependency, so the bench builds and
//! runs where it is missing and says so ([`NOT_INSTALLED`]).
//!
//! Each flavour is its own shared library, `liburcu-<flavour>.so.8`, exporting its API under
//! the prefix `urcu_<flavour>_` (the `rcu_*` names of `<urcu/map/urcu-<flavour>.h>` are macros
//! for those). The symbols used, checked with `nm -D --defined-only` on Debian 12's 0.13.2:
//!
//! | flavour  | read side                      | grace period               | threads                                          | quiescent states                             |
//! |----------|--------------------------------|----------------------------|--------------------------------------------------|----------------------------------------------|
//! | memb     | `urcu_memb_read_lock/unlock`   | `urcu_memb_synchronize_rcu`   | `urcu_memb_register_thread/unregister_thread`   | (inline only in the headers: not used)       |
//! | mb       | `urcu_mb_read_lock/unlock`     | `urcu_mb_synchronize_rcu`     | `urcu_mb_register_thread/unregister_thread`     | (inline only: not used)                      |
//! | signal   | `urcu_signal_read_lock/unlock` | `urcu_signal_synchronize_rcu` | `urcu_signal_register_thread/unregister_thread` | (inline only: not used)                      |
//! | qsbr     | `urcu_qsbr_read_lock/unlock`   | `urcu_qsbr_synchronize_rcu`   | `urcu_qsbr_register_thread/unregister_thread`   | `urcu_qsbr_quiescent_state`, `urcu_qsbr_thread_offline/online` |
//!
//! Every one is declared `extern void f(void);` in `<urcu/urcu-<flavour>.h>` (qsbr:
//! `<urcu/urcu-qsbr.h>`), hence the Rust type `unsafe extern "C" fn()`.
//!
//! **Caveat, stated on the rows.** C programs built with `_LGPL_SOURCE` get the read side as
//! inline functions; through `dlsym` we call the exported functions, one call each for lock and
//! unlock — a few cycles more than a C user who inlines them pays.
//!
//! The libraries are opened once and never closed (`dlclose` while a registered thread or a
//! signal handler of liburcu-signal's still exists would leave dangling code). Opening
//! liburcu-signal installs its handler for `SIGUSR1` (its library constructor), which nothing
//! else in the bench uses.

use std::ffi::{CStr, CString};
use std::marker::PhantomData;
use std::sync::OnceLock;

/// What rows say when the libraries cannot be opened.
pub const NOT_INSTALLED: &str = "liburcu not installed (apt-get install liburcu-dev)";

/// A liburcu flavour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// `urcu-memb`: readers use compiler barriers; grace periods use `membarrier(2)`.
    Memb,
    /// `urcu-mb`: readers use full memory barriers.
    Mb,
    /// `urcu-signal`: grace periods send readers a signal (`SIGUSR1`) that executes a barrier.
    Signal,
    /// `urcu-qsbr`: readers announce quiescent states themselves; read side is free.
    Qsbr,
}

impl Flavour {
    /// Every flavour, in row order.
    pub const ALL: [Flavour; 4] = [Flavour::Memb, Flavour::Mb, Flavour::Signal, Flavour::Qsbr];

    /// Its name: `memb`, `mb`, `signal`, `qsbr`.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Memb => "memb",
            Flavour::Mb => "mb",
            Flavour::Signal => "signal",
            Flavour::Qsbr => "qsbr",
        }
    }

    /// The shared library (soname) that carries it.
    pub fn soname(self) -> String {
        format!("liburcu-{}.so.8", self.name())
    }

    /// The flavour named `name` (as [`Flavour::name`] spells it).
    pub fn from_name(name: &str) -> Option<Flavour> {
        Flavour::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// `extern void f(void);` — every function used here has this C prototype.
pub type VoidFn = unsafe extern "C" fn();

/// One flavour's functions.
#[derive(Clone, Copy, Debug)]
pub struct Urcu {
    /// Which flavour.
    pub flavour: Flavour,
    /// `urcu_<f>_read_lock`.
    pub read_lock: VoidFn,
    /// `urcu_<f>_read_unlock`.
    pub read_unlock: VoidFn,
    /// `urcu_<f>_synchronize_rcu`.
    pub synchronize_rcu: VoidFn,
    /// `urcu_<f>_register_thread`.
    pub register_thread: VoidFn,
    /// `urcu_<f>_unregister_thread`.
    pub unregister_thread: VoidFn,
    /// `urcu_qsbr_quiescent_state` (qsbr only).
    pub quiescent_state: Option<VoidFn>,
    /// `urcu_qsbr_thread_offline` (qsbr only).
    pub thread_offline: Option<VoidFn>,
    /// `urcu_qsbr_thread_online` (qsbr only).
    pub thread_online: Option<VoidFn>,
}

/// The last `dlerror()` message.
fn dlerror() -> String {
    // SAFETY: dlerror has no preconditions; the string it returns is valid until the next dl*
    // call on this thread, and we copy it at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: non-null, NUL-terminated (dlerror's contract).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Looks `name` up in `handle` as an `extern void name(void)` function.
fn symbol(handle: *mut libc::c_void, name: &str) -> Result<VoidFn, String> {
    let c = CString::new(name).expect("symbol names have no NUL");
    // SAFETY: `handle` is a live handle from dlopen (never closed); `c` is NUL-terminated.
    let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
    if p.is_null() {
        return Err(format!("{name}: {}", dlerror()));
    }
    // SAFETY: `p` is the address of the exported function `name`, which liburcu 0.13's
    // headers (ABI 8, the soname we opened) declare `extern void name(void);` — no arguments,
    // no result, C calling convention: exactly `unsafe extern "C" fn()`. The library is never
    // closed, so the pointer stays valid for the process's life.
    Ok(unsafe { std::mem::transmute::<*mut libc::c_void, VoidFn>(p) })
}

fn open(flavour: Flavour) -> Result<Urcu, String> {
    let soname = CString::new(flavour.soname()).expect("no NUL");
    // SAFETY: `soname` is NUL-terminated. Opening runs the library's constructors (memb:
    // membarrier detection; signal: installs its SIGUSR1 handler), which are safe at any time.
    let handle = unsafe { libc::dlopen(soname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(dlerror());
    }
    let f = |what: &str| symbol(handle, &format!("urcu_{}_{what}", flavour.name()));
    let qsbr = |what: &str| {
        if flavour == Flavour::Qsbr {
            f(what).map(Some)
        } else {
            Ok(None)
        }
    };
    Ok(Urcu {
        flavour,
        read_lock: f("read_lock")?,
        read_unlock: f("read_unlock")?,
        synchronize_rcu: f("synchronize_rcu")?,
        register_thread: f("register_thread")?,
        unregister_thread: f("unregister_thread")?,
        quiescent_state: qsbr("quiescent_state")?,
        thread_offline: qsbr("thread_offline")?,
        thread_online: qsbr("thread_online")?,
    })
}

/// The flavour's functions, opened on first use (and kept for the process's life), or why they
/// are not available: [`NOT_INSTALLED`] when the library is not there, the `dlerror` message
/// when it is there but lacks a symbol.
pub fn load(flavour: Flavour) -> Result<&'static Urcu, String> {
    static LIBS: [OnceLock<Result<Urcu, String>>; 4] = [const { OnceLock::new() }; 4];
    let i = Flavour::ALL
        .iter()
        .position(|f| *f == flavour)
        .expect("a listed flavour");
    LIBS[i]
        .get_or_init(|| {
            open(flavour).map_err(|e| {
                if e.contains("cannot open shared object file") {
                    NOT_INSTALLED.to_string()
                } else {
                    format!("liburcu-{}: {e}", flavour.name())
                }
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The calling thread, registered as a reader of `u`'s flavour until dropped (unregistered
/// then). qsbr: registered threads are online. Not `Send`: registration is per thread.
pub struct Registered<'a>(&'a Urcu, PhantomData<*const ()>);

impl<'a> Registered<'a> {
    /// Registers the calling thread.
    pub fn new(u: &'a Urcu) -> Registered<'a> {
        // SAFETY: `register_thread` is `extern void urcu_<f>_register_thread(void)`; a thread
        // registers once (the guard is not `Send` and unregisters when dropped).
        unsafe { (u.register_thread)() };
        Registered(u, PhantomData)
    }

    /// The flavour's functions.
    pub fn urcu(&self) -> &'a Urcu {
        self.0
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        // SAFETY: this thread registered in `new` and is outside any read-side section (the
        // bench's sections are closed before the guard goes).
        unsafe { (self.0.unregister_thread)() };
    }
}

impl Urcu {
    /// One read-side section: lock, then unlock (two calls into the library).
    #[inline(always)]
    pub fn read_section(&self) {
        // SAFETY: both `extern void f(void)`; called on a registered thread (every caller holds
        // a `Registered`), properly paired.
        unsafe {
            (self.read_lock)();
            (self.read_unlock)();
        }
    }

    /// `synchronize_rcu`: waits for the read-side sections that began before it.
    pub fn synchronize(&self) {
        // SAFETY: `extern void f(void)`; called outside any read-side section (liburcu allows
        // unregistered callers; the bench's writers are not registered).
        unsafe { (self.synchronize_rcu)() }
    }

    /// qsbr: announce a quiescent state (a no-op for the other flavours).
    #[inline(always)]
    pub fn quiescent(&self) {
        if let Some(f) = self.quiescent_state {
            // SAFETY: `extern void urcu_qsbr_quiescent_state(void)`, on a registered online
            // thread outside any read-side section.
            unsafe { f() }
        }
    }

    /// Runs `f` with the calling (registered) thread offline for qsbr — an extended quiescent
    /// state, so grace periods need nothing from it; the other flavours need nothing for a
    /// thread outside a read-side section, so `f` just runs.
    pub fn offline<R>(&self, f: impl FnOnce() -> R) -> R {
        match (self.thread_offline, self.thread_online) {
            (Some(off), Some(on)) => {
                // SAFETY: `extern void urcu_qsbr_thread_offline(void)` / `..._online(void)`,
                // on a registered thread outside any read-side section, paired.
                unsafe { off() };
                let r = f();
                // SAFETY: as above.
                unsafe { on() };
                r
            }
            _ => f(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavours_load_or_say_why() {
        for f in Flavour::ALL {
            match load(f) {
                Ok(u) => {
                    assert_eq!(u.flavour, f);
                    assert_eq!(u.quiescent_state.is_some(), f == Flavour::Qsbr);
                    let _reg = Registered::new(u);
                    u.read_section();
                    u.quiescent();
                    u.offline(|| ());
                    drop(_reg);
                    // A grace period with no reader in a section returns.
                    u.synchronize();
                }
                Err(why) => assert!(why.contains("liburcu"), "{why}"),
            }
            assert_eq!(Flavour::from_name(f.name()), Some(f));
        }
    }
}
