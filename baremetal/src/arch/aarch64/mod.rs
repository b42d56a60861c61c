//! aarch64 on QEMU `virt` (GICv3): EL1 kernel, SGIs as IPIs, GIC priority masking with a
//! pseudo-NMI SGI (as arm64 Linux's `irqchip.gicv3_pseudo_nmi`), PSCI (HVC) to start CPUs,
//! the generic timer's virtual count as the clock, PL011 UART, semihosting exit.
//!
//! Exports the interface described in `arch/x86_64/mod.rs`.
//!
//! **Masking.** The engine's `irq_save` is the GIC priority mask: ICC_PMR_EL1 from `PMR_ON`
//! (0xF0) to `PMR_OFF` (0x80), which blocks the IPI SGIs (priority 0xA0) but not the
//! pseudo-NMI SGI (priority 0x20). PSTATE.I stays clear in task code. The IPI handler raises
//! the PMR to `PMR_OFF` and *clears* PSTATE.I after acknowledging, so the engine's handler runs
//! "masked" (no IPI nests) while the pseudo-NMI can still preempt it (its priority also beats
//! the running priority 0xA0).
//!
//! **What is and is not non-maskable.** The pseudo-NMI gets through `irq_save` (PMR), through
//! IPI handlers and through a CPU spinning "with interrupts off". It does *not* get through
//! PSTATE.I, which the hardware sets on every exception entry: the exception entry/exit stubs,
//! a pseudo-NMI handler (so pseudo-NMIs never nest), synchronous-exception handlers, and the
//! few instructions around the idle `wfi` (there PSTATE.I is set with the PMR open, so that any
//! pending interrupt wakes the `wfi`; it is taken right after). QEMU 7.2 has no FEAT_NMI
//! (Armv8.8 superpriority interrupts), so there is no architected NMI.

pub mod boot;
pub mod gic;

use core::arch::asm;

use crate::config::Ipi;

/// Architecture name.
pub const NAME: &str = "aarch64";

/// Makes `cpu` this CPU's index (TPIDR_EL1 = index + 1).
///
/// # Safety
/// Once per CPU, on that CPU, with a `cpu` no other CPU uses.
pub unsafe fn set_cpu_index(cpu: usize) {
    // SAFETY: TPIDR_EL1 is the kernel's own per-CPU register; nothing else uses it.
    unsafe { asm!("msr tpidr_el1, {}", in(reg) cpu + 1, options(nomem, nostack, preserves_flags)) };
}

