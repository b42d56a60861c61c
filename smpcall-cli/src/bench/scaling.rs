//! `smpcall bench --scaling`: how the cost of a many-call grows with the number of CPUs, counted
//! deterministically (no clock).
//!
//! For N = 2, 4, … 1024 CPUs, CPU 0 calls the N − 1 others, with and without waiting
//! (`call_many_async`, `call_many`), on the single-threaded [`Solo`](super::solo::Solo)
//! platform over `HeapStorage::new(N)`:
//!
//! * **instructions per target**, sender side and target side, counted by callgrind: the
//!   `smpcall` binary re-runs itself under `valgrind --tool=callgrind` in a probe mode that
//!   marks the phases with client requests ([`super::callgrind`]). A waiting sender's busy-wait
//!   serves the targets itself; that serving is counted as target side, not sender side.
//! * **IPIs per target** (the platform counts them; every target is idle, none polls).
//! * **simulator steps until the last target ran** ([`smpcall::sim`], halting idle CPUs, no
//!   default preemption 0.25, seed 1): the simulated machine runs one CPU at a time, so this is the whole
//!   machine's work, sender and targets.
//! * **per-CPU memory**: `size_of::<PerCpu>()` plus one `Csd` slot per possible target.
//!
//! The design says the cost grows linearly: per target it must be flat. [`Scaling::check`]
//! fails if a sender's instructions per target, or the steps per target, grow by more than 2×
//! from 8 to 1024 CPUs.

use std::cell::Cell;
use std::ffi::CString;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use smpcall::sim::{Program, Sim, SimConfig, SimIdle};
use smpcall::{CpuMask, Csd, PerCpu};

use super::callgrind;
use super::solo::{self, ServeOnRelax, SoloEngine};

/// CPU counts measured by default.
pub const SIZES: [usize; 10] = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// Largest growth of per-target cost from 8 to 1024 CPUs that [`Scaling::check`] accepts.
pub const MAX_GROWTH: f64 = 2.0;

/// Per-CPU memory of an engine with `cpus` CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Memory {
    /// CPUs.
    pub cpus: usize,
    /// `size_of::<PerCpu>()`.
    pub per_cpu_state: usize,
    /// `size_of::<Csd>()`: one call-data slot.
    pub slot: usize,
    /// Bytes per CPU: its `PerCpu` and its `cpus` slots as a sender.
    pub per_cpu_total: usize,
}

impl Memory {
    /// The memory of an engine with `cpus` CPUs, from the types' sizes.
    pub fn of(cpus: usize) -> Memory {
        let per_cpu_state = std::mem::size_of::<PerCpu>();
        let slot = std::mem::size_of::<Csd>();
        Memory {
            cpus,
            per_cpu_state,
            slot,
            per_cpu_total: per_cpu_state + cpus * slot,
        }
    }
}

/// The figures of one CPU count.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScalingRow {
    /// CPUs of the machine.
    pub cpus: usize,
    /// Targets of each call (every CPU but the caller).
    pub targets: usize,
    /// `call_many_async`: the sender's instructions per target.
    pub async_sender_ir: Option<f64>,
    /// `call_many_async`: each target's instructions to take and run its call.
    pub async_target_ir: Option<f64>,
    /// `call_many` (waiting): the sender's instructions per target, its wait included but not
    /// the serving done in its wait.
    pub sync_sender_ir: Option<f64>,
    /// `call_many`: each target's instructions (run, then release).
    pub sync_target_ir: Option<f64>,
    /// IPIs sent per target by one `call_many_async` (every target idle, none polling).
    pub ipis_per_target: f64,
    /// IPI batches (`send_ipi_mask` calls) per `call_many_async`: none — it signals each
    /// target as it queues to it, because the clone of its function made for the next target
    /// is user code, which must not run between a push and its IPI.
    pub ipi_batches: u64,
    /// Simulator: steps from the start until the last target ran (`call_many` from CPU 0).
    pub sim_steps: Option<u64>,
    /// Per-CPU memory.
    pub memory: Memory,
}

impl ScalingRow {
    /// Simulator steps per target.
    pub fn sim_steps_per_target(&self) -> Option<f64> {
        self.sim_steps.map(|s| s as f64 / self.targets as f64)
    }
}

