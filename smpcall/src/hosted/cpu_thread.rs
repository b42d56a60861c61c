//! The body of a CPU thread: tasks, the idle loop (poll, sleep, park while offline).

use std::sync::atomic::{compiler_fence, fence, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::attach::{become_cpu, forget_cpu};
use super::builder::IdlePolicy;
use super::machine::Inner;
use super::platform::{HostCpu, AWAKE, SLEEPING};
use super::HostEngine;
use crate::cpumask::CpuId;

/// The body of a CPU thread.
pub(super) fn cpu_main(inner: Arc<Inner>, cpu: CpuId, core: Option<core_affinity::CoreId>) {
    if let Some(core) = core {
        core_affinity::set_for_current(core);
    }
    let engine = &inner.engine;
    let platform = engine.platform();
    let hc = &platform.cpus[cpu];
    // The same identity an attached thread of yours gets (attach.rs).
    become_cpu(engine, cpu);
    hc.started.store(true, Ordering::SeqCst);

    loop {
        if hc.has_tasks.load(Ordering::SeqCst) {
            let job = {
                let mut q = hc.tasks.lock().unwrap_or_else(|e| e.into_inner());
                let job = q.pop_front();
                if q.is_empty() {
                    hc.has_tasks.store(false, Ordering::SeqCst);
                }
                job
            };
            if let Some(job) = job {
                job(engine);
                continue;
            }
        }
        if hc.stop.load(Ordering::SeqCst) {
            hc.parked.store(true, Ordering::SeqCst);
            if hc.exit.load(Ordering::SeqCst) {
                break;
            }
        }
        idle(&inner, cpu, hc);
    }

    // Leave no handler that can reach this CPU's memory: block the signal, then forget who we
    // are. A signal still pending is discarded with the thread.
    forget_cpu(platform);
}

fn wants_attention(hc: &HostCpu) -> bool {
    hc.has_tasks.load(Ordering::Relaxed)
        || (hc.stop.load(Ordering::Relaxed) && !hc.parked.load(Ordering::Relaxed))
        || hc.exit.load(Ordering::Relaxed)
}

fn idle(inner: &Inner, cpu: CpuId, hc: &HostCpu) {
    let engine = &inner.engine;
    // Idle time is an extended quiescent state: RCU skips this CPU (no IPI).
    // SAFETY: the idle loop of this CPU's thread, between tasks: no reader is open here.
    unsafe { engine.idle_enter() };
    // The idle wait is interruptible: it polls atomics, reads the clock and sleeps on a futex
    // (all async-signal-safe), so a signal landing here may run any call at once.
    // Relaxed: this thread's own counter (see `interruptible`).
    hc.interruptible.store(
        hc.interruptible.load(Ordering::Relaxed) + 1,
        Ordering::Relaxed,
    );
    compiler_fence(Ordering::SeqCst);
    idle_wait(inner, cpu, hc);
    compiler_fence(Ordering::SeqCst);
    hc.interruptible.store(
        hc.interruptible.load(Ordering::Relaxed) - 1,
        Ordering::Relaxed,
    );
    // SAFETY: pairs with the idle_enter above, on this CPU.
    unsafe { engine.idle_exit() };
}

fn idle_wait(inner: &Inner, cpu: CpuId, hc: &HostCpu) {
    let engine = &inner.engine;
    if !engine.is_online(cpu) {
        // Offline: park until brought up (cpu_up kicks us), a task, or exit.
        sleep_once(engine, cpu, hc, false);
        return;
    }
    match inner.idle {
        // SAFETY: the idle loop, at task level of this CPU's thread.
        IdlePolicy::Poll => unsafe { engine.idle_poll(|| wants_attention(hc)) },
        IdlePolicy::Sleep => sleep_once(engine, cpu, hc, true),
        IdlePolicy::PollThenSleep(limit) => {
            let start = Instant::now();
            let mut spins = 0u32;
            let mut expired = false;
            // SAFETY: as above.
            unsafe {
                engine.idle_poll(|| {
                    spins = spins.wrapping_add(1);
                    if spins % 64 == 0 && start.elapsed() > limit {
                        expired = true;
                    }
                    expired || wants_attention(hc)
                })
            };
            if expired && !wants_attention(hc) {
                sleep_once(engine, cpu, hc, true);
            }
        }
    }
}

/// Sleeps on the CPU's futex word until a call, a task or a stop request wakes it.
fn sleep_once(engine: &HostEngine, cpu: CpuId, hc: &HostCpu, was_online: bool) {
    hc.state.store(SLEEPING, Ordering::SeqCst);
    // SeqCst fence: pairs with the sender's push / fence / `wake_if_sleeping` CAS: either it
    // sees SLEEPING and wakes us, or we see its call here.
    fence(Ordering::SeqCst);
    // An offline CPU sleeps until it is brought up; an online one until a call or a task.
    if !engine.has_queued(cpu) && !wants_attention(hc) && engine.is_online(cpu) == was_online {
        atomic_wait::wait(&hc.state, SLEEPING);
    }
    hc.state.store(AWAKE, Ordering::SeqCst);
    if engine.has_queued(cpu) {
        // SAFETY: this CPU's idle loop, at task level: every call may run here.
        unsafe { engine.handle_ipi() };
    }
}
