//! The outcome of a torture run, its text form (the final statistics block) and its JSON form.

use std::fmt;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use smpcall::hosted::IdlePolicy;
use smpcall::{CpuId, CpuMask, CpuStats};

use super::faults::FaultSummary;
use super::hotplug::HotplugSummary;
use super::kind::Kind;
use super::latency::LatencySummary;
use super::ledger::{Verification, Violation, ERROR_CLASSES};
use super::rcu::RcuSummary;
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
    /// Latency percentiles per kind (indexed by [`Kind::index`]; `None`: no sample).
    pub latency: [Option<LatencySummary>; Kind::COUNT],
    /// CPUs whose latency samples are missing (their task failed or hung).
    pub latency_missing: Vec<CpuId>,
    /// Engine counters summed over all CPUs, read after the calls drained.
    pub engine: CpuStats,
    /// Real-time signals the hosted backend sent as IPIs.
    pub signals_sent: u64,
    /// Futex wakes the hosted backend sent as IPIs (to sleeping idle CPUs).
    pub futex_wakes: u64,
    /// CPUs that used up their record capacity before the deadline (informational).
    pub capacity_reached: Vec<CpuId>,
    /// Run-level failures: a task that did not finish, calls that did not drain, counters
    /// that disagree, a shutdown that timed out, a failed hotplug operation, a stall the
    /// diagnostics did not report. Each is a violation.
    pub incidents: Vec<String>,
    /// Hotplug cycling (`--onoff`), if on.
    pub hotplug: Option<HotplugSummary>,
    /// IPI faults and stall diagnostics (zeros without fault injection).
    pub faults: FaultSummary,
    /// The RCU torture (`--rcu`), if on.
    pub rcu: Option<RcuSummary>,
    /// When the first stall was reported, if `--dump-on-stall` printed the dump.
    pub stall_dump_at: Option<Duration>,
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

    /// The command's exit status for this report: 0 on success, 1 on failure.
    pub fn exit_code(&self) -> u8 {
        if self.success() {
            0
        } else {
            1
        }
    }

    /// The whole report as JSON (see [`JsonReport`] for the shape).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(JsonReport::from(self)).unwrap_or(serde_json::Value::Null)
    }

    /// Accepted calls whose caller checked the functions' writes afterwards ("out" check).
    pub fn out_checked(&self) -> u64 {
        Kind::ALL
            .iter()
            .filter(|k| k.checks_out())
            .map(|k| self.verification.per_kind[k.index()].accepted)
            .sum::<u64>()
            .saturating_sub(self.verification.count(Violation::RpcTimeout))
    }
}

/// The weights of `cfg`'s mix as a table with percentages (printed when a run starts).
pub fn mix_table(cfg: &Config) -> String {
    let mix = &cfg.mix;
    let mut out = format!(
        "  {:<14}{:>7}{:>8}   {}\n",
        "kind", "weight", "mix %", "primitive"
    );
    for kind in Kind::ALL {
        let _ = writeln!(
            out,
            "  {:<14}{:>7}{:>8.1}   {}",
            kind.name(),
            mix.weight(kind),
            mix.percent(kind),
            primitive(kind)
        );
    }
    out
}

/// The engine call behind a kind, for tables.
pub fn primitive(kind: Kind) -> &'static str {
    match kind {
        Kind::Single => "call_single (wait)",
        Kind::SingleAsync => "call_single_async",
        Kind::Rpc => "call_single_async + wait for completion",
        Kind::CsdAsync => "call_async_csd (caller-owned csd)",
        Kind::SelfSingle => "call_single to self (wait)",
        Kind::SelfAsync => "call_single_async / call_async_csd to self",
        Kind::Many => "call_many (wait)",
        Kind::ManyAsync => "call_many_async",
        Kind::All => "call_all (wait)",
        Kind::AllAsync => "call_all_async",
        Kind::Others => "call_others (wait)",
        Kind::OthersAsync => "call_others_async",
        Kind::Cond => "call_cond (wait)",
        Kind::CondAsync => "call_cond_async",
    }
}

