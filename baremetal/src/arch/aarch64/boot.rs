//! Entry, MMU, exception vectors.
//!
//! * **Boot CPU.** QEMU's `-kernel` loads the ELF at its link address (0x40200000) and enters
//!   `_start` at EL1 (no EL2/EL3 is emulated without `virtualization=on`/`secure=on`), MMU off.
//!   We mask DAIF, enable FP/SIMD (CPACR_EL1.FPEN: the `core` of `aarch64-unknown-none` uses
//!   NEON registers), zero `.bss`, turn the MMU on with a two-entry identity map (1 GiB blocks:
//!   0-1 GiB device memory for the GIC and the UART, 1-2 GiB normal write-back memory for RAM),
//!   point VBAR_EL1 at the vectors, take CPU 0's stack and call `aarch64_bsp_main`.
//! * **Secondary CPUs.** Started by PSCI CPU_ON at `secondary_entry` with their CPU index as
//!   the context id in x0; same steps without the `.bss` zeroing, then `aarch64_secondary_main`.
//! * **Vectors.** Only "current EL with SP_ELx" is used: sync and IRQ go to Rust with a frame
//!   holding x0-x30, ELR, SPSR, FPSR, FPCR and q0-q31 (the interrupted code may hold live
//!   SIMD values; Rust handlers use them too). There is no red zone on aarch64, so handlers
//!   run on the interrupted stack (SP_EL1).

use crate::config::{KERNEL_STACK_BYTES, MAX_CPUS};

/// Bytes the vector stub pushes (must match the assembly).
pub const FRAME_BYTES: u64 = 800;

/// What the vector stub saved.
#[repr(C)]
pub struct Frame {
    pub x: [u64; 30],
    pub lr: u64,
    pub elr: u64,
    pub spsr: u64,
    pub fpsr: u64,
    pub fpcr: u64,
    _pad: u64,
    pub q: [u128; 32],
}

const _: () = assert!(core::mem::size_of::<Frame>() as u64 == FRAME_BYTES);

