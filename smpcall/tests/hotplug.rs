//! stop_machine (C11) and CPU hotplug (C10), including seed 003's window: a sender racing with
//! a CPU going offline either has its call run on the dying CPU or gets `Error::Offline`.

mod common;
use common::TestSink;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use common::{wait_until, LIMIT};
use smpcall::hosted::{IdlePolicy, Machine};
use smpcall::{CpuMask, DeadlockReason, Error, HotplugReason, StopStage};

fn machine(cpus: usize, idle: IdlePolicy) -> Machine {
    Machine::builder().cpus(cpus).idle(idle).build().unwrap()
}

#[test]
fn stop_machine_runs_once_on_the_active_cpu_while_all_others_spin_masked() {
    for idle in [IdlePolicy::Sleep, IdlePolicy::Poll] {
        let m = machine(4, idle);
        let runs = Arc::new(AtomicUsize::new(0));
        let r2 = Arc::clone(&runs);
        let (value, observed) = m
            .run_on(0, move |e| {
                e.stop_machine(2, || {
                    r2.fetch_add(1, Ordering::SeqCst);
                    let me = e.current_cpu();
                    // Every other CPU: masked, and spinning in stop_machine past the masking
                    // stages.
                    let others: Vec<_> = [0, 1, 3]
                        .into_iter()
                        .map(|c| (c, e.platform().cpu_masked(c), e.stop_stage(c)))
                        .collect();
                    (me, e.irqs_masked(), others)
                })
            })
            .join_timeout(LIMIT)
            .unwrap()
            .map(|(me, masked, others)| ((me, masked), others))
            .unwrap();
        assert_eq!(
            value,
            (Some(2), true),
            "{idle:?}: ran on CPU 2, itself masked"
        );
        for (cpu, masked, stage) in observed {
            assert!(masked, "{idle:?}: CPU {cpu} not masked during stop_machine");
            assert!(
                stage == StopStage::DisableIrqActive || stage == StopStage::Run,
                "{idle:?}: CPU {cpu} in stage {stage:?} while the function ran"
            );
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "exactly once");
        for c in 0..4 {
            assert_eq!(m.engine().stop_stage(c), StopStage::None, "CPU {c} left");
        }
        m.shutdown().unwrap();
    }
}

#[test]
fn stop_machine_masks_inactive_cpus_before_active_ones() {
    let m = machine(6, IdlePolicy::Sleep);
    for round in 0..20 {
        let active: CpuMask = [(round % 5) + 1, ((round + 2) % 5) + 1]
            .into_iter()
            .collect();
        let ran = m
            .run_on(0, move |e| e.stop_machine_many(&active, |_| {}))
            .join_timeout(LIMIT)
            .unwrap()
            .unwrap();
        assert_eq!(ran, active);
        let order = |c| m.engine().stop_mask_order(c);
        let last_inactive = (0..6)
            .filter(|c| !active.test(*c))
            .map(order)
            .max()
            .unwrap();
        let first_active = active.iter().map(order).min().unwrap();
        assert!(
            last_inactive < first_active,
            "round {round}: an active CPU masked (#{first_active}) before an inactive one \
             (#{last_inactive})"
        );
    }
    m.shutdown().unwrap();
}

#[test]
fn concurrent_stop_machines_serialise() {
    let m = machine(4, IdlePolicy::Sleep);
    let inside = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..3)
        .map(|me| {
            let (inside, overlaps) = (Arc::clone(&inside), Arc::clone(&overlaps));
            m.run_on(me, move |e| {
                let mut done = 0;
                for i in 0..30 {
                    let r = e.stop_machine((me + i) % 4, || {
                        if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        std::hint::spin_loop();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        i
                    });
                    assert_eq!(r, Ok(i));
                    done += 1;
                }
                done
            })
        })
        .collect();
    for mut t in tasks {
        assert_eq!(t.join_timeout(LIMIT * 2).unwrap(), 30);
    }
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two stop_machines overlapped"
    );
    assert_eq!(m.engine().hotplug_stats().stop_machines, 90);
    m.shutdown().unwrap();
}

#[test]
fn stop_machine_and_hotplug_refused_where_they_cannot_wait() {
    let m = machine(2, IdlePolicy::Sleep);
    let (masked, in_handler) = m
        .run_on(0, |e| {
            let masked = {
                let _g = e.irq_save();
                (e.stop_machine(1, || ()), e.cpu_down(1))
            };
            let in_handler = e
                .call_single(1, |_| (e.stop_machine(0, || ()), e.cpu_up(0)))
                .unwrap();
            (masked, in_handler)
        })
        .join_timeout(LIMIT)
        .unwrap();
    let m_err = Err(Error::WouldDeadlock(DeadlockReason::InterruptsMasked));
    let h_err = Err(Error::WouldDeadlock(DeadlockReason::InHandler));
    assert_eq!(masked, (m_err, m_err));
    assert_eq!(in_handler, (h_err, h_err));
    m.shutdown().unwrap();
}

