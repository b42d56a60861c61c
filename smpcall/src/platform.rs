//! The platform trait: everything an architecture supplies to the engine.

use crate::cpumask::{CpuId, CpuMask};

/// What the engine needs from the machine it runs on: who am I, send an IPI, mask interrupts,
/// relax, tell the time.
///
/// The engine is safe to use; implementing this trait is not, because the engine's memory
/// safety rests on it (the `lock_api` pattern).
///
/// # Safety
///
/// An implementation must guarantee:
///
/// 1. **Identity.** [`current_cpu`](Platform::current_cpu) returns `Some(c)` only on the thread
///    of execution that *is* CPU `c` of this engine, and the same value for as long as that code
///    runs (a CPU never migrates); two CPUs never report the same id.
/// 2. **Delivery.** After [`send_ipi`](Platform::send_ipi)`(c)`, CPU `c` eventually calls
///    [`Engine::handle_ipi`](crate::Engine::handle_ipi), or serves its queue another way
///    ([`Engine::serve_queue`](crate::Engine::serve_queue)), *after* the send — unless the engine
///    reported `c` as polling (then the engine does not call `send_ipi`). `send_ipi` must be
///    callable with interrupts masked and from the IPI handler itself, and must not block.
/// 3. **Masking.** Between [`irq_save`](Platform::irq_save) and the matching
///    [`irq_restore`](Platform::irq_restore) the current CPU does not run `handle_ipi`
///    (nested in the masked code); an IPI arriving meanwhile is delivered after the restore that
///    unmasks. `handle_ipi` itself runs with interrupts masked.
///    [`irqs_masked`](Platform::irqs_masked) tells the truth about the current CPU.
/// 4. **Foreign threads.** Where `current_cpu` returns `None`, the engine lets the thread make
///    calls: [`send_ipi`](Platform::send_ipi), [`relax`](Platform::relax) and
///    [`now_ns`](Platform::now_ns) must work there too (a platform whose every thread is a CPU
///    has nothing to do).
pub unsafe trait Platform: Sync {
    /// Saved interrupt state, returned by [`irq_save`](Platform::irq_save).
    type IrqState: Copy;

    /// How many call handlers (queue flushes) may nest on one CPU. A function that waits for
    /// busy call data serves its own CPU's queue meanwhile, one flush deeper; beyond this depth
    /// the engine serves nothing more and a no-wait call that would have to wait is refused with
    /// [`DeadlockReason::NestingLimit`](crate::DeadlockReason::NestingLimit). Each level costs
    /// the engine's flush and wait frames plus the functions' own; size the CPU's interrupt stack
    /// for this many (the README states the engine's share). Default: 8.
    const MAX_CALL_NESTING: u32 = 8;

    /// The CPU executing this code, or `None` if the caller is not one of the engine's CPUs.
    fn current_cpu(&self) -> Option<CpuId>;

    /// Sends the cross-CPU call interrupt to `cpu`.
    fn send_ipi(&self, cpu: CpuId);

    /// Sends the cross-CPU call interrupt to every CPU in `mask` (never the caller). Override
    /// where the hardware has a broadcast form.
    fn send_ipi_mask(&self, mask: &CpuMask) {
        for cpu in mask {
            self.send_ipi(cpu);
        }
    }

    /// Masks interrupts on the current CPU, returning the previous state.
    fn irq_save(&self) -> Self::IrqState;

    /// Restores the state returned by [`irq_save`](Platform::irq_save). If this unmasks and an
    /// IPI arrived meanwhile, it is delivered now.
    ///
    /// # Safety
    /// `state` must be what the matching `irq_save` on this CPU returned, and masked regions
    /// must end in the reverse order they began (the innermost first). The engine relies on
    /// its masked regions staying masked — a queue flush edits the CPU's private lists under
    /// the mask, and an IPI handler run in the middle of that edit would corrupt them — so
    /// restoring any other state, or an outer region's state inside an inner one, is undefined
    /// behaviour. Safe code masks through [`Engine::irq_save`](crate::Engine::irq_save), whose
    /// guard keeps this contract.
    unsafe fn irq_restore(&self, state: Self::IrqState);

    /// Whether interrupts are masked on the current CPU.
    fn irqs_masked(&self) -> bool;

    /// Called in every busy-wait loop (`pause` on x86, a yield where CPUs share cores).
    fn relax(&self) {
        core::hint::spin_loop();
    }

    /// A monotonic clock in nanoseconds, for diagnostics. Defaults to "no clock" (0), which
    /// disables stall reports.
    fn now_ns(&self) -> u64 {
        0
    }

    /// Whether [`send_nmi`](Platform::send_nmi) works (default: no NMI).
    fn has_nmi(&self) -> bool {
        false
    }

    /// Sends a non-maskable interrupt to `cpu`: it must make `cpu` call
    /// [`Engine::handle_nmi`](crate::Engine::handle_nmi) soon, whatever its interrupt mask, but
    /// never nested in another NMI handler on that CPU. Only called if `has_nmi()`.
    fn send_nmi(&self, cpu: CpuId) {
        let _ = cpu;
    }

    /// Whether `cpu` (any CPU, observed from elsewhere) has interrupts masked, if the platform
    /// can tell; used in stall reports. Defaults to `None` (unknown).
    fn cpu_irqs_masked(&self, cpu: CpuId) -> Option<bool> {
        let _ = cpu;
        None
    }

    /// How many iterations of a wait loop pass between two looks at the clock for stall
    /// reports (default 256: a few µs of `pause`). A platform whose [`relax`](Platform::relax)
    /// is expensive (a yield to another thread) returns a small value, so that the first report
    /// comes within twice the threshold.
    fn stall_check_interval(&self) -> u32 {
        256
    }

    /// A point where a simulated platform may switch to another CPU (the deterministic test
    /// platform explores interleavings there). Real platforms leave it empty.
    #[inline]
    fn preempt_point(&self) {}

    /// Where the engine's reports go (a stuck stop_machine participant, and later the
    /// lost-IPI diagnostics). Called from any context, including with interrupts masked and
    /// from call handlers: an implementation must not allocate or take locks. Defaults to
    /// dropping the report.
    fn report(&self, message: core::fmt::Arguments<'_>) {
        let _ = message;
    }
}
