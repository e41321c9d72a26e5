//! CPU reference for 2-D convolution (f64): square kernel, padding `k / 2`, no bias.
//! x `[N,C,H,W]`, w `[K,C,k,k]` (OIHW), y `[N,K,OH,OW]` with OH = (H + 2*pad - k) / stride + 1.
//! All three functions walk the same (n, k, c, oy, ox, ky, kx) loop nest and differ only in
//! which of `y[n,k,oy,ox] += x[n,c,iy,ix] * w[k,c,ky,kx]` they accumulate.

/// The output size along one axis (see `ops::conv::out_size`).
fn out_size(h: usize, k: usize, stride: usize) -> usize {
    (h + 2 * (k / 2) - k) / stride + 1
}

/// Calls `f(x index, w index, y index)` for every term of the convolution sum.
fn for_each_term(xd: [usize; 4], wd: [usize; 4], stride: usize, mut f: impl FnMut(usize, usize, usize)) {
    let [n, c, h, w] = xd;
    let [k, wc, kh, kw] = wd;
    assert_eq!(wc, c, "conv reference: channels");
    assert_eq!(kh, kw, "conv reference: square kernel");
    assert!(stride >= 1, "conv reference: stride");
    let pad = (kh / 2) as isize;
    let (oh, ow) = (out_size(h, kh, stride), out_size(w, kw, stride));
    for ni in 0..n {
        for ki in 0..k {
            for ci in 0..c {
                for oy in 0..oh {
                    for ox in 0..ow {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * stride + ky) as isize - pad;
                                let ix = (ox * stride + kx) as isize - pad;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xi = ((ni * c + ci) * h + iy as usize) * w + ix as usize;
                                let wi = ((ki * c + ci) * kh + ky) * kw + kx;
                                let yi = ((ni * k + ki) * oh + oy) * ow + ox;
                                f(xi, wi, yi);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn out_dims(xd: [usize; 4], wd: [usize; 4], stride: usize) -> [usize; 4] {
    [xd[0], wd[0], out_size(xd[2], wd[2], stride), out_size(xd[3], wd[3], stride)]
}

/// `y = conv(x, w)`, y `[N,K,OH,OW]`.
pub fn forward(x: &[f64], xd: [usize; 4], w: &[f64], wd: [usize; 4], stride: usize) -> Vec<f64> {
    assert_eq!(x.len(), xd.iter().product::<usize>(), "conv reference: x length");
    assert_eq!(w.len(), wd.iter().product::<usize>(), "conv reference: w length");
    let mut y = vec![0.0; out_dims(xd, wd, stride).iter().product()];
    for_each_term(xd, wd, stride, |xi, wi, yi| y[yi] += x[xi] * w[wi]);
    y
}

/// `dx = dL/dx` given `dy = dL/dy`, dx `[N,C,H,W]` = `xd`.
pub fn backward_data(dy: &[f64], w: &[f64], wd: [usize; 4], xd: [usize; 4], stride: usize) -> Vec<f64> {
    assert_eq!(dy.len(), out_dims(xd, wd, stride).iter().product::<usize>(), "conv reference: dy length");
    assert_eq!(w.len(), wd.iter().product::<usize>(), "conv reference: w length");
    let mut dx = vec![0.0; xd.iter().product()];
    for_each_term(xd, wd, stride, |xi, wi, yi| dx[xi] += dy[yi] * w[wi]);
    dx
}

/// `dw = dL/dw` given `x` and `dy = dL/dy`, dw `[K,C,k,k]` = `wd`.
pub fn backward_weight(x: &[f64], xd: [usize; 4], dy: &[f64], wd: [usize; 4], stride: usize) -> Vec<f64> {
    assert_eq!(x.len(), xd.iter().product::<usize>(), "conv reference: x length");
    assert_eq!(dy.len(), out_dims(xd, wd, stride).iter().product::<usize>(), "conv reference: dy length");
    let mut dw = vec![0.0; wd.iter().product()];
    for_each_term(xd, wd, stride, |xi, wi, yi| dw[wi] += x[xi] * dy[yi]);
    dw
}

#[cfg(test)]
mod tests {
    /// Sums worked out by hand, outside the loop nest the three functions share (finite
    /// differences show only that the backwards are its transposes): x = 0..24 as 5x5, a 3x3
    /// kernel of ones at stride 2 sums the window around every second pixel, zero-padded.
    #[test]
    fn forward_sums_the_padded_windows_at_stride_2() {
        let x: Vec<f64> = (0..25).map(f64::from).collect();
        let y = super::forward(&x, [1, 1, 5, 5], &[1.0; 9], [1, 1, 3, 3], 2);
        // y[0][0] = x00 + x01 + x10 + x11 = 0 + 1 + 5 + 6; y[1][1] the full window around 12.
        assert_eq!(y, [12.0, 27.0, 24.0, 63.0, 108.0, 81.0, 72.0, 117.0, 84.0]);
        // A 1x1 kernel at stride 2 on 3x4: every second pixel of every second row.
        let x: Vec<f64> = (0..12).map(f64::from).collect();
        assert_eq!(super::forward(&x, [1, 1, 3, 4], &[2.0], [1, 1, 1, 1], 2), [0.0, 4.0, 16.0, 20.0]);
    }

    #[test]
    #[should_panic(expected = "operand 0 has 3 elements, not 2")]
    fn the_oracle_refuses_operands_of_other_lengths() {
        crate::reference::relu::backward(&[1.0, 2.0], &[1.0; 3]);
    }
}