#[test]
fn last_online_cpu_and_self_cannot_be_taken_down() {
    let m = machine(2, IdlePolicy::Sleep);
    let r = m
        .run_on(0, |e| {
            (e.cpu_down(0), e.cpu_down(1), e.cpu_down(0), e.cpu_down(5))
        })
        .join_timeout(LIMIT)
        .unwrap();
    let refused = |reason| Err(Error::Hotplug { cpu: 0, reason });
    assert_eq!(r.0, refused(HotplugReason::CallingCpu), "self");
    assert_eq!(r.1, Ok(()));
    assert_eq!(r.2, refused(HotplugReason::LastOnline), "last online");
    assert_eq!(r.3, Err(Error::UnknownCpu(5)));
    assert_eq!(m.cpu_down(0), refused(HotplugReason::LastOnline));
    m.cpu_up(1).unwrap();
    assert!(m.engine().is_online(1));
    m.shutdown().unwrap();

    let one = machine(1, IdlePolicy::Sleep);
    assert_eq!(one.cpu_down(0), refused(HotplugReason::LastOnline));
    one.shutdown().unwrap();
}

#[test]
fn offline_cpu_refuses_calls_is_pruned_and_comes_back() {
    let m = machine(3, IdlePolicy::Sleep);
    m.cpu_down(2).unwrap();
    assert!(!m.engine().is_online(2));
    assert_eq!(m.run_on(2, |_| ()).join(), Err(Error::Offline(2)));
    let (single, single_async, many) = m
        .run_on(0, |e| {
            (
                e.call_single(2, |_| ()),
                e.call_single_async(2, |_| ()),
                e.call_all(|_| ()),
            )
        })
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(single, Err(Error::Offline(2)));
    assert_eq!(single_async, Err(Error::Offline(2)));
    assert_eq!(
        many,
        Ok([0, 1].into_iter().collect::<CpuMask>()),
        "offline CPU pruned"
    );
    m.cpu_up(2).unwrap();
    let back = m
        .run_on(0, |e| e.call_single(2, |cpu| cpu))
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(back, Ok(2));
    let h = m.engine().hotplug_stats();
    assert_eq!((h.downs, h.ups), (1, 1));
    assert_eq!(m.engine().total_stats().offline_runs, 0);
    m.shutdown().unwrap();
}

#[test]
fn calls_queued_while_online_run_before_the_cpu_leaves() {
    let m = machine(3, IdlePolicy::Sleep);
    let held = common::MaskedCpu::hold(&m, 2);
    let ran_online = Arc::new(AtomicUsize::new(0));
    let ro = Arc::clone(&ran_online);
    // CPU 1 queues a call (it can't run yet), then CPU 0 takes CPU 2 down.
    m.run_on(1, move |e| {
        let e_ptr = e as *const smpcall::hosted::HostEngine as usize;
        e.call_single_async(2, move |cpu| {
            // SAFETY: the engine outlives the machine's calls.
            let e = unsafe { &*(e_ptr as *const smpcall::hosted::HostEngine) };
            if e.is_online(cpu) {
                ro.fetch_add(1, Ordering::SeqCst);
            }
        })
    })
    .join_timeout(LIMIT)
    .unwrap()
    .unwrap();
    let mut down = m.run_on(0, |e| e.cpu_down(2));
    // cpu_down waits for CPU 2 to join stop_machine; let it.
    std::thread::sleep(std::time::Duration::from_millis(20));
    held.release();
    down.join_timeout(LIMIT).unwrap().unwrap();
    assert_eq!(
        ran_online.load(Ordering::SeqCst),
        1,
        "the queued call ran while CPU 2 was online"
    );
    assert_eq!(m.engine().stats(2).unwrap().offline_runs, 0);
    m.shutdown().unwrap();
}

