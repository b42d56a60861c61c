//! The per-CPU call queue: lock-free multi-producer push, single-consumer take-all flush.
//!
//! Senders push [`Csd`]s with a CAS on the head (an intrusive Treiber stack). The push tells
//! whether the queue was empty: only that transition needs an IPI (C6) — a queue that already
//! held calls has an IPI on its way, or a flush in progress that will see the new entry, or
//! (for a flush that already took the list) the push finds the queue empty again and sends one.
//!
//! The owning CPU flushes with interrupts masked: it takes the whole stack with one swap,
//! restores arrival order, and appends the entries to two CPU-private lists — synchronous and
//! asynchronous. It then runs synchronous entries first (run, then release: their senders are
//! waiting) and asynchronous ones after (release, then run). The private lists live in the
//! queue rather than on the flusher's stack so that a flush may be *re-entered*: a function that
//! waits (for a per-CPU slot, say) serves its own CPU's queue, and that nested flush continues
//! with the entries the outer one had already taken. No call data this CPU has taken is ever
//! held unreleased behind a function that waits — the property that keeps two CPUs calling each
//! other from handlers from deadlocking.

use core::ptr;

use crate::cpumask::CpuId;
use crate::csd::Csd;
use crate::sync::{AtomicPtr, AtomicU32, Ordering, UnsafeCell};

/// A singly linked FIFO of call data, private to the owning CPU.
#[derive(Debug)]
struct List {
    head: *mut Csd,
    tail: *mut Csd,
}

impl List {
    const fn new() -> Self {
        List {
            head: ptr::null_mut(),
            tail: ptr::null_mut(),
        }
    }

    /// # Safety
    /// `csd` must be held by this CPU.
    unsafe fn push_back(&mut self, csd: *mut Csd) {
        // SAFETY: we hold `csd` (and `self.tail`, if any): their links are ours to write.
        // Relaxed: CPU-private list, only this CPU reads these links.
        unsafe { (*csd).next.store(ptr::null_mut(), Ordering::Relaxed) };
        if self.tail.is_null() {
            self.head = csd;
        } else {
            // SAFETY: as above.
            unsafe { (*self.tail).next.store(csd, Ordering::Relaxed) };
        }
        self.tail = csd;
    }

    /// # Safety
    /// Every entry must be held by this CPU.
    unsafe fn pop_front(&mut self) -> *mut Csd {
        let csd = self.head;
        if !csd.is_null() {
            // SAFETY: we hold `csd`; the link is read before the caller releases it.
            self.head = unsafe { (*csd).next.load(Ordering::Relaxed) };
            if self.head.is_null() {
                self.tail = ptr::null_mut();
            }
        }
        csd
    }
}

/// A CPU's queue of incoming calls.
#[repr(C)]
#[derive(Debug)]
pub struct CallQueue {
    /// Lock-free stack of pushed, not yet taken call data (newest first).
    head: AtomicPtr<Csd>,
    /// Taken synchronous entries not yet run (owner only, interrupts masked).
    pending_sync: UnsafeCell<List>,
    /// Taken asynchronous entries not yet run (owner only, interrupts masked).
    pending_async: UnsafeCell<List>,
}

// SAFETY: `head` is atomic; the pending lists are only touched by the owning CPU with its
// interrupts masked (the `flush` contract), so never concurrently.
unsafe impl Sync for CallQueue {}
// SAFETY: the raw pointers in the lists are call data held by the owning CPU; moving the queue
// between threads before use moves nothing shared.
unsafe impl Send for CallQueue {}

