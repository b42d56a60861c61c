//! The hosted backend: CPUs are OS threads, IPIs are real-time signals.
//!
//! A [`Machine`] starts one thread per CPU (pinned to a core when there are enough cores) and
//! runs the [`Engine`] on them through [`HostPlatform`]:
//!
//! * **IPI** — a real-time signal sent with `tgkill` to a CPU thread that is busy; *nothing* to
//!   a CPU that is idle-polling (it sees its queue: the engine elides the IPI); a futex wake to a
//!   CPU that sleeps idle.
//! * **Interrupt masking** — a per-CPU soft mask (no system call): a signal that arrives while
//!   masked is remembered and served when the mask is lifted.
//! * **Work** — [`Machine::run_on`] submits a closure to run in a CPU's *task context*; calls
//!   are made from there (or from call handlers).
//!
//! # What a call's function may do (signal context)
//!
//! With [`Delivery::Signal`] (the default) a call's function usually runs **inside a signal
//! handler** on the target thread, interrupting whatever that thread was doing. It may:
//! read and write atomics and memory it owns or that is protected by the call protocol, spin,
//! make *no-wait* calls (`*_async`), use async-signal-safe system calls. It must **not**:
//! allocate or free memory (the interrupted code may hold the allocator's lock), take a lock the
//! interrupted code might hold (`Mutex`, `println!`'s stdout lock), panic (the process aborts),
//! or make waiting calls (refused with [`Error::WouldDeadlock`]).
//!
//! If your functions need more, use [`Delivery::SafePoint`]: no signals are sent; calls run
//! only when the target CPU is idle, waits for a call of its own, or its task calls
//! [`safe_point`]. Functions then run in ordinary thread context and may allocate or lock
//! (still not waiting calls: they run as call handlers). The price is latency: a busy CPU that
//! never reaches a safe point never runs its calls.
//!
//! Signals: the backend picks a free real-time signal at run time (or the one given to
//! [`MachineBuilder::signal`]), installs its handler once per process and never removes it;
//! the handler does nothing on threads that are not CPUs of a live machine. System calls
//! interrupted by it are restarted (`SA_RESTART`); code that sees `EINTR` anyway must retry.
//! `std::thread::sleep` in a CPU's task may never return while IPIs keep arriving (each
//! restart adds timer slack): use [`sleep`], which sleeps to an absolute deadline.

use std::cell::Cell;
use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{
    compiler_fence, fence, AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering,
};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::cpumask::CpuId;
use crate::engine::{Engine, HeapStorage};
use crate::error::Error;
use crate::platform::Platform;

/// The engine as the hosted backend runs it.
pub type HostEngine = Engine<HostPlatform, HeapStorage>;

/// What an idle CPU does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Spin on the queue: lowest latency, no IPI needed, burns its core.
    Poll,
    /// Sleep on a futex: a call wakes it with a futex wake.
    Sleep,
    /// Poll for the given time after each piece of work, then sleep.
    PollThenSleep(Duration),
}

/// How calls reach a busy CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// A real-time signal interrupts the CPU: functions run in signal context.
    Signal,
    /// No signal: functions run only at safe points (idle, waiting, [`safe_point`]).
    SafePoint,
}

/// Whether CPU threads are pinned to cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug)]
pub struct MachineBuilder {
    cpus: usize,
    pinning: Pinning,
    idle: IdlePolicy,
    delivery: Delivery,
    signal: Option<i32>,
    nmi_signal: Option<i32>,
    timeout: Duration,
    stall_threshold: Duration,
    faults: Faults,
    sink: Option<ReportSink>,
}

/// IPI fault injection for the hosted backend (testing the lost-IPI recovery, C9).
///
/// Probabilities are per IPI (signal or futex wake). A *dropped* IPI is simply not sent; a
/// *delayed* one is sent after a random 1–50 µs spin. Calls still complete because stuck waits
/// and the watchdog re-send IPIs after the stall threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Probability in `[0, 1]` that an IPI is dropped.
    pub drop_ipi: f64,
    /// Probability in `[0, 1]` that an IPI is delayed.
    pub delay_ipi: f64,
    /// Seed of the fault decisions.
    pub seed: u64,
}

