//! Hotplug cycling during the torture run (`--onoff INTERVAL`, like the kernel's onoff option).
//!
//! **Who drives it.** CPU 0's torture task, between two of its own calls: every `INTERVAL` it
//! either takes a random other CPU down (`Engine::cpu_down`, a stop_machine) or brings the
//! one it took down back up (`Engine::cpu_up`). CPU 0 itself never goes down (the engine
//! refuses a CPU taking itself down anyway), and at most one CPU is down at a time, so at
//! least one CPU always stays online. It starts only after every CPU's task has passed the
//! start barrier (a task cannot be started on an offline CPU), and the last CPU taken down is
//! brought back before CPU 0's task ends, so the drain and shutdown see every CPU online.
//!
//! **What the workload does meanwhile.** Every CPU keeps issuing calls. A call to an offline
//! CPU is refused with `Error::Offline(cpu)`; many-calls skip offline CPUs and return the mask
//! they queued to, which becomes the call's expected CPUs (it must still be a subset of the
//! requested CPUs, and CPU 0 is never pruned). The task of an offline CPU keeps running; its
//! calls are refused with `Offline(itself)` and it backs off (sleeps a quarter interval).
//! Both kinds of refusal are expected and counted. The driver marks a CPU offline in the
//! ledger after `cpu_down` returned and clears the mark before `cpu_up`, so that a function
//! running on a marked CPU is known to have run on an offline CPU (`ipi-to-offline`).

use std::time::{Duration, Instant};

use smpcall::hosted::HostEngine;
use smpcall::{CpuId, Error};

use super::ledger::Ledger;
use super::rng::Rng;

/// CPU 0's hotplug state machine (see the module docs).
#[derive(Debug)]
pub(crate) struct Driver {
    interval: Duration,
    next: Instant,
    down: Option<CpuId>,
    n: usize,
    rng: Rng,
    /// Failed hotplug operations, as text (each is an incident).
    pub(crate) errors: Vec<String>,
}

impl Driver {
    /// A driver for an `n`-CPU machine (`n >= 2`), cycling every `interval` from now on.
    pub(crate) fn new(n: usize, interval: Duration, seed: u64) -> Driver {
        Driver {
            interval,
            next: Instant::now() + interval,
            down: None,
            n,
            // A stream no CPU's workload uses.
            rng: Rng::for_stream(seed, 0x6f6e_6f66),
            errors: Vec::new(),
        }
    }

    /// One step if one is due: take a random CPU down, or bring the one down back up. Runs on
    /// CPU 0 in task context, outside any RCU read-side section.
    pub(crate) fn tick(&mut self, engine: &HostEngine, ledger: &Ledger) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next = now + self.interval;
        match self.down {
            Some(cpu) => self.up(engine, ledger, cpu),
            None => {
                let cpu = 1 + self.rng.below(self.n as u64 - 1) as CpuId;
                match engine.cpu_down(cpu) {
                    Ok(()) => {
                        ledger.set_offline(cpu, true);
                        self.down = Some(cpu);
                    }
                    // The victim was busy outside a safe point with calls queued to it: nothing
                    // happened (counted by the engine); try again at the next tick.
                    Err(Error::NotAtSafePoint(_)) => {}
                    Err(e) => self.errors.push(format!("cpu_down({cpu}) from CPU 0: {e}")),
                }
            }
        }
    }

    fn up(&mut self, engine: &HostEngine, ledger: &Ledger, cpu: CpuId) {
        ledger.set_offline(cpu, false);
        match engine.cpu_up(cpu) {
            Ok(()) => self.down = None,
            Err(e) => {
                // Still down as far as we know: keep the mark.
                ledger.set_offline(cpu, true);
                self.errors.push(format!("cpu_up({cpu}) from CPU 0: {e}"));
            }
        }
    }

    /// Brings the CPU that is down (if any) back up: the run's end.
    pub(crate) fn finish(&mut self, engine: &HostEngine, ledger: &Ledger) {
        if let Some(cpu) = self.down {
            self.up(engine, ledger, cpu);
        }
    }
}

/// What hotplug cycling did, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct HotplugSummary {
    /// The `--onoff` interval, ms.
    pub interval_ms: f64,
    /// Completed `cpu_down`s (engine).
    pub cycles_offline: u64,
    /// Completed `cpu_up`s (engine).
    pub cycles_online: u64,
    /// `cpu_down`s refused because the victim was busy outside a safe point with calls queued
    /// (nothing happened; the driver tries again at its next tick).
    pub downs_refused_busy: u64,
    /// stop_machine runs (engine; every `cpu_down` is one).
    pub stop_machines: u64,
    /// Calls refused with `Error::Offline` (expected under hotplug).
    pub offline_refusals: u64,
    /// ... of which the caller's own CPU was offline.
    pub offline_refusals_own_cpu: u64,
    /// Calls an offline CPU found and ran (engine `offline_runs`; must be 0).
    pub offline_runs: u64,
    /// Function runs the torture saw on a CPU its driver had taken down (must be 0).
    pub offline_runs_seen: u64,
    /// Local runs by a caller whose CPU went down between the engine's online check and the
    /// run (informational: the task itself runs on the offline CPU too).
    pub local_runs_after_offline: u64,
}
