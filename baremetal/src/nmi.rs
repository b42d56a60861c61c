//! NMIs through the local APIC (delivery mode NMI). Each CPU's handler, on its own IST stack,
//! first records what it interrupted — RIP, RSP, RFLAGS (so whether interrupts were off) — and
//! bumps a sequence number, then calls the engine's `handle_nmi` (NMI calls, NMI reports).
//! `dump_all` is the platform's own all-CPU dump: the CPU that asked collects the records.

use core::sync::atomic::Ordering;

use crate::config::MAX_CPUS;
use crate::idt::Frame;
use crate::percpu::{self, CPUS};
use crate::{apic, arch, time};

/// NMI handler: record and return. No locks, no printing, no ICR writes.
pub fn on_nmi(frame: &Frame) {
    let Some(me) = percpu::current_index() else {
        return;
    };
    let c = &CPUS[me];
    c.in_nmi.fetch_add(1, Ordering::Relaxed);
    let r = &c.nmi;
    r.rip.store(frame.rip, Ordering::Relaxed);
    r.rsp.store(frame.rsp, Ordering::Relaxed);
    r.rflags.store(frame.rflags, Ordering::Relaxed);
    r.tsc.store(arch::rdtsc(), Ordering::Relaxed);
    r.seq.fetch_add(1, Ordering::Release);
    if let Some(engine) = crate::platform::try_engine() {
        engine.handle_nmi();
    }
    c.in_nmi.fetch_sub(1, Ordering::Relaxed);
}

/// Whether the code the current NMI interrupted had interrupts masked (inside an NMI handler
/// IF is always 0; this is the interrupted context's IF). `None` outside an NMI handler.
pub fn interrupted_irqs_masked() -> Option<bool> {
    let c = &CPUS[percpu::current_index()?];
    if c.in_nmi.load(Ordering::Relaxed) == 0 {
        return None;
    }
    Some(c.nmi.rflags.load(Ordering::Relaxed) & arch::RFLAGS_IF == 0)
}

/// Whether `cpu` has interrupts masked right now, asked by NMI: its handler records the
/// interrupted RFLAGS. Bounded (10 ms: a halted vCPU thread must be woken by the host); `None` if it does not answer, is not started, or if
/// the caller is itself inside an NMI handler (it must not touch the ICR then: the code it
/// interrupted may be between the two ICR writes).
pub fn probe_irqs_masked(cpu: usize) -> Option<bool> {
    let me = percpu::current_index()?;
    if cpu == me {
        return Some(interrupted_irqs_masked().unwrap_or(!arch::irqs_enabled()));
    }
    let c = CPUS.get(cpu)?;
    if !c.started.load(Ordering::Acquire) || CPUS[me].in_nmi.load(Ordering::Relaxed) != 0 {
        return None;
    }
    let before = c.nmi.seq.load(Ordering::Acquire);
    apic::send_nmi(c.apic_id.load(Ordering::Relaxed));
    if !time::wait_until(10, || c.nmi.seq.load(Ordering::Acquire) != before) {
        return None;
    }
    Some(c.nmi.rflags.load(Ordering::Relaxed) & arch::RFLAGS_IF == 0)
}

/// One CPU's answer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    pub answered: bool,
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
}

impl Snapshot {
    /// Whether the interrupted code had interrupts enabled.
    pub fn irqs_on(&self) -> bool {
        self.rflags & arch::RFLAGS_IF != 0
    }
}

/// Sends an NMI to every other CPU (one all-but-self ICR write) and waits up to `ms` for the
/// started ones to answer. The caller's own entry is filled in directly.
pub fn dump_all(ms: u64) -> [Snapshot; MAX_CPUS] {
    let me = percpu::current_index().expect("on a CPU");
    let started = percpu::started_mask();
    let mut before = [0u64; MAX_CPUS];
    for (i, c) in CPUS.iter().enumerate() {
        before[i] = c.nmi.seq.load(Ordering::Acquire);
    }
    if percpu::all_present_started() {
        apic::send_nmi_all_but_self();
    } else {
        // Not every present CPU booted: the shorthand would also reach CPUs without an IDT.
        for i in percpu::bits(started & !(1 << me)) {
            apic::send_nmi(CPUS[i].apic_id.load(Ordering::Relaxed));
        }
    }
    let answered = |i: usize| CPUS[i].nmi.seq.load(Ordering::Acquire) != before[i];
    time::wait_until(ms, || percpu::bits(started & !(1 << me)).all(answered));
    let mut out = [Snapshot::default(); MAX_CPUS];
    for i in percpu::bits(started) {
        out[i] = if i == me {
            Snapshot {
                answered: true,
                rip: arch::current_rip(),
                rsp: arch::current_rsp(),
                rflags: arch::rflags(),
            }
        } else if answered(i) {
            let r = &CPUS[i].nmi;
            Snapshot {
                answered: true,
                rip: r.rip.load(Ordering::Relaxed),
                rsp: r.rsp.load(Ordering::Relaxed),
                rflags: r.rflags.load(Ordering::Relaxed),
            }
        } else {
            Snapshot::default()
        };
    }
    out
}
