//! Combining a unit's shortcut and branch, `y = s_h * h + s_f * F` (the paper's Table 1, see
//! [`Combine`]), dispatching `shaders/mix.wgsl`. Reference: `reference::mix`.

use crate::arch::Combine;
use crate::error::{Error, Result};
use crate::gpu::{Recorder, Shader};
use crate::ops::{same_len, split};
use crate::rng::dropout_threshold;
use crate::tensor::Tensor;

/// The shader's parameters: mode, constants, the dropout seed and threshold. Dropout is active
/// only in training; in inference it is the plain sum.
fn params(combine: Combine, train: bool, seed: u32, len: usize, relu: bool, base: usize) -> [u32; 8] {
    let (mode, lh, lf, threshold) = match combine {
        Combine::Add => (0, 1.0, 1.0, 0),
        Combine::Scale { h, f } => (0, h, f, 0),
        Combine::ExclusiveGate { .. } => (1, 1.0, 1.0, 0),
        Combine::ShortcutGate { .. } => (2, 1.0, 1.0, 0),
        Combine::Dropout { rate } if train => (3, 1.0 / (1.0 - rate), 1.0, dropout_threshold(rate)),
        Combine::Dropout { .. } => (0, 1.0, 1.0, 0),
    };
    [len as u32, mode, f32::to_bits(lh), f32::to_bits(lf), seed, threshold, relu as u32, base as u32]
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
    super::owned(rec, "mix forward", [h, f, y].into_iter().chain(g))?;
    combine.validate()?;
    let g = gate_of(combine, g, h)?;
    same_len("mix forward", &[h, f, g, y])?;
    not_aliased("mix forward", &[y], &[h, f, g])?;
    // Past the binding limit: by chunks of the flat range; `base` keeps the dropout mask's
    // element indices those of the whole tensor.
    if let Some(per) = split::flat_chunk(rec.gpu, "mix forward", &[h, f, g, y])? {
        for r in split::ranges(y.len(), per) {
            let [th, tf, tg] =
                [(h, "in0"), (f, "in1"), (g, "in2")].map(|(t, role)| split::elements(rec, role, t, &r, true));
            let ty = split::elements(rec, "out0", y, &r, false);
            forward_at(rec, combine, train, seed, [&th, &tf, &tg, &ty], relu, r.start);
            split::store_elements(rec, &ty, y, &r);
        }
        return Ok(());
    }
    forward_at(rec, combine, train, seed, [h, f, g, y], relu, 0);
    Ok(())
}

fn forward_at(rec: &mut Recorder, c: Combine, train: bool, seed: u32, t: [&Tensor; 4], relu: bool, base: usize) {
    let n = t[3].len();
    let bind = [(1, &t[0].buffer), (2, &t[1].buffer), (3, &t[2].buffer), (4, &t[3].buffer)];
    rec.dispatch(Shader::Mix, "forward", &params(c, train, seed, n, relu, base), &bind, rec.gpu.groups_for(n));
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
    super::owned(rec, "mix backward", [h, f, dy, dh, df].into_iter().chain(g).chain(dg))?;
    combine.validate()?;
    let gate = gate_of(combine, g, h)?;
    same_len("mix backward", &[h, f, gate, dy, dh, df])?;
    let dg = match combine.gated() {
        true => Some(dg.ok_or_else(|| Error::Invalid(format!("{combine:?}: the backward needs dg")))?),
        false => None,
    };
    match dg {
        Some(dg) => {
            same_len("mix backward", &[dy, dg])?;
            not_aliased("mix backward", &[dh, df, dg], &[h, f, gate, dy])?;
        }
        None => not_aliased("mix backward", &[dh, df], &[gate, dy])?,
    }
    let outs: Vec<&Tensor> = [dh, df].into_iter().chain(dg).collect();
    let all: Vec<&Tensor> = [h, f, gate, dy].into_iter().chain(outs.iter().copied()).collect();
    if let Some(per) = split::flat_chunk(rec.gpu, "mix backward", &all)? {
        for r in split::ranges(dy.len(), per) {
            let ins = [(h, "in0"), (f, "in1"), (gate, "in2"), (dy, "in3")];
            let [th, tf, tg, tdy] = ins.map(|(t, role)| split::elements(rec, role, t, &r, true));
            let to: Vec<Tensor> =
                outs.iter().enumerate().map(|(i, t)| split::elements(rec, split::OUT[i], t, &r, false)).collect();
            backward_at(rec, combine, seed, [&th, &tf, &tg, &tdy], &to.iter().collect::<Vec<_>>(), r.start);
            for (t, tmp) in outs.iter().zip(&to) {
                split::store_elements(rec, tmp, t, &r);
            }
        }
        return Ok(());
    }
    backward_at(rec, combine, seed, [h, f, gate, dy], &outs, 0);
    Ok(())
}

/// The backward's dispatch: `ins` are `h, f, gate, dy`; `outs` are `dh, df` and, gated, `dg`.
fn backward_at(rec: &mut Recorder, combine: Combine, seed: u32, ins: [&Tensor; 4], outs: &[&Tensor], base: usize) {
    let n = ins[3].len();
    let p = params(combine, true, seed, n, false, base);
    let mut bind = vec![(3, &ins[2].buffer), (5, &ins[3].buffer), (6, &outs[0].buffer), (7, &outs[1].buffer)];
    if let Some(dg) = outs.get(2) {
        bind.extend([(1, &ins[0].buffer), (2, &ins[1].buffer), (8, &dg.buffer)]);
        rec.dispatch(Shader::Mix, "backward_gate", &p, &bind, rec.gpu.groups_for(n));
    } else {
        // Only the coefficients are read: `h` stands in for the gate the shader declares.
        rec.dispatch(Shader::Mix, "backward", &p, &bind, rec.gpu.groups_for(n));
    }
}
