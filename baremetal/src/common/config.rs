//! Sizes, and the kinds of inter-processor interrupt the kernel uses.

/// Most CPUs this kernel runs (the engine's `StaticStorage<MAX_CPUS>`); extra CPUs are parked.
/// The kernel's own CPU sets are `u64` bitmasks, so 64 is the ceiling here (the xAPIC's 8-bit
/// physical destination would allow 255).
pub const MAX_CPUS: usize = 64;

/// Each CPU's task stack.
pub const KERNEL_STACK_BYTES: usize = 128 * 1024;

/// Every CPU's task stack, `KERNEL_STACK_BYTES` each, in `.bss`. Each architecture's boot code
/// points its stack pointer into it by the symbol's name (`kernel_stacks`).
#[repr(C, align(4096))]
pub struct KernelStacks([u8; KERNEL_STACK_BYTES * MAX_CPUS]);

/// The stacks themselves; only their addresses are taken from Rust.
#[no_mangle]
#[allow(non_upper_case_globals)]
static mut kernel_stacks: KernelStacks = KernelStacks([0; KERNEL_STACK_BYTES * MAX_CPUS]);

/// `[bottom, top)` of CPU `cpu`'s kernel stack (where its call handlers run, on the
/// architectures without separate interrupt stacks; x86_64 runs them on IST stacks).
#[cfg(not(target_arch = "x86_64"))]
pub fn kernel_stack(cpu: usize) -> (usize, usize) {
    // Only the static's address is taken.
    let bottom = &raw const kernel_stacks as usize + cpu * KERNEL_STACK_BYTES;
    (bottom, bottom + KERNEL_STACK_BYTES)
}

/// The kernel's IPIs. Each architecture maps them to its own vectors / SGIs / software
/// interrupt bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipi {
    /// The cross-CPU call interrupt: its handler is `Engine::handle_ipi`.
    Call,
    /// Wakes an idle CPU for a task (no engine involvement).
    Wake,
    /// IPI round-trip measurement: the target answers `Ping` with `Pong`.
    Ping,
    /// See `Ping`.
    Pong,
}
