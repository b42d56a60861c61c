//! The [`Machine`]: starting CPU threads, submitting tasks, hotplug from any thread, shutdown.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::builder::{IdlePolicy, MachineBuilder, Pinning};
use super::cpu_thread::cpu_main;
use super::platform::{fault_thresholds, HostCpu, HostPlatform, Job};
use super::signals;
use super::HostEngine;
use crate::cpumask::CpuId;
use crate::engine::{Engine, HeapStorage};
use crate::error::{ConfigError, Error, OsRequest, SignalRole, WaitedFor};

static NEXT_MACHINE_ID: AtomicU64 = AtomicU64::new(1);

/// Memory the default slot count may use: `k × n² × 64` bytes at most this (or `k` = 1).
const DEFAULT_SLOT_BYTES: usize = 1 << 20;

/// The default number of call-data slots per sender and target for `n` CPUs: as many as fit in
/// [`DEFAULT_SLOT_BYTES`], at most [`MAX_NO_WAIT_SLOTS`], at least 1 — 64 up to 16 CPUs, 16 at
/// 32, 4 at 64, 1 from 91. More slots let a stream of no-wait calls run further ahead of its
/// target (`bench`, 2 CPUs: `call_single_async` 190–220 ns per call with 16, the earlier
/// default, against 136–162 ns with 64).
fn default_no_wait_slots(n: usize) -> usize {
    let per_slot = 64 * n.max(1) * n.max(1);
    (DEFAULT_SLOT_BYTES / per_slot).clamp(1, MAX_NO_WAIT_SLOTS)
}

/// The most call-data slots per sender and target ([`MachineBuilder::no_wait_slots`]).
const MAX_NO_WAIT_SLOTS: usize = 64;

/// The most foreign rows ([`MachineBuilder::foreign_senders`]): the engine tracks which are
/// busy in one 64-bit word.
const MAX_FOREIGN_SENDERS: usize = crate::foreign::MAX_FOREIGN_ROWS;

pub(super) struct Inner {
    pub(super) engine: HostEngine,
    pub(super) idle: IdlePolicy,
    watchdog_exit: AtomicBool,
}

/// The watchdog: re-sends IPIs to CPUs whose queued calls stay untaken (no-wait calls have
/// no waiter to notice a lost IPI). Parks between checks; shutdown unparks it.
fn watchdog_main(inner: Arc<Inner>, period: Duration) {
    while !inner.watchdog_exit.load(Ordering::SeqCst) {
        thread::park_timeout(period);
        if inner.watchdog_exit.load(Ordering::SeqCst) {
            break;
        }
        inner.engine.check_stalls();
    }
}

/// A set of CPUs made of threads, running the [`Engine`]. Dropping it shuts it down.
///
/// ```
/// use smpcall::hosted::Machine;
/// let m = Machine::builder().cpus(3).build()?;
/// let ran_on = m.run_on(0, |e| e.call_others(|_cpu| {})).join()??;
/// assert_eq!(ran_on.weight(), 2);
/// m.shutdown()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Machine {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
    timeout: Duration,
    down: bool,
    /// CPUs 0..threads_spawned are the machine's own threads; the rest are attach slots.
    threads_spawned: usize,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("engine", &self.inner.engine)
            .finish_non_exhaustive()
    }
}

/// The signals a build claimed: released if it fails half-way (their handlers put back to the
/// default where nobody else uses them), kept if it succeeds.
struct ClaimedSignals(Vec<(i32, SignalRole)>);

impl ClaimedSignals {
    /// The build succeeded: its machine keeps the signals.
    fn keep(mut self) {
        for (signo, _) in self.0.drain(..) {
            signals::keep(signo);
        }
    }
}

impl Drop for ClaimedSignals {
    fn drop(&mut self) {
        for &(signo, role) in &self.0 {
            signals::release(signo, role);
        }
    }
}

impl Machine {
    /// A builder with the defaults.
    pub fn builder() -> MachineBuilder {
        MachineBuilder::default()
    }

