//! NMIs (C12): a second signal that ignores the soft interrupt mask, used for an all-CPU dump
//! and by the stall diagnostics to show what a stuck CPU is doing.

mod common;
use common::TestSink;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, LIMIT};
use smpcall::hosted::{IdlePolicy, Machine};
use smpcall::{CpuMask, DeadlockReason, Error};

#[test]
fn nmi_reaches_every_cpu_including_one_spinning_masked() {
    let m = common::sleeping_machine(4);
    let held = common::MaskedCpu::hold(&m, 2);
    // answered[cpu] = 1 + (masked ? 2 : 0) + (in_nmi ? 4 : 0)
    let answered: Arc<Vec<AtomicU64>> = Arc::new((0..4).map(|_| AtomicU64::new(0)).collect());
    let a2 = Arc::clone(&answered);
    let (ran, normal_call_waits) = m
        .run_on(0, move |e| {
            // A normal no-wait call to CPU 2 stays queued: it is masked.
            e.call_single_async(2, |_| ()).unwrap();
            let ran = common::nmi_call_many(e, &CpuMask::first_n(4), |cpu| {
                let v = 1 + 2 * u64::from(e.irqs_masked()) + 4 * u64::from(e.in_nmi());
                a2[cpu].store(v, Ordering::SeqCst);
            })
            .unwrap();
            (ran, e.has_queued(2))
        })
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(ran, CpuMask::first_n(4));
    assert!(
        normal_call_waits,
        "the masked CPU did not take its normal queue"
    );
    let a: Vec<u64> = answered.iter().map(|x| x.load(Ordering::SeqCst)).collect();
    assert_eq!(a[0], 1, "the caller runs it directly: {a:?}");
    assert_eq!(
        a[2],
        1 + 2 + 4,
        "CPU 2 answered in NMI context, masked: {a:?}"
    );
    for cpu in [1, 3] {
        assert_eq!(a[cpu] & 5, 5, "CPU {cpu} answered in NMI context: {a:?}");
    }
    assert!(m.engine().nmis_received(2) >= 1);
    held.release();
    m.shutdown().unwrap();
}

#[test]
fn nmi_call_rules() {
    let m = common::sleeping_machine(3);
    let nested = Arc::new(AtomicUsize::new(0));
    let n2 = Arc::clone(&nested);
    let (masked_ok, in_handler_ok) = m
        .run_on(0, move |e| {
            let masked_ok = {
                let _g = e.irq_save();
                common::nmi_call_many(e, &CpuMask::single(1), |_| {})
            };
            let in_handler_ok = e
                .call_single(1, |_| common::nmi_call_many(e, &CpuMask::single(2), |_| {}))
                .unwrap();
            common::nmi_call_many(e, &CpuMask::single(2), |_| {
                let r = common::nmi_call_many(e, &CpuMask::single(1), |_| {});
                if r == Err(Error::WouldDeadlock(DeadlockReason::InNmi)) {
                    n2.fetch_add(1, Ordering::SeqCst);
                }
            })
            .unwrap();
            (masked_ok, in_handler_ok)
        })
        .join_timeout(LIMIT)
        .unwrap();
    assert_eq!(
        masked_ok,
        Ok(CpuMask::single(1)),
        "allowed with interrupts masked"
    );
    assert_eq!(
        in_handler_ok,
        Ok(CpuMask::single(2)),
        "allowed from a call handler"
    );
    assert_eq!(
        nested.load(Ordering::SeqCst),
        1,
        "refused from an NMI handler"
    );
    m.shutdown().unwrap();
}

static NMI_REPORT: AtomicBool = AtomicBool::new(false);
static STALL_REPORT: AtomicBool = AtomicBool::new(false);

fn sink(line: &str) {
    if line.contains("NMI: CPU 1 is in task context") && line.contains("interrupts masked") {
        NMI_REPORT.store(true, Ordering::SeqCst);
    }
    if line.contains("CPU 0 has waited") {
        STALL_REPORT.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_stalled_wait_asks_the_stuck_cpu_by_nmi_what_it_is_doing() {
    let m = Machine::builder()
        .cpus(2)
        .idle(IdlePolicy::Sleep)
        .stall_threshold(Duration::from_millis(5))
        .atomic_sink(sink)
        .build()
        .unwrap();
    let held = common::MaskedCpu::hold(&m, 1);
    let mut call = m.run_on(0, |e| e.call_single(1, |cpu| cpu));
    wait_until(
        LIMIT,
        "the stall report and the stuck CPU's NMI report",
        || STALL_REPORT.load(Ordering::SeqCst) && NMI_REPORT.load(Ordering::SeqCst),
    );
    held.release();
    assert_eq!(call.join_timeout(LIMIT).unwrap(), Ok(1));
    m.shutdown().unwrap();
}

/// No call starts in NMI context: an NMI may interrupt its own CPU inside a call's queueing or
/// a flush of its queue, which a call made (or a queue served) from the NMI would then enter
/// a second time. Before: `call_single_async` from an NMI function queued the call (on the
/// sender's slot, possibly the one the interrupted code was claiming) and `serve_queue`
/// flushed the normal queue from NMI context.
#[test]
fn calls_from_nmi_context_are_refused_and_serve_nothing() {
    let m = common::sleeping_machine(3);
    let refused = Arc::new(AtomicUsize::new(0));
    let r2 = Arc::clone(&refused);
    let ran = Arc::new(AtomicUsize::new(0));
    let ran2 = Arc::clone(&ran);
    m.run_on(0, move |e| {
        common::nmi_call_many(e, &CpuMask::single(2), |_| {
            let in_nmi = Err(Error::WouldDeadlock(DeadlockReason::InNmi));
            let ran3 = Arc::clone(&ran2);
            let results = [
                e.call_single_async(1, move |_| {
                    ran3.fetch_add(1, Ordering::SeqCst);
                }),
                e.call_many_async(&CpuMask::single(1), |_| {}).map(|_| ()),
                e.call_single(1, |_| ()),
            ];
            let n = results.iter().filter(|r| **r == in_nmi).count();
            let served = e.serve_queue();
            if served == 0 {
                r2.fetch_add(n, Ordering::SeqCst);
            }
        })
    })
    .join_timeout(LIMIT)
    .unwrap()
    .unwrap();
    assert_eq!(refused.load(Ordering::SeqCst), 3, "every call refused");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(ran.load(Ordering::SeqCst), 0, "nothing was queued");
    m.shutdown().unwrap();
}
