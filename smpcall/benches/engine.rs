//! `cargo bench -p smpcall`: the engine's single-threaded paths, so that a regression in one of
//! them shows in one command (divan; times per operation, best read as relative to the last
//! run on the same machine).
//!
//! * `call`: a no-wait call pushed on a target's queue and the target's flush that runs it —
//!   through the engine's slot (`call_single_async`) and through caller-owned call data
//!   (`call_async_csd`: claim, fill, push, take, release).
//! * `cpumask`: set / test / iteration / and / weight on masks of 64 and of 1024 CPUs.
//! * `context`: context-tracking transitions (interrupt, NMI, idle).
//! * `rcu`: an RCU read-side critical section (lock and unlock).
//!
//! One thread plays every CPU ([`Bench`] below): nothing waits for another thread, so the
//! figures are the instructions and the cache-resident memory traffic of each path, not the
//! cross-core transfers (`smpcall bench` measures those).

use std::cell::Cell;
use std::hint::black_box;
use std::pin::pin;

use smpcall::context::ContextTracker;
use smpcall::{CpuId, CpuMask, Csd, Engine, HeapStorage, Platform};

fn main() {
    divan::main();
}

thread_local! {
    static CPU: Cell<Option<CpuId>> = const { Cell::new(None) };
    static MASKED: Cell<bool> = const { Cell::new(false) };
}

/// One thread plays every CPU; IPIs go nowhere (queues are served explicitly).
struct Bench;

// SAFETY: one thread plays every CPU in turn, switching only between engine calls, so
// `current_cpu` is stable and unique while engine code runs; masking is a thread-local flag
// and no handler runs nested; IPIs are not delivered — every queue a benchmark fills is served
// explicitly (`serve_on`) before it needs to make progress.
unsafe impl Platform for Bench {
    type IrqState = bool;
    fn current_cpu(&self) -> Option<CpuId> {
        CPU.with(Cell::get)
    }
    fn send_ipi(&self, cpu: CpuId) {
        black_box(cpu);
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

type BenchEngine = Engine<Bench, HeapStorage>;

fn on(cpu: CpuId) {
    CPU.with(|c| c.set(Some(cpu)));
}

// The only uses of the engine's platform entry points (bring-up and serving a queue): if they
// move behind a platform interface, these two helpers change, nothing else.

/// An engine of `n` CPUs, all online, this thread on CPU 0.
fn engine(n: usize) -> BenchEngine {
    let e = Engine::new(Bench, HeapStorage::new(n)).expect("engine");
    for cpu in 0..n {
        // SAFETY: this thread plays every CPU and serves every queue a benchmark fills
        // (`serve_on`) before anything waits on it: that is this platform's delivery.
        unsafe { e.mark_online(cpu).expect("online") };
    }
    on(0);
    e
}

/// Serves `cpu`'s queue (what its IPI handler does), then returns to CPU 0.
fn serve_on(e: &BenchEngine, cpu: CpuId) -> usize {
    on(cpu);
    let ran = e.serve_queue();
    on(0);
    ran
}

mod call {
    use super::*;

    /// `call_single_async` from CPU 0 to CPU 1 (the engine's slot), then CPU 1's flush.
    #[divan::bench]
    fn push_and_flush(b: divan::Bencher) {
        let e = engine(2);
        b.bench_local(|| {
            e.call_single_async(1, |cpu| {
                black_box(cpu);
            })
            .expect("queued");
            serve_on(&e, 1)
        });
    }

    /// Caller-owned call data: claim, fill, push (`call_async_csd`), then CPU 1 takes it and
    /// releases it.
    #[divan::bench]
    fn csd_claim_release(b: divan::Bencher) {
        let e = engine(2);
        let csd = pin!(Csd::new());
        b.bench_local(|| {
            e.call_async_csd(csd.as_ref(), 1, |cpu| {
                black_box(cpu);
            })
            .expect("free");
            serve_on(&e, 1)
        });
    }

    /// Eight no-wait calls from eight senders queued on one target, one flush.
    #[divan::bench]
    fn eight_pushes_one_flush(b: divan::Bencher) {
        let e = engine(9);
        b.bench_local(|| {
            for sender in 1..9 {
                on(sender);
                e.call_single_async(0, |cpu| {
                    black_box(cpu);
                })
                .expect("queued");
            }
            serve_on(&e, 0)
        });
    }
}

mod cpumask {
    use super::*;

    const SIZES: [usize; 2] = [64, 1024];

    #[divan::bench(args = SIZES)]
    fn set_test(b: divan::Bencher, n: usize) {
        let mut m = CpuMask::new();
        b.bench_local(|| {
            let cpu = black_box(n - 1);
            m.set(cpu);
            black_box(&m).test(cpu)
        });
    }

    #[divan::bench(args = SIZES)]
    fn iter(b: divan::Bencher, n: usize) {
        let m = CpuMask::first_n(n);
        b.bench_local(|| black_box(&m).iter().fold(0, |acc, c| acc ^ c));
    }

    #[divan::bench(args = SIZES)]
    fn and(b: divan::Bencher, n: usize) {
        let (x, y) = (CpuMask::first_n(n), CpuMask::first_n(n / 2));
        b.bench_local(|| black_box(&x).and(black_box(&y)));
    }

    #[divan::bench(args = SIZES)]
    fn weight(b: divan::Bencher, n: usize) {
        let m = CpuMask::first_n(n);
        b.bench_local(|| black_box(&m).weight());
    }
}

mod context {
    use super::*;

    #[divan::bench]
    fn irq_enter_exit() {
        static T: ContextTracker = ContextTracker::new();
        let t = black_box(&T);
        t.irq_enter();
        t.irq_exit();
    }

    #[divan::bench]
    fn nmi_enter_exit() {
        static T: ContextTracker = ContextTracker::new();
        let t = black_box(&T);
        t.nmi_enter();
        t.nmi_exit();
    }

    #[divan::bench]
    fn idle_enter_exit() {
        static T: ContextTracker = ContextTracker::new();
        let t = black_box(&T);
        t.idle_enter();
        t.idle_exit();
    }
}

mod rcu {
    use super::*;

    /// `rcu_read_lock` and the guard's drop, on CPU 0 of a 2-CPU engine.
    #[divan::bench]
    fn read_lock_unlock(b: divan::Bencher) {
        let e = engine(2);
        b.bench_local(|| {
            let guard = e.rcu_read_lock().expect("online");
            black_box(&guard);
        });
    }
}

mod quiet {
    use super::*;

    /// Entering and leaving a quiet region (`Engine::quiet`) with nothing deferred, on CPU 0
    /// of a 2-CPU engine.
    #[divan::bench]
    fn enter_exit(b: divan::Bencher) {
        let e = engine(2);
        b.bench_local(|| e.quiet(|| black_box(())));
    }
}
