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
use crate::sync::{AtomicPtr, Ordering, UnsafeCell};

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
            // Relaxed: published by the Release CAS below.
            unsafe { (*csd).next.store(head, Ordering::Relaxed) };
            // Release: the call data's contents and link happen-before the flusher's Acquire
            // swap (every later CAS on `head` continues this release sequence).
            match self
                .head
                .compare_exchange_weak(head, csd, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return head.is_null(),
                Err(current) => head = current,
            }
        }
    }

    /// Whether nothing is pushed and not yet taken. A hint for polling loops: the flush's swap
    /// is what synchronises. Pair it with a `SeqCst` fence where a decision depends on it.
    pub(crate) fn is_empty(&self) -> bool {
        // Relaxed: see above.
        self.head.load(Ordering::Relaxed).is_null()
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

        let mut ran = 0;
        loop {
            // SAFETY: owner only, interrupts masked; the list borrow ends before the call runs,
            // so a nested flush can use the lists.
            let csd = self.pending_sync.with_mut(|l| unsafe { (*l).pop_front() });
            if !csd.is_null() {
                // SAFETY: we hold it; after this it may be gone.
                unsafe { Csd::run_sync_and_release(csd, cpu) };
                ran += 1;
                continue;
            }
            // SAFETY: as above.
            let csd = self.pending_async.with_mut(|l| unsafe { (*l).pop_front() });
            if csd.is_null() {
                break;
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
