//! The deterministic test platform: simulated CPUs scheduled from a seed, with IPI faults.
//!
//! [`Sim::run`] runs one program per simulated CPU on an [`Engine`] over [`SimPlatform`] and
//! returns a [`SimReport`], or a [`SimFailure`] that names the seed to replay it with.
//!
//! # How it works
//!
//! * **One CPU at a time.** Every simulated CPU is an OS thread, but a baton (one mutex, one
//!   condition variable per CPU) lets exactly one of them run. At every *scheduling point* the
//!   running CPU asks the seeded random generator whether to hand the baton to another runnable
//!   CPU, and if so blocks until it gets it back. Between two points only one thread runs and
//!   every decision comes from the seed, so a run replays exactly from its seed
//!   ([`SimReport::trace_hash`] fingerprints the schedule).
//! * **Scheduling points:** [`Platform::preempt_point`] (the engine calls it inside a call's
//!   claim-fill-push, and inside stop_machine's stage protocol: between reading and updating
//!   the stage word, and before the last acknowledgement publishes the next stage),
//!   [`Platform::relax`] (every engine wait loop), [`Platform::send_ipi`] (after the send),
//!   [`Platform::irq_restore`] when it unmasks, [`Platform::now_ns`], and [`yield_now`] for
//!   programs.
//! * **Interrupts.** Each CPU has a soft mask and one pending-IPI bit (the local APIC's IRR bit:
//!   an IPI sent while one is already pending *coalesces* with it). A CPU that holds the baton,
//!   is unmasked and has its bit set takes the interrupt: the bit is cleared, the CPU masks, calls
//!   [`Engine::handle_ipi`] (nested in whatever it was doing — that is handler context) and
//!   unmasks. Masked CPUs take it at the unmask.
//! * **IPI faults**, decided by the seeded generator per IPI: *dropped* (never arrives),
//!   *delayed* (arrives 1..=`max_delay_steps` steps later), *duplicated* (arrives, and a copy
//!   arrives again later).
//! * **Virtual time.** Every scheduling step (of any CPU) advances the clock by [`NS_PER_STEP`];
//!   with `n` runnable CPUs a CPU's own loop sees time pass about `n` steps per iteration. The
//!   engine's stall threshold is set from [`SimConfig::stall_threshold_steps`], so stuck-wait
//!   reports and IPI re-sends happen at deterministic points. The scheduler runs the engine's watchdog
//!   ([`Engine::check_stalls`]) every [`SimConfig::watchdog_interval_steps`].
//! * **Idle.** A CPU whose program returned goes idle: halted (not runnable until an IPI is
//!   pending — `hlt`) or idle-polling ([`Engine::idle_poll`]), per [`SimIdle`]. When every CPU
//!   is halted, virtual time skips to the next delayed IPI or watchdog check.
//! * **Bounded.** The run ends when every program returned and the engine is quiescent. It
//!   fails after [`SimConfig::max_steps`], when no CPU can ever run again (every CPU halted,
//!   calls queued, nothing on the way), or when a program panics. A failure never hangs: after
//!   recording it, the simulator *heals* the machine (faults off, IPI re-send on) and lets it
//!   drain so its threads exit ([`SimFailure::healed`]); if even that does not finish, the
//!   threads are left parked.
//!
//! # Rules for programs
//!
//! * A program that spins on its own flags must call [`yield_now`] in the loop: nothing else
//!   runs until it reaches a scheduling point. (A run with no scheduling point for
//!   [`SimConfig::wall_timeout`] of real time fails and leaves that thread running.)
//! * It must not block on anything another simulated CPU releases (a `Mutex` held across a
//!   scheduling point, a channel): the holder cannot run while it waits.
//! * Call functions run as interrupt handlers on their target: they must not panic (the engine
//!   aborts the process to protect call data). Record results in atomics and check them after
//!   the run — or in the program, after a waiting call returned.
//! * A caller-owned [`Csd`](crate::Csd) must not be dropped while it is busy (its `Drop` spins
//!   without a scheduling point): wait with `while csd.is_busy() { yield_now() }`, or leak it.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::cpumask::CpuId;
use crate::diag::DiagStats;
use crate::engine::{CpuStats, Engine, HeapStorage};
use crate::platform::Platform;

/// Virtual nanoseconds per scheduling step ([`Platform::now_ns`] of the simulated machine).
pub const NS_PER_STEP: u64 = 1_000;

/// How many engine reports a [`SimReport`] or [`SimFailure`] keeps verbatim (all are counted).
pub const MAX_REPORT_LINES: usize = 64;

/// How many recent CPU switches a [`SimFailure`] shows.
const RECENT_SWITCHES: usize = 48;

/// The engine as the simulator runs it.
pub type SimEngine = Engine<SimPlatform, HeapStorage>;

/// One simulated CPU's program: runs in that CPU's task context, interrupts unmasked.
pub type Program = Box<dyn FnOnce(&SimEngine) + Send>;

/// What a CPU does once its program returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimIdle {
    /// Halt (`hlt`): not runnable until an IPI is pending. Calls reach it only by IPI.
    Halt,
    /// Idle-poll its queue ([`Engine::idle_poll`]): the engine elides IPIs to it.
    Poll,
}