/// The JSON form of a [`Report`] (`smpcall torture --json`).
#[derive(Debug, Serialize)]
pub struct JsonReport {
    /// The format's version ([`crate::JSON_SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// `SUCCESS` or `FAILURE`, as the text form's last line.
    pub result: &'static str,
    /// Whether the run passed.
    pub success: bool,
    /// The command's exit status for this run.
    pub exit_code: u8,
    /// What ran.
    pub config: JsonConfig,
    /// Seconds from submitting the tasks to the last one finishing.
    pub elapsed_s: f64,
    /// Per kind: weight, totals, latency.
    pub kinds: Vec<JsonKind>,
    /// Records checked.
    pub calls_checked: u64,
    /// Function runs that happened exactly once where expected.
    pub runs_ok: u64,
    /// Accepted calls whose caller checked the functions' writes afterwards.
    pub out_checked: u64,
    /// Calls per violation class (every class, zeros included).
    pub violations: Vec<JsonCount>,
    /// Unexpected errors per class (every class, zeros included).
    pub errors: Vec<JsonCount>,
    /// Calls refused because a target (or the caller) was offline.
    pub offline_refusals: u64,
    /// Hotplug cycling (`--onoff`); `null` when off.
    pub hotplug: Option<HotplugSummary>,
    /// IPI fault injection and the stall diagnostics (always present; zeros when off).
    pub faults: FaultSummary,
    /// The RCU torture (`--rcu`); `null` when off.
    pub rcu: Option<RcuSummary>,
    /// Seconds into the run when `--dump-on-stall` printed the dump; `null` if it did not.
    pub stall_dump_at_s: Option<f64>,
    /// The first few violating calls, as text.
    pub examples: Vec<String>,
    /// Engine IPI counters.
    pub ipis: JsonIpis,
    /// Hosted-backend and engine counters.
    pub host: JsonHost,
    /// CPUs that used up their call records.
    pub capacity_reached: Vec<CpuId>,
    /// CPUs whose latency samples are missing.
    pub latency_missing: Vec<CpuId>,
    /// Run-level failures.
    pub incidents: Vec<String>,
}

/// The configuration part of [`JsonReport`].
#[derive(Debug, Serialize)]
pub struct JsonConfig {
    /// CPUs.
    pub cpus: usize,
    /// Configured duration, seconds.
    pub duration_s: f64,
    /// Idle policy.
    pub idle: String,
    /// The seed (repeat the run with `--seed`).
    pub seed: u64,
    /// The same seed as a decimal string: JSON readers that hold numbers as doubles (jq,
    /// JavaScript) round a 64-bit seed; this one survives them.
    pub seed_str: String,
    /// Whether long waits were on.
    pub long_wait: bool,
    /// Whether functions ran inside signal handlers (`--signal-calls`).
    pub signal_calls: bool,
    /// The injected fault (self-test), if any.
    pub inject: Option<String>,
    /// Call records per CPU.
    pub max_calls_per_cpu: u64,
    /// Calls per CPU at least.
    pub min_calls_per_cpu: u64,
    /// Bound on each wait, seconds.
    pub timeout_s: f64,
    /// Hotplug interval, seconds (`null`: no hotplug cycling).
    pub onoff_s: Option<f64>,
    /// Probability that an IPI is dropped.
    pub drop_ipi: f64,
    /// Probability that an IPI is delayed.
    pub delay_ipi: f64,
    /// The stall threshold asked for, ms (`null`: the default).
    pub stall_threshold_ms: Option<f64>,
    /// Whether `--dump-on-stall` was given.
    pub dump_on_stall: bool,
    /// Whether the RCU torture ran.
    pub rcu: bool,
}

/// One kind's line of [`JsonReport`].
#[derive(Debug, Serialize)]
pub struct JsonKind {
    /// Kind name.
    pub name: &'static str,
    /// The engine call.
    pub primitive: &'static str,
    /// Weight in the mix.
    pub weight: u32,
    /// Share of the mix, percent.
    pub percent: f64,
    /// Calls attempted.
    pub issued: u64,
    /// Calls accepted.
    pub accepted: u64,
    /// Expected refusals (busy caller-owned csd).
    pub refusals: u64,
    /// Calls given up after every csd was busy.
    pub gave_up: u64,
    /// Calls that returned an unexpected error.
    pub errors: u64,
    /// Calls refused because a CPU was offline (expected under hotplug).
    pub offline: u64,
    /// Function runs expected.
    pub runs: u64,
    /// What the latency measures.
    pub latency_measures: &'static str,
    /// Latency percentiles (µs), `null` without samples.
    pub latency_us: Option<LatencySummary>,
}

