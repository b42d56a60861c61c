//! The kinds of call the torture workload issues, and the weighted mix it draws them from.

use std::fmt;
use std::str::FromStr;

use super::rng::Rng;

/// One primitive of the call API, as exercised by the workload.
///
/// To add a kind: add a variant, list it in [`Kind::ALL`], name it in [`Kind::name`], and
/// teach the workload to issue it (`Worker::issue` in the `torture` module). Statistics, the
/// verifier and the report pick it up from [`Kind::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    /// `call_single`: one target, wait for the result.
    Single,
    /// `call_single_async`: one target, the engine's per-sender slot, no wait.
    SingleAsync,
    /// `call_async_csd`: one target, a caller-owned pinned `Csd`, no wait.
    CsdAsync,
    /// `call_many`: a random mask of CPUs, wait.
    Many,
    /// `call_many_async`: a random mask of CPUs, no wait.
    ManyAsync,
    /// `call_all`: every CPU including the caller, wait.
    All,
    /// `call_all_async`: every CPU including the caller, no wait.
    AllAsync,
    /// `call_others`: every CPU but the caller, wait.
    Others,
    /// `call_others_async`: every CPU but the caller, no wait.
    OthersAsync,
    /// `call_cond`: a random mask filtered by a random predicate, wait.
    Cond,
    /// `call_cond_async`: a random mask filtered by a random predicate, no wait.
    CondAsync,
}

impl Kind {
    /// Number of kinds.
    pub const COUNT: usize = 11;

    /// Every kind, in index order.
    pub const ALL: [Kind; Kind::COUNT] = [
        Kind::Single,
        Kind::SingleAsync,
        Kind::CsdAsync,
        Kind::Many,
        Kind::ManyAsync,
        Kind::All,
        Kind::AllAsync,
        Kind::Others,
        Kind::OthersAsync,
        Kind::Cond,
        Kind::CondAsync,
    ];

    /// Dense index (`0..COUNT`), for per-kind tables.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The kind with index `i`, if any.
    pub fn from_index(i: usize) -> Option<Kind> {
        Kind::ALL.get(i).copied()
    }

    /// Short name, as used in reports (and, later, in `--weight NAME=W` flags).
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Single => "single",
            Kind::SingleAsync => "single-async",
            Kind::CsdAsync => "csd-async",
            Kind::Many => "many",
            Kind::ManyAsync => "many-async",
            Kind::All => "all",
            Kind::AllAsync => "all-async",
            Kind::Others => "others",
            Kind::OthersAsync => "others-async",
            Kind::Cond => "cond",
            Kind::CondAsync => "cond-async",
        }
    }

    /// Whether the caller waits for the call's functions to finish.
    pub const fn waits(self) -> bool {
        matches!(
            self,
            Kind::Single | Kind::Many | Kind::All | Kind::Others | Kind::Cond
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown call kind `{s}` (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// Relative weights of the kinds: how often the workload picks each one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    weights: [u32; Kind::COUNT],
}

impl Default for Mix {
    fn default() -> Self {
        Mix::uniform()
    }
}

impl Mix {
    /// Every kind equally likely.
    pub const fn uniform() -> Mix {
        Mix {
            weights: [1; Kind::COUNT],
        }
    }

    /// This mix with `kind`'s weight set to `weight` (0 disables the kind).
    #[must_use]
    pub fn with_weight(mut self, kind: Kind, weight: u32) -> Mix {
        self.weights[kind.index()] = weight;
        self
    }

    /// The weight of `kind`.
    pub fn weight(&self, kind: Kind) -> u32 {
        self.weights[kind.index()]
    }

    /// Sum of the weights.
    pub fn total(&self) -> u64 {
        self.weights.iter().map(|&w| u64::from(w)).sum()
    }

    /// Draws a kind. The mix must have a non-zero total (see [`Mix::total`]).
    pub fn pick(&self, rng: &mut Rng) -> Kind {
        let mut x = rng.below(self.total().max(1));
        for kind in Kind::ALL {
            let w = u64::from(self.weight(kind));
            if x < w {
                return kind;
            }
            x -= w;
        }
        Kind::Single
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_names_and_parsing_agree() {
        for (i, k) in Kind::ALL.into_iter().enumerate() {
            assert_eq!(k.index(), i);
            assert_eq!(Kind::from_index(i), Some(k));
            assert_eq!(k.name().parse::<Kind>(), Ok(k));
        }
        assert!("bogus".parse::<Kind>().is_err());
    }

    #[test]
    fn mix_respects_zero_weights() {
        let mix = Mix::uniform()
            .with_weight(Kind::All, 0)
            .with_weight(Kind::Many, 5);
        let mut rng = Rng::for_stream(3, 0);
        let mut counts = [0u32; Kind::COUNT];
        for _ in 0..20_000 {
            counts[mix.pick(&mut rng).index()] += 1;
        }
        assert_eq!(counts[Kind::All.index()], 0);
        assert!(counts[Kind::Many.index()] > 3 * counts[Kind::Single.index()]);
        assert!(counts
            .iter()
            .enumerate()
            .all(|(i, &c)| i == Kind::All.index() || c > 0));
    }
}
