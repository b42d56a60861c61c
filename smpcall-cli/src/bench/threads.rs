//! Threads for the peers: pinned the way the hosted `Machine` pins its CPUs (CPU `i` → core
//! `i`), joined with a bound, and spin waits that give up instead of hanging.

use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::clock::Clock;
use super::BenchError;

/// The host's cores and whether two-thread rows can pin caller and target to different ones.
#[derive(Clone, Debug)]
pub struct Topology {
    cores: Vec<core_affinity::CoreId>,
}

impl Topology {
    /// Reads the cores this process may run on.
    pub fn detect() -> Topology {
        Topology {
            cores: core_affinity::get_core_ids().unwrap_or_default(),
        }
    }

    /// Number of usable cores.
    pub fn cores(&self) -> usize {
        self.cores.len()
    }

    /// Whether `threads` threads can each have a core of their own (the Machine's
    /// `Pinning::Auto` rule).
    pub fn can_pin(&self, threads: usize) -> bool {
        threads <= self.cores.len()
    }

    /// Pins the current thread to core `i` if `threads` threads fit on the cores.
    pub fn pin(&self, i: usize, threads: usize) {
        if self.can_pin(threads) && !self.cores.is_empty() {
            core_affinity::set_for_current(self.cores[i % self.cores.len()]);
        }
    }

    /// How to wait politely in a spin loop of a `threads`-thread row: a pause instruction when
    /// every thread has its core, a yield when they share cores.
    pub fn relax(&self, threads: usize) -> Relax {
        if self.can_pin(threads) {
            Relax::Spin
        } else {
            Relax::Yield
        }
    }
}

/// What a spin loop does between two looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relax {
    /// `spin_loop` hint (the waited-for thread has its own core).
    Spin,
    /// `yield_now` (it may need ours).
    Yield,
}

impl Relax {
    /// One pause.
    #[inline(always)]
    pub fn relax(self) {
        match self {
            Relax::Spin => std::hint::spin_loop(),
            Relax::Yield => thread::yield_now(),
        }
    }
}

/// A bounded spin wait: spins until `done()` holds, or gives up once `bound` ticks have passed
/// since the wait started (the clock is read only every 1024 looks, so a wait that succeeds
/// quickly costs no clock read). Returns `false` when it gave up.
#[inline(always)]
pub fn spin_until(clock: &Clock, bound: u64, relax: Relax, mut done: impl FnMut() -> bool) -> bool {
    let mut looks = 0u32;
    let mut deadline = 0u64;
    loop {
        if done() {
            return true;
        }
        looks = looks.wrapping_add(1);
        if looks.is_multiple_of(1024) || relax == Relax::Yield && looks.is_multiple_of(16) {
            let now = clock.now();
            if deadline == 0 {
                deadline = now.saturating_add(bound);
            } else if now > deadline {
                return false;
            }
        }
        relax.relax();
    }
}

/// A thread whose result is collected with a bound.
pub struct Worker<T> {
    what: String,
    rx: mpsc::Receiver<thread::Result<T>>,
}

/// Starts `f` on a new thread, pinned to core `core` of `threads` when they fit (`None`: not
/// pinned). `what` names the thread in errors.
pub fn spawn<T, F>(
    topo: &Topology,
    core: Option<(usize, usize)>,
    what: &str,
    f: F,
) -> Result<Worker<T>, BenchError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let topo = topo.clone();
    thread::Builder::new()
        .name(format!(
            "bench-{}",
            what.split_whitespace().next().unwrap_or("peer")
        ))
        .spawn(move || {
            if let Some((i, threads)) = core {
                topo.pin(i, threads);
            }
            let r = panic::catch_unwind(AssertUnwindSafe(f));
            let _ = tx.send(r);
        })
        .map_err(|e| BenchError::Setup(format!("could not start {what}: {e}")))?;
    Ok(Worker {
        what: what.to_string(),
        rx,
    })
}

impl<T> Worker<T> {
    /// The thread's result, or [`BenchError::Timeout`] naming it if it has not finished within
    /// `bound` (the thread is then left behind, detached), or [`BenchError::Panicked`].
    pub fn join(self, bound: Duration) -> Result<T, BenchError> {
        match self.rx.recv_timeout(bound) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(payload)) => Err(BenchError::Panicked {
                what: self.what,
                message: panic_message(&payload),
            }),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(BenchError::Timeout {
                what: self.what,
                bound,
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(BenchError::Panicked {
                what: self.what,
                message: "thread ended without a result".into(),
            }),
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
