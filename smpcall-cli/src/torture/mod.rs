//! `smpcall torture`: the exactly-once and ordering workload.
//!
//! Every CPU of a hosted [`Machine`] runs a task that, until the deadline, issues a seeded
//! random, weighted mix ([`Mix`]) of every kind of call ([`Kind`]) to random targets — other
//! CPUs and itself, waiting and not waiting, single and many, engine-owned and caller-owned
//! call data, and "rpc" calls (no-wait, then wait for the function's completion signal). Each
//! call gets a record in a [`Ledger`], written *before* the call: the CPUs it must run on and
//! a per-call "in" token. Each function run checks it sees that token ("in" ordering), marks
//! the CPU it runs on, sometimes busy-waits a few microseconds (with [`Config::long_wait`],
//! rarely a millisecond), and adds a per-call "out" value that a waiting caller must see
//! right after its call returned ("out" ordering). When every task is done and every call
//! has drained, [`verify`] checks each record: every accepted call ran exactly once on each
//! CPU it was meant for and nowhere else, and both ordering checks passed.
//!
//! Each CPU also times its calls per kind into HDR histograms ([`Latencies`]), merged into
//! percentiles for the [`Report`]. [`run_observed`] reports a [`Progress`] snapshot every
//! 100 ms while the run goes on (for a progress bar and periodic statistics lines).
//!
//! ```no_run
//! use smpcall_cli::torture::{self, Config};
//! let report = torture::run(&Config { cpus: 2, ..Config::default() })?;
//! println!("{report}");
//! assert!(report.success());
//! # Ok::<(), smpcall_cli::SetupError>(())
//! ```
//!
//! Optional stresses on top of the call workload:
//!
//! * **Hotplug cycling** ([`Config::onoff`], `--onoff INTERVAL`): CPU 0 takes a random other CPU
//!   down and brings it back up every interval; refusals with `Error::Offline` become expected,
//!   many-calls are checked against the mask the engine returned, and a call that runs on an
//!   offline CPU is an `ipi-to-offline` violation. See [`hotplug`].
//! * **IPI fault injection** ([`Config::drop_ipi`], [`Config::delay_ipi`]): the hosted platform
//!   drops or delays IPIs; the engine's stall diagnostics must report and recover every stuck
//!   call. Reports go through a counting sink. See [`faults`] for the detection rule.
//! * **RCU** ([`Config::rcu`]): readers on every CPU, writers swapping a pointer and reclaiming
//!   through expedited grace periods; a reader that sees a reclaimed (poisoned) node is an
//!   `rcu` violation. See [`rcu`].
//!
//! Layout, for extension: [`kind`] (what is issued, and the weighted [`Mix`]), [`ledger`] (the
//! per-call records, the function's bookkeeping and checks, the verifier and its violation
//! classes), [`latency`] (per-kind histograms), [`report`] (statistics, their text and JSON
//! forms), [`cli`] (the command's options, progress bar and statistics lines), [`hotplug`],
//! [`faults`] and [`rcu`] (the optional stresses), and here the driver ([`run_observed`]) and
//! the per-CPU workload (`Worker`).

pub mod churn;
pub mod cli;
pub mod faults;
pub mod hotplug;
pub mod kind;
pub mod latency;
pub mod ledger;
pub mod rcu;
pub mod report;
pub mod rng;

use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use smpcall::hosted::{Faults, HostEngine, IdlePolicy, Machine};
use smpcall::{CpuId, CpuMask, CpuStats, Csd, DiagStats, Error, HotplugStats};

use crate::SetupError;

pub use faults::FaultSummary;
pub use hotplug::HotplugSummary;
pub use kind::{Kind, Mix, WeightSpec};
pub use latency::{Latencies, LatencySummary};
pub use ledger::{
    verify, Ledger, LiveViolations, RecordId, Verification, Violation, MAX_TORTURE_CPUS,
};
pub use rcu::{RcuSummary, RcuTorture};
pub use report::Report;
use rng::Rng;

/// Caller-owned call data each CPU keeps for [`Kind::CsdAsync`] (and some [`Kind::SelfAsync`]).
pub const CSD_POOL: usize = 8;

/// One call in this many makes its functions busy-wait briefly (simulated work).
pub const SHORT_SPIN_ONE_IN: u64 = 16;
/// Shortest brief busy-wait of a function, in ns.
pub const SHORT_SPIN_MIN_NS: u32 = 1_000;
/// Longest brief busy-wait of a function, in ns.
pub const SHORT_SPIN_MAX_NS: u32 = 5_000;
/// With [`Config::long_wait`], one call in this many makes its functions busy-wait long.
pub const LONG_WAIT_ONE_IN: u64 = 1_000;
/// With [`Config::long_wait`], how long such a function busy-waits, in ns (1 ms).
pub const LONG_WAIT_NS: u32 = 1_000_000;

/// A deliberate fault, to show that the checks catch what they are meant to catch (a run
/// with one must end in `FAILURE`). Injected by CPU 0 into its first call of a fitting kind
/// and every [`FAULT_EVERY`]th after.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// The caller's "in" token is wrong when the call is issued, as if its store had not
    /// reached the target: each function of such a call must report an in-order violation.
    InOrder,
    /// A waiting caller (or rpc) reads the "out" value before issuing the call, as if the
    /// call had returned before its functions ran: must be reported as out-order.
    OutOrder,
}

