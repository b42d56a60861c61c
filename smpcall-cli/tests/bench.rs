//! `smpcall bench` in quick mode: every row is there with sane figures, the JSON carries every
//! row, the plot is an SVG. No timing is asserted (the machine is shared and noisy): only
//! that numbers are positive, finite and ordered as percentiles must be.

mod common;

use std::collections::BTreeSet;

use smpcall_cli::bench::{self, Category, Config, Report, Side, ROW_IDS};

fn finite_positive(x: f64, what: &str) {
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
}

fn check_report(report: &Report) {
    let measured: BTreeSet<&str> = report.rows.iter().map(|r| r.id.as_str()).collect();
    for id in ROW_IDS {
        let skipped = report.skipped.iter().find(|s| s.id == *id);
        match skipped {
            // Only membarrier (a kernel without it) and liburcu's rows (not installed) may be
            // missing, and then they say why.
            Some(s) if id.contains("_urcu_") => {
                assert_eq!(s.reason, bench::urcu::NOT_INSTALLED, "row {id}");
            }
            Some(s) => {
                assert_eq!(*id, "membarrier", "row {id} not measured: {}", s.reason);
                assert!(!s.reason.is_empty());
            }
            None => assert!(measured.contains(id), "row {id} missing"),
        }
    }
    finite_positive(report.floor_ns, "floor");
    for r in &report.rows {
        let id = &r.id;
        assert!(!r.passes.is_empty(), "{id}: no pass figures");
        if !r.category.is_latency() {
            let t = r
                .throughput
                .as_ref()
                .unwrap_or_else(|| panic!("{id}: no rate"));
            finite_positive(t.median_per_s, id);
            finite_positive(t.ns_per_message, id);
            assert!(t.min_per_s <= t.median_per_s && t.median_per_s <= t.max_per_s);
            assert!(t.rounds >= 1);
        } else {
            let l = r
                .latency
                .as_ref()
                .unwrap_or_else(|| panic!("{id}: no latency"));
            assert!(l.count > 0, "{id}: no samples");
            finite_positive(l.min_ns, id);
            assert!(
                l.min_ns <= l.median_ns
                    && l.median_ns <= l.p90_ns
                    && l.p90_ns <= l.p99_ns
                    && l.p99_ns <= l.max_ns,
                "{id}: percentiles out of order: {l:?}"
            );
            finite_positive(r.ratio_floor.unwrap_or(f64::NAN), &format!("{id} ×floor"));
            assert!(r.passes.iter().all(|p| p.floor_ns.is_some_and(|f| f > 0.0)));
        }
        if r.side == Side::Ours && r.category != Category::RcuRead {
            let d = r
                .delivery
                .unwrap_or_else(|| panic!("{id}: no delivery counts"));
            assert!(d.calls > 0, "{id}");
        }
        if r.side != Side::Floor && r.category != Category::StopMachine {
            finite_positive(
                r.ratio_best_peer.unwrap_or(f64::NAN),
                &format!("{id} ×best peer"),
            );
        }
        for t in &r.targets {
            finite_positive(t.ratio, &format!("{id} target ratio"));
        }
    }
    // Every performance target is evaluated — but those against liburcu when it is not
    // installed, which say so — and says what it is without citing a document.
    assert_eq!(
        report.targets().count() + report.not_evaluated.len(),
        10,
        "{report}"
    );
    for n in &report.not_evaluated {
        assert_eq!(n.reason, bench::urcu::NOT_INSTALLED, "{n:?}");
    }
    for (id, t) in report.targets() {
        assert!(
            !t.target.contains('§') && !t.target.contains("issue") && t.target.len() > 20,
            "{id}: target not self-explanatory: {}",
            t.target
        );
    }
    let table = report.to_string();
    for r in &report.rows {
        assert!(table.contains(&r.name), "table lacks {}:\n{table}", r.name);
    }
    assert!(table.contains("noise:"), "{table}");
}

