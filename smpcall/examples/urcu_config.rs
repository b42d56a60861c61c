//! User-space RCU over a configuration pointer: reader threads (your own, attached as CPUs)
//! read the current configuration inside `rcu_read_lock()` sections, with no lock and no
//! shared write; a writer thread (attached too: a grace period is driven from a CPU) publishes
//! a new configuration with one pointer swap and reclaims the old one after
//! `synchronize_rcu_expedited()` returned.
//!
//! Reclaimed configurations are poisoned and recycled for later versions, so a reader that
//! could still see one would notice (wrong magic, fields of two versions). Every field is an
//! atomic, so even that failure would be a detected wrong value, not a data race.
//!
//! A grace period waits for each busy reader to take a signal: with more threads than cores (3
//! on 2 here) a preempted reader takes it only when it runs again (milliseconds).
//!
//! ```sh
//! cargo run --release -p smpcall --example urcu_config [MILLISECONDS]   # default 300
//! ```

mod common;

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use smpcall::hosted::{safe_point, Machine};

const READERS: usize = 2;
const LIVE: u64 = 0x1157_C0DE;
const POISON: u64 = 0xDEAD_DEAD;

#[derive(Default)]
struct Config {
    magic: AtomicU64,
    version: AtomicU64,
    /// `limits[i] == version * (i + 1)`: all of one version, or the reader caught a mix.
    limits: [AtomicU64; 4],
}

impl Config {
    fn fill(&self, version: u64) {
        self.version.store(version, Ordering::Relaxed);
        for (i, l) in self.limits.iter().enumerate() {
            l.store(version * (i as u64 + 1), Ordering::Relaxed);
        }
        self.magic.store(LIVE, Ordering::Relaxed);
    }

    fn new(version: u64) -> Box<Config> {
        let c = Box::<Config>::default();
        c.fill(version);
        c
    }
}

/// Publishes a new version, waits a grace period and reclaims the old one, for `run_for`.
/// Returns (grace periods, last version).
fn write_configs(
    m: &Machine,
    current: &AtomicPtr<Config>,
    run_for: Duration,
) -> Result<(u64, u64), smpcall::Error> {
    let me = m.attach()?;
    let mut free: Vec<Box<Config>> = Vec::new(); // reclaimed, poisoned, for reuse
    let (start, mut version, mut gps) = (Instant::now(), 1u64, 0u64);
    while start.elapsed() < run_for {
        version += 1;
        let fresh = free.pop().unwrap_or_default();
        fresh.fill(version);
        let old = current.swap(Box::into_raw(fresh), Ordering::AcqRel);
        me.engine().synchronize_rcu_expedited()?;
        gps += 1;
        // SAFETY: unpublished before the grace period: no reader can still hold it.
        let old = unsafe { Box::from_raw(old) };
        old.magic.store(POISON, Ordering::Relaxed);
        old.version.store(u64::MAX, Ordering::Relaxed);
        free.push(old);
    }
    Ok((gps, version))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::watchdog();
    let run_for = Duration::from_millis(common::arg_or(300));
    // The readers and the writer are all CPUs: READERS + 1 slots, no CPU threads of its own.
    let m = Machine::builder()
        .cpus(0)
        .attach_slots(READERS + 1)
        .build()?;
    let current = AtomicPtr::new(Box::into_raw(Config::new(1)));
    let stop = AtomicBool::new(false);

    let (reads, written) = std::thread::scope(|s| {
        let readers = common::spawn_cpus(s, &m, READERS, |me, _| {
            let (mut reads, mut newest) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let reader = me.engine().rcu_read_lock().expect("an online CPU");
                // SAFETY: the writer frees or reuses a configuration only after a grace period
                // that began after it was unpublished, so one read here stays valid until
                // `reader` drops.
                let cfg = unsafe { &*current.load(Ordering::Acquire) };
                let version = cfg.version.load(Ordering::Relaxed);
                assert_eq!(
                    cfg.magic.load(Ordering::Relaxed),
                    LIVE,
                    "a reclaimed config"
                );
                for (i, l) in cfg.limits.iter().enumerate() {
                    let want = version * (i as u64 + 1);
                    assert_eq!(l.load(Ordering::Relaxed), want, "a config being rewritten");
                }
                drop(reader);
                assert!(version >= newest, "versions go forward");
                newest = version;
                reads += 1;
                safe_point(); // between read-side sections
            }
            reads
        });

        // The writer, attached like the readers; the readers stop when it does.
        let writer = s.spawn(|| {
            let r = write_configs(&m, &current, run_for);
            stop.store(true, Ordering::SeqCst);
            r
        });
        let w = writer.join().expect("the writer panicked");
        (common::join_all(readers), w)
    });
    let (grace_periods, versions) = written?;
    // SAFETY: every reader and the writer are gone: nobody else can reach it.
    drop(unsafe { Box::from_raw(current.into_inner()) });
    let reads: u64 = reads.iter().sum();
    let stats = m.engine().rcu_stats();
    println!(
        "{READERS} readers: {reads} reads, never a reclaimed config; writer: {versions} \
         versions, {grace_periods} grace periods ({} CPUs called, {} quiescent-state reports \
         deferred to a reader's unlock)",
        stats.cpus_called, stats.deferred_to_unlock
    );
    assert!(reads > 0 && grace_periods > 0);
    assert_eq!(stats.grace_periods, grace_periods);
    m.shutdown()?;
    println!("OK");
    Ok(())
}