/// CPU 0 injects a [`Fault`] into one call in this many (of the kinds it applies to).
pub const FAULT_EVERY: u64 = 256;

/// How often [`run_observed`] reports progress.
pub const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// The engine's stall threshold when IPI faults are injected and none is given: 20 ms.
pub const FAULT_STALL_THRESHOLD: Duration = Duration::from_millis(20);

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// CPUs of the hosted machine (1..=64; more than the host's cores is fine).
    pub cpus: usize,
    /// How long every CPU issues calls.
    pub duration: Duration,
    /// What idle CPUs do.
    pub idle: IdlePolicy,
    /// Seed of the per-CPU choice streams.
    pub seed: u64,
    /// Call records per CPU; a CPU that uses them up stops early (the report notes it).
    pub max_calls_per_cpu: u64,
    /// Calls each CPU issues at least: a CPU that has issued fewer by the deadline goes on
    /// until it has (for at most half of `timeout` more). Makes a short run's coverage
    /// independent of how fast a loaded host is. 0: stop at the deadline.
    pub min_calls_per_cpu: u64,
    /// How often each kind is picked.
    pub mix: Mix,
    /// Long waits: one call in [`LONG_WAIT_ONE_IN`] makes each of its functions busy-wait
    /// [`LONG_WAIT_NS`] (besides the brief 1–5 µs busy-waits of one call in
    /// [`SHORT_SPIN_ONE_IN`], always on).
    pub long_wait: bool,
    /// Run call functions inside the IPI signal handler wherever it lands (the machine's
    /// `unsafe` `run_calls_in_signal_handlers`; the torture's functions are async-signal-safe).
    /// Off: the sound default, where busy CPUs run calls at their safe points.
    pub signal_calls: bool,
    /// Threads of the torture's own (not the machine's) that attach as CPUs and leave again
    /// while it runs (`--churn N`): N attach slots after the spawned CPUs, every CPU calls them
    /// too, and calls to a slot nobody holds are refused as offline. 0: off.
    pub churn: usize,
    /// Bound on each wait: after the deadline a task to finish, calls to drain, shutdown;
    /// half of it for an rpc's completion.
    pub timeout: Duration,
    /// A fault to inject (self-test of the checks; `None` for a real run).
    pub inject: Option<Fault>,
    /// Hotplug cycling: CPU 0 takes a random other CPU down, and after this interval up
    /// again, and so on for the whole run (needs 2 CPUs or more; see [`hotplug`]).
    pub onoff: Option<Duration>,
    /// IPI fault injection: the probability (0..=1) that the hosted platform drops an IPI
    /// (the signal or futex wake is not sent; see [`faults`]).
    pub drop_ipi: f64,
    /// The probability (0..=1) that an IPI is delayed (1–50 µs).
    pub delay_ipi: f64,
    /// The engine's stall threshold; `None`: [`FAULT_STALL_THRESHOLD`] with fault injection,
    /// else the machine's default (1 s).
    pub stall_threshold: Option<Duration>,
    /// Print the machine's dump to stderr when the first stall is reported.
    pub dump_on_stall: bool,
    /// Write every engine report to stderr (else, with fault injection on, they are only
    /// counted; without it they are always written).
    pub verbose_reports: bool,
    /// Run the RCU torture alongside the calls (or alone, with every call kind at weight 0).
    pub rcu: bool,
}

impl Config {
    /// Whether IPI faults are injected.
    pub fn injects_ipi_faults(&self) -> bool {
        self.drop_ipi > 0.0 || self.delay_ipi > 0.0
    }

    /// The stall threshold to build the machine with (`None`: the machine's default).
    pub fn machine_stall_threshold(&self) -> Option<Duration> {
        self.stall_threshold
            .or(self.injects_ipi_faults().then_some(FAULT_STALL_THRESHOLD))
    }
}

impl Default for Config {
    /// 4 CPUs, 5 s, idle polling 50 µs then sleeping, seed 1, at most 4 Mi calls per CPU
    /// (no minimum), the default mix ([`Mix::default`]), no long waits, 30 s bound on each wait.
    fn default() -> Self {
        Config {
            cpus: 4,
            duration: Duration::from_secs(5),
            idle: IdlePolicy::PollThenSleep(Duration::from_micros(50)),
            seed: 1,
            max_calls_per_cpu: 4 << 20,
            min_calls_per_cpu: 0,
            mix: Mix::default(),
            long_wait: false,
            signal_calls: false,
            churn: 0,
            timeout: Duration::from_secs(30),
            inject: None,
            onoff: None,
            drop_ipi: 0.0,
            delay_ipi: 0.0,
            stall_threshold: None,
            dump_on_stall: false,
            verbose_reports: false,
            rcu: false,
        }
    }
}

/// Where a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// CPUs are issuing calls (until the deadline).
    Running,
    /// The deadline passed: waiting for tasks to finish and calls to drain.
    Draining,
}

