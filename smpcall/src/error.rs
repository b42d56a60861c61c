//! The one error type of the crate.

use core::fmt;
use core::time::Duration;

use crate::cpumask::CpuId;

/// Why a synchronous call would risk a deadlock from here (see [`Error::WouldDeadlock`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadlockReason {
    /// The calling CPU has interrupts masked: it could not serve a call another CPU makes to it
    /// while it waits, so two such CPUs would wait for each other forever.
    InterruptsMasked,
    /// The caller is itself a cross-CPU call handler (or stop/idle context that runs with
    /// interrupts masked).
    InHandler,
    /// The caller is an NMI handler. No call starts there: NMIs do not nest, so a CPU waiting
    /// in one could never take the NMI it waits for, and an NMI may have interrupted its own
    /// CPU inside a call's queueing or a flush of its queue, which a no-wait call (or serving
    /// the queue) would enter a second time.
    InNmi,
    /// The caller is inside an RCU read-side critical section: a grace period would wait
    /// for the caller itself.
    InRcuReader,
    /// The caller runs inside stop_machine (its function, or a dying CPU's last flush) and a
    /// no-wait call found its per-target slot busy: every other CPU is masked until the
    /// machine restarts, so the slot could not be freed.
    StopMachine,
    /// A no-wait call from a call handler found its call data busy, and waiting for it (which
    /// means serving this CPU's queue, one handler deeper) would exceed the nesting limit
    /// ([`Platform::MAX_CALL_NESTING`](crate::Platform::MAX_CALL_NESTING)). Nothing was queued.
    NestingLimit,
}

/// Why a CPU hotplug request was refused (see [`Error::Hotplug`], which names the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HotplugReason {
    /// `cpu_down` of the last online CPU: a machine keeps at least one.
    LastOnline,
    /// `cpu_down` of the calling CPU: it cannot wait for itself to go down (call `cpu_down`
    /// from another CPU, or from a thread that is not one).
    CallingCpu,
    /// `cpu_down` of a CPU whose interrupted code is inside an RCU read-side critical section:
    /// it would go on holding references while offline, where grace periods do not wait for
    /// it. Nothing was done; try again later.
    InRcuReader,
    /// `cpu_up` of a CPU the platform never brought up
    /// ([`mark_online`](crate::Engine::mark_online)).
    NeverBroughtUp,
    /// Attaching a thread (hosted backend) to a CPU slot that is online already.
    AlreadyOnline,
    /// An attached thread (hosted backend) cannot leave inside a quiet region: the region's
    /// end would touch the slot after it left.
    InQuietRegion,
    /// An attached thread (hosted backend) cannot leave inside `with_engine`, `quiet` or
    /// `interruptible`: they hold a reference to the engine that leaving could let the
    /// machine free.
    EngineBorrowed,
}

impl HotplugReason {
    /// What was refused, as the verb phrase of "CPU n cannot …".
    fn refused(self) -> &'static str {
        match self {
            HotplugReason::LastOnline | HotplugReason::CallingCpu | HotplugReason::InRcuReader => {
                "go down"
            }
            HotplugReason::NeverBroughtUp => "come up",
            HotplugReason::AlreadyOnline => "be attached to",
            HotplugReason::InQuietRegion | HotplugReason::EngineBorrowed => "be left by its thread",
        }
    }
}

/// What a bounded wait of the hosted backend waited for (see [`Error::TimedOut`], which
/// gives the time limit too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WaitedFor {
    /// The thread of a CPU to start, while the machine was being built
    /// (`MachineBuilder::timeout`). Nothing was built.
    CpuThreadStart {
        /// The first CPU whose thread had not started.
        cpu: CpuId,
    },
    /// A CPU to reach a safe point so that it could run the calls queued to it before going
    /// down (`Machine::cpu_down`). The CPU stays online.
    SafePoint {
        /// The CPU that was to go down.
        cpu: CpuId,
    },
    /// Tasks and queued calls to finish at shutdown (`Machine::try_shutdown`,
    /// `Machine::shutdown`).
    Shutdown,
    /// A task to finish (`Task::join_timeout`). It keeps running and can be joined again.
    Task {
        /// The CPU that runs the task.
        cpu: CpuId,
    },
}

