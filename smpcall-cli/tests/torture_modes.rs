//! The torture's optional stresses and `smpcall dump`, through the binary: hotplug cycling
//! (`--onoff`), IPI fault injection (`--drop-ipi`), the RCU workload (`--rcu`), and the dump
//! with calls in flight. Plus the ledger rules hotplug relies on. No assertion depends on
//! timing: counts that need the run to have lasted at all (cycles, drops, grace periods)
//! are only required to be non-zero, and every run is bounded by the binary's own timeouts.

use std::process::{Command, Output};

use serde_json::Value;
use smpcall::Error;
use smpcall_cli::torture::{verify, Kind, Ledger, Violation};

fn smpcall(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_smpcall"))
        .args(args)
        .output()
        .expect("the smpcall binary runs")
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a torture with `--json -` and returns (JSON on stdout, text block on stderr).
fn torture_json(args: &[&str]) -> (Value, String, Output) {
    let mut all = vec![
        "torture",
        "--stat-interval",
        "0",
        "--timeout",
        "20s",
        "--json",
        "-",
    ];
    all.extend_from_slice(args);
    let out = smpcall(&all);
    let json: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is the JSON report ({e}):\n{}", show(&out)));
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    (json, text, out)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn assert_success(json: &Value, text: &str, out: &Output) {
    assert!(out.status.success(), "{}", show(out));
    assert_eq!(json["result"], "SUCCESS", "{text}");
    assert_eq!(text.trim_end().lines().last(), Some("SUCCESS"), "{text}");
    let violations = json["violations"].as_array().expect("violations");
    assert!(violations.iter().all(|c| c["count"] == 0), "{violations:?}");
    assert!(violations.iter().any(|c| c["class"] == "ipi-to-offline"));
    assert!(violations.iter().any(|c| c["class"] == "rcu"));
    assert_eq!(
        json["incidents"].as_array().map(Vec::len),
        Some(0),
        "{text}"
    );
}

#[test]
fn onoff_cycles_cpus_and_counts_offline_refusals() {
    let (json, text, out) = torture_json(&[
        "--cpus",
        "4",
        "--duration",
        "1500ms",
        "--onoff",
        "20ms",
        "--seed",
        "0x0f0f",
    ]);
    assert_success(&json, &text, &out);
    let h = &json["hotplug"];
    assert!(h.is_object(), "hotplug fields in the JSON: {json}");
    assert_eq!(h["interval_ms"], 20.0);
    let downs = u(&h["cycles_offline"]);
    assert!(downs > 0, "CPUs went offline: {h}");
    // The driver brings the last CPU back before its task ends.
    assert_eq!(u(&h["cycles_online"]), downs, "{h}");
    assert!(u(&h["stop_machines"]) >= downs, "{h}");
    assert!(
        u(&h["offline_refusals"]) > 0,
        "calls were refused as offline: {h}"
    );
    assert_eq!(u(&json["offline_refusals"]), u(&h["offline_refusals"]));
    assert_eq!(u(&h["offline_runs"]), 0, "{h}");
    assert_eq!(u(&h["offline_runs_seen"]), 0, "{h}");
    assert_eq!(json["config"]["onoff_s"], 0.02);
    // Offline refusals are expected: not errors.
    assert!(json["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .all(|c| c["count"] == 0));
    let offline_by_kind: u64 = json["kinds"]
        .as_array()
        .expect("kinds")
        .iter()
        .map(|k| u(&k["offline"]))
        .sum();
    assert_eq!(offline_by_kind, u(&h["offline_refusals"]));
    assert!(text.contains("hotplug     every 20.0 ms"), "{text}");
    assert!(text.contains("offline / "), "{text}");
}

#[test]
fn dropped_ipis_are_reported_and_recovered() {
    let (json, text, out) = torture_json(&[
        "--cpus",
        "3",
        "--duration",
        "1500ms",
        "--drop-ipi",
        "0.2",
        // Interrupt-style delivery: with safe points at every step a lost IPI would rarely
        // strand a call long enough to be reported.
        "--signal-calls",
        "--seed",
        "0xd20",
        "--min-calls-per-cpu",
        "2000",
    ]);
    assert_success(&json, &text, &out);
    let f = &json["faults"];
    assert_eq!(f["drop_ipi"], 0.2);
    assert_eq!(f["stall_threshold_ms"], 20.0, "the default with faults on");
    assert!(u(&f["ipis_dropped"]) > 0, "{f}");
    assert!(
        u(&f["recoveries"]) + u(&f["ipi_resends"]) > 0,
        "stuck calls were rescued: {f}"
    );
    assert!(
        u(&f["stall_reports"]) + u(&f["queue_stall_reports"]) > 0,
        "and reported: {f}"
    );
    assert_eq!(f["unreported_stall"], false);
    assert!(f["max_call_delay_ms"].as_f64().is_some(), "{f}");
    // Reports went to the counting sink, not to stderr (no --verbose).
    assert!(u(&f["sink"]["lines"]) > 0, "{f}");
    assert!(!text.contains("smpcall: stall:"), "{text}");
    assert!(text.contains("faults      drop 0.2"), "{text}");
    assert_eq!(json["hotplug"], Value::Null);
}

#[test]
fn rcu_torture_completes_grace_periods_without_violations() {
    let (json, text, out) = torture_json(&["--cpus", "4", "--duration", "1s", "--rcu"]);
    assert_success(&json, &text, &out);
    let r = &json["rcu"];
    assert!(u(&r["grace_periods"]) > 0, "{r}");
    assert_eq!(u(&r["grace_periods"]), u(&r["writes"]), "one per swap: {r}");
    assert!(u(&r["task_reads"]) > 0 && u(&r["handler_reads"]) > 0, "{r}");
    assert_eq!(u(&r["violations"]), 0, "{r}");
    assert!(u(&r["cpus_ipid"]) + u(&r["cpus_skipped_idle"]) > 0, "{r}");
    assert!(text.contains("rcu         grace periods"), "{text}");
    // The call workload ran alongside.
    assert!(u(&json["calls_checked"]) > 0);
}

#[test]
fn rcu_alone_and_setup_errors() {
    // With every call kind at weight 0, --rcu runs alone; without --rcu that is an error.
    let (json, text, out) = torture_json(&[
        "--cpus",
        "2",
        "--duration",
        "300ms",
        "--rcu",
        "--weight",
        "*=0",
    ]);
    assert_success(&json, &text, &out);
    assert_eq!(u(&json["calls_checked"]), 0);
    assert!(u(&json["rcu"]["grace_periods"]) > 0, "{}", json["rcu"]);
    let out = smpcall(&["torture", "--duration", "100ms", "--weight", "*=0"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    // --onoff needs a CPU to take down; probabilities are within [0, 1].
    let out = smpcall(&[
        "torture",
        "--cpus",
        "1",
        "--duration",
        "100ms",
        "--onoff",
        "10ms",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--onoff needs at least 2 CPUs"));
    let out = smpcall(&["torture", "--drop-ipi", "1.5"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let out = smpcall(&["dump", "--cpus", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}

#[test]
fn dump_shows_every_cpu_calls_in_flight_and_an_nmi_report() {
    let out = smpcall(&["dump", "--cpus", "4"]);
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("smpcall dump: 4 CPUs, online {0-3}"),
        "{text}"
    );
    for cpu in 0..4 {
        assert!(
            text.contains(&format!("  CPU {cpu:>3}: online")),
            "CPU {cpu}:\n{text}"
        );
        assert!(
            text.contains(&format!("NMI CPU {cpu:>3}: online")),
            "NMI {cpu}:\n{text}"
        );
    }
    assert!(text.contains("in flight: slot 0->3 no-wait"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("NMI CPU   3") && l.contains("interrupts masked")),
        "the held CPU answered the NMI with interrupts masked:\n{text}"
    );
    assert!(text.contains("waiting for CPU 3"), "{text}");
    assert!(text.contains("the 2 call(s) in flight ran"), "{text}");
    assert!(text.trim_end().ends_with("shut down cleanly"), "{text}");
}

/// Under hotplug a refusal with `Offline` is expected (not an error), a many-call's expected
/// CPUs are the returned mask, and a run on a CPU the driver marked offline is a violation
/// (a local run by the caller itself is only counted).
#[test]
fn ledger_rules_under_hotplug() {
    let l = Ledger::new(4, 16).unwrap();
    let refused = l.begin(1, Kind::Single, 0b100).unwrap();
    l.note_offline(refused, false);
    let own = l.begin(2, Kind::Many, 0b1011).unwrap();
    l.note_offline(own, true);
    // A many-call to {0, 1, 3} that the engine sent to {0, 3} (CPU 1 was offline).
    let pruned = l.begin(2, Kind::ManyAsync, 0b1011).unwrap();
    l.settle_expected(pruned, 0b1001);
    l.deliver(pruned, Some(0), 0);
    l.deliver(pruned, Some(3), 3);
    let v = verify(&l);
    assert!(v.is_clean(), "{:?}", v.violations);
    assert_eq!(v.offline_refusals(), 2);
    assert_eq!(v.offline_own_cpu, 1);
    assert_eq!(v.total_errors(), 0);
    assert_eq!(v.per_kind[Kind::Single.index()].offline, 1);
    assert_eq!(v.deliveries_ok, 2);

    // CPU 3 is down: a call from CPU 0 that runs there is an IPI to an offline CPU; CPU 3's
    // own local run is only counted.
    l.set_offline(3, true);
    let bad = l.begin(0, Kind::SingleAsync, 0b1000).unwrap();
    l.deliver(bad, Some(3), 3);
    let local = l.begin(3, Kind::SelfSingle, 0b1000).unwrap();
    l.deliver(local, Some(3), 3);
    l.set_offline(3, false);
    let fine = l.begin(0, Kind::SingleAsync, 0b1000).unwrap();
    l.deliver(fine, Some(3), 3);
    let v = verify(&l);
    assert_eq!(v.count(Violation::IpiToOffline), 1);
    assert_eq!(v.total_violations(), 1);
    assert_eq!(l.offline_runs(), 1);
    assert_eq!(l.local_offline_runs(), 1);
    assert_eq!(v.examples[0].record.id, bad);

    // Without hotplug, the same refusal is an unexpected error.
    let strict = Ledger::new(2, 4).unwrap();
    let id = strict.begin(0, Kind::Single, 0b10).unwrap();
    strict.note_error(id, &Error::Offline(1));
    assert_eq!(verify(&strict).count(Violation::UnexpectedError), 1);
}
