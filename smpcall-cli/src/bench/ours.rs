//! Our side: smpcall calls on a hosted [`Machine`] whose CPU 0 (core 0) calls CPU 1 (core 1).

use std::hint::black_box;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use hdrhistogram::Histogram;
use serde::Serialize;
use smpcall::hosted::{HostEngine, IdlePolicy, Machine};
use smpcall::{Csd, Error};

use super::sample::{measure, rounds, Throughput};
use super::threads::{spin_until, Relax};
use super::{BenchError, Ctx, Padded};

/// Caller-owned call data per throughput round-robin ring.
pub const CSD_RING: usize = 128;

/// How the target CPU spends its time while it is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetState {
    /// Idle, polling its queue (`IdlePolicy::Poll`): no IPI needed.
    Polling,
    /// Running a task that spins inside an `interruptible` region (the sound default: the
    /// signal handler may run calls there): calls reach it by signal.
    Busy,
    /// Running a task that spins, on a machine built with the `unsafe`
    /// `run_calls_in_signal_handlers` opt-in: calls run in the handler wherever it lands.
    BusyUnchecked,
    /// Idle, asleep on its futex (`IdlePolicy::Sleep`): calls wake it.
    Sleeping,
}

/// Which many-call a broadcast row makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broadcast {
    /// `call_others`: every other CPU.
    Others,
    /// `call_all`: every CPU, the caller included (locally).
    All,
}

/// Which no-wait call a throughput row makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsyncKind {
    /// `call_async_csd` with a ring of [`CSD_RING`] caller-owned, pinned `Csd`s.
    CsdRing,
    /// `call_single_async` through the engine's per-sender slot.
    EngineSlot,
}

/// How calls reached their targets during a row, per call (warm-up included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Delivery {
    /// Calls made.
    pub calls: u64,
    /// IPIs the engine sent (queue went from empty to non-empty, target not polling).
    pub ipis_per_call: f64,
    /// IPIs the engine elided (target idle-polling).
    pub elided_per_call: f64,
    /// Real-time signals sent (IPIs to busy CPUs).
    pub signals_per_call: f64,
    /// Futex wakes sent (IPIs to sleeping CPUs).
    pub futex_wakes_per_call: f64,
}

/// Engine counters read before and after a row.
#[derive(Clone, Copy, Default)]
pub(super) struct Counters {
    ipis: u64,
    elided: u64,
    signals: u64,
    futex: u64,
}

pub(super) fn counters(e: &HostEngine) -> Counters {
    let t = e.total_stats();
    Counters {
        ipis: t.ipi_sent,
        elided: t.ipi_elided,
        signals: e.platform().signals_sent(),
        futex: e.platform().futex_wakes(),
    }
}

pub(super) fn delivery(before: Counters, after: Counters, calls: u64) -> Delivery {
    let per = |a: u64, b: u64| (b - a) as f64 / calls.max(1) as f64;
    Delivery {
        calls,
        ipis_per_call: per(before.ipis, after.ipis),
        elided_per_call: per(before.elided, after.elided),
        signals_per_call: per(before.signals, after.signals),
        futex_wakes_per_call: per(before.futex, after.futex),
    }
}

fn machine(ctx: &Ctx, cpus: usize, idle: IdlePolicy) -> Result<Machine, BenchError> {
    machine_with(ctx, cpus, idle, false)
}

fn machine_with(
    ctx: &Ctx,
    cpus: usize,
    idle: IdlePolicy,
    calls_in_handlers: bool,
) -> Result<Machine, BenchError> {
    let mut b = Machine::builder()
        .cpus(cpus)
        .idle(idle)
        .timeout(ctx.cfg.wait_bound);
    if calls_in_handlers {
        // SAFETY: the bench's call functions are async-signal-safe: they store atomics,
        // return integers, or spin on the bench clock (rdtsc / clock_gettime).
        b = unsafe { b.run_calls_in_signal_handlers() };
    }
    b.build().map_err(|error| BenchError::Engine {
        what: format!("starting a {cpus}-CPU machine"),
        error,
    })
}

