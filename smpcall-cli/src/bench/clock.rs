//! The one clock every row is timed with: the time-stamp counter on x86_64 (when the CPU says
//! it ticks at a constant rate and does not stop), calibrated once against [`Instant`];
//! [`Instant`] itself elsewhere. Same clock for every row, so ratios are fair.

use std::time::{Duration, Instant};

/// Which counter a [`Clock`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockSource {
    /// `rdtsc`, calibrated against the monotonic clock.
    Tsc,
    /// `std::time::Instant` (nanoseconds since the clock was made).
    Instant,
}

/// A cheap timestamp source: [`now`](Clock::now) returns ticks, [`ns`](Clock::ns) converts.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    source: ClockSource,
    ns_per_tick: f64,
    origin: Instant,
}

impl Clock {
    /// The best clock here, calibrated over `calibration` (a few tens of milliseconds suffice).
    pub fn calibrate(calibration: Duration) -> Clock {
        let origin = Instant::now();
        if !tsc_is_usable() {
            return Clock {
                source: ClockSource::Instant,
                ns_per_tick: 1.0,
                origin,
            };
        }
        let probe = Clock {
            source: ClockSource::Tsc,
            ns_per_tick: 1.0,
            origin,
        };
        // Spin rather than sleep: a sleeping thread may migrate, and spinning keeps the
        // calibration window exact at both ends.
        let t0 = Instant::now();
        let c0 = probe.now();
        while t0.elapsed() < calibration {
            std::hint::spin_loop();
        }
        let c1 = probe.now();
        let elapsed = t0.elapsed();
        let ticks = c1.saturating_sub(c0);
        if ticks == 0 {
            return Clock {
                source: ClockSource::Instant,
                ns_per_tick: 1.0,
                origin,
            };
        }
        Clock {
            source: ClockSource::Tsc,
            ns_per_tick: elapsed.as_nanos() as f64 / ticks as f64,
            origin,
        }
    }

    /// Which counter this clock reads.
    pub fn source(&self) -> ClockSource {
        self.source
    }

    /// Nanoseconds per tick (1 for [`ClockSource::Instant`]).
    pub fn ns_per_tick(&self) -> f64 {
        self.ns_per_tick
    }

    /// The current tick count.
    #[inline(always)]
    pub fn now(&self) -> u64 {
        match self.source {
            ClockSource::Tsc => read_tsc(),
            ClockSource::Instant => self.origin.elapsed().as_nanos() as u64,
        }
    }

    /// `ticks` in nanoseconds.
    #[inline(always)]
    pub fn ns(&self, ticks: u64) -> f64 {
        ticks as f64 * self.ns_per_tick
    }

    /// `d` in ticks (at least 1).
    pub fn ticks(&self, d: Duration) -> u64 {
        ((d.as_nanos() as f64 / self.ns_per_tick) as u64).max(1)
    }

    /// Spins for `ticks` (a pause that keeps the thread on its core).
    pub fn spin_for(&self, ticks: u64) {
        let start = self.now();
        while self.now().wrapping_sub(start) < ticks {
            std::hint::spin_loop();
        }
    }

    /// A one-line description, e.g. `TSC (2.45 GHz, calibrated)`.
    pub fn describe(&self) -> String {
        match self.source {
            ClockSource::Tsc => format!("TSC ({:.2} GHz, calibrated)", 1.0 / self.ns_per_tick),
            ClockSource::Instant => "std::time::Instant".to_string(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn read_tsc() -> u64 {
    // SAFETY: `rdtsc` exists on every x86_64 CPU, reads a counter and has no side effects; we
    // only select this path after checking that the counter is invariant (constant rate,
    // never stops), so values from different cores are comparable.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn read_tsc() -> u64 {
    unreachable!("the TSC clock is only selected on x86_64")
}

/// Whether the TSC ticks at a constant rate and keeps ticking in idle states (Linux reports
/// both as CPU flags).
fn tsc_is_usable() -> bool {
    if !cfg!(target_arch = "x86_64") {
        return false;
    }
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return false;
    };
    let Some(flags) = info.lines().find(|l| l.starts_with("flags")) else {
        return false;
    };
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    has("constant_tsc") && has("nonstop_tsc")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_and_ns_round_trip() {
        let c = Clock::calibrate(Duration::from_millis(5));
        let t = c.ticks(Duration::from_micros(10));
        let ns = c.ns(t);
        assert!((9_000.0..11_000.0).contains(&ns), "{ns}");
        let a = c.now();
        let b = c.now();
        assert!(b >= a);
    }
}
