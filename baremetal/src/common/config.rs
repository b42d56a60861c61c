//! Sizes, and the kinds of inter-processor interrupt the kernel uses.

/// Most CPUs this kernel runs (the engine's `StaticStorage<MAX_CPUS>`); extra CPUs are parked.
/// The kernel's own CPU sets are `u64` bitmasks, so 64 is the ceiling here (the xAPIC's 8-bit
/// physical destination would allow 255).
pub const MAX_CPUS: usize = 64;

/// Each CPU's task stack.
pub const KERNEL_STACK_BYTES: usize = 128 * 1024;

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
