//! The floor and the peers: what a user would otherwise pick to run something on another
//! thread and learn that it ran. Every pair runs its requester (the timed side) on core 0 and
//! its responder on core 1, as the hosted `Machine` pins CPU 0 and CPU 1.

use std::cell::Cell;
use std::hint::black_box;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, Thread};

use crossbeam_channel::{RecvTimeoutError, TryRecvError, TrySendError};
use hdrhistogram::Histogram;

use super::sample::{measure, rounds, Throughput};
use super::threads::{spawn, spin_until, Relax, Topology};
use super::{BenchError, Ctx, Padded};

/// A flag that is never raised: the stop flag of waits that only end by their condition.
static NEVER: AtomicBool = AtomicBool::new(false);

/// Outcome of a responder's wait for the next request.
enum Next {
    Request,
    Stop,
}

/// Waits (spinning) until `ready()`, the `stop` flag, or the bound.
fn wait_request(
    ctx: &Ctx,
    relax: Relax,
    stop: &AtomicBool,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<Next, BenchError> {
    let mut stopped = false;
    let ok = spin_until(&ctx.clock, ctx.bound_ticks(), relax, || {
        if ready() {
            return true;
        }
        stopped = stop.load(Ordering::Relaxed);
        stopped
    });
    match (ok, stopped) {
        (true, false) => Ok(Next::Request),
        (true, true) => Ok(Next::Stop),
        (false, _) => Err(ctx.timeout(what)),
    }
}

/// A worker's next message from `rx`: busy-polling `try_recv` when `spin` (bounded, and
/// watching `stop`), else blocking in `recv_timeout`. `Ok(None)` when the sender is gone or
/// `stop` was raised.
fn next_message(
    ctx: &Ctx,
    relax: Relax,
    stop: &AtomicBool,
    what: &str,
    rx: &crossbeam_channel::Receiver<u64>,
    spin: bool,
) -> Result<Option<u64>, BenchError> {
    if spin {
        let mut got = None;
        let mut gone = false;
        let next = wait_request(ctx, relax, stop, what, || match rx.try_recv() {
            Ok(v) => {
                got = Some(v);
                true
            }
            Err(TryRecvError::Empty) => false,
            Err(TryRecvError::Disconnected) => {
                gone = true;
                true
            }
        })?;
        Ok(match next {
            Next::Request if !gone => got,
            _ => None,
        })
    } else {
        match rx.recv_timeout(ctx.cfg.wait_bound) {
            Ok(v) => Ok(Some(v)),
            Err(RecvTimeoutError::Disconnected) => Ok(None),
            Err(RecvTimeoutError::Timeout) => Err(ctx.timeout(what)),
        }
    }
}

/// Runs a requester/responder pair: `responder` on core 1, `requester` (which measures) on
/// core 0. The stop flag handed to both is raised when the requester returns or panics.
fn pair<R, Q, P>(ctx: &Ctx, what: &str, responder: P, requester: Q) -> Result<R, BenchError>
where
    R: Send + 'static,
    P: FnOnce(&AtomicBool) -> Result<(), BenchError> + Send + 'static,
    Q: FnOnce(&AtomicBool) -> Result<R, BenchError> + Send + 'static,
{
    struct RaiseOnDrop(Arc<AtomicBool>);
    impl Drop for RaiseOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stop_p = Arc::clone(&stop);
    let stop_q = Arc::clone(&stop);
    let resp = spawn(
        &ctx.topo,
        Some((1, 2)),
        &format!("{what} responder"),
        move || responder(&stop_p),
    )?;
    let req = spawn(
        &ctx.topo,
        Some((0, 2)),
        &format!("{what} requester"),
        move || {
            let _raise = RaiseOnDrop(Arc::clone(&stop_q));
            requester(&stop_q)
        },
    )?;
    let result = req.join(ctx.row_bound());
    // The requester may have timed out without raising the flag: raise it for the responder.
    stop.store(true, Ordering::SeqCst);
    let responded = resp.join(ctx.cfg.wait_bound);
    let r = result??;
    responded??;
    Ok(r)
}

/// The floor: one cache line bounced between the two cores. The requester writes an odd
/// value, the responder answers with the next even one.
pub fn floor(ctx: &Ctx, what: &str) -> Result<Histogram<u64>, BenchError> {
    let line = Arc::new(Padded(AtomicU64::new(0)));
    let l2 = Arc::clone(&line);
    let (c1, c2) = (ctx.clone(), ctx.clone());
    let relax = ctx.topo.relax(2);
    let (w1, w2) = (what.to_string(), what.to_string());
    pair(
        ctx,
        what,
        move |stop| {
            let mut want = 1u64;
            loop {
                // Acquire/Release: a message-passing pair, as a real request would be.
                match wait_request(&c1, relax, stop, &w1, || {
                    l2.0.load(Ordering::Acquire) == want
                })? {
                    Next::Stop => return Ok(()),
                    Next::Request => l2.0.store(want + 1, Ordering::Release),
                }
                want += 2;
            }
        },
        move |_| {
            let mut v = 0u64;
            measure(&c2.clock, &c2.cfg, 0, || {
                v += 2;
                line.0.store(v - 1, Ordering::Release);
                if spin_until(&c2.clock, c2.bound_ticks(), relax, || {
                    line.0.load(Ordering::Acquire) == v
                }) {
                    Ok(())
                } else {
                    Err(c2.timeout(&format!("{w2} responder")))
                }
            })
        },
    )
}

/// Request/response over two crossbeam `bounded(1)` channels. `spin`: both sides busy-poll
/// with `try_recv`; otherwise both block in `recv_timeout` (crossbeam spins briefly first).
pub fn crossbeam_rr(ctx: &Ctx, what: &str, spin: bool) -> Result<Histogram<u64>, BenchError> {
    let (req_tx, req_rx) = crossbeam_channel::bounded::<u64>(1);
    let (resp_tx, resp_rx) = crossbeam_channel::bounded::<u64>(1);
    let (c1, c2) = (ctx.clone(), ctx.clone());
    let relax = ctx.topo.relax(2);
    let (w1, w2) = (what.to_string(), what.to_string());
    pair(
        ctx,
        what,
        move |stop| loop {
            let Some(v) = next_message(&c1, relax, stop, &w1, &req_rx, spin)? else {
                return Ok(());
            };
            match resp_tx.try_send(v + 1) {
                Ok(()) => {}
                Err(TrySendError::Disconnected(_)) => return Ok(()),
                Err(TrySendError::Full(_)) => {
                    return Err(BenchError::Setup(format!("{w1}: response slot full")))
                }
            }
        },
        move |_| {
            let mut i = 0u64;
            measure(&c2.clock, &c2.cfg, 0, || {
                i += 1;
                req_tx
                    .try_send(i)
                    .map_err(|_| BenchError::Setup(format!("{w2}: request slot not free")))?;
                let got = if spin {
                    let mut got = None;
                    let ok = spin_until(&c2.clock, c2.bound_ticks(), relax, || {
                        got = resp_rx.try_recv().ok();
                        got.is_some()
                    });
                    if !ok {
                        return Err(c2.timeout(&format!("{w2} responder")));
                    }
                    got
                } else {
                    resp_rx.recv_timeout(c2.cfg.wait_bound).ok()
                };
                match got {
                    Some(v) if v == i + 1 => Ok(()),
                    Some(v) => Err(BenchError::Setup(format!("{w2}: answer {v} to {i}"))),
                    None => Err(c2.timeout(&format!("{w2} responder"))),
                }
            })
        },
    )
}

/// Request/response over two `std::sync::mpsc::sync_channel(1)`s, both sides blocking.
pub fn mpsc_rr(ctx: &Ctx, what: &str) -> Result<Histogram<u64>, BenchError> {
    use std::sync::mpsc::{self, RecvTimeoutError, TrySendError};
    let (req_tx, req_rx) = mpsc::sync_channel::<u64>(1);
    let (resp_tx, resp_rx) = mpsc::sync_channel::<u64>(1);
    let (c1, c2) = (ctx.clone(), ctx.clone());
    let (w1, w2) = (what.to_string(), what.to_string());
    pair(
        ctx,
        what,
        move |_| loop {
            let v = match req_rx.recv_timeout(c1.cfg.wait_bound) {
                Ok(v) => v,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
                Err(RecvTimeoutError::Timeout) => return Err(c1.timeout(&w1)),
            };
            match resp_tx.try_send(v + 1) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(_)) => {
                    return Err(BenchError::Setup(format!("{w1}: response slot full")))
                }
            }
        },
        move |_| {
            let mut i = 0u64;
            measure(&c2.clock, &c2.cfg, 0, || {
                i += 1;
                req_tx
                    .try_send(i)
                    .map_err(|_| BenchError::Setup(format!("{w2}: request slot not free")))?;
                match resp_rx.recv_timeout(c2.cfg.wait_bound) {
                    Ok(v) if v == i + 1 => Ok(()),
                    Ok(v) => Err(BenchError::Setup(format!("{w2}: answer {v} to {i}"))),
                    Err(_) => Err(c2.timeout(&format!("{w2} responder"))),
                }
            })
        },
    )
}

