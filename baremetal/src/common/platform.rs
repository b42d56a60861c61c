//! `smpcall::Platform` over the architecture's interface (`crate::arch`), and the kernel's one
//! engine. What each operation is on each architecture: see `baremetal/README.md`.
//!
//! | engine needs | here |
//! |---|---|
//! | current CPU | `arch::cpu_index_plus_one()` (a per-CPU register, set once per CPU) |
//! | send IPI | `arch::send_ipi(hw id, Ipi::Call)`; `arch::send_ipi_all_but_self` when the mask is every other started CPU and every present CPU booted |
//! | mask / unmask | `arch::irq_save` / `arch::irq_restore` |
//! | relax | `arch::pause` |
//! | clock | `arch::cycles`, see `time` |
//! | report | serial console, bounded lock |
//! | NMI | `arch::send_nmi` where `arch::HAS_NMI`; the handler records the interrupted context, then calls `Engine::handle_nmi` |
//! | is CPU c masked? (stall reports) | asked by NMI: c's handler records the interrupted mask |
//! | fault injection | `drop_next_ipi(cpu)`: the next call IPI to `cpu` is not sent |

use core::cell::UnsafeCell;
use core::fmt;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use smpcall::{CpuId, CpuMask, Engine, Platform, StaticStorage};

use crate::config::{Ipi, MAX_CPUS};
use crate::percpu::{self, CPUS};
use crate::{arch, time};

/// The kernel's platform (state lives in the per-CPU data and the architecture).
#[derive(Debug)]
pub struct KernelPlatform {
    /// Call IPIs sent one CPU at a time.
    pub unicast: AtomicU64,
    /// All-but-self broadcasts (one send for every other CPU).
    pub broadcasts: AtomicU64,
    /// Fault injection: drop the next call IPI to this CPU (the lost-IPI test).
    drop_next: [AtomicBool; MAX_CPUS],
    /// IPIs dropped on purpose.
    pub dropped: AtomicU64,
    /// Reports the engine made (`Platform::report`).
    pub reports: AtomicU64,
}

impl KernelPlatform {
    const fn new() -> Self {
        KernelPlatform {
            unicast: AtomicU64::new(0),
            broadcasts: AtomicU64::new(0),
            drop_next: [const { AtomicBool::new(false) }; MAX_CPUS],
            dropped: AtomicU64::new(0),
            reports: AtomicU64::new(0),
        }
    }

    /// Fault injection: the next call IPI to `cpu` is not sent (as if lost on the bus).
    pub fn drop_next_ipi(&self, cpu: CpuId) {
        self.drop_next[cpu].store(true, Ordering::SeqCst);
    }

    fn drop_pending(&self) -> bool {
        self.drop_next.iter().any(|d| d.load(Ordering::Relaxed))
    }
}

fn hw_id_of(cpu: CpuId) -> Option<u32> {
    let c = CPUS.get(cpu)?;
    if !c.started.load(Ordering::Acquire) {
        return None;
    }
    Some(c.hw_id.load(Ordering::Relaxed))
}

// SAFETY (the trait's three points), resting on what every `arch` module guarantees (see
// `arch/x86_64/mod.rs`, which lists the interface, and each architecture's notes):
// 1. Identity: `current_cpu` reads the per-CPU register that `percpu::init_this_cpu` sets once
//    per CPU to that CPU's own, distinct index before the CPU touches the engine; nothing
//    changes it afterwards and a CPU is a CPU (no migration).
// 2. Delivery: `arch::send_ipi(id, Ipi::Call)` makes the target take an interrupt whose
//    handler calls `Engine::handle_ipi` (through `irq::handle`), which starts after the send:
//    the interrupt stays pending while the target masks and is taken at unmask. The send is
//    callable masked and from the handler, and never blocks beyond a bounded wait.
// NMI (`send_nmi`, only where `arch::HAS_NMI`): reaches the target whatever its `irq_save`
//    mask, and the architecture blocks a second one until the handler returns, so
//    `handle_nmi` never nests on a CPU.
// 3. Masking: between `arch::irq_save` and the `arch::irq_restore` that unmasks, the call
//    interrupt is not taken on this CPU; the interrupt entry runs `handle_ipi` masked.
//    `irqs_masked` reads the current CPU's mask.
unsafe impl Platform for KernelPlatform {
    type IrqState = bool;

    fn current_cpu(&self) -> Option<CpuId> {
        percpu::current_index()
    }

