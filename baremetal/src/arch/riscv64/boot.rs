//! Entry and the trap vector.
//!
//! * **Boot hart.** OpenSBI (QEMU's `-bios default`) enters `_start` in S-mode with a0 = hart
//!   id, a1 = DTB, satp = 0 (bare: no MMU, physical addresses), SIE clear. We clear `sie`,
//!   zero `.bss`, take CPU 0's stack, set `stvec` and call `riscv_bsp_main(hart)`.
//! * **Other harts.** Started by SBI HSM `hart_start` at `secondary_entry` with a0 = hart id,
//!   a1 = opaque = their CPU index; then `riscv_secondary_main(hart, cpu)`.
//! * **Traps.** One direct-mode vector: saves x1, x3-x31, sepc and sstatus on the interrupted
//!   stack (the RISC-V ABI has no red zone) and calls `riscv_trap`. The target is
//!   `riscv64imac` (no F/D), so there is no floating-point state to save, and `tp` (the
//!   per-CPU register) is never used by compiled code.

use crate::config::{KERNEL_STACK_BYTES, MAX_CPUS};

/// Bytes the trap entry pushes.
pub const FRAME_BYTES: u64 = 272;

/// What the trap entry saved: `x[i]` is register xi (x0 and x2 unused).
#[repr(C)]
pub struct Frame {
    pub x: [u64; 32],
    pub sepc: u64,
    pub sstatus: u64,
}

const _: () = assert!(core::mem::size_of::<Frame>() as u64 == FRAME_BYTES);

core::arch::global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
_start:
    csrw sie, zero
    csrci sstatus, 2
    mv tp, zero
    la t0, __bss_start
    la t1, __bss_end
1:  bgeu t0, t1, 2f
    sd zero, 0(t0)
    addi t0, t0, 8
    j 1b
2:  la sp, kernel_stacks
    li t1, {KSTACK}
    add sp, sp, t1
    la t0, trap_entry
    csrw stvec, t0
    call riscv_bsp_main
3:  wfi
    j 3b

    .global secondary_entry
secondary_entry:
    csrw sie, zero
    csrci sstatus, 2
    mv tp, zero
    li t0, {MAX_CPUS}
    bgeu a1, t0, 5f
    la sp, kernel_stacks
    li t1, {KSTACK}
    addi t2, a1, 1
    mul t2, t2, t1
    add sp, sp, t2
    la t0, trap_entry
    csrw stvec, t0
    call riscv_secondary_main
5:  wfi
    j 5b

    .section .text
    .p2align 2
    .global trap_entry
trap_entry:
    addi sp, sp, -{FRAME}
    sd x1, 8(sp)
    sd x3, 24(sp)
    sd x4, 32(sp)
    sd x5, 40(sp)
    sd x6, 48(sp)
    sd x7, 56(sp)
    sd x8, 64(sp)
    sd x9, 72(sp)
    sd x10, 80(sp)
    sd x11, 88(sp)
    sd x12, 96(sp)
    sd x13, 104(sp)
    sd x14, 112(sp)
    sd x15, 120(sp)
    sd x16, 128(sp)
    sd x17, 136(sp)
    sd x18, 144(sp)
    sd x19, 152(sp)
    sd x20, 160(sp)
    sd x21, 168(sp)
    sd x22, 176(sp)
    sd x23, 184(sp)
    sd x24, 192(sp)
    sd x25, 200(sp)
    sd x26, 208(sp)
    sd x27, 216(sp)
    sd x28, 224(sp)
    sd x29, 232(sp)
    sd x30, 240(sp)
    sd x31, 248(sp)
    csrr t0, sepc
    sd t0, 256(sp)
    csrr t0, sstatus
    sd t0, 264(sp)
    mv a0, sp
    call riscv_trap
    ld t0, 256(sp)
    csrw sepc, t0
    ld t0, 264(sp)
    csrw sstatus, t0
    ld x1, 8(sp)
    ld x3, 24(sp)
    ld x4, 32(sp)
    ld x5, 40(sp)
    ld x6, 48(sp)
    ld x7, 56(sp)
    ld x8, 64(sp)
    ld x9, 72(sp)
    ld x10, 80(sp)
    ld x11, 88(sp)
    ld x12, 96(sp)
    ld x13, 104(sp)
    ld x14, 112(sp)
    ld x15, 120(sp)
    ld x16, 128(sp)
    ld x17, 136(sp)
    ld x18, 144(sp)
    ld x19, 152(sp)
    ld x20, 160(sp)
    ld x21, 168(sp)
    ld x22, 176(sp)
    ld x23, 184(sp)
    ld x24, 192(sp)
    ld x25, 200(sp)
    ld x26, 208(sp)
    ld x27, 216(sp)
    ld x28, 224(sp)
    ld x29, 232(sp)
    ld x30, 240(sp)
    ld x31, 248(sp)
    addi sp, sp, {FRAME}
    sret
"#,
    KSTACK = const KERNEL_STACK_BYTES,
    MAX_CPUS = const MAX_CPUS,
    FRAME = const FRAME_BYTES,
);

unsafe extern "C" {
    static secondary_entry: u8;
}

/// Physical address of the other harts' entry.
pub fn secondary_entry_addr() -> u64 {
    &raw const secondary_entry as u64
}
