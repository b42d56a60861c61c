//! Helpers shared by the examples: the optional argument, a watchdog that bounds every wait,
//! and a pool of your own threads that attach as CPUs.
#![allow(dead_code)]

use std::sync::{Arc, Barrier};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use smpcall::hosted::{CpuGuard, Machine};

/// Bound on a whole example run, and on each wait of its own (the machine may be loaded).
pub const LIMIT: Duration = Duration::from_secs(20);

/// The first command-line argument as a positive number, or `default` without one.
pub fn arg_or(default: u64) -> u64 {
    let Some(a) = std::env::args().nth(1) else {
        return default;
    };
    match a.parse() {
        Ok(n) if n > 0 => n,
        _ => {
            eprintln!("expected a positive number as the argument, got {a:?}");
            std::process::exit(2)
        }
    }
}

/// Ends the process with exit code 1 if it is still running after [`LIMIT`] (every wait of
/// the example, the library's own waits included, is bounded by it), and with 101 at the first
/// failed check in any thread (no thread is left waiting for one that panicked).
pub fn watchdog() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::exit(101);
    }));
    thread::spawn(|| {
        thread::sleep(LIMIT);
        eprintln!("FAILED: the example did not finish within {LIMIT:?}");
        std::process::exit(1);
    });
}

/// Waits until `cond` holds, a safe point each turn (on a CPU thread, calls to it run here);
/// panics naming `what` after [`LIMIT`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        smpcall::hosted::safe_point();
        thread::yield_now();
    }
}

/// Spawns `n` threads of your own in scope `s`; each attaches to `m` as a CPU
/// (`Machine::attach`) and runs `body(&guard, index)`, then leaves (the guard drops). Returns
/// once every thread is attached, so calls from then on reach all of them.
pub fn spawn_cpus<'scope, R, F>(
    s: &'scope Scope<'scope, '_>,
    m: &'scope Machine,
    n: usize,
    body: F,
) -> Vec<ScopedJoinHandle<'scope, R>>
where
    R: Send + 'scope,
    F: Fn(&CpuGuard, usize) -> R + Clone + Send + 'scope,
{
    let attached = Arc::new(Barrier::new(n + 1));
    let threads = (0..n)
        .map(|i| {
            let (attached, body) = (Arc::clone(&attached), body.clone());
            s.spawn(move || {
                let me = m.attach().expect("a free CPU slot (attach_slots)");
                attached.wait();
                body(&me, i)
            })
        })
        .collect();
    attached.wait();
    threads
}

/// Joins every thread, in order, and returns their results (a panic in one fails the example).
pub fn join_all<R>(threads: Vec<ScopedJoinHandle<'_, R>>) -> Vec<R> {
    threads
        .into_iter()
        .map(|t| t.join().expect("a thread of the example panicked"))
        .collect()
}
