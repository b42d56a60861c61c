//! The engine: per-CPU state, the sending side (the call API), the receiving side (the IPI
//! handler's queue flush).
//!
//! The story, in the order of this file:
//!
//! 1. **Data.** Every CPU has a [`PerCpu`]: its [`CallQueue`], its polling flag, its handler
//!    depth and counters. Every *sender* has one [`Csd`] slot per target for no-wait calls and
//!    many-calls (`slots[sender * n + target]`): a sender has at most one such call in flight per
//!    target, and never allocates. Waiting single calls put their `Csd` on the caller's stack.
//! 2. **Sending.** Check (target, context), claim call data, fill it, push it; if the push found
//!    the queue empty and the target is not idle-polling, send an IPI (C6). A waiting caller
//!    spins until the target releases the call data, serving its *own* queue meanwhile (C7).
//! 3. **Receiving.** The platform's IPI handler calls [`Engine::handle_ipi`], which masks
//!    interrupts and flushes the queue (see [`crate::queue`]).

use crate::sync::AtomicU64;
use core::marker::PhantomData;
use core::pin::Pin;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::cpumask::{AtomicCpuMask, CpuId, CpuMask, MAX_CPUS};
use crate::csd::{run_inline, run_once, run_once_inline, run_shared, Csd, OnceCall, Payload};
use crate::error::{DeadlockReason, Error};
use crate::platform::Platform;
use crate::queue::{CallQueue, DeferredCalls};

/// Counters of one CPU, as returned by [`Engine::stats`]. "To" counters are counted by the
/// senders, "by" counters by the CPU itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CpuStats {
    /// IPIs sent to this CPU (its queue went from empty to non-empty and it was not polling).
    pub ipi_sent: u64,
    /// IPIs not sent to this CPU because it was idle-polling its queue.
    pub ipi_elided: u64,
    /// IPIs this CPU handled ([`Engine::handle_ipi`] calls).
    pub ipi_received: u64,
    /// Calls queued to this CPU.
    pub calls_queued: u64,
    /// Queued calls this CPU ran.
    pub calls_run: u64,
    /// Queue flushes this CPU performed (from IPIs, polling or waiting).
    pub flushes: u64,
    /// Calls this CPU found and ran while it was offline — an "IPI to an offline CPU". They
    /// are run, never dropped, and counted here; in normal use this stays 0.
    pub offline_runs: u64,
    /// Deferrable calls queued to this CPU while it was in a quiet region (no IPI sent).
    pub deferred_while_quiet: u64,
    /// Calls this CPU ran when it left a quiet region.
    pub run_at_quiet_exit: u64,
}

impl core::ops::Add for CpuStats {
    type Output = CpuStats;
    fn add(self, o: CpuStats) -> CpuStats {
        CpuStats {
            ipi_sent: self.ipi_sent + o.ipi_sent,
            ipi_elided: self.ipi_elided + o.ipi_elided,
            ipi_received: self.ipi_received + o.ipi_received,
            calls_queued: self.calls_queued + o.calls_queued,
            calls_run: self.calls_run + o.calls_run,
            flushes: self.flushes + o.flushes,
            offline_runs: self.offline_runs + o.offline_runs,
            deferred_while_quiet: self.deferred_while_quiet + o.deferred_while_quiet,
            run_at_quiet_exit: self.run_at_quiet_exit + o.run_at_quiet_exit,
        }
    }
}

/// One CPU's engine state. Opaque: create them through a [`Storage`].
///
/// Layout: the first cache line holds everything a *sender* touches on the fast path — the
/// queue head (CAS), the polling flag (read), and the two counters senders bump — so a call
/// moves that one line, not several; what only the owner writes lives in the lines after it.
#[repr(C, align(128))]
#[derive(Debug)]
pub struct PerCpu {
    // --- line 0: shared with senders ---
    pub(crate) queue: CallQueue,
    /// The CPU is idle and polling its queue: senders need not send an IPI.
    polling: AtomicBool,
    calls_queued: AtomicU64,
    ipi_elided: AtomicU64,
    // --- owner's lines ---
    ipi_sent: AtomicU64,
    /// How many queue flushes are running on this CPU (nested through waits). Non-zero means
    /// "in a call handler".
    handler_depth: AtomicU32,
    ipi_received: AtomicU64,
    calls_run: AtomicU64,
    flushes: AtomicU64,
    /// Calls this CPU ran while offline (an "IPI to an offline CPU"; should stay 0).
    offline_runs: AtomicU64,
    /// How many restricted IPI handlers ([`Engine::handle_ipi_engine_only`]) are running on
    /// this CPU: while non-zero, every flush here runs only the engine's own work and defers
    /// user calls. Only this CPU writes it.
    restricted: AtomicU32,
    /// User calls a restricted flush took and deferred to the next unrestricted one.
    deferred: DeferredCalls,
    /// Where this CPU, as a sender, starts looking for a free slot of a group (round robin:
    /// the slot after the last one it used is the likeliest free). Owner only.
    slot_cursor: AtomicU32,
    /// In a quiet region (`quiet.rs`): deferrable calls send no IPI. Written by this CPU only.
    pub(crate) quiet: AtomicBool,
    pub(crate) deferred_while_quiet: AtomicU64,
    pub(crate) run_at_quiet_exit: AtomicU64,
    /// Running its own going-down work (its final flush is not an offline delivery).
    pub(crate) dying: AtomicBool,
    /// The stop_machine stage this CPU last acknowledged (0 = not in stop_machine).
    pub(crate) stop_stage: AtomicU32,
    /// Order in which this CPU masked interrupts in the last stop_machine (global sequence).
    pub(crate) stop_mask_seq: AtomicU64,
    /// Lost-IPI diagnostics.
    pub(crate) diag: crate::diag::CpuDiag,
    /// Calls delivered by NMI (run in NMI context, whatever the interrupt mask).
    pub(crate) nmi_queue: CallQueue,
    /// Non-zero while this CPU runs an NMI handler.
    pub(crate) nmi_depth: AtomicU32,
    /// NMIs this CPU handled.
    pub(crate) nmis_received: AtomicU64,
    /// A stalled waiter asked this CPU (by NMI) to report what it is doing.
    pub(crate) nmi_report_requested: AtomicBool,
    /// Context tracking: idle (even) or watched (odd), NMI-safe (C12).
    pub(crate) ctx: crate::context::ContextTracker,
    /// RCU read-side state.
    pub(crate) rcu: crate::rcu::RcuCpu,
    /// The call data that brings this CPU into a stop_machine. Its own, not a sender's slot:
    /// a handler nested in the caller's Prepare stage may need that slot for a no-wait call,
    /// while the stop call holds it until Exit (found by the simulator). One suffices:
    /// stop_machines are serialised.
    pub(crate) stop_csd: Csd,
}

macro_rules! per_cpu_init {
    () => {
        PerCpu {
            queue: CallQueue::new(),
            polling: AtomicBool::new(false),
            handler_depth: AtomicU32::new(0),
            ipi_sent: AtomicU64::new(0),
            ipi_elided: AtomicU64::new(0),
            ipi_received: AtomicU64::new(0),
            calls_queued: AtomicU64::new(0),
            calls_run: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            offline_runs: AtomicU64::new(0),
            restricted: AtomicU32::new(0),
            deferred: DeferredCalls::new(),
            slot_cursor: AtomicU32::new(0),
            quiet: AtomicBool::new(false),
            deferred_while_quiet: AtomicU64::new(0),
            run_at_quiet_exit: AtomicU64::new(0),
            dying: AtomicBool::new(false),
            stop_stage: AtomicU32::new(0),
            stop_mask_seq: AtomicU64::new(0),
            diag: crate::diag::CpuDiag::new(),
            nmi_queue: CallQueue::new(),
            nmi_depth: AtomicU32::new(0),
            nmis_received: AtomicU64::new(0),
            nmi_report_requested: AtomicBool::new(false),
            ctx: crate::context::ContextTracker::new(),
            rcu: crate::rcu::RcuCpu::new(),
            stop_csd: Csd::new(),
        }
    };
}

impl PerCpu {
    /// Fresh state: empty queue, zero counters.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        per_cpu_init!()
    }

    /// Fresh state: empty queue, zero counters.
    #[cfg(loom)]
    pub fn new() -> Self {
        per_cpu_init!()
    }
}

impl PerCpu {
    /// Whether this CPU runs a restricted handler (owner's view).
    pub(crate) fn is_restricted(&self) -> bool {
        // Relaxed: only this CPU writes it, and only this CPU asks.
        self.restricted.load(Ordering::Relaxed) > 0
    }

    /// User calls deferred to this CPU's next unrestricted flush.
    pub(crate) fn deferred_len(&self) -> u32 {
        self.deferred.len()
    }
}

