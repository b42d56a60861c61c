//! Quiet CPUs (issue 12): a CPU blocked in a quiet region gets no signal from grace periods or
//! deferrable calls; deferrable calls run at its exit, in order, exactly once; a reader that
//! went quiet is still waited for; hotplug flushes deferred calls.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{wait_until, LIMIT};
use smpcall::hosted::{quiet, IdlePolicy, Machine};
use smpcall::Error;

fn machine() -> Arc<Machine> {
    Arc::new(
        Machine::builder()
            .cpus(2)
            .attach_slots(1)
            .idle(IdlePolicy::Sleep)
            .build()
            .unwrap(),
    )
}

/// A pipe: the read end blocks in `poll` until the write end gets a byte. `poll` is never
/// restarted after a signal handler (it fails with `EINTR` even with `SA_RESTART`), so a
/// signal during the wait shows.
struct Pipe([libc::c_int; 2]);

impl Pipe {
    fn new() -> Pipe {
        let mut fds = [0; 2];
        // SAFETY: valid out array of two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        Pipe(fds)
    }
    /// Blocks until readable; returns what poll returned and its errno.
    fn wait(&self) -> (i32, i32) {
        let mut p = libc::pollfd {
            fd: self.0[0],
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the 30 s bound keeps a failing test from hanging.
        let r = unsafe { libc::poll(&mut p, 1, 30_000) };
        // SAFETY: this thread's errno.
        (r, unsafe { *libc::__errno_location() })
    }
    fn wake(&self) {
        // SAFETY: writes one byte from a live buffer to our pipe.
        assert_eq!(
            unsafe { libc::write(self.0[1], [1u8].as_ptr().cast(), 1) },
            1
        );
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // SAFETY: our own fds, closed once.
        unsafe {
            libc::close(self.0[0]);
            libc::close(self.0[1]);
        }
    }
}

/// Spawns a thread that attaches (it is CPU 2), tells `ready`, and blocks in `poll` inside a
/// quiet region; returns what `poll` returned.
fn quiet_blocker(
    m: &Arc<Machine>,
    pipe: &Arc<Pipe>,
    ready: mpsc::Sender<()>,
) -> std::thread::JoinHandle<(i32, i32)> {
    let (m, pipe) = (Arc::clone(m), Arc::clone(pipe));
    std::thread::spawn(move || {
        let g = m.attach().unwrap();
        assert_eq!(g.cpu(), 2);
        let r = quiet(|| {
            ready.send(()).unwrap();
            pipe.wait()
        });
        drop(g);
        r
    })
}

/// A machine whose CPU 2 (an attached thread) is blocked in `poll` in a quiet region.
fn blocked_in_quiet_region() -> (Arc<Machine>, Arc<Pipe>, std::thread::JoinHandle<(i32, i32)>) {
    let m = machine();
    let pipe = Arc::new(Pipe::new());
    let (tx, ready) = mpsc::channel();
    let blocker = quiet_blocker(&m, &pipe, tx);
    ready.recv_timeout(LIMIT).unwrap();
    wait_until(LIMIT, "CPU 2 to be quiet", || m.engine().is_quiet(2));
    (m, pipe, blocker)
}

#[test]
fn ten_thousand_grace_periods_never_signal_a_cpu_blocked_in_a_quiet_region() {
    let (m, pipe, blocker) = blocked_in_quiet_region();
    let before = m.platform().signals_sent_to(2);
    let gps = m
        .run_on(0, |e| {
            for _ in 0..10_000 {
                e.synchronize_rcu_expedited()?;
            }
            Ok::<_, Error>(e.rcu_stats().grace_periods)
        })
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(gps, 10_000);
    assert_eq!(
        m.platform().signals_sent_to(2),
        before,
        "no signal to the quiet CPU"
    );
    pipe.wake();
    let (r, _errno) = blocker.join().unwrap();
    assert_eq!(
        r, 1,
        "poll returned because of the pipe, not a signal (EINTR)"
    );
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}

#[test]
fn deferrable_calls_wait_for_the_exit_and_run_in_order_exactly_once() {
    let (m, pipe, blocker) = blocked_in_quiet_region();
    let before = m.platform().signals_sent_to(2);
    // Three senders, one after the other: CPU 0, this (foreign) thread, CPU 1.
    let order = Arc::new(AtomicU64::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let record = |digit: u64| {
        let (order, runs) = (Arc::clone(&order), Arc::clone(&runs));
        move |cpu: usize| {
            assert_eq!(cpu, 2);
            let v = order.load(Ordering::SeqCst);
            order.store(v * 10 + digit, Ordering::SeqCst);
            runs.fetch_add(1, Ordering::SeqCst);
        }
    };
    let f1 = record(1);
    m.run_on(0, move |e| e.call_single_deferrable(2, f1))
        .join()
        .unwrap()
        .unwrap();
    m.engine().call_single_deferrable(2, record(2)).unwrap();
    let f3 = record(3);
    m.run_on(1, move |e| e.call_single_deferrable(2, f3))
        .join()
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(runs.load(Ordering::SeqCst), 0, "nothing ran while quiet");
    assert_eq!(m.platform().signals_sent_to(2), before, "and no signal");
    assert_eq!(
        m.engine().stats(2).unwrap().deferred_while_quiet,
        1,
        "one IPI withheld (coalesced)"
    );
    pipe.wake();
    let (r, _) = blocker.join().unwrap();
    assert_eq!(r, 1, "the blocking call was not interrupted");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "ran at the exit, before the thread left"
    );
    assert_eq!(order.load(Ordering::SeqCst), 123, "in order");
    assert_eq!(m.engine().stats(2).unwrap().run_at_quiet_exit, 3);
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}

#[test]
fn an_urgent_call_still_interrupts_a_quiet_cpu() {
    let (m, pipe, blocker) = blocked_in_quiet_region();
    let before = m.platform().signals_sent_to(2);
    m.engine().call_single_async(2, |_| ()).unwrap();
    let (r, errno) = blocker.join().unwrap();
    assert_eq!(
        (r, errno),
        (-1, libc::EINTR),
        "the signal interrupted the blocking call"
    );
    assert!(m.platform().signals_sent_to(2) > before);
    drop(pipe);
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}

#[test]
fn a_reader_that_went_quiet_is_still_waited_for_and_readers_cannot_start_quiet() {
    let m = machine();
    let (m2, in_reader) = (Arc::clone(&m), Arc::new(AtomicBool::new(false)));
    let (ir2, reader_done) = (Arc::clone(&in_reader), Arc::new(AtomicBool::new(false)));
    let rd2 = Arc::clone(&reader_done);
    let reader = std::thread::spawn(move || {
        let g = m2.attach().unwrap();
        let e = g.engine();
        {
            let _r = e.rcu_read_lock().unwrap();
            ir2.store(true, Ordering::SeqCst);
            // Inside a reader, `quiet` does not make the CPU quiet: it stays watched.
            e.quiet(|| {
                assert!(!e.is_quiet(2));
                std::thread::sleep(Duration::from_millis(100));
            });
            rd2.store(true, Ordering::SeqCst);
        }
        // Inside a quiet region, a reader cannot start.
        let r = e.quiet(|| e.rcu_read_lock().map(|_| ()));
        assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
        drop(g);
    });
    wait_until(LIMIT, "the reader to start", || {
        in_reader.load(Ordering::SeqCst)
    });
    let rd = Arc::clone(&reader_done);
    let (ok, started) = m
        .run_on(0, move |e| {
            let t = Instant::now();
            e.synchronize_rcu_expedited().unwrap();
            (rd.load(Ordering::SeqCst), t.elapsed())
        })
        .join()
        .unwrap();
    assert!(
        ok,
        "the grace period ended only after the reader did ({started:?})"
    );
    reader.join().unwrap();
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}

#[test]
fn hotplug_flushes_deferred_calls_of_a_quiet_cpu() {
    let m = Arc::new(
        Machine::builder()
            .cpus(2)
            .attach_slots(1)
            .idle(IdlePolicy::Sleep)
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap(),
    );
    let pipe = Arc::new(Pipe::new());
    let (ready_tx, ready) = mpsc::channel();
    let leave = Arc::new(AtomicBool::new(false));
    // CPU 2: blocks in a quiet region (retrying `poll` after the stop_machine's signals, as a
    // real program retries EINTR), then serves at safe points until told to leave.
    let blocker = {
        let (m, pipe, leave) = (Arc::clone(&m), Arc::clone(&pipe), Arc::clone(&leave));
        std::thread::spawn(move || {
            let g = m.attach().unwrap();
            quiet(|| {
                ready_tx.send(()).unwrap();
                while pipe.wait() == (-1, libc::EINTR) {}
            });
            while !leave.load(Ordering::SeqCst) {
                smpcall::hosted::safe_point();
                std::thread::yield_now();
            }
            drop(g);
        })
    };
    ready.recv_timeout(LIMIT).unwrap();
    wait_until(LIMIT, "CPU 2 to be quiet", || m.engine().is_quiet(2));
    let ran_online = Arc::new(AtomicUsize::new(0));
    let r2 = Arc::clone(&ran_online);
    m.engine()
        .call_single_deferrable(2, move |cpu| {
            let online = smpcall::hosted::with_engine(|e| e.is_online(cpu)).unwrap();
            r2.fetch_add(if online { 1 } else { 100 }, Ordering::SeqCst);
        })
        .unwrap();
    // Take CPU 2 down from another thread: it cannot while its deferred call cannot run.
    let m2 = Arc::clone(&m);
    let down = std::thread::spawn(move || m2.cpu_down(2));
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        m.engine().is_online(2),
        "still online while the call is deferred"
    );
    assert_eq!(ran_online.load(Ordering::SeqCst), 0);
    pipe.wake();
    assert_eq!(down.join().unwrap(), Ok(()));
    assert_eq!(
        ran_online.load(Ordering::SeqCst),
        1,
        "ran once, before going offline"
    );
    leave.store(true, Ordering::SeqCst);
    blocker.join().unwrap();
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}
