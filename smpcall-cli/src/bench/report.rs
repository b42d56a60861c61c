//! The report: every row's figures, its ratios to the floor and to the best peer of its
//! category, the performance targets (each stated in words in [`TargetCheck::target`]), the
//! table, and the JSON.

use std::fmt;

use serde::Serialize;

use super::clock::Clock;
use super::ours::Delivery;
use super::sample::{Latency, Throughput};
use super::threads::Topology;
use super::Config;

/// Which rows are compared with each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// One round trip to one other CPU.
    Single,
    /// A call with wait to every CPU of a 2-CPU machine.
    Broadcast,
    /// The same with 4 CPUs (oversubscribed when the host has fewer cores).
    Broadcast4,
    /// stop_machine: one CPU runs a function while all others spin masked (no peer).
    StopMachine,
    /// No-wait calls to one target, messages per second.
    Throughput,
    /// RCU read-side lock + unlock on one thread, nanoseconds per pair (lower is better).
    RcuRead,
    /// RCU grace-period latency with reader threads busy in read-side sections.
    RcuGpBusy,
    /// RCU grace-period latency with reader threads blocked in a system call.
    RcuGpBlocked,
}

impl Category {
    /// Every category, in table order.
    pub const ALL: [Category; 8] = [
        Category::Single,
        Category::Broadcast,
        Category::Broadcast4,
        Category::StopMachine,
        Category::Throughput,
        Category::RcuRead,
        Category::RcuGpBusy,
        Category::RcuGpBlocked,
    ];

    /// Whether its rows are latency distributions (a histogram of round trips), measured
    /// right after a floor; the others are rates of rounds.
    pub fn is_latency(self) -> bool {
        !matches!(self, Category::Throughput | Category::RcuRead)
    }

    /// The heading of the category's part of the table.
    pub fn title(self, cores: usize) -> String {
        match self {
            Category::Single => "single round trip, caller core 0 → target core 1".into(),
            Category::Broadcast => "broadcast with wait, 2 CPUs".into(),
            Category::Broadcast4 if cores >= 4 => "broadcast with wait, 4 CPUs".into(),
            Category::Broadcast4 => {
                format!("broadcast with wait, 4 vCPUs on {cores} cores (oversubscribed, unpinned)")
            }
            Category::StopMachine => {
                "stop_machine round trip, caller CPU 0, function on CPU 1 (no peer)".into()
            }
            Category::Throughput => "async throughput to one target".into(),
            Category::RcuRead => {
                "user-space RCU: read-side lock + unlock, one thread (liburcu through its exported functions, a call each: slightly disfavoured)".into()
            }
            Category::RcuGpBusy => {
                let n = super::rcu::busy_readers(cores);
                format!(
                    "user-space RCU, {n} reader thread{} busy in read-side sections: grace-period latency",
                    if n == 1 { "" } else { "s" }
                )
            }
            Category::RcuGpBlocked => format!(
                "user-space RCU, {} reader threads blocked in read(2): grace-period latency",
                super::rcu::BLOCKED_READERS
            ),
        }
    }
}

/// Whose row it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The physical floor (reference).
    Floor,
    /// smpcall.
    Ours,
    /// Something a user would otherwise pick.
    Peer,
}

/// A performance target and whether this run met it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TargetCheck {
    /// The target, in words that need no other document.
    pub target: String,
    /// The measured ratio (median latency ratio, or throughput ratio).
    pub ratio: f64,
    /// The bound on the ratio.
    pub limit: f64,
    /// Whether the ratio is within the bound.
    pub met: bool,
}