pub(super) fn engine_err(what: &str) -> impl Fn(Error) -> BenchError + '_ {
    move |error| BenchError::Engine {
        what: what.to_string(),
        error,
    }
}

/// The result of the task on CPU 0 that measured `what`, as its `join_timeout` gave it: the
/// task's own result, a timeout naming the bound that join had, or the engine's refusal.
fn cpu0_result<R>(
    what: &str,
    joined: Result<Result<R, BenchError>, Error>,
) -> Result<R, BenchError> {
    match joined {
        Ok(r) => r,
        Err(Error::TimedOut { limit, .. }) => Err(BenchError::Timeout {
            what: format!("{what} (task on CPU 0)"),
            bound: limit,
        }),
        Err(error) => Err(engine_err(what)(error)),
    }
}

/// Runs `body` as a task on CPU 0 while CPU 1 is `state`, then shuts the machine down.
/// Every wait is bounded: the task by the row bound, the busy task and shutdown by
/// `wait_bound`.
fn on_cpu0<R, F>(
    ctx: &Ctx,
    what: &str,
    cpus: usize,
    state: TargetState,
    body: F,
) -> Result<R, BenchError>
where
    R: Send + 'static,
    F: FnOnce(&HostEngine) -> Result<R, BenchError> + Send + 'static,
{
    let idle = match state {
        TargetState::Sleeping => IdlePolicy::Sleep,
        TargetState::Polling | TargetState::Busy | TargetState::BusyUnchecked => IdlePolicy::Poll,
    };
    let unchecked = state == TargetState::BusyUnchecked;
    let m = machine_with(ctx, cpus, idle, unchecked)?;
    let stop = Arc::new(AtomicBool::new(false));
    let busy = if matches!(state, TargetState::Busy | TargetState::BusyUnchecked) {
        let started = Arc::new(AtomicBool::new(false));
        let (s1, st1) = (Arc::clone(&stop), Arc::clone(&started));
        let c = ctx.clone();
        let task = m.run_on(1, move |_e| {
            st1.store(true, Ordering::SeqCst);
            // Busy in task context until told to stop (bounded in case nobody does).
            let bound = c.clock.ticks(c.row_bound());
            let spin = || spin_until(&c.clock, bound, Relax::Spin, || s1.load(Ordering::Relaxed));
            if unchecked {
                spin();
            } else {
                // SAFETY: the loop reads the clock (rdtsc or clock_gettime) and an atomic:
                // async-signal-safe, nothing a call's function could interfere with.
                unsafe { smpcall::hosted::interruptible(spin) };
            }
        });
        if !spin_until(&ctx.clock, ctx.bound_ticks(), Relax::Yield, || {
            started.load(Ordering::SeqCst)
        }) {
            stop.store(true, Ordering::SeqCst);
            return Err(ctx.timeout(&format!("{what}: busy task on CPU 1 to start")));
        }
        Some(task)
    } else {
        None
    };
    let mut task = m.run_on(0, body);
    let result = task.join_timeout(ctx.row_bound());
    stop.store(true, Ordering::SeqCst);
    let busy_done = busy.map(|mut t| t.join_timeout(ctx.cfg.wait_bound));
    let down = m.shutdown();
    let r = cpu0_result(what, result)?;
    if let Some(Err(error)) = busy_done {
        return Err(engine_err(&format!("{what}: busy task on CPU 1"))(error));
    }
    down.map_err(engine_err(&format!("{what}: machine shutdown")))?;
    Ok(r)
}

/// Sync single calls `call_single(1, ..)` from CPU 0 of a 2-CPU machine to CPU 1 in `state`.
/// A sleeping target gets `cfg.sleep_pause` of (untimed) quiet before each call, to fall asleep.
pub fn sync_single(
    ctx: &Ctx,
    what: &str,
    state: TargetState,
) -> Result<(Histogram<u64>, Delivery), BenchError> {
    sync_single_diag(ctx, what, state, true)
}