    pub(super) fn start(b: MachineBuilder) -> Result<Machine, Error> {
        let total = b.cpus + b.attach_slots;
        if total == 0 || total > crate::MAX_CPUS {
            // Spawned CPUs plus attach slots.
            return Err(Error::CpuCount {
                requested: total,
                max: crate::MAX_CPUS,
            });
        }
        if b.timeout.is_zero() {
            return Err(Error::InvalidConfig(ConfigError::ZeroTimeout));
        }
        let (drop_threshold, delay_threshold) = fault_thresholds(&b.faults)?;
        let k = b.no_wait_slots.unwrap_or(default_no_wait_slots(total));
        // Checked before the signals are claimed: a refused configuration changes nothing.
        if k == 0 || k > MAX_NO_WAIT_SLOTS {
            return Err(Error::InvalidConfig(ConfigError::NoWaitSlots {
                requested: k,
                max: MAX_NO_WAIT_SLOTS,
            }));
        }
        if b.foreign_senders > MAX_FOREIGN_SENDERS {
            return Err(Error::InvalidConfig(ConfigError::ForeignSenders {
                requested: b.foreign_senders,
                max: MAX_FOREIGN_SENDERS,
            }));
        }
        let mut claimed = ClaimedSignals(Vec::new());
        let signo = signals::choose(b.signal, SignalRole::Ipi, None)?;
        claimed.0.push((signo, SignalRole::Ipi));
        let nmi_signo = signals::choose(b.nmi_signal, SignalRole::Nmi, Some(signo))?;
        claimed.0.push((nmi_signo, SignalRole::Nmi));
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let ncores = thread::available_parallelism().map_or(1, |n| n.get());
        let platform = HostPlatform {
            id: NEXT_MACHINE_ID.fetch_add(1, Ordering::Relaxed),
            // SAFETY: getpid has no preconditions.
            pid: unsafe { libc::getpid() },
            signo,
            nmi_signo,
            delivery: b.delivery,
            calls_in_handlers: b.calls_in_handlers,
            // The spawned threads decide: attach slots are filled by threads of yours, which
            // you schedule (counting empty slots made every wait yield).
            oversubscribed: b.cpus > ncores,
            cpus: (0..total).map(|c| HostCpu::new(c < b.cpus)).collect(),
            drop_threshold: AtomicU64::new(drop_threshold),
            delay_threshold: AtomicU64::new(delay_threshold),
            sink: b.sink,
            fault_rng: AtomicU64::new(b.faults.seed),
            ipis_dropped: AtomicU64::new(0),
            ipis_delayed: AtomicU64::new(0),
        };
        let storage = HeapStorage::with_layout(total, k, b.foreign_senders);
        let engine = Engine::new(platform, storage)?;
        engine.set_stall_threshold(b.stall_threshold);
        let inner = Arc::new(Inner {
            engine,
            idle: b.idle,
            watchdog_exit: AtomicBool::new(false),
        });
        let pin = |cpu: usize| -> Option<core_affinity::CoreId> {
            match b.pinning {
                Pinning::Never => None,
                Pinning::Auto if b.cpus > cores.len() => None,
                _ if cores.is_empty() => None,
                _ => Some(cores[cpu % cores.len()]),
            }
        };
        // From here on, a failure stops and joins whatever was started (`Drop`). The threads of
        // a failed build run no task, so they stop at once; their shutdown gets at least
        // `FAILED_BUILD_CLEANUP` whatever the builder's timeout (whose expiry may be the very
        // failure), so that no thread outlives a build that returned an error.
        const FAILED_BUILD_CLEANUP: Duration = Duration::from_secs(10);
        let mut machine = Machine {
            inner,
            threads: Vec::with_capacity(b.cpus),
            watchdog: None,
            timeout: b.timeout.max(FAILED_BUILD_CLEANUP),
            down: false,
            threads_spawned: b.cpus,
        };
        for cpu in 0..b.cpus {
            let inner2 = Arc::clone(&machine.inner);
            let core = pin(cpu);
            let t = thread::Builder::new()
                .name(format!("smpcall-cpu{cpu}"))
                .spawn(move || cpu_main(inner2, cpu, core))
                .map_err(|e| super::os_error(OsRequest::SpawnCpuThread { cpu }, &e))?;
            machine.threads.push(t);
        }
        if !b.stall_threshold.is_zero() {
            let inner2 = Arc::clone(&machine.inner);
            let period =
                (b.stall_threshold / 4).clamp(Duration::from_millis(1), Duration::from_millis(250));
            let w = thread::Builder::new()
                .name("smpcall-watchdog".into())
                .spawn(move || watchdog_main(inner2, period))
                .map_err(|e| super::os_error(OsRequest::SpawnWatchdog, &e))?;
            machine.watchdog = Some(w);
        }
        // `None`: no deadline (a timeout too large for an `Instant`, e.g. `Duration::MAX`).
        let deadline = Instant::now().checked_add(b.timeout);
        for cpu in 0..b.cpus {
            while !machine.host(cpu).started.load(Ordering::SeqCst) {
                if deadline.is_some_and(|d| Instant::now() > d) {
                    return Err(Error::TimedOut {
                        what: WaitedFor::CpuThreadStart { cpu },
                        limit: b.timeout,
                    });
                }
                thread::sleep(Duration::from_micros(100));
            }
            // SAFETY: CPU `cpu`'s thread has started and serves its IPIs (signal handler
            // unblocked, idle loop running).
            unsafe { machine.inner.engine.mark_online(cpu) }?;
            // It may have parked as offline before we marked it: kick it.
            machine.inner.engine.platform().wake_if_sleeping(cpu);
        }
        // Built: the handlers stay (they are never removed from a process that used them).
        claimed.keep();
        machine.timeout = b.timeout;
        Ok(machine)
    }