/// One measured row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// Stable id (see [`ROW_IDS`](super::ROW_IDS)).
    pub id: String,
    /// Name shown in the table.
    pub name: String,
    /// Category.
    pub category: Category,
    /// Ours, a peer, or the floor.
    pub side: Side,
    /// Round-trip latency (latency rows).
    pub latency: Option<Latency>,
    /// Messages per second (throughput rows).
    pub throughput: Option<Throughput>,
    /// IPIs, signals and futex wakes per call (our rows).
    pub delivery: Option<Delivery>,
    /// The row's median in each pass (ns, or messages/s), with the floor measured right before
    /// it.
    pub passes: Vec<PassFigure>,
    /// Median over passes of (the pass's median ÷ the floor measured right before it).
    pub ratio_floor: Option<f64>,
    /// Median over passes of (the pass's median ÷ the best peer's median in the same pass)
    /// for latency rows, or of (rate ÷ the best peer's rate) for throughput rows (above 1 is
    /// better), or of (ns per pair ÷ the best peer's) for RCU read-side rows.
    pub ratio_best_peer: Option<f64>,
    /// Id of the best peer of the category.
    pub best_peer: Option<String>,
    /// The performance targets this row has.
    pub targets: Vec<TargetCheck>,
}

impl Row {
    /// A row with no figures yet.
    pub fn new(id: &str, name: String, category: Category, side: Side) -> Row {
        Row {
            id: id.to_string(),
            name,
            category,
            side,
            latency: None,
            throughput: None,
            delivery: None,
            passes: Vec::new(),
            ratio_floor: None,
            ratio_best_peer: None,
            best_peer: None,
            targets: Vec::new(),
        }
    }

    /// The figure rows are ranked by: median latency (ns), median rate (messages/s), or
    /// (RCU read side) nanoseconds per lock + unlock pair at the median rate.
    pub fn key(&self) -> Option<f64> {
        if self.category == Category::RcuRead {
            return self.throughput.as_ref().map(|t| t.ns_per_message);
        }
        self.latency
            .as_ref()
            .map(|l| l.median_ns)
            .or(self.throughput.as_ref().map(|t| t.median_per_s))
    }
}

/// One pass's figure of a row.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PassFigure {
    /// Pass number, from 0.
    pub pass: u64,
    /// Median latency (ns) or median rate (messages/s) in that pass; for RCU read-side rows,
    /// nanoseconds per lock + unlock pair at the pass's median rate.
    pub value: f64,
    /// Median of the floor measured right before it (latency rows), ns.
    pub floor_ns: Option<f64>,
}

/// Median of a non-empty list (NaN when empty).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median over the passes both rows ran in of `a`'s figure ÷ `b`'s.
fn pass_ratio(a: &Row, b: &Row) -> Option<f64> {
    let ratios: Vec<f64> = a
        .passes
        .iter()
        .filter_map(|pa| {
            b.passes
                .iter()
                .find(|pb| pb.pass == pa.pass)
                .map(|pb| pa.value / pb.value)
        })
        .collect();
    (!ratios.is_empty()).then(|| median(ratios))
}

/// A row that was not measured, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Skipped {
    /// Stable id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Category it would belong to.
    pub category: Category,
    /// Why it was not measured.
    pub reason: String,
}

/// A performance target that could not be evaluated in this run (the row it compares with
/// was not measured), and why. It counts neither as met nor as missed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NotEvaluated {
    /// The row that has the target.
    pub id: String,
    /// The target, in words.
    pub target: String,
    /// Why it was not evaluated.
    pub reason: String,
}

/// How the run was set up.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// Timed round trips per latency row (at most).
    pub iterations: u64,
    /// Warm-up round trips per latency row (at most).
    pub warmup: u64,
    /// Time cap per row, seconds.
    pub row_time_s: f64,
    /// Messages per throughput round.
    pub messages_per_round: u64,
    /// Throughput rounds per row (at most).
    pub rounds: u64,
    /// Pause before each call to a sleeping CPU, microseconds.
    pub sleep_pause_us: f64,
    /// The clock.
    pub clock: String,
    /// Nanoseconds per clock tick.
    pub ns_per_tick: f64,
    /// Usable cores.
    pub cores: usize,
    /// Whether two-thread rows were pinned to cores 0 and 1.
    pub pinned: bool,
    /// Interleaved passes.
    pub passes: u64,
}

