//! Combining a unit's shortcut and branch, `y = s_h * h + s_f * F` (the paper's Table 1, see
//! [`Combine`]), dispatching `shaders/mix.wgsl`. Reference: `reference::mix`.

use crate::arch::Combine;
use crate::error::{Error, Result};
use crate::gpu::{Recorder, Shader, groups_for};
use crate::ops::same_len;
use crate::rng::dropout_threshold;
use crate::tensor::Tensor;

/// The shader's parameters: mode, constants, the dropout seed and threshold. Dropout is active
/// only in training; in inference it is the plain sum.
fn params(combine: Combine, train: bool, seed: u32, len: usize, relu: bool) -> [u32; 7] {
    let (mode, lh, lf, threshold) = match combine {
        Combine::Add => (0, 1.0, 1.0, 0),
        Combine::Scale { h, f } => (0, h, f, 0),
        Combine::ExclusiveGate { .. } => (1, 1.0, 1.0, 0),
        Combine::ShortcutGate { .. } => (2, 1.0, 1.0, 0),
        Combine::Dropout { rate } if train => (3, 1.0 / (1.0 - rate), 1.0, dropout_threshold(rate)),
        Combine::Dropout { .. } => (0, 1.0, 1.0, 0),
    };
    [len as u32, mode, f32::to_bits(lh), f32::to_bits(lf), seed, threshold, relu as u32]
}

/// The gate tensor a gated combination reads (and the buffer to bind in its place otherwise:
/// the shader declares it for every mode).
fn gate_of<'a>(combine: Combine, g: Option<&'a Tensor>, h: &'a Tensor) -> Result<&'a Tensor> {
    match (combine.gated(), g) {
        (true, Some(g)) => Ok(g),
        (true, None) => Err(Error::Invalid(format!("{combine:?} needs its gate tensor"))),
        (false, _) => Ok(h),
    }
}

/// An output bound with another operand would be two bindings of one buffer, one writable.
fn not_aliased(what: &str, outs: &[&Tensor], ins: &[&Tensor]) -> Result<()> {
    let all: Vec<&Tensor> = outs.iter().chain(ins).copied().collect();
    for (i, o) in outs.iter().enumerate() {
        if all.iter().enumerate().any(|(j, t)| j != i && t.buffer == o.buffer) {
            return Err(Error::Invalid(format!("{what}: an output buffer is also another operand")));
        }
    }
    Ok(())
}

/// `y = s_h * h + s_f * F`, then `max(., 0)` if `relu`. `train` turns dropout on (mask `seed`);
/// `g` is the gate of gated combinations.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    rec: &mut Recorder,
    combine: Combine,
    train: bool,
    seed: u32,
    h: &Tensor,
    f: &Tensor,
    g: Option<&Tensor>,
    y: &Tensor,
    relu: bool,
) -> Result<()> {
    combine.validate()?;
    let g = gate_of(combine, g, h)?;
    same_len("mix forward", &[h, f, g, y])?;
    not_aliased("mix forward", &[y], &[h, f, g])?;
    let n = y.len();
    let bind = [(1, &h.buffer), (2, &f.buffer), (3, &g.buffer), (4, &y.buffer)];
    rec.dispatch(Shader::Mix, "forward", &params(combine, train, seed, n, relu), &bind, groups_for(n));
    Ok(())
}

/// The backward of a training [`forward`] (before its ReLU) given `dy`: overwrites
/// `dh = s_h * dy` and `df = s_f * dy`, and for gated combinations `dg = dE/dg`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    rec: &mut Recorder,
    combine: Combine,
    seed: u32,
    h: &Tensor,
    f: &Tensor,
    g: Option<&Tensor>,
    dy: &Tensor,
    dh: &Tensor,
    df: &Tensor,
    dg: Option<&Tensor>,
) -> Result<()> {
    combine.validate()?;
    let gate = gate_of(combine, g, h)?;
    same_len("mix backward", &[h, f, gate, dy, dh, df])?;
    let n = dy.len();
    let p = params(combine, true, seed, n, false);
    let mut bind = vec![(3, &gate.buffer), (5, &dy.buffer), (6, &dh.buffer), (7, &df.buffer)];
    if combine.gated() {
        let dg = dg.ok_or_else(|| Error::Invalid(format!("{combine:?}: the backward needs dg")))?;
        same_len("mix backward", &[dy, dg])?;
        not_aliased("mix backward", &[dh, df, dg], &[h, f, gate, dy])?;
        bind.extend([(1, &h.buffer), (2, &f.buffer), (8, &dg.buffer)]);
        rec.dispatch(Shader::Mix, "backward_gate", &p, &bind, groups_for(n));
    } else {
        // Only the coefficients are read: `h` stands in for the gate the shader declares.
        not_aliased("mix backward", &[dh, df], &[gate, dy])?;
        rec.dispatch(Shader::Mix, "backward", &p, &bind, groups_for(n));
    }
    Ok(())
}
