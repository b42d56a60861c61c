//! stop_machine and CPU hotplug, driven from the main thread (which is not a CPU):
//!
//! * `stop_machine(2, f)` runs `f` on CPU 2 while every other online CPU spins masked;
//! * `cpu_down(2)`: calls to CPU 2 are refused with `Error::Offline(2)`, many-calls skip it;
//!   `cpu_up(2)` brings it back;
//! * then `CYCLES` down/up cycles while another thread (not a CPU) keeps calling every CPU:
//!   as many runs as accepted calls, each on the CPU it was sent to; every refusal is `Offline`.
//!
//! ```sh
//! cargo run --release -p smpcall --example hotplug [CYCLES]   # default 300
//! ```

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use smpcall::hosted::Machine;
use smpcall::{CpuMask, Error};

const CPUS: usize = 3;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::watchdog();
    let cycles = common::arg_or(300);
    let m = Machine::builder().cpus(CPUS).build()?;
    let e = m.engine();

    // Run a closure on CPU 2 while CPUs 0 and 1 spin with interrupts masked.
    let (v, ran_on) = e.stop_machine(2, || {
        (6 * 7, smpcall::hosted::with_engine(|e| e.current_cpu()))
    })?;
    assert_eq!((v, ran_on), (42, Some(Some(2))));
    println!("stop_machine(2, f) returned {v}, f ran on CPU 2");

    m.cpu_down(2)?;
    assert_eq!(e.call_single(2, |_| ()), Err(Error::Offline(2)));
    let from_cpu0 = m.run_on(0, |e| e.call_single(2, |_| ())).join()?;
    assert_eq!(from_cpu0, Err(Error::Offline(2)));
    let ran = e.call_many(&CpuMask::first_n(CPUS), |_| ())?;
    assert_eq!(ran, CpuMask::first_n(2), "the many-call skipped CPU 2");
    println!("CPU 2 down: calls refused with {from_cpu0:?}, call_all ran on {ran}");
    m.cpu_up(2)?;
    assert_eq!(e.call_single(2, |cpu| cpu), Ok(2));
    println!("CPU 2 up: calls reach it again");

    // Down/up cycles under a stream of calls from a thread that is not a CPU.
    let stop = AtomicBool::new(false);
    let (accepted, ran) = (AtomicU64::new(0), Arc::new(AtomicU64::new(0)));
    let refused = std::thread::scope(|s| {
        let caller = s.spawn(|| {
            let mut refused = 0u64;
            for i in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (r, target) = (Arc::clone(&ran), i % CPUS);
                let call = e.call_single_async(target, move |cpu| {
                    assert_eq!(cpu, target, "a call ran on the wrong CPU");
                    r.fetch_add(1, Ordering::SeqCst);
                });
                match call {
                    Ok(()) => _ = accepted.fetch_add(1, Ordering::SeqCst),
                    Err(Error::Offline(_)) => refused += 1,
                    Err(other) => panic!("unexpected refusal: {other}"),
                }
            }
            refused
        });
        for c in 0..cycles {
            let victim = 1 + c as usize % (CPUS - 1); // CPU 0 stays: one CPU must be online
            m.cpu_down(victim)?;
            std::thread::sleep(Duration::from_micros(200));
            m.cpu_up(victim)?;
        }
        stop.store(true, Ordering::SeqCst);
        Ok::<_, Error>(caller.join().expect("the caller panicked"))
    })?;
    let accepted = accepted.load(Ordering::SeqCst);
    common::wait_until("every accepted call to run", || {
        ran.load(Ordering::SeqCst) == accepted
    });
    let hp = e.hotplug_stats();
    println!(
        "{cycles} down/up cycles ({} downs, {} ups): {accepted} calls accepted and run, \
         {refused} refused with Offline; {} runs on an offline CPU",
        hp.downs,
        hp.ups,
        e.total_stats().offline_runs
    );
    assert_eq!(e.total_stats().offline_runs, 0);
    assert!(accepted > 0);
    m.shutdown()?;
    println!("OK");
    Ok(())
}
