//! The CPU oracle: plain loops in f64, mirroring `ops/` file for file. Obviously correct beats
//! fast. Each backward here is itself checked against central finite differences: the
//! convolutions' in `tests/conv.rs`, batch norm's in `tests/batch_norm.rs`, the head's in
//! `tests/head.rs`, and every unit's and network's (ReLU, the residual add, the shortcut
//! combinations and gates inside them) in `tests/gradcheck_net.rs`.
//!
//! An oracle for tests, not an API that checks its input: its functions assert their slices'
//! sizes (and a gated combination's gate) and panic where they disagree, where `ops/` returns
//! [`crate::Error`].

pub mod batch_norm;
pub mod cast;
pub mod conv;
pub mod gate;
pub mod mix;
pub mod net;
pub mod pool_fc_loss;
pub mod probe;
pub mod relu;
pub mod residual;
pub mod sgd;

/// Asserts that each of `slices` has `len` elements (`what` names the function).
#[track_caller]
fn same_len(what: &str, len: usize, slices: &[&[f64]]) {
    for (i, s) in slices.iter().enumerate() {
        assert_eq!(s.len(), len, "{what}: operand {i} has {} elements, not {len}", s.len());
    }
}

/// Widens f32 data for the reference.
pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// `||got - want|| / ||want||` (the plain norm of `got - want` when `want` is all zeros).
pub fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_l2: lengths differ");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = g as f64 - w;
        num += d * d;
        den += w * w;
    }
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

/// `max |got - want|` (infinite when `got` holds a NaN).
pub fn max_abs(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "max_abs: lengths differ");
    got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| {
        let d = (g as f64 - w).abs();
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    })
}
