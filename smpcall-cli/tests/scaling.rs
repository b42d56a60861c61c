//! Scaling with the CPU count, counted deterministically (no clock): a sender's instructions
//! per target (callgrind, when valgrind is installed) and the simulator's steps per target must
//! not grow by more than 2× from 8 to 1024 CPUs.

mod common;

use std::path::Path;

use smpcall_cli::bench::scaling::{self, Memory, ScalingConfig, MAX_GROWTH};

#[test]
fn per_target_cost_is_flat_from_8_to_1024_cpus() {
    let cfg = ScalingConfig {
        sizes: vec![8, 1024],
        ..ScalingConfig::default()
    };
    let s =
        scaling::measure(Path::new(env!("CARGO_BIN_EXE_smpcall")), &cfg).expect("scaling measures");
    println!("{s}");
    let flat = s.flatness();
    match &s.instructions_unavailable {
        // Without valgrind only the simulator's steps are checked; say so in the test output.
        Some(why) => {
            eprintln!("instruction counts skipped: {why}");
            assert_eq!(flat.len(), 1, "{s}");
        }
        None => {
            assert_eq!(flat.len(), 3, "{s}");
            for r in &s.rows {
                for ir in [
                    r.async_sender_ir,
                    r.async_target_ir,
                    r.sync_sender_ir,
                    r.sync_target_ir,
                ] {
                    assert!(ir.is_some_and(|v| v > 0.0), "{s}");
                }
            }
        }
    }
    for f in &flat {
        assert!(
            f.growth <= MAX_GROWTH,
            "{} grew {:.2}× ({:.1} → {:.1}):\n{s}",
            f.what,
            f.growth,
            f.small,
            f.large
        );
    }
    assert!(s.check());
    for r in &s.rows {
        assert_eq!(r.ipis_per_target, 1.0, "every idle target gets one IPI");
        assert_eq!(
            r.ipi_batches, 0,
            "an IPI to each target as it is queued, no batch"
        );
        assert_eq!(r.memory, Memory::of(r.cpus));
    }
}

#[test]
fn memory_grows_by_one_slot_per_cpu() {
    let (a, b) = (Memory::of(8), Memory::of(1024));
    assert_eq!(a.per_cpu_state, std::mem::size_of::<smpcall::PerCpu>());
    assert_eq!(a.slot, std::mem::size_of::<smpcall::Csd>());
    assert_eq!(b.per_cpu_total - a.per_cpu_total, (1024 - 8) * a.slot);
}

#[test]
fn cli_scaling_prints_the_table_and_writes_json() {
    let dir = std::env::temp_dir().join(format!("smpcall-scaling-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("s.json");
    let mut args: Vec<std::ffi::OsString> = ["bench", "--scaling", "--cpus", "2,8,16", "--check"]
        .map(Into::into)
        .to_vec();
    args.push("--json".into());
    args.push(json.clone().into());
    let stdout = common::run_ok(&args);
    for word in ["CPUs", "bytes per CPU", "size_of::<PerCpu>()", "PASS"] {
        assert!(stdout.contains(word), "missing {word}:\n{stdout}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).expect("valid JSON");
    assert_eq!(v["rows"].as_array().map(Vec::len), Some(3));
    assert!(v["rows"][2]["memory"]["per_cpu_total"].as_u64().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_cost_accounts_for_both_sides_of_a_call() {
    if let Err(why) = smpcall_cli::bench::callgrind::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let stdout = common::run_ok(&["bench", "--cost"]);
    for word in [
        "sender:",
        "target:",
        "engine.rs: call_single",
        "engine.rs: wait_csd",
        "queue.rs: push",
        "queue.rs: flush",
        "csd.rs: claim_exclusive",
        "call_single_async to a polling CPU",
        "engine.rs: call_single_async",
        "per-call diagnostics:",
    ] {
        assert!(stdout.contains(word), "missing {word}:\n{stdout}");
    }
}
