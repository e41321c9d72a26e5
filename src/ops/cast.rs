//! Conversions between f32 and f16 tensors, with a scale, dispatching `shaders/cast.wgsl`: the
//! boundaries and the loss scaling of the f16 network ([`crate::net::ResNet::set_f16`]).
//! Reference: `reference::cast`. Adapters with shader-f16 only; each tensor is bound whole.

use crate::error::{Error, Result};
use crate::gpu::{Recorder, Shader, groups_for};
use crate::ops::split;
use crate::tensor::{HalfTensor, Tensor};

/// The checks of both directions: one shape, each tensor fits one storage binding, the adapter
/// has shader-f16, and the scale is finite and not zero.
fn check(rec: &Recorder, what: &str, f32s: &Tensor, halves: &HalfTensor, s: f32) -> Result<()> {
    if f32s.dims() != halves.dims() {
        return Err(Error::Shape(format!(
            "{what}: the f32 tensor is {:?}, the half tensor {:?}",
            f32s.dims(),
            halves.dims()
        )));
    }
    check_scale(what, s)?;
    split::whole_fits(rec.gpu, what, &[f32s])?;
    split::whole_fits_f16(rec.gpu, what, halves.dims(), halves.buffer.size())
}

fn check_scale(what: &str, s: f32) -> Result<()> {
    if !s.is_finite() || s == 0.0 {
        return Err(Error::Invalid(format!("{what}: scale {s} must be finite and not zero")));
    }
    Ok(())
}

/// The uniform parameters: length and scale.
fn params(len: usize, s: f32) -> [u32; 2] {
    [len as u32, s.to_bits()]
}

/// `y = x * s`, rounded to halves.
pub fn to_half(rec: &mut Recorder, x: &Tensor, y: &HalfTensor, s: f32) -> Result<()> {
    check(rec, "cast to_half", x, y, s)?;
    let n = x.len();
    rec.dispatch(Shader::Cast, "to_half", &params(n, s), &[(1, &x.buffer), (2, &y.buffer)], groups_for(n));
    Ok(())
}

/// `y = x * s` in f32 (exact for a power-of-two `s` in range).
pub fn to_f32(rec: &mut Recorder, x: &HalfTensor, y: &Tensor, s: f32) -> Result<()> {
    check(rec, "cast to_f32", y, x, s)?;
    let n = y.len();
    rec.dispatch(Shader::Cast, "to_f32", &params(n, s), &[(3, &x.buffer), (4, &y.buffer)], groups_for(n));
    Ok(())
}

/// `t *= s` in place (f32; the adapter has shader-f16, as the module needs it).
pub fn scale(rec: &mut Recorder, t: &Tensor, s: f32) -> Result<()> {
    const WHAT: &str = "cast scale";
    check_scale(WHAT, s)?;
    split::whole_fits_f16(rec.gpu, WHAT, t.dims(), t.bytes())?;
    let n = t.len();
    rec.dispatch(Shader::Cast, "scale", &params(n, s), &[(4, &t.buffer)], groups_for(n));
    Ok(())
}
