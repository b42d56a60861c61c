//! The hosted quick start: the top-level README's "API in a few lines", as a program — the
//! call kinds from a CPU's task, then the same engine from the main thread (not a CPU) and
//! from a thread of your own that attaches as a CPU.
//!
//! ```sh
//! cargo run --release -p smpcall --example quick_start
//! ```

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use smpcall::hosted::Machine;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::watchdog();
    // 4 CPUs = 4 threads of the machine, and one slot a thread of ours can attach to.
    let m = Machine::builder().cpus(4).attach_slots(1).build()?;
    let answer = m
        .run_on(0, |e| {
            // CPU 0's task context
            let x = e.call_single(3, |cpu| cpu * 10)?; // run on CPU 3, wait, result
            e.call_single_async(2, |_cpu| { /* no wait */ })?; // 'static closure, ≤ 32 bytes
            let ran_on = e.call_others(|_cpu| { /* may borrow */ })?; // other online CPUs, wait
            e.call_all_async(|_cpu| { /* cloned per CPU */ })?; // all CPUs incl. self
            Ok::<_, smpcall::Error>(x + ran_on.weight())
        })
        .join()??;
    assert_eq!(answer, 33);
    println!("from CPU 0's task: call_single(3) returned 30, call_others ran on 3 CPUs: {answer}");

    // The main thread is not a CPU, and calls all the same (it cannot be called).
    let e = m.engine();
    let ran = AtomicUsize::new(0);
    let mask = e.call_all(|_cpu| {
        ran.fetch_add(1, Ordering::SeqCst);
    })?;
    assert_eq!((mask.weight(), ran.load(Ordering::SeqCst)), (4, 4));
    let on_2 = e.call_single(2, |cpu| format!("hello from CPU {cpu}"))?;
    println!(
        "from the main thread: call_all ran on {} CPUs; {on_2}",
        mask.weight()
    );

    // A thread of our own becomes CPU 4 while it holds the guard: it calls, and is called
    // (calls to it run at its safe points: here, `wait_until`'s `safe_point()`).
    let called = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let me = m.attach().expect("a free slot");
            let from_1 = me
                .engine()
                .call_single(1, |cpu| cpu)
                .expect("CPU 1 is online");
            println!(
                "attached as CPU {}: call_single(1) ran on {from_1}",
                me.cpu()
            );
            common::wait_until("the main thread's call", || called.load(Ordering::SeqCst));
        });
        common::wait_until("the thread to attach", || e.is_online(4));
        let ran_on = e.call_single(4, |cpu| {
            called.store(true, Ordering::SeqCst);
            cpu
        });
        println!("the main thread called the attached thread: ran on {ran_on:?}");
        assert_eq!(ran_on, Ok(4));
    });
    m.shutdown()?;
    println!("OK");
    Ok(())
}
