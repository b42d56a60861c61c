//! `smpcall bench`: our calls side by side with the peers a user would otherwise pick, in one
//! run, as ratios, checked against performance targets stated in words on each row.
//! `--scaling` ([`scaling`]) counts instead how a many-call's cost grows with the CPU count.
//!
//! Every latency row times many round trips (after a warm-up) with one cheap clock
//! ([`Clock`]: the calibrated TSC on x86_64) and records each in an HDR histogram; caller and
//! target are pinned to cores 0 and 1 where the host has them, as the hosted `Machine` pins
//! CPU 0 and CPU 1.
//!
//! **Noise.** On a shared virtual machine the cost of a cache-line transfer between the two
//! vCPUs changes by several times within seconds (the host moves them, other processes run),
//! so rows measured seconds apart cannot be divided by each other. The run therefore goes
//! through every row in several interleaved *passes*, measures the floor again right before
//! each latency row, and computes every ratio *within a pass* (row ÷ the floor just before it,
//! row ÷ the best peer in the same pass), reporting the median over passes. Latency columns
//! are over all passes.
//!
//! The rows, by category:
//!
//! * **single round trip** — the floor (one cache line bounced between the two cores);
//!   `call_single` to an idle-polling, a
//!   busy (signal IPI) and a sleeping (futex wake) CPU; peers: crossbeam request/response
//!   (blocking and busy-polling), `std::sync::mpsc`, park/unpark, a bare
//!   `tgkill`→handler→ack.
//! * **broadcast with wait** — `call_others` / `call_all` vs rayon's `broadcast` from outside
//!   and inside the pool and `membarrier(PRIVATE_EXPEDITED)`; again with 4 virtual CPUs.
//! * **stop_machine** — `stop_machine(1, f)` from CPU 0: `f` runs on CPU 1 while every other
//!   CPU spins masked (no peer; ratio to the floor only).
//! * **async throughput** — no-wait calls to one target through a ring of caller-owned `Csd`s
//!   or the engine's slot, vs a crossbeam `unbounded` channel; messages per second and IPIs
//!   per call.
//! * **user-space RCU** ([`rcu`]) — read-side lock + unlock cost, and grace-period latency with
//!   reader threads busy in sections or blocked in `read(2)`: smpcall's expedited RCU (attached
//!   threads) vs each liburcu flavour ([`urcu`], loaded at run time; rows skipped, saying so,
//!   when it is not installed).
//!
//! ```no_run
//! use smpcall_cli::bench::{self, Config};
//! let report = bench::run(&Config::quick())?;
//! println!("{report}");
//! std::fs::write("/tmp/bench.json", report.to_json())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Layout: [`clock`] (timestamps), [`sample`] (the timed loop, histograms, summaries),
//! [`threads`] (pinning, bounded joins and spins), [`peers`] (the floor and the peers),
//! [`ours`] (smpcall on a hosted machine), [`rcu`] and [`urcu`] (the user-space RCU rows and
//! liburcu), [`report`] (ratios, targets, table, JSON),
//! [`plot`] (the SVG of the latency distributions); here the configuration and the driver.

pub mod callgrind;
pub mod clock;
pub mod cost;
pub mod ours;
pub mod output;
pub mod peers;
pub mod plot;
pub mod rcu;
pub mod report;
pub mod sample;
pub mod scaling;
pub mod solo;
pub mod threads;
pub mod urcu;

use std::fmt;
use std::time::Duration;

use smpcall::hosted::IdlePolicy;

pub use clock::{Clock, ClockSource};
pub use report::{Category, NotEvaluated, PassFigure, Report, Row, Side, Skipped, TargetCheck};
use sample::Latency;
use threads::Topology;

