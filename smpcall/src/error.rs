//! The one error type of the crate.

use core::fmt;

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
    /// The engine or machine was configured wrongly (the message says how).
    InvalidConfig(&'static str),
    /// A CPU hotplug request that cannot be carried out (the message says why).
    Hotplug(&'static str),
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
    /// A bounded wait of the hosted backend expired (the message says for what).
    TimedOut(&'static str),
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
            Error::Hotplug(why) => write!(f, "CPU hotplug refused: {why}"),
            Error::Unsupported(what) => write!(f, "not supported by this platform: {what}"),
            Error::TimedOut(what) => write!(f, "timed out waiting for {what}"),
        }
    }
}

impl core::error::Error for Error {}
