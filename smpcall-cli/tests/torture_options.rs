//! Torture options: weight parsing and application, and that weight 0 disables a kind.

use std::time::Duration;

use clap::Parser;
use smpcall_cli::torture::cli::TortureOptions;
use smpcall_cli::torture::{self, Config, Kind, Mix, WeightSpec};

#[derive(Debug, Parser)]
struct Cmd {
    #[command(flatten)]
    options: TortureOptions,
}

fn parse(args: &[&str]) -> Result<TortureOptions, clap::Error> {
    Cmd::try_parse_from(std::iter::once("torture").chain(args.iter().copied())).map(|c| c.options)
}

#[test]
fn weight_specs_parse() {
    assert_eq!(
        "rpc=5".parse::<WeightSpec>(),
        Ok(WeightSpec {
            kind: Some(Kind::Rpc),
            weight: 5
        })
    );
    assert_eq!(
        "*=0".parse::<WeightSpec>(),
        Ok(WeightSpec {
            kind: None,
            weight: 0
        })
    );
    assert_eq!(
        " self-async = 2 ".parse::<WeightSpec>().map(|s| s.kind),
        Ok(Some(Kind::SelfAsync))
    );
    for bad in ["rpc", "rpc=", "rpc=-1", "rpc=x", "nope=1", "=3"] {
        assert!(bad.parse::<WeightSpec>().is_err(), "{bad} should not parse");
    }
    // Every kind has a name that parses back, and a --weight-NAME flag.
    for kind in Kind::ALL {
        let flag = format!("--weight-{}", kind.name());
        let o = parse(&[&flag, "9"]).unwrap_or_else(|e| panic!("{flag}: {e}"));
        let mix = o.mix(Mix::default());
        assert_eq!(mix.weight(kind), 9, "{flag}");
    }
}

#[test]
fn weights_apply_in_order_then_flags() {
    let o = parse(&[
        "--weight",
        "*=0",
        "--weight",
        "many=4",
        "--weight",
        "rpc=2",
        "--weight-rpc",
        "6",
        "--long-wait",
    ])
    .unwrap();
    let mut cfg = Config::default();
    o.apply(&mut cfg);
    assert!(cfg.long_wait);
    let mix = cfg.mix;
    assert_eq!(mix.weight(Kind::Many), 4);
    assert_eq!(mix.weight(Kind::Rpc), 6, "the --weight-KIND flag wins");
    assert_eq!(mix.total(), 10);
    assert_eq!(mix.percent(Kind::Many), 40.0);
    assert_eq!(mix.percent(Kind::Single), 0.0);
    // Without options, the defaults stay.
    let none = parse(&[]).unwrap();
    assert_eq!(none.mix(Mix::default()), Mix::default());
    assert_eq!(none.stat_interval, Duration::from_secs(1));
    assert!(parse(&["--weight", "bogus=1"]).is_err());
    assert!(parse(&["--weight-single", "-2"]).is_err());
}

/// A run with some kinds at weight 0 issues none of them, and only them.
#[test]
fn zero_weight_disables_a_kind_in_a_run() {
    let mix = Mix::uniform()
        .with_weight(Kind::All, 0)
        .with_weight(Kind::SingleAsync, 0)
        .with_weight(Kind::Rpc, 0);
    let report = torture::run(&Config {
        cpus: 2,
        duration: Duration::from_millis(500),
        seed: 11,
        min_calls_per_cpu: 500,
        mix,
        timeout: Duration::from_secs(20),
        ..Config::default()
    })
    .expect("the torture machine should start");
    assert!(report.success(), "{report}");
    for kind in Kind::ALL {
        let issued = report.issued(kind);
        if mix.weight(kind) == 0 {
            assert_eq!(issued, 0, "{kind} has weight 0:\n{report}");
            assert!(report.latency[kind.index()].is_none());
        } else {
            assert!(
                issued > 0,
                "{kind} has weight {}:\n{report}",
                mix.weight(kind)
            );
        }
    }
}

/// Setup errors name the option values that were wrong (and nothing runs).
#[test]
fn setup_errors_name_the_values_given() {
    let refused = |cfg: Config| match torture::run(&cfg) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(
        refused(Config {
            cpus: 65,
            ..Config::default()
        }),
        "torture needs between 1 and 64 CPUs, not 65"
    );
    assert_eq!(
        refused(Config {
            cpus: 1,
            onoff: Some(Duration::from_millis(10)),
            ..Config::default()
        }),
        "--onoff needs at least 2 CPUs, not 1 (CPU 0 drives, the others go down)"
    );
    assert_eq!(
        refused(Config {
            cpus: 60,
            churn: 5,
            ..Config::default()
        }),
        "--cpus 60 plus --churn 5 is 65, more than 64 (the ledger's CPU sets)"
    );
    let e = smpcall_cli::dump::run(&smpcall_cli::dump::DumpArgs {
        cpus: 1,
        timeout: Duration::from_secs(5),
    })
    .expect_err("refused")
    .to_string();
    assert_eq!(e, "dump needs between 2 and 1024 CPUs, not 1");
}