/// What was wrong with a configuration (see [`Error::InvalidConfig`]). Each variant carries
/// the values that were given and, where there is one, the range they had to be in; its
/// `Display` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConfigError {
    /// The storage's call-data slots are not `k × n²` for some `k ≥ 1` (`k` slots per sender
    /// and target; see [`Storage::slots`](crate::Storage::slots)).
    CallDataSlots {
        /// How many slots the storage holds.
        slots: usize,
        /// How many CPUs it has (`n`).
        cpus: usize,
    },
    /// The storage's foreign call data are not whole rows of one slot per CPU (see
    /// [`Storage::foreign_slots`](crate::Storage::foreign_slots)).
    ForeignSlots {
        /// How many foreign slots the storage holds.
        slots: usize,
        /// How many CPUs it has (the length of one row).
        cpus: usize,
    },
    /// A number of no-wait call-data slots per sender and target outside `1..=max`
    /// (`MachineBuilder::no_wait_slots`): none, or more than the hosted backend allows.
    NoWaitSlots {
        /// The number asked for.
        requested: usize,
        /// The largest number allowed.
        max: usize,
    },
    /// More rows of call data for threads that are not CPUs than the hosted backend allows
    /// (`MachineBuilder::foreign_senders`; the range is `0..=max`).
    ForeignSenders {
        /// The number asked for.
        requested: usize,
        /// The largest number allowed.
        max: usize,
    },
    /// The storage holds more rows of foreign call data than the engine can use (one bit each
    /// in a 64-bit word).
    ForeignRows {
        /// How many rows the storage holds.
        rows: usize,
        /// The largest number allowed.
        max: usize,
    },
    /// The hosted machine's timeout (`MachineBuilder::timeout`) is zero.
    ZeroTimeout,
    /// An IPI fault probability of the hosted backend (`Faults`) is not within `[0, 1]` (or
    /// is NaN).
    FaultProbability {
        /// Which fault.
        fault: IpiFault,
        /// The probability given, as [`f64::to_bits`] (so that the error stays `Eq` and
        /// `Hash`); [`ConfigError::probability`] gives it back as an `f64`.
        bits: u64,
    },
    /// The signal asked for is not a real-time signal.
    NotRealTimeSignal {
        /// What it was asked for.
        role: SignalRole,
        /// The signal number given.
        signal: i32,
        /// `SIGRTMIN` of this process.
        min: i32,
        /// `SIGRTMAX` of this process.
        max: i32,
    },
    /// The operating system does not know the signal asked for.
    UnknownSignal {
        /// What it was asked for.
        role: SignalRole,
        /// The signal number given.
        signal: i32,
    },
    /// The signal asked for carries a handler that is not the backend's (installed by other
    /// code in this process).
    SignalInUse {
        /// What it was asked for.
        role: SignalRole,
        /// The signal number given.
        signal: i32,
    },
    /// The signal asked for already carries the backend's handler for the other role (of this
    /// machine or another one): the IPI and NMI signals must differ.
    SignalHasOtherRole {
        /// What it was asked for.
        role: SignalRole,
        /// The signal number given.
        signal: i32,
    },
    /// Every real-time signal carries a handler that is not the backend's one for this role.
    NoFreeSignal {
        /// What a signal was sought for.
        role: SignalRole,
        /// `SIGRTMIN` of this process (the first signal tried).
        min: i32,
        /// `SIGRTMAX` of this process (the last signal tried).
        max: i32,
    },
}

impl ConfigError {
    /// The probability of a [`FaultProbability`](ConfigError::FaultProbability) error;
    /// `None` for the other variants.
    pub fn probability(&self) -> Option<f64> {
        match self {
            ConfigError::FaultProbability { bits, .. } => Some(f64::from_bits(*bits)),
            _ => None,
        }
    }
}

/// Which of the hosted backend's two signals an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SignalRole {
    /// The signal that carries IPIs (`MachineBuilder::signal`).
    Ipi,
    /// The signal that carries NMIs (`MachineBuilder::nmi_signal`).
    Nmi,
}

/// Which injected IPI fault of the hosted backend an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IpiFault {
    /// Dropping IPIs (`Faults::drop_ipi`).
    Drop,
    /// Delaying IPIs (`Faults::delay_ipi`).
    Delay,
}

