//! # smpcall — cross-CPU function calls
//!
//! Run a function on another CPU, or on a set of CPUs, synchronously or asynchronously,
//! delivered by inter-processor interrupts: the "generic IPI" system of an SMP kernel.
//!
//! * The **engine** ([`Engine`]) is `no_std` and allocates nothing on any call, delivery or
//!   completion path. An architecture supplies a [`Platform`] (send an IPI, mask interrupts,
//!   current CPU) and storage ([`StaticStorage`] needs no allocator at all).
//! * The **hosted backend** (`hosted::Machine`, feature `std`, on by default; Linux only) makes
//!   each CPU an OS thread and each IPI a real-time signal sent with `tgkill`. On other systems
//!   the `std` feature still gives the engine, `HeapStorage` and the simulator (`sim`).
//!
//! ```
//! use smpcall::hosted::Machine;
//!
//! let machine = Machine::builder().cpus(4).build()?;
//! let sum = machine
//!     .run_on(0, |engine| {
//!         // Runs on CPU 0; ask CPU 3 to compute something and wait for the answer.
//!         engine.call_single(3, |cpu| cpu * 10)
//!     })
//!     .join()??;
//! assert_eq!(sum, 30);
//! machine.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Where to find what
//!
//! | you want | use |
//! |---|---|
//! | run code on threads of your process now | `hosted::Machine` (Linux, feature `std`) — spawned CPU threads, or your own threads with `Machine::attach`; any thread can call ([`Engine`]'s call API) |
//! | a kernel / hypervisor / unikernel IPI layer | [`Engine`] over your [`Platform`] (an `unsafe` trait: its `# Safety` section is the contract) and a [`Storage`] ([`StaticStorage`] in a `static`); the `baremetal/` kernel of the repository is a complete example for x86_64, aarch64 and riscv64 |
//! | the call API | [`Engine::call_single`], [`call_single_async`](Engine::call_single_async), [`call_async_csd`](Engine::call_async_csd) ([`Csd`]), [`call_many`](Engine::call_many) / `call_all` / `call_others` / `call_cond` and their `_async` forms, [`call_single_deferrable`](Engine::call_single_deferrable) |
//! | hotplug and stop_machine | [`Engine::cpu_down`], [`cpu_up`](Engine::cpu_up), [`stop_machine`](Engine::stop_machine) (module `stop`, C10–C11) |
//! | expedited RCU | [`Engine::rcu_read_lock`], [`synchronize_rcu_expedited`](Engine::synchronize_rcu_expedited) |
//! | quiet CPUs (no interrupt while blocked) | [`Engine::quiet`], `hosted::quiet` |
//! | NMIs, context tracking, diagnostics | [`Engine::nmi_call_many`] (`unsafe`), [`context`], [`Engine::dump`], [`Engine::diag_stats`] |
//! | replayable interleavings with injected faults | `sim` (the deterministic simulator) |
//! | cpu sets | [`CpuMask`] |
//!
//! Soundness: no safe function can cause undefined behaviour. What only a platform may call
//! (`handle_ipi`, `idle_enter`, `mark_online`, …) is `unsafe` with a contract; in the hosted
//! backend your functions never run in a signal handler that interrupted arbitrary code unless
//! you opt in with `unsafe` (the `hosted` module's documentation).
//!
//! The guarantees (C1–C16), the signal-context rules and the limits are set out in the README
//! at the root of the source repository; this crate's own README (shown on crates.io) is a
//! summary.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs, missing_debug_implementations)]

pub mod context;
pub mod cpumask;
mod csd;
mod diag;
mod engine;
mod error;
mod foreign;
mod nmi;
mod platform;
mod queue;
mod quiet;
mod rcu;
mod stop;
mod sync;

#[cfg(all(feature = "std", target_os = "linux", not(loom)))]
pub mod hosted;
#[cfg(all(feature = "std", not(loom)))]
pub mod sim;

pub use cpumask::{CpuId, CpuMask, MAX_CPUS};
pub use csd::{Csd, INLINE_CLOSURE_BYTES, INLINE_CLOSURE_WORDS};
pub use diag::DiagStats;
#[cfg(all(feature = "std", not(loom)))]
pub use engine::HeapStorage;
#[cfg(not(loom))]
pub use engine::StaticStorage;
pub use engine::{CpuStats, Engine, IrqGuard, PerCpu, Storage};
pub use error::{
    ConfigError, DeadlockReason, Error, HotplugReason, IpiFault, OsRequest, SignalRole, WaitedFor,
};
pub use platform::Platform;
pub use rcu::{RcuReadGuard, RcuStats};
pub use stop::{HotplugStats, StopStage};

#[cfg(all(test, loom))]
mod loom_tests;

/// This crate's README (the one in the package) is compiled and run as doctests. The
/// workspace README's examples are the `smpcall-readme` workspace member's doctests.
#[cfg(all(doctest, target_os = "linux"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
