//! Probes of the public API's edges by an outside client (races, misuse, resource limits).
//! Each test fails on the code before its fix (named in its comment).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smpcall::hosted::{IdlePolicy, Machine};

/// Found by probing: `cpu_up` checked "was this CPU ever brought up" before it took the
/// hotplug lock. An attached thread leaving meanwhile (its leave holds the lock and clears
/// that mark) was then brought back online by the waiting `cpu_up` — a CPU with no thread:
/// every later call to it, stop_machine, grace period and leave waited for ever.
#[test]
fn cpu_up_racing_with_a_leave_never_brings_back_a_slot_nobody_holds() {
    let m = Arc::new(
        Machine::builder()
            .cpus(1)
            .attach_slots(1)
            .idle(IdlePolicy::Sleep)
            .build()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    while Instant::now() < deadline {
        rounds += 1;
        let stop = Arc::new(AtomicBool::new(false));
        let (m2, stop2) = (Arc::clone(&m), Arc::clone(&stop));
        // Hammers cpu_up(1) (idempotent while the slot is held) from a thread that is not a CPU.
        let upper = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let _ = m2.cpu_up(1);
            }
        });
        let m3 = Arc::clone(&m);
        let holder = std::thread::spawn(move || {
            let g = m3.attach().expect("slot 1 is free");
            assert_eq!(g.cpu(), 1);
            drop(g); // leaves: CPU 1 offline, slot free
        });
        holder.join().expect("the attached thread left");
        stop.store(true, Ordering::SeqCst);
        // Before the fix, the `cpu_up` that won also signalled the dead thread (a debug
        // assertion in the platform's `tgkill`).
        let upper = upper.join();
        assert!(
            upper.is_ok(),
            "round {rounds}: cpu_up signalled CPU 1 after its thread left"
        );
        assert!(
            !m.engine().is_online(1),
            "round {rounds}: cpu_up brought CPU 1 back online after its thread left (no thread \
             serves it: calls to it wait for ever)"
        );
    }
    Arc::try_unwrap(m).unwrap().shutdown().unwrap();
}
