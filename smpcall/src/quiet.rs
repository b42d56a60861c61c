//! Quiet CPUs (C16): a CPU that declares a *quiet region* — blocked in a system call, or running
//! isolated code that must not be interrupted — is in an extended quiescent state.
//!
//! * **RCU.** Entering the region is an idle entry of the context tracker (C12): expedited grace
//!   periods see the CPU idle and skip it, with no IPI, exactly as they skip idle CPUs. A CPU
//!   inside an RCU read-side section cannot become quiet: [`Engine::quiet`] then runs its
//!   function without entering the region (grace periods keep waiting for the reader), and a
//!   read-side section cannot start inside the region ([`Engine::rcu_read_lock`] refuses).
//! * **Deferrable calls** ([`Engine::call_single_deferrable`]) to a quiet CPU are queued without
//!   an IPI and run when it leaves the region, in order, exactly once; to a CPU that is not
//!   quiet they behave like any no-wait call. Other (urgent) calls still interrupt a quiet CPU.
//!   Hotplug and leaving flush deferred calls like any other queued call.
//!
//! Ordering (the Dekker pair that keeps a deferrable call from being stranded): the sender
//! pushes (SeqCst CAS) and then loads `quiet` (SeqCst); the CPU leaving the region stores
//! `quiet = false` (SeqCst) and then loads its queue head (SeqCst). Either the sender sees the
//! CPU not quiet and sends the IPI, or the CPU sees the call at its exit and runs it.

use core::sync::atomic::Ordering;

use crate::cpumask::CpuId;
use crate::engine::{Engine, Storage};
use crate::error::Error;
use crate::platform::Platform;

impl<P: Platform, S: Storage> Engine<P, S> {
    /// Runs `f` with the current CPU in a quiet region: grace periods skip it without
    /// interrupting it, deferrable calls to it wait until `f` returns, and are then run here
    /// (before this returns). Urgent calls still interrupt it. Meant for a blocking system
    /// call, or code that must not be interrupted.
    ///
    /// `f` runs without entering the region (the CPU stays watched) when the caller is not a
    /// CPU, is inside an RCU read-side section, a call handler, an NMI, a masked region, or a
    /// quiet region already. Inside the region, [`rcu_read_lock`](Engine::rcu_read_lock) is
    /// refused. Cost: two atomic read-modify-writes on this CPU's context word and two stores.
    ///
    /// ```
    /// use smpcall::hosted::Machine;
    /// let m = Machine::builder().cpus(2).attach_slots(1).build()?;
    /// let me = m.attach()?;
    /// let e = me.engine();
    /// // A blocking call in a quiet region: grace periods from other CPUs do not signal us.
    /// e.quiet(|| std::thread::sleep(std::time::Duration::from_millis(1)));
    /// # drop(me); m.shutdown()?; Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn quiet<R>(&self, f: impl FnOnce() -> R) -> R {
        let Some(me) = self.current_cpu() else {
            return f();
        };
        let pc = self.per_cpu(me);
        // Relaxed: this CPU's own state.
        if pc.quiet.load(Ordering::Relaxed)
            || self.rcu_read_held()
            || self.in_handler()
            || self.in_nmi()
            || self.irqs_masked()
        {
            return f();
        }
        // Idle entry first (grace periods skip us from here on), then deferrable calls stop
        // sending IPIs. SeqCst: see the module documentation.
        pc.ctx.idle_enter();
        pc.quiet.store(true, Ordering::SeqCst);
        struct Exit<'a, P: Platform, S: Storage> {
            engine: &'a Engine<P, S>,
            me: CpuId,
        }
        impl<P: Platform, S: Storage> Drop for Exit<'_, P, S> {
            fn drop(&mut self) {
                let pc = self.engine.per_cpu(self.me);
                // Watched again before anything else runs here; then the Dekker pair's exit
                // half: `quiet = false`, then look at the queue (SeqCst both).
                pc.ctx.idle_exit();
                pc.quiet.store(false, Ordering::SeqCst);
                if self.engine.has_queued(self.me) {
                    let ran = self.engine.serve_queue();
                    // Relaxed: statistics.
                    pc.run_at_quiet_exit
                        .fetch_add(ran as u64, Ordering::Relaxed);
                }
            }
        }
        let _exit = Exit { engine: self, me };
        f()
    }

    /// Whether `cpu` is in a quiet region right now (an observation).
    pub fn is_quiet(&self, cpu: CpuId) -> bool {
        // Relaxed: an observation.
        cpu < self.nr_cpus() && self.per_cpu(cpu).quiet.load(Ordering::Relaxed)
    }

    /// Whether the current CPU is in a quiet region (an RCU reader must not start here).
    pub(crate) fn in_quiet_region(&self, me: CpuId) -> bool {
        // Relaxed: this CPU's own flag. Also inside a handler or NMI: a reader opened there and
        // kept past it (in a thread-local) would leave the CPU quiet with a reader open.
        self.per_cpu(me).quiet.load(Ordering::Relaxed)
    }

    /// Like [`call_single_async`](Engine::call_single_async), but *deferrable*: if `cpu` is in
    /// a quiet region ([`quiet`](Engine::quiet)) the call is queued without an IPI and runs
    /// when `cpu` leaves the region; otherwise it is delivered as usual. Counted in
    /// [`CpuStats::deferred_while_quiet`](crate::CpuStats::deferred_while_quiet) and
    /// [`run_at_quiet_exit`](crate::CpuStats::run_at_quiet_exit).
    ///
    /// It uses this CPU's no-wait slots for `cpu`, like `call_single_async`: once all of them
    /// hold calls deferred to the quiet CPU, the next one waits (serving this CPU's queue) for
    /// its exit from the region. An urgent call that interrupts an `interruptible` quiet region
    /// runs the deferred calls queued before it too.
    pub fn call_single_deferrable<F>(&self, cpu: CpuId, f: F) -> Result<(), Error>
    where
        F: FnOnce(CpuId) + Send + 'static,
    {
        // To our own CPU (not quiet while it runs this): an ordinary local call.
        self.call_single_async_with(cpu, f, true)
    }
}
