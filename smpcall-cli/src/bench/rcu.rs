//! User-space RCU side by side: smpcall's expedited RCU on a hosted [`Machine`] (readers and
//! writer are threads attached with [`Machine::attach`]) against each flavour of liburcu
//! ([`urcu`], loaded at run time).
//!
//! * **read side** — one thread, lock + unlock in a loop: rounds of `cfg.messages` pairs,
//!   reported as nanoseconds per pair. liburcu's read side goes through its exported functions
//!   (a call each), which slightly disfavours it (C users inline it).
//! * **grace period, busy readers** — [`busy_readers`] threads loop over empty read-side
//!   sections (smpcall readers pass [`safe_point`] between sections, qsbr readers
//!   `quiescent_state`); a writer times `synchronize_rcu` / `synchronize_rcu_expedited`.
//! * **grace period, blocked readers** — [`BLOCKED_READERS`] threads block in `read(2)` on a
//!   pipe nobody writes to, outside any read-side section (qsbr: offline; smpcall: inside
//!   `hosted::quiet`, or, for the `_signalled` row, plainly — each grace period then signals
//!   them and their `read` restarts). Closing the pipe releases them.
//!
//! Every wait is bounded: the writer by the row bound, readers by `wait_bound` once the writer
//! is done; the pipe's write end and the stop flag live in guards, so every way out of a row
//! releases the readers.

use std::io::{PipeReader, PipeWriter, Read};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use smpcall::hosted::{quiet, safe_point, HostEngine, IdlePolicy, Machine};

use super::ours::{counters, delivery, engine_err, Delivery};
use super::sample::{measure, rounds, Throughput};
use super::threads::{spawn, spin_until, Relax, Worker};
use super::urcu::{self, Flavour, Registered, Urcu};
use super::{BenchError, Ctx};

/// Readers blocked in a system call during the blocked-reader rows.
pub const BLOCKED_READERS: usize = 2;

/// Busy readers: one per core besides the writer's, at least 1, at most 2.
pub fn busy_readers(cores: usize) -> usize {
    cores.saturating_sub(1).clamp(1, 2)
}

/// Whose RCU a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// smpcall's expedited RCU.
    Smpcall,
    /// A liburcu flavour.
    Urcu(Flavour),
}

/// What the readers do while the writer times grace periods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readers {
    /// Loop over empty read-side sections.
    Busy,
    /// Blocked in `read(2)` in an extended quiescent state (smpcall: `hosted::quiet`; qsbr:
    /// offline; memb/mb/signal: simply registered and outside a section).
    Blocked,
    /// smpcall only: blocked in `read(2)` with no quiet region (signalled per grace period).
    BlockedSignalled,
}

/// The library of a liburcu row, or the reason it cannot run (the skipped row's reason).
pub fn available(who: Who) -> Result<(), String> {
    match who {
        Who::Smpcall => Ok(()),
        Who::Urcu(f) => urcu::load(f).map(|_| ()),
    }
}

fn lib(f: Flavour) -> Result<&'static Urcu, BenchError> {
    urcu::load(f).map_err(BenchError::Setup)
}

/// A machine for `attached` threads of ours: one spawned CPU, asleep when idle (so grace
/// periods skip it), and that many slots to attach to.
fn machine(ctx: &Ctx, attached: usize) -> Result<Arc<Machine>, BenchError> {
    Machine::builder()
        .cpus(1)
        .idle(IdlePolicy::Sleep)
        .attach_slots(attached)
        .timeout(ctx.cfg.wait_bound)
        .build()
        .map(Arc::new)
        .map_err(engine_err("starting a machine for RCU rows"))
}

/// Shuts the machine down once every thread let go of it. A thread left behind (a timeout,
/// already reported) keeps it; it shuts down when that thread ends.
fn shutdown(m: Arc<Machine>) -> Result<(), BenchError> {
    match Arc::try_unwrap(m) {
        Ok(m) => m
            .shutdown()
            .map_err(engine_err("RCU rows: machine shutdown")),
        Err(_) => Ok(()),
    }
}