/// How much the floor moved over the run, and what else ran.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Noise {
    /// Median of the first floor measured (the start of the run), ns.
    pub floor_start_ns: f64,
    /// Median of the last floor measured (the end of the run), ns.
    pub floor_end_ns: f64,
    /// (end − start) ÷ start, percent.
    pub drift_percent: f64,
    /// Lowest median of the floors measured before each row, ns.
    pub floor_min_ns: f64,
    /// Highest such median, ns.
    pub floor_max_ns: f64,
    /// 1-minute load average at the start and at the end (other work on the cores).
    pub load_average: [Option<f64>; 2],
}

/// Everything a run measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// How the run was set up.
    pub settings: Settings,
    /// Median of every floor measured in the run, ns (each row's `ratio_floor` divides by
    /// the floor measured right before it instead).
    pub floor_ns: f64,
    /// Floor drift over the run.
    pub noise: Noise,
    /// Measured rows, in run order.
    pub rows: Vec<Row>,
    /// Rows not measured, with the reason.
    pub skipped: Vec<Skipped>,
    /// Targets not evaluated (a row they compare with was not measured), with the reason.
    pub not_evaluated: Vec<NotEvaluated>,
}

/// How a target compares a row.
enum Against {
    /// Median ÷ floor ≤ limit.
    Floor,
    /// Median ÷ that row's median ≤ limit (or < when `strict`); for RCU read-side rows, ns
    /// per pair ÷ that row's.
    Latency(&'static str),
    /// Rate ÷ that row's rate ≥ limit.
    Rate(&'static str),
}

/// The performance targets: (row, against, limit, strict, words). The words are printed
/// next to the row and must say the whole target.
const TARGETS: &[(&str, Against, f64, bool, &str)] = &[
    (
        "sync_polling",
        Against::Floor,
        2.0,
        false,
        "median ≤ 2× the floor (a raw cache-line ping-pong between the same cores)",
    ),
    (
        "sync_polling",
        Against::Latency("crossbeam_spinning"),
        1.0,
        true,
        "median below crossbeam request/response with a busy-polling worker",
    ),
    (
        "sync_polling",
        Against::Latency("sync_polling_nodiag"),
        1.05,
        false,
        "median ≤ 1.05× the same call with per-call diagnostics off",
    ),
    (
        "sync_busy",
        Against::Latency("tgkill"),
        1.1,
        false,
        "median ≤ 1.1× a bare tgkill → signal handler → ack round trip",
    ),
    (
        "call_all",
        Against::Latency("rayon_outside"),
        1.0,
        true,
        "median below rayon's broadcast into its pool from outside it",
    ),
    (
        "call_all_4",
        Against::Latency("rayon_outside_4"),
        1.0,
        true,
        "median below rayon's broadcast into its pool from outside it",
    ),
    (
        "async_csd_polling",
        Against::Rate("crossbeam_unbounded_spinning"),
        1.5,
        false,
        "rate ≥ 1.5× a crossbeam unbounded channel with a busy-polling receiver",
    ),
    (
        "async_slot_polling",
        Against::Rate("crossbeam_unbounded_spinning"),
        1.0,
        false,
        "rate ≥ a crossbeam unbounded channel with a busy-polling receiver",
    ),
    (
        "rcu_gp_blocked_smpcall",
        Against::Latency("rcu_gp_blocked_urcu_memb"),
        1.0,
        false,
        "grace period with reader threads blocked in a system call: median ≤ liburcu-memb's synchronize_rcu in the same setting",
    ),
    (
        "rcu_read_smpcall",
        Against::Latency("rcu_read_urcu_qsbr"),
        1.5,
        false,
        "read-side lock + unlock cost ≤ 1.5× liburcu-qsbr's (called through its exported functions)",
    ),
];

impl Report {
    /// Computes ratios and targets over measured rows.
    pub fn build(
        cfg: &Config,
        clock: &Clock,
        topo: &Topology,
        load_average: [Option<f64>; 2],
        mut rows: Vec<Row>,
        skipped: Vec<Skipped>,
    ) -> Report {
        let floors: Vec<f64> = rows
            .iter()
            .find(|r| r.id == "floor")
            .map(|r| r.passes.iter().map(|p| p.value).collect())
            .unwrap_or_default();
        let floor_ns = rows
            .iter()
            .find(|r| r.id == "floor")
            .and_then(|r| r.latency.as_ref())
            .map_or(f64::NAN, |l| l.median_ns);
        for r in rows.iter_mut() {
            let ratios: Vec<f64> = r
                .passes
                .iter()
                .filter_map(|p| p.floor_ns.map(|f| p.value / f))
                .collect();
            if r.latency.is_some() && !ratios.is_empty() {
                r.ratio_floor = Some(median(ratios));
            }
        }
        let snapshot = rows.clone();
        let by_id = |id: &str| snapshot.iter().find(|r| r.id == id);
        for cat in Category::ALL {
            let best = snapshot
                .iter()
                .filter(|r| r.category == cat && r.side == Side::Peer)
                .filter_map(|r| r.key().map(|k| (r, k)))
                .reduce(|a, b| {
                    let better = if cat == Category::Throughput {
                        b.1 > a.1
                    } else {
                        b.1 < a.1
                    };
                    if better {
                        b
                    } else {
                        a
                    }
                });
            let Some((best, _)) = best else { continue };
            for r in rows
                .iter_mut()
                .filter(|r| r.category == cat && r.side != Side::Floor)
            {
                r.ratio_best_peer = pass_ratio(r, best);
                r.best_peer = Some(best.id.clone());
            }
        }
        let mut not_evaluated = Vec::new();
        for (id, against, limit, strict, words) in TARGETS {
            let Some(r) = rows.iter_mut().find(|r| r.id == *id) else {
                continue;
            };
            if let Against::Latency(other) | Against::Rate(other) = against {
                if let Some(k) = skipped.iter().find(|k| k.id == *other) {
                    not_evaluated.push(NotEvaluated {
                        id: id.to_string(),
                        target: words.to_string(),
                        reason: k.reason.clone(),
                    });
                    continue;
                }
            }
            let ratio = match against {
                Against::Floor => r.ratio_floor,
                Against::Latency(other) | Against::Rate(other) => {
                    by_id(other).and_then(|o| pass_ratio(r, o))
                }
            };
            let Some(ratio) = ratio else { continue };
            let met = match (against, strict) {
                (Against::Rate(_), _) => ratio >= *limit,
                (_, true) => ratio < *limit,
                (_, false) => ratio <= *limit,
            };
            r.targets.push(TargetCheck {
                target: words.to_string(),
                ratio,
                limit: *limit,
                met,
            });
        }
        let start = floors.first().copied().unwrap_or(f64::NAN);
        let end = floors.last().copied().unwrap_or(f64::NAN);
        Report {
            settings: Settings {
                iterations: cfg.iterations,
                warmup: cfg.warmup,
                row_time_s: cfg.row_time.as_secs_f64(),
                messages_per_round: cfg.messages,
                rounds: cfg.rounds,
                sleep_pause_us: cfg.sleep_pause.as_secs_f64() * 1e6,
                clock: clock.describe(),
                ns_per_tick: clock.ns_per_tick(),
                cores: topo.cores(),
                pinned: topo.can_pin(2),
                passes: cfg.passes.max(1),
            },
            floor_ns,
            noise: Noise {
                floor_start_ns: start,
                floor_end_ns: end,
                drift_percent: (end - start) / start * 100.0,
                floor_min_ns: floors.iter().copied().fold(f64::INFINITY, f64::min),
                floor_max_ns: floors.iter().copied().fold(0.0, f64::max),
                load_average,
            },
            rows,
            skipped,
            not_evaluated,
        }
    }

    /// The row with this id, if it was measured.
    pub fn row(&self, id: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.id == id)
    }

    /// Every target check: (row id, check).
    pub fn targets(&self) -> impl Iterator<Item = (&str, &TargetCheck)> {
        self.rows
            .iter()
            .flat_map(|r| r.targets.iter().map(move |t| (r.id.as_str(), t)))
    }

    /// The report as pretty-printed JSON (every figure).
    pub fn to_json(&self) -> String {
        /// The report with the format's version first.
        #[derive(Serialize)]
        struct Versioned<'a> {
            schema_version: u32,
            #[serde(flatten)]
            report: &'a Report,
        }
        let versioned = Versioned {
            schema_version: crate::JSON_SCHEMA_VERSION,
            report: self,
        };
        serde_json::to_string_pretty(&versioned).expect("a report always serialises")
    }
}