impl Default for CallQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl CallQueue {
    /// An empty queue.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        CallQueue {
            head: AtomicPtr::new(ptr::null_mut()),
            pending_sync: UnsafeCell::new(List::new()),
            pending_async: UnsafeCell::new(List::new()),
        }
    }

    /// An empty queue.
    #[cfg(loom)]
    pub fn new() -> Self {
        CallQueue {
            head: AtomicPtr::new(ptr::null_mut()),
            pending_sync: UnsafeCell::new(List::new()),
            pending_async: UnsafeCell::new(List::new()),
        }
    }

    /// Pushes a call. Returns `true` if the queue was empty, i.e. the target needs an IPI.
    ///
    /// # Safety
    /// `csd` must be locked by the caller, filled in, and stay alive until the target releases
    /// it.
    pub(crate) unsafe fn push(&self, csd: *const Csd) -> bool {
        let csd = csd.cast_mut();
        // Relaxed: only the CAS's expected value; the CAS itself orders the publication.
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: the caller holds `csd`, so its link is ours to write.
            // Relaxed: published by the CAS below.
            unsafe { (*csd).next.store(head, Ordering::Relaxed) };
            // SeqCst (a Release, plus): the call data's contents and link happen-before the
            // flusher's Acquire swap (every later CAS on `head` continues this release
            // sequence); and being in the single total order it pairs, Dekker-style, with the
            // target's SeqCst "stop polling / sleeping, then look at the queue" — the sender
            // then reads the target's polling or sleeping flag with a SeqCst load, no fence
            // needed (on x86 this is the same `lock cmpxchg` as a Release CAS).
            match self
                .head
                .compare_exchange_weak(head, csd, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => return head.is_null(),
                Err(current) => head = current,
            }
        }
    }

    /// Whether nothing is pushed and not yet taken. SeqCst: the target's half of the Dekker
    /// pair with `push` (see there); the flush's swap is what synchronises the contents.
    pub(crate) fn is_empty(&self) -> bool {
        self.head.load(Ordering::SeqCst).is_null()
    }

    /// Whether taken entries are waiting to run (owner only).
    ///
    /// # Safety
    /// As for [`flush`](CallQueue::flush).
    pub(crate) unsafe fn has_pending(&self) -> bool {
        // SAFETY: owner only, interrupts masked (this function's contract).
        let sync = self.pending_sync.with(|l| unsafe { !(*l).head.is_null() });
        // SAFETY: as above.
        sync || self.pending_async.with(|l| unsafe { !(*l).head.is_null() })
    }

    /// Takes every pushed call and runs everything taken, synchronous entries first.
    /// Returns how many calls ran.
    ///
    /// # Safety
    /// Only the CPU that owns this queue may call it, with its interrupts masked (so no other
    /// flush of this queue runs concurrently). It may be re-entered from a function it runs.
    pub(crate) unsafe fn flush(&self, cpu: CpuId) -> usize {
        // SAFETY: forwarded.
        unsafe { self.flush_with(cpu, None) }
    }

    /// Takes every pushed call and runs what may run here.
    ///
    /// With `deferred = Some((d, false))` it first runs what an earlier restricted flush
    /// deferred to `d`, then everything taken (synchronous entries first, each group in arrival
    /// order). With `Some((d, true))` — a *restricted* flush, for a context that may not run
    /// user code (a hosted signal handler that interrupted arbitrary code) — it runs only the
    /// entries marked any-context (the engine's own work) and moves the others, in order, to
    /// `d`, where the next unrestricted flush finds them. Returns how many calls ran.
    ///
    /// # Safety
    /// As for [`flush`](CallQueue::flush); `d` must be this CPU's own deferred lists.
    pub(crate) unsafe fn flush_with(
        &self,
        cpu: CpuId,
        deferred: Option<(&DeferredCalls, bool)>,
    ) -> usize {
        // Acquire: pairs with every pusher's Release CAS, making each call data's contents and
        // links visible.
        let mut node = self.head.swap(ptr::null_mut(), Ordering::Acquire);

        // Reverse the newest-first stack into arrival order.
        let mut fifo: *mut Csd = ptr::null_mut();
        while !node.is_null() {
            // SAFETY: taken call data is held by this CPU.
            let next = unsafe { (*node).next.load(Ordering::Relaxed) };
            // SAFETY: as above. Relaxed: CPU-private from here on.
            unsafe { (*node).next.store(fifo, Ordering::Relaxed) };
            fifo = node;
            node = next;
        }
        while !fifo.is_null() {
            // SAFETY: held by this CPU.
            let next = unsafe { (*fifo).next.load(Ordering::Relaxed) };
            // SAFETY: held by this CPU.
            let list = if unsafe { (*fifo).is_sync() } {
                &self.pending_sync
            } else {
                &self.pending_async
            };
            // SAFETY: owner only, interrupts masked; no reference into the list outlives this.
            list.with_mut(|l| unsafe { (*l).push_back(fifo) });
            fifo = next;
        }

        let (defer, restricted) = match deferred {
            Some((d, r)) => (Some(d), r),
            None => (None, false),
        };
        let mut ran = 0;
        loop {
            // Synchronous entries first (their senders wait), older (deferred) ones first.
            let mut csd = ptr::null_mut();
            if let (Some(d), false) = (defer, restricted) {
                // SAFETY: owner only, interrupts masked (this function's contract).
                csd = unsafe { d.pop(&d.sync) };
            }
            if csd.is_null() {
                // SAFETY: owner only, interrupts masked; the list borrow ends before the call
                // runs, so a nested flush can use the lists.
                csd = self.pending_sync.with_mut(|l| unsafe { (*l).pop_front() });
            }
            if !csd.is_null() {
                if restricted && unsafe { !(*csd).is_any_context() } {
                    // SAFETY: held by this CPU; `defer` is Some when restricted.
                    unsafe {
                        defer
                            .unwrap_unchecked()
                            .push(&defer.unwrap_unchecked().sync, csd)
                    };
                    continue;
                }
                // SAFETY: we hold it; after this it may be gone.
                unsafe { Csd::run_sync_and_release(csd, cpu) };
                ran += 1;
                continue;
            }
            if let (Some(d), false) = (defer, restricted) {
                // SAFETY: as above.
                csd = unsafe { d.pop(&d.asynchronous) };
            }
            if csd.is_null() {
                // SAFETY: as above.
                csd = self.pending_async.with_mut(|l| unsafe { (*l).pop_front() });
            }
            if csd.is_null() {
                break;
            }
            // SAFETY: held by this CPU (flag read before anything else).
            if restricted && unsafe { !(*csd).is_any_context() } {
                // SAFETY: held by this CPU; `defer` is Some when restricted.
                unsafe {
                    let d = defer.unwrap_unchecked();
                    d.push(&d.asynchronous, csd)
                };
                continue;
            }
            // SAFETY: we hold it; released before the function runs.
            let (run, mut payload) = unsafe { Csd::take_async_and_release(csd) };
            if let Some(run) = run {
                // SAFETY: the payload matches `run` (set_call's contract), consumed once.
                unsafe { run(&mut payload, cpu) };
            }
            ran += 1;
        }
        ran
    }
}

