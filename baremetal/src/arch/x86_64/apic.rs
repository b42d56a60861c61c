//! The local APIC in xAPIC mode (MMIO at 0xFEE0_0000; QEMU's TCG offers no x2APIC).
//!
//! IPIs go through the interrupt command register: ICR high (destination APIC id) then ICR low
//! (vector, delivery mode, shorthand), whose write sends. The pair is written with interrupts
//! masked so an interrupt handler on the same CPU cannot send in between and retarget it; a
//! send from an NMI handler restores ICR high afterwards (see `send`).

use core::ptr::{read_volatile, write_volatile};

use super::cpu as arch;
use super::SPURIOUS_VECTOR;

const BASE: usize = 0xFEE0_0000;

const REG_ID: usize = 0x20;
const REG_TPR: usize = 0x80;
const REG_EOI: usize = 0xB0;
const REG_SVR: usize = 0xF0;
const REG_ESR: usize = 0x280;
const REG_ICR_LOW: usize = 0x300;
const REG_ICR_HIGH: usize = 0x310;
const REG_LVT_TIMER: usize = 0x320;
const REG_LVT_LINT0: usize = 0x350;
const REG_LVT_ERROR: usize = 0x370;

const LVT_MASKED: u32 = 1 << 16;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;

/// Delivery modes (ICR bits 8-10).
const MODE_FIXED: u32 = 0b000 << 8;
const MODE_NMI: u32 = 0b100 << 8;
const MODE_INIT: u32 = 0b101 << 8;
const MODE_STARTUP: u32 = 0b110 << 8;

/// Destination shorthands (ICR bits 18-19).
const DEST_NONE: u32 = 0b00 << 18;
const DEST_ALL_BUT_SELF: u32 = 0b11 << 18;

fn read(reg: usize) -> u32 {
    // SAFETY: an xAPIC register, identity-mapped (uncached) by the boot code.
    unsafe { read_volatile((BASE + reg) as *const u32) }
}

fn write(reg: usize, value: u32) {
    // SAFETY: as for `read`; the callers keep the register semantics.
    unsafe { write_volatile((BASE + reg) as *mut u32, value) }
}

/// This CPU's APIC id.
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// Enables this CPU's local APIC: software enable with the spurious vector, accept every
/// priority, mask the timer, LINT0 (the legacy PIC) and error LVTs.
pub fn enable() {
    // SAFETY: the APIC base MSR exists on every CPU with an APIC; we only set the global
    // enable bit (it is normally set already) and keep the base.
    unsafe {
        let base = arch::rdmsr(arch::MSR_APIC_BASE);
        arch::wrmsr(arch::MSR_APIC_BASE, base | 1 << 11);
    }
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_ERROR, LVT_MASKED);
    write(REG_ESR, 0);
    write(REG_TPR, 0);
    write(REG_SVR, 0x100 | SPURIOUS_VECTOR as u32);
}

/// End of interrupt for the vector being served.
pub fn eoi() {
    write(REG_EOI, 0);
}

fn wait_idle() {
    // A real xAPIC may still be delivering the previous IPI; QEMU's never is. Bounded.
    for _ in 0..1_000_000 {
        if read(REG_ICR_LOW) & ICR_DELIVERY_PENDING == 0 {
            return;
        }
        arch::pause();
    }
}

fn send(dest_apic_id: u32, low: u32) {
    let irq = arch::irq_save();
    // Masking keeps interrupt handlers out of the two-write sequence, but not an NMI handler.
    // One that sends (the engine's NMI functions may make no-wait calls) could land between
    // the interrupted code's ICR-high and ICR-low writes; it restores ICR high afterwards, so
    // the interrupted send still goes where it was meant to.
    let in_nmi = crate::nmi::in_nmi();
    let saved_high = if in_nmi {
        Some(read(REG_ICR_HIGH))
    } else {
        None
    };
    wait_idle();
    write(REG_ICR_HIGH, dest_apic_id << 24);
    write(REG_ICR_LOW, low);
    if let Some(high) = saved_high {
        wait_idle();
        write(REG_ICR_HIGH, high);
    }
    arch::irq_restore(irq);
}

/// A fixed-vector IPI to one CPU (by APIC id).
pub fn send_fixed(dest_apic_id: u32, vector: u8) {
    send(
        dest_apic_id,
        MODE_FIXED | ICR_LEVEL_ASSERT | DEST_NONE | vector as u32,
    );
}

/// A fixed-vector IPI to every CPU but this one (one ICR write).
pub fn send_fixed_all_but_self(vector: u8) {
    send(
        0,
        MODE_FIXED | ICR_LEVEL_ASSERT | DEST_ALL_BUT_SELF | vector as u32,
    );
}

/// An NMI to every CPU but this one: it arrives even where interrupts are masked.
pub fn send_nmi_all_but_self() {
    send(0, MODE_NMI | ICR_LEVEL_ASSERT | DEST_ALL_BUT_SELF);
}

/// An NMI to one CPU.
pub fn send_nmi(dest_apic_id: u32) {
    send(dest_apic_id, MODE_NMI | ICR_LEVEL_ASSERT | DEST_NONE);
}

/// INIT to every other CPU (AP start-up, step 1).
pub fn send_init_all_but_self() {
    send(0, MODE_INIT | ICR_LEVEL_ASSERT | DEST_ALL_BUT_SELF);
}

/// STARTUP to every other CPU, entering real mode at `page << 12`.
pub fn send_startup_all_but_self(page: u8) {
    send(
        0,
        MODE_STARTUP | ICR_LEVEL_ASSERT | DEST_ALL_BUT_SELF | page as u32,
    );
}