/// A named count.
#[derive(Debug, Serialize)]
pub struct JsonCount {
    /// Class name.
    pub class: &'static str,
    /// How many.
    pub count: u64,
}

/// IPI counters of [`JsonReport`].
#[derive(Debug, Serialize)]
pub struct JsonIpis {
    /// IPIs sent.
    pub sent: u64,
    /// IPIs elided (idle-polling target).
    pub elided: u64,
    /// IPIs handled.
    pub received: u64,
}

/// Host counters of [`JsonReport`].
#[derive(Debug, Serialize)]
pub struct JsonHost {
    /// Real-time signals sent.
    pub signals: u64,
    /// Futex wakes sent.
    pub futex_wakes: u64,
    /// Calls queued.
    pub calls_queued: u64,
    /// Queued calls run.
    pub calls_run: u64,
    /// Queue flushes.
    pub flushes: u64,
}

impl From<&Report> for JsonReport {
    fn from(r: &Report) -> JsonReport {
        let v = &r.verification;
        let c = &r.config;
        JsonReport {
            schema_version: crate::JSON_SCHEMA_VERSION,
            result: if r.success() { "SUCCESS" } else { "FAILURE" },
            success: r.success(),
            exit_code: r.exit_code(),
            config: JsonConfig {
                cpus: c.cpus,
                duration_s: c.duration.as_secs_f64(),
                idle: idle_name(c.idle),
                seed: c.seed,
                seed_str: c.seed.to_string(),
                long_wait: c.long_wait,
                signal_calls: c.signal_calls,
                inject: c.inject.map(|f| format!("{f:?}")),
                max_calls_per_cpu: c.max_calls_per_cpu,
                min_calls_per_cpu: c.min_calls_per_cpu,
                timeout_s: c.timeout.as_secs_f64(),
                onoff_s: c.onoff.map(|d| d.as_secs_f64()),
                drop_ipi: c.drop_ipi,
                delay_ipi: c.delay_ipi,
                stall_threshold_ms: c.stall_threshold.map(|d| d.as_secs_f64() * 1e3),
                dump_on_stall: c.dump_on_stall,
                rcu: c.rcu,
            },
            elapsed_s: r.elapsed.as_secs_f64(),
            kinds: Kind::ALL
                .iter()
                .map(|&k| {
                    let t = &v.per_kind[k.index()];
                    JsonKind {
                        name: k.name(),
                        primitive: primitive(k),
                        weight: c.mix.weight(k),
                        percent: c.mix.percent(k),
                        issued: t.issued,
                        accepted: t.accepted,
                        refusals: t.refusals,
                        gave_up: t.gave_up,
                        errors: t.errors,
                        offline: t.offline,
                        runs: t.deliveries,
                        latency_measures: k.latency_meaning(),
                        latency_us: r.latency[k.index()],
                    }
                })
                .collect(),
            calls_checked: v.calls_checked,
            runs_ok: v.deliveries_ok,
            out_checked: r.out_checked(),
            violations: Violation::ALL
                .iter()
                .map(|&x| JsonCount {
                    class: x.name(),
                    count: v.count(x),
                })
                .collect(),
            errors: ERROR_CLASSES
                .iter()
                .zip(v.errors_by_class)
                .map(|(&class, count)| JsonCount { class, count })
                .collect(),
            offline_refusals: v.offline_refusals(),
            hotplug: r.hotplug,
            faults: r.faults,
            rcu: r.rcu,
            stall_dump_at_s: r.stall_dump_at.map(|d| d.as_secs_f64()),
            examples: v.examples.iter().map(example_line).collect(),
            ipis: JsonIpis {
                sent: r.engine.ipi_sent,
                elided: r.engine.ipi_elided,
                received: r.engine.ipi_received,
            },
            host: JsonHost {
                signals: r.signals_sent,
                futex_wakes: r.futex_wakes,
                calls_queued: r.engine.calls_queued,
                calls_run: r.engine.calls_run,
                flushes: r.engine.flushes,
            },
            capacity_reached: r.capacity_reached.clone(),
            latency_missing: r.latency_missing.clone(),
            incidents: r.incidents.clone(),
        }
    }
}

