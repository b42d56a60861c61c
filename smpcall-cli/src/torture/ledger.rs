//! The per-call ledger: one record per issued call, written by its sender before the call and
//! by each CPU the call runs on, then checked call by call by [`verify`].
//!
//! # What a record checks
//!
//! * **Exactly once, on the intended CPU**: the sender writes the mask of CPUs the call must
//!   run on; each function run sets its CPU's bit (a second run sets a "duplicated" bit) and
//!   compares its `cpu` argument with the CPU its thread is.
//! * **"In" ordering**: right before issuing, the sender stores a per-call token
//!   ([`in_token`]) into the record with a *Relaxed* store; the function reads it with a
//!   *Relaxed* load and must see exactly that value. Only the engine's own ordering (the
//!   Release push of the call data and the Acquire take of the queue, or the local run) makes
//!   it visible: a function that sees anything else (usually the record's initial 0) reveals
//!   a missing barrier on the call path.
//! * **"Out" ordering**: each function run adds its per-call, per-CPU part ([`out_part`]) to
//!   the record with a *Relaxed* read-modify-write; a caller whose call waited reads the sum
//!   with a *Relaxed* load right after the call returned ([`Ledger::check_out`]) and must see
//!   exactly the sum over the CPUs the call was meant for. Only the engine's release of the
//!   call data after the function returned, and the caller's acquire of it, make it visible.
//!   An rpc caller checks the same after its completion ([`Ledger::wait_done`]).
//!
//! Tokens are derived from the record id through a bijection, so they differ from call to
//! call and are never 0; records are never reused. A stale or missing write cannot pass.
//!
//! # Under hotplug (`--onoff`)
//!
//! * A call refused with `Error::Offline` is an *expected* refusal ([`Ledger::note_offline`]),
//!   not an error: nothing may run for it.
//! * A many-call's expected CPUs are the mask the engine returned (the CPUs it actually queued
//!   to or ran on), set with [`Ledger::settle_expected`] before any check that uses them.
//! * The hotplug driver marks a CPU in [`Ledger::set_offline`] only *after* its `cpu_down`
//!   returned and clears it *before* calling `cpu_up`: a function that runs on a CPU while it
//!   is marked ran on an offline CPU for certain ([`Violation::IpiToOffline`]), unless it is a
//!   local run by the caller itself (counted apart, see [`Ledger::local_offline_runs`]).
//!
//! # Call delays (`--drop-ipi`)
//!
//! With [`Ledger::set_delay_threshold`], [`Ledger::begin`] stamps each call with the clock and
//! its first function run measures how long the call waited to run; calls that waited longer
//! than the threshold are counted ([`Ledger::delayed_calls`]), independently of the engine's
//! own stall reports, so that the two can be compared.
//!
//! # Signal context
//!
//! [`Ledger::deliver`] runs inside call functions, which on the hosted backend run in a signal
//! handler. It only reads a `const` thread-local, the clock (`clock_gettime`, through
//! [`Instant`]) and the ledger's memory, and does atomic operations: no allocation, no lock,
//! no panic. Records live in chunks that the *sender* allocates (in task context) before it
//! hands out an id in them; a handler looks the chunk up with a lock-free [`OnceLock::get`].

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use smpcall::{CpuId, Error};

use crate::SetupError;

use super::kind::Kind;

/// Most CPUs the torture workload supports (records keep one bit per CPU in a `u64`).
pub const MAX_TORTURE_CPUS: usize = 64;

/// Records per chunk (allocated on demand by the sender).
const CHUNK_SHIFT: u32 = 14;
const CHUNK: u64 = 1 << CHUNK_SHIFT;

/// Bits of a [`RecordId`] that hold the index; the sender CPU sits above them.
const INDEX_BITS: u32 = 56;

/// Names one record: its sender CPU and its index in that sender's records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RecordId(u64);

impl RecordId {
    fn new(sender: CpuId, index: u64) -> RecordId {
        RecordId(((sender as u64) << INDEX_BITS) | index)
    }

    /// The CPU that issued the call.
    pub fn sender(self) -> CpuId {
        (self.0 >> INDEX_BITS) as CpuId
    }

    /// Position among the sender's calls (issue order).
    pub fn index(self) -> u64 {
        self.0 & ((1 << INDEX_BITS) - 1)
    }
}

/// `Record::meta` layout: the kind in the low byte, then flags, then an error class.
const META_KIND_MASK: u64 = 0xff;
/// The call returned an error other than an expected refusal.
const META_ERROR: u64 = 1 << 8;
/// The call was refused as expected (every caller-owned `Csd` busy) and never issued.
const META_REFUSED: u64 = 1 << 9;
/// The mask the engine returned differs from the one intended.
const META_MASK_MISMATCH: u64 = 1 << 10;
/// A function did not see the caller's "in" token (set by the function).
const META_IN_BAD: u64 = 1 << 11;
/// The waiting caller did not see the functions' "out" writes after the call.
const META_OUT_BAD: u64 = 1 << 12;
/// The rpc caller gave up waiting for the completion.
const META_RPC_TIMEOUT: u64 = 1 << 13;
/// Refused with `Error::Offline` under hotplug: an expected refusal, nothing may run.
const META_OFFLINE: u64 = 1 << 14;
/// ... and the offline CPU was the caller's own.
const META_OFFLINE_SELF: u64 = 1 << 15;
/// A function ran on a CPU the hotplug driver knew was offline (set by the function).
const META_OFFLINE_RUN: u64 = 1 << 24;
/// The call waited longer than the delay threshold to run (set by its first function).
const META_DELAYED: u64 = 1 << 25;
const META_ERROR_CLASS_SHIFT: u32 = 16;

