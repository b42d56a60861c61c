//! Sizes and vector numbers.

/// Most CPUs this kernel runs (the engine's `StaticStorage<MAX_CPUS>`); extra APs are parked.
/// The kernel's own CPU sets are `u64` bitmasks, so 64 is the ceiling here; the xAPIC's 8-bit
/// physical destination would allow 255.
pub const MAX_CPUS: usize = 64;

/// Each CPU's task stack.
pub const KERNEL_STACK_BYTES: usize = 128 * 1024;
/// IST1: every external interrupt and IPI vector (the engine's flush runs here).
pub const IST_IRQ_BYTES: usize = 64 * 1024;
/// IST2: NMI.
pub const IST_NMI_BYTES: usize = 16 * 1024;
/// IST3: exceptions.
pub const IST_EXC_BYTES: usize = 16 * 1024;
/// One CPU's block of IST stacks.
pub const IST_STACK_BYTES: usize = IST_IRQ_BYTES + IST_NMI_BYTES + IST_EXC_BYTES;

/// The cross-CPU call vector: its handler is `Engine::handle_ipi` + EOI.
pub const CALL_VECTOR: u8 = 0xF0;
/// Wakes a halted CPU for a task (handler: EOI only).
pub const WAKE_VECTOR: u8 = 0xF1;
/// IPI round-trip measurement: the target answers PING with PONG.
pub const PING_VECTOR: u8 = 0xF2;
/// See `PING_VECTOR`.
pub const PONG_VECTOR: u8 = 0xF3;
/// The local APIC's spurious-interrupt vector (no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xFF;
