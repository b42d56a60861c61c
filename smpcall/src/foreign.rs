//! Calls from threads that are not CPUs ("foreign" senders): the main thread, a tokio worker,
//! any thread that did not join the machine.
//!
//! A foreign thread has no queue — nobody can call it — so its waits serve nothing and cannot
//! take part in a cross-call deadlock. Two things a CPU sender has are missing, and replaced:
//!
//! * **Call data.** A CPU sender has one slot per target. A foreign sender uses:
//!
//!   | call | call data |
//!   |---|---|
//!   | waiting single call | a `Csd` on the caller's stack |
//!   | `call_async_csd` | the caller's own `Csd` |
//!   | no-wait single call, many-calls (waiting or not) | a *foreign row* ([`Storage::foreign_slots`]): one slot per target, held while it queues (no-wait) or until every target ran (waiting) |
//!
//!   Rows are claimed with one bit each in `foreign_rows_busy`; a sender that finds every row
//!   taken waits for one. Nothing is allocated.
//! * **Exclusion against `cpu_down`.** A CPU sender checks "target accepting?" and pushes in one
//!   region masked against its own interrupts, and stop_machine cannot start while any CPU is
//!   in such a region (it needs every CPU's IPI). A foreign thread cannot be masked, so it
//!   announces itself in `foreign_pushers` around its check and its push, and `cpu_down`, after
//!   it stopped accepting calls for the CPU, waits until that count is zero before it starts
//!   stop_machine. Dekker: the sender increments (SeqCst) and then loads `accepting` (SeqCst);
//!   `cpu_down` clears `accepting` (SeqCst) and then loads the count (SeqCst). Either the
//!   sender sees the CPU not accepting (and pushes nothing), or `cpu_down` sees the sender and
//!   waits until its push is on the queue — before the dying CPU's final flush.

use core::sync::atomic::Ordering;

use crate::sync::AtomicU64;

use crate::cpumask::{CpuId, CpuMask};
use crate::csd::{run_once, run_shared, Csd, OnceCall, Payload, FOREIGN};
use crate::engine::{AbortOnUnwind, Engine, Ipis, OneIpi, Storage, Target};
use crate::error::Error;
use crate::platform::Platform;

/// A foreign row, held until dropped.
pub(crate) struct ForeignRow<'e> {
    busy: &'e AtomicU64,
    row: usize,
}

impl Drop for ForeignRow<'_> {
    fn drop(&mut self) {
        // Release: our uses of the row's slots (claims, fills) happen-before the next holder's.
        self.busy.fetch_and(!(1u64 << self.row), Ordering::Release);
    }
}

/// The most rows of foreign call data an engine uses (one bit each in `foreign_rows_busy`).
pub(crate) const MAX_FOREIGN_ROWS: usize = 64;

