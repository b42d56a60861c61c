//! C5: no heap allocation on any call, delivery or completion path. A counting global
//! allocator sees every allocation in the process; after warm-up, thousands of sync and async
//! calls of every shape must allocate nothing. (This binary holds a single test so that nothing
//! else allocates concurrently.)

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use common::{wait_until, LIMIT};
use smpcall::hosted::{IdlePolicy, Machine};
use smpcall::{CpuMask, Csd};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn calls_allocate_nothing_after_warm_up() {
    for idle in [IdlePolicy::Sleep, IdlePolicy::Poll] {
        let m = Machine::builder().cpus(3).idle(idle).build().unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let csd = Arc::pin(Csd::new());
        let r = Arc::clone(&runs);
        let (allocs, calls) = m
            .run_on(0, move |e| {
                let mut one = CpuMask::new();
                one.set(2);
                let round = |e: &smpcall::hosted::HostEngine| -> usize {
                    let mut calls = 0;
                    for target in [1, 2, 0] {
                        let r1 = Arc::clone(&r);
                        e.call_single_async(target, move |_| {
                            r1.fetch_add(1, Ordering::Relaxed);
                        })
                        .unwrap();
                        let v = e
                            .call_single(target, |cpu| {
                                r.fetch_add(1, Ordering::Relaxed);
                                cpu
                            })
                            .unwrap();
                        assert_eq!(v, target);
                        calls += 2;
                    }
                    let r2 = Arc::clone(&r);
                    calls += e
                        .call_others_async(move |_| {
                            r2.fetch_add(1, Ordering::Relaxed);
                        })
                        .unwrap()
                        .weight();
                    calls += e
                        .call_all(|_| {
                            r.fetch_add(1, Ordering::Relaxed);
                        })
                        .unwrap()
                        .weight();
                    calls += e
                        .call_many(&one, |_| {
                            r.fetch_add(1, Ordering::Relaxed);
                        })
                        .unwrap()
                        .weight();
                    let r3 = Arc::clone(&r);
                    if e.call_async_csd(csd.as_ref(), 1, move |_| {
                        r3.fetch_add(1, Ordering::Relaxed);
                    })
                    .is_ok()
                    {
                        calls += 1;
                    }
                    calls
                };
                for _ in 0..200 {
                    round(e);
                }
                wait_until(LIMIT, "warm-up calls to drain", || e.is_quiescent());
                let before = ALLOCS.load(Ordering::SeqCst);
                let mut calls = 0;
                for _ in 0..2_000 {
                    calls += round(e);
                }
                wait_until(LIMIT, "measured calls to drain", || e.is_quiescent());
                (ALLOCS.load(Ordering::SeqCst) - before, calls)
            })
            .join_timeout(LIMIT * 3)
            .unwrap();
        assert!(calls > 20_000, "the measured window made {calls} calls");
        assert_eq!(
            allocs, 0,
            "{idle:?}: {allocs} allocations during {calls} calls"
        );
        m.shutdown().unwrap();
    }
}