    /// How many of the CPUs are the machine's own threads (the rest are attach slots).
    pub(super) fn threads_spawned(&self) -> usize {
        self.threads_spawned
    }

    pub(super) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    fn host(&self, cpu: CpuId) -> &HostCpu {
        &self.inner.engine.platform().cpus[cpu]
    }

    /// The engine: statistics, diagnostics, and calls — from this machine's CPUs, attached
    /// threads, or any other thread (see `Engine`). Its platform hooks are `unsafe` (only this
    /// backend calls them).
    pub fn engine(&self) -> &HostEngine {
        &self.inner.engine
    }

    /// The hosted platform: signal numbers, IPI counters, fault injection.
    ///
    /// Its [`Platform`](crate::Platform) methods are safe to call (see [`Engine::platform`]
    /// for the general rule). In this backend:
    ///
    /// * `send_ipi(cpu)` applies the machine's fault injection (the IPI may be dropped, or
    ///   sent after a spin of up to 50 µs), then wakes `cpu` if it sleeps idle, else (unless
    ///   [`Delivery::SafePoint`](super::Delivery::SafePoint)) sends it the IPI signal: a
    ///   spurious IPI, handled like any other (the engine's own work at once, your calls at the
    ///   next safe point). `send_nmi(cpu)` sends the NMI signal (not with `SafePoint`): the CPU
    ///   runs its queued NMI calls early. Both count in the statistics
    ///   ([`signals_sent`](HostPlatform::signals_sent), [`futex_wakes`](HostPlatform::futex_wakes)).
    ///   A `cpu` the machine does not have panics (index out of bounds); an attach slot never
    ///   held has no thread (the send fails; a debug assertion in debug builds); a slot whose
    ///   thread left, or any CPU after [`try_shutdown`](Machine::try_shutdown), is signalled at
    ///   its old thread id: the send fails as above if no thread has that id any more; on a
    ///   thread of this process that has it, the handler does nothing unless that thread is a
    ///   CPU (of another machine: a spurious IPI there).
    /// * `irq_save` and `irq_restore` act on the soft mask of the calling thread's CPU, and do
    ///   nothing on a thread that is not one of this machine's CPUs. A CPU left masked is not
    ///   interrupted by IPIs, but still runs its calls when idle or at
    ///   [`Engine::serve_queue`]; its waiting calls are refused.
    /// * `irq_restore` is `unsafe` (see [`Platform::irq_restore`](crate::Platform::irq_restore)):
    ///   `irq_restore(false)` inside a call function would unmask the queue flush running it.
    pub fn platform(&self) -> &HostPlatform {
        self.inner.engine.platform()
    }

    /// Number of CPUs.
    pub fn nr_cpus(&self) -> usize {
        self.inner.engine.nr_cpus()
    }

