//! CPU reference for the network head (f64): global average pooling, the fully connected layer
//! (weight `[K,C]`, PyTorch `Linear` layout) and softmax cross-entropy, mean over the batch.

/// `p[n,c] = mean_{h,w} x[n,c,h,w]`; `x` is `[N,C,H,W]` with `hw = H*W`; returns `[N,C]`.
pub fn pool_forward(x: &[f64], n: usize, c: usize, hw: usize) -> Vec<f64> {
    assert_eq!(x.len(), n * c * hw);
    let mut p = vec![0.0; n * c];
    for i in 0..n * c {
        let mut s = 0.0;
        for j in 0..hw {
            s += x[i * hw + j];
        }
        p[i] = s / hw as f64;
    }
    p
}

/// `dx[n,c,h,w] = dp[n,c] / (H*W)`; returns `[N,C,H,W]`.
pub fn pool_backward(dp: &[f64], hw: usize) -> Vec<f64> {
    let mut dx = vec![0.0; dp.len() * hw];
    for (i, &g) in dp.iter().enumerate() {
        for j in 0..hw {
            dx[i * hw + j] = g / hw as f64;
        }
    }
    dx
}

/// `logits[n,k] = b[k] + sum_c p[n,c] w[k,c]`; `p` `[N,C]`, `w` `[K,C]`, `b` `[K]`; returns
/// `[N,K]`.
pub fn fc_forward(p: &[f64], w: &[f64], b: &[f64], n: usize, c: usize, k: usize) -> Vec<f64> {
    assert_eq!((p.len(), w.len(), b.len()), (n * c, k * c, k));
    let mut z = vec![0.0; n * k];
    for i in 0..n {
        for o in 0..k {
            let mut s = b[o];
            for j in 0..c {
                s += p[i * c + j] * w[o * c + j];
            }
            z[i * k + o] = s;
        }
    }
    z
}

/// The fully connected layer's gradients `(dp, dw, db)`: `dp = dz · w` `[N,C]`, `dw = dzᵀ · p`
/// `[K,C]`, `db = sum_n dz` `[K]`.
pub fn fc_backward(p: &[f64], w: &[f64], dz: &[f64], n: usize, c: usize, k: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    assert_eq!((p.len(), w.len(), dz.len()), (n * c, k * c, n * k));
    let mut dp = vec![0.0; n * c];
    let mut dw = vec![0.0; k * c];
    let mut db = vec![0.0; k];
    for i in 0..n {
        for o in 0..k {
            let g = dz[i * k + o];
            db[o] += g;
            for j in 0..c {
                dp[i * c + j] += g * w[o * c + j];
                dw[o * c + j] += g * p[i * c + j];
            }
        }
    }
    (dp, dw, db)
}

/// Softmax cross-entropy of `z` `[N,K]` against `labels` (each below K), mean over the batch:
/// returns `(loss, dz)` with `dz = (softmax(z) - onehot) / N`. Subtracts each row's max.
pub fn softmax_xent(z: &[f64], labels: &[u32], k: usize) -> (f64, Vec<f64>) {
    let n = labels.len();
    assert_eq!(z.len(), n * k);
    let mut loss = 0.0;
    let mut dz = vec![0.0; n * k];
    for (i, &l) in labels.iter().enumerate() {
        let row = &z[i * k..(i + 1) * k];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|&v| (v - m).exp()).sum();
        loss += s.ln() - (row[l as usize] - m);
        for o in 0..k {
            let onehot = if o == l as usize { 1.0 } else { 0.0 };
            dz[i * k + o] = ((row[o] - m).exp() / s - onehot) / n as f64;
        }
    }
    (loss / n as f64, dz)
}
