//! GICv3 on QEMU's `virt` (distributor at 0x0800_0000, redistributors from 0x080A_0000, one
//! 128 KiB pair of frames per CPU), driven through the system-register CPU interface.
//!
//! SGIs 0-3 are the kernel's IPIs at priority 0xA0; SGI 8 is the pseudo-NMI at priority 0x20.
//! Interrupt masking for the engine is the priority mask (ICC_PMR_EL1), as in arm64 Linux's
//! pseudo-NMI mode: `PMR_OFF` (0x80) masks the IPIs but not the pseudo-NMI, `PMR_ON` (0xF0)
//! lets both in. PSTATE.I (DAIF) masks everything, the pseudo-NMI included: it is set by the
//! hardware on every exception entry and by the idle wait around `wfi`.

use core::arch::asm;
use core::ptr::{read_volatile, write_volatile};

use crate::config::Ipi;

const GICD: usize = 0x0800_0000;
const GICR: usize = 0x080A_0000;
const GICR_STRIDE: usize = 0x2_0000;
const SGI_FRAME: usize = 0x1_0000;

const GICD_CTLR: usize = 0x0000;
const GICR_TYPER: usize = 0x0008;
const GICR_WAKER: usize = 0x0014;
const GICR_IGROUPR0: usize = 0x0080;
const GICR_ISENABLER0: usize = 0x0100;
const GICR_IPRIORITYR: usize = 0x0400;

/// Priority mask that lets the IPIs and the pseudo-NMI in.
pub const PMR_ON: u64 = 0xF0;
/// Priority mask that blocks the IPIs (priority 0xA0) but not the pseudo-NMI (0x20).
pub const PMR_OFF: u64 = 0x80;
/// Priority of the kernel's IPIs.
const PRIO_IPI: u8 = 0xA0;
/// Priority of the pseudo-NMI.
const PRIO_NMI: u8 = 0x20;

/// The pseudo-NMI's SGI.
pub const NMI_SGI: u32 = 8;

/// The SGI of an IPI.
pub fn sgi(ipi: Ipi) -> u32 {
    match ipi {
        Ipi::Call => 0,
        Ipi::Wake => 1,
        Ipi::Ping => 2,
        Ipi::Pong => 3,
    }
}

/// The IPI an interrupt id stands for.
pub fn ipi_of(intid: u32) -> Option<Ipi> {
    Some(match intid {
        0 => Ipi::Call,
        1 => Ipi::Wake,
        2 => Ipi::Ping,
        3 => Ipi::Pong,
        _ => return None,
    })
}

fn r32(addr: usize) -> u32 {
    // SAFETY: a GIC register in the identity-mapped device region.
    unsafe { read_volatile(addr as *const u32) }
}

fn w32(addr: usize, v: u32) {
    // SAFETY: as for `r32`; the callers keep the register semantics.
    unsafe { write_volatile(addr as *mut u32, v) }
}

fn r64(addr: usize) -> u64 {
    // SAFETY: as for `r32` (GICR_TYPER is a 64-bit register).
    unsafe { read_volatile(addr as *const u64) }
}

fn w8(addr: usize, v: u8) {
    // SAFETY: as for `r32` (IPRIORITYR is byte-accessible).
    unsafe { write_volatile(addr as *mut u8, v) }
}

macro_rules! sysreg_write {
    ($name:literal, $v:expr) => {
        // SAFETY: a GIC CPU-interface register of this CPU; the callers keep its semantics.
        unsafe { asm!(concat!("msr ", $name, ", {}"), in(reg) $v, options(nostack, preserves_flags)) }
    };
}

macro_rules! sysreg_read {
    ($name:literal) => {{
        let v: u64;
        // SAFETY: reading a GIC CPU-interface register of this CPU.
        unsafe { asm!(concat!("mrs {}, ", $name), out(reg) v, options(nostack, preserves_flags)) };
        v
    }};
}

/// MPIDR_EL1's affinity fields packed as aff3.aff2.aff1.aff0 (the kernel's hardware id).
pub fn affinity() -> u32 {
    let m: u64;
    // SAFETY: reads MPIDR_EL1.
    unsafe { asm!("mrs {}, mpidr_el1", out(reg) m, options(nomem, nostack, preserves_flags)) };
    ((m & 0xFF_FFFF) | ((m >> 32) & 0xFF) << 24) as u32
}

