//! From QEMU's PVH entry (32-bit protected mode, paging off) to Rust in 64-bit long mode, for
//! the bootstrap processor and, through a real-mode trampoline at 0x8000, for the application
//! processors.
//!
//! * **PVH note.** QEMU's `-kernel` loader accepts an ELF64 kernel if it carries an ELF note
//!   named "Xen" of type 18 (`XEN_ELFNOTE_PHYS32_ENTRY`) whose descriptor is the physical
//!   address of a 32-bit entry point. It calls that entry with the start-info pointer in `ebx`.
//! * **BSP.** Zero `.bss`, identity-map the first 4 GiB with 2 MiB pages (the top GiB, where the
//!   local APIC's MMIO page lives, uncached), load our GDT, enable PAE + SSE bits in CR4, point
//!   CR3 at the tables, set EFER.LME, turn paging on, far-jump to 64-bit code, take CPU 0's
//!   stack and call `kmain`.
//! * **APs.** A SIPI starts them in real mode at 0x8000 (vector 0x08), where `smp::start_aps`
//!   copied `ap_trampoline_start..ap_trampoline_end`. They load the same GDT, enter protected
//!   mode, then long mode through the same steps (the page tables exist by then), take a CPU
//!   index with one atomic add, switch to that CPU's stack and call `ap_main`.
//!
//! Stacks and page tables live in `.bss` here; sizes come from `crate::config`.

use super::gdt::GDT_LIMIT;
use super::IST_STACK_BYTES;
use crate::config::{KERNEL_STACK_BYTES, MAX_CPUS};

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4                 /* name size: "Xen\0" */
    .long 8                 /* descriptor size: a 64-bit physical address */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .quad pvh_start
    .p2align 2

/* Protected mode -> long mode. Expects the page tables built, the GDT loaded, flat data
   segments. Jumps to \target in 64-bit mode (selector 0x08). No stack used. */
.macro ENTER_LONG_MODE target
    movl %cr4, %eax
    orl $0x620, %eax        /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx  /* EFER */
    rdmsr
    orl $0x100, %eax        /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0xFFFFFFFB, %eax  /* EM off: SSE allowed */
    orl $0x80000023, %eax   /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmp $0x08, $\target
.endm

.macro FLAT_DATA_SEGMENTS
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
.endm

    .section .text.boot, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    movl %ebx, %ebp                 /* PVH start info */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    movl %ebp, pvh_start_info

    movl $boot_pdpt, %eax           /* PML4[0] -> PDPT */
    orl $3, %eax
    movl %eax, boot_pml4
    movl $boot_pd, %eax             /* PDPT[0..4] -> PD0..PD3 */
    orl $3, %eax
    xorl %ecx, %ecx
1:  movl %eax, boot_pdpt(,%ecx,8)
    addl $4096, %eax
    incl %ecx
    cmpl $4, %ecx
    jb 1b
    xorl %ecx, %ecx                 /* 2048 x 2 MiB: identity map of 0..4 GiB */
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax                 /* present | writable | 2 MiB page */
    cmpl $1536, %ecx
    jb 3f
    orl $0x18, %eax                 /* top GiB (APIC, IOAPIC, ...): PWT | PCD */
3:  movl %eax, boot_pd(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b

    lgdt boot_gdt_ptr
    FLAT_DATA_SEGMENTS
    ENTER_LONG_MODE bsp_long_mode

    .code64
bsp_long_mode:
    FLAT_DATA_SEGMENTS
    movq $kernel_stacks + {KSTACK}, %rsp
    xorl %ebp, %ebp
    movl pvh_start_info(%rip), %edi
    call kmain
4:  cli
    hlt
    jmp 4b

/* ---- AP trampoline: copied to 0x8000, entered in real mode by the SIPI (vector 0x08). ---- */
    .code16
    .global ap_trampoline_start
    .global ap_trampoline_end
ap_trampoline_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl 0x8000 + (ap_trampoline_gdtr - ap_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $ap_protected_mode
    .p2align 3
ap_trampoline_gdtr:
    .word {GDT_LIMIT}
    .long GDT
ap_trampoline_end:

    .code32
ap_protected_mode:
    FLAT_DATA_SEGMENTS
    ENTER_LONG_MODE ap_long_mode

    .code64
ap_long_mode:
    FLAT_DATA_SEGMENTS
    movl $1, %eax
    lock xaddl %eax, ap_next_index(%rip)
    cmpl ${MAX_CPUS}, %eax
    jae 5f                          /* more CPUs than we support: park this one */
    movl %eax, %edi
    leaq 1(%rax), %rcx
    imulq ${KSTACK}, %rcx, %rcx
    addq $kernel_stacks, %rcx
    movq %rcx, %rsp
    xorl %ebp, %ebp
    call ap_main
5:  cli
    hlt
    jmp 5b

    .section .data
    .p2align 3
boot_gdt_ptr:
    .word {GDT_LIMIT}
    .long GDT
    .global ap_next_index
ap_next_index:
    .long 1                         /* CPU 0 is the BSP */
    .global pvh_start_info
pvh_start_info:
    .long 0

    .section .bss, "aw", @nobits
    .p2align 12
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
    .global ist_stacks
ist_stacks:
    .skip {IST} * {MAX_CPUS}
"#,
    KSTACK = const KERNEL_STACK_BYTES,
    IST = const IST_STACK_BYTES,
    MAX_CPUS = const MAX_CPUS,
    GDT_LIMIT = const GDT_LIMIT,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ist_stacks: u8;
    static ap_next_index: u32;
}

/// The AP trampoline's bytes (to be copied to 0x8000).
pub fn trampoline() -> (*const u8, usize) {
    // Two labels of the same section; only their addresses are taken.
    let start = &raw const ap_trampoline_start;
    let end = &raw const ap_trampoline_end;
    (start, end as usize - start as usize)
}

/// How many CPUs have entered long mode (the BSP included).
pub fn cpus_entered() -> u32 {
    // SAFETY: a 4-byte aligned location the APs update with `lock xadd`; read atomically.
    unsafe {
        let p = (&raw const ap_next_index).cast_mut();
        core::sync::atomic::AtomicU32::from_ptr(p).load(core::sync::atomic::Ordering::SeqCst)
    }
}

/// Base address of CPU `cpu`'s block of interrupt stacks (`IST_STACK_BYTES` long).
pub fn ist_block(cpu: usize) -> usize {
    let base = &raw const ist_stacks as usize;
    base + cpu * IST_STACK_BYTES
}