/// The scaling figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scaling {
    /// One row per CPU count.
    pub rows: Vec<ScalingRow>,
    /// Why instruction counts are missing, if they are.
    pub instructions_unavailable: Option<String>,
    /// Why simulator figures are missing for some sizes, if they are.
    pub sim_note: Option<String>,
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct ScalingConfig {
    /// CPU counts.
    pub sizes: Vec<usize>,
    /// Count instructions under callgrind (needs valgrind).
    pub instructions: bool,
    /// Largest CPU count run on the simulator (one OS thread per simulated CPU).
    pub sim_max_cpus: usize,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        ScalingConfig {
            sizes: SIZES.to_vec(),
            instructions: true,
            sim_max_cpus: 1024,
        }
    }
}

/// Segment label of the probe: `what` at `cpus` CPUs.
fn label(cpus: usize, what: &str) -> String {
    format!("n={cpus} {what}")
}

/// The probe's segment labels for one size, made before anything is measured.
struct Labels {
    setup: CString,
    async_sender: CString,
    async_target: CString,
    sync_sender: CString,
    sync_target: CString,
}

impl Labels {
    fn new(cpus: usize) -> Labels {
        let l = |what| callgrind::label(&label(cpus, what));
        Labels {
            setup: callgrind::label("setup"),
            async_sender: l("async_sender"),
            async_target: l("async_target"),
            sync_sender: l("sync_sender"),
            sync_target: l("sync_target"),
        }
    }
}

thread_local! {
    /// The labels of the size being probed, for [`sync_segments`].
    static PROBE_LABELS: Cell<*const Labels> = const { Cell::new(std::ptr::null()) };
}

/// Around the serving done in a waiting sender's relax: what ran before it was the sender's,
/// what runs in it the targets'.
fn sync_segments(start: bool) {
    let labels = PROBE_LABELS.with(Cell::get);
    // SAFETY: set by `probe` to labels that outlive the measured round, null otherwise.
    let Some(labels) = (unsafe { labels.as_ref() }) else {
        return;
    };
    callgrind::segment(if start {
        &labels.sync_sender
    } else {
        &labels.sync_target
    });
}

/// The mask of every CPU but 0.
fn others(cpus: usize) -> CpuMask {
    let mut m = CpuMask::first_n(cpus);
    m.clear(0);
    m
}

#[inline(never)]
fn async_round(e: &SoloEngine, targets: &CpuMask) -> Result<CpuMask, String> {
    e.call_many_async(std::hint::black_box(targets), |cpu| {
        std::hint::black_box(cpu);
    })
    .map_err(|err| format!("call_many_async: {err}"))
}

#[inline(never)]
fn serve_targets(e: &SoloEngine, targets: &CpuMask) -> usize {
    let mut ran = 0;
    for t in targets {
        solo::on(t);
        ran += solo::serve(e);
    }
    solo::on(0);
    ran
}

#[inline(never)]
fn sync_round(e: &SoloEngine, targets: &CpuMask) -> Result<CpuMask, String> {
    e.call_many(std::hint::black_box(targets), |cpu| {
        std::hint::black_box(cpu);
    })
    .map_err(|err| format!("call_many: {err}"))
}

/// The probe, run under callgrind by [`measure`] (`smpcall bench --scaling-probe`): for each
/// size, one warm-up and one measured round of each call, every phase ended by a labelled
/// segment.
pub fn probe(sizes: &[usize]) -> Result<(), String> {
    for &n in sizes {
        let labels = Labels::new(n);
        let e = solo::engine(n).map_err(|err| format!("engine of {n} CPUs: {err}"))?;
        let targets = others(n);
        // Warm-up (first-use effects: thread-locals, lazily resolved symbols).
        async_round(&e, &targets)?;
        serve_targets(&e, &targets);
        {
            let _serve = ServeOnRelax::new(&e, None);
            sync_round(&e, &targets)?;
        }
        callgrind::segment(&labels.setup);

        async_round(&e, &targets)?;
        callgrind::segment(&labels.async_sender);
        let ran = serve_targets(&e, &targets);
        callgrind::segment(&labels.async_target);
        if ran != n - 1 {
            return Err(format!("{n} CPUs: {ran} async calls ran, not {}", n - 1));
        }

        PROBE_LABELS.with(|c| c.set(&labels));
        let serve = ServeOnRelax::new(&e, Some(sync_segments));
        callgrind::segment(&labels.setup);
        let result = sync_round(&e, &targets);
        callgrind::segment(&labels.sync_sender);
        drop(serve);
        PROBE_LABELS.with(|c| c.set(std::ptr::null()));
        result?;
        drop(e);
        callgrind::segment(&labels.setup);
    }
    Ok(())
}

