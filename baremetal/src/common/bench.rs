//! IPI round trips, in counter ticks ("cycles": the TSC on x86_64, the generic timer on
//! aarch64, `time` on riscv64). Under QEMU's TCG these are *emulation* figures, not hardware
//! ones.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::config::Ipi;
use crate::percpu::CPUS;
use crate::{arch, time};

static PING_REPLY_TO: AtomicU32 = AtomicU32::new(0);
static PONGS: AtomicU64 = AtomicU64::new(0);

/// PING handler (on the target): answer with PONG to the asking CPU.
pub fn on_ping() {
    arch::send_ipi(PING_REPLY_TO.load(Ordering::Acquire), Ipi::Pong);
}

/// PONG handler (on the asking CPU).
pub fn on_pong() {
    PONGS.fetch_add(1, Ordering::Release);
}

/// Summary of a set of samples (cycles).
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub n: usize,
    pub min: u64,
    pub median: u64,
    pub mean: u64,
    pub max: u64,
}

impl core::fmt::Display for Summary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "median {} cycles ({} ns), min {}, mean {}, max {}, n={}",
            self.median,
            time::ticks_to_ns(self.median),
            self.min,
            self.mean,
            self.max,
            self.n
        )
    }
}

/// Sorts `samples` and summarises them.
pub fn summarise(samples: &mut [u64]) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    samples.sort_unstable();
    let n = samples.len();
    Summary {
        n,
        min: samples[0],
        median: samples[n / 2],
        mean: samples.iter().sum::<u64>() / n as u64,
        max: samples[n - 1],
    }
}

/// Raw IPI round trip: an IPI to `target`, whose handler sends one back; timed until the
/// answer's handler ran here. Caller: a CPU with interrupts enabled, in task context.
/// Returns `None` if an answer did not come within 1 s.
pub fn raw_ipi_ping_pong(target: usize, samples: &mut [u64]) -> Option<Summary> {
    let me = crate::percpu::current_index()?;
    PING_REPLY_TO.store(CPUS[me].hw_id.load(Ordering::Relaxed), Ordering::Release);
    let dest = CPUS[target].hw_id.load(Ordering::Relaxed);
    for s in samples.iter_mut() {
        let before = PONGS.load(Ordering::Acquire);
        let t0 = arch::cycles();
        arch::send_ipi(dest, Ipi::Ping);
        let d = time::Deadline::after_ms(1000);
        while PONGS.load(Ordering::Acquire) == before {
            if d.expired() {
                return None;
            }
            arch::pause();
        }
        *s = arch::cycles() - t0;
    }
    Some(summarise(samples))
}

static MEM_PING: AtomicU64 = AtomicU64::new(0);
static MEM_PONG: AtomicU64 = AtomicU64::new(0);

/// Shared-memory ping-pong between the caller (CPU 0) and `target`, both spinning (with
/// `pause`, like the engine's waits): the emulated cache-line round trip. Uses `run_on`.
pub fn mem_ping_pong(target: usize, samples: &mut [u64]) -> Summary {
    MEM_PING.store(0, Ordering::SeqCst);
    MEM_PONG.store(0, Ordering::SeqCst);
    let n = samples.len() as u64;
    let cell = crate::ktest_support::SyncPtr(samples.as_mut_ptr());
    let cell = &cell;
    crate::percpu::run_on(1 | 1 << target, &move |me| {
        if me != 0 {
            for i in 1..=n {
                while MEM_PING.load(Ordering::Acquire) != i {
                    arch::pause();
                }
                MEM_PONG.store(i, Ordering::Release);
            }
            return;
        }
        for i in 1..=n {
            let t0 = arch::cycles();
            MEM_PING.store(i, Ordering::Release);
            while MEM_PONG.load(Ordering::Acquire) != i {
                arch::pause();
            }
            // SAFETY: only CPU 0 writes the samples, within bounds.
            unsafe { *cell.0.add(i as usize - 1) = arch::cycles() - t0 };
        }
    });
    summarise(samples)
}
