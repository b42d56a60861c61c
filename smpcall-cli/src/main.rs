//! The `smpcall` command.
//!
//! ```text
//! smpcall torture [--cpus N] [--duration 5s] [--idle poll|sleep|mixed] [--seed S]
//!                 [--weight-KIND W | --weight KIND=W]... [--long-wait]
//!                 [--onoff INTERVAL] [--drop-ipi P] [--delay-ipi P] [--stall-threshold D]
//!                 [--dump-on-stall] [--verbose] [--rcu]
//!                 [--stat-interval 1s] [--json PATH|-]
//! smpcall bench [--quick] [--iterations N] [--json FILE] [--plot FILE.svg] [--check]
//! smpcall bench --scaling [--cpus 2,8,1024] [--no-instructions] [--json FILE] [--check]
//! smpcall bench --cost [--json FILE]
//! smpcall dump [--cpus N]
//! ```
//!
//! Exit status: 0 on success, 1 when the torture run found a violation or `bench --check`
//! missed a target, 2 when it could not be set up (bad arguments, an output file that cannot
//! be written, the machine would not start), a bench row failed, or the dump scenario could
//! not complete. Without `--check` a missed bench target is reported and the status stays 0.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use smpcall::hosted::IdlePolicy;
use smpcall_cli::bench;
use smpcall_cli::duration::{parse_duration, parse_timeout};
use smpcall_cli::torture::{self, Config};

/// Cross-CPU function calls on a hosted machine: stress and inspect the engine.
#[derive(Debug, Parser)]
#[command(name = "smpcall", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the exactly-once workload on every CPU and verify every call ran exactly once on
    /// the CPU it was meant for; optionally under CPU hotplug cycling (--onoff), IPI fault
    /// injection (--drop-ipi, --delay-ipi) and with an RCU workload (--rcu).
    Torture(Box<TortureArgs>),
    /// Measure our calls side by side with their peers (channels, signals, rayon, membarrier)
    /// and print the ratios to the floor and to the best peer.
    Bench(BenchArgs),
    /// Print every CPU's state (counters, masks, waits, calls in flight) while one CPU is held
    /// with interrupts masked and others call it, plus an NMI report of every CPU; then
    /// release it and shut down.
    Dump(smpcall_cli::dump::DumpArgs),
}

/// What an idle CPU does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Idle {
    /// Spin on the queue (IPIs to idle CPUs are elided).
    Poll,
    /// Sleep on a futex (IPIs to idle CPUs are futex wakes).
    Sleep,
    /// Poll 50 µs after each piece of work, then sleep.
    Mixed,
}

impl From<Idle> for IdlePolicy {
    fn from(idle: Idle) -> IdlePolicy {
        match idle {
            Idle::Poll => IdlePolicy::Poll,
            Idle::Sleep => IdlePolicy::Sleep,
            Idle::Mixed => IdlePolicy::PollThenSleep(Duration::from_micros(50)),
        }
    }
}

#[derive(Debug, Args)]
struct TortureArgs {
    /// CPUs of the hosted machine (1-64; may exceed the host's cores).
    #[arg(long, default_value_t = 4)]
    cpus: usize,
    /// How long to issue calls: 3s, 500ms, 2 (seconds), 1m.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// What idle CPUs do.
    #[arg(long, value_enum, default_value_t = Idle::Mixed)]
    idle: Idle,
    /// Seed of the per-CPU random streams (decimal or 0x-hex); random when absent, and
    /// printed either way so a run can be repeated.
    #[arg(long, value_parser = parse_seed)]
    seed: Option<u64>,
    /// Call records per CPU (a CPU that uses them up stops early).
    #[arg(long, default_value_t = Config::default().max_calls_per_cpu)]
    max_calls_per_cpu: u64,
    /// Bound on each wait: after the deadline a task to finish, calls to drain, shutdown;
    /// half of it for an rpc's completion.
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    timeout: Duration,
    /// Weights, long waits, statistics lines, JSON.
    #[command(flatten)]
    options: torture::cli::TortureOptions,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// A run of a few seconds (fewer iterations per row), for tests and CI.
    #[arg(long)]
    quick: bool,
    /// Timed round trips per latency row (overrides the default; rows still stop after
    /// --row-time; at least 1).
    #[arg(long, value_parser = parse_iterations)]
    iterations: Option<u64>,
    /// Time cap per row: 2s, 500ms.
    #[arg(long, value_parser = parse_duration)]
    row_time: Option<Duration>,
    /// Only the rows whose id contains one of these words, comma-separated (e.g. `async,crossbeam_unbounded`;
    /// the ids are in the JSON output); targets against a row left out are not evaluated.
    #[arg(long, value_delimiter = ',', value_name = "WORD,...")]
    rows: Option<Vec<String>>,
    /// Write every figure as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw the latency distributions to this SVG file.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Exit with status 1 when a target is missed (without it a miss is reported and the exit
    /// status stays 0).
    #[arg(long)]
    check: bool,
    /// Instead of the latency rows: how a many-call's cost grows with the CPU count, counted
    /// deterministically (instructions under callgrind, IPIs, simulator steps, memory).
    #[arg(long)]
    scaling: bool,
    /// CPU counts for --scaling, comma-separated (default 2,4,8,…,1024).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "N,N,...",
        requires = "scaling"
    )]
    cpus: Option<Vec<usize>>,
    /// Skip the callgrind instruction counts of --scaling.
    #[arg(long, requires = "scaling")]
    no_instructions: bool,
    /// Internal: the program --scaling runs under callgrind.
    #[arg(long, hide = true, value_delimiter = ',')]
    scaling_probe: Option<Vec<usize>>,
    /// Instead of the latency rows: account for a waiting call_single to a polling CPU,
    /// instructions per call on each side by function (needs valgrind).
    #[arg(long, conflicts_with = "scaling")]
    cost: bool,
    /// Internal: the program --cost runs under callgrind.
    #[arg(long, hide = true)]
    cost_probe: bool,
}

