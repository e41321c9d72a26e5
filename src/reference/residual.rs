//! CPU reference for the residual addition and the option-A shortcut (f64).

/// `stream + branch`.
pub fn add(stream: &[f64], branch: &[f64]) -> Vec<f64> {
    super::same_len("reference residual add", stream.len(), &[branch]);
    stream.iter().zip(branch).map(|(a, b)| a + b).collect()
}

/// Option A: `x[:, :, ::s, ::s]` with channels `c_in..c_out` zero.
pub fn subsample_forward(x: &[f64], xd: [usize; 4], c_out: usize, s: usize) -> Vec<f64> {
    let [n, c_in, h, w] = xd;
    assert!(c_out >= c_in && s >= 1, "reference subsample: {c_in} -> {c_out} channels at stride {s}");
    super::same_len("reference subsample forward", xd.iter().product(), &[x]);
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
    assert!(c_out >= c_in, "reference subsample: {c_in} -> {c_out} channels");
    super::same_len("reference subsample backward", n * c_out * oh * ow, &[dy]);
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

#[cfg(test)]
mod tests {
    /// Option A by hand: 1 channel of 3x3 to 2 channels at stride 2 keeps the corners' and
    /// edges' every second pixel (rows and columns 0 and 2) and zero channels after the real
    /// ones; the backward puts them back where they came from.
    #[test]
    fn option_a_keeps_every_second_pixel_and_pads_channels_after() {
        let x: Vec<f64> = (1..=9).map(f64::from).collect();
        let y = super::subsample_forward(&x, [1, 1, 3, 3], 2, 2);
        assert_eq!(y, [1.0, 3.0, 7.0, 9.0, 0.0, 0.0, 0.0, 0.0]);
        let dy = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        assert_eq!(super::subsample_backward(&dy, [1, 1, 3, 3], 2, 2), [1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0, 4.0]);
    }
}
