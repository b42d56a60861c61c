//! The verifier can fail: records with a missing run, an extra run, a duplicate, a wrong `cpu`
//! argument, a function that does not see its caller's writes ("in"), a caller that does not
//! see its functions' writes ("out"), an rpc that never completes, a mask mismatch or an error
//! are each reported in their own class.

use std::time::Duration;

use smpcall::Error;
use smpcall_cli::torture::ledger::{expected_out, in_token, out_part};
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
    let e = Ledger::new(65, 1).err().unwrap().to_string();
    assert_eq!(e, "torture needs between 1 and 64 CPUs, not 65");
    assert!(Ledger::new(0, 1).is_err());
    let e = Ledger::new(2, 0).err().unwrap().to_string();
    assert!(e.contains("--max-calls-per-cpu 0 is outside 1..="), "{e}");
}

#[test]
fn in_value_that_does_not_match_is_in_order() {
    let l = Ledger::new(3, 16).unwrap();
    // The caller's store never reached the function: it reads the record's initial 0.
    let a = l.begin(0, Kind::SingleAsync, 0b010).unwrap();
    l.stamp_in_with(a, 0);
    l.deliver(a, Some(1), 1);
    // It reads an almost-right value: one bit off is still wrong.
    let b = l.begin(0, Kind::Single, 0b100).unwrap();
    l.stamp_in_with(b, in_token(b) ^ 1);
    l.deliver(b, Some(2), 2);
    // It reads the token of the sender's previous call (a stale record): wrong too.
    let c = l.begin(0, Kind::ManyAsync, 0b110).unwrap();
    l.stamp_in_with(c, in_token(b));
    l.deliver(c, Some(1), 1);
    l.deliver(c, Some(2), 2);
    let v = verify(&l);
    assert_eq!(classes(&v), [(Violation::InOrder, 3)]);
    assert_eq!(
        l.live().in_order,
        4,
        "one per function run that saw a wrong value"
    );
    let e = v.examples[0];
    assert_eq!((e.class, e.record.id), (Violation::InOrder, a));
    assert_eq!((e.record.in_bad, e.record.in_seen), (0b010, 0));
    assert_eq!(v.examples[1].record.in_seen, in_token(b) ^ 1);
    assert_eq!(v.examples[2].record.in_bad, 0b110);
    // The exactly-once part of those calls is fine: each ran once where it should.
    assert_eq!(v.deliveries_ok, 4);
}

#[test]
fn in_tokens_are_per_call_and_never_zero() {
    let l = Ledger::new(2, 64).unwrap();
    let ids: Vec<_> = (0..32)
        .map(|i| l.begin(i % 2, Kind::Single, 1).unwrap())
        .collect();
    let mut tokens: Vec<u64> = ids.iter().map(|&id| in_token(id)).collect();
    assert!(tokens.iter().all(|&t| t != 0));
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), ids.len(), "every call has its own token");
    // The out parts differ per CPU, so a sum over the wrong CPUs does not match.
    let id = ids[0];
    assert_ne!(out_part(id, 0), out_part(id, 1));
    assert_ne!(expected_out(id, 0b01), expected_out(id, 0b10));
    assert_eq!(expected_out(id, 0), 0);
}

#[test]
fn caller_that_does_not_see_the_functions_writes_is_out_order() {
    let l = Ledger::new(3, 16).unwrap();
    // A waiting single call that "returned" before its function ran: the caller sees nothing.
    let a = l.begin(0, Kind::Single, 0b010).unwrap();
    assert!(!l.check_out(a));
    l.deliver(a, Some(1), 1); // It runs afterwards: not lost, but the caller did not see it.
                              // A waiting many-call that returned after only one of its two functions.
    let b = l.begin(0, Kind::Many, 0b110).unwrap();
    l.deliver(b, Some(1), 1);
    assert!(!l.check_out(b));
    l.deliver(b, Some(2), 2);
    // A many-call whose functions all ran before the return: clean.
    let c = l.begin(0, Kind::All, 0b111).unwrap();
    for cpu in 0..3 {
        l.deliver(c, Some(cpu), cpu);
    }
    assert!(l.check_out(c));
    let v = verify(&l);
    assert_eq!(classes(&v), [(Violation::OutOrder, 2)]);
    assert_eq!(l.live().out_order, 2);
    let e = v.examples[1];
    assert_eq!(e.record.id, b);
    assert_eq!(e.record.out_seen, out_part(b, 1));
}

#[test]
fn duplicate_run_also_spoils_the_out_value() {
    let l = Ledger::new(2, 16).unwrap();
    let id = l.begin(0, Kind::Single, 0b10).unwrap();
    l.deliver(id, Some(1), 1);
    l.deliver(id, Some(1), 1);
    assert!(!l.check_out(id));
    assert_eq!(
        classes(&verify(&l)),
        [(Violation::Duplicated, 1), (Violation::OutOrder, 1)]
    );
}

#[test]
fn rpc_that_never_completes_times_out_instead_of_hanging() {
    let l = Ledger::new(2, 16).unwrap();
    let id = l.begin(0, Kind::Rpc, 0b10).unwrap();
    assert!(!l.wait_done(id, 1, Duration::from_millis(20), true));
    assert_eq!(
        classes(&verify(&l)),
        [(Violation::Lost, 1), (Violation::RpcTimeout, 1)]
    );
    // A completed rpc passes both its wait and its out check.
    let ok = l.begin(1, Kind::Rpc, 0b01).unwrap();
    l.deliver_spinning(ok, Some(0), 0, 2_000);
    assert!(l.wait_done(ok, 1, Duration::from_secs(10), true));
    assert!(l.check_out(ok));
    assert_eq!(l.live().rpc_timeout, 1);
}

#[test]
fn offline_refusals_are_counted_on_their_own() {
    let l = Ledger::new(2, 16).unwrap();
    let id = l.begin(0, Kind::Single, 0b10).unwrap();
    l.note_error(id, &Error::Offline(1));
    let v = verify(&l);
    assert_eq!(v.offline_refusals(), 1);
    // Without --onoff no CPU goes offline during a run: such a refusal is unexpected (with
    // it, the worker records it with `note_offline` instead: see `torture_modes.rs`).
    assert_eq!(classes(&v), [(Violation::UnexpectedError, 1)]);
}
