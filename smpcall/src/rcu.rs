//! An expedited RCU grace period built on cross-CPU calls and context tracking (C13).
//!
//! **Readers** ([`Engine::rcu_read_lock`]) bump a per-CPU nesting count — no atomic RMW
//! shared with anyone, no fence: the only code that reads it is the same CPU's call handler
//! (which interrupts the reader, so program order is all it needs) and the grace period's
//! observations of it happen through that handler.
//!
//! **A grace period** ([`Engine::synchronize_rcu_expedited`]):
//! 1. snapshots every other online CPU's context-tracking counter ([`crate::context`]);
//!    CPUs that are idle (even counter) hold no references and are skipped — no IPI;
//! 2. sends the rest a waiting call whose handler reports a quiescent state at once if the CPU
//!    is not inside a read-side section, or else asks the reader's outermost unlock to report
//!    it; CPUs that passed through idle since the snapshot are skipped too;
//! 3. waits until every CPU reported.
//!
//! Offline CPUs are quiescent (they are not in the online mask, and grace periods serialise
//! with hotplug). The caller's own CPU is quiescent: it is in task context, outside a reader
//! (a grace period from inside a reader is refused — it would wait for itself).
//!
//! Readers inside NMI handlers are respected: an NMI marks the CPU watched (odd counter) for
//! its duration, and the call handler can only run after the NMI handler returned.
//!
//! Ordering. A reader's accesses happen-before its CPU's quiescent-state report (program order
//! on that CPU, then the Release decrement of the remaining count), which happens-before the
//! updater's return (Acquire). The updater's unpublishing stores happen-before the handler
//! (push Release / flush Acquire), so a reader that starts after the report sees them; for
//! CPUs skipped as idle, the context tracker's fences give the same guarantee.

use crate::sync::AtomicU64;
use core::marker::PhantomData;
use core::sync::atomic::{compiler_fence, fence, AtomicU32, Ordering};

use crate::cpumask::{CpuId, CpuMask};
use crate::engine::{Engine, Storage};
use crate::error::{DeadlockReason, Error};
use crate::platform::Platform;

/// Per-CPU RCU state (inside [`PerCpu`](crate::PerCpu)).
#[derive(Debug)]
pub(crate) struct RcuCpu {
    /// Read-side nesting. Written only by this CPU (task code, its handlers, its NMIs — all
    /// properly nested, so each restores what it changed).
    nesting: AtomicU32,
    /// A grace period (its sequence number) waits for this CPU's outermost unlock (0: none).
    qs_pending: AtomicU64,
    /// The last grace period this CPU reported a quiescent state for.
    last_qs: AtomicU64,
    /// Bumped when the CPU's thread ends its sections by exiting (hosted); see
    /// [`RcuReadGuard`].
    epoch: AtomicU32,
}

impl RcuCpu {
    pub(crate) const fn new() -> Self {
        RcuCpu {
            nesting: AtomicU32::new(0),
            qs_pending: AtomicU64::new(0),
            last_qs: AtomicU64::new(0),
            epoch: AtomicU32::new(0),
        }
    }
}

/// Engine-wide RCU state.
#[derive(Debug)]
pub(crate) struct RcuState {
    gp_seq: AtomicU64,
    /// CPUs the current grace period still waits for.
    remaining: AtomicU32,
    gps: AtomicU64,
    ipis: AtomicU64,
    skipped_idle: AtomicU64,
    deferred: AtomicU64,
}

impl RcuState {
    pub(crate) const fn new() -> Self {
        RcuState {
            gp_seq: AtomicU64::new(0),
            remaining: AtomicU32::new(0),
            gps: AtomicU64::new(0),
            ipis: AtomicU64::new(0),
            skipped_idle: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
        }
    }
}

/// Counters of the expedited grace periods, from [`Engine::rcu_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RcuStats {
    /// Grace periods completed.
    pub grace_periods: u64,
    /// CPUs sent a quiescent-state call (an IPI, unless elided for a polling CPU).
    pub cpus_called: u64,
    /// CPUs skipped because they were idle, or passed through idle, since the snapshot.
    pub cpus_skipped_idle: u64,
    /// Quiescent states deferred to a reader's outermost unlock.
    pub deferred_to_unlock: u64,
}

