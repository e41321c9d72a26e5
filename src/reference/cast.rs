//! CPU reference for the f32 / f16 conversions (`half`'s round-to-nearest-even).

/// `x * s` rounded to the nearest half, as f64.
pub fn to_half(x: &[f32], s: f32) -> Vec<f64> {
    x.iter().map(|&v| f64::from(half::f16::from_f32(v * s).to_f32())).collect()
}
