//! Which keys a query sees under the causal (optionally windowed) mask:
//! shared by every attention kernel, so they agree on it.

/// Visible key range [lo, hi) of query row `i`.
#[inline]
pub fn visible(i: usize, window: Option<usize>) -> (usize, usize) {
    let lo = match window {
        Some(w) => (i + 1).saturating_sub(w),
        None => 0,
    };
    (lo, i + 1)
}
