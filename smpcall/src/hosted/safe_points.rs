//! Safe points: where a busy CPU's thread lets deferred calls run — [`safe_point`], [`sleep`],
//! and `unsafe` [`interruptible`] regions.

use std::ptr;
use std::sync::atomic::{compiler_fence, Ordering};
use std::time::Duration;

use super::platform::current;

/// Sleeps for `d` in a CPU's task context, however often IPIs arrive.
///
/// `std::thread::sleep` restarts `nanosleep` with the *remaining* time after every signal, and
/// each restart adds the kernel's timer slack: on a CPU that receives IPIs more often than the
/// slack (~50 µs), it may never finish. This sleeps until an absolute deadline instead
/// (`clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)`), so interruptions cost nothing.
///
/// The sleep is a safe point: calls queued to this CPU run at its start, and calls arriving
/// while it sleeps run at once, in the signal handler that interrupts the (async-signal-safe)
/// `clock_nanosleep`. On a thread that is not a CPU it just sleeps. `Duration::MAX` sleeps
/// (practically) forever.
pub fn sleep(d: Duration) {
    // SAFETY: the region only calls async-signal-safe functions (clock_gettime,
    // clock_nanosleep) and touches nothing a call's function could use.
    unsafe { interruptible(|| sleep_until_deadline(d)) }
}

fn sleep_until_deadline(d: Duration) {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let total = now.tv_nsec as u128 + d.as_nanos();
    // Saturate instead of wrapping: `Duration::MAX` must not come out as a deadline in the past.
    let secs = (total / 1_000_000_000).min(libc::time_t::MAX as u128) as libc::time_t;
    let deadline = libc::timespec {
        tv_sec: now.tv_sec.saturating_add(secs),
        tv_nsec: (total % 1_000_000_000) as libc::c_long,
    };
    loop {
        // SAFETY: valid deadline pointer; a null remainder is allowed with TIMER_ABSTIME.
        let r = unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &deadline,
                ptr::null_mut(),
            )
        };
        if r != libc::EINTR {
            return;
        }
    }
}

/// A safe point: serves the current CPU's queue (for [`Delivery::SafePoint`](super::Delivery::SafePoint), or to cut
/// latency anywhere). Returns how many calls ran; 0 when not on a CPU thread.
///
/// With interrupts masked (an [`IrqGuard`](crate::IrqGuard) alive) it serves nothing: the
/// masked region asked for no calls. (`Engine::serve_queue` is the explicit flush that serves
/// regardless.)
pub fn safe_point() -> usize {
    let c = current();
    if c.engine.is_null() {
        return 0;
    }
    // SAFETY: set by this CPU thread while its machine is alive.
    let engine = unsafe { &*c.engine };
    if engine.irqs_masked() {
        return 0;
    }
    engine.serve_queue()
}

/// Runs `f` in a region where IPIs may run this CPU's calls *inside the signal handler* that
/// interrupts `f` — the lowest latency for calls to a CPU that computes for a long time. Calls
/// already deferred to this CPU run first. On a thread that is not a CPU it just runs `f`.
///
/// # Safety
/// Any call's function (arbitrary Rust: allocation, locks, printing) may run at any instruction
/// of `f`, in signal context. So `f` must be *async-signal-safe* with respect to them: it must
/// not allocate or free, hold any lock, use `std::io`, or leave data that a call's function
/// reads half-written — plain computation on its own data, atomics, spinning and
/// async-signal-safe system calls are fine. `f` must not unwind (a panic aborts instead).
///
/// ```
/// use smpcall::hosted::{interruptible, Machine};
/// let m = Machine::builder().cpus(2).build()?;
/// let sum = m.run_on(1, |_| {
///     // SAFETY: integer arithmetic only: nothing a call's function could interfere with.
///     unsafe { interruptible(|| (0..1_000_000u64).fold(0u64, |a, x| a.wrapping_add(x))) }
/// }).join()?;
/// assert_eq!(sum, 499_999_500_000);
/// # m.shutdown()?; Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub unsafe fn interruptible<R>(f: impl FnOnce() -> R) -> R {
    let c = current();
    if c.engine.is_null() {
        return f();
    }
    let _borrow = EngineBorrow::new();
    // SAFETY: set by this CPU thread while its machine is alive; `_borrow` keeps this thread
    // the CPU (no leave) until the region ends.
    let engine = unsafe { &*c.engine };
    let hc = &engine.platform().cpus[c.cpu];
    engine.serve_queue();
    // Relaxed + compiler fences: only this thread (and its signal handler) reads it; the fences
    // keep `f`'s code inside the marked region.
    hc.interruptible.store(
        hc.interruptible.load(Ordering::Relaxed) + 1,
        Ordering::Relaxed,
    );
    compiler_fence(Ordering::SeqCst);
    struct Leave<'a>(&'a std::sync::atomic::AtomicU32);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            compiler_fence(Ordering::SeqCst);
            self.0
                .store(self.0.load(Ordering::Relaxed) - 1, Ordering::Relaxed);
        }
    }
    let leave = Leave(&hc.interruptible);
    let abort = crate::engine::AbortOnUnwind;
    let r = f();
    std::mem::forget(abort);
    drop(leave);
    r
}

