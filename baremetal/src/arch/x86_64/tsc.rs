//! TSC frequency, measured against the PIT (channel 2) once at boot. Under QEMU's TCG the TSC
//! follows the host's.

use super::cpu::{inb, outb, rdtsc};

/// Reads PIT channel 2's current count (latched).
///
/// # Safety
/// PIT ports; channel 2 must be programmed for lobyte/hibyte access.
unsafe fn pit2_count() -> u64 {
    // SAFETY: forwarded.
    unsafe {
        outb(0x43, 0b1000_0000); // latch channel 2
        let lo = inb(0x42) as u64;
        let hi = inb(0x42) as u64;
        hi << 8 | lo
    }
}

/// Measures the TSC frequency against the PIT: the lowest of three measurements (a host
/// preemption during one only makes it larger). BSP only, at boot.
pub fn calibrate() -> u64 {
    (0..3)
        .filter_map(|_| measure_once())
        .min()
        .unwrap_or(1_000_000_000)
}

/// PIT channel 2, mode 0, counting down from 0xFFFF at 1.193182 MHz: TSC ticks over ~12 ms of
/// PIT counts, timed from the counter itself so the start-up latency of the emulated PIT does
/// not count.
fn measure_once() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const SPAN: u64 = 15_000; // PIT ticks, ~12.5 ms
    let mut hz = None;
    // SAFETY: PIT channel 2 and port 0x61 (speaker gate); the speaker stays off.
    unsafe {
        let p61 = inb(0x61);
        outb(0x61, (p61 & !0x02) | 0x01); // gate on, speaker off
        outb(0x43, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        outb(0x42, 0xFF);
        outb(0x42, 0xFF);
        // Wait for the count to start moving, then time SPAN ticks of it.
        let mut spins = 0u64;
        let first = pit2_count();
        while pit2_count() == first && spins < 10_000_000 {
            spins += 1;
        }
        let c0 = pit2_count();
        let t0 = rdtsc();
        let mut c1 = c0;
        while c0.saturating_sub(c1) < SPAN && c1 <= c0 && spins < 100_000_000 {
            c1 = pit2_count();
            spins += 1;
        }
        let t1 = rdtsc();
        let pit = c0.saturating_sub(c1);
        if pit >= SPAN / 2 && t1 > t0 {
            hz = Some(((t1 - t0) as u128 * PIT_HZ as u128 / pit as u128) as u64);
        }
        outb(0x61, p61);
    }
    hz
}
