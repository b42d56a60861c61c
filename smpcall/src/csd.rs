//! Call data (`Csd`): one queued cross-CPU call, and the lock protocol that says who owns it.
//!
//! A `Csd` carries a type-erased function (`RunFn`) and a small payload. Its `LOCK` bit is the
//! ownership token:
//!
//! * the **sender** owns an unlocked `Csd`. It claims it with [`Csd::try_lock`], writes the call,
//!   and publishes it by pushing it on the target's [`CallQueue`](crate::queue::CallQueue);
//! * the **target** owns a locked `Csd` from the moment it takes it off its queue until it
//!   clears `LOCK`. After that store it never touches the `Csd` again — the sender may be
//!   freeing it (a stack `Csd`) or reusing it (a per-CPU slot, a caller-owned `Csd`).
//!
//! Synchronous calls are unlocked *after* the function returned (the waiter learns the call is
//! complete). Asynchronous calls are unlocked *before* the function runs: the target copies the
//! function and payload out, releases, then runs the copy — so an async call never keeps its
//! call data busy while its function runs (C3), and the function may reuse it at once.
//!
//! # Payloads
//!
//! Nothing is allocated, so a call's closure must live somewhere that outlives the call:
//!
//! * a **waiting** call borrows its closure from the caller's stack (the payload is a pointer;
//!   the caller does not return before the target released the `Csd`);
//! * a **no-wait** call moves its closure *into* the `Csd`: it must be `Send + 'static` and at
//!   most [`INLINE_CLOSURE_BYTES`] bytes with alignment at most that of `usize`. This is checked
//!   at compile time. Capture an `Arc`, a `&'static`, or a few integers; box anything larger
//!   yourself (outside the engine, where allocation is your choice).

use core::marker::PhantomPinned;
use core::mem::{align_of, size_of, MaybeUninit};
use core::ptr;

use crate::cpumask::CpuId;
use crate::sync::{spin_hint, AtomicPtr, AtomicU32, Ordering, UnsafeCell};

/// The call data is in flight: owned by the target CPU until cleared.
pub(crate) const LOCK: u32 = 1 << 0;
/// The sender waits: the target runs the function, *then* clears `LOCK`.
pub(crate) const SYNC: u32 = 1 << 1;
/// The function may run in any context the platform delivers IPIs in, including a hosted
/// signal handler that interrupted arbitrary code: the engine's own work (stop_machine
/// participation, RCU quiescent-state checks), which only touches atomics. Calls without it
/// (every user call) run only where the platform says user code may run.
pub(crate) const ANY_CONTEXT: u32 = 1 << 2;
/// A deferrable call: to a CPU in a quiet region it is queued without an IPI and runs when the
/// CPU leaves the region (see `quiet.rs`).
pub(crate) const DEFERRABLE: u32 = 1 << 3;

/// Source CPU recorded for a call made by a thread that is not one of the engine's CPUs.
pub(crate) const FOREIGN: CpuId = 0xffff;

/// `route` value meaning "no call recorded yet".
const NO_ROUTE: u32 = u32::MAX;

/// Number of machine words a no-wait call's closure may occupy inside a [`Csd`].
pub const INLINE_CLOSURE_WORDS: usize = 4;
/// Largest closure, in bytes, a no-wait call can carry (its alignment must not exceed `usize`'s).
pub const INLINE_CLOSURE_BYTES: usize = INLINE_CLOSURE_WORDS * size_of::<usize>();

/// Storage for a call's payload: a pointer (waiting calls) or an inline closure (no-wait calls).
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Payload([MaybeUninit<usize>; INLINE_CLOSURE_WORDS]);

impl Payload {
    pub(crate) const fn empty() -> Self {
        Payload([MaybeUninit::uninit(); INLINE_CLOSURE_WORDS])
    }

    /// A payload holding one pointer.
    pub(crate) fn from_ptr<T>(p: *const T) -> Self {
        let mut payload = Self::empty();
        payload.0[0] = MaybeUninit::new(p as usize);
        payload
    }

    /// Whether a `T` fits inline in a payload (size and alignment).
    pub(crate) const fn fits<T>() -> bool {
        size_of::<T>() <= INLINE_CLOSURE_BYTES && align_of::<T>() <= align_of::<usize>()
    }

