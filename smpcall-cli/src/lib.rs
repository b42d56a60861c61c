//! The `smpcall` command's library: the workloads behind its subcommands, kept in a library so
//! that tests can run them.
//!
//! * [`torture`] — `smpcall torture`: the exactly-once workload and its verifier.
//! * [`duration`] — parsing of durations given on the command line.
//!
//! (`bench` and `dump` will join them.)
#![warn(missing_docs)]

pub mod duration;
pub mod torture;
