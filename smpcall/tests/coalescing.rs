//! IPI coalescing (C6): an IPI only when a queue goes from empty to non-empty, none at all to an
//! idle-polling CPU, a futex wake (no signal) to a sleeping one.

mod common;

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{wait_until, LIMIT};
use smpcall::hosted::{IdlePolicy, Machine};
use smpcall::Csd;

#[test]
fn masked_target_gets_one_ipi_for_many_calls_and_runs_all_at_unmask() {
    const N: usize = 32;
    let m = Machine::builder()
        .cpus(2)
        .idle(IdlePolicy::Sleep)
        .build()
        .unwrap();
    let held = common::MaskedCpu::hold(&m, 1);

    let before = m.engine().stats(1).unwrap();
    let signals_before = m.engine().platform().signals_sent();
    let runs = Arc::new(AtomicUsize::new(0));
    let csds: Arc<Vec<Pin<Box<Csd>>>> = Arc::new((0..N).map(|_| Box::pin(Csd::new())).collect());
    let (runs2, csds2) = (Arc::clone(&runs), Arc::clone(&csds));
    m.run_on(0, move |e| {
        for csd in csds2.iter() {
            let r = Arc::clone(&runs2);
            e.call_async_csd(csd.as_ref(), 1, move |_| {
                r.fetch_add(1, Ordering::SeqCst);
            })
            .expect("async call");
        }
    })
    .join_timeout(LIMIT)
    .unwrap();

    let queued = m.engine().stats(1).unwrap();
    assert_eq!(queued.calls_queued - before.calls_queued, N as u64);
    assert_eq!(
        queued.ipi_sent - before.ipi_sent,
        1,
        "N calls, one IPI: {queued:?}"
    );
    assert_eq!(m.engine().platform().signals_sent() - signals_before, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 0, "masked: nothing ran yet");
    assert_eq!(
        queued.ipi_received, before.ipi_received,
        "the IPI waits for the unmask"
    );

    held.release();
    wait_until(LIMIT, "all N calls to run after the unmask", || {
        runs.load(Ordering::SeqCst) == N
    });
    let after = m.engine().stats(1).unwrap();
    assert_eq!(
        after.ipi_received - before.ipi_received,
        1,
        "one IPI served: {after:?}"
    );
    assert_eq!(after.calls_run - before.calls_run, N as u64);
    m.shutdown().unwrap();
}

#[test]
fn calls_to_an_idle_polling_cpu_send_no_ipi() {
    const N: usize = 2_000;
    let m = Machine::builder()
        .cpus(2)
        .idle(IdlePolicy::Poll)
        .build()
        .unwrap();
    wait_until(LIMIT, "CPU 1 to start idle-polling", || {
        m.engine().is_polling(1)
    });
    let before = m.engine().stats(1).unwrap();
    let signals_before = m.engine().platform().signals_sent();
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = Arc::clone(&runs);
    m.run_on(0, move |e| {
        for i in 0..N {
            if i % 2 == 0 {
                let r = Arc::clone(&r2);
                e.call_single_async(1, move |_| {
                    r.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            } else {
                e.call_single(1, |_| {
                    r2.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            }
        }
    })
    .join_timeout(LIMIT)
    .unwrap();
    wait_until(LIMIT, "all calls to run", || {
        runs.load(Ordering::SeqCst) == N
    });
    let after = m.engine().stats(1).unwrap();
    assert_eq!(
        after.ipi_sent, before.ipi_sent,
        "no IPI to a polling CPU: {after:?}"
    );
    assert_eq!(m.engine().platform().signals_sent(), signals_before);
    assert!(
        after.ipi_elided - before.ipi_elided >= (N / 2) as u64,
        "every empty→non-empty push to the polling CPU was elided: {after:?}"
    );
    m.shutdown().unwrap();
}

#[test]
fn sleeping_idle_cpu_is_woken_by_futex_not_signal() {
    let m = Machine::builder()
        .cpus(2)
        .idle(IdlePolicy::Sleep)
        .build()
        .unwrap();
    let signals_before = m.engine().platform().signals_sent();
    let wakes_before = m.engine().platform().futex_wakes();
    let sum = m
        .run_on(0, |e| {
            let mut sum = 0;
            for i in 0..200 {
                // Give CPU 1 time to fall asleep between calls.
                std::thread::sleep(std::time::Duration::from_micros(200));
                sum += e.call_single(1, move |_| i).unwrap();
            }
            sum
        })
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(sum, (0..200).sum::<usize>());
    let wakes = m.engine().platform().futex_wakes() - wakes_before;
    let signals = m.engine().platform().signals_sent() - signals_before;
    assert!(wakes > 0, "a sleeping CPU is woken by futex");
    // A call that finds CPU 1 between "woken" and "asleep again" may still use a signal, but
    // with 200 µs pauses the futex path dominates.
    assert!(wakes > signals, "futex wakes {wakes} vs signals {signals}");
    m.shutdown().unwrap();
}
