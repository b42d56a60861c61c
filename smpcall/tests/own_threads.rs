//! Your own threads (issue 11): any thread can attach as a CPU and leave again (through the
//! hotplug contract), and any thread can call.

mod common;

use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use common::{wait_until, LIMIT};
use smpcall::hosted::{IdlePolicy, Machine};
use smpcall::{CpuMask, Csd, Error, HotplugReason};

/// Per-call accounting shared by the flood tests: every accepted call must run exactly once,
/// on a CPU that is online when it runs.
#[derive(Default)]
struct Tally {
    accepted: AtomicU64,
    ran: AtomicU64,
    twice: AtomicU64,
    offline: AtomicU64,
}

impl Tally {
    /// One tracked call from `e` to `target` (a waiting one if `wait`). Returns `true` if it
    /// was refused as offline; any other refusal fails the test.
    fn call(self: &Arc<Self>, e: &smpcall::hosted::HostEngine, target: usize, wait: bool) -> bool {
        let once = Arc::new(AtomicBool::new(false));
        let tally = Arc::clone(self);
        let f = move |cpu: usize| {
            if once.swap(true, Ordering::SeqCst) {
                tally.twice.fetch_add(1, Ordering::SeqCst);
            }
            if !smpcall::hosted::with_engine(|e| e.is_online(cpu)).unwrap_or(false) {
                tally.offline.fetch_add(1, Ordering::SeqCst);
            }
            tally.ran.fetch_add(1, Ordering::SeqCst);
        };
        let r = if wait {
            e.call_single(target, f)
        } else {
            e.call_single_async(target, f)
        };
        match r {
            Ok(()) => {
                self.accepted.fetch_add(1, Ordering::SeqCst);
                false
            }
            Err(Error::Offline(_)) => true,
            Err(other) => panic!("unexpected refusal {other}"),
        }
    }

    /// Waits for every accepted call to run, then checks exactly-once and online runs.
    fn check(&self, refused: u64) {
        let accepted = self.accepted.load(Ordering::SeqCst);
        wait_until(LIMIT, "every accepted call to run", || {
            self.ran.load(Ordering::SeqCst) == accepted
        });
        assert_eq!(self.twice.load(Ordering::SeqCst), 0, "no call ran twice");
        assert_eq!(
            self.offline.load(Ordering::SeqCst),
            0,
            "no call ran on an offline CPU"
        );
        assert!(
            accepted > 0 && refused > 0,
            "accepted {accepted}, refused {refused}"
        );
    }
}

/// The tests of this file run one at a time: one of them counts the process's threads.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn machine(spawned: usize, slots: usize) -> Machine {
    Machine::builder()
        .cpus(spawned)
        .attach_slots(slots)
        .idle(IdlePolicy::Sleep)
        .build()
        .unwrap()
}

#[test]
fn the_main_thread_attaches_calls_and_leaves_and_its_id_is_reused() {
    let _serial = serial();
    let m = machine(2, 2);
    assert!(
        !m.engine().is_online(2) && !m.engine().is_online(3),
        "slots start offline"
    );
    let me = m.attach().unwrap();
    assert_eq!(me.cpu(), 2, "the lowest free slot");
    assert!(m.engine().is_online(2));
    assert_eq!(
        m.attach().unwrap_err(),
        Error::Busy,
        "one identity per thread"
    );
    // Calls from here, and to here (a spawned CPU calls the attached one, which serves at its
    // own wait).
    let r = me
        .engine()
        .call_single(0, |cpu| {
            smpcall::hosted::with_engine(|e| e.call_single_async(2, |_| ()))
                .unwrap()
                .map(|()| cpu)
        })
        .unwrap();
    assert_eq!(r, Ok(0));
    drop(me);
    assert!(!m.engine().is_online(2), "left: offline");
    let r = m.run_on(0, |e| e.call_single(2, |_| ())).join().unwrap();
    assert_eq!(r, Err(Error::Offline(2)), "later calls are refused");
    let again = m.attach().unwrap();
    assert_eq!(again.cpu(), 2, "the id is reused");
    drop(again);
    m.shutdown().unwrap();
}