/// A snapshot of a run in progress (relaxed counters: approximate while it runs).
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Where the run is.
    pub phase: Phase,
    /// Since the CPUs' tasks were submitted.
    pub elapsed: Duration,
    /// The configured duration.
    pub duration: Duration,
    /// Calls started so far, per kind (indexed by [`Kind::index`]).
    pub begun: [u64; Kind::COUNT],
    /// Engine counters summed over all CPUs.
    pub engine: CpuStats,
    /// Violations found so far (lost calls are only known at the end).
    pub live: LiveViolations,
    /// CPUs of the run (one task each).
    pub cpus: usize,
    /// CPUs whose task has finished.
    pub tasks_done: usize,
    /// Hotplug counters (with `--onoff`).
    pub hotplug: Option<HotplugStats>,
    /// IPIs dropped so far (with fault injection).
    pub ipis_dropped: Option<u64>,
    /// The engine's diagnostic counters.
    pub diag: DiagStats,
    /// Grace periods so far and RCU violations (with `--rcu`).
    pub rcu: Option<(u64, u64)>,
}

impl Progress {
    /// Calls started so far, all kinds.
    pub fn calls(&self) -> u64 {
        self.begun.iter().sum()
    }
}

/// Runs the workload and verifies it: [`run_observed`] without an observer.
pub fn run(cfg: &Config) -> Result<Report, SetupError> {
    run_observed(cfg, &mut |_: &Progress| {})
}

