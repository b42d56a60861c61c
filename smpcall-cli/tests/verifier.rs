//! The verifier can fail: records with a missing run, an extra run, a duplicate, a wrong `cpu`
//! argument, a mask mismatch or an error are each reported in their own class.

use smpcall::Error;
use smpcall_cli::torture::{verify, Kind, Ledger, Violation};

const ALL_CLASSES: [Violation; Violation::COUNT] = Violation::ALL;

/// Calls of each class in `v`, as (class, count) for the non-zero ones.
fn classes(v: &smpcall_cli::torture::Verification) -> Vec<(Violation, u64)> {
    ALL_CLASSES
        .iter()
        .map(|&c| (c, v.count(c)))
        .filter(|&(_, n)| n > 0)
        .collect()
}

#[test]
fn clean_records_verify_clean() {
    let l = Ledger::new(3, 16).unwrap();
    let a = l.begin(0, Kind::Many, 0b110).unwrap();
    l.deliver(a, Some(1), 1);
    l.deliver(a, Some(2), 2);
    let b = l.begin(2, Kind::Single, 0b100).unwrap();
    l.deliver(b, Some(2), 2);
    let c = l.begin(1, Kind::CsdAsync, 0b001).unwrap();
    l.note_refused(c);
    let v = verify(&l);
    assert!(v.is_clean(), "{:?}", classes(&v));
    assert_eq!(v.calls_checked, 3);
    assert_eq!(v.deliveries_ok, 3);
    assert_eq!(v.per_kind[Kind::CsdAsync.index()].gave_up, 1);
}

#[test]
fn missing_run_is_lost() {
    let l = Ledger::new(3, 16).unwrap();
    let id = l.begin(0, Kind::ManyAsync, 0b110).unwrap();
    l.deliver(id, Some(1), 1);
    let v = verify(&l);
    assert_eq!(classes(&v), [(Violation::Lost, 1)]);
    let e = v.examples[0];
    assert_eq!(
        (e.class, e.record.id, e.record.kind),
        (Violation::Lost, id, Some(Kind::ManyAsync))
    );
    assert_eq!((e.record.expected, e.record.ran), (0b110, 0b010));
}

#[test]
fn extra_run_is_unexpected_cpu() {
    let l = Ledger::new(3, 16).unwrap();
    let id = l.begin(1, Kind::SingleAsync, 0b001).unwrap();
    l.deliver(id, Some(0), 0);
    l.deliver(id, Some(2), 2);
    let v = verify(&l);
    assert_eq!(classes(&v), [(Violation::UnexpectedCpu, 1)]);
}

#[test]
fn second_run_is_duplicated() {
    let l = Ledger::new(2, 16).unwrap();
    let id = l.begin(0, Kind::Single, 0b10).unwrap();
    l.deliver(id, Some(1), 1);
    l.deliver(id, Some(1), 1);
    let v = verify(&l);
    assert_eq!(classes(&v), [(Violation::Duplicated, 1)]);
    assert_eq!(v.examples[0].record.duplicated, 0b10);
    assert_eq!(v.deliveries_ok, 0, "a duplicated run is not a good run");
}

#[test]
fn wrong_cpu_argument_or_no_cpu_is_flagged() {
    let l = Ledger::new(2, 16).unwrap();
    // Ran on CPU 1 but was told it runs on CPU 0.
    let a = l.begin(0, Kind::All, 0b10).unwrap();
    l.deliver(a, Some(1), 0);
    // Ran on a thread that is no CPU at all: wrong, and lost where it should have run.
    let b = l.begin(0, Kind::Others, 0b10).unwrap();
    l.deliver(b, None, 1);
    let v = verify(&l);
    assert_eq!(
        classes(&v),
        [(Violation::Lost, 1), (Violation::WrongCpuArg, 2)]
    );
}

#[test]
fn sender_side_findings_are_violations() {
    let l = Ledger::new(2, 16).unwrap();
    let a = l.begin(0, Kind::Cond, 0b11).unwrap();
    l.deliver(a, Some(0), 0);
    l.deliver(a, Some(1), 1);
    l.note_mask_mismatch(a);
    let b = l.begin(1, Kind::AllAsync, 0b11).unwrap();
    l.note_error(b, &Error::Offline(0));
    let v = verify(&l);
    assert_eq!(
        classes(&v),
        [
            (Violation::MaskMismatch, 1),
            (Violation::UnexpectedError, 1)
        ]
    );
    assert_eq!(v.total_errors(), 1);
    // A refused or failed call that runs anyway ran somewhere it should not have.
    l.deliver(b, Some(0), 0);
    assert_eq!(verify(&l).count(Violation::UnexpectedCpu), 1);
}

#[test]
fn unknown_record_is_an_orphan() {
    let big = Ledger::new(1, 64).unwrap();
    let mut id = big.begin(0, Kind::Single, 1).unwrap();
    for _ in 0..40 {
        id = big.begin(0, Kind::Single, 1).unwrap();
    }
    let small = Ledger::new(1, 8).unwrap();
    small.deliver(id, Some(0), 0);
    assert_eq!(classes(&verify(&small)), [(Violation::Orphan, 1)]);
}

#[test]
fn capacity_and_cpu_limits() {
    let l = Ledger::new(1, 2).unwrap();
    assert!(l.begin(0, Kind::Single, 1).is_some());
    assert!(l.begin(0, Kind::Single, 1).is_some());
    assert!(l.begin(0, Kind::Single, 1).is_none(), "capacity is 2");
    assert_eq!(l.issued(0), 2);
    assert!(Ledger::new(65, 1).is_err());
    assert!(Ledger::new(0, 1).is_err());
}