    /// A payload holding `value` itself.
    ///
    /// # Safety
    /// `Payload::fits::<T>()` must hold.
    pub(crate) unsafe fn inline_unchecked<T>(value: T) -> Self {
        debug_assert!(Self::fits::<T>());
        let mut payload = Self::empty();
        // SAFETY: `T` fits (caller's contract) in the `usize`-aligned payload bytes; `write`
        // does not read the uninitialised destination.
        unsafe { ptr::write(payload.0.as_mut_ptr().cast::<T>(), value) };
        payload
    }

    /// A payload holding `f` itself. Fails to compile if `F` does not fit.
    ///
    /// The failure is a post-monomorphisation error (stable Rust has no way to bound a
    /// closure's size in its type), so `cargo build` reports it, not `cargo check`. rustc
    /// prints it as "index out of bounds: the length is <limit> but the index is <closure
    /// size>", then the message below, then the instantiation note that names your closure
    /// (file and line).
    pub(crate) fn inline<F>(f: F) -> Self {
        const {
            let closure_size = size_of::<F>();
            if closure_size > INLINE_CLOSURE_BYTES {
                // Shows both numbers in the compiler's error: length = the limit in bytes,
                // index = the closure's size in bytes.
                let limit_in_bytes = [0u8; INLINE_CLOSURE_BYTES];
                let _closure_too_large = limit_in_bytes[closure_size];
            }
            assert!(
                size_of::<F>() <= INLINE_CLOSURE_BYTES,
                "closure too large for a no-wait call: it may capture at most INLINE_CLOSURE_BYTES \
                 (32 bytes on 64-bit targets) — capture an Arc or a &'static instead, or use a \
                 waiting call"
            );
            assert!(
                align_of::<F>() <= align_of::<usize>(),
                "closure alignment too large for a no-wait call"
            );
        }
        let mut payload = Self::empty();
        // SAFETY: the const block above proves `F` fits in the payload's bytes with an alignment
        // the payload (`usize`-aligned) satisfies; `write` moves `f` in without reading the
        // uninitialised destination.
        unsafe { ptr::write(payload.0.as_mut_ptr().cast::<F>(), f) };
        payload
    }
}

/// Type-erased entry point of a call: runs the payload on `cpu`.
pub(crate) type RunFn = unsafe fn(payload: *mut Payload, cpu: CpuId);

/// A waiting single call's closure and result, on the caller's stack.
pub(crate) struct OnceCall<F, R> {
    pub(crate) f: Option<F>,
    pub(crate) ret: Option<R>,
}

/// Runs a [`OnceCall`] whose address is the payload's first word.
///
/// # Safety
/// The payload must come from `Payload::from_ptr(&mut OnceCall<F, R>)` and the `OnceCall` must
/// be alive and not accessed by anyone else until the call data is released.
pub(crate) unsafe fn run_once<F: FnOnce(CpuId) -> R, R>(payload: *mut Payload, cpu: CpuId) {
    // SAFETY: per this function's contract the first word is a live, exclusively ours
    // `*mut OnceCall<F, R>`.
    let call = unsafe { &mut *((*payload).0[0].assume_init() as *mut OnceCall<F, R>) };
    if let Some(f) = call.f.take() {
        call.ret = Some(f(cpu));
    }
}

/// Runs a [`OnceCall`] stored inline in the payload itself: the result lands in the call
/// data's own cache line, which the caller reads back after the release (one cache-line
/// transfer fewer than a `OnceCall` on the caller's stack).
///
/// # Safety
/// The payload must come from `Payload::inline_unchecked(OnceCall<F, R>)`.
pub(crate) unsafe fn run_once_inline<F: FnOnce(CpuId) -> R, R>(payload: *mut Payload, cpu: CpuId) {
    // SAFETY: per this function's contract the payload holds a valid `OnceCall<F, R>`, which
    // the sender does not touch until we release the call data.
    let call = unsafe { &mut *payload.cast::<OnceCall<F, R>>() };
    if let Some(f) = call.f.take() {
        call.ret = Some(f(cpu));
    }
}

/// Runs a shared `F` whose address is the payload's first word (waiting many-calls).
///
/// # Safety
/// The payload must come from `Payload::from_ptr(&F)`, and that `F` must outlive the release of
/// the call data.
pub(crate) unsafe fn run_shared<F: Fn(CpuId) + Sync>(payload: *mut Payload, cpu: CpuId) {
    // SAFETY: per this function's contract the first word is a live `*const F`, and `F: Sync`
    // makes calling it from this CPU while others do too sound.
    let f = unsafe { &*((*payload).0[0].assume_init() as *const F) };
    f(cpu)
}

