//! `--churn N`: N threads of the torture's own (not the machine's) attach as CPUs, serve calls
//! at their safe points for a while, and leave again, over and over, while every spawned CPU
//! keeps calling them. The ledger knows a slot is offline from the moment its thread has left
//! until the next thread attached, so a call that runs on a slot nobody holds is a violation;
//! calls refused as offline are expected.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use smpcall::hosted::{safe_point, Machine};

use super::ledger::{self, Ledger};
use super::rng::Rng;
use crate::SetupError;

/// Serialises "attach + mark online" and "leave + mark offline" between churn threads.
static SLOT_MARKS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What the churn threads did, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ChurnSummary {
    /// Threads that attached and left (`--churn`).
    pub threads: usize,
    /// Attach + leave cycles, over all threads.
    pub cycles: u64,
    /// Mean time one attach + leave took, µs.
    pub mean_cycle_us: f64,
}

/// A churn thread: its handle, and its count of cycles and time spent attaching and leaving.
pub(crate) struct Churner {
    handle: JoinHandle<Result<(), String>>,
    cycles: Arc<AtomicU64>,
    nanos: Arc<AtomicU64>,
}

/// Starts one churn thread on `machine` (joined by [`join`]).
pub(crate) fn spawn(
    machine: &Arc<Machine>,
    ledger: &Arc<Ledger>,
    stop: &Arc<AtomicBool>,
    seed: u64,
) -> Result<Churner, SetupError> {
    let cycles = Arc::new(AtomicU64::new(0));
    let nanos = Arc::new(AtomicU64::new(0));
    let machine = Arc::clone(machine);
    let (ledger, stop, c2, n2) = (
        Arc::clone(ledger),
        Arc::clone(stop),
        Arc::clone(&cycles),
        Arc::clone(&nanos),
    );
    let handle = thread::Builder::new()
        .name("smpcall-churn".into())
        .spawn(move || churn(&machine, &ledger, &stop, seed, &c2, &n2))
        .map_err(|error| SetupError::Spawn {
            thread: "churn",
            error,
        })?;
    Ok(Churner {
        handle,
        cycles,
        nanos,
    })
}

fn churn(
    machine: &Machine,
    ledger: &Ledger,
    stop: &AtomicBool,
    seed: u64,
    cycles: &AtomicU64,
    nanos: &AtomicU64,
) -> Result<(), String> {
    let mut rng = Rng::for_stream(seed, 0xC4_0000);
    while !stop.load(Ordering::SeqCst) {
        let t = Instant::now();
        // Attach and the ledger's mark together, and leave and its mark together: else a
        // slot freed by one churn thread could be taken by another before the first marked
        // it offline, and the late mark would flag the newcomer's runs.
        let marks = SLOT_MARKS.lock().unwrap_or_else(|e| e.into_inner());
        let guard = match machine.attach() {
            Ok(g) => g,
            Err(e) => return Err(format!("attach: {e}")),
        };
        let cpu = guard.cpu();
        ledger::set_this_cpu(cpu);
        // Online for the ledger before the first safe point (calls run only there).
        ledger.set_offline(cpu, false);
        drop(marks);
        let mut spent = t.elapsed();
        let serve_for = Duration::from_micros(200 + rng.below(1800));
        let until = Instant::now() + serve_for;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            safe_point();
            thread::yield_now();
        }
        let marks = SLOT_MARKS.lock().unwrap_or_else(|e| e.into_inner());
        let t = Instant::now();
        // Leaving runs every call queued to this CPU here, before it goes offline.
        drop(guard);
        spent += t.elapsed();
        ledger.set_offline(cpu, true);
        // C10: nothing queued to the slot may outlive its thread's leave (a later occupant
        // would run it, too late and elsewhere). Nobody can attach while we hold the marks.
        let e = machine.engine();
        if e.has_queued(cpu) || e.deferred_calls(cpu) != 0 {
            return Err(format!(
                "CPU {cpu} left with calls still queued to it (they would run on its next \
                 occupant)"
            ));
        }
        drop(marks);
        ledger::set_this_cpu(usize::MAX);
        cycles.fetch_add(1, Ordering::Relaxed);
        nanos.fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
        thread::sleep(Duration::from_micros(50 + rng.below(200)));
    }
    Ok(())
}

/// Joins the churn threads (after `stop` was set): their summary, and their failures as text.
pub(crate) fn join(churners: Vec<Churner>) -> (ChurnSummary, Vec<String>) {
    let threads = churners.len();
    let mut errors = Vec::new();
    let (mut cycles, mut nanos) = (0, 0);
    for c in churners {
        match c.handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("churn: {e}")),
            Err(_) => errors.push("churn: a churn thread panicked".to_owned()),
        }
        cycles += c.cycles.load(Ordering::Relaxed);
        nanos += c.nanos.load(Ordering::Relaxed);
    }
    let mean_cycle_us = if cycles == 0 {
        0.0
    } else {
        nanos as f64 / cycles as f64 / 1e3
    };
    (
        ChurnSummary {
            threads,
            cycles,
            mean_cycle_us,
        },
        errors,
    )
}