fn us(ns: f64) -> String {
    format!("{:.2}", ns / 1000.0)
}

fn ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "—".to_string(), |r| format!("{r:.2}×"))
}

fn delivery(d: Option<&Delivery>) -> String {
    let Some(d) = d else {
        return String::new();
    };
    // Below this a mechanism is noise (start-up, a rare race with the idle loop).
    let seen = |x: f64| x >= 0.005;
    let mut how = Vec::new();
    if seen(d.signals_per_call) {
        how.push(format!("{:.2} sig", d.signals_per_call));
    }
    if seen(d.futex_wakes_per_call) {
        how.push(format!("{:.2} futex", d.futex_wakes_per_call));
    }
    if seen(d.elided_per_call) {
        how.push(format!("{:.2} elided", d.elided_per_call));
    }
    if how.is_empty() {
        format!("{:.2}", d.ipis_per_call)
    } else {
        format!("{:.2} ({})", d.ipis_per_call, how.join(", "))
    }
}

fn targets(r: &Row, not_evaluated: &[NotEvaluated]) -> String {
    r.targets
        .iter()
        .map(|t| {
            format!(
                "{} {} ({:.2}×)",
                if t.met { "PASS" } else { "MISS" },
                t.target,
                t.ratio
            )
        })
        .chain(
            not_evaluated
                .iter()
                .filter(|n| n.id == r.id)
                .map(|n| format!("not evaluated: {} ({})", n.target, n.reason)),
        )
        .collect::<Vec<_>>()
        .join("; ")
}