impl Default for MachineBuilder {
    fn default() -> Self {
        MachineBuilder {
            cpus: thread::available_parallelism().map_or(2, |n| n.get()),
            pinning: Pinning::Auto,
            idle: IdlePolicy::PollThenSleep(Duration::from_micros(50)),
            delivery: Delivery::Signal,
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
    /// Number of CPUs (threads); may exceed the number of cores.
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
    /// Send the engine's reports to `sink` instead of stderr.
    pub fn report_sink(mut self, sink: ReportSink) -> Self {
        self.sink = Some(sink);
        self
    }
    /// Inject IPI faults (off by default).
    pub fn faults(mut self, f: Faults) -> Self {
        self.faults = f;
        self
    }

    /// Starts the CPU threads and brings every CPU online.
    pub fn build(self) -> Result<Machine, Error> {
        Machine::start(self)
    }
}

/// Futex word values of [`HostCpu::state`].
const AWAKE: u32 = 0;
const SLEEPING: u32 = 1;

/// Host-side state of one CPU.
struct HostCpu {
    tid: AtomicI32,
    /// Futex word: `SLEEPING` while the thread waits on it.
    state: AtomicU32,
    /// Soft interrupt mask. Only this CPU's thread (and its signal handler) writes it.
    masked: AtomicBool,
    /// A signal arrived while masked.
    pending: AtomicBool,
    has_tasks: AtomicBool,
    tasks: Mutex<VecDeque<Job>>,
    stop: AtomicBool,
    parked: AtomicBool,
    exit: AtomicBool,
    started: AtomicBool,
    signals_sent: AtomicU64,
    futex_wakes: AtomicU64,
}

type Job = Box<dyn FnOnce(&HostEngine) + Send>;

/// The [`Platform`] of the hosted backend.
pub struct HostPlatform {
    id: u64,
    pid: i32,
    signo: i32,
    nmi_signo: i32,
    delivery: Delivery,
    oversubscribed: bool,
    cpus: Box<[HostCpu]>,
    /// Fault injection, in parts per 2^32.
    drop_threshold: AtomicU64,
    delay_threshold: AtomicU64,
    sink: Option<ReportSink>,
    fault_rng: AtomicU64,
    ipis_dropped: AtomicU64,
    ipis_delayed: AtomicU64,
}

impl std::fmt::Debug for HostPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPlatform")
            .field("signal", &self.signo)
            .field("delivery", &self.delivery)
            .field("cpus", &self.cpus.len())
            .finish_non_exhaustive()
    }
}

/// Which machine and CPU the current thread is, if any. Read by the signal handler: a `const`
/// thread-local of a `Copy` type, so access needs no lazy initialisation (async-signal-safe).
#[derive(Clone, Copy)]
struct Current {
    machine: u64,
    cpu: CpuId,
    engine: *const HostEngine,
}

thread_local! {
    static CURRENT: Cell<Current> = const {
        Cell::new(Current { machine: 0, cpu: 0, engine: ptr::null() })
    };
}

fn current() -> Current {
    CURRENT.with(Cell::get)
}

impl HostPlatform {
    fn me(&self) -> Option<CpuId> {
        let c = current();
        (c.machine == self.id).then_some(c.cpu)
    }

    /// Real-time signals sent (IPIs that were not futex wakes or elided), over all CPUs.
    pub fn signals_sent(&self) -> u64 {
        // Relaxed: statistics.
        self.cpus
            .iter()
            .map(|c| c.signals_sent.load(Ordering::Relaxed))
            .sum()
    }

    /// Futex wakes of sleeping idle CPUs sent as IPIs, over all CPUs.
    pub fn futex_wakes(&self) -> u64 {
        // Relaxed: statistics.
        self.cpus
            .iter()
            .map(|c| c.futex_wakes.load(Ordering::Relaxed))
            .sum()
    }

    /// Whether `cpu` has interrupts (soft-)masked right now (an observation from any thread).
    pub fn cpu_masked(&self, cpu: CpuId) -> bool {
        // Relaxed: an observation; its owner may change it at any time.
        self.cpus
            .get(cpu)
            .is_some_and(|c| c.masked.load(Ordering::Relaxed))
    }

    /// The signal number used for IPIs.
    pub fn signal(&self) -> i32 {
        self.signo
    }

    /// The signal number used for NMIs.
    pub fn nmi_signal(&self) -> i32 {
        self.nmi_signo
    }

    /// Changes the fault injection at run time (the seed is ignored).
    pub fn set_faults(&self, f: Faults) -> Result<(), Error> {
        let drop = probability_threshold(f.drop_ipi)?;
        let delay = probability_threshold(f.delay_ipi)?;
        // Relaxed: configuration values.
        self.drop_threshold.store(drop, Ordering::Relaxed);
        self.delay_threshold.store(delay, Ordering::Relaxed);
        Ok(())
    }

