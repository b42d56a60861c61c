//! Model-checked tests of the lock-free parts (run with `RUSTFLAGS="--cfg loom"`).
//!
//! Under `--cfg loom` the engine's own `Csd`, `CallQueue` and stop_machine's `StageCounts` use
//! loom's atomics and cells (see `sync.rs`), so these tests explore the real protocol code, not
//! a copy of it. (The one copy here, `TwoStoreStages`, is the old stop_machine accounting,
//! kept as a mutation the stop_machine model must catch.)
//!
//! Conventions:
//!
//! * exactly one thread per model plays the queue's owner and is the only one to `flush`;
//! * shared state lives in `loom::sync::Arc`s that the model's main thread keeps alive until
//!   every thread is joined and every call has run, so the raw pointers handed to call
//!   payloads stay valid;
//! * everything a called function writes that the test later reads goes through a loom
//!   `UnsafeCell` ([`Cell`], [`Log`]) or an atomic, so a missing Release/Acquire edge in the
//!   protocol is reported by loom as a causality violation rather than going unnoticed;
//! * waits call `loom::thread::yield_now` so loom can schedule the thread being waited for.
//!
//! Every model is explored with a preemption bound (`LOOM_MAX_PREEMPTIONS`, 3 if unset) so the
//! whole suite stays within about a minute in release mode.

use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::time::Instant;

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

use crate::cpumask::CpuId;
use crate::csd::{run_inline, run_once, run_shared, Csd, OnceCall, Payload, RunFn};
use crate::queue::CallQueue;
use crate::stop::{StageCounts, StopStage};

/// The CPU number the owner passes to `flush` (checked by functions that record it).
const OWNER_CPU: CpuId = 3;

/// Runs `f` under loom with a preemption bound (`LOOM_MAX_PREEMPTIONS`, else 3) and prints the
/// number of explored executions and the time taken (visible with `--nocapture`).
fn model<F>(name: &str, f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    let start = Instant::now();
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = executions.clone();
    builder.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    eprintln!(
        "loom: {name}: {} executions in {:.2?} (preemption bound {:?})",
        executions.load(std::sync::atomic::Ordering::Relaxed),
        start.elapsed(),
        builder.preemption_bound,
    );
}

/// A `Csd` for tests: derefs to the `Csd`, and skips its drop (which waits, spinning, until
/// the call data is free) when the thread is already panicking — otherwise a failing model whose
/// call data is still in flight would spin in `Drop` forever during unwinding (loom does not
/// bound branches while panicking) instead of reporting the failure.
struct TestCsd(ManuallyDrop<Csd>);

impl TestCsd {
    fn new() -> Self {
        TestCsd(ManuallyDrop::new(Csd::new()))
    }
}

impl Deref for TestCsd {
    type Target = Csd;
    fn deref(&self) -> &Csd {
        &self.0
    }
}

impl Drop for TestCsd {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // SAFETY: dropped exactly once, here; never used again.
            unsafe { ManuallyDrop::drop(&mut self.0) }
        }
    }
}

/// A loom-checked cell shared between threads. Accesses are *not* synchronised by the cell: the
/// protocol under test must order them, and loom reports it if it does not.
struct Cell<T>(loom::cell::UnsafeCell<T>);

// SAFETY: the cell itself adds no synchronisation, but every access goes through loom's
// `UnsafeCell`, which checks (and reports) unordered concurrent accesses. In these tests each
// access is ordered by the protocol under test or by a `join`.
unsafe impl<T: Send> Sync for Cell<T> {}

impl<T: Copy> Cell<T> {
    fn new(value: T) -> Self {
        Cell(loom::cell::UnsafeCell::new(value))
    }

    fn get(&self) -> T {
        // SAFETY: loom checks that no write is concurrent with this read.
        self.0.with(|p| unsafe { *p })
    }

    fn set(&self, value: T) {
        // SAFETY: loom checks that no other access is concurrent with this write.
        self.0.with_mut(|p| unsafe { *p = value })
    }
}

/// An append-only record of what called functions observed, checked by loom like [`Cell`].
struct Log(loom::cell::UnsafeCell<Vec<u64>>);

// SAFETY: as for `Cell`: loom checks every access for races.
unsafe impl Sync for Log {}

impl Log {
    fn new() -> Self {
        Log(loom::cell::UnsafeCell::new(Vec::new()))
    }

    fn push(&self, value: u64) {
        // SAFETY: loom checks that no other access is concurrent with this write; no reference
        // into the vector escapes the closure.
        self.0.with_mut(|v| unsafe { (*v).push(value) })
    }

    fn snapshot(&self) -> Vec<u64> {
        // SAFETY: loom checks that no write is concurrent with this read.
        self.0.with(|v| unsafe { (*v).clone() })
    }
}

