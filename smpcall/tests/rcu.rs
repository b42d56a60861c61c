//! Expedited RCU (C13) on the hosted backend.

mod common;

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, LIMIT};
use smpcall::hosted::{IdlePolicy, Machine};
use smpcall::{CpuMask, DeadlockReason, Error, HotplugReason};

fn flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

#[test]
fn grace_period_waits_for_every_pre_existing_reader() {
    let m = Machine::builder()
        .cpus(4)
        .idle(IdlePolicy::Sleep)
        .build()
        .unwrap();
    let in_reader = Arc::new(AtomicUsize::new(0));
    let releases: Vec<_> = (0..3).map(|_| flag()).collect();
    let readers: Vec<_> = (1..4)
        .map(|cpu| {
            let (inr, rel) = (Arc::clone(&in_reader), Arc::clone(&releases[cpu - 1]));
            m.run_on(cpu, move |e| {
                let _r = e.rcu_read_lock().unwrap();
                inr.fetch_add(1, Ordering::SeqCst);
                wait_until(LIMIT, "the test to end this reader", || {
                    rel.load(Ordering::SeqCst)
                });
            })
        })
        .collect();
    wait_until(LIMIT, "3 readers inside their sections", || {
        in_reader.load(Ordering::SeqCst) == 3
    });
    let done = flag();
    let d2 = Arc::clone(&done);
    let mut gp = m.run_on(0, move |e| {
        let r = e.synchronize_rcu_expedited();
        d2.store(true, Ordering::SeqCst);
        r
    });
    for (i, rel) in releases.iter().enumerate() {
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !done.load(Ordering::SeqCst),
            "grace period ended while {} reader(s) still held",
            3 - i
        );
        rel.store(true, Ordering::SeqCst);
    }
    assert_eq!(gp.join_timeout(LIMIT).unwrap(), Ok(()));
    for mut r in readers {
        r.join_timeout(LIMIT).unwrap();
    }
    let s = m.engine().rcu_stats();
    assert_eq!(s.grace_periods, 1);
    assert_eq!(
        s.deferred_to_unlock, 3,
        "all three readers reported at unlock: {s:?}"
    );
    m.shutdown().unwrap();
}

#[test]
fn grace_period_does_not_wait_for_readers_that_started_after_it() {
    let m = Machine::builder()
        .cpus(3)
        .idle(IdlePolicy::Sleep)
        .build()
        .unwrap();
    let release = flag();
    let started = flag();
    let (rel, st) = (Arc::clone(&release), Arc::clone(&started));
    // CPU 1 is busy (not idle, not reading) until the grace period has its quiescent state,
    // then starts a reader it holds until the test ends.
    let gp_seq_seen = Arc::new(AtomicU64::new(0));
    let g2 = Arc::clone(&gp_seq_seen);
    let busy = flag();
    let b2 = Arc::clone(&busy);
    let mut late = m.run_on(1, move |e| {
        b2.store(true, Ordering::SeqCst);
        wait_until(LIMIT, "a grace period to start", || e.rcu_gp_seq() >= 1);
        let gp = e.rcu_gp_seq();
        wait_until(LIMIT, "CPU 1's quiescent state for it", || {
            e.rcu_last_qs(1) >= gp
        });
        g2.store(gp, Ordering::SeqCst);
        let _r = e.rcu_read_lock().unwrap();
        st.store(true, Ordering::SeqCst);
        wait_until(LIMIT, "the test to end the late reader", || {
            rel.load(Ordering::SeqCst)
        });
    });
    // CPU 1 is in task context (watched) before the grace period starts, so it gets the call.
    wait_until(LIMIT, "CPU 1 to be busy", || busy.load(Ordering::SeqCst));
    let mut gp = m.run_on(0, move |e| e.synchronize_rcu_expedited());
    assert_eq!(
        gp.join_timeout(LIMIT).unwrap(),
        Ok(()),
        "the grace period completed while a later reader held"
    );
    wait_until(LIMIT, "the late reader to start", || {
        started.load(Ordering::SeqCst)
    });
    assert!(gp_seq_seen.load(Ordering::SeqCst) >= 1);
    release.store(true, Ordering::SeqCst);
    late.join_timeout(LIMIT).unwrap();
    m.shutdown().unwrap();
}