/// Distributor: affinity routing, group 1 on. Boot CPU, once.
pub fn init_distributor() {
    w32(GICD + GICD_CTLR, (1 << 4) | (1 << 1) | 1);
    for _ in 0..1_000_000 {
        if r32(GICD + GICD_CTLR) & (1 << 31) == 0 {
            break;
        }
    }
}

/// This CPU's redistributor and CPU interface: wake it, SGIs 0-3 and 8 in group 1 with their
/// priorities, system-register interface on, priority mask at `PMR_OFF`, group 1 enabled.
pub fn init_cpu() {
    let me = affinity();
    let mut rd = None;
    for i in 0..crate::config::MAX_CPUS {
        let base = GICR + i * GICR_STRIDE;
        let typer = r64(base + GICR_TYPER);
        if (typer >> 32) as u32 == me {
            rd = Some(base);
            break;
        }
        if typer & (1 << 4) != 0 {
            break; // Last
        }
    }
    let rd = rd.expect("no GICv3 redistributor for this CPU");
    let waker = r32(rd + GICR_WAKER);
    w32(rd + GICR_WAKER, waker & !(1 << 1)); // ProcessorSleep off
    for _ in 0..1_000_000 {
        if r32(rd + GICR_WAKER) & (1 << 2) == 0 {
            break; // ChildrenAsleep clear
        }
    }
    let sgi = rd + SGI_FRAME;
    w32(sgi + GICR_IGROUPR0, 0xFFFF_FFFF);
    for id in 0..4 {
        w8(sgi + GICR_IPRIORITYR + id, PRIO_IPI);
    }
    w8(sgi + GICR_IPRIORITYR + NMI_SGI as usize, PRIO_NMI);
    w32(sgi + GICR_ISENABLER0, 0b1111 | 1 << NMI_SGI);

    let sre = sysreg_read!("S3_0_C12_C12_5"); // ICC_SRE_EL1
    sysreg_write!("S3_0_C12_C12_5", sre | 1);
    isb();
    set_pmr(PMR_OFF);
    sysreg_write!("S3_0_C12_C12_3", 0u64); // ICC_BPR1_EL1: finest preemption
    sysreg_write!("S3_0_C12_C12_4", 0u64); // ICC_CTLR_EL1: EOImode 0
    sysreg_write!("S3_0_C12_C12_7", 1u64); // ICC_IGRPEN1_EL1
    isb();
}

/// `isb`.
#[inline(always)]
pub fn isb() {
    // SAFETY: a barrier.
    unsafe { asm!("isb", options(nostack, preserves_flags)) };
}

/// ICC_PMR_EL1.
#[inline(always)]
pub fn pmr() -> u64 {
    sysreg_read!("S3_0_C4_C6_0")
}

/// Writes ICC_PMR_EL1 and synchronises, so the new mask holds from the next instruction.
#[inline(always)]
pub fn set_pmr(v: u64) {
    sysreg_write!("S3_0_C4_C6_0", v);
    isb();
}

/// ICC_IAR1_EL1: acknowledges the highest-priority pending group-1 interrupt.
pub fn ack() -> u32 {
    (sysreg_read!("S3_0_C12_C12_0") & 0xFF_FFFF) as u32
}

/// ICC_EOIR1_EL1: priority drop and deactivation (EOImode 0).
pub fn eoi(intid: u32) {
    sysreg_write!("S3_0_C12_C12_1", intid as u64);
    isb();
}

fn sgi1r(intid: u32) -> u64 {
    (intid as u64 & 0xF) << 24
}

/// An SGI to the CPU with affinity `hw` (aff0 < 16, as on QEMU's `virt`).
pub fn send_sgi(hw: u32, intid: u32) {
    let aff0 = hw & 0xFF;
    let aff1 = (hw >> 8) & 0xFF;
    let aff2 = (hw >> 16) & 0xFF;
    let aff3 = (hw >> 24) & 0xFF;
    let v = sgi1r(intid)
        | (aff3 as u64) << 48
        | (aff2 as u64) << 32
        | (aff1 as u64) << 16
        | 1u64 << (aff0 & 0xF);
    // The stores that queued the call must be visible before the SGI can be taken.
    // SAFETY: a barrier.
    unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
    sysreg_write!("S3_0_C12_C11_5", v); // ICC_SGI1R_EL1
    isb();
}

/// An SGI to every CPU but this one (ICC_SGI1R_EL1.IRM).
pub fn send_sgi_all_but_self(intid: u32) {
    // SAFETY: a barrier (see `send_sgi`).
    unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
    sysreg_write!("S3_0_C12_C11_5", sgi1r(intid) | 1 << 40);
    isb();
}
