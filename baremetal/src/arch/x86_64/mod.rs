//! x86_64: PVH boot, long mode, IDT with IST stacks, the local APIC in xAPIC mode (fixed IPIs,
//! NMIs, INIT-SIPI-SIPI), the TSC, COM1, `isa-debug-exit`.
//!
//! # The interface every `arch` module exports (used by `common`)
//!
//! | item | meaning |
//! |---|---|
//! | `NAME` | architecture name for the banner |
//! | `set_cpu_index(cpu)` (unsafe), `cpu_index_plus_one()` | the per-CPU register (index + 1, 0 before set-up) |
//! | `hw_id()` | this CPU's interrupt-controller id (what `send_ipi` takes) |
//! | `irq_save()`, `irq_restore(bool)`, `irqs_enabled()`, `enable_irqs()` (unsafe), `disable_irqs()` | the interrupt mask the engine's `irq_save` is |
//! | `enable_irqs_and_wait()` | unmask and wait for an interrupt as one step (no lost wake-up) |
//! | `halt_forever()`, `pause()` | park; spin-loop hint |
//! | `cycles()` | the cycle counter (`time::init` gets its frequency at boot) |
//! | `current_pc()`, `current_sp()` | for the NMI dump's own line |
//! | `call_handler_stack(cpu)` | `[bottom, top)` of the stack CPU `cpu`'s call-IPI handler (the engine's flush) runs on |
//! | `send_ipi(hw, Ipi)`, `send_ipi_all_but_self(Ipi) -> bool` | IPIs; the broadcast returns false where there is none |
//! | `HAS_NMI`, `send_nmi(hw)`, `send_nmi_all_but_self() -> bool` | the NMI-class signal |
//! | `start_secondaries(present)` | kick the other CPUs; each ends in `kernel::secondary_main` |
//! | `console_init()`, `console_put(u8)` | the UART |
//! | `exit(bool) -> !` | end the VM with a pass/fail status |
//!
//! Boot: `boot.rs` (PVH) calls `kmain` here, which sets up CPU 0 and calls
//! `kernel::bsp_main`; APs come through `smp::ap_main` to `kernel::secondary_main`.

pub mod apic;
pub mod boot;
pub mod cpu;
pub mod exit;
pub mod gdt;
pub mod idt;
pub mod mem;
pub mod pvh;
pub mod serial;
pub mod smp;
pub mod tsc;

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

pub use cpu::{
    disable_irqs, enable_irqs, halt_forever, irq_restore, irq_save, irqs_enabled, pause,
};

use crate::config::{Ipi, MAX_CPUS};

/// Architecture name.
pub const NAME: &str = "x86_64";

/// Vector of the cross-CPU call IPI: its handler is `Engine::handle_ipi` + EOI.
pub const CALL_VECTOR: u8 = 0xF0;
/// Wakes a halted CPU for a task (handler: EOI only).
pub const WAKE_VECTOR: u8 = 0xF1;
/// IPI round-trip measurement: the target answers PING with PONG.
pub const PING_VECTOR: u8 = 0xF2;
/// See `PING_VECTOR`.
pub const PONG_VECTOR: u8 = 0xF3;
/// The local APIC's spurious-interrupt vector (no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xFF;

/// IST1: every external interrupt and IPI vector (the engine's flush runs here).
pub const IST_IRQ_BYTES: usize = 64 * 1024;
/// IST2: NMI.
pub const IST_NMI_BYTES: usize = 16 * 1024;
/// IST3: exceptions.
pub const IST_EXC_BYTES: usize = 16 * 1024;
/// One CPU's block of IST stacks.
pub const IST_STACK_BYTES: usize = IST_IRQ_BYTES + IST_NMI_BYTES + IST_EXC_BYTES;

fn vector(ipi: Ipi) -> u8 {
    match ipi {
        Ipi::Call => CALL_VECTOR,
        Ipi::Wake => WAKE_VECTOR,
        Ipi::Ping => PING_VECTOR,
        Ipi::Pong => PONG_VECTOR,
    }
}

/// The IPI a vector stands for.
pub fn ipi_of(v: u8) -> Option<Ipi> {
    Some(match v {
        CALL_VECTOR => Ipi::Call,
        WAKE_VECTOR => Ipi::Wake,
        PING_VECTOR => Ipi::Ping,
        PONG_VECTOR => Ipi::Pong,
        _ => return None,
    })
}

/// Per-CPU block the GS base points at: `gs:[0]` is the CPU index + 1, then the TSS.
#[repr(C, align(128))]
struct PerCpu {
    id_plus_one: AtomicUsize,
    tss: UnsafeCell<gdt::Tss>,
}

// SAFETY: `tss` is touched only by the owning CPU at bring-up; the index is atomic.
unsafe impl Sync for PerCpu {}

