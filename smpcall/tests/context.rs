//! Context rules (C7), self calls (C1), caller-owned call data (C4) and the error type.

mod common;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::{wait_until, LIMIT};
use smpcall::hosted::{IdlePolicy, Machine};
use smpcall::{CpuMask, Csd, DeadlockReason, Error};

fn machine(cpus: usize) -> Machine {
    Machine::builder()
        .cpus(cpus)
        .idle(IdlePolicy::Sleep)
        .build()
        .expect("machine")
}

#[test]
fn mutual_synchronous_calls_complete() {
    // A→B while B→A, many times: each waiter keeps serving its own queue.
    let m = machine(2);
    let iterations = 5_000;
    let tasks: Vec<_> = (0..2)
        .map(|me| {
            m.run_on(me, move |e| {
                let other = 1 - me;
                let mut sum = 0usize;
                for i in 0..iterations {
                    sum += e.call_single(other, move |cpu| cpu + i).expect("sync call");
                }
                sum
            })
        })
        .collect();
    for (me, mut t) in tasks.into_iter().enumerate() {
        let other = 1 - me;
        let sum = t.join_timeout(LIMIT * 3).expect("mutual calls finished");
        assert_eq!(sum, (0..iterations).map(|i| other + i).sum::<usize>());
    }
    m.shutdown().unwrap();
}

#[test]
fn mutual_synchronous_many_calls_complete() {
    let m = machine(4);
    let tasks: Vec<_> = (0..4)
        .map(|me| {
            m.run_on(me, move |e| {
                let hits = AtomicUsize::new(0);
                for _ in 0..500 {
                    let ran = e
                        .call_others(|_| {
                            hits.fetch_add(1, Ordering::Relaxed);
                        })
                        .expect("call_others");
                    assert_eq!(ran.weight(), 3);
                }
                hits.load(Ordering::Relaxed)
            })
        })
        .collect();
    for mut t in tasks {
        assert_eq!(
            t.join_timeout(LIMIT * 3).expect("many-calls finished"),
            1500
        );
    }
    m.shutdown().unwrap();
}

#[test]
fn sync_call_with_interrupts_masked_is_refused() {
    let m = machine(2);
    let (single, many, async_ok) = m
        .run_on(0, |e| {
            let _masked = e.irq_save();
            let single = e.call_single(1, |_| ());
            let many = e.call_others(|_| ()).map(|_| ());
            // No-wait calls are allowed with interrupts masked.
            let flag = Arc::new(AtomicBool::new(false));
            let f2 = Arc::clone(&flag);
            let async_ok = e.call_single_async(1, move |_| f2.store(true, Ordering::SeqCst));
            wait_until(LIMIT, "the masked caller's async call to run", || {
                flag.load(Ordering::SeqCst)
            });
            (single, many, async_ok)
        })
        .join_timeout(LIMIT)
        .unwrap();
    let refused = Err(Error::WouldDeadlock(DeadlockReason::InterruptsMasked));
    assert_eq!(single, refused);
    assert_eq!(many, refused);
    assert_eq!(async_ok, Ok(()));
    m.shutdown().unwrap();
}

#[test]
fn sync_call_from_inside_a_handler_is_refused() {
    let m = machine(3);
    let (inner_sync, inner_many, inner_async) = m
        .run_on(0, |e| {
            let flag = Arc::new(AtomicBool::new(false));
            let f2 = Arc::clone(&flag);
            let r = e
                .call_single(1, |_| {
                    assert!(e.in_handler());
                    let sync = e.call_single(2, |_| ());
                    let many = e.call_others(|_| ()).map(|_| ());
                    // Async from a handler is accepted — here even back to the waiting caller,
                    // which serves its own queue while it waits.
                    let asy = e.call_single_async(0, move |_| f2.store(true, Ordering::SeqCst));
                    (sync, many, asy)
                })
                .expect("outer call");
            wait_until(LIMIT, "the handler's async call to run", || {
                flag.load(Ordering::SeqCst)
            });
            r
        })
        .join_timeout(LIMIT)
        .unwrap();
    let refused = Err(Error::WouldDeadlock(DeadlockReason::InHandler));
    assert_eq!(inner_sync, refused);
    assert_eq!(inner_many, refused);
    assert_eq!(inner_async, Ok(()));
    m.shutdown().unwrap();
}