/// What to run, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Interleaved passes over every row; the figures below are totals over all passes.
    pub passes: u64,
    /// Timed round trips per latency row (fewer if `row_time` runs out first).
    pub iterations: u64,
    /// Untimed round trips before them, per pass (at most a quarter of the pass's time).
    pub warmup: u64,
    /// Time cap on the timed part of each row.
    pub row_time: Duration,
    /// Messages per throughput round.
    pub messages: u64,
    /// Timed throughput rounds per row (fewer if `row_time` runs out first); each pass
    /// starts with one untimed round.
    pub rounds: u64,
    /// Untimed quiet before each call to a sleeping CPU, so that it falls asleep.
    pub sleep_pause: Duration,
    /// A peer or CPU that does not answer within this is reported as an error, not waited
    /// for.
    pub wait_bound: Duration,
    /// Also run the 4-virtual-CPU broadcast rows.
    pub four_cpus: bool,
    /// How long the TSC is calibrated against the monotonic clock.
    pub calibration: Duration,
    /// Only the rows whose id contains one of these words (and the floor); empty: every row.
    /// Targets against a row left out are not evaluated.
    pub rows: Vec<String>,
}

impl Default for Config {
    /// The full run: 5 passes; 100 000 round trips per row after 2 000 warm-up per pass, at
    /// most 1.5 s per row; 15 throughput rounds of 100 000 messages; well under a minute on
    /// 2 cores.
    fn default() -> Self {
        Config {
            passes: 5,
            iterations: 100_000,
            warmup: 2_000,
            row_time: Duration::from_millis(1500),
            messages: 100_000,
            rounds: 15,
            sleep_pause: Duration::from_micros(30),
            wait_bound: Duration::from_secs(10),
            four_cpus: true,
            calibration: Duration::from_millis(50),
            rows: Vec::new(),
        }
    }
}

impl Config {
    /// A run of a few seconds (tests, CI): 2 passes, 2 000 round trips per row, at most
    /// 150 ms each.
    pub fn quick() -> Self {
        Config {
            passes: 2,
            iterations: 2_000,
            warmup: 200,
            row_time: Duration::from_millis(150),
            messages: 5_000,
            rounds: 4,
            calibration: Duration::from_millis(10),
            ..Config::default()
        }
    }
}

/// Why a bench run stopped.
#[derive(Debug)]
pub enum BenchError {
    /// Something could not be set up (a thread, a pool, a signal, a system call).
    Setup(String),
    /// The engine refused or failed.
    Engine {
        /// What was being done.
        what: String,
        /// The engine's error.
        error: smpcall::Error,
    },
    /// A peer, CPU or thread did not answer within the bound.
    Timeout {
        /// Who did not answer.
        what: String,
        /// How long we waited.
        bound: Duration,
    },
    /// A measuring thread panicked.
    Panicked {
        /// Which thread.
        what: String,
        /// The panic message.
        message: String,
    },
    /// Writing an output file failed.
    Output(String),
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Setup(s) => write!(f, "setup failed: {s}"),
            BenchError::Engine { what, error } => write!(f, "{what}: {error}"),
            BenchError::Timeout { what, bound } => {
                write!(f, "{what} did not answer within {bound:?}")
            }
            BenchError::Panicked { what, message } => write!(f, "{what} panicked: {message}"),
            BenchError::Output(s) => write!(f, "output: {s}"),
        }
    }
}

impl std::error::Error for BenchError {}

/// A value alone on its cache lines (128 bytes: adjacent-line prefetch pairs lines).
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct Padded<T>(pub T);

/// What every row needs: the configuration, the clock, the cores.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// The configuration.
    pub cfg: Config,
    /// The clock every row uses.
    pub clock: Clock,
    /// The host's cores.
    pub topo: Topology,
}

impl Ctx {
    /// The same context for one of `cfg.passes` passes: iterations, rounds and time divided.
    pub fn per_pass(&self) -> Ctx {
        let p = self.cfg.passes.max(1);
        let mut c = self.clone();
        c.cfg.iterations = self.cfg.iterations.div_ceil(p).max(1);
        c.cfg.rounds = self.cfg.rounds.div_ceil(p).max(1);
        c.cfg.row_time = self.cfg.row_time / p as u32;
        c
    }

    /// The context of the short floor measured right before each latency row.
    pub fn local_floor(&self) -> Ctx {
        let mut c = self.clone();
        c.cfg.iterations = self.cfg.iterations.min(5_000);
        c.cfg.warmup = self.cfg.warmup.min(500);
        c.cfg.row_time = self.cfg.row_time.min(Duration::from_millis(20));
        c
    }

