//! Lost-IPI diagnostics (C9): sequence counters, stuck-wait reports with IPI re-send, a
//! watchdog for queued calls nobody waits for, and a dump of everything.
//!
//! Seed 000 was a hunt for CPUs spinning forever in the call-data lock wait, found only by
//! adding request/response sequence counters by hand. Here they are always on:
//!
//! * per target CPU, `requested` (calls queued to it) and `responded` (calls it ran), plus IPIs
//!   sent / elided / received — the counters of [`CpuStats`](crate::CpuStats);
//! * per call data, the route (source → target), the function's type name and whether it is a
//!   waiting call ([`Csd::route`](crate::Csd::route), [`Csd::function_name`](crate::Csd::function_name));
//! * per CPU, what it is waiting for and since when.
//!
//! A wait for call data (a waiting call, or a per-CPU slot still busy) that exceeds the stall
//! threshold is **reported** through [`Platform::report`] — who waits, on which CPU, for which
//! function, how long, the target's counters and whether it is masked or in a handler — and the
//! IPI is **re-sent** (recovering a lost one). Reports repeat at doubling intervals, each with
//! a re-send. The wait itself never gives up: the target may still read the call data, so
//! returning early would be a use-after-free (the mistake the design notes record in another
//! Rust kernel crate).
//!
//! Calls nobody waits for (no-wait calls) are watched by [`Engine::check_stalls`], which a
//! backend runs periodically: a queue that stays non-empty longer than the threshold is
//! reported and its CPU re-sent an IPI.

use crate::sync::AtomicU64;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::cpumask::CpuId;
use crate::csd::Csd;
use crate::engine::{Engine, Storage};
use crate::platform::Platform;

/// Counters of the diagnostics, from [`Engine::diag_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiagStats {
    /// Stuck-wait reports (a wait for call data exceeded the threshold).
    pub stall_reports: u64,
    /// Reports of a queue left untaken longer than the threshold (no-wait calls).
    pub queue_stall_reports: u64,
    /// IPIs re-sent by the stall paths.
    pub ipi_resends: u64,
    /// Stuck waits that completed after being reported (typically: the re-sent IPI got
    /// through).
    pub recoveries: u64,
}

#[derive(Debug)]
pub(crate) struct DiagCounters {
    stall_reports: AtomicU64,
    queue_stall_reports: AtomicU64,
    ipi_resends: AtomicU64,
    recoveries: AtomicU64,
    /// Re-send the IPI when a stall is reported (on by default; off only to test detection).
    pub(crate) resend: AtomicBool,
    /// Record route and function name in every call's data (on by default).
    pub(crate) per_call: AtomicBool,
}

impl DiagCounters {
    pub(crate) const fn new() -> Self {
        DiagCounters {
            stall_reports: AtomicU64::new(0),
            queue_stall_reports: AtomicU64::new(0),
            ipi_resends: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
            resend: AtomicBool::new(true),
            per_call: AtomicBool::new(true),
        }
    }
}

/// Per-CPU diagnostic state (lives in [`PerCpu`](crate::PerCpu)).
#[derive(Debug)]
pub(crate) struct CpuDiag {
    /// The CPU this one waits for (`u32::MAX`: not in a reported wait).
    waiting_for: AtomicU32,
    /// When that wait started (ns, platform clock).
    waiting_since: AtomicU64,
    /// When the watchdog first saw this CPU's queue non-empty (0: not seen / empty since).
    pub(crate) queued_since: AtomicU64,
    /// Watchdog reports since the queue was last taken (for doubling intervals).
    queue_reports: AtomicU32,
}

impl CpuDiag {
    pub(crate) const fn new() -> Self {
        CpuDiag {
            waiting_for: AtomicU32::new(u32::MAX),
            waiting_since: AtomicU64::new(0),
            queued_since: AtomicU64::new(0),
            queue_reports: AtomicU32::new(0),
        }
    }

    /// The owner took its queue: forget the watchdog's observation.
    #[inline]
    pub(crate) fn queue_taken(&self) {
        // Relaxed: a diagnostic timestamp; a stale value only delays or repeats a report.
        if self.queued_since.load(Ordering::Relaxed) != 0 {
            self.queued_since.store(0, Ordering::Relaxed);
            self.queue_reports.store(0, Ordering::Relaxed);
        }
    }
}

