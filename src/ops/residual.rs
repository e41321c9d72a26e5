//! The residual addition and the parameter-free "option A" shortcut, dispatching
//! `shaders/residual.wgsl`. Reference: `reference::residual`.
//!
//! Where a convolution produces the branch, its `accumulate` flag fuses the add into its
//! epilogue instead; [`add`] serves branches that end in another op.

use crate::error::{Error, Result};
use crate::gpu::{Recorder, Shader};
use crate::ops::{same_len, split};
use crate::tensor::{HalfTensor, Tensor};

/// `stream += branch`, in place.
pub fn add(rec: &mut Recorder, branch: &Tensor, stream: &Tensor) -> Result<()> {
    super::owned(rec, "residual add", [branch, stream])?;
    same_len("residual add", &[branch, stream])?;
    super::distinct_out("residual add", stream, &[branch])?;
    if split::flat_op(rec, "residual add", &[branch], &[(stream, true)], |rec, i, o| add(rec, &i[0], &o[0]))? {
        return Ok(());
    }
    let n = stream.len();
    let groups = rec.gpu.groups_for(n);
    rec.dispatch(Shader::Residual, "add", &[n as u32], &[(1, &branch.buffer), (2, &stream.buffer)], groups);
    Ok(())
}

/// The shader's parameters for `len` elements written, checking that `x` -> `y` is a valid
/// option-A shortcut.
fn subsample_params(x: &Tensor, y: &Tensor, stride: usize, accumulate: bool, len: usize) -> Result<[u32; 9]> {
    subsample_dims(x.dims(), y.dims(), stride, accumulate, len)
}

/// [`subsample_params`] from the shapes.
fn subsample_dims(x: &[usize], y: &[usize], stride: usize, accumulate: bool, len: usize) -> Result<[u32; 9]> {
    let bad = || {
        Error::Shape(format!(
            "option-A shortcut, stride {stride}: {x:?} -> {y:?} must be 4-D, divide H and W by the \
             stride (rounding up) and not reduce channels"
        ))
    };
    let (&[n, c_in, h, w], &[n2, c_out, oh, ow]) = (x, y) else { return Err(bad()) };
    if !(1..=2).contains(&stride) || n != n2 || c_out < c_in || oh != h.div_ceil(stride) || ow != w.div_ceil(stride) {
        return Err(bad());
    }
    let d = [len, c_in, c_out, h, w, oh, ow, accumulate as usize, stride];
    Ok(d.map(|v| v as u32))
}

/// Option A forward: `y = x[:, :, ::s, ::s]`, channels past x's zero. Overwrites `y`.
pub fn subsample_forward(rec: &mut Recorder, x: &Tensor, y: &Tensor, stride: usize) -> Result<()> {
    super::owned(rec, "residual subsample_forward", [x, y])?;
    let params = subsample_params(x, y, stride, false, y.len())?;
    super::distinct_out("residual subsample_forward", y, &[x])?;
    let chunk = |rec: &mut Recorder, _: &_, i: &[Tensor], o: &[Tensor]| subsample_forward(rec, &i[0], &o[0], stride);
    if split::batch_op(rec, "option-A shortcut forward", &[x], &[(y, false)], &[], chunk)? {
        return Ok(());
    }
    rec.dispatch(
        Shader::Residual,
        "subsample_forward",
        &params,
        &[(3, &x.buffer), (4, &y.buffer)],
        rec.gpu.groups_for(y.len()),
    );
    Ok(())
}

/// Option A backward: `dx (+)= ` the transpose of the subsample applied to `dy`.
pub fn subsample_backward(rec: &mut Recorder, dy: &Tensor, dx: &Tensor, stride: usize, accumulate: bool) -> Result<()> {
    super::owned(rec, "residual subsample_backward", [dy, dx])?;
    let params = subsample_params(dx, dy, stride, accumulate, dx.len())?;
    super::distinct_out("residual subsample_backward", dx, &[dy])?;
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
        rec.gpu.groups_for(dx.len()),
    );
    Ok(())
}

/// `dst = src`, a plain copy (the identity shortcut's start of `x_{l+1} = x_l + F(x_l)` when
/// `x_l` must be kept for the backward). A buffer copy binds nothing: any size runs whole.
pub fn copy(rec: &mut Recorder, src: &Tensor, dst: &Tensor) -> Result<()> {
    super::owned(rec, "residual copy", [src, dst])?;
    same_len("copy", &[src, dst])?;
    super::distinct_out("residual copy", dst, &[src])?;
    rec.encoder().copy_buffer_to_buffer(&src.buffer, 0, &dst.buffer, 0, src.bytes());
    Ok(())
}

/// The f16 path's checks of a shortcut from `x` to `y`: the adapter has shader-f16, each fits
/// one binding, and they are distinct.
fn check_f16(rec: &Recorder, what: &str, x: &HalfTensor, y: &HalfTensor) -> Result<()> {
    if x.buffer == y.buffer {
        return Err(Error::Invalid(format!("{what}: input and output must be different tensors")));
    }
    for t in [x, y] {
        split::whole_fits_f16(rec.gpu, what, t.dims(), t.buffer.size())?;
    }
    Ok(())
}

/// [`subsample_forward`] on f16 tensors (the f16 path), whole (no chunks).
pub fn subsample_forward_f16(rec: &mut Recorder, x: &HalfTensor, y: &HalfTensor, stride: usize) -> Result<()> {
    const WHAT: &str = "option-A shortcut forward_f16";
    super::owned_f16(rec, "residual subsample_forward_f16", [x, y])?;
    check_f16(rec, WHAT, x, y)?;
    let params = subsample_dims(x.dims(), y.dims(), stride, false, y.len())?;
    let binds = [(3, &x.buffer), (4, &y.buffer)];
    rec.dispatch(Shader::ResidualF16, "subsample_forward", &params, &binds, rec.gpu.groups_for(y.len()));
    Ok(())
}

/// [`subsample_backward`] on f16 tensors (the f16 path), whole (no chunks).
pub fn subsample_backward_f16(
    rec: &mut Recorder,
    dy: &HalfTensor,
    dx: &HalfTensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    const WHAT: &str = "option-A shortcut backward_f16";
    super::owned_f16(rec, "residual subsample_backward_f16", [dy, dx])?;
    check_f16(rec, WHAT, dy, dx)?;
    let params = subsample_dims(dx.dims(), dy.dims(), stride, accumulate, dx.len())?;
    let binds = [(3, &dy.buffer), (4, &dx.buffer)];
    rec.dispatch(Shader::ResidualF16, "subsample_backward", &params, &binds, rec.gpu.groups_for(dx.len()));
    Ok(())
}
