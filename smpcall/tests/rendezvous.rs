//! Seed 002, the MTRR rendezvous: callees decrement a counter and then spin until a gate opens;
//! the caller issues *no-wait* calls, waits for the counter to reach zero, then opens the gate.
//! If a no-wait call ever waited for its function (as the 2009 kmalloc fallback did), the
//! caller would never reach the gate and every CPU would spin forever. Here a deadlock shows up
//! as a bounded-wait failure naming the stuck step, never as a hung test.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::{wait_until, LIMIT};
use smpcall::hosted::{IdlePolicy, Machine};

struct Rendezvous {
    count: AtomicUsize,
    gate: AtomicBool,
    passed: AtomicUsize,
}

/// The callee: what the MTRR code's IPI handler did (interrupts are masked: it runs as a call).
fn callee(r: &Rendezvous) {
    r.count.fetch_sub(1, Ordering::SeqCst);
    // Bounded spin: a broken engine must fail the test, not hang it (the caller checks
    // `passed`, so a timeout here shows up as a missing pass).
    let deadline = std::time::Instant::now() + LIMIT;
    while !r.gate.load(Ordering::SeqCst) {
        if std::time::Instant::now() > deadline {
            return;
        }
        std::hint::spin_loop();
    }
    r.passed.fetch_add(1, Ordering::SeqCst);
}

fn rendezvous(cpus: usize, via_many: bool) {
    let m = Machine::builder()
        .cpus(cpus)
        .idle(IdlePolicy::Sleep)
        .build()
        .expect("machine");
    let rounds = 20;
    let result = m
        .run_on(0, move |e| {
            for round in 0..rounds {
                let r = Arc::new(Rendezvous {
                    count: AtomicUsize::new(cpus - 1),
                    gate: AtomicBool::new(false),
                    passed: AtomicUsize::new(0),
                });
                if via_many {
                    let r2 = Arc::clone(&r);
                    let sent = e
                        .call_others_async(move |_| callee(&r2))
                        .expect("call_others_async");
                    assert_eq!(sent.weight(), cpus - 1);
                } else {
                    for cpu in 1..cpus {
                        let r2 = Arc::clone(&r);
                        e.call_single_async(cpu, move |_| callee(&r2))
                            .expect("call_single_async");
                    }
                }
                // The caller got here without waiting for any callee: now the rendezvous.
                wait_until(
                    LIMIT,
                    &format!("round {round}: every callee to check in"),
                    || r.count.load(Ordering::SeqCst) == 0,
                );
                r.gate.store(true, Ordering::SeqCst);
                wait_until(
                    LIMIT,
                    &format!("round {round}: every callee to pass the gate"),
                    || r.passed.load(Ordering::SeqCst) == cpus - 1,
                );
            }
            rounds
        })
        .join_timeout(LIMIT * 2)
        .expect("rendezvous task");
    assert_eq!(result, rounds);
    m.shutdown().expect("shutdown");
}

#[test]
fn mtrr_rendezvous_many_call_2_cpus() {
    rendezvous(2, true);
}

#[test]
fn mtrr_rendezvous_single_call_loop_2_cpus() {
    rendezvous(2, false);
}

#[test]
fn mtrr_rendezvous_many_call_8_cpus() {
    rendezvous(8, true);
}

#[test]
fn mtrr_rendezvous_single_call_loop_8_cpus() {
    rendezvous(8, false);
}
