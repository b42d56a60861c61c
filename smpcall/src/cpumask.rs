//! Fixed-size CPU masks.
//!
//! [`CpuMask`] is a plain, `Copy` bitmap of up to [`MAX_CPUS`] CPUs with the
//! usual set operations, efficient ascending iteration, and conversion to and
//! from the Linux "cpulist" text format (`"0-3,7,9-10"`).
//! [`AtomicCpuMask`] is its concurrent counterpart, whose bits can be set and
//! cleared from several CPUs at once (it backs the online mask).
//!
//! Nothing here allocates; everything works in `no_std`.
//!
//! # Example
//!
//! ```
//! use smpcall::cpumask::{AtomicCpuMask, CpuId, CpuMask};
//!
//! let mut targets: CpuMask = "0-3, 7".parse().unwrap();
//! targets.set(64);
//!
//! let online = AtomicCpuMask::new();
//! online.store(&CpuMask::first_n(8));
//!
//! // Only call the CPUs that are online.
//! let reachable = targets & online.load();
//! let ids: Vec<CpuId> = reachable.iter().collect();
//! assert_eq!(ids, [0, 1, 2, 3, 7]);
//! assert_eq!(reachable.to_string(), "0-3,7");
//! assert_eq!((targets - reachable).to_string(), "64");
//! ```

use crate::sync::AtomicU64;
use core::fmt;
use core::iter::FusedIterator;
use core::ops::{BitAnd, BitAndAssign, BitOr, BitOrAssign, Sub, SubAssign};
use core::str::FromStr;
use core::sync::atomic::Ordering;

/// Identifier of a CPU: its index, 0-based.
pub type CpuId = usize;

/// Largest number of CPUs a mask can hold.
///
/// Valid CPU ids are `0..MAX_CPUS`.
pub const MAX_CPUS: usize = 1024;

/// Bits per storage word.
const BITS: usize = u64::BITS as usize;

/// Number of storage words in a mask.
const WORDS: usize = MAX_CPUS / BITS;

// The representation relies on MAX_CPUS being a whole number of words.
const _: () = assert!(MAX_CPUS % BITS == 0 && MAX_CPUS > 0);

/// Word index and bit within that word for `cpu` (which must be in range).
#[inline]
const fn locate(cpu: CpuId) -> (usize, u64) {
    (cpu / BITS, 1u64 << (cpu % BITS))
}

/// Panics with a message naming the operation and the offending CPU id.
#[cold]
#[inline(never)]
#[track_caller]
fn out_of_range(op: &str, cpu: CpuId) -> ! {
    panic!("{op}: CPU id {cpu} is out of range (MAX_CPUS is {MAX_CPUS})")
}

/// A set of CPUs, stored as a fixed-size bitmap of [`MAX_CPUS`] bits.
///
/// The mask is `Copy` and never allocates. Iteration yields CPU ids in
/// ascending order. Formatting with `{}` produces the Linux "cpulist" format
/// (`"0-3,7"`, the empty mask prints as the empty string), and the same format
/// is accepted by [`str::parse`].
///
/// # Example
///
/// ```
/// use smpcall::cpumask::CpuMask;
///
/// let mut mask = CpuMask::first_n(4); // CPUs 0, 1, 2, 3
/// mask.set(7);
/// mask.clear(1);
/// assert!(mask.test(7) && !mask.test(1));
/// assert_eq!(mask.weight(), 4);
/// assert_eq!(mask.first(), Some(0));
/// assert_eq!(mask.next_after(3), Some(7));
/// assert_eq!(mask.to_string(), "0,2-3,7");
/// assert_eq!(format!("{mask:?}"), "CpuMask{0,2-3,7}");
///
/// let parsed: CpuMask = "0, 2-3, 7".parse().unwrap();
/// assert_eq!(parsed, mask);
///
/// let others = CpuMask::single(2) | CpuMask::single(9);
/// assert_eq!(mask & others, CpuMask::single(2));
/// assert_eq!((mask - others).to_string(), "0,3,7");
/// assert!(CpuMask::single(3).is_subset(&mask));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CpuMask {
    words: [u64; WORDS],
}

impl CpuMask {
    /// Returns the empty mask.
    #[inline]
    pub const fn new() -> Self {
        CpuMask { words: [0; WORDS] }
    }

    /// Returns the mask of CPUs `0..n`.
    ///
    /// # Panics
    ///
    /// Panics if `n > MAX_CPUS`.
    pub const fn first_n(n: usize) -> Self {
        assert!(n <= MAX_CPUS, "CpuMask::first_n: n exceeds MAX_CPUS");
        let mut words = [0u64; WORDS];
        let full = n / BITS;
        let mut i = 0;
        while i < full {
            words[i] = u64::MAX;
            i += 1;
        }
        let rem = n % BITS;
        if rem != 0 {
            words[full] = (1u64 << rem) - 1;
        }
        CpuMask { words }
    }

