//! Cache-line prefetch: a hint that a value will be read soon, so that its line is on
//! its way while the core works on something else.
//!
//! The engine is bound by cache misses, not by instructions: a sample touches an index
//! slot, its device's lines and the window slots its values replace, scattered over
//! megabytes. Judging samples in order, each of those misses is waited for in turn.
//! Looking a few samples ahead and prefetching their lines overlaps the waits (see
//! `Engine::ingest_batch_with`). A prefetch never faults and changes nothing but the
//! cache, so a stale or wrong hint costs only the line it fetched.

/// Asks for the cache line holding the start of `value` (into every cache level).
#[inline(always)]
pub(crate) fn prefetch<T>(value: &T) {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse"))]
    safe_arch::prefetch_t0(value);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse")))]
    let _ = value;
}
