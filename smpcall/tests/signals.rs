//! Signal ownership (issue 10): one test per process-wide fact, in a test binary of its own
//! because it changes signal dispositions that other tests' machines would use.

use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use smpcall::hosted::{IdlePolicy, Machine};
use smpcall::{ConfigError, Error, SignalRole};

static USER_HANDLER_RAN: AtomicUsize = AtomicUsize::new(0);

/// The tests of this file change and depend on process-wide signal dispositions: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

extern "C" fn user_handler(_: libc::c_int) {
    USER_HANDLER_RAN.fetch_add(1, Ordering::SeqCst);
}

fn user_handler_addr() -> usize {
    user_handler as extern "C" fn(libc::c_int) as usize
}

/// The handler currently installed on `signo`.
fn disposition(signo: i32) -> usize {
    // SAFETY: querying with a null `act` and a valid out pointer.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(signo, ptr::null(), &mut old), 0);
        old.sa_sigaction
    }
}

fn set_disposition(signo: i32, handler: usize) {
    // SAFETY: installing a plain handler (or SIG_DFL) with an empty mask.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler;
        libc::sigemptyset(&mut act.sa_mask);
        assert_eq!(libc::sigaction(signo, &act, ptr::null_mut()), 0);
    }
}

fn machine() -> Result<Machine, Error> {
    Machine::builder().cpus(2).idle(IdlePolicy::Sleep).build()
}

/// Before: the backend remembered "installed once" and silently reused a signal whose handler
/// the user had replaced after an earlier machine shut down — its IPIs went to the user's
/// handler. A failed build left its handlers installed.
#[test]
fn signals_are_owned_checked_at_every_build_and_released_by_a_failed_build() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 1. A machine picks S; after it shut down the user takes S.
    let m = machine().unwrap();
    let s = m.platform().signal();
    m.shutdown().unwrap();
    set_disposition(s, user_handler_addr());

    // 2. The next machine does not reuse S, and leaves the user's handler alone.
    let m = machine().unwrap();
    assert_ne!(m.platform().signal(), s, "the user's signal is not reused");
    let r = m.run_on(0, |e| e.call_single(1, |cpu| cpu)).join().unwrap();
    assert_eq!(r, Ok(1));
    m.shutdown().unwrap();
    assert_eq!(disposition(s), user_handler_addr());
    assert_eq!(USER_HANDLER_RAN.load(Ordering::SeqCst), 0);

    // 3. Asking for S explicitly is refused, naming the IPI signal and its number.
    let e = Machine::builder().cpus(2).signal(s).build().unwrap_err();
    assert_eq!(
        e,
        Error::InvalidConfig(ConfigError::SignalInUse {
            role: SignalRole::Ipi,
            signal: s
        })
    );
    assert!(e.to_string().contains(&format!("IPI signal {s}")), "{e}");
    set_disposition(s, libc::SIG_DFL);

    // 4. A build that fails after installing its IPI handler (NMI signal taken by the user)
    // leaves no handler behind, and its error names the NMI signal.
    let (ipi, nmi) = (libc::SIGRTMAX() - 1, libc::SIGRTMAX());
    assert_eq!(disposition(ipi), libc::SIG_DFL);
    set_disposition(nmi, user_handler_addr());
    let e = Machine::builder()
        .cpus(2)
        .signal(ipi)
        .nmi_signal(nmi)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains(&format!("NMI signal {nmi}")), "{e}");
    assert_eq!(
        disposition(ipi),
        libc::SIG_DFL,
        "the failed build removed its handler"
    );
    set_disposition(nmi, libc::SIG_DFL);

    // 5. The same signal for both: the NMI claim finds the IPI handler this build installed,
    // and says so with the number.
    let e = Machine::builder()
        .cpus(2)
        .signal(ipi)
        .nmi_signal(ipi)
        .build()
        .unwrap_err();
    assert_eq!(
        e,
        Error::InvalidConfig(ConfigError::SignalHasOtherRole {
            role: SignalRole::Nmi,
            signal: ipi
        })
    );
    assert!(e.to_string().contains(&format!("NMI signal {ipi}")), "{e}");
    assert_eq!(disposition(ipi), libc::SIG_DFL, "and removed its handler");
}

/// Before: `no_wait_slots(0)` and `foreign_senders` above 64 were clamped and the machine
/// built. Now `build` refuses them, and a refused build leaves the signal it was given alone.
#[test]
fn a_refused_slot_or_row_count_leaves_the_signal_alone() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ipi = libc::SIGRTMAX() - 2;
    assert_eq!(disposition(ipi), libc::SIG_DFL);
    let refused = [
        Machine::builder().no_wait_slots(0),
        Machine::builder().foreign_senders(65),
    ];
    for b in refused {
        let e = b.cpus(2).signal(ipi).build().unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidConfig(
                    ConfigError::NoWaitSlots { requested: 0, .. }
                        | ConfigError::ForeignSenders { requested: 65, .. }
                )
            ),
            "{e}"
        );
        assert_eq!(disposition(ipi), libc::SIG_DFL, "{e}");
    }
}

/// Before: the clock was read every 256 spins; with the waiter and its stuck target sharing
/// a core each spin is a `sched_yield`, and a 50 ms threshold was first reported after
/// ~720 ms. Now the first report comes within twice the threshold (plus scheduling slack).
#[test]
fn the_first_stall_report_comes_within_twice_the_threshold_when_cpus_share_cores() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    static FIRST_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    fn now_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
    fn sink(line: &str) {
        if line.contains("has waited") {
            let _ = FIRST_NS.compare_exchange(0, now_ns(), Ordering::SeqCst, Ordering::SeqCst);
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    const THRESHOLD: Duration = Duration::from_millis(50);
    // SAFETY: the sink reads the clock and stores an atomic: async-signal-safe.
    let b = unsafe {
        Machine::builder()
            .cpus(cores * 2)
            // CPU i on core i % cores: CPU 0 (the waiter) and CPU `cores` (the stuck target)
            // share core 0, so each yield of the waiter hands the core to the target for a
            // whole time slice.
            .pinning(smpcall::hosted::Pinning::Always)
            .idle(IdlePolicy::Sleep)
            .stall_threshold(THRESHOLD)
            .report_sink(sink)
    };
    let m = b.build().unwrap();
    let target = cores;
    let held = m.run_on(target, |e| {
        let _masked = e.irq_save();
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(400) {
            std::hint::spin_loop();
        }
    });
    std::thread::sleep(Duration::from_millis(5));
    let start = now_ns();
    let r = m
        .run_on(0, move |e| e.call_single(target, |cpu| cpu))
        .join()
        .unwrap();
    assert_eq!(r, Ok(target));
    held.join().unwrap();
    let first = FIRST_NS.load(Ordering::SeqCst);
    assert!(first != 0, "a stall was reported");
    let after = Duration::from_nanos(first - start);
    // Twice the threshold, plus 50 ms for the scheduler on a loaded 2-core machine.
    assert!(
        after < THRESHOLD * 2 + Duration::from_millis(50),
        "first report after {after:?} for a {THRESHOLD:?} threshold"
    );
    m.shutdown().unwrap();
}