    /// Returns the mask containing only `cpu`.
    ///
    /// # Panics
    ///
    /// Panics if `cpu >= MAX_CPUS`.
    pub const fn single(cpu: CpuId) -> Self {
        assert!(
            cpu < MAX_CPUS,
            "CpuMask::single: CPU id is out of range (>= MAX_CPUS)"
        );
        let mut words = [0u64; WORDS];
        let (w, bit) = locate(cpu);
        words[w] = bit;
        CpuMask { words }
    }

    /// Adds `cpu` to the mask.
    ///
    /// # Panics
    ///
    /// Panics if `cpu >= MAX_CPUS`.
    #[inline]
    #[track_caller]
    pub fn set(&mut self, cpu: CpuId) {
        if cpu >= MAX_CPUS {
            out_of_range("CpuMask::set", cpu);
        }
        let (w, bit) = locate(cpu);
        self.words[w] |= bit;
    }

    /// Removes `cpu` from the mask.
    ///
    /// # Panics
    ///
    /// Panics if `cpu >= MAX_CPUS`.
    #[inline]
    #[track_caller]
    pub fn clear(&mut self, cpu: CpuId) {
        if cpu >= MAX_CPUS {
            out_of_range("CpuMask::clear", cpu);
        }
        let (w, bit) = locate(cpu);
        self.words[w] &= !bit;
    }

    /// Returns whether `cpu` is in the mask; `false` if `cpu >= MAX_CPUS`.
    #[inline]
    pub fn test(&self, cpu: CpuId) -> bool {
        if cpu >= MAX_CPUS {
            return false;
        }
        let (w, bit) = locate(cpu);
        self.words[w] & bit != 0
    }

    /// Returns whether no CPU is in the mask.
    #[inline]
    pub fn is_empty(&self) -> bool {
        // The first word alone answers for masks of low CPUs; for the rest, OR every word
        // rather than stop at the first non-empty one: branch-free, the compiler vectorises it
        // (a third of the instructions of an early-exit loop over 1024 bits, which a call whose
        // IPI was elided pays when it checks whether it has IPIs to send).
        self.words[0] == 0 && self.words[1..].iter().fold(0, |acc, &w| acc | w) == 0
    }

    /// Returns the number of CPUs in the mask.
    #[inline]
    pub fn weight(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Returns the lowest CPU in the mask, or `None` if it is empty.
    #[inline]
    pub fn first(&self) -> Option<CpuId> {
        self.scan_from(0, self.words[0])
    }

    /// Returns the lowest CPU in the mask that is strictly greater than
    /// `cpu`, or `None` if there is none.
    ///
    /// `cpu` need not be in the mask, nor in range.
    pub fn next_after(&self, cpu: CpuId) -> Option<CpuId> {
        if cpu >= MAX_CPUS - 1 {
            return None;
        }
        let start = cpu + 1;
        let w = start / BITS;
        self.scan_from(w, self.words[w] & (u64::MAX << (start % BITS)))
    }

    /// Finds the lowest set bit, starting with `first_word` standing in for
    /// word `w`, then the words after it.
    #[inline]
    fn scan_from(&self, w: usize, first_word: u64) -> Option<CpuId> {
        if first_word != 0 {
            return Some(w * BITS + first_word.trailing_zeros() as usize);
        }
        self.words[w + 1..].iter().position(|&x| x != 0).map(|i| {
            let idx = w + 1 + i;
            idx * BITS + self.words[idx].trailing_zeros() as usize
        })
    }

    /// Returns an iterator over the CPUs in the mask, in ascending order.
    #[inline]
    pub fn iter(&self) -> Iter<'_> {
        // One past the last non-empty word, found branch-free: iteration stops there instead
        // of scanning the empty words above the mask's last CPU one by one (most of a
        // many-call's fixed cost for a few low CPUs; see `smpcall bench --scaling`).
        let mut end = 0;
        for (i, &w) in self.words.iter().enumerate() {
            if w != 0 {
                end = i + 1;
            }
        }
        Iter {
            words: &self.words,
            index: 0,
            end,
            current: self.words[0],
            remaining: self.weight(),
        }
    }

    /// Returns the intersection of `self` and `other`.
    #[inline]
    #[must_use]
    pub fn and(&self, other: &CpuMask) -> CpuMask {
        self.zip_with(other, |a, b| a & b)
    }

    /// Returns the union of `self` and `other`.
    #[inline]
    #[must_use]
    pub fn or(&self, other: &CpuMask) -> CpuMask {
        self.zip_with(other, |a, b| a | b)
    }

    /// Returns the CPUs of `self` that are not in `other` (`self & !other`).
    #[inline]
    #[must_use]
    pub fn andnot(&self, other: &CpuMask) -> CpuMask {
        self.zip_with(other, |a, b| a & !b)
    }

    /// Returns whether `self` and `other` have at least one CPU in common.
    #[inline]
    pub fn intersects(&self, other: &CpuMask) -> bool {
        self.words
            .iter()
            .zip(other.words.iter())
            .any(|(a, b)| a & b != 0)
    }