/// What the hosted backend asked of the operating system when it refused (see
/// [`Error::Os`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OsRequest {
    /// Starting the thread of a CPU.
    SpawnCpuThread {
        /// The CPU.
        cpu: CpuId,
    },
    /// Starting the watchdog thread (it re-sends lost IPIs).
    SpawnWatchdog,
    /// Installing the backend's handler on a signal.
    InstallSignalHandler {
        /// What the signal is for.
        role: SignalRole,
        /// The signal number.
        signal: i32,
    },
}

/// Every refusal the engine can make. A call either runs, or returns one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// The CPU id is not one of this machine's CPUs.
    UnknownCpu(CpuId),
    /// The CPU exists but is offline (not started, or taken down).
    Offline(CpuId),
    /// A waiting call was made from a context that must not wait.
    WouldDeadlock(DeadlockReason),
    /// Caller-owned call data is still in flight from an earlier call.
    Busy,
    /// The machine is shutting down or shut down; no new calls are accepted.
    ShutDown,
    /// The calling thread is not one of the machine's CPUs.
    NotOnCpu,
    /// The engine or machine was configured wrongly (the [`ConfigError`] says how, with the
    /// values given).
    InvalidConfig(ConfigError),
    /// A CPU hotplug request that cannot be carried out. Nothing was done.
    Hotplug {
        /// The CPU the request was about.
        cpu: CpuId,
        /// Why it was refused.
        reason: HotplugReason,
    },
    /// The platform does not provide this facility (the message says which).
    Unsupported(&'static str),
    /// The operation needed to run user code on this CPU, which was running code that user
    /// functions may not interrupt (a hosted CPU interrupted outside a safe point, with calls
    /// left that could only run there). Nothing was done; retry, or let that CPU reach a safe
    /// point.
    NotAtSafePoint(CpuId),
    /// A CPU count outside `1..=max` (`max` is [`MAX_CPUS`](crate::MAX_CPUS)).
    CpuCount {
        /// The count asked for.
        requested: usize,
        /// The largest count allowed.
        max: usize,
    },
    /// Every attach slot of the hosted machine is taken by a thread
    /// (`MachineBuilder::attach_slots`): nothing was attached.
    NoFreeAttachSlot {
        /// How many attach slots the machine has.
        slots: usize,
    },
    /// A task was submitted to an attach slot, which has no task loop: the thread attached
    /// there runs calls itself (call it instead).
    NoTaskLoop(CpuId),
    /// A bounded wait of the hosted backend expired.
    TimedOut {
        /// What was waited for.
        what: WaitedFor,
        /// How long it was waited for (the time limit in force).
        limit: Duration,
    },
    /// The operating system refused a request of the hosted backend; nothing was built.
    Os {
        /// What was asked.
        request: OsRequest,
        /// The OS error code (`errno`; `std::io::Error::from_raw_os_error` explains it), or 0
        /// if the OS gave none.
        errno: i32,
    },
    /// A hosted task's result was asked for again after a join had returned it.
    AlreadyJoined,
}