#[test]
fn quick_bench_reports_every_row_and_json_has_them() {
    let report = bench::run(&Config::quick()).expect("quick bench runs");
    check_report(&report);

    let json: serde_json::Value = serde_json::from_str(&report.to_json()).expect("valid JSON");
    assert_eq!(json["schema_version"], smpcall_cli::JSON_SCHEMA_VERSION);
    let rows = json["rows"].as_array().expect("rows array");
    let ids: BTreeSet<&str> = rows.iter().filter_map(|r| r["id"].as_str()).collect();
    for r in &report.rows {
        assert!(ids.contains(r.id.as_str()), "JSON lacks {}", r.id);
    }
    for r in rows {
        let fig = if r["latency"].is_object() {
            r["latency"]["median_ns"].as_f64()
        } else {
            r["throughput"]["median_per_s"].as_f64()
        };
        assert!(fig.is_some_and(|v| v > 0.0), "{r}");
    }
    assert!(json["noise"]["floor_start_ns"].as_f64().is_some());

    let dir = std::env::temp_dir().join(format!("smpcall-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("latency.svg");
    bench::plot::write_svg(&report, &svg).expect("plot written");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains("<svg") && text.contains("floor"),
        "not an SVG"
    );
    assert!(bench::plot::write_svg(&report, &dir.join("latency.png")).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A quick bench run with few round trips per row.
const QUICK: [&str; 6] = [
    "bench",
    "--quick",
    "--iterations",
    "300",
    "--row-time",
    "40ms",
];

#[test]
fn cli_bench_quick_writes_json_and_plot() {
    let dir = std::env::temp_dir().join(format!("smpcall-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("b.json"), dir.join("b.svg"));
    let mut args: Vec<std::ffi::OsString> = QUICK.map(Into::into).to_vec();
    args.extend(["--json".into(), json.clone().into()]);
    args.extend(["--plot".into(), svg.clone().into()]);
    let stdout = common::run_ok(&args);
    for word in ["×floor", "×best peer", "performance targets:", "noise:"] {
        assert!(stdout.contains(word), "missing {word}:\n{stdout}");
    }
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).expect("valid JSON");
    assert!(parsed["rows"].as_array().is_some_and(|r| r.len() >= 20));
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The user-space RCU rows are in the JSON: smpcall's measured, each liburcu flavour's either
/// measured or skipped as not installed (and then its targets not evaluated).
#[test]
fn cli_bench_quick_json_has_the_rcu_rows() {
    let dir = std::env::temp_dir().join(format!("smpcall-bench-rcu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("b.json");
    let mut args: Vec<std::ffi::OsString> = QUICK.map(Into::into).to_vec();
    args.extend(["--json".into(), json.clone().into()]);
    let stdout = common::run_ok(&args);
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).expect("valid JSON");
    let _ = std::fs::remove_dir_all(&dir);
    let rows = parsed["rows"].as_array().expect("rows");
    let skipped = parsed["skipped"].as_array().expect("skipped");
    let row = |id: &str| rows.iter().find(|r| r["id"] == id);
    let skip = |id: &str| skipped.iter().find(|r| r["id"] == id);
    for id in [
        "rcu_read_smpcall",
        "rcu_gp_busy_smpcall",
        "rcu_gp_blocked_smpcall",
    ] {
        let r = row(id).unwrap_or_else(|| panic!("{id} missing:\n{stdout}"));
        let figure = if id == "rcu_read_smpcall" {
            r["throughput"]["ns_per_message"].as_f64()
        } else {
            r["latency"]["median_ns"].as_f64()
        };
        assert!(figure.is_some_and(|v| v > 0.0), "{r}");
    }
    let mut installed = 0;
    for kind in ["rcu_read", "rcu_gp_busy", "rcu_gp_blocked"] {
        for flavour in ["memb", "mb", "signal", "qsbr"] {
            let id = format!("{kind}_urcu_{flavour}");
            match (row(&id), skip(&id)) {
                (Some(r), None) => {
                    assert!(r["side"] == "peer", "{r}");
                    installed += 1;
                }
                (None, Some(s)) => {
                    assert_eq!(s["reason"], bench::urcu::NOT_INSTALLED, "{s}");
                    assert!(stdout.contains(bench::urcu::NOT_INSTALLED), "{stdout}");
                }
                _ => panic!("{id}: neither measured nor skipped once:\n{stdout}"),
            }
        }
    }
    let not_evaluated = parsed["not_evaluated"].as_array().expect("not_evaluated");
    if installed == 12 {
        assert!(not_evaluated.is_empty(), "{parsed}");
        assert!(stdout.contains("liburcu-qsbr"), "{stdout}");
    } else {
        assert!(!not_evaluated.is_empty(), "{parsed}");
        assert!(stdout.contains("not evaluated"), "{stdout}");
    }
}

#[test]
fn bad_output_paths_fail_before_measuring() {
    let dir = std::env::temp_dir().join(format!("smpcall-bench-paths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("no-such-dir").join("b.json");
    let png = dir.join("b.png");
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["bench", "--quick", "--json", missing.to_str().unwrap()],
            "does not exist",
        ),
        (
            vec!["bench", "--quick", "--json", dir.to_str().unwrap()],
            "is a directory",
        ),
        (
            vec!["bench", "--quick", "--plot", png.to_str().unwrap()],
            "use a .svg file",
        ),
        (
            vec!["bench", "--scaling", "--json", missing.to_str().unwrap()],
            "does not exist",
        ),
    ];
    for (args, why) in cases {
        let (out, took) = common::run(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}\n{stdout}\n{stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        // Nothing was measured: no table, and well under a quick run's time.
        assert!(
            !stdout.contains("×floor") && !stdout.contains("CPUs"),
            "{stdout}"
        );
        assert!(
            took < std::time::Duration::from_secs(5),
            "{args:?} took {took:?}"
        );
    }
    assert!(!missing.exists() && !png.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_turns_a_missed_target_into_exit_status_1() {
    let (out, _) = common::run(&[QUICK.as_slice(), &["--check"]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("performance targets:"))
        .unwrap_or_else(|| panic!("no targets line:\n{stdout}"));
    // Timing is noisy here: whichever way the targets went, the status must agree with them.
    let all_met = !line.contains("missed:");
    let expected = if all_met { 0 } else { 1 };
    assert_eq!(out.status.code(), Some(expected), "{line}\n{stdout}");
}
