//! The `smpcall torture` command around [`run_observed`]: the weight and output options, the
//! start banner with the mix's percentages, a progress bar, periodic statistics lines, the
//! final block, `--json`, and the exit status.
//!
//! Output streams:
//!
//! * **stderr** — the banner (CPUs, seed, the mix as a table with percentages), the progress
//!   bar (only when stderr is a terminal; hidden otherwise), and a statistics line every
//!   `--stat-interval` (default 1 s, `0` for none; printed whether or not stderr is a terminal,
//!   so that a CI log shows how far a run got and where a hang began).
//! * **stdout** — the final block, whose last line is `SUCCESS` or `FAILURE`; with `--json -`
//!   the JSON report goes to stdout instead and the final block to stderr.
//!
//! Exit status: 0 for `SUCCESS`, 1 for `FAILURE`, 2 when the run could not be set up (or the
//! JSON report could not be written).

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::faults::parse_probability;
use super::kind::{Kind, Mix, WeightSpec};
use super::report::{self, Report};
use super::{run_observed, Config, Fault, Phase, Progress, LONG_WAIT_NS, LONG_WAIT_ONE_IN};
use crate::duration::parse_duration;

/// The torture options beyond the machine's shape: weights, long waits and output. Meant to
/// be flattened into the command's arguments (`#[command(flatten)]`).
///
/// Weights: every kind starts at its default ([`Mix::default`]); `--weight KIND=W` and
/// `--weight '*=W'` apply in the order given, then each `--weight-KIND W`. 0 disables a kind.
#[derive(Clone, Debug, Default, Args)]
pub struct TortureOptions {
    /// Weight of `single`: call_single to another CPU, waiting (0 disables).
    #[arg(long, value_name = "W")]
    pub weight_single: Option<u32>,
    /// Weight of `single-async`: call_single_async to another CPU, no wait.
    #[arg(long, value_name = "W")]
    pub weight_single_async: Option<u32>,
    /// Weight of `rpc`: call_single_async, then wait for the function's completion signal.
    #[arg(long, value_name = "W")]
    pub weight_rpc: Option<u32>,
    /// Weight of `csd-async`: call_async_csd with caller-owned call data, no wait.
    #[arg(long, value_name = "W")]
    pub weight_csd_async: Option<u32>,
    /// Weight of `self`: call_single to the calling CPU, waiting.
    #[arg(long, value_name = "W")]
    pub weight_self: Option<u32>,
    /// Weight of `self-async`: a no-wait call to the calling CPU.
    #[arg(long, value_name = "W")]
    pub weight_self_async: Option<u32>,
    /// Weight of `many`: call_many to a random mask, waiting.
    #[arg(long, value_name = "W")]
    pub weight_many: Option<u32>,
    /// Weight of `many-async`: call_many_async to a random mask.
    #[arg(long, value_name = "W")]
    pub weight_many_async: Option<u32>,
    /// Weight of `all`: call_all, waiting.
    #[arg(long, value_name = "W")]
    pub weight_all: Option<u32>,
    /// Weight of `all-async`: call_all_async.
    #[arg(long, value_name = "W")]
    pub weight_all_async: Option<u32>,
    /// Weight of `others`: call_others, waiting.
    #[arg(long, value_name = "W")]
    pub weight_others: Option<u32>,
    /// Weight of `others-async`: call_others_async.
    #[arg(long, value_name = "W")]
    pub weight_others_async: Option<u32>,
    /// Weight of `cond`: call_cond with a random predicate, waiting.
    #[arg(long, value_name = "W")]
    pub weight_cond: Option<u32>,
    /// Weight of `cond-async`: call_cond_async with a random predicate.
    #[arg(long, value_name = "W")]
    pub weight_cond_async: Option<u32>,
    /// Set a weight: KIND=W, or '*=W' for every kind (repeatable, applied in order, before
    /// the --weight-KIND flags). E.g. --weight '*=0' --weight rpc=1 runs rpc calls only.
    #[arg(long = "weight", value_name = "KIND=W")]
    pub weight: Vec<WeightSpec>,
    /// Each CPU issues at least this many calls, going on past --duration if it must (for at
    /// most half of --timeout).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub min_calls_per_cpu: u64,
    /// Long waits: one call in 1000 makes each of its functions busy-wait 1 ms.
    #[arg(long)]
    pub long_wait: bool,
    /// Run call functions inside the IPI signal handler wherever it lands (the `unsafe`
    /// opt-in `run_calls_in_signal_handlers`: the torture's functions are async-signal-safe).
    /// Default: the sound delivery, where a busy CPU runs calls at its next safe point.
    #[arg(long)]
    pub signal_calls: bool,
    /// Print a statistics line to stderr this often (0: never).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub stat_interval: Duration,
    /// Self-test: inject a fault that the checks must catch (the run must end in FAILURE).
    #[arg(long, value_enum, value_name = "FAULT")]
    pub inject_fault: Option<Fault>,
    /// Also write the full report as JSON to PATH ('-': to stdout, and the text block to
    /// stderr).
    #[arg(long, value_name = "PATH|-")]
    pub json: Option<String>,
    /// Hotplug cycling: CPU 0 takes a random other CPU offline, brings it back after
    /// INTERVAL, and so on for the whole run (e.g. 20ms). Calls refused as offline are
    /// expected and counted; a call that reaches an offline CPU is a violation.
    #[arg(long, value_name = "INTERVAL", value_parser = parse_duration)]
    pub onoff: Option<Duration>,
    /// IPI fault injection: drop each IPI (signal or futex wake) with probability P (0..1 or
    /// a %). Stuck calls must be reported and recovered by the stall diagnostics: the run
    /// fails if a call is lost, or if IPIs were dropped, some call waited longer than twice
    /// the stall threshold to run, and no stall at all was reported.
    #[arg(long, value_name = "P", value_parser = parse_probability, default_value_t = 0.0)]
    pub drop_ipi: f64,
    /// IPI fault injection: delay each IPI by 1-50 µs with probability P.
    #[arg(long, value_name = "P", value_parser = parse_probability, default_value_t = 0.0)]
    pub delay_ipi: f64,
    /// The engine's stall threshold: waits and queues stuck longer are reported and their
    /// IPI re-sent (default 20ms with --drop-ipi/--delay-ipi, else 1s; 0 disables).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub stall_threshold: Option<Duration>,
    /// Print the machine's dump (every CPU's counters, waits, calls in flight) to stderr when
    /// the first stall is reported.
    #[arg(long)]
    pub dump_on_stall: bool,
    /// Write every stall report of the engine to stderr (with fault injection they are only
    /// counted by default).
    #[arg(long)]
    pub verbose: bool,
    /// RCU torture: readers on every CPU (tasks and call handlers), writers swapping a pointer
    /// and reclaiming through expedited grace periods; a reader that sees a reclaimed node is
    /// a violation. Mixed with the calls; with --weight '*=0' it runs alone.
    #[arg(long)]
    pub rcu: bool,
}

