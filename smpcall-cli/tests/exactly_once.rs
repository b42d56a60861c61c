//! The exactly-once test: every CPU issues thousands of mixed calls of every kind to every
//! CPU concurrently, and the verifier checks each call ran exactly once on each CPU it was
//! meant for, each function saw its caller's writes and each waiting caller its functions'.
//! (That the verifier can fail at all is shown in `verifier.rs`.)

use std::sync::Mutex;
use std::time::Duration;

use smpcall_cli::torture::{self, Config, Kind, Mix, Report, Violation};

/// Runs one machine at a time: concurrent machines would share the two cores unpredictably.
static ONE_MACHINE: Mutex<()> = Mutex::new(());

/// Each kind must have been exercised at least this often, counted call by call.
const MIN_PER_KIND: u64 = 50;

fn run(cpus: usize, seed: u64, long_wait: bool) -> Report {
    let _one = ONE_MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = Config {
        cpus,
        duration: Duration::from_millis(1500),
        seed,
        // Every kind equally often, and enough calls however slow the host is: this test is
        // about covering each of them (3000 calls: ~210 per kind on average).
        mix: Mix::uniform(),
        min_calls_per_cpu: 3_000 / cpus as u64 + 1,
        long_wait,
        timeout: Duration::from_secs(20),
        ..Config::default()
    };
    let report = torture::run(&cfg).expect("the torture machine should start");
    println!("{report}");
    report
}

fn assert_exactly_once(report: &Report) {
    let v = &report.verification;
    assert!(
        report.incidents.is_empty(),
        "incidents: {:?}",
        report.incidents
    );
    assert!(
        v.is_clean(),
        "violations {:?}, e.g. {:?}",
        v.violations,
        v.examples
    );
    assert_eq!(
        v.total_errors(),
        0,
        "unexpected errors: {:?}",
        v.errors_by_class
    );
    for kind in Kind::ALL {
        let t = &v.per_kind[kind.index()];
        assert!(
            t.accepted >= MIN_PER_KIND,
            "{kind}: only {} calls accepted (want >= {MIN_PER_KIND})",
            t.accepted
        );
        let lat = report.latency[kind.index()].expect("every kind has latency samples");
        assert!(
            lat.samples > 0 && lat.p50_us <= lat.max_us,
            "{kind}: {lat:?}"
        );
    }
    // The ordering checks ran (and, the report being clean, passed).
    assert!(report.out_checked() > 0);
    assert_eq!(
        v.count(Violation::InOrder) + v.count(Violation::OutOrder),
        0
    );
    // Every record was checked, and every expected function run happened exactly once.
    let issued: u64 = v.per_kind.iter().map(|t| t.issued).sum();
    let deliveries: u64 = v.per_kind.iter().map(|t| t.deliveries).sum();
    assert_eq!(v.calls_checked, issued);
    assert_eq!(v.deliveries_ok, deliveries);
    assert!(report.success());
    assert!(report.to_string().ends_with("SUCCESS"));
}

#[test]
fn exactly_once_on_two_cpus() {
    let report = run(2, 0x5eed_0002, false);
    assert_exactly_once(&report);
    assert!(report.engine.ipi_sent > 0, "calls to a busy CPU need IPIs");
}

#[test]
fn exactly_once_on_more_cpus_than_cores_with_long_waits() {
    let report = run(6, 0x5eed_0006, true);
    assert_exactly_once(&report);
}