/// One violating call, as a line of text.
pub fn example_line(e: &super::ledger::Example) -> String {
    let r = &e.record;
    let mut line = format!(
        "{}: call {}#{} ({}, {}) expected {} ran {} twice {} wrong-arg {}",
        e.class.name(),
        r.id.sender(),
        r.id.index(),
        r.kind.map_or("?", Kind::name),
        r.outcome,
        cpulist(r.expected),
        cpulist(r.ran),
        cpulist(r.duplicated),
        cpulist(r.wrong_cpu)
    );
    if r.in_bad != 0 {
        let _ = write!(
            line,
            " in-bad-on {} saw {:#x} want {:#x}",
            cpulist(r.in_bad),
            r.in_seen,
            super::ledger::in_token(r.id)
        );
    }
    if e.class == Violation::OutOrder || r.out_seen != 0 {
        let _ = write!(
            line,
            " out saw {:#x} want {:#x}",
            r.out_seen,
            super::ledger::expected_out(r.id, r.expected)
        );
    }
    line
}

/// The optional stresses of `c`, as a suffix for the first line (empty when none is on).
pub fn stresses(c: &Config) -> String {
    let mut out = String::new();
    if let Some(i) = c.onoff {
        let _ = write!(out, ", hotplug every {i:?}");
    }
    if c.injects_ipi_faults() {
        let _ = write!(out, ", drop-ipi {} delay-ipi {}", c.drop_ipi, c.delay_ipi);
    }
    if let Some(t) = c.machine_stall_threshold() {
        let _ = write!(out, ", stall threshold {t:?}");
    }
    if c.rcu {
        out.push_str(if c.mix.total() == 0 {
            ", rcu only"
        } else {
            ", rcu"
        });
    }
    out
}

