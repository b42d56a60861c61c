//! The clock: the architecture's cycle counter (x86_64: the TSC, calibrated against the PIT;
//! aarch64: the generic timer's virtual count, CNTFRQ_EL0; riscv64: the `time` CSR at the
//! platform's timebase). Under QEMU's TCG these are wall-clock nanoseconds of the emulation.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch;

static TSC_HZ: AtomicU64 = AtomicU64::new(1_000_000_000);
static TSC_BOOT: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per tick, as 32.32 fixed point.
static NS_PER_TICK_FP: AtomicU64 = AtomicU64::new(1 << 32);

/// Sets the counter's frequency and the boot time. BSP only, at boot.
pub fn init(hz: u64) {
    let hz = hz.max(1);
    TSC_HZ.store(hz, Ordering::Relaxed);
    NS_PER_TICK_FP.store(
        ((1_000_000_000u128 << 32) / hz as u128) as u64,
        Ordering::Relaxed,
    );
    TSC_BOOT.store(arch::cycles(), Ordering::Relaxed);
}

/// Counter ticks per second.
pub fn counter_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Converts counter ticks to nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    ((ticks as u128 * NS_PER_TICK_FP.load(Ordering::Relaxed) as u128) >> 32) as u64
}

/// Nanoseconds since boot.
pub fn now_ns() -> u64 {
    ticks_to_ns(arch::cycles().saturating_sub(TSC_BOOT.load(Ordering::Relaxed)))
}

/// A point in time, for bounded waits.
#[derive(Clone, Copy)]
pub struct Deadline(u64);

impl Deadline {
    /// `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Self {
        Deadline(arch::cycles() + counter_hz() / 1000 * ms)
    }
    /// `us` microseconds from now.
    pub fn after_us(us: u64) -> Self {
        Deadline(arch::cycles() + counter_hz() / 1_000_000 * us)
    }
    /// Whether it has passed.
    pub fn expired(&self) -> bool {
        arch::cycles() >= self.0
    }
}

/// Spins (with the spin-loop hint) for `us` microseconds.
pub fn delay_us(us: u64) {
    let d = Deadline::after_us(us);
    while !d.expired() {
        arch::pause();
    }
}

/// Spins until `cond` holds or `ms` passed; returns whether it held.
pub fn wait_until(ms: u64, mut cond: impl FnMut() -> bool) -> bool {
    let d = Deadline::after_ms(ms);
    loop {
        if cond() {
            return true;
        }
        if d.expired() {
            return cond();
        }
        arch::pause();
    }
}
