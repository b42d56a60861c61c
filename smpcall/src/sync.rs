//! The one place the engine gets its atomics and cells from.
//!
//! Under `--cfg loom` these are loom's model-checked types, so the very same engine code
//! (`Csd`, `CallQueue`, stop_machine's `StageCounts`) is what the model checker explores. Otherwise they are `core`'s.
//! Loom is only a dev-dependency, so only the crate's own unit tests (`cfg(all(test, loom))`)
//! use it: a dependent built with `--cfg loom` for its own model checking gets `core`'s types.
//!
//! The engine's 64-bit counters and words ([`AtomicU64`]) are `core`'s where the target has
//! 64-bit atomics, and `portable-atomic`'s elsewhere (e.g. `thumbv7em-none-eabihf`), whose
//! default fallback emulates them with a global lock table. See the README ("Supported
//! systems") for what that means in interrupt and NMI context on such targets.

#[cfg(all(test, loom))]
pub(crate) use loom::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

#[cfg(not(all(test, loom)))]
pub(crate) use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

/// 64-bit atomics: native where the target has them.
#[cfg(target_has_atomic = "64")]
pub(crate) use core::sync::atomic::AtomicU64;

/// 64-bit atomics: emulated (portable-atomic's fallback) where the target lacks them.
#[cfg(not(target_has_atomic = "64"))]
pub(crate) use portable_atomic::AtomicU64;

/// The 64-bit atomic of protocols the loom models check (stop_machine's stage word): loom's
/// under the crate's loom tests, [`AtomicU64`] otherwise.
#[cfg(all(test, loom))]
pub(crate) use loom::sync::atomic::AtomicU64 as ModelU64;

/// The 64-bit atomic of protocols the loom models check (stop_machine's stage word): loom's
/// under the crate's loom tests, [`AtomicU64`] otherwise.
#[cfg(not(all(test, loom)))]
pub(crate) use AtomicU64 as ModelU64;

/// Spin-wait hint. Under loom it yields to the model scheduler, which loom requires of any
/// loop that waits for another thread.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(all(test, loom))]
    loom::thread::yield_now();
    #[cfg(not(all(test, loom)))]
    core::hint::spin_loop();
}

/// An `UnsafeCell` with loom's closure-based access API, so that loom can check every access
/// to call data for races.
#[cfg(all(test, loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(loom::cell::UnsafeCell<T>);

#[cfg(all(test, loom))]
impl<T> UnsafeCell<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(loom::cell::UnsafeCell::new(value))
    }
    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        self.0.with(f)
    }
    #[inline]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        self.0.with_mut(f)
    }
}

/// An `UnsafeCell` with loom's closure-based access API (zero-cost outside loom).
#[cfg(not(all(test, loom)))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(all(test, loom)))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(core::cell::UnsafeCell::new(value))
    }
    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }
    #[inline]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
