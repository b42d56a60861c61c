//! The per-call ledger: one record per issued call, written by its sender before the call and
//! by each CPU the call runs on, then checked call by call by [`verify`].
//!
//! # Signal context
//!
//! [`Ledger::deliver`] runs inside call functions, which on the hosted backend run in a signal
//! handler. It only reads a `const` thread-local and the ledger's memory and does atomic
//! read-modify-writes: no allocation, no lock, no panic. Records live in chunks that the
//! *sender* allocates (in task context) before it hands out an id in them; a handler looks the
//! chunk up with a lock-free [`OnceLock::get`].

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use smpcall::{CpuId, Error};

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
    /// Kind, sender-side flags and error class (sender only).
    meta: AtomicU64,
}

/// One sender CPU's records.
#[derive(Debug)]
struct CpuLedger {
    chunks: Box<[OnceLock<Box<[Record]>>]>,
    /// Records handed out (may overshoot the capacity by failed attempts; clamp on read).
    issued: AtomicU64,
    /// Expected refusals (`Error::Busy` from a busy caller-owned `Csd`), per kind.
    refusals: [AtomicU64; Kind::COUNT],
}

/// The records of every call of a run (see the module docs).
#[derive(Debug)]
pub struct Ledger {
    cpus: Box<[CpuLedger]>,
    capacity: u64,
    /// Call functions that ran with an id naming no record.
    orphans: AtomicU64,
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
        Error::TimedOut(_) => 7,
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
    pub fn new(cpus: usize, capacity: u64) -> Result<Ledger, Error> {
        if cpus == 0 || cpus > MAX_TORTURE_CPUS {
            return Err(Error::InvalidConfig(
                "torture supports between 1 and 64 CPUs",
            ));
        }
        if capacity == 0 || capacity >= 1 << INDEX_BITS {
            return Err(Error::InvalidConfig(
                "torture needs room for at least one call per CPU",
            ));
        }
        let nchunks = capacity.div_ceil(CHUNK) as usize;
        let cpus = (0..cpus)
            .map(|_| CpuLedger {
                chunks: (0..nchunks).map(|_| OnceLock::new()).collect(),
                issued: AtomicU64::new(0),
                refusals: Default::default(),
            })
            .collect();
        Ok(Ledger {
            cpus,
            capacity,
            orphans: AtomicU64::new(0),
        })
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

    /// Starts a record for a call of `kind` from `sender` that must run exactly once on each
    /// CPU of `expected`. Call it *before* issuing the call (task context: it may allocate).
    /// `None` when `sender`'s capacity is used up (or `sender` is out of range).
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
        // Relaxed: the call (a Release push, or a local run) orders these before any delivery;
        // the verifier reads them after the run is over.
        rec.meta.store(kind.index() as u64, Ordering::Relaxed);
        rec.expected.store(expected, Ordering::Relaxed);
        Some(RecordId::new(sender, index))
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
    /// CPU) with `cpu_arg` as its `cpu` argument. This is what each call's function does.
    /// Async-signal-safe: atomics only, no allocation, no lock, no panic.
    pub fn deliver(&self, id: RecordId, ran_on: Option<CpuId>, cpu_arg: CpuId) {
        let Some(rec) = self.record(id) else {
            // Relaxed: a counter read after the run.
            self.orphans.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match ran_on {
            Some(cpu) if cpu < MAX_TORTURE_CPUS => {
                let b = bit(cpu);
                // Relaxed: per-location atomicity is all the duplicate check needs; the
                // verifier reads after the machine shut down (thread joins order everything).
                if rec.ran.fetch_or(b, Ordering::Relaxed) & b != 0 {
                    rec.duplicated.fetch_or(b, Ordering::Relaxed);
                }
                if cpu != cpu_arg {
                    rec.wrong_cpu.fetch_or(b, Ordering::Relaxed);
                }
            }
            _ => {
                // Ran off any CPU: it did not run where it should (lost) and is flagged.
                rec.wrong_cpu.fetch_or(bit(cpu_arg), Ordering::Relaxed);
            }
        }
    }

    /// The call behind `id` returned `err` (not an expected refusal): nothing may run.
    pub fn note_error(&self, id: RecordId, err: &Error) {
        if let Some(rec) = self.record(id) {
            rec.expected.store(0, Ordering::Relaxed);
            let class = (error_class(err) as u64) << META_ERROR_CLASS_SHIFT;
            rec.meta.fetch_or(META_ERROR | class, Ordering::Relaxed);
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
    /// The mask a many-call returned differs from the requested mask ∩ online CPUs.
    MaskMismatch,
    /// A call returned an error other than an expected refusal.
    UnexpectedError,
    /// A call function ran with an id naming no record.
    Orphan,
}

impl Violation {
    /// Number of classes.
    pub const COUNT: usize = 7;
    /// Every class, in index order.
    pub const ALL: [Violation; Violation::COUNT] = [
        Violation::Lost,
        Violation::Duplicated,
        Violation::UnexpectedCpu,
        Violation::WrongCpuArg,
        Violation::MaskMismatch,
        Violation::UnexpectedError,
        Violation::Orphan,
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
            Violation::MaskMismatch => "mask-mismatch",
            Violation::UnexpectedError => "unexpected-error",
            Violation::Orphan => "orphan",
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

    /// Whether every call ran exactly once on every CPU it was meant for, and nowhere else.
    pub fn is_clean(&self) -> bool {
        self.total_violations() == 0
    }
}

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
            let kind = Kind::from_index((meta & META_KIND_MASK) as usize);
            v.calls_checked += 1;
            if let Some(kind) = kind {
                let t = &mut v.per_kind[kind.index()];
                t.issued += 1;
                if meta & META_ERROR != 0 {
                    t.errors += 1;
                } else if meta & META_REFUSED != 0 {
                    t.gave_up += 1;
                } else {
                    t.accepted += 1;
                }
                t.deliveries += u64::from(expected.count_ones());
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
                (Violation::MaskMismatch, meta & META_MASK_MISMATCH != 0),
                (Violation::UnexpectedError, meta & META_ERROR != 0),
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
                        },
                        class,
                    });
                }
            }
        }
    }
    v
}