impl<P: Platform, S: Storage> Engine<P, S> {
    /// Claims a free foreign row, waiting while all are taken.
    fn claim_foreign_row(&self) -> Result<ForeignRow<'_>, Error> {
        let rows = self.foreign_rows;
        if rows == 0 {
            return Err(Error::Unsupported(
                "call data for threads that are not CPUs (the storage has no foreign rows)",
            ));
        }
        let all = if rows >= 64 {
            u64::MAX
        } else {
            (1u64 << rows) - 1
        };
        loop {
            // Relaxed: only a hint for which bit to try; the CAS decides.
            let cur = self.foreign_rows_busy.load(Ordering::Relaxed);
            let free = !cur & all;
            if free == 0 {
                self.platform.relax();
                continue;
            }
            let bit = free.trailing_zeros() as usize;
            // Acquire: the previous holder's uses of the row happen-before ours.
            if self
                .foreign_rows_busy
                .compare_exchange_weak(cur, cur | 1 << bit, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Ok(ForeignRow {
                    busy: &self.foreign_rows_busy,
                    row: bit,
                });
            }
        }
    }

    fn foreign_slot(&self, row: &ForeignRow<'_>, target: CpuId) -> &Csd {
        &self.storage_foreign_slots()[row.row * self.nr_cpus() + target]
    }

    /// Claims `csd`, fills it with `fill` and pushes it on `target`'s queue from a foreign
    /// thread, inside the `foreign_pushers` region `cpu_down` waits out (module docs). A busy
    /// `csd` is waited for outside the region (or refused with [`Target::RefuseBusy`]).
    /// Returns `Ok(false)` for a target that does not accept calls under [`Target::Prune`].
    /// [`Target::Force`] skips the acceptance check (stop_machine driven from a foreign thread
    /// reaching a CPU that is going down, through its per-target stop call data).
    ///
    /// # Safety
    /// `csd` must stay alive until `target` released it.
    pub(crate) unsafe fn push_foreign(
        &self,
        target: CpuId,
        csd: &Csd,
        policy: Target,
        ipis: &mut impl Ipis,
        mut fill: impl FnMut(&Csd),
    ) -> Result<bool, Error> {
        /// Counts this thread among the foreign pushers while alive (also if `fill` unwinds:
        /// a count left behind would hold every later `cpu_down` for ever).
        struct Pushing<'a>(&'a core::sync::atomic::AtomicU32);
        impl Drop for Pushing<'_> {
            fn drop(&mut self) {
                // SeqCst: dropped after the push, so the push is on the queue before
                // `cpu_down` sees the count drop.
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        loop {
            // SeqCst: the Dekker pair with `cpu_down` (module docs).
            self.foreign_pushers.fetch_add(1, Ordering::SeqCst);
            let pushing = Pushing(&self.foreign_pushers);
            // Force (stop_machine reaching a CPU that is going down): no acceptance check.
            if policy != Target::Force && !self.accepting.test(target) {
                return match policy {
                    Target::Prune => Ok(false),
                    _ => Err(Error::Offline(target)),
                };
            }
            if csd.try_lock() {
                fill(csd);
                // SAFETY: claimed and filled; alive per this function's contract.
                let needs_ipi = unsafe { self.enqueue(target, csd) };
                drop(pushing);
                if needs_ipi {
                    ipis.add(target);
                }
                return Ok(true);
            }
            drop(pushing);
            if policy == Target::RefuseBusy {
                return Err(Error::Busy);
            }
            // Busy: its previous call was not taken yet. Signal what we queued so far first
            // (a target we wait for may wait for one of them), then wait outside the region,
            // so a `cpu_down` of that target (which must first flush it) is not held up by us.
            ipis.send(&self.platform);
            self.wait_foreign(csd);
        }
    }

    /// [`call_single`](Engine::call_single) from a foreign thread: the call data is on this
    /// stack.
    pub(crate) fn call_single_foreign<F, R>(&self, cpu: CpuId, f: F) -> Result<R, Error>
    where
        F: FnOnce(CpuId) -> R + Send,
        R: Send,
    {
        let mut call = OnceCall {
            f: Some(f),
            ret: None,
        };
        let payload = Payload::from_ptr(&mut call as *mut OnceCall<F, R>);
        let csd = Csd::new();
        let mut ipis = OneIpi::default();
        let fill = |csd: &Csd| {
            // SAFETY: claimed by `push_foreign`; `call` outlives the wait below.
            unsafe { csd.set_call(run_once::<F, R>, payload, true) };
            self.note_call::<F>(csd, FOREIGN, cpu);
        };
        // SAFETY: `csd` and `call` live on this frame until `wait_foreign` saw the csd released
        // (unwinding out of the wait aborts).
        unsafe { self.push_foreign(cpu, &csd, Target::Refuse, &mut ipis, fill) }?;
        let in_flight = AbortOnUnwind;
        ipis.send(&self.platform);
        self.wait_foreign(&csd);
        core::mem::forget(in_flight);
        Ok(call
            .ret
            .take()
            .expect("smpcall: waiting call released before it ran"))
    }

    /// [`call_single_async`](Engine::call_single_async) from a foreign thread, through a
    /// foreign row; optionally deferrable (`quiet.rs`).
    pub(crate) fn call_single_async_foreign_with<F>(
        &self,
        cpu: CpuId,
        f: F,
        deferrable: bool,
    ) -> Result<(), Error>
    where
        F: FnOnce(CpuId) + Send + 'static,
    {
        // `f` outlives the row: if it is not queued, its `Drop` (user code) runs after the row
        // is given back.
        let mut f = Some(f);
        self.queue_no_wait_foreign(cpu, &mut f, Target::Refuse, deferrable)
            .map(|_| ())
    }

    /// Queues the no-wait call in `f` on `target` through a foreign row claimed for the push
    /// (taking it out of the option once the slot is claimed), gives the row back and signals
    /// `target` before returning. A call that was not queued stays in `f`, for the caller to
    /// drop (user code) holding nothing.
    fn queue_no_wait_foreign<F>(
        &self,
        target: CpuId,
        f: &mut Option<F>,
        policy: Target,
        deferrable: bool,
    ) -> Result<bool, Error>
    where
        F: FnOnce(CpuId) + Send + 'static,
    {
        let row = self.claim_foreign_row()?;
        let mut ipis = OneIpi::default();
        let fill = |slot: &Csd| {
            let f = f.take().expect("filled once");
            // SAFETY: claimed by `push_foreign`, not yet pushed.
            unsafe { self.fill_no_wait(slot, f, FOREIGN, target, deferrable) };
        };
        let slot = self.foreign_slot(&row, target);
        // SAFETY: a storage slot: alive as long as the engine.
        let pushed = unsafe { self.push_foreign(target, slot, policy, &mut ipis, fill) };
        drop(row);
        ipis.send(&self.platform);
        pushed
    }

    /// [`call_async_csd`](Engine::call_async_csd) from a foreign thread.
    pub(crate) fn call_async_csd_foreign<F>(&self, csd: &Csd, cpu: CpuId, f: F) -> Result<(), Error>
    where
        F: FnOnce(CpuId) + Send + 'static,
    {
        let mut f = Some(f);
        let mut ipis = OneIpi::default();
        let fill = |csd: &Csd| {
            let f = f.take().expect("filled once");
            // SAFETY: claimed by `push_foreign`, not yet pushed.
            unsafe { self.fill_no_wait(csd, f, FOREIGN, cpu, false) };
        };
        // SAFETY: pinned by the caller, and its `Drop` waits while it is busy.
        unsafe { self.push_foreign(cpu, csd, Target::RefuseBusy, &mut ipis, fill) }?;
        ipis.send(&self.platform);
        Ok(())
    }

    /// [`call_many`](Engine::call_many) from a foreign thread: a foreign row, held until every
    /// target ran `f`.
    pub(crate) fn call_many_foreign<F>(&self, mask: &CpuMask, f: F) -> Result<CpuMask, Error>
    where
        F: Fn(CpuId) + Sync,
    {
        let row = self.claim_foreign_row()?;
        let targets = mask.and(&self.accepting.load());
        let mut queued = CpuMask::new();
        let mut ipis = CpuMask::new();
        let in_flight = AbortOnUnwind;
        for t in &targets {
            let fill = |slot: &Csd| {
                // SAFETY: claimed by `push_foreign`; the payload points at `f`, alive until
                // we waited for every target.
                unsafe { slot.set_call(run_shared::<F>, Payload::from_ptr(&f), true) };
                self.note_call::<F>(slot, FOREIGN, t);
            };
            let slot = self.foreign_slot(&row, t);
            // SAFETY: a storage slot; `f` outlives the waits below.
            let pushed = unsafe { self.push_foreign(t, slot, Target::Prune, &mut ipis, fill) };
            if pushed == Ok(true) {
                queued.set(t);
            }
        }
        ipis.send(&self.platform);
        for t in &queued {
            self.wait_foreign(self.foreign_slot(&row, t));
        }
        core::mem::forget(in_flight);
        Ok(queued)
    }

    /// [`call_many_async`](Engine::call_many_async) from a foreign thread, one target at a
    /// time: the clone of `f` for a target is made (and, if not queued, dropped) holding
    /// nothing — no foreign row, no pending IPI — since a `Clone` is user code that may make
    /// calls of its own; then a row is claimed for the push, the target signalled, the row
    /// given back.
    pub(crate) fn call_many_async_foreign<F>(&self, mask: &CpuMask, f: F) -> Result<CpuMask, Error>
    where
        F: Fn(CpuId) + Clone + Send + 'static,
    {
        let targets = mask.and(&self.accepting.load());
        let mut queued = CpuMask::new();
        for t in &targets {
            let mut g = Some(f.clone());
            // Fails only for storage without foreign rows (`Prune` never refuses): on the first
            // target, before anything was queued.
            let pushed = self.queue_no_wait_foreign(t, &mut g, Target::Prune, false)?;
            drop(g);
            if pushed {
                queued.set(t);
            }
        }
        Ok(queued)
    }

    /// Waits until `csd` is released, from a thread that is not one of our CPUs (it has no
    /// queue to serve).
    pub(crate) fn wait_foreign(&self, csd: &Csd) {
        while csd.is_busy() {
            self.platform.relax();
        }
    }

    /// `cpu_down`'s half of the Dekker pair: after `cpu` stopped accepting calls, waits until
    /// no foreign sender is between its check and its push.
    pub(crate) fn wait_for_foreign_pushers(&self) {
        // SeqCst: see the module documentation.
        while self.foreign_pushers.load(Ordering::SeqCst) != 0 {
            self.platform.relax();
        }
    }
}