/// IPIs per target and IPI batches of one `call_many_async` over `cpus` CPUs (in-process).
fn ipi_counts(cpus: usize) -> Result<(f64, u64), String> {
    let e = solo::engine(cpus).map_err(|err| format!("engine of {cpus} CPUs: {err}"))?;
    let targets = others(cpus);
    async_round(&e, &targets)?;
    let p = e.platform();
    // Relaxed: counters of this thread.
    let ipis = p.ipis.load(Ordering::Relaxed) as f64 / (cpus - 1) as f64;
    let batches = p.ipi_batches.load(Ordering::Relaxed);
    serve_targets(&e, &targets);
    Ok((ipis, batches))
}

/// Simulator steps until the last target of a `call_many` from CPU 0 ran.
pub fn sim_steps(cpus: usize) -> Result<u64, String> {
    let last = Arc::new(AtomicU64::new(0));
    let last2 = Arc::clone(&last);
    let programs: Vec<Program> = vec![Box::new(move |e| {
        let targets = others(cpus);
        let ran = e.call_many(&targets, |_| {
            // Relaxed: read after the run.
            last2.fetch_max(smpcall::sim::now_steps(), Ordering::Relaxed);
        });
        assert_eq!(ran, Ok(targets), "call_many reached every target");
    })];
    let config = SimConfig {
        cpus,
        seed: 1,
        idle: SimIdle::Halt,
        max_steps: 50_000_000,
        ..SimConfig::default()
    };
    Sim::run(config, programs).map_err(|f| format!("simulator, {cpus} CPUs: {}", f.reason))?;
    // Relaxed: the run's threads are joined.
    Ok(last.load(Ordering::Relaxed))
}

/// Measures every size: instructions by running `exe bench --scaling-probe SIZES` under
/// callgrind (if `cfg.instructions` and valgrind is available), the rest in-process.
pub fn measure(exe: &Path, cfg: &ScalingConfig) -> Result<Scaling, String> {
    let mut unavailable = None;
    let counts = if cfg.instructions {
        match callgrind::available() {
            Ok(()) => {
                let list: Vec<String> = cfg.sizes.iter().map(|n| n.to_string()).collect();
                let dir = std::env::temp_dir().join(format!(
                    "smpcall-scaling-{}-{}",
                    std::process::id(),
                    unique()
                ));
                let args = [
                    "bench".to_string(),
                    "--scaling-probe".to_string(),
                    list.join(","),
                ];
                let r = callgrind::run(exe, &args, &dir);
                let _ = std::fs::remove_dir_all(&dir);
                Some(r?)
            }
            Err(why) => {
                unavailable = Some(why);
                None
            }
        }
    } else {
        unavailable = Some("not requested".into());
        None
    };
    let mut rows = Vec::new();
    let mut sim_note = None;
    for &n in &cfg.sizes {
        if n < 2 {
            return Err(format!("{n} CPUs: a many-call needs at least 2"));
        }
        let targets = n - 1;
        let per_target = |what: &str| {
            counts
                .as_ref()
                .and_then(|c| c.get(&label(n, what)))
                .map(|p| p.total as f64 / targets as f64)
        };
        let (ipis_per_target, ipi_batches) = ipi_counts(n)?;
        let sim = if n <= cfg.sim_max_cpus {
            Some(sim_steps(n)?)
        } else {
            sim_note = Some(format!(
                "simulator runs only up to {} CPUs (one OS thread per simulated CPU)",
                cfg.sim_max_cpus
            ));
            None
        };
        rows.push(ScalingRow {
            cpus: n,
            targets,
            async_sender_ir: per_target("async_sender"),
            async_target_ir: per_target("async_target"),
            sync_sender_ir: per_target("sync_sender"),
            sync_target_ir: per_target("sync_target"),
            ipis_per_target,
            ipi_batches,
            sim_steps: sim,
            memory: Memory::of(n),
        });
    }
    Ok(Scaling {
        rows,
        instructions_unavailable: unavailable,
        sim_note,
    })
}

fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Relaxed: a counter.
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One flatness check: a figure per target at 8 CPUs and at 1024.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Flatness {
    /// The figure, in words.
    pub what: String,
    /// Per target at the smaller size.
    pub small: f64,
    /// Per target at the larger size.
    pub large: f64,
    /// `large / small`.
    pub growth: f64,
    /// Whether `growth ≤ MAX_GROWTH`.
    pub met: bool,
}

impl Scaling {
    /// The row for `cpus` CPUs.
    pub fn row(&self, cpus: usize) -> Option<&ScalingRow> {
        self.rows.iter().find(|r| r.cpus == cpus)
    }

    /// Per-target figures at 8 and at 1024 CPUs (or the smallest size ≥ 8 and the largest,
    /// when those were not measured): sender instructions of both calls and simulator steps.
    pub fn flatness(&self) -> Vec<Flatness> {
        let small = self.rows.iter().find(|r| r.cpus >= 8);
        let large = self.rows.iter().rev().find(|r| r.cpus >= 8);
        let (Some(small), Some(large)) = (small, large) else {
            return Vec::new();
        };
        if small.cpus == large.cpus {
            return Vec::new();
        }
        type Figure = fn(&ScalingRow) -> Option<f64>;
        let figures: [(&str, Figure); 3] = [
            ("call_many_async sender instructions per target", |r| {
                r.async_sender_ir
            }),
            ("call_many sender instructions per target", |r| {
                r.sync_sender_ir
            }),
            ("simulator steps per target", |r| r.sim_steps_per_target()),
        ];
        figures
            .iter()
            .filter_map(|(what, f)| {
                let (a, b) = (f(small)?, f(large)?);
                let growth = b / a;
                Some(Flatness {
                    what: format!(
                        "{what}: at most {MAX_GROWTH}× from {} to {} CPUs",
                        small.cpus, large.cpus
                    ),
                    small: a,
                    large: b,
                    growth,
                    met: growth <= MAX_GROWTH,
                })
            })
            .collect()
    }

    /// Whether every flatness check is met.
    pub fn check(&self) -> bool {
        self.flatness().iter().all(|f| f.met)
    }

    /// Every figure as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            scaling: &'a Scaling,
            flatness: Vec<Flatness>,
        }
        serde_json::to_string_pretty(&Out {
            scaling: self,
            flatness: self.flatness(),
        })
        .expect("scaling figures serialise")
    }
}

impl fmt::Display for Scaling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ir = |x: Option<f64>| x.map_or_else(|| "—".to_string(), |v| format!("{v:.1}"));
        writeln!(
            f,
            "scaling: CPU 0 calls every other CPU (N − 1 targets); instructions counted by callgrind on a single-threaded platform, per target"
        )?;
        writeln!(
            f,
            "  {:>5}  {:>13}  {:>13}  {:>13}  {:>13}  {:>9}  {:>10}  {:>12}  {:>14}",
            "CPUs",
            "async sender",
            "async target",
            "sync sender",
            "sync target",
            "IPIs/tgt",
            "sim steps",
            "steps/target",
            "bytes per CPU"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "  {:>5}  {:>13}  {:>13}  {:>13}  {:>13}  {:>9.2}  {:>10}  {:>12}  {:>14}",
                r.cpus,
                ir(r.async_sender_ir),
                ir(r.async_target_ir),
                ir(r.sync_sender_ir),
                ir(r.sync_target_ir),
                r.ipis_per_target,
                r.sim_steps.map_or("—".to_string(), |s| s.to_string()),
                ir(r.sim_steps_per_target()),
                r.memory.per_cpu_total,
            )?;
        }
        if let Some(r) = self.rows.first() {
            writeln!(
                f,
                "  bytes per CPU = size_of::<PerCpu>() ({}) + N × size_of::<Csd>() ({}): its state and one call-data slot per target",
                r.memory.per_cpu_state, r.memory.slot
            )?;
        }
        if let Some(why) = &self.instructions_unavailable {
            writeln!(f, "  instructions not counted: {why}")?;
        }
        if let Some(note) = &self.sim_note {
            writeln!(f, "  {note}")?;
        }
        for c in self.flatness() {
            writeln!(
                f,
                "{} {} ({:.1} → {:.1}, {:.2}×)",
                if c.met { "PASS" } else { "MISS" },
                c.what,
                c.small,
                c.large,
                c.growth
            )?;
        }
        Ok(())
    }
}
