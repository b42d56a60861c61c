//! NMI-class signals (x86: APIC NMI; aarch64: a GICv3 pseudo-NMI; riscv64: none). Each CPU's
//! handler first records what it interrupted — program counter, stack pointer, whether
//! interrupts were masked — and bumps a sequence number, then calls the engine's `handle_nmi`
//! (NMI calls, NMI reports). `dump_all` is the platform's own all-CPU dump: the CPU that
//! asked collects the records.

use core::sync::atomic::Ordering;

use crate::config::MAX_CPUS;
use crate::percpu::{self, CPUS};
use crate::{arch, time};

/// NMI handler body, called by the architecture's NMI entry with the interrupted context:
/// record and call the engine. No locks, no printing. (riscv64 has no NMI.)
#[cfg_attr(target_arch = "riscv64", allow(dead_code))]
pub fn on_nmi(pc: u64, sp: u64, irqs_were_masked: bool) {
    let Some(me) = percpu::current_index() else {
        return;
    };
    let c = &CPUS[me];
    c.in_nmi.fetch_add(1, Ordering::Relaxed);
    let r = &c.nmi;
    r.pc.store(pc, Ordering::Relaxed);
    r.sp.store(sp, Ordering::Relaxed);
    r.masked.store(irqs_were_masked as u64, Ordering::Relaxed);
    r.cycles.store(arch::cycles(), Ordering::Relaxed);
    r.seq.fetch_add(1, Ordering::Release);
    if let Some(engine) = crate::platform::try_engine() {
        // SAFETY: this CPU's NMI handler; NMIs do not nest (the architecture's NMI entry
        // keeps them out until it returns).
        unsafe { engine.handle_nmi() };
    }
    c.in_nmi.fetch_sub(1, Ordering::Relaxed);
}

/// Whether the current CPU is inside its NMI handler (x86_64's two-write ICR sends need it).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub fn in_nmi() -> bool {
    percpu::current_index().is_some_and(|c| CPUS[c].in_nmi.load(Ordering::Relaxed) != 0)
}

/// Whether the code the current NMI interrupted had interrupts masked (inside an NMI handler
/// interrupts are always masked; this is the interrupted context's state). `None` outside an
/// NMI handler.
pub fn interrupted_irqs_masked() -> Option<bool> {
    let c = &CPUS[percpu::current_index()?];
    if c.in_nmi.load(Ordering::Relaxed) == 0 {
        return None;
    }
    Some(c.nmi.masked.load(Ordering::Relaxed) != 0)
}

/// Whether `cpu` has interrupts masked right now, asked by NMI: its handler records the
/// interrupted state. Bounded (10 ms: a halted vCPU thread must be woken by the host); `None`
/// if there is no NMI, if it does not answer, is not started, or if the caller is itself
/// inside an NMI handler (it must not send then: the code it interrupted may be in the middle
/// of a send).
pub fn probe_irqs_masked(cpu: usize) -> Option<bool> {
    let me = percpu::current_index()?;
    if cpu == me {
        return Some(interrupted_irqs_masked().unwrap_or(!arch::irqs_enabled()));
    }
    if !arch::HAS_NMI {
        return None;
    }
    let c = CPUS.get(cpu)?;
    if !c.started.load(Ordering::Acquire) || CPUS[me].in_nmi.load(Ordering::Relaxed) != 0 {
        return None;
    }
    let before = c.nmi.seq.load(Ordering::Acquire);
    arch::send_nmi(c.hw_id.load(Ordering::Relaxed));
    if !time::wait_until(10, || c.nmi.seq.load(Ordering::Acquire) != before) {
        return None;
    }
    Some(c.nmi.masked.load(Ordering::Relaxed) != 0)
}

/// One CPU's answer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    pub answered: bool,
    pub pc: u64,
    pub sp: u64,
    pub masked: bool,
}

impl Snapshot {
    /// Whether the interrupted code had interrupts enabled.
    pub fn irqs_on(&self) -> bool {
        !self.masked
    }
}

/// Sends an NMI to every other CPU (one all-but-self send where the hardware has it and every
/// present CPU has booted) and waits up to `ms` for the started ones to answer. The caller's
/// own entry is filled in directly.
pub fn dump_all(ms: u64) -> [Snapshot; MAX_CPUS] {
    let me = percpu::current_index().expect("on a CPU");
    let started = percpu::started_mask();
    let mut before = [0u64; MAX_CPUS];
    for (i, c) in CPUS.iter().enumerate() {
        before[i] = c.nmi.seq.load(Ordering::Acquire);
    }
    if !(percpu::all_present_started() && arch::send_nmi_all_but_self()) {
        for i in percpu::bits(started & !(1 << me)) {
            arch::send_nmi(CPUS[i].hw_id.load(Ordering::Relaxed));
        }
    }
    let answered = |i: usize| CPUS[i].nmi.seq.load(Ordering::Acquire) != before[i];
    time::wait_until(ms, || percpu::bits(started & !(1 << me)).all(answered));
    let mut out = [Snapshot::default(); MAX_CPUS];
    for i in percpu::bits(started) {
        out[i] = if i == me {
            Snapshot {
                answered: true,
                pc: arch::current_pc(),
                sp: arch::current_sp(),
                masked: !arch::irqs_enabled(),
            }
        } else if answered(i) {
            let r = &CPUS[i].nmi;
            Snapshot {
                answered: true,
                pc: r.pc.load(Ordering::Relaxed),
                sp: r.sp.load(Ordering::Relaxed),
                masked: r.masked.load(Ordering::Relaxed) != 0,
            }
        } else {
            Snapshot::default()
        };
    }
    out
}
