//! The hosted backend: CPUs are OS threads, IPIs are real-time signals.
//!
//! A [`Machine`] starts one thread per CPU (pinned to a core when there are enough cores) and
//! runs the [`Engine`](crate::Engine) on them through [`HostPlatform`]:
//!
//! * **IPI** — a real-time signal sent with `tgkill` to a CPU thread that is busy; *nothing* to
//!   a CPU that is idle-polling (it sees its queue: the engine elides the IPI); a futex wake to a
//!   CPU that sleeps idle.
//! * **Interrupt masking** — a per-CPU soft mask (no system call): a signal that arrives while
//!   masked is remembered and served when the mask is lifted.
//! * **Work** — [`Machine::run_on`] submits a closure to run in a CPU's *task context*; calls
//!   are made from there (or from call handlers).
//!
//! # Where a call's function runs (sound by default)
//!
//! A signal handler may interrupt its thread anywhere — inside `malloc`, holding a lock — so
//! running arbitrary Rust there is undefined behaviour. The backend therefore never runs *your*
//! functions in a signal handler that interrupted arbitrary code. The IPI signal's handler runs
//! only the engine's own work (stop_machine participation, RCU quiescent-state checks: atomics,
//! async-signal-safe) and leaves your calls, in order, for the CPU's next **safe point**:
//!
//! * the CPU is idle (between tasks: it polls or sleeps, and serves its queue at once);
//! * it waits inside the engine for a call of its own (it serves its queue while it waits);
//! * its task calls [`safe_point`], [`sleep`], unmasks interrupts (an [`IrqGuard`](crate::IrqGuard)
//!   drop), or runs inside an [`interruptible`] region (then the handler runs calls at once).
//!
//! There functions run in ordinary thread context and may allocate, lock and print (waiting
//! calls are still refused: they run as call handlers). A busy CPU that reaches none of these
//! runs its calls when its task returns. [`Delivery::SafePoint`] sends no signal at all.
//!
//! If every function you send is async-signal-safe, the `unsafe`
//! [`MachineBuilder::run_calls_in_signal_handlers`] restores interrupt-style delivery: calls
//! run inside the handler wherever it lands, for the lowest latency to a busy CPU.
//!
//! Signals: the backend picks a free real-time signal at run time (or the one given to
//! [`MachineBuilder::signal`]), checks at every build that the handler on it is still its own,
//! and never removes it; the handler does nothing on threads that are not CPUs of a live
//! machine. System calls interrupted by it are restarted (`SA_RESTART`); code that sees `EINTR`
//! anyway must retry. `std::thread::sleep` in a CPU's task may never return while IPIs keep
//! arriving (each restart adds timer slack): use [`sleep`], which sleeps to an absolute deadline.
//!
//! The backend is Linux-only (`tgkill`, futexes, real-time signals).

mod attach;
mod builder;
mod cpu_thread;
mod machine;
mod platform;
mod safe_points;
mod signals;

pub use attach::CpuGuard;
pub use builder::{Delivery, Faults, IdlePolicy, MachineBuilder, Pinning};
pub use machine::{Machine, Task};
pub use platform::{HostPlatform, ReportSink};
pub use safe_points::{interruptible, quiet, safe_point, sleep, with_engine};

/// The engine as the hosted backend runs it.
pub type HostEngine = crate::Engine<HostPlatform, crate::HeapStorage>;

/// The [`Error::Os`](crate::Error::Os) of a `request` the OS refused with `e`.
fn os_error(request: crate::OsRequest, e: &std::io::Error) -> crate::Error {
    crate::Error::Os {
        request,
        errno: e.raw_os_error().unwrap_or(0),
    }
}