    /// Runs `f` in CPU `cpu`'s task context (after the tasks submitted before it). Only the
    /// machine's own (spawned) CPUs run tasks: for an attach slot this is refused with
    /// [`Error::NoTaskLoop`] (call that CPU instead); after a completed shutdown with
    /// [`Error::ShutDown`].
    pub fn run_on<F, R>(&self, cpu: CpuId, f: F) -> Task<R>
    where
        F: FnOnce(&HostEngine) -> R + Send + 'static,
        R: Send + 'static,
    {
        if cpu >= self.nr_cpus() {
            return Task {
                state: TaskState::Refused(Error::UnknownCpu(cpu)),
            };
        }
        if cpu >= self.threads_spawned {
            return Task {
                state: TaskState::Refused(Error::NoTaskLoop(cpu)),
            };
        }
        // Before the online check: a shutdown takes every spawned CPU offline at its end, and
        // "offline" would name the wrong problem.
        if self.down {
            return Task {
                state: TaskState::Refused(Error::ShutDown),
            };
        }
        if !self.inner.engine.is_online(cpu) {
            return Task {
                state: TaskState::Refused(Error::Offline(cpu)),
            };
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |engine| {
            let r = panic::catch_unwind(AssertUnwindSafe(|| f(engine)));
            let _ = tx.send(r);
        });
        let hc = self.host(cpu);
        hc.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(job);
        hc.has_tasks.store(true, Ordering::SeqCst);
        self.inner.engine.platform().wake_if_sleeping(cpu);
        Task {
            state: TaskState::Pending(rx, cpu),
        }
    }

    /// The diagnostic dump of every CPU (see [`Engine::dump`]).
    pub fn dump(&self) -> String {
        let mut out = String::new();
        let _ = self.inner.engine.dump(&mut out);
        out
    }

    /// Takes `cpu` offline (see [`Engine::cpu_down`]), driven from the calling thread — which
    /// need not be a CPU, and uses no task slot: it works while every CPU runs a long task.
    ///
    /// While calls are still queued to `cpu` and its thread is busy outside a safe point (they
    /// could not run before it leaves), the attempt is undone and retried until the builder's
    /// timeout; then [`Error::TimedOut`] is returned and **nothing happened**: `cpu` stays
    /// online. Tasks already queued to `cpu` still run there, but calls they make are refused
    /// with [`Error::Offline`]; new tasks are refused.
    pub fn cpu_down(&self, cpu: CpuId) -> Result<(), Error> {
        let deadline = Instant::now().checked_add(self.timeout);
        loop {
            match self.inner.engine.cpu_down(cpu) {
                Err(Error::NotAtSafePoint(_)) if deadline.map_or(true, |d| Instant::now() < d) => {
                    thread::sleep(Duration::from_micros(200));
                }
                Err(Error::NotAtSafePoint(_)) => {
                    return Err(Error::TimedOut {
                        what: WaitedFor::SafePoint { cpu },
                        limit: self.timeout,
                    })
                }
                other => return other,
            }
        }
    }

    /// Brings `cpu` back online (see [`Engine::cpu_up`]), driven from the calling thread.
    pub fn cpu_up(&self, cpu: CpuId) -> Result<(), Error> {
        self.inner.engine.cpu_up(cpu)
    }

    /// Shuts down: refuses new calls, lets every task finish, drains every queue, stops and
    /// joins the threads. If that does not finish within the builder's timeout, the threads
    /// are left running (their memory is kept alive, never freed under them) and
    /// [`Error::TimedOut`] is returned; use [`try_shutdown`](Machine::try_shutdown) to keep
    /// the machine and retry instead.
    pub fn shutdown(mut self) -> Result<(), Error> {
        let timeout = self.timeout;
        let r = self.try_shutdown(timeout);
        if r.is_err() {
            self.detach();
        }
        r
    }

