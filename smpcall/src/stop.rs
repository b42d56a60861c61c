//! `stop_machine` and CPU hotplug (C10, C11).
//!
//! **stop_machine** runs a function on one or more *active* CPUs while every other online CPU
//! spins with interrupts masked. Each participant runs the same staged state machine; every CPU
//! acknowledges a stage before the next one begins:
//!
//! | stage | what participants do |
//! |---|---|
//! | `Prepare` | arrive; interrupts still on: they keep serving calls queued to them |
//! | `DisableIrqInactive` | the *inactive* CPUs mask interrupts (stop serving calls) |
//! | `DisableIrqActive` | then the *active* CPUs mask |
//! | `Run` | the active CPUs run the function |
//! | `Exit` | everyone unmasks and leaves |
//!
//! The order of the two masking stages is seed 003's point: once an active CPU masks, every
//! other CPU is already spinning masked inside stop_machine, so nobody can still be sending it
//! an IPI that it would only notice after it went offline.
//!
//! Other CPUs are brought into the state machine with a waiting call through the caller's
//! per-target slots; the caller participates itself, in its own (task) context. The state lives
//! on the caller's stack, which it leaves only after every participant released its slot.
//!
//! **Hotplug.** [`Engine::cpu_down`] stops the CPU accepting calls (new calls get
//! [`Error::Offline`]), then runs stop_machine with the going-down work on that CPU: it serves
//! its queue until empty — every call queued while it was online runs before it leaves (the
//! kernel's "flush on dying") — and leaves the online mask. Senders check "online" and push in
//! one interrupt-masked region, so no push can slip in after that final flush. A call that
//! reaches an offline CPU anyway is run, never dropped, and counted
//! ([`CpuStats::offline_runs`](crate::CpuStats::offline_runs)).

use crate::sync::AtomicU64;
use core::cell::UnsafeCell;
use core::sync::atomic::Ordering;

use crate::cpumask::{CpuId, CpuMask};
use crate::csd::shared_call;
use crate::engine::{AbortOnUnwind, Engine, Ipis, Storage, Target};
use crate::error::{Error, HotplugReason};
use crate::platform::Platform;
use crate::sync;

/// Default threshold after which a stuck stop_machine participant is reported: 5 s.
pub(crate) const DEFAULT_STALL_NS: u64 = 5_000_000_000;

/// A stage of the stop_machine state machine (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
#[non_exhaustive]
pub enum StopStage {
    /// Not in stop_machine.
    None = 0,
    /// Everyone arrived; interrupts still on.
    Prepare = 1,
    /// Inactive CPUs mask interrupts.
    DisableIrqInactive = 2,
    /// Active CPUs mask interrupts.
    DisableIrqActive = 3,
    /// Active CPUs run the function.
    Run = 4,
    /// Everyone unmasks and leaves.
    Exit = 5,
}

impl StopStage {
    fn from_u32(v: u32) -> StopStage {
        match v {
            1 => StopStage::Prepare,
            2 => StopStage::DisableIrqInactive,
            3 => StopStage::DisableIrqActive,
            4 => StopStage::Run,
            5 => StopStage::Exit,
            _ => StopStage::None,
        }
    }
}

/// Hotplug and stop_machine counters, from [`Engine::hotplug_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HotplugStats {
    /// Completed `cpu_down`s.
    pub downs: u64,
    /// Completed `cpu_up`s.
    pub ups: u64,
    /// Completed stop_machine runs (including those of `cpu_down`).
    pub stop_machines: u64,
    /// Reports of a stop_machine stage taking longer than the stall threshold.
    pub stalls_reported: u64,
    /// `cpu_down`s refused with [`Error::NotAtSafePoint`] (nothing happened).
    pub downs_refused_not_at_safe_point: u64,
}

#[derive(Debug)]
pub(crate) struct HotplugCounters {
    downs: AtomicU64,
    ups: AtomicU64,
    stop_machines: AtomicU64,
    stalls_reported: AtomicU64,
    downs_refused: AtomicU64,
}

impl HotplugCounters {
    pub(crate) const fn new() -> Self {
        HotplugCounters {
            downs: AtomicU64::new(0),
            ups: AtomicU64::new(0),
            stop_machines: AtomicU64::new(0),
            stalls_reported: AtomicU64::new(0),
            downs_refused: AtomicU64::new(0),
        }
    }
}