/// Configuration of one simulated run. Everything that influences the run is here: the same
/// configuration and programs replay the same run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimConfig {
    /// Number of simulated CPUs (each gets at most one program).
    pub cpus: usize,
    /// Seed of every scheduling and fault decision.
    pub seed: u64,
    /// Probability in `[0, 1]` that an IPI is dropped.
    pub drop_ipi: f64,
    /// Probability in `[0, 1]` that a (not dropped) IPI arrives 1..=`max_delay_steps` steps late.
    pub delay_ipi: f64,
    /// Probability in `[0, 1]` that a (not dropped) IPI arrives a second time, later.
    pub duplicate_ipi: f64,
    /// Longest delay, in steps, of a delayed or duplicate IPI (at least 1).
    pub max_delay_steps: u64,
    /// What CPUs do after their program.
    pub idle: SimIdle,
    /// Probability in `[0, 1]` that a scheduling point switches to another runnable CPU.
    pub preemption: f64,
    /// The run fails after this many steps.
    pub max_steps: u64,
    /// The engine's stall threshold, in steps (0 disables stall reports, re-sends and the
    /// watchdog).
    pub stall_threshold_steps: u64,
    /// Steps between two runs of the engine's watchdog ([`Engine::check_stalls`]); 0 means a
    /// quarter of the stall threshold.
    pub watchdog_interval_steps: u64,
    /// Whether a reported stall re-sends the IPI ([`Engine::set_resend_on_stall`]).
    pub resend_on_stall: bool,
    /// Real time without any scheduling step after which the run is declared stuck in a loop
    /// that has no scheduling point (a safety net, not a measurement).
    pub wall_timeout: Duration,
    /// Call-data slots per sender and target (no-wait calls in flight from one CPU to
    /// another; `HeapStorage::with_layout`). Default 1.
    pub slots_per_target: usize,
}

impl Default for SimConfig {
    /// 4 CPUs, seed 0, no faults, halting idle, preemption 0.25, 2 000 000 steps, stall
    /// threshold 2 000 steps (2 ms virtual) with re-send on.
    fn default() -> Self {
        SimConfig {
            cpus: 4,
            seed: 0,
            drop_ipi: 0.0,
            delay_ipi: 0.0,
            duplicate_ipi: 0.0,
            max_delay_steps: 64,
            idle: SimIdle::Halt,
            preemption: 0.25,
            max_steps: 2_000_000,
            stall_threshold_steps: 2_000,
            watchdog_interval_steps: 0,
            resend_on_stall: true,
            wall_timeout: Duration::from_secs(60),
            slots_per_target: 1,
        }
    }
}

impl SimConfig {
    fn validate(&self) -> Result<(), String> {
        let probability = |name: &str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(format!("{name} must be a probability in [0, 1], not {p}"))
            }
        };
        probability("drop_ipi", self.drop_ipi)?;
        probability("delay_ipi", self.delay_ipi)?;
        probability("duplicate_ipi", self.duplicate_ipi)?;
        probability("preemption", self.preemption)?;
        if self.cpus == 0 || self.cpus > crate::MAX_CPUS {
            return Err(format!("cpus must be in 1..={}", crate::MAX_CPUS));
        }
        if self.max_delay_steps == 0 {
            return Err("max_delay_steps must be at least 1".into());
        }
        Ok(())
    }

    fn watchdog_interval(&self, threshold_steps: u64) -> u64 {
        if self.watchdog_interval_steps != 0 {
            self.watchdog_interval_steps
        } else {
            (threshold_steps / 4).max(1)
        }
    }
}

/// One report the engine made through [`Platform::report`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimReportLine {
    /// Virtual time of the report, in steps.
    pub step: u64,
    /// The CPU that reported (`None`: the watchdog, run by the scheduler).
    pub cpu: Option<CpuId>,
    /// The report.
    pub text: String,
}

/// IPI and scheduling counters of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// CPU switches (baton hand-overs).
    pub switches: u64,
    /// Steps virtual time skipped while every CPU was halted.
    pub idle_steps: u64,
    /// IPIs the engine sent ([`Platform::send_ipi`] calls, including re-sends).
    pub ipis_sent: u64,
    /// IPIs dropped by fault injection.
    pub ipis_dropped: u64,
    /// IPIs delayed by fault injection.
    pub ipis_delayed: u64,
    /// Extra copies of IPIs injected.
    pub ipis_duplicated: u64,
    /// IPIs that arrived while the target already had one pending (they coalesce into one
    /// interrupt, as in a local APIC).
    pub ipis_coalesced: u64,
    /// IPIs that arrived while the target had interrupts masked.
    pub ipis_to_masked: u64,
    /// Interrupts taken ([`Engine::handle_ipi`] calls made by the simulator).
    pub interrupts: u64,
    /// Runs of the engine's watchdog.
    pub watchdog_runs: u64,
}

/// The outcome of a successful run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimReport {
    /// The seed the run used.
    pub seed: u64,
    /// Steps (virtual time in [`NS_PER_STEP`] units) until every program returned and the
    /// engine was quiescent.
    pub steps: u64,
    /// Hash of the schedule (which CPU ran at each step): equal for a replay, different for
    /// different schedules.
    pub trace_hash: u64,
    /// IPI and scheduling counters.
    pub counters: SimCounters,
    /// The engine's diagnostic counters at the end.
    pub diag: DiagStats,
    /// The engine's counters summed over all CPUs at the end.
    pub stats: CpuStats,
    /// Number of engine reports.
    pub report_count: u64,
    /// The first [`MAX_REPORT_LINES`] reports.
    pub reports: Vec<SimReportLine>,
}

