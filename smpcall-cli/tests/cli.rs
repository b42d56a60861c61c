//! The `smpcall` binary: exit status and output shape.

use std::process::Command;

fn smpcall(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_smpcall"))
        .args(args)
        .output()
        .expect("the smpcall binary runs")
}

#[test]
fn short_torture_succeeds_and_prints_the_block() {
    let out = smpcall(&[
        "torture",
        "--cpus",
        "3",
        "--duration",
        "300ms",
        "--seed",
        "0x2a",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("seed 0x2a"), "{stdout}");
    for word in ["csd-async", "violations", "IPIs", "signals", "calls/s"] {
        assert!(stdout.contains(word), "missing {word}:\n{stdout}");
    }
    assert_eq!(stdout.trim_end().lines().last(), Some("SUCCESS"));
}

#[test]
fn setup_errors_exit_2() {
    let out = smpcall(&["torture", "--cpus", "65", "--duration", "100ms"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("between 1 and 64 CPUs"), "{stderr}");
    let out = smpcall(&["torture", "--duration", "soon"]);
    assert_eq!(out.status.code(), Some(2));
}