    /// Returns whether every CPU of `self` is also in `other`.
    #[inline]
    pub fn is_subset(&self, other: &CpuMask) -> bool {
        self.words
            .iter()
            .zip(other.words.iter())
            .all(|(a, b)| a & !b == 0)
    }

    #[inline]
    fn zip_with(&self, other: &CpuMask, f: impl Fn(u64, u64) -> u64) -> CpuMask {
        let mut words = [0u64; WORDS];
        for (out, (a, b)) in words
            .iter_mut()
            .zip(self.words.iter().zip(other.words.iter()))
        {
            *out = f(*a, *b);
        }
        CpuMask { words }
    }
}

/// Iterator over the CPUs of a [`CpuMask`], in ascending order.
///
/// Created by [`CpuMask::iter`]. Zero words are skipped, so iterating a
/// sparse mask is cheap.
#[derive(Clone, Debug)]
pub struct Iter<'a> {
    words: &'a [u64; WORDS],
    /// Index of the word `current` came from.
    index: usize,
    /// One past the last non-empty word (the words from here on are all empty).
    end: usize,
    /// Bits of `words[index]` not yet yielded.
    current: u64,
    /// Number of CPUs not yet yielded.
    remaining: usize,
}

impl Iterator for Iter<'_> {
    type Item = CpuId;

    #[inline]
    fn next(&mut self) -> Option<CpuId> {
        while self.current == 0 {
            if self.index + 1 >= self.end {
                return None;
            }
            self.index += 1;
            self.current = self.words[self.index];
        }
        let bit = self.current.trailing_zeros() as usize;
        // Clear the lowest set bit.
        self.current &= self.current - 1;
        self.remaining -= 1;
        Some(self.index * BITS + bit)
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl FusedIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a CpuMask {
    type Item = CpuId;
    type IntoIter = Iter<'a>;

    #[inline]
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl FromIterator<CpuId> for CpuMask {
    /// Builds a mask from CPU ids.
    ///
    /// # Panics
    ///
    /// Panics if an id is `>= MAX_CPUS`.
    fn from_iter<I: IntoIterator<Item = CpuId>>(iter: I) -> Self {
        let mut mask = CpuMask::new();
        mask.extend(iter);
        mask
    }
}

impl Extend<CpuId> for CpuMask {
    /// Adds CPU ids to the mask.
    ///
    /// # Panics
    ///
    /// Panics if an id is `>= MAX_CPUS`.
    fn extend<I: IntoIterator<Item = CpuId>>(&mut self, iter: I) {
        for cpu in iter {
            self.set(cpu);
        }
    }
}

impl BitAnd for CpuMask {
    type Output = CpuMask;

    /// Intersection, like [`CpuMask::and`].
    #[inline]
    fn bitand(self, rhs: CpuMask) -> CpuMask {
        self.and(&rhs)
    }
}

impl BitOr for CpuMask {
    type Output = CpuMask;

    /// Union, like [`CpuMask::or`].
    #[inline]
    fn bitor(self, rhs: CpuMask) -> CpuMask {
        self.or(&rhs)
    }
}

impl Sub for CpuMask {
    type Output = CpuMask;

    /// Difference, like [`CpuMask::andnot`].
    #[inline]
    fn sub(self, rhs: CpuMask) -> CpuMask {
        self.andnot(&rhs)
    }
}

impl BitAndAssign for CpuMask {
    #[inline]
    fn bitand_assign(&mut self, rhs: CpuMask) {
        *self = self.and(&rhs);
    }
}

impl BitOrAssign for CpuMask {
    #[inline]
    fn bitor_assign(&mut self, rhs: CpuMask) {
        *self = self.or(&rhs);
    }
}

impl SubAssign for CpuMask {
    #[inline]
    fn sub_assign(&mut self, rhs: CpuMask) {
        *self = self.andnot(&rhs);
    }
}

impl fmt::Display for CpuMask {
    /// Writes the mask in the Linux "cpulist" format, e.g. `0-3,7,9-10`.
    /// The empty mask writes nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn write_run(f: &mut fmt::Formatter<'_>, first: bool, lo: CpuId, hi: CpuId) -> fmt::Result {
            if !first {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")
            } else {
                write!(f, "{lo}-{hi}")
            }
        }

        let mut iter = self.iter();
        let Some(mut lo) = iter.next() else {
            return Ok(());
        };
        let mut hi = lo;
        let mut first = true;
        for cpu in iter {
            if cpu == hi + 1 {
                hi = cpu;
            } else {
                write_run(f, first, lo, hi)?;
                first = false;
                lo = cpu;
                hi = cpu;
            }
        }
        write_run(f, first, lo, hi)
    }
}

impl fmt::Debug for CpuMask {
    /// Writes `CpuMask{0-3,7}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuMask{{{self}}}")
    }
}

/// Why an item of a CPU list failed to parse; see [`ParseCpuMaskError::kind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ParseCpuMaskErrorKind {
    /// An item between commas is empty (e.g. `"1,,2"` or a trailing comma).
    EmptyItem,
    /// An item is not a decimal CPU id or an `a-b` range of them.
    InvalidNumber,
    /// A CPU id is `>= MAX_CPUS`.
    OutOfRange,
    /// A range `a-b` has `a > b`.
    ReversedRange,
}