    /// `cfg.wait_bound` in clock ticks.
    pub fn bound_ticks(&self) -> u64 {
        self.clock.ticks(self.cfg.wait_bound)
    }

    /// Bound on a whole row: warm-up (≤ a quarter of `row_time`), `row_time`, one last slow
    /// round trip, start and stop.
    pub fn row_bound(&self) -> Duration {
        self.cfg.row_time * 2 + self.cfg.wait_bound * 2
    }

    /// The error for `what` not answering within `wait_bound`.
    pub fn timeout(&self, what: &str) -> BenchError {
        BenchError::Timeout {
            what: what.to_string(),
            bound: self.cfg.wait_bound,
        }
    }
}

/// Stable ids of every row, in table order. Rows that could not run here are in
/// [`Report::skipped`] with the reason. `floor` is measured right before every latency row
/// of every pass; its row merges all of those.
pub const ROW_IDS: &[&str] = &[
    "floor",
    "sync_polling",
    "sync_polling_nodiag",
    "sync_polling_attached",
    "sync_polling_foreign",
    "sync_busy",
    "sync_busy_unchecked",
    "sync_sleeping",
    "crossbeam_blocking",
    "crossbeam_spinning",
    "mpsc",
    "park_unpark",
    "tgkill",
    "call_others",
    "call_all",
    "rayon_outside",
    "rayon_inside",
    "membarrier",
    "call_all_4",
    "rayon_outside_4",
    "stop_machine",
    "async_csd_polling",
    "async_csd_busy",
    "async_slot_polling",
    "crossbeam_unbounded_blocking",
    "crossbeam_unbounded_spinning",
    "rcu_read_smpcall",
    "rcu_read_urcu_memb",
    "rcu_read_urcu_mb",
    "rcu_read_urcu_signal",
    "rcu_read_urcu_qsbr",
    "rcu_gp_busy_smpcall",
    "rcu_gp_busy_urcu_memb",
    "rcu_gp_busy_urcu_mb",
    "rcu_gp_busy_urcu_signal",
    "rcu_gp_busy_urcu_qsbr",
    "rcu_gp_blocked_smpcall",
    "rcu_gp_blocked_smpcall_signalled",
    "rcu_gp_blocked_urcu_memb",
    "rcu_gp_blocked_urcu_mb",
    "rcu_gp_blocked_urcu_signal",
    "rcu_gp_blocked_urcu_qsbr",
];

/// The user-space RCU rows: whose RCU, and what the row measures (`None`: read-side cost;
/// `Some(readers)`: grace-period latency with readers doing that). `None` for other rows.
fn rcu_row(id: &str) -> Option<(rcu::Who, Option<rcu::Readers>)> {
    use rcu::{Readers, Who};
    let (what, who) = if let Some(rest) = id.strip_prefix("rcu_read_") {
        (None, rest)
    } else if let Some(rest) = id.strip_prefix("rcu_gp_busy_") {
        (Some(Readers::Busy), rest)
    } else if id == "rcu_gp_blocked_smpcall_signalled" {
        return Some((Who::Smpcall, Some(Readers::BlockedSignalled)));
    } else {
        (Some(Readers::Blocked), id.strip_prefix("rcu_gp_blocked_")?)
    };
    let who = match who {
        "smpcall" => Who::Smpcall,
        other => Who::Urcu(urcu::Flavour::from_name(other.strip_prefix("urcu_")?)?),
    };
    Some((who, what))
}