    fn send_ipi(&self, cpu: CpuId) {
        if self
            .drop_next
            .get(cpu)
            .is_some_and(|d| d.swap(false, Ordering::SeqCst))
        {
            self.dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        if let Some(id) = hw_id_of(cpu) {
            self.unicast.fetch_add(1, Ordering::Relaxed);
            arch::send_ipi(id, Ipi::Call);
        }
    }

    fn send_ipi_mask(&self, mask: &CpuMask) {
        let Some(me) = percpu::current_index() else {
            return;
        };
        let mut bits = 0u64;
        let mut beyond = false;
        for cpu in mask {
            if cpu < MAX_CPUS {
                bits |= 1 << cpu;
            } else {
                beyond = true;
            }
        }
        // Linux's rule for the all-but-self shorthand: the targets are every CPU but me, and
        // every CPU present has booted (the shorthand also reaches CPUs we never started, e.g.
        // APs parked beyond MAX_CPUS or ones that failed to come up).
        let others = percpu::started_mask() & !(1 << me);
        if !beyond
            && bits == others
            && others.count_ones() >= 2
            && percpu::all_present_started()
            && !self.drop_pending()
            && arch::send_ipi_all_but_self(Ipi::Call)
        {
            self.broadcasts.fetch_add(1, Ordering::Relaxed);
        } else {
            for cpu in mask {
                self.send_ipi(cpu);
            }
        }
    }

    fn irq_save(&self) -> bool {
        arch::irq_save()
    }

    unsafe fn irq_restore(&self, state: bool) {
        arch::irq_restore(state);
    }

    fn irqs_masked(&self) -> bool {
        !arch::irqs_enabled()
    }

    fn relax(&self) {
        arch::pause();
    }

    fn now_ns(&self) -> u64 {
        time::now_ns()
    }

    fn has_nmi(&self) -> bool {
        arch::HAS_NMI
    }

    fn send_nmi(&self, cpu: CpuId) {
        if let Some(id) = hw_id_of(cpu) {
            arch::send_nmi(id);
        }
    }

    fn cpu_irqs_masked(&self, cpu: CpuId) -> Option<bool> {
        crate::nmi::probe_irqs_masked(cpu)
    }

    fn report(&self, message: fmt::Arguments<'_>) {
        self.reports.fetch_add(1, Ordering::SeqCst);
        crate::console::report(message);
    }
}

/// The engine type of this kernel.
pub type KernelEngine = Engine<KernelPlatform, &'static StaticStorage<MAX_CPUS>>;

/// Per-CPU queues and call-data slots: no allocator anywhere.
static STORAGE: StaticStorage<MAX_CPUS> = StaticStorage::new();

/// A value initialised once at run time and shared by every CPU afterwards.
pub struct Global<T> {
    state: AtomicU8,
    value: UnsafeCell<MaybeUninit<T>>,
}

const UNINIT: u8 = 0;
const BUSY: u8 = 1;
const READY: u8 = 2;

// SAFETY: the value is written once, by the CPU that won the UNINIT->BUSY transition, and only
// read after READY was published with Release (readers Acquire). `T: Sync` for the shared
// reads, `T: Send` because the initialising CPU hands it to the others.
unsafe impl<T: Sync + Send> Sync for Global<T> {}

impl<T> Global<T> {
    /// Not yet initialised.
    pub const fn new() -> Self {
        Global {
            state: AtomicU8::new(UNINIT),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Initialises it; fails (giving the value back) if it was already.
    pub fn init(&self, value: T) -> Result<&T, T> {
        if self
            .state
            .compare_exchange(UNINIT, BUSY, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(value);
        }
        // SAFETY: we won UNINIT->BUSY: nobody else writes, nobody reads before READY.
        unsafe { (*self.value.get()).write(value) };
        self.state.store(READY, Ordering::Release);
        // SAFETY: initialised just above.
        Ok(unsafe { (*self.value.get()).assume_init_ref() })
    }

    /// The value, once initialised.
    pub fn get(&self) -> Option<&T> {
        if self.state.load(Ordering::Acquire) == READY {
            // SAFETY: READY (Acquire) means fully written and never written again.
            Some(unsafe { (*self.value.get()).assume_init_ref() })
        } else {
            None
        }
    }
}

static ENGINE: Global<KernelEngine> = Global::new();

/// Creates the engine (BSP, before the APs start).
pub fn init_engine() {
    let engine = Engine::new(KernelPlatform::new(), &STORAGE).expect("engine configuration");
    if ENGINE.init(engine).is_err() {
        panic!("engine initialised twice");
    }
}

/// The engine, if created.
pub fn try_engine() -> Option<&'static KernelEngine> {
    ENGINE.get()
}

/// The engine.
pub fn engine() -> &'static KernelEngine {
    try_engine().expect("engine not initialised")
}
