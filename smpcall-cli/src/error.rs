//! [`SetupError`]: why `smpcall torture` or `smpcall dump` could not run (exit status 2).

use std::fmt;
use std::time::Duration;

use smpcall::CpuId;

/// Why a workload could not be set up or completed. Each variant carries the values that were
/// wrong (an option's value and the range it had to be in, the OS error); its `Display` names
/// them. Findings about the engine itself are not errors: they are in the torture report.
#[derive(Debug)]
#[non_exhaustive]
pub enum SetupError {
    /// The engine or the hosted machine refused (with the engine's own values).
    Engine(smpcall::Error),
    /// A CPU count outside what the workload supports.
    Cpus {
        /// The workload (`torture`, `dump`).
        workload: &'static str,
        /// The count given.
        requested: usize,
        /// The smallest count allowed.
        min: usize,
        /// The largest count allowed.
        max: usize,
    },
    /// `--cpus` plus `--churn` slots exceed the ledger's CPU sets.
    CpusPlusChurn {
        /// `--cpus`.
        cpus: usize,
        /// `--churn`.
        churn: usize,
        /// The largest sum allowed.
        max: usize,
    },
    /// Call records per CPU (`--max-calls-per-cpu`) outside what the ledger can index.
    CallsPerCpu {
        /// The number given.
        requested: u64,
        /// The largest number allowed.
        max: u64,
    },
    /// Every call kind has weight 0, and `--rcu` is off: there would be nothing to run.
    NoWork,
    /// `--onoff` with fewer than 2 CPUs (CPU 0 drives, another must go down).
    OnoffCpus {
        /// `--cpus`.
        cpus: usize,
    },
    /// `--onoff` with a zero interval.
    OnoffInterval,
    /// A thread of the workload could not be started.
    Spawn {
        /// Which thread.
        thread: &'static str,
        /// The OS error.
        error: std::io::Error,
    },
    /// A bounded wait of the workload expired.
    TimedOut {
        /// What it waited for.
        what: &'static str,
        /// How long it waited.
        limit: Duration,
    },
    /// A waiting call returned a CPU other than the one it was sent to.
    WrongCpu {
        /// The CPU the call was sent to.
        expected: CpuId,
        /// The CPU it reported running on.
        ran_on: CpuId,
    },
}

impl From<smpcall::Error> for SetupError {
    fn from(e: smpcall::Error) -> Self {
        SetupError::Engine(e)
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetupError::Engine(e) => e.fmt(f),
            SetupError::Cpus {
                workload,
                requested,
                min,
                max,
            } => write!(
                f,
                "{workload} needs between {min} and {max} CPUs, not {requested}"
            ),
            SetupError::CpusPlusChurn { cpus, churn, max } => write!(
                f,
                "--cpus {cpus} plus --churn {churn} is {}, more than {max} (the ledger's CPU sets)",
                cpus + churn
            ),
            SetupError::CallsPerCpu { requested, max } => {
                write!(f, "--max-calls-per-cpu {requested} is outside 1..={max}")
            }
            SetupError::NoWork => {
                f.write_str("every call kind has weight 0 (that is allowed only with --rcu)")
            }
            SetupError::OnoffCpus { cpus } => write!(
                f,
                "--onoff needs at least 2 CPUs, not {cpus} (CPU 0 drives, the others go down)"
            ),
            SetupError::OnoffInterval => f.write_str("--onoff needs an interval above 0, not 0"),
            SetupError::Spawn { thread, error } => {
                write!(f, "could not start the {thread} thread: {error}")
            }
            SetupError::TimedOut { what, limit } => {
                write!(f, "timed out after {limit:?} waiting for {what}")
            }
            SetupError::WrongCpu { expected, ran_on } => write!(
                f,
                "a waiting call to CPU {expected} reported running on CPU {ran_on}"
            ),
        }
    }
}

impl std::error::Error for SetupError {}