#[test]
fn a_thread_that_is_not_a_cpu_makes_every_kind_of_call() {
    let _serial = serial();
    let m = machine(3, 0);
    let e = m.engine();
    let runs = Arc::new(AtomicU64::new(0));
    let bump = |r: &Arc<AtomicU64>| {
        let r = Arc::clone(r);
        move |_cpu: usize| {
            r.fetch_add(1, Ordering::SeqCst);
        }
    };
    assert_eq!(e.call_single(1, |cpu| cpu * 10), Ok(10));
    e.call_single_async(2, bump(&runs)).unwrap();
    let csd = pin!(Csd::new());
    e.call_async_csd(csd.as_ref(), 0, bump(&runs)).unwrap();
    let all = CpuMask::first_n(3);
    let counted = AtomicU64::new(0);
    let count = |_cpu: usize| {
        counted.fetch_add(1, Ordering::SeqCst);
    };
    assert_eq!(e.call_many(&all, count).unwrap(), all);
    assert_eq!(e.call_all(count).unwrap(), all);
    assert_eq!(
        e.call_others(count).unwrap(),
        all,
        "every CPU: the caller is none"
    );
    let odd = e.call_cond(&all, |c| c % 2 == 1, count).unwrap();
    assert_eq!(odd, CpuMask::single(1));
    assert_eq!(counted.load(Ordering::SeqCst), 3 + 3 + 3 + 1);
    assert_eq!(e.call_many_async(&all, bump(&runs)).unwrap(), all);
    assert_eq!(e.call_all_async(bump(&runs)).unwrap(), all);
    assert_eq!(e.call_others_async(bump(&runs)).unwrap(), all);
    assert_eq!(
        e.call_cond_async(&all, |c| c == 0, bump(&runs)).unwrap(),
        CpuMask::single(0)
    );
    wait_until(LIMIT, "every no-wait call to run", || {
        runs.load(Ordering::SeqCst) == 2 + 3 + 3 + 3 + 1
    });
    // Still refused: an unknown CPU, an offline one; RCU needs a CPU.
    assert_eq!(e.call_single(7, |_| ()), Err(Error::UnknownCpu(7)));
    m.cpu_down(2).unwrap();
    assert_eq!(e.call_single_async(2, |_| ()), Err(Error::Offline(2)));
    assert_eq!(
        e.call_many(&all, count).unwrap(),
        CpuMask::first_n(2),
        "offline pruned"
    );
    assert!(matches!(
        e.synchronize_rcu_expedited(),
        Err(Error::NotOnCpu)
    ));
    m.shutdown().unwrap();
}

/// Spawned CPUs flood the attach slots with calls while threads of ours attach and leave:
/// every call is accounted exactly once — run on the CPU it was sent to, or refused with
/// `Offline` — and never runs after its CPU left.
#[test]
fn attach_and_leave_under_a_flood_of_calls_keep_exactly_once() {
    let _serial = serial();
    const SENDERS: usize = 2;
    const SLOTS: usize = 2;
    const ROUNDS: usize = 60;
    let m = Arc::new(machine(SENDERS, SLOTS));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
            m.run_on(s, move |e| {
                let mut i = 0u64;
                let mut refused = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let target = SENDERS + (i as usize % SLOTS);
                    i += 1;
                    refused += u64::from(tally.call(e, target, i % 3 == 0));
                    smpcall::hosted::safe_point();
                }
                refused
            })
        })
        .collect();
    let start = Arc::new(Barrier::new(SLOTS));
    let churners: Vec<_> = (0..SLOTS)
        .map(|_| {
            let (m, start) = (Arc::clone(&m), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..ROUNDS {
                    let g = m.attach().expect("a free slot");
                    for _ in 0..50 {
                        smpcall::hosted::safe_point();
                        std::thread::yield_now();
                    }
                    drop(g);
                    std::thread::yield_now();
                }
            })
        })
        .collect();
    for c in churners {
        c.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let mut refused = 0;
    for mut s in senders {
        refused += s.join_timeout(LIMIT).unwrap();
    }
    tally.check(refused);
    assert_eq!(m.engine().total_stats().offline_runs, 0);
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}

fn threads_of_this_process() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn ipi_signal_blocked_here(signo: i32) -> bool {
    // SAFETY: querying this thread's signal mask into a zeroed set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
        libc::sigismember(&set, signo) == 1
    }
}

#[test]
fn a_thousand_attach_leave_cycles_leave_nothing_behind() {
    let _serial = serial();
    let m = machine(1, 2);
    let signo = m.platform().signal();
    let threads = threads_of_this_process();
    let t = std::thread::spawn(move || {
        for i in 0..1000 {
            let g = m.attach().unwrap();
            assert_eq!(g.cpu(), 1, "cycle {i}: the same slot every time");
            assert!(!ipi_signal_blocked_here(signo));
            let ran = g.engine().call_single(0, |cpu| cpu).unwrap();
            assert_eq!(ran, 0);
            drop(g);
            assert!(
                ipi_signal_blocked_here(signo),
                "cycle {i}: signal blocked again"
            );
            assert!(!m.engine().is_online(1));
        }
        assert_eq!(m.engine().hotplug_stats().downs, 1000);
        m.shutdown().unwrap();
    });
    t.join().unwrap();
    assert!(
        threads_of_this_process() <= threads,
        "no thread left behind"
    );
}