/// Seed 003 under load: CPU 3 goes down and up again and again while CPUs 1 and 2 hammer it
/// with every kind of call. Every call is either run exactly once or refused with
/// `Offline(3)`; nothing reaches CPU 3 while it is offline; nothing hangs.
#[test]
fn hotplug_cycling_under_call_load_keeps_exactly_once() {
    const CALLS: usize = 50_000;
    let m = machine(
        4,
        IdlePolicy::PollThenSleep(std::time::Duration::from_micros(20)),
    );
    let stop = Arc::new(AtomicBool::new(false));
    // ran[sender][i]: how many times call i of sender ran (must end 0 or 1 and match).
    let ran: Arc<Vec<Vec<AtomicU64>>> = Arc::new(
        (0..3)
            .map(|_| (0..CALLS).map(|_| AtomicU64::new(0)).collect())
            .collect(),
    );
    let hammer = |sender: usize| {
        let ran = Arc::clone(&ran);
        let stop = Arc::clone(&stop);
        m.run_on(sender, move |e| {
            let mut accepted = vec![false; CALLS];
            let mut refused = 0usize;
            let mut unexpected = Vec::new();
            for (i, acc) in accepted.iter_mut().enumerate() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let r = Arc::clone(&ran);
                let res = match i % 4 {
                    0 => e.call_single(3, |_| {
                        r[sender][i].fetch_add(1, Ordering::SeqCst);
                    }),
                    1 => e.call_single_async(3, move |_| {
                        r[sender][i].fetch_add(1, Ordering::SeqCst);
                    }),
                    2 => e
                        .call_many(&CpuMask::single(3), |_| {
                            r[sender][i].fetch_add(1, Ordering::SeqCst);
                        })
                        .and_then(|m| {
                            if m.test(3) {
                                Ok(())
                            } else {
                                Err(Error::Offline(3))
                            }
                        }),
                    _ => e
                        .call_many_async(&CpuMask::single(3), move |_| {
                            r[sender][i].fetch_add(1, Ordering::SeqCst);
                        })
                        .and_then(|m| {
                            if m.test(3) {
                                Ok(())
                            } else {
                                Err(Error::Offline(3))
                            }
                        }),
                };
                match res {
                    Ok(()) => *acc = true,
                    Err(Error::Offline(3)) => {
                        refused += 1;
                        // Don't burn the call budget while CPU 3 is down.
                        smpcall::hosted::sleep(std::time::Duration::from_micros(20));
                    }
                    Err(other) => unexpected.push(other),
                }
            }
            (accepted, refused, unexpected)
        })
    };
    let mut h1 = hammer(1);
    let mut h2 = hammer(2);
    let s2 = Arc::clone(&stop);
    let mut cycler = m.run_on(0, move |e| {
        let pause = std::time::Duration::from_micros(500);
        let mut cycles = 0;
        while cycles < 200 {
            common::cpu_down_retry(e, 3).expect("cpu_down");
            smpcall::hosted::sleep(pause);
            e.cpu_up(3).expect("cpu_up");
            smpcall::hosted::sleep(pause);
            cycles += 1;
        }
        s2.store(true, Ordering::SeqCst);
        cycles
    });
    let (acc1, ref1, un1) = h1.join_timeout(LIMIT * 3).expect("hammer 1 finished");
    let (acc2, ref2, un2) = h2.join_timeout(LIMIT * 3).expect("hammer 2 finished");
    let cycles = cycler.join_timeout(LIMIT * 3).expect("cycler finished");
    wait_until(LIMIT, "accepted calls to drain", || {
        m.engine().is_quiescent()
    });

    eprintln!(
        "hotplug cycling: {cycles} cycles, {} calls refused as offline; CPU 3: {:?}",
        ref1 + ref2,
        m.engine().stats(3).unwrap()
    );
    assert!(
        un1.is_empty() && un2.is_empty(),
        "unexpected errors: {un1:?} {un2:?}"
    );
    assert_eq!(cycles, 200);
    let accepted = acc1.iter().chain(&acc2).filter(|a| **a).count();
    assert!(
        accepted > 100,
        "calls were accepted while CPU 3 was up: {accepted}"
    );
    assert!(
        ref1 + ref2 > 10,
        "calls were refused while CPU 3 was down: {}",
        ref1 + ref2
    );
    for (sender, acc) in [(1, &acc1), (2, &acc2)] {
        for (i, &accepted) in acc.iter().enumerate() {
            let n = ran[sender][i].load(Ordering::SeqCst);
            let want = u64::from(accepted);
            assert_eq!(
                n, want,
                "sender {sender} call {i}: accepted={accepted}, ran {n} times"
            );
        }
    }
    let s = m.engine().stats(3).unwrap();
    assert_eq!(
        s.offline_runs, 0,
        "a call reached CPU 3 while offline: {s:?}"
    );
    m.shutdown().unwrap();
}

