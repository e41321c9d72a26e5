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