/// State of one wait that may become a reported stall (on the waiter's stack).
#[derive(Debug, Default)]
pub(crate) struct WaitWatch {
    start_ns: u64,
    next_report_ns: u64,
    reports: u32,
}

impl<P: Platform, S: Storage> Engine<P, S> {
    /// Diagnostic counters.
    pub fn diag_stats(&self) -> DiagStats {
        let d = &self.diag;
        // Relaxed: statistics.
        DiagStats {
            stall_reports: d.stall_reports.load(Ordering::Relaxed),
            queue_stall_reports: d.queue_stall_reports.load(Ordering::Relaxed),
            ipi_resends: d.ipi_resends.load(Ordering::Relaxed),
            recoveries: d.recoveries.load(Ordering::Relaxed),
        }
    }

    /// Whether a reported stall re-sends the IPI (default `true`). Turning it off is for
    /// showing that a lost IPI is *detected*; the wait still never gives up.
    pub fn set_resend_on_stall(&self, on: bool) {
        // Relaxed: a configuration flag.
        self.diag.resend.store(on, Ordering::Relaxed);
    }

    /// Whether every call records its route and function name in its call data (default
    /// `true`; costs two stores per call).
    pub fn set_call_diagnostics(&self, on: bool) {
        // Relaxed: a configuration flag.
        self.diag.per_call.store(on, Ordering::Relaxed);
    }

    /// The stall threshold (zero: reports, re-sends and stop_machine stall reports off).
    pub fn stall_threshold(&self) -> core::time::Duration {
        core::time::Duration::from_nanos(self.stall_threshold_ns())
    }

    /// The stall threshold in nanoseconds (0: reports off).
    pub(crate) fn stall_threshold_ns(&self) -> u64 {
        // Relaxed: a configuration value.
        self.stall_threshold_ns.load(Ordering::Relaxed)
    }

    /// Records route and name in `csd` if per-call diagnostics are on.
    #[inline]
    pub(crate) fn note_call<F>(&self, csd: &Csd, src: CpuId, dst: CpuId) {
        // Relaxed: a configuration flag.
        if self.diag.per_call.load(Ordering::Relaxed) {
            csd.set_meta::<F>(src, dst);
        }
    }

    /// Called from a wait loop every so often: reports and re-sends once the wait is longer
    /// than the threshold, at doubling intervals.
    pub(crate) fn check_wait_stall(
        &self,
        me: CpuId,
        target: CpuId,
        csd: &Csd,
        watch: &mut Option<WaitWatch>,
    ) {
        let threshold = self.stall_threshold_ns();
        if threshold == 0 {
            return;
        }
        let now = self.platform.now_ns();
        if now == 0 {
            return;
        }
        let target = Some(target);
        let w = watch.get_or_insert_with(|| {
            let d = &self.per_cpu(me).diag;
            // Relaxed: diagnostics, read racily by dumps.
            d.waiting_for
                .store(target.map_or(u32::MAX - 1, |t| t as u32), Ordering::Relaxed);
            d.waiting_since.store(now, Ordering::Relaxed);
            WaitWatch {
                start_ns: now,
                next_report_ns: threshold,
                reports: 0,
            }
        });
        let waited = now.saturating_sub(w.start_ns);
        if waited < w.next_report_ns || !csd.is_busy() {
            // Not yet, or released since the waiter last looked: nothing to report.
            return;
        }
        // Next report after a doubled interval (1, 2, 4, … thresholds later), counted from now:
        // a wait that was descheduled for long is reported once, not once per missed interval.
        w.next_report_ns = waited.saturating_add(threshold.saturating_mul(1 << w.reports.min(16)));
        w.reports += 1;
        // Relaxed: statistics.
        self.diag.stall_reports.fetch_add(1, Ordering::Relaxed);
        let resend = self.diag.resend.load(Ordering::Relaxed);
        self.platform.report(format_args!(
            "smpcall: stall: CPU {me} has waited {} ms for {} call {} to CPU {}; {}{}",
            waited / 1_000_000,
            if csd.is_waiting_call() {
                "waiting"
            } else {
                "no-wait (slot busy)"
            },
            csd.function_name().unwrap_or("<unrecorded>"),
            CpuName(target),
            TargetState {
                engine: self,
                cpu: target,
                counters: true,
            },
            if resend {
                "; re-sending the IPI"
            } else {
                "; NOT re-sending (disabled)"
            },
        ));
        if let (1, Some(t)) = (w.reports, target) {
            // First report: ask the target, by NMI, what it is doing (if the platform can).
            self.nmi_report(t);
        }
        if let (true, Some(t)) = (resend, target) {
            self.diag.ipi_resends.fetch_add(1, Ordering::Relaxed);
            self.platform.send_ipi(t);
        }
    }

