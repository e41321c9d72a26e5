//! Probes for the analysis, dispatching `shaders/probe.wgsl`. Reference: `reference::probe`.

use crate::error::{Error, Result};
use crate::gpu::{Recorder, Shader, groups_for};
use crate::ops::same_len;
use crate::tensor::Tensor;

/// `out[slot] = sum(x^2)` (one deterministic workgroup reduction).
pub fn sum_squares(rec: &mut Recorder, x: &Tensor, out: &Tensor, slot: usize) -> Result<()> {
    if slot >= out.len() {
        return Err(Error::Invalid(format!("sum_squares: slot {slot} past the {} outputs", out.len())));
    }
    rec.dispatch(
        Shader::Probe,
        "sum_squares",
        &[x.len() as u32, slot as u32],
        &[(1, &x.buffer), (2, &out.buffer)],
        [1, 1, 1],
    );
    Ok(())
}

/// `b = a - b`, element-wise.
pub fn subtract_from(rec: &mut Recorder, a: &Tensor, b: &Tensor) -> Result<()> {
    same_len("subtract_from", &[a, b])?;
    rec.dispatch(
        Shader::Probe,
        "subtract_from",
        &[a.len() as u32],
        &[(3, &a.buffer), (4, &b.buffer)],
        groups_for(a.len()),
    );
    Ok(())
}
