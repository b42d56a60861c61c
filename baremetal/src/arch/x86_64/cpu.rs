//! Thin wrappers over x86_64 instructions: port I/O, MSRs, interrupt flag, TSC, halt.

use core::arch::asm;

/// Writes a byte to an I/O port.
///
/// # Safety
/// The port write must not break an invariant of the machine (device programming).
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: forwarded.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 16-bit word to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: forwarded.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit word to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: forwarded.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// As for [`outb`] (reads can have side effects).
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: forwarded.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Reads a model-specific register.
///
/// # Safety
/// `msr` must exist on this CPU.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: forwarded.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (hi as u64) << 32 | lo as u64
}

/// Writes a model-specific register.
///
/// # Safety
/// `msr` must exist and the value must not break the kernel's invariants.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

/// IA32_GS_BASE: the per-CPU data pointer.
pub const MSR_GS_BASE: u32 = 0xC000_0101;
/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1B;

/// RFLAGS.
pub fn rflags() -> u64 {
    let f: u64;
    // SAFETY: reads the flags through the stack; no other effect.
    unsafe { asm!("pushfq", "pop {}", out(reg) f, options(nomem, preserves_flags)) };
    f
}

/// RFLAGS.IF.
pub const RFLAGS_IF: u64 = 1 << 9;

/// Whether interrupts are enabled on this CPU.
pub fn irqs_enabled() -> bool {
    rflags() & RFLAGS_IF != 0
}

/// `cli`, returning whether interrupts were enabled before.
pub fn irq_save() -> bool {
    let f: u64;
    // SAFETY: masking interrupts is always allowed in ring 0. Not `nomem`: it orders the
    // surrounding memory accesses like a compiler fence, which masked regions rely on.
    unsafe { asm!("pushfq", "pop {}", "cli", out(reg) f, options(preserves_flags)) };
    f & RFLAGS_IF != 0
}

/// Restores the state returned by [`irq_save`]: `sti` if interrupts were enabled. A pending
/// interrupt is taken right after the instruction that follows `sti`.
pub fn irq_restore(was_enabled: bool) {
    if was_enabled {
        // SAFETY: re-enabling interrupts the caller had enabled; the IDT is loaded.
        unsafe { asm!("sti", options(nostack)) };
    } else {
        // SAFETY: masking is always allowed.
        unsafe { asm!("cli", options(nostack)) };
    }
}

/// `sti`.
///
/// # Safety
/// The IDT must be loaded and the CPU ready to take interrupts.
pub unsafe fn enable_irqs() {
    // SAFETY: forwarded.
    unsafe { asm!("sti", options(nostack)) };
}

/// `cli`.
pub fn disable_irqs() {
    // SAFETY: masking is always allowed.
    unsafe { asm!("cli", options(nostack)) };
}

/// `sti; hlt` as one step: an interrupt that became pending before the `sti` still wakes the
/// `hlt` (the `sti` shadow covers the next instruction), so no wake-up is lost between a check
/// made with interrupts masked and the halt.
pub fn enable_irqs_and_halt() {
    // SAFETY: waits for an interrupt with interrupts on; the IDT is loaded (caller is a
    // running CPU).
    unsafe { asm!("sti", "hlt", options(nostack)) };
}

/// Halts forever with interrupts masked (NMIs still arrive).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: parking the CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// `pause`: the spin-loop hint (under QEMU's TCG it also lets the next vCPU run).
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

/// The time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the TSC (CR4.TSD is clear).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (hi as u64) << 32 | lo as u64
}

/// CR2 (the faulting address of a page fault).
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no effect.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// CPUID.
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    // SAFETY: CPUID exists on every x86_64 CPU.
    #[allow(unused_unsafe)]
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, sub) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// The address of the instruction after this call (for the NMI dump's "self" line).
#[inline(never)]
pub fn current_rip() -> u64 {
    let rip: u64;
    // SAFETY: `lea` of the next instruction.
    unsafe { asm!("lea {}, [rip]", out(reg) rip, options(nomem, nostack, preserves_flags)) };
    rip
}

/// The stack pointer.
#[inline(always)]
pub fn current_rsp() -> u64 {
    let rsp: u64;
    // SAFETY: reads RSP.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    rsp
}
