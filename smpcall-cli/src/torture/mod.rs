//! `smpcall torture`: the exactly-once workload.
//!
//! Every CPU of a hosted [`Machine`] runs a task that, until the deadline, issues a seeded
//! random mix of every kind of call ([`Kind`]) to random targets — other CPUs and itself,
//! waiting and not waiting, single and many. Each call gets a record in a [`Ledger`] naming
//! the CPUs it must run on, written *before* the call; the call's function marks the CPU it
//! runs on. When every task is done and every call has drained, [`verify`] checks each record:
//! every accepted call ran exactly once on each CPU it was meant for, and nowhere else.
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
//! per-call records, the function's bookkeeping, the verifier and its violation classes),
//! [`report`] (statistics and their text form), and here the driver (`run`) and the per-CPU
//! workload (`Worker`).

pub mod kind;
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
use smpcall::{CpuId, CpuMask, Csd, Error};

pub use kind::{Kind, Mix};
pub use ledger::{verify, Ledger, RecordId, Verification, Violation, MAX_TORTURE_CPUS};
pub use report::Report;
use rng::Rng;

/// Caller-owned call data each CPU keeps for [`Kind::CsdAsync`].
pub const CSD_POOL: usize = 8;

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
    /// How often each kind is picked.
    pub mix: Mix,
    /// Bound on each wait after the deadline: a task to finish, calls to drain, shutdown.
    pub timeout: Duration,
}