/// Counts a finished task when dropped (also when the task panics).
struct DoneGuard(Arc<AtomicUsize>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Runs the workload and verifies it, calling `observe` from this thread about every
/// [`PROGRESS_TICK`] until the calls have drained. `Err` only for a setup problem (bad
/// configuration, the machine would not start); every finding about the engine is in the
/// [`Report`].
pub fn run_observed(
    cfg: &Config,
    observe: &mut dyn FnMut(&Progress),
) -> Result<Report, SetupError> {
    ledger::check_cpus(cfg.cpus)?;
    if cfg.mix.total() == 0 && !cfg.rcu {
        return Err(SetupError::NoWork);
    }
    if let Some(interval) = cfg.onoff {
        if cfg.cpus < 2 {
            return Err(SetupError::OnoffCpus { cpus: cfg.cpus });
        }
        if interval.is_zero() {
            return Err(SetupError::OnoffInterval);
        }
    }
    let n = cfg.cpus;
    if n + cfg.churn > MAX_TORTURE_CPUS {
        return Err(SetupError::CpusPlusChurn {
            cpus: n,
            churn: cfg.churn,
            max: MAX_TORTURE_CPUS,
        });
    }
    let ledger = Arc::new(Ledger::new(n + cfg.churn, cfg.max_calls_per_cpu)?);
    // Attach slots start empty: offline, as far as the ledger knows.
    for slot in n..n + cfg.churn {
        ledger.set_offline(slot, true);
    }
    let faults_on = cfg.injects_ipi_faults();
    let sink_before = faults::sink_counts();
    let mut builder = Machine::builder()
        .cpus(n)
        .attach_slots(cfg.churn)
        .idle(cfg.idle)
        .timeout(cfg.timeout);
    let sink: fn(&str) = if cfg.verbose_reports || !faults_on {
        faults::verbose_sink
    } else {
        faults::quiet_sink
    };
    // SAFETY: both sinks only bump atomic counters and write(2) to stderr: async-signal-safe.
    builder = unsafe { builder.report_sink(sink) };
    if let Some(threshold) = cfg.machine_stall_threshold() {
        builder = builder.stall_threshold(threshold);
    }
    if faults_on {
        builder = builder.faults(
            Faults::none()
                .drop_ipi(cfg.drop_ipi)
                .delay_ipi(cfg.delay_ipi)
                .seed(cfg.seed),
        );
    }
    if cfg.signal_calls {
        // SAFETY: every function the torture sends (`on_call`, the RCU reader checks, the
        // rpc replies) only touches atomics in the ledger, spins and reads the clock:
        // async-signal-safe.
        builder = unsafe { builder.run_calls_in_signal_handlers() };
    }
    // Shared with the churn threads, which attach to it; unwrapped again for the shutdown.
    let machine = Arc::new(builder.build()?);
    let stall_ns = machine.engine().stall_threshold().as_nanos() as u64;
    if cfg.drop_ipi > 0.0 && stall_ns != 0 {
        ledger.set_delay_threshold(faults::delay_threshold(Duration::from_nanos(stall_ns)));
    }
    let rcu = cfg.rcu.then(|| Arc::new(RcuTorture::new()));
    let gate = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let mut incidents = Vec::new();
    let mut capacity_reached = Vec::new();
    let mut latencies = Latencies::new();
    let mut latency_missing = Vec::new();

    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|cpu| {
            let ledger = Arc::clone(&ledger);
            let gate = Arc::clone(&gate);
            let done = DoneGuard(Arc::clone(&finished));
            let cfg = cfg.clone();
            let rcu = rcu.clone();
            machine.run_on(cpu, move |engine| {
                let _done = done;
                Worker::run(engine, cpu, &cfg, ledger, rcu, &gate)
            })
        })
        .collect();
    let churn_stop = Arc::new(AtomicBool::new(false));
    let churners: Vec<_> = (0..cfg.churn)
        .map(|t| churn::spawn(&machine, &ledger, &churn_stop, cfg.seed ^ (t as u64 + 1)))
        .collect::<Result<_, _>>()?;
    let engine = machine.engine();
    let snapshot = |phase: Phase| Progress {
        phase,
        elapsed: start.elapsed(),
        duration: cfg.duration,
        begun: ledger.begun_by_kind(),
        engine: engine.total_stats(),
        live: ledger.live(),
        cpus: n,
        tasks_done: finished.load(Ordering::SeqCst).min(n),
        hotplug: cfg.onoff.map(|_| engine.hotplug_stats()),
        ipis_dropped: faults_on.then(|| engine.platform().ipis_dropped()),
        diag: engine.diag_stats(),
        rcu: rcu
            .as_ref()
            .map(|r| (engine.rcu_stats().grace_periods, r.violations())),
    };
    // `--dump-on-stall`: the first stall reported (by the engine's counters, or a stall line
    // counted by the report sink) prints the machine's dump once, from this thread.
    let mut stall_dump_at = None;
    let mut dump_on_stall = |elapsed: Duration| {
        if !cfg.dump_on_stall || stall_dump_at.is_some() {
            return;
        }
        let d = engine.diag_stats();
        let engine_stalls =
            d.stall_reports + d.queue_stall_reports + engine.hotplug_stats().stalls_reported;
        if engine_stalls == 0 && faults::sink_counts().since(&sink_before).stalls() == 0 {
            return;
        }
        stall_dump_at = Some(elapsed);
        eprintln!(
            "smpcall torture: first stall reported at {:.3} s; machine dump:\n{}",
            elapsed.as_secs_f64(),
            machine.dump().trim_end()
        );
    };
    let phase_now = || {
        if start.elapsed() < cfg.duration {
            Phase::Running
        } else {
            Phase::Draining
        }
    };

    // Watch the tasks (bounded), reporting progress.
    let join_deadline = start + cfg.duration + cfg.timeout;
    loop {
        observe(&snapshot(phase_now()));
        dump_on_stall(start.elapsed());
        let now = Instant::now();
        if finished.load(Ordering::SeqCst) >= n || now >= join_deadline {
            break;
        }
        thread::sleep(PROGRESS_TICK.min(join_deadline - now));
    }
    let mut hung = Vec::new();
    let mut rcu_errors = 0usize;
    for (cpu, mut task) in tasks.into_iter().enumerate() {
        // Every task has finished, or the bound is spent: this does not wait long.
        let left = join_deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        match panic::catch_unwind(AssertUnwindSafe(|| task.join_timeout(left))) {
            Ok(Ok(Ok(outcome))) => {
                if outcome.capacity_reached {
                    capacity_reached.push(cpu);
                }
                latencies.merge(&outcome.latencies);
                for e in outcome.hotplug_errors {
                    incidents.push(format!("hotplug: {e}"));
                }
                rcu_errors += outcome.rcu_errors.len();
                for e in outcome.rcu_errors.into_iter().take(4) {
                    incidents.push(format!("CPU {cpu}: rcu: {e}"));
                }
            }
            Ok(Ok(Err(why))) => {
                latency_missing.push(cpu);
                incidents.push(format!("CPU {cpu}: {why}"));
            }
            Ok(Err(Error::TimedOut { .. })) => {
                hung.push(cpu);
                latency_missing.push(cpu);
                let last = ledger.last(cpu).map_or_else(
                    || "none".to_owned(),
                    |r| {
                        format!(
                            "#{} ({}) to {}, ran so far on {}",
                            r.id.index(),
                            r.kind.map_or("?", Kind::name),
                            report::cpulist(r.expected),
                            report::cpulist(r.ran)
                        )
                    },
                );
                incidents.push(format!(
                    "CPU {cpu}: its task did not finish within {:?} after the deadline \
                     (hung?); its last call: {last}",
                    cfg.timeout
                ));
            }
            Ok(Err(e)) => {
                latency_missing.push(cpu);
                incidents.push(format!("CPU {cpu}: its task could not run: {e}"));
            }
            Err(_) => {
                latency_missing.push(cpu);
                incidents.push(format!("CPU {cpu}: its task panicked"));
            }
        }
    }
    let elapsed = start.elapsed();

    // Asynchronous calls may still be queued or running: wait for them (bounded).
    if rcu_errors > 4 {
        incidents.push(format!("rcu: {rcu_errors} unexpected errors in all"));
    }
    // The churn threads stop once the tasks are done (nobody calls them any more).
    churn_stop.store(true, Ordering::SeqCst);
    let churn = (cfg.churn > 0).then(|| {
        let (summary, errors) = churn::join(churners);
        incidents.extend(errors);
        summary
    });
    let mut last_tick = Instant::now();
    let mut tick = || {
        if last_tick.elapsed() >= PROGRESS_TICK {
            last_tick = Instant::now();
            observe(&snapshot(Phase::Draining));
            dump_on_stall(start.elapsed());
        }
    };
    if hung.is_empty() && !wait_for(cfg.timeout, &mut tick, || engine.is_quiescent()) {
        incidents.push(format!(
            "calls still queued or running {:?} after the last task finished \
             (waited for the engine to become quiescent)",
            cfg.timeout
        ));
    }
    // Every queued call ran: the engine's own counters must agree (they are relaxed
    // statistics, so give them a moment to settle).
    let mut stats = engine.total_stats();
    if hung.is_empty()
        && !wait_for(Duration::from_secs(1), &mut tick, || {
            stats = engine.total_stats();
            stats.calls_queued == stats.calls_run
        })
    {
        incidents.push(format!(
            "engine counters disagree after the drain: {} calls queued, {} run",
            stats.calls_queued, stats.calls_run
        ));
    }
    observe(&snapshot(Phase::Draining));
    dump_on_stall(start.elapsed());
    let signals_sent = engine.platform().signals_sent();
    let futex_wakes = engine.platform().futex_wakes();
    let diag = engine.diag_stats();
    let hotplug_stats = engine.hotplug_stats();
    let mut fault_summary = FaultSummary {
        drop_ipi: cfg.drop_ipi,
        delay_ipi: cfg.delay_ipi,
        stall_threshold_ms: stall_ns as f64 / 1e6,
        ipis_dropped: engine.platform().ipis_dropped(),
        ipis_delayed: engine.platform().ipis_delayed(),
        stall_reports: diag.stall_reports,
        queue_stall_reports: diag.queue_stall_reports,
        stop_stall_reports: hotplug_stats.stalls_reported,
        ipi_resends: diag.ipi_resends,
        recoveries: diag.recoveries,
        delayed_calls: ledger.delayed_calls(),
        max_call_delay_ms: ledger.max_delay().map(|d| d.as_secs_f64() * 1e3),
        sink: faults::sink_counts().since(&sink_before),
        unreported_stall: false,
    };
    fault_summary.judge();
    if fault_summary.unreported_stall {
        incidents.push(format!(
            "lost-IPI detection: {} IPIs were dropped and {} calls waited longer than {:.0} ms \
             (twice the stall threshold) to run, but no stall was reported",
            fault_summary.ipis_dropped,
            fault_summary.delayed_calls,
            2.0 * fault_summary.stall_threshold_ms
        ));
    }
    let rcu_stats = engine.rcu_stats();
    // Shutting down joins the CPU threads, which orders every record write before the check.
    let down = match Arc::try_unwrap(machine) {
        Ok(m) => m.shutdown().map_err(|e| e.to_string()),
        Err(shared) => Err(format!(
            "the machine is still shared ({} references)",
            Arc::strong_count(&shared)
        )),
    };
    if let Err(e) = down {
        incidents.push(format!("machine shutdown: {e}"));
    }
    let mut verification = verify(&ledger);
    let rcu_summary = rcu.as_ref().map(|r| r.summary(rcu_stats));
    // Engine-side "IPI to an offline CPU": calls an offline CPU found and ran. The ledger sees
    // the same from the functions' side (calls on a CPU the driver had taken down); either
    // must be 0, and the class counts the larger of the two.
    let offline_class = &mut verification.violations[Violation::IpiToOffline.index()];
    *offline_class = (*offline_class).max(stats.offline_runs);
    if let Some(r) = &rcu_summary {
        verification.violations[Violation::Rcu.index()] = r.violations;
    }
    let hotplug = cfg.onoff.map(|interval| HotplugSummary {
        interval_ms: interval.as_secs_f64() * 1e3,
        cycles_offline: hotplug_stats.downs,
        cycles_online: hotplug_stats.ups,
        downs_refused_busy: hotplug_stats.downs_refused_not_at_safe_point,
        stop_machines: hotplug_stats.stop_machines,
        offline_refusals: verification.offline_refusals(),
        offline_refusals_own_cpu: verification.offline_own_cpu,
        offline_runs: stats.offline_runs,
        offline_runs_seen: ledger.offline_runs(),
        local_runs_after_offline: ledger.local_offline_runs(),
    });

    Ok(Report {
        config: cfg.clone(),
        elapsed,
        verification,
        latency: latencies.summaries(),
        latency_missing,
        engine: stats,
        signals_sent,
        futex_wakes,
        capacity_reached,
        incidents,
        hotplug,
        churn,
        faults: fault_summary,
        rcu: rcu_summary,
        stall_dump_at,
    })
}