/// Claims `csd`, writes a no-wait call running `f` (moved inline into the payload), and pushes
/// it. Returns what `push` returned: whether the queue was empty.
///
/// # Safety
/// `csd` must stay alive until its target released it, and `f` (which is run on the flushing
/// thread, possibly after this returns) must be sound to run there.
unsafe fn push_async<F: FnOnce(CpuId)>(queue: &CallQueue, csd: &Csd, f: F) -> bool {
    assert!(
        csd.try_lock(),
        "push_async: the call data is still in flight"
    );
    // SAFETY: we just claimed `csd` and have not published it; the payload holds an `F` and
    // `run_inline::<F>` consumes exactly that, once (flush runs each taken call once).
    unsafe { csd.set_call(run_inline::<F>, Payload::inline(f), false) };
    // SAFETY: locked by us and filled in; the caller keeps it alive until released.
    unsafe { queue.push(csd) }
}

/// Claims `csd`, writes a waiting call running the shared `f`, and pushes it.
///
/// # Safety
/// `csd` and `f` must stay alive (and `f` unmoved) until the call data is released.
unsafe fn push_shared<F: Fn(CpuId) + Sync>(queue: &CallQueue, csd: &Csd, f: &F) -> bool {
    assert!(
        csd.try_lock(),
        "push_shared: the call data is still in flight"
    );
    // SAFETY: we just claimed `csd`; the payload is `from_ptr(&F)` as `run_shared::<F>`
    // requires, and the caller keeps `f` alive until the release.
    unsafe { csd.set_call(run_shared::<F>, Payload::from_ptr(f), true) };
    // SAFETY: locked by us and filled in; the caller keeps it alive until released.
    unsafe { queue.push(csd) }
}

/// The `run_once` instance matching a `OnceCall` (so a closure's type need not be named).
fn once_runner<F: FnOnce(CpuId) -> R, R>(_: &OnceCall<F, R>) -> RunFn {
    run_once::<F, R>
}

/// Flushes `queue` as its owner until at least `calls` calls ran in total; returns the number
/// of non-empty flushes.
///
/// # Safety
/// The calling thread must be the queue's only flusher for the duration.
unsafe fn flush_until(queue: &CallQueue, calls: usize) -> usize {
    let mut ran = 0;
    let mut nonempty = 0;
    while ran < calls {
        // SAFETY: the caller is the only flusher (this function's contract).
        let n = unsafe { queue.flush(OWNER_CPU) };
        if n == 0 {
            thread::yield_now();
        } else {
            nonempty += 1;
            ran += n;
        }
    }
    assert_eq!(ran, calls, "flush ran more calls than were pushed");
    nonempty
}

/// Encodes a log entry: which producer's call ran, in which flush ("batch").
fn entry(batch: u64, id: u64) -> u64 {
    batch << 8 | id
}

/// Producers in tests 1 and 2.
const PRODUCERS: usize = 2;
/// Calls each producer pushes (one call data each, pushed back to back).
const PER_PRODUCER: usize = 2;
/// Calls in tests 1 and 2; call `id` is producer `id / PER_PRODUCER`'s.
const CALLS: usize = PRODUCERS * PER_PRODUCER;

/// What the functions of tests 1 and 2 share: a per-call run counter and a log of runs.
struct Runs {
    count: [AtomicUsize; CALLS],
    log: Log,
    /// Number of the flush the owner is running (written by the owner only).
    batch: Cell<u64>,
    /// One call data per call.
    csds: [TestCsd; CALLS],
}

impl Runs {
    fn new() -> Self {
        Runs {
            count: core::array::from_fn(|_| AtomicUsize::new(0)),
            log: Log::new(),
            batch: Cell::new(0),
            csds: core::array::from_fn(|_| TestCsd::new()),
        }
    }

    /// The function of call `id`: count the run and log it with the current flush number.
    /// It captures two words, so it fits a no-wait payload.
    ///
    /// The returned closure may only be run while the `Runs` at address `runs` is alive (the
    /// tests keep it alive until every call ran).
    fn call(runs: usize, id: usize) -> impl FnOnce(CpuId) + Send + 'static {
        move |_| {
            // SAFETY: per the above, the `Runs` is alive when this runs.
            let runs = unsafe { &*(runs as *const Runs) };
            // Relaxed: the count is read after joins; a duplicated or lost call changes it.
            runs.count[id].fetch_add(1, Ordering::Relaxed);
            runs.log.push(entry(runs.batch.get(), id as u64));
        }
    }

    /// Pushes producer `producer`'s calls, returning each push's "was empty".
    fn produce(runs: &Arc<Runs>, queue: &CallQueue, producer: usize) -> [bool; PER_PRODUCER] {
        let addr = Arc::as_ptr(runs) as usize;
        core::array::from_fn(|k| {
            let id = producer * PER_PRODUCER + k;
            // SAFETY: the model's main thread keeps `runs` (which holds the call data) alive
            // until every call ran; `Runs::call` is sound on any thread.
            unsafe { push_async(queue, &runs.csds[id], Runs::call(addr, id)) }
        })
    }

    fn assert_each_ran_once(&self) {
        for (id, count) in self.count.iter().enumerate() {
            assert_eq!(
                count.load(Ordering::Relaxed),
                1,
                "call {id} ran the wrong number of times"
            );
        }
        for (id, csd) in self.csds.iter().enumerate() {
            assert!(!csd.is_busy(), "call {id}'s call data was never released");
        }
    }
}

