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

/// Runs `hold` as a task on `cpu` of `m` and returns once it started (having waited, at most
/// [`LIMIT`], for the CPU `becoming`); `hold` gets the engine and a check of the returned
/// release flag, and must return once it is set.
fn hold_in_task(
    m: &smpcall::hosted::Machine,
    cpu: usize,
    becoming: &str,
    hold: impl FnOnce(&smpcall::hosted::HostEngine, &dyn Fn() -> bool) + Send + 'static,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    smpcall::hosted::Task<()>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let started = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let (s2, r2) = (Arc::clone(&started), Arc::clone(&release));
    let task = m.run_on(cpu, move |e| {
        // Started only inside `hold`'s own setup: it runs first below, then says so.
        let released = || r2.load(Ordering::SeqCst);
        hold(e, &|| {
            s2.store(true, Ordering::SeqCst);
            released()
        })
    });
    spin_until(LIMIT, &format!("CPU {cpu} {becoming}"), || {
        started.load(Ordering::SeqCst)
    });
    (release, task)
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
        let (release, task) = hold_in_task(m, cpu, "to mask interrupts", move |e, released| {
            let _masked = e.irq_save();
            wait_until(limit, "the test to release the masked CPU", released)
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

/// A CPU held busy in a task outside safe points (user code that never reaches one): calls
/// that need a safe point wait; [`BusyCpu::release`] lets it go.
pub struct BusyCpu {
    release: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: smpcall::hosted::Task<()>,
}

impl BusyCpu {
    /// Holds `cpu` of `m` busy (returns once its task runs), for at most [`LIMIT`].
    pub fn hold(m: &smpcall::hosted::Machine, cpu: usize) -> BusyCpu {
        let (release, task) = hold_in_task(m, cpu, "to be busy", |_, released| {
            spin_until(LIMIT, "the test to release the busy CPU", released)
        });
        BusyCpu { release, task }
    }

    /// Lets the CPU's task end without waiting for it (a test that still needs the CPU busy
    /// for a while, e.g. a timed-out shutdown to retry).
    pub fn let_go(&self) {
        self.release
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets the CPU's task end and waits for it.
    pub fn release(mut self) {
        self.let_go();
        self.task
            .join_timeout(LIMIT)
            .expect("the busy CPU's task ended");
    }
}

/// Whether this process is the child a test re-ran itself as (see [`run_child`]).
pub fn in_child() -> bool {
    std::env::var_os("SMPCALL_TEST_CHILD").is_some()
}

/// Re-runs this test binary for the one test `test` (ignored or not), as a child process
/// (`in_child()` true there), and returns how it ended and what it printed (stdout, then
/// stderr). The child must end by itself: it bounds its own waits.
pub fn run_child(test: &str) -> (std::process::ExitStatus, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            test,
            "--nocapture",
            "--test-threads=1",
            "--include-ignored",
        ])
        .env("SMPCALL_TEST_CHILD", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
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