/// TPIDR_EL1 (index + 1; 0 before `set_cpu_index`, zeroed by the entry code).
#[inline]
pub fn cpu_index_plus_one() -> usize {
    let v: usize;
    // SAFETY: reads TPIDR_EL1.
    unsafe { asm!("mrs {}, tpidr_el1", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// MPIDR_EL1 affinity (aff3.aff2.aff1.aff0).
pub fn hw_id() -> u32 {
    gic::affinity()
}

fn daif_i_set() -> bool {
    let d: u64;
    // SAFETY: reads DAIF.
    unsafe { asm!("mrs {}, daif", out(reg) d, options(nomem, nostack, preserves_flags)) };
    d & (1 << 7) != 0
}

/// Masks the IPIs (PMR to `PMR_OFF`); returns whether they were unmasked. With PSTATE.I set
/// (inside an exception handler: the pseudo-NMI's, or an early boot path) everything is
/// masked already and the PMR is left alone: it belongs to the interrupted code, which must
/// find it unchanged when the handler returns.
#[inline]
pub fn irq_save() -> bool {
    if daif_i_set() {
        return false;
    }
    let was_on = gic::pmr() == gic::PMR_ON;
    gic::set_pmr(gic::PMR_OFF);
    // Orders the masked region's memory accesses after the mask, like a compiler fence.
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    was_on
}

/// Restores [`irq_save`]'s state: PMR back to `PMR_ON` if the IPIs were unmasked (a pending
/// IPI is taken at once); with PSTATE.I set, nothing (see `irq_save`).
#[inline]
pub fn irq_restore(was_enabled: bool) {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    if daif_i_set() {
        return;
    }
    gic::set_pmr(if was_enabled {
        gic::PMR_ON
    } else {
        gic::PMR_OFF
    });
}

/// Whether the IPIs can be taken here: PSTATE.I clear and PMR open.
pub fn irqs_enabled() -> bool {
    !daif_i_set() && gic::pmr() == gic::PMR_ON
}

/// Unmasks: PSTATE.I clear, PMR open.
///
/// # Safety
/// The vectors and the GIC CPU interface must be set up on this CPU.
pub unsafe fn enable_irqs() {
    gic::set_pmr(gic::PMR_ON);
    // SAFETY: forwarded (vectors installed, GIC ready).
    unsafe { asm!("msr daifclr, #2", "isb", options(nostack, preserves_flags)) };
}

/// Masks the IPIs (PMR), leaving the pseudo-NMI deliverable; with PSTATE.I set, nothing
/// (everything is masked already; see `irq_save`).
pub fn disable_irqs() {
    if !daif_i_set() {
        gic::set_pmr(gic::PMR_OFF);
    }
}

/// Waits for an interrupt with IPIs unmasked, as one step: PSTATE.I set, PMR open, `wfi`
/// (which wakes for any interrupt the PMR lets through, whatever PSTATE.I), then PSTATE.I
/// clear, so the interrupt is taken. The caller had checked its condition with IPIs masked.
pub fn enable_irqs_and_wait() {
    // SAFETY: PSTATE.I set around the PMR change keeps interrupts out until after `wfi`; then
    // they are allowed (this CPU is set up: the caller's precondition as a running CPU).
    unsafe { asm!("msr daifset, #2", options(nostack, preserves_flags)) };
    gic::set_pmr(gic::PMR_ON);
    // SAFETY: see above.
    unsafe {
        asm!(
            "dsb sy",
            "wfi",
            "msr daifclr, #2",
            "isb",
            options(nostack, preserves_flags)
        )
    };
}

/// Parks this CPU forever with everything masked.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: parking the CPU.
        unsafe { asm!("msr daifset, #0xf", "wfi", options(nomem, nostack)) };
    }
}

/// Spin-loop hint: `yield`. (`core::hint::spin_loop` is `isb` on aarch64.) Under
/// single-threaded TCG, `yield` hands the host thread to the next vCPU, like `pause` on x86;
/// without it a spinning vCPU keeps the thread for a whole 100 ms round-robin slice.
#[inline(always)]
pub fn pause() {
    // SAFETY: a hint instruction, no effect on state.
    unsafe { asm!("yield", options(nomem, nostack, preserves_flags)) };
}

/// CNTVCT_EL0, the generic timer's virtual count.
#[inline(always)]
pub fn cycles() -> u64 {
    let v: u64;
    // SAFETY: reads the virtual counter (EL1 may always).
    unsafe {
        asm!("isb", "mrs {}, cntvct_el0", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    v
}

fn counter_hz() -> u64 {
    let v: u64;
    // SAFETY: reads CNTFRQ_EL0.
    unsafe { asm!("mrs {}, cntfrq_el0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// The caller's program counter.
#[inline(never)]
pub fn current_pc() -> u64 {
    let v: u64;
    // SAFETY: `adr` of the current instruction.
    unsafe { asm!("adr {}, .", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// The stack pointer.
#[inline(always)]
pub fn current_sp() -> u64 {
    let v: u64;
    // SAFETY: reads SP.
    unsafe { asm!("mov {}, sp", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// `[bottom, top)` of the stack CPU `cpu`'s call IPI handler runs on: no separate interrupt
/// stack here, the handler runs on the interrupted stack (SP_EL1), which is CPU `cpu`'s kernel
/// stack (`KERNEL_STACK_BYTES`), shared with the task code it interrupted.
pub fn call_handler_stack(cpu: usize) -> (usize, usize) {
    crate::config::kernel_stack(cpu)
}

/// An SGI to the CPU with affinity `hw`.
pub fn send_ipi(hw: u32, ipi: Ipi) {
    gic::send_sgi(hw, gic::sgi(ipi));
}

/// ICC_SGI1R_EL1 with IRM=1: every CPU but this one.
pub fn send_ipi_all_but_self(ipi: Ipi) -> bool {
    gic::send_sgi_all_but_self(gic::sgi(ipi));
    true
}

/// A pseudo-NMI (see the module notes for what masks it).
pub const HAS_NMI: bool = true;

/// The pseudo-NMI SGI to one CPU.
pub fn send_nmi(hw: u32) {
    gic::send_sgi(hw, gic::NMI_SGI);
}

/// The pseudo-NMI SGI to every other CPU.
pub fn send_nmi_all_but_self() -> bool {
    gic::send_sgi_all_but_self(gic::NMI_SGI);
    true
}

// ---- PSCI (HVC conduit: QEMU implements PSCI itself when it emulates no EL2/EL3) ----

const PSCI_CPU_ON: u64 = 0xC400_0003;
const PSCI_AFFINITY_INFO: u64 = 0xC400_0004;

fn psci(f: u64, a: u64, b: u64, c: u64) -> i64 {
    let r: i64;
    // SAFETY: a PSCI call; QEMU handles the HVC and returns a status in x0.
    unsafe {
        asm!("hvc #0", inout("x0") f => r, inout("x1") a => _, inout("x2") b => _,
             inout("x3") c => _, options(nostack))
    };
    r
}

/// QEMU `virt`'s MPIDR for CPU `i` with GICv3: aff0 = i % 16, aff1 = i / 16.
fn mpidr_of(i: usize) -> u64 {
    ((i / 16) << 8 | (i % 16)) as u64
}

/// Counts the CPUs: PSCI AFFINITY_INFO answers "invalid parameters" for an MPIDR that does
/// not exist.
fn count_cpus() -> usize {
    let mut n = 1;
    while n < 256 && psci(PSCI_AFFINITY_INFO, mpidr_of(n), 0, 0) >= 0 {
        n += 1;
    }
    n
}

/// PSCI CPU_ON for CPUs 1.. (context id = CPU index).
pub fn start_secondaries(present: usize) {
    let entry = boot::secondary_entry_addr();
    for i in 1..present.min(crate::config::MAX_CPUS) {
        let r = psci(PSCI_CPU_ON, mpidr_of(i), entry, i as u64);
        if r != 0 {
            crate::println!("warning: PSCI CPU_ON({i}) returned {r}");
        }
    }
}

// ---- PL011 UART at 0x0900_0000 ----

const UART: usize = 0x0900_0000;

/// QEMU's PL011 needs no set-up.
pub fn console_init() {}

/// One byte to the PL011 (bounded wait while the FIFO is full).
pub fn console_put(b: u8) {
    // SAFETY: the PL011's flag (0x18) and data (0x00) registers, identity-mapped device memory.
    unsafe {
        let mut spins = 0;
        while core::ptr::read_volatile((UART + 0x18) as *const u32) & (1 << 5) != 0
            && spins < 100_000
        {
            spins += 1;
        }
        core::ptr::write_volatile(UART as *mut u32, b as u32);
    }
}

/// Semihosting SYS_EXIT with ADP_Stopped_ApplicationExit: QEMU exits with status 33 (pass) or
/// 35 (fail), as on x86 (`-semihosting-config enable=on,target=native`).
pub fn exit(success: bool) -> ! {
    let block: [u64; 2] = [0x20026, if success { 33 } else { 35 }];
    // SAFETY: the semihosting trap (`hlt #0xf000`), SYS_EXIT (0x18) with a parameter block.
    unsafe {
        asm!("hlt #0xf000", in("x0") 0x18u64, in("x1") &block as *const _ as u64, options(nostack))
    };
    halt_forever()
}

// ---- Rust entries ----

/// The boot CPU (from `_start`, MMU on, stack set, everything masked).
#[unsafe(no_mangle)]
extern "C" fn aarch64_bsp_main() -> ! {
    // SAFETY: CPU 0, first thing in Rust.
    unsafe { crate::percpu::init_this_cpu(0) };
    crate::console::init();
    crate::println!();
    crate::println!("smpcall bare-metal aarch64 kernel (GICv3, QEMU virt)");
    crate::time::init(counter_hz());
    // SAFETY: QEMU places the DTB at the start of RAM for a non-Linux `-kernel` (the kernel
    // is linked above it); RAM there is mapped and nothing writes it.
    if let Some(args) = unsafe { crate::fdt::bootargs(0x4000_0000) } {
        crate::cmdline::parse(args);
    }
    gic::init_distributor();
    gic::init_cpu();
    // SAFETY: PSTATE.I was set by the entry code; clear it with the PMR at PMR_OFF, so only
    // the pseudo-NMI may arrive until `enable_irqs`.
    unsafe { asm!("msr daifclr, #2", "isb", options(nostack, preserves_flags)) };
    crate::println!(
        "boot: counter {} Hz (CNTVCT_EL0), MPIDR affinity {:#x}, pseudo-NMI: SGI {} at priority \
         0x20, IPIs at 0xA0, mask = ICC_PMR_EL1 0x80",
        counter_hz(),
        hw_id(),
        gic::NMI_SGI
    );
    crate::kernel::bsp_main(count_cpus())
}

/// A secondary CPU (from `secondary_entry`).
#[unsafe(no_mangle)]
extern "C" fn aarch64_secondary_main(cpu: usize) -> ! {
    // SAFETY: `cpu` is the PSCI context id the boot CPU gave this CPU only.
    unsafe { crate::percpu::init_this_cpu(cpu) };
    gic::init_cpu();
    // SAFETY: as on the boot CPU: PMR_OFF, only the pseudo-NMI until `enable_irqs`.
    unsafe { asm!("msr daifclr, #2", "isb", options(nostack, preserves_flags)) };
    crate::kernel::secondary_main(cpu)
}

/// Every exception (kind: 1 sync, 2 IRQ, 3 FIQ, 4 SError, 0 unexpected vector group).
#[unsafe(no_mangle)]
extern "C" fn aarch64_exception(frame: &mut boot::Frame, kind: u64) {
    if kind == 2 {
        irq(frame);
        return;
    }
    let (esr, far): (u64, u64);
    // SAFETY: reads the syndrome and fault address registers.
    unsafe {
        asm!("mrs {}, esr_el1", "mrs {}, far_el1", out(reg) esr, out(reg) far,
             options(nomem, nostack, preserves_flags))
    };
    crate::console::emergency(format_args!(
        "\nEXCEPTION kind {} on cpu {:?}: esr {:#x} (class {:#x}) elr {:#x} far {:#x} spsr {:#x} \
         sp {:#x} lr {:#x}\n",
        kind,
        crate::percpu::current_index(),
        esr,
        esr >> 26,
        frame.elr,
        far,
        frame.spsr,
        frame as *const _ as u64 + boot::FRAME_BYTES,
        frame.lr
    ));
    exit(false)
}

fn irq(frame: &mut boot::Frame) {
    let intid = gic::ack();
    if intid >= 1020 {
        return; // spurious
    }
    if intid == gic::NMI_SGI {
        // PSTATE.I stays set: pseudo-NMIs never nest. The PMR is the interrupted code's.
        let masked = frame.spsr & (1 << 7) != 0 || gic::pmr() != gic::PMR_ON;
        crate::nmi::on_nmi(
            frame.elr,
            frame as *const _ as u64 + boot::FRAME_BYTES,
            masked,
        );
        gic::eoi(intid);
        return;
    }
    // An IPI: run its handler with the IPIs masked by priority, but PSTATE.I clear so the
    // pseudo-NMI can preempt (ELR/SPSR are already saved in the frame).
    let saved_pmr = gic::pmr();
    gic::set_pmr(gic::PMR_OFF);
    // SAFETY: only the pseudo-NMI can be taken now (PMR_OFF, and the running priority 0xA0).
    unsafe { asm!("msr daifclr, #2", "isb", options(nostack, preserves_flags)) };
    match gic::ipi_of(intid) {
        Some(ipi) => crate::irq::handle(ipi),
        None => crate::irq::unexpected(),
    }
    // SAFETY: back to the exception's own mask before the EOI and the return.
    unsafe { asm!("msr daifset, #2", "isb", options(nostack, preserves_flags)) };
    gic::set_pmr(saved_pmr);
    gic::eoi(intid);
}
