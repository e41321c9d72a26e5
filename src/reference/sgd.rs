//! CPU reference for SGD with momentum and weight decay (f64), as PyTorch's `torch.optim.SGD`
//! with dampening 0 and no Nesterov.

/// One step in place: `d = g + weight_decay * w; m = momentum * m + d; w -= lr * m`.
pub fn step(w: &mut [f64], g: &[f64], m: &mut [f64], lr: f64, momentum: f64, weight_decay: f64) {
    assert!(w.len() == g.len() && w.len() == m.len());
    for i in 0..w.len() {
        let d = g[i] + weight_decay * w[i];
        m[i] = momentum * m[i] + d;
        w[i] -= lr * m[i];
    }
}
