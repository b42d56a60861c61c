//! The RCU torture (`--rcu`): readers on every CPU follow an RCU-protected pointer while
//! writers swap it and reclaim the old node through `synchronize_rcu_expedited()`.
//!
//! * **Readers** run in task context on every CPU (`rcu_read_lock`, load the pointer, check the
//!   node [`READ_CHECKS`] times, unlock, then `yield_now` — with more CPU threads than cores the
//!   writers' grace periods need the other threads to get the core), and in call handlers: a
//!   task sometimes asks another CPU (`call_single`) or all others (`call_others`) to run a
//!   read section in its handler.
//! * **Writers** are every CPU too, now and then: allocate a node, swap it in, wait for an
//!   expedited grace period, then **poison** the old node (and any node still waiting for a
//!   grace period), and **free** it only [`RECLAIM_LAG`] grace periods later. A reader that
//!   sees a poisoned node is an `rcu` violation: a grace period ended while a reader that could
//!   see the node was still inside its section. The lag keeps such a reader reading poisoned
//!   memory rather than freed memory, so the violation is reported rather than undefined.
//! * **Mixing.** With `--rcu`, a quarter of each CPU's steps are RCU steps and the rest the
//!   call workload; with every call kind at weight 0 (`--weight '*=0'`) the run is RCU only.
//!   Under `--onoff` a CPU that is offline neither reads nor writes (an offline CPU is
//!   quiescent for the grace period, so a reader there would not be waited for); its task
//!   backs off like its calls do.
//!
//! Grace periods must be started from a CPU's task, outside a read-side section: writers do it
//! between their steps, never while reading.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use smpcall::hosted::HostEngine;
use smpcall::{CpuId, Error, RcuStats};

/// How often a reader checks its node within one read section.
pub const READ_CHECKS: u32 = 16;
/// A poisoned node is freed once this many more grace periods have started.
pub const RECLAIM_LAG: u64 = 8;
/// With the call workload on, one step in this many is an RCU step.
pub const RCU_STEP_ONE_IN: u64 = 4;

const ALIVE: u64 = 0xA11C_E0A1_1CE0_A11C;
const POISON: u64 = 0xDEAD_DEAD_DEAD_DEAD;

/// A node readers follow.
#[derive(Debug)]
struct Node {
    state: AtomicU64,
    generation: u64,
}

fn new_node(generation: u64) -> *mut Node {
    Box::into_raw(Box::new(Node {
        state: AtomicU64::new(ALIVE),
        generation,
    }))
}

/// The shared state of the RCU torture: the protected pointer and the counters.
#[derive(Debug)]
pub struct RcuTorture {
    head: AtomicPtr<Node>,
    task_reads: AtomicU64,
    handler_reads: AtomicU64,
    reads_skipped_offline: AtomicU64,
    writes: AtomicU64,
    gp_refused_offline: AtomicU64,
    handler_calls_refused: AtomicU64,
    nodes_freed: AtomicU64,
    violations: AtomicU64,
    /// Generation of the first poisoned node a reader saw (0: none).
    first_bad_generation: AtomicU64,
    /// Nodes the writers still held when their tasks ended (addresses), freed on drop.
    leftovers: Mutex<Vec<usize>>,
}

/// What one task read step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// A read section ran.
    Read,
    /// This CPU is offline: no read (back off).
    Offline,
}

impl Default for RcuTorture {
    fn default() -> Self {
        Self::new()
    }
}

impl RcuTorture {
    /// A fresh pointer to a live node of generation 0, counters at zero.
    pub fn new() -> RcuTorture {
        RcuTorture {
            head: AtomicPtr::new(new_node(0)),
            task_reads: AtomicU64::new(0),
            handler_reads: AtomicU64::new(0),
            reads_skipped_offline: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            gp_refused_offline: AtomicU64::new(0),
            handler_calls_refused: AtomicU64::new(0),
            nodes_freed: AtomicU64::new(0),
            violations: AtomicU64::new(0),
            first_bad_generation: AtomicU64::new(0),
            leftovers: Mutex::new(Vec::new()),
        }
    }

