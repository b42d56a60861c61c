//! Configuring a [`Machine`]: CPU count, pinning, idle policy, delivery, signals, faults.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::machine::Machine;
use super::platform::ReportSink;
use crate::error::Error;

/// What an idle CPU does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdlePolicy {
    /// Spin on the queue: lowest latency, no IPI needed, burns its core.
    Poll,
    /// Sleep on a futex: a call wakes it with a futex wake.
    Sleep,
    /// Poll for the given time after each piece of work, then sleep.
    PollThenSleep(Duration),
}

/// How calls reach a busy CPU (see the [module documentation](super) for safe points).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// A real-time signal interrupts the CPU. Its handler runs the engine's own work at once
    /// and your functions at once only where that is sound (an [`interruptible`](super::interruptible)
    /// region, or [`MachineBuilder::run_calls_in_signal_handlers`]); otherwise they wait for the
    /// CPU's next safe point. The default.
    Signal,
    /// No signal ever reaches the CPU threads (not even the NMI signal of a stall report):
    /// every call, the engine's own work included, waits for a safe point.
    SafePoint,
}

/// Whether CPU threads are pinned to cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pinning {
    /// Pin CPU `i` to core `i` when there are at least as many cores as CPUs.
    Auto,
    /// Never pin.
    Never,
    /// Always pin, CPU `i` to core `i % cores`.
    Always,
}

/// Builds a [`Machine`]. Defaults: as many CPUs as cores, [`Pinning::Auto`],
/// [`IdlePolicy::PollThenSleep`] for 50 µs, [`Delivery::Signal`], a free real-time signal,
/// 30 s to start and to shut down, a 1 s stall threshold with a watchdog thread, no faults.
#[derive(Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct MachineBuilder {
    pub(super) cpus: usize,
    pub(super) pinning: Pinning,
    pub(super) idle: IdlePolicy,
    pub(super) delivery: Delivery,
    pub(super) calls_in_handlers: bool,
    pub(super) signal: Option<i32>,
    pub(super) nmi_signal: Option<i32>,
    pub(super) timeout: Duration,
    pub(super) stall_threshold: Duration,
    pub(super) faults: Faults,
    pub(super) sink: Option<ReportSink>,
    pub(super) foreign_senders: usize,
    pub(super) attach_slots: usize,
    pub(super) no_wait_slots: Option<usize>,
}

impl std::fmt::Debug for MachineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineBuilder")
            .field("cpus", &self.cpus)
            .field("pinning", &self.pinning)
            .field("idle", &self.idle)
            .field("delivery", &self.delivery)
            .field("calls_in_handlers", &self.calls_in_handlers)
            .field("signal", &self.signal)
            .field("nmi_signal", &self.nmi_signal)
            .field("timeout", &self.timeout)
            .field("stall_threshold", &self.stall_threshold)
            .field("faults", &self.faults)
            .field("sink", &self.sink.is_some())
            .field("foreign_senders", &self.foreign_senders)
            .field("attach_slots", &self.attach_slots)
            .field("no_wait_slots", &self.no_wait_slots)
            .finish()
    }
}

/// IPI fault injection for the hosted backend (testing the lost-IPI recovery, C9).
///
/// Probabilities are per IPI (signal or futex wake). A *dropped* IPI is simply not sent; a
/// *delayed* one is sent after a random 1–50 µs spin. Calls still complete because stuck waits
/// and the watchdog re-send IPIs after the stall threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Faults {
    /// Probability in `[0, 1]` that an IPI is dropped.
    pub drop_ipi: f64,
    /// Probability in `[0, 1]` that an IPI is delayed.
    pub delay_ipi: f64,
    /// Seed of the fault decisions.
    pub seed: u64,
}

impl Faults {
    /// No faults: every IPI is sent at once.
    pub const fn none() -> Self {
        Faults {
            drop_ipi: 0.0,
            delay_ipi: 0.0,
            seed: 0,
        }
    }

    /// Drops each IPI with probability `p` (in `[0, 1]`, checked by `build`).
    pub const fn drop_ipi(mut self, p: f64) -> Self {
        self.drop_ipi = p;
        self
    }

    /// Delays each IPI with probability `p` (in `[0, 1]`, checked by `build`).
    pub const fn delay_ipi(mut self, p: f64) -> Self {
        self.delay_ipi = p;
        self
    }

    /// Seeds the fault decisions.
    pub const fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

impl Default for MachineBuilder {
    fn default() -> Self {
        MachineBuilder {
            cpus: thread::available_parallelism().map_or(2, |n| n.get()),
            pinning: Pinning::Auto,
            idle: IdlePolicy::PollThenSleep(Duration::from_micros(50)),
            delivery: Delivery::Signal,
            calls_in_handlers: false,
            foreign_senders: 4,
            attach_slots: 0,
            no_wait_slots: None,
            signal: None,
            nmi_signal: None,
            timeout: Duration::from_secs(30),
            stall_threshold: Duration::from_secs(1),
            faults: Faults::default(),
            sink: None,
        }
    }
}

impl MachineBuilder {
    /// CPU slots (after the spawned CPUs) that threads of your own can take with
    /// [`Machine::attach`] (default 0). The machine has `cpus + attach_slots` CPUs; a slot is
    /// offline while nobody is attached to it. `cpus(0)` with slots is a machine made only of
    /// your threads.
    pub fn attach_slots(mut self, k: usize) -> Self {
        self.attach_slots = k;
        self
    }