/// A read-side critical section on the current CPU; ends when dropped. Not `Send`: it must
/// end on the CPU where it began.
#[must_use = "the read-side section ends when the guard is dropped"]
pub struct RcuReadGuard<'a, P: Platform, S: Storage> {
    engine: &'a Engine<P, S>,
    cpu: CpuId,
    /// The CPU's reader epoch when the section began: a thread that stopped being the CPU
    /// (hosted thread exit) ended its sections; a guard it drops later must not touch the
    /// next occupant's count.
    epoch: u32,
    _not_send: PhantomData<*const ()>,
}

impl<P: Platform, S: Storage> core::fmt::Debug for RcuReadGuard<'_, P, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RcuReadGuard")
            .field("cpu", &self.cpu)
            .finish_non_exhaustive()
    }
}

impl<P: Platform, S: Storage> Drop for RcuReadGuard<'_, P, S> {
    fn drop(&mut self) {
        let rcu = &self.engine.per_cpu(self.cpu).rcu;
        // Relaxed: only the CPU's own thread bumps it, at its exit (program order here).
        if rcu.epoch.load(Ordering::Relaxed) != self.epoch {
            return;
        }
        // The section's accesses stay before the decrement (same-CPU ordering is all the
        // handler, which interrupts this code, needs).
        compiler_fence(Ordering::SeqCst);
        // Relaxed load: only this CPU writes it, and nested writers restore it (see RcuCpu).
        // Release store: a grace period that reads this 0 from another CPU and skips us (an
        // idle or quiet CPU, `rcu_reader_seen`) must see the section's accesses before it (a
        // plain store on x86).
        let n = rcu.nesting.load(Ordering::Relaxed);
        rcu.nesting.store(n - 1, Ordering::Release);
        compiler_fence(Ordering::SeqCst);
        if n == 1 {
            // Outermost unlock: report a quiescent state a grace period asked for. A handler
            // arriving between the store above and this swap sees nesting 0 and reports itself
            // (leaving nothing pending), so exactly one of the two reports.
            let gp = rcu.qs_pending.swap(0, Ordering::Relaxed);
            if gp != 0 {
                self.engine.rcu_report_qs(self.cpu, gp);
            }
        }
    }
}

