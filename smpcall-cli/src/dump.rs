//! `smpcall dump`: the sysrq-style dump of seed 000, reachable from the command line.
//!
//! Starts a hosted machine, runs a short mixed workload (every CPU calls the others, waiting
//! and not), then **holds one CPU with interrupts masked** (the last one) while CPU 0 sends it
//! a no-wait call and, with three CPUs or more, CPU 1 a waiting one — so that calls are in
//! flight — and prints:
//!
//! 1. the machine's dump ([`Machine::dump`]): every CPU's counters (requested / responded,
//!    IPIs sent / elided / received, flushes), whether it is masked, in a handler, polling,
//!    its queue, what it waits for, and every call-data slot in flight;
//! 2. an NMI report of every CPU: CPU 0 runs `nmi_call_many` on all CPUs (NMIs reach the
//!    masked CPU too); each CPU's NMI handler records what it finds in atomics — interrupts
//!    masked, inside a call handler, inside an RCU reader, its queue, its thread — which are
//!    printed afterwards (NMI handlers must not format or lock);
//!
//! then releases the held CPU, checks that the calls in flight ran, and shuts down.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use smpcall::hosted::{HostEngine, IdlePolicy, Machine};
use smpcall::{CpuId, CpuMask, Error};

use crate::duration::parse_timeout;
use crate::SetupError;

/// Options of `smpcall dump`.
#[derive(Clone, Debug, Args)]
pub struct DumpArgs {
    /// CPUs of the hosted machine (2-1024): the last one is held masked while others send it
    /// calls.
    #[arg(long, default_value_t = 4)]
    pub cpus: usize,
    /// Bound on each wait (the workload, the held CPU, the drain, shutdown).
    #[arg(long, default_value = "20s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

/// Calls each CPU makes in the warm-up workload (a quarter of each kind).
pub const WARMUP_CALLS: u64 = 200;

/// What one CPU's NMI handler found (atomics: written in NMI context, read afterwards).
#[derive(Debug, Default)]
struct NmiFacts {
    /// Set when the handler ran.
    seen: AtomicBool,
    masked: AtomicBool,
    in_handler: AtomicBool,
    rcu_reader: AtomicBool,
    queued: AtomicBool,
    polling: AtomicBool,
    online: AtomicBool,
    tid: AtomicU64,
    nmis: AtomicU64,
}

/// Runs the dump scenario on `cpus` CPUs and returns its text (the dump, the NMI report, the
/// outcome of the release). `Err` if the machine cannot start or a bounded wait expires.
pub fn run(args: &DumpArgs) -> Result<String, SetupError> {
    let n = args.cpus;
    // One CPU is held masked while another sends it calls.
    if !(2..=smpcall::MAX_CPUS).contains(&n) {
        return Err(SetupError::Cpus {
            workload: "dump",
            requested: n,
            min: 2,
            max: smpcall::MAX_CPUS,
        });
    }
    let limit = args.timeout;
    let machine = Machine::builder()
        .cpus(n)
        .idle(IdlePolicy::PollThenSleep(Duration::from_micros(50)))
        .timeout(limit)
        .build()?;
    let mut out = String::new();

    // 1. A short mixed workload on every CPU.
    let ran = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..n)
        .map(|cpu| {
            let ran = Arc::clone(&ran);
            machine.run_on(cpu, move |e| warm_up(e, cpu, n, &ran))
        })
        .collect();
    for mut w in workers {
        w.join_timeout(limit)??;
    }
    bounded(limit, "the warm-up calls to drain", || {
        machine.engine().is_quiescent()
    })?;
    let _ = writeln!(
        out,
        "smpcall dump: {n} CPUs; warm-up: {} calls from every CPU, {} function runs",
        WARMUP_CALLS,
        ran.load(Ordering::Relaxed)
    );

