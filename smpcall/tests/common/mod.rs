//! Helpers shared by the integration tests: every wait is bounded and names what it waited for.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// Generous bound for waits that normally take microseconds (the machine may be loaded).
pub const LIMIT: Duration = Duration::from_secs(20);

/// Spins (yielding) until `cond` holds; panics naming `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::yield_now();
    }
}