/// Test 1: two producers push concurrently with a flush; nothing is lost or duplicated, every
/// flush runs its calls in arrival order, and exactly the first push of each flushed batch (the
/// one that found the queue empty) reports "was empty".
#[test]
fn queue_concurrent_pushes_and_flush_lose_nothing() {
    model("queue_concurrent_pushes_and_flush_lose_nothing", || {
        let queue = Arc::new(CallQueue::new());
        let runs = Arc::new(Runs::new());

        let producers: Vec<_> = (0..PRODUCERS)
            .map(|producer| {
                let (queue, runs) = (queue.clone(), runs.clone());
                thread::spawn(move || Runs::produce(&runs, &queue, producer))
            })
            .collect();

        // The owner flushes concurrently with the pushes, then once more after them.
        runs.batch.set(1);
        // SAFETY: this thread is the only flusher.
        let first = unsafe { queue.flush(OWNER_CPU) };
        let was_empty: Vec<bool> = producers
            .into_iter()
            .flat_map(|p| p.join().unwrap())
            .collect();
        runs.batch.set(2);
        // SAFETY: as above.
        let second = unsafe { queue.flush(OWNER_CPU) };

        assert_eq!(first + second, CALLS, "lost or duplicated call");
        runs.assert_each_ran_once();
        assert!(
            was_empty[0] || was_empty[PER_PRODUCER],
            "no push reported an empty queue"
        );

        // Each flush takes one chain of pushes and runs it in arrival order: the chain's first
        // push found the queue empty (and must say so: it is the one that sends the IPI); the
        // others did not (an IPI or a flush is already due).
        let log = runs.log.snapshot();
        assert_eq!(log.len(), CALLS);
        for (i, &e) in log.iter().enumerate() {
            let (batch, id) = (e >> 8, (e & 0xff) as usize);
            let first_of_batch = i == 0 || log[i - 1] >> 8 != batch;
            assert_eq!(
                was_empty[id], first_of_batch,
                "push of call {id} returned was_empty = {} but it was {}the first of flush {batch} \
                 (log {log:x?})",
                was_empty[id],
                if first_of_batch { "" } else { "not " },
            );
        }
        // Arrival order: a producer's calls run in the order it pushed them.
        let ids: Vec<u64> = log.iter().map(|e| e & 0xff).collect();
        for producer in 0..PRODUCERS {
            let mine: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|&id| id as usize / PER_PRODUCER == producer)
                .collect();
            assert!(
                mine.is_sorted(),
                "producer {producer}'s calls ran out of order: {log:x?}"
            );
        }
        assert_eq!(
            batch_count(&log),
            (first > 0) as usize + (second > 0) as usize
        );
    });
}

/// Number of distinct flushes in a log of `entry`s.
fn batch_count(log: &[u64]) -> usize {
    let mut batches: Vec<u64> = log.iter().map(|e| e >> 8).collect();
    batches.dedup();
    batches.len()
}