impl TortureOptions {
    /// The per-kind flags, as (kind, weight) pairs of the ones given.
    fn kind_flags(&self) -> [(Kind, Option<u32>); Kind::COUNT] {
        [
            (Kind::Single, self.weight_single),
            (Kind::SingleAsync, self.weight_single_async),
            (Kind::Rpc, self.weight_rpc),
            (Kind::CsdAsync, self.weight_csd_async),
            (Kind::SelfSingle, self.weight_self),
            (Kind::SelfAsync, self.weight_self_async),
            (Kind::Many, self.weight_many),
            (Kind::ManyAsync, self.weight_many_async),
            (Kind::All, self.weight_all),
            (Kind::AllAsync, self.weight_all_async),
            (Kind::Others, self.weight_others),
            (Kind::OthersAsync, self.weight_others_async),
            (Kind::Cond, self.weight_cond),
            (Kind::CondAsync, self.weight_cond_async),
        ]
    }

    /// `base` with the weight options applied: the `--weight` specs in order, then the
    /// `--weight-KIND` flags.
    pub fn mix(&self, base: Mix) -> Mix {
        let mix = self.weight.iter().fold(base, |m, &spec| m.with_spec(spec));
        self.kind_flags()
            .into_iter()
            .fold(mix, |m, (kind, w)| match w {
                Some(w) => m.with_weight(kind, w),
                None => m,
            })
    }

