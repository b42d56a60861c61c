//! `smpcall::Platform` on the local APIC, and the kernel's one engine.
//!
//! | engine needs | here |
//! |---|---|
//! | current CPU | `gs:[0]` (per-CPU data, set up once per CPU) |
//! | send IPI | fixed IPI on `CALL_VECTOR` through the ICR; the all-but-self shorthand when the mask is every other started CPU |
//! | mask / unmask | `pushfq; cli` / `sti` if IF was set |
//! | relax | `pause` |
//! | clock | TSC, calibrated against the PIT |
//! | report | serial console, bounded lock |
//! | NMI | APIC NMI delivery mode (one CPU, or all-but-self for the platform's dump); the NMI handler (IST2) records the interrupted RIP/RSP/RFLAGS, then calls `Engine::handle_nmi` |
//! | is CPU c masked? (stall reports) | asked by NMI: c's handler records the interrupted RFLAGS |
//! | fault injection | `drop_next_ipi(cpu)`: the next call IPI to `cpu` is not sent |

use core::cell::UnsafeCell;
use core::fmt;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use smpcall::{CpuId, CpuMask, Engine, Platform, StaticStorage};

use crate::config::{CALL_VECTOR, MAX_CPUS};
use crate::percpu::{self, CPUS};
use crate::{apic, arch, time};

/// The local-APIC platform (state lives in the per-CPU data).
#[derive(Debug)]
pub struct ApicPlatform {
    /// Fixed IPIs sent one CPU at a time.
    pub unicast: AtomicU64,
    /// All-but-self broadcasts (one ICR write for every other CPU).
    pub broadcasts: AtomicU64,
    /// Fault injection: drop the next call IPI to this CPU (the lost-IPI test).
    drop_next: [AtomicBool; MAX_CPUS],
    /// IPIs dropped on purpose.
    pub dropped: AtomicU64,
    /// Reports the engine made (`Platform::report`).
    pub reports: AtomicU64,
}

impl ApicPlatform {
    const fn new() -> Self {
        ApicPlatform {
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

fn apic_id_of(cpu: CpuId) -> Option<u32> {
    let c = CPUS.get(cpu)?;
    if !c.started.load(Ordering::Acquire) {
        return None;
    }
    Some(c.apic_id.load(Ordering::Relaxed))
}

// SAFETY (the trait's three points):
// 1. Identity: `current_cpu` reads `gs:[0]`, which `percpu::init_this_cpu` sets once per CPU to
//    that CPU's own, distinct index before the CPU touches the engine; nothing changes the GS
//    base afterwards and a CPU is a CPU (no migration).
// 2. Delivery: `send_ipi(c)` writes the ICR with c's APIC id and CALL_VECTOR. The target APIC
//    latches the vector in IRR and delivers it once IF=1 (and the vector is not in service;
//    then right after the EOI that ends the running handler); the vector's handler calls
//    `Engine::handle_ipi` and only then sends EOI, so every IPI is followed by a handle_ipi
//    that starts after the send. It masks around the two ICR writes (callable masked, from
//    the handler, never blocks beyond a bounded wait for the ICR to be idle).
// NMI (`send_nmi`): an APIC NMI reaches the target whatever its IF; x86 blocks further NMIs
//    until the handler's `iretq`, and the handler (on IST2) never faults or enables anything
//    that would unblock them early, so `handle_nmi` never nests on a CPU.
// 3. Masking: `irq_save` is `pushfq; cli`, `irq_restore` is `sti` only if IF was set; the
//    call vector is an interrupt gate, so `handle_ipi` runs with IF=0 and a fixed IPI that
//    arrives meanwhile stays pending in IRR until the `sti`. `irqs_masked` reads RFLAGS.IF.
unsafe impl Platform for ApicPlatform {
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
        if let Some(id) = apic_id_of(cpu) {
            self.unicast.fetch_add(1, Ordering::Relaxed);
            apic::send_fixed(id, CALL_VECTOR);
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
        {
            self.broadcasts.fetch_add(1, Ordering::Relaxed);
            apic::send_fixed_all_but_self(CALL_VECTOR);
        } else {
            for cpu in mask {
                self.send_ipi(cpu);
            }
        }
    }

    fn irq_save(&self) -> bool {
        arch::irq_save()
    }

    fn irq_restore(&self, state: bool) {
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
        true
    }

    fn send_nmi(&self, cpu: CpuId) {
        if let Some(id) = apic_id_of(cpu) {
            apic::send_nmi(id);
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
pub type KernelEngine = Engine<ApicPlatform, &'static StaticStorage<MAX_CPUS>>;

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
    let engine = Engine::new(ApicPlatform::new(), &STORAGE).expect("engine configuration");
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