    /// IPIs dropped by fault injection.
    pub fn ipis_dropped(&self) -> u64 {
        // Relaxed: statistics.
        self.ipis_dropped.load(Ordering::Relaxed)
    }

    /// IPIs delayed by fault injection.
    pub fn ipis_delayed(&self) -> u64 {
        // Relaxed: statistics.
        self.ipis_delayed.load(Ordering::Relaxed)
    }

    /// A pseudo-random 32-bit roll (splitmix64 over an atomic counter: lock-free and
    /// async-signal-safe).
    fn fault_roll(&self) -> u64 {
        // Relaxed: only uniqueness of the counter value matters.
        let mut z = self
            .fault_rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) >> 32
    }

    /// Wakes `cpu` if it sleeps idle. Returns whether it was sleeping.
    fn wake_if_sleeping(&self, cpu: CpuId) -> bool {
        let hc = &self.cpus[cpu];
        // SeqCst: pairs with the sleeper's SeqCst store + fence + queue check (`sleep_once`).
        if hc
            .state
            .compare_exchange(SLEEPING, AWAKE, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
        {
            atomic_wait::wake_one(&hc.state);
            true
        } else {
            false
        }
    }

    fn tgkill(&self, cpu: CpuId) {
        if self.tgkill_signal(cpu, self.signo) {
            self.cpus[cpu].signals_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends `signo` to CPU `cpu`'s thread, retrying while the signal queue is full.
    fn tgkill_signal(&self, cpu: CpuId, signo: i32) -> bool {
        let hc = &self.cpus[cpu];
        // Relaxed: the tid was published before the CPU went online (SeqCst online mask).
        let tid = hc.tid.load(Ordering::Relaxed);
        loop {
            // SAFETY: plain system call with integer arguments; async-signal-safe.
            let r = unsafe { libc::syscall(libc::SYS_tgkill, self.pid, tid, signo) };
            if r == 0 {
                return true;
            }
            // SAFETY: reading this thread's errno.
            let err = unsafe { *libc::__errno_location() };
            if err == libc::EAGAIN {
                // The real-time signal queue is full: retry, never drop the IPI.
                // SAFETY: plain system call; async-signal-safe.
                unsafe { libc::sched_yield() };
                continue;
            }
            debug_assert!(false, "tgkill to CPU {cpu} (tid {tid}) failed: errno {err}");
            return false;
        }
    }
}

// SAFETY: (1) `me` reads a thread-local that only the CPU thread of this machine sets to its
// own id, and clears (with the signal blocked) before exiting. (2) `send_ipi` either wakes a
// sleeping CPU, whose idle loop then serves its queue, or sends a signal whose handler calls
// `handle_ipi`, or (SafePoint) relies on the documented safe points; all are async-signal-safe.
// (3) while `masked` is set, the handler only records `pending`, which `irq_restore` serves.
unsafe impl Platform for HostPlatform {
    type IrqState = bool;

    fn current_cpu(&self) -> Option<CpuId> {
        self.me()
    }

    fn send_ipi(&self, cpu: CpuId) {
        // Relaxed: configuration values; a stale read only applies the old probability.
        let drop = self.drop_threshold.load(Ordering::Relaxed);
        let delay = self.delay_threshold.load(Ordering::Relaxed);
        if drop != 0 || delay != 0 {
            let r = self.fault_roll();
            if r < drop {
                // Relaxed: statistics.
                self.ipis_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if r < drop + delay {
                self.ipis_delayed.fetch_add(1, Ordering::Relaxed);
                let spin_ns = 1_000 + (r % 49_000);
                let start = self.now_ns();
                while self.now_ns() < start + spin_ns {
                    std::hint::spin_loop();
                }
            }
        }
        if self.wake_if_sleeping(cpu) {
            self.cpus[cpu].futex_wakes.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.delivery == Delivery::Signal {
            self.tgkill(cpu);
        }
    }

    fn irq_save(&self) -> bool {
        let Some(me) = self.me() else {
            return true;
        };
        let hc = &self.cpus[me];
        // Relaxed + compiler fence: only this thread and its signal handler touch `masked`.
        let prev = hc.masked.load(Ordering::Relaxed);
        hc.masked.store(true, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        prev
    }

    fn irq_restore(&self, was_masked: bool) {
        if was_masked {
            return;
        }
        let c = current();
        if c.machine != self.id {
            return;
        }
        let hc = &self.cpus[c.cpu];
        compiler_fence(Ordering::SeqCst);
        // Relaxed: see irq_save.
        hc.masked.store(false, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        // A signal that arrived while masked is delivered now. (One arriving after the store
        // above runs its handler directly.)
        while hc.pending.load(Ordering::Relaxed) && hc.pending.swap(false, Ordering::Relaxed) {
            // SAFETY: `engine` is this machine's engine, alive while this CPU thread runs.
            unsafe { (*c.engine).handle_ipi() };
        }
    }

    fn irqs_masked(&self) -> bool {
        self.me()
            .is_some_and(|me| self.cpus[me].masked.load(Ordering::Relaxed))
    }

    fn relax(&self) {
        if self.oversubscribed {
            // More CPUs than cores: let the CPU we wait for run.
            thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }

    fn report(&self, message: std::fmt::Arguments<'_>) {
        match self.sink {
            Some(sink) => with_formatted(message, sink),
            None => write_stderr(message),
        }
    }

    fn has_nmi(&self) -> bool {
        true
    }

    fn send_nmi(&self, cpu: CpuId) {
        self.tgkill_signal(cpu, self.nmi_signo);
    }

    fn cpu_irqs_masked(&self, cpu: CpuId) -> Option<bool> {
        (cpu < self.cpus.len()).then(|| self.cpu_masked(cpu))
    }

    fn now_ns(&self) -> u64 {
        // clock_gettime is async-signal-safe (an `Instant` behind a lazily initialised static
        // would not be, from a handler interrupting that initialisation).
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out pointer; CLOCK_MONOTONIC always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
}

/// Formats `message` into a stack buffer (truncated at 1 KiB) without allocating or locking,
/// and hands the text to `f` (usable in signal context).
fn with_formatted(message: std::fmt::Arguments<'_>, f: impl FnOnce(&str)) {
    struct Buf {
        bytes: [u8; 1024],
        len: usize,
    }
    impl std::fmt::Write for Buf {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let room = self.bytes.len() - self.len;
            let mut n = s.len().min(room);
            while !s.is_char_boundary(n) {
                n -= 1;
            }
            self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            Ok(())
        }
    }
    let mut buf = Buf {
        bytes: [0; 1024],
        len: 0,
    };
    let _ = std::fmt::Write::write_fmt(&mut buf, message);
    f(std::str::from_utf8(&buf.bytes[..buf.len]).unwrap_or("<report not UTF-8>"));
}

/// Writes one line to stderr with a single `write(2)` (async-signal-safe).
fn write_stderr(message: std::fmt::Arguments<'_>) {
    with_formatted(message, |text| {
        let mut line = [0u8; 1025];
        line[..text.len()].copy_from_slice(text.as_bytes());
        line[text.len()] = b'\n';
        // SAFETY: writes initialised bytes from a live buffer to fd 2; async-signal-safe.
        unsafe { libc::write(2, line.as_ptr().cast(), text.len() + 1) };
    });
}

/// Receives the engine's reports (stalls, dumps via `dump_to_report`). Called from any
/// context, including signal handlers: it must not allocate or take locks.
pub type ReportSink = fn(&str);

/// The IPI signal handler.
extern "C" fn on_ipi_signal(_signo: libc::c_int) {
    // SAFETY: this thread's errno location; saved and restored around the handler.
    let errno = unsafe { *libc::__errno_location() };
    let c = current();
    if !c.engine.is_null() {
        // SAFETY: the pointer is set by this CPU thread while its machine is alive and cleared
        // (with this signal blocked) before the thread exits.
        let engine = unsafe { &*c.engine };
        let hc = &engine.platform().cpus[c.cpu];
        // Relaxed: this thread's own flag.
        if hc.masked.load(Ordering::Relaxed) {
            hc.pending.store(true, Ordering::Relaxed);
        } else {
            engine.handle_ipi();
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The NMI signal handler: runs whatever the soft mask says (that is the point of an NMI).
/// While it runs, every signal is blocked (the IPI one included), so NMIs never nest and an
/// IPI never interrupts an NMI handler.
extern "C" fn on_nmi_signal(_signo: libc::c_int) {
    // SAFETY: this thread's errno location; saved and restored around the handler.
    let errno = unsafe { *libc::__errno_location() };
    let c = current();
    if !c.engine.is_null() {
        // SAFETY: as in `on_ipi_signal`.
        unsafe { &*c.engine }.handle_nmi();
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Which of our handlers a signal gets.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SignalKind {
    Ipi,
    Nmi,
}

/// Installs our handler of `kind` on `signo` (once per process). Fails if another handler
/// owns it.
fn install_handler(signo: i32, kind: SignalKind) -> Result<(), Error> {
    static INSTALLED: Mutex<Vec<(i32, SignalKind)>> = Mutex::new(Vec::new());
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, k)) = installed.iter().find(|(s, _)| *s == signo) {
        return if k == kind {
            Ok(())
        } else {
            Err(Error::InvalidConfig("the IPI and NMI signals must differ"))
        };
    }
    // SAFETY: sigaction with a zeroed struct and a valid out pointer only reads the disposition.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above (null `act` = query).
    if unsafe { libc::sigaction(signo, ptr::null(), &mut old) } != 0 {
        return Err(Error::InvalidConfig(
            "IPI signal number is not a valid signal",
        ));
    }
    if old.sa_sigaction != libc::SIG_DFL {
        return Err(Error::InvalidConfig(
            "IPI signal already has a handler in this process",
        ));
    }
    // SAFETY: zeroed sigaction is a valid starting point; we set handler, flags, empty mask.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int) = match kind {
        SignalKind::Ipi => on_ipi_signal,
        SignalKind::Nmi => on_nmi_signal,
    };
    act.sa_sigaction = handler as usize;
    act.sa_flags = libc::SA_RESTART;
    // SAFETY: valid pointer to our sigaction's mask.
    unsafe {
        match kind {
            SignalKind::Ipi => libc::sigemptyset(&mut act.sa_mask),
            SignalKind::Nmi => libc::sigfillset(&mut act.sa_mask),
        }
    };
    // SAFETY: installs a handler that is async-signal-safe (see `on_ipi_signal`).
    if unsafe { libc::sigaction(signo, &act, ptr::null_mut()) } != 0 {
        return Err(Error::InvalidConfig(
            "could not install the IPI signal handler",
        ));
    }
    installed.push((signo, kind));
    Ok(())
}

/// Picks the process-wide default signal of `kind`: the first free real-time signal.
fn default_signal(kind: SignalKind) -> Result<i32, Error> {
    static IPI: OnceLock<Result<i32, Error>> = OnceLock::new();
    static NMI: OnceLock<Result<i32, Error>> = OnceLock::new();
    let chosen = match kind {
        SignalKind::Ipi => &IPI,
        SignalKind::Nmi => &NMI,
    };
    *chosen.get_or_init(|| {
        for signo in libc::SIGRTMIN()..=libc::SIGRTMAX() {
            if install_handler(signo, kind).is_ok() {
                return Ok(signo);
            }
        }
        Err(Error::InvalidConfig(
            "no free real-time signal for IPIs or NMIs",
        ))
    })
}

fn set_signal_blocked(signo: i32, blocked: bool) {
    // SAFETY: building a signal set on the stack and applying it to this thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signo);
        let how = if blocked {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, ptr::null_mut());
    }
}

static NEXT_MACHINE_ID: AtomicU64 = AtomicU64::new(1);

struct Inner {
    engine: HostEngine,
    idle: IdlePolicy,
    watchdog_exit: AtomicBool,
}

/// Converts a probability to a threshold on a 32-bit roll.
fn probability_threshold(p: f64) -> Result<u64, Error> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::InvalidConfig(
            "fault probabilities must be within [0, 1]",
        ));
    }
    Ok((p * (1u64 << 32) as f64) as u64)
}

/// The watchdog: re-sends IPIs to CPUs whose queued calls stay untaken (no-wait calls have
/// no waiter to notice a lost IPI).
fn watchdog_main(inner: Arc<Inner>, period: Duration) {
    while !inner.watchdog_exit.load(Ordering::SeqCst) {
        thread::sleep(period);
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
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("engine", &self.inner.engine)
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// A builder with the defaults.
    pub fn builder() -> MachineBuilder {
        MachineBuilder::default()
    }

    fn start(b: MachineBuilder) -> Result<Machine, Error> {
        if b.cpus == 0 || b.cpus > crate::MAX_CPUS {
            return Err(Error::InvalidConfig(
                "CPU count must be between 1 and MAX_CPUS",
            ));
        }
        let signo = match b.signal {
            Some(s) => {
                if s < libc::SIGRTMIN() || s > libc::SIGRTMAX() {
                    return Err(Error::InvalidConfig(
                        "IPI signal must be a real-time signal",
                    ));
                }
                install_handler(s, SignalKind::Ipi)?;
                s
            }
            None => default_signal(SignalKind::Ipi)?,
        };
        let nmi_signo = match b.nmi_signal {
            Some(s) => {
                if s < libc::SIGRTMIN() || s > libc::SIGRTMAX() {
                    return Err(Error::InvalidConfig(
                        "NMI signal must be a real-time signal",
                    ));
                }
                install_handler(s, SignalKind::Nmi)?;
                s
            }
            None => default_signal(SignalKind::Nmi)?,
        };
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let ncores = thread::available_parallelism().map_or(1, |n| n.get());
        let cpus = (0..b.cpus)
            .map(|_| HostCpu {
                tid: AtomicI32::new(0),
                state: AtomicU32::new(AWAKE),
                masked: AtomicBool::new(false),
                pending: AtomicBool::new(false),
                has_tasks: AtomicBool::new(false),
                tasks: Mutex::new(VecDeque::new()),
                stop: AtomicBool::new(false),
                parked: AtomicBool::new(false),
                exit: AtomicBool::new(false),
                started: AtomicBool::new(false),
                signals_sent: AtomicU64::new(0),
                futex_wakes: AtomicU64::new(0),
            })
            .collect();
        let platform = HostPlatform {
            id: NEXT_MACHINE_ID.fetch_add(1, Ordering::Relaxed),
            // SAFETY: getpid has no preconditions.
            pid: unsafe { libc::getpid() },
            signo,
            nmi_signo,
            delivery: b.delivery,
            oversubscribed: b.cpus > ncores,
            cpus,
            drop_threshold: AtomicU64::new(probability_threshold(b.faults.drop_ipi)?),
            delay_threshold: AtomicU64::new(probability_threshold(b.faults.delay_ipi)?),
            sink: b.sink,
            fault_rng: AtomicU64::new(b.faults.seed),
            ipis_dropped: AtomicU64::new(0),
            ipis_delayed: AtomicU64::new(0),
        };
        let engine = Engine::new(platform, HeapStorage::new(b.cpus))?;
        engine.set_stall_threshold_ns(b.stall_threshold.as_nanos() as u64);
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
        let mut threads = Vec::with_capacity(b.cpus);
        for cpu in 0..b.cpus {
            let inner2 = Arc::clone(&inner);
            let core = pin(cpu);
            let t = thread::Builder::new()
                .name(format!("smpcall-cpu{cpu}"))
                .spawn(move || cpu_main(inner2, cpu, core))
                .map_err(|_| Error::InvalidConfig("could not spawn a CPU thread"))?;
            threads.push(t);
        }
        let watchdog = (!b.stall_threshold.is_zero())
            .then(|| {
                let inner2 = Arc::clone(&inner);
                let period = (b.stall_threshold / 4)
                    .clamp(Duration::from_millis(1), Duration::from_millis(250));
                thread::Builder::new()
                    .name("smpcall-watchdog".into())
                    .spawn(move || watchdog_main(inner2, period))
            })
            .transpose()
            .map_err(|_| Error::InvalidConfig("could not spawn the watchdog thread"))?;
        let mut machine = Machine {
            inner,
            threads,
            watchdog,
            timeout: b.timeout,
            down: false,
        };
        let deadline = Instant::now() + b.timeout;
        for cpu in 0..b.cpus {
            while !machine.host(cpu).started.load(Ordering::SeqCst) {
                if Instant::now() > deadline {
                    let _ = machine.stop();
                    return Err(Error::TimedOut("CPU threads to start"));
                }
                thread::sleep(Duration::from_micros(100));
            }
            machine.inner.engine.mark_online(cpu)?;
            // It may have parked as offline before we marked it: kick it.
            machine.inner.engine.platform().wake_if_sleeping(cpu);
        }
        Ok(machine)
    }

    fn host(&self, cpu: CpuId) -> &HostCpu {
        &self.inner.engine.platform().cpus[cpu]
    }

    /// The engine (for statistics; calls must be made from a CPU, see [`run_on`](Machine::run_on)).
    pub fn engine(&self) -> &HostEngine {
        &self.inner.engine
    }

    /// Number of CPUs.
    pub fn nr_cpus(&self) -> usize {
        self.inner.engine.nr_cpus()
    }

    /// Runs `f` in CPU `cpu`'s task context (after the tasks submitted before it).
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

    /// Takes `cpu` offline (see [`Engine::cpu_down`]), driven from another online CPU.
    /// Tasks already queued to `cpu` still run there, but calls they make are refused with
    /// [`Error::Offline`]; new tasks are refused.
    pub fn cpu_down(&self, cpu: CpuId) -> Result<(), Error> {
        let via = self.other_online(cpu)?;
        self.run_on(via, move |e| e.cpu_down(cpu))
            .join_timeout(self.timeout)?
    }

    /// Brings `cpu` back online (see [`Engine::cpu_up`]), driven from an online CPU.
    pub fn cpu_up(&self, cpu: CpuId) -> Result<(), Error> {
        let via = self.other_online(cpu)?;
        self.run_on(via, move |e| e.cpu_up(cpu))
            .join_timeout(self.timeout)?
    }

    fn other_online(&self, cpu: CpuId) -> Result<CpuId, Error> {
        if cpu >= self.nr_cpus() {
            return Err(Error::UnknownCpu(cpu));
        }
        let mut online = self.inner.engine.online_mask();
        online.clear(cpu);
        online
            .first()
            .ok_or(Error::Hotplug("cannot take down the last online CPU"))
    }

    /// Shuts down: refuses new calls, lets every task finish, drains every queue, stops and
    /// joins the threads. If that does not finish within the builder's timeout, the threads
    /// are left running (their memory is kept alive, never freed under them) and
    /// [`Error::TimedOut`] is returned.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), Error> {
        if self.down {
            return Ok(());
        }
        self.down = true;
        let engine = &self.inner.engine;
        engine.shut_down();
        let n = self.nr_cpus();
        for cpu in 0..n {
            self.host(cpu).stop.store(true, Ordering::SeqCst);
            engine.platform().wake_if_sleeping(cpu);
        }
        let deadline = Instant::now() + self.timeout;
        let all_parked = |m: &Machine| (0..n).all(|c| m.host(c).parked.load(Ordering::SeqCst));
        while !(all_parked(self) && engine.is_quiescent()) {
            if Instant::now() > deadline {
                // Detach: the threads keep their Arc, so nothing is freed under them.
                self.threads.clear();
                return Err(Error::TimedOut("tasks and calls to finish at shutdown"));
            }
            thread::sleep(Duration::from_micros(200));
        }
        for cpu in 0..n {
            self.host(cpu).exit.store(true, Ordering::SeqCst);
            engine.platform().wake_if_sleeping(cpu);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.inner.watchdog_exit.store(true, Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        Ok(())
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

enum TaskState<R> {
    Refused(Error),
    Pending(mpsc::Receiver<thread::Result<R>>, CpuId),
}

/// A task submitted with [`Machine::run_on`].
pub struct Task<R> {
    state: TaskState<R>,
}

impl<R> std::fmt::Debug for Task<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.state {
            TaskState::Refused(e) => write!(f, "Task(refused: {e})"),
            TaskState::Pending(_, cpu) => write!(f, "Task(on CPU {cpu})"),
        }
    }
}

impl<R> Task<R> {
    /// Waits for the task's result. A panic in the task is resumed here.
    pub fn join(self) -> Result<R, Error> {
        match self.state {
            TaskState::Refused(e) => Err(e),
            TaskState::Pending(rx, _) => match rx.recv() {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(payload)) => panic::resume_unwind(payload),
                Err(_) => Err(Error::ShutDown),
            },
        }
    }

    /// Like [`join`](Task::join), but gives up after `limit` with [`Error::TimedOut`] (the task
    /// keeps running; its result is discarded).
    pub fn join_timeout(self, limit: Duration) -> Result<R, Error> {
        match self.state {
            TaskState::Refused(e) => Err(e),
            TaskState::Pending(rx, _) => match rx.recv_timeout(limit) {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(payload)) => panic::resume_unwind(payload),
                Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::TimedOut("a task to finish")),
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::ShutDown),
            },
        }
    }
}

/// Sleeps for `d` in a CPU's task context, however often IPIs arrive.
///
/// `std::thread::sleep` restarts `nanosleep` with the *remaining* time after every signal, and
/// each restart adds the kernel's timer slack: on a CPU that receives IPIs more often than the
/// slack (~50 µs), it may never finish. This sleeps until an absolute deadline instead
/// (`clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)`), so interruptions cost nothing.
pub fn sleep(d: Duration) {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let total = now.tv_nsec as u128 + d.as_nanos();
    let deadline = libc::timespec {
        tv_sec: now.tv_sec + (total / 1_000_000_000) as libc::time_t,
        tv_nsec: (total % 1_000_000_000) as libc::c_long,
    };
    loop {
        // SAFETY: valid deadline pointer; a null remainder is allowed with TIMER_ABSTIME.
        let r = unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &deadline,
                ptr::null_mut(),
            )
        };
        if r != libc::EINTR {
            return;
        }
    }
}

/// A safe point: serves the current CPU's queue (for [`Delivery::SafePoint`], or to cut
/// latency anywhere). Returns how many calls ran; 0 when not on a CPU thread.
pub fn safe_point() -> usize {
    let c = current();
    if c.engine.is_null() {
        return 0;
    }
    // SAFETY: set by this CPU thread while its machine is alive.
    unsafe { (*c.engine).serve_queue() }
}

/// The body of a CPU thread.
fn cpu_main(inner: Arc<Inner>, cpu: CpuId, core: Option<core_affinity::CoreId>) {
    if let Some(core) = core {
        core_affinity::set_for_current(core);
    }
    let engine = &inner.engine;
    let platform = engine.platform();
    let hc = &platform.cpus[cpu];
    CURRENT.with(|c| {
        c.set(Current {
            machine: platform.id,
            cpu,
            engine: engine as *const HostEngine,
        })
    });
    // SAFETY: gettid has no preconditions.
    hc.tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
    set_signal_blocked(platform.signo, false);
    set_signal_blocked(platform.nmi_signo, false);
    hc.started.store(true, Ordering::SeqCst);

    loop {
        if hc.has_tasks.load(Ordering::SeqCst) {
            let job = {
                let mut q = hc.tasks.lock().unwrap_or_else(|e| e.into_inner());
                let job = q.pop_front();
                if q.is_empty() {
                    hc.has_tasks.store(false, Ordering::SeqCst);
                }
                job
            };
            if let Some(job) = job {
                job(engine);
                continue;
            }
        }
        if hc.stop.load(Ordering::SeqCst) {
            hc.parked.store(true, Ordering::SeqCst);
            if hc.exit.load(Ordering::SeqCst) {
                break;
            }
        }
        idle(&inner, cpu, hc);
    }

    // Leave no handler that can reach this CPU's memory: block the signal, then forget who we
    // are. A signal still pending is discarded with the thread.
    set_signal_blocked(platform.signo, true);
    set_signal_blocked(platform.nmi_signo, true);
    CURRENT.with(|c| {
        c.set(Current {
            machine: 0,
            cpu: 0,
            engine: ptr::null(),
        })
    });
}

fn wants_attention(hc: &HostCpu) -> bool {
    hc.has_tasks.load(Ordering::Relaxed)
        || (hc.stop.load(Ordering::Relaxed) && !hc.parked.load(Ordering::Relaxed))
        || hc.exit.load(Ordering::Relaxed)
}

fn idle(inner: &Inner, cpu: CpuId, hc: &HostCpu) {
    let engine = &inner.engine;
    // Idle time is an extended quiescent state: RCU skips this CPU (no IPI).
    engine.idle_enter();
    idle_wait(inner, cpu, hc);
    engine.idle_exit();
}

fn idle_wait(inner: &Inner, cpu: CpuId, hc: &HostCpu) {
    let engine = &inner.engine;
    if !engine.is_online(cpu) {
        // Offline: park until brought up (cpu_up kicks us), a task, or exit.
        sleep_once(engine, cpu, hc, false);
        return;
    }
    match inner.idle {
        IdlePolicy::Poll => engine.idle_poll(|| wants_attention(hc)),
        IdlePolicy::Sleep => sleep_once(engine, cpu, hc, true),
        IdlePolicy::PollThenSleep(limit) => {
            let start = Instant::now();
            let mut spins = 0u32;
            let mut expired = false;
            engine.idle_poll(|| {
                spins = spins.wrapping_add(1);
                if spins % 64 == 0 && start.elapsed() > limit {
                    expired = true;
                }
                expired || wants_attention(hc)
            });
            if expired && !wants_attention(hc) {
                sleep_once(engine, cpu, hc, true);
            }
        }
    }
}

/// Sleeps on the CPU's futex word until a call, a task or a stop request wakes it.
fn sleep_once(engine: &HostEngine, cpu: CpuId, hc: &HostCpu, was_online: bool) {
    hc.state.store(SLEEPING, Ordering::SeqCst);
    // SeqCst fence: pairs with the sender's push / fence / `wake_if_sleeping` CAS: either it
    // sees SLEEPING and wakes us, or we see its call here.
    fence(Ordering::SeqCst);
    // An offline CPU sleeps until it is brought up; an online one until a call or a task.
    if !engine.has_queued(cpu) && !wants_attention(hc) && engine.is_online(cpu) == was_online {
        atomic_wait::wait(&hc.state, SLEEPING);
    }
    hc.state.store(AWAKE, Ordering::SeqCst);
    if engine.has_queued(cpu) {
        engine.handle_ipi();
    }
}
