//! The outcome of a torture run and its text form.

use std::fmt;
use std::time::Duration;

use smpcall::hosted::IdlePolicy;
use smpcall::{CpuId, CpuMask, CpuStats};

use super::kind::Kind;
use super::ledger::{Verification, Violation, ERROR_CLASSES};
use super::Config;

/// Everything a run found out. `Display` prints the statistics block; its last line is
/// `SUCCESS` or `FAILURE`.
#[derive(Clone, Debug)]
pub struct Report {
    /// The configuration that ran (with the seed actually used).
    pub config: Config,
    /// From submitting the CPUs' tasks to the last one finishing.
    pub elapsed: Duration,
    /// Call-by-call findings of the verifier, with per-kind tallies.
    pub verification: Verification,
    /// Engine counters summed over all CPUs, read after the calls drained.
    pub engine: CpuStats,
    /// Real-time signals the hosted backend sent as IPIs.
    pub signals_sent: u64,
    /// Futex wakes the hosted backend sent as IPIs (to sleeping idle CPUs).
    pub futex_wakes: u64,
    /// CPUs that used up their record capacity before the deadline (informational).
    pub capacity_reached: Vec<CpuId>,
    /// Run-level failures: a task that did not finish, calls that did not drain, counters
    /// that disagree, a shutdown that timed out. Each is a violation.
    pub incidents: Vec<String>,
}

impl Report {
    /// Whether the run is a pass: no violation and no incident.
    pub fn success(&self) -> bool {
        self.verification.is_clean() && self.incidents.is_empty()
    }

    /// Calls issued, all kinds.
    pub fn calls_issued(&self) -> u64 {
        self.verification.per_kind.iter().map(|t| t.issued).sum()
    }

    /// Calls issued of `kind`.
    pub fn issued(&self, kind: Kind) -> u64 {
        self.verification.per_kind[kind.index()].issued
    }
}

/// A human name for an idle policy.
pub fn idle_name(idle: IdlePolicy) -> String {
    match idle {
        IdlePolicy::Poll => "poll".to_owned(),
        IdlePolicy::Sleep => "sleep".to_owned(),
        IdlePolicy::PollThenSleep(d) => format!("mixed (poll {d:?}, then sleep)"),
    }
}

/// A 64-bit CPU set as a cpulist (`0-3,7`), `-` when empty.
pub fn cpulist(bits: u64) -> String {
    if bits == 0 {
        return "-".to_owned();
    }
    let mask: CpuMask = (0..64).filter(|c| bits >> c & 1 == 1).collect();
    mask.to_string()
}

fn per_sec(n: u64, d: Duration) -> u64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        (n as f64 / s) as u64
    } else {
        0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let v = &self.verification;
        writeln!(
            f,
            "smpcall torture: {} CPUs, {:?}, idle {}, seed {:#x}",
            c.cpus,
            c.duration,
            idle_name(c.idle),
            c.seed
        )?;
        writeln!(
            f,
            "  {:<14}{:>11}{:>11}{:>9}{:>9}{:>12}",
            "kind", "issued", "accepted", "refused", "errors", "runs"
        )?;
        for kind in Kind::ALL {
            let t = &v.per_kind[kind.index()];
            writeln!(
                f,
                "  {:<14}{:>11}{:>11}{:>9}{:>9}{:>12}",
                kind.name(),
                t.issued,
                t.accepted,
                t.refusals,
                t.errors,
                t.deliveries
            )?;
        }
        let sum = |g: fn(&super::ledger::KindTally) -> u64| v.per_kind.iter().map(g).sum::<u64>();
        writeln!(
            f,
            "  {:<14}{:>11}{:>11}{:>9}{:>9}{:>12}",
            "total",
            sum(|t| t.issued),
            sum(|t| t.accepted),
            sum(|t| t.refusals),
            sum(|t| t.errors),
            sum(|t| t.deliveries)
        )?;
        writeln!(
            f,
            "{:<12}{} calls, {} function runs exactly once on their CPU",
            "verified", v.calls_checked, v.deliveries_ok
        )?;
        if v.is_clean() {
            writeln!(f, "{:<12}none", "violations")?;
        } else {
            let list: Vec<String> = Violation::ALL
                .iter()
                .filter(|&&x| v.count(x) > 0)
                .map(|&x| format!("{} {}", x.name(), v.count(x)))
                .collect();
            writeln!(f, "{:<12}{}", "violations", list.join(", "))?;
            for e in &v.examples {
                let r = &e.record;
                writeln!(
                    f,
                    "  {}: call {}#{} ({}) expected {} ran {} twice {} wrong-arg {}",
                    e.class.name(),
                    r.id.sender(),
                    r.id.index(),
                    r.kind.map_or("?", Kind::name),
                    cpulist(r.expected),
                    cpulist(r.ran),
                    cpulist(r.duplicated),
                    cpulist(r.wrong_cpu)
                )?;
            }
        }
        let errors: Vec<String> = ERROR_CLASSES
            .iter()
            .zip(v.errors_by_class)
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        let refusals = sum(|t| t.refusals);
        writeln!(
            f,
            "{:<12}{} unexpected{}; {} expected refusals (busy csd), {} calls given up",
            "errors",
            v.total_errors(),
            if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join(", "))
            },
            refusals,
            sum(|t| t.gave_up)
        )?;
        let e = &self.engine;
        writeln!(
            f,
            "{:<12}sent {}, elided {}, received {}",
            "IPIs", e.ipi_sent, e.ipi_elided, e.ipi_received
        )?;
        writeln!(
            f,
            "{:<12}signals {}, futex wakes {}; queued calls {}, run {}, flushes {}",
            "host", self.signals_sent, self.futex_wakes, e.calls_queued, e.calls_run, e.flushes
        )?;
        writeln!(
            f,
            "{:<12}{:.3} s, {} calls/s, {} runs/s",
            "elapsed",
            self.elapsed.as_secs_f64(),
            per_sec(self.calls_issued(), self.elapsed),
            per_sec(sum(|t| t.deliveries), self.elapsed)
        )?;
        if !self.capacity_reached.is_empty() {
            writeln!(
                f,
                "{:<12}CPUs {:?} used up their {} call records before the deadline",
                "note", self.capacity_reached, c.max_calls_per_cpu
            )?;
        }
        for incident in &self.incidents {
            writeln!(f, "{:<12}{incident}", "incident")?;
        }
        write!(f, "{}", if self.success() { "SUCCESS" } else { "FAILURE" })
    }
}
