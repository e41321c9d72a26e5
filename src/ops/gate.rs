//! The gate of the gated shortcuts, `g = sigmoid(conv1x1(x) + b)` with the unit's stride,
//! dispatching `shaders/gate.wgsl` for the bias and sigmoid and `ops::conv` for the 1x1
//! convolution. Reference: `reference::gate` (and `reference::conv`).

use crate::error::{Error, Result};
use crate::gpu::{Recorder, Shader};
use std::ops::Range;

use crate::ops::{MAX_CHANNELS, conv, same_len, split};
use crate::tensor::Tensor;

fn check_bias(what: &str, t: &Tensor, b: &Tensor) -> Result<[usize; 4]> {
    let d = t.nchw(what)?;
    if b.len() != d[1] {
        return Err(Error::Shape(format!("{what}: bias of {} values for {} channels", b.len(), d[1])));
    }
    Ok(d)
}

/// [`check_bias`], and at most [`MAX_CHANNELS`]: the bias gradient takes a workgroup a channel.
fn check_bias_grad(what: &str, dz: &Tensor, db: &Tensor) -> Result<()> {
    let [_, c, _, _] = check_bias(what, dz, db)?;
    if c > MAX_CHANNELS {
        return Err(Error::Invalid(format!("{what}: {c} channels, at most {MAX_CHANNELS} supported")));
    }
    Ok(())
}

/// `z = sigmoid(z + b[c])` in place.
pub fn bias_sigmoid(rec: &mut Recorder, b: &Tensor, z: &Tensor) -> Result<()> {
    super::owned(rec, "gate bias_sigmoid", [b, z])?;
    let [n, c, h, w] = check_bias("gate bias_sigmoid", z, b)?;
    super::distinct_out("gate bias_sigmoid", z, &[b])?;
    let chunk = |rec: &mut Recorder, _: &Range<usize>, _: &[Tensor], o: &[Tensor]| bias_sigmoid(rec, b, &o[0]);
    if split::batch_op(rec, "gate bias_sigmoid", &[], &[(z, true)], &[b], chunk)? {
        return Ok(());
    }
    let p = [z.len(), c, h * w, n].map(|v| v as u32);
    rec.dispatch(Shader::Gate, "bias_sigmoid", &p, &[(1, &b.buffer), (2, &z.buffer)], rec.gpu.groups_for(z.len()));
    Ok(())
}

/// `d = d * g * (1 - g)` in place: `dE/dg` in, `dE/dz` out.
pub fn sigmoid_backward(rec: &mut Recorder, g: &Tensor, d: &Tensor) -> Result<()> {
    super::owned(rec, "gate sigmoid_backward", [g, d])?;
    same_len("gate sigmoid_backward", &[g, d])?;
    super::distinct_out("gate sigmoid_backward", d, &[g])?;
    if split::flat_op(rec, "gate sigmoid_backward", &[g], &[(d, true)], |rec, i, o| {
        sigmoid_backward(rec, &i[0], &o[0])
    })? {
        return Ok(());
    }
    let p = [g.len() as u32];
    rec.dispatch(Shader::Gate, "sigmoid_backward", &p, &[(3, &g.buffer), (4, &d.buffer)], rec.gpu.groups_for(g.len()));
    Ok(())
}

/// `db[c] = sum over N, H, W of dz` (overwrites `db`).
pub fn bias_grad(rec: &mut Recorder, dz: &Tensor, db: &Tensor) -> Result<()> {
    super::owned(rec, "gate bias_grad", [dz, db])?;
    check_bias_grad("gate bias_grad", dz, db)?;
    super::distinct_out("gate bias_grad", db, &[dz])?;
    // Past the binding limit: by chunks of images, each adding into db in order.
    let chunk =
        |rec: &mut Recorder, r: &Range<usize>, i: &[Tensor], _: &[Tensor]| bias_grad_at(rec, &i[0], db, r.start > 0);
    if split::batch_op(rec, "gate bias_grad", &[dz], &[], &[db], chunk)? {
        return Ok(());
    }
    bias_grad_at(rec, dz, db, false)
}

fn bias_grad_at(rec: &mut Recorder, dz: &Tensor, db: &Tensor, accumulate: bool) -> Result<()> {
    let [n, c, h, w] = dz.nchw("gate bias_grad")?;
    let p = [dz.len(), c, h * w, n, accumulate as usize].map(|v| v as u32);
    rec.dispatch(Shader::Gate, "bias_grad", &p, &[(5, &dz.buffer), (6, &db.buffer)], [c as u32, 1, 1]);
    Ok(())
}

/// `g = sigmoid(conv1x1(x, w, stride) + b)`.
pub fn forward(rec: &mut Recorder, x: &Tensor, w: &Tensor, b: &Tensor, g: &Tensor, stride: usize) -> Result<()> {
    super::owned(rec, "gate forward", [x, w, b, g])?;
    conv::check_shapes("gate forward", x, w, g, stride)?;
    check_bias("gate forward", g, b)?;
    conv::forward(rec, x, w, g, stride, false)?;
    bias_sigmoid(rec, b, g)
}

/// The backward of [`forward`] from its output `g`: `dg` holds `dE/dg` on entry and `dE/dz`
/// on exit; `dw` and `db` are overwritten and `dx (+)=` the input gradient.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    dg: &Tensor,
    dw: &Tensor,
    db: &Tensor,
    dx: &Tensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    const WHAT: &str = "gate backward";
    super::owned(rec, WHAT, [x, w, g, dg, dw, db, dx])?;
    conv::check_shapes(WHAT, x, w, g, stride)?;
    conv::check_shapes(WHAT, dx, dw, dg, stride)?;
    same_len(WHAT, &[g, dg])?;
    check_bias_grad(WHAT, dg, db)?;
    // dg is the sigmoid's gradient in place; the parameter gradients are written one after the
    // other, so one tensor for both would lose db.
    super::distinct(WHAT, &[("x", x), ("w", w), ("g", g), ("dg", dg), ("dw", dw), ("db", db), ("dx", dx)])?;
    sigmoid_backward(rec, g, dg)?;
    bias_grad(rec, dg, db)?;
    conv::backward_weight(rec, x, dg, dw, stride, false)?;
    conv::backward_data(rec, dg, w, dx, stride, accumulate)
}