/// Renders `cells` (first column left-aligned, others right-aligned) with `widths`.
fn line(cells: &[String], widths: &[usize]) -> String {
    let mut s = String::new();
    for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
        let pad = w.saturating_sub(c.chars().count());
        if i == 0 {
            s.push_str("  ");
            s.push_str(c);
            s.push_str(&" ".repeat(pad));
        } else if i == cells.len() - 1 {
            s.push_str("  ");
            s.push_str(c);
        } else {
            s.push_str("  ");
            s.push_str(&" ".repeat(pad));
            s.push_str(c);
        }
    }
    s.trim_end().to_string()
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        writeln!(
            f,
            "smpcall bench: clock {}; {} cores, caller/target {}; {} interleaved passes; ≤ {} round trips per row (≤ {} s) after ≤ {} warm-up per pass",
            s.clock,
            s.cores,
            if s.pinned { "pinned to cores 0/1" } else { "not pinned" },
            s.passes,
            s.iterations,
            s.row_time_s,
            s.warmup,
        )?;
        writeln!(
            f,
            "×floor: median over passes of (row median ÷ floor measured right before it); ×best peer: median over passes of (row ÷ fastest peer of the category in the same pass)"
        )?;
        let name_w = self
            .rows
            .iter()
            .map(|r| r.name.chars().count())
            .chain(self.skipped.iter().map(|r| r.name.chars().count()))
            .max()
            .unwrap_or(10)
            .max(20);
        for cat in Category::ALL {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.category == cat).collect();
            let skipped: Vec<&Skipped> =
                self.skipped.iter().filter(|r| r.category == cat).collect();
            if rows.is_empty() && skipped.is_empty() {
                continue;
            }
            writeln!(f)?;
            let best = rows
                .iter()
                .find_map(|r| r.best_peer.as_deref())
                .and_then(|id| self.row(id))
                .map_or(String::new(), |r| format!(" — best peer: {}", r.name));
            writeln!(f, "{}{best}", cat.title(s.cores))?;
            let nv = &self.not_evaluated;
            // Per kind of row: column widths, heading, one line of cells per row, a note.
            let (widths, head, cells, note): (Vec<usize>, Vec<&str>, Vec<Vec<String>>, _) =
                match cat {
                    Category::Throughput => (
                        vec![name_w, 9, 9, 8, 10, 20, 0],
                        vec!["row", "Mmsg/s", "slowest", "ns/msg", "×best peer", "IPIs/call", "target"],
                        rows.iter()
                            .filter_map(|r| r.throughput.as_ref().map(|t| (r, t)))
                            .map(|(r, t)| {
                                vec![
                                    r.name.clone(),
                                    format!("{:.2}", t.median_per_s / 1e6),
                                    format!("{:.2}", t.min_per_s / 1e6),
                                    format!("{:.1}", t.ns_per_message),
                                    ratio(r.ratio_best_peer),
                                    delivery(r.delivery.as_ref()),
                                    targets(r, nv),
                                ]
                            })
                            .collect(),
                        Some("(Mmsg/s: median round; slowest: slowest round; ×best peer: rate ÷ best peer's rate, above 1 is faster)".to_string()),
                    ),
                    Category::RcuRead => (
                        vec![name_w, 8, 8, 10, 0],
                        vec!["row (ns per pair)", "median", "slowest", "×best peer", "target"],
                        rows.iter()
                            .filter_map(|r| r.throughput.as_ref().map(|t| (r, t)))
                            .map(|(r, t)| {
                                vec![
                                    r.name.clone(),
                                    format!("{:.2}", t.ns_per_message),
                                    format!("{:.2}", 1e9 / t.min_per_s.max(f64::MIN_POSITIVE)),
                                    ratio(r.ratio_best_peer),
                                    targets(r, nv),
                                ]
                            })
                            .collect(),
                        Some(format!("(median: round of {} pairs at the median rate; slowest: slowest round; ×best peer: ns per pair ÷ the cheapest peer's, below 1 is cheaper)", s.messages_per_round)),
                    ),
                    _ => (
                        vec![name_w, 8, 8, 8, 7, 10, 20, 0],
                        vec!["row (µs)", "median", "p90", "p99", "×floor", "×best peer", "IPIs/call", "target"],
                        rows.iter()
                            .filter_map(|r| r.latency.as_ref().map(|l| (r, l)))
                            .map(|(r, l)| {
                                vec![
                                    r.name.clone(),
                                    us(l.median_ns),
                                    us(l.p90_ns),
                                    us(l.p99_ns),
                                    ratio(r.ratio_floor),
                                    if r.side == Side::Floor {
                                        "—".to_string()
                                    } else {
                                        ratio(r.ratio_best_peer)
                                    },
                                    delivery(r.delivery.as_ref()),
                                    targets(r, nv),
                                ]
                            })
                            .collect(),
                        matches!(cat, Category::RcuGpBusy | Category::RcuGpBlocked).then(|| {
                            "(one round trip = one grace period; IPIs/call: per grace period; ×floor means little here)".to_string()
                        }),
                    ),
                };
            let head: Vec<String> = head.into_iter().map(String::from).collect();
            writeln!(f, "{}", line(&head, &widths))?;
            for c in &cells {
                writeln!(f, "{}", line(c, &widths))?;
            }
            if let Some(note) = note {
                writeln!(f, "  {note}")?;
            }
            for k in skipped {
                writeln!(f, "  {:name_w$}  not measured: {}", k.name, k.reason)?;
            }
        }
        writeln!(f)?;
        let n = &self.noise;
        let load = |l: Option<f64>| l.map_or("?".to_string(), |l| format!("{l:.1}"));
        writeln!(
            f,
            "noise: the floor's median moved {:+.0}% from the start ({} µs) to the end ({} µs) of the run, and ranged {}–{} µs before rows; load average {} → {} on {} cores",
            n.drift_percent,
            us(n.floor_start_ns),
            us(n.floor_end_ns),
            us(n.floor_min_ns),
            us(n.floor_max_ns),
            load(n.load_average[0]),
            load(n.load_average[1]),
            s.cores,
        )?;
        if let Some(l) = n.load_average.iter().flatten().copied().reduce(f64::max) {
            if l > s.cores as f64 {
                writeln!(
                    f,
                    "warning: other work competed for the cores (load average {l:.1} > {} cores): pinned threads were preempted, figures are unreliable",
                    s.cores
                )?;
            }
        }
        let all: Vec<_> = self.targets().collect();
        let met = all.iter().filter(|(_, t)| t.met).count();
        write!(f, "performance targets: {met} of {} met", all.len())?;
        let missed: Vec<String> = all
            .iter()
            .filter(|(_, t)| !t.met)
            .map(|(id, t)| format!("{id}: {}", t.target))
            .collect();
        if !missed.is_empty() {
            write!(f, "; missed: {}", missed.join(", "))?;
        }
        if !self.not_evaluated.is_empty() {
            let not: Vec<String> = self
                .not_evaluated
                .iter()
                .map(|n| format!("{}: {} ({})", n.id, n.target, n.reason))
                .collect();
            write!(f, "; not evaluated: {}", not.join(", "))?;
        }
        writeln!(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::urcu::NOT_INSTALLED;

    fn gp_row(id: &str, side: Side, median: f64) -> Row {
        let mut r = Row::new(id, id.to_string(), Category::RcuGpBlocked, side);
        r.passes.push(PassFigure {
            pass: 0,
            value: median,
            floor_ns: Some(100.0),
        });
        r
    }

    /// A target whose peer row was not measured is listed as not evaluated, with the reason,
    /// and counts neither as met nor as missed.
    #[test]
    fn target_against_a_skipped_row_is_not_evaluated() {
        let cfg = Config::quick();
        let clock = Clock::calibrate(std::time::Duration::from_millis(1));
        let topo = Topology::detect();
        let rows = vec![gp_row("rcu_gp_blocked_smpcall", Side::Ours, 500.0)];
        let skipped = vec![Skipped {
            id: "rcu_gp_blocked_urcu_memb".into(),
            name: "liburcu-memb synchronize_rcu".into(),
            category: Category::RcuGpBlocked,
            reason: NOT_INSTALLED.into(),
        }];
        let r = Report::build(&cfg, &clock, &topo, [None, None], rows, skipped);
        assert_eq!(r.targets().count(), 0);
        assert_eq!(r.not_evaluated.len(), 1);
        assert_eq!(r.not_evaluated[0].id, "rcu_gp_blocked_smpcall");
        assert_eq!(r.not_evaluated[0].reason, NOT_INSTALLED);
        let table = r.to_string();
        assert!(table.contains(NOT_INSTALLED), "{table}");
        assert!(table.contains("not evaluated:"), "{table}");
        assert!(table.contains("performance targets: 0 of 0 met"), "{table}");
        assert!(r.to_json().contains("\"not_evaluated\""));
    }

    /// Measured, the same target compares medians within the pass.
    #[test]
    fn target_against_a_measured_row_is_evaluated() {
        let cfg = Config::quick();
        let clock = Clock::calibrate(std::time::Duration::from_millis(1));
        let topo = Topology::detect();
        let rows = vec![
            gp_row("rcu_gp_blocked_smpcall", Side::Ours, 500.0),
            gp_row("rcu_gp_blocked_urcu_memb", Side::Peer, 1000.0),
        ];
        let r = Report::build(&cfg, &clock, &topo, [None, None], rows, Vec::new());
        let (id, t) = r.targets().next().expect("one target");
        assert_eq!(id, "rcu_gp_blocked_smpcall");
        assert!(t.met && (t.ratio - 0.5).abs() < 1e-9, "{t:?}");
        assert!(r.not_evaluated.is_empty());
    }
}
