//! Scalar functions SQL lacks, registered with every session.
//!
//! `perm_key(seed BIGINT, perm BIGINT, key VARCHAR) -> BIGINT`: a seeded,
//! platform-independent pseudo-random key. Ordering the rows of a selection by
//! `perm_key(seed, p, model)` within permutation `p` gives a uniformly random
//! permutation of the models that is the same on every run with the same
//! seed; the correlate stage builds its permutation test on it.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array};
use arrow::datatypes::{DataType, Int64Type};
use datafusion::error::DataFusionError;
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};

/// The key itself: the first 63 bits of BLAKE3(seed ‖ perm ‖ key).
pub fn perm_key(seed: i64, perm: i64, key: &str) -> i64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(&perm.to_le_bytes());
    h.update(key.as_bytes());
    let out = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&out.as_bytes()[..8]);
    (u64::from_le_bytes(b) >> 1) as i64
}

fn perm_key_columns(args: &[ColumnarValue]) -> datafusion::error::Result<ColumnarValue> {
    let arrays = ColumnarValue::values_to_arrays(args)?;
    let [seed, perm, key] = arrays.as_slice() else {
        return Err(DataFusionError::Plan(
            "perm_key takes (seed BIGINT, perm BIGINT, key VARCHAR)".into(),
        ));
    };
    let seed = seed.as_primitive::<Int64Type>();
    let perm = perm.as_primitive::<Int64Type>();
    let key = key.as_string::<i32>();
    let out: Int64Array = (0..seed.len())
        .map(|i| {
            if seed.is_null(i) || perm.is_null(i) || key.is_null(i) {
                None
            } else {
                Some(perm_key(seed.value(i), perm.value(i), key.value(i)))
            }
        })
        .collect();
    Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
}

pub fn register(ctx: &SessionContext) {
    ctx.register_udf(create_udf(
        "perm_key",
        vec![DataType::Int64, DataType::Int64, DataType::Utf8],
        DataType::Int64,
        Volatility::Immutable,
        Arc::new(perm_key_columns),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perm_key_is_seeded_and_stable() {
        assert_eq!(perm_key(1, 2, "a"), perm_key(1, 2, "a"));
        assert_ne!(perm_key(1, 2, "a"), perm_key(2, 2, "a"));
        assert_ne!(perm_key(1, 2, "a"), perm_key(1, 3, "a"));
        assert!(perm_key(7, 9, "model") >= 0);
    }
}