/// Calls a restricted flush took but could not run (user calls, taken in a context that may
/// not run user code), waiting in arrival order for the next unrestricted flush on the same
/// CPU. Private to the owning CPU, except [`len`](DeferredCalls::len), which anyone may read.
#[derive(Debug)]
pub(crate) struct DeferredCalls {
    sync: UnsafeCell<List>,
    asynchronous: UnsafeCell<List>,
    /// Entries in both lists. Written by the owner only; read by anyone as an observation.
    count: AtomicU32,
}

// SAFETY: the lists are only touched by the owning CPU with its interrupts masked (the flush
// contract); `count` is atomic.
unsafe impl Sync for DeferredCalls {}
// SAFETY: as for `CallQueue`.
unsafe impl Send for DeferredCalls {}

impl DeferredCalls {
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        DeferredCalls {
            sync: UnsafeCell::new(List::new()),
            asynchronous: UnsafeCell::new(List::new()),
            count: AtomicU32::new(0),
        }
    }

    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        DeferredCalls {
            sync: UnsafeCell::new(List::new()),
            asynchronous: UnsafeCell::new(List::new()),
            count: AtomicU32::new(0),
        }
    }

    /// How many calls wait for an unrestricted flush (an observation from any CPU).
    pub(crate) fn len(&self) -> u32 {
        // Relaxed: an observation; the owner acts on its own writes (program order).
        self.count.load(Ordering::Relaxed)
    }

    /// # Safety
    /// Owner only, interrupts masked; `csd` held by this CPU.
    unsafe fn push(&self, list: &UnsafeCell<List>, csd: *mut Csd) {
        // SAFETY: forwarded.
        list.with_mut(|l| unsafe { (*l).push_back(csd) });
        // Relaxed: owner-only writes (see `count`).
        self.count
            .store(self.count.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// # Safety
    /// Owner only, interrupts masked.
    unsafe fn pop(&self, list: &UnsafeCell<List>) -> *mut Csd {
        // SAFETY: forwarded.
        let csd = list.with_mut(|l| unsafe { (*l).pop_front() });
        if !csd.is_null() {
            // Relaxed: owner-only writes (see `count`).
            self.count
                .store(self.count.load(Ordering::Relaxed) - 1, Ordering::Relaxed);
        }
        csd
    }
}

/// Plain-threads stress versions of the loom models in `loom_tests.rs` (concurrent pushes and
/// flush lose nothing; a no-wait call data can be reused as soon as it is not busy), so an
/// ordinary `cargo test` exercises the queue on real hardware too.
#[cfg(all(test, not(loom)))]
mod stress_tests {
    use super::*;
    use crate::csd::{run_inline, Payload};
    use std::mem::ManuallyDrop;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    const PRODUCERS: usize = 4;
    const PUSHES: usize = 10_000;
    const CALLS: usize = PRODUCERS * PUSHES;
    const TIMEOUT: Duration = Duration::from_secs(30);
    const OWNER_CPU: CpuId = 0;

    /// A `Csd` whose drop does not wait (spin) when the test is already failing: a call left
    /// queued by a failed test must not turn the failure into a hang.
    struct TestCsd(ManuallyDrop<Csd>);

    impl TestCsd {
        fn new() -> Self {
            TestCsd(ManuallyDrop::new(Csd::new()))
        }
    }

    impl core::ops::Deref for TestCsd {
        type Target = Csd;
        fn deref(&self) -> &Csd {
            &self.0
        }
    }

    impl Drop for TestCsd {
        fn drop(&mut self) {
            if !thread::panicking() {
                // SAFETY: dropped exactly once, here; never used again.
                unsafe { ManuallyDrop::drop(&mut self.0) }
            }
        }
    }

    /// Claims `csd` (which must be free), writes a no-wait call running `f`, pushes it, and
    /// returns whether the queue was empty.
    ///
    /// # Safety
    /// `csd` must stay alive until the target released it.
    unsafe fn push_async<F: FnOnce(CpuId)>(queue: &CallQueue, csd: &Csd, f: F) -> bool {
        assert!(csd.try_lock(), "a free call data could not be claimed");
        // SAFETY: claimed by us and not published; `run_inline::<F>` consumes the inline `F`
        // once.
        unsafe { csd.set_call(run_inline::<F>, Payload::inline(f), false) };
        // SAFETY: locked and filled in; the caller keeps it alive until released.
        unsafe { queue.push(csd) }
    }

    /// What the called functions record (they all run on the flushing thread).
    struct Record {
        /// Runs per call (`producer * PUSHES + seq`).
        runs: Vec<AtomicUsize>,
        /// Per producer: the sequence number of the next call expected to run.
        next_seq: Vec<AtomicUsize>,
    }

    impl Record {
        fn new() -> Arc<Self> {
            Arc::new(Record {
                runs: (0..CALLS).map(|_| AtomicUsize::new(0)).collect(),
                next_seq: (0..PRODUCERS).map(|_| AtomicUsize::new(0)).collect(),
            })
        }

        /// Call `seq` of `producer` ran: it must be the next one in that producer's order.
        fn ran(&self, producer: usize, seq: usize) {
            // Relaxed everywhere: only the flushing thread writes these; the test thread reads
            // them after joining.
            self.runs[producer * PUSHES + seq].fetch_add(1, Ordering::Relaxed);
            let expected = self.next_seq[producer].fetch_add(1, Ordering::Relaxed);
            assert_eq!(
                seq, expected,
                "producer {producer}'s calls ran out of order"
            );
        }

        fn assert_each_ran_once(&self) {
            for (call, runs) in self.runs.iter().enumerate() {
                assert_eq!(
                    runs.load(Ordering::Relaxed),
                    1,
                    "call {call} (producer {}, seq {}) ran the wrong number of times",
                    call / PUSHES,
                    call % PUSHES
                );
            }
        }
    }

    /// Flushes as the owner until `calls` calls ran; returns the number of non-empty flushes.
    ///
    /// # Safety
    /// The calling thread must be the queue's only flusher.
    unsafe fn flush_until(queue: &CallQueue, calls: usize, what: &str) -> usize {
        let deadline = Instant::now() + TIMEOUT;
        let (mut ran, mut nonempty) = (0, 0);
        while ran < calls {
            // SAFETY: the only flusher (this function's contract).
            let n = unsafe { queue.flush(OWNER_CPU) };
            if n > 0 {
                nonempty += 1;
                ran += n;
            } else {
                assert!(
                    Instant::now() < deadline,
                    "timed out after {TIMEOUT:?} waiting for {what}: {ran} of {calls} calls ran"
                );
                thread::yield_now();
            }
        }
        assert_eq!(ran, calls, "{what}: more calls ran than were pushed");
        nonempty
    }

    /// Many producers push distinct call data while the owner flushes: every call runs exactly
    /// once, each producer's calls in its push order, and exactly one push per flushed batch
    /// (its first) reports "was empty".
    #[test]
    fn stress_concurrent_pushes_and_flush_lose_nothing() {
        let queue = CallQueue::new();
        let record = Record::new();
        let csds: Vec<Vec<TestCsd>> = (0..PRODUCERS)
            .map(|_| (0..PUSHES).map(|_| TestCsd::new()).collect())
            .collect();

        let (was_empty, nonempty_flushes) = thread::scope(|s| {
            let producers: Vec<_> = csds
                .iter()
                .enumerate()
                .map(|(producer, mine)| {
                    let (queue, record) = (&queue, &record);
                    s.spawn(move || {
                        let mut was_empty = 0;
                        for (seq, csd) in mine.iter().enumerate() {
                            let record = record.clone();
                            let f = move |_: CpuId| record.ran(producer, seq);
                            // SAFETY: the call data outlive the scope, which ends after the
                            // owner ran every call.
                            was_empty += unsafe { push_async(queue, csd, f) } as usize;
                        }
                        was_empty
                    })
                })
                .collect();
            // SAFETY: this thread is the queue's only flusher.
            let nonempty = unsafe { flush_until(&queue, CALLS, "all pushed calls") };
            let was_empty: usize = producers.into_iter().map(|p| p.join().unwrap()).sum();
            (was_empty, nonempty)
        });

        record.assert_each_ran_once();
        // Every flush that ran something took exactly one chain of pushes, whose first push
        // (and only that one) found the queue empty.
        assert_eq!(
            was_empty, nonempty_flushes,
            "pushes reporting an empty queue vs non-empty flushes"
        );
        for csd in csds.iter().flatten() {
            assert!(!csd.is_busy());
        }
        // SAFETY: the only flusher; nothing may be left.
        assert_eq!(unsafe { queue.flush(OWNER_CPU) }, 0);
    }

    /// Each producer reuses one no-wait call data, reclaiming it as soon as it is not busy:
    /// every call runs exactly once with its own payload, in order.
    #[test]
    fn stress_async_csd_reuse() {
        let queue = CallQueue::new();
        let record = Record::new();
        let csds: Vec<TestCsd> = (0..PRODUCERS).map(|_| TestCsd::new()).collect();

        thread::scope(|s| {
            for (producer, csd) in csds.iter().enumerate() {
                let (queue, record) = (&queue, &record);
                s.spawn(move || {
                    let deadline = Instant::now() + TIMEOUT;
                    for seq in 0..PUSHES {
                        while csd.is_busy() {
                            assert!(
                                Instant::now() < deadline,
                                "timed out after {TIMEOUT:?} waiting for producer {producer}'s \
                                 call data to be free (call {seq})"
                            );
                            // Yield, not spin: with more threads than cores a spinning
                            // producer would starve the flushing thread it waits for.
                            thread::yield_now();
                        }
                        let record = record.clone();
                        let f = move |_: CpuId| record.ran(producer, seq);
                        // SAFETY: the call data outlive the scope, which ends after the owner
                        // ran every call.
                        unsafe { push_async(queue, csd, f) };
                    }
                });
            }
            // SAFETY: this thread is the queue's only flusher.
            unsafe { flush_until(&queue, CALLS, "all reused call data's calls") };
        });

        record.assert_each_ran_once();
        for csd in &csds {
            assert!(!csd.is_busy());
        }
    }
}