/// Polls `done` until it holds or `limit` passes; returns whether it held. Calls `tick`
/// between polls. Sleeps between polls: for the main thread only (see [`spin_for`]).
fn wait_for(limit: Duration, tick: &mut dyn FnMut(), mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tick();
        thread::sleep(Duration::from_micros(200));
    }
}

/// Like [`wait_for`], but yields instead of sleeping: for a CPU's task context. A relative
/// sleep there (`nanosleep`) is interrupted by every IPI signal and restarted with the time
/// left, and under a steady stream of calls it may never finish.
fn spin_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        smpcall::hosted::safe_point();
        thread::yield_now();
    }
}

/// The function every call runs: check, record where it ran, busy-wait `spin` ns, write the
/// "out" value. Signal context: see [`Ledger::deliver_spinning`].
fn on_call(ledger: &Ledger, id: RecordId, cpu: CpuId, spin: u32) {
    ledger.deliver_spinning(id, ledger::this_cpu(), cpu, spin);
}

fn mask_of(bits: u64) -> CpuMask {
    (0..MAX_TORTURE_CPUS)
        .filter(|c| bits >> c & 1 == 1)
        .collect()
}

/// The mask as bits, `None` if it holds a CPU the torture cannot represent.
fn bits_of(mask: &CpuMask) -> Option<u64> {
    mask.iter()
        .try_fold(0u64, |acc, c| (c < MAX_TORTURE_CPUS).then(|| acc | 1 << c))
}

