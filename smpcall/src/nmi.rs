//! NMIs (C12): a non-maskable cross-CPU signal, for "what is every CPU doing" dumps and for
//! the stuck-wait diagnostics.
//!
//! NMI calls have their own per-CPU queue, served only by the NMI handler
//! ([`Engine::handle_nmi`]): an NMI may interrupt a normal queue flush at any instruction, so it
//! must not touch that queue. NMI handlers never nest on a CPU (the platform guarantees it), so
//! the NMI queue has a single consumer at a time. Functions run in NMI context: they may read
//! anything, use atomics and report, but must not take locks, allocate, or wait for anything
//! the interrupted code might hold — and they may not make cross-CPU calls or serve the queue
//! (calls are refused with `WouldDeadlock(InNmi)`, `serve_queue` serves nothing).

use core::sync::atomic::Ordering;

use crate::cpumask::{CpuId, CpuMask};
use crate::csd::{shared_call, Csd};
use crate::engine::{AbortOnUnwind, Engine, Storage};
use crate::error::Error;
use crate::platform::Platform;

impl<P: Platform, S: Storage> Engine<P, S> {
    /// The NMI handler: the platform calls this from its NMI, on the interrupted CPU, whatever
    /// that CPU's interrupt mask. Runs the NMI calls queued to it, and answers a stalled
    /// waiter's request to report what this CPU is doing.
    ///
    /// # Safety
    /// Platform interface: call it only from the NMI handler of an engine CPU, never nested in
    /// another NMI handler on that CPU ([`Platform::send_nmi`]'s contract).
    pub unsafe fn handle_nmi(&self) {
        let Some(me) = self.current_cpu() else {
            return;
        };
        let pc = self.per_cpu(me);
        // Relaxed: this CPU's own counters (NMIs do not nest).
        pc.nmi_depth.fetch_add(1, Ordering::Relaxed);
        pc.nmis_received.fetch_add(1, Ordering::Relaxed);
        let report = pc.nmi_report_requested.swap(false, Ordering::Relaxed);
        let before = report.then(|| pc.ctx.snapshot().context());
        pc.ctx.nmi_enter();
        if let Some(before) = before {
            self.report_cpu_state(me, before);
        }
        let in_flight = AbortOnUnwind;
        // SAFETY: only this CPU's NMI handler consumes its NMI queue, and NMI handlers do not
        // nest (Platform::send_nmi contract), so this flush never runs concurrently with
        // another flush of the same queue.
        unsafe { pc.nmi_queue.flush(me) };
        core::mem::forget(in_flight);
        pc.ctx.nmi_exit();
        pc.nmi_depth.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether the current CPU is running an NMI handler.
    pub fn in_nmi(&self) -> bool {
        self.current_cpu()
            .is_some_and(|me| self.per_cpu(me).nmi_depth.load(Ordering::Relaxed) > 0)
    }

    /// NMIs `cpu` has handled.
    pub fn nmis_received(&self, cpu: CpuId) -> u64 {
        if cpu >= self.nr_cpus() {
            return 0;
        }
        // Relaxed: statistics.
        self.per_cpu(cpu).nmis_received.load(Ordering::Relaxed)
    }

    /// Runs `f` on every online CPU of `mask` in NMI context — reaching CPUs that spin with
    /// interrupts masked — one CPU after the other, and waits for each. The caller, if in
    /// `mask`, runs `f` directly. Returns the CPUs `f` ran on.
    ///
    /// Allowed with interrupts masked and from call handlers (NMIs need no cooperation from the
    /// target); refused from an NMI handler. [`Error::Unsupported`] if the platform has no NMI.
    ///
    /// # Safety
    /// `f` runs in NMI context: it interrupts whatever the target was doing, at any
    /// instruction, whatever its interrupt mask — in the hosted backend inside a signal
    /// handler. It must be *async-signal-safe*: use atomics, read memory that stays valid,
    /// call async-signal-safe system calls, report through a non-allocating sink. It must not
    /// allocate or free, take any lock (`Mutex`, stdout, the allocator's), touch thread-locals
    /// that initialise lazily, or wait for anything the interrupted code might hold. (The
    /// engine's own NMI work — stall reports through [`nmi_report`](Engine::nmi_report) — keeps
    /// to this and is safe to request.)
    pub unsafe fn nmi_call_many<F>(&self, mask: &CpuMask, f: F) -> Result<CpuMask, Error>
    where
        F: Fn(CpuId) + Sync,
    {
        if !self.platform.has_nmi() {
            return Err(Error::Unsupported("NMIs"));
        }
        // Refused in NMI context (`enter`: no call starts there).
        let me = self.enter()?;
        let targets = mask.and(&self.online_mask());
        let mut ran = CpuMask::new();
        for t in &targets {
            if t == me {
                f(me);
                ran.set(t);
                continue;
            }
            let csd = Csd::new();
            let claimed = csd.try_lock();
            debug_assert!(claimed);
            let (run, payload) = shared_call(&f);
            // SAFETY: we hold the fresh csd; `f` outlives the wait below.
            unsafe { csd.set_call(run, payload, true) };
            self.note_call::<F>(&csd, me, t);
            let in_flight = AbortOnUnwind;
            // SAFETY: locked and filled; lives on this frame until released (waited below;
            // unwinding aborts).
            unsafe { self.per_cpu(t).nmi_queue.push(&csd) };
            self.platform.send_nmi(t);
            self.wait_csd(me, t, &csd);
            core::mem::forget(in_flight);
            ran.set(t);
        }
        Ok(ran)
    }

    /// Asks `cpu`, by NMI, to report what it is doing through [`Platform::report`] (used by
    /// the stall diagnostics; reaches CPUs with interrupts masked). Returns whether an NMI
    /// could be sent.
    pub fn nmi_report(&self, cpu: CpuId) -> bool {
        if cpu >= self.nr_cpus() {
            return false;
        }
        // Relaxed: the NMI handler's swap sees it; a lost request only loses a report.
        if !self.platform.has_nmi() {
            return false;
        }
        self.per_cpu(cpu)
            .nmi_report_requested
            .store(true, Ordering::Relaxed);
        self.platform.send_nmi(cpu);
        true
    }

    /// What a CPU was doing when the NMI arrived, in words (for reports).
    fn context_name(&self, me: CpuId, before: crate::context::CpuContext) -> &'static str {
        use crate::context::CpuContext;
        match before {
            CpuContext::Idle if self.is_polling(me) => "idle, polling its queue",
            CpuContext::Idle => "idle",
            CpuContext::Handler if self.handler_depth(me) > 0 => {
                "in a call handler (interrupted by this NMI)"
            }
            CpuContext::Handler => "in an interrupt or NMI handler (interrupted by this NMI)",
            CpuContext::Task => "in task context (interrupted by this NMI)",
        }
    }

    /// Reports (from the CPU itself, typically in its NMI handler) what `me` is doing.
    pub(crate) fn report_cpu_state(&self, me: CpuId, before: crate::context::CpuContext) {
        self.platform.report(format_args!(
            "smpcall: NMI: CPU {me} is {}; interrupts {}, call handler depth {}, polling {}, \
             stop_machine stage {:?}, queue {}",
            self.context_name(me, before),
            // Inside the NMI handler the CPU's own mask is the handler's; ask the platform what
            // the interrupted code had, where it can tell.
            match self.platform.cpu_irqs_masked(me) {
                Some(true) => "masked",
                Some(false) => "on",
                None if self.platform.irqs_masked() => "masked",
                None => "on",
            },
            self.handler_depth(me),
            if self.is_polling(me) { "yes" } else { "no" },
            self.stop_stage(me),
            if self.has_queued(me) {
                "non-empty"
            } else {
                "empty"
            },
        ));
    }
}
