//! A small kernel that runs the `smpcall` engine on real inter-processor interrupts under
//! QEMU, and tests it (see `baremetal/README.md`). One test suite, several architectures:
//!
//! * `common/`: everything above the hardware — the engine's `Platform` (over a small
//!   per-architecture interface), per-CPU data and the task mailbox, the clock, the console's
//!   locking and formatting, NMI records and dumps, the benchmarks and the test suite.
//! * `arch/<target_arch>/`: boot, exception/interrupt entry, the interrupt controller (IPIs,
//!   NMI-class signals), secondary-CPU start-up, the counter, the UART and the exit device.
//!
//! The arch module exports the same set of items on every architecture (see
//! `arch/x86_64/mod.rs` for the list); `common` only uses those.
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
// Tests return their message in a fixed-size buffer: there is no heap to box it into.
#![allow(clippy::result_large_err)]

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/mod.rs"]
mod arch;

#[cfg(target_arch = "aarch64")]
#[path = "arch/aarch64/mod.rs"]
mod arch;

#[cfg(target_arch = "riscv64")]
#[path = "arch/riscv64/mod.rs"]
mod arch;

mod common;

// The common modules under short paths (`crate::percpu`, `crate::console`, ...).
#[cfg(not(target_arch = "x86_64"))]
use common::fdt;
use common::{
    bench, cmdline, config, console, irq, kernel, ktest, ktest_support, nmi, percpu, platform, time,
};