/// Name, category and side of an RCU row.
fn rcu_meta(who: rcu::Who, what: Option<rcu::Readers>) -> (String, Category, Side) {
    use rcu::{Readers, Who};
    let (cat, side) = match (what, who) {
        (None, Who::Smpcall) => (Category::RcuRead, Side::Ours),
        (None, Who::Urcu(_)) => (Category::RcuRead, Side::Peer),
        (Some(Readers::Busy), Who::Smpcall) => (Category::RcuGpBusy, Side::Ours),
        (Some(Readers::Busy), Who::Urcu(_)) => (Category::RcuGpBusy, Side::Peer),
        (Some(_), Who::Smpcall) => (Category::RcuGpBlocked, Side::Ours),
        (Some(_), Who::Urcu(_)) => (Category::RcuGpBlocked, Side::Peer),
    };
    let name = match (who, what) {
        (Who::Smpcall, None) => "smpcall rcu_read_lock + drop (attached thread)".to_string(),
        (Who::Urcu(f), None) => format!("liburcu-{} read_lock + read_unlock (2 calls)", f.name()),
        (Who::Smpcall, Some(Readers::Busy)) => {
            "smpcall synchronize_rcu_expedited, readers pass safe_point".to_string()
        }
        (Who::Smpcall, Some(Readers::Blocked)) => {
            "smpcall synchronize_rcu_expedited, readers in hosted::quiet".to_string()
        }
        (Who::Smpcall, Some(Readers::BlockedSignalled)) => {
            "smpcall synchronize_rcu_expedited, readers signalled (no quiet)".to_string()
        }
        (Who::Urcu(rcu_flavour), Some(readers)) => {
            let how = match (rcu_flavour, readers) {
                (urcu::Flavour::Qsbr, Readers::Busy) => ", readers call quiescent_state",
                (urcu::Flavour::Qsbr, _) => ", readers offline",
                _ => "",
            };
            format!("liburcu-{} synchronize_rcu{how}", rcu_flavour.name())
        }
    };
    (name, cat, side)
}

/// What one row measured.
enum Measured {
    Latency(hdrhistogram::Histogram<u64>, Option<ours::Delivery>),
    Throughput(sample::Throughput, Option<ours::Delivery>),
    /// Rounds of an operation timed as a rate; reported as nanoseconds per operation.
    Cost(sample::Throughput),
}

/// Name, category and side of a row id.
fn row_meta(id: &str, topo: &Topology) -> (String, Category, Side) {
    use Category::*;
    use Side::*;
    if let Some((who, what)) = rcu_row(id) {
        return rcu_meta(who, what);
    }
    let four = if topo.cores() >= 4 {
        "4 CPUs".to_string()
    } else {
        format!("4 vCPUs on {} cores", topo.cores())
    };
    let (name, cat, side) = match id {
        "floor" => ("floor: cache-line ping-pong".into(), Single, Floor),
        "sync_polling" => ("smpcall call_single → polling CPU".into(), Single, Ours),
        "sync_polling_nodiag" => ("  same, per-call diagnostics off".into(), Single, Ours),
        "sync_polling_attached" => (
            "  same, from a thread of yours attached as a CPU".into(),
            Single,
            Ours,
        ),
        "sync_polling_foreign" => (
            "  same, from a thread of yours that is not a CPU".into(),
            Single,
            Ours,
        ),
        "sync_busy_unchecked" => (
            "  same, unsafe run_calls_in_signal_handlers".into(),
            Single,
            Ours,
        ),
        "sync_busy" => (
            "smpcall call_single → busy CPU (signal, interruptible)".into(),
            Single,
            Ours,
        ),
        "sync_sleeping" => (
            "smpcall call_single → sleeping CPU (futex)".into(),
            Single,
            Ours,
        ),
        "crossbeam_blocking" => ("crossbeam req/resp, blocking worker".into(), Single, Peer),
        "crossbeam_spinning" => (
            "crossbeam req/resp, busy-polling worker".into(),
            Single,
            Peer,
        ),
        "mpsc" => ("std mpsc req/resp, blocking worker".into(), Single, Peer),
        "park_unpark" => ("thread park/unpark".into(), Single, Peer),
        "tgkill" => ("bare tgkill → handler → ack".into(), Single, Peer),
        "call_others" => ("smpcall call_others (1 other CPU)".into(), Broadcast, Ours),
        "call_all" => ("smpcall call_all (2 CPUs)".into(), Broadcast, Ours),
        "rayon_outside" => (
            "rayon broadcast from outside (2 threads)".into(),
            Broadcast,
            Peer,
        ),
        "rayon_inside" => (
            "rayon broadcast from inside (2 threads)".into(),
            Broadcast,
            Peer,
        ),
        "membarrier" => ("membarrier private expedited".into(), Broadcast, Peer),
        "call_all_4" => (format!("smpcall call_all ({four})"), Broadcast4, Ours),
        "stop_machine" => (
            "smpcall stop_machine(1, f) (2 CPUs)".into(),
            StopMachine,
            Ours,
        ),
        "rayon_outside_4" => (
            "rayon broadcast from outside (4 threads)".into(),
            Broadcast4,
            Peer,
        ),
        "async_csd_polling" => (
            "smpcall async, Csd ring → polling CPU".into(),
            Throughput,
            Ours,
        ),
        "async_csd_busy" => (
            "smpcall async, Csd ring → busy CPU".into(),
            Throughput,
            Ours,
        ),
        "async_slot_polling" => (
            "smpcall call_single_async → polling CPU".into(),
            Throughput,
            Ours,
        ),
        "crossbeam_unbounded_blocking" => (
            "crossbeam unbounded, blocking receiver".into(),
            Throughput,
            Peer,
        ),
        "crossbeam_unbounded_spinning" => (
            "crossbeam unbounded, busy-polling receiver".into(),
            Throughput,
            Peer,
        ),
        other => (other.to_string(), Single, Peer),
    };
    (name, cat, side)
}

