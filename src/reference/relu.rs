//! CPU reference for ReLU (f64).

/// `max(x, 0)`.
pub fn forward(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v.max(0.0)).collect()
}

/// `dy * [x > 0]`.
pub fn backward(x: &[f64], dy: &[f64]) -> Vec<f64> {
    super::same_len("reference relu backward", x.len(), &[dy]);
    x.iter().zip(dy).map(|(&v, &g)| if v > 0.0 { g } else { 0.0 }).collect()
}