/// The entry point and payload of a waiting call that shares `f` (see [`run_shared`]).
pub(crate) fn shared_call<F: Fn(CpuId) + Sync>(f: &F) -> (RunFn, Payload) {
    (run_shared::<F>, Payload::from_ptr(f))
}

/// Runs (and consumes) an `F` stored inline in the payload (no-wait calls).
///
/// # Safety
/// The payload must come from `Payload::inline::<F>` and must be consumed at most once.
pub(crate) unsafe fn run_inline<F: FnOnce(CpuId)>(payload: *mut Payload, cpu: CpuId) {
    // SAFETY: per this function's contract the payload holds a valid `F`, read exactly once.
    let f = unsafe { ptr::read(payload.cast::<F>()) };
    f(cpu)
}

/// Call data: one cross-CPU call in flight.
///
/// The engine keeps its own `Csd`s (one per sender and target, and one on the stack of each
/// waiting caller). You only create one yourself for
/// [`Engine::call_async_csd`](crate::Engine::call_async_csd): a *caller-owned* `Csd` that you
/// keep (pinned) and reuse. While it is in flight ([`is_busy`](Csd::is_busy)) another call with
/// it is refused with [`Error::Busy`](crate::Error::Busy); dropping it waits until it is free,
/// which is why it must be pinned.
///
/// ```
/// use core::pin::pin;
/// use smpcall::Csd;
///
/// let csd = pin!(Csd::new());
/// assert!(!csd.is_busy());
/// ```
#[repr(C, align(64))]
pub struct Csd {
    /// Link in the target's queue. Written by the sender before the push, by the target while
    /// it holds the call data.
    pub(crate) next: AtomicPtr<Csd>,
    flags: AtomicU32,
    /// Diagnostics: `src << 16 | dst` of the current call (written by the sender before the
    /// push; read racily by dumps and stall reports).
    route: core::sync::atomic::AtomicU32,
    run: UnsafeCell<Option<RunFn>>,
    payload: UnsafeCell<Payload>,
    /// Diagnostics: address of a `fn() -> &'static str` naming the call's function (0: none).
    name_fn: core::sync::atomic::AtomicUsize,
    _pinned: PhantomPinned,
}

// SAFETY: `run` and `payload` are only accessed by the current owner as defined by the `LOCK`
// protocol (the sender while unlocked and claimed by `try_lock`, the target while locked);
// ownership is handed over by Release/Acquire pairs on the queue head and on `flags`.
unsafe impl Sync for Csd {}

impl Default for Csd {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for Csd {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Csd")
            .field("busy", &self.is_busy())
            .finish()
    }
}