/// Longest item text (in bytes) kept in a [`ParseCpuMaskError`].
const ITEM_CAP: usize = 32;

/// Error returned when parsing a [`CpuMask`] from a CPU list fails.
///
/// Its `Display` output names the offending item and the reason, e.g.
/// ``invalid CPU list item `3-1`: range start is greater than its end``.
#[derive(Clone, PartialEq, Eq)]
pub struct ParseCpuMaskError {
    kind: ParseCpuMaskErrorKind,
    /// The offending item, truncated to `ITEM_CAP` bytes at a char boundary.
    item: [u8; ITEM_CAP],
    item_len: u8,
    truncated: bool,
}

impl ParseCpuMaskError {
    fn new(kind: ParseCpuMaskErrorKind, item: &str) -> Self {
        let mut len = item.len().min(ITEM_CAP);
        while !item.is_char_boundary(len) {
            len -= 1;
        }
        let mut buf = [0u8; ITEM_CAP];
        buf[..len].copy_from_slice(&item.as_bytes()[..len]);
        ParseCpuMaskError {
            kind,
            item: buf,
            item_len: len as u8,
            truncated: len < item.len(),
        }
    }

    /// Returns why parsing failed.
    pub fn kind(&self) -> ParseCpuMaskErrorKind {
        self.kind
    }

    /// Returns the offending item (whitespace-trimmed, truncated to its
    /// first 32 bytes if longer).
    pub fn item(&self) -> &str {
        // The buffer holds a prefix of a `&str` cut at a char boundary.
        core::str::from_utf8(&self.item[..usize::from(self.item_len)]).unwrap_or("")
    }
}

impl fmt::Display for ParseCpuMaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ellipsis = if self.truncated { "..." } else { "" };
        write!(f, "invalid CPU list item `{}{ellipsis}`: ", self.item())?;
        match self.kind {
            ParseCpuMaskErrorKind::EmptyItem => f.write_str("empty item"),
            ParseCpuMaskErrorKind::InvalidNumber => {
                f.write_str("expected a decimal CPU id or a range `first-last`")
            }
            ParseCpuMaskErrorKind::OutOfRange => {
                write!(f, "CPU id out of range (MAX_CPUS is {MAX_CPUS})")
            }
            ParseCpuMaskErrorKind::ReversedRange => {
                f.write_str("range start is greater than its end")
            }
        }
    }
}

impl fmt::Debug for ParseCpuMaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParseCpuMaskError")
            .field("kind", &self.kind)
            .field("item", &self.item())
            .field("truncated", &self.truncated)
            .finish()
    }
}

impl core::error::Error for ParseCpuMaskError {}

/// Parses one CPU id of `item` (the whole item, for error reporting).
fn parse_cpu(text: &str, item: &str) -> Result<CpuId, ParseCpuMaskError> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseCpuMaskError::new(
            ParseCpuMaskErrorKind::InvalidNumber,
            item,
        ));
    }
    // All digits: the only possible failure is overflow, which is out of range too.
    match text.parse::<usize>() {
        Ok(cpu) if cpu < MAX_CPUS => Ok(cpu),
        _ => Err(ParseCpuMaskError::new(
            ParseCpuMaskErrorKind::OutOfRange,
            item,
        )),
    }
}

impl FromStr for CpuMask {
    type Err = ParseCpuMaskError;

    /// Parses the Linux "cpulist" format: comma-separated CPU ids and
    /// inclusive ranges `first-last`, e.g. `"0-3,7,9-10"`. Whitespace around
    /// items is allowed; an empty (or all-whitespace) string is the empty
    /// mask.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mask = CpuMask::new();
        if s.trim().is_empty() {
            return Ok(mask);
        }
        for raw in s.split(',') {
            let item = raw.trim();
            if item.is_empty() {
                return Err(ParseCpuMaskError::new(
                    ParseCpuMaskErrorKind::EmptyItem,
                    item,
                ));
            }
            let (lo, hi) = match item.split_once('-') {
                Some((a, b)) => (parse_cpu(a, item)?, parse_cpu(b, item)?),
                None => {
                    let cpu = parse_cpu(item, item)?;
                    (cpu, cpu)
                }
            };
            if lo > hi {
                return Err(ParseCpuMaskError::new(
                    ParseCpuMaskErrorKind::ReversedRange,
                    item,
                ));
            }
            // Set the range word by word.
            let mut cpu = lo;
            while cpu <= hi {
                let w = cpu / BITS;
                let start = cpu % BITS;
                let end = (hi - w * BITS).min(BITS - 1); // inclusive
                let bits = (u64::MAX >> (BITS - 1 - end)) & (u64::MAX << start);
                mask.words[w] |= bits;
                cpu = (w + 1) * BITS;
            }
        }
        Ok(mask)
    }
}

