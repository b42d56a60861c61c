//! A single-threaded platform for deterministic cost measurements: one OS thread plays every
//! CPU in turn, IPIs are only counted, and a waiting sender's busy-wait serves the targets'
//! queues itself (its `relax` switches to each CPU with queued calls and serves it).
//!
//! Nothing here is timed: what it is for is counting (instructions under callgrind, IPIs,
//! steps). A wait that would need another CPU to make progress takes exactly one `relax`.
//!
//! The engine's platform entry points (`mark_online`, `serve_queue`, `idle_poll`) are used in
//! `bring_up`, [`serve`] and [`poll_while`] only, so a change to that interface is a change
//! here.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use smpcall::{CpuId, Engine, Error, HeapStorage, Platform};

/// The engine over [`Solo`].
pub type SoloEngine = Engine<Solo, HeapStorage>;

thread_local! {
    /// The CPU this thread plays right now.
    static CPU: Cell<Option<CpuId>> = const { Cell::new(None) };
    /// Its interrupt mask (soft).
    static MASKED: Cell<bool> = const { Cell::new(false) };
    /// While set, `relax` serves every CPU with queued calls (see [`ServeOnRelax`]).
    static SERVE_ON_RELAX: Cell<*const SoloEngine> = const { Cell::new(ptr::null()) };
    /// While set, called at the start and end of every such serve (cost accounting).
    static AROUND_SERVE: Cell<Option<fn(bool)>> = const { Cell::new(None) };
}

/// The single-threaded platform. Counts what would be hardware events.
#[derive(Debug, Default)]
pub struct Solo {
    /// `send_ipi` calls.
    pub ipis: AtomicU64,
    /// `send_ipi_mask` calls (one per IPI batch).
    pub ipi_batches: AtomicU64,
    /// `relax` calls (busy-wait iterations).
    pub relaxes: AtomicU64,
}

// SAFETY: one thread plays every CPU, switching only between engine calls (`on`) or inside
// `relax`, where it saves and restores the CPU and mask it interrupts; so `current_cpu` is
// stable for the code running "on" a CPU and unique. IPIs are never delivered: the engine's
// delivery contract is met by serving queues explicitly ([`serve`], and `relax` while a
// [`ServeOnRelax`] is alive) — the measurements never wait for an IPI otherwise. Masking is a
// thread-local flag: no handler ever runs nested in masked code.
unsafe impl Platform for Solo {
    type IrqState = bool;

    fn current_cpu(&self) -> Option<CpuId> {
        CPU.with(Cell::get)
    }

    fn send_ipi(&self, _cpu: CpuId) {
        // Relaxed: a counter on one thread.
        self.ipis.fetch_add(1, Ordering::Relaxed);
    }

    fn send_ipi_mask(&self, mask: &smpcall::CpuMask) {
        // Relaxed: counters on one thread.
        self.ipi_batches.fetch_add(1, Ordering::Relaxed);
        for cpu in mask {
            self.send_ipi(cpu);
        }
    }

    fn irq_save(&self) -> bool {
        MASKED.with(|m| m.replace(true))
    }

    unsafe fn irq_restore(&self, state: bool) {
        MASKED.with(|m| m.set(state));
    }

    fn irqs_masked(&self) -> bool {
        MASKED.with(Cell::get)
    }

    fn relax(&self) {
        // Relaxed: a counter on one thread.
        self.relaxes.fetch_add(1, Ordering::Relaxed);
        let engine = SERVE_ON_RELAX.with(Cell::get);
        if engine.is_null() {
            return;
        }
        // SAFETY: set only by a live `ServeOnRelax`, which borrows the engine for as long as
        // the pointer is set.
        let engine = unsafe { &*engine };
        let around = AROUND_SERVE.with(Cell::get);
        if let Some(f) = around {
            f(true);
        }
        let me = CPU.with(Cell::get);
        let masked = MASKED.with(|m| m.replace(false));
        for cpu in 0..engine.nr_cpus() {
            if Some(cpu) != me && engine.has_queued(cpu) {
                on(cpu);
                serve(engine);
            }
        }
        MASKED.with(|m| m.set(masked));
        CPU.with(|c| c.set(me));
        if let Some(f) = around {
            f(false);
        }
    }
}

/// Makes this thread play `cpu` from now on.
pub fn on(cpu: CpuId) {
    CPU.with(|c| c.set(Some(cpu)));
}

/// An engine of `n` CPUs over [`Solo`] and [`HeapStorage`], every CPU online, this thread on
/// CPU 0.
pub fn engine(n: usize) -> Result<SoloEngine, Error> {
    let e = Engine::new(Solo::default(), HeapStorage::new(n))?;
    bring_up(&e)?;
    on(0);
    Ok(e)
}

/// Marks every CPU online (the platform's bring-up).
fn bring_up(e: &SoloEngine) -> Result<(), Error> {
    for cpu in 0..e.nr_cpus() {
        // SAFETY: this thread plays every CPU and serves each one's queue whenever a
        // measurement needs it to progress (`serve`, and a waiting sender's `relax` while a
        // `ServeOnRelax` is alive), which is this platform's delivery.
        unsafe { e.mark_online(cpu)? };
    }
    Ok(())
}

/// Serves the current CPU's queue (what its IPI handler or idle loop would do); returns how
/// many calls ran.
#[inline(never)]
pub fn serve(e: &SoloEngine) -> usize {
    e.serve_queue()
}

/// Runs `body` on CPU `sender` while CPU `poller` idle-polls its queue (so calls to it elide
/// the IPI and are served from its idle loop); returns `body`'s result.
pub fn poll_while<R>(e: &SoloEngine, poller: CpuId, sender: CpuId, body: impl FnOnce() -> R) -> R {
    let mut body = Some(body);
    let mut out = None;
    on(poller);
    // SAFETY: this is `poller`'s idle loop on this platform, at task level (no handler of
    // `poller` runs, interrupts unmasked). `body` runs as another CPU (`sender`) in between
    // two checks of the loop — on one thread, that is what the two CPUs running side by side
    // looks like.
    unsafe {
        e.idle_poll(|| {
            if let Some(body) = body.take() {
                on(sender);
                out = Some(body());
                on(poller);
            }
            true
        });
    }
    on(sender);
    out.expect("idle_poll asks whether to stop at least once")
}

/// While alive, a waiting sender's `relax` serves every other CPU's queue (with `around`, if
/// given, called with `true` before and `false` after each such serve).
pub struct ServeOnRelax<'a> {
    _engine: &'a SoloEngine,
}

impl<'a> ServeOnRelax<'a> {
    /// Starts serving on relax.
    pub fn new(engine: &'a SoloEngine, around: Option<fn(bool)>) -> Self {
        SERVE_ON_RELAX.with(|c| c.set(engine));
        AROUND_SERVE.with(|c| c.set(around));
        ServeOnRelax { _engine: engine }
    }
}

impl Drop for ServeOnRelax<'_> {
    fn drop(&mut self) {
        SERVE_ON_RELAX.with(|c| c.set(ptr::null()));
        AROUND_SERVE.with(|c| c.set(None));
    }
}
