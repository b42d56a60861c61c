//! `smpcall bench --cost`: what one `call_single` (waiting; with per-call diagnostics on and
//! off) and one `call_single_async` to a polling CPU cost, in instructions, on each side, by
//! function — counted by callgrind, not timed.
//!
//! The `smpcall` binary re-runs itself under `valgrind --tool=callgrind` in a probe mode: on
//! the single-threaded [`Solo`](super::solo::Solo) platform, CPU 1 idle-polls its queue (so
//! the sender elides the IPI, as with a polling CPU on real hardware) while CPU 0 makes
//! [`CALLS`] waiting `call_single`s to it. The sender's one busy-wait iteration serves CPU 1's
//! queue — that serving is the target's side; everything else is the sender's. Each
//! instruction is attributed to the source line it comes from (the innermost inlined function),
//! then to the function around that line, so code the compiler inlined is still counted under
//! the function where it is written.
//!
//! The platform's own costs (thread-local CPU and mask, the counting `relax`) are the bench
//! platform's, not the engine's: they are listed separately and a real platform's differ
//! (`cli`/`sti` or a per-CPU variable; `pause`).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::path::Path;

use serde::Serialize;

use super::callgrind::{self, Profile};
use super::solo::{self, ServeOnRelax};

/// Measured calls per path.
pub const CALLS: usize = 200;

/// One accounted path.
pub struct CallPath {
    /// Segment name prefix (callgrind labels `<label> sender` / `<label> target`).
    pub label: &'static str,
    /// What is measured, in words.
    pub what: &'static str,
    /// Per-call diagnostics on.
    pub diagnostics: bool,
    /// A no-wait call (`call_single_async`) rather than a waiting one.
    pub no_wait: bool,
}

/// The paths accounted, in order.
pub const PATHS: [CallPath; 3] = [
    CallPath {
        label: "sync_single",
        what: "a waiting call_single to a polling CPU",
        diagnostics: true,
        no_wait: false,
    },
    CallPath {
        label: "sync_single_nodiag",
        what: "the same with per-call diagnostics off (set_call_diagnostics(false))",
        diagnostics: false,
        no_wait: false,
    },
    CallPath {
        label: "async_single",
        what: "a call_single_async to a polling CPU",
        diagnostics: true,
        no_wait: true,
    },
];

/// The [`PATHS`] the diagnostics target compares: the same waiting call with them on, and off.
const DIAGNOSTICS_ON: usize = 0;
const DIAGNOSTICS_OFF: usize = 1;

/// The per-call diagnostics target: instructions per call (both sides) with diagnostics on,
/// at most this many times those with them off. Counted, so the method has no noise.
pub const DIAGNOSTICS_LIMIT: f64 = 1.05;

struct Labels {
    setup: CString,
    sender: CString,
    target: CString,
}

impl Labels {
    fn new(path: &str) -> Self {
        Labels {
            setup: callgrind::label("setup"),
            sender: callgrind::label(&format!("{path} sender")),
            target: callgrind::label(&format!("{path} target")),
        }
    }
}

thread_local! {
    static LABELS: std::cell::Cell<*const Labels> = const { std::cell::Cell::new(std::ptr::null()) };
}

fn around_serve(start: bool) {
    let l = LABELS.with(std::cell::Cell::get);
    // SAFETY: set by `probe` to labels that outlive the measured calls, null otherwise.
    let Some(l) = (unsafe { l.as_ref() }) else {
        return;
    };
    callgrind::segment(if start { &l.sender } else { &l.target });
}

#[inline(never)]
fn one_call(e: &solo::SoloEngine) -> Result<usize, String> {
    e.call_single(1, std::hint::black_box)
        .map_err(|err| format!("call_single: {err}"))
}

#[inline(never)]
fn one_async_call(e: &solo::SoloEngine) -> Result<(), String> {
    e.call_single_async(1, |cpu| {
        std::hint::black_box(cpu);
    })
    .map_err(|err| format!("call_single_async: {err}"))
}

/// The probe (`smpcall bench --cost-probe`): for each of [`PATHS`], a warm-up, then [`CALLS`]
/// measured calls.
pub fn probe() -> Result<(), String> {
    let e = solo::engine(2).map_err(|err| format!("engine: {err}"))?;
    for path in &PATHS {
        e.set_call_diagnostics(path.diagnostics);
        let labels = Labels::new(path.label);
        if path.no_wait {
            probe_async(&e, &labels)?;
        } else {
            probe_sync(&e, &labels)?;
        }
    }
    e.set_call_diagnostics(true);
    // Relaxed: counters of this thread.
    let ipis = e.platform().ipis.load(std::sync::atomic::Ordering::Relaxed);
    if ipis != 0 {
        return Err(format!(
            "{ipis} IPIs were sent to a polling CPU (expected none)"
        ));
    }
    Ok(())
}