/// How a CPU's task ended.
#[derive(Debug)]
struct Outcome {
    capacity_reached: bool,
    latencies: Latencies,
    /// Failed hotplug operations (CPU 0's driver).
    hotplug_errors: Vec<String>,
    /// Unexpected errors of RCU steps.
    rcu_errors: Vec<String>,
}

/// One CPU's side of the workload.
struct Worker<'a> {
    /// Calls run in signal handlers (`--signal-calls`): no explicit safe points.
    signal_calls: bool,
    engine: &'a HostEngine,
    ledger: Arc<Ledger>,
    me: CpuId,
    n: usize,
    /// Every CPU, as bits.
    all: u64,
    rng: Rng,
    csds: Vec<Pin<Box<Csd>>>,
    long_wait: bool,
    /// Bound on an rpc's wait for its completion.
    rpc_timeout: Duration,
    latencies: Latencies,
    /// The fault this CPU injects (only CPU 0 does), and how many fitting calls it saw.
    inject: Option<Fault>,
    fitting: u64,
    /// Hotplug cycling is on: `Offline` refusals are expected, many-call masks settle.
    hotplug: bool,
    /// How long to sleep when this CPU finds itself offline.
    backoff: Duration,
    /// CPU 0's hotplug driver.
    driver: Option<hotplug::Driver>,
    /// The RCU torture, and this CPU's writer state.
    rcu: Option<Arc<RcuTorture>>,
    writer: rcu::Writer,
    rcu_errors: Vec<String>,
}

impl<'a> Worker<'a> {
    /// The task of CPU `me`: meet the others at the start, issue calls until the deadline,
    /// wait for this CPU's caller-owned call data to come back.
    fn run(
        engine: &'a HostEngine,
        me: CpuId,
        cfg: &Config,
        ledger: Arc<Ledger>,
        rcu: Option<Arc<RcuTorture>>,
        gate: &AtomicUsize,
    ) -> Result<Outcome, String> {
        ledger::set_this_cpu(me);
        if engine.current_cpu() != Some(me) {
            return Err(format!(
                "the engine says this task runs on {:?}, not on CPU {me}",
                engine.current_cpu()
            ));
        }
        let n = engine.nr_cpus();
        // The tasks run on the spawned CPUs only (attach slots are the churn threads').
        let tasks = cfg.cpus;
        // No call before every CPU has declared who it is (calls to a CPU whose task has not
        // started would find its thread-local unset).
        gate.fetch_add(1, Ordering::SeqCst);
        let mut arrived = 0;
        if !spin_for(cfg.timeout, || {
            arrived = gate.load(Ordering::SeqCst);
            arrived >= tasks
        }) {
            return Err(format!(
                "waited {:?} for every CPU to reach the start barrier; {arrived} of {n} did",
                cfg.timeout
            ));
        }

        let mut w = Worker {
            signal_calls: cfg.signal_calls,
            engine,
            ledger,
            me,
            n,
            all: if n == 64 { u64::MAX } else { (1 << n) - 1 },
            rng: Rng::for_stream(cfg.seed, me as u64),
            csds: (0..CSD_POOL).map(|_| Box::pin(Csd::new())).collect(),
            long_wait: cfg.long_wait,
            // Half the bound: a stuck rpc is reported as such, before its task counts as hung.
            rpc_timeout: cfg.timeout / 2,
            latencies: Latencies::new(),
            inject: cfg.inject.filter(|_| me == 0),
            fitting: 0,
            hotplug: cfg.onoff.is_some() || cfg.churn > 0,
            backoff: cfg
                .onoff
                .map_or(Duration::ZERO, |i| (i / 4).max(Duration::from_micros(100))),
            // Starts only now, after the barrier: every task runs already.
            driver: cfg
                .onoff
                .filter(|_| me == 0)
                .map(|interval| hotplug::Driver::new(tasks, interval, cfg.seed)),
            rcu,
            writer: rcu::Writer::default(),
            rcu_errors: Vec::new(),
        };
        let begin = Instant::now();
        let deadline = begin + cfg.duration;
        // Past the deadline only to reach `min_calls_per_cpu`, and within half the bound (so
        // that the task is not taken for hung).
        let hard_deadline = deadline + cfg.timeout / 2;
        let signal_calls = cfg.signal_calls;
        let mut capacity_reached = false;
        let mut issued = 0u64;
        loop {
            let now = Instant::now();
            if now >= deadline && (issued >= cfg.min_calls_per_cpu || now >= hard_deadline) {
                break;
            }
            // A safe point per step: calls deferred to this CPU (it was busy in this loop when
            // their IPI came) run here. With --signal-calls they run in the handler instead,
            // and only the IPI (or a re-send after a lost one) brings them.
            if !signal_calls {
                smpcall::hosted::safe_point();
            }
            if let Some(driver) = &mut w.driver {
                driver.tick(engine, &w.ledger);
            }
            if w.rcu.is_some() && (cfg.mix.total() == 0 || w.rng.one_in(rcu::RCU_STEP_ONE_IN)) {
                w.rcu_step();
                issued += 1;
                continue;
            }
            let kind = cfg.mix.pick(&mut w.rng);
            if w.issue(kind).is_none() {
                capacity_reached = true;
                break;
            }
            issued += 1;
        }
        let mut hotplug_errors = Vec::new();
        if let Some(mut driver) = w.driver.take() {
            driver.finish(engine, &w.ledger);
            hotplug_errors = driver.errors;
        }
        if let Some(rcu) = w.rcu.take() {
            w.writer.finish(&rcu);
        }

        // Dropping a busy Csd spins until its target took it; wait here instead, serving our
        // own queue, and bounded.
        if !spin_for(cfg.timeout, || {
            w.engine.serve_queue();
            w.csds.iter().all(|c| !c.is_busy())
        }) {
            let csds = std::mem::take(&mut w.csds);
            // Never dropped: a target may still hold them.
            std::mem::forget(csds);
            return Err(format!(
                "waited {:?} for its caller-owned call data to be taken by their targets",
                cfg.timeout
            ));
        }
        Ok(Outcome {
            capacity_reached,
            latencies: w.latencies,
            hotplug_errors,
            rcu_errors: w.rcu_errors,
        })
    }