/// A CPU mask whose bits can be set and cleared concurrently (used for the
/// online mask).
///
/// Each bit operation is a single atomic read-modify-write. [`load`] and
/// [`store`] go word by word, so they are not atomic as a whole: a snapshot
/// taken while other CPUs update the mask reflects each word at a possibly
/// different moment.
///
/// [`load`]: AtomicCpuMask::load
/// [`store`]: AtomicCpuMask::store
pub struct AtomicCpuMask {
    words: [AtomicU64; WORDS],
}

// SeqCst throughout: the engine relies on the online mask being sequentially
// consistent with its other SeqCst operations.
const ORDER: Ordering = Ordering::SeqCst;

impl AtomicCpuMask {
    /// Returns an empty mask.
    pub const fn new() -> Self {
        AtomicCpuMask {
            words: [const { AtomicU64::new(0) }; WORDS],
        }
    }

    /// Atomically adds `cpu` to the mask.
    ///
    /// # Panics
    ///
    /// Panics if `cpu >= MAX_CPUS`.
    #[inline]
    #[track_caller]
    pub fn set(&self, cpu: CpuId) {
        if cpu >= MAX_CPUS {
            out_of_range("AtomicCpuMask::set", cpu);
        }
        let (w, bit) = locate(cpu);
        self.words[w].fetch_or(bit, ORDER);
    }

    /// Atomically removes `cpu` from the mask.
    ///
    /// # Panics
    ///
    /// Panics if `cpu >= MAX_CPUS`.
    #[inline]
    #[track_caller]
    pub fn clear(&self, cpu: CpuId) {
        if cpu >= MAX_CPUS {
            out_of_range("AtomicCpuMask::clear", cpu);
        }
        let (w, bit) = locate(cpu);
        self.words[w].fetch_and(!bit, ORDER);
    }

    /// Returns whether `cpu` is in the mask; `false` if `cpu >= MAX_CPUS`.
    #[inline]
    pub fn test(&self, cpu: CpuId) -> bool {
        if cpu >= MAX_CPUS {
            return false;
        }
        let (w, bit) = locate(cpu);
        self.words[w].load(ORDER) & bit != 0
    }

    /// Returns a snapshot of the mask, read word by word.
    pub fn load(&self) -> CpuMask {
        let mut words = [0u64; WORDS];
        for (out, word) in words.iter_mut().zip(self.words.iter()) {
            *out = word.load(ORDER);
        }
        CpuMask { words }
    }

    /// Replaces the contents of the mask with `mask`, word by word.
    pub fn store(&self, mask: &CpuMask) {
        for (word, &value) in self.words.iter().zip(mask.words.iter()) {
            word.store(value, ORDER);
        }
    }
}

impl Default for AtomicCpuMask {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for AtomicCpuMask {
    /// Writes `AtomicCpuMask{0-3,7}` from a snapshot of the mask.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AtomicCpuMask{{{}}}", self.load())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use std::{format, string::String, string::ToString, vec::Vec};

    /// Tiny xorshift64 generator (deterministic, no dependencies).
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Naive reference: one bool per CPU.
    type Naive = [bool; MAX_CPUS];

    fn to_naive(mask: &CpuMask) -> Naive {
        let mut n = [false; MAX_CPUS];
        for (cpu, slot) in n.iter_mut().enumerate() {
            *slot = mask.test(cpu);
        }
        n
    }

    fn from_naive(n: &Naive) -> CpuMask {
        let mut mask = CpuMask::new();
        for (cpu, &on) in n.iter().enumerate() {
            if on {
                mask.set(cpu);
            }
        }
        mask
    }

    /// Random mask with a random density, sometimes with long runs, so the
    /// tests see empty, sparse, dense and run-heavy masks.
    fn random_naive(rng: &mut XorShift) -> Naive {
        let mut n = [false; MAX_CPUS];
        match rng.below(5) {
            0 => {} // empty
            1 => {
                // a few runs
                for _ in 0..rng.below(6) {
                    let lo = rng.below(MAX_CPUS as u64) as usize;
                    let len = rng.below(200) as usize;
                    for slot in n.iter_mut().skip(lo).take(len + 1) {
                        *slot = true;
                    }
                }
            }
            _ => {
                let density = rng.below(64) + 1;
                let threshold = rng.below(density + 1);
                for slot in n.iter_mut() {
                    *slot = rng.below(density) < threshold;
                }
            }
        }
        if rng.below(4) == 0 {
            n[0] = true;
        }
        if rng.below(4) == 0 {
            n[MAX_CPUS - 1] = true;
        }
        n
    }

    fn naive_list(n: &Naive) -> Vec<CpuId> {
        (0..MAX_CPUS).filter(|&c| n[c]).collect()
    }

    /// Reference cpulist formatter working on the bool array.
    fn naive_cpulist(n: &Naive) -> String {
        let mut parts = Vec::new();
        let mut cpu = 0;
        while cpu < MAX_CPUS {
            if n[cpu] {
                let lo = cpu;
                while cpu + 1 < MAX_CPUS && n[cpu + 1] {
                    cpu += 1;
                }
                if lo == cpu {
                    parts.push(format!("{lo}"));
                } else {
                    parts.push(format!("{lo}-{cpu}"));
                }
            }
            cpu += 1;
        }
        parts.join(",")
    }

