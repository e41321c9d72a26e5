//! GPU ops: one file per shader file, each recording its kernels into a [`Recorder`].
//!
//! Conventions: every function validates shapes and returns a typed error before recording
//! anything. Backward functions take `accumulate`: `true` adds into the gradient buffer (the
//! residual stream's gradient, or a gradient shared by several uses), `false` overwrites it.
//! Tensors larger than one storage binding are run in chunks that fit (see `split.rs`).
//!
//! [`Recorder`]: crate::gpu::Recorder

pub mod batch_norm;
pub mod conv;
pub mod gate;
pub mod mix;
pub mod pool_fc_loss;
pub mod probe;
pub mod relu;
pub mod residual;
pub mod sgd;
pub(crate) mod split;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// All tensors hold the same number of elements.
pub(crate) fn same_len(what: &str, ts: &[&Tensor]) -> Result<()> {
    let n = ts[0].len();
    for t in ts {
        if t.len() != n {
            return Err(Error::Shape(format!("{what}: {:?} and {:?} differ in size", ts[0].dims(), t.dims())));
        }
    }
    Ok(())
}
