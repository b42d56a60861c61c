//! Fault injection for the torture run (`--drop-ipi`, `--delay-ipi`, `--stall-threshold`,
//! `--dump-on-stall`, `--verbose`): the report sink the machine's diagnostics write to, and
//! the summary of what the faults did and what the diagnostics saw.
//!
//! # The report sink
//!
//! The engine reports stalls through [`Platform::report`](smpcall::Platform::report), from
//! any context — a CPU spinning in a wait, the watchdog thread, an NMI handler, a call handler
//! in signal context. The hosted backend hands each line to a plain `fn(&str)`; ours
//! ([`quiet_sink`], [`verbose_sink`]) only classify the line and count it in static atomics
//! (no allocation, no lock), and the verbose one also writes it to stderr with a single
//! `write(2)` from a stack buffer. The counters are process-wide: two runs in one process at
//! the same time (tests) share them, so a run reads them as differences ([`SinkCounts`]) and
//! takes its authoritative figures from the engine's own counters (`diag_stats`).
//!
//! # The lost-IPI detection rule
//!
//! A run with `--drop-ipi` fails (besides any exactly-once violation) when the diagnostics
//! missed a stall, precisely: **IPIs were dropped** (`ipis_dropped > 0`), **some call waited
//! longer than twice the stall threshold to run** (measured by the torture itself: each call
//! is stamped when issued and its first function measures the wait, see
//! [`Ledger::set_delay_threshold`](super::Ledger::set_delay_threshold)), and **no stall of any
//! kind was reported** (`stall_reports + queue_stall_reports + stop_machine stall reports ==
//! 0`). A call that waits that long is one the engine's waits (which report after one
//! threshold) or its watchdog (which reports a queue left untaken for one threshold) must have
//! seen; twice the threshold leaves room for the reporter's own polling period.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Which lines the sink has counted, by class (indices into `COUNTS`).
const LINES: usize = 0;
const WAIT_STALL: usize = 1;
const QUEUE_STALL: usize = 2;
const RECOVERED: usize = 3;
const STOP_STALL: usize = 4;
const NMI: usize = 5;

