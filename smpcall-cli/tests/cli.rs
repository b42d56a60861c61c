//! The `smpcall` binary: exit status, output shape, options, JSON.

use std::process::Command;

use serde_json::Value;
use smpcall_cli::torture::Kind;

fn smpcall(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_smpcall"))
        .args(args)
        .output()
        .expect("the smpcall binary runs")
}

fn show(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
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
        "--stat-interval",
        "100ms",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", show(&out));
    assert!(stdout.contains("seed 0x2a"), "{stdout}");
    for word in [
        "csd-async",
        "rpc",
        "self-async",
        "violations",
        "in-order 0",
        "out-order 0",
        "lost 0",
        "duplicated 0",
        "offline refusals 0",
        "latency µs",
        "p99",
        "IPIs",
        "signals",
        "calls/s",
    ] {
        assert!(stdout.contains(word), "missing {word}:\n{stdout}");
    }
    assert_eq!(stdout.trim_end().lines().last(), Some("SUCCESS"));
    // The banner shows the mix as percentages; statistics lines go to stderr.
    assert!(stderr.contains("mix %"), "{stderr}");
    assert!(
        stderr.contains("17.4"),
        "default single weight share: {stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with('[') && l.contains("calls") && l.contains("in-order 0")),
        "no statistics line:\n{stderr}"
    );
}