fn measure_row(ctx: &Ctx, id: &str, name: &str) -> Result<Measured, BenchError> {
    use ours::{AsyncKind, Broadcast, TargetState};
    let lat = |h| Ok(Measured::Latency(h, None));
    let ours_lat = |(h, d)| Ok(Measured::Latency(h, Some(d)));
    let ours_tput = |(t, d)| Ok(Measured::Throughput(t, Some(d)));
    let default_idle = IdlePolicy::PollThenSleep(Duration::from_micros(50));
    if let Some((who, what)) = rcu_row(id) {
        return match what {
            None => Ok(Measured::Cost(rcu::read_cost(ctx, name, who)?)),
            Some(readers) => {
                let (h, d) = rcu::grace_period(ctx, name, who, readers)?;
                Ok(Measured::Latency(h, d))
            }
        };
    }
    match id {
        "floor" => lat(peers::floor(ctx, name)?),
        "sync_polling" => ours_lat(ours::sync_single(ctx, name, TargetState::Polling)?),
        "sync_polling_attached" => ours_lat(ours::sync_single_own_thread(
            ctx,
            name,
            ours::OwnThread::Attached,
        )?),
        "sync_polling_foreign" => ours_lat(ours::sync_single_own_thread(
            ctx,
            name,
            ours::OwnThread::Foreign,
        )?),
        "sync_polling_nodiag" => ours_lat(ours::sync_single_diag(
            ctx,
            name,
            TargetState::Polling,
            false,
        )?),
        "sync_busy" => ours_lat(ours::sync_single(ctx, name, TargetState::Busy)?),
        "sync_busy_unchecked" => {
            ours_lat(ours::sync_single(ctx, name, TargetState::BusyUnchecked)?)
        }
        "sync_sleeping" => ours_lat(ours::sync_single(ctx, name, TargetState::Sleeping)?),
        "crossbeam_blocking" => lat(peers::crossbeam_rr(ctx, name, false)?),
        "crossbeam_spinning" => lat(peers::crossbeam_rr(ctx, name, true)?),
        "mpsc" => lat(peers::mpsc_rr(ctx, name)?),
        "park_unpark" => lat(peers::park_rr(ctx, name)?),
        "tgkill" => lat(peers::tgkill_rr(ctx, name)?),
        "call_others" => ours_lat(ours::broadcast(
            ctx,
            name,
            2,
            Broadcast::Others,
            IdlePolicy::Poll,
        )?),
        "call_all" => ours_lat(ours::broadcast(
            ctx,
            name,
            2,
            Broadcast::All,
            IdlePolicy::Poll,
        )?),
        "rayon_outside" => lat(peers::rayon_outside(ctx, name, 2)?),
        "rayon_inside" => lat(peers::rayon_inside(ctx, name, 2)?),
        "membarrier" => lat(peers::membarrier(ctx, name)?),
        "call_all_4" => ours_lat(ours::broadcast(ctx, name, 4, Broadcast::All, default_idle)?),
        "rayon_outside_4" => lat(peers::rayon_outside(ctx, name, 4)?),
        "stop_machine" => ours_lat(ours::stop_machine(ctx, name, 2)?),
        "async_csd_polling" => ours_tput(ours::throughput(
            ctx,
            name,
            AsyncKind::CsdRing,
            TargetState::Polling,
        )?),
        "async_csd_busy" => ours_tput(ours::throughput(
            ctx,
            name,
            AsyncKind::CsdRing,
            TargetState::Busy,
        )?),
        "async_slot_polling" => ours_tput(ours::throughput(
            ctx,
            name,
            AsyncKind::EngineSlot,
            TargetState::Polling,
        )?),
        "crossbeam_unbounded_blocking" => Ok(Measured::Throughput(
            peers::crossbeam_throughput(ctx, name, false)?,
            None,
        )),
        "crossbeam_unbounded_spinning" => Ok(Measured::Throughput(
            peers::crossbeam_throughput(ctx, name, true)?,
            None,
        )),
        other => Err(BenchError::Setup(format!("unknown row {other}"))),
    }
}