    /// Sleeps a quarter of the hotplug interval: this CPU is offline, its calls are refused.
    fn back_off(&self) {
        if !self.backoff.is_zero() {
            smpcall::hosted::sleep(self.backoff);
        }
    }

    /// A call was refused with `e`: under hotplug an `Offline` refusal is expected (and backs
    /// off if it was this CPU that is offline); anything else is an unexpected error.
    fn refused(&mut self, id: RecordId, e: &Error) {
        match *e {
            Error::Offline(cpu) if self.hotplug => {
                let own = cpu == self.me;
                self.ledger.note_offline(id, own);
                if own {
                    self.back_off();
                }
            }
            _ => self.ledger.note_error(id, e),
        }
    }

    /// One RCU step (see [`rcu`]): mostly a read in task context, sometimes a read in
    /// another CPU's handler (one CPU or all others), now and then a write (swap + grace
    /// period + reclaim).
    fn rcu_step(&mut self) {
        let (engine, me) = (self.engine, self.me);
        let choice = self.rng.below(16);
        let target = (choice == 1 && self.n > 1).then(|| self.pick_other());
        let Some(rcu) = self.rcu.as_deref() else {
            return;
        };
        let result = match choice {
            0 => self.writer.write(engine, rcu, me),
            1 if target.is_some() => rcu.handler_read(engine, me, target),
            2 if self.n > 1 => rcu.handler_read(engine, me, None),
            _ => match rcu.task_read(engine, me) {
                rcu::ReadOutcome::Read => Ok(()),
                rcu::ReadOutcome::Offline => Err(Error::Offline(me)),
            },
        };
        match result {
            Ok(()) => {}
            Err(Error::Offline(c)) if c == me && self.hotplug => self.back_off(),
            Err(e) => {
                if self.rcu_errors.len() < 64 {
                    self.rcu_errors.push(e.to_string());
                }
            }
        }
    }

    /// Another CPU for a single call (this one only on a 1-CPU machine).
    fn pick_other(&mut self) -> CpuId {
        if self.n == 1 {
            return self.me;
        }
        let t = self.rng.below(self.n as u64 - 1) as CpuId;
        if t >= self.me {
            t + 1
        } else {
            t
        }
    }

    /// A random non-empty mask of other CPUs, including this one a quarter of the time.
    fn pick_mask(&mut self) -> u64 {
        let me = 1u64 << self.me;
        let mut m = self.rng.next_u64() & self.all & !me;
        if m == 0 && self.n > 1 {
            m = 1 << self.pick_other();
        }
        if self.rng.one_in(4) {
            m |= me;
        }
        m
    }

    /// How long the functions of the next call busy-wait, in ns: usually not at all, one call
    /// in [`SHORT_SPIN_ONE_IN`] 1–5 µs, and with long waits one in [`LONG_WAIT_ONE_IN`] 1 ms.
    fn pick_spin(&mut self) -> u32 {
        if self.long_wait && self.rng.one_in(LONG_WAIT_ONE_IN) {
            LONG_WAIT_NS
        } else if self.rng.one_in(SHORT_SPIN_ONE_IN) {
            let span = u64::from(SHORT_SPIN_MAX_NS - SHORT_SPIN_MIN_NS) + 1;
            SHORT_SPIN_MIN_NS + self.rng.below(span) as u32
        } else {
            0
        }
    }