#[test]
fn setup_errors_exit_2() {
    let out = smpcall(&["torture", "--cpus", "65", "--duration", "100ms"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("between 1 and 64 CPUs"), "{stderr}");
    let out = smpcall(&["torture", "--duration", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    // Bad weights: an unknown kind, a non-number, every kind disabled.
    let out = smpcall(&["torture", "--weight", "bogus=3"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown call kind"));
    let out = smpcall(&["torture", "--weight-rpc", "-1"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let out = smpcall(&["torture", "--duration", "100ms", "--weight", "*=0"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("weight 0"));
    // A JSON path that cannot be written fails before the run.
    let out = smpcall(&[
        "torture",
        "--duration",
        "100ms",
        "--json",
        "/nonexistent-dir/t.json",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}

/// Bounds of zero are refused when the arguments are parsed, with a message that says so,
/// before anything runs: a zero `--timeout` (torture, dump) and `bench --iterations 0`.
#[test]
fn zero_timeout_and_zero_iterations_are_refused() {
    for args in [
        &["torture", "--duration", "100ms", "--timeout", "0"][..],
        &["torture", "--duration", "100ms", "--timeout", "0ms"],
        &["dump", "--timeout", "0s"],
    ] {
        let out = smpcall(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--timeout"), "{args:?}: {stderr}");
        assert!(stderr.contains("greater than zero"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} ran: {}", show(&out));
    }
    let out = smpcall(&["bench", "--quick", "--iterations", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--iterations"), "{stderr}");
    assert!(stderr.contains("at least 1"), "{stderr}");
    assert!(out.stdout.is_empty(), "bench printed rows: {}", show(&out));
}

/// Every kind, long waits on, JSON to a file: SUCCESS, and the JSON has each kind's totals
/// and latency percentiles, consistent with the exit status.
#[test]
fn every_kind_with_long_waits_succeeds_and_json_parses() {
    let path = std::env::temp_dir().join(format!("smpcall-torture-{}.json", std::process::id()));
    let path_s = path.to_str().expect("utf-8 temp path");
    let out = smpcall(&[
        "torture",
        "--cpus",
        "3",
        "--duration",
        "1500ms",
        "--seed",
        "7",
        "--long-wait",
        // The rarest kind is 2.2 % of the mix: ~30 calls each at least, however slow the host.
        "--min-calls-per-cpu",
        "500",
        "--json",
        path_s,
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim_end().lines().last(), Some("SUCCESS"));
    assert!(stdout.contains("long waits on"), "{stdout}");
    let text = std::fs::read_to_string(&path).expect("the JSON report was written");
    let _ = std::fs::remove_file(&path);
    let json: Value = serde_json::from_str(&text).expect("the JSON report parses");
    assert_eq!(json["result"], "SUCCESS");
    assert_eq!(json["success"], true);
    assert_eq!(json["exit_code"], 0);
    assert_eq!(json["config"]["cpus"], 3);
    assert_eq!(json["config"]["seed"], 7);
    assert_eq!(json["config"]["seed_str"], "7");
    assert_eq!(json["schema_version"], 1);
    assert_eq!(json["config"]["long_wait"], true);
    let kinds = json["kinds"].as_array().expect("kinds is an array");
    assert_eq!(kinds.len(), Kind::COUNT);
    for (k, kind) in kinds.iter().zip(Kind::ALL) {
        assert_eq!(k["name"], kind.name());
        let accepted = k["accepted"].as_u64().expect("accepted");
        assert!(accepted > 0, "{kind} never ran: {k}");
        assert!(k["issued"].as_u64() >= Some(accepted));
        assert!(k["percent"].as_f64().is_some_and(|p| p > 0.0));
        let lat = &k["latency_us"];
        for p in ["p50_us", "p90_us", "p99_us", "max_us"] {
            assert!(lat[p].as_f64().is_some(), "{kind}: no {p} in {lat}");
        }
        assert!(lat["p50_us"].as_f64() <= lat["max_us"].as_f64(), "{lat}");
        assert!(lat["samples"].as_u64().is_some_and(|n| n > 0));
    }
    let violations = json["violations"].as_array().expect("violations");
    assert!(violations.iter().any(|c| c["class"] == "in-order"));
    assert!(violations.iter().all(|c| c["count"] == 0), "{violations:?}");
    assert_eq!(json["offline_refusals"], 0);
    assert!(json["ipis"]["sent"].as_u64().is_some());
}

/// `--json -`: the JSON alone on stdout, the text block on stderr; weights select kinds.
#[test]
fn json_to_stdout_and_weights_select_kinds() {
    let out = smpcall(&[
        "torture",
        "--cpus",
        "2",
        "--duration",
        "300ms",
        "--weight",
        "*=0",
        "--weight",
        "rpc=3",
        "--weight-self",
        "1",
        "--weight-all",
        "0",
        "--stat-interval",
        "0",
        "--min-calls-per-cpu",
        "100",
        "--seed",
        "0xfffffffffffffff1",
        "--json",
        "-",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let json: Value = serde_json::from_slice(&out.stdout).expect("stdout is the JSON report");
    assert_eq!(json["schema_version"], smpcall_cli::JSON_SCHEMA_VERSION);
    // A seed above 2^53 survives as a string (a double would round it to ...f000).
    assert_eq!(json["config"]["seed_str"], "18446744073709551601");
    assert_eq!(json["config"]["seed"].as_u64(), Some(0xffff_ffff_ffff_fff1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().last(), Some("SUCCESS"));
    assert!(
        !stderr.lines().any(|l| l.starts_with('[')),
        "--stat-interval 0: {stderr}"
    );
    for k in json["kinds"].as_array().expect("kinds") {
        let issued = k["issued"].as_u64().expect("issued");
        match k["name"].as_str() {
            Some("rpc") => {
                assert_eq!(k["weight"], 3);
                assert_eq!(k["percent"], 75.0);
                assert!(issued > 0);
            }
            Some("self") => assert!(issued > 0 && k["weight"] == 1),
            _ => {
                assert_eq!(issued, 0, "weight 0 disables {}", k["name"]);
                assert_eq!(k["latency_us"], Value::Null);
            }
        }
    }
}

/// The checks are live: a run with a deliberately broken "in" or "out" ordering fails with
/// that class, exit status 1, and JSON that says so.
#[test]
fn injected_ordering_faults_fail_the_run() {
    for (fault, class) in [("in-order", "in-order"), ("out-order", "out-order")] {
        let out = smpcall(&[
            "torture",
            "--cpus",
            "2",
            "--duration",
            "300ms",
            "--inject-fault",
            fault,
            "--stat-interval",
            "0",
            "--json",
            "-",
        ]);
        assert_eq!(out.status.code(), Some(1), "{fault}: {}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.trim_end().lines().last(),
            Some("FAILURE"),
            "{stderr}"
        );
        assert!(stderr.contains("violations  FOUND"), "{stderr}");
        let json: Value = serde_json::from_slice(&out.stdout).expect("stdout is the JSON report");
        assert_eq!(json["result"], "FAILURE");
        assert_eq!(json["exit_code"], 1);
        let found: Vec<(String, u64)> = json["violations"]
            .as_array()
            .expect("violations")
            .iter()
            .filter(|c| c["count"].as_u64() > Some(0))
            .map(|c| {
                (
                    c["class"].as_str().unwrap_or("?").to_owned(),
                    c["count"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{fault}: only {class} expected, got {found:?}"
        );
        assert_eq!(found[0].0, class);
        assert!(json["examples"][0]
            .as_str()
            .is_some_and(|e| e.starts_with(class)));
    }
}
