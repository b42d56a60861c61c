//! The `smpcall` command's library: the workloads behind its subcommands, kept in a library so
//! that tests can run them.
//!
//! * [`torture`] — `smpcall torture`: the exactly-once workload and its verifier.
//! * [`bench`](mod@bench) — `smpcall bench`: our calls side by side with their peers, as ratios.
//! * [`dump`] — `smpcall dump`: every CPU's state with calls in flight, and an NMI report.
//! * [`duration`] — parsing of durations given on the command line.
//! * [`SetupError`] — why `torture` or `dump` could not run.
#![warn(missing_docs)]

/// The version of the `--json` output format of `smpcall torture` and `smpcall bench`
/// (their `schema_version` field). Raised when a field is renamed, removed or changes meaning;
/// adding a field does not change it.
pub const JSON_SCHEMA_VERSION: u32 = 1;

pub mod bench;
pub mod dump;
pub mod duration;
mod error;
pub mod torture;

pub use error::SetupError;
