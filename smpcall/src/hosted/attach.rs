//! Your own threads as CPUs: becoming a CPU (identity, signals), attaching to a free CPU slot,
//! leaving through the hotplug contract, and the clean-up when a thread exits still attached.
//!
//! The machine's own (spawned) CPU threads become and stop being CPUs through the same two
//! functions, [`become_cpu`] and [`forget_cpu`]; what differs is how they come online (the
//! builder marks them) and how they leave (shutdown parks them).
//!
//! Leaving is `cpu_down` of the leaving CPU *by itself*: it stops accepting calls, waits out
//! foreign senders, and runs stop_machine with itself as the active CPU, in its own task
//! context — so its final queue flush runs every call queued to it before it left, like any
//! hotplug (C10); later calls are refused with [`Error::Offline`]. The slot is free for the
//! next thread only after that.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use super::machine::Inner;
use super::platform::{Current, HostPlatform, CURRENT};
use super::signals::set_signal_blocked;
use super::HostEngine;
use crate::cpumask::CpuId;
use crate::error::{Error, HotplugReason};

/// [`HostCpu::occupant`](super::platform::HostCpu) values.
pub(super) const VACANT: u8 = 0;
pub(super) const SPAWNED: u8 = 1;
pub(super) const ATTACHED: u8 = 2;

/// Gives the calling thread the identity of CPU `cpu` (the signal handler and the platform's
/// `current_cpu` see it from now on) and unblocks the machine's signals on it.
pub(super) fn become_cpu(engine: &HostEngine, cpu: CpuId) {
    let platform = engine.platform();
    CURRENT.with(|c| {
        c.set(Current {
            machine: platform.id,
            cpu,
            engine: engine as *const HostEngine,
        })
    });
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SeqCst: published before the CPU can be marked online (SeqCst online mask).
    platform.cpus[cpu].tid.store(tid, Ordering::SeqCst);
    set_signal_blocked(platform.signo, false);
    set_signal_blocked(platform.nmi_signo, false);
}

/// Takes the identity away again: no handler can reach this CPU's memory through this thread
/// any more. Blocks the signals first, then forgets; a signal still pending stays blocked
/// (harmless: the handler does nothing without an identity).
pub(super) fn forget_cpu(platform: &HostPlatform) {
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

/// The thread's attachment, dropped (leaving) by its [`CpuGuard`] or, if the thread exits
/// without dropping the guard, by the thread-local destructor.
struct Attachment {
    inner: Arc<Inner>,
    cpu: CpuId,
    /// Left already (by the guard): dropping it only releases the machine.
    left: bool,
}

thread_local! {
    static ATTACHMENT: RefCell<Option<Attachment>> = const { RefCell::new(None) };
}

impl Drop for Attachment {
    /// Thread exit with the guard never dropped (forgotten, or held in a thread-local): leave
    /// now. The thread runs no more code, so a read-side section it left open ends here.
    fn drop(&mut self) {
        if !self.left {
            let _ = leave(&self.inner, self.cpu, true);
        }
    }
}

/// Leaves CPU `cpu` from its own thread: offline through the hotplug contract, then identity
/// forgotten and the slot freed. With `force`, an open RCU read-side section is ended (thread
/// exit); without, it refuses with [`Error::WouldDeadlock`] and nothing happens.
fn leave(inner: &Inner, cpu: CpuId, force: bool) -> Result<(), Error> {
    let engine = &inner.engine;
    if force {
        // Thread exit: whatever this thread left open (a reader, a mask) ends with it.
        engine.rcu_end_sections_on_exit(cpu);
        // Relaxed: this thread's own soft mask.
        engine.platform().cpus[cpu]
            .masked
            .store(false, Ordering::Relaxed);
    } else if engine.rcu_read_held() {
        return Err(Error::WouldDeadlock(crate::DeadlockReason::InRcuReader));
    }
    let r = engine.cpu_leave(cpu);
    if r.is_err() && !force {
        return r;
    }
    forget_cpu(engine.platform());
    // Release: everything this thread did as the CPU happens-before the next occupant's
    // Acquire claim of the slot.
    engine.platform().cpus[cpu]
        .occupant
        .store(VACANT, Ordering::Release);
    r
}

impl super::Machine {
    /// Makes the calling thread a CPU of this machine, in the lowest free slot reserved with
    /// [`MachineBuilder::attach_slots`](super::MachineBuilder::attach_slots), and brings it
    /// online. The thread serves calls to it at its safe points (its own waits,
    /// [`safe_point`](super::safe_point), [`sleep`](super::sleep), unmasking, `interruptible`
    /// regions); the engine's own work (grace periods, stop_machine) reaches it by signal.
    ///
    /// Dropping the returned guard leaves (see [`CpuGuard`]); a thread that exits without
    /// dropping it leaves at exit. CPU ids are reused. Errors — [`Error::Busy`] (this thread
    /// is a CPU already), [`Error::NoFreeAttachSlot`], [`Error::ShutDown`] — change
    /// nothing.
    ///
    /// ```
    /// use smpcall::hosted::Machine;
    /// let m = Machine::builder().cpus(1).attach_slots(2).build()?;
    /// let me = m.attach()?;                          // the main thread is CPU 1 now
    /// let ran_on = me.engine().call_single(0, |cpu| cpu)?;
    /// assert_eq!((me.cpu(), ran_on), (1, 0));
    /// drop(me);                                      // leaves: CPU 1 offline, slot free
    /// # m.shutdown()?; Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn attach(&self) -> Result<CpuGuard, Error> {
        let inner = self.inner();
        let engine = &inner.engine;
        if engine.is_shutdown() {
            return Err(Error::ShutDown);
        }
        let attached = ATTACHMENT.try_with(|a| a.borrow().is_some());
        if engine.current_cpu().is_some() || attached != Ok(false) {
            // A CPU already (or this thread is exiting).
            return Err(Error::Busy);
        }
        if !super::platform::current().engine.is_null() {
            // A CPU of another machine: one identity per thread.
            return Err(Error::Busy);
        }
        let platform = engine.platform();
        let cpu = (0..engine.nr_cpus())
            .find(|&c| {
                // Acquire: the previous occupant's leave happens-before our use of the slot.
                platform.cpus[c]
                    .occupant
                    .compare_exchange(VACANT, ATTACHED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            })
            .ok_or(Error::NoFreeAttachSlot {
                slots: engine.nr_cpus() - self.threads_spawned(),
            })?;
        become_cpu(engine, cpu);
        if let Err(e) = engine.cpu_attach(cpu) {
            forget_cpu(platform);
            platform.cpus[cpu].occupant.store(VACANT, Ordering::Release);
            return Err(e);
        }
        let stored = ATTACHMENT.try_with(|a| {
            *a.borrow_mut() = Some(Attachment {
                inner: Arc::clone(inner),
                cpu,
                left: false,
            })
        });
        debug_assert!(stored.is_ok(), "checked above: the thread is not exiting");
        Ok(CpuGuard {
            cpu,
            inner: Arc::clone(inner),
            _not_send: PhantomData,
        })
    }
}

/// The calling thread's membership of a machine as a CPU (from [`Machine::attach`]).
/// Not `Send`: it belongs to the thread that attached.
///
/// Dropping it leaves: every call queued to this CPU before runs here first, later calls to
/// it are refused with [`Error::Offline`], the slot becomes free. Where leaving is not possible
/// — inside an RCU read-side section (a reader guard from [`Machine::engine`] still alive),
/// with interrupts masked, or inside a call handler — dropping it leaves nothing half-done:
/// the thread stays a CPU and leaves when it exits. [`CpuGuard::leave`] says so instead.
///
/// [`Machine::attach`]: super::Machine::attach
/// [`Machine::engine`]: super::Machine::engine
#[must_use = "the thread leaves the machine when the guard is dropped"]
pub struct CpuGuard {
    cpu: CpuId,
    inner: Arc<Inner>,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for CpuGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuGuard").field("cpu", &self.cpu).finish()
    }
}

