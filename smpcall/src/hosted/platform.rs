//! The [`Platform`] of the hosted backend: who am I (a thread-local), IPIs (signal, futex wake
//! or nothing), the soft interrupt mask, the clock, reports.

use std::cell::Cell;
use std::collections::VecDeque;
use std::ptr;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use super::builder::{Delivery, Faults};
use super::HostEngine;
use crate::cpumask::CpuId;
use crate::error::{ConfigError, Error, IpiFault};
use crate::platform::Platform;

/// Futex word values of [`HostCpu::state`].
pub(super) const AWAKE: u32 = 0;
pub(super) const SLEEPING: u32 = 1;

/// Host-side state of one CPU.
pub(super) struct HostCpu {
    pub(super) tid: AtomicI32,
    /// Futex word: `SLEEPING` while the thread waits on it.
    pub(super) state: AtomicU32,
    /// Soft interrupt mask. Only this CPU's thread (and its signal handler) writes it.
    pub(super) masked: AtomicBool,
    /// A signal arrived while masked.
    pub(super) pending: AtomicBool,
    /// An unmask is replaying pending signals on this CPU: an unmask nested in that replay
    /// leaves what is pending to it (a loop) instead of replaying again one level deeper —
    /// under a steady stream of IPIs each replayed flush's own unmask found a new pending
    /// signal and recursed until the stack overflowed.
    pub(super) replaying: AtomicBool,
    /// Depth of `interruptible` regions (and `sleep`s) the thread is in: the IPI handler may
    /// run every call there. Only this CPU's thread writes it.
    pub(super) interruptible: AtomicU32,
    pub(super) has_tasks: AtomicBool,
    pub(super) tasks: Mutex<VecDeque<Job>>,
    pub(super) stop: AtomicBool,
    pub(super) parked: AtomicBool,
    pub(super) exit: AtomicBool,
    pub(super) started: AtomicBool,
    pub(super) signals_sent: AtomicU64,
    pub(super) futex_wakes: AtomicU64,
    /// Who is this CPU: a spawned thread, an attached one, or nobody yet (`attach.rs`).
    pub(super) occupant: std::sync::atomic::AtomicU8,
}

impl HostCpu {
    pub(super) fn new(spawned: bool) -> Self {
        HostCpu {
            occupant: super::attach::new_occupant(spawned),
            tid: AtomicI32::new(0),
            state: AtomicU32::new(AWAKE),
            masked: AtomicBool::new(false),
            pending: AtomicBool::new(false),
            replaying: AtomicBool::new(false),
            interruptible: AtomicU32::new(0),
            has_tasks: AtomicBool::new(false),
            tasks: Mutex::new(VecDeque::new()),
            stop: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            exit: AtomicBool::new(false),
            started: AtomicBool::new(false),
            signals_sent: AtomicU64::new(0),
            futex_wakes: AtomicU64::new(0),
        }
    }
}

pub(super) type Job = Box<dyn FnOnce(&HostEngine) + Send>;