impl<P: Platform, S: Storage> Engine<P, S> {
    /// Enters an RCU read-side critical section on the current CPU (nestable, cheap: no
    /// shared write, no fence). Works in task context, call handlers and NMI handlers.
    /// Refused with [`Error::Offline`] on an offline CPU.
    pub fn rcu_read_lock(&self) -> Result<RcuReadGuard<'_, P, S>, Error> {
        let cpu = self.current_cpu().ok_or(Error::NotOnCpu)?;
        if self.in_quiet_region(cpu) {
            // The CPU is in an extended quiescent state: grace periods do not wait for it.
            return Err(Error::Unsupported(
                "an RCU read-side section inside a quiet region (leave the region first)",
            ));
        }
        let rcu = &self.per_cpu(cpu).rcu;
        // Relaxed: only this CPU writes it (see RcuCpu).
        let n = rcu.nesting.load(Ordering::Relaxed);
        rcu.nesting.store(n + 1, Ordering::Relaxed);
        // The section's accesses stay after the increment (same-CPU ordering).
        compiler_fence(Ordering::SeqCst);
        // Then check we are online: increment first, so a cpu_down that interrupts us here
        // sees the reader and refuses; if the CPU already left, undo and refuse — grace periods
        // do not wait for offline CPUs.
        if !self.is_online(cpu) {
            compiler_fence(Ordering::SeqCst);
            rcu.nesting.store(n, Ordering::Relaxed);
            return Err(Error::Offline(cpu));
        }
        Ok(RcuReadGuard {
            engine: self,
            cpu,
            // Relaxed: this CPU's own counter.
            epoch: rcu.epoch.load(Ordering::Relaxed),
            _not_send: PhantomData,
        })
    }

    /// Whether the current CPU is inside a read-side critical section.
    pub fn rcu_read_held(&self) -> bool {
        self.current_cpu()
            .is_some_and(|c| self.per_cpu(c).rcu.nesting.load(Ordering::Relaxed) > 0)
    }

    /// Waits until every read-side critical section that began before this call has ended,
    /// on every CPU (an expedited grace period: IPIs to the CPUs that are not idle).
    ///
    /// Must be called from a CPU in a context that can wait, outside a read-side section.
    /// Grace periods serialise with each other and with hotplug and stop_machine.
    pub fn synchronize_rcu_expedited(&self) -> Result<(), Error> {
        let me = self.enter()?;
        self.check_can_wait(me)?;
        if self.per_cpu(me).rcu.nesting.load(Ordering::Relaxed) > 0 {
            return Err(Error::WouldDeadlock(DeadlockReason::InRcuReader));
        }
        self.lock_stop(Some(me))?;
        let st = &self.rcu;
        // Relaxed: serialised by the stop lock.
        let gp = st.gp_seq.load(Ordering::Relaxed) + 1;
        st.gp_seq.store(gp, Ordering::Relaxed);
        // Everything the updater did before (unpublishing) is ordered before the snapshots.
        fence(Ordering::SeqCst);

        let mut others = self.online_mask();
        others.clear(me);
        // Snapshot, then look again just before calling: CPUs that are idle, or went through
        // idle in between, hold no reference from before the grace period. (In chunks of 64
        // CPUs, to keep the snapshots on the stack.)
        let mut call = CpuMask::new();
        let mut skipped = 0u64;
        let mut chunk = [None; 64];
        for base in (0..self.nr_cpus()).step_by(64) {
            for (i, slot) in chunk.iter_mut().enumerate() {
                let cpu = base + i;
                *slot = others.test(cpu).then(|| self.per_cpu(cpu).ctx.snapshot());
            }
            for (i, snap) in chunk.iter().enumerate() {
                let cpu = base + i;
                match snap {
                    None => {}
                    // Idle (or quiet), or through idle since — and no reader open there: a
                    // reader that a call handler opened on an idle or quiet CPU and kept past
                    // the handler (in a thread-local) leaves the CPU idle with nesting 1. The
                    // nesting load comes after the snapshot's: the increment happened before
                    // the handler's exit that the snapshot saw.
                    Some(s) if s.is_idle() && !self.rcu_reader_seen(cpu) => skipped += 1,
                    Some(s)
                        if self.per_cpu(cpu).ctx.passed_quiescent_since(*s)
                            && !self.rcu_reader_seen(cpu) =>
                    {
                        skipped += 1
                    }
                    Some(_) => call.set(cpu),
                }
            }
        }
        // Relaxed: statistics.
        st.skipped_idle.fetch_add(skipped, Ordering::Relaxed);
        st.ipis.fetch_add(call.weight() as u64, Ordering::Relaxed);
        // Relaxed: published to the handlers by the call's push (Release).
        st.remaining.store(call.weight() as u32, Ordering::Relaxed);
        let result = if call.is_empty() {
            Ok(())
        } else {
            // Any context: the check is atomics only (async-signal-safe), so it runs at once even
            // where user calls are deferred.
            self.call_many_inner(&call, |cpu| self.rcu_qs_check(cpu, gp), true)
                .map(|queued| {
                    // A CPU the call could not reach will never report: stop waiting for it.
                    // (Cannot happen while we hold the hotplug lock; defensive.)
                    let missed = call.weight() - queued.weight();
                    st.remaining.fetch_sub(missed as u32, Ordering::Release);
                    // Deferred reports arrive at the readers' outermost unlocks.
                    // Acquire: pairs with each report's Release decrement.
                    while st.remaining.load(Ordering::Acquire) != 0 {
                        self.serve_own(me);
                        self.platform.relax();
                    }
                })
        };
        fence(Ordering::SeqCst);
        st.gps.fetch_add(1, Ordering::Relaxed);
        self.unlock_stop();
        result
    }

    /// Counters of the expedited grace periods.
    pub fn rcu_stats(&self) -> RcuStats {
        let st = &self.rcu;
        // Relaxed: statistics.
        RcuStats {
            grace_periods: st.gps.load(Ordering::Relaxed),
            cpus_called: st.ipis.load(Ordering::Relaxed),
            cpus_skipped_idle: st.skipped_idle.load(Ordering::Relaxed),
            deferred_to_unlock: st.deferred.load(Ordering::Relaxed),
        }
    }

    /// The last grace period (sequence number) `cpu` reported a quiescent state for.
    pub fn rcu_last_qs(&self, cpu: CpuId) -> u64 {
        if cpu >= self.nr_cpus() {
            return 0;
        }
        // Relaxed: an observation.
        self.per_cpu(cpu).rcu.last_qs.load(Ordering::Relaxed)
    }

    /// The sequence number of the latest grace period started.
    pub fn rcu_gp_seq(&self) -> u64 {
        // Relaxed: an observation.
        self.rcu.gp_seq.load(Ordering::Relaxed)
    }

    /// (Used by the hosted backend only.)
    #[cfg(all(feature = "std", target_os = "linux", not(loom)))]
    /// Ends every read-side section of `cpu`'s thread, which is exiting (the hosted backend's
    /// thread-exit clean-up): it runs no more code, so nothing it read can be used any more.
    /// A quiescent state a grace period was waiting for is reported.
    pub(crate) fn rcu_end_sections_on_exit(&self, cpu: CpuId) {
        let rcu = &self.per_cpu(cpu).rcu;
        // Relaxed: only this CPU writes them. Guards still alive on the exiting thread (in its
        // thread-locals) see the new epoch and leave the count alone.
        rcu.epoch.fetch_add(1, Ordering::Relaxed);
        rcu.nesting.store(0, Ordering::Relaxed);
        let gp = rcu.qs_pending.swap(0, Ordering::Relaxed);
        if gp != 0 {
            self.rcu_report_qs(cpu, gp);
        }
    }

    /// Whether a grace period must not skip `cpu` as idle: a reader is open there (observed
    /// from another CPU, after its context snapshot; see `synchronize_rcu_expedited`).
    fn rcu_reader_seen(&self, cpu: CpuId) -> bool {
        // Acquire: a 1 is ordered after the snapshot's SeqCst load, which read the handler's
        // exit to idle (a SeqCst RMW after the increment); a 0 from a reader's unlock (Release)
        // makes that section's accesses happen-before this grace period's end.
        self.per_cpu(cpu).rcu.nesting.load(Ordering::Acquire) > 0
    }

    /// Whether `cpu` is inside a read-side section (checked on `cpu` itself by `cpu_down`).
    pub(crate) fn rcu_reader_on(&self, cpu: CpuId) -> bool {
        // Relaxed: read on `cpu` itself, which the reader's code runs on (program order).
        self.per_cpu(cpu).rcu.nesting.load(Ordering::Relaxed) > 0
    }

    /// The quiescent-state check, run as a call handler on `cpu`.
    fn rcu_qs_check(&self, cpu: CpuId, gp: u64) {
        let rcu = &self.per_cpu(cpu).rcu;
        // Relaxed: this CPU's own nesting; we interrupted its code (program order).
        if rcu.nesting.load(Ordering::Relaxed) == 0 {
            self.rcu_report_qs(cpu, gp);
        } else {
            // Relaxed: read back by this CPU's own unlock (program order).
            rcu.qs_pending.store(gp, Ordering::Relaxed);
            self.rcu.deferred.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn rcu_report_qs(&self, cpu: CpuId, gp: u64) {
        // Relaxed: an observation for tests and dumps.
        self.per_cpu(cpu).rcu.last_qs.store(gp, Ordering::Relaxed);
        // Release: this CPU's read-side accesses happen-before the updater's Acquire load.
        self.rcu.remaining.fetch_sub(1, Ordering::Release);
    }
}