    const BOUNDARIES: [CpuId; 7] = [0, 1, 63, 64, 65, 127, 1023];

    #[test]
    fn set_clear_test_at_boundaries() {
        let mut mask = CpuMask::new();
        assert!(mask.is_empty());
        for &cpu in &BOUNDARIES {
            assert!(!mask.test(cpu));
            mask.set(cpu);
            assert!(mask.test(cpu), "cpu {cpu}");
            // Setting twice is idempotent.
            mask.set(cpu);
        }
        assert_eq!(mask.weight(), BOUNDARIES.len());
        assert!(!mask.is_empty());
        for cpu in 0..MAX_CPUS {
            assert_eq!(mask.test(cpu), BOUNDARIES.contains(&cpu), "cpu {cpu}");
        }
        for (i, &cpu) in BOUNDARIES.iter().enumerate() {
            mask.clear(cpu);
            assert!(!mask.test(cpu));
            mask.clear(cpu);
            assert_eq!(mask.weight(), BOUNDARIES.len() - i - 1);
        }
        assert!(mask.is_empty());
        assert_eq!(mask, CpuMask::new());
    }

    #[test]
    fn test_out_of_range_is_false() {
        let full = CpuMask::first_n(MAX_CPUS);
        assert!(full.test(MAX_CPUS - 1));
        assert!(!full.test(MAX_CPUS));
        assert!(!full.test(usize::MAX));
        let atomic = AtomicCpuMask::new();
        atomic.store(&full);
        assert!(atomic.test(MAX_CPUS - 1));
        assert!(!atomic.test(MAX_CPUS));
    }

    #[test]
    #[should_panic(expected = "CpuMask::set: CPU id 1024 is out of range")]
    fn set_out_of_range_panics() {
        CpuMask::new().set(MAX_CPUS);
    }

    #[test]
    #[should_panic(expected = "CpuMask::clear: CPU id 5000 is out of range")]
    fn clear_out_of_range_panics() {
        CpuMask::new().clear(5000);
    }

    #[test]
    #[should_panic(expected = "CpuMask::single")]
    fn single_out_of_range_panics() {
        let _ = CpuMask::single(MAX_CPUS);
    }

    #[test]
    #[should_panic(expected = "CpuMask::first_n")]
    fn first_n_out_of_range_panics() {
        let _ = CpuMask::first_n(MAX_CPUS + 1);
    }

    #[test]
    #[should_panic(expected = "AtomicCpuMask::set: CPU id 1024 is out of range")]
    fn atomic_set_out_of_range_panics() {
        AtomicCpuMask::new().set(MAX_CPUS);
    }

    #[test]
    fn constructors() {
        for n in [0, 1, 2, 63, 64, 65, 127, 128, 129, 1000, 1023, 1024] {
            let mask = CpuMask::first_n(n);
            assert_eq!(mask.weight(), n);
            assert_eq!(mask.iter().collect::<Vec<_>>(), (0..n).collect::<Vec<_>>());
        }
        for &cpu in &BOUNDARIES {
            let mask = CpuMask::single(cpu);
            assert_eq!(mask.iter().collect::<Vec<_>>(), [cpu]);
        }
        const C: CpuMask = CpuMask::single(70);
        assert!(C.test(70));
        assert_eq!(CpuMask::default(), CpuMask::new());
    }

    #[test]
    fn iteration_crosses_word_boundaries() {
        let cpus = [0, 5, 63, 64, 127, 128, 300, 511, 512, 1022, 1023];
        let mask: CpuMask = cpus.iter().copied().collect();
        assert_eq!(mask.iter().collect::<Vec<_>>(), cpus);
        assert_eq!((&mask).into_iter().count(), cpus.len());
        let mut via_for = Vec::new();
        for cpu in &mask {
            via_for.push(cpu);
        }
        assert_eq!(via_for, cpus);

        // Exact size hint all the way, and fused afterwards.
        let mut it = mask.iter();
        for left in (0..=cpus.len()).rev() {
            assert_eq!(it.size_hint(), (left, Some(left)));
            assert_eq!(it.len(), left);
            if left > 0 {
                assert!(it.next().is_some());
            }
        }
        assert_eq!(it.next(), None);
        assert_eq!(it.next(), None);

        assert_eq!(CpuMask::new().iter().next(), None);
        assert_eq!(CpuMask::single(1023).iter().collect::<Vec<_>>(), [1023]);
    }

