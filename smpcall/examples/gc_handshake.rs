//! A garbage collector's handshakes with its mutator threads (your own threads, attached as
//! CPUs, each calling `safe_point()` in its allocation loop), driven by a collector thread that
//! is not a CPU (the main thread):
//!
//! 1. **Stop the world.** A no-wait `call_all_async` asks every mutator to park at its next
//!    safe point; each notes its time-to-safepoint, counts itself stopped and spins on a gate.
//!    The collector waits for all to be stopped (not for the calls to *return*: they return
//!    only when the gate opens), checks that no mutator allocates meanwhile, opens the gate.
//! 2. **Handshake without a pause.** A waiting `call_all` makes every mutator retire its
//!    thread-local allocation buffer; it returns once each has.
//!
//! Prints the time-to-safepoint (max over mutators) and the pause, in µs, per round. With more
//! mutators than cores (3 on 2 here), a mutator the kernel has preempted reaches its safe point
//! only when it runs again: the worst figures are scheduling delays, not signal latency.
//!
//! ```sh
//! cargo run --release -p smpcall --example gc_handshake [ROUNDS]   # default 20
//! ```

mod common;

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smpcall::hosted::{safe_point, Machine};

const MUTATORS: usize = 3;

thread_local! {
    /// The mutator's allocation buffer: objects allocated and not yet retired.
    static TLAB: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// One stop-the-world request: shared by the collector and every mutator's handshake.
struct Stop {
    requested: Instant,
    stopped: AtomicUsize,
    /// The slowest mutator's time-to-safepoint so far, in ns.
    max_ttsp_ns: AtomicU64,
    gate_open: AtomicBool,
    resumed: AtomicUsize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::watchdog();
    let rounds = common::arg_or(20);
    let m = Machine::builder().cpus(0).attach_slots(MUTATORS).build()?;
    let quit = AtomicBool::new(false);
    let allocated = AtomicU64::new(0); // published by mutators, so the collector can check
    let retired = AtomicU64::new(0);

    std::thread::scope(|s| {
        let mutators = common::spawn_cpus(s, &m, MUTATORS, |_me, _i| {
            while !quit.load(Ordering::Relaxed) {
                TLAB.with(|t| t.borrow_mut().push(0xA110C));
                allocated.fetch_add(1, Ordering::Relaxed);
                safe_point(); // handshakes run here
            }
        });

        let e = m.engine();
        let (mut ttsps, mut worst_pause) = (Vec::new(), Duration::ZERO);
        for round in 0..rounds {
            std::thread::sleep(Duration::from_millis(5)); // mutators run between collections
                                                          // Phase 1: stop the world.
            let stop = Arc::new(Stop {
                requested: Instant::now(),
                stopped: AtomicUsize::new(0),
                max_ttsp_ns: AtomicU64::new(0),
                gate_open: AtomicBool::new(false),
                resumed: AtomicUsize::new(0),
            });
            let st = Arc::clone(&stop);
            let parked = e.call_all_async(move |_cpu| {
                let ttsp = st.requested.elapsed().as_nanos() as u64;
                st.max_ttsp_ns.fetch_max(ttsp, Ordering::SeqCst);
                st.stopped.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + common::LIMIT;
                while !st.gate_open.load(Ordering::SeqCst) {
                    assert!(Instant::now() < deadline, "the gate never opened");
                    std::thread::yield_now(); // parked: leave the core to the others
                }
                st.resumed.fetch_add(1, Ordering::SeqCst);
            })?;
            assert_eq!(parked.weight(), MUTATORS);
            common::wait_until("every mutator to stop", || {
                stop.stopped.load(Ordering::SeqCst) == MUTATORS
            });
            // The world is stopped: the "collection" sees a heap nobody changes.
            let before = allocated.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(200));
            assert_eq!(allocated.load(Ordering::SeqCst), before, "a mutator ran");
            stop.gate_open.store(true, Ordering::SeqCst);
            let pause = stop.requested.elapsed();
            common::wait_until("every mutator to resume", || {
                stop.resumed.load(Ordering::SeqCst) == MUTATORS
            });
            // Phase 2: every mutator retires its buffer; returns when all have.
            e.call_all(|_cpu| {
                let n = TLAB.with(|t| t.borrow_mut().drain(..).count());
                retired.fetch_add(n as u64, Ordering::SeqCst);
            })?;
            let ttsp = Duration::from_nanos(stop.max_ttsp_ns.load(Ordering::SeqCst));
            println!(
                "round {round:3}: max time-to-safepoint {:7.1} µs, pause {:7.1} µs",
                ttsp.as_secs_f64() * 1e6,
                pause.as_secs_f64() * 1e6
            );
            ttsps.push(ttsp);
            worst_pause = worst_pause.max(pause);
        }
        quit.store(true, Ordering::SeqCst);
        common::join_all(mutators);
        ttsps.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "{rounds} collections: time-to-safepoint median {:.1} µs, worst {:.1} µs; \
             worst pause {:.1} µs",
            us(ttsps[ttsps.len() / 2]),
            us(ttsps[ttsps.len() - 1]),
            us(worst_pause)
        );
        Ok::<_, smpcall::Error>(())
    })?;
    // A mutator leaves with its last buffer unretired; everything else was retired once.
    let (allocated, retired) = (allocated.into_inner(), retired.into_inner());
    println!("allocated {allocated} objects, retired {retired} at handshakes");
    assert!(retired > 0 && retired <= allocated);
    m.shutdown()?;
    println!("OK");
    Ok(())
}