    // 2. Hold the last CPU masked; CPU 0 (no-wait) and CPU 1 (waiting, with 3+ CPUs) call it.
    let held = n - 1;
    let masked = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let mut holder = {
        let (masked, release) = (Arc::clone(&masked), Arc::clone(&release));
        machine.run_on(held, move |e| {
            let _irq = e.irq_save();
            masked.store(true, Ordering::SeqCst);
            let deadline = Instant::now() + limit;
            while !release.load(Ordering::SeqCst) && Instant::now() < deadline {
                thread::yield_now();
            }
        })
    };
    bounded(limit, "the held CPU to mask its interrupts", || {
        masked.load(Ordering::SeqCst)
    })?;
    let late = Arc::new(AtomicU64::new(0));
    let l2 = Arc::clone(&late);
    machine
        .run_on(0, move |e| {
            e.call_single_async(held, move |_| {
                l2.fetch_add(1, Ordering::Relaxed);
            })
        })
        .join_timeout(limit)??;
    let waiter = (n >= 3).then(|| {
        let late = Arc::clone(&late);
        machine.run_on(1, move |e| {
            e.call_single(held, |cpu| {
                late.fetch_add(1, Ordering::Relaxed);
                cpu
            })
        })
    });
    let in_flight = if waiter.is_some() { 2 } else { 1 };
    if waiter.is_some() {
        // Until CPU 1's waiting call is queued behind the held CPU's mask.
        bounded(limit, "CPU 1's waiting call to be queued", || {
            machine.engine().stats(held).unwrap().calls_queued
                >= machine.engine().stats(held).unwrap().calls_run + 2
        })?;
        // Let its wait register (the engine notes what a CPU waits for after a few hundred
        // spins, which can take a while when CPUs outnumber cores).
        bounded(limit, "CPU 1's wait to show in the dump", || {
            machine.dump().contains(&format!("waiting for CPU {held}"))
        })?;
    }
    let _ = writeln!(
        out,
        "holding CPU {held} with interrupts masked; {in_flight} call(s) to it in flight \
         (CPU 0 no-wait{})\n",
        if in_flight == 2 {
            ", CPU 1 waiting"
        } else {
            ""
        }
    );
    out.push_str(&machine.dump());

    // 3. NMI report of every CPU, from CPU 0.
    let facts: Arc<Vec<NmiFacts>> = Arc::new((0..n).map(|_| NmiFacts::default()).collect());
    let f2 = Arc::clone(&facts);
    let reached = machine
        .run_on(0, move |e| {
            let all = CpuMask::first_n(e.nr_cpus());
            // SAFETY: `record_facts` only reads engine state and stores atomics (and calls
            // gettid): async-signal-safe.
            unsafe { e.nmi_call_many(&all, |cpu| record_facts(e, cpu, &f2)) }
        })
        .join_timeout(limit)??;
    let _ = writeln!(
        out,
        "\nNMI report (CPU 0 sent an NMI to every online CPU {{{reached}}}; each recorded what it \
         was doing):"
    );
    for (cpu, f) in facts.iter().enumerate() {
        let sender = if cpu == 0 {
            " (the sender: ran it directly)"
        } else {
            ""
        };
        let _ = writeln!(out, "  {}{sender}", facts_line(cpu, f));
    }

    // 4. Release and check that the calls in flight ran.
    release.store(true, Ordering::SeqCst);
    holder.join_timeout(limit)?;
    if let Some(mut w) = waiter {
        let ran_on = w.join_timeout(limit)??;
        if ran_on != held {
            return Err(SetupError::WrongCpu {
                expected: held,
                ran_on,
            });
        }
    }
    bounded(
        limit,
        "the calls in flight to run after the release",
        || late.load(Ordering::Relaxed) == in_flight && machine.engine().is_quiescent(),
    )?;
    let dump_after = machine.dump();
    let still = dump_after
        .lines()
        .filter(|l| l.contains("in flight"))
        .count();
    let _ = writeln!(
        out,
        "\nreleased CPU {held}: the {in_flight} call(s) in flight ran; {still} call-data slot(s) \
         still busy; offline runs {}",
        machine.engine().total_stats().offline_runs
    );
    machine.shutdown()?;
    out.push_str("shut down cleanly");
    Ok(out)
}