/// The state shared by the participants of one stop_machine (on the caller's stack).
struct StopState<'a> {
    counts: StageCounts,
    participants: CpuMask,
    active: CpuMask,
    work: &'a (dyn Fn(CpuId) + Sync),
    /// `work` is user code: an active CPU taking part from a restricted handler (one that may
    /// not run user code) refuses the whole run instead.
    user_work: bool,
    /// The first active CPU that refused (`cpu + 1`; 0: none). Set before its Prepare ack,
    /// read after Prepare: nobody runs `work` once it is set.
    refused: core::sync::atomic::AtomicUsize,
}

/// The stage of one stop_machine and its counts, in **one** atomic word:
/// `stage << 56 | (participants that have not acknowledged the stage) << 28 | (participants
/// serving their queue right now)`.
///
/// The stage advances when both counts reach zero: in Prepare, not while anyone is still
/// serving calls — a function run there may wait for another participant's queue service,
/// which ends once that one masks (found by the simulator). Advancing is a single store of the
/// next stage with a fresh count, and registering as serving is a CAS on the whole word that
/// requires Prepare: so once the stage moved, nobody can start serving under it. (It used to
/// be two words, the count stored before the stage; an `enter_serving` between the two stores
/// saw a fresh count and the old stage, and served on into the next stage: issue 16.)
///
/// Under `--cfg loom` the atomic is loom's, and `loom_tests` drives this very type.
pub(crate) struct StageCounts {
    word: sync::ModelU64,
    participants: u64,
}

const STAGE_SHIFT: u32 = 56;
const ACK_SHIFT: u32 = 28;
/// Both counts (everything below the stage).
const COUNTS: u64 = (1 << STAGE_SHIFT) - 1;
/// One acknowledgement still missing.
const ACK_ONE: u64 = 1 << ACK_SHIFT;
/// One participant serving its queue.
const SERVE_ONE: u64 = 1;

impl StageCounts {
    /// Stage [`StopStage::None`]; [`start`](Self::start) enters Prepare.
    pub(crate) fn new(participants: usize) -> Self {
        debug_assert!(participants > 0 && (participants as u64) < SERVE_ONE << ACK_SHIFT);
        StageCounts {
            word: sync::ModelU64::new(StopStage::None as u64),
            participants: participants as u64,
        }
    }

    /// Enters Prepare: every participant has to acknowledge it.
    pub(crate) fn start(&self) {
        self.publish(StopStage::Prepare as u32);
    }

    /// The current stage (a [`StopStage`] as `u32`).
    pub(crate) fn stage(&self) -> u32 {
        // Acquire: pairs with `publish`'s Release (and, through the release sequence of the
        // RMWs after it, everything the previous stage's participants did before acking).
        (self.word.load(sync::Ordering::Acquire) >> STAGE_SHIFT) as u32
    }

    /// Acknowledges the current stage (the caller saw it with [`stage`](Self::stage)).
    /// `point` is called where another CPU's step matters (a scheduling point of the
    /// simulator; empty elsewhere).
    pub(crate) fn ack(&self, point: &impl Fn()) {
        self.drop_count(ACK_ONE, point);
    }

    /// Registers the caller as serving its queue in Prepare. Fails once Prepare is over, or
    /// about to be (every ack in and nobody serving: the last one is advancing the stage).
    pub(crate) fn enter_serving(&self, point: &impl Fn()) -> bool {
        // Acquire: as in `stage`.
        let mut w = self.word.load(sync::Ordering::Acquire);
        loop {
            if w >> STAGE_SHIFT != StopStage::Prepare as u64 || w & COUNTS == 0 {
                return false;
            }
            point();
            // The whole word, stage included, is compared: if the stage moved since we read
            // it, this fails, and the retry sees the new stage. Success ordering AcqRel, and
            // Acquire on failure: as in `stage`; serving starts after the increment.
            match self.word.compare_exchange_weak(
                w,
                w + SERVE_ONE,
                sync::Ordering::AcqRel,
                sync::Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => w = now,
            }
        }
    }

