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
use core::sync::atomic::{AtomicU32, Ordering};

use crate::cpumask::{CpuId, CpuMask};
use crate::csd::shared_call;
use crate::engine::{AbortOnUnwind, Engine, Storage, Target};
use crate::error::Error;
use crate::platform::Platform;

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
}

#[derive(Debug)]
pub(crate) struct HotplugCounters {
    downs: AtomicU64,
    ups: AtomicU64,
    stop_machines: AtomicU64,
    stalls_reported: AtomicU64,
}

impl HotplugCounters {
    pub(crate) const fn new() -> Self {
        HotplugCounters {
            downs: AtomicU64::new(0),
            ups: AtomicU64::new(0),
            stop_machines: AtomicU64::new(0),
            stalls_reported: AtomicU64::new(0),
        }
    }
}

/// The state shared by the participants of one stop_machine (on the caller's stack).
struct StopState<'a> {
    stage: AtomicU32,
    /// `(participants that have not acknowledged the current stage) << 32 | (participants
    /// serving their queue right now)`. The stage advances when this reaches zero: in Prepare,
    /// not while anyone is still serving calls — a function run there may wait for another
    /// participant's queue service, which ends once that one masks (found by the simulator).
    acks: AtomicU64,
    participants: CpuMask,
    active: CpuMask,
    work: &'a (dyn Fn(CpuId) + Sync),
}

/// One acknowledgement in [`StopState::acks`].
const ACK_ONE: u64 = 1 << 32;
/// One participant serving its queue in [`StopState::acks`].
const SERVE_ONE: u64 = 1;