    #[test]
    fn first_and_next_after() {
        let empty = CpuMask::new();
        assert_eq!(empty.first(), None);
        assert_eq!(empty.next_after(0), None);

        let cpus = [3, 63, 64, 200, 1023];
        let mask: CpuMask = cpus.iter().copied().collect();
        assert_eq!(mask.first(), Some(3));
        assert_eq!(mask.next_after(0), Some(3));
        assert_eq!(mask.next_after(3), Some(63));
        assert_eq!(mask.next_after(62), Some(63));
        assert_eq!(mask.next_after(63), Some(64));
        assert_eq!(mask.next_after(64), Some(200));
        assert_eq!(mask.next_after(200), Some(1023));
        assert_eq!(mask.next_after(1022), Some(1023));
        assert_eq!(mask.next_after(1023), None);
        assert_eq!(mask.next_after(MAX_CPUS), None);
        assert_eq!(mask.next_after(usize::MAX), None);

        assert_eq!(CpuMask::single(0).first(), Some(0));
        assert_eq!(CpuMask::single(0).next_after(0), None);
        assert_eq!(CpuMask::single(1023).first(), Some(1023));
    }

    #[test]
    fn random_against_naive_reference() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..300 {
            let na = random_naive(&mut rng);
            let nb = random_naive(&mut rng);
            let a = from_naive(&na);
            let b = from_naive(&nb);
            assert_eq!(to_naive(&a), na);

            // Queries.
            let list = naive_list(&na);
            assert_eq!(a.weight(), list.len());
            assert_eq!(a.is_empty(), list.is_empty());
            assert_eq!(a.iter().collect::<Vec<_>>(), list);
            assert_eq!(a.iter().len(), list.len());
            assert_eq!(a.first(), list.first().copied());
            for _ in 0..20 {
                let cpu = rng.below(MAX_CPUS as u64 + 2) as usize;
                let expected = (cpu.saturating_add(1)..MAX_CPUS).find(|&c| na[c]);
                assert_eq!(a.next_after(cpu), expected, "next_after({cpu})");
            }
            // Walking with first/next_after visits the same CPUs as iter.
            let mut walked = Vec::new();
            let mut cur = a.first();
            while let Some(c) = cur {
                walked.push(c);
                cur = a.next_after(c);
            }
            assert_eq!(walked, list);

            // Binary operations.
            let mut and = [false; MAX_CPUS];
            let mut or = [false; MAX_CPUS];
            let mut andnot = [false; MAX_CPUS];
            for c in 0..MAX_CPUS {
                and[c] = na[c] && nb[c];
                or[c] = na[c] || nb[c];
                andnot[c] = na[c] && !nb[c];
            }
            assert_eq!(to_naive(&a.and(&b)), and);
            assert_eq!(to_naive(&a.or(&b)), or);
            assert_eq!(to_naive(&a.andnot(&b)), andnot);
            assert_eq!(a & b, a.and(&b));
            assert_eq!(a | b, a.or(&b));
            assert_eq!(a - b, a.andnot(&b));
            let mut m = a;
            m &= b;
            assert_eq!(m, a & b);
            let mut m = a;
            m |= b;
            assert_eq!(m, a | b);
            let mut m = a;
            m -= b;
            assert_eq!(m, a - b);
            assert_eq!(a.intersects(&b), and.iter().any(|&x| x));
            assert_eq!(a.is_subset(&b), (0..MAX_CPUS).all(|c| !na[c] || nb[c]));
            assert!(a.and(&b).is_subset(&a));
            assert!(a.is_subset(&a.or(&b)));

            // Extend adds to existing contents.
            let mut m = a;
            m.extend(b.iter());
            assert_eq!(m, a | b);
        }
    }

    #[test]
    fn display_examples() {
        assert_eq!(CpuMask::new().to_string(), "");
        assert_eq!(CpuMask::single(5).to_string(), "5");
        assert_eq!(CpuMask::first_n(4).to_string(), "0-3");
        assert_eq!(CpuMask::first_n(MAX_CPUS).to_string(), "0-1023");
        let mask: CpuMask = [0, 1, 2, 3, 7, 9, 10].into_iter().collect();
        assert_eq!(mask.to_string(), "0-3,7,9-10");
        assert_eq!(format!("{mask:?}"), "CpuMask{0-3,7,9-10}");
        assert_eq!(format!("{:?}", CpuMask::new()), "CpuMask{}");
        let runs: CpuMask = (60..70).chain([1023]).collect();
        assert_eq!(runs.to_string(), "60-69,1023");
    }

    #[test]
    fn parse_examples() {
        let parse = |s: &str| s.parse::<CpuMask>().unwrap();
        assert_eq!(parse(""), CpuMask::new());
        assert_eq!(parse("   "), CpuMask::new());
        assert_eq!(parse("5"), CpuMask::single(5));
        assert_eq!(parse("0-3"), CpuMask::first_n(4));
        assert_eq!(parse("0-1023"), CpuMask::first_n(MAX_CPUS));
        assert_eq!(parse("1023"), CpuMask::single(1023));
        assert_eq!(parse("4-4"), CpuMask::single(4));
        assert_eq!(
            parse(" 0-3 , 7,\t9-10 \n"),
            [0, 1, 2, 3, 7, 9, 10].into_iter().collect()
        );
        // Overlapping and unordered items are accepted.
        assert_eq!(parse("9,0-5,3-8"), CpuMask::first_n(10));
        // Ranges crossing several words.
        assert_eq!(parse("63-129"), (63..=129).collect());
        assert_eq!(parse("64-127"), (64..128).collect());
        assert_eq!(parse("0-63"), CpuMask::first_n(64));
    }

