//! Errors carry the offending value: each refusal, made through the public API, names what was
//! given and what was allowed. (Signals a build would have to claim are tested in
//! `signals.rs`, which serialises its changes to the process's signal dispositions.)

mod common;

use std::time::Duration;

use common::LIMIT;
use smpcall::hosted::{Faults, Machine, MachineBuilder};
use smpcall::{
    ConfigError, CpuId, Csd, Engine, Error, HeapStorage, IpiFault, PerCpu, Platform, SignalRole,
    Storage,
};

/// Asserts that `e`'s message contains every one of `values`.
#[track_caller]
fn names(e: &Error, values: &[&str]) {
    let text = e.to_string();
    for v in values {
        assert!(text.contains(v), "{text:?} does not name {v:?}");
    }
}

#[test]
fn a_signal_that_is_not_real_time_is_named_with_the_real_time_range() {
    let (lo, hi) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let e = Machine::builder()
        .cpus(2)
        .signal(libc::SIGUSR1)
        .build()
        .unwrap_err();
    assert_eq!(
        e,
        Error::InvalidConfig(ConfigError::NotRealTimeSignal {
            role: SignalRole::Ipi,
            signal: libc::SIGUSR1,
            min: lo,
            max: hi,
        })
    );
    names(
        &e,
        &[
            &format!("IPI signal {}", libc::SIGUSR1),
            &format!("({lo}..={hi})"),
        ],
    );
    let e = Machine::builder()
        .cpus(2)
        .nmi_signal(hi + 1)
        .build()
        .unwrap_err();
    names(
        &e,
        &[&format!("NMI signal {}", hi + 1), &format!("({lo}..={hi})")],
    );
}

/// Asserts that a 2-CPU machine from `b` is refused at `build` with `expected`, whose message
/// names `values`.
#[track_caller]
fn refused(b: MachineBuilder, expected: ConfigError, values: &[&str]) {
    let e = b.cpus(2).build().unwrap_err();
    assert_eq!(e, Error::InvalidConfig(expected));
    names(&e, values);
}

/// A 2-CPU machine from `b`, which must build.
#[track_caller]
fn built(b: MachineBuilder) -> Machine {
    b.cpus(2).build().unwrap()
}

#[test]
fn too_many_no_wait_slots_are_named_with_the_maximum() {
    refused(
        Machine::builder().no_wait_slots(200),
        ConfigError::NoWaitSlots {
            requested: 200,
            max: 64,
        },
        &["no_wait_slots(200)", "1..=64"],
    );
    // The largest allowed still builds.
    built(Machine::builder().no_wait_slots(64))
        .shutdown()
        .unwrap();
}

/// Before: `no_wait_slots(0)` was silently taken as 1.
#[test]
fn zero_no_wait_slots_are_named_with_the_range() {
    refused(
        Machine::builder().no_wait_slots(0),
        ConfigError::NoWaitSlots {
            requested: 0,
            max: 64,
        },
        &["no_wait_slots(0)", "1..=64"],
    );
}

/// Before: `foreign_senders` above 64 was silently taken as 64.
#[test]
fn too_many_foreign_senders_are_named_with_the_range() {
    refused(
        Machine::builder().foreign_senders(65),
        ConfigError::ForeignSenders {
            requested: 65,
            max: 64,
        },
        &["foreign_senders(65)", "0..=64"],
    );
    // Both ends of the range still build; with no row, a thread that is not a CPU cannot
    // queue a no-wait call.
    built(Machine::builder().foreign_senders(64))
        .shutdown()
        .unwrap();
    let m = built(Machine::builder().foreign_senders(0));
    assert!(matches!(
        m.engine().call_single_async(1, |_| ()),
        Err(Error::Unsupported(_))
    ));
    m.shutdown().unwrap();
}

#[test]
fn a_bad_fault_probability_is_named_at_build_and_at_run_time() {
    let e = Machine::builder()
        .cpus(2)
        .faults(Faults::none().drop_ipi(1.5))
        .build()
        .unwrap_err();
    let Error::InvalidConfig(c) = e else {
        panic!("{e:?}");
    };
    assert!(matches!(
        c,
        ConfigError::FaultProbability {
            fault: IpiFault::Drop,
            ..
        }
    ));
    assert_eq!(c.probability(), Some(1.5));
    names(&e, &["drop probability 1.5", "[0, 1]"]);

    let m = Machine::builder().cpus(2).build().unwrap();
    let e = m
        .platform()
        .set_faults(Faults::none().delay_ipi(-0.25))
        .unwrap_err();
    names(&e, &["delay probability -0.25"]);
    let e = m
        .platform()
        .set_faults(Faults::none().delay_ipi(f64::NAN))
        .unwrap_err();
    names(&e, &["delay probability NaN"]);
    m.shutdown().unwrap();
}