/// The [`Platform`] of the hosted backend.
pub struct HostPlatform {
    pub(super) id: u64,
    pub(super) pid: i32,
    pub(super) signo: i32,
    pub(super) nmi_signo: i32,
    pub(super) delivery: Delivery,
    /// Every call may run in the IPI handler (the unsafe opt-in).
    pub(super) calls_in_handlers: bool,
    pub(super) oversubscribed: bool,
    pub(super) cpus: Box<[HostCpu]>,
    /// Fault injection, in parts per 2^32.
    pub(super) drop_threshold: AtomicU64,
    pub(super) delay_threshold: AtomicU64,
    pub(super) sink: Option<ReportSink>,
    pub(super) fault_rng: AtomicU64,
    pub(super) ipis_dropped: AtomicU64,
    pub(super) ipis_delayed: AtomicU64,
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
pub(super) struct Current {
    pub(super) machine: u64,
    pub(super) cpu: CpuId,
    pub(super) engine: *const HostEngine,
}

thread_local! {
    pub(super) static CURRENT: Cell<Current> = const {
        Cell::new(Current { machine: 0, cpu: 0, engine: ptr::null() })
    };
}

thread_local! {
    /// Spins of this thread in `relax` (a `const` Cell: no lazy initialisation, usable from
    /// signal handlers).
    static RELAX_SPINS: Cell<u32> = const { Cell::new(0) };
}

pub(super) fn current() -> Current {
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

    /// Real-time signals (IPIs) sent to `cpu` (0 for an unknown CPU).
    pub fn signals_sent_to(&self, cpu: CpuId) -> u64 {
        // Relaxed: statistics.
        self.cpus
            .get(cpu)
            .map_or(0, |c| c.signals_sent.load(Ordering::Relaxed))
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
        let (drop, delay) = fault_thresholds(&f)?;
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
    pub(super) fn wake_if_sleeping(&self, cpu: CpuId) -> bool {
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
    pub(super) fn tgkill_signal(&self, cpu: CpuId, signo: i32) -> bool {
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

    unsafe fn irq_restore(&self, was_masked: bool) {
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
        // above runs its handler directly.) We are at the point where the masked code ended:
        // thread context, or nested in a handler — where the engine's own restriction (a
        // restricted handler restricts everything nested in it) decides what may run.
        // SAFETY: `engine` is this machine's engine, alive while this CPU thread runs.
        let engine = unsafe { &*c.engine };
        // Relaxed throughout: this thread's own flags (written by it and its handlers only).
        while hc.pending.load(Ordering::Relaxed) {
            if hc.replaying.swap(true, Ordering::Relaxed) {
                // An outer unmask of this CPU is replaying: its loop takes this one.
                break;
            }
            while hc.pending.swap(false, Ordering::Relaxed) {
                // SAFETY: this CPU's thread, at the end of a masked region: running any call
                // here is like calling a function from the code that unmasked (or the engine
                // restricts it, if this unmask is nested in a restricted handler).
                unsafe { engine.handle_ipi() };
            }
            hc.replaying.store(false, Ordering::Relaxed);
            // A signal handler that ran between the loop's last check and the store above may
            // have left one pending (its unmask saw `replaying`): the outer `while` takes it.
        }
        // Calls a restricted handler deferred: unmasking is a safe point.
        if engine.deferred_calls(c.cpu) > 0 {
            engine.serve_queue();
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
            return;
        }
        // Spin, but yield now and then: attached threads and threads that are not CPUs may
        // share cores with the CPU they wait for, whatever the spawned count says.
        let n = RELAX_SPINS.with(|c| {
            let n = c.get().wrapping_add(1);
            c.set(n);
            n
        });
        if n % 256 == 0 {
            thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }

    fn report(&self, message: std::fmt::Arguments<'_>) {
        match &self.sink {
            Some(sink) => with_formatted(message, |s| sink(s)),
            None => write_stderr(message),
        }
    }

    fn has_nmi(&self) -> bool {
        // SafePoint promises that no signal reaches a CPU thread: no NMI either.
        self.delivery != Delivery::SafePoint
    }

    fn send_nmi(&self, cpu: CpuId) {
        if self.has_nmi() {
            self.tgkill_signal(cpu, self.nmi_signo);
        }
    }

    fn stall_check_interval(&self) -> u32 {
        // Oversubscribed, `relax` yields the core (each a scheduling round, up to
        // milliseconds): look at the clock every time, or a report could come many thresholds
        // late. Otherwise every 256 spins (a few µs).
        if self.oversubscribed {
            1
        } else {
            256
        }
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
pub(super) fn with_formatted(message: std::fmt::Arguments<'_>, f: impl FnOnce(&str)) {
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
pub(super) fn write_stderr(message: std::fmt::Arguments<'_>) {
    with_formatted(message, |text| {
        let mut line = [0u8; 1025];
        line[..text.len()].copy_from_slice(text.as_bytes());
        line[text.len()] = b'\n';
        // SAFETY: writes initialised bytes from a live buffer to fd 2; async-signal-safe.
        unsafe { libc::write(2, line.as_ptr().cast(), text.len() + 1) };
    });
}

/// Receives the engine's reports (stalls, dumps via `dump_to_report`); set with the `unsafe`
/// [`MachineBuilder::report_sink`](super::MachineBuilder::report_sink). Called from any context,
/// including signal handlers: it must not allocate or take locks.
pub type ReportSink = Arc<dyn Fn(&str) + Send + Sync>;

/// The drop and delay probabilities of `f` as thresholds on a 32-bit roll.
pub(super) fn fault_thresholds(f: &Faults) -> Result<(u64, u64), Error> {
    Ok((
        probability_threshold(f.drop_ipi, IpiFault::Drop)?,
        probability_threshold(f.delay_ipi, IpiFault::Delay)?,
    ))
}

/// Converts the probability of `fault` to a threshold on a 32-bit roll.
fn probability_threshold(p: f64, fault: IpiFault) -> Result<u64, Error> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::InvalidConfig(ConfigError::FaultProbability {
            fault,
            bits: p.to_bits(),
        }));
    }
    Ok((p * (1u64 << 32) as f64) as u64)
}