/// A human name for an idle policy.
pub fn idle_name(idle: IdlePolicy) -> String {
    match idle {
        IdlePolicy::Poll => "poll".to_owned(),
        IdlePolicy::Sleep => "sleep".to_owned(),
        IdlePolicy::PollThenSleep(d) => format!("mixed (poll {d:?}, then sleep)"),
        other => format!("{other:?}"),
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
            "smpcall torture: {} CPUs, {:?}, idle {}, seed {:#x}, long waits {}, calls run {}{}",
            c.cpus,
            c.duration,
            idle_name(c.idle),
            c.seed,
            if c.long_wait { "on" } else { "off" },
            if c.signal_calls {
                "in signal handlers (--signal-calls)"
            } else {
                "at safe points"
            },
            stresses(c)
        )?;
        if let Some(fault) = c.inject {
            writeln!(f, "{:<12}fault {fault:?} injected (self-test)", "note")?;
        }
        let row = |f: &mut fmt::Formatter<'_>, name: &str, pct: f64, t: [u64; 5]| {
            writeln!(
                f,
                "  {:<14}{:>6.1}{:>11}{:>11}{:>9}{:>9}{:>12}",
                name, pct, t[0], t[1], t[2], t[3], t[4]
            )
        };
        writeln!(
            f,
            "  {:<14}{:>6}{:>11}{:>11}{:>9}{:>9}{:>12}",
            "kind", "mix %", "issued", "accepted", "refused", "errors", "runs"
        )?;
        for kind in Kind::ALL {
            let t = &v.per_kind[kind.index()];
            row(
                f,
                kind.name(),
                c.mix.percent(kind),
                [t.issued, t.accepted, t.refusals, t.errors, t.deliveries],
            )?;
        }
        let sum = |g: fn(&super::ledger::KindTally) -> u64| v.per_kind.iter().map(g).sum::<u64>();
        row(
            f,
            "total",
            100.0,
            [
                sum(|t| t.issued),
                sum(|t| t.accepted),
                sum(|t| t.refusals),
                sum(|t| t.errors),
                sum(|t| t.deliveries),
            ],
        )?;
        writeln!(
            f,
            "  {:<14}{:<14}{:>10}{:>10}{:>10}{:>10}",
            "latency µs", "measures", "p50", "p90", "p99", "max"
        )?;
        for kind in Kind::ALL {
            match &self.latency[kind.index()] {
                Some(l) => writeln!(
                    f,
                    "  {:<14}{:<14}{:>10.1}{:>10.1}{:>10.1}{:>10.1}",
                    kind.name(),
                    kind.latency_meaning(),
                    l.p50_us,
                    l.p90_us,
                    l.p99_us,
                    l.max_us
                )?,
                None => writeln!(
                    f,
                    "  {:<14}{:<14}{:>10}{:>10}{:>10}{:>10}",
                    kind.name(),
                    kind.latency_meaning(),
                    "-",
                    "-",
                    "-",
                    "-"
                )?,
            }
        }
        writeln!(
            f,
            "{:<12}{} calls, {} function runs exactly once on their CPU (each in-checked), \
             {} calls out-checked",
            "verified",
            v.calls_checked,
            v.deliveries_ok,
            self.out_checked()
        )?;
        let classes: Vec<String> = Violation::ALL
            .iter()
            .map(|&x| format!("{} {}", x.name(), v.count(x)))
            .collect();
        writeln!(
            f,
            "{:<12}{}: {}",
            "violations",
            if v.is_clean() { "none" } else { "FOUND" },
            classes.join(", ")
        )?;
        for e in &v.examples {
            writeln!(f, "  {}", example_line(e))?;
        }
        let errors: Vec<String> = ERROR_CLASSES
            .iter()
            .zip(v.errors_by_class)
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        writeln!(
            f,
            "{:<12}{} unexpected{}; offline refusals {}; {} expected refusals (busy csd), \
             {} calls given up",
            "errors",
            v.total_errors(),
            if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join(", "))
            },
            v.offline_refusals(),
            sum(|t| t.refusals),
            sum(|t| t.gave_up)
        )?;
        if let Some(h) = &self.hotplug {
            writeln!(
                f,
                "{:<12}every {:.1} ms: {} offline / {} online cycles ({} stop_machines, {} \
                 downs refused: victim busy outside a safe point); offline refusals {} ({} by \
                 an offline caller); offline runs {} (engine), {} (seen by functions); local \
                 runs after going offline {}",
                "hotplug",
                h.interval_ms,
                h.cycles_offline,
                h.cycles_online,
                h.stop_machines,
                h.downs_refused_busy,
                h.offline_refusals,
                h.offline_refusals_own_cpu,
                h.offline_runs,
                h.offline_runs_seen,
                h.local_runs_after_offline
            )?;
        }
        let fs = &self.faults;
        if fs.worth_reporting() {
            let delays = match fs.max_call_delay_ms {
                Some(max) => format!(
                    "; calls delayed > {:.0} ms: {} (longest {max:.1} ms)",
                    2.0 * fs.stall_threshold_ms,
                    fs.delayed_calls
                ),
                None => String::new(),
            };
            writeln!(
                f,
                "{:<12}drop {} delay {} (stall threshold {:.0} ms): IPIs dropped {}, delayed {}; \
                 stall reports {} (queue {}, stop_machine {}), re-sends {}, recoveries {}{delays}; \
                 report lines {}{}",
                "faults",
                fs.drop_ipi,
                fs.delay_ipi,
                fs.stall_threshold_ms,
                fs.ipis_dropped,
                fs.ipis_delayed,
                fs.stall_reports,
                fs.queue_stall_reports,
                fs.stop_stall_reports,
                fs.ipi_resends,
                fs.recoveries,
                fs.sink.lines,
                if fs.unreported_stall {
                    "; UNREPORTED STALL"
                } else {
                    ""
                }
            )?;
        }
        if let Some(r) = &self.rcu {
            writeln!(
                f,
                "{:<12}grace periods {} (CPUs IPI'd {}, skipped as idle {}, quiescent states \
                 deferred to unlock {}); reads {} in tasks, {} in handlers ({} skipped offline); \
                 swaps {}, nodes freed {}; violations {}",
                "rcu",
                r.grace_periods,
                r.cpus_ipid,
                r.cpus_skipped_idle,
                r.deferred_to_unlock,
                r.task_reads,
                r.handler_reads,
                r.reads_skipped_offline,
                r.writes,
                r.nodes_freed,
                r.violations
            )?;
        }
        if let Some(at) = self.stall_dump_at {
            writeln!(
                f,
                "{:<12}first stall reported at {:.3} s: machine dump printed to stderr",
                "note",
                at.as_secs_f64()
            )?;
        }
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
        if !self.latency_missing.is_empty() {
            writeln!(
                f,
                "{:<12}latency samples of CPUs {:?} are missing (their tasks did not finish)",
                "note", self.latency_missing
            )?;
        }
        for incident in &self.incidents {
            writeln!(f, "{:<12}{incident}", "incident")?;
        }
        write!(f, "{}", if self.success() { "SUCCESS" } else { "FAILURE" })
    }
}