static COUNTS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Counts of report lines by class (see [`sink_counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SinkCounts {
    /// Every line.
    pub lines: u64,
    /// "CPU x has waited … for … call … to CPU y" (a stuck wait).
    pub wait_stalls: u64,
    /// "CPU x has had calls queued for … without taking them" (the watchdog).
    pub queue_stalls: u64,
    /// "CPU x recovered after …".
    pub recovered: u64,
    /// "stop_machine stuck in stage …".
    pub stop_stalls: u64,
    /// NMI reports of what a CPU is doing.
    pub nmi: u64,
}

impl SinkCounts {
    /// The counts since `earlier` (the process-wide counters only grow).
    pub fn since(&self, earlier: &SinkCounts) -> SinkCounts {
        SinkCounts {
            lines: self.lines.saturating_sub(earlier.lines),
            wait_stalls: self.wait_stalls.saturating_sub(earlier.wait_stalls),
            queue_stalls: self.queue_stalls.saturating_sub(earlier.queue_stalls),
            recovered: self.recovered.saturating_sub(earlier.recovered),
            stop_stalls: self.stop_stalls.saturating_sub(earlier.stop_stalls),
            nmi: self.nmi.saturating_sub(earlier.nmi),
        }
    }

    /// Stall lines of any kind.
    pub fn stalls(&self) -> u64 {
        self.wait_stalls + self.queue_stalls + self.stop_stalls
    }
}

/// The counters of every line the sinks have seen in this process.
pub fn sink_counts() -> SinkCounts {
    let r = |i: usize| COUNTS[i].load(Ordering::Relaxed);
    SinkCounts {
        lines: r(LINES),
        wait_stalls: r(WAIT_STALL),
        queue_stalls: r(QUEUE_STALL),
        recovered: r(RECOVERED),
        stop_stalls: r(STOP_STALL),
        nmi: r(NMI),
    }
}

/// Classifies and counts one line. Async-signal-safe: `str::contains` searches without
/// allocating; the counters are atomics.
fn count(line: &str) {
    // Relaxed: statistics.
    COUNTS[LINES].fetch_add(1, Ordering::Relaxed);
    let class = if line.contains("has waited") {
        Some(WAIT_STALL)
    } else if line.contains("has had calls queued") {
        Some(QUEUE_STALL)
    } else if line.contains("recovered after") {
        Some(RECOVERED)
    } else if line.contains("stop_machine stuck") {
        Some(STOP_STALL)
    } else if line.contains("NMI:") {
        Some(NMI)
    } else {
        None
    };
    if let Some(i) = class {
        COUNTS[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes `line` and a newline to stderr with one `write(2)` from a stack buffer (truncated
/// at 1 KiB). Async-signal-safe.
fn write_stderr(line: &str) {
    let mut buf = [0u8; 1025];
    let mut n = line.len().min(1024);
    while !line.is_char_boundary(n) {
        n -= 1;
    }
    buf[..n].copy_from_slice(&line.as_bytes()[..n]);
    buf[n] = b'\n';
    // SAFETY: writes initialised bytes of a live stack buffer to fd 2; async-signal-safe.
    unsafe { libc::write(2, buf.as_ptr().cast(), n + 1) };
}

/// A report sink that only counts lines (the default with fault injection on: reports are
/// expected there, and many).
pub fn quiet_sink(line: &str) {
    count(line);
}

/// A report sink that counts lines and writes each to stderr (`--verbose`, and the default
/// without fault injection, where a report is news).
pub fn verbose_sink(line: &str) {
    count(line);
    write_stderr(line);
}

/// Parses a probability in `[0, 1]` (`0.2`, `0`, `1`, or a percentage `20%`).
pub fn parse_probability(text: &str) -> Result<f64, String> {
    let s = text.trim();
    let p = match s.strip_suffix('%') {
        Some(pct) => pct.trim().parse::<f64>().map(|v| v / 100.0),
        None => s.parse::<f64>(),
    }
    .map_err(|_| format!("invalid probability `{text}`: expected a number in [0, 1] or a %"))?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!(
            "invalid probability `{text}`: must be within [0, 1]"
        ))
    }
}

/// What fault injection did and what the diagnostics saw, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct FaultSummary {
    /// Probability that an IPI is dropped.
    pub drop_ipi: f64,
    /// Probability that an IPI is delayed (1–50 µs).
    pub delay_ipi: f64,
    /// The engine's stall threshold, ms (0: reports off).
    pub stall_threshold_ms: f64,
    /// IPIs the platform dropped.
    pub ipis_dropped: u64,
    /// IPIs the platform delayed.
    pub ipis_delayed: u64,
    /// Stuck-wait reports (`diag_stats`).
    pub stall_reports: u64,
    /// Untaken-queue reports of the watchdog (`diag_stats`).
    pub queue_stall_reports: u64,
    /// stop_machine stage stall reports (`hotplug_stats`).
    pub stop_stall_reports: u64,
    /// IPIs re-sent by the stall paths (`diag_stats`).
    pub ipi_resends: u64,
    /// Reported waits that completed (`diag_stats`).
    pub recoveries: u64,
    /// Calls the torture saw wait longer than twice the stall threshold to run (measured only
    /// with `--drop-ipi`; 0 otherwise).
    pub delayed_calls: u64,
    /// Longest wait of a call to run, ms (`null` when not measured).
    pub max_call_delay_ms: Option<f64>,
    /// Report lines counted by the sink during the run, by class.
    pub sink: SinkCounts,
    /// The detection rule failed: IPIs dropped, a call delayed past twice the threshold, and
    /// no stall reported (see the module docs).
    pub unreported_stall: bool,
}

impl FaultSummary {
    /// Whether IPI faults were injected.
    pub fn injecting(&self) -> bool {
        self.drop_ipi > 0.0 || self.delay_ipi > 0.0
    }

    /// Stall reports of every kind (engine counters).
    pub fn reports(&self) -> u64 {
        self.stall_reports + self.queue_stall_reports + self.stop_stall_reports
    }

    /// Whether anything worth a line in the report happened: faults on, or a report.
    pub fn worth_reporting(&self) -> bool {
        self.injecting() || self.reports() > 0 || self.ipi_resends > 0
    }

    /// Applies the detection rule (see the module docs) and records the outcome.
    pub fn judge(&mut self) {
        self.unreported_stall =
            self.ipis_dropped > 0 && self.delayed_calls > 0 && self.reports() == 0;
    }
}

/// The delay beyond which the torture counts a call as delayed: twice the stall threshold.
pub fn delay_threshold(stall_threshold: Duration) -> Duration {
    stall_threshold.saturating_mul(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_parse() {
        assert_eq!(parse_probability("0.2"), Ok(0.2));
        assert_eq!(parse_probability("20%"), Ok(0.2));
        assert_eq!(parse_probability("1"), Ok(1.0));
        assert!(parse_probability("1.5").is_err());
        assert!(parse_probability("-0.1").is_err());
        assert!(parse_probability("often").is_err());
    }

    #[test]
    fn sink_classifies_lines() {
        let before = sink_counts();
        quiet_sink("smpcall: stall: CPU 0 has waited 25 ms for waiting call f to CPU 1; x");
        quiet_sink("smpcall: stall: CPU 2 has had calls queued for 30 ms without taking them");
        quiet_sink("smpcall: stall: CPU 0 recovered after 26 ms (1 report(s))");
        quiet_sink("smpcall: NMI: CPU 1 is idle");
        let d = sink_counts().since(&before);
        // Other tests in this process may report at the same time: at least ours.
        assert!(
            d.lines >= 4 && d.wait_stalls >= 1 && d.queue_stalls >= 1,
            "{d:?}"
        );
        assert!(d.recovered >= 1 && d.nmi >= 1, "{d:?}");
    }

    #[test]
    fn detection_rule() {
        let mut f = FaultSummary {
            drop_ipi: 0.2,
            ipis_dropped: 10,
            delayed_calls: 1,
            ..FaultSummary::default()
        };
        f.judge();
        assert!(f.unreported_stall, "dropped, delayed, nothing reported");
        f.queue_stall_reports = 1;
        f.judge();
        assert!(!f.unreported_stall);
        f.queue_stall_reports = 0;
        f.delayed_calls = 0;
        f.judge();
        assert!(
            !f.unreported_stall,
            "no call was delayed: nothing to report"
        );
    }
}
