//! CPU reference for batch normalisation (f64), PyTorch semantics. Activations are NCHW with
//! dimensions `[n, c, h, w]`; per-channel statistics run over the `M = n*h*w` elements of each
//! channel.

/// Added to the variance before the square root.
pub const EPS: f64 = 1e-5;
/// Weight of the batch statistics in the running statistics' update.
pub const MOMENTUM: f64 = 0.1;

/// What [`forward_train`] returns.
#[derive(Clone, Debug)]
pub struct Train {
    pub y: Vec<f64>,
    /// The batch mean per channel.
    pub mean: Vec<f64>,
    /// `1 / sqrt(var + EPS)` per channel, var the biased batch variance.
    pub invstd: Vec<f64>,
    /// `(1 - MOMENTUM) * running_mean + MOMENTUM * mean`.
    pub running_mean: Vec<f64>,
    /// `(1 - MOMENTUM) * running_var + MOMENTUM * var * M / (M - 1)`.
    pub running_var: Vec<f64>,
}

/// Index of element `(b, ch, s)` with `s` the flat spatial index.
fn at(d: [usize; 4], b: usize, ch: usize, s: usize) -> usize {
    (b * d[1] + ch) * d[2] * d[3] + s
}

/// Batch mean and biased variance per channel (two passes).
fn batch_stats(x: &[f64], d: [usize; 4]) -> (Vec<f64>, Vec<f64>) {
    let [n, c, h, w] = d;
    let m = (n * h * w) as f64;
    let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
    for ch in 0..c {
        let mut s = 0.0;
        for b in 0..n {
            for k in 0..h * w {
                s += x[at(d, b, ch, k)];
            }
        }
        mean[ch] = s / m;
        let mut q = 0.0;
        for b in 0..n {
            for k in 0..h * w {
                let e = x[at(d, b, ch, k)] - mean[ch];
                q += e * e;
            }
        }
        var[ch] = q / m;
    }
    (mean, var)
}

/// `gamma * (x - mean) * invstd + beta`, then `+ y_old` if given, then ReLU if `relu`.
#[allow(clippy::too_many_arguments)]
fn normalize(
    x: &[f64],
    d: [usize; 4],
    mean: &[f64],
    invstd: &[f64],
    gamma: &[f64],
    beta: &[f64],
    y_old: Option<&[f64]>,
    relu: bool,
) -> Vec<f64> {
    let [n, c, h, w] = d;
    let mut y = vec![0.0; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for k in 0..h * w {
                let i = at(d, b, ch, k);
                let mut v = gamma[ch] * (x[i] - mean[ch]) * invstd[ch] + beta[ch];
                if let Some(old) = y_old {
                    v += old[i];
                }
                if relu {
                    v = v.max(0.0);
                }
                y[i] = v;
            }
        }
    }
    y
}

/// Asserts that `x` (and `other`, an activation of x's shape) has the elements of `d`, and each
/// of `per_channel` one a channel.
#[track_caller]
fn check(what: &str, x: &[f64], d: [usize; 4], per_channel: &[&[f64]], other: Option<&[f64]>) {
    super::same_len(what, d.iter().product(), &[x]);
    super::same_len(what, d.iter().product(), other.as_slice());
    super::same_len(what, d[1], per_channel);
}

/// Training mode. `y_old` given means the add epilogue (`y = y_old + bn(x)`); `relu` applies last.
/// Needs `n*h*w > 1`.
#[allow(clippy::too_many_arguments)]
pub fn forward_train(
    x: &[f64],
    d: [usize; 4],
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
    y_old: Option<&[f64]>,
    relu: bool,
) -> Train {
    let m = (d[0] * d[2] * d[3]) as f64;
    assert!(m > 1.0, "batch norm training needs more than one value per channel");
    check("reference batch norm forward_train", x, d, &[gamma, beta, running_mean, running_var], y_old);
    let (mean, var) = batch_stats(x, d);
    let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + EPS).sqrt()).collect();
    let y = normalize(x, d, &mean, &invstd, gamma, beta, y_old, relu);
    let running_mean = running_mean.iter().zip(&mean).map(|(r, mu)| (1.0 - MOMENTUM) * r + MOMENTUM * mu).collect();
    let running_var =
        running_var.iter().zip(&var).map(|(r, v)| (1.0 - MOMENTUM) * r + MOMENTUM * v * m / (m - 1.0)).collect();
    Train { y, mean, invstd, running_mean, running_var }
}

