//! Helpers shared by the integration tests: every wait is bounded and names what it waited for.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// A machine of `cpus` CPUs whose idle CPUs sleep (so a call to one is delivered by signal).
pub fn sleeping_machine(cpus: usize) -> smpcall::hosted::Machine {
    smpcall::hosted::Machine::builder()
        .cpus(cpus)
        .idle(smpcall::hosted::IdlePolicy::Sleep)
        .build()
        .unwrap()
}

/// Generous bound for waits that normally take microseconds (the machine may be loaded).
pub const LIMIT: Duration = Duration::from_secs(20);

/// Spins (yielding) until `cond` holds; panics naming `what` after `limit`. On a CPU thread
/// each turn is a safe point: calls deferred to this CPU run (a task that waits for the effect
/// of a call to itself must let it run).
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        smpcall::hosted::safe_point();
        std::thread::yield_now();
    }
}

/// Like [`wait_until`], but never a safe point: a task that spins here is "busy in user code".
pub fn spin_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::yield_now();
    }
}

/// A CPU held busy in a task with interrupts masked; [`MaskedCpu::release`] lets it go.
pub struct MaskedCpu {
    release: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: smpcall::hosted::Task<()>,
}

impl MaskedCpu {
    /// Holds `cpu` of `m` masked (returns once it is), for at most [`LIMIT`].
    pub fn hold(m: &smpcall::hosted::Machine, cpu: usize) -> MaskedCpu {
        Self::hold_for(m, cpu, LIMIT)
    }

    /// Holds `cpu` of `m` masked (returns once it is), for at most `limit`.
    pub fn hold_for(m: &smpcall::hosted::Machine, cpu: usize, limit: Duration) -> MaskedCpu {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let ready = Arc::new(AtomicBool::new(false));
        let release = Arc::new(AtomicBool::new(false));
        let (r2, rel2) = (Arc::clone(&ready), Arc::clone(&release));
        let task = m.run_on(cpu, move |e| {
            let _masked = e.irq_save();
            r2.store(true, Ordering::SeqCst);
            wait_until(limit, "the test to release the masked CPU", || {
                rel2.load(Ordering::SeqCst)
            });
        });
        wait_until(LIMIT, &format!("CPU {cpu} to mask interrupts"), || {
            ready.load(Ordering::SeqCst)
        });
        MaskedCpu { release, task }
    }

    /// Unmasks the CPU and waits for its task to end.
    pub fn release(mut self) {
        self.release
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.task
            .join_timeout(LIMIT)
            .expect("the masked CPU's task ended");
    }
}

/// Builder helpers for the tests' report sinks.
pub trait TestSink {
    /// `report_sink` for a sink that only matches on the text and stores atomics.
    fn atomic_sink(self, sink: fn(&str)) -> Self;
}

impl TestSink for smpcall::hosted::MachineBuilder {
    fn atomic_sink(self, sink: fn(&str)) -> Self {
        // SAFETY: every sink the tests pass only reads the line and stores atomics (or does
        // nothing): async-signal-safe.
        unsafe { self.report_sink(sink) }
    }
}

/// `nmi_call_many` for the tests' NMI functions, which only read engine state and store
/// atomics.
pub fn nmi_call_many<F: Fn(smpcall::CpuId) + Sync>(
    e: &smpcall::hosted::HostEngine,
    mask: &smpcall::CpuMask,
    f: F,
) -> Result<smpcall::CpuMask, smpcall::Error> {
    // SAFETY: the tests' NMI functions store atomics and read engine state only
    // (async-signal-safe), or make nested NMI calls that are refused.
    unsafe { e.nmi_call_many(mask, f) }
}

/// `cpu_down` from a task, retried while the victim is busy outside a safe point with calls
/// queued to it (`NotAtSafePoint`: nothing happened), for at most [`LIMIT`].
pub fn cpu_down_retry(
    e: &smpcall::hosted::HostEngine,
    cpu: smpcall::CpuId,
) -> Result<(), smpcall::Error> {
    let deadline = Instant::now() + LIMIT;
    loop {
        match e.cpu_down(cpu) {
            Err(smpcall::Error::NotAtSafePoint(_)) if Instant::now() < deadline => {
                smpcall::hosted::sleep(Duration::from_micros(100));
            }
            other => return other,
        }
    }
}