fn cost(args: &BenchArgs) -> ExitCode {
    let exe = match this_exe() {
        Ok(exe) => exe,
        Err(code) => return code,
    };
    match bench::cost::measure(&exe) {
        Ok(c) => {
            println!("{c}");
            let json = serde_json::to_string_pretty(&c).expect("cost figures serialise");
            if let Err(code) = write_json(args.json.as_ref(), &json) {
                return code;
            }
            if args.check && !c.diagnostics_target_met {
                eprintln!("smpcall bench: --check: the per-call diagnostics target was missed");
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => setup_error(format_args!("cost: {e}")),
    }
}

/// Checks --json and --plot before anything is measured.
fn check_outputs(args: &BenchArgs) -> Result<(), bench::BenchError> {
    if let Some(path) = &args.json {
        bench::output::check_writable(path, "--json")?;
    }
    if let Some(path) = &args.plot {
        bench::plot::check_extension(path)?;
        bench::output::check_writable(path, "--plot")?;
    }
    Ok(())
}

fn write_json(path: Option<&PathBuf>, json: &str) -> Result<(), ExitCode> {
    if let Some(path) = path {
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("smpcall bench: cannot write {}: {e}", path.display());
            return Err(ExitCode::from(2));
        }
    }
    Ok(())
}

/// Reports a setup error of `smpcall bench`: exit status 2.
fn setup_error(what: impl std::fmt::Display) -> ExitCode {
    eprintln!("smpcall bench: {what}");
    ExitCode::from(2)
}

/// This program's path, which --scaling and --cost re-run under callgrind.
fn this_exe() -> Result<PathBuf, ExitCode> {
    std::env::current_exe()
        .map_err(|e| setup_error(format_args!("cannot find this program's path: {e}")))
}

fn scaling(args: &BenchArgs) -> ExitCode {
    let mut cfg = bench::scaling::ScalingConfig::default();
    if let Some(sizes) = &args.cpus {
        cfg.sizes = sizes.clone();
    }
    cfg.instructions = !args.no_instructions;
    let exe = match this_exe() {
        Ok(exe) => exe,
        Err(code) => return code,
    };
    let report = match bench::scaling::measure(&exe, &cfg) {
        Ok(r) => r,
        Err(e) => return setup_error(format_args!("scaling: {e}")),
    };
    println!("{report}");
    if let Err(code) = write_json(args.json.as_ref(), &report.to_json()) {
        return code;
    }
    if args.check && !report.check() {
        eprintln!("smpcall bench: --check: a scaling target was missed");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn bench(args: BenchArgs) -> ExitCode {
    let probe = match (&args.scaling_probe, args.cost_probe) {
        (Some(sizes), _) => Some(bench::scaling::probe(sizes)),
        (None, true) => Some(bench::cost::probe()),
        (None, false) => None,
    };
    if let Some(result) = probe {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => setup_error(format_args!("probe: {e}")),
        };
    }
    if (args.scaling || args.cost) && args.plot.is_some() {
        return setup_error("--plot draws the latency rows; --scaling and --cost have none");
    }
    if let Err(e) = check_outputs(&args) {
        return setup_error(e);
    }
    if args.scaling {
        return scaling(&args);
    }
    if args.cost {
        return cost(&args);
    }
    let mut cfg = if args.quick {
        bench::Config::quick()
    } else {
        bench::Config::default()
    };
    if let Some(n) = args.iterations {
        cfg.iterations = n;
    }
    if let Some(d) = args.row_time {
        cfg.row_time = d;
    }
    if let Some(rows) = &args.rows {
        cfg.rows = rows.clone();
    }
    let report = match bench::run_with_progress_bar(&cfg) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("smpcall bench: error: {e}");
            return ExitCode::from(2);
        }
    };
    println!("{report}");
    if let Err(code) = write_json(args.json.as_ref(), &report.to_json()) {
        return code;
    }
    if let Some(path) = &args.plot {
        if let Err(e) = bench::plot::write_svg(&report, path) {
            eprintln!("smpcall bench: {e}");
            return ExitCode::from(2);
        }
    }
    let missed = report.targets().filter(|(_, t)| !t.met).count();
    if args.check && missed > 0 {
        eprintln!("smpcall bench: --check: {missed} target(s) missed");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// `--iterations`: a positive count (a row of zero round trips would measure nothing).
fn parse_iterations(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("the number of iterations must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("invalid number of iterations `{s}`: {e}")),
    }
}

fn parse_seed(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("invalid seed `{s}`: expected a decimal or 0x-hex u64"))
}

/// A seed for runs that did not ask for one: the clock and the process id.
fn fresh_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

fn torture(args: TortureArgs) -> ExitCode {
    let cfg = Config {
        cpus: args.cpus,
        duration: args.duration,
        idle: args.idle.into(),
        seed: args.seed.unwrap_or_else(fresh_seed),
        max_calls_per_cpu: args.max_calls_per_cpu,
        timeout: args.timeout,
        ..Config::default()
    };
    torture::cli::run_command(cfg, &args.options)
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Torture(args) => torture(*args),
        Command::Bench(args) => bench(args),
        Command::Dump(args) => smpcall_cli::dump::run_command(&args),
    }
}