/// The convolutions' BN + ReLU prologue values (`ops::batch_norm::affine`): per channel
/// `(mean, gamma * invstd, beta, invstd)`, `[C, 4]` flattened (invstd for the backward's xhat).
pub fn affine(mean: &[f64], invstd: &[f64], gamma: &[f64], beta: &[f64]) -> Vec<f64> {
    (0..mean.len()).flat_map(|c| [mean[c], gamma[c] * invstd[c], beta[c], invstd[c]]).collect()
}

/// What the prologue reads for `x`: `ReLU((x - mean) * scale + beta)` per channel, with
/// `affine` as [`affine`] gives it.
pub fn prologue(x: &[f64], d: [usize; 4], affine: &[f64]) -> Vec<f64> {
    let [n, c, h, w] = d;
    super::same_len("reference prologue: x", n * c * h * w, &[x]);
    super::same_len("reference prologue: affine", 4 * c, &[affine]);
    let mut a = vec![0.0; x.len()];
    for b in 0..n {
        for ch in 0..c {
            let (m, s, be) = (affine[4 * ch], affine[4 * ch + 1], affine[4 * ch + 2]);
            for k in 0..h * w {
                let i = at(d, b, ch, k);
                a[i] = ((x[i] - m) * s + be).max(0.0);
            }
        }
    }
    a
}

/// Inference mode with the running statistics; epilogue as in [`forward_train`].
#[allow(clippy::too_many_arguments)]
pub fn forward_eval(
    x: &[f64],
    d: [usize; 4],
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
    y_old: Option<&[f64]>,
    relu: bool,
) -> Vec<f64> {
    check("reference batch norm forward_eval", x, d, &[gamma, beta, running_mean, running_var], y_old);
    let invstd: Vec<f64> = running_var.iter().map(|v| 1.0 / (v + EPS).sqrt()).collect();
    normalize(x, d, running_mean, &invstd, gamma, beta, y_old, relu)
}

/// Backward of [`forward_train`] without the add epilogue: `(dx, dgamma, dbeta)` for the
/// gradient `dy` of `y`. With `relu`, `dy` is masked by `[gamma * xhat + beta > 0]` first. The
/// batch statistics are recomputed from `x`.
pub fn backward(
    x: &[f64],
    d: [usize; 4],
    dy: &[f64],
    gamma: &[f64],
    beta: &[f64],
    relu: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let [n, c, h, w] = d;
    check("reference batch norm backward", x, d, &[gamma, beta], Some(dy));
    let m = (n * h * w) as f64;
    let (mean, var) = batch_stats(x, d);
    let mut dx = vec![0.0; x.len()];
    let (mut dgamma, mut dbeta) = (vec![0.0; c], vec![0.0; c]);
    for ch in 0..c {
        let invstd = 1.0 / (var[ch] + EPS).sqrt();
        let xhat = |i: usize| (x[i] - mean[ch]) * invstd;
        let dz = |i: usize| if relu && gamma[ch] * xhat(i) + beta[ch] <= 0.0 { 0.0 } else { dy[i] };
        let (mut s1, mut s2) = (0.0, 0.0);
        for b in 0..n {
            for k in 0..h * w {
                let i = at(d, b, ch, k);
                s1 += dz(i);
                s2 += dz(i) * xhat(i);
            }
        }
        dbeta[ch] = s1;
        dgamma[ch] = s2;
        for b in 0..n {
            for k in 0..h * w {
                let i = at(d, b, ch, k);
                dx[i] = gamma[ch] * invstd * (dz(i) - s1 / m - xhat(i) * s2 / m);
            }
        }
    }
    (dx, dgamma, dbeta)
}
