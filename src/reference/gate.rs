//! CPU reference for the gate of the gated shortcuts (f64): `g = sigmoid(z + b)`, `z` a 1x1
//! convolution of the unit's input (see `reference::conv`). Mirrors `ops::gate`.

/// `sigmoid(z + b[c])` over `z` of dimensions `d` = [N, C, H, W].
pub fn forward(z: &[f64], d: [usize; 4], b: &[f64]) -> Vec<f64> {
    let hw = d[2] * d[3];
    assert_eq!(b.len(), d[1], "reference gate: one bias per channel");
    super::same_len("reference gate forward", d.iter().product(), &[z]);
    z.iter().enumerate().map(|(i, &v)| 1.0 / (1.0 + (-(v + b[(i / hw) % d[1]])).exp())).collect()
}

/// The backward of [`forward`] from its output `g` and `dg`: `(dE/dz, dE/db)`.
pub fn backward(g: &[f64], d: [usize; 4], dg: &[f64]) -> (Vec<f64>, Vec<f64>) {
    super::same_len("reference gate backward", d.iter().product(), &[g, dg]);
    let hw = d[2] * d[3];
    let dz: Vec<f64> = g.iter().zip(dg).map(|(&s, &e)| e * s * (1.0 - s)).collect();
    let mut db = vec![0.0; d[1]];
    for (i, v) in dz.iter().enumerate() {
        db[(i / hw) % d[1]] += v;
    }
    (dz, db)
}