    #[test]
    fn display_parse_round_trip_random() {
        let mut rng = XorShift(0x0123_4567_89AB_CDEF);
        for _ in 0..300 {
            let n = random_naive(&mut rng);
            let mask = from_naive(&n);
            let text = mask.to_string();
            assert_eq!(text, naive_cpulist(&n));
            let back: CpuMask = text.parse().unwrap();
            assert_eq!(back, mask, "round trip of {text:?}");
            // Also with spaces after commas.
            let spaced = text.replace(',', " , ");
            assert_eq!(spaced.parse::<CpuMask>().unwrap(), mask);
        }
    }

    #[test]
    fn parse_errors() {
        let err = |s: &str| s.parse::<CpuMask>().unwrap_err();

        let e = err("3-1");
        assert_eq!(e.kind(), ParseCpuMaskErrorKind::ReversedRange);
        assert_eq!(e.item(), "3-1");
        assert_eq!(
            e.to_string(),
            "invalid CPU list item `3-1`: range start is greater than its end"
        );

        let e = err("1024");
        assert_eq!(e.kind(), ParseCpuMaskErrorKind::OutOfRange);
        assert_eq!(e.item(), "1024");
        assert!(e.to_string().contains("`1024`"));
        assert!(e.to_string().contains("out of range"));

        let e = err("a");
        assert_eq!(e.kind(), ParseCpuMaskErrorKind::InvalidNumber);
        assert_eq!(e.item(), "a");
        assert!(e.to_string().starts_with("invalid CPU list item `a`"));

        let e = err("1,,2");
        assert_eq!(e.kind(), ParseCpuMaskErrorKind::EmptyItem);
        assert_eq!(e.to_string(), "invalid CPU list item ``: empty item");

        let e = err("0-3, 7 , 5-x");
        assert_eq!(e.kind(), ParseCpuMaskErrorKind::InvalidNumber);
        assert_eq!(e.item(), "5-x");

        for bad in [
            "1,", ",1", "-", "1-", "-1", "+1", "1-2-3", "0-1024", "1 2", "0x1",
        ] {
            assert!(bad.parse::<CpuMask>().is_err(), "{bad:?} should fail");
        }
        assert_eq!(
            err("99999999999999999999999").kind(),
            ParseCpuMaskErrorKind::OutOfRange
        );

        // Long items are truncated at a char boundary.
        let long = "ééééééééééééééééééééééééé"; // 50 bytes
        let e = err(long);
        assert!(e.item().len() <= ITEM_CAP);
        assert!(long.starts_with(e.item()));
        assert!(e.to_string().contains("...`"));
        assert!(format!("{e:?}").contains("InvalidNumber"));

        // It is a real error type.
        fn is_error<E: core::error::Error>(_: &E) {}
        is_error(&e);
    }

    #[test]
    fn atomic_basic() {
        let m = AtomicCpuMask::default();
        assert!(m.load().is_empty());
        for &cpu in &BOUNDARIES {
            m.set(cpu);
            assert!(m.test(cpu));
        }
        assert_eq!(m.load(), BOUNDARIES.iter().copied().collect());
        m.clear(64);
        assert!(!m.test(64));
        assert!(m.test(63) && m.test(65));
        let snapshot: CpuMask = "1-2,100".parse().unwrap();
        m.store(&snapshot);
        assert_eq!(m.load(), snapshot);
        assert_eq!(format!("{m:?}"), "AtomicCpuMask{1-2,100}");

        static ONLINE: AtomicCpuMask = AtomicCpuMask::new();
        ONLINE.set(7);
        assert!(ONLINE.test(7));
    }

    #[test]
    fn atomic_concurrent_set_and_clear() {
        const THREADS: usize = 8;
        let mask = AtomicCpuMask::new();

        // Every thread sets an interleaved share of the CPUs, so all threads
        // hit every word concurrently.
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let mask = &mask;
                s.spawn(move || {
                    for cpu in (t..MAX_CPUS).step_by(THREADS) {
                        mask.set(cpu);
                    }
                });
            }
        });
        assert_eq!(mask.load(), CpuMask::first_n(MAX_CPUS));
        assert_eq!(mask.load().weight(), MAX_CPUS);

        // Concurrently clear the odd CPUs while other threads re-set even ones.
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let mask = &mask;
                s.spawn(move || {
                    for cpu in (t..MAX_CPUS).step_by(THREADS) {
                        if cpu % 2 == 1 {
                            mask.clear(cpu);
                        } else {
                            mask.set(cpu);
                        }
                    }
                });
            }
        });
        let expected: CpuMask = (0..MAX_CPUS).step_by(2).collect();
        assert_eq!(mask.load(), expected);
    }
}
