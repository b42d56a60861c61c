//! Per-CPU context tracking: is a CPU **idle** (an extended quiescent state a remote RCU may
//! ignore) or **watched** (running task or handler code that may hold references)?
//!
//! Every CPU owns one [`ContextTracker`]. Only that CPU writes it — from task context, from its
//! interrupt handlers and from NMI-like handlers that may arrive *between any two steps* of
//! the enter/exit sequences below and nest to any depth the platform allows. Other CPUs only
//! read it: [`ContextTracker::snapshot`] and [`ContextTracker::passed_quiescent_since`] are
//! what an expedited RCU grace period needs ("skip CPUs that are idle, or that have been idle
//! since my snapshot; send an IPI to the rest").
//!
//! # Design
//!
//! The seed thread (004) discusses two designs: a counter plus a *separate* NMI nesting
//! variable that the outermost entry bumps by 1 and nested entries by 2 (so the exit knows
//! whether it must make the CPU idle again), or NMI nesting kept in the *low bits of the
//! counter word itself*. We use one word with the nesting in its low bits, and keep the
//! "+1 or +2" information as an explicit bit:
//!
//! ```text
//!  63                          17   16   15               0
//! +------------------------------+------+------------------+
//! |      counter (47 bits)       | WOKE | depth (16 bits)  |
//! +------------------------------+------+------------------+
//! ```
//!
//! * `counter` — odd while the CPU is watched, even while it is idle. It only ever goes up, by
//!   one at each idle ⇄ watched switch, so a remote observer that sees it change knows the
//!   CPU was idle in between.
//! * `depth` — how many interrupt/NMI handlers are running (nested) on the CPU.
//! * `WOKE` — set by the outermost handler if it found the CPU idle and made it watched; its
//!   exit must make the CPU idle again. (A handler from task context leaves the counter alone.)
//!
//! Why one word: a remote observer reads counter and nesting in one consistent load; each
//! enter/exit is "read my word, then one `fetch_add`", so there is no plain read-modify-write
//! of a separate nesting variable for an NMI to tear (the thread's worry about what `++`
//! compiles to); and with the counter in the *high* bits its wrap-around falls off the top
//! instead of carrying into the nesting bits. The cost is a bounded depth
//! ([`MAX_HANDLER_DEPTH`] = 65 535 nested handlers, far beyond any stack), and a counter that
//! wraps after 2⁴⁷ idle transitions (the detector compares for equality, so it could only be
//! fooled by exactly 2⁴⁷ transitions between a snapshot and its check).
//!
//! # Invariants
//!
//! These hold at every point between two atomic steps, i.e. at every point where an NMI can
//! arrive. The exhaustive test in this file (`tests::exhaustive_*`) checks each of them at
//! every such point of every interleaving it enumerates.
//!
//! * **W1** `depth > 0 ⇒ counter odd`: a handler never runs while the CPU looks idle.
//! * **W2** `WOKE ⇒ depth > 0`: `WOKE` belongs to the outermost running handler.
//! * **I1** *counter odd ⇔ watched*: in task context, inside any handler body, and at every
//!   point of an enter/exit that interrupted one of those, the counter is odd; while the CPU
//!   is idle (outside handlers) it is even. A remote snapshot taken while a handler body runs
//!   is never classified idle, and the counter does not move while that body runs.
//! * **I2** *pairs restore*: a complete handler enter→exit pair, however it is itself
//!   interrupted by further pairs, leaves `depth` and `WOKE` exactly as it found them and the
//!   counter's parity too. The counter is unchanged if the pair began watched; if it began
//!   idle, the counter advanced by 2 for each pair (this one included, nested ones too) that
//!   began idle — the CPU was watched and then idle again, and observers can tell.
//! * **I3** *operations do what they say*: idle_enter takes task → idle, idle_exit idle →
//!   task, a handler entry takes idle or task to a handler, its exit back, with the counter
//!   advanced by exactly one per idle ⇄ watched switch (plus I2's advances of nested pairs).
//!
//! Why an NMI at any point is harmless (the induction the test makes mechanical): every
//! enter/exit is **step 1** read the own word, **step 2** one `fetch_add` whose amount depends
//! only on the parity, `depth` and `WOKE` read in step 1. A nested pair that lands before
//! step 1 or after step 2 sees a consistent state (W1, W2). One that lands between them
//! restores exactly those fields (I2, by induction on nesting depth), so the amount is still
//! right; and because `fetch_add` is relative, the counter advance of a nested pair that began
//! idle is kept, never overwritten.
//!
//! # Memory ordering (the RCU pairing)
//!
//! * Becoming **watched** (idle_exit, handler entry from idle): `SeqCst` `fetch_add`, then a
//!   `SeqCst` fence. With the fence at the start of [`ContextTracker::snapshot`] this is a
//!   store-buffering pair: either the observer's snapshot sees the CPU watched (and it will be
//!   sent an IPI), or the CPU's reads after becoming watched see everything the observer did
//!   before its snapshot (e.g. unpublishing a pointer).
//! * Becoming **idle** (idle_enter, handler exit to idle): `SeqCst` (so at least `Release`)
//!   `fetch_add`: everything the CPU did while watched happens before whatever an observer
//!   does after reading the even value — or any later value, as every later change is an RMW
//!   in the same release sequence.
//! * Changes of `depth` alone: `Relaxed`, justified at each site.

use crate::sync::AtomicU64;
use core::sync::atomic::{fence, Ordering};

/// Bits of the word that count nested handlers.
const DEPTH_BITS: u32 = 16;
/// Mask of the handler depth.
const DEPTH_MASK: u64 = (1 << DEPTH_BITS) - 1;
/// The outermost running handler found the CPU idle and made it watched.
const WOKE: u64 = 1 << DEPTH_BITS;
/// Shift of the idle/watched counter.
const COUNTER_SHIFT: u32 = DEPTH_BITS + 1;
/// One step of the counter; also its parity bit (set = odd = watched).
const COUNTER_ONE: u64 = 1 << COUNTER_SHIFT;

/// Handler entry while watched: depth + 1.
const ENTER_NESTED: u64 = 1;
/// Handler entry while idle: counter + 1 (now odd), WOKE, depth 0 → 1.
const ENTER_FROM_IDLE: u64 = COUNTER_ONE + WOKE + 1;
/// Handler exit that is not the outermost waking one: depth − 1 (wrapping add of −1).
const EXIT_NESTED: u64 = 1u64.wrapping_neg();
/// Exit of the outermost handler that woke the CPU: depth 1 → 0, WOKE cleared, counter + 1
/// (now even). The low fields are exactly `WOKE + 1`, so nothing borrows from the counter.
const EXIT_TO_IDLE: u64 = COUNTER_ONE - WOKE - 1;

/// Word of a CPU running in task context, counter 1.
const INITIAL_TASK: u64 = COUNTER_ONE;

/// The deepest nesting of interrupt and NMI handlers a [`ContextTracker`] can count.
///
/// Entering a handler beyond it is a bug (checked by a debug assertion); every platform's
/// stack is exhausted long before.
///
/// ```
/// assert_eq!(smpcall::context::MAX_HANDLER_DEPTH, 65_535);
/// ```
pub const MAX_HANDLER_DEPTH: u32 = DEPTH_MASK as u32;