/// Senders themselves are taken down while they call: every call either ran exactly where the
/// engine said it did (the returned mask, possibly partial) or was refused with `Offline` —
/// never a panic, never a call that ran somewhere unreported.
#[test]
fn senders_taken_down_mid_call_get_offline_or_an_exact_mask() {
    const CALLS: usize = 3_000;
    let m = machine(
        4,
        IdlePolicy::PollThenSleep(std::time::Duration::from_micros(20)),
    );
    // ran[sender][i]: bitmask of CPUs call i ran on.
    let ran: Arc<Vec<Vec<AtomicU64>>> = Arc::new(
        (0..4)
            .map(|_| (0..CALLS).map(|_| AtomicU64::new(0)).collect())
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = [1usize, 2]
        .into_iter()
        .map(|sender| {
            let (ran, stop) = (Arc::clone(&ran), Arc::clone(&stop));
            m.run_on(sender, move |e| {
                let mut results: Vec<Result<u64, Error>> = Vec::new();
                for i in 0..CALLS {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let r = Arc::clone(&ran);
                    let mark = move |cpu: usize| {
                        r[sender][i].fetch_or(1 << cpu, Ordering::SeqCst);
                    };
                    let res = match i % 3 {
                        0 => e.call_single(3, &mark).map(|()| 1u64 << 3),
                        1 => e.call_all(&mark).map(|m| bits(&m)),
                        _ => e.call_all_async(mark).map(|m| bits(&m)),
                    };
                    if matches!(res, Err(Error::Offline(_))) {
                        smpcall::hosted::sleep(std::time::Duration::from_micros(50));
                    }
                    results.push(res);
                }
                results
            })
        })
        .collect();
    let s2 = Arc::clone(&stop);
    let mut cycler = m.run_on(0, move |e| {
        for round in 0..40 {
            let victim = 1 + round % 3;
            common::cpu_down_retry(e, victim).expect("cpu_down");
            smpcall::hosted::sleep(std::time::Duration::from_micros(300));
            e.cpu_up(victim).expect("cpu_up");
            smpcall::hosted::sleep(std::time::Duration::from_micros(300));
        }
        s2.store(true, Ordering::SeqCst);
    });
    cycler.join_timeout(LIMIT * 3).expect("cycler finished");
    let results: Vec<_> = senders
        .into_iter()
        .map(|mut t| {
            t.join_timeout(LIMIT * 3)
                .expect("sender finished without panicking")
        })
        .collect();
    wait_until(LIMIT, "accepted calls to drain", || {
        m.engine().is_quiescent()
    });
    let (mut ok, mut offline) = (0, 0);
    for (k, sender) in [1usize, 2].into_iter().enumerate() {
        for (i, res) in results[k].iter().enumerate() {
            let got = ran[sender][i].load(Ordering::SeqCst);
            match res {
                Ok(mask) => {
                    ok += 1;
                    assert_eq!(
                        got, *mask,
                        "sender {sender} call {i}: ran on {got:#b}, engine said {mask:#b}"
                    );
                }
                Err(Error::Offline(_)) => {
                    offline += 1;
                    assert_eq!(
                        got, 0,
                        "sender {sender} call {i} was refused but ran on {got:#b}"
                    );
                }
                Err(e) => panic!("sender {sender} call {i}: unexpected {e:?}"),
            }
        }
    }
    assert!(ok > 100 && offline > 0, "accepted {ok}, refused {offline}");
    assert_eq!(m.engine().total_stats().offline_runs, 0);
    m.shutdown().unwrap();
}

fn bits(m: &CpuMask) -> u64 {
    m.iter().fold(0, |acc, c| acc | 1 << c)
}

static STOP_STALL: AtomicBool = AtomicBool::new(false);

fn stop_sink(line: &str) {
    if line.contains("stop_machine stuck in stage Prepare")
        && line.contains("CPUs that have not acknowledged it: 2")
    {
        STOP_STALL.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_stuck_stop_machine_participant_is_reported_with_cpu_and_stage() {
    let m = Machine::builder()
        .cpus(3)
        .idle(IdlePolicy::Sleep)
        .stall_threshold(std::time::Duration::from_millis(5))
        .atomic_sink(stop_sink)
        .build()
        .unwrap();
    let held = common::MaskedCpu::hold(&m, 2);
    let mut stop = m.run_on(0, |e| e.stop_machine(1, || 7));
    wait_until(LIMIT, "the stuck participant to be reported", || {
        STOP_STALL.load(Ordering::SeqCst)
    });
    assert!(m.engine().hotplug_stats().stalls_reported >= 1);
    held.release();
    assert_eq!(
        stop.join_timeout(LIMIT).unwrap(),
        Ok(7),
        "completes once CPU 2 joins"
    );
    m.shutdown().unwrap();
}