core::arch::global_asm!(
    r#"
/* Identity map, level 1, 4 KiB granule, T0SZ = 25 (39-bit VA). */
    .section .data
    .p2align 12
boot_l1:
    .quad 0x0040000000000401        /* 0-1 GiB: block, AF, AttrIndx 0 (device), XN */
    .quad 0x0000000040000705        /* 1-2 GiB: block, AF, inner shareable, AttrIndx 1 (normal WB) */
    .fill 510, 8, 0

.macro CPU_SETUP
    msr daifset, #0xf
    mov x9, #(3 << 20)              /* CPACR_EL1.FPEN: no FP/SIMD traps */
    msr cpacr_el1, x9
    msr tpidr_el1, xzr              /* per-CPU index + 1: none yet */
    msr spsel, #1
    isb
    ldr x9, =0xff00                 /* MAIR: attr0 device-nGnRnE, attr1 normal WB RA/WA */
    msr mair_el1, x9
    ldr x9, =0x100803519            /* TCR: T0SZ 25, IRGN0/ORGN0 WB, SH0 inner, TG0 4K, EPD1, IPS 36 bit */
    msr tcr_el1, x9
    adrp x9, boot_l1
    msr ttbr0_el1, x9
    isb
    tlbi vmalle1
    dsb ish
    isb
    mrs x9, sctlr_el1
    orr x9, x9, #(1 << 0)           /* M */
    orr x9, x9, #(1 << 2)           /* C */
    orr x9, x9, #(1 << 12)          /* I */
    bic x9, x9, #(1 << 1)           /* A: no alignment checks */
    msr sctlr_el1, x9
    isb
    adrp x9, exception_vectors
    add x9, x9, :lo12:exception_vectors
    msr vbar_el1, x9
    isb
.endm

    .section .text.boot, "ax"
    .global _start
_start:
    CPU_SETUP
    adrp x1, __bss_start
    add x1, x1, :lo12:__bss_start
    adrp x2, __bss_end
    add x2, x2, :lo12:__bss_end
1:  cmp x1, x2
    b.hs 2f
    stp xzr, xzr, [x1], #16
    b 1b
2:  adrp x1, kernel_stacks
    add x1, x1, :lo12:kernel_stacks
    ldr x2, ={KSTACK}
    add sp, x1, x2
    mov x29, xzr
    bl aarch64_bsp_main
3:  wfi
    b 3b

    .global secondary_entry
secondary_entry:
    mov x19, x0                     /* CPU index (PSCI context id) */
    CPU_SETUP
    cmp x19, #{MAX_CPUS}
    b.hs 5f
    adrp x1, kernel_stacks
    add x1, x1, :lo12:kernel_stacks
    ldr x2, ={KSTACK}
    add x3, x19, #1
    madd x1, x2, x3, x1
    mov sp, x1
    mov x29, xzr
    mov x0, x19
    bl aarch64_secondary_main
5:  wfi
    b 5b

/* ---- exception vectors ---- */
/* The vector entry saved x0/x1 and put the kind in x1; save the rest with x2/x3 as scratch. */
.macro SAVE_REST
    stp x2, x3, [sp, #16]
    stp x4, x5, [sp, #32]
    stp x6, x7, [sp, #48]
    stp x8, x9, [sp, #64]
    stp x10, x11, [sp, #80]
    stp x12, x13, [sp, #96]
    stp x14, x15, [sp, #112]
    stp x16, x17, [sp, #128]
    stp x18, x19, [sp, #144]
    stp x20, x21, [sp, #160]
    stp x22, x23, [sp, #176]
    stp x24, x25, [sp, #192]
    stp x26, x27, [sp, #208]
    stp x28, x29, [sp, #224]
    mrs x2, elr_el1
    stp x30, x2, [sp, #240]
    mrs x2, spsr_el1
    mrs x3, fpsr
    stp x2, x3, [sp, #256]
    mrs x2, fpcr
    str x2, [sp, #272]
    add x2, sp, #288
    stp q0, q1, [x2, #0]
    stp q2, q3, [x2, #32]
    stp q4, q5, [x2, #64]
    stp q6, q7, [x2, #96]
    stp q8, q9, [x2, #128]
    stp q10, q11, [x2, #160]
    stp q12, q13, [x2, #192]
    stp q14, q15, [x2, #224]
    stp q16, q17, [x2, #256]
    stp q18, q19, [x2, #288]
    stp q20, q21, [x2, #320]
    stp q22, q23, [x2, #352]
    stp q24, q25, [x2, #384]
    stp q26, q27, [x2, #416]
    stp q28, q29, [x2, #448]
    stp q30, q31, [x2, #480]
.endm

.macro RESTORE_FRAME_ERET
    add x0, sp, #288
    ldp q0, q1, [x0, #0]
    ldp q2, q3, [x0, #32]
    ldp q4, q5, [x0, #64]
    ldp q6, q7, [x0, #96]
    ldp q8, q9, [x0, #128]
    ldp q10, q11, [x0, #160]
    ldp q12, q13, [x0, #192]
    ldp q14, q15, [x0, #224]
    ldp q16, q17, [x0, #256]
    ldp q18, q19, [x0, #288]
    ldp q20, q21, [x0, #320]
    ldp q22, q23, [x0, #352]
    ldp q24, q25, [x0, #384]
    ldp q26, q27, [x0, #416]
    ldp q28, q29, [x0, #448]
    ldp q30, q31, [x0, #480]
    ldr x0, [sp, #272]
    msr fpcr, x0
    ldp x0, x1, [sp, #256]
    msr spsr_el1, x0
    msr fpsr, x1
    ldp x30, x0, [sp, #240]
    msr elr_el1, x0
    ldp x0, x1, [sp, #0]
    ldp x2, x3, [sp, #16]
    ldp x4, x5, [sp, #32]
    ldp x6, x7, [sp, #48]
    ldp x8, x9, [sp, #64]
    ldp x10, x11, [sp, #80]
    ldp x12, x13, [sp, #96]
    ldp x14, x15, [sp, #112]
    ldp x16, x17, [sp, #128]
    ldp x18, x19, [sp, #144]
    ldp x20, x21, [sp, #160]
    ldp x22, x23, [sp, #176]
    ldp x24, x25, [sp, #192]
    ldp x26, x27, [sp, #208]
    ldp x28, x29, [sp, #224]
    add sp, sp, #{FRAME}
    eret
.endm

.macro VECTOR kind
    .p2align 7
    sub sp, sp, #{FRAME}
    stp x0, x1, [sp, #0]
    mov x1, #\kind
    b exception_common
.endm

    .section .text
    .p2align 11
    .global exception_vectors
exception_vectors:
    VECTOR 0    /* current EL, SP_EL0: sync */
    VECTOR 0    /* irq (never used) */
    VECTOR 0    /* fiq */
    VECTOR 0    /* serror */
    VECTOR 1    /* current EL, SP_ELx: sync */
    VECTOR 2    /* irq */
    VECTOR 3    /* fiq */
    VECTOR 4    /* serror */
    VECTOR 0    /* lower EL, AArch64 */
    VECTOR 0
    VECTOR 0
    VECTOR 0
    VECTOR 0    /* lower EL, AArch32 */
    VECTOR 0
    VECTOR 0
    VECTOR 0

exception_common:
    SAVE_REST
    mov x0, sp
    bl aarch64_exception
    RESTORE_FRAME_ERET
"#,
    KSTACK = const KERNEL_STACK_BYTES,
    MAX_CPUS = const MAX_CPUS,
    FRAME = const FRAME_BYTES,
);

unsafe extern "C" {
    static secondary_entry: u8;
}

/// Physical address of the secondary CPUs' entry (identity-mapped).
pub fn secondary_entry_addr() -> u64 {
    &raw const secondary_entry as u64
}