/// [`sync_single`] with the engine's per-call diagnostics (route and function name recorded in
/// every call's data) switched on or off — the C9 "always-on diagnostics are cheap" check.
pub fn sync_single_diag(
    ctx: &Ctx,
    what: &str,
    state: TargetState,
    per_call_diagnostics: bool,
) -> Result<(Histogram<u64>, Delivery), BenchError> {
    let c = ctx.clone();
    let w = what.to_string();
    on_cpu0(ctx, what, 2, state, move |e| {
        e.set_call_diagnostics(per_call_diagnostics);
        let pause = match state {
            TargetState::Sleeping => c.clock.ticks(c.cfg.sleep_pause),
            _ => 0,
        };
        let before = counters(e);
        let mut calls = 0u64;
        let h = measure(&c.clock, &c.cfg, pause, || {
            calls += 1;
            black_box(
                e.call_single(1, black_box::<usize>)
                    .map_err(engine_err(&w))?,
            );
            Ok(())
        })?;
        Ok((h, delivery(before, counters(e), calls)))
    })
}

/// Many-calls with wait from CPU 0 of a `cpus`-CPU machine whose other CPUs idle by `idle`.
pub fn broadcast(
    ctx: &Ctx,
    what: &str,
    cpus: usize,
    kind: Broadcast,
    idle: IdlePolicy,
) -> Result<(Histogram<u64>, Delivery), BenchError> {
    let m = machine(ctx, cpus, idle)?;
    let c = ctx.clone();
    let w = what.to_string();
    let mut task = m.run_on(0, move |e: &HostEngine| {
        let before = counters(e);
        let mut calls = 0u64;
        let h = measure(&c.clock, &c.cfg, 0, || {
            calls += 1;
            let f = |cpu| {
                black_box(cpu);
            };
            let r = match kind {
                Broadcast::Others => e.call_others(f),
                Broadcast::All => e.call_all(f),
            };
            black_box(r.map_err(engine_err(&w))?);
            Ok(())
        })?;
        Ok::<_, BenchError>((h, delivery(before, counters(e), calls)))
    });
    let result = task.join_timeout(ctx.row_bound());
    let down = m.shutdown();
    let r = cpu0_result(what, result)?;
    down.map_err(engine_err(&format!("{what}: machine shutdown")))?;
    Ok(r)
}

/// `stop_machine(1, f)` from CPU 0 of a `cpus`-CPU machine whose other CPUs idle-poll: `f`
/// runs on CPU 1 while every other CPU spins with interrupts masked.
pub fn stop_machine(
    ctx: &Ctx,
    what: &str,
    cpus: usize,
) -> Result<(Histogram<u64>, Delivery), BenchError> {
    let c = ctx.clone();
    let w = what.to_string();
    on_cpu0(ctx, what, cpus, TargetState::Polling, move |e| {
        let before = counters(e);
        let mut calls = 0u64;
        let h = measure(&c.clock, &c.cfg, 0, || {
            calls += 1;
            black_box(
                e.stop_machine(1, || black_box(1u64))
                    .map_err(engine_err(&w))?,
            );
            Ok(())
        })?;
        Ok((h, delivery(before, counters(e), calls)))
    })
}