#[test]
fn a_thread_that_exits_or_panics_while_attached_leaves_cleanly() {
    let _serial = serial();
    let m = Arc::new(machine(1, 1));
    // Exit with the guard forgotten.
    let m2 = Arc::clone(&m);
    std::thread::spawn(move || {
        let g = m2.attach().unwrap();
        std::mem::forget(g);
    })
    .join()
    .unwrap();
    assert!(!m.engine().is_online(1), "left at thread exit");
    // Panic while attached.
    let m2 = Arc::clone(&m);
    let r = std::thread::spawn(move || {
        let _g = m2.attach().unwrap();
        panic!("the user's thread fails");
    })
    .join();
    assert!(r.is_err());
    assert!(!m.engine().is_online(1), "left while unwinding");
    // The slot is free again, and works.
    let m2 = Arc::clone(&m);
    let n = std::thread::spawn(move || {
        let g = m2.attach().unwrap();
        g.engine().call_single(0, |_| 5).unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(n, 5);
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}

#[test]
fn leaving_inside_an_rcu_reader_is_refused_and_happens_at_thread_exit() {
    let _serial = serial();
    let m = Arc::new(machine(1, 1));
    let m2 = Arc::clone(&m);
    let still_online = Arc::new(AtomicUsize::new(0));
    let s2 = Arc::clone(&still_online);
    std::thread::spawn(move || {
        let g = m2.attach().unwrap();
        let reader = m2.engine().rcu_read_lock().unwrap();
        let (g, e) = g.leave().unwrap_err();
        assert_eq!(
            e,
            Error::WouldDeadlock(smpcall::DeadlockReason::InRcuReader),
            "leaving inside a reader is refused"
        );
        drop(g); // no panic: stays attached
        if m2.engine().is_online(1) {
            s2.fetch_add(1, Ordering::SeqCst);
        }
        drop(reader);
    })
    .join()
    .unwrap();
    assert_eq!(
        still_online.load(Ordering::SeqCst),
        1,
        "the reader stayed protected"
    );
    assert!(!m.engine().is_online(1), "left at thread exit");
    let gp = m
        .run_on(0, |e| e.synchronize_rcu_expedited())
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(gp, Ok(()));
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}

#[test]
fn attach_errors_change_nothing() {
    let _serial = serial();
    let m = machine(1, 0);
    let e = m.attach().expect_err("no slot");
    assert_eq!(e, Error::NoFreeAttachSlot { slots: 0 });
    assert!(e.to_string().contains("no attach slots"), "{e}");
    let m = machine(1, 1);
    // A spawned CPU thread is a CPU already (of `m`), so it cannot attach to another machine.
    let mut inner = Machine::builder().cpus(1).attach_slots(1).build().unwrap();
    let r = m
        .run_on(0, move |_| {
            let r = inner.attach().map(|_| ());
            inner.try_shutdown(LIMIT).unwrap();
            r
        })
        .join()
        .unwrap();
    assert_eq!(
        r,
        Err(Error::Busy),
        "a CPU of another machine cannot attach"
    );
    let g = m.attach().unwrap();
    // The one slot is taken: another thread is refused, with the slot count.
    let e = std::thread::scope(|s| s.spawn(|| m.attach().err()).join().unwrap());
    assert_eq!(e, Some(Error::NoFreeAttachSlot { slots: 1 }));
    assert!(
        e.unwrap()
            .to_string()
            .contains("all 1 attach slots are taken"),
        "{e:?}"
    );
    drop(g);
    m.shutdown().unwrap();
    // After shutdown: refused, nothing attached.
    let m = machine(1, 1);
    let mut m2 = m;
    m2.try_shutdown(LIMIT).unwrap();
    assert_eq!(m2.attach().unwrap_err(), Error::ShutDown);
}

/// Threads that are not CPUs keep calling while CPUs go down and up: a call they got accepted
/// runs exactly once, on its CPU, never after that CPU went offline (the `foreign_pushers`
/// exclusion against `cpu_down`); refusals say `Offline`.
#[test]
fn calls_from_other_threads_keep_exactly_once_under_hotplug() {
    let _serial = serial();
    const SENDERS: usize = 3;
    let m = Arc::new(machine(4, 0));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let (m, stop, tally) = (Arc::clone(&m), Arc::clone(&stop), Arc::clone(&tally));
            std::thread::spawn(move || {
                let mut i = 0u64;
                let mut refused = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let target = 1 + (i as usize + s) % 3;
                    refused += u64::from(tally.call(m.engine(), target, i % 4 == 0));
                }
                refused
            })
        })
        .collect();
    for round in 0..300 {
        let victim = 1 + round % 3;
        m.cpu_down(victim).unwrap();
        std::thread::sleep(std::time::Duration::from_micros(100));
        m.cpu_up(victim).unwrap();
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    stop.store(true, Ordering::SeqCst);
    let refused: u64 = senders.into_iter().map(|t| t.join().unwrap()).sum();
    tally.check(refused);
    assert_eq!(m.engine().total_stats().offline_runs, 0);
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}

