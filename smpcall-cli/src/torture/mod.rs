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
//! # Ok::<(), smpcall::Error>(())
//! ```
//!
//! Layout, for extension: [`kind`] (what is issued, and the weighted [`Mix`]), [`ledger`] (the
//! per-call records, the function's bookkeeping and checks, the verifier and its violation
//! classes), [`latency`] (per-kind histograms), [`report`] (statistics, their text and JSON
//! forms), [`cli`] (the command's options, progress bar and statistics lines), and here the
//! driver ([`run_observed`]) and the per-CPU workload (`Worker`).

pub mod cli;
pub mod kind;
pub mod latency;
pub mod ledger;
pub mod report;
pub mod rng;

use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use smpcall::hosted::{HostEngine, IdlePolicy, Machine};
use smpcall::{CpuId, CpuMask, CpuStats, Csd, Error};

pub use kind::{Kind, Mix, WeightSpec};
pub use latency::{Latencies, LatencySummary};
pub use ledger::{
    verify, Ledger, LiveViolations, RecordId, Verification, Violation, MAX_TORTURE_CPUS,
};
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

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// Bound on each wait: after the deadline a task to finish, calls to drain, shutdown;
    /// half of it for an rpc's completion.
    pub timeout: Duration,
    /// A fault to inject (self-test of the checks; `None` for a real run).
    pub inject: Option<Fault>,
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
            timeout: Duration::from_secs(30),
            inject: None,
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
}

impl Progress {
    /// Calls started so far, all kinds.
    pub fn calls(&self) -> u64 {
        self.begun.iter().sum()
    }
}

/// Runs the workload and verifies it: [`run_observed`] without an observer.
pub fn run(cfg: &Config) -> Result<Report, Error> {
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
pub fn run_observed(cfg: &Config, observe: &mut dyn FnMut(&Progress)) -> Result<Report, Error> {
    if cfg.cpus == 0 || cfg.cpus > MAX_TORTURE_CPUS {
        return Err(Error::InvalidConfig(
            "torture supports between 1 and 64 CPUs",
        ));
    }
    if cfg.mix.total() == 0 {
        return Err(Error::InvalidConfig("every call kind has weight 0"));
    }
    let n = cfg.cpus;
    let ledger = Arc::new(Ledger::new(n, cfg.max_calls_per_cpu)?);
    let machine = Machine::builder()
        .cpus(n)
        .idle(cfg.idle)
        .timeout(cfg.timeout)
        .build()?;
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
            machine.run_on(cpu, move |engine| {
                let _done = done;
                Worker::run(engine, cpu, &cfg, ledger, &gate)
            })
        })
        .collect();
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
        let now = Instant::now();
        if finished.load(Ordering::SeqCst) >= n || now >= join_deadline {
            break;
        }
        thread::sleep(PROGRESS_TICK.min(join_deadline - now));
    }
    let mut hung = Vec::new();
    for (cpu, task) in tasks.into_iter().enumerate() {
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
            }
            Ok(Ok(Err(why))) => {
                latency_missing.push(cpu);
                incidents.push(format!("CPU {cpu}: {why}"));
            }
            Ok(Err(Error::TimedOut(_))) => {
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
    let mut last_tick = Instant::now();
    let mut tick = || {
        if last_tick.elapsed() >= PROGRESS_TICK {
            last_tick = Instant::now();
            observe(&snapshot(Phase::Draining));
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
    let signals_sent = engine.platform().signals_sent();
    let futex_wakes = engine.platform().futex_wakes();
    // Shutting down joins the CPU threads, which orders every record write before the check.
    if let Err(e) = machine.shutdown() {
        incidents.push(format!("machine shutdown: {e}"));
    }
    let verification = verify(&ledger);

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
}

/// One CPU's side of the workload.
struct Worker<'a> {
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
}

impl<'a> Worker<'a> {
    /// The task of CPU `me`: meet the others at the start, issue calls until the deadline,
    /// wait for this CPU's caller-owned call data to come back.
    fn run(
        engine: &'a HostEngine,
        me: CpuId,
        cfg: &Config,
        ledger: Arc<Ledger>,
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
        // No call before every CPU has declared who it is (calls to a CPU whose task has not
        // started would find its thread-local unset).
        gate.fetch_add(1, Ordering::SeqCst);
        let mut arrived = 0;
        if !spin_for(cfg.timeout, || {
            arrived = gate.load(Ordering::SeqCst);
            arrived >= n
        }) {
            return Err(format!(
                "waited {:?} for every CPU to reach the start barrier; {arrived} of {n} did",
                cfg.timeout
            ));
        }

        let mut w = Worker {
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
        };
        let begin = Instant::now();
        let deadline = begin + cfg.duration;
        // Past the deadline only to reach `min_calls_per_cpu`, and within half the bound (so
        // that the task is not taken for hung).
        let hard_deadline = deadline + cfg.timeout / 2;
        let mut capacity_reached = false;
        let mut issued = 0u64;
        loop {
            let now = Instant::now();
            if now >= deadline && (issued >= cfg.min_calls_per_cpu || now >= hard_deadline) {
                break;
            }
            let kind = cfg.mix.pick(&mut w.rng);
            if w.issue(kind).is_none() {
                capacity_reached = true;
                break;
            }
            issued += 1;
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
        })
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
        if (self.fitting - 1) % FAULT_EVERY != 0 {
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
                Err(e) => self.ledger.note_error(id, &e),
            }
        } else {
            let (requested, pred) = match kind {
                Kind::All | Kind::AllAsync => (self.all, u64::MAX),
                Kind::Others | Kind::OthersAsync => (self.all & !(1 << me), u64::MAX),
                Kind::Cond | Kind::CondAsync => (self.pick_mask(), self.rng.next_u64()),
                _ => (self.pick_mask(), u64::MAX),
            };
            // Every CPU is online for the whole run: the engine must reach exactly these.
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
                    if bits_of(&sent) != Some(intended) {
                        self.ledger.note_mask_mismatch(id);
                    }
                    self.finish(kind, id, start, u64::from(intended.count_ones()));
                }
                Err(e) => self.ledger.note_error(id, &e),
            }
        }
        Some(())
    }

    /// After an accepted call issued at `start` that must run `runs` functions: the rpc
    /// wait, the "out" check for waiting kinds and rpcs, and the latency sample.
    fn finish(&mut self, kind: Kind, id: RecordId, start: Instant, runs: u64) {
        if kind == Kind::Rpc && !self.ledger.wait_done(id, runs, self.rpc_timeout) {
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
