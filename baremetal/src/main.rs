//! A small x86_64 kernel that runs the `smpcall` engine on real local-APIC IPIs and NMIs
//! under QEMU, and tests it (see `baremetal/README.md`).
//!
//! Boot (PVH) -> `kmain` on CPU 0: console, GDT/TSS/IDT, PICs masked, local APIC, TSC
//! calibration, engine, APs started by INIT-SIPI-SIPI -> the in-kernel test suite -> exit
//! status through `isa-debug-exit`.
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
// Tests return their message in a fixed-size buffer: there is no heap to box it into.
#![allow(clippy::result_large_err)]

mod apic;
mod arch;
mod bench;
mod boot;
mod cmdline;
mod config;
mod console;
mod exit;
mod gdt;
mod idt;
mod ktest;
mod ktest_support;
mod mem;
mod nmi;
mod percpu;
mod platform;
mod smp;
mod time;

use core::sync::atomic::{AtomicBool, Ordering};

/// CR4.OSFXSR/OSXMMEXCPT and CR0.MP/NE (EM clear) are set by the boot code; reset the x87/SSE
/// state (`core` uses SSE registers).
pub fn enable_sse() {
    // SAFETY: SSE is enabled in CR0/CR4 by the boot code; these only reset FPU/SSE state.
    unsafe {
        let mxcsr: u32 = 0x1F80;
        core::arch::asm!("fninit", "ldmxcsr [{}]", in(reg) &mxcsr, options(nostack));
    }
}

fn mask_legacy_pics() {
    // SAFETY: the 8259 PIC data ports; masking every line keeps stray legacy IRQs away.
    unsafe {
        arch::outb(0x21, 0xFF);
        arch::outb(0xA1, 0xFF);
    }
}

/// The BSP's Rust entry (from the boot assembly, on CPU 0's stack, interrupts masked).
#[unsafe(no_mangle)]
extern "C" fn kmain(pvh_start_info: u32) -> ! {
    // SAFETY: CPU 0, first thing in Rust.
    unsafe { percpu::init_this_cpu(0) };
    idt::build();
    idt::load();
    enable_sse();
    console::init();
    println!();
    println!("smpcall bare-metal x86_64 kernel (local APIC, QEMU)");
    cmdline::parse(pvh_start_info);
    mask_legacy_pics();
    apic::enable();
    percpu::mark_started(0);
    time::calibrate();
    let cpuid1 = arch::cpuid(1, 0);
    println!(
        "boot: TSC {} MHz, x2APIC offered: {}, BSP APIC id {}",
        time::tsc_hz() / 1_000_000,
        cpuid1[2] & (1 << 21) != 0,
        apic::id()
    );
    platform::init_engine();
    let engine = platform::engine();
    engine.mark_online(0).expect("cpu 0");
    let expected = smp::fw_cfg_cpu_count();
    percpu::set_present(expected);
    let started = smp::start_aps(expected);
    // SAFETY: IDT, TSS and APIC are set up on CPU 0.
    unsafe { arch::enable_irqs() };
    println!(
        "boot: fw_cfg says {} CPUs; {} started (APIC ids:{}), engine online: {}",
        expected,
        started,
        ApicIds,
        engine.online_mask()
    );
    let ok = ktest::run_all();
    exit::exit(ok)
}

struct ApicIds;

impl core::fmt::Display for ApicIds {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for cpu in percpu::bits(percpu::started_mask()) {
            write!(f, " {}", percpu::CPUS[cpu].apic_id.load(Ordering::Relaxed))?;
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
    console::emergency(format_args!("\nPANIC on cpu {:?}: {}\n", cpu, info));
    if let Some(call) = cpu.and_then(ktest::call_in_progress) {
        console::emergency(format_args!(
            "(that CPU was inside {call}, as a hotplug-test sender)\n"
        ));
    }
    console::emergency(format_args!("0 passed, 1 failed\n"));
    exit::exit(false)
}
