//! The two signals: the IPI handler (the engine's own work at once, user calls only where that
//! is sound), the NMI handler, and how the signal numbers are chosen and owned.
//!
//! Why each piece of signal-context work is async-signal-safe:
//! * **restricted flush** ([`Engine::handle_ipi_engine_only`](crate::Engine::handle_ipi_engine_only)):
//!   lock-free queue operations on call data the CPU holds; it runs only call data marked
//!   any-context, which only the engine creates —
//! * **stop_machine participation**: atomic stage counters, spinning, `sched_yield`; the user's
//!   function runs only on a CPU that may run user code (else the run is refused, nothing done);
//! * **RCU quiescent-state check**: a per-CPU counter load and an atomic decrement;
//! * **NMI state report and stall reports**: formatting into a stack buffer (no allocation) and
//!   one `write(2)`, or the `unsafe` report sink whose contract demands the same;
//! * the handlers save and restore `errno`, read only a `const` thread-local (no lazy
//!   initialisation), and never unwind (a panic in engine code aborts).

use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use super::platform::current;
use crate::error::{ConfigError, Error, OsRequest, SignalRole};

/// The IPI signal handler.
extern "C" fn on_ipi_signal(_signo: libc::c_int) {
    // SAFETY: this thread's errno location; saved and restored around the handler.
    let errno = unsafe { *libc::__errno_location() };
    let c = current();
    if !c.engine.is_null() {
        // SAFETY: the pointer is set by this CPU thread while its machine is alive and cleared
        // (with this signal blocked) before the thread exits.
        let engine = unsafe { &*c.engine };
        let platform = engine.platform();
        let hc = &platform.cpus[c.cpu];
        // Relaxed: this thread's own flags (written by it and its handlers only).
        if hc.masked.load(Ordering::Relaxed) {
            hc.pending.store(true, Ordering::Relaxed);
        } else if platform.calls_in_handlers || hc.interruptible.load(Ordering::Relaxed) > 0 {
            // SAFETY: the interrupted code is async-signal-safe (an `interruptible` region, or
            // `sleep`'s clock_nanosleep), or the machine's builder promised that every function
            // is (`run_calls_in_signal_handlers`): any call may run here.
            unsafe { engine.handle_ipi() };
        } else {
            // SAFETY: the IPI handler of this CPU; deferred user calls run at its next safe
            // point (idle loop, waits, safe_point, unmask), as the delivery contract requires.
            unsafe { engine.handle_ipi_engine_only() };
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The NMI signal handler: runs whatever the soft mask says (that is the point of an NMI).
/// While it runs, every signal is blocked (the IPI one included), so NMIs never nest and an
/// IPI never interrupts an NMI handler.
extern "C" fn on_nmi_signal(_signo: libc::c_int) {
    // SAFETY: this thread's errno location; saved and restored around the handler.
    let errno = unsafe { *libc::__errno_location() };
    let c = current();
    if !c.engine.is_null() {
        // SAFETY: as in `on_ipi_signal`; NMIs do not nest (every signal is blocked while this
        // handler runs), which is `handle_nmi`'s contract. NMI call functions are
        // async-signal-safe by `nmi_call_many`'s contract.
        unsafe { (*c.engine).handle_nmi() };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The handler a signal of `role` gets.
fn handler(role: SignalRole) -> usize {
    let handler: extern "C" fn(libc::c_int) = match role {
        SignalRole::Ipi => on_ipi_signal,
        SignalRole::Nmi => on_nmi_signal,
    };
    handler as usize
}

/// Serialises every look at and change of our signals' dispositions in this process.
static DISPOSITIONS: Mutex<Claims> = Mutex::new(Claims {
    building: Vec::new(),
    kept: Vec::new(),
});

/// Who uses which signal, under the dispositions lock: a failed build puts a signal back to its
/// default only if no other build in progress claimed it and no built machine uses it (an
/// adopted handler removed under a running machine would let its next IPI kill the process).
struct Claims {
    /// Signals claimed by builds still in progress, one entry per claim.
    building: Vec<i32>,
    /// Signals of machines that were built: their handlers stay for the process's lifetime.
    kept: Vec<i32>,
}

impl Claims {
    /// Ends one in-progress claim of `signal`; returns whether nobody else uses it.
    fn end_claim(&mut self, signal: i32) -> bool {
        if let Some(i) = self.building.iter().position(|&s| s == signal) {
            self.building.swap_remove(i);
        }
        !self.building.contains(&signal) && !self.kept.contains(&signal)
    }

    /// Keeps `signal`'s handler for the process's lifetime.
    fn keep(&mut self, signal: i32) {
        if !self.kept.contains(&signal) {
            self.kept.push(signal);
        }
    }
}

/// The current disposition's handler of `signo`, or `None` if it is not a valid signal.
fn disposition(signo: i32) -> Option<usize> {
    // SAFETY: a zeroed sigaction is a valid out value.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: null `act` only queries; `old` is a valid out pointer.
    (unsafe { libc::sigaction(signo, ptr::null(), &mut old) } == 0).then_some(old.sa_sigaction)
}

/// Makes sure `signal` carries our handler of `role`, installing it if the signal is free.
/// Checked at every build (not remembered): a user may have installed a handler of their own
/// on it after an earlier machine shut down. A successful claim is ended by [`keep`] (the
/// build succeeded) or [`release`] (it failed).
pub(super) fn claim(signal: i32, role: SignalRole) -> Result<(), Error> {
    let mut claims = DISPOSITIONS.lock().unwrap_or_else(|e| e.into_inner());
    install(signal, role)?;
    claims.building.push(signal);
    Ok(())
}

/// [`claim`]'s work on the disposition (the caller holds the lock): ours already, or free and
/// now ours.
fn install(signal: i32, role: SignalRole) -> Result<(), Error> {
    let Some(current) = disposition(signal) else {
        return Err(Error::InvalidConfig(ConfigError::UnknownSignal {
            role,
            signal,
        }));
    };
    if current == handler(role) {
        return Ok(());
    }
    if current == handler(role.other()) {
        return Err(Error::InvalidConfig(ConfigError::SignalHasOtherRole {
            role,
            signal,
        }));
    }
    if current != libc::SIG_DFL {
        return Err(Error::InvalidConfig(ConfigError::SignalInUse {
            role,
            signal,
        }));
    }
    // SAFETY: zeroed sigaction is a valid starting point; we set handler, flags, mask.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler(role);
    act.sa_flags = libc::SA_RESTART;
    // SAFETY: valid pointer to our sigaction's mask.
    unsafe {
        match role {
            SignalRole::Ipi => libc::sigemptyset(&mut act.sa_mask),
            SignalRole::Nmi => libc::sigfillset(&mut act.sa_mask),
        }
    };
    // SAFETY: installs a handler that is async-signal-safe (see the module documentation).
    if unsafe { libc::sigaction(signal, &act, ptr::null_mut()) } != 0 {
        let request = OsRequest::InstallSignalHandler { role, signal };
        return Err(super::os_error(request, &std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Ends a successful build's claim: the machine uses `signal` from now on, and its handler
/// stays (a running machine's signal is never put back to its default).
pub(super) fn keep(signal: i32) {
    // One lock for both steps: between them a failed build's `release` would see the signal
    // neither claimed nor kept, and put it back to its default under this machine.
    let mut claims = DISPOSITIONS.lock().unwrap_or_else(|e| e.into_inner());
    claims.end_claim(signal);
    claims.keep(signal);
}

/// Keeps `signal`'s handler for the process's lifetime, whatever claims end later (a machine
/// whose threads were left running may still be signalled).
pub(super) fn keep_for_ever(signal: i32) {
    DISPOSITIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keep(signal);
}

/// Ends a failed build's claim: puts back the default disposition of `signo` if it carries our
/// handler and nobody else uses it — no other build in progress claimed it, no built machine
/// kept it (a failed build leaves no handler behind, and removes none another machine needs).
pub(super) fn release(signo: i32, role: SignalRole) {
    let mut claims = DISPOSITIONS.lock().unwrap_or_else(|e| e.into_inner());
    if claims.end_claim(signo) && disposition(signo) == Some(handler(role)) {
        // SAFETY: zeroed sigaction with SIG_DFL (0) restores the default disposition.
        let act: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer.
        unsafe { libc::sigaction(signo, &act, ptr::null_mut()) };
    }
}

/// Picks the signal of `role`: the requested one (which must be a real-time signal), or the
/// first real-time signal that is ours already or free (skipping `avoid`), claimed.
pub(super) fn choose(
    requested: Option<i32>,
    role: SignalRole,
    avoid: Option<i32>,
) -> Result<i32, Error> {
    let (lo, hi) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    if let Some(s) = requested {
        if s < lo || s > hi {
            return Err(Error::InvalidConfig(ConfigError::NotRealTimeSignal {
                role,
                signal: s,
                min: lo,
                max: hi,
            }));
        }
        return claim(s, role).map(|()| s);
    }
    for signo in lo..=hi {
        if Some(signo) == avoid {
            continue;
        }
        if claim(signo, role).is_ok() {
            return Ok(signo);
        }
    }
    Err(Error::InvalidConfig(ConfigError::NoFreeSignal {
        role,
        min: lo,
        max: hi,
    }))
}

pub(super) fn set_signal_blocked(signo: i32, blocked: bool) {
    // SAFETY: building a signal set on the stack and applying it to this thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signo);
        let how = if blocked {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two builds claim the same signal; the one that installed the handler fails after the
    /// other adopted it: the handler must stay for the machine that was built. Before: the
    /// failed build put the signal back to its default action (terminate), and the running
    /// machine's next IPI killed the process.
    #[test]
    fn a_failed_build_keeps_a_handler_another_build_adopted() {
        // A signal the machines of this test binary do not reach (they take the lowest).
        let s = libc::SIGRTMAX() - 1;
        assert_eq!(disposition(s), Some(libc::SIG_DFL), "signal {s} is free");
        claim(s, SignalRole::Ipi).unwrap(); // build A installs
        claim(s, SignalRole::Ipi).unwrap(); // build B adopts
        release(s, SignalRole::Ipi); // A fails
        assert_eq!(
            disposition(s),
            Some(handler(SignalRole::Ipi)),
            "B's handler stays"
        );
        keep(s); // B is built
        claim(s, SignalRole::Ipi).unwrap(); // a third build adopts it, then fails
        release(s, SignalRole::Ipi);
        assert_eq!(
            disposition(s),
            Some(handler(SignalRole::Ipi)),
            "kept for B's machine"
        );

        // A failed build whose threads were left running keeps its handler too.
        let u = s - 2;
        assert_eq!(disposition(u), Some(libc::SIG_DFL), "signal {u} is free");
        claim(u, SignalRole::Nmi).unwrap();
        keep_for_ever(u); // its machine detached its threads
        release(u, SignalRole::Nmi);
        assert_eq!(
            disposition(u),
            Some(handler(SignalRole::Nmi)),
            "kept for its threads"
        );

        // Alone, a failed build leaves nothing behind.
        let t = s - 1;
        assert_eq!(disposition(t), Some(libc::SIG_DFL), "signal {t} is free");
        claim(t, SignalRole::Nmi).unwrap();
        release(t, SignalRole::Nmi);
        assert_eq!(
            disposition(t),
            Some(libc::SIG_DFL),
            "put back to its default"
        );
    }
}