/// Runs `f` with the calling CPU in a quiet region ([`Engine::quiet`](crate::Engine::quiet)):
/// grace periods skip it without a signal, deferrable calls wait until `f` returns (and run
/// then), urgent calls still interrupt it. For a blocking system call: `quiet(|| read(fd))`.
/// On a thread that is not a CPU it just runs `f`.
///
/// Urgent calls that interrupt a blocking call run at once only in an
/// [`interruptible`] region (`unsafe`); otherwise at the region's end.
pub fn quiet<R>(f: impl FnOnce() -> R) -> R {
    let c = current();
    if c.engine.is_null() {
        return f();
    }
    let _borrow = EngineBorrow::new();
    // SAFETY: set by this CPU thread while its machine is alive; `_borrow` keeps this thread
    // the CPU (no leave) for the whole region.
    let engine = unsafe { &*c.engine };
    engine.quiet(f)
}

/// Runs `f` with the engine of the machine whose CPU this thread is — from a task or from a
/// call's function — so nested calls need no `Machine` in a `static`. `None` on a thread that
/// is not a CPU.
///
/// ```
/// use smpcall::hosted::{with_engine, Machine};
/// let m = Machine::builder().cpus(2).build()?;
/// let r = m.run_on(0, |e| {
///     e.call_single(1, |_| with_engine(|e| e.current_cpu()).flatten())
/// }).join()??;
/// assert_eq!(r, Some(1));
/// # m.shutdown()?; Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn with_engine<R>(f: impl FnOnce(&super::HostEngine) -> R) -> Option<R> {
    let c = current();
    if c.engine.is_null() {
        return None;
    }
    let _borrow = EngineBorrow::new();
    // SAFETY: the pointer is set by this CPU thread while its machine is alive and cleared
    // before the thread exits; while `_borrow` lives this thread cannot stop being the CPU
    // (an attached thread's leave is refused), so the machine stays alive for all of `f`.
    Some(f(unsafe { &*c.engine }))
}

thread_local! {
    /// How many frames of this thread hold a reference to its engine made from the raw
    /// `CURRENT` pointer (`with_engine`, `quiet`, `interruptible`): an attached thread may not
    /// leave (and so let its machine be freed) under them. `const`, no destructor.
    static ENGINE_BORROWS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A frame of this thread holds a reference to its engine (see [`ENGINE_BORROWS`]).
struct EngineBorrow;

impl EngineBorrow {
    fn new() -> EngineBorrow {
        ENGINE_BORROWS.with(|b| b.set(b.get() + 1));
        EngineBorrow
    }
}

impl Drop for EngineBorrow {
    fn drop(&mut self) {
        ENGINE_BORROWS.with(|b| b.set(b.get() - 1));
    }
}

/// Whether a frame of this thread holds a reference to its engine (leaving must wait).
pub(super) fn engine_borrowed() -> bool {
    ENGINE_BORROWS.try_with(|b| b.get() > 0).unwrap_or(false)
}