    /// A closure for a no-wait call: 24 bytes (an `Arc`, an id, a spin), `Fn + Clone + Send`.
    /// Its drop in signal context only decrements the `Arc` (`run` keeps the last reference).
    fn async_fn(&self, id: RecordId, spin: u32) -> impl Fn(CpuId) + Clone + Send + 'static {
        let ledger = Arc::clone(&self.ledger);
        move |cpu| on_call(&ledger, id, cpu, spin)
    }

    /// Injects the configured fault into call `id` of `kind`, meant for the CPUs of
    /// `expected`, if it is due (see [`Fault`]). Calls meant for no CPU do not fit.
    fn maybe_inject(&mut self, kind: Kind, id: RecordId, expected: u64) {
        let Some(fault) = self.inject else { return };
        if expected == 0 || (fault == Fault::OutOrder && !kind.checks_out()) {
            return;
        }
        self.fitting += 1;
        if !(self.fitting - 1).is_multiple_of(FAULT_EVERY) {
            return;
        }
        match fault {
            Fault::InOrder => self.ledger.stamp_in_with(id, ledger::in_token(id) ^ 1),
            Fault::OutOrder => {
                self.ledger.check_out(id);
            }
        }
    }

    /// Issues one call of `kind`, then checks and times it. `None` when this CPU's records
    /// are used up.
    fn issue(&mut self, kind: Kind) -> Option<()> {
        let me = self.me;
        let engine = self.engine;
        let spin = self.pick_spin();
        if kind.is_single() {
            let target = match kind {
                Kind::SelfSingle | Kind::SelfAsync => me,
                _ => self.pick_other(),
            };
            let use_csd = match kind {
                Kind::CsdAsync => true,
                Kind::SelfAsync => self.rng.one_in(2),
                _ => false,
            };
            let id = self.ledger.begin(me, kind, 1 << target)?;
            self.maybe_inject(kind, id, 1 << target);
            let start = Instant::now();
            let result = if use_csd {
                self.call_with_own_csd(kind, id, target, spin)
            } else if kind.waits() {
                let ledger = &*self.ledger;
                engine.call_single(target, |cpu| on_call(ledger, id, cpu, spin))
            } else {
                engine.call_single_async(target, self.async_fn(id, spin))
            };
            match result {
                Ok(()) => self.finish(kind, id, start, 1),
                Err(Error::Busy) if use_csd => self.ledger.note_refused(id),
                Err(e) => self.refused(id, &e),
            }
        } else {
            let (requested, pred) = match kind {
                Kind::All | Kind::AllAsync => (self.all, u64::MAX),
                Kind::Others | Kind::OthersAsync => (self.all & !(1 << me), u64::MAX),
                Kind::Cond | Kind::CondAsync => (self.pick_mask(), self.rng.next_u64()),
                _ => (self.pick_mask(), u64::MAX),
            };
            // Without hotplug every CPU is online for the whole run: the engine must reach
            // exactly these. With it, the engine prunes offline CPUs: see below.
            let intended = requested & self.all & pred;
            let id = self.ledger.begin(me, kind, intended)?;
            self.maybe_inject(kind, id, intended);
            let mask = mask_of(requested);
            let cond = move |cpu: CpuId| pred >> cpu & 1 == 1;
            let ledger = &*self.ledger;
            let sync_fn = |cpu| on_call(ledger, id, cpu, spin);
            let start = Instant::now();
            let result = match kind {
                Kind::Many => engine.call_many(&mask, sync_fn),
                Kind::ManyAsync => engine.call_many_async(&mask, self.async_fn(id, spin)),
                Kind::All => engine.call_all(sync_fn),
                Kind::AllAsync => engine.call_all_async(self.async_fn(id, spin)),
                Kind::Others => engine.call_others(sync_fn),
                Kind::OthersAsync => engine.call_others_async(self.async_fn(id, spin)),
                Kind::Cond => engine.call_cond(&mask, cond, sync_fn),
                _ => engine.call_cond_async(&mask, cond, self.async_fn(id, spin)),
            };
            match result {
                Ok(sent) => {
                    let runs = match bits_of(&sent) {
                        Some(got) if self.hotplug => {
                            // The CPUs the engine queued to (or ran on) are the expected ones:
                            // a subset of the intended CPUs, never without CPU 0 (which never
                            // goes down) if it was intended.
                            if got & !intended != 0 || intended & !got & 1 != 0 {
                                self.ledger.note_mask_mismatch(id);
                            }
                            self.ledger.settle_expected(id, got);
                            got.count_ones()
                        }
                        got => {
                            if got != Some(intended) {
                                self.ledger.note_mask_mismatch(id);
                            }
                            intended.count_ones()
                        }
                    };
                    self.finish(kind, id, start, u64::from(runs));
                }
                Err(e) => self.refused(id, &e),
            }
        }
        Some(())
    }

    /// After an accepted call issued at `start` that must run `runs` functions: the rpc
    /// wait, the "out" check for waiting kinds and rpcs, and the latency sample.
    fn finish(&mut self, kind: Kind, id: RecordId, start: Instant, runs: u64) {
        if kind == Kind::Rpc
            && !self
                .ledger
                .wait_done(id, runs, self.rpc_timeout, !self.signal_calls)
        {
            // Counted as an rpc time-out; no latency sample (it would only say "the bound").
            return;
        }
        // The "out" check first, as close to the return as possible.
        if kind.checks_out() {
            self.ledger.check_out(id);
        }
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.latencies.record(kind, ns);
    }

    /// `call_async_csd` through the first free call data of this CPU's pool, starting at a
    /// random one (so a call data still in flight is sometimes tried: the `Busy` refusal is
    /// exercised too). `Err(Busy)` if all of them are in flight (each refusal is counted).
    fn call_with_own_csd(
        &mut self,
        kind: Kind,
        id: RecordId,
        target: CpuId,
        spin: u32,
    ) -> Result<(), Error> {
        let start = self.rng.below(CSD_POOL as u64) as usize;
        for k in 0..CSD_POOL {
            let i = (start + k) % CSD_POOL;
            let f = self.async_fn(id, spin);
            match self.engine.call_async_csd(self.csds[i].as_ref(), target, f) {
                Err(Error::Busy) => self.ledger.count_refusal(self.me, kind),
                other => return other,
            }
        }
        Err(Error::Busy)
    }
}