/// Waiting calls: the sender's one busy-wait iteration serves CPU 1 (the target's side).
fn probe_sync(e: &solo::SoloEngine, labels: &Labels) -> Result<(), String> {
    {
        let _serve = ServeOnRelax::new(e, None);
        solo::poll_while(e, 1, 0, || -> Result<(), String> {
            for _ in 0..16 {
                one_call(e)?;
            }
            Ok(())
        })?;
    }
    LABELS.with(|c| c.set(labels));
    let serve = ServeOnRelax::new(e, Some(around_serve));
    let result = solo::poll_while(e, 1, 0, || -> Result<(), String> {
        callgrind::segment(&labels.setup);
        for _ in 0..CALLS {
            callgrind::segment(&labels.sender);
            one_call(e)?;
        }
        callgrind::segment(&labels.sender);
        Ok(())
    });
    drop(serve);
    LABELS.with(|c| c.set(std::ptr::null()));
    result
}

/// No-wait calls: each one made while CPU 1 idle-polls, which then finds and runs it (the
/// target's side: the end of that poll, the flush, the start of the next poll; the harness's
/// own `poll_while` counts there too).
fn probe_async(e: &solo::SoloEngine, labels: &Labels) -> Result<(), String> {
    for _ in 0..16 {
        solo::poll_while(e, 1, 0, || one_async_call(e))?;
    }
    // `segment(x)` ends a segment: what ran since the previous marker counts as `x`.
    callgrind::segment(&labels.setup);
    for _ in 0..CALLS {
        solo::poll_while(e, 1, 0, || -> Result<(), String> {
            // Since the previous marker: the previous call's target side, and this poll's start.
            callgrind::segment(&labels.target);
            let r = one_async_call(e);
            callgrind::segment(&labels.sender);
            r
        })?;
    }
    callgrind::segment(&labels.target);
    Ok(())
}

/// The segment markers' own instructions: counted, shown, left out of the side's total.
const MEASUREMENT: &str = "(measurement: segment markers, not counted in the total)";

/// One function's share of a side.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Share {
    /// `file: function` (engine sources), or what the code is (library code inlined here).
    pub what: String,
    /// Instructions per call.
    pub per_call: f64,
}

/// The cost of one side of a call.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Side {
    /// Instructions per call, all of this side but the measurement's own markers.
    pub per_call: f64,
    /// By function, largest first.
    pub shares: Vec<Share>,
}

/// The accounting of one path: both sides of a call.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PathCost {
    /// Segment name ([`CallPath::label`]).
    pub path: String,
    /// What is measured, in words.
    pub what: String,
    /// The caller's side: everything from entering the call to its return, except the
    /// serving done in a waiting call's busy-wait.
    pub sender: Side,
    /// The polling target's side: its idle loop finding the call, the flush, the function,
    /// the release.
    pub target: Side,
}

impl PathCost {
    /// Both sides, instructions per call.
    pub fn total(&self) -> f64 {
        self.sender.per_call + self.target.per_call
    }
}

/// The instruction accounting of `smpcall bench --cost`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cost {
    /// Calls measured per path.
    pub calls: usize,
    /// One entry per [`PATHS`] entry, in that order.
    pub paths: Vec<PathCost>,
    /// Instructions per waiting call (both sides) with per-call diagnostics on ÷ off.
    pub diagnostics_ratio: f64,
    /// Whether `diagnostics_ratio` ≤ [`DIAGNOSTICS_LIMIT`].
    pub diagnostics_target_met: bool,
}

