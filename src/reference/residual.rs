//! CPU reference for the residual addition and the option-A shortcut (f64).

/// `stream + branch`.
pub fn add(stream: &[f64], branch: &[f64]) -> Vec<f64> {
    stream.iter().zip(branch).map(|(a, b)| a + b).collect()
}

/// Option A: `x[:, :, ::s, ::s]` with channels `c_in..c_out` zero.
pub fn subsample_forward(x: &[f64], xd: [usize; 4], c_out: usize, s: usize) -> Vec<f64> {
    let [n, c_in, h, w] = xd;
    let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
    let mut y = vec![0.0; n * c_out * oh * ow];
    for b in 0..n {
        for c in 0..c_in {
            for i in 0..oh {
                for j in 0..ow {
                    y[((b * c_out + c) * oh + i) * ow + j] = x[((b * c_in + c) * h + s * i) * w + s * j];
                }
            }
        }
    }
    y
}

/// The transpose of [`subsample_forward`]: the gradient to `x` of dimensions `xd`.
pub fn subsample_backward(dy: &[f64], xd: [usize; 4], c_out: usize, s: usize) -> Vec<f64> {
    let [n, c_in, h, w] = xd;
    let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
    let mut dx = vec![0.0; n * c_in * h * w];
    for b in 0..n {
        for c in 0..c_in {
            for i in 0..oh {
                for j in 0..ow {
                    dx[((b * c_in + c) * h + s * i) * w + s * j] = dy[((b * c_out + c) * oh + i) * ow + j];
                }
            }
        }
    }
    dx
}
