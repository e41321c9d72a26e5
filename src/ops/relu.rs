//! ReLU, dispatching `shaders/relu.wgsl`. Reference: `reference::relu`.

use crate::error::Result;
use crate::gpu::{Recorder, Shader, groups_for};
use crate::ops::same_len;
use crate::tensor::Tensor;

/// `y = max(x, 0)`.
pub fn forward(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> Result<()> {
    same_len("relu forward", &[x, y])?;
    let n = x.len();
    rec.dispatch(Shader::Relu, "forward", &[n as u32], &[(1, &x.buffer), (2, &y.buffer)], groups_for(n));
    Ok(())
}

/// `dx (+)= dy * [x > 0]`; `x` may be the forward's input or its output.
pub fn backward(rec: &mut Recorder, x: &Tensor, dy: &Tensor, dx: &Tensor, accumulate: bool) -> Result<()> {
    same_len("relu backward", &[x, dy, dx])?;
    let n = x.len();
    rec.dispatch(
        Shader::Relu,
        "backward",
        &[n as u32, accumulate as u32],
        &[(1, &x.buffer), (3, &dy.buffer), (4, &dx.buffer)],
        groups_for(n),
    );
    Ok(())
}