#[test]
fn self_call_runs_locally_with_interrupts_masked() {
    let m = machine(2);
    let (sync_masked, sync_cpu, async_ran_masked, masked_after) = m
        .run_on(1, |e| {
            assert!(!e.irqs_masked());
            let (masked, cpu) = e
                .call_single(1, |cpu| (e.irqs_masked(), cpu))
                .expect("self call");
            // A no-wait self call also runs right away, locally and masked.
            let seen = Arc::new(AtomicUsize::new(0));
            let s2 = Arc::clone(&seen);
            e.call_single_async(1, move |_| {
                s2.store(1, Ordering::SeqCst);
            })
            .unwrap();
            let async_ran = seen.load(Ordering::SeqCst) == 1;
            let mut me = CpuMask::new();
            me.set(1);
            let ran = e
                .call_many(&me, |cpu| assert_eq!(cpu, 1))
                .expect("many incl. self");
            assert_eq!(ran, me);
            (masked, cpu, async_ran, e.irqs_masked())
        })
        .join_timeout(LIMIT)
        .unwrap();
    assert!(sync_masked, "a self call must run with interrupts masked");
    assert_eq!(sync_cpu, 1);
    assert!(
        async_ran_masked,
        "a no-wait self call runs before returning"
    );
    assert!(!masked_after, "the mask is restored after the self call");
    m.shutdown().unwrap();
}

#[test]
fn busy_caller_owned_csd_is_refused_then_accepted() {
    let m = machine(2);
    let held = common::MaskedCpu::hold(&m, 1);
    let csd: Pin<Arc<Csd>> = Arc::pin(Csd::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let (c2, r2) = (csd.clone(), Arc::clone(&runs));
    let (first, second) = m
        .run_on(0, move |e| {
            let r3 = Arc::clone(&r2);
            let first = e.call_async_csd(c2.as_ref(), 1, move |_| {
                r3.fetch_add(1, Ordering::SeqCst);
            });
            let r4 = Arc::clone(&r2);
            let second = e.call_async_csd(c2.as_ref(), 1, move |_| {
                r4.fetch_add(100, Ordering::SeqCst);
            });
            (first, second)
        })
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(first, Ok(()));
    assert_eq!(
        second,
        Err(Error::Busy),
        "reuse while in flight must be refused"
    );
    assert!(csd.is_busy());
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "target is masked: nothing ran yet"
    );

    held.release();
    wait_until(LIMIT, "the caller-owned csd to be released", || {
        !csd.is_busy()
    });

    let (c2, r2) = (csd.clone(), Arc::clone(&runs));
    let third = m
        .run_on(0, move |e| {
            e.call_async_csd(c2.as_ref(), 1, move |_| {
                r2.fetch_add(10, Ordering::SeqCst);
            })
        })
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(
        third,
        Ok(()),
        "accepted again once the previous call was taken"
    );
    wait_until(LIMIT, "both accepted calls to run", || {
        runs.load(Ordering::SeqCst) == 11
    });
    m.shutdown().unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        11,
        "the refused call never ran"
    );
}