impl Default for Config {
    /// 4 CPUs, 5 s, idle polling 50 µs then sleeping, seed 1, 4 Mi calls per CPU, uniform
    /// mix, 30 s bound on each wait.
    fn default() -> Self {
        Config {
            cpus: 4,
            duration: Duration::from_secs(5),
            idle: IdlePolicy::PollThenSleep(Duration::from_micros(50)),
            seed: 1,
            max_calls_per_cpu: 4 << 20,
            mix: Mix::uniform(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Runs the workload and verifies it. `Err` only for a setup problem (bad configuration, the
/// machine would not start); every finding about the engine is in the [`Report`].
pub fn run(cfg: &Config) -> Result<Report, Error> {
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
    let mut incidents = Vec::new();
    let mut capacity_reached = Vec::new();

    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|cpu| {
            let ledger = Arc::clone(&ledger);
            let gate = Arc::clone(&gate);
            let cfg = cfg.clone();
            machine.run_on(cpu, move |engine| {
                Worker::run(engine, cpu, &cfg, ledger, &gate)
            })
        })
        .collect();
    let join_deadline = start + cfg.duration + cfg.timeout;
    let mut hung = Vec::new();
    for (cpu, task) in tasks.into_iter().enumerate() {
        let left = join_deadline.saturating_duration_since(Instant::now());
        match panic::catch_unwind(AssertUnwindSafe(|| task.join_timeout(left))) {
            Ok(Ok(Ok(outcome))) => {
                if outcome.capacity_reached {
                    capacity_reached.push(cpu);
                }
            }
            Ok(Ok(Err(why))) => incidents.push(format!("CPU {cpu}: {why}")),
            Ok(Err(Error::TimedOut(_))) => {
                hung.push(cpu);
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
            Ok(Err(e)) => incidents.push(format!("CPU {cpu}: its task could not run: {e}")),
            Err(_) => incidents.push(format!("CPU {cpu}: its task panicked")),
        }
    }
    let elapsed = start.elapsed();

    // Asynchronous calls may still be queued or running: wait for them (bounded).
    let engine = machine.engine();
    if hung.is_empty() && !wait_for(cfg.timeout, || engine.is_quiescent()) {
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
        && !wait_for(Duration::from_secs(1), || {
            stats = engine.total_stats();
            stats.calls_queued == stats.calls_run
        })
    {
        incidents.push(format!(
            "engine counters disagree after the drain: {} calls queued, {} run",
            stats.calls_queued, stats.calls_run
        ));
    }
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
        engine: stats,
        signals_sent,
        futex_wakes,
        capacity_reached,
        incidents,
    })
}

/// Polls `done` until it holds or `limit` passes; returns whether it held. Sleeps between
/// polls: for the main thread only (see [`spin_for`]).
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
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

/// The function every call runs: record where it ran. Signal context: see [`Ledger::deliver`].
fn on_call(ledger: &Ledger, id: RecordId, cpu: CpuId) {
    ledger.deliver(id, ledger::this_cpu(), cpu);
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
#[derive(Clone, Copy, Debug)]
struct Outcome {
    capacity_reached: bool,
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
        };
        let deadline = Instant::now() + cfg.duration;
        let mut capacity_reached = false;
        while Instant::now() < deadline {
            let kind = cfg.mix.pick(&mut w.rng);
            if w.issue(kind).is_none() {
                capacity_reached = true;
                break;
            }
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
        Ok(Outcome { capacity_reached })
    }

    /// A target for a single call: usually another CPU, sometimes this one.
    fn pick_target(&mut self) -> CpuId {
        if self.n == 1 || self.rng.one_in(8) {
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
            m = 1 << self.pick_target_other();
        }
        if self.rng.one_in(4) {
            m |= me;
        }
        m
    }

    fn pick_target_other(&mut self) -> CpuId {
        let t = self.rng.below(self.n as u64 - 1) as CpuId;
        if t >= self.me {
            t + 1
        } else {
            t
        }
    }

    /// A closure for a no-wait call: 16 bytes (an `Arc` and an id), `Fn + Clone + Send`. Its
    /// drop in signal context only decrements the `Arc` (`run` keeps the last reference).
    fn async_fn(&self, id: RecordId) -> impl Fn(CpuId) + Clone + Send + 'static {
        let ledger = Arc::clone(&self.ledger);
        move |cpu| on_call(&ledger, id, cpu)
    }

    /// Issues one call of `kind`. `None` when this CPU's records are used up.
    fn issue(&mut self, kind: Kind) -> Option<()> {
        let me = self.me;
        let engine = self.engine;
        match kind {
            Kind::Single | Kind::SingleAsync | Kind::CsdAsync => {
                let target = self.pick_target();
                let id = self.ledger.begin(me, kind, 1 << target)?;
                let result = match kind {
                    Kind::Single => {
                        let ledger = &*self.ledger;
                        engine.call_single(target, |cpu| on_call(ledger, id, cpu))
                    }
                    Kind::SingleAsync => engine.call_single_async(target, self.async_fn(id)),
                    _ => self.call_with_own_csd(id, target),
                };
                match result {
                    Ok(()) => {}
                    Err(Error::Busy) if kind == Kind::CsdAsync => self.ledger.note_refused(id),
                    Err(e) => self.ledger.note_error(id, &e),
                }
            }
            _ => {
                let (requested, pred) = match kind {
                    Kind::All | Kind::AllAsync => (self.all, u64::MAX),
                    Kind::Others | Kind::OthersAsync => (self.all & !(1 << me), u64::MAX),
                    Kind::Cond | Kind::CondAsync => (self.pick_mask(), self.rng.next_u64()),
                    _ => (self.pick_mask(), u64::MAX),
                };
                // Every CPU is online for the whole run: the engine must reach exactly these.
                let intended = requested & self.all & pred;
                let id = self.ledger.begin(me, kind, intended)?;
                let mask = mask_of(requested);
                let cond = move |cpu: CpuId| pred >> cpu & 1 == 1;
                let ledger = &*self.ledger;
                let sync_fn = |cpu| on_call(ledger, id, cpu);
                let result = match kind {
                    Kind::Many => engine.call_many(&mask, sync_fn),
                    Kind::ManyAsync => engine.call_many_async(&mask, self.async_fn(id)),
                    Kind::All => engine.call_all(sync_fn),
                    Kind::AllAsync => engine.call_all_async(self.async_fn(id)),
                    Kind::Others => engine.call_others(sync_fn),
                    Kind::OthersAsync => engine.call_others_async(self.async_fn(id)),
                    Kind::Cond => engine.call_cond(&mask, cond, sync_fn),
                    _ => engine.call_cond_async(&mask, cond, self.async_fn(id)),
                };
                match result {
                    Ok(sent) if bits_of(&sent) == Some(intended) => {}
                    Ok(_) => self.ledger.note_mask_mismatch(id),
                    Err(e) => self.ledger.note_error(id, &e),
                }
            }
        }
        Some(())
    }

    /// `call_async_csd` through the first free call data of this CPU's pool, starting at a
    /// random one (so a call data still in flight is sometimes tried: the `Busy` refusal is
    /// exercised too). `Err(Busy)` if all of them are in flight (each refusal is counted).
    fn call_with_own_csd(&mut self, id: RecordId, target: CpuId) -> Result<(), Error> {
        let start = self.rng.below(CSD_POOL as u64) as usize;
        for k in 0..CSD_POOL {
            let i = (start + k) % CSD_POOL;
            let f = self.async_fn(id);
            match self.engine.call_async_csd(self.csds[i].as_ref(), target, f) {
                Err(Error::Busy) => self.ledger.count_refusal(self.me, Kind::CsdAsync),
                other => return other,
            }
        }
        Err(Error::Busy)
    }
}