    /// One read section on the current CPU; `in_handler` says where it runs (for the
    /// counters). Async-signal-safe (atomics only): it runs in call handlers too.
    fn read_section(&self, engine: &HostEngine, in_handler: bool) {
        let Ok(guard) = engine.rcu_read_lock() else {
            return;
        };
        // Acquire: pairs with the writer's swap, so the node's contents are visible.
        let p = self.head.load(Ordering::Acquire);
        // SAFETY: RCU: a node reachable from `head` inside a read section is freed only after
        // a grace period that waits for this section (that is what is being tested; the
        // poison and the reclaim lag turn a failure into a reported violation).
        let node = unsafe { &*p };
        let mut bad = false;
        for _ in 0..READ_CHECKS {
            // Relaxed: the poison store is ordered after the grace period; a correct grace
            // period makes it impossible to observe here.
            if node.state.load(Ordering::Relaxed) != ALIVE {
                bad = true;
            }
            std::hint::spin_loop();
        }
        let generation = node.generation;
        drop(guard);
        // Relaxed: statistics.
        if bad {
            self.violations.fetch_add(1, Ordering::Relaxed);
            let _ = self.first_bad_generation.compare_exchange(
                0,
                generation.max(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        let counter = if in_handler {
            &self.handler_reads
        } else {
            &self.task_reads
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A read section in task context on CPU `me` (skipped while `me` is offline), then a
    /// yield so that writers' grace periods get the core.
    pub fn task_read(&self, engine: &HostEngine, me: CpuId) -> ReadOutcome {
        if !engine.is_online(me) {
            self.reads_skipped_offline.fetch_add(1, Ordering::Relaxed);
            return ReadOutcome::Offline;
        }
        self.read_section(engine, false);
        std::thread::yield_now();
        ReadOutcome::Read
    }

    /// Asks `target` (or, with `None`, every other online CPU) to run a read section in its
    /// call handler, and waits. `Err(Offline(me))` when the calling CPU is offline; a
    /// refusal because `target` is offline is counted and is not an error.
    pub fn handler_read(
        &self,
        engine: &HostEngine,
        me: CpuId,
        target: Option<CpuId>,
    ) -> Result<(), Error> {
        let read = |_cpu: CpuId| self.read_section(engine, true);
        let result = match target {
            Some(t) => engine.call_single(t, read),
            None => engine.call_others(read).map(|_| ()),
        };
        match result {
            Err(Error::Offline(c)) if c != me => {
                self.handler_calls_refused.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            other => other,
        }
    }

    /// Counters and the engine's grace-period statistics.
    pub fn summary(&self, stats: RcuStats) -> RcuSummary {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RcuSummary {
            grace_periods: stats.grace_periods,
            cpus_ipid: stats.cpus_called,
            cpus_skipped_idle: stats.cpus_skipped_idle,
            deferred_to_unlock: stats.deferred_to_unlock,
            task_reads: r(&self.task_reads),
            handler_reads: r(&self.handler_reads),
            reads_skipped_offline: r(&self.reads_skipped_offline),
            writes: r(&self.writes),
            gp_refused_offline: r(&self.gp_refused_offline),
            handler_calls_refused: r(&self.handler_calls_refused),
            nodes_freed: r(&self.nodes_freed),
            violations: r(&self.violations),
            first_bad_generation: match r(&self.first_bad_generation) {
                0 => None,
                g => Some(g),
            },
        }
    }

    /// Violations so far.
    pub fn violations(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }
}

impl Drop for RcuTorture {
    fn drop(&mut self) {
        // Last reference: every task is done (they hold an Arc while they run).
        let head = *self.head.get_mut();
        // SAFETY: allocated by `new_node`, reachable only from here now.
        drop(unsafe { Box::from_raw(head) });
        let leftovers = std::mem::take(self.leftovers.get_mut().unwrap_or_else(|e| e.into_inner()));
        for p in leftovers {
            // SAFETY: unpublished nodes handed over by `Writer::finish`, each exactly once.
            drop(unsafe { Box::from_raw(p as *mut Node) });
        }
    }
}

/// One CPU's writer state: nodes it unpublished and has not freed yet.
#[derive(Debug, Default)]
pub struct Writer {
    /// Swapped out, waiting for a grace period that starts after the swap.
    awaiting: Vec<*mut Node>,
    /// Poisoned after a grace period (with the grace-period sequence then), awaiting the lag.
    poisoned: VecDeque<(*mut Node, u64)>,
}

impl Writer {
    /// One write step on CPU `me`: swap a new node in, wait for an expedited grace period,
    /// poison what it unpublished, free what is old enough. `Err(Offline(me))` when `me` is
    /// offline (nothing swapped, or the swapped-out node waits for the next grace period).
    pub fn write(&mut self, engine: &HostEngine, rcu: &RcuTorture, me: CpuId) -> Result<(), Error> {
        if !engine.is_online(me) {
            return Err(Error::Offline(me));
        }
        let generation = rcu.writes.fetch_add(1, Ordering::Relaxed) + 1;
        // AcqRel: publishes the new node's contents; takes the old one's.
        let old = rcu.head.swap(new_node(generation), Ordering::AcqRel);
        self.awaiting.push(old);
        match engine.synchronize_rcu_expedited() {
            Ok(()) => {}
            Err(Error::Offline(c)) if c == me => {
                rcu.gp_refused_offline.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Offline(me));
            }
            Err(e) => return Err(e),
        }
        let seq = engine.rcu_gp_seq();
        for p in self.awaiting.drain(..) {
            // SAFETY: unpublished before the grace period that just ended began, so no reader
            // can still hold it; alive until freed below.
            unsafe { (*p).state.store(POISON, Ordering::Relaxed) };
            self.poisoned.push_back((p, seq));
        }
        let now = engine.rcu_gp_seq();
        while let Some(&(p, seq)) = self.poisoned.front() {
            if now < seq + RECLAIM_LAG {
                break;
            }
            self.poisoned.pop_front();
            // SAFETY: poisoned after a grace period, and RECLAIM_LAG grace periods ago.
            drop(unsafe { Box::from_raw(p) });
            rcu.nodes_freed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Hands every node still held to `rcu`, which frees them when the run is over.
    pub fn finish(&mut self, rcu: &RcuTorture) {
        let mut left = rcu.leftovers.lock().unwrap_or_else(|e| e.into_inner());
        left.extend(self.awaiting.drain(..).map(|p| p as usize));
        left.extend(self.poisoned.drain(..).map(|(p, _)| p as usize));
    }
}

/// What the RCU torture did, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RcuSummary {
    /// Expedited grace periods completed (engine).
    pub grace_periods: u64,
    /// CPUs sent a quiescent-state call (engine).
    pub cpus_ipid: u64,
    /// CPUs skipped because they were idle (engine).
    pub cpus_skipped_idle: u64,
    /// Quiescent states deferred to a reader's unlock (engine).
    pub deferred_to_unlock: u64,
    /// Read sections in task context.
    pub task_reads: u64,
    /// Read sections in call handlers.
    pub handler_reads: u64,
    /// Reads skipped because the reader's CPU was offline.
    pub reads_skipped_offline: u64,
    /// Pointer swaps.
    pub writes: u64,
    /// Grace periods refused because the writer's CPU was offline.
    pub gp_refused_offline: u64,
    /// Handler-read calls refused because the target was offline.
    pub handler_calls_refused: u64,
    /// Nodes freed during the run.
    pub nodes_freed: u64,
    /// Readers that saw a poisoned node.
    pub violations: u64,
    /// Generation of the first poisoned node seen.
    pub first_bad_generation: Option<u64>,
}