    /// Ends what a successful [`enter_serving`](Self::enter_serving) began.
    pub(crate) fn leave_serving(&self, point: &impl Fn()) {
        self.drop_count(SERVE_ONE, point);
    }

    /// Removes `amount` from the counts; whoever brings them to zero advances the stage.
    fn drop_count(&self, amount: u64, point: &impl Fn()) {
        // AcqRel: the one reaching zero sees every other participant's stage actions (release
        // sequence on the word) before it publishes the next stage.
        let before = self.word.fetch_sub(amount, sync::Ordering::AcqRel);
        debug_assert!(before & COUNTS >= amount, "stop_machine count underflow");
        if before & COUNTS == amount {
            let stage = (before >> STAGE_SHIFT) as u32;
            if stage < StopStage::Exit as u32 {
                // Counts are zero: nobody else writes the word until we publish (acks wait for
                // the next stage, `enter_serving` refuses a zero count).
                point();
                self.publish(stage + 1);
            }
        }
    }

    /// Stores `stage` with every acknowledgement missing and nobody serving: one store.
    fn publish(&self, stage: u32) {
        // Release: every participant's actions in the previous stage (through the AcqRel
        // count chain) happen-before anyone acting on the new stage.
        self.word.store(
            (stage as u64) << STAGE_SHIFT | self.participants << ACK_SHIFT,
            sync::Ordering::Release,
        );
    }
}

/// A `FnOnce` run by exactly one CPU inside stop_machine, and its result.
struct Once<F, R> {
    f: UnsafeCell<Option<F>>,
    ret: UnsafeCell<Option<R>>,
}

// SAFETY: only the single active CPU touches the cells (in the Run stage), and the caller reads
// `ret` after Exit; the stage Release/Acquire chain orders those accesses. `F` and `R` are
// `Send` (moved to, and back from, the active CPU).
unsafe impl<F: Send, R: Send> Sync for Once<F, R> {}

impl<F: FnOnce() -> R, R> Once<F, R> {
    /// # Safety
    /// Only one CPU may call this, and nobody may read `ret` concurrently.
    unsafe fn run(&self) {
        // SAFETY: exclusive access per this function's contract.
        unsafe {
            if let Some(f) = (*self.f.get()).take() {
                *self.ret.get() = Some(f());
            }
        }
    }
}