impl fmt::Display for DeadlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadlockReason::InterruptsMasked => f.write_str(
                "a waiting call with interrupts masked would risk deadlock; \
                 use a no-wait call or unmask first",
            ),
            DeadlockReason::StopMachine => f.write_str(
                "a no-wait call inside stop_machine found its call-data slot busy; every other \
                 CPU is masked until stop_machine ends",
            ),
            DeadlockReason::InRcuReader => f.write_str(
                "a grace period from inside an RCU read-side section would wait for itself",
            ),
            DeadlockReason::InNmi => {
                f.write_str("cross-CPU calls cannot be made from inside an NMI handler")
            }
            DeadlockReason::NestingLimit => f.write_str(
                "a no-wait call from a call handler found its call data busy at the handler \
                 nesting limit; waiting would nest another handler (nothing was queued)",
            ),
            DeadlockReason::InHandler => f.write_str(
                "a waiting call from inside a cross-CPU call handler would risk deadlock; \
                 use a no-wait call",
            ),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownCpu(cpu) => write!(f, "CPU {cpu} does not exist on this machine"),
            Error::Offline(cpu) => write!(f, "CPU {cpu} is offline"),
            Error::CpuCount { requested, max } => write!(
                f,
                "CPU count {requested} is outside 1..={max} (MAX_CPUS is {max})"
            ),
            Error::NotAtSafePoint(cpu) => write!(
                f,
                "CPU {cpu} is running code that call functions may not interrupt and has to run \
                 user code for this; nothing was done (retry when it reaches a safe point)"
            ),
            Error::WouldDeadlock(reason) => reason.fmt(f),
            Error::Busy => f.write_str("call data is busy: its previous call is still in flight"),
            Error::ShutDown => f.write_str("the machine is shut down"),
            Error::NotOnCpu => f.write_str(
                "the calling thread is not a CPU of this machine (RCU readers and grace periods \
                 need one: attach it, or call from a CPU)",
            ),
            Error::InvalidConfig(why) => write!(f, "invalid configuration: {why}"),
            Error::Os { request, errno } => {
                write!(
                    f,
                    "the operating system refused {request}: OS error {errno}"
                )
            }
            Error::AlreadyJoined => f.write_str("the task was already joined (its result is gone)"),
            Error::Hotplug { cpu, reason } => {
                write!(f, "CPU {cpu} cannot {}: {reason}", reason.refused())
            }
            Error::Unsupported(what) => write!(f, "not supported by this platform: {what}"),
            Error::NoFreeAttachSlot { slots: 0 } => f.write_str(
                "the machine has no attach slots (MachineBuilder::attach_slots adds them)",
            ),
            Error::NoFreeAttachSlot { slots } => write!(
                f,
                "all {slots} attach slots are taken (MachineBuilder::attach_slots sets how many)"
            ),
            Error::NoTaskLoop(cpu) => write!(
                f,
                "CPU {cpu} is an attach slot, which runs no tasks (call the thread attached \
                 there instead)"
            ),
            Error::TimedOut { what, limit } => {
                write!(f, "timed out after {limit:?} waiting for {what}")
            }
        }
    }
}

impl fmt::Display for HotplugReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HotplugReason::LastOnline => "it is the last online CPU",
            HotplugReason::CallingCpu => {
                "it is the calling CPU (call cpu_down from another CPU or a thread that is not one)"
            }
            HotplugReason::InRcuReader => {
                "it is inside an RCU read-side critical section (nothing was done; try again later)"
            }
            HotplugReason::NeverBroughtUp => "the platform never brought it up (mark_online)",
            HotplugReason::AlreadyOnline => "it is online already",
            HotplugReason::InQuietRegion => "it is inside a quiet region",
            HotplugReason::EngineBorrowed => {
                "it is inside with_engine, quiet or interruptible (they borrow the engine)"
            }
        })
    }
}

impl fmt::Display for WaitedFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitedFor::CpuThreadStart { cpu } => write!(f, "the thread of CPU {cpu} to start"),
            WaitedFor::SafePoint { cpu } => write!(
                f,
                "CPU {cpu} to reach a safe point to run the calls queued to it (it stays online)"
            ),
            WaitedFor::Shutdown => f.write_str("tasks and calls to finish at shutdown"),
            WaitedFor::Task { cpu } => write!(f, "the task on CPU {cpu} to finish"),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ConfigError::CallDataSlots { slots, cpus } => {
                let per_k = cpus.saturating_mul(cpus);
                write!(
                    f,
                    "the storage holds {slots} call-data slots; {cpus} CPUs need a non-zero \
                     multiple of {per_k} (k slots per sender and target: k × {cpus}²)"
                )
            }
            ConfigError::ForeignSlots { slots, cpus } => write!(
                f,
                "the storage holds {slots} foreign call-data slots; {cpus} CPUs need a multiple \
                 of {cpus} (whole rows of one slot per target)"
            ),
            ConfigError::NoWaitSlots { requested, max } => {
                write!(f, "no_wait_slots({requested}) is outside 1..={max}")
            }
            ConfigError::ForeignSenders { requested, max } => {
                write!(f, "foreign_senders({requested}) is outside 0..={max}")
            }
            ConfigError::ForeignRows { rows, max } => write!(
                f,
                "the storage holds {rows} rows of foreign call data; at most {max} can be used"
            ),
            ConfigError::ZeroTimeout => f.write_str("the timeout is zero; it must be longer"),
            ConfigError::FaultProbability { fault, bits } => write!(
                f,
                "the IPI {fault} probability {} is not within [0, 1]",
                f64::from_bits(bits)
            ),
            ConfigError::NotRealTimeSignal {
                role,
                signal,
                min,
                max,
            } => write!(
                f,
                "the {role} signal {signal} is not a real-time signal ({min}..={max})"
            ),
            ConfigError::UnknownSignal { role, signal } => {
                write!(f, "the {role} signal {signal} is not a valid signal")
            }
            ConfigError::SignalInUse { role, signal } => write!(
                f,
                "the {role} signal {signal} already has another handler in this process"
            ),
            ConfigError::SignalHasOtherRole { role, signal } => write!(
                f,
                "the {role} signal {signal} carries the {} handler already (of this or another \
                 machine); the IPI and NMI signals must differ",
                role.other()
            ),
            ConfigError::NoFreeSignal { role, min, max } => write!(
                f,
                "no real-time signal in {min}..={max} is free for {role}s"
            ),
        }
    }
}

