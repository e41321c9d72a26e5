//! CPU reference for combining a unit's shortcut and branch (f64): `y = s_h * h + s_f * F`,
//! the paper's Table 1 ([`Combine`]). Mirrors `ops::mix`.

use crate::arch::Combine;
use crate::rng::{dropout_keep, dropout_threshold};

/// The coefficients `(s_h, s_f)` of element `i`: `g` is the gate (gated combinations), `seed`
/// the dropout mask's seed, `train` whether dropout is active.
pub fn coefficients(combine: Combine, i: usize, g: Option<&[f64]>, seed: u32, train: bool) -> (f64, f64) {
    let gate = || g.expect("reference mix: a gated combination needs the gate")[i];
    match combine {
        Combine::Add => (1.0, 1.0),
        Combine::Scale { h, f } => (h as f64, f as f64),
        Combine::ExclusiveGate { .. } => (1.0 - gate(), gate()),
        Combine::ShortcutGate { .. } => (1.0 - gate(), 1.0),
        Combine::Dropout { rate } if train => {
            let keep = dropout_keep(seed, i as u32, dropout_threshold(rate));
            (if keep { 1.0 / (1.0 - rate as f64) } else { 0.0 }, 1.0)
        }
        Combine::Dropout { .. } => (1.0, 1.0),
    }
}

/// `y = s_h * h + s_f * F`.
pub fn forward(combine: Combine, h: &[f64], f: &[f64], g: Option<&[f64]>, seed: u32, train: bool) -> Vec<f64> {
    assert_eq!(h.len(), f.len(), "reference mix: h(x) and F(x) differ in size");
    (0..h.len())
        .map(|i| {
            let (sh, sf) = coefficients(combine, i, g, seed, train);
            sh * h[i] + sf * f[i]
        })
        .collect()
}

/// The backward of [`forward`] (training mode) given `dy`: `(dE/dh, dE/dF, dE/dg)`, the last
/// all zero for combinations without a gate.
pub fn backward(
    combine: Combine,
    h: &[f64],
    f: &[f64],
    g: Option<&[f64]>,
    seed: u32,
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = dy.len();
    super::same_len("reference mix backward: h(x), F(x) and dy", n, &[h, f]);
    if let Some(g) = g {
        super::same_len("reference mix backward: the gate and dy", n, &[g]);
    }
    let (mut dh, mut df, mut dg) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    for i in 0..n {
        let (sh, sf) = coefficients(combine, i, g, seed, true);
        dh[i] = sh * dy[i];
        df[i] = sf * dy[i];
        dg[i] = match combine {
            // y = h + g (F - h)
            Combine::ExclusiveGate { .. } => dy[i] * (f[i] - h[i]),
            // y = h - g h + F
            Combine::ShortcutGate { .. } => -dy[i] * h[i],
            _ => 0.0,
        };
    }
    (dh, df, dg)
}
