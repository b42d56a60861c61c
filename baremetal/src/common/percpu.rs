//! Per-CPU data (the current CPU's index comes from the architecture's per-CPU register:
//! the GS base on x86_64, TPIDR_EL1 on aarch64, `tp` on riscv64), and the task mailbox through
//! which CPU 0 runs test code on the other CPUs in task context.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use smpcall::CpuId;

use crate::config::{Ipi, MAX_CPUS};
use crate::{arch, time};

/// Idle by halting: the CPU needs an IPI to notice a call.
pub const IDLE_HALT: u8 = 0;
/// Idle by polling its queue (`Engine::idle_poll`): senders elide the IPI.
pub const IDLE_POLL: u8 = 1;

const TASK_NONE: u8 = 0;
const TASK_POSTED: u8 = 1;
const TASK_RUNNING: u8 = 2;
const TASK_DONE: u8 = 3;

/// What the NMI handler recorded about the code it interrupted.
#[derive(Debug, Default)]
pub struct NmiRecord {
    /// Incremented (Release) after the fields below were written.
    pub seq: AtomicU64,
    /// Interrupted program counter.
    pub pc: AtomicU64,
    /// Interrupted stack pointer.
    pub sp: AtomicU64,
    /// 1 if the interrupted code had interrupts masked.
    pub masked: AtomicU64,
    /// Counter value when it arrived (for debugging; never written on riscv64).
    #[cfg_attr(target_arch = "riscv64", allow(dead_code))]
    pub cycles: AtomicU64,
}

type TaskFn = dyn Fn(CpuId) + Sync;

/// One CPU's data.
#[repr(C, align(128))]
pub struct Cpu {
    /// Hardware id (local APIC id, MPIDR affinity, hart id).
    pub hw_id: AtomicU32,
    /// Set up and taking interrupts.
    pub started: AtomicBool,
    /// `IDLE_HALT` or `IDLE_POLL`.
    pub idle_mode: AtomicU8,
    task_state: AtomicU8,
    task: UnsafeCell<Option<*const TaskFn>>,
    /// The last NMI's record.
    pub nmi: NmiRecord,
    /// Non-zero while this CPU runs its NMI handler.
    pub in_nmi: AtomicU32,
    /// WAKE_VECTOR interrupts taken.
    pub wakes: AtomicU64,
    /// `hlt`s in the idle loop.
    pub halts: AtomicU64,
    /// Interrupts on vectors nobody expects.
    pub unexpected: AtomicU64,
}

// SAFETY: `task` is written by CPU 0 while `task_state` is NONE/DONE and read by the owning
// CPU after it saw POSTED (Release/Acquire on `task_state`). Everything else is atomic.
unsafe impl Sync for Cpu {}

impl Cpu {
    const fn new() -> Self {
        Cpu {
            hw_id: AtomicU32::new(u32::MAX),
            started: AtomicBool::new(false),
            idle_mode: AtomicU8::new(IDLE_HALT),
            task_state: AtomicU8::new(TASK_NONE),
            task: UnsafeCell::new(None),
            nmi: NmiRecord {
                seq: AtomicU64::new(0),
                pc: AtomicU64::new(0),
                sp: AtomicU64::new(0),
                masked: AtomicU64::new(0),
                cycles: AtomicU64::new(0),
            },
            in_nmi: AtomicU32::new(0),
            wakes: AtomicU64::new(0),
            halts: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
        }
    }

    pub fn count_wake(&self) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_unexpected(&self) {
        self.unexpected.fetch_add(1, Ordering::Relaxed);
    }
}

/// Every CPU's data.
pub static CPUS: [Cpu; MAX_CPUS] = [const { Cpu::new() }; MAX_CPUS];

/// Bitmask of started CPUs.
static STARTED_MASK: AtomicU64 = AtomicU64::new(0);

/// Makes `cpu` this CPU's index (the architecture's per-CPU register). First thing each CPU
/// does in Rust.
///
/// # Safety
/// Once per CPU, on that CPU, with a `cpu` no other CPU uses.
pub unsafe fn init_this_cpu(cpu: usize) {
    // SAFETY: forwarded.
    unsafe { arch::set_cpu_index(cpu) };
}

/// Marks this CPU started (after its interrupt controller is set up).
pub fn mark_started(cpu: usize) {
    CPUS[cpu].hw_id.store(arch::hw_id(), Ordering::Relaxed);
    CPUS[cpu].started.store(true, Ordering::SeqCst);
    STARTED_MASK.fetch_or(1 << cpu, Ordering::SeqCst);
}

/// Started CPUs as a bitmask.
pub fn started_mask() -> u64 {
    STARTED_MASK.load(Ordering::SeqCst)
}

/// CPUs the machine has (QEMU's fw_cfg count), set once at boot.
static PRESENT: AtomicUsize = AtomicUsize::new(0);

/// Records how many CPUs the machine has.
pub fn set_present(n: usize) {
    PRESENT.store(n, Ordering::SeqCst);
}