/// What a CPU was doing, as far as a remote observer (RCU) is concerned.
///
/// ```
/// use smpcall::context::{ContextTracker, CpuContext};
///
/// let t = ContextTracker::new();
/// assert_eq!(t.snapshot().context(), CpuContext::Task);
/// t.idle_enter();
/// assert_eq!(t.snapshot().context(), CpuContext::Idle);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuContext {
    /// Idle: an extended quiescent state, holds no references; an observer may ignore it.
    Idle,
    /// Task (thread) context: watched.
    Task,
    /// Inside one or more interrupt/NMI handlers (entered from task or from idle): watched.
    Handler,
}

/// One CPU's context word, read at one instant by [`ContextTracker::snapshot`].
///
/// ```
/// use smpcall::context::ContextTracker;
///
/// let t = ContextTracker::new();
/// let s = t.snapshot();
/// assert!(s.is_watched() && !s.is_idle());
/// assert_eq!(s.handler_depth(), 0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContextSnapshot(u64);

impl ContextSnapshot {
    /// The CPU was idle (counter even): it held no references at that instant.
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let t = ContextTracker::new();
    /// t.idle_enter();
    /// assert!(t.snapshot().is_idle());
    /// ```
    #[inline]
    pub const fn is_idle(self) -> bool {
        self.0 & COUNTER_ONE == 0
    }

    /// The CPU was watched (counter odd): task or handler code that may hold references.
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let t = ContextTracker::new();
    /// t.idle_enter();
    /// t.nmi_enter();
    /// assert!(t.snapshot().is_watched());
    /// t.nmi_exit();
    /// ```
    #[inline]
    pub const fn is_watched(self) -> bool {
        !self.is_idle()
    }

    /// The idle/watched counter: odd while watched, even while idle, +1 at every switch.
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let t = ContextTracker::new();
    /// let before = t.snapshot().counter();
    /// t.idle_enter();
    /// t.idle_exit();
    /// assert_eq!(t.snapshot().counter(), before + 2);
    /// ```
    #[inline]
    pub const fn counter(self) -> u64 {
        self.0 >> COUNTER_SHIFT
    }

    /// How many interrupt/NMI handlers were running (nested).
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let t = ContextTracker::new();
    /// t.irq_enter();
    /// t.nmi_enter();
    /// assert_eq!(t.snapshot().handler_depth(), 2);
    /// t.nmi_exit();
    /// t.irq_exit();
    /// ```
    #[inline]
    pub const fn handler_depth(self) -> u32 {
        // The mask keeps 16 bits, so the cast is lossless.
        (self.0 & DEPTH_MASK) as u32
    }

    /// Idle, task or handler.
    ///
    /// ```
    /// use smpcall::context::{ContextTracker, CpuContext};
    ///
    /// let t = ContextTracker::new();
    /// t.idle_enter();
    /// t.irq_enter();
    /// assert_eq!(t.snapshot().context(), CpuContext::Handler);
    /// t.irq_exit();
    /// assert_eq!(t.snapshot().context(), CpuContext::Idle);
    /// ```
    #[inline]
    pub const fn context(self) -> CpuContext {
        if self.is_idle() {
            CpuContext::Idle
        } else if self.handler_depth() > 0 {
            CpuContext::Handler
        } else {
            CpuContext::Task
        }
    }

    /// The raw word (for diagnostics dumps).
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let s = ContextTracker::new().snapshot();
    /// assert_ne!(s.raw(), 0);
    /// ```
    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }
}

/// One CPU's context: idle or watched, and how deeply nested in handlers.
///
/// Written only by its own CPU (task code, interrupt handlers, NMI handlers); read by anyone.
/// A new tracker starts in **task** context (watched): a CPU nobody has classified yet must
/// never be mistaken for quiescent — that would cost correctness, while the opposite costs at
/// most one IPI. A CPU that starts in its idle loop calls [`idle_enter`](Self::idle_enter).
///
/// Rules for the owning CPU: [`idle_enter`](Self::idle_enter) and
/// [`idle_exit`](Self::idle_exit) alternate and are called from task context only (no handler
/// running); every [`irq_enter`](Self::irq_enter) / [`nmi_enter`](Self::nmi_enter) is matched
/// by an exit of the same kind before the handler returns. Handlers may arrive at any point,
/// including inside any of these calls. All methods are lock-free and async-signal-safe.
///
/// ```
/// use smpcall::context::ContextTracker;
///
/// static CPU0: ContextTracker = ContextTracker::new();
///
/// // The idle loop:
/// CPU0.idle_enter();
/// let snap = CPU0.snapshot();          // a remote RCU sees CPU 0 idle: no IPI needed
/// assert!(snap.is_idle());
/// CPU0.irq_enter();                    // an interrupt wakes it: watched while it runs
/// assert!(CPU0.snapshot().is_watched());
/// CPU0.irq_exit();
/// CPU0.idle_exit();
/// assert!(CPU0.passed_quiescent_since(snap));
/// ```
#[derive(Debug)]
pub struct ContextTracker {
    /// `counter | WOKE | depth`, see the module documentation.
    word: AtomicU64,
}

impl Default for ContextTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl ContextTracker {
    /// A tracker for a CPU running in task context (watched, no handler, counter 1).
    ///
    /// ```
    /// use smpcall::context::{ContextTracker, CpuContext};
    ///
    /// static T: ContextTracker = ContextTracker::new();
    /// assert_eq!(T.snapshot().context(), CpuContext::Task);
    /// ```
    pub const fn new() -> Self {
        ContextTracker {
            word: AtomicU64::new(INITIAL_TASK),
        }
    }

    // ---------------------------------------------------------------------------------------
    // The owning CPU: task <-> idle.

    /// Task → idle: from now on the CPU holds no references and observers may ignore it.
    ///
    /// Call from task context (no handler running) on the owning CPU, after the last use of
    /// any reference.
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let t = ContextTracker::new();
    /// t.idle_enter();
    /// assert!(t.snapshot().is_idle());
    /// ```
    #[inline]
    pub fn idle_enter(&self) {
        // The only step. SeqCst (≥ Release): all the CPU did while watched happens before
        // what an observer does after reading this (or any later) value.
        let old = self.word.fetch_add(COUNTER_ONE, Ordering::SeqCst);
        debug_assert!(
            old & COUNTER_ONE != 0 && old & (DEPTH_MASK | WOKE) == 0,
            "idle_enter outside task context: {old:#x}"
        );
    }