/// Test 2: producers "send an IPI" only when `push` says the queue was empty; an owner that
/// flushes only on IPIs still runs every call.
#[test]
fn queue_was_empty_signal_is_never_lost() {
    model("queue_was_empty_signal_is_never_lost", || {
        let queue = Arc::new(CallQueue::new());
        let runs = Arc::new(Runs::new());
        // IPIs sent so far (a counter, so that two IPIs are never merged into one by the model).
        let ipis = Arc::new(AtomicUsize::new(0));
        // Producers that have finished (pushed and, if needed, sent their IPIs).
        let done = Arc::new(AtomicUsize::new(0));

        let producers: Vec<_> = (0..PRODUCERS)
            .map(|producer| {
                let (queue, runs) = (queue.clone(), runs.clone());
                let (ipis, done) = (ipis.clone(), done.clone());
                thread::spawn(move || {
                    let addr = Arc::as_ptr(&runs) as usize;
                    for k in 0..PER_PRODUCER {
                        let id = producer * PER_PRODUCER + k;
                        // SAFETY: the main thread keeps `runs` (which holds the call data)
                        // alive until every call ran.
                        let was_empty =
                            unsafe { push_async(&queue, &runs.csds[id], Runs::call(addr, id)) };
                        if was_empty {
                            // Release: like an IPI, delivery happens after the push.
                            ipis.fetch_add(1, Ordering::Release);
                        }
                    }
                    done.fetch_add(1, Ordering::Release);
                })
            })
            .collect();

        // The owner: flush only after consuming an IPI. Stop once every call ran, or once every
        // producer finished and no IPI is pending (a stranded call then fails the assert below
        // instead of spinning forever).
        let mut consumed = 0;
        let mut ran = 0;
        let mut batch = 0;
        loop {
            if ran >= CALLS {
                break;
            }
            let sent = ipis.load(Ordering::Acquire);
            if sent != consumed {
                consumed = sent;
                batch += 1;
                runs.batch.set(batch);
                // SAFETY: this thread is the only flusher.
                ran += unsafe { queue.flush(OWNER_CPU) };
                continue;
            }
            // Acquire on `done`, then re-read the IPI count: every IPI a finished producer
            // sent is visible now.
            if done.load(Ordering::Acquire) == PRODUCERS && ipis.load(Ordering::Acquire) == consumed
            {
                break;
            }
            thread::yield_now();
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(
            ran, CALLS,
            "every IPI was served but {ran} calls ran for {CALLS} pushed (fewer: a call was \
             stranded without an IPI; more: a call ran twice)"
        );
        runs.assert_each_ran_once();
        // SAFETY: producers joined; this thread is the only flusher. Nothing may be left over.
        assert_eq!(
            unsafe { queue.flush(OWNER_CPU) },
            0,
            "a call was left in the queue"
        );
        // Exactly one IPI per chain of pushes, and each non-empty flush took exactly one chain:
        // no IPI was spurious (and, by the assert above, none was missing).
        assert_eq!(
            ipis.load(Ordering::Relaxed),
            batch_count(&runs.log.snapshot()),
            "IPIs sent vs flushes that ran calls"
        );
    });
}

/// A waiting call as the engine makes one: claim `csd`, point its payload at a `OnceCall` on
/// this stack whose function writes `out` on the target, push, and wait until released. Then
/// the function's write and its return value must be visible here.
fn sync_call(queue: &CallQueue, csd: &Csd, out: &Cell<u64>, tag: u64) {
    let mut call = OnceCall {
        f: Some(move |cpu: CpuId| {
            out.set(tag * 1000 + cpu as u64);
            tag * 10 + cpu as u64
        }),
        ret: None,
    };
    assert!(
        csd.try_lock(),
        "sync_call: the call data is still in flight"
    );
    // SAFETY: we claimed `csd`; the payload is `from_ptr(&mut OnceCall)` as `run_once`
    // requires, and `call` is neither moved nor touched until the call data is released.
    unsafe { csd.set_call(once_runner(&call), Payload::from_ptr(&raw mut call), true) };
    // SAFETY: locked and filled in; `csd` outlives the call (we wait for its release below).
    unsafe { queue.push(csd) };

    while csd.is_busy() {
        thread::yield_now();
    }
    // Released: the function's write must be visible (loom reports a race otherwise).
    assert_eq!(
        out.get(),
        tag * 1000 + OWNER_CPU as u64,
        "function's effect not visible"
    );
    assert!(call.f.is_none(), "the function was not consumed");
    assert_eq!(call.ret, Some(tag * 10 + OWNER_CPU as u64));
}

/// Test 3: a waiting caller that sees its call data released sees the function's effects; it
/// then reuses the same call data for a second waiting call at once.
///
/// (One waiting thread only: loom's scheduler can livelock two threads that both spin on a
/// third — tokio-rs/loom#53 — so concurrent waiters are left to the std stress tests.)
#[test]
fn sync_waiter_sees_function_effects() {
    model("sync_waiter_sees_function_effects", || {
        let queue = Arc::new(CallQueue::new());
        let owner = {
            let queue = queue.clone();
            // SAFETY: this thread is the queue's only flusher; the caller keeps each call data
            // and closure alive until released.
            thread::spawn(move || unsafe { flush_until(&queue, 2) })
        };
        let csd = TestCsd::new();
        let out = [Cell::new(0), Cell::new(0)];
        sync_call(&queue, &csd, &out[0], 1);
        sync_call(&queue, &csd, &out[1], 2);
        owner.join().unwrap();
    });
}

/// The no-wait function of tests 4 and 5: log the value it carries (in its payload).
///
/// The returned closure may only be run while the `Log` at address `log` is alive (the tests
/// keep it alive until every call ran).
fn log_value(log: usize, value: u64) -> impl FnOnce(CpuId) + Send + 'static {
    move |_| {
        // SAFETY: per the above, the `Log` is alive when this runs.
        unsafe { &*(log as *const Log) }.push(value)
    }
}

/// Test 4: an owner reuses its no-wait call data as soon as it is not busy; the target must
/// have copied the previous payload out before releasing it.
#[test]
fn async_csd_not_reused_before_callee_copied() {
    reuse_model("async_csd_not_reused_before_callee_copied", false);
}

/// Test 4, with the claim the engine makes for its own slots and stack call data
/// (`Csd::claim_exclusive`: the Acquire check and a plain store, no compare-and-swap): it must
/// order the reuse after the target's copy just as `try_lock` does.
#[test]
fn exclusive_claim_not_reused_before_callee_copied() {
    reuse_model("exclusive_claim_not_reused_before_callee_copied", true);
}