static PER_CPU: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        id_plus_one: AtomicUsize::new(0),
        tss: UnsafeCell::new(gdt::Tss::new()),
    }
}; MAX_CPUS];

/// Points GS at CPU `cpu`'s block and loads its TSS (IST stacks) and the IDT.
///
/// # Safety
/// Once per CPU, on that CPU, with a `cpu` no other CPU uses.
pub unsafe fn set_cpu_index(cpu: usize) {
    let p = &PER_CPU[cpu];
    p.id_plus_one.store(cpu + 1, Ordering::Relaxed);
    // SAFETY: GS base = our own block, which lives forever; nothing reads GS before this.
    unsafe { cpu::wrmsr(cpu::MSR_GS_BASE, p as *const PerCpu as u64) };
    // SAFETY: our own TSS, loaded once (this function's contract).
    unsafe { gdt::load(cpu, p.tss.get(), boot::ist_block(cpu)) };
    idt::load();
}

/// The current CPU's index + 1 from `gs:[0]` (0 before `set_cpu_index`).
#[inline]
pub fn cpu_index_plus_one() -> usize {
    let v: usize;
    // SAFETY: reads 8 bytes at GS base: our `PerCpu::id_plus_one` once set up. Before that the
    // GS base is 0 and this reads identity-mapped low memory, which the caller's range check
    // rejects or (at worst) misreads before any CPU is set up — nothing calls it that early.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) v, options(nostack, readonly, preserves_flags))
    };
    v
}

/// This CPU's local APIC id.
pub fn hw_id() -> u32 {
    apic::id()
}

/// `sti; hlt` as one step.
pub fn enable_irqs_and_wait() {
    cpu::enable_irqs_and_halt();
}

/// The TSC.
#[inline(always)]
pub fn cycles() -> u64 {
    cpu::rdtsc()
}

/// The caller's instruction pointer.
pub fn current_pc() -> u64 {
    cpu::current_rip()
}

/// The stack pointer.
pub fn current_sp() -> u64 {
    cpu::current_rsp()
}

/// `[bottom, top)` of the stack CPU `cpu`'s call IPI handler runs on: its IST1 stack
/// (`IST_IRQ_BYTES`, the lowest part of its IST block; see `gdt::load`).
pub fn call_handler_stack(cpu: usize) -> (usize, usize) {
    let bottom = boot::ist_block(cpu);
    (bottom, bottom + IST_IRQ_BYTES)
}

/// A fixed IPI to the CPU with local APIC id `hw`.
pub fn send_ipi(hw: u32, ipi: Ipi) {
    apic::send_fixed(hw, vector(ipi));
}

/// The all-but-self shorthand (one ICR write).
pub fn send_ipi_all_but_self(ipi: Ipi) -> bool {
    apic::send_fixed_all_but_self(vector(ipi));
    true
}

/// APIC NMIs are real NMIs.
pub const HAS_NMI: bool = true;

/// An NMI to one CPU.
pub fn send_nmi(hw: u32) {
    apic::send_nmi(hw);
}

/// An NMI to every other CPU (one ICR write).
pub fn send_nmi_all_but_self() -> bool {
    apic::send_nmi_all_but_self();
    true
}

/// INIT-SIPI-SIPI to all-but-self.
pub fn start_secondaries(present: usize) {
    smp::start_aps(present);
}

/// COM1.
pub fn console_init() {
    serial::init();
}

/// One byte to COM1.
pub fn console_put(b: u8) {
    serial::put(b);
}

/// `isa-debug-exit`.
pub fn exit(success: bool) -> ! {
    exit::exit(success)
}

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
        cpu::outb(0x21, 0xFF);
        cpu::outb(0xA1, 0xFF);
    }
}

/// The BSP's Rust entry (from the boot assembly, on CPU 0's stack, interrupts masked).
#[unsafe(no_mangle)]
extern "C" fn kmain(pvh_start_info: u32) -> ! {
    // SAFETY: CPU 0, first thing in Rust.
    unsafe { crate::percpu::init_this_cpu(0) };
    idt::build();
    idt::load();
    enable_sse();
    crate::console::init();
    crate::println!();
    crate::println!("smpcall bare-metal x86_64 kernel (local APIC, QEMU)");
    pvh::parse_pvh(pvh_start_info);
    mask_legacy_pics();
    apic::enable();
    crate::time::init(tsc::calibrate());
    let cpuid1 = cpu::cpuid(1, 0);
    crate::println!(
        "boot: TSC {} MHz, x2APIC offered: {}, BSP APIC id {}",
        crate::time::counter_hz() / 1_000_000,
        cpuid1[2] & (1 << 21) != 0,
        apic::id()
    );
    crate::kernel::bsp_main(smp::fw_cfg_cpu_count())
}