#[test]
fn a_zero_timeout_is_refused() {
    let e = Machine::builder()
        .cpus(2)
        .timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e, Error::InvalidConfig(ConfigError::ZeroTimeout));
    names(&e, &["timeout is zero"]);
}

#[test]
fn a_second_join_is_misuse_not_configuration() {
    let m = Machine::builder().cpus(2).build().unwrap();
    let mut t = m.run_on(1, |_| 7);
    assert_eq!(t.join_timeout(LIMIT), Ok(7));
    assert_eq!(t.join_timeout(LIMIT), Err(Error::AlreadyJoined));
    assert_eq!(t.join(), Err(Error::AlreadyJoined));
    m.shutdown().unwrap();
}

/// A platform for [`Engine::new`] alone: the engine is never built, so no CPU, IPI or mask is
/// ever needed.
struct NoCpus;

// SAFETY: only passed to `Engine::new` calls that are refused: nothing ever runs on it.
unsafe impl Platform for NoCpus {
    type IrqState = ();
    fn current_cpu(&self) -> Option<CpuId> {
        None
    }
    fn send_ipi(&self, _cpu: CpuId) {}
    fn irq_save(&self) {}
    unsafe fn irq_restore(&self, _state: ()) {}
    fn irqs_masked(&self) -> bool {
        false
    }
}

/// Storage for 3 CPUs that shows only the first `slots` call-data slots and `foreign` foreign
/// ones of a valid layout, to see [`Engine::new`] refuse a wrong one.
struct Truncated {
    whole: HeapStorage,
    slots: usize,
    foreign: usize,
}

impl Truncated {
    fn new(slots: usize, foreign: usize) -> Self {
        Truncated {
            // 2 × 3² = 18 call-data slots, 2 rows of 3 foreign ones.
            whole: HeapStorage::with_layout(3, 2, 2),
            slots,
            foreign,
        }
    }
}

// SAFETY: the slices are parts of a `HeapStorage`'s, which never move and live as long as it.
// Their lengths may break the layout rule on purpose: `Engine::new` checks it before using the
// storage, and refuses.
unsafe impl Storage for Truncated {
    fn cpus(&self) -> &[PerCpu] {
        self.whole.cpus()
    }
    fn slots(&self) -> &[Csd] {
        &self.whole.slots()[..self.slots]
    }
    fn foreign_slots(&self) -> &[Csd] {
        &self.whole.foreign_slots()[..self.foreign]
    }
}

#[test]
fn a_storage_layout_error_names_the_slots_given_and_what_the_cpus_need() {
    let e = Engine::new(NoCpus, Truncated::new(10, 0)).unwrap_err();
    assert_eq!(
        e,
        Error::InvalidConfig(ConfigError::CallDataSlots { slots: 10, cpus: 3 })
    );
    names(&e, &["10 call-data slots", "3 CPUs", "multiple of 9"]);
    let e = Engine::new(NoCpus, Truncated::new(0, 0)).unwrap_err();
    names(&e, &["0 call-data slots"]);
    let e = Engine::new(NoCpus, Truncated::new(18, 4)).unwrap_err();
    assert_eq!(
        e,
        Error::InvalidConfig(ConfigError::ForeignSlots { slots: 4, cpus: 3 })
    );
    names(
        &e,
        &["4 foreign call-data slots", "3 CPUs", "multiple of 3"],
    );
    assert!(Engine::new(NoCpus, Truncated::new(18, 6)).is_ok());
}

/// More foreign rows than the engine can track are refused, not silently ignored. Before:
/// `HeapStorage::with_layout` cut them to 64 and `Engine::new` used at most 64.
#[test]
fn too_many_foreign_rows_are_refused_with_the_maximum() {
    let e = Engine::new(NoCpus, HeapStorage::with_layout(2, 1, 65)).unwrap_err();
    assert_eq!(
        e,
        Error::InvalidConfig(ConfigError::ForeignRows { rows: 65, max: 64 })
    );
    names(&e, &["65 rows", "at most 64"]);
    assert!(Engine::new(NoCpus, HeapStorage::with_layout(2, 1, 64)).is_ok());
}