impl CpuGuard {
    /// The CPU id this thread has.
    pub fn cpu(&self) -> CpuId {
        self.cpu
    }

    /// The engine, to make calls as this CPU.
    pub fn engine(&self) -> &HostEngine {
        &self.inner.engine
    }
}

impl CpuGuard {
    /// Leaves now, or says why it cannot and gives the guard back: inside an RCU read-side
    /// section ([`Error::WouldDeadlock`] `InRcuReader`), with interrupts masked or inside a call
    /// handler (`InterruptsMasked`, `InHandler`). Nothing happens on an error.
    pub fn leave(mut self) -> Result<(), (CpuGuard, Error)> {
        match self.try_leave() {
            Ok(()) => Ok(()),
            Err(e) => Err((self, e)),
        }
    }

    fn try_leave(&mut self) -> Result<(), Error> {
        if super::safe_points::engine_borrowed() {
            // Inside `with_engine`, `quiet` or `interruptible`: they hold a reference to the
            // engine that leaving could let the machine free.
            return Err(Error::Hotplug {
                cpu: self.cpu,
                reason: HotplugReason::EngineBorrowed,
            });
        }
        // `try_with`: during thread exit the attachment may be gone already — it left then.
        let Some(mut att) = ATTACHMENT
            .try_with(|a| a.borrow_mut().take())
            .ok()
            .flatten()
        else {
            return Ok(());
        };
        match leave(&att.inner, att.cpu, false) {
            Ok(()) => {
                att.left = true;
                Ok(())
            }
            Err(e) => {
                // Still attached: keep the attachment (for a retry, or the thread-exit
                // clean-up).
                let _ = ATTACHMENT.try_with(|a| *a.borrow_mut() = Some(att));
                Err(e)
            }
        }
    }
}

impl Drop for CpuGuard {
    /// Leaves; where it cannot (see [`leave`](CpuGuard::leave)), the thread stays a CPU and
    /// leaves when it exits — never a panic here.
    fn drop(&mut self) {
        let _ = self.try_leave();
    }
}

/// Slot bookkeeping on [`HostCpu`](super::platform::HostCpu).
pub(super) fn new_occupant(spawned: bool) -> AtomicU8 {
    AtomicU8::new(if spawned { SPAWNED } else { VACANT })
}
