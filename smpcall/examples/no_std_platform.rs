//! A complete, minimal [`Platform`]: what a kernel implements to use the `no_std` engine.
//!
//! Single-threaded and "manual": one thread plays every CPU in turn (a thread-local says which
//! one is running, another whether its interrupts are masked), `send_ipi` only records a
//! pending bit, and [`deliver`] plays the interrupt controller by calling
//! `engine.handle_ipi()` on each CPU with an IPI pending. The engine's storage is a
//! [`StaticStorage`] in a `static`: the engine allocates nothing. Printing uses `std`.
//!
//! In a real kernel `current_cpu` reads a per-CPU register (GS base, `TPIDR_EL1`, `tp`),
//! `send_ipi` writes the interrupt controller (the local APIC's ICR, a GICv3 SGI, an SBI
//! call), `irq_save`/`irq_restore` are `pushf; cli`/`popf` or `DAIF`, `relax` is `pause`, each
//! CPU calls `mark_online` when it boots, and the IPI vector's handler calls `handle_ipi` —
//! with real CPUs, waiting calls to other CPUs work too (here one thread cannot both wait and
//! serve). `baremetal/` in this repository does all of that for x86_64, aarch64 and riscv64.
//!
//! ```sh
//! cargo run --release -p smpcall --example no_std_platform
//! ```

use std::cell::Cell;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};

use smpcall::{CpuId, CpuMask, Csd, DeadlockReason, Engine, Error, Platform, StaticStorage};

const CPUS: usize = 4;
static STORAGE: StaticStorage<CPUS> = StaticStorage::new();
/// How many calls ran on each CPU (touched only by the calls).
static RUNS: [AtomicU64; CPUS] = [const { AtomicU64::new(0) }; CPUS];

thread_local! {
    static CURRENT: Cell<Option<CpuId>> = const { Cell::new(None) };
    static MASKED: Cell<bool> = const { Cell::new(false) };
}

/// Plays CPU `cpu` from now on (only between engine calls, with interrupts unmasked).
fn run_as(cpu: CpuId) {
    assert!(
        !MASKED.with(Cell::get),
        "switch CPUs only with interrupts unmasked"
    );
    CURRENT.with(|c| c.set(Some(cpu)));
}

/// IPIs are pending bits, delivered by [`deliver`].
#[derive(Default)]
struct Manual {
    pending: AtomicU64,
}

// SAFETY: one thread plays every CPU, switching only between engine calls (`run_as`), so
// `current_cpu` is the running CPU and stays the same while engine code runs (identity).
// Every IPI `send_ipi` records is delivered by `deliver`, on the CPU it was sent to, after
// the send, as a `handle_ipi` (delivery; `send_ipi` never blocks). `handle_ipi` is never
// called nested in masked code: `deliver` runs at top level, unmasked (masking).
// `send_ipi`, `relax` and `now_ns` (the default) work on any thread (foreign threads).
unsafe impl Platform for Manual {
    type IrqState = bool;
    fn current_cpu(&self) -> Option<CpuId> {
        CURRENT.with(Cell::get)
    }
    fn send_ipi(&self, cpu: CpuId) {
        self.pending.fetch_or(1 << cpu, Ordering::SeqCst);
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
}

/// The interrupt controller: runs each pending IPI's handler on its CPU. Returns how many.
fn deliver(engine: &Engine<Manual, &'static StaticStorage<CPUS>>) -> u32 {
    let pending = engine.platform().pending.swap(0, Ordering::SeqCst);
    let was = engine.current_cpu().expect("playing a CPU");
    for cpu in (0..CPUS).filter(|c| pending & 1 << c != 0) {
        run_as(cpu);
        // SAFETY: we are CPU `cpu` now, at top level and unmasked: its IPI handler may run.
        unsafe { engine.handle_ipi() };
    }
    run_as(was);
    pending.count_ones()
}

fn count(cpu: CpuId) {
    RUNS[cpu].fetch_add(1, Ordering::SeqCst);
}

fn main() -> Result<(), Error> {
    let engine = Engine::new(Manual::default(), &STORAGE)?;
    for cpu in 0..CPUS {
        // SAFETY: this program plays every CPU and serves each IPI sent to it (`deliver`).
        unsafe { engine.mark_online(cpu) }?;
    }
    run_as(0);
    // A waiting call to yourself runs at once, masked.
    assert_eq!(engine.call_single(0, |cpu| cpu + 42)?, 42);
    // No-wait calls queue; one IPI per queue that was empty.
    engine.call_single_async(1, count)?;
    run_as(2);
    engine.call_single_async(1, count)?; // CPU 1's queue is not empty: no second IPI
    run_as(0);
    let queued =
        engine.call_many_async(&CpuMask::first_n(CPUS).andnot(&CpuMask::single(1)), count)?;
    assert_eq!(queued.weight(), 3, "CPUs 0 (run here, now), 2 and 3");
    let csd = pin!(Csd::new()); // caller-owned call data
    engine.call_async_csd(csd.as_ref(), 3, count)?;
    assert_eq!(
        engine.call_async_csd(csd.as_ref(), 3, count),
        Err(Error::Busy)
    );
    {
        let _masked = engine.irq_save();
        let refused = engine.call_single(1, |_| ());
        assert_eq!(
            refused,
            Err(Error::WouldDeadlock(DeadlockReason::InterruptsMasked))
        );
    }
    assert_eq!(
        engine.call_single_async(9, count),
        Err(Error::UnknownCpu(9))
    );
    let before: Vec<u64> = RUNS.iter().map(|r| r.load(Ordering::SeqCst)).collect();
    println!("queued; runs per CPU before delivery: {before:?}");
    let ipis = deliver(&engine);
    let after: Vec<u64> = RUNS.iter().map(|r| r.load(Ordering::SeqCst)).collect();
    println!("delivered {ipis} IPIs; runs per CPU: {after:?}");
    assert_eq!((ipis, after), (3, vec![1, 2, 1, 2]));
    assert!(!csd.is_busy() && engine.is_quiescent());
    let stats = engine.total_stats();
    println!(
        "engine counters: {} calls queued, {} run, {} IPIs sent, {} received",
        stats.calls_queued, stats.calls_run, stats.ipi_sent, stats.ipi_received
    );
    assert_eq!((stats.ipi_sent, stats.ipi_received), (3, 3));
    println!("OK");
    Ok(())
}