/// A run that failed: what, when, and how to replay it.
#[derive(Clone, Debug)]
pub struct SimFailure {
    /// The configuration; [`SimFailure::seed`] replays the run with the same programs.
    pub config: SimConfig,
    /// The seed of the failing run.
    pub seed: u64,
    /// Virtual time of the failure, in steps.
    pub steps: u64,
    /// The CPU that detected the failure, if any.
    pub cpu: Option<CpuId>,
    /// What went wrong.
    pub reason: String,
    /// The engine's [`dump`](Engine::dump) at the failure (empty if there was no engine).
    pub dump: String,
    /// Number of engine reports up to the failure.
    pub report_count: u64,
    /// The first [`MAX_REPORT_LINES`] reports.
    pub reports: Vec<SimReportLine>,
    /// The last CPU switches before the failure, as `step:cpu` (oldest first).
    pub recent_switches: String,
    /// IPI and scheduling counters at the failure.
    pub counters: SimCounters,
    /// The engine's diagnostic counters at the failure.
    pub diag: DiagStats,
    /// The engine's counters, summed over all CPUs, at the failure.
    pub stats: CpuStats,
    /// Whether, after the failure, the healed machine (faults off, re-send on) drained and its
    /// threads exited. `false`: they are left parked (or, after a wall timeout, running).
    pub healed: bool,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "smpcall sim FAILED: seed {:#x}, step {}, {}: {}",
            self.seed,
            self.steps,
            match self.cpu {
                Some(c) => format!("CPU {c}"),
                None => "scheduler".into(),
            },
            self.reason
        )?;
        writeln!(
            f,
            "replay with the same programs and SimConfig {{ seed: {:#x}, ..{:?} }}",
            self.seed, self.config
        )?;
        writeln!(f, "counters: {:?}", self.counters)?;
        writeln!(f, "diag: {:?}; stats: {:?}", self.diag, self.stats)?;
        writeln!(f, "engine reports: {}", self.report_count)?;
        for r in self.reports.iter().take(12) {
            writeln!(f, "  [step {} {:?}] {}", r.step, r.cpu, r.text)?;
        }
        writeln!(f, "last switches (step:cpu): {}", self.recent_switches)?;
        write!(f, "{}", self.dump)?;
        write!(
            f,
            "after the failure the machine was healed (faults off, re-send on): {}",
            if self.healed {
                "it drained and its threads exited"
            } else {
                "it did NOT drain; its threads are left behind"
            }
        )
    }
}

impl std::error::Error for SimFailure {}

/// The simulator.
#[derive(Debug)]
pub struct Sim;

impl Sim {
    /// Runs `programs[i]` on simulated CPU `i` (CPUs without a program start idle) until every
    /// program returned and every call was served, scheduling the CPUs from `config.seed`.
    ///
    /// Returns the run's [`SimReport`], or a [`SimFailure`] whose `Display` names the seed and
    /// the configuration to replay it with. Never hangs on an engine bug: every run is bounded
    /// by [`SimConfig::max_steps`] (see the module documentation for the rules programs follow).
    ///
    /// ```
    /// use smpcall::sim::{Program, Sim, SimConfig};
    ///
    /// let programs: Vec<Program> = vec![
    ///     // CPU 0: ask CPU 1 for a value and wait for it.
    ///     Box::new(|e| assert_eq!(e.call_single(1, |cpu| cpu * 10), Ok(10))),
    ///     // CPU 1: no program; it halts and serves the call when the IPI arrives.
    /// ];
    /// let config = SimConfig { cpus: 2, seed: 42, drop_ipi: 0.5, ..SimConfig::default() };
    /// let report = Sim::run(config, programs)?;
    /// assert_eq!(report.stats.calls_run, 1);
    /// // A dropped IPI is recovered by the stuck wait's re-send; either way the call ran once.
    /// assert!(report.counters.ipis_dropped == 0 || report.diag.ipi_resends > 0);
    /// # Ok::<(), smpcall::sim::SimFailure>(())
    /// ```
    // A failure is returned at most once per run (which spawns threads): its size is irrelevant,
    // and a plain `SimFailure` is easier to inspect in tests than a box.
    #[allow(clippy::result_large_err)]
    pub fn run(config: SimConfig, programs: Vec<Program>) -> Result<SimReport, SimFailure> {
        let early = |reason: String| SimFailure {
            config,
            seed: config.seed,
            steps: 0,
            cpu: None,
            reason,
            dump: String::new(),
            report_count: 0,
            reports: Vec::new(),
            recent_switches: String::new(),
            counters: SimCounters::default(),
            diag: DiagStats::default(),
            stats: CpuStats::default(),
            healed: true,
        };
        config.validate().map_err(early)?;
        if programs.len() > config.cpus {
            return Err(early(format!(
                "{} programs for {} CPUs",
                programs.len(),
                config.cpus
            )));
        }
        let shared = Arc::new(Shared::new(&config));
        let engine = Engine::new(
            SimPlatform {
                shared: Arc::clone(&shared),
            },
            HeapStorage::with_layout(config.cpus, config.slots_per_target, 0),
        )
        .map_err(|e| early(format!("engine: {e}")))?;
        engine.set_stall_threshold_ns(config.stall_threshold_steps.saturating_mul(NS_PER_STEP));
        engine.set_resend_on_stall(config.resend_on_stall);
        for cpu in 0..config.cpus {
            // SAFETY: every CPU gets a simulated thread below that serves its interrupts.
            unsafe { engine.mark_online(cpu) }.map_err(|e| early(format!("engine: {e}")))?;
        }
        let engine = Arc::new(engine);

        let mut programs: Vec<Option<Program>> = programs.into_iter().map(Some).collect();
        programs.resize_with(config.cpus, || None);
        let mut threads = Vec::with_capacity(config.cpus);
        for (cpu, program) in programs.into_iter().enumerate() {
            let engine2 = Arc::clone(&engine);
            let spawned = thread::Builder::new()
                .name(format!("sim-cpu{cpu}"))
                .spawn(move || cpu_main(engine2, cpu, program));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Nobody holds the baton yet: end the run, the started threads exit.
                    let mut s = shared.lock();
                    shared.finish(&mut s, &engine);
                    drop(s);
                    join_all(threads);
                    return Err(early(format!("could not spawn a CPU thread: {e}")));
                }
            }
        }

        // Hand the first baton.
        {
            let mut s = shared.lock();
            let first = (s.rng.below(config.cpus as u64)) as CpuId;
            s.baton = Some(first);
            shared.cv[first].notify_one();
        }

        let failure = match shared.wait_outcome(&config) {
            Outcome::Over => {
                join_all(threads);
                let s = shared.lock();
                return Ok(shared.report(&s));
            }
            outcome => outcome,
        };
        let mut failure = shared.failure(&engine, &config, &failure);
        if let Outcome::Failed = failure.0 {
            // Heal: faults off, re-send on, and let the machine drain so the threads exit.
            shared.heal(&engine, &config);
            if let Outcome::Over = shared.wait_outcome(&config) {
                join_all(threads);
                failure.1.healed = true;
                return Err(failure.1);
            }
        }
        // Abandon: the threads stay parked (or, after a wall timeout, running); they own their
        // engine through their `Arc`, so nothing is freed under them.
        shared.lock().phase = Phase::Abandoned;
        drop(threads);
        failure.1.healed = false;
        Err(failure.1)
    }
}