    /// Applies the weights, minimum call count, long waits, fault self-test, hotplug, IPI
    /// fault injection, stall options and RCU to `cfg`.
    pub fn apply(&self, cfg: &mut Config) {
        cfg.mix = self.mix(cfg.mix);
        cfg.min_calls_per_cpu = cfg.min_calls_per_cpu.max(self.min_calls_per_cpu);
        cfg.long_wait |= self.long_wait;
        cfg.signal_calls |= self.signal_calls;
        cfg.inject = self.inject_fault.or(cfg.inject);
        cfg.onoff = self.onoff.or(cfg.onoff);
        if self.drop_ipi > 0.0 {
            cfg.drop_ipi = self.drop_ipi;
        }
        if self.delay_ipi > 0.0 {
            cfg.delay_ipi = self.delay_ipi;
        }
        cfg.stall_threshold = self.stall_threshold.or(cfg.stall_threshold);
        cfg.dump_on_stall |= self.dump_on_stall;
        cfg.verbose_reports |= self.verbose;
        cfg.rcu |= self.rcu;
    }
}

/// Where the JSON report goes.
enum JsonOut {
    None,
    Stdout,
    File(String, File),
}

/// Runs `smpcall torture` with `cfg` (from the command's machine options) and `opts`; prints
/// as described in the module docs and returns the exit status.
pub fn run_command(mut cfg: Config, opts: &TortureOptions) -> ExitCode {
    opts.apply(&mut cfg);
    // Open the JSON file first: a path that cannot be written fails before the run.
    let json = match opts.json.as_deref() {
        None => JsonOut::None,
        Some("-") => JsonOut::Stdout,
        Some(path) => match File::create(path) {
            Ok(f) => JsonOut::File(path.to_owned(), f),
            Err(e) => {
                eprintln!("smpcall torture: error: cannot write the JSON report to {path}: {e}");
                return ExitCode::from(2);
            }
        },
    };
    // Printed first, so that a run that hangs can still be repeated.
    eprintln!("{}", banner(&cfg));

    let bar = progress_bar(&cfg);
    let mut stats = StatLines::new(opts.stat_interval);
    let result = run_observed(&cfg, &mut |p: &Progress| {
        update_bar(&bar, p);
        if let Some(line) = stats.line(p) {
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
    });
    bar.finish_and_clear();
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!("smpcall torture: error: {e}");
            return ExitCode::from(2);
        }
    };

    match json {
        JsonOut::None => println!("{report}"),
        JsonOut::Stdout => {
            eprintln!("{report}");
            if let Err(e) = write_json(&mut io::stdout().lock(), &report) {
                eprintln!("smpcall torture: error: writing the JSON report: {e}");
                return ExitCode::from(2);
            }
        }
        JsonOut::File(path, mut file) => {
            println!("{report}");
            if let Err(e) = write_json(&mut file, &report) {
                eprintln!("smpcall torture: error: writing the JSON report to {path}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    ExitCode::from(report.exit_code())
}

fn write_json(out: &mut dyn Write, report: &Report) -> io::Result<()> {
    // The struct itself (not `to_json`'s map) keeps the fields in their documented order.
    serde_json::to_writer_pretty(&mut *out, &report::JsonReport::from(report))?;
    writeln!(out)?;
    out.flush()
}

/// The start banner: what runs, with the mix as a table of percentages.
pub fn banner(cfg: &Config) -> String {
    let long = if cfg.long_wait {
        format!(
            "on (1 call in {LONG_WAIT_ONE_IN} busy-waits {} ms per function)",
            LONG_WAIT_NS / 1_000_000
        )
    } else {
        "off".to_owned()
    };
    let fault = match cfg.inject {
        None => String::new(),
        Some(f) => format!(", INJECTING FAULT {f:?} (self-test: must end in FAILURE)"),
    };
    let rcu_share = if cfg.rcu && cfg.mix.total() > 0 {
        format!(
            "\n  (with --rcu, 1 step in {} is an RCU step instead of a call)",
            super::rcu::RCU_STEP_ONE_IN
        )
    } else {
        String::new()
    };
    format!(
        "smpcall torture: running {} CPUs for {:?}, idle {}, seed {:#x}, long waits \
         {long}{fault}{}\n{}{rcu_share}",
        cfg.cpus,
        cfg.duration,
        report::idle_name(cfg.idle),
        cfg.seed,
        report::stresses(cfg),
        report::mix_table(cfg).trim_end()
    )
}

/// A progress bar on stderr when it is a terminal, hidden otherwise.
fn progress_bar(cfg: &Config) -> ProgressBar {
    let target = if io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let len = cfg.duration.as_millis().max(1) as u64;
    let bar = ProgressBar::with_draw_target(Some(len), target);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:30}] {percent:>3}% {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn update_bar(bar: &ProgressBar, p: &Progress) {
    if bar.is_hidden() {
        return;
    }
    bar.set_position(p.elapsed.min(p.duration).as_millis() as u64);
    let phase = match p.phase {
        Phase::Running => String::new(),
        Phase::Draining => format!(" — draining ({} of {} tasks done)", p.tasks_done, p.cpus),
    };
    bar.set_message(format!(
        "{} calls, {} violations so far{phase}",
        p.calls(),
        p.live.total()
    ));
}

/// Makes the periodic statistics lines.
#[derive(Debug)]
pub struct StatLines {
    interval: Duration,
    next: Duration,
    last_at: Duration,
    last_calls: u64,
}

impl StatLines {
    /// A line every `interval` of run time (never if it is 0).
    pub fn new(interval: Duration) -> StatLines {
        StatLines {
            interval,
            next: interval,
            last_at: Duration::ZERO,
            last_calls: 0,
        }
    }

    /// The line due at `p`, if one is.
    pub fn line(&mut self, p: &Progress) -> Option<String> {
        if self.interval.is_zero() || p.elapsed < self.next {
            return None;
        }
        while self.next <= p.elapsed {
            self.next += self.interval;
        }
        let calls = p.calls();
        let dt = (p.elapsed - self.last_at).as_secs_f64();
        let rate = if dt > 0.0 {
            ((calls - self.last_calls.min(calls)) as f64 / dt) as u64
        } else {
            0
        };
        self.last_at = p.elapsed;
        self.last_calls = calls;
        Some(stat_line(p, rate))
    }
}

/// One statistics line: time, calls (and the rate since the previous line), IPI counters,
/// violations found so far (lost calls are only known at the end).
pub fn stat_line(p: &Progress, rate: u64) -> String {
    let e = &p.engine;
    let l = &p.live;
    let phase = match p.phase {
        Phase::Running => "",
        Phase::Draining => " draining",
    };
    let mut line = format!(
        "[{:>6.1}s{phase}] calls {} ({}/s) | IPIs sent {} elided {} recv {} | in-order {} \
         out-order {} rpc-timeout {} dup {} wrong-cpu {} orphan {}",
        p.elapsed.as_secs_f64(),
        p.calls(),
        rate,
        e.ipi_sent,
        e.ipi_elided,
        e.ipi_received,
        l.in_order,
        l.out_order,
        l.rpc_timeout,
        l.duplicated,
        l.wrong_cpu,
        l.orphans
    );
    if let Some(h) = &p.hotplug {
        line.push_str(&format!(
            " | onoff down {} up {} offline-runs {}",
            h.downs, h.ups, e.offline_runs
        ));
    }
    if let Some(dropped) = p.ipis_dropped {
        let d = &p.diag;
        line.push_str(&format!(
            " | dropped {dropped} stalls {} queue-stalls {} resends {} recoveries {}",
            d.stall_reports, d.queue_stall_reports, d.ipi_resends, d.recoveries
        ));
    }
    if let Some((gps, bad)) = p.rcu {
        line.push_str(&format!(" | rcu gps {gps} violations {bad}"));
    }
    line
}