/// Read-side cost: rounds of `cfg.messages` lock + unlock pairs on one thread (core 1 when
/// the host has two cores). The returned rates are pairs per second.
pub fn read_cost(ctx: &Ctx, what: &str, who: Who) -> Result<Throughput, BenchError> {
    let c = ctx.clone();
    let w = what.to_string();
    let n = ctx.cfg.messages.max(1);
    match who {
        Who::Smpcall => {
            let m = machine(ctx, 1)?;
            let m2 = Arc::clone(&m);
            let worker = spawn(&ctx.topo, Some((1, 2)), what, move || {
                let me = m2.attach().map_err(engine_err(&w))?;
                let e = me.engine();
                let t = rounds(&c.clock, &c.cfg, || {
                    let t0 = c.clock.now();
                    for _ in 0..n {
                        let _section = e.rcu_read_lock().map_err(engine_err(&w))?;
                    }
                    Ok(c.clock.now().saturating_sub(t0))
                });
                drop(me);
                drop(m2);
                t
            })?;
            let r = worker.join(ctx.row_bound());
            shutdown(m)?;
            r?
        }
        Who::Urcu(f) => {
            let u = lib(f)?;
            spawn(&ctx.topo, Some((1, 2)), what, move || {
                let _reg = Registered::new(u);
                rounds(&c.clock, &c.cfg, || {
                    let t0 = c.clock.now();
                    for _ in 0..n {
                        u.read_section();
                    }
                    Ok(c.clock.now().saturating_sub(t0))
                })
            })?
            .join(ctx.row_bound())?
        }
    }
}

/// Raises the flag when dropped: every way out of a row stops its busy readers.
struct RaiseOnDrop(Arc<AtomicBool>);

impl Drop for RaiseOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What the writer thread owns: dropping it releases every reader (stop flag raised, the
/// pipe's write end closed: blocked `read`s return end-of-file).
struct Release {
    _stop: RaiseOnDrop,
    _pipe: PipeWriter,
}

/// A blocked reader's wait: one `read` on the pipe, which returns only when its write end is
/// closed (restarted after signals: the machine's and liburcu-signal's handlers are
/// `SA_RESTART`).
fn block_in_read(rd: &PipeReader) -> Result<(), BenchError> {
    let mut byte = [0u8; 1];
    loop {
        match (&*rd).read(&mut byte) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BenchError::Setup(format!("blocked reader: read: {e}"))),
        }
    }
}

/// Grace-period latency with readers in state `readers`: the histogram of
/// `synchronize_rcu(_expedited)` times, and (smpcall) IPIs and signals per grace period.
pub fn grace_period(
    ctx: &Ctx,
    what: &str,
    who: Who,
    readers: Readers,
) -> Result<(Histogram<u64>, Option<Delivery>), BenchError> {
    let n = match readers {
        Readers::Busy => busy_readers(ctx.topo.cores()),
        Readers::Blocked | Readers::BlockedSignalled => BLOCKED_READERS,
    };
    let (rd, wr) = std::io::pipe().map_err(|e| BenchError::Setup(format!("pipe: {e}")))?;
    let rd = Arc::new(rd);
    let stop = Arc::new(AtomicBool::new(false));
    let release = Release {
        _stop: RaiseOnDrop(Arc::clone(&stop)),
        _pipe: wr,
    };
    // Readers that have started (and, for smpcall, attached); they count down as they leave
    // ([`Present`]).
    let ready = Arc::new(AtomicUsize::new(0));
    let m = match who {
        Who::Smpcall => Some(machine(ctx, n + 1)?),
        Who::Urcu(_) => None,
    };
    let u = match who {
        Who::Urcu(f) => Some(lib(f)?),
        Who::Smpcall => None,
    };
    let mut workers: Vec<Worker<Result<(), BenchError>>> = Vec::new();
    for i in 0..n {
        let (rd, stop, ready, m) = (
            Arc::clone(&rd),
            Arc::clone(&stop),
            Arc::clone(&ready),
            m.clone(),
        );
        let w = format!("{what} reader {i}");
        // Busy readers get cores of their own (the writer has core 0) when they fit.
        let core = (readers == Readers::Busy).then_some((1 + i, n + 1));
        let w2 = w.clone();
        workers.push(spawn(&ctx.topo, core, &w, move || {
            reader(&w2, m.as_deref(), u, readers, &rd, &stop, &ready)
        })?);
    }
    let (c, w, ready_w, m_w) = (ctx.clone(), what.to_string(), Arc::clone(&ready), m.clone());
    let writer = spawn(
        &ctx.topo,
        Some((0, 1)),
        &format!("{what} writer"),
        move || writer(&c, &w, m_w, u, n, &ready_w, release),
    )?;
    let result = writer.join(ctx.row_bound());
    stop.store(true, Ordering::SeqCst);
    let mut joined = Ok(());
    for r in workers {
        let r = r.join(ctx.cfg.wait_bound).and_then(|r| r);
        if joined.is_ok() {
            joined = r;
        }
    }
    if let Some(m) = m {
        shutdown(m)?;
    }
    let r = result??;
    joined?;
    Ok(r)
}

