//! resnet-wgpu: the forward and backward passes of deep residual networks as WGSL compute
//! shaders through wgpu.

pub mod analysis;
pub mod arch;
pub mod bench;
pub mod data;
pub mod error;
pub mod gpu;
pub mod io;
pub mod net;
pub mod ops;
pub mod profile;
pub mod reference;
pub mod report;
pub mod rng;
pub mod tensor;
pub mod train;
mod tune_file;
pub mod unit;

pub use error::{Error, Result};
pub use gpu::{Gpu, GpuOptions, Recorder, Shader};
pub use tensor::Tensor;