impl Csd {
    /// A free call data.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Csd {
            next: AtomicPtr::new(ptr::null_mut()),
            flags: AtomicU32::new(0),
            route: core::sync::atomic::AtomicU32::new(NO_ROUTE),
            run: UnsafeCell::new(None),
            payload: UnsafeCell::new(Payload::empty()),
            name_fn: core::sync::atomic::AtomicUsize::new(0),
            _pinned: PhantomPinned,
        }
    }

    /// A free call data.
    #[cfg(loom)]
    pub fn new() -> Self {
        Csd {
            next: AtomicPtr::new(ptr::null_mut()),
            flags: AtomicU32::new(0),
            route: core::sync::atomic::AtomicU32::new(NO_ROUTE),
            run: UnsafeCell::new(None),
            payload: UnsafeCell::new(Payload::empty()),
            name_fn: core::sync::atomic::AtomicUsize::new(0),
            _pinned: PhantomPinned,
        }
    }

    /// Whether a call using this call data is still in flight (queued, or running for a waiting
    /// call). A no-wait call stops being in flight when its target *takes* it, before its
    /// function runs.
    pub fn is_busy(&self) -> bool {
        // Acquire: pairs with the target's Release in `unlock`, so once we see it free, the
        // target's reads of the payload (and, for waiting calls, the function's effects)
        // happen-before whatever the caller does next.
        self.flags.load(Ordering::Acquire) & LOCK != 0
    }

    /// Claims a free call data for a new call. Returns `false` if it is in flight.
    pub(crate) fn try_lock(&self) -> bool {
        // Acquire on success: same pairing as `is_busy` — the previous call's target is done
        // reading before we overwrite. Relaxed on failure: we do not touch anything then.
        self.flags
            .compare_exchange(0, LOCK, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// [`try_lock`](Csd::try_lock) without a locked instruction, for call data nobody else can
    /// be claiming at the same time. Returns `false` if it is in flight.
    ///
    /// # Safety
    /// No other thread, handler or NMI may claim this call data concurrently (the engine's
    /// per-sender slots and stack call data, claimed with interrupts masked outside NMI
    /// context: `Target::exclusive` in `engine.rs`).
    pub(crate) unsafe fn claim_exclusive(&self) -> bool {
        if self.is_busy() {
            return false;
        }
        // Relaxed: no concurrent claimer (this function's contract); the Acquire in `is_busy`
        // ordered the previous target's reads before our writes, and the push publishes them.
        self.flags.store(LOCK, Ordering::Relaxed);
        true
    }

    /// Writes a call into a call data this CPU just claimed with `try_lock`.
    ///
    /// # Safety
    /// The caller must hold the call data (a successful `try_lock`, not yet pushed) and the
    /// payload must match `run`'s contract.
    pub(crate) unsafe fn set_call(&self, run: RunFn, payload: Payload, sync: bool) {
        self.run.with_mut(|p| {
            // SAFETY: we own the call data (locked by us, not yet published).
            unsafe { *p = Some(run) }
        });
        self.payload.with_mut(|p| {
            // SAFETY: as above.
            unsafe { *p = payload }
        });
        let flags = if sync { LOCK | SYNC } else { LOCK };
        // Relaxed: we own the call data; the push that publishes it is a Release.
        self.flags.store(flags, Ordering::Relaxed);
    }

    /// Records who calls whom with what (diagnostics only). The sender calls this while it
    /// holds the call data, before the push.
    pub(crate) fn set_meta<F>(&self, src: CpuId, dst: CpuId) {
        fn name_of<F>() -> &'static str {
            core::any::type_name::<F>()
        }
        let name: fn() -> &'static str = name_of::<F>;
        // Relaxed: diagnostic fields, read racily by design (dumps, stall reports).
        self.route.store(
            ((src as u32) << 16) | (dst as u32 & 0xffff),
            core::sync::atomic::Ordering::Relaxed,
        );
        self.name_fn
            .store(name as usize, core::sync::atomic::Ordering::Relaxed);
    }

    /// The (source, target) of the current or last call, if recorded.
    pub fn route(&self) -> Option<(CpuId, CpuId)> {
        // Relaxed: diagnostics (see `set_meta`).
        let r = self.route.load(core::sync::atomic::Ordering::Relaxed);
        (r != NO_ROUTE).then_some(((r >> 16) as CpuId, (r & 0xffff) as CpuId))
    }

    /// The type name of the current or last call's function, if recorded.
    pub fn function_name(&self) -> Option<&'static str> {
        // Relaxed: diagnostics (see `set_meta`).
        let f = self.name_fn.load(core::sync::atomic::Ordering::Relaxed);
        if f == 0 {
            return None;
        }
        // SAFETY: non-zero values are only ever stored by `set_meta`, from a
        // `fn() -> &'static str`; function pointers round-trip through `usize`.
        let f: fn() -> &'static str =
            unsafe { core::mem::transmute::<usize, fn() -> &'static str>(f) };
        Some(f())
    }

    /// Whether the current call (if busy) is a waiting one. Diagnostics only: racy.
    pub fn is_waiting_call(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & SYNC != 0
    }

    /// Moves a `T` out of the payload (sender side, after the call data was released).
    ///
    /// # Safety
    /// The call data must be free (not busy) and owned by the caller, and its payload must hold
    /// a valid `T` written by `Payload::inline_unchecked` that has not been moved out yet.
    pub(crate) unsafe fn take_inline<T>(&self) -> T {
        self.payload.with(|p| {
            // SAFETY: per this function's contract.
            unsafe { ptr::read(p.cast::<T>()) }
        })
    }

    /// Whether the sender waits for this call (target side, while it holds the call data).
    /// Marks a call data this CPU holds (filled, not yet pushed) as engine work that may run in
    /// any context (see [`ANY_CONTEXT`]).
    ///
    /// # Safety
    /// As for [`set_call`](Csd::set_call); the function must be async-signal-safe.
    pub(crate) unsafe fn set_any_context(&self) {
        // Relaxed: we own the call data; the push that publishes it is a Release.
        let f = self.flags.load(Ordering::Relaxed);
        self.flags.store(f | ANY_CONTEXT, Ordering::Relaxed);
    }

    /// Marks a call data this CPU holds (filled, not yet pushed) as deferrable.
    ///
    /// # Safety
    /// As for [`set_call`](Csd::set_call).
    pub(crate) unsafe fn set_deferrable(&self) {
        // Relaxed: we own the call data; the push that publishes it is a Release.
        let f = self.flags.load(Ordering::Relaxed);
        self.flags.store(f | DEFERRABLE, Ordering::Relaxed);
    }

    /// Whether the call is deferrable (sender side, before the push).
    pub(crate) fn is_deferrable(&self) -> bool {
        // Relaxed: the sender's own write, read before the push.
        self.flags.load(Ordering::Relaxed) & DEFERRABLE != 0
    }

    /// Whether the call may run in any context (target side, while it holds the call data).
    pub(crate) fn is_any_context(&self) -> bool {
        // Relaxed: as for `is_sync`.
        self.flags.load(Ordering::Relaxed) & ANY_CONTEXT != 0
    }

    pub(crate) fn is_sync(&self) -> bool {
        // Relaxed: the target took the call data with an Acquire that made the sender's flag
        // store visible.
        self.flags.load(Ordering::Relaxed) & SYNC != 0
    }

    /// Target side of a waiting call: run the function in place, then release.
    ///
    /// # Safety
    /// `this` must be a call data this CPU took off its queue and still holds. After this
    /// returns the call data may no longer exist.
    pub(crate) unsafe fn run_sync_and_release(this: *const Csd, cpu: CpuId) {
        // SAFETY: we hold the call data, so it is alive and its contents are ours to read.
        let csd = unsafe { &*this };
        let run = csd.run.with(|p| {
            // SAFETY: we hold the call data.
            unsafe { *p }
        });
        if let Some(run) = run {
            csd.payload.with_mut(|p| {
                // SAFETY: the sender wrote a payload matching `run` (set_call's contract) and
                // waits without touching it until we release.
                unsafe { run(p, cpu) }
            });
        }
        // Release: the function's effects and our last access happen-before the waiter's
        // Acquire in `is_busy`. After this store the call data may be freed: no more access.
        // SAFETY: the call data is alive until this store completes (the waiter spins on it).
        unsafe { (*this).flags.store(0, Ordering::Release) };
    }

    /// Target side of a no-wait call: copy the call out and release. The caller then runs it.
    ///
    /// # Safety
    /// As for [`run_sync_and_release`](Csd::run_sync_and_release); the returned call must be
    /// run exactly once (it may own captured values).
    pub(crate) unsafe fn take_async_and_release(this: *const Csd) -> (Option<RunFn>, Payload) {
        // SAFETY: we hold the call data.
        let csd = unsafe { &*this };
        let run = csd.run.with(|p| {
            // SAFETY: we hold the call data.
            unsafe { *p }
        });
        let payload = csd.payload.with(|p| {
            // SAFETY: we hold the call data; `Payload` is plain bytes, copying moves the closure
            // out (the sender will not run or drop it).
            unsafe { *p }
        });
        // Release: our reads of the payload happen-before the owner's Acquire (`try_lock`) and
        // any overwrite. The call data is not touched after this.
        // SAFETY: alive until this store completes.
        unsafe { (*this).flags.store(0, Ordering::Release) };
        (run, payload)
    }
}

