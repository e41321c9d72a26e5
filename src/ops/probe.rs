//! Probes for the analysis, dispatching `shaders/probe.wgsl`. Reference: `reference::probe`.

use crate::error::{Error, Result};
use crate::gpu::{Recorder, Shader};
use crate::ops::{residual, same_len, split};
use crate::tensor::Tensor;

/// `out[slot] = sum(x^2)` (one deterministic workgroup reduction).
pub fn sum_squares(rec: &mut Recorder, x: &Tensor, out: &Tensor, slot: usize) -> Result<()> {
    super::owned(rec, "probe sum_squares", [x, out])?;
    if slot >= out.len() {
        return Err(Error::Invalid(format!("sum_squares: slot {slot} past the {} outputs", out.len())));
    }
    // The reduction reads x while it writes out: one buffer for both would race.
    if x.buffer == out.buffer {
        return Err(Error::Invalid("sum_squares: out must be a tensor of its own, not x".into()));
    }
    split::whole_fits(rec.gpu, "sum_squares", &[out])?;
    if let Some(per) = split::flat_chunk(rec.gpu, "sum_squares", &[x])? {
        // The first chunk's sum goes to out[slot]; each later one is added to it, in order.
        for (i, r) in split::ranges(x.len(), per).enumerate() {
            let xt = split::elements(rec, "in0", x, &r, true);
            if i == 0 {
                sum_squares(rec, &xt, out, slot)?;
                continue;
            }
            let (part, total) = (split::temp(rec.gpu, "part", &[1]), split::temp(rec.gpu, "total", &[1]));
            sum_squares(rec, &xt, &part, 0)?;
            let at = slot as u64 * 4;
            rec.encoder().copy_buffer_to_buffer(&out.buffer, at, &total.buffer, 0, 4);
            residual::add(rec, &part, &total)?;
            rec.encoder().copy_buffer_to_buffer(&total.buffer, 0, &out.buffer, at, 4);
        }
        return Ok(());
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
    super::owned(rec, "probe subtract_from", [a, b])?;
    same_len("subtract_from", &[a, b])?;
    super::distinct_out("probe subtract_from", b, &[a])?;
    if split::flat_op(rec, "subtract_from", &[a], &[(b, true)], |rec, i, o| subtract_from(rec, &i[0], &o[0]))? {
        return Ok(());
    }
    rec.dispatch(
        Shader::Probe,
        "subtract_from",
        &[a.len() as u32],
        &[(3, &a.buffer), (4, &b.buffer)],
        rec.gpu.groups_for(a.len()),
    );
    Ok(())
}