/// Found by the examples: a guard dropped after the machine shut down hung in its
/// stop_machine, waiting for the spawned CPUs whose threads had already exited.
#[test]
fn a_guard_dropped_after_shutdown_leaves_at_once() {
    let _serial = serial();
    use std::sync::mpsc::channel;
    let m = Arc::new(machine(1, 1));
    assert_eq!(m.run_on(1, |_| ()).join().err(), Some(Error::NoTaskLoop(1)));
    let (attached_tx, attached) = channel();
    let (go_tx, go) = channel::<()>();
    let (left_tx, left) = channel();
    let m2 = Arc::clone(&m);
    // Detached: if dropping the guard hung, this thread would stay stuck and the test fails
    // below instead of hanging.
    std::thread::spawn(move || {
        let g = m2.attach().unwrap();
        drop(m2);
        attached_tx.send(g.cpu()).unwrap();
        go.recv().unwrap();
        drop(g);
        left_tx.send(()).unwrap();
    });
    assert_eq!(attached.recv_timeout(LIMIT), Ok(1));
    let m = Arc::try_unwrap(m).unwrap();
    m.shutdown().unwrap();
    go_tx.send(()).unwrap();
    assert!(
        left.recv_timeout(LIMIT).is_ok(),
        "dropping the guard returned"
    );
}

/// A slot its thread left must not come back online without a thread: `cpu_up` is refused
/// (calls to it would be accepted and wait forever).
#[test]
fn cpu_up_of_a_slot_nobody_holds_is_refused() {
    let _serial = serial();
    let m = Arc::new(machine(1, 1));
    // Taken down by someone else while attached, then the thread leaves.
    let (attached_tx, attached) = std::sync::mpsc::channel();
    let (leave_tx, leave) = std::sync::mpsc::channel::<()>();
    let m2 = Arc::clone(&m);
    let holder = std::thread::spawn(move || {
        let g = m2.attach().unwrap();
        attached_tx.send(()).unwrap();
        leave.recv().unwrap();
        drop(g);
    });
    attached.recv_timeout(LIMIT).unwrap();
    m.cpu_down(1).unwrap();
    leave_tx.send(()).unwrap();
    holder.join().unwrap();
    let never_up = Err(Error::Hotplug {
        cpu: 1,
        reason: HotplugReason::NeverBroughtUp,
    });
    assert_eq!(m.cpu_up(1), never_up);
    assert_eq!(m.engine().cpu_up(1), never_up);
    // Left while online: the same.
    let g = m.attach().unwrap();
    drop(g);
    assert_eq!(m.cpu_up(1), never_up);
    assert_eq!(m.engine().call_single(1, |_| ()), Err(Error::Offline(1)));
    // The next thread to attach brings it up.
    let g = m.attach().unwrap();
    assert_eq!(g.engine().call_single(0, |c| c), Ok(0));
    drop(g);
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}

/// Found by review: a guard dropped with interrupts masked (or in a handler, or in a reader)
/// panicked; now `leave` says why and gives the guard back, and `drop` leaves at thread exit.
#[test]
fn a_guard_that_cannot_leave_says_why_and_never_panics() {
    let _serial = serial();
    let m = Arc::new(machine(1, 1));
    let m2 = Arc::clone(&m);
    std::thread::spawn(move || {
        let g = m2.attach().unwrap();
        let masked = m2.engine().irq_save();
        let (g, e) = g.leave().unwrap_err();
        assert_eq!(
            e,
            Error::WouldDeadlock(smpcall::DeadlockReason::InterruptsMasked)
        );
        assert!(m2.engine().is_online(1), "nothing happened");
        drop(g); // no panic: still attached, leaves at thread exit
        drop(masked);
        assert!(m2.engine().is_online(1));
    })
    .join()
    .unwrap();
    assert!(!m.engine().is_online(1), "left at thread exit");
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}