impl SignalRole {
    /// The other of the two roles.
    pub(crate) fn other(self) -> SignalRole {
        match self {
            SignalRole::Ipi => SignalRole::Nmi,
            SignalRole::Nmi => SignalRole::Ipi,
        }
    }
}

impl fmt::Display for SignalRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignalRole::Ipi => "IPI",
            SignalRole::Nmi => "NMI",
        })
    }
}

impl fmt::Display for IpiFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpiFault::Drop => "drop",
            IpiFault::Delay => "delay",
        })
    }
}

impl fmt::Display for OsRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OsRequest::SpawnCpuThread { cpu } => write!(f, "a thread for CPU {cpu}"),
            OsRequest::SpawnWatchdog => f.write_str("the watchdog thread"),
            OsRequest::InstallSignalHandler { role, signal } => {
                write!(f, "the {role} handler on signal {signal}")
            }
        }
    }
}

impl core::error::Error for Error {}
impl core::error::Error for ConfigError {}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    /// Asserts that `e`'s message contains every one of `values`.
    #[track_caller]
    fn names(e: Error, values: &[&str]) {
        let text = e.to_string();
        for v in values {
            assert!(text.contains(v), "{text:?} does not name {v:?}");
        }
    }

    #[test]
    fn every_configuration_error_names_its_values() {
        let config = |c| Error::InvalidConfig(c);
        names(
            config(ConfigError::CallDataSlots { slots: 10, cpus: 3 }),
            &["10 call-data slots", "3 CPUs", "multiple of 9"],
        );
        names(
            config(ConfigError::ForeignSlots { slots: 7, cpus: 4 }),
            &["7 foreign", "4 CPUs", "multiple of 4"],
        );
        names(
            config(ConfigError::NoWaitSlots {
                requested: 200,
                max: 64,
            }),
            &["no_wait_slots(200)", "1..=64"],
        );
        names(
            config(ConfigError::NoWaitSlots {
                requested: 0,
                max: 64,
            }),
            &["no_wait_slots(0)", "1..=64"],
        );
        names(
            config(ConfigError::ForeignSenders {
                requested: 65,
                max: 64,
            }),
            &["foreign_senders(65)", "0..=64"],
        );
        names(
            config(ConfigError::ForeignRows { rows: 65, max: 64 }),
            &["65 rows", "at most 64"],
        );
        names(config(ConfigError::ZeroTimeout), &["timeout is zero"]);
        names(
            Error::NoFreeAttachSlot { slots: 3 },
            &["all 3 attach slots"],
        );
        names(Error::NoFreeAttachSlot { slots: 0 }, &["no attach slots"]);
        names(Error::NoTaskLoop(5), &["CPU 5 is an attach slot"]);
        names(
            config(ConfigError::FaultProbability {
                fault: IpiFault::Delay,
                bits: (-0.25f64).to_bits(),
            }),
            &["delay", "-0.25", "[0, 1]"],
        );
        names(
            config(ConfigError::NotRealTimeSignal {
                role: SignalRole::Ipi,
                signal: 5,
                min: 34,
                max: 64,
            }),
            &["IPI signal 5", "(34..=64)"],
        );
        names(
            config(ConfigError::UnknownSignal {
                role: SignalRole::Nmi,
                signal: 99,
            }),
            &["NMI signal 99"],
        );
        names(
            config(ConfigError::SignalInUse {
                role: SignalRole::Nmi,
                signal: 40,
            }),
            &["NMI signal 40", "another handler"],
        );
        names(
            config(ConfigError::SignalHasOtherRole {
                role: SignalRole::Nmi,
                signal: 41,
            }),
            &["NMI signal 41", "the IPI handler"],
        );
        names(
            config(ConfigError::NoFreeSignal {
                role: SignalRole::Ipi,
                min: 34,
                max: 64,
            }),
            &["34..=64", "IPIs"],
        );
    }

    #[test]
    fn os_errors_name_the_request_and_the_code() {
        let os = |request| Error::Os { request, errno: 11 };
        names(
            os(OsRequest::SpawnCpuThread { cpu: 3 }),
            &["CPU 3", "OS error 11"],
        );
        names(os(OsRequest::SpawnWatchdog), &["watchdog", "OS error 11"]);
        names(
            os(OsRequest::InstallSignalHandler {
                role: SignalRole::Nmi,
                signal: 50,
            }),
            &["NMI handler on signal 50", "OS error 11"],
        );
        names(Error::AlreadyJoined, &["already joined"]);
    }

    #[test]
    fn hotplug_errors_name_the_cpu_what_it_could_not_do_and_why() {
        let hotplug = |cpu, reason| Error::Hotplug { cpu, reason };
        names(
            hotplug(3, HotplugReason::LastOnline),
            &["CPU 3 cannot go down: it is the last online CPU"],
        );
        names(
            hotplug(4, HotplugReason::CallingCpu),
            &["CPU 4 cannot go down: it is the calling CPU"],
        );
        names(
            hotplug(5, HotplugReason::InRcuReader),
            &["CPU 5 cannot go down", "RCU read-side critical section"],
        );
        names(
            hotplug(6, HotplugReason::NeverBroughtUp),
            &["CPU 6 cannot come up", "never brought it up"],
        );
        names(
            hotplug(7, HotplugReason::AlreadyOnline),
            &["CPU 7 cannot be attached to: it is online already"],
        );
        names(
            hotplug(8, HotplugReason::InQuietRegion),
            &["CPU 8 cannot be left by its thread: it is inside a quiet region"],
        );
        names(
            hotplug(9, HotplugReason::EngineBorrowed),
            &["CPU 9 cannot be left by its thread", "with_engine"],
        );
    }

    #[test]
    fn timeouts_name_the_limit_and_what_was_waited_for() {
        let timed_out = |what, limit| Error::TimedOut { what, limit };
        names(
            timed_out(
                WaitedFor::CpuThreadStart { cpu: 5 },
                Duration::from_secs(20),
            ),
            &["timed out after 20s waiting for the thread of CPU 5 to start"],
        );
        names(
            timed_out(WaitedFor::SafePoint { cpu: 2 }, Duration::from_millis(300)),
            &["after 300ms", "CPU 2 to reach a safe point", "stays online"],
        );
        names(
            timed_out(WaitedFor::Shutdown, Duration::from_millis(20)),
            &["after 20ms", "to finish at shutdown"],
        );
        names(
            timed_out(WaitedFor::Task { cpu: 1 }, Duration::from_micros(1500)),
            &["after 1.5ms waiting for the task on CPU 1 to finish"],
        );
    }

    #[test]
    fn a_fault_probability_error_gives_back_the_probability_and_stays_eq() {
        let nan = ConfigError::FaultProbability {
            fault: IpiFault::Drop,
            bits: f64::NAN.to_bits(),
        };
        assert!(nan.probability().unwrap().is_nan());
        assert_eq!(nan, nan, "NaN stored as bits compares equal to itself");
        assert!(Error::InvalidConfig(nan).to_string().contains("NaN"));
        assert_eq!(ConfigError::ZeroTimeout.probability(), None);
    }
}
