//! A small seeded generator: one independent stream per CPU, derived from the run's seed.

/// A seeded generator (`fastrand`'s wyrand: cheap, no allocation), good enough to choose call
/// kinds and targets; the one crate the command, the tests and the bare-metal tests use.
///
/// Each CPU gets its own stream ([`Rng::for_stream`]), so a given seed fixes the sequence of
/// choices every CPU makes (not the interleaving between CPUs, which the host scheduler decides).
#[derive(Clone, Debug)]
pub struct Rng(fastrand::Rng);

impl Rng {
    /// Stream `stream` (a CPU id) of the run seeded with `seed`: a generator seeded with
    /// `seed ^ stream` is forked, which scatters neighbouring seeds and streams.
    pub fn for_stream(seed: u64, stream: u64) -> Rng {
        Rng(fastrand::Rng::with_seed(seed ^ stream).fork())
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.u64(..)
    }

    /// A number in `0..n` (`n > 0`), without modulo bias worth mentioning.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0, "Rng::below(0)");
        self.0.u64(..n)
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_differ_and_are_reproducible() {
        let a: Vec<u64> = (0..4).map(|_| Rng::for_stream(7, 0).next_u64()).collect();
        assert!(
            a.windows(2).all(|w| w[0] == w[1]),
            "same seed and stream, same output"
        );
        let mut s0 = Rng::for_stream(7, 0);
        let mut s1 = Rng::for_stream(7, 1);
        assert_ne!(s0.next_u64(), s1.next_u64());
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = Rng::for_stream(1, 2);
        let mut seen = [false; 5];
        for _ in 0..1000 {
            let v = r.below(5) as usize;
            seen[v] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