    /// Idle → task: the CPU is watched again and may take references.
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let t = ContextTracker::new();
    /// t.idle_enter();
    /// t.idle_exit();
    /// assert!(t.snapshot().is_watched());
    /// ```
    #[inline]
    pub fn idle_exit(&self) {
        // The only step, then a full fence: the store-buffering pair with `snapshot`'s fence
        // (either the observer sees us watched, or our later reads see its earlier writes).
        let old = self.word.fetch_add(COUNTER_ONE, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        debug_assert!(
            old & COUNTER_ONE == 0 && old & (DEPTH_MASK | WOKE) == 0,
            "idle_exit while not idle: {old:#x}"
        );
    }

    // ---------------------------------------------------------------------------------------
    // The owning CPU: handlers. Interrupts and NMIs share one protocol: a sequence that is
    // correct with an NMI at every point is correct with an interrupt, which can land at fewer
    // points. Separate names keep call sites honest about what they are.

    /// Entry into a (maskable) interrupt handler, from task, idle or another handler.
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let t = ContextTracker::new();
    /// t.idle_enter();
    /// t.irq_enter(); // from idle: the CPU is watched while the handler runs
    /// assert!(t.watched() && t.in_handler());
    /// t.irq_exit();
    /// assert!(!t.watched());
    /// ```
    #[inline]
    pub fn irq_enter(&self) {
        self.handler_enter_steps(|_| {});
    }

    /// Exit from the interrupt handler entered with [`irq_enter`](Self::irq_enter); back to
    /// idle if that entry came from idle.
    ///
    /// ```
    /// use smpcall::context::{ContextTracker, CpuContext};
    ///
    /// let t = ContextTracker::new();
    /// t.irq_enter(); // from task
    /// t.irq_exit();
    /// assert_eq!(t.snapshot().context(), CpuContext::Task);
    /// ```
    #[inline]
    pub fn irq_exit(&self) {
        self.handler_exit_steps(|_| {});
    }

    /// Entry into an NMI-like handler. May run at any point of any other method of this
    /// tracker (on its CPU), and nest to [`MAX_HANDLER_DEPTH`].
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let t = ContextTracker::new();
    /// t.idle_enter();
    /// t.nmi_enter();
    /// t.nmi_enter(); // nested
    /// assert!(t.snapshot().is_watched());
    /// t.nmi_exit();
    /// t.nmi_exit();
    /// assert!(t.snapshot().is_idle());
    /// ```
    #[inline]
    pub fn nmi_enter(&self) {
        self.handler_enter_steps(|_| {});
    }

    /// Exit from the NMI-like handler entered with [`nmi_enter`](Self::nmi_enter).
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let t = ContextTracker::new();
    /// let snap = t.snapshot();
    /// t.nmi_enter();
    /// t.nmi_exit();
    /// // Task → NMI → task never passes through idle.
    /// assert!(!t.passed_quiescent_since(snap));
    /// ```
    #[inline]
    pub fn nmi_exit(&self) {
        self.handler_exit_steps(|_| {});
    }

    /// Handler entry as its two atomic steps; `between(1)` runs between them. The public entry
    /// points pass a no-op; the exhaustive test runs nested handler pairs there.
    #[inline]
    fn handler_enter_steps(&self, mut between: impl FnMut(usize)) {
        // Step 1. Relaxed: only this CPU writes the word, so it reads its own latest value, and
        // a handler that ran since restored the fields we decide on (I2).
        let w = self.word.load(Ordering::Relaxed);
        between(1);
        // Step 2.
        let old = if w & COUNTER_ONE != 0 {
            debug_assert!(w & DEPTH_MASK < DEPTH_MASK, "handler nesting overflow");
            // Relaxed: depth only; the counter, all a remote observer acts on, is untouched.
            self.word.fetch_add(ENTER_NESTED, Ordering::Relaxed)
        } else {
            // SeqCst RMW then full fence: becoming watched, the store-buffering pair with
            // `snapshot` (see the module documentation).
            let old = self.word.fetch_add(ENTER_FROM_IDLE, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            old
        };
        debug_assert_eq!(
            old & (COUNTER_ONE | WOKE | DEPTH_MASK),
            w & (COUNTER_ONE | WOKE | DEPTH_MASK),
            "a nested handler did not restore the context word"
        );
    }

    /// Handler exit as its two atomic steps; `between(1)` runs between them.
    #[inline]
    fn handler_exit_steps(&self, mut between: impl FnMut(usize)) {
        // Step 1. Relaxed: as in `handler_enter_steps`.
        let w = self.word.load(Ordering::Relaxed);
        debug_assert!(
            w & DEPTH_MASK > 0 && w & COUNTER_ONE != 0,
            "handler exit without entry: {w:#x}"
        );
        between(1);
        // Step 2.
        let old = if w & (DEPTH_MASK | WOKE) == WOKE + 1 {
            // SeqCst (≥ Release): becoming idle; the handler's accesses happen before what an
            // observer does after reading this (or any later) value.
            self.word.fetch_add(EXIT_TO_IDLE, Ordering::SeqCst)
        } else {
            // Relaxed: depth only; the CPU stays watched and the counter is untouched.
            self.word.fetch_add(EXIT_NESTED, Ordering::Relaxed)
        };
        debug_assert_eq!(
            old & (COUNTER_ONE | WOKE | DEPTH_MASK),
            w & (COUNTER_ONE | WOKE | DEPTH_MASK),
            "a nested handler did not restore the context word"
        );
    }

    // ---------------------------------------------------------------------------------------
    // The owning CPU: queries.

    /// Whether this CPU is watched right now. Meant for the owning CPU (for another CPU it is
    /// a momentary, unordered value: use [`snapshot`](Self::snapshot)).
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let t = ContextTracker::new();
    /// assert!(t.watched());
    /// t.idle_enter();
    /// assert!(!t.watched());
    /// ```
    #[inline]
    pub fn watched(&self) -> bool {
        // Relaxed: the owner reads its own latest write; nested handlers restore the parity.
        self.word.load(Ordering::Relaxed) & COUNTER_ONE != 0
    }

    /// Whether this CPU is inside an interrupt or NMI handler. Meant for the owning CPU.
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let t = ContextTracker::new();
    /// assert!(!t.in_handler());
    /// t.nmi_enter();
    /// assert!(t.in_handler());
    /// t.nmi_exit();
    /// ```
    #[inline]
    pub fn in_handler(&self) -> bool {
        // Relaxed: the owner reads its own latest write; nested handlers restore the depth.
        self.word.load(Ordering::Relaxed) & DEPTH_MASK != 0
    }

    // ---------------------------------------------------------------------------------------
    // Remote observers (RCU).

    /// Reads the CPU's context for a remote observer.
    ///
    /// Starts with a full fence, so that everything the caller did before (say, unpublishing
    /// a pointer before starting a grace period) is ordered before the read: if the snapshot
    /// says idle, the CPU's reads after it becomes watched again see the caller's writes.
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let t = ContextTracker::new();
    /// let snap = t.snapshot();
    /// if snap.is_idle() {
    ///     // quiescent: no IPI needed
    /// } else {
    ///     // watched: send an IPI, or wait for passed_quiescent_since(snap)
    /// }
    /// # assert!(snap.is_watched());
    /// ```
    #[inline]
    pub fn snapshot(&self) -> ContextSnapshot {
        fence(Ordering::SeqCst);
        ContextSnapshot(self.word.load(Ordering::SeqCst))
    }

    /// Whether the CPU has been in a quiescent state since `snap` was taken: `snap` itself was
    /// idle, or the counter has moved since (the CPU went idle at least once in between).
    ///
    /// Monotone: once true for a snapshot, it stays true. Never true while the CPU is still
    /// inside the task or handler code that was running when `snap` was taken.
    ///
    /// ```
    /// use smpcall::context::ContextTracker;
    ///
    /// let t = ContextTracker::new();
    /// let snap = t.snapshot(); // task: watched
    /// t.irq_enter();
    /// t.irq_exit();
    /// assert!(!t.passed_quiescent_since(snap)); // never left task context
    /// t.idle_enter();
    /// t.idle_exit();
    /// assert!(t.passed_quiescent_since(snap)); // went through idle
    /// ```
    #[inline]
    pub fn passed_quiescent_since(&self, snap: ContextSnapshot) -> bool {
        if snap.is_idle() {
            return true;
        }
        // SeqCst (≥ Acquire): if the counter moved, the CPU's accesses before it went idle
        // happen before whatever the caller does next (e.g. freeing memory).
        let now = ContextSnapshot(self.word.load(Ordering::SeqCst));
        now.counter() != snap.counter()
    }
}

#[cfg(test)]
mod tests {
    //! The mechanical proof (seed 004): every enter/exit is run with complete nested NMI
    //! enter→exit pairs inserted between its atomic steps — recursively, each nested pair
    //! itself interrupted — and the invariants of the module documentation are checked at
    //! every point. The checker is generic over the protocol, and deliberately broken
    //! protocols run through it are caught, so it can fail.

    extern crate std;

    use super::*;
    use std::string::String;
    use std::vec::Vec;
    use std::{format, println};

    // ---------------------------------------------------------------------------------------
    // What the checker needs from a protocol.

    /// A context-tracking protocol, as the checker drives it. Each operation calls `between(i)`
    /// between its atomic steps `i` and `i + 1` (never before the first or after the last: the
    /// checker covers those points itself).
    trait Protocol {
        type Snap: Copy;
        /// A fresh CPU in task context.
        fn new_task() -> Self;
        fn idle_enter(&self, between: &mut dyn FnMut(usize));
        fn idle_exit(&self, between: &mut dyn FnMut(usize));
        fn irq_enter(&self, between: &mut dyn FnMut(usize));
        fn irq_exit(&self, between: &mut dyn FnMut(usize));
        fn nmi_enter(&self, between: &mut dyn FnMut(usize));
        fn nmi_exit(&self, between: &mut dyn FnMut(usize));
        /// The observer-visible counter (odd = watched).
        fn counter(&self) -> u64;
        /// Everything else in the state; a complete pair must restore it exactly (I2).
        fn fields(&self) -> u64;
        fn snapshot(&self) -> Self::Snap;
        fn snap_is_idle(snap: Self::Snap) -> bool;
        fn passed_since(&self, snap: Self::Snap) -> bool;
        /// Representation invariants (W1, W2 for the real tracker).
        fn structural(&self) -> Result<(), String>;
    }

    impl Protocol for ContextTracker {
        type Snap = ContextSnapshot;
        fn new_task() -> Self {
            ContextTracker::new()
        }
        // Single-step operations: no point between steps.
        fn idle_enter(&self, _: &mut dyn FnMut(usize)) {
            ContextTracker::idle_enter(self)
        }
        fn idle_exit(&self, _: &mut dyn FnMut(usize)) {
            ContextTracker::idle_exit(self)
        }
        fn irq_enter(&self, between: &mut dyn FnMut(usize)) {
            self.handler_enter_steps(between)
        }
        fn irq_exit(&self, between: &mut dyn FnMut(usize)) {
            self.handler_exit_steps(between)
        }
        fn nmi_enter(&self, between: &mut dyn FnMut(usize)) {
            self.handler_enter_steps(between)
        }
        fn nmi_exit(&self, between: &mut dyn FnMut(usize)) {
            self.handler_exit_steps(between)
        }
        fn counter(&self) -> u64 {
            self.word.load(Ordering::SeqCst) >> COUNTER_SHIFT
        }
        fn fields(&self) -> u64 {
            self.word.load(Ordering::SeqCst) & (COUNTER_ONE - 1)
        }
        fn snapshot(&self) -> ContextSnapshot {
            ContextTracker::snapshot(self)
        }
        fn snap_is_idle(snap: ContextSnapshot) -> bool {
            snap.is_idle()
        }
        fn passed_since(&self, snap: ContextSnapshot) -> bool {
            self.passed_quiescent_since(snap)
        }
        fn structural(&self) -> Result<(), String> {
            let w = self.word.load(Ordering::SeqCst);
            if w & DEPTH_MASK != 0 && w & COUNTER_ONE == 0 {
                return Err(format!(
                    "W1: handler depth > 0 with an even counter ({w:#x})"
                ));
            }
            if w & WOKE != 0 && w & DEPTH_MASK == 0 {
                return Err(format!("W2: WOKE without a running handler ({w:#x})"));
            }
            Ok(())
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Op {
        IdleEnter,
        IdleExit,
        IrqEnter,
        IrqExit,
        NmiEnter,
        NmiExit,
    }

    fn run_op<P: Protocol>(p: &P, op: Op, between: &mut dyn FnMut(usize)) {
        match op {
            Op::IdleEnter => p.idle_enter(between),
            Op::IdleExit => p.idle_exit(between),
            Op::IrqEnter => p.irq_enter(between),
            Op::IrqExit => p.irq_exit(between),
            Op::NmiEnter => p.nmi_enter(between),
            Op::NmiExit => p.nmi_exit(between),
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Ctx {
        Idle,
        Task,
        Handler,
    }

    /// One outer operation to interrupt: the state it starts from (reached by `setup` from a
    /// fresh task-context CPU), the operation, the state it must end in, and whether a
    /// snapshot taken before it must count as "passed a quiescent state" after it.
    struct Outer {
        name: &'static str,
        setup: &'static [Op],
        op: Op,
        from: Ctx,
        to: Ctx,
        quiescent: bool,
    }

    #[rustfmt::skip]
    const OUTERS: [Outer; 10] = {
        use Ctx::{Handler, Idle, Task};
        use Op::*;
        const fn o(name: &'static str, setup: &'static [Op], op: Op, from: Ctx, to: Ctx, quiescent: bool) -> Outer {
            Outer { name, setup, op, from, to, quiescent }
        }
        [
            o("idle_enter",          &[],                     IdleEnter, Task,    Idle,    true),
            o("idle_exit",           &[IdleEnter],            IdleExit,  Idle,    Task,    true),
            o("irq_enter from idle", &[IdleEnter],            IrqEnter,  Idle,    Handler, true),
            o("irq_exit to idle",    &[IdleEnter, IrqEnter],  IrqExit,   Handler, Idle,    true),
            o("irq_enter from task", &[],                     IrqEnter,  Task,    Handler, false),
            o("irq_exit to task",    &[IrqEnter],             IrqExit,   Handler, Task,    false),
            o("nmi_enter from idle", &[IdleEnter],            NmiEnter,  Idle,    Handler, true),
            o("nmi_exit to idle",    &[IdleEnter, NmiEnter],  NmiExit,   Handler, Idle,    true),
            o("nmi_enter from task", &[],                     NmiEnter,  Task,    Handler, false),
            o("nmi_exit to task",    &[NmiEnter],             NmiExit,   Handler, Task,    false),
        ]
    };

    // ---------------------------------------------------------------------------------------
    // Enumerating interleavings: depth-first over the binary decisions "insert a nested pair
    // at this point or not", replaying each schedule from a fresh tracker.

    /// The decisions of the current schedule; `next_schedule` moves to the next one.
    #[derive(Default)]
    struct Explorer {
        path: Vec<bool>,
        cursor: usize,
    }

    impl Explorer {
        fn choose(&mut self) -> bool {
            if self.cursor == self.path.len() {
                self.path.push(false);
            }
            self.cursor += 1;
            self.path[self.cursor - 1]
        }

        fn next_schedule(&mut self) -> bool {
            assert_eq!(self.cursor, self.path.len(), "replay was not deterministic");
            self.cursor = 0;
            while self.path.last() == Some(&true) {
                self.path.pop();
            }
            match self.path.last_mut() {
                Some(last) => {
                    *last = true;
                    true
                }
                None => false,
            }
        }
    }

    /// Which points of a nested pair get a deeper pair.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Policy {
        /// Every point independently: all combinations.
        EveryPoint,
        /// At most one point per pair: every chain of single insertions (goes deeper).
        OnePerPair,
    }

    /// Where in a schedule something happened (for counterexamples).
    #[derive(Clone, Copy, Debug)]
    enum At {
        Before,
        Step(usize),
        After,
        Enter(usize),
        Body,
        Exit(usize),
    }

    /// Names the point `at` of the operation or pair at `level` (0 = the outer operation).
    fn point_name(level: usize, at: At) -> String {
        let who = if level == 0 {
            String::from("outer op")
        } else {
            format!("pair@{level}")
        };
        match at {
            At::Before => format!("{who} before"),
            At::Step(i) => format!("{who} between steps {i},{}", i + 1),
            At::After => format!("{who} after"),
            At::Enter(i) => format!("{who} enter between steps {i},{}", i + 1),
            At::Body => format!("{who} body"),
            At::Exit(i) => format!("{who} exit between steps {i},{}", i + 1),
        }
    }

    /// An invariant violation: where, what, and the schedule that led there.
    struct Violation {
        outer: &'static str,
        what: String,
        /// Every nested pair inserted in the failing run, in order, then the failing point.
        schedule: String,
    }

    struct Run<'a, P: Protocol> {
        p: &'a P,
        ex: &'a mut Explorer,
        policy: Policy,
        max_depth: usize,
        /// How many enclosing contexts (task, handler bodies) need the CPU watched right now.
        need_watched: u32,
        /// Nested pairs so far that began with the CPU idle (each advances the counter by 2).
        idle_starts: u64,
        /// Every insertion so far in this run: (level of the interrupted operation, point).
        log: Vec<(usize, At)>,
        /// Pairs run at each nesting level (index = level).
        pairs_at: Vec<u64>,
        violation: Option<(String, String)>,
    }

    impl<P: Protocol> Run<'_, P> {
        fn fail(&mut self, level: usize, at: At, what: String) {
            if self.violation.is_none() {
                let mut schedule = String::new();
                for &(l, a) in &self.log {
                    schedule += &format!("pair@{} inserted at [{}]; ", l + 1, point_name(l, a));
                }
                schedule += &format!("failed at [{}]", point_name(level, at));
                self.violation = Some((schedule, what));
            }
        }

        /// Checks that hold at every point (W*, I1).
        fn check_point(&mut self, level: usize, at: At) {
            if let Err(e) = self.p.structural() {
                self.fail(level, at, e);
            }
            if self.need_watched > 0 && self.p.counter() & 1 == 0 {
                self.fail(
                    level,
                    at,
                    format!(
                        "I1: counter {} even while code that may hold references runs",
                        self.p.counter()
                    ),
                );
            }
        }

        /// A point where an NMI may arrive: check, then maybe run a nested pair there.
        fn point(&mut self, level: usize, at: At, single: bool, used: &mut bool) {
            self.check_point(level, at);
            if self.violation.is_some() || level >= self.max_depth || (single && *used) {
                return;
            }
            if self.ex.choose() {
                *used = true;
                self.log.push((level, at));
                self.pair(level + 1);
                self.check_point(level, at);
            }
        }

        /// A complete nested NMI enter → body → exit at `level`, with deeper pairs inserted
        /// as the explorer decides; checks I1 in the body and I2 after.
        fn pair(&mut self, level: usize) {
            let p = self.p;
            if self.pairs_at.len() <= level {
                self.pairs_at.resize(level + 1, 0);
            }
            self.pairs_at[level] += 1;
            let (counter0, fields0, idle_starts0) = (p.counter(), p.fields(), self.idle_starts);
            if counter0 & 1 == 0 {
                self.idle_starts += 1;
            }
            let single = self.policy == Policy::OnePerPair;
            let mut used = false;
            p.nmi_enter(&mut |i| self.point(level, At::Enter(i), single, &mut used));

            // The handler body: watched, seen as not idle, and the counter stays put while it
            // runs, whatever deeper pairs do.
            self.need_watched += 1;
            self.check_point(level, At::Body);
            let snap = p.snapshot();
            if P::snap_is_idle(snap) {
                self.fail(
                    level,
                    At::Body,
                    String::from("I1: a snapshot taken in a handler body says idle"),
                );
            }
            self.point(level, At::Body, single, &mut used);
            if p.passed_since(snap) {
                self.fail(
                    level,
                    At::Body,
                    String::from("I1: quiescent state claimed while a handler body runs"),
                );
            }
            if P::snap_is_idle(p.snapshot()) {
                self.fail(
                    level,
                    At::Body,
                    String::from("I1: a snapshot taken in a handler body says idle"),
                );
            }
            self.need_watched -= 1;

            p.nmi_exit(&mut |i| self.point(level, At::Exit(i), single, &mut used));

            let expected = counter0 + 2 * (self.idle_starts - idle_starts0);
            if p.fields() != fields0 || p.counter() != expected {
                let what = format!(
                    "I2: pair left fields {:#x} counter {} (expected fields {fields0:#x} counter {expected})",
                    p.fields(),
                    p.counter()
                );
                self.fail(level, At::After, what);
            }
        }
    }

    /// Expected end of an outer operation when nothing interrupts it.
    struct Reference {
        fields: u64,
        delta: u64,
    }

    fn fresh<P: Protocol>(setup: &[Op]) -> P {
        let p = P::new_task();
        for &op in setup {
            run_op(&p, op, &mut |_| {});
        }
        p
    }

    /// Runs every schedule of every outer operation; returns (schedules checked, pairs run per
    /// nesting level) or the first violation.
    ///
    /// Panics if more than `limit` schedules would be needed (a bound on the run time).
    fn check<P: Protocol>(
        policy: Policy,
        max_depth: usize,
        limit: u64,
    ) -> Result<(u64, Vec<u64>), Violation> {
        let mut schedules = 0;
        let mut pairs_at = Vec::new();
        for outer in &OUTERS {
            let violation = |schedule, what| Violation {
                outer: outer.name,
                what,
                schedule,
            };
            // The uninterrupted run: must itself do what the operation says (I3).
            let reference = {
                let p: P = fresh(outer.setup);
                let (counter0, snap0) = (p.counter(), p.snapshot());
                run_op(&p, outer.op, &mut |_| {});
                let delta = p.counter().wrapping_sub(counter0);
                let expected_delta =
                    u64::from((outer.from == Ctx::Idle) != (outer.to == Ctx::Idle));
                if delta != expected_delta || (p.counter() & 1 == 0) != (outer.to == Ctx::Idle) {
                    return Err(violation(
                        String::from("uninterrupted"),
                        format!(
                            "I3: uninterrupted run: counter {counter0} -> {}",
                            p.counter()
                        ),
                    ));
                }
                if p.passed_since(snap0) != outer.quiescent {
                    return Err(violation(
                        String::from("uninterrupted"),
                        String::from("I3: uninterrupted run: wrong quiescent-state verdict"),
                    ));
                }
                Reference {
                    fields: p.fields(),
                    delta,
                }
            };

            let mut ex = Explorer::default();
            loop {
                let p: P = fresh(outer.setup);
                let (counter0, snap0) = (p.counter(), p.snapshot());
                let mut run = Run {
                    p: &p,
                    ex: &mut ex,
                    policy,
                    max_depth,
                    need_watched: 0,
                    idle_starts: 0,
                    log: Vec::new(),
                    pairs_at: Vec::new(),
                    violation: None,
                };
                let watched = |ctx: Ctx| u32::from(ctx != Ctx::Idle);
                // The outer operation gets at most one nested pair, at one of its points.
                let mut used = false;
                run.need_watched = watched(outer.from);
                run.point(0, At::Before, true, &mut used);
                run.need_watched = watched(outer.from).min(watched(outer.to));
                run_op(&p, outer.op, &mut |i| {
                    run.point(0, At::Step(i), true, &mut used)
                });
                run.need_watched = watched(outer.to);
                run.point(0, At::After, true, &mut used);

                let expected = counter0 + reference.delta + 2 * run.idle_starts;
                if run.violation.is_none()
                    && (p.fields() != reference.fields || p.counter() != expected)
                {
                    let what = format!(
                        "I3: ended with fields {:#x} counter {} (expected fields {:#x} counter {expected})",
                        p.fields(),
                        p.counter(),
                        reference.fields
                    );
                    run.fail(0, At::After, what);
                }
                if run.violation.is_none() && p.passed_since(snap0) != outer.quiescent {
                    run.fail(
                        0,
                        At::After,
                        String::from(
                            "I3: wrong quiescent-state verdict for a snapshot taken before",
                        ),
                    );
                }
                schedules += 1;
                assert!(
                    schedules <= limit,
                    "more than {limit} schedules: bounds too large"
                );
                if pairs_at.len() < run.pairs_at.len() {
                    pairs_at.resize(run.pairs_at.len(), 0);
                }
                for (total, n) in pairs_at.iter_mut().zip(&run.pairs_at) {
                    *total += n;
                }
                if let Some((schedule, what)) = run.violation.take() {
                    return Err(violation(schedule, what));
                }
                if !ex.next_schedule() {
                    break;
                }
            }
        }
        Ok((schedules, pairs_at))
    }

    // ---------------------------------------------------------------------------------------
    // The expected number of schedules, from the shape of the protocol: a nested pair has
    // three points (between enter's two steps, its body, between exit's two steps); an outer
    // handler operation has three (before, between its steps, after), idle_enter/idle_exit two
    // (they are one step each). The outer operation gets at most one nested pair.

    const PAIR_POINTS: u64 = 3;

    /// Distinct executions of one nested pair at `level` (pairs exist at levels 1..=max).
    fn pair_executions(policy: Policy, level: usize, max_depth: usize) -> u64 {
        if level == max_depth {
            return 1;
        }
        let below = pair_executions(policy, level + 1, max_depth);
        match policy {
            Policy::EveryPoint => (1 + below).pow(PAIR_POINTS as u32),
            Policy::OnePerPair => 1 + PAIR_POINTS * below,
        }
    }

    fn expected_schedules(policy: Policy, max_depth: usize) -> u64 {
        let pair = pair_executions(policy, 1, max_depth);
        OUTERS
            .iter()
            .map(|o| {
                let points = if matches!(o.op, Op::IdleEnter | Op::IdleExit) {
                    2
                } else {
                    3
                };
                1 + points * pair
            })
            .sum()
    }

    fn prove(policy: Policy, max_depth: usize, expected: u64) {
        let (schedules, pairs_at) = match check::<ContextTracker>(policy, max_depth, expected) {
            Ok(r) => r,
            Err(v) => panic!("{}: {}\n  schedule: {}", v.outer, v.what, v.schedule),
        };
        println!(
            "context tracking, {policy:?} to depth {max_depth}: {schedules} interleavings checked \
             (10 outer operations); nested pairs run per level 1..: {:?}",
            &pairs_at[1..]
        );
        assert_eq!(schedules, expected_schedules(policy, max_depth));
        assert_eq!(schedules, expected);
        assert_eq!(
            pairs_at.len(),
            max_depth + 1,
            "pairs did not nest to depth {max_depth}"
        );
    }

    /// Every combination: each point of each nested pair independently gets a deeper pair or
    /// not, three levels deep.
    #[test]
    fn exhaustive_every_combination_to_depth_3() {
        // Pair executions: 1 (level 3), 2³ = 8 (level 2), 9³ = 729 (level 1);
        // 8 handler operations × (1 + 3·729) + 2 idle operations × (1 + 2·729).
        prove(Policy::EveryPoint, 3, 8 * 2188 + 2 * 1459);
    }

    /// Every chain of single insertions, eight levels deep.
    #[test]
    fn exhaustive_every_chain_to_depth_8() {
        // Pair executions: q(8) = 1, q(l) = 1 + 3·q(l+1), so q(1) = (3⁸ − 1)/2 = 3280;
        // 8 handler operations × (1 + 3·3280) + 2 idle operations × (1 + 2·3280).
        prove(Policy::OnePerPair, 8, 8 * 9841 + 2 * 6561);
    }

    // ---------------------------------------------------------------------------------------
    // The checker can fail: broken protocols.

    /// Naive separate-nesting schemes: a nesting count and a "woke" flag in words of their own
    /// next to the counter, and no +1/+2 rule tying them together.
    ///
    /// * `WAKE_FIRST = false` — the bug class found in the seed thread: entry bumps the count
    ///   first and wakes the CPU only if it was the outermost entry. An NMI that lands between
    ///   the two sees a non-zero count, assumes the CPU is already watched, and runs its handler
    ///   while the CPU still looks idle (I1).
    /// * `WAKE_FIRST = true` — wake first, bump the count after. An NMI that lands between the
    ///   two sees count 0 and the flag set, and its exit takes the flag and makes the CPU idle
    ///   under the outer handler (I2, then I1). Why the flag must change in the same atomic
    ///   step as the count — here, `WOKE` and `depth` in one word.
    struct NaiveNesting<const WAKE_FIRST: bool> {
        counter: AtomicU64,
        nesting: AtomicU64,
        woke: AtomicU64,
    }

    /// Counts a step and calls the hook after it.
    fn after_step(step: &mut usize, between: &mut dyn FnMut(usize)) {
        *step += 1;
        between(*step);
    }

    impl<const WAKE_FIRST: bool> NaiveNesting<WAKE_FIRST> {
        fn enter(&self, between: &mut dyn FnMut(usize)) {
            let mut step = 0;
            let n = self.nesting.load(Ordering::SeqCst);
            if !WAKE_FIRST {
                after_step(&mut step, between);
                self.nesting.store(n + 1, Ordering::SeqCst);
            }
            after_step(&mut step, between);
            if n == 0 && self.counter.load(Ordering::SeqCst) & 1 == 0 {
                after_step(&mut step, between);
                self.counter.fetch_add(1, Ordering::SeqCst);
                after_step(&mut step, between);
                self.woke.store(1, Ordering::SeqCst);
            }
            if WAKE_FIRST {
                after_step(&mut step, between);
                self.nesting.store(n + 1, Ordering::SeqCst);
            }
        }

        fn exit(&self, between: &mut dyn FnMut(usize)) {
            let mut step = 0;
            let n = self.nesting.load(Ordering::SeqCst);
            after_step(&mut step, between);
            let woke = n == 1 && self.woke.load(Ordering::SeqCst) == 1;
            if woke {
                after_step(&mut step, between);
                self.woke.store(0, Ordering::SeqCst);
            }
            after_step(&mut step, between);
            self.nesting.store(n.wrapping_sub(1), Ordering::SeqCst);
            if woke {
                after_step(&mut step, between);
                self.counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    impl<const WAKE_FIRST: bool> Protocol for NaiveNesting<WAKE_FIRST> {
        type Snap = u64;
        fn new_task() -> Self {
            NaiveNesting {
                counter: AtomicU64::new(1),
                nesting: AtomicU64::new(0),
                woke: AtomicU64::new(0),
            }
        }
        fn idle_enter(&self, _: &mut dyn FnMut(usize)) {
            self.counter.fetch_add(1, Ordering::SeqCst);
        }
        fn idle_exit(&self, _: &mut dyn FnMut(usize)) {
            self.counter.fetch_add(1, Ordering::SeqCst);
        }
        fn irq_enter(&self, between: &mut dyn FnMut(usize)) {
            self.enter(between)
        }
        fn irq_exit(&self, between: &mut dyn FnMut(usize)) {
            self.exit(between)
        }
        fn nmi_enter(&self, between: &mut dyn FnMut(usize)) {
            self.enter(between)
        }
        fn nmi_exit(&self, between: &mut dyn FnMut(usize)) {
            self.exit(between)
        }
        fn counter(&self) -> u64 {
            self.counter.load(Ordering::SeqCst)
        }
        fn fields(&self) -> u64 {
            self.nesting.load(Ordering::SeqCst) * 2 + self.woke.load(Ordering::SeqCst)
        }
        fn snapshot(&self) -> u64 {
            self.counter.load(Ordering::SeqCst)
        }
        fn snap_is_idle(snap: u64) -> bool {
            snap & 1 == 0
        }
        fn passed_since(&self, snap: u64) -> bool {
            snap & 1 == 0 || self.counter.load(Ordering::SeqCst) != snap
        }
        fn structural(&self) -> Result<(), String> {
            Ok(())
        }
    }

    /// Our word layout, but each step-2 writes the word computed from step 1 with a plain
    /// `store` instead of a relative `fetch_add`: a nested pair that began idle between the
    /// two steps has its counter advance overwritten (the counter goes backwards).
    struct StoreNotAdd(ContextTracker);

    impl StoreNotAdd {
        fn step(&self, delta: impl Fn(u64) -> u64, between: &mut dyn FnMut(usize)) {
            let w = self.0.word.load(Ordering::SeqCst);
            between(1);
            self.0
                .word
                .store(w.wrapping_add(delta(w)), Ordering::SeqCst);
        }
    }

    impl Protocol for StoreNotAdd {
        type Snap = ContextSnapshot;
        fn new_task() -> Self {
            StoreNotAdd(ContextTracker::new())
        }
        fn idle_enter(&self, between: &mut dyn FnMut(usize)) {
            self.step(|_| COUNTER_ONE, between)
        }
        fn idle_exit(&self, between: &mut dyn FnMut(usize)) {
            self.step(|_| COUNTER_ONE, between)
        }
        fn irq_enter(&self, between: &mut dyn FnMut(usize)) {
            self.nmi_enter(between)
        }
        fn irq_exit(&self, between: &mut dyn FnMut(usize)) {
            self.nmi_exit(between)
        }
        fn nmi_enter(&self, between: &mut dyn FnMut(usize)) {
            self.step(
                |w| {
                    if w & COUNTER_ONE != 0 {
                        ENTER_NESTED
                    } else {
                        ENTER_FROM_IDLE
                    }
                },
                between,
            )
        }
        fn nmi_exit(&self, between: &mut dyn FnMut(usize)) {
            self.step(
                |w| {
                    if w & (DEPTH_MASK | WOKE) == WOKE + 1 {
                        EXIT_TO_IDLE
                    } else {
                        EXIT_NESTED
                    }
                },
                between,
            )
        }
        fn counter(&self) -> u64 {
            self.0.counter()
        }
        fn fields(&self) -> u64 {
            Protocol::fields(&self.0)
        }
        fn snapshot(&self) -> ContextSnapshot {
            self.0.snapshot()
        }
        fn snap_is_idle(snap: ContextSnapshot) -> bool {
            snap.is_idle()
        }
        fn passed_since(&self, snap: ContextSnapshot) -> bool {
            self.0.passed_quiescent_since(snap)
        }
        fn structural(&self) -> Result<(), String> {
            self.0.structural()
        }
    }

    /// Runs a broken protocol through the same checker. Smaller bounds than for the real one:
    /// its operations have up to four steps, so a pair has up to nine points and every
    /// combination to depth 3 would be ~10²⁴ schedules; depth 2 (every combination) and depth 4
    /// (every chain) already contain the counterexamples.
    fn expect_violation<P: Protocol>(name: &str, invariants: &[&str]) {
        for (policy, depth) in [(Policy::EveryPoint, 2), (Policy::OnePerPair, 4)] {
            match check::<P>(policy, depth, 1_000_000) {
                Ok((n, _)) => {
                    panic!("{name}: the checker passed a broken protocol ({n} interleavings)")
                }
                Err(v) => {
                    println!(
                        "{name} ({policy:?}): caught in {}: {}\n  schedule: {}",
                        v.outer, v.what, v.schedule
                    );
                    assert!(
                        invariants.iter().any(|i| v.what.starts_with(i)),
                        "{name}: expected a violation of {invariants:?}, got {}",
                        v.what
                    );
                }
            }
        }
    }

    #[test]
    fn checker_catches_naive_nesting_count_first() {
        expect_violation::<NaiveNesting<false>>("naive nesting, count first", &["I1"]);
    }

    #[test]
    fn checker_catches_naive_nesting_wake_first() {
        expect_violation::<NaiveNesting<true>>("naive nesting, wake first", &["I1", "I2"]);
    }

    #[test]
    fn checker_catches_store_instead_of_fetch_add() {
        // The lost counter advance shows up at the end of the enclosing pair (I2) or of the
        // outer operation (I3), whichever the enumeration reaches first.
        expect_violation::<StoreNotAdd>("store instead of fetch_add", &["I2", "I3"]);
    }

    // ---------------------------------------------------------------------------------------
    // Plain sequences.

    #[test]
    fn idle_and_interrupt_sequences() {
        let t = ContextTracker::new();
        let s = |t: &ContextTracker| t.snapshot();
        assert_eq!((s(&t).context(), s(&t).counter()), (CpuContext::Task, 1));
        t.idle_enter();
        assert_eq!((s(&t).context(), s(&t).counter()), (CpuContext::Idle, 2));
        t.irq_enter();
        assert_eq!(
            (s(&t).context(), s(&t).counter(), s(&t).handler_depth()),
            (CpuContext::Handler, 3, 1)
        );
        t.nmi_enter();
        t.nmi_enter();
        assert_eq!((s(&t).counter(), s(&t).handler_depth()), (3, 3));
        t.nmi_exit();
        t.nmi_exit();
        t.irq_exit();
        assert_eq!((s(&t).context(), s(&t).counter()), (CpuContext::Idle, 4));
        t.idle_exit();
        t.irq_enter();
        assert_eq!((s(&t).context(), s(&t).counter()), (CpuContext::Handler, 5));
        t.irq_exit();
        assert_eq!(
            (s(&t).context(), s(&t).counter(), s(&t).raw()),
            (CpuContext::Task, 5, 5 << COUNTER_SHIFT)
        );
    }

    #[test]
    fn deep_nesting_up_to_the_limit() {
        let t = ContextTracker::new();
        t.idle_enter();
        for _ in 0..MAX_HANDLER_DEPTH {
            t.nmi_enter();
        }
        assert_eq!(t.snapshot().handler_depth(), MAX_HANDLER_DEPTH);
        for _ in 0..MAX_HANDLER_DEPTH {
            assert!(t.watched());
            t.nmi_exit();
        }
        assert_eq!(t.snapshot().context(), CpuContext::Idle);
    }

    #[test]
    fn counter_wraps_without_touching_the_nesting_bits() {
        let t = ContextTracker {
            word: AtomicU64::new(!(COUNTER_ONE - 1)),
        }; // max odd counter
        let snap = t.snapshot();
        assert_eq!(snap.context(), CpuContext::Task);
        t.idle_enter(); // counter wraps to 0: even, idle
        assert_eq!(
            (t.snapshot().context(), t.snapshot().counter()),
            (CpuContext::Idle, 0)
        );
        t.nmi_enter();
        t.nmi_exit();
        assert_eq!(
            (t.snapshot().raw(), t.snapshot().counter()),
            (2 * COUNTER_ONE, 2)
        );
        assert!(t.passed_quiescent_since(snap));
    }

    // ---------------------------------------------------------------------------------------
    // Two threads: an owner cycling through contexts, a remote observer.

    /// Tiny xorshift64 generator (deterministic, no dependencies).
    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// The owner marks its critical sections in `marker` (odd while inside one; +1 on entry
    /// and on exit, after becoming watched and before leaving). The observer brackets its
    /// snapshots with two reads of the marker: if both read the same odd value, one critical
    /// section spanned the snapshot, which must then be watched — and no quiescent state may be
    /// claimed for it while that same section still runs. Claims must be monotone.
    #[test]
    fn remote_observer_never_sees_a_critical_section_as_quiescent() {
        use core::sync::atomic::AtomicBool;
        use std::thread;
        use std::time::{Duration, Instant};

        const MIN_OWNER_STEPS: u64 = 200_000;
        const MIN_SAMPLES: u64 = 1_000;
        let deadline = Instant::now() + Duration::from_secs(20);

        let t = ContextTracker::new();
        let marker = AtomicU64::new(0);
        let in_cs_samples = AtomicU64::new(0);
        let observer_ready = AtomicBool::new(false);
        let done = AtomicBool::new(false);

        let critical_section = |rng: &mut XorShift| {
            marker.fetch_add(1, Ordering::SeqCst);
            for _ in 0..rng.below(64) {
                core::hint::spin_loop();
            }
            if rng.below(4) == 0 {
                t.nmi_enter(); // an NMI inside the section, with its own section
                marker.fetch_add(2, Ordering::SeqCst); // stays odd: still inside
                t.nmi_exit();
            }
            marker.fetch_add(1, Ordering::SeqCst);
        };

        let (steps, claims, samples) = thread::scope(|s| {
            let owner = s.spawn(|| {
                let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
                while !observer_ready.load(Ordering::SeqCst) && Instant::now() < deadline {
                    core::hint::spin_loop();
                }
                let mut idle = false;
                let mut steps = 0u64;
                while (steps < MIN_OWNER_STEPS
                    || in_cs_samples.load(Ordering::Relaxed) < MIN_SAMPLES)
                    && Instant::now() < deadline
                {
                    steps += 1;
                    match (idle, rng.below(4)) {
                        (false, 0) => {
                            t.idle_enter();
                            idle = true;
                        }
                        (true, 0) => {
                            t.idle_exit();
                            idle = false;
                        }
                        (false, 1) => critical_section(&mut rng), // task-context section
                        (_, 2) => {
                            t.irq_enter();
                            critical_section(&mut rng);
                            t.irq_exit();
                        }
                        (_, _) => {
                            t.nmi_enter();
                            critical_section(&mut rng);
                            t.nmi_exit();
                        }
                    }
                }
                if idle {
                    t.idle_exit();
                }
                done.store(true, Ordering::SeqCst);
                steps
            });

            // The observer.
            observer_ready.store(true, Ordering::SeqCst);
            // The snapshot being watched: (snapshot, marker at the time, true answers since).
            let mut watch: Option<(ContextSnapshot, u64, u32)> = None;
            let mut claims = 0u64;
            while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                let m1 = marker.load(Ordering::SeqCst);
                let snap = t.snapshot();
                let m2 = marker.load(Ordering::SeqCst);
                if m1 == m2 && m1 & 1 == 1 {
                    assert!(
                        snap.is_watched(),
                        "snapshot {snap:?} idle inside critical section {m1}"
                    );
                    in_cs_samples.fetch_add(1, Ordering::Relaxed);
                    if watch.is_none() {
                        watch = Some((snap, m1, 0));
                    }
                }
                if let Some((w, m0, trues)) = watch.as_mut() {
                    let m3 = marker.load(Ordering::SeqCst);
                    let q = t.passed_quiescent_since(*w);
                    let m4 = marker.load(Ordering::SeqCst);
                    if m3 == *m0 && m4 == *m0 {
                        assert!(!q, "quiescent state claimed inside the critical section {m0} of snapshot {w:?}");
                    }
                    assert!(
                        q || *trues == 0,
                        "passed_quiescent_since went from true back to false"
                    );
                    if q {
                        *trues += 1;
                        if *trues == 1 {
                            claims += 1;
                        }
                        if *trues == 16 {
                            watch = None; // monotone for a while: move on to a new snapshot
                        }
                    }
                }
            }
            (
                owner.join().unwrap(),
                claims,
                in_cs_samples.load(Ordering::Relaxed),
            )
        });
        println!(
            "owner steps {steps}, in-section samples {samples}, quiescent states observed {claims}"
        );
        assert!(
            steps >= MIN_OWNER_STEPS,
            "owner did not finish its steps before the deadline"
        );
        assert!(
            samples >= MIN_SAMPLES,
            "observer caught too few critical sections ({samples})"
        );
        assert!(claims > 0, "observer never saw a quiescent state");
        assert_eq!(t.snapshot().context(), CpuContext::Task);
    }
}