/// No-wait calls from CPU 0 to CPU 1 (in `state`), `cfg.messages` per round; each call's
/// function adds one to a counter, and a round ends when CPU 0 sees the count.
pub fn throughput(
    ctx: &Ctx,
    what: &str,
    kind: AsyncKind,
    state: TargetState,
) -> Result<(Throughput, Delivery), BenchError> {
    // The functions of no-wait calls must be 'static: they count into a leaked counter (one
    // cache line per row, never freed).
    let counter: &'static Padded<AtomicU64> = Box::leak(Box::new(Padded(AtomicU64::new(0))));
    let c = ctx.clone();
    let w = what.to_string();
    on_cpu0(ctx, what, 2, state, move |e| {
        let ring: Vec<Pin<Box<Csd>>> = match kind {
            AsyncKind::CsdRing => (0..CSD_RING).map(|_| Box::pin(Csd::new())).collect(),
            AsyncKind::EngineSlot => Vec::new(),
        };
        let relax = c.topo.relax(2);
        let count = move |_cpu| {
            // Relaxed: a count; CPU 0's Acquire load sees it once the call ran.
            counter.0.fetch_add(1, Ordering::Relaxed);
        };
        let before = counters(e);
        let mut expected = counter.0.load(Ordering::Relaxed);
        let t = rounds(&c.clock, &c.cfg, || {
            let t0 = c.clock.now();
            for i in 0..c.cfg.messages {
                match kind {
                    AsyncKind::EngineSlot => {
                        e.call_single_async(1, count).map_err(engine_err(&w))?;
                    }
                    AsyncKind::CsdRing => {
                        let csd = ring[i as usize % CSD_RING].as_ref();
                        loop {
                            match e.call_async_csd(csd, 1, count) {
                                Ok(()) => break,
                                Err(Error::Busy) => {
                                    if !spin_until(&c.clock, c.bound_ticks(), relax, || {
                                        !csd.is_busy()
                                    }) {
                                        return Err(c.timeout(&format!(
                                            "{w}: CPU 1 to take a queued call"
                                        )));
                                    }
                                }
                                Err(error) => return Err(engine_err(&w)(error)),
                            }
                        }
                    }
                }
            }
            expected += c.cfg.messages;
            if !spin_until(&c.clock, c.bound_ticks(), relax, || {
                counter.0.load(Ordering::Acquire) >= expected
            }) {
                return Err(c.timeout(&format!("{w}: CPU 1 to run the calls")));
            }
            Ok(c.clock.now() - t0)
        })?;
        let calls = t.messages_per_round * (t.rounds + 1);
        Ok((t, delivery(before, counters(e), calls)))
    })
}

/// Who makes the calls of [`sync_single_own_thread`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnThread {
    /// A thread of the bench's own, attached as a CPU (`Machine::attach`).
    Attached,
    /// A thread of the bench's own that is not a CPU (a foreign sender: stack call data).
    Foreign,
}

/// Sync single calls to polling CPU 1 from a thread of the bench's own pinned to core 0 (the
/// core of CPU 0, which sleeps in a task meanwhile): the "your own threads" modes next to the
/// spawned CPU 0 of [`sync_single`].
pub fn sync_single_own_thread(
    ctx: &Ctx,
    what: &str,
    who: OwnThread,
) -> Result<(Histogram<u64>, Delivery), BenchError> {
    let m = Machine::builder()
        .cpus(2)
        .attach_slots(1)
        .idle(IdlePolicy::Poll)
        // CPU i on core i (Auto would not pin: 3 CPU slots on 2 cores).
        .pinning(smpcall::hosted::Pinning::Always)
        .timeout(ctx.cfg.wait_bound)
        .build()
        .map_err(engine_err("starting a machine with an attach slot"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    let mut sleeper = m.run_on(0, move |_| {
        while !s2.load(Ordering::SeqCst) {
            smpcall::hosted::sleep(std::time::Duration::from_millis(1));
        }
    });
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            ctx.topo.pin(0, 2);
            let guard = match who {
                OwnThread::Attached => Some(m.attach().map_err(engine_err(what))?),
                OwnThread::Foreign => None,
            };
            let e = m.engine();
            let before = counters(e);
            let mut calls = 0u64;
            let h = measure(&ctx.clock, &ctx.cfg, 0, || {
                calls += 1;
                black_box(
                    e.call_single(1, black_box::<usize>)
                        .map_err(engine_err(what))?,
                );
                Ok(())
            })?;
            drop(guard);
            Ok((h, delivery(before, counters(e), calls)))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(BenchError::Panicked {
                what: format!("{what}: the calling thread"),
                message: "its panic message is printed above".into(),
            })
        })
    });
    stop.store(true, Ordering::SeqCst);
    let slept = sleeper.join_timeout(ctx.cfg.wait_bound);
    m.shutdown()
        .map_err(engine_err(&format!("{what}: machine shutdown")))?;
    slept.map_err(engine_err(&format!("{what}: CPU 0's sleeping task")))?;
    result
}
