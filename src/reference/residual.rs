//! CPU reference for the residual addition (f64).

/// `stream + branch`.
pub fn add(stream: &[f64], branch: &[f64]) -> Vec<f64> {
    stream.iter().zip(branch).map(|(a, b)| a + b).collect()
}