fn join_all(threads: Vec<JoinHandle<()>>) {
    for t in threads {
        let _ = t.join();
    }
}

/// A scheduling point of the running CPU from a program: lets the seeded scheduler run
/// another CPU (and deliver a pending IPI to this one). Programs must call it in their own
/// spin loops. Outside a simulated CPU it only hints a spin loop.
pub fn yield_now() {
    match current() {
        Some((shared, cpu, engine)) => shared.point(cpu, PointKind::Yield, engine),
        None => std::hint::spin_loop(),
    }
}

/// The simulated CPU running this code, if any (independent of the engine's own notion).
pub fn current_cpu() -> Option<CpuId> {
    current().map(|(_, cpu, _)| cpu)
}

/// Runs `f` with the engine of the simulated CPU running this code (for example from a call's
/// function, to make a nested no-wait call); `None` outside a simulated CPU.
pub fn with_engine<R>(f: impl FnOnce(&SimEngine) -> R) -> Option<R> {
    current().map(|(_, _, engine)| f(engine))
}

/// Virtual time in steps on the current simulated machine (not a scheduling point); 0
/// outside a simulated CPU.
pub fn now_steps() -> u64 {
    current().map_or(0, |(shared, _, _)| shared.now())
}

/// Changes the IPI fault probabilities of the current simulated machine from a program (for
/// example: drop every IPI from now on). Ignored outside a simulated CPU; invalid
/// probabilities are clamped to `[0, 1]`.
pub fn set_ipi_faults(drop_ipi: f64, delay_ipi: f64, duplicate_ipi: f64) {
    if let Some((shared, _, _)) = current() {
        let mut s = shared.lock();
        s.drop_p = drop_ipi.clamp(0.0, 1.0);
        s.delay_p = delay_ipi.clamp(0.0, 1.0);
        s.dup_p = duplicate_ipi.clamp(0.0, 1.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The platform.
// ---------------------------------------------------------------------------------------------

/// The [`Platform`] of the simulator. Created by [`Sim::run`].
pub struct SimPlatform {
    shared: Arc<Shared>,
}

impl fmt::Debug for SimPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimPlatform")
            .field("cpus", &self.shared.cfg.cpus)
            .field("seed", &self.shared.cfg.seed)
            .finish_non_exhaustive()
    }
}

impl SimPlatform {
    /// This thread's CPU and engine, if it is a CPU of this simulated machine that may
    /// schedule (not the watchdog the scheduler runs on the same thread).
    fn sched_cpu(&self) -> Option<(CpuId, &SimEngine)> {
        let c = CURRENT.with(Cell::get);
        if c.shared != Arc::as_ptr(&self.shared) || c.no_sched {
            return None;
        }
        // SAFETY: `engine` was set by this CPU thread from the `Arc<SimEngine>` it holds for
        // its whole life, and is cleared before that `Arc` is dropped.
        Some((c.cpu, unsafe { &*c.engine }))
    }

    fn point(&self, kind: PointKind) {
        if let Some((cpu, engine)) = self.sched_cpu() {
            self.shared.point(cpu, kind, engine);
        }
    }

    /// Whether simulated CPU `cpu` has interrupts masked now.
    pub fn cpu_masked(&self, cpu: CpuId) -> bool {
        // Relaxed: see `Shared::masked`.
        self.shared
            .masked
            .get(cpu)
            .is_some_and(|m| m.load(Ordering::Relaxed))
    }

    /// The configuration of the run.
    pub fn config(&self) -> &SimConfig {
        &self.shared.cfg
    }
}

// SAFETY: (1) Identity: `current_cpu` reads a thread-local that only the thread of simulated CPU
// `c` sets, to `c` and this machine's `Shared`, for its whole life. (2) Delivery: `send_ipi`
// sets the target's pending bit (or schedules it), and a CPU with the bit set takes the
// interrupt — calls `handle_ipi` — at its next scheduling point with interrupts unmasked; a
// halted CPU with the bit set is runnable. Only *injected* faults (drop, for testing) break
// delivery, and that is a liveness fault, not a memory-safety one: the engine's stuck-wait path
// re-sends, and its waits never give up (the hosted backend's `Faults` do the same). `send_ipi`
// never waits for another CPU (a hand-over of the baton is a simulated preemption). (3) Masking:
// interrupts are only taken when the CPU's soft mask is clear, with the mask set while
// `handle_ipi` runs; a bit set meanwhile is served after the unmask (`irq_restore`, and the
// check after every scheduling point).
unsafe impl Platform for SimPlatform {
    type IrqState = bool;

    fn current_cpu(&self) -> Option<CpuId> {
        let c = CURRENT.with(Cell::get);
        // The watchdog the scheduler runs on a CPU's thread is not that CPU.
        (c.shared == Arc::as_ptr(&self.shared) && !c.no_sched).then_some(c.cpu)
    }

    fn send_ipi(&self, cpu: CpuId) {
        if cpu >= self.shared.cfg.cpus {
            return;
        }
        self.shared.send_ipi(cpu);
        self.point(PointKind::SendIpi);
    }

    fn irq_save(&self) -> bool {
        match self.current_cpu() {
            // Relaxed: see `Shared::masked`.
            Some(me) => self.shared.masked[me].swap(true, Ordering::Relaxed),
            None => true,
        }
    }

    unsafe fn irq_restore(&self, was_masked: bool) {
        if was_masked {
            return;
        }
        let Some(me) = self.current_cpu() else {
            return;
        };
        // Relaxed: see `Shared::masked`.
        self.shared.masked[me].store(false, Ordering::Relaxed);
        if let Some((cpu, engine)) = self.sched_cpu() {
            // An IPI that arrived while masked is taken now, then the unmask may be preempted.
            self.shared.deliver(cpu, engine);
            self.shared.point(cpu, PointKind::Unmask, engine);
        }
    }

    fn irqs_masked(&self) -> bool {
        self.current_cpu().is_some_and(|me| self.cpu_masked(me))
    }

    fn relax(&self) {
        self.point(PointKind::Relax);
    }

    fn now_ns(&self) -> u64 {
        self.point(PointKind::Clock);
        self.shared.now().saturating_mul(NS_PER_STEP)
    }

    fn cpu_irqs_masked(&self, cpu: CpuId) -> Option<bool> {
        (cpu < self.shared.cfg.cpus).then(|| self.cpu_masked(cpu))
    }

    fn preempt_point(&self) {
        self.point(PointKind::Preempt);
    }

    fn report(&self, message: fmt::Arguments<'_>) {
        // A simulated handler is an ordinary function call on an ordinary thread: formatting
        // and a short critical section are fine here (no other thread holds the lock across
        // engine code).
        let text = message.to_string();
        let c = CURRENT.with(Cell::get);
        let cpu = (c.shared == Arc::as_ptr(&self.shared) && !c.no_sched).then_some(c.cpu);
        let mut s = self.shared.lock();
        s.report_count += 1;
        if s.reports.len() < MAX_REPORT_LINES {
            let step = self.shared.now();
            s.reports.push(SimReportLine { step, cpu, text });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scheduler.
// ---------------------------------------------------------------------------------------------

/// Which simulated CPU this thread is.
#[derive(Clone, Copy)]
struct Current {
    shared: *const Shared,
    cpu: CpuId,
    engine: *const SimEngine,
    /// Running the watchdog or another scheduler-internal engine call: no scheduling points.
    no_sched: bool,
}

thread_local! {
    static CURRENT: Cell<Current> = const {
        Cell::new(Current { shared: ptr::null(), cpu: 0, engine: ptr::null(), no_sched: false })
    };
}

/// The simulated CPU of this thread, if it may schedule now.
fn current<'a>() -> Option<(&'a Shared, CpuId, &'a SimEngine)> {
    let c = CURRENT.with(Cell::get);
    if c.shared.is_null() || c.no_sched {
        return None;
    }
    // SAFETY: both pointers were set by this CPU thread from the `Arc<SimEngine>` it holds
    // (which owns the platform, which owns an `Arc<Shared>`) and are cleared before that `Arc`
    // is dropped, so they are valid for as long as this thread can observe them.
    Some((unsafe { &*c.shared }, c.cpu, unsafe { &*c.engine }))
}

/// Runs `f` as the scheduler rather than as the CPU (no scheduling points inside).
fn as_scheduler<R>(f: impl FnOnce() -> R) -> R {
    let prev = CURRENT.with(|c| {
        let prev = c.get();
        c.set(Current {
            no_sched: true,
            ..prev
        });
        prev
    });
    let r = f();
    CURRENT.with(|c| c.set(prev));
    r
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PointKind {
    Preempt,
    Relax,
    SendIpi,
    Unmask,
    Clock,
    Yield,
    Halt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Running its program (always runnable).
    Program,
    /// Idle and polling, or between halts (runnable).
    Idle,
    /// Halted: runnable only with an IPI pending.
    Halted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The baton holder runs.
    Running,
    /// A failure was recorded; nobody holds the baton until the main thread decides.
    Failed,
    /// The run is over: scheduling points return at once, threads exit.
    Over,
    /// Given up after a failure: threads stay parked.
    Abandoned,
}

enum Outcome {
    Over,
    Failed,
    /// No scheduling step for the wall timeout: a thread runs without scheduling points.
    Runaway(Option<CpuId>),
}

/// splitmix64: small, fast, and good enough for scheduling decisions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() >> 32) * n) >> 32
    }

    /// True with probability `p`; consumes nothing when `p` is 0 (so a fault-free run's
    /// schedule does not depend on fault rolls).
    fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

struct State {
    phase: Phase,
    baton: Option<CpuId>,
    /// The run fails at this step.
    limit: u64,
    rng: Rng,
    mode: Vec<Mode>,
    /// Pending-IPI bit per CPU.
    irr: Vec<bool>,
    /// IPIs on their way: (due step, target).
    delayed: Vec<(u64, CpuId)>,
    drop_p: f64,
    delay_p: f64,
    dup_p: f64,
    next_watchdog: u64,
    programs_done: usize,
    trace_hash: u64,
    counters: SimCounters,
    report_count: u64,
    reports: Vec<SimReportLine>,
    /// Who failed, when, why.
    failure: Option<(Option<CpuId>, u64, String)>,
    recent: VecDeque<(u64, CpuId)>,
    /// Engine counters taken when the run ended (by the last baton holder).
    end: Option<(CpuStats, DiagStats)>,
}

struct Shared {
    cfg: SimConfig,
    state: Mutex<State>,
    /// One per CPU: signalled when that CPU gets the baton (or the run ends).
    cv: Box<[Condvar]>,
    /// Signalled when the run ends or fails.
    main_cv: Condvar,
    /// Virtual time. Relaxed everywhere: written only by the baton holder with the state lock
    /// held, and the baton hand-over (that lock) orders it for the next holder.
    steps: AtomicU64,
    /// Soft interrupt mask per CPU. Relaxed everywhere: written only by the CPU itself while it
    /// holds the baton; other CPUs read it only while *they* hold the baton, after a hand-over
    /// through the state lock.
    masked: Box<[AtomicBool]>,
}

type Guard<'a> = MutexGuard<'a, State>;

impl Shared {
    fn new(cfg: &SimConfig) -> Self {
        let n = cfg.cpus;
        Shared {
            cfg: *cfg,
            state: Mutex::new(State {
                phase: Phase::Running,
                baton: None,
                limit: cfg.max_steps,
                rng: Rng(cfg.seed),
                mode: vec![Mode::Program; n],
                irr: vec![false; n],
                delayed: Vec::new(),
                drop_p: cfg.drop_ipi,
                delay_p: cfg.delay_ipi,
                dup_p: cfg.duplicate_ipi,
                next_watchdog: 0,
                programs_done: 0,
                trace_hash: 0xCBF2_9CE4_8422_2325,
                counters: SimCounters::default(),
                report_count: 0,
                reports: Vec::new(),
                failure: None,
                recent: VecDeque::with_capacity(RECENT_SWITCHES),
                end: None,
            }),
            cv: (0..n).map(|_| Condvar::new()).collect(),
            main_cv: Condvar::new(),
            steps: AtomicU64::new(0),
            masked: (0..n).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn lock(&self) -> Guard<'_> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        // Relaxed: see `steps`.
        self.steps.load(Ordering::Relaxed)
    }

    /// Blocks CPU `me` until it holds the baton (or the run is over).
    fn wait_baton<'a>(&'a self, mut s: Guard<'a>, me: CpuId) -> Guard<'a> {
        while !(s.phase == Phase::Over || (s.phase == Phase::Running && s.baton == Some(me))) {
            s = self.cv[me].wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s
    }

    /// A scheduling point of CPU `me` (which holds the baton).
    fn point(&self, me: CpuId, kind: PointKind, engine: &SimEngine) {
        let s = self.lock();
        if s.phase == Phase::Over {
            return;
        }
        let s = self.step(s, me, kind, engine);
        drop(s);
        self.deliver(me, engine);
    }

    /// Takes pending interrupts on `me` while it is unmasked (it holds the baton).
    fn deliver(&self, me: CpuId, engine: &SimEngine) {
        loop {
            let mut s = self.lock();
            // Relaxed: see `masked`.
            if s.phase == Phase::Over || !s.irr[me] || self.masked[me].load(Ordering::Relaxed) {
                return;
            }
            s.irr[me] = false;
            s.counters.interrupts += 1;
            // Relaxed (both): see `masked`. Interrupt entry masks; the return unmasks.
            self.masked[me].store(true, Ordering::Relaxed);
            drop(s);
            // SAFETY: the simulated interrupt of CPU `me`, on its thread; simulated handlers may
            // run any call (they model a kernel's interrupt context).
            unsafe { engine.handle_ipi() };
            self.masked[me].store(false, Ordering::Relaxed);
        }
    }

    /// One step of virtual time, run by the baton holder `me`.
    fn tick(&self, s: &mut State, me: Option<CpuId>, to: u64) {
        // Relaxed: see `steps`.
        self.steps.store(to, Ordering::Relaxed);
        let mark = me.map_or(0xFFFF, |c| c as u64 + 1);
        s.trace_hash = (s.trace_hash ^ mark).wrapping_mul(0x0000_0100_0000_01B3);
        if !s.delayed.is_empty() {
            let mut i = 0;
            while i < s.delayed.len() {
                if s.delayed[i].0 <= to {
                    let (_, cpu) = s.delayed.swap_remove(i);
                    self.raise(s, cpu);
                } else {
                    i += 1;
                }
            }
        }
    }

    /// An IPI arrives at `cpu`: sets its pending bit (coalescing with one already pending).
    fn raise(&self, s: &mut State, cpu: CpuId) {
        // Relaxed: see `masked`.
        if self.masked[cpu].load(Ordering::Relaxed) {
            s.counters.ipis_to_masked += 1;
        }
        if s.irr[cpu] {
            s.counters.ipis_coalesced += 1;
        } else {
            s.irr[cpu] = true;
        }
    }

    fn send_ipi(&self, cpu: CpuId) {
        let mut s = self.lock();
        if s.phase == Phase::Over {
            return;
        }
        s.counters.ipis_sent += 1;
        let (drop_p, delay_p, dup_p) = (s.drop_p, s.delay_p, s.dup_p);
        if s.rng.chance(drop_p) {
            s.counters.ipis_dropped += 1;
            return;
        }
        let max_delay = self.cfg.max_delay_steps;
        let now = self.now();
        if s.rng.chance(delay_p) {
            let due = now + 1 + s.rng.below(max_delay);
            s.delayed.push((due, cpu));
            s.counters.ipis_delayed += 1;
        } else {
            self.raise(&mut s, cpu);
        }
        if s.rng.chance(dup_p) {
            let due = now + 1 + s.rng.below(max_delay);
            s.delayed.push((due, cpu));
            s.counters.ipis_duplicated += 1;
        }
    }

    /// Runs the engine's watchdog if it is due (lock released meanwhile; the baton holder is the
    /// only thread that can touch the state).
    fn maybe_watchdog<'a>(&'a self, mut s: Guard<'a>, engine: &SimEngine) -> Guard<'a> {
        let threshold = engine.stall_threshold_ns() / NS_PER_STEP;
        let now = self.now();
        if threshold == 0 || now < s.next_watchdog {
            return s;
        }
        s.next_watchdog = now + self.cfg.watchdog_interval(threshold);
        s.counters.watchdog_runs += 1;
        drop(s);
        as_scheduler(|| engine.check_stalls());
        self.lock()
    }

    /// Whether the run is complete: every program returned and nothing is queued or running.
    fn complete(&self, s: &State, engine: &SimEngine) -> bool {
        s.programs_done == self.cfg.cpus && engine.is_quiescent()
    }

    /// Ends the run (by the baton holder, or before anyone holds it).
    fn finish(&self, s: &mut State, engine: &SimEngine) {
        s.end = Some((engine.total_stats(), engine.diag_stats()));
        s.phase = Phase::Over;
        s.baton = None;
        for cv in self.cv.iter() {
            cv.notify_all();
        }
        self.main_cv.notify_all();
    }

    /// Records a failure and blocks until the main thread hands the baton back (healing).
    fn fail<'a>(&'a self, mut s: Guard<'a>, me: CpuId, reason: String) -> Guard<'a> {
        s.failure = Some((Some(me), self.now(), reason));
        s.phase = Phase::Failed;
        s.baton = None;
        self.main_cv.notify_all();
        self.wait_baton(s, me)
    }

    /// Hands the baton from `me` to `next` and blocks until `me` gets it back.
    fn hand_over<'a>(&'a self, mut s: Guard<'a>, me: CpuId, next: CpuId) -> Guard<'a> {
        s.counters.switches += 1;
        if s.recent.len() == RECENT_SWITCHES {
            s.recent.pop_front();
        }
        let now = self.now();
        s.recent.push_back((now, next));
        s.baton = Some(next);
        // Notify with the lock released, so the woken CPU does not block on it again; the
        // baton is re-checked under the lock, so a hand-back that comes first is not missed.
        drop(s);
        self.cv[next].notify_one();
        self.wait_baton(self.lock(), me)
    }

    fn runnable(&self, s: &State, cpu: CpuId) -> bool {
        s.mode[cpu] != Mode::Halted || s.irr[cpu]
    }

    /// The scheduling decision at a point of `me`.
    fn step<'a>(
        &'a self,
        mut s: Guard<'a>,
        me: CpuId,
        kind: PointKind,
        engine: &SimEngine,
    ) -> Guard<'a> {
        if s.phase != Phase::Running || s.baton != Some(me) {
            // Abandoned (or a thread that ran on without the baton after a wall timeout):
            // park until told otherwise.
            s = self.wait_baton(s, me);
            if s.phase == Phase::Over {
                return s;
            }
        }
        let halting = kind == PointKind::Halt;
        if halting {
            s.mode[me] = Mode::Halted;
        }
        let now = self.now() + 1;
        self.tick(&mut s, Some(me), now);
        if now >= s.limit {
            let reason = format!(
                "max_steps exceeded ({} steps): a livelock, or a wait that never ends",
                s.limit
            );
            s = self.fail(s, me, reason);
            if s.phase == Phase::Over {
                return s;
            }
        }
        s = self.maybe_watchdog(s, engine);
        if s.mode[me] != Mode::Program && self.complete(&s, engine) {
            self.finish(&mut s, engine);
            return s;
        }
        let me_runnable = !halting || s.irr[me];
        let n = self.cfg.cpus;
        let others = (0..n).filter(|&c| c != me && self.runnable(&s, c)).count() as u64;
        let next = if others == 0 {
            if !me_runnable {
                return self.all_halted(s, me, engine);
            }
            me
        } else if !me_runnable || s.rng.chance(self.cfg.preemption) {
            let k = s.rng.below(others) as usize;
            (0..n)
                .filter(|&c| c != me && self.runnable(&s, c))
                .nth(k)
                .unwrap_or(me)
        } else {
            me
        };
        if next != me {
            s = self.hand_over(s, me, next);
        }
        if halting && s.phase != Phase::Over {
            s.mode[me] = Mode::Idle;
        }
        s
    }

    /// `me` halts and no CPU is runnable: skip virtual time to the next IPI arrival or watchdog
    /// run, until some CPU can run, the run is complete, or nothing can ever happen.
    fn all_halted<'a>(&'a self, mut s: Guard<'a>, me: CpuId, engine: &SimEngine) -> Guard<'a> {
        let mut idle_since = self.now();
        loop {
            if self.complete(&s, engine) {
                self.finish(&mut s, engine);
                return s;
            }
            let threshold = engine.stall_threshold_ns() / NS_PER_STEP;
            let next_arrival = s.delayed.iter().map(|d| d.0).min();
            let next_watchdog = (threshold > 0).then_some(s.next_watchdog);
            // Relaxed: a configuration flag of the engine.
            let resend = engine.diag.resend.load(Ordering::Relaxed);
            let waited = self.now() - idle_since;
            let hopeless = next_arrival.is_none()
                && (next_watchdog.is_none()
                    || (!resend && waited > threshold + 2 * self.cfg.watchdog_interval(threshold)));
            if hopeless {
                let reason = format!(
                    "no runnable CPU: every CPU is halted, calls are queued and no IPI is \
                     pending or on its way{}",
                    if threshold == 0 {
                        " (stall detection is off)"
                    } else {
                        " (re-send on stall is disabled)"
                    }
                );
                s = self.fail(s, me, reason);
                if s.phase == Phase::Over {
                    return s;
                }
                idle_since = self.now();
                continue;
            }
            let target = [next_arrival, next_watchdog]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(0)
                .max(self.now() + 1);
            s.counters.idle_steps += target - self.now() - 1;
            self.tick(&mut s, None, target);
            if target >= s.limit {
                let reason = format!(
                    "max_steps exceeded ({} steps) while every CPU was halted",
                    s.limit
                );
                s = self.fail(s, me, reason);
                if s.phase == Phase::Over {
                    return s;
                }
                continue;
            }
            s = self.maybe_watchdog(s, engine);
            let n = self.cfg.cpus;
            let runnable = (0..n).filter(|&c| self.runnable(&s, c)).count() as u64;
            if runnable > 0 {
                let k = s.rng.below(runnable) as usize;
                let next = (0..n)
                    .filter(|&c| self.runnable(&s, c))
                    .nth(k)
                    .unwrap_or(me);
                if next != me {
                    s = self.hand_over(s, me, next);
                }
                if s.phase != Phase::Over {
                    s.mode[me] = Mode::Idle;
                }
                return s;
            }
        }
    }

    /// The idle loop of CPU `me` after its program.
    fn idle(&self, me: CpuId, engine: &SimEngine) {
        {
            let mut s = self.lock();
            if s.phase == Phase::Over {
                return;
            }
            s.programs_done += 1;
            s.mode[me] = Mode::Idle;
        }
        let over = || self.lock().phase == Phase::Over;
        match self.cfg.idle {
            SimIdle::Halt => {
                while !over() {
                    self.point(me, PointKind::Halt, engine);
                }
            }
            // SAFETY: the simulated CPU's idle loop, at task level.
            SimIdle::Poll => unsafe { engine.idle_poll(over) },
        }
    }

    /// Waits (main thread) until the run ends or fails, or nothing moves for the wall timeout.
    fn wait_outcome(&self, cfg: &SimConfig) -> Outcome {
        let mut s = self.lock();
        let mut last = (self.now(), Instant::now());
        loop {
            match s.phase {
                Phase::Over => return Outcome::Over,
                Phase::Failed => return Outcome::Failed,
                _ => {}
            }
            let (g, _) = self
                .main_cv
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner);
            s = g;
            let now = self.now();
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > cfg.wall_timeout && s.phase == Phase::Running {
                return Outcome::Runaway(s.baton);
            }
        }
    }

    /// Builds the failure record (main thread; every CPU is parked unless a thread ran away).
    fn failure(
        &self,
        engine: &SimEngine,
        cfg: &SimConfig,
        outcome: &Outcome,
    ) -> (Outcome, SimFailure) {
        let mut dump = String::new();
        let _ = engine.dump(&mut dump);
        let s = self.lock();
        let (cpu, steps, reason, kind) = match outcome {
            Outcome::Runaway(cpu) => (
                *cpu,
                self.now(),
                format!(
                    "no scheduling step for {:?} of real time: CPU {cpu:?} runs a loop without a \
                     scheduling point (a program spin loop needs sim::yield_now())",
                    cfg.wall_timeout
                ),
                Outcome::Runaway(*cpu),
            ),
            _ => {
                let (cpu, steps, reason) =
                    s.failure
                        .clone()
                        .unwrap_or((None, self.now(), "unknown".into()));
                (cpu, steps, reason, Outcome::Failed)
            }
        };
        let recent_switches = s
            .recent
            .iter()
            .map(|(step, cpu)| format!("{step}:{cpu}"))
            .collect::<Vec<_>>()
            .join(" ");
        let failure = SimFailure {
            config: *cfg,
            seed: cfg.seed,
            steps,
            cpu,
            reason,
            dump,
            report_count: s.report_count,
            reports: s.reports.clone(),
            recent_switches,
            counters: s.counters,
            diag: engine.diag_stats(),
            stats: engine.total_stats(),
            healed: false,
        };
        (kind, failure)
    }

    /// After a failure (main thread): faults off, re-send on, a fresh step budget, and the baton
    /// back to the CPU that failed.
    fn heal(&self, engine: &SimEngine, cfg: &SimConfig) {
        engine.set_resend_on_stall(true);
        if engine.stall_threshold_ns() == 0 {
            engine.set_stall_threshold_ns(2_000 * NS_PER_STEP);
        }
        let mut s = self.lock();
        s.drop_p = 0.0;
        s.delay_p = 0.0;
        s.dup_p = 0.0;
        s.limit = self.now().saturating_add(cfg.max_steps);
        let cpu = s.failure.as_ref().and_then(|f| f.0).unwrap_or(0);
        s.phase = Phase::Running;
        s.baton = Some(cpu);
        self.cv[cpu].notify_all();
    }

    fn report(&self, s: &State) -> SimReport {
        let (stats, diag) = s.end.unwrap_or_default();
        SimReport {
            seed: self.cfg.seed,
            steps: self.now(),
            trace_hash: s.trace_hash,
            counters: s.counters,
            diag,
            stats,
            report_count: s.report_count,
            reports: s.reports.clone(),
        }
    }
}

/// The body of simulated CPU `me`'s thread.
fn cpu_main(engine: Arc<SimEngine>, me: CpuId, program: Option<Program>) {
    let shared: &Shared = &engine.platform().shared;
    CURRENT.with(|c| {
        c.set(Current {
            shared: shared as *const Shared,
            cpu: me,
            engine: Arc::as_ptr(&engine),
            no_sched: false,
        })
    });
    let started = {
        let s = shared.wait_baton(shared.lock(), me);
        s.phase != Phase::Over
    };
    if started {
        if let Some(program) = program {
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| program(&engine))) {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "<non-string panic>".into());
                let s = shared.lock();
                if s.phase != Phase::Over {
                    drop(shared.fail(s, me, format!("CPU {me}'s program panicked: {msg}")));
                }
            }
        }
        shared.idle(me, &engine);
    }
    CURRENT.with(|c| {
        c.set(Current {
            shared: ptr::null(),
            cpu: 0,
            engine: ptr::null(),
            no_sched: false,
        })
    });
}
