//! Small helpers shared by tests and benchmarks.

/// A raw pointer that a test promises to use from one CPU at a time.
pub struct SyncPtr<T>(pub *mut T);
// SAFETY: the users guarantee exclusive access (see their comments).
unsafe impl<T> Sync for SyncPtr<T> {}