impl Default for PerCpu {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the engine keeps its per-CPU state and call-data slots.
///
/// # Safety
/// `cpus()`, `slots()` and `foreign_slots()` must always return the same memory, which must
/// neither move nor be freed while the storage value exists — even if the storage value itself
/// is moved (call data in flight points into it). `slots().len()` must be a non-zero multiple
/// of `cpus().len()²` (`k` slots per sender and target); `foreign_slots().len()` a multiple of
/// `cpus().len()`.
pub unsafe trait Storage: Sync {
    /// One [`PerCpu`] per CPU.
    fn cpus(&self) -> &[PerCpu];
    /// `k × cpus().len()²` call-data slots (`k ≥ 1`), indexed `(sender * n + target) * k + i`.
    /// No-wait calls from one sender to one target use the first free of their `k` slots, so
    /// `k` of them can be in flight at once.
    fn slots(&self) -> &[Csd];
    /// Call data for threads that are not CPUs ("foreign" senders): `rows × n` slots, indexed
    /// `row * n + target`. A foreign no-wait or many-call holds one row while it queues (at
    /// most 64 rows are used). Default: none — foreign threads can then make only waiting
    /// single calls and calls with caller-owned call data.
    fn foreign_slots(&self) -> &[Csd] {
        &[]
    }
}

/// Storage with no allocator at all, for a `static`: `N` CPUs, `N²` slots.
///
/// ```
/// use smpcall::StaticStorage;
/// static STORAGE: StaticStorage<4> = StaticStorage::new();
/// // Engine::new(my_platform, &STORAGE)
/// # let _ = &STORAGE;
/// ```
#[cfg(not(loom))]
#[derive(Debug)]
pub struct StaticStorage<const N: usize> {
    cpus: [PerCpu; N],
    slots: [[Csd; N]; N],
}

#[cfg(not(loom))]
impl<const N: usize> StaticStorage<N> {
    /// Storage for `N` CPUs (`const`, so it can be a `static`).
    pub const fn new() -> Self {
        StaticStorage {
            cpus: [const { PerCpu::new() }; N],
            slots: [const { [const { Csd::new() }; N] }; N],
        }
    }
}

#[cfg(not(loom))]
impl<const N: usize> Default for StaticStorage<N> {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: a `'static` reference never moves or frees its target; N² slots by construction.
#[cfg(not(loom))]
unsafe impl<const N: usize> Storage for &'static StaticStorage<N> {
    fn cpus(&self) -> &[PerCpu] {
        &self.cpus
    }
    fn slots(&self) -> &[Csd] {
        self.slots.as_flattened()
    }
}

/// Storage allocated once, when the engine is built (hosted use). Nothing is allocated after.
#[cfg(all(feature = "std", not(loom)))]
#[derive(Debug)]
pub struct HeapStorage {
    cpus: Box<[PerCpu]>,
    slots: Box<[Csd]>,
    foreign: Box<[Csd]>,
}

#[cfg(all(feature = "std", not(loom)))]
impl HeapStorage {
    /// Storage for `n` CPUs, with no call data for foreign threads.
    pub fn new(n: usize) -> Self {
        Self::with_foreign_rows(n, 0)
    }

    /// Storage for `n` CPUs and `rows` rows of call data for threads that are not CPUs
    /// (see [`Storage::foreign_slots`]): `rows` foreign threads can queue at the same time.
    pub fn with_foreign_rows(n: usize, rows: usize) -> Self {
        Self::with_layout(n, 1, rows)
    }

    /// Storage for `n` CPUs with `k` call-data slots per sender and target (`k` no-wait calls
    /// in flight from one CPU to another; 0 counts as 1) and `rows` foreign rows (at most 64:
    /// [`Engine::new`] refuses more). Memory: `k × n² × 64` bytes of slots.
    pub fn with_layout(n: usize, k: usize, rows: usize) -> Self {
        HeapStorage {
            cpus: (0..n).map(|_| PerCpu::new()).collect(),
            slots: (0..n * n * k.max(1)).map(|_| Csd::new()).collect(),
            foreign: (0..n * rows).map(|_| Csd::new()).collect(),
        }
    }
}

// SAFETY: boxed slices do not move when the `HeapStorage` moves and live as long as it does;
// `new` makes n² slots.
#[cfg(all(feature = "std", not(loom)))]
unsafe impl Storage for HeapStorage {
    fn cpus(&self) -> &[PerCpu] {
        &self.cpus
    }
    fn slots(&self) -> &[Csd] {
        &self.slots
    }
    fn foreign_slots(&self) -> &[Csd] {
        &self.foreign
    }
}

/// Interrupts masked on the current CPU until this guard is dropped (see [`Engine::irq_save`]).
///
/// Guards end in the reverse order they were made, in the context that made them: one made
/// outside a call handler and dropped inside one (kept in a thread-local, say) would unmask
/// the queue flush that runs the handler, under which the engine edits the CPU's private
/// lists. Such a drop panics instead (inside a handler: the process aborts, as for any panic
/// in a call's function).
#[must_use = "interrupts are unmasked again when the guard is dropped"]
pub struct IrqGuard<'a, P: Platform> {
    /// Restores the mask when dropped; not dropped (the CPU stays masked) if the check fails.
    mask: core::mem::ManuallyDrop<Masked<'a, P>>,
    /// On one of the engine's CPUs: that CPU's state, and its call-handler and NMI depths
    /// when the guard was made.
    made_at: Option<(&'a PerCpu, u32, u32)>,
}

impl<P: Platform> core::fmt::Debug for IrqGuard<'_, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IrqGuard").finish_non_exhaustive()
    }
}

impl<P: Platform> Drop for IrqGuard<'_, P> {
    fn drop(&mut self) {
        if let Some((pc, handlers, nmis)) = self.made_at {
            // Relaxed: this CPU's own counters (handlers and NMIs restore them on return).
            let now = pc.handler_depth.load(Ordering::Relaxed);
            let nmis_now = pc.nmi_depth.load(Ordering::Relaxed);
            if (now, nmis_now) != (handlers, nmis) {
                panic!(
                    "smpcall: an IrqGuard made at call-handler depth {handlers} (NMI depth \
                     {nmis}) was dropped at depth {now} (NMI depth {nmis_now}); restoring its \
                     state there would unmask a running queue flush or an NMI handler"
                );
            }
        }
        // SAFETY: dropped once, here. The check above made sure this guard ends in the handler
        // and NMI context that made it, so it cannot end a flush's (or an NMI handler's)
        // masked region. Within one context it may still end out of order — inside a region
        // the engine began later at the same depth — but the only such regions that run user
        // code (`run_local`: a call to the calling CPU itself) do not rely on their mask;
        // those that do (a slot claim, a flush's list edits) run none.
        unsafe { core::mem::ManuallyDrop::drop(&mut self.mask) };
    }
}

/// The engine's own masked regions ([`Engine::mask`]): unchecked, they end in order by
/// construction (no user code runs in them but call functions, which run in flushes with
/// masks of their own).
pub(crate) struct Masked<'a, P: Platform> {
    platform: &'a P,
    state: P::IrqState,
    /// Must be dropped on the CPU that made it.
    _not_send: PhantomData<*const ()>,
}

impl<P: Platform> Drop for Masked<'_, P> {
    fn drop(&mut self) {
        // SAFETY: the state our `irq_save` returned, restored when the region ends; the
        // engine's regions nest properly, and a user's `IrqGuard` is checked not to end one
        // begun after it.
        unsafe { self.platform.irq_restore(self.state) };
    }
}

/// What [`Engine::queue_call`] does with a target that is not accepting calls, or busy call
/// data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// Offline target: `Error::Offline`. Busy call data: wait.
    Refuse,
    /// Offline target: `Error::Offline`. Busy call data: `Error::Busy`.
    RefuseBusy,
    /// Offline target: skip it (many-calls prune offline CPUs).
    Prune,
    /// No online checks (stop_machine reaching a CPU that is going down). Busy: wait.
    Force,
}

impl Target {
    /// Whether the call data handed to `queue_call` with this policy can only be claimed by
    /// the calling CPU: `Refuse` and `Prune` are used with this CPU's own slots (one sender per
    /// slot group) or call data on its stack. `queue_call` claims them masked, and no call
    /// starts in NMI context (`enter`), so no other claimer can interleave: a plain check
    /// suffices where shared call data (`RefuseBusy`: the caller's; `Force`: the target's
    /// stop call data) needs a compare-and-swap.
    fn exclusive(self) -> bool {
        matches!(self, Target::Refuse | Target::Prune)
    }
}

/// The targets a queueing operation found needing an IPI, sent once its pushes are done (and
/// before it waits for anything). A many-call collects a [`CpuMask`]; a call to one CPU a
/// [`OneIpi`], which spares it the work of a `MAX_CPUS`-bit mask.
pub(crate) trait Ipis {
    /// `cpu` needs an IPI.
    fn add(&mut self, cpu: CpuId);
    /// Sends the IPIs collected so far, and forgets them.
    fn send<P: Platform>(&mut self, platform: &P);
}

impl Ipis for CpuMask {
    fn add(&mut self, cpu: CpuId) {
        self.set(cpu);
    }

    fn send<P: Platform>(&mut self, platform: &P) {
        if !self.is_empty() {
            platform.send_ipi_mask(self);
            *self = CpuMask::new();
        }
    }
}

/// [`Ipis`] of a call to a single CPU.
#[derive(Default)]
pub(crate) struct OneIpi(Option<CpuId>);

impl Ipis for OneIpi {
    fn add(&mut self, cpu: CpuId) {
        self.0 = Some(cpu);
    }

    fn send<P: Platform>(&mut self, platform: &P) {
        if let Some(cpu) = self.0.take() {
            platform.send_ipi(cpu);
        }
    }
}

/// Aborts the process (panic while panicking) if a panic unwinds through a region where call
/// data is in flight: unwinding would free or abandon call data another CPU may still use.
pub(crate) struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        // Reached either while unwinding (a panic in a call's function) or, by a bug, on a
        // normal return. Either way the process must not go on: panic, and panic again from a
        // drop during that unwinding, which always aborts (no_std has no `abort`).
        struct Again;
        impl Drop for Again {
            fn drop(&mut self) {
                panic!("smpcall: aborting: call data was in flight");
            }
        }
        let _again = Again;
        panic!(
            "smpcall: panic while a cross-CPU call was in flight; aborting to protect call data"
        );
    }
}

/// Runs a call's function on the calling CPU itself. A panic in it aborts the process, as it
/// does for a function run on another CPU: the behaviour of a call does not depend on where
/// it lands.
#[inline]
fn run_local<R>(f: impl FnOnce() -> R) -> R {
    let guard = AbortOnUnwind;
    let r = f();
    core::mem::forget(guard);
    r
}