#[test]
fn idle_cpus_get_no_ipi() {
    let m = Machine::builder()
        .cpus(4)
        .idle(IdlePolicy::Sleep)
        .build()
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let before = m.engine().total_stats();
    let r = m
        .run_on(0, |e| {
            for _ in 0..20 {
                e.synchronize_rcu_expedited()?;
            }
            Ok::<_, Error>(())
        })
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(r, Ok(()));
    let s = m.engine().rcu_stats();
    assert_eq!(s.grace_periods, 20);
    assert_eq!(s.cpus_called, 0, "idle CPUs were skipped, not IPI'd: {s:?}");
    assert_eq!(s.cpus_skipped_idle, 60);
    assert_eq!(m.engine().total_stats().calls_queued, before.calls_queued);
    m.shutdown().unwrap();
}

#[test]
fn readers_inside_nmi_handlers_are_respected() {
    let m = Machine::builder()
        .cpus(3)
        .idle(IdlePolicy::Sleep)
        .build()
        .unwrap();
    let in_nmi_reader = flag();
    let release = flag();
    let (inr, rel) = (Arc::clone(&in_nmi_reader), Arc::clone(&release));
    // CPU 2 makes CPU 1 run an NMI handler that holds a reader.
    let mut nmi = m.run_on(2, move |e| {
        common::nmi_call_many(e, &CpuMask::single(1), |_| {
            let _r = e.rcu_read_lock().unwrap();
            inr.store(true, Ordering::SeqCst);
            let deadline = std::time::Instant::now() + LIMIT;
            while !rel.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                std::hint::spin_loop();
            }
        })
    });
    wait_until(LIMIT, "the NMI reader to start", || {
        in_nmi_reader.load(Ordering::SeqCst)
    });
    let done = flag();
    let d2 = Arc::clone(&done);
    let mut gp = m.run_on(0, move |e| {
        let r = e.synchronize_rcu_expedited();
        d2.store(true, Ordering::SeqCst);
        r
    });
    std::thread::sleep(Duration::from_millis(30));
    assert!(
        !done.load(Ordering::SeqCst),
        "grace period ended during the NMI reader"
    );
    release.store(true, Ordering::SeqCst);
    assert_eq!(gp.join_timeout(LIMIT).unwrap(), Ok(()));
    assert_eq!(nmi.join_timeout(LIMIT).unwrap(), Ok(CpuMask::single(1)));
    m.shutdown().unwrap();
}

#[test]
fn grace_period_rules_and_hotplug() {
    let m = Machine::builder()
        .cpus(3)
        .idle(IdlePolicy::Sleep)
        .build()
        .unwrap();
    let r = m
        .run_on(0, |e| {
            let _g = e.rcu_read_lock().unwrap();
            e.synchronize_rcu_expedited()
        })
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(r, Err(Error::WouldDeadlock(DeadlockReason::InRcuReader)));
    // Offline CPUs are quiescent; grace periods work from any CPU.
    m.cpu_down(2).unwrap();
    let r = m
        .run_on(1, |e| e.synchronize_rcu_expedited())
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(r, Ok(()));
    m.cpu_up(2).unwrap();
    m.shutdown().unwrap();
}

/// A node readers follow; `alive` is poisoned before the node is reclaimed.
struct Node {
    alive: AtomicU64,
    value: u64,
}

const ALIVE: u64 = 0xA11CE;
const DEAD: u64 = 0xDEAD;
const SWAPS: u64 = 120;