impl StopState<'_> {
    fn set_stage(&self, stage: u32) {
        // Relaxed: published by the Release store of `stage` below; nobody acks the new stage
        // before seeing it.
        self.acks
            .store((self.participants.weight() as u64) << 32, Ordering::Relaxed);
        // Release: the reset count, and (through the AcqRel ack chain) every participant's
        // actions in the previous stage, happen-before anyone acting on the new stage.
        self.stage.store(stage, Ordering::Release);
    }

    fn ack(&self) {
        self.drop_count(ACK_ONE);
    }

    /// Removes `amount` from `acks`; whoever brings it to zero advances the stage.
    fn drop_count(&self, amount: u64) {
        // AcqRel: the one reaching zero sees every other participant's stage actions (release
        // sequence on `acks`) before it publishes the next stage.
        if self.acks.fetch_sub(amount, Ordering::AcqRel) == amount {
            // Acquire: the stage cannot change before we advance it (the count is zero).
            let stage = self.stage.load(Ordering::Acquire);
            if stage < StopStage::Exit as u32 {
                self.set_stage(stage + 1);
            }
        }
    }

    /// Registers the caller as serving its queue in Prepare. Fails once Prepare is over (or
    /// about to be: every ack in and nobody serving).
    fn enter_serving(&self) -> bool {
        // Acquire: see the current stage's count.
        let mut w = self.acks.load(Ordering::Acquire);
        loop {
            if w == 0 {
                return false;
            }
            match self.acks.compare_exchange_weak(
                w,
                w + SERVE_ONE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => w = now,
            }
        }
        // Acquire: pairs with `set_stage`. If Prepare ended before our increment, it counted
        // against a later stage: take it back (that cannot complete the later stage, which
        // still waits for our own acknowledgement).
        if self.stage.load(Ordering::Acquire) != StopStage::Prepare as u32 {
            self.drop_count(SERVE_ONE);
            return false;
        }
        true
    }

    fn leave_serving(&self) {
        self.drop_count(SERVE_ONE);
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
    /// handler). If `cpu` is not the caller, `f` runs as a call handler on `cpu` (in the hosted
    /// backend: in signal context — see the signal-context rules).
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
        // SAFETY: stop_machine has returned: every participant is done with `once`.
        unsafe { (*once.ret.get()).take() }
            .ok_or(Error::InvalidConfig("stop_machine's function did not run"))
    }

    /// Runs `f` on every online CPU of `active` at once, while every other online CPU spins
    /// with interrupts masked. Returns the CPUs `f` ran on.
    pub fn stop_machine_many<F>(&self, active: &CpuMask, f: F) -> Result<CpuMask, Error>
    where
        F: Fn(CpuId) + Sync,
    {
        let me = self.enter()?;
        self.check_can_wait(me)?;
        self.lock_stop(me)?;
        let participants = self.online.load();
        let active = active.and(&participants);
        let result = if active.is_empty() {
            Err(Error::Offline(self.first_requested(active)))
        } else {
            self.stop_locked(me, &participants, &active, &f);
            Ok(active)
        };
        self.unlock_stop();
        result
    }

    /// Takes `cpu` offline (C10): new calls to it are refused with [`Error::Offline`]; calls
    /// queued to it while it was online run before it leaves (on it); many-calls skip it from
    /// then on. Refuses the last online CPU, the calling CPU itself, and a CPU that is inside an
    /// RCU read-side section (it would keep its references while grace periods skip it).
    pub fn cpu_down(&self, cpu: CpuId) -> Result<(), Error> {
        let me = self.enter()?;
        self.check_can_wait(me)?;
        let cpu = self.check_cpu(cpu)?;
        self.lock_stop(me)?;
        let result = self.cpu_down_locked(me, cpu);
        self.unlock_stop();
        result
    }

    fn cpu_down_locked(&self, me: CpuId, cpu: CpuId) -> Result<(), Error> {
        if !self.online.test(cpu) {
            return Err(Error::Offline(cpu));
        }
        if self.online.load().weight() == 1 {
            return Err(Error::Hotplug("cannot take down the last online CPU"));
        }
        if cpu == me {
            return Err(Error::Hotplug(
                "a CPU cannot take itself down; call cpu_down from another CPU",
            ));
        }
        // Going down: refuse new calls. Senders that already passed the check are inside their
        // masked push region; stop_machine below cannot start before they have pushed.
        self.accepting.clear(cpu);
        let participants = self.online.load();
        let reader = core::sync::atomic::AtomicBool::new(false);
        let dying = |c: CpuId| {
            if c == cpu {
                if self.rcu_reader_on(cpu) {
                    // The code we interrupted is inside an RCU read-side section: it would go
                    // on holding references on an offline CPU, which grace periods skip.
                    // Relaxed: read by the caller after stop_machine (stage Release/Acquire).
                    reader.store(true, Ordering::Relaxed);
                } else {
                    self.die(cpu);
                }
            }
        };
        self.stop_locked(me, &participants, &CpuMask::single(cpu), &dying);
        if reader.load(Ordering::Relaxed) {
            self.accepting.set(cpu);
            return Err(Error::Hotplug(
                "the CPU is inside an RCU read-side critical section; try again later",
            ));
        }
        // Relaxed: statistics.
        self.hotplug.downs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Brings `cpu` back online: calls to it work again. Idempotent.
    pub fn cpu_up(&self, cpu: CpuId) -> Result<(), Error> {
        let me = self.enter()?;
        self.check_can_wait(me)?;
        let cpu = self.check_cpu(cpu)?;
        if !self.possible.test(cpu) {
            return Err(Error::Hotplug(
                "that CPU was never brought up by the platform (mark_online)",
            ));
        }
        self.lock_stop(me)?;
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

    /// Hotplug and stop_machine counters.
    pub fn hotplug_stats(&self) -> HotplugStats {
        // Relaxed: statistics.
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HotplugStats {
            downs: r(&self.hotplug.downs),
            ups: r(&self.hotplug.ups),
            stop_machines: r(&self.hotplug.stop_machines),
            stalls_reported: r(&self.hotplug.stalls_reported),
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

    /// Sets the threshold after which a stuck stop_machine stage is reported through
    /// [`Platform::report`] (0 disables reports).
    pub fn set_stall_threshold_ns(&self, ns: u64) {
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
    pub(crate) fn lock_stop(&self, me: CpuId) -> Result<(), Error> {
        // Acquire: the previous holder's hotplug changes are visible to us.
        while self
            .stop_lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.serve_own(me);
            self.platform.relax();
        }
        if !self.online.test(me) {
            self.unlock_stop();
            return Err(Error::Offline(me));
        }
        Ok(())
    }

    pub(crate) fn unlock_stop(&self) {
        // Release: our hotplug changes happen-before the next holder's.
        self.stop_lock.store(false, Ordering::Release);
    }

    /// Runs the state machine on `participants` (the caller among them). Lock held.
    fn stop_locked(
        &self,
        me: CpuId,
        participants: &CpuMask,
        active: &CpuMask,
        work: &(dyn Fn(CpuId) + Sync),
    ) {
        let st = StopState {
            stage: AtomicU32::new(StopStage::None as u32),
            acks: AtomicU64::new(0),
            participants: *participants,
            active: *active,
            work,
        };
        st.set_stage(StopStage::Prepare as u32);
        let participate = |cpu: CpuId| self.stop_participant(&st, cpu, false);
        let in_flight = AbortOnUnwind;
        let mut ipis = CpuMask::new();
        // Masked from the first push to the IPI send: an interrupt nested in between could
        // wait for one of our targets before we signalled it (found by the simulator).
        let masked = self.irq_save();
        let mut others = *participants;
        others.clear(me);
        for t in &others {
            // Force: a CPU going down no longer accepts calls, but must take part.
            let queued = self.queue_call(
                me,
                t,
                &self.per_cpu(t).stop_csd,
                Target::Force,
                &mut ipis,
                |slot| {
                    let (run, payload) = shared_call(&participate);
                    // SAFETY: we hold the slot; `participate` outlives the waits below.
                    unsafe { slot.set_call(run, payload, true) };
                    self.note_call::<StopState<'_>>(slot, me, t);
                },
            );
            debug_assert_eq!(queued, Ok(true));
        }
        self.send_ipis(&ipis);
        drop(masked);
        self.stop_participant(&st, me, true);
        for t in &others {
            self.wait_csd(me, t, &self.per_cpu(t).stop_csd);
        }
        core::mem::forget(in_flight);
        // Relaxed: statistics.
        self.hotplug.stop_machines.fetch_add(1, Ordering::Relaxed);
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
        let guard = is_caller.then(|| self.irq_save());
        let threshold = self.stall_threshold_ns.load(Ordering::Relaxed);
        let mut since = self.platform.now_ns();
        let mut report_after = threshold;
        loop {
            // Acquire: pairs with `set_stage`'s Release.
            let stage = st.stage.load(Ordering::Acquire);
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
                if stage == StopStage::Run as u32 && active {
                    (st.work)(me);
                }
                // Relaxed: an observation; the ack below orders what matters.
                pc.stop_stage.store(stage, Ordering::Relaxed);
                st.ack();
                if stage == StopStage::Exit as u32 {
                    break;
                }
                since = self.platform.now_ns();
                report_after = threshold;
            } else {
                if stage == StopStage::Prepare as u32 && st.enter_serving() {
                    // Prepare: keep serving calls (a CPU that has not arrived yet may be
                    // waiting for us); the stage does not advance while we do.
                    self.serve_own(me);
                    st.leave_serving();
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
    /// was online, then leave the online mask.
    fn die(&self, cpu: CpuId) {
        let pc = self.per_cpu(cpu);
        // Relaxed: our own flag.
        pc.dying.store(true, Ordering::Relaxed);
        // We run as a call handler: `serve_own` also runs what the outer flush already took.
        while self.serve_own(cpu) > 0 || self.has_queued(cpu) {}
        self.online.clear(cpu);
        pc.dying.store(false, Ordering::Relaxed);
    }
}