/// The cross-CPU call engine.
///
/// Calls are made from one of the engine's CPUs (the platform's
/// [`current_cpu`](Platform::current_cpu)) or from a thread that is not one (a *foreign*
/// thread: see `foreign.rs` for where its call data lives — waiting single calls use its stack,
/// no-wait and many-calls a foreign row of the [`Storage`]). Foreign threads cannot be RCU
/// readers or wait for grace periods ([`Error::NotOnCpu`]).
///
/// | call | waits | closure |
/// |---|---|---|
/// | [`call_single`](Engine::call_single) | yes, returns `f`'s result | `FnOnce(CpuId) -> R + Send`, may borrow |
/// | [`call_single_async`](Engine::call_single_async) | no | `FnOnce(CpuId) + Send + 'static`, ≤ [`INLINE_CLOSURE_BYTES`](crate::INLINE_CLOSURE_BYTES) |
/// | [`call_async_csd`](Engine::call_async_csd) | no, caller-owned call data | as above |
/// | [`call_many`](Engine::call_many), [`call_all`](Engine::call_all), [`call_others`](Engine::call_others), [`call_cond`](Engine::call_cond) | yes | `Fn(CpuId) + Sync`, may borrow |
/// | `*_async` variants of those | no | `Fn(CpuId) + Clone + Send + 'static`, ≤ [`INLINE_CLOSURE_BYTES`](crate::INLINE_CLOSURE_BYTES) |
///
/// Closures receive the id of the CPU they run on. A call to the calling CPU itself runs
/// right away, locally, with interrupts masked.
pub struct Engine<P: Platform, S: Storage> {
    pub(crate) platform: P,
    storage: S,
    nr_cpus: usize,
    /// CPUs that take part in the machine (serve IPIs, join stop_machine).
    pub(crate) online: AtomicCpuMask,
    /// Online CPUs that accept new calls: `online` minus a CPU that is going down.
    pub(crate) accepting: AtomicCpuMask,
    /// CPUs the platform ever brought up (`mark_online`): the only ones `cpu_up` accepts.
    pub(crate) possible: AtomicCpuMask,
    shutdown_flag: AtomicBool,
    /// Serialises stop_machine and hotplug.
    pub(crate) stop_lock: AtomicBool,
    /// Global sequence for the order in which CPUs mask in stop_machine.
    pub(crate) stop_seq: AtomicU64,
    /// A wait longer than this is reported (0: never).
    pub(crate) stall_threshold_ns: AtomicU64,
    pub(crate) hotplug: crate::stop::HotplugCounters,
    pub(crate) diag: crate::diag::DiagCounters,
    pub(crate) rcu: crate::rcu::RcuState,
    /// Rows of foreign call data (`storage.foreign_slots().len() / nr_cpus`, at most 64).
    pub(crate) foreign_rows: usize,
    /// Call-data slots per sender and target (`storage.slots().len() / nr_cpus²`).
    slots_per_target: usize,
    /// Bit `r` set: foreign row `r` is in use by a foreign sender.
    pub(crate) foreign_rows_busy: AtomicU64,
    /// Foreign senders between their "target accepting?" check and their push; `cpu_down`
    /// waits for it to drain after it stopped accepting (see `foreign.rs`).
    pub(crate) foreign_pushers: AtomicU32,
}

impl<P: Platform, S: Storage> core::fmt::Debug for Engine<P, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Engine")
            .field("nr_cpus", &self.nr_cpus)
            .field("online", &self.online)
            .field("shutdown", &self.is_shutdown())
            .finish_non_exhaustive()
    }
}

impl<P: Platform, S: Storage> Engine<P, S> {
    /// An engine over `storage` (which fixes the CPU count). No CPU is online yet: the platform
    /// marks each one with [`mark_online`](Engine::mark_online) once it can take IPIs.
    pub fn new(platform: P, storage: S) -> Result<Self, Error> {
        let n = storage.cpus().len();
        if n == 0 {
            return Err(Error::CpuCount {
                requested: 0,
                max: MAX_CPUS,
            });
        }
        if n > MAX_CPUS {
            return Err(Error::CpuCount {
                requested: n,
                max: MAX_CPUS,
            });
        }
        let slots = storage.slots().len();
        if slots == 0 || slots % (n * n) != 0 {
            return Err(Error::InvalidConfig(
                crate::error::ConfigError::CallDataSlots { slots, cpus: n },
            ));
        }
        let storage_foreign_len = storage.foreign_slots().len();
        if storage_foreign_len % n != 0 {
            return Err(Error::InvalidConfig(
                crate::error::ConfigError::ForeignSlots {
                    slots: storage_foreign_len,
                    cpus: n,
                },
            ));
        }
        let foreign_rows = storage_foreign_len / n;
        if foreign_rows > crate::foreign::MAX_FOREIGN_ROWS {
            return Err(Error::InvalidConfig(
                crate::error::ConfigError::ForeignRows {
                    rows: foreign_rows,
                    max: crate::foreign::MAX_FOREIGN_ROWS,
                },
            ));
        }
        Ok(Engine {
            platform,
            storage,
            nr_cpus: n,
            online: AtomicCpuMask::new(),
            accepting: AtomicCpuMask::new(),
            possible: AtomicCpuMask::new(),
            shutdown_flag: AtomicBool::new(false),
            stop_lock: AtomicBool::new(false),
            stop_seq: AtomicU64::new(0),
            stall_threshold_ns: AtomicU64::new(crate::stop::DEFAULT_STALL_NS),
            hotplug: crate::stop::HotplugCounters::new(),
            diag: crate::diag::DiagCounters::new(),
            rcu: crate::rcu::RcuState::new(),
            foreign_rows,
            slots_per_target: slots / (n * n),
            foreign_rows_busy: AtomicU64::new(0),
            foreign_pushers: AtomicU32::new(0),
        })
    }

    /// The platform.
    ///
    /// Its [`Platform`] methods are safe to call from outside the engine. What that can do:
    ///
    /// * The queries (`current_cpu`, `irqs_masked`, `cpu_irqs_masked`, `now_ns`, `has_nmi`,
    ///   `stall_check_interval`) and `relax`, `preempt_point` and `report` change nothing the
    ///   engine relies on.
    /// * `send_ipi`, `send_ipi_mask` and `send_nmi` make spurious interrupts. The engine's
    ///   handlers take them as any other: a CPU serves its queue (or its NMI queue) sooner, or
    ///   finds it empty. No call runs twice, is lost, or runs elsewhere.
    /// * `irq_save` without its `irq_restore` leaves the current CPU masked: its waiting calls
    ///   are refused, and calls to it wait until it unmasks or serves its queue explicitly — a
    ///   hang, with stall reports, at worst.
    /// * `irq_restore` is `unsafe`: restoring a state other than the one the matching, still
    ///   open `irq_save` returned could unmask the engine's queue flush in the middle of an
    ///   edit of the CPU's lists. Safe code masks with [`Engine::irq_save`], whose guard
    ///   refuses (panics) to end a region begun in another handler context.
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// Number of CPUs (online or not).
    pub fn nr_cpus(&self) -> usize {
        self.nr_cpus
    }

    /// The CPU running this code, if it is one of ours.
    pub fn current_cpu(&self) -> Option<CpuId> {
        self.platform.current_cpu()
    }

    /// Snapshot of the online CPUs (a CPU going down stays online until it has left).
    pub fn online_mask(&self) -> CpuMask {
        self.online.load()
    }

    /// Whether `cpu` is online.
    pub fn is_online(&self, cpu: CpuId) -> bool {
        self.online.test(cpu)
    }

    /// Marks `cpu` online: it takes IPIs now. For platform bring-up.
    ///
    /// # Safety
    /// Platform interface: `cpu` must be running (or about to run, before anyone can observe
    /// the mark) code that serves its IPIs as [`Platform`]'s delivery contract says — else
    /// waiting calls to it would wait forever.
    pub unsafe fn mark_online(&self, cpu: CpuId) -> Result<(), Error> {
        if cpu >= self.nr_cpus {
            return Err(Error::UnknownCpu(cpu));
        }
        self.possible.set(cpu);
        self.online.set(cpu);
        self.accepting.set(cpu);
        Ok(())
    }

    /// Whether `cpu` accepts new calls (online and not going down).
    pub fn is_accepting(&self, cpu: CpuId) -> bool {
        self.accepting.test(cpu)
    }

    /// Refuses every new call from now on ([`Error::ShutDown`]). Calls already accepted still
    /// complete. Irreversible.
    ///
    /// # Safety
    /// Platform interface: only the owner of the machine (the backend) may stop it; code that
    /// relies on the engine accepting calls (its own shutdown protocol) belongs to it. Not a
    /// memory-safety hazard in itself, but it breaks the backend's promises to other users.
    pub unsafe fn shutdown(&self) {
        self.shutdown_flag.store(true, Ordering::SeqCst);
    }

    /// Whether [`shutdown`](Engine::shutdown) was called.
    pub fn is_shutdown(&self) -> bool {
        self.shutdown_flag.load(Ordering::SeqCst)
    }

    /// Counters of `cpu`; `None` if this engine has no such CPU.
    pub fn stats(&self, cpu: CpuId) -> Option<CpuStats> {
        self.storage.cpus().get(cpu).map(|_| self.stats_of(cpu))
    }

    /// Counters of `cpu`, which must exist.
    pub(crate) fn stats_of(&self, cpu: CpuId) -> CpuStats {
        let pc = self.per_cpu(cpu);
        // Relaxed: statistics, read without ordering requirements.
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CpuStats {
            ipi_sent: r(&pc.ipi_sent),
            ipi_elided: r(&pc.ipi_elided),
            ipi_received: r(&pc.ipi_received),
            calls_queued: r(&pc.calls_queued),
            calls_run: r(&pc.calls_run),
            flushes: r(&pc.flushes),
            offline_runs: r(&pc.offline_runs),
            deferred_while_quiet: r(&pc.deferred_while_quiet),
            run_at_quiet_exit: r(&pc.run_at_quiet_exit),
        }
    }

    /// Counters summed over all CPUs.
    pub fn total_stats(&self) -> CpuStats {
        (0..self.nr_cpus).fold(CpuStats::default(), |acc, c| acc + self.stats_of(c))
    }

    /// Whether `cpu` is idle-polling its queue (IPIs to it are elided).
    pub fn is_polling(&self, cpu: CpuId) -> bool {
        self.storage
            .cpus()
            .get(cpu)
            .is_some_and(|pc| pc.polling.load(Ordering::Relaxed))
    }