/// A reader counted in the writer's `ready` while alive.
struct Present<'a>(&'a AtomicUsize);

impl<'a> Present<'a> {
    fn new(ready: &'a AtomicUsize) -> Present<'a> {
        ready.fetch_add(1, Ordering::SeqCst);
        Present(ready)
    }
}

impl Drop for Present<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A reader thread's life: attach or register, tell the writer, read until released, leave.
fn reader(
    what: &str,
    m: Option<&Machine>,
    u: Option<&'static Urcu>,
    readers: Readers,
    rd: &PipeReader,
    stop: &AtomicBool,
    ready: &AtomicUsize,
) -> Result<(), BenchError> {
    if let Some(m) = m {
        let me = m.attach().map_err(engine_err(what))?;
        let e = me.engine();
        let present = Present::new(ready);
        match readers {
            Readers::Busy => {
                while !stop.load(Ordering::Relaxed) {
                    drop(e.rcu_read_lock().map_err(engine_err(what))?);
                    safe_point();
                }
            }
            Readers::Blocked => quiet(|| block_in_read(rd))?,
            Readers::BlockedSignalled => block_in_read(rd)?,
        }
        // Left first, then counted out: the writer leaves only after this.
        drop(me);
        drop(present);
    } else if let Some(u) = u {
        let _reg = Registered::new(u);
        let _present = Present::new(ready);
        match readers {
            Readers::Busy => {
                while !stop.load(Ordering::Relaxed) {
                    u.read_section();
                    u.quiescent();
                }
            }
            Readers::Blocked | Readers::BlockedSignalled => u.offline(|| block_in_read(rd))?,
        }
    }
    Ok(())
}

/// The writer: times grace periods ([`time_grace_periods`]), then releases the readers — and,
/// on smpcall, leaves only after they left (its own leave would otherwise wait for readers
/// that wait for the release).
fn writer(
    c: &Ctx,
    what: &str,
    m: Option<Arc<Machine>>,
    u: Option<&'static Urcu>,
    n: usize,
    ready: &AtomicUsize,
    release: Release,
) -> Result<(Histogram<u64>, Option<Delivery>), BenchError> {
    let me = match &m {
        Some(m) => Some(m.attach().map_err(engine_err(what))?),
        None => None,
    };
    let r = time_grace_periods(c, what, me.as_ref().map(|g| g.engine()), u, n, ready);
    // Release first on every path: a reader in a quiet region may be needed by our leave.
    drop(release);
    if let Some(me) = me {
        // Serve the readers' leaves (stop_machine) while waiting for them to go.
        let left = spin_until(&c.clock, c.bound_ticks(), Relax::Yield, || {
            safe_point();
            ready.load(Ordering::SeqCst) == 0
        });
        drop(me);
        if !left {
            r?;
            return Err(c.timeout(&format!("{what}: readers to leave")));
        }
    }
    r
}

/// The writer's measurement: waits for the `n` readers, lets blocked ones reach their `read`,
/// then times grace periods (smpcall's when `e` is given, else `u`'s).
fn time_grace_periods(
    c: &Ctx,
    what: &str,
    e: Option<&HostEngine>,
    u: Option<&'static Urcu>,
    n: usize,
    ready: &AtomicUsize,
) -> Result<(Histogram<u64>, Option<Delivery>), BenchError> {
    let started = spin_until(&c.clock, c.bound_ticks(), Relax::Yield, || {
        safe_point();
        ready.load(Ordering::SeqCst) >= n
    });
    if !started {
        return Err(c.timeout(&format!("{what}: readers to start")));
    }
    // Blocked readers: time to enter `read` (nothing to observe; 2 ms is ample).
    smpcall::hosted::sleep(Duration::from_millis(2));
    let mut gps = 0u64;
    Ok(match (e, u) {
        (Some(e), _) => {
            let before = counters(e);
            let h = measure(&c.clock, &c.cfg, 0, || {
                gps += 1;
                e.synchronize_rcu_expedited().map_err(engine_err(what))
            })?;
            (h, Some(delivery(before, counters(e), gps)))
        }
        (None, Some(u)) => (
            measure(&c.clock, &c.cfg, 0, || {
                u.synchronize();
                Ok(())
            })?,
            None,
        ),
        (None, None) => unreachable!("a row is smpcall's or a liburcu flavour's"),
    })
}
