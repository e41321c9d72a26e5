//! The residual addition, dispatching `shaders/residual.wgsl`. Reference: `reference::residual`.
//!
//! Where a convolution produces the branch, its `accumulate` flag fuses this add into its
//! epilogue instead; this kernel serves the branches that end in another op.

use crate::error::Result;
use crate::gpu::{Recorder, Shader, groups_for};
use crate::ops::same_len;
use crate::tensor::Tensor;

/// `stream += branch`, in place.
pub fn add(rec: &mut Recorder, branch: &Tensor, stream: &Tensor) -> Result<()> {
    same_len("residual add", &[branch, stream])?;
    let n = stream.len();
    rec.dispatch(Shader::Residual, "add", &[n as u32], &[(1, &branch.buffer), (2, &stream.buffer)], groups_for(n));
    Ok(())
}