    /// End of a wait that went through `check_wait_stall`.
    pub(crate) fn end_wait(&self, me: CpuId, watch: Option<WaitWatch>) {
        let Some(w) = watch else {
            return;
        };
        let d = &self.per_cpu(me).diag;
        // Relaxed: diagnostics.
        d.waiting_for.store(u32::MAX, Ordering::Relaxed);
        if w.reports > 0 {
            self.diag.recoveries.fetch_add(1, Ordering::Relaxed);
            let waited = self.platform.now_ns().saturating_sub(w.start_ns);
            self.platform.report(format_args!(
                "smpcall: stall: CPU {me} recovered after {} ms ({} report(s))",
                waited / 1_000_000,
                w.reports
            ));
        }
    }

    /// The watchdog for calls nobody waits for: reports every CPU whose queue has stayed
    /// non-empty (untaken) longer than the stall threshold, and re-sends it an IPI. A backend
    /// runs this periodically from any thread (the hosted machine has a watchdog thread).
    /// Returns how many CPUs were reported.
    pub fn check_stalls(&self) -> usize {
        let threshold = self.stall_threshold_ns();
        let now = self.platform.now_ns();
        if threshold == 0 || now == 0 {
            return 0;
        }
        let mut reported = 0;
        for cpu in 0..self.nr_cpus() {
            let d = &self.per_cpu(cpu).diag;
            if !self.has_queued(cpu) {
                continue;
            }
            // Relaxed: diagnostic timestamps (see `CpuDiag`).
            let since = d.queued_since.load(Ordering::Relaxed);
            if since == 0 {
                let _ =
                    d.queued_since
                        .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
                continue;
            }
            let reports = d.queue_reports.load(Ordering::Relaxed).min(16);
            let age = now.saturating_sub(since);
            if age < threshold.saturating_mul(1 << reports) {
                continue;
            }
            d.queue_reports.store(reports + 1, Ordering::Relaxed);
            self.diag
                .queue_stall_reports
                .fetch_add(1, Ordering::Relaxed);
            let resend = self.diag.resend.load(Ordering::Relaxed);
            self.platform.report(format_args!(
                "smpcall: stall: CPU {cpu} has had calls queued for {} ms without taking them; \
                 {}{}",
                age / 1_000_000,
                TargetState {
                    engine: self,
                    cpu: Some(cpu),
                    counters: true,
                },
                if resend {
                    "; re-sending the IPI"
                } else {
                    "; NOT re-sending (disabled)"
                },
            ));
            if resend {
                self.diag.ipi_resends.fetch_add(1, Ordering::Relaxed);
                self.platform.send_ipi(cpu);
            }
            reported += 1;
        }
        reported
    }