/// Runs every row and returns the report (no progress output).
pub fn run(cfg: &Config) -> Result<Report, BenchError> {
    run_with_progress(cfg, |_, _, _| {})
}

/// Runs every row, calling `progress(done, total, next_row_name)` before each row of each
/// pass and once at the end (with an empty name).
pub fn run_with_progress(
    cfg: &Config,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<Report, BenchError> {
    // Registered first, before this run starts any thread (registration is per process).
    let membarrier = peers::register_membarrier();
    let load_before = load_average();
    let topo = Topology::detect();
    let clock = Clock::calibrate(cfg.calibration);
    let ctx = Ctx {
        cfg: cfg.clone(),
        clock,
        topo: topo.clone(),
    };
    let pass_ctx = ctx.per_pass();
    let floor_ctx = pass_ctx.local_floor();
    let ids: Vec<&str> = ROW_IDS
        .iter()
        .copied()
        .filter(|id| cfg.four_cpus || !id.ends_with("_4"))
        .filter(|id| {
            *id == "floor" || cfg.rows.is_empty() || cfg.rows.iter().any(|w| id.contains(w))
        })
        .filter(|id| *id != "membarrier" || membarrier.is_ok())
        .filter(|id| rcu_row(id).is_none_or(|(who, _)| rcu::available(who).is_ok()))
        .collect();
    let mut acc: Vec<Acc> = ids
        .iter()
        .map(|id| {
            let (name, category, side) = row_meta(id, &topo);
            Acc {
                row: Row::new(id, name, category, side),
                hist: None,
                rates: Vec::new(),
                delivery: None,
            }
        })
        .collect();
    let floor_at = acc.iter().position(|a| a.row.id == "floor");
    let passes = cfg.passes.max(1) as usize;
    let total = passes * ids.len();
    for pass in 0..passes {
        for (i, id) in ids.iter().enumerate() {
            if *id == "floor" {
                continue;
            }
            let name = acc[i].row.name.clone();
            progress(pass * ids.len() + i, total, &name);
            let latency_row = acc[i].row.category.is_latency();
            // The floor right before the row, in the same conditions.
            let local_floor = if latency_row {
                let h = local_floor(&floor_ctx)?;
                let median = h.value_at_quantile(0.5) as f64;
                if let Some(f) = floor_at {
                    acc[f].add_latency(&h, None);
                    acc[f].row.passes.push(PassFigure {
                        pass: pass as u64,
                        value: median,
                        floor_ns: Some(median),
                    });
                }
                Some(median)
            } else {
                None
            };
            match measure_row(&pass_ctx, id, &name)? {
                Measured::Latency(h, d) => {
                    acc[i].add_latency(&h, d);
                    acc[i].row.passes.push(PassFigure {
                        pass: pass as u64,
                        value: h.value_at_quantile(0.5) as f64,
                        floor_ns: local_floor,
                    });
                }
                Measured::Throughput(t, d) => {
                    acc[i].rates.extend(&t.rounds_per_s);
                    acc[i].merge_delivery(d);
                    acc[i].row.passes.push(PassFigure {
                        pass: pass as u64,
                        value: t.median_per_s,
                        floor_ns: None,
                    });
                }
                Measured::Cost(t) => {
                    acc[i].rates.extend(&t.rounds_per_s);
                    acc[i].row.passes.push(PassFigure {
                        pass: pass as u64,
                        value: t.ns_per_message,
                        floor_ns: None,
                    });
                }
            }
        }
    }
    progress(total, total, "");
    let rows: Vec<Row> = acc
        .into_iter()
        .map(|mut a| {
            if let Some(h) = &a.hist {
                a.row.latency = Some(Latency::from_histogram(h));
            }
            if !a.rates.is_empty() {
                let rates = std::mem::take(&mut a.rates);
                a.row.throughput = Some(sample::Throughput::from_rates(cfg.messages, rates));
            }
            a.row.delivery = a.delivery;
            a.row
        })
        .collect();
    let mut skipped = Vec::new();
    if let Err(reason) = &membarrier {
        skipped.push(Skipped {
            id: "membarrier".into(),
            name: row_meta("membarrier", &topo).0,
            category: Category::Broadcast,
            reason: reason.clone(),
        });
    }
    for id in ROW_IDS {
        let Some((who, _)) = rcu_row(id) else {
            continue;
        };
        if let Err(reason) = rcu::available(who) {
            let (name, category, _) = row_meta(id, &topo);
            skipped.push(Skipped {
                id: id.to_string(),
                name,
                category,
                reason,
            });
        }
    }
    let load = [load_before, load_average()];
    Ok(Report::build(cfg, &clock, &topo, load, rows, skipped))
}

/// The floor measured right before a row. A measurement whose responder was preempted (it
/// could not finish a tenth of its round trips in its time) is retried, twice at most; the
/// one with the lowest median is kept.
fn local_floor(ctx: &Ctx) -> Result<hdrhistogram::Histogram<u64>, BenchError> {
    let enough = (ctx.cfg.iterations / 10).max(1);
    let mut best = peers::floor(ctx, "floor")?;
    for _ in 0..2 {
        if best.len() >= enough {
            break;
        }
        let again = peers::floor(ctx, "floor")?;
        if again.value_at_quantile(0.5) < best.value_at_quantile(0.5) {
            best = again;
        }
    }
    Ok(best)
}

/// One row's figures, accumulated over passes.
struct Acc {
    row: Row,
    hist: Option<hdrhistogram::Histogram<u64>>,
    rates: Vec<f64>,
    delivery: Option<ours::Delivery>,
}

impl Acc {
    fn add_latency(&mut self, h: &hdrhistogram::Histogram<u64>, d: Option<ours::Delivery>) {
        match &mut self.hist {
            Some(all) => all.add(h).expect("histograms with the same bounds add"),
            None => self.hist = Some(h.clone()),
        }
        self.merge_delivery(d);
    }

    fn merge_delivery(&mut self, d: Option<ours::Delivery>) {
        let Some(d) = d else { return };
        self.delivery = Some(match self.delivery {
            None => d,
            Some(a) => {
                let n = (a.calls + d.calls).max(1) as f64;
                let w = |x: f64, y: f64| (x * a.calls as f64 + y * d.calls as f64) / n;
                ours::Delivery {
                    calls: a.calls + d.calls,
                    ipis_per_call: w(a.ipis_per_call, d.ipis_per_call),
                    elided_per_call: w(a.elided_per_call, d.elided_per_call),
                    signals_per_call: w(a.signals_per_call, d.signals_per_call),
                    futex_wakes_per_call: w(a.futex_wakes_per_call, d.futex_wakes_per_call),
                }
            }
        });
    }
}

/// The 1-minute load average (other runnable work competing for the cores), if readable.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// [`run_with_progress`] with a progress bar on standard error (hidden when it is not a
/// terminal).
pub fn run_with_progress_bar(cfg: &Config) -> Result<Report, BenchError> {
    let bar = indicatif::ProgressBar::new((ROW_IDS.len() as u64) * cfg.passes.max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let r = run_with_progress(cfg, |done, total, name| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(name.to_string());
    });
    bar.finish_and_clear();
    r
}
