//! Recording: the timed loop every latency row uses, its histogram, and the summaries of
//! latency and throughput rows.

use hdrhistogram::Histogram;
use serde::Serialize;

use super::clock::Clock;
use super::{BenchError, Config};

/// Largest latency a histogram holds: 100 s (larger values are clamped).
const MAX_NS: u64 = 100_000_000_000;

/// Quantiles kept for the distribution plot and the JSON output (in percent).
fn cdf_percentiles() -> impl Iterator<Item = f64> {
    (0..100)
        .map(f64::from)
        .chain([99.5, 99.9, 99.95, 99.99, 100.0])
}

/// An empty latency histogram (nanoseconds, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

/// The timed loop of a latency row: `cfg.warmup` untimed calls of `op` (at most a quarter of
/// `cfg.row_time`), then up to `cfg.iterations` timed ones (until `cfg.row_time` has passed),
/// each recorded in nanoseconds. `pause` ticks of spinning precede each call, untimed.
pub fn measure(
    clock: &Clock,
    cfg: &Config,
    pause: u64,
    mut op: impl FnMut() -> Result<(), BenchError>,
) -> Result<Histogram<u64>, BenchError> {
    let warm_end = clock.now().saturating_add(clock.ticks(cfg.row_time / 4));
    for _ in 0..cfg.warmup {
        if pause > 0 {
            clock.spin_for(pause);
        }
        op()?;
        if clock.now() > warm_end {
            break;
        }
    }
    let mut hist = new_histogram();
    let end = clock.now().saturating_add(clock.ticks(cfg.row_time));
    for _ in 0..cfg.iterations.max(1) {
        if pause > 0 {
            clock.spin_for(pause);
        }
        let t0 = clock.now();
        op()?;
        let t1 = clock.now();
        hist.saturating_record((clock.ns(t1.saturating_sub(t0)) as u64).max(1));
        if t1 > end {
            break;
        }
    }
    Ok(hist)
}

/// Summary of a latency distribution, in nanoseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Latency {
    /// Timed iterations recorded.
    pub count: u64,
    /// Fastest.
    pub min_ns: f64,
    /// 50th percentile.
    pub median_ns: f64,
    /// 90th percentile.
    pub p90_ns: f64,
    /// 99th percentile.
    pub p99_ns: f64,
    /// 99.9th percentile.
    pub p999_ns: f64,
    /// Slowest.
    pub max_ns: f64,
    /// Mean.
    pub mean_ns: f64,
    /// Standard deviation.
    pub stdev_ns: f64,
    /// The distribution: `[percentile, nanoseconds]` pairs, percentile 0 to 100.
    pub cdf: Vec<[f64; 2]>,
}

impl Latency {
    /// Summarises a histogram.
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        let q = |p: f64| h.value_at_quantile(p) as f64;
        Latency {
            count: h.len(),
            min_ns: h.min() as f64,
            median_ns: q(0.5),
            p90_ns: q(0.9),
            p99_ns: q(0.99),
            p999_ns: q(0.999),
            max_ns: h.max() as f64,
            mean_ns: h.mean(),
            stdev_ns: h.stdev(),
            cdf: cdf_percentiles().map(|p| [p, q(p / 100.0)]).collect(),
        }
    }
}

/// Summary of a throughput row: several rounds of a fixed number of messages.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Throughput {
    /// Rounds measured.
    pub rounds: u64,
    /// Messages (calls) per round.
    pub messages_per_round: u64,
    /// Median over rounds of messages per second.
    pub median_per_s: f64,
    /// Slowest round, messages per second.
    pub min_per_s: f64,
    /// Fastest round, messages per second.
    pub max_per_s: f64,
    /// Nanoseconds per message at the median rate.
    pub ns_per_message: f64,
    /// Every round's rate, in order.
    pub rounds_per_s: Vec<f64>,
}

impl Throughput {
    /// Summarises per-round rates (messages per second); `rates` must not be empty.
    pub fn from_rates(messages_per_round: u64, rates: Vec<f64>) -> Throughput {
        let mut sorted = rates.clone();
        sorted.sort_by(f64::total_cmp);
        let median = if sorted.is_empty() {
            0.0
        } else if sorted.len() % 2 == 1 {
            sorted[sorted.len() / 2]
        } else {
            (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
        };
        Throughput {
            rounds: rates.len() as u64,
            messages_per_round,
            median_per_s: median,
            min_per_s: sorted.first().copied().unwrap_or(0.0),
            max_per_s: sorted.last().copied().unwrap_or(0.0),
            ns_per_message: if median > 0.0 { 1e9 / median } else { 0.0 },
            rounds_per_s: rates,
        }
    }
}

/// The rounds loop of a throughput row: runs `round()` (which sends `cfg.messages` messages and
/// returns the ticks it took) at least once and up to `cfg.rounds` times, until `cfg.row_time`
/// has passed; one untimed warm-up round first.
pub fn rounds(
    clock: &Clock,
    cfg: &Config,
    mut round: impl FnMut() -> Result<u64, BenchError>,
) -> Result<Throughput, BenchError> {
    round()?;
    let end = clock.now().saturating_add(clock.ticks(cfg.row_time));
    let mut rates = Vec::new();
    for _ in 0..cfg.rounds.max(1) {
        let ticks = round()?;
        let secs = clock.ns(ticks.max(1)) / 1e9;
        rates.push(cfg.messages as f64 / secs);
        if clock.now() > end {
            break;
        }
    }
    Ok(Throughput::from_rates(cfg.messages, rates))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary_reads_the_histogram() {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let l = Latency::from_histogram(&h);
        assert_eq!(l.count, 1000);
        assert!((4990.0..=5010.0).contains(&l.median_ns), "{}", l.median_ns);
        assert!(l.p90_ns <= l.p99_ns && l.p99_ns <= l.max_ns);
        assert_eq!(l.cdf.first().unwrap()[0], 0.0);
        assert_eq!(l.cdf.last().unwrap()[0], 100.0);
    }

    #[test]
    fn throughput_median_of_rounds() {
        let t = Throughput::from_rates(10, vec![3.0, 1.0, 2.0]);
        assert_eq!(t.median_per_s, 2.0);
        assert_eq!((t.min_per_s, t.max_per_s), (1.0, 3.0));
        assert_eq!(t.ns_per_message, 5e8);
    }
}