/// One CPU's warm-up: a mix of waiting, no-wait and many-calls to the other CPUs.
fn warm_up(e: &HostEngine, me: CpuId, n: usize, ran: &Arc<AtomicU64>) -> Result<(), Error> {
    for i in 0..WARMUP_CALLS {
        let t = (me + 1 + (i as usize % (n - 1))) % n;
        match i % 4 {
            0 => e.call_single(t, |_| {
                ran.fetch_add(1, Ordering::Relaxed);
            })?,
            1 => {
                let r = Arc::clone(ran);
                e.call_single_async(t, move |_| {
                    r.fetch_add(1, Ordering::Relaxed);
                })?
            }
            2 => {
                e.call_others(|_| {
                    ran.fetch_add(1, Ordering::Relaxed);
                })?;
            }
            _ => {
                let r = Arc::clone(ran);
                e.call_all_async(move |_| {
                    r.fetch_add(1, Ordering::Relaxed);
                })?;
            }
        }
    }
    Ok(())
}

/// The NMI handler's part: atomics only (NMI context: no allocation, no lock, no formatting).
fn record_facts(e: &HostEngine, cpu: CpuId, facts: &[NmiFacts]) {
    let Some(f) = facts.get(cpu) else { return };
    // Relaxed: read by the same task after `nmi_call_many` waited for this handler.
    f.masked.store(e.irqs_masked(), Ordering::Relaxed);
    f.in_handler.store(e.in_handler(), Ordering::Relaxed);
    f.rcu_reader.store(e.rcu_read_held(), Ordering::Relaxed);
    f.queued.store(e.has_queued(cpu), Ordering::Relaxed);
    f.polling.store(e.is_polling(cpu), Ordering::Relaxed);
    f.online.store(e.is_online(cpu), Ordering::Relaxed);
    f.nmis.store(e.nmis_received(cpu), Ordering::Relaxed);
    // SAFETY: gettid has no preconditions and is async-signal-safe.
    f.tid
        .store(unsafe { libc::gettid() } as u64, Ordering::Relaxed);
    f.seen.store(true, Ordering::Release);
}

fn facts_line(cpu: CpuId, f: &NmiFacts) -> String {
    if !f.seen.load(Ordering::Acquire) {
        return format!("NMI CPU {cpu:>3}: not reached (offline)");
    }
    let yes = |b: &AtomicBool, y: &'static str, no: &'static str| {
        if b.load(Ordering::Relaxed) {
            y
        } else {
            no
        }
    };
    format!(
        "NMI CPU {cpu:>3}: {}, interrupts {}, {}, {}, queue {}, {}, thread {}, NMIs handled {}",
        yes(&f.online, "online", "offline"),
        yes(&f.masked, "masked", "on"),
        yes(&f.in_handler, "in a call handler", "not in a call handler"),
        yes(&f.rcu_reader, "in an RCU reader", "no RCU reader"),
        yes(&f.queued, "non-empty", "empty"),
        yes(&f.polling, "idle-polling", "not polling"),
        f.tid.load(Ordering::Relaxed),
        f.nmis.load(Ordering::Relaxed)
    )
}

/// Polls `done` (sleeping briefly) until it holds; `Err(TimedOut)` naming `what` after `limit`.
fn bounded(
    limit: Duration,
    what: &'static str,
    mut done: impl FnMut() -> bool,
) -> Result<(), SetupError> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return Err(SetupError::TimedOut { what, limit });
        }
        thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// Runs `smpcall dump` and prints its text to stdout. Exit status: 0 when the scenario
/// completed, 2 when it could not (bad arguments, a bounded wait expired).
pub fn run_command(args: &DumpArgs) -> ExitCode {
    match run(args) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("smpcall dump: error: {e}");
            ExitCode::from(2)
        }
    }
}
