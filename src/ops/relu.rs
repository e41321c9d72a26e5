//! ReLU, dispatching `shaders/relu.wgsl`. Reference: `reference::relu`.

use crate::error::{Error, Result};
use crate::gpu::{Recorder, Shader};
use crate::ops::{same_len, split};
use crate::tensor::{HalfTensor, Tensor};

/// `y = max(x, 0)`.
pub fn forward(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> Result<()> {
    super::owned(rec, "relu forward", [x, y])?;
    same_len("relu forward", &[x, y])?;
    super::distinct_out("relu forward", y, &[x])?;
    if split::flat_op(rec, "relu forward", &[x], &[(y, false)], |rec, i, o| forward(rec, &i[0], &o[0]))? {
        return Ok(());
    }
    let n = x.len();
    rec.dispatch(Shader::Relu, "forward", &[n as u32], &[(1, &x.buffer), (2, &y.buffer)], rec.gpu.groups_for(n));
    Ok(())
}

/// `dx (+)= dy * [x > 0]`; `x` may be the forward's input or its output.
pub fn backward(rec: &mut Recorder, x: &Tensor, dy: &Tensor, dx: &Tensor, accumulate: bool) -> Result<()> {
    super::owned(rec, "relu backward", [x, dy, dx])?;
    same_len("relu backward", &[x, dy, dx])?;
    super::distinct_out("relu backward", dx, &[x, dy])?;
    let chunk = |rec: &mut Recorder, i: &[Tensor], o: &[Tensor]| backward(rec, &i[0], &i[1], &o[0], accumulate);
    if split::flat_op(rec, "relu backward", &[x, dy], &[(dx, accumulate)], chunk)? {
        return Ok(());
    }
    let n = x.len();
    rec.dispatch(
        Shader::Relu,
        "backward",
        &[n as u32, accumulate as u32],
        &[(1, &x.buffer), (3, &dy.buffer), (4, &dx.buffer)],
        rec.gpu.groups_for(n),
    );
    Ok(())
}

/// `g *= [y > 0]` in place, where `y` is a kept ReLU output and `g` the gradient at it.
pub fn mask_in_place(rec: &mut Recorder, y: &Tensor, g: &Tensor) -> Result<()> {
    super::owned(rec, "relu mask_in_place", [y, g])?;
    same_len("relu mask", &[y, g])?;
    super::distinct_out("relu mask_in_place", g, &[y])?;
    if split::flat_op(rec, "relu mask", &[y], &[(g, true)], |rec, i, o| mask_in_place(rec, &i[0], &o[0]))? {
        return Ok(());
    }
    let n = y.len();
    // 4 elements per invocation (relu.wgsl).
    let groups = rec.gpu.groups_for(n.div_ceil(4));
    rec.dispatch(Shader::Relu, "mask_in_place", &[n as u32], &[(5, &y.buffer), (6, &g.buffer)], groups);
    Ok(())
}

/// [`mask_in_place`] on f16 tensors (the f16 path; adapters with shader-f16), whole (no chunks).
pub fn mask_in_place_f16(rec: &mut Recorder, y: &HalfTensor, g: &HalfTensor) -> Result<()> {
    const WHAT: &str = "relu mask_in_place_f16";
    super::owned_f16(rec, WHAT, [y, g])?;
    if y.dims() != g.dims() {
        return Err(Error::Shape(format!("{WHAT}: y {:?} and g {:?} must have one shape", y.dims(), g.dims())));
    }
    if y.buffer == g.buffer {
        return Err(Error::Invalid(format!("{WHAT}: the output must not alias an input")));
    }
    split::whole_fits_f16(rec.gpu, WHAT, y.dims(), y.buffer.size())?;
    let n = y.len();
    // 4 elements per invocation (relu.wgsl).
    let groups = rec.gpu.groups_for(n.div_ceil(4));
    rec.dispatch(Shader::ReluF16, "mask_in_place", &[n as u32], &[(5, &y.buffer), (6, &g.buffer)], groups);
    Ok(())
}