/// One call's record. Bit `c` of each mask stands for CPU `c`.
#[derive(Debug, Default)]
pub struct Record {
    /// CPUs the call must run on, each exactly once (written by the sender before the call).
    expected: AtomicU64,
    /// CPUs it ran on (set by the call's function).
    ran: AtomicU64,
    /// CPUs it ran on more than once.
    duplicated: AtomicU64,
    /// CPUs whose function saw a `cpu` argument that is not the CPU it ran on (or that ran on
    /// a thread that is no CPU of the machine: then the argument's bit).
    wrong_cpu: AtomicU64,
    /// Kind, flags (sender's, and the functions' `META_IN_BAD`) and error class.
    meta: AtomicU64,
    /// The "in" value: [`in_token`] of this record, stored by the sender right before the
    /// call (Relaxed), read by each function (Relaxed).
    token_in: AtomicU64,
    /// CPUs whose function did not see the "in" token.
    in_bad: AtomicU64,
    /// What the first such function saw instead.
    in_seen: AtomicU64,
    /// The "out" value: the sum of the functions' [`out_part`]s (Relaxed read-modify-writes).
    out: AtomicU64,
    /// What the waiting caller saw in `out` after the call, when that was wrong.
    out_seen: AtomicU64,
    /// Function runs completed (Release increments): what an rpc caller waits for.
    done: AtomicU64,
    /// When the call was issued (monotonic ns), only with a delay threshold set.
    issued_ns: AtomicU64,
}

/// One sender CPU's records. Aligned so that senders' counters do not share cache lines.
#[derive(Debug)]
#[repr(align(128))]
struct CpuLedger {
    chunks: Box<[OnceLock<Box<[Record]>>]>,
    /// Records handed out (may overshoot the capacity by failed attempts; clamp on read).
    issued: AtomicU64,
    /// Records started, per kind (live statistics).
    begun: [AtomicU64; Kind::COUNT],
    /// Expected refusals (`Error::Busy` from a busy caller-owned `Csd`), per kind.
    refusals: [AtomicU64; Kind::COUNT],
}

/// Violations seen while the run goes on, for the periodic statistics line. (Lost calls are
/// only known at the end, by [`verify`].)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveViolations {
    /// Function runs that did not see the caller's "in" token.
    pub in_order: u64,
    /// Waiting callers that did not see the functions' "out" writes.
    pub out_order: u64,
    /// Rpc callers that gave up waiting for the completion.
    pub rpc_timeout: u64,
    /// Function runs on a CPU where the call had run already.
    pub duplicated: u64,
    /// Function runs whose `cpu` argument was not the CPU they ran on.
    pub wrong_cpu: u64,
    /// Function runs with an id naming no record.
    pub orphans: u64,
}

impl LiveViolations {
    /// Sum of all classes.
    pub fn total(&self) -> u64 {
        self.in_order
            + self.out_order
            + self.rpc_timeout
            + self.duplicated
            + self.wrong_cpu
            + self.orphans
    }
}

/// Indices into [`Ledger::live`].
const LIVE_IN: usize = 0;
const LIVE_OUT: usize = 1;
const LIVE_RPC: usize = 2;
const LIVE_DUP: usize = 3;
const LIVE_WRONG: usize = 4;

/// The records of every call of a run (see the module docs).
#[derive(Debug)]
pub struct Ledger {
    cpus: Box<[CpuLedger]>,
    capacity: u64,
    /// Call functions that ran with an id naming no record.
    orphans: AtomicU64,
    /// Violations as they are found ([`LiveViolations`]); written only when one is found.
    live: [AtomicU64; 5],
    /// CPUs the hotplug driver knows are offline (bit `c` = CPU `c`).
    offline_now: AtomicU64,
    /// Function runs on a CPU marked offline (any caller, ledger-side "IPI to offline").
    offline_runs: AtomicU64,
    /// Local runs by a caller whose own CPU was marked offline (informational).
    local_offline_runs: AtomicU64,
    /// Calls that waited longer than this (ns) to run are counted (0: not measured).
    delay_threshold_ns: AtomicU64,
    /// Calls that waited longer than the threshold.
    delayed_calls: AtomicU64,
    /// Longest wait of a call to run, ns (measured only with a threshold).
    max_delay_ns: AtomicU64,
}

