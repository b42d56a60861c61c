//! The `smpcall` command.
//!
//! ```text
//! smpcall torture [--cpus N] [--duration 5s] [--idle poll|sleep|mixed] [--seed S]
//!                 [--weight-KIND W | --weight KIND=W]... [--long-wait]
//!                 [--onoff INTERVAL] [--drop-ipi P] [--delay-ipi P] [--stall-threshold D]
//!                 [--dump-on-stall] [--verbose] [--rcu]
//!                 [--stat-interval 1s] [--json PATH|-]
//! smpcall bench [--quick] [--iterations N] [--json FILE] [--plot FILE.svg]
//! smpcall dump [--cpus N]
//! ```
//!
//! Exit status: 0 on success, 1 when the torture run found a violation, 2 when it could not
//! be set up (bad arguments, the machine would not start), a bench row failed, or the dump
//! scenario could not complete.

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
    /// Write every figure as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw the latency distributions to this SVG file.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
}

fn bench(args: BenchArgs) -> ExitCode {
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
    let report = match bench::run_with_progress_bar(&cfg) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("smpcall bench: error: {e}");
            return ExitCode::from(2);
        }
    };
    println!("{report}");
    if let Some(path) = &args.json {
        if let Err(e) = std::fs::write(path, report.to_json()) {
            eprintln!("smpcall bench: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if let Some(path) = &args.plot {
        if let Err(e) = bench::plot::write_svg(&report, path) {
            eprintln!("smpcall bench: {e}");
            return ExitCode::from(2);
        }
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