    /// Number of CPUs the machine spawns as threads of its own; may exceed the number of
    /// cores.
    pub fn cpus(mut self, n: usize) -> Self {
        self.cpus = n;
        self
    }
    /// Pinning policy.
    pub fn pinning(mut self, p: Pinning) -> Self {
        self.pinning = p;
        self
    }
    /// Idle policy.
    pub fn idle(mut self, p: IdlePolicy) -> Self {
        self.idle = p;
        self
    }
    /// Delivery mode.
    pub fn delivery(mut self, d: Delivery) -> Self {
        self.delivery = d;
        self
    }
    /// Use this real-time signal number for IPIs (must be in `SIGRTMIN..=SIGRTMAX` and free).
    pub fn signal(mut self, signo: i32) -> Self {
        self.signal = Some(signo);
        self
    }
    /// Use this real-time signal number for NMIs (default: the next free one).
    pub fn nmi_signal(mut self, signo: i32) -> Self {
        self.nmi_signal = Some(signo);
        self
    }
    /// How many no-wait calls one CPU can have in flight to another (call-data slots per
    /// sender and target). A no-wait call waits only when all of them are still queued, not
    /// yet taken. Default: as many as fit in 1 MiB (memory: `k × n² × 64` bytes), between 1 and
    /// 64 — 64 up to 16 CPUs, 16 at 32, 4 at 64, 1 from 91. With `k > 1` the first slot is kept
    /// for waiting many-calls and no-wait calls use the other `k − 1`.
    ///
    /// `k` must be in `1..=64`: [`build`](MachineBuilder::build) refuses any other, before
    /// anything is built, with [`ConfigError::NoWaitSlots`](crate::ConfigError::NoWaitSlots).
    pub fn no_wait_slots(mut self, k: usize) -> Self {
        self.no_wait_slots = Some(k);
        self
    }

    /// How many threads that are not CPUs (the main thread, a runtime's workers) can queue
    /// no-wait calls and many-calls at the same time (default 4; more wait for a free row).
    /// Each costs one call-data slot per CPU (64 bytes each). Waiting single calls and calls
    /// with caller-owned call data need none; with 0 rows, no-wait calls and many-calls from
    /// such threads are refused with [`Error::Unsupported`].
    ///
    /// `rows` must be in `0..=64`: [`build`](MachineBuilder::build) refuses more, before
    /// anything is built, with
    /// [`ConfigError::ForeignSenders`](crate::ConfigError::ForeignSenders).
    pub fn foreign_senders(mut self, rows: usize) -> Self {
        self.foreign_senders = rows;
        self
    }

    /// Bound on start-up and on shutdown's drain.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Stall threshold of the lost-IPI diagnostics (default 1 s; zero disables reports,
    /// re-sends and the watchdog thread).
    pub fn stall_threshold(mut self, d: Duration) -> Self {
        self.stall_threshold = d;
        self
    }
    /// Sends the engine's reports (stall reports, NMI state reports, `dump_to_report`) to
    /// `sink` instead of stderr.
    ///
    /// # Safety
    /// The sink is called from any context, including signal handlers that interrupted
    /// arbitrary code (NMI reports, stall reports from waits inside handlers): it must be
    /// async-signal-safe — no allocation, no locks (no `println!`, no `Mutex`), only atomics,
    /// memory it owns, and async-signal-safe system calls such as `write(2)`.
    pub unsafe fn report_sink(mut self, sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.sink = Some(Arc::new(sink));
        self
    }

    /// Runs call functions inside the IPI signal handler wherever it interrupts the CPU's
    /// thread, instead of deferring them to its next safe point: the lowest latency to a busy
    /// CPU (one signal round trip). The NMI signal's handler is unaffected.
    ///
    /// # Safety
    /// Every function that any code sends to this machine's CPUs (single, many, async,
    /// stop_machine's) must then be *async-signal-safe*: it may interrupt its thread at any
    /// instruction, including inside `malloc` or while a lock is held. It may use atomics,
    /// memory protected by the call protocol, spin, make no-wait calls and call async-signal-safe
    /// system calls; it must not allocate or free (`Box`, `Vec`, `String`, `format!`), take a
    /// lock (`Mutex`, `println!`), use thread-locals that initialise lazily, or panic. The caller
    /// of this method answers for every user of the machine.
    pub unsafe fn run_calls_in_signal_handlers(mut self) -> Self {
        self.calls_in_handlers = true;
        self
    }
    /// Inject IPI faults (off by default).
    pub fn faults(mut self, f: Faults) -> Self {
        self.faults = f;
        self
    }

    /// Starts the CPU threads and brings every CPU online. On an error nothing is left behind:
    /// no thread, no signal handler installed by this build.
    pub fn build(self) -> Result<Machine, Error> {
        Machine::start(self)
    }
}
