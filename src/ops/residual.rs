//! The residual addition and the parameter-free "option A" shortcut, dispatching
//! `shaders/residual.wgsl`. Reference: `reference::residual`.
//!
//! Where a convolution produces the branch, its `accumulate` flag fuses the add into its
//! epilogue instead; [`add`] serves branches that end in another op.

use crate::error::{Error, Result};
use crate::gpu::{Recorder, Shader, groups_for};
use crate::ops::{same_len, split};
use crate::tensor::Tensor;

/// `stream += branch`, in place.
pub fn add(rec: &mut Recorder, branch: &Tensor, stream: &Tensor) -> Result<()> {
    same_len("residual add", &[branch, stream])?;
    if split::flat_op(rec, "residual add", &[branch], &[(stream, true)], |rec, i, o| add(rec, &i[0], &o[0]))? {
        return Ok(());
    }
    let n = stream.len();
    rec.dispatch(Shader::Residual, "add", &[n as u32], &[(1, &branch.buffer), (2, &stream.buffer)], groups_for(n));
    Ok(())
}

/// The shader's parameters for `len` elements written, checking that `x` -> `y` is a valid
/// option-A shortcut.
fn subsample_params(x: &Tensor, y: &Tensor, stride: usize, accumulate: bool, len: usize) -> Result<[u32; 9]> {
    let [n, c_in, h, w] = x.nchw("shortcut input")?;
    let [n2, c_out, oh, ow] = y.nchw("shortcut output")?;
    if !(1..=2).contains(&stride) || n != n2 || c_out < c_in || oh != h.div_ceil(stride) || ow != w.div_ceil(stride) {
        return Err(Error::Shape(format!(
            "option-A shortcut, stride {stride}: {:?} -> {:?} must divide H and W by the stride \
             (rounding up) and not reduce channels",
            x.dims(),
            y.dims()
        )));
    }
    let d = [len, c_in, c_out, h, w, oh, ow, accumulate as usize, stride];
    Ok(d.map(|v| v as u32))
}

/// Option A forward: `y = x[:, :, ::s, ::s]`, channels past x's zero. Overwrites `y`.
pub fn subsample_forward(rec: &mut Recorder, x: &Tensor, y: &Tensor, stride: usize) -> Result<()> {
    let params = subsample_params(x, y, stride, false, y.len())?;
    let chunk = |rec: &mut Recorder, _: &_, i: &[Tensor], o: &[Tensor]| subsample_forward(rec, &i[0], &o[0], stride);
    if split::batch_op(rec, "option-A shortcut forward", &[x], &[(y, false)], &[], chunk)? {
        return Ok(());
    }
    rec.dispatch(
        Shader::Residual,
        "subsample_forward",
        &params,
        &[(3, &x.buffer), (4, &y.buffer)],
        groups_for(y.len()),
    );
    Ok(())
}

/// Option A backward: `dx (+)= ` the transpose of the subsample applied to `dy`.
pub fn subsample_backward(rec: &mut Recorder, dy: &Tensor, dx: &Tensor, stride: usize, accumulate: bool) -> Result<()> {
    let params = subsample_params(dx, dy, stride, accumulate, dx.len())?;
    let chunk = |rec: &mut Recorder, _: &_, i: &[Tensor], o: &[Tensor]| {
        subsample_backward(rec, &i[0], &o[0], stride, accumulate)
    };
    if split::batch_op(rec, "option-A shortcut backward", &[dy], &[(dx, accumulate)], &[], chunk)? {
        return Ok(());
    }
    rec.dispatch(
        Shader::Residual,
        "subsample_backward",
        &params,
        &[(3, &dy.buffer), (4, &dx.buffer)],
        groups_for(dx.len()),
    );
    Ok(())
}

/// `dst = src`, a plain copy (the identity shortcut's start of `x_{l+1} = x_l + F(x_l)` when
/// `x_l` must be kept for the backward). A buffer copy binds nothing: any size runs whole.
pub fn copy(rec: &mut Recorder, src: &Tensor, dst: &Tensor) -> Result<()> {
    same_len("copy", &[src, dst])?;
    rec.encoder().copy_buffer_to_buffer(&src.buffer, 0, &dst.buffer, 0, src.bytes());
    Ok(())
}
