//! The edges of the safe API (issue 10): where user functions run, bounded nesting, errors
//! that mean nothing happened, hotplug without task slots, small promises of the hosted API.
//! Each test fails on the code before the fix (named in each test's comment).

mod common;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{in_child, run_child, spin_until, wait_until, BusyCpu, LIMIT};
use smpcall::hosted::{Delivery, IdlePolicy, Machine};
use smpcall::{CpuMask, DeadlockReason, Error, Platform, WaitedFor};

thread_local! {
    /// Set while this thread runs "user code" that a signal handler must not interrupt with a
    /// user function (stands for: inside `malloc`, holding a lock).
    static IN_USER_CODE: Cell<bool> = const { Cell::new(false) };
}

fn machine(cpus: usize) -> Machine {
    common::sleeping_machine(cpus)
}

/// Runs `test` as a child process that must die by SIGABRT, saying `message`.
fn child_must_abort(test: &str, message: &str) {
    use std::os::unix::process::ExitStatusExt;
    let (status, text) = run_child(test);
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "the child was not aborted: {status:?}\n{text}"
    );
    assert!(text.contains(message), "{text}");
}

/// Two CPUs with one no-wait call-data slot per sender and target: a slot left claimed
/// shows as a wait that never ends.
fn one_slot_machine() -> Machine {
    Machine::builder()
        .cpus(2)
        .no_wait_slots(1)
        .idle(IdlePolicy::Sleep)
        .build()
        .unwrap()
}

/// Before: the signal handler ran the function at once, inside the busy task's code.
#[test]
fn user_functions_never_run_inside_a_signal_handler_that_interrupted_user_code() {
    let m = machine(2);
    let busy = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let (b2, r2) = (Arc::clone(&busy), Arc::clone(&release));
    let mut worker = m.run_on(1, move |_| {
        IN_USER_CODE.with(|f| f.set(true));
        b2.store(true, Ordering::SeqCst);
        spin_until(LIMIT, "the test to end the busy loop", || {
            r2.load(Ordering::SeqCst)
        });
        IN_USER_CODE.with(|f| f.set(false));
        smpcall::hosted::safe_point()
    });
    wait_until(LIMIT, "CPU 1 to be busy", || busy.load(Ordering::SeqCst));
    let interrupted = Arc::new(AtomicUsize::new(0));
    let ran = Arc::new(AtomicUsize::new(0));
    let (i2, ran2) = (Arc::clone(&interrupted), Arc::clone(&ran));
    let signals_before = m.platform().signals_sent();
    m.run_on(0, move |e| {
        e.call_single_async(1, move |_| {
            if IN_USER_CODE.with(Cell::get) {
                i2.fetch_add(1, Ordering::SeqCst);
            }
            ran2.fetch_add(1, Ordering::SeqCst);
        })
    })
    .join_timeout(LIMIT)
    .unwrap()
    .unwrap();
    // The signal went out and was handled: the call is deferred, not lost.
    wait_until(LIMIT, "the IPI to be handled and the call deferred", || {
        m.engine().deferred_calls(1) == 1
    });
    assert!(m.platform().signals_sent() > signals_before);
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "not run inside the busy code"
    );
    release.store(true, Ordering::SeqCst);
    assert_eq!(
        worker.join_timeout(LIMIT).unwrap(),
        1,
        "the safe point ran it"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert_eq!(interrupted.load(Ordering::SeqCst), 0);
    assert_eq!(m.engine().deferred_calls(1), 0);
    m.shutdown().unwrap();
}

/// The engine's own work still runs in the handler: a grace period does not wait for a busy
/// CPU's safe point (it would, if RCU's check were deferred like a user call).
#[test]
fn a_grace_period_completes_while_a_cpu_is_busy_outside_safe_points() {
    let m = machine(3);
    let busy = BusyCpu::hold(&m, 2);
    let gps = m
        .run_on(0, |e| {
            for _ in 0..20 {
                e.synchronize_rcu_expedited()?;
            }
            Ok::<_, Error>(e.rcu_stats().grace_periods)
        })
        .join_timeout(LIMIT)
        .unwrap()
        .unwrap();
    assert_eq!(gps, 20);
    busy.release();
    m.shutdown().unwrap();
}

static LOWEST: AtomicUsize = AtomicUsize::new(usize::MAX);
static HIGHEST: AtomicUsize = AtomicUsize::new(0);