/// Runs the probe under callgrind and accounts for its instructions.
pub fn measure(exe: &Path) -> Result<Cost, String> {
    callgrind::available()?;
    let dir = std::env::temp_dir().join(format!("smpcall-cost-{}", std::process::id()));
    let r = callgrind::run(exe, &["bench".into(), "--cost-probe".into()], &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let profiles = r?;
    let side = |label: String| -> Result<Side, String> {
        let p = profiles
            .get(&label)
            .ok_or_else(|| format!("the probe wrote no `{label}` segment"))?;
        Ok(account(p, CALLS))
    };
    let paths = PATHS
        .iter()
        .map(|p| {
            Ok(PathCost {
                path: p.label.to_string(),
                what: p.what.to_string(),
                sender: side(format!("{} sender", p.label))?,
                target: side(format!("{} target", p.label))?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let diagnostics_ratio = paths[DIAGNOSTICS_ON].total() / paths[DIAGNOSTICS_OFF].total();
    Ok(Cost {
        calls: CALLS,
        diagnostics_target_met: diagnostics_ratio <= DIAGNOSTICS_LIMIT,
        paths,
        diagnostics_ratio,
    })
}

/// Where a source line belongs: `file: fn` for workspace sources, a description otherwise.
struct Sources {
    files: BTreeMap<String, Option<Vec<String>>>,
}

impl Sources {
    fn owner(&mut self, file: &str, line: u32, func: &str) -> String {
        let short = |f: &str| {
            f.rsplit_once("/src/")
                .map_or(f.to_string(), |(_, rest)| rest.to_string())
        };
        // The function library code was inlined into, without its path and generics.
        let into = short_fn(func);
        if file.contains("/smpcall-cli/src/bench/callgrind.rs")
            || file.contains("/smpcall-cli/src/bench/cost.rs")
            || (!file.contains("/smpcall/src/") && into.starts_with("cost::"))
        {
            return MEASUREMENT.to_string();
        }
        let workspace = file.contains("/smpcall/src/") || file.contains("/smpcall-cli/src/");
        if !workspace {
            let what = if file.contains("/sync/atomic.rs") {
                "core atomics".to_string()
            } else if file.contains("thread/local") || file.contains("thread_local") {
                "std thread-local access".to_string()
            } else if file.starts_with("/rustc/") || file.contains("/library/") {
                format!("core/std {}", short(file))
            } else if file == "???" || file.is_empty() {
                "code without line information".to_string()
            } else {
                short(file)
            };
            return format!("{what}, inlined into {into}");
        }
        let lines = self
            .files
            .entry(file.to_string())
            .or_insert_with(|| {
                std::fs::read_to_string(file)
                    .ok()
                    .map(|t| t.lines().map(str::to_string).collect())
            })
            .as_ref();
        let func = lines.and_then(|lines| {
            let upto = (line as usize).min(lines.len());
            lines[..upto].iter().rev().find_map(|l| fn_name(l))
        });
        let short = short(file);
        let place = if file.contains("/smpcall-cli/src/") {
            format!("bench {short}")
        } else {
            short
        };
        match func {
            Some(f) => format!("{place}: {f}"),
            None => format!("{place}: no line information, in {into}"),
        }
    }
}

/// `a::b::Type<P, S>::method` → `Type::method` (generic arguments dropped); `?` if empty.
fn short_fn(func: &str) -> String {
    let mut plain = String::new();
    let mut depth = 0usize;
    for c in func.chars() {
        match c {
            '<' => depth += 1,
            '>' => depth = depth.saturating_sub(1),
            _ if depth == 0 => plain.push(c),
            _ => {}
        }
    }
    let parts: Vec<&str> = plain.rsplit("::").take(2).collect();
    let short = parts.into_iter().rev().collect::<Vec<_>>().join("::");
    if short.is_empty() {
        "?".to_string()
    } else {
        short
    }
}

/// The name of the function a source line defines, if it does (`fn name`, `fn name<…>(`).
fn fn_name(line: &str) -> Option<String> {
    let t = line.trim_start();
    if t.starts_with("//") {
        return None;
    }
    let at = t.find("fn ")?;
    let before = &t[..at];
    let ok = before.is_empty()
        || before.split_whitespace().all(|w| {
            matches!(
                w,
                "pub" | "pub(crate)" | "unsafe" | "const" | "extern" | "\"C\""
            )
        });
    if !ok {
        return None;
    }
    let name: String = t[at + 3..]
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

fn account(p: &Profile, calls: usize) -> Side {
    let mut sources = Sources {
        files: BTreeMap::new(),
    };
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for ((file, line, func), ir) in &p.by_line {
        *by.entry(sources.owner(file, *line, func)).or_insert(0) += ir;
    }
    let measurement = by.get(MEASUREMENT).copied().unwrap_or(0);
    let mut shares: Vec<Share> = by
        .into_iter()
        .map(|(what, ir)| Share {
            what,
            per_call: ir as f64 / calls as f64,
        })
        .collect();
    shares.sort_by(|a, b| b.per_call.total_cmp(&a.per_call));
    Side {
        per_call: p.total.saturating_sub(measurement) as f64 / calls as f64,
        shares,
    }
}

impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.paths {
            writeln!(
                f,
                "cost of {}: instructions per call (callgrind, {} calls, single-threaded platform)",
                p.what, self.calls
            )?;
            for (name, side) in [("sender", &p.sender), ("target", &p.target)] {
                writeln!(f, "  {name}: {:.1} instructions per call", side.per_call)?;
                for s in side.shares.iter().filter(|s| s.per_call >= 0.5) {
                    writeln!(f, "    {:>7.1}  {}", s.per_call, s.what)?;
                }
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "{} per-call diagnostics: a waiting call costs {:.3}× the instructions with them on as off \
             ({:.1} vs {:.1}, both sides; target ≤ {DIAGNOSTICS_LIMIT}×, counted, so without noise)",
            if self.diagnostics_target_met { "PASS" } else { "MISS" },
            self.diagnostics_ratio,
            self.paths[DIAGNOSTICS_ON].total(),
            self.paths[DIAGNOSTICS_OFF].total(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_function_names() {
        assert_eq!(
            fn_name("    pub fn call_single<F, R>(&self"),
            Some("call_single".into())
        );
        assert_eq!(
            fn_name("unsafe fn flush(&self, me: CpuId)"),
            Some("flush".into())
        );
        assert_eq!(fn_name("pub(crate) fn wait_csd("), Some("wait_csd".into()));
        assert_eq!(fn_name("    // fn not_this"), None);
        assert_eq!(fn_name("        let f = fn_name(x);"), None);
        assert_eq!(
            short_fn("smpcall::engine::Engine<P,S>::call_single"),
            "Engine::call_single"
        );
        assert_eq!(short_fn(""), "?");
    }
}
