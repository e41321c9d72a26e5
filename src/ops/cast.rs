//! Conversions between f32 and f16 tensors, with a scale, dispatching `shaders/cast.wgsl`: the
//! boundaries and the loss scaling of the f16 network ([`crate::net::ResNet::set_f16`]).
//! Reference: `reference::cast`. Adapters with shader-f16 only; each tensor is bound whole.

use crate::error::{Error, Result};
use crate::gpu::{Recorder, Shader};
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

/// The uniform parameters: length and scale (and `scale8`'s lengths, unused here).
fn params(len: usize, s: f32) -> [u32; 12] {
    let mut p = [0; 12];
    p[..2].copy_from_slice(&[len as u32, s.to_bits()]);
    p
}

/// `y = x * s`, rounded to halves.
pub fn to_half(rec: &mut Recorder, x: &Tensor, y: &HalfTensor, s: f32) -> Result<()> {
    super::owned(rec, "cast to_half", [x])?;
    super::owned_f16(rec, "cast to_half", [y])?;
    check(rec, "cast to_half", x, y, s)?;
    let n = x.len();
    rec.dispatch(Shader::Cast, "to_half", &params(n, s), &[(1, &x.buffer), (2, &y.buffer)], rec.gpu.groups_for(n));
    Ok(())
}

/// `y = x * s` in f32 (exact for a power-of-two `s` in range).
pub fn to_f32(rec: &mut Recorder, x: &HalfTensor, y: &Tensor, s: f32) -> Result<()> {
    super::owned(rec, "cast to_f32", [y])?;
    super::owned_f16(rec, "cast to_f32", [x])?;
    check(rec, "cast to_f32", y, x, s)?;
    let n = y.len();
    rec.dispatch(Shader::Cast, "to_f32", &params(n, s), &[(3, &x.buffer), (4, &y.buffer)], rec.gpu.groups_for(n));
    Ok(())
}

/// `t *= s` in place (f32; the adapter has shader-f16, as the module needs it).
pub fn scale(rec: &mut Recorder, t: &Tensor, s: f32) -> Result<()> {
    const WHAT: &str = "cast scale";
    super::owned(rec, WHAT, [t])?;
    check_scale(WHAT, s)?;
    split::whole_fits_f16(rec.gpu, WHAT, t.dims(), t.bytes())?;
    let n = t.len();
    rec.dispatch(Shader::Cast, "scale", &params(n, s), &[(4, &t.buffer)], rec.gpu.groups_for(n));
    Ok(())
}

/// Tensors per dispatch of [`scale_many`] (`scale8` in the shader: WebGPU's default limit of 8
/// storage buffers per stage).
const GROUP: usize = 8;

/// [`scale`] on each of `ts` (a network's parameter gradients), 8 tensors to a dispatch: a
/// network's unscaling in a few dispatches instead of one per tensor. Errors as [`scale`], and
/// where a tensor appears twice.
pub fn scale_many(rec: &mut Recorder, ts: &[&Tensor], s: f32) -> Result<()> {
    const WHAT: &str = "cast scale_many";
    super::owned(rec, WHAT, ts.iter().copied())?;
    check_scale(WHAT, s)?;
    // A set, not pairs: a deep network has thousands of parameters, every step. (A buffer
    // hashes by its id, which never changes.)
    #[allow(clippy::mutable_key_type)]
    let mut seen = std::collections::HashSet::with_capacity(ts.len());
    for (i, t) in ts.iter().enumerate() {
        split::whole_fits_f16(rec.gpu, WHAT, t.dims(), t.bytes())?;
        if !seen.insert(&t.buffer) {
            return Err(Error::Invalid(format!("{WHAT}: tensor {i} appeared before")));
        }
    }
    // Each fits one binding, so its length fits u32.
    let unused = super::spare_slots(rec.gpu, GROUP);
    for group in ts.chunks(GROUP) {
        let mut words = params(0, s);
        let mut binds: Vec<(u32, &wgpu::Buffer)> = Vec::with_capacity(GROUP);
        for (j, spare) in unused.iter().enumerate() {
            let (buf, len) = group.get(j).map_or((spare, 0), |t| (&t.buffer, t.len() as u32));
            words[4 + j] = len;
            binds.push((5 + j as u32, buf));
        }
        let most = group.iter().map(|t| t.len()).max().unwrap_or(0);
        rec.dispatch(Shader::Cast, "scale8", &words, &binds, rec.gpu.groups_for(most));
    }
    Ok(())
}