/// Whether every CPU the machine has is started (none parked, none failed): the condition for
/// the all-but-self shorthand, which reaches every CPU but the sender.
pub fn all_present_started() -> bool {
    started_count() == PRESENT.load(Ordering::SeqCst)
}

/// Number of started CPUs.
pub fn started_count() -> usize {
    started_mask().count_ones() as usize
}

/// The current CPU's index; `None` before `init_this_cpu`.
#[inline]
pub fn current_index() -> Option<usize> {
    let v = arch::cpu_index_plus_one();
    if (1..=MAX_CPUS).contains(&v) {
        Some(v - 1)
    } else {
        None
    }
}

/// The current CPU's data.
pub fn this() -> &'static Cpu {
    &CPUS[current_index().expect("per-CPU data not set up")]
}

/// Sends a WAKE IPI (wakes a halted CPU; no engine involvement).
pub fn wake(cpu: usize) {
    let id = CPUS[cpu].hw_id.load(Ordering::Relaxed);
    if id != u32::MAX {
        arch::send_ipi(id, Ipi::Wake);
    }
}

/// Runs `f(cpu)` on every CPU of `mask` in task context (interrupts on), CPU 0's share on the
/// caller, and returns when all have returned. Called on CPU 0 only. `f` may borrow: this does
/// not return before every CPU is done with it.
pub fn run_on(mask: u64, f: &(dyn Fn(CpuId) + Sync)) {
    let me = current_index().expect("run_on from a CPU");
    assert_eq!(me, 0, "run_on is driven by CPU 0");
    let ptr: *const (dyn Fn(CpuId) + Sync + '_) = f;
    // SAFETY: only the lifetime is erased; we wait below until every CPU reported DONE, after
    // which no CPU touches `f` again.
    let ptr: *const TaskFn = unsafe { core::mem::transmute(ptr) };
    let others = mask & started_mask() & !1;
    for cpu in bits(others) {
        let c = &CPUS[cpu];
        assert_eq!(
            c.task_state.load(Ordering::Acquire),
            TASK_NONE,
            "cpu {cpu} busy"
        );
        // SAFETY: state NONE: the CPU does not read `task` (see `Cpu`'s Sync impl).
        unsafe { *c.task.get() = Some(ptr) };
        c.task_state.store(TASK_POSTED, Ordering::Release);
        wake(cpu);
    }
    if mask & 1 != 0 {
        f(0);
    }
    for cpu in bits(others) {
        let c = &CPUS[cpu];
        if !time::wait_until(60_000, || c.task_state.load(Ordering::Acquire) == TASK_DONE) {
            panic!("cpu {cpu} did not finish its task within 60 s");
        }
        // SAFETY: DONE: the CPU no longer touches `task`.
        unsafe { *c.task.get() = None };
        c.task_state.store(TASK_NONE, Ordering::Release);
    }
}

/// The CPU indices set in `mask`.
pub fn bits(mask: u64) -> impl Iterator<Item = usize> {
    (0..64).filter(move |i| mask & (1 << i) != 0)
}

fn task_posted(c: &Cpu) -> bool {
    c.task_state.load(Ordering::Acquire) == TASK_POSTED
}

fn run_posted_task(me: usize, c: &Cpu) {
    c.task_state.store(TASK_RUNNING, Ordering::Relaxed);
    // SAFETY: POSTED was seen with Acquire: `task` is written and stays valid until DONE.
    let f = unsafe { (*c.task.get()).expect("posted task") };
    // SAFETY: see `run_on`: the closure outlives the task.
    unsafe { (*f)(me) };
    c.task_state.store(TASK_DONE, Ordering::Release);
}

/// An application processor's life after bring-up: run posted tasks; otherwise idle by
/// halting (the default: calls arrive by IPI) or by polling the call queue (IPIs elided).
/// An offline CPU (taken down by `cpu_down`) always halts; `cpu_up`'s kick wakes it.
pub fn idle_loop(me: usize) -> ! {
    let c = &CPUS[me];
    let engine = crate::platform::engine();
    loop {
        if task_posted(c) {
            run_posted_task(me, c);
            continue;
        }
        let poll = c.idle_mode.load(Ordering::Relaxed) == IDLE_POLL && engine.is_online(me);
        if poll {
            // SAFETY: this CPU's idle loop, at task level, between posted tasks.
            unsafe {
                engine.idle_poll(|| {
                    task_posted(c)
                        || c.idle_mode.load(Ordering::Relaxed) != IDLE_POLL
                        || !engine.is_online(me)
                })
            };
        } else {
            arch::disable_irqs();
            if task_posted(c) || c.idle_mode.load(Ordering::Relaxed) == IDLE_POLL {
                // SAFETY: interrupt entry and controller are set up on a started CPU.
                unsafe { arch::enable_irqs() };
                continue;
            }
            c.halts.fetch_add(1, Ordering::Relaxed);
            arch::enable_irqs_and_wait();
        }
    }
}

/// Switches `cpu`'s idle policy and wakes it so a halted CPU notices.
pub fn set_idle_mode(cpu: usize, mode: u8) {
    CPUS[cpu].idle_mode.store(mode, Ordering::SeqCst);
    wake(cpu);
}
