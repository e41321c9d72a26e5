//! CPU reference for the analysis probes (f64).

/// `sum(x^2)`.
pub fn sum_squares(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum()
}

/// `a - b`.
pub fn subtract(a: &[f64], b: &[f64]) -> Vec<f64> {
    super::same_len("reference subtract", a.len(), &[b]);
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}
