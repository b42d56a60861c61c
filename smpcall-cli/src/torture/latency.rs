//! Latency of each call kind: per-CPU HDR histograms, merged at the end of a run.
//!
//! What is measured, per call, on the calling CPU (task context, never in a call function):
//! from just before the call to just after it returned for waiting kinds (the full round
//! trip), the issue cost for no-wait kinds, and issue to the observed completion for `rpc`
//! (see [`Kind::latency_meaning`]). Histograms are allocated on a kind's first call.

use hdrhistogram::Histogram;
use serde::Serialize;

use super::kind::Kind;

/// Largest latency a histogram holds exactly (larger ones are clamped): 100 s, in ns.
const MAX_NS: u64 = 100_000_000_000;
/// Significant decimal digits of the histograms (1 % resolution).
const SIGFIG: u8 = 2;

/// Latency histograms (nanoseconds), one per kind.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    per_kind: [Option<Histogram<u64>>; Kind::COUNT],
}

impl Latencies {
    /// Empty histograms.
    pub fn new() -> Latencies {
        Latencies::default()
    }

    /// Records one call of `kind` that took `ns` nanoseconds (clamped to 100 s). Task context
    /// only: the first call of a kind allocates.
    pub fn record(&mut self, kind: Kind, ns: u64) {
        let h = self.per_kind[kind.index()].get_or_insert_with(|| {
            Histogram::new_with_bounds(1, MAX_NS, SIGFIG).expect("valid histogram bounds")
        });
        h.saturating_record(ns.clamp(1, MAX_NS));
    }

    /// Adds `other`'s samples to these.
    pub fn merge(&mut self, other: &Latencies) {
        for (mine, theirs) in self.per_kind.iter_mut().zip(&other.per_kind) {
            let Some(theirs) = theirs else { continue };
            match mine {
                Some(h) => {
                    // Same bounds on both sides: adding cannot fail.
                    let _ = h.add(theirs);
                }
                None => *mine = Some(theirs.clone()),
            }
        }
    }

    /// Samples recorded for `kind`.
    pub fn count(&self, kind: Kind) -> u64 {
        self.per_kind[kind.index()].as_ref().map_or(0, |h| h.len())
    }

    /// The percentiles of `kind`, `None` if it has no sample.
    pub fn summary(&self, kind: Kind) -> Option<LatencySummary> {
        let h = self.per_kind[kind.index()].as_ref()?;
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(LatencySummary {
            samples: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            max_us: us(h.max()),
        })
    }

    /// [`summary`](Latencies::summary) of every kind, indexed by [`Kind::index`].
    pub fn summaries(&self) -> [Option<LatencySummary>; Kind::COUNT] {
        let mut out = [None; Kind::COUNT];
        for kind in Kind::ALL {
            out[kind.index()] = self.summary(kind);
        }
        out
    }
}

/// Percentiles of one kind's latency, in microseconds (1 % resolution).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Calls measured.
    pub samples: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest.
    pub max_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_merge_and_summarise() {
        let mut a = Latencies::new();
        for ns in 1..=1000u64 {
            a.record(Kind::Single, ns * 1000);
        }
        let mut b = Latencies::new();
        b.record(Kind::Single, 5_000_000);
        b.record(Kind::Rpc, 42);
        a.merge(&b);
        let s = a.summary(Kind::Single).unwrap();
        assert_eq!(s.samples, 1001);
        assert!((s.p50_us - 500.0).abs() < 10.0, "{s:?}");
        assert!((s.max_us - 5000.0).abs() < 60.0, "{s:?}");
        assert_eq!(a.count(Kind::Rpc), 1);
        assert!(a.summary(Kind::All).is_none());
        // Out-of-range values are clamped, not lost.
        a.record(Kind::All, u64::MAX);
        a.record(Kind::All, 0);
        assert_eq!(a.count(Kind::All), 2);
    }
}
