//! The GDT (shared by all CPUs, one TSS descriptor per CPU) and the per-CPU TSS, whose IST
//! entries give every interrupt, the NMI and every exception a stack of its own.
//!
//! Why IST for *every* vector: the precompiled `core` of the host target uses the red zone (the
//! 128 bytes below RSP). An interrupt delivered on the interrupted code's stack would push its
//! frame over that red zone. With an IST stack the CPU switches stacks first, always.

use core::cell::UnsafeCell;

use super::{IST_EXC_BYTES, IST_IRQ_BYTES, IST_NMI_BYTES};
use crate::config::MAX_CPUS;

/// Null, 64-bit code (0x08), data (0x10), 32-bit code (0x18, AP trampoline), then one 16-byte
/// TSS descriptor per CPU from 0x20.
const GDT_ENTRIES: usize = 4 + 2 * MAX_CPUS;
/// `lgdt` limit.
pub const GDT_LIMIT: usize = GDT_ENTRIES * 8 - 1;
/// Selector of the 64-bit kernel code segment.
pub const KERNEL_CS: u16 = 0x08;
/// IST index (1-based, as in the IDT) for interrupts.
pub const IST_IRQ: u8 = 1;
/// IST index for the NMI.
pub const IST_NMI: u8 = 2;
/// IST index for exceptions.
pub const IST_EXC: u8 = 3;

/// The GDT, referenced by name from the boot assembly.
#[repr(C, align(16))]
pub struct Gdt(UnsafeCell<[u64; GDT_ENTRIES]>);

// SAFETY: the TSS descriptors are written by each CPU for its own slot only, before it loads
// its task register; the code/data descriptors are never written.
unsafe impl Sync for Gdt {}

/// The GDT itself (the symbol `GDT` for the boot code).
#[unsafe(no_mangle)]
pub static GDT: Gdt = Gdt(UnsafeCell::new({
    let mut g = [0u64; GDT_ENTRIES];
    g[1] = 0x00AF_9A00_0000_FFFF; // 64-bit code, DPL 0
    g[2] = 0x00CF_9200_0000_FFFF; // flat data
    g[3] = 0x00CF_9A00_0000_FFFF; // 32-bit code (AP protected-mode step)
    g
}));

/// The 64-bit task-state segment (only its stack pointers matter here).
#[repr(C, packed(4))]
pub struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

const _: () = assert!(core::mem::size_of::<Tss>() == 104);

impl Tss {
    /// An empty TSS (no I/O bitmap).
    pub const fn new() -> Self {
        Tss {
            _reserved0: 0,
            rsp: [0; 3],
            _reserved1: 0,
            ist: [0; 7],
            _reserved2: 0,
            _reserved3: 0,
            iomap_base: 104,
        }
    }
}

/// Fills `tss` with the IST stacks of the block at `ist_base`, installs its descriptor for
/// `cpu`, reloads the GDT and loads the task register.
///
/// # Safety
/// Runs once per CPU, on CPU `cpu`, with `tss` that CPU's TSS (it lives forever).
pub unsafe fn load(cpu: usize, tss: *mut Tss, ist_base: usize) {
    let irq_top = ist_base + IST_IRQ_BYTES;
    let nmi_top = irq_top + IST_NMI_BYTES;
    let exc_top = nmi_top + IST_EXC_BYTES;
    // SAFETY: our own CPU's TSS; not yet in use by the CPU.
    unsafe {
        (*tss).ist[IST_IRQ as usize - 1] = irq_top as u64;
        (*tss).ist[IST_NMI as usize - 1] = nmi_top as u64;
        (*tss).ist[IST_EXC as usize - 1] = exc_top as u64;
    }
    let base = tss as u64;
    let limit = (core::mem::size_of::<Tss>() - 1) as u64;
    let low = (limit & 0xFFFF)
        | (base & 0xFF_FFFF) << 16
        | 0x89 << 40 // present, type 9: available 64-bit TSS
        | ((limit >> 16) & 0xF) << 48
        | ((base >> 24) & 0xFF) << 56;
    let high = base >> 32;
    let index = 4 + 2 * cpu;
    // SAFETY: slot `index` belongs to this CPU only (see `Gdt`'s Sync impl).
    unsafe {
        let g = GDT.0.get() as *mut u64;
        g.add(index).write_volatile(low);
        g.add(index + 1).write_volatile(high);
    }
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let ptr = Pointer {
        limit: GDT_LIMIT as u16,
        base: GDT.0.get() as u64,
    };
    let selector = (index * 8) as u16;
    // SAFETY: the GDT is valid (same code/data descriptors as at boot) and the TSS descriptor
    // is fresh (not busy) and points to a live TSS.
    unsafe {
        core::arch::asm!(
            "lgdt [{p}]",
            "ltr {s:x}",
            p = in(reg) &ptr,
            s = in(reg) selector,
            options(nostack, preserves_flags)
        );
    }
}