/// Request/response with `thread::park` / `unpark` and two sequence numbers.
pub fn park_rr(ctx: &Ctx, what: &str) -> Result<Histogram<u64>, BenchError> {
    struct Shared {
        req: Padded<AtomicU64>,
        resp: Padded<AtomicU64>,
        requester: OnceLock<Thread>,
        responder: OnceLock<Thread>,
    }
    let shared = Arc::new(Shared {
        req: Padded(AtomicU64::new(0)),
        resp: Padded(AtomicU64::new(0)),
        requester: OnceLock::new(),
        responder: OnceLock::new(),
    });
    let s2 = Arc::clone(&shared);
    let (c1, c2) = (ctx.clone(), ctx.clone());
    let (w1, w2) = (what.to_string(), what.to_string());

    /// Parks until `ready()` or `stop`, each park bounded; gives up after the bound.
    fn park_until(ctx: &Ctx, stop: &AtomicBool, ready: impl Fn() -> bool) -> Option<bool> {
        let mut deadline = 0u64;
        loop {
            if ready() {
                return Some(true);
            }
            if stop.load(Ordering::Relaxed) {
                return Some(false);
            }
            let now = ctx.clock.now();
            if deadline == 0 {
                deadline = now + ctx.bound_ticks();
            } else if now > deadline {
                return None;
            }
            thread::park_timeout(ctx.cfg.wait_bound);
        }
    }
    /// Waits (bounded) until the other side has published its `Thread`.
    fn other(ctx: &Ctx, cell: &OnceLock<Thread>) -> Option<Thread> {
        let relax = Relax::Yield;
        spin_until(&ctx.clock, ctx.bound_ticks(), relax, || {
            cell.get().is_some()
        })
        .then(|| cell.get().cloned())
        .flatten()
    }

    pair(
        ctx,
        what,
        move |stop| {
            let _ = s2.responder.set(thread::current());
            let requester = other(&c1, &s2.requester).ok_or_else(|| c1.timeout(&w1))?;
            let mut last = 0u64;
            loop {
                let seen = park_until(&c1, stop, || s2.req.0.load(Ordering::Acquire) != last);
                match seen {
                    Some(true) => {}
                    Some(false) => return Ok(()),
                    None => return Err(c1.timeout(&w1)),
                }
                last = s2.req.0.load(Ordering::Acquire);
                s2.resp.0.store(last, Ordering::Release);
                requester.unpark();
            }
        },
        move |stop| {
            let _ = shared.requester.set(thread::current());
            let what = format!("{w2} responder");
            let responder = other(&c2, &shared.responder).ok_or_else(|| c2.timeout(&what))?;
            let mut i = 0u64;
            let h = measure(&c2.clock, &c2.cfg, 0, || {
                i += 1;
                shared.req.0.store(i, Ordering::Release);
                responder.unpark();
                match park_until(&c2, &NEVER, || shared.resp.0.load(Ordering::Acquire) == i) {
                    Some(_) => Ok(()),
                    None => Err(c2.timeout(&what)),
                }
            });
            stop.store(true, Ordering::SeqCst);
            responder.unpark();
            h
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Bare tgkill → handler → ack.
// ---------------------------------------------------------------------------------------------

thread_local! {
    /// The ack counter of the signal target running on this thread (null elsewhere). A
    /// `const` thread-local of a `Copy` type: reading it needs no lazy initialisation, so the
    /// signal handler may.
    static ACK: Cell<*const AtomicU64> = const { Cell::new(ptr::null()) };
}

extern "C" fn on_ack_signal(_signo: libc::c_int) {
    let ack = ACK.with(Cell::get);
    if !ack.is_null() {
        // SAFETY: the target thread sets this pointer to a counter it keeps alive (an `Arc`
        // it holds) and resets it to null before letting go of it; a handler runs on that
        // thread, so it sees either null or a live counter.
        unsafe { (*ack).fetch_add(1, Ordering::Release) };
    }
}

/// The real-time signal of the tgkill peer: the highest free one (the hosted `Machine` picks
/// from the lowest up, and skips any signal that has a handler).
fn ack_signal() -> Result<i32, BenchError> {
    static CHOSEN: OnceLock<Result<i32, String>> = OnceLock::new();
    CHOSEN
        .get_or_init(|| {
            for signo in (libc::SIGRTMIN()..=libc::SIGRTMAX()).rev() {
                // SAFETY: a zeroed sigaction is a valid out buffer; a null `act` only queries.
                let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
                // SAFETY: as above.
                if unsafe { libc::sigaction(signo, ptr::null(), &mut old) } != 0
                    || old.sa_sigaction != libc::SIG_DFL
                {
                    continue;
                }
                // SAFETY: a zeroed sigaction is a valid start; we set handler, flags, mask.
                let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
                act.sa_sigaction = on_ack_signal as extern "C" fn(libc::c_int) as usize;
                // Same flags as the hosted backend's IPI handler, so the comparison is fair.
                act.sa_flags = libc::SA_RESTART;
                // SAFETY: valid pointer to the mask of our sigaction.
                unsafe { libc::sigemptyset(&mut act.sa_mask) };
                // SAFETY: installs an async-signal-safe handler (one atomic add).
                if unsafe { libc::sigaction(signo, &act, ptr::null_mut()) } == 0 {
                    return Ok(signo);
                }
            }
            Err("no free real-time signal for the tgkill peer".to_string())
        })
        .clone()
        .map_err(BenchError::Setup)
}

/// A thread on `core` that spins (busy in user space) until `stop`, after publishing its tid
/// and, if `ack` is given, making the tgkill handler count into it.
fn busy_thread(
    ctx: &Ctx,
    what: &str,
    core: usize,
    ack: Option<Arc<Padded<AtomicU64>>>,
    stop: Arc<AtomicBool>,
) -> Result<(super::threads::Worker<()>, Arc<AtomicI32>), BenchError> {
    let tid = Arc::new(AtomicI32::new(0));
    let tid2 = Arc::clone(&tid);
    let c = ctx.clone();
    let stop2 = Arc::clone(&stop);
    let w = spawn(&ctx.topo, Some((core, 2)), what, move || {
        if let Some(ack) = &ack {
            ACK.with(|a| a.set(&ack.0 as *const AtomicU64));
        }
        // SAFETY: gettid has no preconditions.
        tid2.store(unsafe { libc::gettid() }, Ordering::SeqCst);
        // Busy until told to stop (bounded by the row's bound, in case nobody does).
        let bound = c.clock.ticks(c.row_bound());
        spin_until(&c.clock, bound, Relax::Spin, || {
            stop2.load(Ordering::Relaxed)
        });
        ACK.with(|a| a.set(ptr::null()));
        drop(ack);
    })?;
    let ok = spin_until(&ctx.clock, ctx.bound_ticks(), Relax::Yield, || {
        tid.load(Ordering::SeqCst) != 0
    });
    if !ok {
        stop.store(true, Ordering::SeqCst);
        return Err(ctx.timeout(what));
    }
    Ok((w, tid))
}

/// The bare signal round trip: `tgkill` to a thread spinning on core 1, whose handler bumps a
/// counter the sender (core 0) spins on.
pub fn tgkill_rr(ctx: &Ctx, what: &str) -> Result<Histogram<u64>, BenchError> {
    let signo = ack_signal()?;
    let ack = Arc::new(Padded(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let (target, tid) = busy_thread(
        ctx,
        &format!("{what} target"),
        1,
        Some(Arc::clone(&ack)),
        Arc::clone(&stop),
    )?;
    let c = ctx.clone();
    let w = what.to_string();
    let relax = ctx.topo.relax(2);
    let sender = spawn(
        &ctx.topo,
        Some((0, 2)),
        &format!("{what} sender"),
        move || {
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            let tid = tid.load(Ordering::SeqCst);
            let r = measure(&c.clock, &c.cfg, 0, || {
                let before = ack.0.load(Ordering::Acquire);
                // SAFETY: plain system call with integer arguments.
                let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signo) };
                if rc != 0 {
                    return Err(BenchError::Setup(format!(
                        "{w}: tgkill failed: {}",
                        std::io::Error::last_os_error()
                    )));
                }
                if spin_until(&c.clock, c.bound_ticks(), relax, || {
                    ack.0.load(Ordering::Acquire) != before
                }) {
                    Ok(())
                } else {
                    Err(c.timeout(&format!("{w} signal handler")))
                }
            });
            stop.store(true, Ordering::SeqCst);
            r
        },
    )?;
    let r = sender.join(ctx.row_bound());
    let t = target.join(ctx.cfg.wait_bound);
    let h = r??;
    t?;
    Ok(h)
}

// ---------------------------------------------------------------------------------------------
// membarrier.
// ---------------------------------------------------------------------------------------------

/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED` (linux/membarrier.h: 1 << 3).
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
/// `MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED` (linux/membarrier.h: 1 << 4).
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

/// Registers this process for private expedited membarriers (once; call it before starting
/// threads). The error says why the membarrier row cannot run.
pub fn register_membarrier() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            // SAFETY: plain system call with integer arguments (cmd, flags, cpu_id).
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_membarrier,
                    MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                    0,
                    0,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(format!(
                    "membarrier(REGISTER_PRIVATE_EXPEDITED) failed: {}",
                    std::io::Error::last_os_error()
                ))
            }
        })
        .clone()
}

/// The kernel's own IPI broadcast seen from user space: `membarrier(PRIVATE_EXPEDITED)` from
/// core 0 while a thread of ours spins on core 1 (so the kernel must interrupt it).
pub fn membarrier(ctx: &Ctx, what: &str) -> Result<Histogram<u64>, BenchError> {
    register_membarrier().map_err(BenchError::Setup)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (target, _tid) = busy_thread(ctx, &format!("{what} target"), 1, None, Arc::clone(&stop))?;
    let c = ctx.clone();
    let w = what.to_string();
    let caller = spawn(
        &ctx.topo,
        Some((0, 2)),
        &format!("{what} caller"),
        move || {
            let r = measure(&c.clock, &c.cfg, 0, || {
                // SAFETY: plain system call with integer arguments (cmd, flags, cpu_id).
                let rc = unsafe {
                    libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0)
                };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(BenchError::Setup(format!(
                        "{w}: {}",
                        std::io::Error::last_os_error()
                    )))
                }
            });
            stop.store(true, Ordering::SeqCst);
            r
        },
    )?;
    let r = caller.join(ctx.row_bound());
    let t = target.join(ctx.cfg.wait_bound);
    let h = r??;
    t?;
    Ok(h)
}

// ---------------------------------------------------------------------------------------------
// rayon.
// ---------------------------------------------------------------------------------------------

fn rayon_pool(topo: &Topology, threads: usize) -> Result<rayon::ThreadPool, BenchError> {
    let topo2 = topo.clone();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bench-rayon{i}"))
        .start_handler(move |i| topo2.pin(i, threads))
        .build()
        .map_err(|e| BenchError::Setup(format!("rayon pool: {e}")))
}

/// `ThreadPool::broadcast` on a pool of `threads` (pinned like the Machine's CPUs when they
/// fit), called from a thread outside the pool (not pinned: every core has a pool thread).
pub fn rayon_outside(ctx: &Ctx, what: &str, threads: usize) -> Result<Histogram<u64>, BenchError> {
    let pool = rayon_pool(&ctx.topo, threads)?;
    let c = ctx.clone();
    spawn(&ctx.topo, None, what, move || {
        let r = measure(&c.clock, &c.cfg, 0, || {
            black_box(pool.broadcast(|b| black_box(b.index())));
            Ok(())
        });
        drop(pool);
        r
    })?
    .join(ctx.row_bound())?
}

/// `rayon::broadcast` from inside the pool (`install`), on a pool of `threads`.
pub fn rayon_inside(ctx: &Ctx, what: &str, threads: usize) -> Result<Histogram<u64>, BenchError> {
    let pool = rayon_pool(&ctx.topo, threads)?;
    let c = ctx.clone();
    spawn(&ctx.topo, None, what, move || {
        let r = pool.install(|| {
            measure(&c.clock, &c.cfg, 0, || {
                black_box(rayon::broadcast(|b| black_box(b.index())));
                Ok(())
            })
        });
        drop(pool);
        r
    })?
    .join(ctx.row_bound())?
}

// ---------------------------------------------------------------------------------------------
// Throughput: crossbeam unbounded.
// ---------------------------------------------------------------------------------------------

/// `cfg.messages` messages per round through a crossbeam `unbounded` channel from core 0 to a
/// receiver on core 1 that counts them (one relaxed add per message, as our callee does);
/// the round ends when the sender sees the count. `spin`: the receiver busy-polls `try_recv`
/// instead of blocking in `recv_timeout`.
pub fn crossbeam_throughput(ctx: &Ctx, what: &str, spin: bool) -> Result<Throughput, BenchError> {
    let (tx, rx) = crossbeam_channel::unbounded::<u64>();
    let received = Arc::new(Padded(AtomicU64::new(0)));
    let r2 = Arc::clone(&received);
    let (c1, c2) = (ctx.clone(), ctx.clone());
    let relax = ctx.topo.relax(2);
    let (w1, w2) = (what.to_string(), what.to_string());
    pair(
        ctx,
        what,
        move |stop| loop {
            let got = next_message(&c1, relax, stop, &w1, &rx, spin)?;
            match got {
                Some(v) => {
                    black_box(v);
                    // Relaxed: a count; the sender's Acquire load sees it eventually.
                    r2.0.fetch_add(1, Ordering::Relaxed);
                }
                None => return Ok(()),
            }
        },
        move |_| {
            let mut expected = 0u64;
            let t = rounds(&c2.clock, &c2.cfg, || {
                let t0 = c2.clock.now();
                for i in 0..c2.cfg.messages {
                    tx.send(i)
                        .map_err(|_| BenchError::Setup(format!("{w2}: receiver gone")))?;
                }
                expected += c2.cfg.messages;
                if !spin_until(&c2.clock, c2.bound_ticks(), relax, || {
                    received.0.load(Ordering::Acquire) >= expected
                }) {
                    return Err(c2.timeout(&format!("{w2} receiver")));
                }
                Ok(c2.clock.now() - t0)
            });
            drop(tx);
            t
        },
    )
}