/// RCU pointer swap under load: readers on every CPU (task context and call handlers) follow a
/// shared pointer; a writer swaps it, waits for a grace period, poisons the old node, and only
/// later frees it. A reader that ever sees a poisoned node means a grace period ended too early.
#[test]
fn pointer_swap_never_frees_what_a_reader_holds() {
    let m = Machine::builder().cpus(4).build().unwrap();
    let first = Box::into_raw(Box::new(Node {
        alive: AtomicU64::new(ALIVE),
        value: 0,
    }));
    let head = Arc::new(AtomicPtr::new(first));
    let stop = flag();
    let violations = Arc::new(AtomicUsize::new(0));
    let reads = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (1..4)
        .map(|cpu| {
            let (head, stop, bad, reads) = (
                Arc::clone(&head),
                Arc::clone(&stop),
                Arc::clone(&violations),
                Arc::clone(&reads),
            );
            m.run_on(cpu, move |e| {
                while !stop.load(Ordering::SeqCst) {
                    let _r = e.rcu_read_lock().unwrap();
                    let p = head.load(Ordering::Acquire);
                    // SAFETY: RCU: the node is not reclaimed before our section ends.
                    let node = unsafe { &*p };
                    for _ in 0..10 {
                        if node.alive.load(Ordering::Relaxed) != ALIVE {
                            bad.fetch_add(1, Ordering::SeqCst);
                        }
                        std::hint::spin_loop();
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                    drop(_r);
                    // Between sections, a safe point: the writer's no-wait calls run here
                    // (they never run inside the reader's code, which a signal interrupted).
                    smpcall::hosted::safe_point();
                    // 4 CPUs share 2 cores here: let the writer's CPU run.
                    std::thread::yield_now();
                }
            })
        })
        .collect();
    let (h2, bad2) = (Arc::clone(&head), Arc::clone(&violations));
    let mut writer = m.run_on(0, move |e| {
        let mut graveyard: Vec<*mut Node> = Vec::new();
        for i in 1..=SWAPS {
            let new = Box::into_raw(Box::new(Node {
                alive: AtomicU64::new(ALIVE),
                value: i,
            }));
            let old = h2.swap(new, Ordering::AcqRel);
            // Readers in call handlers too.
            let h3 = Arc::clone(&h2);
            let b3 = Arc::clone(&bad2);
            e.call_others_async(move |_| {
                let p = h3.load(Ordering::Acquire);
                // Only the pointer's liveness is checked; the handler holds no reader, so
                // it must not dereference: count a handler-side null as a bug.
                if p.is_null() {
                    b3.fetch_add(1, Ordering::SeqCst);
                }
            })
            .unwrap();
            e.synchronize_rcu_expedited().unwrap();
            // SAFETY: unreachable for new readers; the grace period waited for old ones.
            unsafe { (*old).alive.store(DEAD, Ordering::Relaxed) };
            graveyard.push(old);
            if graveyard.len() > 16 {
                for p in graveyard.drain(..8) {
                    // SAFETY: poisoned after a grace period, and a further 8 grace periods ago.
                    drop(unsafe { Box::from_raw(p) });
                }
            }
        }
        graveyard.len()
    });
    writer.join_timeout(LIMIT * 3).expect("the writer finished");
    stop.store(true, Ordering::SeqCst);
    for mut r in readers {
        r.join_timeout(LIMIT).unwrap();
    }
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "a reader saw a reclaimed node"
    );
    assert!(
        reads.load(Ordering::Relaxed) > SWAPS as usize,
        "readers actually read"
    );
    let s = m.engine().rcu_stats();
    assert_eq!(s.grace_periods, SWAPS);
    eprintln!(
        "rcu pointer swap: {s:?}, reads {}",
        reads.load(Ordering::Relaxed)
    );
    // SAFETY: all readers and the writer are done.
    let last = unsafe { Box::from_raw(head.load(Ordering::SeqCst)) };
    assert_eq!(last.value, SWAPS);
    m.shutdown().unwrap();
}

#[test]
fn a_cpu_inside_a_reader_is_not_taken_down_and_offline_cpus_cannot_read() {
    let m = Machine::builder()
        .cpus(3)
        .idle(IdlePolicy::Sleep)
        .build()
        .unwrap();
    let inside = flag();
    let release = flag();
    let (ins, rel) = (Arc::clone(&inside), Arc::clone(&release));
    let mut reader = m.run_on(2, move |e| {
        let _r = e.rcu_read_lock().unwrap();
        ins.store(true, Ordering::SeqCst);
        wait_until(LIMIT, "the test to end the reader", || {
            rel.load(Ordering::SeqCst)
        });
    });
    wait_until(LIMIT, "the reader to start", || {
        inside.load(Ordering::SeqCst)
    });
    let refused = m.cpu_down(2);
    assert_eq!(
        refused,
        Err(Error::Hotplug {
            cpu: 2,
            reason: HotplugReason::InRcuReader
        })
    );
    assert!(m.engine().is_accepting(2), "CPU 2 accepts calls again");
    release.store(true, Ordering::SeqCst);
    reader.join_timeout(LIMIT).unwrap();
    // Now it can go; a task still running there cannot start a reader.
    let parked = flag();
    let p2 = Arc::clone(&parked);
    let mut late = m.run_on(2, move |e| {
        wait_until(LIMIT, "CPU 2 to go offline", || !e.is_online(2));
        p2.store(true, Ordering::SeqCst);
        e.rcu_read_lock().map(|_| ())
    });
    m.cpu_down(2).unwrap();
    assert_eq!(late.join_timeout(LIMIT).unwrap(), Err(Error::Offline(2)));
    assert!(parked.load(Ordering::SeqCst));
    m.cpu_up(2).unwrap();
    m.shutdown().unwrap();
}