fn reuse_model(name: &'static str, exclusive: bool) {
    const VALUES: [u64; 3] = [
        0xAAAA_AAAA_AAAA_AAAA,
        0xBBBB_BBBB_BBBB_BBBB,
        0xCCCC_CCCC_CCCC_CCCC,
    ];
    model(name, move || {
        let queue = Arc::new(CallQueue::new());
        let csd = Arc::new(TestCsd::new());
        let log = Arc::new(Log::new());
        let log_addr = Arc::as_ptr(&log) as usize;

        let owner = {
            let queue = queue.clone();
            // SAFETY: this thread is the queue's only flusher.
            thread::spawn(move || unsafe { flush_until(&queue, VALUES.len()) })
        };

        for value in VALUES {
            // Wait until the previous call is taken, then reclaim the call data at once and
            // overwrite its payload. If the target released before copying the previous call
            // out, loom reports this write racing with its read (and the callee would log the
            // new value twice).
            if exclusive {
                // SAFETY: this thread is the only one that claims `csd`.
                while !unsafe { csd.claim_exclusive() } {
                    thread::yield_now();
                }
                let f = log_value(log_addr, value);
                // SAFETY: claimed above, not published; the payload holds an `F` as
                // `run_inline::<F>` requires; `csd` and `log` outlive the owner (joined).
                unsafe {
                    csd.set_call(run_inline_of(&f), Payload::inline(f), false);
                    queue.push(&**csd);
                }
            } else {
                while csd.is_busy() {
                    thread::yield_now();
                }
                // SAFETY: `csd` and `log` are kept alive by this thread until the owner is
                // joined.
                unsafe { push_async(&queue, &csd, log_value(log_addr, value)) };
            }
        }

        owner.join().unwrap();
        assert_eq!(log.snapshot(), VALUES, "callee saw the wrong payloads");
        assert!(!csd.is_busy());
    });
}

/// The `run_inline` instance matching a closure (so its type need not be named).
fn run_inline_of<F: FnOnce(CpuId) + Send>(_: &F) -> RunFn {
    run_inline::<F>
}

/// Test 5: a call data in flight is refused; once `try_lock` succeeds the previous call has been
/// taken (no-wait: its payload copied) or has run (waiting: its effects visible).
#[test]
fn busy_csd_is_refused() {
    model("busy_csd_is_refused", || {
        let queue = Arc::new(CallQueue::new());
        let csd = Arc::new(TestCsd::new());
        let log = Arc::new(Log::new());
        let log_addr = Arc::as_ptr(&log) as usize;
        let out = Cell::new(0u64);

        // Call 1, no-wait. Pushed and nobody flushing yet: in flight, refused.
        // SAFETY: `csd` and `log` outlive the owner thread (joined below).
        unsafe { push_async(&queue, &csd, log_value(log_addr, 1)) };
        assert!(csd.is_busy());
        assert!(!csd.try_lock(), "an in-flight call data was claimed");

        let owner = {
            let queue = queue.clone();
            // SAFETY: this thread is the queue's only flusher.
            thread::spawn(move || unsafe { flush_until(&queue, 2) })
        };

        // Poll with try_lock while the owner flushes. Success must mean call 1 was copied out:
        // we overwrite its payload with call 2 at once (loom reports the race otherwise).
        while !csd.try_lock() {
            thread::yield_now();
        }
        // Call 2, waiting: its function writes `out` on the owner's thread.
        let f = |cpu: CpuId| out.set(2000 + cpu as u64);
        // SAFETY: we hold `csd` (claimed above, not published); the payload is `from_ptr(&F)`
        // as `run_shared::<F>` requires, and `f` lives until the release we wait for below.
        unsafe { csd.set_call(run_shared_of(&f), Payload::from_ptr(&f), true) };
        // SAFETY: locked and filled in; `csd` outlives the call.
        unsafe { queue.push(&**csd) };

        // Success must now mean call 2 ran: its write is visible (loom reports a race
        // otherwise).
        while !csd.try_lock() {
            thread::yield_now();
        }
        assert_eq!(
            out.get(),
            2000 + OWNER_CPU as u64,
            "claimed before the function ran"
        );

        owner.join().unwrap();
        assert_eq!(log.snapshot(), vec![1]);
        // We hold it: give it back without a call (the leftover payload is call 2's pointer,
        // nothing to drop), then check that a flushed call data is claimable again.
        // SAFETY: we hold it and never published it since the claim.
        let _ = unsafe { Csd::take_async_and_release(&**csd) };
        assert!(!csd.is_busy());
        assert!(csd.try_lock(), "a released call data must be claimable");
        // SAFETY: as above.
        let _ = unsafe { Csd::take_async_and_release(&**csd) };
    });
}

/// The `run_shared` instance matching a closure (so its type need not be named).
fn run_shared_of<F: Fn(CpuId) + Sync>(_: &F) -> RunFn {
    run_shared::<F>
}

/// What the entries of test 6 share.
struct Nest {
    queue: CallQueue,
    /// S1, A1, S2, A2, A3, S3 (pushed by the owner) and P (pushed by another thread).
    csds: [TestCsd; 7],
    log: Log,
    /// Calls run by nested flushes.
    nested_ran: AtomicUsize,
}

const S1: usize = 0;
const A1: usize = 1;
const S2: usize = 2;
const A2: usize = 3;
const A3: usize = 4;
const S3: usize = 5;
const P: usize = 6;
/// Log marks: entry `n` starting / ending (for entries whose function re-enters `flush`).
const BEGIN: u64 = 0x100;
const END: u64 = 0x200;