/// Found by review: a reader guard kept past the thread's exit (dropped by a later
/// thread-local destructor) decremented the next occupant's reader count.
#[test]
fn a_reader_dropped_after_its_thread_left_does_not_touch_the_next_occupant() {
    use std::cell::RefCell;
    let _serial = serial();
    type Guard =
        smpcall::RcuReadGuard<'static, smpcall::hosted::HostPlatform, smpcall::HeapStorage>;
    thread_local! {
        static KEPT: RefCell<Option<Guard>> = const { RefCell::new(None) };
    }
    let m: &'static Machine = Box::leak(Box::new(machine(1, 1)));
    std::thread::spawn(move || {
        // Touched first: destroyed after the attachment's clean-up.
        KEPT.with(|_| ());
        let g = m.attach().unwrap();
        std::mem::forget(g);
        let reader = m.engine().rcu_read_lock().unwrap();
        KEPT.with(|k| *k.borrow_mut() = Some(reader));
    })
    .join()
    .unwrap();
    let next = std::thread::spawn(move || {
        let g = m.attach().unwrap();
        let held = g.engine().rcu_read_held();
        drop(g);
        held
    })
    .join()
    .unwrap();
    assert!(!next, "the next occupant has no reader open");
    let gp = m
        .run_on(0, |e| e.synchronize_rcu_expedited())
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(gp, Ok(()));
}

/// Found by review: shutdown from an attached thread with a call queued to it waited for its
/// own safe point until the timeout.
#[test]
fn shutdown_from_an_attached_thread_serves_its_own_queue() {
    let _serial = serial();
    let m = Machine::builder()
        .cpus(1)
        .attach_slots(1)
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    let g = m.attach().unwrap();
    let ran = Arc::new(AtomicU64::new(0));
    let r2 = Arc::clone(&ran);
    m.run_on(0, move |e| {
        e.call_single_async(1, move |_| {
            r2.fetch_add(1, Ordering::SeqCst);
        })
    })
    .join()
    .unwrap()
    .unwrap();
    let t = std::time::Instant::now();
    m.shutdown().unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    drop(g);
}

/// Second review: a guard dropped inside `with_engine` or `quiet` (which hold a reference to
/// the engine) could let the machine be freed under them. Leaving is refused there.
#[test]
fn leaving_inside_with_engine_or_quiet_is_refused() {
    let _serial = serial();
    let m = Arc::new(machine(1, 1));
    let m2 = Arc::clone(&m);
    std::thread::spawn(move || {
        let g = m2.attach().unwrap();
        let borrowed = Error::Hotplug {
            cpu: 1,
            reason: HotplugReason::EngineBorrowed,
        };
        let g = smpcall::hosted::with_engine(move |_| {
            let (g, e) = g.leave().unwrap_err();
            assert_eq!(e, borrowed, "{e}");
            g
        })
        .unwrap();
        let g = smpcall::hosted::quiet(move || {
            let (g, e) = g.leave().unwrap_err();
            assert_eq!(e, borrowed, "{e}");
            g
        });
        assert!(m2.engine().is_online(1) && !m2.engine().is_quiet(1));
        g.leave().unwrap();
    })
    .join()
    .unwrap();
    assert!(!m.engine().is_online(1));
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}

/// Second review: a guard kept in a thread-local destroyed after the attachment's aborted the
/// process ("cannot access a Thread Local Storage value during or after destruction").
#[test]
fn a_guard_in_a_thread_local_leaves_at_exit_without_aborting() {
    use std::cell::RefCell;
    let _serial = serial();
    thread_local! {
        static G: RefCell<Option<smpcall::hosted::CpuGuard>> = const { RefCell::new(None) };
    }
    let m = Arc::new(machine(1, 1));
    let m2 = Arc::clone(&m);
    std::thread::spawn(move || {
        G.with(|g| drop(g.borrow())); // registered before the attachment: destroyed after it
        let g = m2.attach().unwrap();
        G.with(|s| *s.borrow_mut() = Some(g));
    })
    .join()
    .unwrap();
    assert!(!m.engine().is_online(1), "left at exit");
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}