#[test]
fn errors_name_the_problem() {
    let m = machine(2);
    // Not a CPU thread: calls work, but grace periods need a CPU.
    assert_eq!(m.engine().call_single(0, |cpu| cpu), Ok(0));
    assert_eq!(m.engine().synchronize_rcu_expedited(), Err(Error::NotOnCpu));
    let (unknown, unknown_async) = m
        .run_on(0, |e| {
            (e.call_single(7, |_| ()), e.call_single_async(7, |_| ()))
        })
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(unknown, Err(Error::UnknownCpu(7)));
    assert_eq!(unknown_async, Err(Error::UnknownCpu(7)));
    assert_eq!(m.run_on(9, |_| ()).join(), Err(Error::UnknownCpu(9)));
    for e in [
        Error::UnknownCpu(7),
        Error::Offline(3),
        Error::WouldDeadlock(DeadlockReason::InterruptsMasked),
        Error::WouldDeadlock(DeadlockReason::InHandler),
        Error::Busy,
        Error::ShutDown,
        Error::NotOnCpu,
    ] {
        let msg = e.to_string();
        assert!(msg.len() > 10, "{e:?} has a real message: {msg}");
    }
    // After shutdown starts, calls are refused with ShutDown.
    let after = m
        .run_on(0, |e| {
            // SAFETY: the test owns the machine and shuts it down right after.
            unsafe { e.shutdown() };
            (e.call_single(1, |_| ()), e.call_single_async(1, |_| ()))
        })
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(after, (Err(Error::ShutDown), Err(Error::ShutDown)));
    m.shutdown().unwrap();
}

#[test]
fn safe_point_delivery_runs_calls_only_at_safe_points() {
    use smpcall::hosted::{safe_point, Delivery};
    let m = Machine::builder()
        .cpus(2)
        .idle(IdlePolicy::Sleep)
        .delivery(Delivery::SafePoint)
        .build()
        .unwrap();
    let busy = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let (b2, g2) = (Arc::clone(&busy), Arc::clone(&go));
    // CPU 1 is busy in a task that reaches a safe point only when told to.
    let mut worker = m.run_on(1, move |_| {
        b2.store(true, Ordering::SeqCst);
        common::spin_until(LIMIT, "the test to allow a safe point", || {
            g2.load(Ordering::SeqCst)
        });
        safe_point()
    });
    wait_until(LIMIT, "CPU 1 to be busy", || busy.load(Ordering::SeqCst));
    let ran = Arc::new(AtomicUsize::new(0));
    let r2 = Arc::clone(&ran);
    m.run_on(0, move |e| {
        e.call_single_async(1, move |_| {
            // Safe-point context: allocating and locking are fine here.
            #[allow(clippy::useless_vec)]
            let v = std::hint::black_box(vec![1usize; 4]); // a real heap allocation
            r2.fetch_add(v.len(), Ordering::SeqCst);
        })
    })
    .join_timeout(LIMIT)
    .unwrap()
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "no signal: nothing runs before a safe point"
    );
    assert_eq!(m.engine().platform().signals_sent(), 0);
    go.store(true, Ordering::SeqCst);
    let served = worker.join_timeout(LIMIT).unwrap();
    assert_eq!(served, 1, "the safe point served the queued call");
    assert_eq!(ran.load(Ordering::SeqCst), 4);
    m.shutdown().unwrap();
}

#[test]
fn hosted_sleep_finishes_while_ipis_keep_arriving() {
    // A CPU sleeping in its task while another CPU sends it a stream of IPIs: the absolute
    // deadline sleep finishes (std's relative sleep may be restarted forever).
    let m = machine(2);
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    let streaming = Arc::new(AtomicUsize::new(0));
    let st2 = Arc::clone(&streaming);
    let mut sender = m.run_on(1, move |e| {
        let mut sent = 0u64;
        while !s2.load(Ordering::SeqCst) {
            if e.call_single_async(0, |_| ()).is_ok() {
                sent += 1;
                st2.store(1, Ordering::SeqCst);
            }
        }
        sent
    });
    let st3 = Arc::clone(&streaming);
    let slept = m
        .run_on(0, move |_| {
            // Start sleeping only once the IPI stream is flowing.
            wait_until(LIMIT, "CPU 1 to start sending", || {
                st3.load(Ordering::SeqCst) == 1
            });
            let t = std::time::Instant::now();
            for _ in 0..20 {
                smpcall::hosted::sleep(std::time::Duration::from_micros(200));
            }
            t.elapsed()
        })
        .join_timeout(LIMIT);
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join_timeout(LIMIT).unwrap();
    let slept = slept.expect("sleeps finished despite the IPI stream");
    assert!(
        slept >= std::time::Duration::from_millis(4),
        "slept {slept:?}"
    );
    assert!(sent > 0);
    m.shutdown().unwrap();
}
