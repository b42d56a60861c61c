//! Kernel code shared by every architecture.

pub(crate) mod bench;
pub(crate) mod cmdline;
pub(crate) mod config;
pub(crate) mod console;
#[cfg(not(target_arch = "x86_64"))]
pub(crate) mod fdt;
pub(crate) mod irq;
pub(crate) mod kernel;
pub(crate) mod ktest;
pub(crate) mod ktest_support;
pub(crate) mod nmi;
pub(crate) mod percpu;
pub(crate) mod platform;
pub(crate) mod time;