/// The monotonic clock in nanoseconds (`clock_gettime`: async-signal-safe, no allocation).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The splitmix64 finaliser: a bijection of `u64` that maps 0 to 0 and scatters the rest.
const fn scramble(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The "in" value of call `id`: unique per call and never 0 (ids are below 2⁶², so `id + 1`
/// is never 0, and `scramble` is a bijection fixing 0).
pub fn in_token(id: RecordId) -> u64 {
    scramble(id.0 + 1)
}

/// What the function of call `id` adds to the record's "out" value when it runs on `cpu`:
/// differs per call and per CPU, never 0.
pub fn out_part(id: RecordId, cpu: CpuId) -> u64 {
    scramble(in_token(id) ^ 0x6f75_745f_7061_7274 ^ (cpu as u64).wrapping_mul(0x9E37_79B9)) | 1
}

/// The "out" value a caller must see once call `id`'s functions ran on every CPU of
/// `expected` (bit `c` = CPU `c`), each exactly once.
pub fn expected_out(id: RecordId, expected: u64) -> u64 {
    (0..MAX_TORTURE_CPUS)
        .filter(|&c| expected >> c & 1 == 1)
        .fold(0u64, |sum, c| sum.wrapping_add(out_part(id, c)))
}

/// Busy-waits for `ns` nanoseconds on the monotonic clock (a call function's simulated work).
/// Async-signal-safe: `Instant::now` is `clock_gettime`, and nothing here can panic.
pub fn spin_ns(ns: u32) {
    if ns == 0 {
        return;
    }
    let start = Instant::now();
    let limit = Duration::from_nanos(u64::from(ns));
    while Instant::now().saturating_duration_since(start) < limit {
        std::hint::spin_loop();
    }
}

thread_local! {
    /// The CPU this thread is, as the torture workload set it. `const` and `Copy`: reading it
    /// needs no lazy initialisation, so it is async-signal-safe.
    static THIS_CPU: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Declares that the current thread is CPU `cpu` (done by each CPU's task before its first
/// call); call functions compare their `cpu` argument against it.
pub fn set_this_cpu(cpu: CpuId) {
    THIS_CPU.with(|c| c.set(cpu));
}

/// The CPU the current thread declared with [`set_this_cpu`], if any.
pub fn this_cpu() -> Option<CpuId> {
    let cpu = THIS_CPU.with(Cell::get);
    (cpu != usize::MAX).then_some(cpu)
}

fn bit(cpu: CpuId) -> u64 {
    if cpu < MAX_TORTURE_CPUS {
        1 << cpu
    } else {
        0
    }
}

/// `Ok` if torture supports `cpus` CPUs (1 to [`MAX_TORTURE_CPUS`]).
pub(crate) fn check_cpus(cpus: usize) -> Result<(), SetupError> {
    if cpus == 0 || cpus > MAX_TORTURE_CPUS {
        return Err(SetupError::Cpus {
            workload: "torture",
            requested: cpus,
            min: 1,
            max: MAX_TORTURE_CPUS,
        });
    }
    Ok(())
}

/// Index of an [`Error`] in [`ERROR_CLASSES`].
pub fn error_class(e: &Error) -> usize {
    match e {
        Error::UnknownCpu(_) => 0,
        Error::Offline(_) => 1,
        Error::WouldDeadlock(_) => 2,
        Error::Busy => 3,
        Error::ShutDown => 4,
        Error::NotOnCpu => 5,
        Error::InvalidConfig(_) => 6,
        Error::TimedOut { .. } => 7,
        _ => 8,
    }
}

/// Names of the error classes counted in [`Verification::errors_by_class`].
pub const ERROR_CLASSES: [&str; 9] = [
    "unknown-cpu",
    "offline",
    "would-deadlock",
    "busy",
    "shut-down",
    "not-on-cpu",
    "invalid-config",
    "timed-out",
    "other",
];

impl Ledger {
    /// Records for `cpus` senders (at most [`MAX_TORTURE_CPUS`]), up to `capacity` calls each.
    /// Memory is allocated as records are handed out.
    pub fn new(cpus: usize, capacity: u64) -> Result<Ledger, SetupError> {
        check_cpus(cpus)?;
        if capacity == 0 || capacity >= 1 << INDEX_BITS {
            return Err(SetupError::CallsPerCpu {
                requested: capacity,
                max: (1 << INDEX_BITS) - 1,
            });
        }
        let nchunks = capacity.div_ceil(CHUNK) as usize;
        let cpus = (0..cpus)
            .map(|_| CpuLedger {
                chunks: (0..nchunks).map(|_| OnceLock::new()).collect(),
                issued: AtomicU64::new(0),
                begun: Default::default(),
                refusals: Default::default(),
            })
            .collect();
        Ok(Ledger {
            cpus,
            capacity,
            orphans: AtomicU64::new(0),
            live: Default::default(),
            offline_now: AtomicU64::new(0),
            offline_runs: AtomicU64::new(0),
            local_offline_runs: AtomicU64::new(0),
            delay_threshold_ns: AtomicU64::new(0),
            delayed_calls: AtomicU64::new(0),
            max_delay_ns: AtomicU64::new(0),
        })
    }

    /// Marks CPU `cpu` offline (`true`: only after its `cpu_down` returned) or online again
    /// (`false`: before calling `cpu_up`). See the module docs.
    pub fn set_offline(&self, cpu: CpuId, offline: bool) {
        // SeqCst: the functions' loads must not see a mark made after they ran (it is set after
        // `cpu_down` returned, which follows every run on the dying CPU) and must see a clear
        // made before `cpu_up` (ordered through the online mask and the call's push).
        if offline {
            self.offline_now.fetch_or(bit(cpu), Ordering::SeqCst);
        } else {
            self.offline_now.fetch_and(!bit(cpu), Ordering::SeqCst);
        }
    }

    /// CPUs marked offline right now (bit `c` = CPU `c`).
    pub fn offline_mask(&self) -> u64 {
        self.offline_now.load(Ordering::SeqCst)
    }

    /// Function runs seen on a CPU marked offline, by a caller other than that CPU.
    pub fn offline_runs(&self) -> u64 {
        self.offline_runs.load(Ordering::Relaxed)
    }

    /// Local runs (a call to the caller's own CPU, or the caller's part of a many-call) that
    /// happened after the caller's CPU had gone offline: the caller passed the engine's online
    /// check, then its CPU went down before the local run. Informational.
    pub fn local_offline_runs(&self) -> u64 {
        self.local_offline_runs.load(Ordering::Relaxed)
    }

    /// Measure how long each call waits to run, and count those that wait longer than
    /// `threshold` (0 turns it off). Set before the first call.
    pub fn set_delay_threshold(&self, threshold: Duration) {
        let ns = u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX);
        self.delay_threshold_ns.store(ns, Ordering::Relaxed);
    }

    /// Calls that waited longer than the delay threshold to run.
    pub fn delayed_calls(&self) -> u64 {
        self.delayed_calls.load(Ordering::Relaxed)
    }

    /// The longest a call waited to run (`None` when delays are not measured).
    pub fn max_delay(&self) -> Option<Duration> {
        (self.delay_threshold_ns.load(Ordering::Relaxed) != 0)
            .then(|| Duration::from_nanos(self.max_delay_ns.load(Ordering::Relaxed)))
    }

    /// Number of sender CPUs.
    pub fn nr_cpus(&self) -> usize {
        self.cpus.len()
    }

    /// Calls each sender may record.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Calls `sender` has recorded so far.
    pub fn issued(&self, sender: CpuId) -> u64 {
        self.cpus
            .get(sender)
            .map_or(0, |c| c.issued.load(Ordering::Acquire).min(self.capacity))
    }

    /// Calls started per kind, summed over the senders (live statistics; relaxed reads).
    pub fn begun_by_kind(&self) -> [u64; Kind::COUNT] {
        let mut out = [0; Kind::COUNT];
        for cl in self.cpus.iter() {
            for (o, c) in out.iter_mut().zip(&cl.begun) {
                *o += c.load(Ordering::Relaxed);
            }
        }
        out
    }

    /// Violations found so far (relaxed reads).
    pub fn live(&self) -> LiveViolations {
        let r = |i: usize| self.live[i].load(Ordering::Relaxed);
        LiveViolations {
            in_order: r(LIVE_IN),
            out_order: r(LIVE_OUT),
            rpc_timeout: r(LIVE_RPC),
            duplicated: r(LIVE_DUP),
            wrong_cpu: r(LIVE_WRONG),
            orphans: self.orphans.load(Ordering::Relaxed),
        }
    }

    fn count_live(&self, which: usize) {
        // Relaxed: a statistics counter.
        self.live[which].fetch_add(1, Ordering::Relaxed);
    }

    /// Starts a record for a call of `kind` from `sender` that must run exactly once on each
    /// CPU of `expected`, and stamps its "in" token ([`in_token`]) last. Call it right
    /// *before* issuing the call (task context: it may allocate). `None` when `sender`'s
    /// capacity is used up (or `sender` is out of range).
    pub fn begin(&self, sender: CpuId, kind: Kind, expected: u64) -> Option<RecordId> {
        let cl = self.cpus.get(sender)?;
        // Relaxed: a counter; publication of the record to the target goes through the call.
        let index = cl.issued.fetch_add(1, Ordering::Relaxed);
        if index >= self.capacity {
            return None;
        }
        let chunk = cl.chunks[(index >> CHUNK_SHIFT) as usize]
            .get_or_init(|| (0..CHUNK).map(|_| Record::default()).collect());
        let rec = &chunk[(index & (CHUNK - 1)) as usize];
        let id = RecordId::new(sender, index);
        // Relaxed, deliberately: only the call itself (the engine's Release push and Acquire
        // take, or a local run) may order these before the function's reads. The "in" check
        // in `deliver` exists to catch a call path that fails to.
        rec.meta.store(kind.index() as u64, Ordering::Relaxed);
        rec.expected.store(expected, Ordering::Relaxed);
        if self.delay_threshold_ns.load(Ordering::Relaxed) != 0 {
            rec.issued_ns.store(now_ns(), Ordering::Relaxed);
        }
        rec.token_in.store(in_token(id), Ordering::Relaxed);
        cl.begun[kind.index()].fetch_add(1, Ordering::Relaxed);
        Some(id)
    }

    /// Overwrites the "in" value of record `id` with `value`, as a sender whose store did not
    /// reach the function would look. For tests of the checks: any `value` other than
    /// [`in_token`]`(id)` must be reported as [`Violation::InOrder`] by a function that reads it.
    pub fn stamp_in_with(&self, id: RecordId, value: u64) {
        if let Some(rec) = self.record(id) {
            rec.token_in.store(value, Ordering::Relaxed);
        }
    }

    /// The record `id` names, if it exists. Async-signal-safe.
    pub fn record(&self, id: RecordId) -> Option<&Record> {
        let cl = self.cpus.get(id.sender())?;
        let index = id.index();
        if index >= self.capacity {
            return None;
        }
        let chunk = cl.chunks.get((index >> CHUNK_SHIFT) as usize)?.get()?;
        chunk.get((index & (CHUNK - 1)) as usize)
    }

    /// Records that call `id` ran on the thread of CPU `ran_on` (`None`: a thread that is no
    /// CPU) with `cpu_arg` as its `cpu` argument: [`deliver_spinning`](Ledger::deliver_spinning)
    /// without the spin.
    pub fn deliver(&self, id: RecordId, ran_on: Option<CpuId>, cpu_arg: CpuId) {
        self.deliver_spinning(id, ran_on, cpu_arg, 0);
    }

    /// What each call's function does: check the "in" token, record that call `id` ran on the
    /// thread of CPU `ran_on` (`None`: a thread that is no CPU) with `cpu_arg` as its `cpu`
    /// argument, busy-wait `spin` nanoseconds (simulated work), add its "out" part, and count
    /// one completion (Release: what an rpc caller waits for).
    ///
    /// Async-signal-safe: atomics and the clock only, no allocation, no lock, no panic.
    pub fn deliver_spinning(&self, id: RecordId, ran_on: Option<CpuId>, cpu_arg: CpuId, spin: u32) {
        let Some(rec) = self.record(id) else {
            // Relaxed: a counter read after the run.
            self.orphans.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // The "in" check, first: Relaxed, so that only the engine's ordering can make the
        // sender's Relaxed store visible here (see the module docs).
        let seen = rec.token_in.load(Ordering::Relaxed);
        let here = match ran_on {
            Some(cpu) if cpu < MAX_TORTURE_CPUS => cpu,
            _ => cpu_arg,
        };
        if seen != in_token(id) {
            rec.in_bad.fetch_or(bit(here), Ordering::Relaxed);
            let _ = rec
                .in_seen
                .compare_exchange(0, seen, Ordering::Relaxed, Ordering::Relaxed);
            rec.meta.fetch_or(META_IN_BAD, Ordering::Relaxed);
            self.count_live(LIVE_IN);
        }
        match ran_on {
            Some(cpu) if cpu < MAX_TORTURE_CPUS => {
                let b = bit(cpu);
                // SeqCst: see `set_offline`.
                if self.offline_now.load(Ordering::SeqCst) & b != 0 {
                    if cpu == id.sender() {
                        self.local_offline_runs.fetch_add(1, Ordering::Relaxed);
                    } else {
                        rec.meta.fetch_or(META_OFFLINE_RUN, Ordering::Relaxed);
                        self.offline_runs.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let threshold = self.delay_threshold_ns.load(Ordering::Relaxed);
                if threshold != 0 {
                    self.note_delay(rec, threshold);
                }
                // Relaxed: per-location atomicity is all the duplicate check needs; the
                // verifier reads after the machine shut down (thread joins order everything).
                if rec.ran.fetch_or(b, Ordering::Relaxed) & b != 0 {
                    rec.duplicated.fetch_or(b, Ordering::Relaxed);
                    self.count_live(LIVE_DUP);
                }
                if cpu != cpu_arg {
                    rec.wrong_cpu.fetch_or(b, Ordering::Relaxed);
                    self.count_live(LIVE_WRONG);
                }
            }
            _ => {
                // Ran off any CPU: it did not run where it should (lost) and is flagged.
                rec.wrong_cpu.fetch_or(bit(cpu_arg), Ordering::Relaxed);
                self.count_live(LIVE_WRONG);
            }
        }
        spin_ns(spin);
        // The "out" write: Relaxed, so that only the engine's release of the call data (and
        // the caller's acquire of it) can make it visible to a waiting caller.
        rec.out.fetch_add(out_part(id, here), Ordering::Relaxed);
        // Release: the rpc completion; the rpc caller's Acquire load pairs with it.
        rec.done.fetch_add(1, Ordering::Release);
    }

    /// A function of `rec` runs now: how long did the call wait? Counts it once if longer than
    /// `threshold_ns`. Async-signal-safe.
    fn note_delay(&self, rec: &Record, threshold_ns: u64) {
        // Relaxed: the issue stamp travels with the call (Release push / Acquire take), like
        // the "in" token; a stale 0 only makes the delay look huge, so skip it.
        let issued = rec.issued_ns.load(Ordering::Relaxed);
        if issued == 0 {
            return;
        }
        let waited = now_ns().saturating_sub(issued);
        self.max_delay_ns.fetch_max(waited, Ordering::Relaxed);
        if waited > threshold_ns
            && rec.meta.fetch_or(META_DELAYED, Ordering::Relaxed) & META_DELAYED == 0
        {
            self.delayed_calls.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The "out" check, by a caller whose call `id` returned after waiting (or whose rpc
    /// completed): it must see every expected function's "out" part, no more and no less.
    /// Records a [`Violation::OutOrder`] and returns `false` otherwise. Task context.
    pub fn check_out(&self, id: RecordId) -> bool {
        let Some(rec) = self.record(id) else {
            return false;
        };
        // Relaxed: the sender wrote `expected` itself.
        let want = expected_out(id, rec.expected.load(Ordering::Relaxed));
        // Relaxed, deliberately: see the module docs.
        let got = rec.out.load(Ordering::Relaxed);
        if got == want {
            return true;
        }
        rec.out_seen.store(got, Ordering::Relaxed);
        rec.meta.fetch_or(META_OUT_BAD, Ordering::Relaxed);
        self.count_live(LIVE_OUT);
        false
    }

    /// The rpc caller's wait: until `runs` functions of call `id` completed, spinning and
    /// yielding, at most `limit`. On time-out records a [`Violation::RpcTimeout`] and returns
    /// `false` (never hangs). Task context.
    pub fn wait_done(&self, id: RecordId, runs: u64, limit: Duration, safe_points: bool) -> bool {
        let Some(rec) = self.record(id) else {
            return false;
        };
        let start = Instant::now();
        let mut spins = 0u32;
        // Acquire: pairs with the functions' Release increments of `done`.
        while rec.done.load(Ordering::Acquire) < runs {
            spins = spins.wrapping_add(1);
            if spins < 64 {
                std::hint::spin_loop();
                continue;
            }
            if start.elapsed() >= limit {
                rec.meta.fetch_or(META_RPC_TIMEOUT, Ordering::Relaxed);
                self.count_live(LIVE_RPC);
                return false;
            }
            // A safe point: the reply may be a call to this CPU (unless calls run in signal
            // handlers). More CPUs than cores: let the target run.
            if safe_points {
                smpcall::hosted::safe_point();
            }
            thread::yield_now();
        }
        true
    }

    /// The call behind `id` returned `err` (not an expected refusal): nothing may run.
    pub fn note_error(&self, id: RecordId, err: &Error) {
        if let Some(rec) = self.record(id) {
            rec.expected.store(0, Ordering::Relaxed);
            let class = (error_class(err) as u64) << META_ERROR_CLASS_SHIFT;
            rec.meta.fetch_or(META_ERROR | class, Ordering::Relaxed);
        }
    }

    /// The call behind `id` was refused with `Error::Offline` while CPUs go offline and come
    /// back (hotplug): an expected refusal, nothing may run. `own_cpu`: the offline CPU was
    /// the caller's own (its task keeps running while it is offline).
    pub fn note_offline(&self, id: RecordId, own_cpu: bool) {
        if let Some(rec) = self.record(id) {
            rec.expected.store(0, Ordering::Relaxed);
            let flags = META_OFFLINE | if own_cpu { META_OFFLINE_SELF } else { 0 };
            rec.meta.fetch_or(flags, Ordering::Relaxed);
        }
    }

    /// Under hotplug, a many-call's CPUs are the mask the engine returned (offline CPUs were
    /// pruned): the call must run exactly once on each of `expected` and nowhere else. Set it
    /// right after the call returned, before any "out" check.
    pub fn settle_expected(&self, id: RecordId, expected: u64) {
        if let Some(rec) = self.record(id) {
            rec.expected.store(expected, Ordering::Relaxed);
        }
    }

    /// The call behind `id` was refused as expected and never issued: nothing may run.
    pub fn note_refused(&self, id: RecordId) {
        if let Some(rec) = self.record(id) {
            rec.expected.store(0, Ordering::Relaxed);
            rec.meta.fetch_or(META_REFUSED, Ordering::Relaxed);
        }
    }

    /// The engine reported a different set of CPUs for call `id` than intended.
    pub fn note_mask_mismatch(&self, id: RecordId) {
        if let Some(rec) = self.record(id) {
            rec.meta.fetch_or(META_MASK_MISMATCH, Ordering::Relaxed);
        }
    }

    /// What record `id` says right now (relaxed reads: exact only once the run is over).
    pub fn view(&self, id: RecordId) -> Option<RecordView> {
        let rec = self.record(id)?;
        let meta = rec.meta.load(Ordering::Relaxed);
        Some(RecordView {
            id,
            kind: Kind::from_index((meta & META_KIND_MASK) as usize),
            expected: rec.expected.load(Ordering::Relaxed),
            ran: rec.ran.load(Ordering::Relaxed),
            duplicated: rec.duplicated.load(Ordering::Relaxed),
            wrong_cpu: rec.wrong_cpu.load(Ordering::Relaxed),
            in_bad: rec.in_bad.load(Ordering::Relaxed),
            in_seen: rec.in_seen.load(Ordering::Relaxed),
            out_seen: rec.out_seen.load(Ordering::Relaxed),
            outcome: outcome_name(meta),
        })
    }

    /// The last call `sender` started, if any (to tell what a stuck CPU was doing).
    pub fn last(&self, sender: CpuId) -> Option<RecordView> {
        let n = self.issued(sender);
        n.checked_sub(1)
            .and_then(|i| self.view(RecordId::new(sender, i)))
    }

    /// Counts one expected refusal (a busy caller-owned `Csd`) of a `kind` call by `sender`.
    pub fn count_refusal(&self, sender: CpuId, kind: Kind) {
        if let Some(cl) = self.cpus.get(sender) {
            cl.refusals[kind.index()].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What can go wrong with a call. Each is counted once per call that shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Violation {
    /// The call did not run on a CPU it was meant for.
    Lost,
    /// The call ran more than once on a CPU.
    Duplicated,
    /// The call ran on a CPU it was not meant for (or ran although it was refused).
    UnexpectedCpu,
    /// The function's `cpu` argument was not the CPU it ran on, or it ran on no CPU.
    WrongCpuArg,
    /// A function did not see the caller's writes made before the call (the "in" check): a
    /// missing barrier between issuing a call and running it.
    InOrder,
    /// A waiting caller did not see the functions' writes after the call returned (the "out"
    /// check): a missing barrier between a function's end and its caller's return.
    OutOrder,
    /// An rpc caller waited its whole bound for the function's completion signal.
    RpcTimeout,
    /// The mask a many-call returned differs from the requested mask ∩ online CPUs.
    MaskMismatch,
    /// A call returned an error other than an expected refusal.
    UnexpectedError,
    /// A call function ran with an id naming no record.
    Orphan,
    /// A call ran on a CPU that was offline (the torture's hotplug driver had taken it down;
    /// or the engine's `offline_runs` counter): an "IPI to an offline CPU".
    IpiToOffline,
    /// An RCU reader saw a node that had been poisoned after its grace period: the grace
    /// period ended while a reader that could see the node was still running (`--rcu`).
    Rcu,
}

impl Violation {
    /// Number of classes.
    pub const COUNT: usize = 12;
    /// Every class, in index order.
    pub const ALL: [Violation; Violation::COUNT] = [
        Violation::Lost,
        Violation::Duplicated,
        Violation::UnexpectedCpu,
        Violation::WrongCpuArg,
        Violation::InOrder,
        Violation::OutOrder,
        Violation::RpcTimeout,
        Violation::MaskMismatch,
        Violation::UnexpectedError,
        Violation::Orphan,
        Violation::IpiToOffline,
        Violation::Rcu,
    ];

    /// Dense index.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Short name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Violation::Lost => "lost",
            Violation::Duplicated => "duplicated",
            Violation::UnexpectedCpu => "unexpected-cpu",
            Violation::WrongCpuArg => "wrong-cpu-arg",
            Violation::InOrder => "in-order",
            Violation::OutOrder => "out-order",
            Violation::RpcTimeout => "rpc-timeout",
            Violation::MaskMismatch => "mask-mismatch",
            Violation::UnexpectedError => "unexpected-error",
            Violation::Orphan => "orphan",
            Violation::IpiToOffline => "ipi-to-offline",
            Violation::Rcu => "rcu",
        }
    }
}

/// Per-kind tallies, from the records and refusal counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindTally {
    /// Calls attempted (records started).
    pub issued: u64,
    /// Calls the engine accepted.
    pub accepted: u64,
    /// Expected refusals (`Error::Busy` from a busy caller-owned `Csd`; one call may be refused
    /// by several before one is free).
    pub refusals: u64,
    /// Calls given up after every caller-owned `Csd` was busy.
    pub gave_up: u64,
    /// Calls that returned an unexpected error.
    pub errors: u64,
    /// Calls refused with `Error::Offline` under hotplug (expected).
    pub offline: u64,
    /// Function runs expected (sum over calls of the target count).
    pub deliveries: u64,
}

/// What one record says, as read after (or, for diagnosis, during) a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordView {
    /// Which call.
    pub id: RecordId,
    /// Its kind.
    pub kind: Option<Kind>,
    /// CPUs it had to run on.
    pub expected: u64,
    /// CPUs it ran on.
    pub ran: u64,
    /// CPUs it ran on twice or more.
    pub duplicated: u64,
    /// CPUs where its `cpu` argument was wrong.
    pub wrong_cpu: u64,
    /// CPUs whose function did not see the caller's "in" token.
    pub in_bad: u64,
    /// What the first of those saw instead (0: nothing of the caller's store).
    pub in_seen: u64,
    /// What a waiting caller saw of the "out" value, when it was wrong.
    pub out_seen: u64,
    /// How the call ended for its caller (see `outcome_name`).
    pub outcome: &'static str,
}

/// How a call ended for its caller, from its record's flags: `accepted`, `refused-offline`,
/// `refused-offline-own-cpu` (the caller's CPU was offline), `gave-up` (every caller-owned
/// call data busy) or `error`.
fn outcome_name(meta: u64) -> &'static str {
    if meta & META_ERROR != 0 {
        "error"
    } else if meta & META_OFFLINE_SELF != 0 {
        "refused-offline-own-cpu"
    } else if meta & META_OFFLINE != 0 {
        "refused-offline"
    } else if meta & META_REFUSED != 0 {
        "gave-up"
    } else {
        "accepted"
    }
}

/// One call that violated exactly-once, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Example {
    /// The call's record.
    pub record: RecordView,
    /// First violation class it showed.
    pub class: Violation,
}

/// The verifier's findings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    /// Records checked.
    pub calls_checked: u64,
    /// Function runs that were expected and happened exactly once where expected.
    pub deliveries_ok: u64,
    /// Per kind (indexed by [`Kind::index`]).
    pub per_kind: [KindTally; Kind::COUNT],
    /// Calls showing each violation class (indexed by [`Violation::index`]).
    pub violations: [u64; Violation::COUNT],
    /// Unexpected errors by class (indexed like [`ERROR_CLASSES`]).
    pub errors_by_class: [u64; ERROR_CLASSES.len()],
    /// The first few violating calls.
    pub examples: Vec<Example>,
    /// Calls refused with `Error::Offline` under hotplug (expected refusals).
    pub offline_expected: u64,
    /// ... of which the caller's own CPU was the offline one.
    pub offline_own_cpu: u64,
}

impl Verification {
    /// Calls with at least one violation are counted once per class they show.
    pub fn total_violations(&self) -> u64 {
        self.violations.iter().sum()
    }

    /// Calls that returned an unexpected error.
    pub fn total_errors(&self) -> u64 {
        self.errors_by_class.iter().sum()
    }

    /// Calls of `v`'s class.
    pub fn count(&self, v: Violation) -> u64 {
        self.violations[v.index()]
    }

    /// Whether every call ran exactly once on every CPU it was meant for, and nowhere else,
    /// with both ordering checks passing.
    pub fn is_clean(&self) -> bool {
        self.total_violations() == 0
    }

    /// Calls refused with `Error::Offline`: under hotplug (`--onoff`) expected refusals
    /// ([`Ledger::note_offline`]); without it no CPU goes offline, and such a refusal is also
    /// counted as an unexpected error. This is the sum of both.
    pub fn offline_refusals(&self) -> u64 {
        self.offline_expected + self.errors_by_class[OFFLINE_CLASS]
    }
}

/// Index of `Error::Offline` in [`ERROR_CLASSES`].
pub const OFFLINE_CLASS: usize = 1;

/// How many example calls a [`Verification`] keeps.
pub const MAX_EXAMPLES: usize = 8;

/// Checks every record of `ledger`, call by call. Run it only when no call can still run
/// (after the machine is drained and shut down): a call still in flight would show as lost.
pub fn verify(ledger: &Ledger) -> Verification {
    let mut v = Verification::default();
    // Relaxed everywhere: the caller guarantees the run is over and ordered before us.
    v.violations[Violation::Orphan.index()] = ledger.orphans.load(Ordering::Relaxed);
    for (sender, cl) in ledger.cpus.iter().enumerate() {
        for (k, r) in cl.refusals.iter().enumerate() {
            v.per_kind[k].refusals += r.load(Ordering::Relaxed);
        }
        for index in 0..ledger.issued(sender) {
            let id = RecordId::new(sender, index);
            let Some(rec) = ledger.record(id) else {
                continue;
            };
            let expected = rec.expected.load(Ordering::Relaxed);
            let ran = rec.ran.load(Ordering::Relaxed);
            let duplicated = rec.duplicated.load(Ordering::Relaxed);
            let wrong_cpu = rec.wrong_cpu.load(Ordering::Relaxed);
            let meta = rec.meta.load(Ordering::Relaxed);
            let in_bad = rec.in_bad.load(Ordering::Relaxed);
            let kind = Kind::from_index((meta & META_KIND_MASK) as usize);
            v.calls_checked += 1;
            if let Some(kind) = kind {
                let t = &mut v.per_kind[kind.index()];
                t.issued += 1;
                if meta & META_ERROR != 0 {
                    t.errors += 1;
                } else if meta & META_OFFLINE != 0 {
                    t.offline += 1;
                } else if meta & META_REFUSED != 0 {
                    t.gave_up += 1;
                } else {
                    t.accepted += 1;
                }
                t.deliveries += u64::from(expected.count_ones());
            }
            if meta & META_OFFLINE != 0 {
                v.offline_expected += 1;
                if meta & META_OFFLINE_SELF != 0 {
                    v.offline_own_cpu += 1;
                }
            }
            if meta & META_ERROR != 0 {
                let class = (meta >> META_ERROR_CLASS_SHIFT) as usize & 0xff;
                v.errors_by_class[class.min(ERROR_CLASSES.len() - 1)] += 1;
            }
            v.deliveries_ok += u64::from((expected & ran & !duplicated & !wrong_cpu).count_ones());

            let shows = [
                (Violation::Lost, expected & !ran != 0),
                (Violation::Duplicated, duplicated != 0),
                (Violation::UnexpectedCpu, ran & !expected != 0),
                (Violation::WrongCpuArg, wrong_cpu != 0),
                (Violation::InOrder, meta & META_IN_BAD != 0 || in_bad != 0),
                (Violation::OutOrder, meta & META_OUT_BAD != 0),
                (Violation::RpcTimeout, meta & META_RPC_TIMEOUT != 0),
                (Violation::MaskMismatch, meta & META_MASK_MISMATCH != 0),
                (Violation::UnexpectedError, meta & META_ERROR != 0),
                (Violation::IpiToOffline, meta & META_OFFLINE_RUN != 0),
            ];
            let mut first = None;
            for (class, shown) in shows {
                if shown {
                    v.violations[class.index()] += 1;
                    first.get_or_insert(class);
                }
            }
            if let Some(class) = first {
                if v.examples.len() < MAX_EXAMPLES {
                    v.examples.push(Example {
                        record: RecordView {
                            id,
                            kind,
                            expected,
                            ran,
                            duplicated,
                            wrong_cpu,
                            in_bad,
                            in_seen: rec.in_seen.load(Ordering::Relaxed),
                            out_seen: rec.out_seen.load(Ordering::Relaxed),
                            outcome: outcome_name(meta),
                        },
                        class,
                    });
                }
            }
        }
    }
    v
}