impl<P: Platform, S: Storage> Engine<P, S> {
    /// Runs `f` on CPU `cpu` while every other online CPU spins with interrupts masked, and
    /// returns its result (C11). Concurrent stop_machines (and hotplug operations) serialise.
    ///
    /// Refused with [`Error::WouldDeadlock`] from a context that cannot wait (masked, or in a
    /// handler). If `cpu` is not the caller, `f` runs as a call handler on `cpu`; in the hosted
    /// backend `cpu` takes part at its next safe point (its call is user work), so `f` never
    /// runs in a signal handler that interrupted arbitrary code — a busy `cpu` delays the
    /// stop_machine until it reaches one.
    pub fn stop_machine<F, R>(&self, cpu: CpuId, f: F) -> Result<R, Error>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let once = Once {
            f: UnsafeCell::new(Some(f)),
            ret: UnsafeCell::new(None),
        };
        let work = |c: CpuId| {
            if c == cpu {
                // SAFETY: only `cpu` runs this, once (Run stage of a single active CPU).
                unsafe { once.run() };
            }
        };
        self.stop_machine_many(&CpuMask::single(self.check_cpu(cpu)?), work)?;
        // `Ok` means `f` ran on `cpu` (the only active CPU; an offline one is `Err`): no result
        // is a broken engine invariant, like a waiting call released before it ran.
        // SAFETY: stop_machine has returned: every participant is done with `once`.
        Ok(unsafe { (*once.ret.get()).take() }
            .expect("smpcall: stop_machine returned without running its function"))
    }

    /// Runs `f` on every online CPU of `active` at once, while every other online CPU spins
    /// with interrupts masked. Returns the CPUs `f` ran on.
    pub fn stop_machine_many<F>(&self, active: &CpuMask, f: F) -> Result<CpuMask, Error>
    where
        F: Fn(CpuId) + Sync,
    {
        let me = self.enter_any()?;
        if let Some(me) = me {
            self.check_can_wait(me)?;
        }
        self.lock_stop(me)?;
        let participants = self.online.load();
        let active = active.and(&participants);
        let result = if active.is_empty() {
            Err(Error::Offline(self.first_requested(active)))
        } else {
            match self.stop_locked(me, &participants, &active, &f, true) {
                Some(cpu) => Err(Error::NotAtSafePoint(cpu)),
                None => Ok(active),
            }
        };
        self.unlock_stop();
        result
    }

    /// Takes `cpu` offline (C10): new calls to it are refused with [`Error::Offline`]; calls
    /// queued to it while it was online run before it leaves (on it); many-calls skip it from
    /// then on. Refuses the last online CPU, the calling CPU itself, and a CPU that is inside an
    /// RCU read-side section (it would keep its references while grace periods skip it).
    ///
    /// May be called from a thread that is not one of the engine's CPUs (the platform must then
    /// allow [`current_cpu`](Platform::current_cpu) to return `None` there): it drives the
    /// stop_machine without taking part. If the CPU going down is running code that may not
    /// run user functions (a hosted CPU interrupted outside a safe point) while user calls are
    /// still queued to it, nothing is done and [`Error::NotAtSafePoint`] is returned: retry.
    pub fn cpu_down(&self, cpu: CpuId) -> Result<(), Error> {
        let me = self.enter_any()?;
        if let Some(me) = me {
            self.check_can_wait(me)?;
        }
        let cpu = self.check_cpu(cpu)?;
        self.lock_stop(me)?;
        let result = self.cpu_down_locked(me, cpu);
        self.unlock_stop();
        result
    }

    fn cpu_down_locked(&self, me: Option<CpuId>, cpu: CpuId) -> Result<(), Error> {
        if !self.online.test(cpu) {
            return Err(Error::Offline(cpu));
        }
        if self.online.load().weight() == 1 {
            return Err(Error::Hotplug {
                cpu,
                reason: HotplugReason::LastOnline,
            });
        }
        if Some(cpu) == me {
            return Err(Error::Hotplug {
                cpu,
                reason: HotplugReason::CallingCpu,
            });
        }
        // Going down: refuse new calls. Senders that already passed the check are inside their
        // masked push region; stop_machine below cannot start before they have pushed. Foreign
        // senders cannot mask: wait until none is between its check and its push (foreign.rs).
        self.accepting.clear(cpu);
        self.wait_for_foreign_pushers();
        let participants = self.online.load();
        // 0: went down; 1: inside an RCU reader; 2: user calls left that it may not run here.
        let refusal = core::sync::atomic::AtomicU32::new(0);
        let dying = |c: CpuId| {
            if c == cpu {
                if self.rcu_reader_on(cpu) {
                    // The code we interrupted is inside an RCU read-side section: it would go
                    // on holding references on an offline CPU, which grace periods skip.
                    // Relaxed: read by the caller after stop_machine (stage Release/Acquire).
                    refusal.store(1, Ordering::Relaxed);
                } else if !self.die(cpu) {
                    refusal.store(2, Ordering::Relaxed);
                }
            }
        };
        // The going-down work is the engine's own: it runs in any context, and decides itself
        // (in `die`) whether user calls it would have to run can run there.
        self.stop_locked(me, &participants, &CpuMask::single(cpu), &dying, false);
        match refusal.load(Ordering::Relaxed) {
            0 => {}
            1 => {
                self.accepting.set(cpu);
                return Err(Error::Hotplug {
                    cpu,
                    reason: HotplugReason::InRcuReader,
                });
            }
            _ => {
                self.accepting.set(cpu);
                // Relaxed: statistics.
                self.hotplug.downs_refused.fetch_add(1, Ordering::Relaxed);
                return Err(Error::NotAtSafePoint(cpu));
            }
        }
        // Relaxed: statistics.
        self.hotplug.downs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Brings `cpu` back online: calls to it work again. Idempotent.
    ///
    /// Like [`cpu_down`](Engine::cpu_down), it may be called from a thread that is not a CPU.
    pub fn cpu_up(&self, cpu: CpuId) -> Result<(), Error> {
        let me = self.enter_any()?;
        if let Some(me) = me {
            self.check_can_wait(me)?;
        }
        let cpu = self.check_cpu(cpu)?;
        self.lock_stop(me)?;
        // Under the lock: an attached thread's leave (`cpu_leave`) clears `possible` holding
        // it, and its thread is gone once it released it. Checked before taking the lock, a
        // leave in between was undone here — a CPU online with no thread to serve it, which
        // every later call to it, stop_machine and grace period waited for (found by probing).
        if !self.possible.test(cpu) {
            self.unlock_stop();
            return Err(Error::Hotplug {
                cpu,
                reason: HotplugReason::NeverBroughtUp,
            });
        }
        if !self.online.test(cpu) {
            self.online.set(cpu);
            self.accepting.set(cpu);
            // Kick it: a parked CPU notices it is online again (an IPI with an empty queue).
            self.platform.send_ipi(cpu);
            // Relaxed: statistics.
            self.hotplug.ups.fetch_add(1, Ordering::Relaxed);
        }
        self.unlock_stop();
        Ok(())
    }

    /// (Used by the hosted backend only.)
    #[cfg(all(feature = "std", target_os = "linux", not(loom)))]
    /// Brings `cpu` online for a thread that has just become it (the hosted backend's attach):
    /// unlike [`cpu_up`](Engine::cpu_up), the caller *is* the offline CPU. Serialised with
    /// hotplug and stop_machine (which need nothing from an offline CPU, so taking the lock
    /// without serving cannot deadlock).
    pub(crate) fn cpu_attach(&self, cpu: CpuId) -> Result<(), Error> {
        if self.is_shutdown() {
            return Err(Error::ShutDown);
        }
        let cpu = self.check_cpu(cpu)?;
        self.lock_stop(None)?;
        let r = if self.online.test(cpu) {
            Err(Error::Hotplug {
                cpu,
                reason: HotplugReason::AlreadyOnline,
            })
        } else {
            self.possible.set(cpu);
            self.online.set(cpu);
            self.accepting.set(cpu);
            // Relaxed: statistics.
            self.hotplug.ups.fetch_add(1, Ordering::Relaxed);
            Ok(())
        };
        self.unlock_stop();
        r
    }

    /// (Used by the hosted backend only.)
    #[cfg(all(feature = "std", target_os = "linux", not(loom)))]
    /// Takes the calling CPU `me` offline by itself (the hosted backend's leave): like
    /// [`cpu_down`](Engine::cpu_down) — no new calls accepted, every queued call runs here
    /// first, through stop_machine with `me` as the active CPU — but driven from `me`'s own
    /// task context, and allowed for the last online CPU. `Ok` if `me` is offline already.
    pub(crate) fn cpu_leave(&self, me: CpuId) -> Result<(), Error> {
        // Not from an NMI function (a guard kept in a thread-local): the leave waits for its
        // own flush, which serves nothing in NMI context. (Every other wait starts with
        // `enter`, which refuses there already.)
        // Relaxed: this CPU's own depth.
        if self.per_cpu(me).nmi_depth.load(Ordering::Relaxed) > 0 {
            return Err(Error::WouldDeadlock(crate::error::DeadlockReason::InNmi));
        }
        self.check_can_wait(me)?;
        if self.per_cpu(me).quiet.load(Ordering::Relaxed) {
            // Relaxed: our own flag. The region's end would touch the slot after we left.
            return Err(Error::Hotplug {
                cpu: me,
                reason: HotplugReason::InQuietRegion,
            });
        }
        match self.lock_stop(Some(me)) {
            // Offline already (taken down by someone else): take the lock as a bystander —
            // an offline CPU serves nothing — to forget the slot below.
            Err(Error::Offline(_)) => self.lock_stop(None)?,
            other => other?,
        }
        if !self.online.test(me) {
            // Taken down by someone else meanwhile: just make sure nobody brings it back.
            self.possible.clear(me);
            self.unlock_stop();
            return Ok(());
        }
        self.accepting.clear(me);
        self.wait_for_foreign_pushers();
        let participants = self.online.load();
        let dying = |c: CpuId| {
            if c == me {
                // Task context (the caller takes part itself): nothing is restricted, so the
                // final flush runs everything.
                let left = self.die(me);
                debug_assert!(left, "a leaving CPU could not run its own calls");
            }
        };
        self.stop_locked(Some(me), &participants, &CpuMask::single(me), &dying, false);
        // No thread is this CPU any more: `cpu_up` must not bring it back (calls to it would
        // wait forever); the next thread to attach brings it up.
        self.possible.clear(me);
        // Relaxed: statistics.
        self.hotplug.downs.fetch_add(1, Ordering::Relaxed);
        self.unlock_stop();
        Ok(())
    }

    /// Takes `cpu` out of the online and accepting masks after its thread exited at shutdown
    /// (the engine refuses every call by then and every queue is drained): a stop_machine
    /// started later — an attached thread leaving after the shutdown — must not wait for it.
    #[cfg(all(feature = "std", target_os = "linux", not(loom)))]
    pub(crate) fn retire_after_shutdown(&self, cpu: CpuId) {
        debug_assert!(self.is_shutdown());
        self.accepting.clear(cpu);
        self.online.clear(cpu);
    }

    /// Hotplug and stop_machine counters.
    pub fn hotplug_stats(&self) -> HotplugStats {
        // Relaxed: statistics.
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HotplugStats {
            downs: r(&self.hotplug.downs),
            ups: r(&self.hotplug.ups),
            stop_machines: r(&self.hotplug.stop_machines),
            stalls_reported: r(&self.hotplug.stalls_reported),
            downs_refused_not_at_safe_point: r(&self.hotplug.downs_refused),
        }
    }

    /// The stop_machine stage `cpu` last acknowledged ([`StopStage::None`] outside one).
    pub fn stop_stage(&self, cpu: CpuId) -> StopStage {
        if cpu >= self.nr_cpus() {
            return StopStage::None;
        }
        // Relaxed: an observation for tests and diagnostics.
        StopStage::from_u32(self.per_cpu(cpu).stop_stage.load(Ordering::Relaxed))
    }

    /// In the last stop_machine `cpu` took part in, the position (1, 2, …, engine-wide
    /// sequence) at which it masked interrupts. Shows the inactive-before-active order.
    pub fn stop_mask_order(&self, cpu: CpuId) -> u64 {
        if cpu >= self.nr_cpus() {
            return 0;
        }
        // Relaxed: an observation for tests and diagnostics.
        self.per_cpu(cpu).stop_mask_seq.load(Ordering::Relaxed)
    }

    /// Sets the stall threshold: a wait for call data, a queue nobody takes, or a stop_machine
    /// stage that lasts longer is reported through [`Platform::report`] (and the IPI re-sent).
    /// Zero disables all of it. (The same unit as `MachineBuilder::stall_threshold`.)
    pub fn set_stall_threshold(&self, threshold: core::time::Duration) {
        self.set_stall_threshold_ns(threshold.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// [`set_stall_threshold`](Engine::set_stall_threshold) in nanoseconds.
    pub(crate) fn set_stall_threshold_ns(&self, ns: u64) {
        // Relaxed: a configuration value; a stale read only delays a report.
        self.stall_threshold_ns.store(ns, Ordering::Relaxed);
    }

    // ---------------------------------------------------------------------------------------

    fn check_cpu(&self, cpu: CpuId) -> Result<CpuId, Error> {
        if cpu < self.nr_cpus() {
            Ok(cpu)
        } else {
            Err(Error::UnknownCpu(cpu))
        }
    }

    fn first_requested(&self, active: CpuMask) -> CpuId {
        active.first().unwrap_or(0)
    }

    /// Takes the stop/hotplug lock, serving our own queue while another CPU holds it (its
    /// stop_machine needs us to take part). Fails — without the lock — if this CPU went
    /// offline meanwhile (a cpu_down of us ran while we waited: found by the simulator).
    pub(crate) fn lock_stop(&self, me: Option<CpuId>) -> Result<(), Error> {
        // Acquire: the previous holder's hotplug changes are visible to us.
        while self
            .stop_lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            if let Some(me) = me {
                self.serve_own(me);
            }
            self.platform.relax();
        }
        match me {
            Some(me) if !self.online.test(me) => {
                self.unlock_stop();
                Err(Error::Offline(me))
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn unlock_stop(&self) {
        // Release: our hotplug changes happen-before the next holder's.
        self.stop_lock.store(false, Ordering::Release);
    }

    /// Runs the state machine on `participants` (the caller among them, if it is a CPU). Lock
    /// held. Returns the active CPU that refused to run user `work` (then nobody ran it).
    fn stop_locked(
        &self,
        me: Option<CpuId>,
        participants: &CpuMask,
        active: &CpuMask,
        work: &(dyn Fn(CpuId) + Sync),
        user_work: bool,
    ) -> Option<CpuId> {
        let st = StopState {
            counts: StageCounts::new(participants.weight()),
            participants: *participants,
            active: *active,
            work,
            user_work,
            refused: core::sync::atomic::AtomicUsize::new(0),
        };
        st.counts.start();
        let participate = |cpu: CpuId| self.stop_participant(&st, cpu, false);
        let in_flight = AbortOnUnwind;
        let mut ipis = CpuMask::new();
        // Masked from the first push to the IPI send: an interrupt nested in between could
        // wait for one of our targets before we signalled it (found by the simulator).
        let masked = self.mask();
        let mut others = *participants;
        if let Some(me) = me {
            others.clear(me);
        }
        for t in &others {
            let fill = |slot: &crate::csd::Csd| {
                let (run, payload) = shared_call(&participate);
                // SAFETY: we hold the slot; `participate` outlives the waits below. The
                // participant's own steps are atomics only (async-signal-safe), so the call
                // may run in any context — except on a CPU that runs user `work`: that one
                // takes part at its next safe point, as Linux's stopper thread waits to be
                // scheduled (a busy hosted CPU delays the stop_machine, never breaks it).
                unsafe {
                    slot.set_call(run, payload, true);
                    if !(user_work && active.test(t)) {
                        slot.set_any_context();
                    }
                }
                self.note_call::<StopState<'_>>(slot, me.unwrap_or(crate::csd::FOREIGN), t);
            };
            let csd = &self.per_cpu(t).stop_csd;
            match me {
                // Force: a CPU going down no longer accepts calls, but must take part.
                Some(me) => {
                    let one = core::slice::from_ref(csd);
                    // SAFETY: a per-target stop csd, alive as long as the engine; `Force`
                    // claims it with a compare-and-swap.
                    let queued = unsafe {
                        self.queue_call(&masked, me, t, one, Target::Force, &mut ipis, fill)
                    };
                    debug_assert_eq!(queued, Ok(true));
                }
                // SAFETY: `csd` (a per-target stop csd: stop_machines are serialised, so it is
                // free) outlives the wait below.
                None => {
                    let queued =
                        unsafe { self.push_foreign(t, csd, Target::Force, &mut ipis, fill) };
                    debug_assert_eq!(queued, Ok(true));
                }
            }
        }
        ipis.send(&self.platform);
        drop(masked);
        if let Some(me) = me {
            self.stop_participant(&st, me, true);
        }
        for t in &others {
            let csd = &self.per_cpu(t).stop_csd;
            match me {
                Some(me) => self.wait_csd(me, t, csd),
                None => self.wait_foreign(csd),
            }
        }
        core::mem::forget(in_flight);
        // Relaxed: statistics.
        self.hotplug.stop_machines.fetch_add(1, Ordering::Relaxed);
        // Relaxed: ordered by the waits above (every participant released its csd).
        st.refused.load(Ordering::Relaxed).checked_sub(1)
    }

    /// One CPU's run through the state machine. `is_caller`: the CPU that called
    /// stop_machine, in its own (task) context; the others run this as a call handler.
    fn stop_participant(&self, st: &StopState<'_>, me: CpuId, is_caller: bool) {
        let pc = self.per_cpu(me);
        let active = st.active.test(me);
        let mut seen = StopStage::None as u32;
        // The caller takes part from task context: it masks now and serves its queue
        // explicitly, like the participants that run as call handlers, so that nothing it runs
        // escapes the Prepare accounting.
        let guard = is_caller.then(|| self.mask());
        let threshold = self.stall_threshold_ns.load(Ordering::Relaxed);
        let mut since = self.platform.now_ns();
        let mut report_after = threshold;
        // The simulator may switch CPUs inside the stage protocol (between reading and
        // updating the shared word, and before the last ack publishes the next stage).
        let point = || self.platform.preempt_point();
        loop {
            let stage = st.counts.stage();
            if stage != seen {
                seen = stage;
                let mask_now = (stage == StopStage::DisableIrqInactive as u32 && !active)
                    || (stage == StopStage::DisableIrqActive as u32 && active);
                if mask_now {
                    // Everyone already runs with interrupts masked (handler, or the caller's
                    // guard); "masking" here means: from now on this CPU serves no calls,
                    // which it stopped doing at the end of Prepare already. Record the order.
                    // Relaxed: the order itself comes from the RMW on one counter.
                    let order = self.stop_seq.fetch_add(1, Ordering::Relaxed) + 1;
                    pc.stop_mask_seq.store(order, Ordering::Relaxed);
                }
                if stage == StopStage::Prepare as u32
                    && active
                    && st.user_work
                    && !is_caller
                    && pc.is_restricted()
                {
                    {
                        // Relaxed: published by our Prepare ack (AcqRel) below; read in Run.
                        let _ = st.refused.compare_exchange(
                            0,
                            me + 1,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                }
                // Relaxed: written before every Prepare ack, read after the Run stage was
                // published (the ack/stage Release/Acquire chain orders it).
                if stage == StopStage::Run as u32
                    && active
                    && st.refused.load(Ordering::Relaxed) == 0
                {
                    (st.work)(me);
                }
                // Relaxed: an observation; the ack below orders what matters.
                pc.stop_stage.store(stage, Ordering::Relaxed);
                st.counts.ack(&point);
                if stage == StopStage::Exit as u32 {
                    break;
                }
                since = self.platform.now_ns();
                report_after = threshold;
            } else {
                if stage == StopStage::Prepare as u32 && st.counts.enter_serving(&point) {
                    // Prepare: keep serving calls (a CPU that has not arrived yet may be
                    // waiting for us); the stage does not advance while we do.
                    self.serve_own(me);
                    st.counts.leave_serving(&point);
                }
                if is_caller && threshold != 0 {
                    let waited = self.platform.now_ns().saturating_sub(since);
                    if since != 0 && waited > report_after {
                        self.report_stop_stall(st, stage, waited);
                        report_after = report_after.saturating_mul(2);
                    }
                }
                self.platform.relax();
            }
        }
        // Relaxed: an observation.
        pc.stop_stage
            .store(StopStage::None as u32, Ordering::Relaxed);
        drop(guard);
    }

    fn report_stop_stall(&self, st: &StopState<'_>, stage: u32, waited_ns: u64) {
        let lagging: CpuMask = st
            .participants
            .iter()
            .filter(|&c| self.per_cpu(c).stop_stage.load(Ordering::Relaxed) != stage)
            .collect();
        // Relaxed: statistics.
        self.hotplug.stalls_reported.fetch_add(1, Ordering::Relaxed);
        self.platform.report(format_args!(
            "smpcall: stop_machine stuck in stage {:?} for {} ms; CPUs that have not \
             acknowledged it: {}",
            StopStage::from_u32(stage),
            waited_ns / 1_000_000,
            lagging
        ));
    }

    /// The going-down work, run on `cpu` in the Run stage: serve every call queued while it
    /// was online, then leave the online mask. Returns `false` — and stays online — if user
    /// calls remain that this context may not run (a restricted handler: they stay deferred to
    /// the CPU's next safe point, and `cpu_down` is refused).
    fn die(&self, cpu: CpuId) -> bool {
        let pc = self.per_cpu(cpu);
        // Relaxed: our own flag.
        pc.dying.store(true, Ordering::Relaxed);
        // We run as a call handler: `serve_own` also runs what the outer flush already took.
        // Restricted, it runs the engine's work and defers user calls.
        loop {
            let ran = self.serve_own(cpu);
            // SeqCst (is_empty): nothing can be pushed any more (not accepting, and senders
            // push inside a region stop_machine excludes), so an empty queue stays empty.
            if ran == 0 && self.per_cpu(cpu).queue.is_empty() {
                break;
            }
        }
        // SAFETY (has_pending): on `cpu`, masked (we run as its call handler).
        let left =
            pc.deferred_len() > 0 || !pc.queue.is_empty() || unsafe { pc.queue.has_pending() };
        if !left {
            self.online.clear(cpu);
        }
        pc.dying.store(false, Ordering::Relaxed);
        !left
    }
}
