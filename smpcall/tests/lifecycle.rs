//! Machine start-up and shutdown: nothing accepted is lost, every thread is joined, and the IPI
//! signal handler left installed can never reach freed memory.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::LIMIT;
use smpcall::hosted::{IdlePolicy, Machine};
use smpcall::Error;

#[test]
fn async_calls_accepted_before_shutdown_all_run() {
    for round in 0..30 {
        let idle = if round % 2 == 0 {
            IdlePolicy::Sleep
        } else {
            IdlePolicy::Poll
        };
        let m = Machine::builder().cpus(4).idle(idle).build().unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let accepted: Vec<_> = (0..4)
            .map(|cpu| {
                let r = Arc::clone(&ran);
                m.run_on(cpu, move |e| {
                    let mut ok = 0;
                    for i in 0..200 {
                        let r2 = Arc::clone(&r);
                        let res = e.call_single_async((cpu + 1 + i % 3) % 4, move |_| {
                            r2.fetch_add(1, Ordering::SeqCst);
                        });
                        ok += usize::from(res.is_ok());
                    }
                    ok
                })
            })
            .collect();
        let accepted: usize = accepted
            .into_iter()
            .map(|mut t| t.join_timeout(LIMIT).unwrap())
            .sum();
        // Shut down right away: queued calls must drain first.
        m.shutdown().unwrap();
        assert_eq!(
            ran.load(Ordering::SeqCst),
            accepted,
            "round {round}: calls lost at shutdown"
        );
    }
}

#[test]
fn stray_ipi_signal_after_shutdown_is_harmless() {
    let m = Machine::builder().cpus(2).build().unwrap();
    let signo = m.engine().platform().signal();
    m.run_on(0, |e| e.call_single(1, |_| ()))
        .join_timeout(LIMIT)
        .unwrap()
        .unwrap();
    m.shutdown().unwrap();
    // The handler stays installed process-wide; on a thread that is not a live CPU it must do
    // nothing (this thread never was one; the CPU threads' memory is gone).
    for _ in 0..100 {
        // SAFETY: sends our own IPI signal to this very thread.
        let r = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), signo) };
        assert_eq!(r, 0);
    }
    // A new machine reuses the same signal and works.
    let m = Machine::builder().cpus(2).build().unwrap();
    assert_eq!(m.engine().platform().signal(), signo);
    let v = m
        .run_on(1, |e| e.call_single(0, |cpu| cpu + 40))
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(v, Ok(40));
    m.shutdown().unwrap();
}

#[test]
fn bad_configuration_is_refused_with_a_message() {
    assert_eq!(
        Machine::builder().cpus(0).build().unwrap_err(),
        Error::CpuCount {
            requested: 0,
            max: smpcall::MAX_CPUS
        }
    );
    let e = Machine::builder().cpus(5000).build().unwrap_err();
    assert_eq!(
        e.to_string(),
        "CPU count 5000 is outside 1..=1024 (MAX_CPUS is 1024)",
        "the message carries the offending value"
    );
    let e = Machine::builder()
        .cpus(2)
        .signal(libc::SIGUSR1)
        .build()
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains(&format!("IPI signal {}", libc::SIGUSR1)),
        "the message carries the offending signal: {e}"
    );
}

#[test]
fn more_cpus_than_cores_work() {
    let m = Machine::builder().cpus(16).build().unwrap();
    let total = m
        .run_on(3, |e| {
            let hits = AtomicUsize::new(0);
            for _ in 0..50 {
                e.call_all(|_| {
                    hits.fetch_add(1, Ordering::Relaxed);
                })
                .unwrap();
            }
            hits.load(Ordering::Relaxed)
        })
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(total, 16 * 50);
    m.shutdown().unwrap();
}