    /// Whether `cpu` has calls queued and not yet taken.
    pub fn has_queued(&self, cpu: CpuId) -> bool {
        self.storage
            .cpus()
            .get(cpu)
            .is_some_and(|pc| !pc.queue.is_empty() || pc.deferred.len() > 0)
    }

    /// How many user calls `cpu` took in a context that may not run user code and keeps for
    /// its next safe point (see [`handle_ipi_engine_only`](Engine::handle_ipi_engine_only)).
    pub fn deferred_calls(&self, cpu: CpuId) -> u32 {
        self.storage
            .cpus()
            .get(cpu)
            .map_or(0, |pc| pc.deferred.len())
    }

    /// Whether no call is queued, taken-but-not-run, or running on any CPU, judged by two
    /// scans with no call queued in between. Useful to drain before shutdown or a check.
    pub fn is_quiescent(&self) -> bool {
        // Relaxed: a monotonic event count; any queueing during the scan changes it.
        let queued = || -> u64 {
            self.storage
                .cpus()
                .iter()
                .map(|pc| pc.calls_queued.load(Ordering::Relaxed))
                .sum()
        };
        let before = queued();
        let quiet = self.storage.cpus().iter().all(|pc| {
            // Relaxed: a snapshot; the queued-count check catches activity in between.
            pc.queue.is_empty()
                && pc.deferred.len() == 0
                && pc.handler_depth.load(Ordering::Relaxed) == 0
        });
        quiet && queued() == before
    }

