//! Per-thread caches flushed from outside: a pool of your own worker threads, each counting
//! events in a thread-local `HashMap` with no lock, and a coordinator (the main thread, which
//! is *not* a CPU) that periodically flushes every worker's cache into a global table with one
//! waiting `call_all`, and at the end asks each worker for its last counts with `call_single`.
//!
//! Each flush runs on the worker's own thread, at its next safe point (`safe_point()` in its
//! loop), so it can borrow the thread-local `RefCell` the worker itself uses: the worker is
//! never inside its own borrow there. No lock, no atomic on the workers' fast path.
//!
//! ```sh
//! cargo run --release -p smpcall --example cache_flush [MILLISECONDS]   # default 300
//! ```

mod common;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use smpcall::hosted::{safe_point, Machine};

const WORKERS: usize = 3;
const KEYS: u64 = 16;

thread_local! {
    /// Events counted by this thread since its last flush, by key.
    static CACHE: RefCell<HashMap<u64, u64>> = RefCell::new(HashMap::new());
}

/// Empties this thread's cache; returns what it held.
fn take_cache() -> HashMap<u64, u64> {
    CACHE.with(|c| std::mem::take(&mut *c.borrow_mut()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::watchdog();
    let run_for = Duration::from_millis(common::arg_or(300));
    // No CPU threads of the machine's own: every CPU is one of our workers.
    let m = Machine::builder().cpus(0).attach_slots(WORKERS).build()?;
    let stop = AtomicBool::new(false);
    let stopped = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let global: Mutex<HashMap<u64, u64>> = Mutex::new(HashMap::new());

    let (counted, last, flushes) = std::thread::scope(|s| {
        let workers = common::spawn_cpus(s, &m, WORKERS, |me, i| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = (n * 7 + i as u64) % KEYS;
                CACHE.with(|c| *c.borrow_mut().entry(key).or_insert(0) += 1);
                n += 1;
                safe_point(); // flushes run here
            }
            // Stopped counting; keep serving calls until the coordinator has the last counts.
            stopped.fetch_add(1, Ordering::SeqCst);
            common::wait_until("the final flush", || done.load(Ordering::SeqCst));
            (me.cpu(), n)
        });

        // The coordinator: flush every worker's cache into the global table, periodically.
        let e = m.engine();
        let start = Instant::now();
        let mut flushes = 0u64;
        while start.elapsed() < run_for {
            std::thread::sleep(Duration::from_millis(10));
            let ran_on = e.call_all(|_cpu| {
                let mine = take_cache();
                let mut g = global.lock().unwrap();
                for (k, v) in mine {
                    *g.entry(k).or_insert(0) += v;
                }
            })?;
            assert_eq!(ran_on.weight(), WORKERS, "every worker flushed");
            flushes += 1;
        }
        stop.store(true, Ordering::SeqCst);
        common::wait_until("every worker to stop", || {
            stopped.load(Ordering::SeqCst) == WORKERS
        });
        // The last counts, one worker at a time, returned by value.
        let mut last = 0u64;
        for cpu in 0..WORKERS {
            last += e.call_single(cpu, |_| take_cache().values().sum::<u64>())?;
        }
        done.store(true, Ordering::SeqCst);
        let counted: u64 = common::join_all(workers).iter().map(|&(_, n)| n).sum();
        Ok::<_, smpcall::Error>((counted, last, flushes))
    })?;

    let flushed: u64 = global.lock().unwrap().values().sum();
    println!(
        "{WORKERS} workers counted {counted} events; {flushes} periodic flushes collected \
         {flushed}, the final per-worker calls {last}"
    );
    assert!(flushes > 0 && counted > 0, "the run did some work");
    assert_eq!(
        flushed + last,
        counted,
        "every counted event was collected once"
    );
    m.shutdown()?;
    println!("OK");
    Ok(())
}