    /// Like [`shutdown`](Machine::shutdown), bounded by `timeout`, but on
    /// [`Error::TimedOut`] the machine stays whole (new calls are refused; tasks and queued
    /// calls go on) and the shutdown can be retried. Returns `Ok` at once if already shut down.
    pub fn try_shutdown(&mut self, timeout: Duration) -> Result<(), Error> {
        if self.down {
            return Ok(());
        }
        let engine = &self.inner.engine;
        // SAFETY: we own the machine; its shutdown protocol is this function.
        unsafe { engine.shutdown() };
        let n = self.threads.len();
        for cpu in 0..n {
            self.host(cpu).stop.store(true, Ordering::SeqCst);
            engine.platform().wake_if_sleeping(cpu);
        }
        let deadline = Instant::now().checked_add(timeout);
        let all_parked = |m: &Machine| (0..n).all(|c| m.host(c).parked.load(Ordering::SeqCst));
        while !(all_parked(self) && engine.is_quiescent()) {
            if deadline.is_some_and(|d| Instant::now() > d) {
                return Err(Error::TimedOut {
                    what: WaitedFor::Shutdown,
                    limit: timeout,
                });
            }
            // Called from an attached thread: calls queued to it are served here (a safe point).
            super::safe_point();
            thread::sleep(Duration::from_micros(200));
        }
        for cpu in 0..n {
            self.host(cpu).exit.store(true, Ordering::SeqCst);
            engine.platform().wake_if_sleeping(cpu);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The spawned CPUs' threads are gone: an attached thread that leaves later must not
        // wait for them in its stop_machine.
        for cpu in 0..n {
            engine.retire_after_shutdown(cpu);
        }
        self.stop_watchdog();
        self.down = true;
        Ok(())
    }

    fn stop_watchdog(&mut self) {
        self.inner.watchdog_exit.store(true, Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            w.thread().unpark();
            let _ = w.join();
        }
    }

    /// Gives up on threads that did not stop: they keep their `Arc`, so nothing is freed under
    /// them.
    fn detach(&mut self) {
        // Threads left running may still be signalled (a re-sent IPI, an NMI): their handlers
        // stay, even if this is a failed build whose clean-up would otherwise put them back.
        let platform = self.inner.engine.platform();
        signals::keep_for_ever(platform.signo);
        signals::keep_for_ever(platform.nmi_signo);
        self.threads.clear();
        self.inner.watchdog_exit.store(true, Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            w.thread().unpark();
        }
        self.down = true;
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let timeout = self.timeout;
        if self.try_shutdown(timeout).is_err() {
            self.detach();
        }
    }
}

enum TaskState<R> {
    Refused(Error),
    Pending(mpsc::Receiver<thread::Result<R>>, CpuId),
    Joined,
}

/// A task submitted with [`Machine::run_on`].
#[must_use = "a task's result (and any panic in it) is only seen through join"]
pub struct Task<R> {
    state: TaskState<R>,
}

impl<R> std::fmt::Debug for Task<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.state {
            TaskState::Refused(e) => write!(f, "Task(refused: {e})"),
            TaskState::Pending(_, cpu) => write!(f, "Task(on CPU {cpu})"),
            TaskState::Joined => f.write_str("Task(joined)"),
        }
    }
}

impl<R> Task<R> {
    /// Waits for the task's result. A panic in the task is resumed here.
    pub fn join(mut self) -> Result<R, Error> {
        match std::mem::replace(&mut self.state, TaskState::Joined) {
            TaskState::Refused(e) => Err(e),
            TaskState::Pending(rx, _) => match rx.recv() {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(payload)) => panic::resume_unwind(payload),
                Err(_) => Err(Error::ShutDown),
            },
            TaskState::Joined => Err(Error::AlreadyJoined),
        }
    }

    /// Like [`join`](Task::join), but gives up after `limit` with [`Error::TimedOut`]; the
    /// task keeps running and can be joined again. After a result was returned, further joins
    /// return [`Error::AlreadyJoined`].
    pub fn join_timeout(&mut self, limit: Duration) -> Result<R, Error> {
        let TaskState::Pending(rx, cpu) = &self.state else {
            return match std::mem::replace(&mut self.state, TaskState::Joined) {
                TaskState::Refused(e) => Err(e),
                _ => Err(Error::AlreadyJoined),
            };
        };
        let r = match rx.recv_timeout(limit) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(Error::TimedOut {
                    what: WaitedFor::Task { cpu: *cpu },
                    limit,
                })
            }
            r => r,
        };
        self.state = TaskState::Joined;
        match r {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(payload)) => panic::resume_unwind(payload),
            Err(_) => Err(Error::ShutDown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_slots_fill_the_memory_budget_within_bounds() {
        for (n, k) in [
            (1, 64),
            (2, 64),
            (16, 64),
            (17, 56),
            (32, 16),
            (64, 4),
            (90, 2),
            (91, 1),
        ] {
            assert_eq!(default_no_wait_slots(n), k, "default slots for {n} CPUs");
        }
        for n in [1, 2, 16, 17, 32, 64, 90, 91, 1024] {
            let k = default_no_wait_slots(n);
            assert!(
                k == 1 || k * n * n * 64 <= DEFAULT_SLOT_BYTES,
                "{n} CPUs: {k} slots"
            );
        }
    }
}
