//! SGD with momentum and weight decay, dispatching `shaders/sgd.wgsl`. Reference:
//! `reference::sgd`.

use crate::error::{Error, Result};
use crate::gpu::{Recorder, Shader, groups_for};
use crate::ops::split;
use crate::tensor::Tensor;

/// One step of PyTorch's `SGD(lr, momentum, weight_decay)` (dampening 0, no Nesterov), in place
/// on the weights `w` and the momentum buffer `m` (zeros before the first step):
/// `d = g + weight_decay * w; m = momentum * m + d; w -= lr * m`.
/// `w`, `g` and `m` have one shape and are three distinct tensors; the hyperparameters are
/// finite and not negative.
pub fn step(
    rec: &mut Recorder,
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
) -> Result<()> {
    if g.dims() != w.dims() || m.dims() != w.dims() {
        return Err(Error::Shape(format!(
            "sgd step: w {:?}, g {:?} and m {:?} must have one shape",
            w.dims(),
            g.dims(),
            m.dims()
        )));
    }
    if w.buffer == g.buffer || w.buffer == m.buffer || g.buffer == m.buffer {
        return Err(Error::Invalid("sgd step: w, g and m must be distinct tensors".into()));
    }
    for (name, v) in [("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)] {
        if !v.is_finite() || v < 0.0 {
            return Err(Error::Invalid(format!("sgd step: {name} = {v} must be finite and not negative")));
        }
    }
    let chunk =
        |rec: &mut Recorder, i: &[Tensor], o: &[Tensor]| step(rec, &o[0], &i[0], &o[1], lr, momentum, weight_decay);
    if split::flat_op(rec, "sgd step", &[g], &[(w, true), (m, true)], chunk)? {
        return Ok(());
    }
    let n = u32::try_from(w.len())
        .map_err(|_| Error::Invalid(format!("sgd step: {} elements exceed u32 indexing", w.len())))?;
    rec.dispatch(
        Shader::Sgd,
        "step",
        &[n, lr.to_bits(), momentum.to_bits(), weight_decay.to_bits()],
        &[(1, &w.buffer), (2, &g.buffer), (3, &m.buffer)],
        groups_for(n as usize),
    );
    Ok(())
}
