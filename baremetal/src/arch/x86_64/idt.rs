//! The IDT: 256 entry stubs, every one on an IST stack (interrupts IST1, NMI IST2, exceptions
//! IST3), a common path that saves the general registers and the SSE state (`fxsave64`: the
//! precompiled `core` uses SSE registers), and the Rust dispatcher.

use core::cell::UnsafeCell;

use super::gdt::{IST_EXC, IST_IRQ, IST_NMI, KERNEL_CS};
use super::{apic, cpu, SPURIOUS_VECTOR};

// Stub `v` sits at `isr_stubs + 16 * v`. Vectors for which the CPU pushes an error code (8,
// 10-14, 17, 21, 29, 30) skip the dummy push, so every frame has the same shape:
// [vector, error, rip, cs, rflags, rsp, ss] above the saved registers.
core::arch::global_asm!(
    r#"
    .section .text
    .code64
    .p2align 4
    .global isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .p2align 4
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

    .p2align 4
isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    cld
    /* The IST top is 16-aligned; 7 + 15 eight-byte pushes keep it so. */
    subq $512, %rsp
    fxsave64 (%rsp)
    leaq 512(%rsp), %rdi
    call isr_dispatch
    fxrstor64 (%rsp)
    addq $512, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
"#,
    options(att_syntax)
);

unsafe extern "C" {
    static isr_stubs: u8;
}

/// What the common path saved, as the dispatcher sees it.
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[[u64; 2]; 256]>);

// SAFETY: written once by the BSP before any other CPU loads it; read-only afterwards.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([[0; 2]; 256]));

/// Fills the IDT. BSP only, before the APs start.
pub fn build() {
    let stubs = &raw const isr_stubs as u64;
    for v in 0..256usize {
        let handler = stubs + 16 * v as u64;
        let ist = match v {
            2 => IST_NMI,
            0..=31 => IST_EXC,
            _ => IST_IRQ,
        } as u64;
        // Present, DPL 0, 64-bit interrupt gate (0xE): IF is cleared on entry.
        let low = (handler & 0xFFFF)
            | (KERNEL_CS as u64) << 16
            | ist << 32
            | 0x8E << 40
            | ((handler >> 16) & 0xFFFF) << 48;
        let high = handler >> 32;
        // SAFETY: nobody has loaded the IDT yet (BSP, before `load` and before the APs).
        unsafe { (*IDT.0.get())[v] = [low, high] };
    }
}

/// Loads the IDT on this CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let ptr = Pointer {
        limit: (256 * 16 - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the IDT was built before (BSP order) and lives forever.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &ptr, options(nostack, preserves_flags)) };
}

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor overrun",
    "invalid TSS",
    "segment not present",
    "stack fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 FP",
    "alignment check",
    "machine check",
    "SIMD FP",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

/// The Rust side of every vector. Runs on an IST stack with interrupts masked.
#[unsafe(no_mangle)]
extern "C" fn isr_dispatch(frame: &mut Frame) {
    let v = frame.vector as u8;
    match v {
        2 => crate::nmi::on_nmi(frame.rip, frame.rsp, frame.rflags & cpu::RFLAGS_IF == 0),
        0..=31 => exception(frame),
        SPURIOUS_VECTOR => {}
        _ => {
            match super::ipi_of(v) {
                Some(ipi) => crate::irq::handle(ipi),
                None => crate::irq::unexpected(),
            }
            apic::eoi();
        }
    }
}

fn exception(frame: &Frame) -> ! {
    let v = frame.vector as usize;
    crate::console::emergency(format_args!(
        "\nEXCEPTION {} ({}) on cpu {:?}: error {:#x} rip {:#x} rsp {:#x} rflags {:#x} cr2 {:#x}\n\
         rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}\n",
        v,
        EXCEPTION_NAMES[v & 31],
        crate::percpu::current_index(),
        frame.error,
        frame.rip,
        frame.rsp,
        frame.rflags,
        cpu::cr2(),
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp,
    ));
    super::exit(false)
}