/// Before: each busy-slot wait served the queue one flush deeper, without bound, until the CPU
/// thread overflowed its stack (SIGSEGV) — the whole test process died.
#[test]
fn unbounded_handler_nesting_is_refused_instead_of_overflowing_the_stack() {
    // 20 000 by default; `SMPCALL_NESTING_CALLS=1000000` (CI, release) for the million.
    let calls: usize = std::env::var("SMPCALL_NESTING_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    // A million calls take tens of seconds on a loaded 2-core machine.
    let limit = if calls > 20_000 { LIMIT * 9 } else { LIMIT };
    let m = machine(3);
    let held = common::MaskedCpu::hold_for(&m, 1, limit);
    let ok = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let other = Arc::new(AtomicUsize::new(0));
    let on_cpu1 = Arc::new(AtomicUsize::new(0));
    let (ok2, ref2, oth2, c1) = (
        Arc::clone(&ok),
        Arc::clone(&refused),
        Arc::clone(&other),
        Arc::clone(&on_cpu1),
    );
    let mut sender = m.run_on(2, move |e| {
        for _ in 0..calls {
            let (ok, refused, other, c1) = (
                Arc::clone(&ok2),
                Arc::clone(&ref2),
                Arc::clone(&oth2),
                Arc::clone(&c1),
            );
            // Runs on CPU 0; its own no-wait call to the masked CPU 1 finds the slot busy.
            e.call_single_async(0, move |_| {
                // Where this function's frame is: the spread over all runs is the stack the
                // nesting takes (the first run is at depth 1, the deepest at the limit).
                let here = 0u8;
                let addr = std::hint::black_box(&here) as *const u8 as usize;
                LOWEST.fetch_min(addr, Ordering::Relaxed);
                HIGHEST.fetch_max(addr, Ordering::Relaxed);
                let r = smpcall::hosted::with_engine(|e| {
                    e.call_single_async(1, move |_| {
                        c1.fetch_add(1, Ordering::SeqCst);
                    })
                })
                .expect("on a CPU");
                match r {
                    Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(Error::WouldDeadlock(DeadlockReason::NestingLimit)) => {
                        refused.fetch_add(1, Ordering::SeqCst)
                    }
                    Err(_) => other.fetch_add(1, Ordering::SeqCst),
                };
            })
            .unwrap();
        }
    });
    sender.join_timeout(limit).expect("every call was sent");
    let done = || {
        ok.load(Ordering::SeqCst) + refused.load(Ordering::SeqCst) + other.load(Ordering::SeqCst)
    };
    // The functions still waiting for the slot to CPU 1 (one per nesting level but the last)
    // finish once CPU 1 unmasks.
    wait_until(limit, "all but the nested waiters to have run", || {
        done() >= calls - 8
    });
    held.release();
    wait_until(LIMIT, "every call to CPU 0 to have run", || done() == calls);
    let accepted = ok.load(Ordering::SeqCst);
    wait_until(LIMIT, "every accepted call to CPU 1 to run", || {
        on_cpu1.load(Ordering::SeqCst) == accepted
    });
    assert_eq!(other.load(Ordering::SeqCst), 0);
    assert!(refused.load(Ordering::SeqCst) > 0, "the limit was reached");
    let spread = HIGHEST.load(Ordering::Relaxed) - LOWEST.load(Ordering::Relaxed);
    let levels = smpcall::hosted::HostPlatform::MAX_CALL_NESTING as usize - 1;
    eprintln!(
        "nesting: {spread} bytes of stack between depth 1 and depth {} ({} bytes per level)",
        levels + 1,
        spread / levels
    );
    // The hosted CPU threads have 2 MiB stacks: the bounded nesting stays far below.
    assert!(spread < 1 << 20, "{spread} bytes");
    assert!(accepted > 0, "the first call got through");
    m.shutdown().unwrap();
}

/// Before: `Machine::cpu_down` queued a task behind the CPU's long task, returned
/// `TimedOut` — and the CPU went down later anyway.
#[test]
fn machine_cpu_down_needs_no_task_slot_and_an_error_means_nothing_happened() {
    let m = Machine::builder()
        .cpus(4)
        .idle(IdlePolicy::Sleep)
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let release = Arc::new(AtomicBool::new(false));
    let busy = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = [0, 1, 3]
        .into_iter()
        .map(|cpu| {
            let (r, b) = (Arc::clone(&release), Arc::clone(&busy));
            m.run_on(cpu, move |_| {
                b.fetch_add(1, Ordering::SeqCst);
                spin_until(LIMIT, "the test to end the long tasks", || {
                    r.load(Ordering::SeqCst)
                })
            })
        })
        .collect();
    wait_until(LIMIT, "CPUs 0, 1, 3 to be busy", || {
        busy.load(Ordering::SeqCst) == 3
    });
    // CPUs 0, 1, 3 busy in long tasks: no task slot there, and none is needed — the calling
    // thread drives the hotplug. Nothing queued to CPU 2: it goes down at once.
    assert_eq!(m.cpu_down(2), Ok(()));
    assert!(!m.engine().is_online(2));
    // A call queued to busy CPU 3 cannot run before it would leave: refused after the
    // timeout, and CPU 3 stays online — also later.
    let ran = Arc::new(AtomicUsize::new(0));
    let r2 = Arc::clone(&ran);
    // CPU 2 comes back (idle: no long task) and sends the call.
    assert_eq!(m.cpu_up(2), Ok(()));
    let mut sender = m.run_on(2, move |e| {
        e.call_single_async(3, move |_| {
            r2.fetch_add(1, Ordering::SeqCst);
        })
    });
    sender.join_timeout(LIMIT).unwrap().unwrap();
    wait_until(LIMIT, "the call to be deferred on CPU 3", || {
        m.engine().deferred_calls(3) == 1
    });
    assert_eq!(
        m.cpu_down(3),
        Err(Error::TimedOut {
            what: WaitedFor::SafePoint { cpu: 3 },
            limit: Duration::from_millis(300),
        })
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(m.engine().is_online(3) && m.engine().is_accepting(3));
    release.store(true, Ordering::SeqCst);
    for mut t in tasks {
        t.join_timeout(LIMIT).unwrap();
    }
    wait_until(LIMIT, "the deferred call to run", || {
        ran.load(Ordering::SeqCst) == 1
    });
    assert!(
        m.engine().is_online(3),
        "the failed cpu_down did not happen later"
    );
    m.shutdown().unwrap();
}

/// Before: the CPU picked to drive `cpu_down(0)` could be CPU 1, going down concurrently:
/// up to 94 of 100 rounds failed with `Offline(1)`.
#[test]
fn concurrent_cpu_downs_from_other_threads_both_succeed() {
    let m = Arc::new(machine(4));
    for round in 0..30 {
        let (a, b) = (Arc::clone(&m), Arc::clone(&m));
        let t0 = std::thread::spawn(move || a.cpu_down(0));
        let t1 = std::thread::spawn(move || b.cpu_down(1));
        assert_eq!(t0.join().unwrap(), Ok(()), "round {round}");
        assert_eq!(t1.join().unwrap(), Ok(()), "round {round}");
        m.cpu_up(0).unwrap();
        m.cpu_up(1).unwrap();
    }
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}

/// Before: `Delivery::SafePoint` promised no signal, but a stall report sent the NMI signal.
#[test]
fn safe_point_delivery_sends_no_signal_even_for_a_stall_report() {
    let m = Machine::builder()
        .cpus(2)
        .idle(IdlePolicy::Sleep)
        .delivery(Delivery::SafePoint)
        .stall_threshold(Duration::from_millis(5))
        .build()
        .unwrap();
    let release = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let (r2, s2) = (Arc::clone(&release), Arc::clone(&started));
    let mut busy = m.run_on(1, move |_| {
        s2.store(true, Ordering::SeqCst);
        spin_until(LIMIT, "the stall to be reported", || {
            r2.load(Ordering::SeqCst)
        });
        smpcall::hosted::safe_point()
    });
    wait_until(LIMIT, "CPU 1 to be busy", || started.load(Ordering::SeqCst));
    let mut waiter = m.run_on(0, |e| e.call_single(1, |cpu| cpu));
    wait_until(LIMIT, "a stall report", || {
        m.engine().diag_stats().stall_reports > 0
    });
    release.store(true, Ordering::SeqCst);
    assert_eq!(waiter.join_timeout(LIMIT).unwrap(), Ok(1));
    busy.join_timeout(LIMIT).unwrap();
    assert_eq!(m.engine().nmis_received(1), 0, "no NMI signal");
    assert_eq!(m.platform().signals_sent(), 0, "no IPI signal");
    m.shutdown().unwrap();
}

/// Before: a timed-out join consumed the task; it could not be joined again.
#[test]
fn a_timed_out_join_can_be_retried() {
    let m = machine(2);
    let mut t = m.run_on(1, |_| {
        smpcall::hosted::sleep(Duration::from_millis(100));
        7
    });
    assert_eq!(
        t.join_timeout(Duration::from_millis(1)),
        Err(Error::TimedOut {
            what: WaitedFor::Task { cpu: 1 },
            limit: Duration::from_millis(1),
        })
    );
    assert_eq!(t.join_timeout(LIMIT), Ok(7));
    assert_eq!(
        t.join_timeout(LIMIT),
        Err(Error::AlreadyJoined),
        "joined once only"
    );
    m.shutdown().unwrap();
}

/// Before: `sleep(Duration::MAX)` overflowed its deadline and returned after ~136 µs.
#[test]
fn sleep_for_duration_max_does_not_return_early() {
    let done = Arc::new(AtomicBool::new(false));
    let d2 = Arc::clone(&done);
    // A detached thread: it sleeps for as long as the test process lives.
    std::thread::spawn(move || {
        smpcall::hosted::sleep(Duration::MAX);
        d2.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(!done.load(Ordering::SeqCst));
}

/// Before: an idle machine took 220–250 ms to shut down (the watchdog slept 250 ms).
#[test]
fn an_idle_machine_shuts_down_promptly() {
    let m = machine(2);
    std::thread::sleep(Duration::from_millis(20));
    let start = Instant::now();
    m.shutdown().unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_millis(150), "shutdown took {took:?}");
}

/// Before: the sink was a bare `fn(&str)`; a closure could not capture where to count.
#[test]
fn the_report_sink_can_capture_state() {
    let lines = Arc::new(AtomicU64::new(0));
    let l2 = Arc::clone(&lines);
    // SAFETY: the sink only increments an atomic: async-signal-safe.
    let builder = unsafe {
        Machine::builder()
            .cpus(2)
            .idle(IdlePolicy::Sleep)
            .report_sink(move |_| {
                l2.fetch_add(1, Ordering::SeqCst);
            })
    };
    let m = builder.build().unwrap();
    m.engine().dump_to_report();
    assert!(lines.load(Ordering::SeqCst) > 0);
    m.shutdown().unwrap();
}

/// Before: unknown CPUs in a many-call's mask were silently dropped.
#[test]
fn a_many_call_naming_an_unknown_cpu_is_refused() {
    let m = machine(2);
    let r = m
        .run_on(0, |e| {
            let mask: CpuMask = [1, 5].into_iter().collect();
            (e.call_many(&mask, |_| ()), e.call_many_async(&mask, |_| ()))
        })
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(r, (Err(Error::UnknownCpu(5)), Err(Error::UnknownCpu(5))));
    m.shutdown().unwrap();
}

/// Before: a shutdown that timed out leaked its threads, with no way to retry.
#[test]
fn a_timed_out_shutdown_can_be_retried() {
    let mut m = machine(2);
    let busy = BusyCpu::hold(&m, 1);
    assert_eq!(
        m.try_shutdown(Duration::from_millis(20)),
        Err(Error::TimedOut {
            what: WaitedFor::Shutdown,
            limit: Duration::from_millis(20),
        })
    );
    // Still whole: refusing calls, its task still running; retry once the task can end.
    assert!(m.engine().is_shutdown());
    busy.let_go();
    assert_eq!(m.try_shutdown(LIMIT), Ok(()));
    assert_eq!(m.try_shutdown(LIMIT), Ok(()), "idempotent");
}

/// Found by review: a reader kept in a thread-local past its task, on a CPU that then went
/// idle, was skipped by grace periods (the CPU looked idle).
#[test]
fn a_grace_period_waits_for_a_reader_kept_on_an_idle_cpu() {
    use std::cell::RefCell;
    type Guard =
        smpcall::RcuReadGuard<'static, smpcall::hosted::HostPlatform, smpcall::HeapStorage>;
    thread_local! {
        static KEPT: RefCell<Option<Guard>> = const { RefCell::new(None) };
    }
    let m: &'static Machine = Box::leak(Box::new(machine(2)));
    m.run_on(0, move |_| {
        let g = m.engine().rcu_read_lock().unwrap();
        KEPT.with(|k| *k.borrow_mut() = Some(g));
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(20)); // CPU 0 idles with the reader open
    let mut gp = m.run_on(1, |e| e.synchronize_rcu_expedited());
    assert_eq!(
        gp.join_timeout(Duration::from_millis(200)),
        Err(Error::TimedOut {
            what: WaitedFor::Task { cpu: 1 },
            limit: Duration::from_millis(200),
        }),
        "the grace period waits for the reader"
    );
    m.run_on(0, |_| drop(KEPT.with(|k| k.borrow_mut().take())))
        .join()
        .unwrap();
    assert_eq!(gp.join_timeout(LIMIT), Ok(Ok(())));
}

/// Found by review: `Duration::MAX` as a timeout overflowed an `Instant` and panicked.
#[test]
fn duration_max_timeouts_mean_no_deadline() {
    let mut m = Machine::builder()
        .cpus(2)
        .idle(IdlePolicy::Sleep)
        .timeout(Duration::MAX)
        .stall_threshold(Duration::MAX)
        .build()
        .unwrap();
    assert_eq!(m.engine().call_single(1, |c| c), Ok(1));
    m.cpu_down(1).unwrap();
    m.cpu_up(1).unwrap();
    assert_eq!(m.try_shutdown(Duration::MAX), Ok(()));
}

/// Second review: a waiting many-call waited on its slot after its function had run there; a
/// no-wait call that a handler nested in the wait sent to the same target took that slot, so
/// the many-call waited for it — forever, with that target busy outside safe points.
#[test]
fn a_waiting_many_call_does_not_wait_for_a_no_wait_call_that_reused_its_slot() {
    let m: &'static Machine = Box::leak(Box::new(machine(3)));
    let f_ran_on_2 = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let (f2, d2) = (Arc::clone(&f_ran_on_2), Arc::clone(&done));
    // CPU 2: serves at safe points until the many-call's function ran there, then spins
    // without any (bounded).
    let mut busy = m.run_on(2, move |_| {
        spin_until(LIMIT, "the many-call's function on CPU 2", || {
            smpcall::hosted::safe_point();
            f2.load(Ordering::SeqCst)
        });
        spin_until(LIMIT, "the many-call to return", || {
            d2.load(Ordering::SeqCst)
        });
    });
    let f_ran = Arc::clone(&f_ran_on_2);
    let mut caller = m.run_on(0, move |e| {
        let t = Instant::now();
        let r = e.call_many(&[1, 2].into_iter().collect(), |cpu| {
            if cpu == 2 {
                f_ran.store(true, Ordering::SeqCst);
            } else {
                std::thread::sleep(Duration::from_millis(100)); // CPU 1 takes a while
            }
        });
        (r, t.elapsed())
    });
    wait_until(LIMIT, "the function to run on CPU 2", || {
        f_ran_on_2.load(Ordering::SeqCst)
    });
    // A call to CPU 0, served inside its wait, that sends CPU 2 a no-wait call.
    m.engine()
        .call_single_async(0, |_| {
            smpcall::hosted::with_engine(|e| e.call_single_async(2, |_| ()))
                .unwrap()
                .unwrap();
        })
        .unwrap();
    let (r, took) = caller.join_timeout(LIMIT).unwrap();
    done.store(true, Ordering::SeqCst);
    busy.join_timeout(LIMIT).unwrap();
    assert_eq!(r.unwrap().weight(), 2);
    assert!(took < Duration::from_secs(5), "returned after {took:?}");
}

/// Second review: a foreign many-call that found a slot busy waited before signalling the
/// targets it had already queued to.
#[test]
fn a_foreign_many_call_signals_what_it_queued_before_waiting() {
    let m = Machine::builder()
        .cpus(3)
        .idle(IdlePolicy::Sleep)
        .foreign_senders(1)
        .no_wait_slots(1)
        .stall_threshold(Duration::ZERO) // no watchdog re-send to rescue it
        .build()
        .unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let (fl, st) = (Arc::clone(&flag), Arc::clone(&started));
    // CPU 2 spins (no safe point) until a call on CPU 1 sets the flag.
    let mut busy = m.run_on(2, move |_| {
        st.store(true, Ordering::SeqCst);
        spin_until(LIMIT, "the flag from CPU 1", || fl.load(Ordering::SeqCst));
    });
    wait_until(LIMIT, "CPU 2 to be busy", || started.load(Ordering::SeqCst));
    let e = m.engine();
    e.call_single_async(2, |_| ()).unwrap(); // holds the foreign row's slot to CPU 2
    let fl = Arc::clone(&flag);
    let t = Instant::now();
    e.call_many_async(&[1, 2].into_iter().collect(), move |cpu| {
        if cpu == 1 {
            fl.store(true, Ordering::SeqCst);
        }
    })
    .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    busy.join_timeout(LIMIT).unwrap();
    m.shutdown().unwrap();
}

/// A `Clone` that panics while a no-wait many-call fills its call data gives the call data
/// back. Before: the slot stayed claimed for ever, and the next call to that CPU through it
/// (one slot per sender and target here) waited for ever.
#[test]
fn a_panicking_clone_does_not_leave_call_data_claimed() {
    struct PanicOnClone(Arc<AtomicBool>);
    impl Clone for PanicOnClone {
        fn clone(&self) -> Self {
            if self.0.swap(false, Ordering::SeqCst) {
                panic!("clone refused (test)");
            }
            PanicOnClone(Arc::clone(&self.0))
        }
    }
    let m = one_slot_machine();
    let ran = Arc::new(AtomicUsize::new(0));
    let ran2 = Arc::clone(&ran);
    let mut task = m.run_on(0, move |e| {
        let arm = Arc::new(AtomicBool::new(true));
        let f = PanicOnClone(Arc::clone(&arm));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            e.call_many_async(&CpuMask::single(1), move |_| {
                let _ = &f;
            })
        }))
        .is_err();
        for _ in 0..3 {
            let ran3 = Arc::clone(&ran2);
            e.call_single_async(1, move |_| {
                ran3.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        }
        panicked
    });
    let panicked = task
        .join_timeout(LIMIT)
        .expect("calls after the panic to complete (the call data was left claimed)");
    assert!(panicked, "the clone panicked");
    wait_until(LIMIT, "the three calls after the panic to run", || {
        ran.load(Ordering::SeqCst) == 3
    });
    m.shutdown().unwrap();
}

/// A panic in a function run on the calling CPU itself (a call to oneself runs at once, like a
/// call to another CPU runs in its handler) aborts the process, as a panic in a remote call
/// does: unwinding out of a call would abandon call data and masked regions. Checked in a child
/// process (this test binary re-run with `SMPCALL_TEST_CHILD` set), which must die by SIGABRT.
#[test]
fn a_panic_in_a_call_to_the_calling_cpu_aborts_the_process() {
    const TEST: &str = "a_panic_in_a_call_to_the_calling_cpu_aborts_the_process";
    if in_child() {
        let m = machine(2);
        let mut task = m.run_on(0, |e| e.call_single(0, |_| -> () { panic!("boom (test)") }));
        let _ = task.join_timeout(LIMIT);
        // Reaching here means the panic did not abort.
        std::process::exit(3);
    }
    child_must_abort(TEST, "boom (test)");
}

/// A build that fails after it spawned its CPU threads (here: they cannot all start within a
/// 1 ns timeout) joins them and puts back the signal dispositions it installed: nothing is
/// left behind. In a child process (this binary re-run), so that no other test's machine
/// counts.
#[test]
fn a_build_failing_after_spawning_its_threads_leaves_nothing_behind() {
    const TEST: &str = "a_build_failing_after_spawning_its_threads_leaves_nothing_behind";
    if in_child() {
        let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
        let ours = || {
            // SAFETY: querying a disposition writes only into our zeroed struct.
            (libc::SIGRTMIN()..=libc::SIGRTMAX()).any(|s| unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(s, std::ptr::null(), &mut old) == 0
                    && old.sa_sigaction != libc::SIG_DFL
            })
        };
        let before = threads();
        assert!(!ours(), "a real-time signal has a handler before the build");
        // Whether its threads start within 1 ns of being spawned is a race the build usually
        // loses; when it wins, the machine is shut down and the build tried again.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Machine::builder()
                .cpus(64)
                .timeout(Duration::from_nanos(1))
                .build()
            {
                Err(Error::TimedOut {
                    what: WaitedFor::CpuThreadStart { .. },
                    limit,
                }) => {
                    assert_eq!(limit, Duration::from_nanos(1));
                    break;
                }
                Err(e) => panic!("unexpected error {e}"),
                Ok(m) if attempts < 1000 => {
                    // Its shutdown gets 1 ns too: it may give up on the threads.
                    let mut m = m;
                    m.try_shutdown(LIMIT).unwrap();
                }
                Ok(_) => {
                    println!("child: not provoked in {attempts} builds");
                    return;
                }
            }
        }
        let deadline = Instant::now() + LIMIT;
        while threads() != before {
            if Instant::now() > deadline {
                let names: Vec<String> = std::fs::read_dir("/proc/self/task")
                    .unwrap()
                    .map(|t| {
                        std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap_or_default()
                    })
                    .collect();
                panic!("threads left after the failed build ({before} before): {names:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // (A machine that was built keeps its handlers: check only when the first build
        // failed.)
        assert!(
            attempts > 1 || !ours(),
            "the failed build left a signal handler installed"
        );
        println!("child: nothing left behind (build {attempts} failed)");
        return;
    }
    let (status, text) = run_child(TEST);
    assert!(status.success(), "{status:?}\n{text}");
    if text.contains("child: not provoked") {
        eprintln!("skipped: every build of the child won the start race");
        return;
    }
    assert!(text.contains("child: nothing left behind"), "{text}");
}

/// A `Clone` of a no-wait many-call's function that itself calls the same CPU (one slot per
/// sender and target, so through the same slot) completes. Before: the clone ran while the
/// many-call held that slot claimed, and the inner call waited for it for ever.
#[test]
fn a_clone_that_calls_the_same_cpu_does_not_wait_for_its_callers_slot() {
    struct CallingClone(Arc<AtomicUsize>);
    impl Clone for CallingClone {
        fn clone(&self) -> Self {
            let ran = Arc::clone(&self.0);
            smpcall::hosted::with_engine(|e| {
                e.call_single_async(1, move |_| {
                    ran.fetch_add(1, Ordering::SeqCst);
                })
            })
            .expect("cloned on a CPU")
            .unwrap();
            CallingClone(Arc::clone(&self.0))
        }
    }
    let m = one_slot_machine();
    let ran = Arc::new(AtomicUsize::new(0));
    let f = CallingClone(Arc::clone(&ran));
    let ran2 = Arc::clone(&ran);
    m.run_on(0, move |e| {
        e.call_many_async(&CpuMask::single(1), move |_| {
            let _ = &f;
            ran2.fetch_add(1, Ordering::SeqCst);
        })
    })
    .join_timeout(LIMIT)
    .expect("the many-call to return (its clone's call waited for the caller's slot)")
    .unwrap();
    wait_until(LIMIT, "both calls to run", || {
        ran.load(Ordering::SeqCst) == 2
    });
    m.shutdown().unwrap();
}

thread_local! {
    /// A guard kept past the code that made it (test of `IrqGuard`'s order check).
    static STASHED_GUARD: std::cell::RefCell<Option<smpcall::IrqGuard<'static, smpcall::hosted::HostPlatform>>> =
        const { std::cell::RefCell::new(None) };
}

/// An `IrqGuard` made in a task and dropped inside a call handler (it was kept in a
/// thread-local) would unmask the queue flush running that handler, whose list edits the mask
/// protects. Its drop panics instead, and inside a handler that aborts the process. Before:
/// the drop unmasked the flush, and a signal in the rest of it could corrupt the CPU's lists
/// (found by review; a probe overflowed the stack through the nested flushes). In a child
/// process, which must die by SIGABRT naming the guard.
#[test]
fn an_irq_guard_dropped_inside_a_handler_it_did_not_enclose_aborts() {
    const TEST: &str = "an_irq_guard_dropped_inside_a_handler_it_did_not_enclose_aborts";
    if in_child() {
        let m: &'static Machine = Box::leak(Box::new(common::sleeping_machine(2)));
        let mut task = m.run_on(0, move |_| {
            STASHED_GUARD.with(|s| *s.borrow_mut() = Some(m.engine().irq_save()));
            m.run_on(1, |e| {
                e.call_single_async(0, |_| {
                    STASHED_GUARD.with(|s| drop(s.borrow_mut().take()));
                })
            })
            .join_timeout(LIMIT)
            .unwrap()
            .unwrap();
            // Masked (the stashed guard): the call waits for an explicit flush.
            m.engine().serve_queue();
        });
        let _ = task.join_timeout(LIMIT);
        // Reaching the end of this means the drop did not abort the process.
        std::thread::sleep(LIMIT);
        std::process::exit(3);
    }
    child_must_abort(TEST, "IrqGuard made at call-handler depth 0");
}

/// A `Clone` of a no-wait many-call's function made on a thread that is not a CPU may itself
/// make a call from that thread: the clone runs holding no foreign row. Before: it ran while
/// the many-call held the only row, and its own call waited for that row for ever.
#[test]
fn a_foreign_many_calls_clone_may_call_from_the_same_thread() {
    struct ForeignCalls(Arc<AtomicUsize>, &'static Machine);
    impl Clone for ForeignCalls {
        fn clone(&self) -> Self {
            let ran = Arc::clone(&self.0);
            self.1
                .engine()
                .call_single_async(0, move |_| {
                    ran.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            ForeignCalls(Arc::clone(&self.0), self.1)
        }
    }
    let m: &'static Machine = Box::leak(Box::new(
        Machine::builder()
            .cpus(2)
            .foreign_senders(1)
            .idle(IdlePolicy::Sleep)
            .build()
            .unwrap(),
    ));
    let ran = Arc::new(AtomicUsize::new(0));
    let f = ForeignCalls(Arc::clone(&ran), m);
    let done = Arc::new(AtomicBool::new(false));
    let done2 = Arc::clone(&done);
    // From a thread of the test's own (not a CPU), bounded by the wait below.
    std::thread::spawn(move || {
        let queued = m
            .engine()
            .call_many_async(&CpuMask::first_n(2), move |_| {
                let _ = &f;
            })
            .unwrap();
        assert_eq!(queued, CpuMask::first_n(2));
        done2.store(true, Ordering::SeqCst);
    });
    wait_until(LIMIT, "the foreign many-call to return", || {
        done.load(Ordering::SeqCst)
    });
    wait_until(LIMIT, "the clones' calls to run", || {
        ran.load(Ordering::SeqCst) == 2
    });
}

/// From a thread that is not a CPU, a no-wait many-call signals each target before it clones
/// the function for the next: a `Clone` that waits for a target already queued to is not left
/// waiting for a CPU nobody woke (the watchdog, which would re-send the IPI, is off here).
/// Before: the IPIs went out after the loop, and this waited for ever.
#[test]
fn a_foreign_many_calls_clone_may_wait_for_a_target_already_queued() {
    struct WaitsForCpu0(&'static Machine);
    impl Clone for WaitsForCpu0 {
        fn clone(&self) -> Self {
            self.0.engine().call_single(0, |_| ()).unwrap();
            WaitsForCpu0(self.0)
        }
    }
    let m: &'static Machine = Box::leak(Box::new(
        Machine::builder()
            .cpus(2)
            .idle(IdlePolicy::Sleep)
            .stall_threshold(Duration::ZERO)
            .build()
            .unwrap(),
    ));
    let f = WaitsForCpu0(m);
    let done = Arc::new(AtomicBool::new(false));
    let done2 = Arc::clone(&done);
    std::thread::spawn(move || {
        m.engine()
            .call_many_async(&CpuMask::first_n(2), move |_| {
                let _ = &f;
            })
            .unwrap();
        done2.store(true, Ordering::SeqCst);
    });
    wait_until(LIMIT, "the foreign many-call to return", || {
        done.load(Ordering::SeqCst)
    });
}

/// The same from an NMI handler: a guard made by a task and dropped by an NMI function on the
/// same CPU would unmask it from NMI context (letting user calls run inside the NMI's signal
/// handler). The drop panics, and in the NMI handler that aborts. Before: only the call-handler
/// depth was compared, and the drop unmasked. In a child process, which must die by SIGABRT.
#[test]
fn an_irq_guard_dropped_in_an_nmi_handler_aborts() {
    const TEST: &str = "an_irq_guard_dropped_in_an_nmi_handler_aborts";
    if in_child() {
        let m: &'static Machine = Box::leak(Box::new(common::sleeping_machine(2)));
        let stashed = Arc::new(AtomicBool::new(false));
        let stashed2 = Arc::clone(&stashed);
        let _spinner = m.run_on(1, move |_| {
            STASHED_GUARD.with(|s| *s.borrow_mut() = Some(m.engine().irq_save()));
            stashed2.store(true, Ordering::SeqCst);
            // Masked, spinning: only an NMI reaches this CPU now.
            let end = Instant::now() + LIMIT;
            while Instant::now() < end {
                std::hint::spin_loop();
            }
        });
        spin_until(LIMIT, "CPU 1 to keep its guard", || {
            stashed.load(Ordering::SeqCst)
        });
        let _ = m
            .run_on(0, |e| {
                common::nmi_call_many(e, &CpuMask::single(1), |_| {
                    STASHED_GUARD.with(|s| drop(s.borrow_mut().take()));
                })
            })
            .join_timeout(LIMIT);
        std::thread::sleep(LIMIT);
        std::process::exit(3);
    }
    child_must_abort(TEST, "(NMI depth 0) was dropped at depth 0 (NMI depth 1)");
}