    /// Masks interrupts on the current CPU until the guard drops.
    ///
    /// The guard must be dropped where it was made: dropping one made outside a call handler
    /// inside one (or the reverse) panics rather than unmask the handler's queue flush.
    pub fn irq_save(&self) -> IrqGuard<'_, P> {
        IrqGuard {
            mask: core::mem::ManuallyDrop::new(self.mask()),
            made_at: self.current_cpu().map(|me| {
                let pc = self.per_cpu(me);
                // Relaxed: this CPU's own counters.
                let handlers = pc.handler_depth.load(Ordering::Relaxed);
                (pc, handlers, pc.nmi_depth.load(Ordering::Relaxed))
            }),
        }
    }

    /// The engine's own masked regions (unchecked: they end in order by construction).
    pub(crate) fn mask(&self) -> Masked<'_, P> {
        Masked {
            platform: &self.platform,
            state: self.platform.irq_save(),
            _not_send: PhantomData,
        }
    }

    /// Whether interrupts are masked on the current CPU.
    pub fn irqs_masked(&self) -> bool {
        self.platform.irqs_masked()
    }

    /// Whether the current CPU is running a cross-CPU call handler.
    pub fn in_handler(&self) -> bool {
        self.current_cpu()
            .is_some_and(|me| self.per_cpu(me).handler_depth.load(Ordering::Relaxed) > 0)
    }

    // ---------------------------------------------------------------------------------------
    // Sending side.
    // ---------------------------------------------------------------------------------------

    /// Runs `f` on `cpu` and waits for it to return there; returns its result (C1).
    ///
    /// Refused with [`Error::WouldDeadlock`] when interrupts are masked or inside a call
    /// handler (C7). While waiting, this CPU keeps serving calls made to it.
    ///
    /// ```
    /// # use smpcall::hosted::Machine;
    /// # let m = Machine::builder().cpus(2).build()?;
    /// let value = 7;
    /// let doubled = m.run_on(0, move |e| e.call_single(1, |_cpu| value * 2)).join()??;
    /// assert_eq!(doubled, 14);
    /// # m.shutdown()?; Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn call_single<F, R>(&self, cpu: CpuId, f: F) -> Result<R, Error>
    where
        F: FnOnce(CpuId) -> R + Send,
        R: Send,
    {
        // A thread that is not one of our CPUs calls through `foreign.rs`.
        let Some(me) = self.enter_any()? else {
            self.check_target(cpu)?;
            return self.call_single_foreign(cpu, f);
        };
        self.check_target(cpu)?;
        self.check_can_wait(me)?;
        if cpu == me {
            let _masked = self.mask();
            return Ok(run_local(|| f(me)));
        }
        let csd = Csd::new();
        let mut ipis = OneIpi::default();
        // Masked from the first push to the IPI send: an interrupt nested in between could
        // wait for one of our targets before we signalled it (found by the simulator).
        let masked = self.mask();
        if const { Payload::fits::<OnceCall<F, R>>() } {
            // Small closure and result: keep them in the call data itself, so the result comes
            // back in the cache line the caller spins on.
            let mut f = Some(f);
            let fill = |csd: &Csd| {
                let call: OnceCall<F, R> = OnceCall {
                    f: f.take(),
                    ret: None,
                };
                // SAFETY: `fits` holds (checked above); the payload matches
                // `run_once_inline::<F, R>`.
                let payload = unsafe { Payload::inline_unchecked(call) };
                // SAFETY: `queue_call` hands us the csd claimed.
                unsafe { csd.set_call(run_once_inline::<F, R>, payload, true) };
                self.note_call::<F>(csd, me, cpu);
            };
            let one = core::slice::from_ref(&csd);
            // SAFETY: `csd` is on this frame, which waits below until it is released
            // (unwinding aborts); nobody else can claim it.
            unsafe { self.queue_call(&masked, me, cpu, one, Target::Refuse, &mut ipis, fill) }?;
            // From here the fresh csd is in flight: it lives on this frame until `wait_csd` saw
            // it released (unwinding out of here aborts).
            let in_flight = AbortOnUnwind;
            ipis.send(&self.platform);
            drop(masked);
            self.wait_csd(me, cpu, &csd);
            core::mem::forget(in_flight);
            // SAFETY: released (waited above), ours again, and it holds the `OnceCall` we wrote.
            let mut call: OnceCall<F, R> = unsafe { csd.take_inline() };
            // `ret` is set: a synchronous csd is released only after its function returned
            // (a panicking function aborts the process instead).
            return Ok(call
                .ret
                .take()
                .expect("smpcall: waiting call released before it ran"));
        }
        let mut call = OnceCall {
            f: Some(f),
            ret: None,
        };
        let payload = Payload::from_ptr(&mut call as *mut OnceCall<F, R>);
        let fill = |csd: &Csd| {
            // SAFETY: `queue_call` hands us the csd claimed; `call` outlives the wait below and
            // nothing else touches it until the target released the csd.
            unsafe { csd.set_call(run_once::<F, R>, payload, true) };
            self.note_call::<F>(csd, me, cpu);
        };
        let one = core::slice::from_ref(&csd);
        // SAFETY: `csd` is on this frame, which waits below until it is released (unwinding
        // aborts); nobody else can claim it.
        unsafe { self.queue_call(&masked, me, cpu, one, Target::Refuse, &mut ipis, fill) }?;
        // In flight: `csd` and `call` live on this frame until `wait_csd` saw the csd released
        // (unwinding out of here aborts).
        let in_flight = AbortOnUnwind;
        ipis.send(&self.platform);
        drop(masked);
        self.wait_csd(me, cpu, &csd);
        core::mem::forget(in_flight);
        Ok(call
            .ret
            .take()
            .expect("smpcall: waiting call released before it ran"))
    }

    /// Queues `f` to run on `cpu` and returns without waiting for it (C1, C3).
    ///
    /// Uses one of this CPU's call-data slots for `cpu` (the storage's `k` per sender and
    /// target; all but the first when `k > 1`, which stays for waiting many-calls); if every one
    /// still holds a call `cpu` has not *taken* yet, this waits for that (not for any function
    /// to run or finish), serving this CPU's own queue meanwhile. Allowed with interrupts
    /// masked and from handlers.
    ///
    /// The closure travels inside the call data: it may capture at most 32 bytes (on 64-bit
    /// targets). A larger one is refused when the program is built — by `cargo build`, not
    /// `cargo check` (a post-monomorphisation error, E0080, naming the limit and the closure's
    /// size); capture an `Arc` or a `&'static` instead:
    ///
    /// ```compile_fail,E0080
    /// # use smpcall::hosted::Machine;
    /// # let m = Machine::builder().cpus(2).build().unwrap();
    /// let big = [0u8; 64];
    /// m.run_on(0, move |e| e.call_single_async(1, move |_| drop(big)))
    ///     .join()
    ///     .unwrap()
    ///     .unwrap();
    /// ```
    pub fn call_single_async<F>(&self, cpu: CpuId, f: F) -> Result<(), Error>
    where
        F: FnOnce(CpuId) + Send + 'static,
    {
        self.call_single_async_with(cpu, f, false)
    }

    /// [`call_single_async`](Engine::call_single_async), optionally deferrable (`quiet.rs`).
    pub(crate) fn call_single_async_with<F>(
        &self,
        cpu: CpuId,
        f: F,
        deferrable: bool,
    ) -> Result<(), Error>
    where
        F: FnOnce(CpuId) + Send + 'static,
    {
        // A thread that is not one of our CPUs calls through `foreign.rs`.
        let Some(me) = self.enter_any()? else {
            self.check_target(cpu)?;
            return self.call_single_async_foreign_with(cpu, f, deferrable);
        };
        // Only the range here: `queue_call` checks, masked, that the target accepts calls.
        if cpu >= self.nr_cpus {
            return Err(Error::UnknownCpu(cpu));
        }
        if cpu == me {
            self.check_target(cpu)?;
            let _masked = self.mask();
            run_local(|| f(me));
            return Ok(());
        }
        // `f` outlives the masked region: if it is not queued, its `Drop` (user code) runs
        // after it.
        let mut f = Some(f);
        self.queue_no_wait(me, cpu, &mut f, Target::Refuse, deferrable)
            .map(|_| ())
    }

    /// Queues `f` to run on `cpu` using call data the caller owns (C4), and returns at once.
    ///
    /// If `csd` is still in flight from an earlier call, returns [`Error::Busy`] and does
    /// nothing. The call data is free again once `cpu` has taken the call (before `f` runs).
    ///
    /// ```
    /// # use smpcall::hosted::Machine;
    /// use std::sync::Arc;
    /// use smpcall::Csd;
    /// # let m = Machine::builder().cpus(2).build()?;
    /// let csd = Arc::pin(Csd::new());
    /// m.run_on(0, move |e| e.call_async_csd(csd.as_ref(), 1, |_cpu| { /* ... */ }))
    ///     .join()??;
    /// # m.shutdown()?; Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn call_async_csd<F>(&self, csd: Pin<&Csd>, cpu: CpuId, f: F) -> Result<(), Error>
    where
        F: FnOnce(CpuId) + Send + 'static,
    {
        let csd = csd.get_ref();
        // A thread that is not one of our CPUs calls through `foreign.rs`.
        let Some(me) = self.enter_any()? else {
            self.check_target(cpu)?;
            return self.call_async_csd_foreign(csd, cpu, f);
        };
        // Only the range here: `queue_call` checks, masked, that the target accepts calls.
        if cpu >= self.nr_cpus {
            return Err(Error::UnknownCpu(cpu));
        }
        if cpu == me {
            self.check_target(cpu)?;
            // Run locally. "Busy" semantics stay uniform: a busy csd is refused here too.
            if !csd.try_lock() {
                return Err(Error::Busy);
            }
            // SAFETY: we hold it; nothing was written.
            unsafe { Csd::take_async_and_release(csd) };
            let _masked = self.mask();
            run_local(|| f(me));
            return Ok(());
        }
        let mut f = Some(f);
        let mut ipis = OneIpi::default();
        // Masked from the first push to the IPI send: an interrupt nested in between could
        // wait for one of our targets before we signalled it (found by the simulator).
        let masked = self.mask();
        let fill = |csd: &Csd| {
            let f = f.take().expect("filled once");
            // SAFETY: claimed by `queue_call`, not yet pushed.
            unsafe { self.fill_no_wait(csd, f, me, cpu, false) };
        };
        let one = core::slice::from_ref(csd);
        // SAFETY: pinned, and its `Drop` waits while it is busy, so it outlives the call;
        // `RefuseBusy` claims it with a compare-and-swap (others may share it).
        let result =
            unsafe { self.queue_call(&masked, me, cpu, one, Target::RefuseBusy, &mut ipis, fill) };
        ipis.send(&self.platform);
        drop(masked);
        result.map(|_| ())
    }

    /// Runs `f` on every online CPU in `mask` (the caller too, locally, if it is in `mask`) and
    /// waits until all have returned (C2). Offline and unknown CPUs are skipped. Returns the
    /// CPUs `f` ran on.
    pub fn call_many<F>(&self, mask: &CpuMask, f: F) -> Result<CpuMask, Error>
    where
        F: Fn(CpuId) + Sync,
    {
        self.call_many_inner(mask, f, false)
    }

    /// [`call_many`](Engine::call_many) for the engine's own work; with `any_context` the
    /// function may run in restricted handlers too, so it must be async-signal-safe.
    pub(crate) fn call_many_inner<F>(
        &self,
        mask: &CpuMask,
        f: F,
        any_context: bool,
    ) -> Result<CpuMask, Error>
    where
        F: Fn(CpuId) + Sync,
    {
        // A thread that is not one of our CPUs calls through `foreign.rs`.
        let Some(me) = self.enter_any()? else {
            self.check_mask(mask)?;
            return self.call_many_foreign(mask, f);
        };
        self.check_mask(mask)?;
        self.check_can_wait(me)?;
        let mut others = mask.and(&self.accepting.load());
        others.clear(me);

        let in_flight = AbortOnUnwind;
        let (mut queued, refused) = self.queue_on_slots(me, &others, |slot, t| {
            // SAFETY: we hold the slot; `f` outlives the waits below; `any_context` only for
            // the engine's own async-signal-safe functions.
            unsafe {
                slot.set_call(run_shared::<F>, Payload::from_ptr(&f), true);
                if any_context {
                    slot.set_any_context();
                }
            }
            self.note_call::<F>(slot, me, t);
        });
        // On a refusal (this CPU went offline under us) still wait for what is already in
        // flight: it borrows `f`.
        if refused.is_none() && mask.test(me) {
            let _masked = self.mask();
            run_local(|| f(me));
        }
        for t in &queued {
            self.wait_csd(me, t, self.slot(me, t));
        }
        core::mem::forget(in_flight);
        match refused {
            // Refused before anything was queued: the call did not happen.
            Some(e) if queued.is_empty() => Err(e),
            // Partly delivered before this CPU went offline: say where it ran.
            Some(_) => Ok(queued),
            None => {
                if mask.test(me) {
                    queued.set(me);
                }
                Ok(queued)
            }
        }
    }

    /// Queues `f` on every online CPU in `mask` (running it locally, masked, if the caller is in
    /// `mask`) without waiting (C2, C3). Each target gets its own clone of `f`. Returns the CPUs
    /// it was queued to or ran on.
    pub fn call_many_async<F>(&self, mask: &CpuMask, f: F) -> Result<CpuMask, Error>
    where
        F: Fn(CpuId) + Clone + Send + 'static,
    {
        // A thread that is not one of our CPUs calls through `foreign.rs`.
        let Some(me) = self.enter_any()? else {
            self.check_mask(mask)?;
            return self.call_many_async_foreign(mask, f);
        };
        self.check_mask(mask)?;
        let mut others = mask.and(&self.accepting.load());
        others.clear(me);

        // One target at a time, each masked from its push to its IPI: the clone of `f` (user
        // code: it may make calls of its own, or unmask) and the drop of a clone that was not
        // queued run outside the masked region, where the engine holds no slot.
        let mut queued = CpuMask::new();
        let mut refused = None;
        for t in &others {
            let mut g = Some(f.clone());
            let result = self.queue_no_wait(me, t, &mut g, Target::Prune, false);
            drop(g);
            match result {
                Ok(true) => queued.set(t),
                Ok(false) => {}
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        match refused {
            Some(e) if queued.is_empty() => Err(e),
            // Partly delivered before this CPU went offline: say where it went.
            Some(_) => Ok(queued),
            None => {
                if mask.test(me) {
                    let _masked = self.mask();
                    run_local(|| f(me));
                    queued.set(me);
                }
                Ok(queued)
            }
        }
    }

    /// [`call_many`](Engine::call_many) on every online CPU, the caller included.
    pub fn call_all<F: Fn(CpuId) + Sync>(&self, f: F) -> Result<CpuMask, Error> {
        self.call_many(&CpuMask::first_n(self.nr_cpus), f)
    }

    /// [`call_many_async`](Engine::call_many_async) on every online CPU, the caller included.
    pub fn call_all_async<F>(&self, f: F) -> Result<CpuMask, Error>
    where
        F: Fn(CpuId) + Clone + Send + 'static,
    {
        self.call_many_async(&CpuMask::first_n(self.nr_cpus), f)
    }

    /// [`call_many`](Engine::call_many) on every online CPU except the caller.
    pub fn call_others<F: Fn(CpuId) + Sync>(&self, f: F) -> Result<CpuMask, Error> {
        self.call_many(&self.all_but_me()?, f)
    }

    /// [`call_many_async`](Engine::call_many_async) on every online CPU except the caller.
    pub fn call_others_async<F>(&self, f: F) -> Result<CpuMask, Error>
    where
        F: Fn(CpuId) + Clone + Send + 'static,
    {
        self.call_many_async(&self.all_but_me()?, f)
    }

    /// [`call_many`](Engine::call_many) restricted to the CPUs of `mask` for which `cond(cpu)`
    /// holds (evaluated on the caller, once per online CPU of `mask`).
    pub fn call_cond<C, F>(&self, mask: &CpuMask, cond: C, f: F) -> Result<CpuMask, Error>
    where
        C: Fn(CpuId) -> bool,
        F: Fn(CpuId) + Sync,
    {
        self.call_many(&self.filter(mask, cond), f)
    }

    /// [`call_many_async`](Engine::call_many_async) restricted to the CPUs of `mask` for which
    /// `cond(cpu)` holds.
    pub fn call_cond_async<C, F>(&self, mask: &CpuMask, cond: C, f: F) -> Result<CpuMask, Error>
    where
        C: Fn(CpuId) -> bool,
        F: Fn(CpuId) + Clone + Send + 'static,
    {
        self.call_many_async(&self.filter(mask, cond), f)
    }

    // ---------------------------------------------------------------------------------------
    // Receiving side: entry points for the platform.
    // ---------------------------------------------------------------------------------------

    /// The IPI handler: serves the current CPU's queue, running every call. The platform
    /// calls this from its cross-CPU call interrupt (it masks interrupts itself if they are not
    /// masked already).
    ///
    /// # Safety
    /// Platform interface. Call it only on an engine CPU, from that CPU's IPI handler (or a
    /// point equivalent to one: its idle loop, a safe point), and only where running *any*
    /// call's function is allowed: in a kernel's interrupt handler, or in a hosted signal
    /// handler that interrupted async-signal-safe code. Where the interrupted code may hold
    /// locks a function could need (a signal handler that interrupted `malloc`), use
    /// [`handle_ipi_engine_only`](Engine::handle_ipi_engine_only) instead.
    pub unsafe fn handle_ipi(&self) {
        // SAFETY: forwarded (this function's contract).
        unsafe { self.take_ipi(false) }
    }

    /// The IPI handler for a context that may not run user code (a hosted signal handler that
    /// interrupted arbitrary code): runs the engine's own work (stop_machine participation,
    /// RCU quiescent-state checks — atomics only, async-signal-safe) and keeps every user call,
    /// in order, for the CPU's next unrestricted flush (its next safe point: idle, a wait of
    /// its own, [`serve_queue`](Engine::serve_queue), or an unrestricted
    /// [`handle_ipi`](Engine::handle_ipi)). Everything this handler runs, nested flushes
    /// included, is restricted the same way.
    ///
    /// # Safety
    /// Platform interface: call it only on an engine CPU, from its IPI handler. The platform
    /// must then bring the CPU to an unrestricted flush eventually ([`Platform`]'s delivery
    /// contract): deferred calls wait for it.
    pub unsafe fn handle_ipi_engine_only(&self) {
        // SAFETY: forwarded (this function's contract).
        unsafe { self.take_ipi(true) }
    }

    /// The body of both IPI handlers: count, mask, flush — `restricted` (engine work only) for
    /// the whole flush, nested flushes included.
    ///
    /// # Safety
    /// As for [`handle_ipi`](Engine::handle_ipi), or with `restricted` as for
    /// [`handle_ipi_engine_only`](Engine::handle_ipi_engine_only).
    unsafe fn take_ipi(&self, restricted: bool) {
        let Some(me) = self.current_cpu() else {
            return;
        };
        let pc = self.per_cpu(me);
        // Relaxed: statistics.
        pc.ipi_received.fetch_add(1, Ordering::Relaxed);
        let masked = self.mask();
        if restricted {
            // Relaxed: only this CPU (and its properly nested handlers) writes it.
            pc.restricted.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: on `me`, interrupts masked.
        unsafe { self.flush(me) };
        // Unmask *before* leaving restricted mode: an IPI that arrived during the flush is
        // replayed by the unmask, still inside this signal context, so it must stay restricted.
        drop(masked);
        if restricted {
            pc.restricted.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Serves the current CPU's queue if anything is queued (a safe point). Returns how many
    /// calls ran.
    ///
    /// Safe to call anywhere: from task code it runs every queued call (this *is* a safe
    /// point, also with interrupts masked: an explicit flush, as a kernel's idle loop does);
    /// nested inside a restricted handler it runs only the engine's own work; at the nesting
    /// limit ([`Platform::MAX_CALL_NESTING`]) it runs nothing.
    pub fn serve_queue(&self) -> usize {
        match self.current_cpu() {
            Some(me) => self.serve_own(me),
            None => 0,
        }
    }

    /// The current CPU enters idle (an extended quiescent state for RCU: it holds no
    /// references). The platform's idle loop brackets idle time with this and
    /// [`idle_exit`](Engine::idle_exit); calls served while idle run "in an interrupt".
    ///
    /// # Safety
    /// Platform interface. Only the platform's idle loop may call it, on an engine CPU that
    /// holds no RCU read-side section and runs no other code until the matching `idle_exit`
    /// (call handlers aside): expedited grace periods skip an idle CPU, so calling it from
    /// code inside a reader would let a grace period end under that reader.
    pub unsafe fn idle_enter(&self) {
        if let Some(me) = self.current_cpu() {
            self.per_cpu(me).ctx.idle_enter();
        }
    }

    /// The current CPU leaves idle.
    ///
    /// # Safety
    /// Platform interface: pairs with [`idle_enter`](Engine::idle_enter), on the same CPU.
    pub unsafe fn idle_exit(&self) {
        if let Some(me) = self.current_cpu() {
            self.per_cpu(me).ctx.idle_exit();
        }
    }

    /// A snapshot of `cpu`'s context-tracking counter (None for an unknown CPU).
    pub fn context_snapshot(&self, cpu: CpuId) -> Option<crate::context::ContextSnapshot> {
        self.storage.cpus().get(cpu).map(|pc| pc.ctx.snapshot())
    }

    /// Idle-polls: the current CPU announces that it watches its queue (so senders elide the
    /// IPI, C6) and serves it until `stop()` returns true.
    ///
    /// # Safety
    /// Platform interface: only the platform's idle loop may call it, from a context where
    /// every call may run (task level of an engine CPU, not nested in a handler). Senders stop
    /// sending IPIs to the CPU while it polls.
    pub unsafe fn idle_poll(&self, mut stop: impl FnMut() -> bool) {
        let Some(me) = self.current_cpu() else {
            return;
        };
        let pc = self.per_cpu(me);
        // Relaxed: a sender that does not see it yet sends an IPI, which is merely redundant.
        pc.polling.store(true, Ordering::Relaxed);
        loop {
            if !pc.queue.is_empty() || pc.deferred.len() > 0 {
                self.serve_own(me);
            }
            if stop() {
                break;
            }
            self.platform.relax();
        }
        // SeqCst store, then SeqCst queue check: the Dekker pair of `enqueue`'s SeqCst push and
        // polling load. Either the sender sees `false` and sends an IPI, or we see its call.
        pc.polling.store(false, Ordering::SeqCst);
        if !pc.queue.is_empty() {
            self.serve_own(me);
        }
    }

    // ---------------------------------------------------------------------------------------
    // Internals.
    // ---------------------------------------------------------------------------------------

    pub(crate) fn per_cpu(&self, cpu: CpuId) -> &PerCpu {
        &self.storage.cpus()[cpu]
    }

    pub(crate) fn storage_foreign_slots(&self) -> &[Csd] {
        self.storage.foreign_slots()
    }

    /// The first call-data slot of `sender` for `target` (waiting many-calls use it).
    pub(crate) fn slot(&self, sender: CpuId, target: CpuId) -> &Csd {
        &self.slot_group(sender, target)[0]
    }

    /// The slots no-wait calls from `sender` to `target` use: all but the first when there are
    /// several. The first stays for waiting many-calls, which wait on it after their function
    /// ran: a no-wait call taking it meanwhile (from a handler nested in the wait) would make
    /// the many-call wait for that call instead (found by review).
    pub(crate) fn no_wait_slots(&self, sender: CpuId, target: CpuId) -> &[Csd] {
        let group = self.slot_group(sender, target);
        if group.len() > 1 {
            &group[1..]
        } else {
            group
        }
    }

    /// Every call-data slot of `sender` for `target` (`slots_per_target` of them).
    pub(crate) fn slot_group(&self, sender: CpuId, target: CpuId) -> &[Csd] {
        let k = self.slots_per_target;
        let at = (sender * self.nr_cpus + target) * k;
        &self.storage.slots()[at..at + k]
    }

    /// Entry for operations any thread may drive (hotplug, stop_machine): `None` for a thread
    /// that is not one of our CPUs.
    pub(crate) fn enter_any(&self) -> Result<Option<CpuId>, Error> {
        match self.enter() {
            Ok(me) => Ok(Some(me)),
            Err(Error::NotOnCpu) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Common entry: accepting calls, and from one of our CPUs.
    pub(crate) fn enter(&self) -> Result<CpuId, Error> {
        // Relaxed: a call racing with shutdown may be accepted; shutdown drains accepted calls.
        if self.shutdown_flag.load(Ordering::Relaxed) {
            return Err(Error::ShutDown);
        }
        match self.platform.current_cpu() {
            Some(me) if me < self.nr_cpus => {
                if !self.online.test(me) {
                    Err(Error::Offline(me))
                } else if self.per_cpu(me).nmi_depth.load(Ordering::Relaxed) > 0 {
                    // An NMI may interrupt this CPU anywhere, also inside `queue_call` while it
                    // claims one of its slots or inside a flush of its queue: no call starts
                    // from NMI context (only `nmi.rs` works there).
                    // Relaxed: this CPU's own depth (NMIs on it restore it before returning).
                    Err(Error::WouldDeadlock(DeadlockReason::InNmi))
                } else {
                    Ok(me)
                }
            }
            _ => Err(Error::NotOnCpu),
        }
    }

    /// A mask naming a CPU this engine does not have is an error (offline CPUs are pruned;
    /// unknown ones are a mistake the caller should hear about).
    fn check_mask(&self, mask: &CpuMask) -> Result<(), Error> {
        let nr = self.nr_cpus;
        if nr >= MAX_CPUS {
            return Ok(());
        }
        match mask.next_after(nr - 1) {
            Some(cpu) => Err(Error::UnknownCpu(cpu)),
            None => Ok(()),
        }
    }

    pub(crate) fn check_target(&self, cpu: CpuId) -> Result<(), Error> {
        if cpu >= self.nr_cpus {
            Err(Error::UnknownCpu(cpu))
        } else if !self.accepting.test(cpu) {
            Err(Error::Offline(cpu))
        } else {
            Ok(())
        }
    }

    /// C7: a caller that cannot serve its own queue while waiting must not wait.
    pub(crate) fn check_can_wait(&self, me: CpuId) -> Result<(), Error> {
        // Relaxed: only this CPU (and its nested handlers, which restore it) writes it.
        if self.per_cpu(me).handler_depth.load(Ordering::Relaxed) > 0 {
            Err(Error::WouldDeadlock(DeadlockReason::InHandler))
        } else if self.platform.irqs_masked() {
            Err(Error::WouldDeadlock(DeadlockReason::InterruptsMasked))
        } else {
            Ok(())
        }
    }

    /// Every CPU but the caller (every CPU, for a thread that is not one).
    fn all_but_me(&self) -> Result<CpuMask, Error> {
        let mut mask = CpuMask::first_n(self.nr_cpus);
        match self.enter() {
            Ok(me) => mask.clear(me),
            Err(Error::NotOnCpu) => {}
            Err(e) => return Err(e),
        }
        Ok(mask)
    }

    fn filter(&self, mask: &CpuMask, cond: impl Fn(CpuId) -> bool) -> CpuMask {
        mask.and(&self.accepting.load())
            .iter()
            .filter(|&c| cond(c))
            .collect()
    }

    /// Queues a waiting many-call on every CPU of `others` through this CPU's per-target slots
    /// (`fill` writes one), masked from the first push to the IPI send: an interrupt nested in between
    /// could wait for one of our targets before we signalled it (found by the simulator).
    /// Offline targets are skipped. Stops at the first refusal (this CPU went offline under
    /// us) and returns it with the CPUs already queued to.
    ///
    /// Each target's first slot: the one the waiting many-call then waits for.
    fn queue_on_slots(
        &self,
        me: CpuId,
        others: &CpuMask,
        mut fill: impl FnMut(&Csd, CpuId),
    ) -> (CpuMask, Option<Error>) {
        let mut ipis = CpuMask::new();
        let masked = self.mask();
        let mut queued = CpuMask::new();
        let mut refused = None;
        for t in others {
            let slot = core::slice::from_ref(self.slot(me, t));
            // SAFETY: this CPU's own first slot for `t` (live as long as the engine; only this
            // CPU claims it).
            match unsafe {
                self.queue_call(&masked, me, t, slot, Target::Prune, &mut ipis, |s| {
                    fill(s, t)
                })
            } {
                Ok(true) => queued.set(t),
                Ok(false) => {}
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        ipis.send(&self.platform);
        drop(masked);
        (queued, refused)
    }

    /// Claims `csd`, fills it with `fill` and pushes it on `target`'s queue, adding `target`
    /// to `ipis` if it needs an IPI. Returns `Ok(true)` if queued, `Ok(false)` if `target` is
    /// not accepting calls and the policy is to prune it.
    ///
    /// The online checks and the push happen in one region masked against this CPU's
    /// interrupts. `stop_machine` (hence `cpu_down`) needs every online CPU to take its IPI, so
    /// it cannot run between the check and the push: a call that passed the check is on the
    /// target's queue before the target can start going down, and the dying CPU's final flush
    /// runs it (seed 003's window, closed).
    ///
    /// A busy `csd` is waited for (serving our own queue, after sending the IPIs collected so
    /// far), except with [`Target::RefuseBusy`].
    ///
    /// `_masked` is the caller's proof that it holds that masked region (every caller masks
    /// from its first push to its IPI send), so this function masks nothing itself.
    ///
    /// # Safety
    /// Every call data of `csds` stays alive until its target releases it (the engine's slots;
    /// call data on the caller's stack, waited for before the frame ends; pinned caller-owned
    /// call data, whose `Drop` waits). With [`Target::Refuse`] or [`Target::Prune`], nobody but
    /// this CPU may ever claim them — its own slots, or its stack — since they are claimed
    /// without a compare-and-swap ([`Target::exclusive`]); shared call data goes with
    /// `RefuseBusy` or `Force`.
    #[allow(
        clippy::too_many_arguments,
        reason = "the mask proof, the route, the call data, the policy and its two outputs"
    )]
    pub(crate) unsafe fn queue_call(
        &self,
        _masked: &Masked<'_, P>,
        me: CpuId,
        target: CpuId,
        csds: &[Csd],
        policy: Target,
        ipis: &mut impl Ipis,
        mut fill: impl FnMut(&Csd),
    ) -> Result<bool, Error> {
        loop {
            let oldest;
            {
                self.platform.preempt_point();
                if policy != Target::Force {
                    if !self.online.test(me) {
                        return Err(Error::Offline(me));
                    }
                    if !self.accepting.test(target) {
                        return match policy {
                            Target::Prune => Ok(false),
                            _ => Err(Error::Offline(target)),
                        };
                    }
                }
                // The first free call data of the group (no-wait calls may have several per
                // sender and target; every other caller passes one).
                // Round robin from the slot after the last one used (a plain load before each
                // CAS: a busy slot's line is the target's to read).
                let k = csds.len();
                let start = if k > 1 {
                    // Relaxed: this CPU's own cursor.
                    self.per_cpu(me).slot_cursor.load(Ordering::Relaxed) as usize % k
                } else {
                    0
                };
                oldest = start;
                let exclusive = policy.exclusive();
                let free = (0..k)
                    .map(|i| (start + i) % k)
                    // Exclusive call data needs no locked instruction (a compare-and-swap
                    // would stall on the line the target released it in).
                    .find(|&i| {
                        if exclusive {
                            // SAFETY: only this CPU claims them (this function's contract),
                            // masked (`_masked`), never from NMI context (`enter`).
                            unsafe { csds[i].claim_exclusive() }
                        } else {
                            !csds[i].is_busy() && csds[i].try_lock()
                        }
                    });
                if let Some(i) = free {
                    let csd = &csds[i];
                    if k > 1 {
                        // Relaxed: this CPU's own cursor.
                        self.per_cpu(me)
                            .slot_cursor
                            .store((i + 1) as u32, Ordering::Relaxed);
                    }
                    // Engine code only: user code (a `Clone` in `call_many_async`) runs
                    // before the masked region, never while a slot is held.
                    fill(csd);
                    self.platform.preempt_point();
                    // SAFETY: claimed and filled; alive until released (this function's
                    // contract).
                    if unsafe { self.enqueue(target, csd) } {
                        ipis.add(target);
                    }
                    return Ok(true);
                }
                if policy == Target::RefuseBusy {
                    return Err(Error::Busy);
                }
                // Waiting for the slot means serving our own queue meanwhile (C7), one nested
                // flush deeper; at the nesting limit we could neither serve nor safely wait.
                // Relaxed: our own depth.
                if self.per_cpu(me).handler_depth.load(Ordering::Relaxed) >= P::MAX_CALL_NESTING {
                    return Err(Error::WouldDeadlock(DeadlockReason::NestingLimit));
                }
                // Inside stop_machine past Prepare (e.g. the dying CPU's last flush, or the
                // function of stop_machine itself) every other CPU is masked until it ends:
                // waiting for a busy slot would never end (found by the simulator).
                // Relaxed: this CPU's own stage.
                let stage = self.per_cpu(me).stop_stage.load(Ordering::Relaxed);
                if (crate::StopStage::DisableIrqInactive as u32..crate::StopStage::Exit as u32)
                    .contains(&stage)
                {
                    return Err(Error::WouldDeadlock(DeadlockReason::StopMachine));
                }
            }
            // Busy: make sure what we queued so far is signalled before we wait on anyone.
            // Round robin makes the slot at the cursor the likeliest oldest of the group (the
            // cursor is this CPU's, shared by its groups): the target takes its queue in
            // arrival order, so that one tends to free first.
            ipis.send(&self.platform);
            self.wait_csd(me, target, &csds[oldest]);
        }
    }

    /// Queues the no-wait call in `f` on `target` through this CPU's own slots for it (taking
    /// it out of the option once a slot is claimed), masked from the push to the IPI, which is
    /// sent before this returns: an interrupt nested in between could wait for `target` before
    /// it was signalled (found by the simulator). Returns what `queue_call` does. A call that
    /// was not queued stays in `f`, for the caller to drop (user code) unmasked.
    fn queue_no_wait<F>(
        &self,
        me: CpuId,
        target: CpuId,
        f: &mut Option<F>,
        policy: Target,
        deferrable: bool,
    ) -> Result<bool, Error>
    where
        F: FnOnce(CpuId) + Send + 'static,
    {
        let mut ipis = OneIpi::default();
        let masked = self.mask();
        let fill = |slot: &Csd| {
            let f = f.take().expect("filled once");
            // SAFETY: `queue_call` hands us the slot claimed, not yet pushed.
            unsafe { self.fill_no_wait(slot, f, me, target, deferrable) };
        };
        let slots = self.no_wait_slots(me, target);
        // SAFETY: this CPU's own slots for `target` (live as long as the engine; only this CPU
        // claims them).
        let result =
            unsafe { self.queue_call(&masked, me, target, slots, policy, &mut ipis, fill) };
        ipis.send(&self.platform);
        result
    }

    /// Writes a no-wait call running `f` (moved into the call data) into `csd`, optionally
    /// deferrable (`quiet.rs`), and records its route `src -> dst` for the diagnostics.
    ///
    /// # Safety
    /// The caller holds `csd` (claimed with `try_lock`, not yet pushed).
    pub(crate) unsafe fn fill_no_wait<F>(
        &self,
        csd: &Csd,
        f: F,
        src: CpuId,
        dst: CpuId,
        deferrable: bool,
    ) where
        F: FnOnce(CpuId) + Send + 'static,
    {
        // SAFETY: held per this function's contract; the inline payload matches
        // `run_inline::<F>`; deferrable only changes the IPI decision.
        unsafe {
            csd.set_call(run_inline::<F>, Payload::inline(f), false);
            if deferrable {
                csd.set_deferrable();
            }
        }
        self.note_call::<F>(csd, src, dst);
    }

    /// Pushes a claimed, filled `csd` on `target`'s queue. Returns whether an IPI must be sent.
    ///
    /// # Safety
    /// `csd` must be locked by this CPU, filled, and alive until `target` releases it.
    pub(crate) unsafe fn enqueue(&self, target: CpuId, csd: &Csd) -> bool {
        let pc = self.per_cpu(target);
        // Relaxed: statistics.
        pc.calls_queued.fetch_add(1, Ordering::Relaxed);
        // Read before the push: once pushed, the call data is the target's.
        let deferrable = csd.is_deferrable();
        // SAFETY: forwarded from this function's contract.
        if !unsafe { pc.queue.push(csd) } {
            // Not the first entry: an IPI (or a flush that will find it) is already under way —
            // unless the target is quiet and only deferrable calls (which sent none) are
            // queued. An urgent call to a quiet CPU sends one anyway (at worst a duplicate).
            // SeqCst: see `quiet.rs` (the Dekker pair with the quiet exit).
            if !deferrable && pc.quiet.load(Ordering::SeqCst) {
                pc.ipi_sent.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            return false;
        }
        // SeqCst load after the SeqCst push, paired with the quiet exit's SeqCst store of
        // `false` and queue check (`quiet.rs`): either we see it quiet (and it will see our
        // call when it leaves) or it is not quiet any more and we send the IPI.
        if deferrable && pc.quiet.load(Ordering::SeqCst) {
            pc.deferred_while_quiet.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        // SeqCst load after the SeqCst push: with `idle_poll`'s SeqCst store of `false` and
        // SeqCst queue check, either we see it still polling (and it will see our call) or it
        // sees our call — so eliding the IPI never strands a call. (No fence: both sides are in
        // the SeqCst total order.)
        if pc.polling.load(Ordering::SeqCst) {
            pc.ipi_elided.fetch_add(1, Ordering::Relaxed);
            false
        } else {
            pc.ipi_sent.fetch_add(1, Ordering::Relaxed);
            true
        }
    }

    /// Waits until `csd` is released, serving this CPU's own queue meanwhile (C7): a CPU that
    /// waits for another never stops answering it.
    pub(crate) fn wait_csd(&self, me: CpuId, target: CpuId, csd: &Csd) {
        let mut watch = None;
        let mut spins: u32 = 0;
        let interval = self.platform.stall_check_interval().max(1);
        while csd.is_busy() {
            self.serve_own(me);
            self.platform.relax();
            spins = spins.wrapping_add(1);
            // Look at the clock only now and then: most waits end long before.
            if spins % interval == 0 {
                self.check_wait_stall(me, target, csd, &mut watch);
            }
        }
        self.end_wait(me, watch);
    }

    /// How many flushes are running on `cpu` (non-zero: it is in a call handler).
    pub(crate) fn handler_depth(&self, cpu: CpuId) -> u32 {
        // Relaxed: an observation.
        self.per_cpu(cpu).handler_depth.load(Ordering::Relaxed)
    }

    /// Serves our own queue if there is anything to serve, including entries an outer flush on
    /// this CPU already took (when we wait from inside a handler).
    ///
    /// At the nesting limit ([`Platform::MAX_CALL_NESTING`] flushes on this CPU) it serves
    /// nothing: each nested flush costs stack, and an unbounded chain of handlers that wait and
    /// serve would overflow it. Waits that must serve to avoid deadlock refuse instead
    /// (`queue_call`).
    pub(crate) fn serve_own(&self, me: CpuId) -> usize {
        let pc = self.per_cpu(me);
        // Relaxed: our own CPU's depth and counters.
        let depth = pc.handler_depth.load(Ordering::Relaxed);
        // Nor from NMI context: the NMI may have interrupted a flush of this very queue.
        if depth >= P::MAX_CALL_NESTING || pc.nmi_depth.load(Ordering::Relaxed) > 0 {
            return 0;
        }
        let deferred = pc.deferred.len() > 0 && pc.restricted.load(Ordering::Relaxed) == 0;
        if pc.queue.is_empty() && depth == 0 && !deferred {
            return 0;
        }
        let _masked = self.mask();
        // SAFETY: on `me`, interrupts masked.
        unsafe {
            if pc.queue.is_empty() && !pc.queue.has_pending() && !deferred {
                return 0;
            }
            self.flush(me)
        }
    }

    /// Flushes `me`'s queue.
    ///
    /// # Safety
    /// Must run on `me` with interrupts masked.
    unsafe fn flush(&self, me: CpuId) -> usize {
        let pc = self.per_cpu(me);
        let depth = &pc.handler_depth;
        // Relaxed: only this CPU touches its depth.
        depth.fetch_add(1, Ordering::Relaxed);
        // A flush that *starts* on an offline CPU (not its own going-down flush) serves calls
        // that reached it while offline. (One that started while online may see the CPU leave
        // under it: the stop_machine call of its own cpu_down.)
        // Relaxed: our own flag; `online` is SeqCst.
        let offline = !self.online.test(me) && !pc.dying.load(Ordering::Relaxed);
        pc.diag.queue_taken();
        // Calls run "in an interrupt": watched, even when this flush runs from idle.
        pc.ctx.irq_enter();
        let in_flight = AbortOnUnwind;
        // Relaxed: our own CPU's counter.
        let restricted = pc.restricted.load(Ordering::Relaxed) > 0;
        // SAFETY: forwarded (owner, masked); our own deferred lists.
        let ran = unsafe { pc.queue.flush_with(me, Some((&pc.deferred, restricted))) };
        core::mem::forget(in_flight);
        pc.ctx.irq_exit();
        depth.fetch_sub(1, Ordering::Relaxed);
        // Relaxed: statistics.
        pc.calls_run.fetch_add(ran as u64, Ordering::Relaxed);
        pc.flushes.fetch_add(1, Ordering::Relaxed);
        if ran > 0 && offline {
            // Calls reached an offline CPU: run (never drop) and count them (C10).
            pc.offline_runs.fetch_add(ran as u64, Ordering::Relaxed);
        }
        ran
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use core::cell::Cell;
    use core::pin::pin;

    std::thread_local! {
        static CPU: Cell<Option<CpuId>> = const { Cell::new(None) };
        static MASKED: Cell<bool> = const { Cell::new(false) };
    }

    /// A single-threaded platform: the test switches "CPUs" by hand and IPIs are only counted,
    /// so queue contents and counters can be checked exactly.
    #[derive(Default)]
    struct Manual {
        ipis: AtomicU64,
    }

    // SAFETY: one thread plays every CPU in turn; masking is a thread-local flag and the test
    // serves queues explicitly, so no flush ever runs concurrently with another on a CPU.
    unsafe impl Platform for Manual {
        type IrqState = bool;
        fn current_cpu(&self) -> Option<CpuId> {
            CPU.with(Cell::get)
        }
        fn send_ipi(&self, _cpu: CpuId) {
            self.ipis.fetch_add(1, Ordering::Relaxed);
        }
        fn irq_save(&self) -> bool {
            MASKED.with(|m| m.replace(true))
        }
        unsafe fn irq_restore(&self, state: bool) {
            MASKED.with(|m| m.set(state));
        }
        fn irqs_masked(&self) -> bool {
            MASKED.with(Cell::get)
        }
    }

    fn on(cpu: CpuId) {
        CPU.with(|c| c.set(Some(cpu)));
    }

    #[test]
    fn sender_fields_share_the_first_cache_line() {
        let base = core::mem::offset_of!(PerCpu, queue);
        for (name, off) in [
            ("polling", core::mem::offset_of!(PerCpu, polling)),
            ("calls_queued", core::mem::offset_of!(PerCpu, calls_queued)),
            ("ipi_elided", core::mem::offset_of!(PerCpu, ipi_elided)),
        ] {
            assert!(off - base < 64, "{name} at {off} is not in the first line");
        }
        assert!(
            core::mem::offset_of!(PerCpu, calls_run) >= 64,
            "owner counters after it"
        );
    }

    #[test]
    fn storage_shape_is_checked() {
        static STORAGE: StaticStorage<3> = StaticStorage::new();
        assert!(Engine::new(Manual::default(), &STORAGE).is_ok());
        static EMPTY: StaticStorage<0> = StaticStorage::new();
        assert!(matches!(
            Engine::new(Manual::default(), &EMPTY),
            Err(Error::CpuCount { requested: 0, .. })
        ));
    }

    #[test]
    fn offline_and_unknown_cpus_are_refused_and_pruned() {
        static STORAGE: StaticStorage<4> = StaticStorage::new();
        let e = Engine::new(Manual::default(), &STORAGE).unwrap();
        on(0);
        // SAFETY: the test plays every CPU and serves their queues by hand.
        unsafe { e.mark_online(0) }.unwrap();
        // SAFETY: the test plays every CPU and serves their queues by hand.
        unsafe { e.mark_online(1) }.unwrap();
        assert_eq!(e.call_single_async(2, |_| ()), Err(Error::Offline(2)));
        assert_eq!(e.call_single(9, |_| ()), Err(Error::UnknownCpu(9)));
        // SAFETY: refused (unknown CPU): nothing is marked.
        assert_eq!(unsafe { e.mark_online(4) }, Err(Error::UnknownCpu(4)));
        // CPU 100 does not exist: the many-call is refused, nothing queued.
        let mask: CpuMask = [1, 2, 3, 100].into_iter().collect();
        assert_eq!(
            e.call_many_async(&mask, |_| ()),
            Err(Error::UnknownCpu(100))
        );
        assert_eq!(e.stats(1).unwrap().calls_queued, 0);
        // CPUs 2 and 3 (offline) are pruned from a many-call.
        let mask: CpuMask = [1, 2, 3].into_iter().collect();
        let sent = e.call_many_async(&mask, |_| ()).unwrap();
        assert_eq!(sent, CpuMask::single(1));
        assert_eq!(
            e.stats(2).unwrap().calls_queued + e.stats(3).unwrap().calls_queued,
            0
        );
        on(1);
        assert_eq!(e.serve_queue(), 1);
        on(0);
    }

    #[test]
    fn queue_runs_in_arrival_order_one_ipi_per_empty_transition() {
        static STORAGE: StaticStorage<2> = StaticStorage::new();
        static ORDER: AtomicU64 = AtomicU64::new(0);
        let e = Engine::new(Manual::default(), &STORAGE).unwrap();
        // SAFETY: the test plays every CPU and serves their queues by hand.
        unsafe { e.mark_online(0) }.unwrap();
        // SAFETY: the test plays every CPU and serves their queues by hand.
        unsafe { e.mark_online(1) }.unwrap();
        let csds = [const { Csd::new() }; 5];
        let csds = pin!(csds);
        on(0);
        for i in 0..5u64 {
            // SAFETY: projecting a pinned array to a pinned element.
            let csd = unsafe { csds.as_ref().map_unchecked(|a| &a[i as usize]) };
            e.call_async_csd(csd, 1, move |_| {
                // Append digit i: arrival order shows up as 01234.
                let v = ORDER.load(Ordering::Relaxed);
                ORDER.store(v * 10 + i, Ordering::Relaxed);
            })
            .unwrap();
        }
        assert_eq!(
            e.platform().ipis.load(Ordering::Relaxed),
            1,
            "one IPI for 5 calls"
        );
        assert_eq!(e.stats(1).unwrap().ipi_sent, 1);
        on(1);
        // SAFETY: the test runs CPU 1's interrupt by hand, on the thread playing it.
        unsafe { e.handle_ipi() };
        assert_eq!(
            ORDER.load(Ordering::Relaxed),
            1234,
            "arrival order (0 leads)"
        );
        assert_eq!(e.stats(1).unwrap().calls_run, 5);
        assert!(csds.iter().all(|c| !c.is_busy()));
        // Queue empty again: the next call needs a new IPI.
        on(0);
        e.call_single_async(1, |_| ()).unwrap();
        assert_eq!(e.platform().ipis.load(Ordering::Relaxed), 2);
        on(1);
        // SAFETY: the test runs CPU 1's interrupt by hand, on the thread playing it.
        unsafe { e.handle_ipi() };
        on(0);
    }
}
