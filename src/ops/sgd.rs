//! SGD with momentum and weight decay, dispatching `shaders/sgd.wgsl`. Reference:
//! `reference::sgd`.

use crate::error::{Error, Result};
use crate::gpu::{Recorder, Shader};
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
    super::owned(rec, "sgd step", [w, g, m])?;
    check(w, g, m)?;
    check_hyperparameters(lr, momentum, weight_decay)?;
    let chunk =
        |rec: &mut Recorder, i: &[Tensor], o: &[Tensor]| step(rec, &o[0], &i[0], &o[1], lr, momentum, weight_decay);
    if split::flat_op(rec, "sgd step", &[g], &[(w, true), (m, true)], chunk)? {
        return Ok(());
    }
    let n = len_u32(w)?;
    rec.dispatch(
        Shader::Sgd,
        "step",
        &[n, lr.to_bits(), momentum.to_bits(), weight_decay.to_bits()],
        &[(1, &w.buffer), (2, &g.buffer), (3, &m.buffer)],
        rec.gpu.groups_for(n as usize),
    );
    Ok(())
}

/// Tensors per dispatch of [`step_many`] (`step8` in the shader).
const GROUP: usize = 8;

/// [`step`] on each `[w, g, m]` of `params` (a network's parameters): the same update, up to 8
/// tensors to a dispatch where the adapter binds 24 storage buffers at once and each tensor fits
/// one binding (else one [`step`] each). Errors as [`step`], and where a tensor appears in two
/// of the triples.
pub fn step_many(rec: &mut Recorder, params: &[[&Tensor; 3]], lr: f32, momentum: f32, weight_decay: f32) -> Result<()> {
    super::owned(rec, "sgd step_many", params.iter().flatten().copied())?;
    check_hyperparameters(lr, momentum, weight_decay)?;
    // A set, not pairs: a deep network has thousands of parameters, every step. (A buffer
    // hashes by its id, which never changes.)
    #[allow(clippy::mutable_key_type)]
    let mut seen = std::collections::HashSet::with_capacity(3 * params.len());
    for (i, [w, g, m]) in params.iter().enumerate() {
        check(w, g, m)?;
        if ![w, g, m].iter().all(|t| seen.insert(&t.buffer)) {
            return Err(Error::Invalid(format!("sgd step_many: parameter {i} shares a tensor with an earlier one")));
        }
    }
    let gpu = rec.gpu;
    let grouped = gpu.device.limits().max_storage_buffers_per_shader_stage as usize >= 3 * GROUP;
    let fits = |[w, ..]: &&[&Tensor; 3]| grouped && w.bytes() <= gpu.max_binding_bytes && w.len() <= u32::MAX as usize;
    let (together, alone): (Vec<&[&Tensor; 3]>, Vec<_>) = params.iter().partition(fits);
    for [w, g, m] in alone {
        step(rec, w, g, m, lr, momentum, weight_decay)?;
    }
    let unused = super::spare_slots(gpu, 3 * GROUP);
    for group in together.chunks(GROUP) {
        let mut words = vec![0, lr.to_bits(), momentum.to_bits(), weight_decay.to_bits()];
        let mut binds: Vec<(u32, &wgpu::Buffer)> = Vec::with_capacity(3 * GROUP);
        for (j, spare) in unused.chunks(3).enumerate() {
            let slot = 4 + 3 * j as u32;
            let ([w, g, m], len) = match group.get(j) {
                Some([w, g, m]) => ([&w.buffer, &g.buffer, &m.buffer], len_u32(w)?),
                None => ([&spare[0], &spare[1], &spare[2]], 0),
            };
            words.push(len);
            binds.extend([(slot, w), (slot + 1, g), (slot + 2, m)]);
        }
        let most = group.iter().map(|[w, ..]| w.len()).max().unwrap_or(0);
        rec.dispatch(Shader::Sgd, "step8", &words, &binds, rec.gpu.groups_for(most));
    }
    Ok(())
}

fn check(w: &Tensor, g: &Tensor, m: &Tensor) -> Result<()> {
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
    Ok(())
}

/// The hyperparameters' check that [`step`] and [`step_many`] make: each finite and not
/// negative. Callers that take them from a user (`train::train`, the tool) make it first.
pub fn check_hyperparameters(lr: f32, momentum: f32, weight_decay: f32) -> Result<()> {
    for (name, v) in [("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)] {
        if !v.is_finite() || v < 0.0 {
            return Err(Error::Invalid(format!("sgd step: {name} = {v} must be finite and not negative")));
        }
    }
    Ok(())
}

fn len_u32(w: &Tensor) -> Result<u32> {
    u32::try_from(w.len()).map_err(|_| Error::Invalid(format!("sgd step: {} elements exceed u32 indexing", w.len())))
}
