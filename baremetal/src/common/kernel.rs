//! The architecture-independent part of boot: the engine, the other CPUs, the suite, the exit;
//! and the panic handler.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::config::MAX_CPUS;
use crate::{arch, ktest, percpu, platform, println, time};

/// The boot CPU, once its architecture set it up (per-CPU register, exception entry, console,
/// interrupt controller, clock). `present`: how many CPUs the machine has.
pub fn bsp_main(present: usize) -> ! {
    percpu::mark_started(0);
    percpu::set_present(present);
    platform::init_engine();
    let engine = platform::engine();
    // SAFETY: CPU 0 runs this, with its interrupt entry and controller set up.
    unsafe { engine.mark_online(0) }.expect("cpu 0");
    if present > 1 {
        arch::start_secondaries(present);
        let want = present.min(MAX_CPUS);
        time::wait_until(5_000, || percpu::started_count() >= want);
        if present > MAX_CPUS {
            println!(
                "note: the machine has {present} CPUs; this kernel runs {MAX_CPUS}, the rest are \
                 parked"
            );
        }
        if percpu::started_count() < want {
            println!(
                "warning: only {} of {want} CPUs started",
                percpu::started_count()
            );
        }
    }
    // SAFETY: exception entry and interrupt controller are set up on CPU 0.
    unsafe { arch::enable_irqs() };
    println!(
        "boot: {}: {} CPUs present; {} started (hardware ids:{}), engine online: {}",
        arch::NAME,
        present,
        percpu::started_count(),
        HwIds,
        engine.online_mask()
    );
    let ok = ktest::run_all();
    arch::exit(ok)
}

/// A secondary CPU, once its architecture set it up (per-CPU register via
/// `percpu::init_this_cpu`, exception entry, interrupt controller), interrupts masked.
pub fn secondary_main(cpu: usize) -> ! {
    percpu::mark_started(cpu);
    // SAFETY: this CPU's exception entry and interrupt controller are set up; it serves its
    // IPIs from here on.
    unsafe { platform::engine().mark_online(cpu) }.expect("cpu index within the storage");
    // SAFETY: exception entry and interrupt controller are set up on this CPU.
    unsafe { arch::enable_irqs() };
    percpu::idle_loop(cpu)
}

struct HwIds;

impl core::fmt::Display for HwIds {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for cpu in percpu::bits(percpu::started_mask()) {
            write!(f, " {}", percpu::CPUS[cpu].hw_id.load(Ordering::Relaxed))?;
        }
        Ok(())
    }
}

static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    arch::disable_irqs();
    if PANICKING.swap(true, Ordering::SeqCst) {
        // A second panic (another CPU, or recursion): let the first one report and exit.
        arch::halt_forever();
    }
    let cpu = percpu::current_index();
    crate::console::emergency(format_args!("\nPANIC on cpu {:?}: {}\n", cpu, info));
    if let Some(call) = cpu.and_then(ktest::call_in_progress) {
        crate::console::emergency(format_args!(
            "(that CPU was inside {call}, as a hotplug-test sender)\n"
        ));
    }
    crate::console::emergency(format_args!("0 passed, 1 failed\n"));
    arch::exit(false)
}