    /// Writes the state of every CPU — counters, queue, waits, busy call-data slots — the
    /// sysrq-style dump of seed 000.
    pub fn dump(&self, out: &mut dyn fmt::Write) -> fmt::Result {
        let now = self.platform.now_ns();
        let d = self.diag_stats();
        let h = self.hotplug_stats();
        writeln!(
            out,
            "smpcall dump: {} CPUs, online {{{}}}, stall threshold {} ms; stall reports {} \
             (queue {}), IPI re-sends {}, recoveries {}; hotplug downs {} ups {} \
             stop_machines {}",
            self.nr_cpus(),
            self.online_mask(),
            self.stall_threshold_ns() / 1_000_000,
            d.stall_reports,
            d.queue_stall_reports,
            d.ipi_resends,
            d.recoveries,
            h.downs,
            h.ups,
            h.stop_machines
        )?;
        for cpu in 0..self.nr_cpus() {
            let s = self.stats_of(cpu);
            let pd = &self.per_cpu(cpu).diag;
            write!(
                out,
                "  CPU {cpu:>3}: {} requested {} responded {} | IPI sent {} elided {} \
                 received {} | flushes {} offline-runs {} | {}",
                if self.is_accepting(cpu) {
                    "online "
                } else if self.is_online(cpu) {
                    "going-down"
                } else {
                    "offline"
                },
                s.calls_queued,
                s.calls_run,
                s.ipi_sent,
                s.ipi_elided,
                s.ipi_received,
                s.flushes,
                s.offline_runs,
                // The line already has the CPU and its counters: only the state.
                TargetState {
                    engine: self,
                    cpu: Some(cpu),
                    counters: false,
                },
            )?;
            // Relaxed: diagnostics.
            let waiting_for = pd.waiting_for.load(Ordering::Relaxed);
            if waiting_for != u32::MAX {
                let since = pd.waiting_since.load(Ordering::Relaxed);
                write!(
                    out,
                    " | waiting for CPU {} for {} ms",
                    waiting_for,
                    now.saturating_sub(since) / 1_000_000
                )?;
            }
            writeln!(out)?;
        }
        // Threads that are not CPUs: their rows of call data.
        let n = self.nr_cpus();
        for (i, slot) in self.storage_foreign_slots().iter().enumerate() {
            if slot.is_busy() {
                writeln!(
                    out,
                    "  in flight: foreign row {} -> {} no-wait {}",
                    i / n,
                    i % n,
                    slot.function_name().unwrap_or("<unrecorded>")
                )?;
            }
        }
        for src in 0..self.nr_cpus() {
            for dst in 0..self.nr_cpus() {
                for slot in self.slot_group(src, dst).iter().filter(|s| s.is_busy()) {
                    writeln!(
                        out,
                        "  in flight: slot {src}->{dst} {} {}",
                        if slot.is_waiting_call() {
                            "waiting"
                        } else {
                            "no-wait"
                        },
                        slot.function_name().unwrap_or("<unrecorded>")
                    )?;
                }
            }
        }
        Ok(())
    }

    /// [`dump`](Engine::dump) through [`Platform::report`], one line per report (usable where
    /// there is no `fmt::Write` at hand, e.g. a stall handler).
    pub fn dump_to_report(&self) {
        struct Lines<'a, P: Platform, S: Storage> {
            engine: &'a Engine<P, S>,
            line: [u8; 512],
            len: usize,
        }
        impl<P: Platform, S: Storage> fmt::Write for Lines<'_, P, S> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                for &b in s.as_bytes() {
                    if b == b'\n' {
                        let text = core::str::from_utf8(&self.line[..self.len]).unwrap_or("?");
                        self.engine.platform.report(format_args!("{text}"));
                        self.len = 0;
                    } else if self.len < self.line.len() {
                        self.line[self.len] = b;
                        self.len += 1;
                    }
                }
                Ok(())
            }
        }
        let mut lines = Lines {
            engine: self,
            line: [0; 512],
            len: 0,
        };
        let _ = self.dump(&mut lines);
    }
}

struct CpuName(Option<CpuId>);

impl fmt::Display for CpuName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(c) => write!(f, "{c}"),
            None => f.write_str("?"),
        }
    }
}

/// The target-side facts a stall report gives.
struct TargetState<'a, P: Platform, S: Storage> {
    engine: &'a Engine<P, S>,
    cpu: Option<CpuId>,
    /// Start with "CPU n: requested … ipi-received …," (not where the line already has them).
    counters: bool,
}

impl<P: Platform, S: Storage> fmt::Display for TargetState<'_, P, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(cpu) = self.cpu.filter(|&c| c < self.engine.nr_cpus()) else {
            return f.write_str("target unknown");
        };
        let e = self.engine;
        if self.counters {
            let s = e.stats_of(cpu);
            write!(
                f,
                "CPU {cpu}: requested {} responded {} ipi-sent {} ipi-received {}, ",
                s.calls_queued, s.calls_run, s.ipi_sent, s.ipi_received,
            )?;
        }
        write!(
            f,
            "masked {}, in handler {}, polling {}, queue {}",
            match e.platform.cpu_irqs_masked(cpu) {
                Some(true) => "yes",
                Some(false) => "no",
                None => "unknown",
            },
            if e.handler_depth(cpu) > 0 {
                "yes"
            } else {
                "no"
            },
            if e.is_polling(cpu) { "yes" } else { "no" },
            if e.has_queued(cpu) {
                "non-empty"
            } else {
                "empty"
            },
        )
    }
}
