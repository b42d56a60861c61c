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
    /// "rpc": `call_single_async` whose function signals a completion in the call's record;
    /// the caller waits for that completion (bounded) and then checks the function's writes.
    Rpc,
    /// `call_async_csd`: one target, a caller-owned pinned `Csd`, no wait.
    CsdAsync,
    /// `call_single` to the calling CPU itself: runs at once, locally, interrupts masked.
    SelfSingle,
    /// A no-wait call to the calling CPU itself (`call_single_async` or `call_async_csd`,
    /// alternately at random): runs at once, locally.
    SelfAsync,
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
    pub const COUNT: usize = 14;

    /// Every kind, in index order.
    pub const ALL: [Kind; Kind::COUNT] = [
        Kind::Single,
        Kind::SingleAsync,
        Kind::Rpc,
        Kind::CsdAsync,
        Kind::SelfSingle,
        Kind::SelfAsync,
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

    /// Short name, as used in reports, in `--weight NAME=W` and in `--weight-NAME W`.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Single => "single",
            Kind::SingleAsync => "single-async",
            Kind::Rpc => "rpc",
            Kind::CsdAsync => "csd-async",
            Kind::SelfSingle => "self",
            Kind::SelfAsync => "self-async",
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

    /// Whether the caller waits for the call's functions to finish (inside the engine).
    pub const fn waits(self) -> bool {
        matches!(
            self,
            Kind::Single | Kind::SelfSingle | Kind::Many | Kind::All | Kind::Others | Kind::Cond
        )
    }

    /// Whether the caller checks, once the call is over, that it sees the functions' writes
    /// (the "out" check): every waiting kind, and [`Kind::Rpc`] after its completion.
    pub const fn checks_out(self) -> bool {
        self.waits() || matches!(self, Kind::Rpc)
    }

    /// Whether a call of this kind has a single target (possibly the caller).
    pub const fn is_single(self) -> bool {
        matches!(
            self,
            Kind::Single
                | Kind::SingleAsync
                | Kind::Rpc
                | Kind::CsdAsync
                | Kind::SelfSingle
                | Kind::SelfAsync
        )
    }

    /// What the latency recorded for this kind measures: the full round trip of a waiting
    /// call, the issue cost of a no-wait call, or issue to completion of an rpc.
    pub const fn latency_meaning(self) -> &'static str {
        if matches!(self, Kind::Rpc) {
            "to completion"
        } else if self.waits() {
            "round trip"
        } else {
            "issue cost"
        }
    }

    /// The default weight of this kind (see [`Mix::default`]).
    pub const fn default_weight(self) -> u32 {
        match self {
            Kind::Single | Kind::SingleAsync | Kind::Rpc | Kind::CsdAsync => 8,
            Kind::SelfSingle | Kind::SelfAsync | Kind::Many | Kind::ManyAsync => 2,
            _ => 1,
        }
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
    /// The default spread, after the kernel's scftorture: single-target calls to other CPUs
    /// (`single`, `single-async`, `rpc`, `csd-async`) weigh 8 each, self calls and `many` /
    /// `many-async` 2 each, and the calls that reach every CPU (`all`, `others`, `cond` and
    /// their no-wait forms) 1 each. A many-call runs on several CPUs, so this keeps the
    /// function runs spread over the kinds rather than dominated by the broadcasts.
    fn default() -> Self {
        let mut weights = [0; Kind::COUNT];
        for kind in Kind::ALL {
            weights[kind.index()] = kind.default_weight();
        }
        Mix { weights }
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

    /// The share of calls of `kind`, in percent (0 when every weight is 0).
    pub fn percent(&self, kind: Kind) -> f64 {
        match self.total() {
            0 => 0.0,
            total => 100.0 * f64::from(self.weight(kind)) / total as f64,
        }
    }

    /// This mix with `spec` applied: one kind's weight, or every kind's.
    #[must_use]
    pub fn with_spec(self, spec: WeightSpec) -> Mix {
        match spec.kind {
            Some(kind) => self.with_weight(kind, spec.weight),
            None => Mix {
                weights: [spec.weight; Kind::COUNT],
            },
        }
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

/// One `--weight` argument: `KIND=W` sets one kind's weight, `*=W` every kind's (so
/// `--weight '*=0' --weight rpc=1` runs rpc calls only). 0 disables a kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightSpec {
    /// The kind, `None` for every kind.
    pub kind: Option<Kind>,
    /// Its weight.
    pub weight: u32,
}

impl FromStr for WeightSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<WeightSpec, String> {
        let (name, weight) = s
            .split_once('=')
            .ok_or_else(|| format!("invalid weight `{s}`: expected KIND=W (e.g. rpc=5) or *=W"))?;
        let kind = match name.trim() {
            "*" => None,
            name => Some(name.parse::<Kind>()?),
        };
        let weight = weight
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("invalid weight `{s}`: W must be a whole number >= 0"))?;
        Ok(WeightSpec { kind, weight })
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

    #[test]
    fn default_mix_enables_every_kind_and_sums_to_100_percent() {
        let mix = Mix::default();
        assert!(Kind::ALL.iter().all(|&k| mix.weight(k) > 0));
        let sum: f64 = Kind::ALL.iter().map(|&k| mix.percent(k)).sum();
        assert!((sum - 100.0).abs() < 1e-9, "{sum}");
        assert!(mix.weight(Kind::Single) > mix.weight(Kind::All));
    }
}