/// Test 6: functions that re-enter `flush` (a waiting function serving its own queue) continue
/// with the entries the outer flush had taken: each entry runs once, sync before async within
/// a flush, in arrival order within each kind.
#[test]
fn nested_flush_runs_pending_entries() {
    model("nested_flush_runs_pending_entries", || {
        let nest = Arc::new(Nest {
            queue: CallQueue::new(),
            csds: core::array::from_fn(|_| TestCsd::new()),
            log: Log::new(),
            nested_ran: AtomicUsize::new(0),
        });

        // Another CPU pushes a no-wait call P at any moment.
        let producer = {
            let nest = nest.clone();
            thread::spawn(move || {
                let addr = Arc::as_ptr(&nest) as usize;
                let p = move |_: CpuId| {
                    // SAFETY: the main thread keeps `nest` alive until P ran.
                    unsafe { &*(addr as *const Nest) }.log.push(P as u64)
                };
                // SAFETY: as above (the Csd is part of `nest`).
                unsafe { push_async(&nest.queue, &nest.csds[P], p) }
            })
        };

        let n: &Nest = &nest;
        // S3: pushed by A1's function, run by the flush A1 re-enters.
        let s3 = |_: CpuId| n.log.push(S3 as u64);
        let s1 = |_: CpuId| n.log.push(S1 as u64);
        // S2: a waiting call whose function re-enters the flush.
        let s2 = |cpu: CpuId| {
            n.log.push(BEGIN | S2 as u64);
            // SAFETY: we run on the queue's owner, inside its flush: re-entry is allowed.
            let ran = unsafe { n.queue.flush(cpu) };
            n.nested_ran.fetch_add(ran, Ordering::Relaxed);
            n.log.push(END | S2 as u64);
        };

        // A1: a no-wait call that pushes S3 and then re-enters the flush.
        let s3 = &s3;
        let a1 = move |cpu: CpuId| {
            n.log.push(BEGIN | A1 as u64);
            // SAFETY: `s3` and `nest` live on the test's stack until after the final flush.
            unsafe { push_shared(&n.queue, &n.csds[S3], s3) };
            // SAFETY: we run on the queue's owner, inside its flush: re-entry is allowed.
            let ran = unsafe { n.queue.flush(cpu) };
            n.nested_ran.fetch_add(ran, Ordering::Relaxed);
            n.log.push(END | A1 as u64);
        };
        let a2 = move |_: CpuId| n.log.push(A2 as u64);
        let a3 = move |_: CpuId| n.log.push(A3 as u64);

        // SAFETY (all pushes below): `nest` and the closures on this stack outlive every call
        // (all run before this closure returns: the owner flushes below, and P is flushed after
        // the producer is joined).
        unsafe {
            push_shared(&n.queue, &n.csds[S1], &s1);
            push_async(&n.queue, &n.csds[A1], a1);
            push_shared(&n.queue, &n.csds[S2], &s2);
            push_async(&n.queue, &n.csds[A2], a2);
            push_async(&n.queue, &n.csds[A3], a3);
        }

        // SAFETY: this thread is the queue's only flusher.
        let outer = unsafe { n.queue.flush(OWNER_CPU) };
        producer.join().unwrap();
        // SAFETY: as above.
        let last = unsafe { n.queue.flush(OWNER_CPU) };

        let nested = n.nested_ran.load(Ordering::Relaxed);
        assert_eq!(
            outer + nested + last,
            7,
            "outer {outer}, nested {nested}, last {last}"
        );
        let log = n.log.snapshot();
        assert_eq!(
            log.iter().filter(|&&e| e == P as u64).count(),
            1,
            "P must run exactly once: {log:x?}"
        );
        let owners: Vec<u64> = log.iter().copied().filter(|&e| e != P as u64).collect();
        assert_eq!(
            owners,
            [
                S1 as u64,
                BEGIN | S2 as u64,
                // S2's nested flush: no sync entries left, so async ones in arrival order.
                BEGIN | A1 as u64,
                // A1's nested flush took S3: sync first, then the remaining async ones.
                S3 as u64,
                A2 as u64,
                A3 as u64,
                END | A1 as u64,
                END | S2 as u64,
            ],
            "wrong order: {log:x?}"
        );
        for (i, csd) in n.csds.iter().enumerate() {
            assert!(!csd.is_busy(), "entry {i} was never released");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// stop_machine's Prepare accounting (issue 16).
// ---------------------------------------------------------------------------------------------

/// What a stop_machine participant does with the shared stage and counts.
trait StageProtocol: Send + Sync + 'static {
    /// `participants` participants, already in Prepare.
    fn started(participants: usize) -> Self;
    fn stage(&self) -> u32;
    fn ack(&self);
    fn enter_serving(&self) -> bool;
    fn leave_serving(&self);
}

/// The engine's own type (stop.rs), with no scheduling hook.
impl StageProtocol for StageCounts {
    fn started(participants: usize) -> Self {
        let counts = StageCounts::new(participants);
        counts.start();
        counts
    }
    fn stage(&self) -> u32 {
        StageCounts::stage(self)
    }
    fn ack(&self) {
        StageCounts::ack(self, &|| ())
    }
    fn enter_serving(&self) -> bool {
        StageCounts::enter_serving(self, &|| ())
    }
    fn leave_serving(&self) {
        StageCounts::leave_serving(self, &|| ())
    }
}

/// The mutation: stop.rs's accounting before issue 16, copied verbatim — the stage in its own
/// word, stored after the count (`set_stage` is two stores), and `enter_serving` re-checking the
/// stage after its CAS on the count. Kept only to show that the model catches it.
struct TwoStoreStages {
    stage: loom::sync::atomic::AtomicU32,
    /// `unacked << 32 | serving`.
    acks: loom::sync::atomic::AtomicU64,
    participants: u64,
}

impl TwoStoreStages {
    // The orderings below are the old stop.rs's, unchanged: the count store Relaxed (to be
    // published by the stage's Release store), the stage Release/Acquire, the counts AcqRel.
    fn set_stage(&self, stage: u32) {
        // Relaxed: the old code's (see above).
        self.acks.store(self.participants << 32, Ordering::Relaxed);
        // Issue 16's window: an `enter_serving` here sees the fresh count and the old stage.
        // Release: the old code's (see above).
        self.stage.store(stage, Ordering::Release);
    }

    fn drop_count(&self, amount: u64) {
        // AcqRel / Acquire: the old code's (see above).
        if self.acks.fetch_sub(amount, Ordering::AcqRel) == amount {
            let stage = self.stage.load(Ordering::Acquire);
            if stage < StopStage::Exit as u32 {
                self.set_stage(stage + 1);
            }
        }
    }
}

impl StageProtocol for TwoStoreStages {
    fn started(participants: usize) -> Self {
        let s = TwoStoreStages {
            stage: loom::sync::atomic::AtomicU32::new(StopStage::None as u32),
            acks: loom::sync::atomic::AtomicU64::new(0),
            participants: participants as u64,
        };
        s.set_stage(StopStage::Prepare as u32);
        s
    }
    fn stage(&self) -> u32 {
        // Acquire: pairs with `set_stage`'s Release (the old code's).
        self.stage.load(Ordering::Acquire)
    }
    fn ack(&self) {
        self.drop_count(1 << 32);
    }
    fn enter_serving(&self) -> bool {
        // Acquire / AcqRel: the old code's (see `set_stage`).
        let mut w = self.acks.load(Ordering::Acquire);
        loop {
            if w == 0 {
                return false;
            }
            match self
                .acks
                .compare_exchange_weak(w, w + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => w = now,
            }
        }
        if self.stage.load(Ordering::Acquire) != StopStage::Prepare as u32 {
            self.drop_count(1);
            return false;
        }
        true
    }
    fn leave_serving(&self) {
        self.drop_count(1);
    }
}

/// What the participants of the model share.
struct Stop<A> {
    counts: A,
    /// Participants inside their serving region right now.
    serving: AtomicUsize,
    /// What each participant's serving did (a call it ran): written while serving, read by the
    /// others once the stage left Prepare, so loom reports it unless serving happens-before.
    served: Vec<Cell<u64>>,
}

/// The last stage the model's participants acknowledge: the first one after Prepare is where
/// the claim under test matters; the later stages only repeat the ack barrier.
const LAST_STAGE: u32 = StopStage::DisableIrqInactive as u32;

/// One participant's run through the stages, as `stop_participant` does it: acknowledge each
/// new stage; while a stage is not new, and it is Prepare, serve (at most `serve` times: the
/// model has to end). Checks the claim of stop.rs: no participant is serving once the stage
/// left Prepare, and the stage does not advance while one serves.
fn participant<A: StageProtocol>(s: &Stop<A>, me: usize, mut serve: usize) {
    let mut seen = StopStage::None as u32;
    loop {
        let stage = s.counts.stage();
        if stage != seen {
            seen = stage;
            if stage > StopStage::Prepare as u32 {
                // This CPU masks (stops serving) now, and so do the others: nobody may still
                // be serving, and what they served is visible.
                assert_eq!(
                    s.serving.load(Ordering::SeqCst),
                    0,
                    "a participant is still serving in stage {stage}"
                );
                for (other, served) in s.served.iter().enumerate() {
                    if other != me {
                        let _ = served.get();
                    }
                }
            }
            s.counts.ack();
            if stage == LAST_STAGE {
                return;
            }
        } else {
            if stage == StopStage::Prepare as u32 && serve > 0 && s.counts.enter_serving() {
                serve -= 1;
                s.serving.fetch_add(1, Ordering::SeqCst);
                s.served[me].set(s.served[me].get() + 1);
                assert_eq!(
                    s.counts.stage(),
                    StopStage::Prepare as u32,
                    "the stage advanced while participant {me} was serving"
                );
                s.serving.fetch_sub(1, Ordering::SeqCst);
                s.counts.leave_serving();
            }
            thread::yield_now();
        }
    }
}

/// `participants` participants (one per thread) walk the stages up to [`LAST_STAGE`]; each may
/// serve `serve` times in Prepare, at any point.
fn prepare_accounting<A: StageProtocol>(participants: usize, serve: usize) {
    let s = Arc::new(Stop {
        counts: A::started(participants),
        serving: AtomicUsize::new(0),
        served: (0..participants).map(|_| Cell::new(0)).collect(),
    });
    let others: Vec<_> = (1..participants)
        .map(|me| {
            let s = s.clone();
            thread::spawn(move || participant(&s, me, serve))
        })
        .collect();
    participant(&s, 0, serve);
    for t in others {
        t.join().unwrap();
    }
    assert_eq!(
        s.counts.stage(),
        LAST_STAGE + 1,
        "every ack of the last stage counted"
    );
}

/// Test 7 (issue 16): the Prepare accounting of stop_machine (`StageCounts`, the engine's own
/// code): nobody serves calls once Prepare is over, and Prepare does not end while anyone does.
#[test]
fn stop_machine_prepare_ends_only_when_nobody_serves() {
    model("stop_machine_prepare_ends_only_when_nobody_serves", || {
        prepare_accounting::<StageCounts>(2, 2)
    });
}

/// The same model over the old two-store protocol fails: a participant enters serving between
/// the count's store and the stage's, and serves on into the next stage.
#[test]
fn stop_machine_prepare_model_catches_the_two_store_stage() {
    let failed = std::panic::catch_unwind(|| {
        model(
            "stop_machine_prepare_model_catches_the_two_store_stage",
            || prepare_accounting::<TwoStoreStages>(2, 2),
        )
    });
    let message = match failed {
        Ok(()) => panic!("the model no longer catches issue 16"),
        Err(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    };
    assert!(
        message.contains("still serving") || message.contains("advanced while"),
        "failed for another reason: {message}"
    );
}

/// Test 8: restricted flushes (a hosted signal handler that interrupted arbitrary code) run
/// only any-context calls and defer the others to the next unrestricted flush — each call
/// exactly once, while producers push concurrently. One producer pushes a user call, another an
/// engine (any-context) call; the owner runs restricted flushes until the engine call ran, then
/// unrestricted ones until both did. (Shown to fail when `flush_with` ignores `restricted`: the
/// user call then runs in the restricted phase.)
#[test]
fn restricted_flush_defers_user_calls() {
    model("restricted_flush_defers_user_calls", || {
        let queue = Arc::new(CallQueue::new());
        let deferred = Arc::new(crate::queue::DeferredCalls::new());
        let log = Arc::new(Log::new());
        let log_addr = Arc::as_ptr(&log) as usize;
        // Set during the restricted phase: the user call must never run while it is set.
        let restricted = Arc::new(AtomicUsize::new(1));
        let restricted_addr = Arc::as_ptr(&restricted) as usize;
        let csds: Arc<Vec<TestCsd>> = Arc::new((0..2).map(|_| TestCsd::new()).collect());

        let user = {
            let (queue, csds) = (queue.clone(), csds.clone());
            thread::spawn(move || {
                let f = move |_| {
                    // SAFETY: kept alive by the model's main thread until all ran.
                    let r = unsafe { &*(restricted_addr as *const AtomicUsize) };
                    assert_eq!(r.load(Ordering::Relaxed), 0, "a user call ran restricted");
                    // SAFETY: as above.
                    unsafe { &*(log_addr as *const Log) }.push(1);
                };
                // SAFETY: `csds` is kept alive by the main thread until all ran.
                unsafe { push_async(&queue, &csds[0], f) };
            })
        };
        let engine = {
            let (queue, csds) = (queue.clone(), csds.clone());
            thread::spawn(move || {
                let f = move |_| {
                    // SAFETY: as above.
                    unsafe { &*(log_addr as *const Log) }.push(2);
                };
                fn runner<F: FnOnce(CpuId)>(_: &F) -> RunFn {
                    run_inline::<F>
                }
                let run = runner(&f);
                let e = &csds[1];
                assert!(e.try_lock());
                // SAFETY: claimed; the inline payload matches `run`; engine work (any context);
                // kept alive by the main thread until it ran.
                unsafe {
                    e.set_call(run, Payload::inline(f), false);
                    e.set_any_context();
                    queue.push(&**e);
                }
            })
        };
        let owner = {
            let (queue, deferred, log, restricted) = (
                queue.clone(),
                deferred.clone(),
                log.clone(),
                restricted.clone(),
            );
            thread::spawn(move || {
                while !log.snapshot().contains(&2) {
                    // SAFETY: this thread is the only flusher.
                    unsafe { queue.flush_with(OWNER_CPU, Some((&deferred, true))) };
                    thread::yield_now();
                }
                restricted.store(0, Ordering::Relaxed);
                while log.snapshot().len() < 2 {
                    // SAFETY: as above.
                    unsafe { queue.flush_with(OWNER_CPU, Some((&deferred, false))) };
                    thread::yield_now();
                }
                assert_eq!(deferred.len(), 0, "nothing left deferred");
            })
        };
        user.join().unwrap();
        engine.join().unwrap();
        owner.join().unwrap();
        let mut seen = log.snapshot();
        seen.sort_unstable();
        assert_eq!(seen, [1, 2], "each call once");
    });
}
