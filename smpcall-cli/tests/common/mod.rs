//! Running the `smpcall` binary from the bench and scaling tests.

use std::ffi::OsStr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Runs `smpcall args…`; returns its output and how long it took.
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_smpcall"))
        .args(args)
        .output()
        .expect("the smpcall binary runs");
    (out, start.elapsed())
}

/// Runs `smpcall args…`, asserts it succeeded, returns its standard output.
pub fn run_ok<S: AsRef<OsStr>>(args: &[S]) -> String {
    let (out, _) = run(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
