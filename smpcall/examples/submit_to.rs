//! Cross-core submission in a thread-per-core design (the shape of Seastar's `submit_to`):
//! every CPU is a thread of your own running its own event loop over a thread-local queue, with
//! no spare CPU. A core submits work to another with a no-wait `call_single_async` that appends
//! requests to the target's local queue (one call per target per loop turn, carrying the turn's
//! batch); the target's loop computes the results and sends them back the same way, as replies
//! appended to the sender's queue.
//!
//! The calls run on the target's thread at the safe point of its loop (`safe_point()` each
//! turn), so they touch the target's thread-local queue with no lock: the loop itself never
//! holds the queue's borrow across a safe point or a call.
//!
//! ```sh
//! cargo run --release -p smpcall --example submit_to [REQUESTS_PER_CORE]   # default 10000
//! ```

mod common;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use smpcall::hosted::{safe_point, HostEngine, Machine};
use smpcall::CpuId;

const CORES: usize = 3;
/// Requests a core keeps in flight at most.
const WINDOW: u64 = 64;

enum Msg {
    Request { from: CpuId, x: u64 },
    Reply { x: u64, y: u64 },
}

thread_local! {
    /// This core's event queue: only its own thread touches it (calls run on that thread).
    static QUEUE: RefCell<VecDeque<Msg>> = const { RefCell::new(VecDeque::new()) };
}

fn pop() -> Option<Msg> {
    QUEUE.with(|q| q.borrow_mut().pop_front())
}

/// Sends each non-empty batch to its core, as one no-wait call that appends it to that core's
/// queue (a `Vec` is 24 bytes: it fits a no-wait call's 32).
fn send_batches(e: &HostEngine, out: &mut [Vec<Msg>]) {
    for (to, batch) in out.iter_mut().enumerate() {
        if !batch.is_empty() {
            let batch = std::mem::take(batch);
            e.call_single_async(to, move |_| QUEUE.with(|q| q.borrow_mut().extend(batch)))
                .expect("a call to a core of the pool");
        }
    }
}

/// The work a request asks for.
fn work(x: u64) -> u64 {
    x.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
}

/// One core's event loop: sends `n` requests, serves everyone's, until all cores are done.
/// Returns (requests served for others, replies received).
fn event_loop(e: &HostEngine, me: CpuId, n: u64, finished: &AtomicUsize) -> (u64, u64) {
    let (mut sent, mut replies, mut served) = (0u64, 0u64, 0u64);
    let mut out: Vec<Vec<Msg>> = (0..CORES).map(|_| Vec::new()).collect();
    loop {
        while sent < n && sent - replies < WINDOW {
            let to = (me + 1 + sent as usize % (CORES - 1)) % CORES;
            let x = (me as u64) << 32 | sent;
            out[to].push(Msg::Request { from: me, x });
            sent += 1;
        }
        while let Some(msg) = pop() {
            match msg {
                Msg::Request { from, x } => {
                    out[from].push(Msg::Reply { x, y: work(x) });
                    served += 1;
                }
                Msg::Reply { x, y } => {
                    assert_eq!(y, work(x), "a wrong reply");
                    assert_eq!(x >> 32, me as u64, "a reply for another core");
                    replies += 1;
                    if replies == n {
                        finished.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }
        send_batches(e, &mut out);
        if finished.load(Ordering::SeqCst) == CORES {
            // Every request of every core was answered: nothing is in flight any more.
            return (served, replies);
        }
        safe_point(); // the calls other cores sent us run here
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::watchdog();
    let n = common::arg_or(10_000);
    let m = Machine::builder().cpus(0).attach_slots(CORES).build()?;
    let finished = AtomicUsize::new(0);
    let start = Instant::now();
    let results = std::thread::scope(|s| {
        let cores = common::spawn_cpus(s, &m, CORES, |me, _| {
            event_loop(me.engine(), me.cpu(), n, &finished)
        });
        common::join_all(cores)
    });
    let elapsed = start.elapsed();
    let served: u64 = results.iter().map(|r| r.0).sum();
    let replies: u64 = results.iter().map(|r| r.1).sum();
    let stats = m.engine().total_stats();
    println!(
        "{CORES} cores: {replies} requests answered in {:.0} ms, {:.0} round trips/s; \
         {} IPIs sent, {} elided",
        elapsed.as_secs_f64() * 1e3,
        replies as f64 / elapsed.as_secs_f64(),
        stats.ipi_sent,
        stats.ipi_elided
    );
    assert!(
        results.iter().all(|r| r.1 == n),
        "every core got every reply"
    );
    assert_eq!(served, n * CORES as u64, "every request was served once");
    m.shutdown()?;
    println!("OK");
    Ok(())
}