impl Drop for Csd {
    fn drop(&mut self) {
        // A caller-owned call data may be dropped while its target still holds it: wait, so the
        // target never touches freed memory. `Csd` is `!Unpin`, and the engine only accepts
        // pinned caller-owned call data, so this drop is guaranteed to run before the memory
        // is reused.
        while self.is_busy() {
            spin_hint();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn csd_is_one_cache_line() {
        assert_eq!(size_of::<Csd>(), 64);
    }

    #[test]
    fn try_lock_refuses_a_busy_csd_until_released() {
        let csd = Csd::new();
        assert!(csd.try_lock());
        assert!(csd.is_busy());
        assert!(!csd.try_lock(), "a locked csd must not be claimed twice");
        // SAFETY: we hold it; the payload matches run_inline::<closure>.
        unsafe {
            csd.set_call(
                run_inline::<fn(CpuId)>,
                Payload::inline((|_| {}) as fn(CpuId)),
                false,
            )
        };
        // SAFETY: we "took" it (no queue involved in this unit test).
        let (run, mut payload) = unsafe { Csd::take_async_and_release(&csd) };
        assert!(!csd.is_busy());
        // SAFETY: consumed exactly once.
        unsafe { run.unwrap()(&mut payload, 0) };
        assert!(csd.try_lock());
        // SAFETY: free it again for the Drop check.
        unsafe { Csd::take_async_and_release(&csd) };
    }
}
