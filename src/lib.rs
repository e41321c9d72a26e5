//! resnet-wgpu: the forward and backward passes of deep residual networks as WGSL compute
//! shaders through wgpu, on any Vulkan, Metal or DX12 GPU (and Mesa's software Vulkan).
//!
//! A residual unit computes `y_l = h(x_l) + F(x_l, W_l)`, `x_{l+1} = f(y_l)` (He et al. 2016,
//! *Identity Mappings in Deep Residual Networks*). With identity `h` and `f` the stream is
//! additive, `x_L = x_l + sum F`, and the gradient reaches every shallower unit directly. The
//! crate keeps that structure on the device: a unit's branch adds into the stream in place, and
//! its backward adds into the stream's gradient, with nothing read back between units.
//!
//! # Where things are
//!
//! - [`gpu`]: the context ([`Gpu`], [`GpuOptions`]), pipelines built once per device, the
//!   [`Recorder`] that records dispatches into a command buffer.
//! - [`ops`]: one module per kernel family, named as its file in `shaders/`: each op's forward
//!   and backward side by side. [`reference`](mod@reference) holds the f64 CPU oracle under the
//!   same names, and `tests/` compares the two (`conv.rs`, `batch_norm.rs`, `relu_residual.rs`,
//!   `head.rs` for pooling, FC, loss and SGD, `variants.rs` for the shortcut combinations).
//! - [`unit`](mod@unit): a residual unit's forward and backward, as the paper's equations read;
//!   [`net`]: a whole ResNet (stem, units, head, loss, SGD); [`arch`]: configurations, the
//!   paper's variants, PyTorch's tensor names.
//! - [`train`], [`analysis`], [`bench`](mod@bench): what the `resnet-wgpu` tool runs; [`io`]
//!   (safetensors), [`data`] (CIFAR and the embedded data), [`report`] (CSV, SVG).
//!
//! # Example
//!
//! ```no_run
//! use resnet_wgpu::arch::{NetConfig, UnitKind};
//! use resnet_wgpu::net::{ResNet, Sgd};
//! use resnet_wgpu::ops::pool_fc_loss::upload_labels;
//! use resnet_wgpu::{Gpu, Tensor};
//!
//! # fn main() -> resnet_wgpu::Result<()> {
//! let gpu = Gpu::new()?;
//! let config = NetConfig::cifar(20, UnitKind::PreAct, false, 10)?; // ResNet-20, pre-activation
//! let mut net = ResNet::new(&gpu, &config, 0)?;
//! let pixels = vec![0.5f32; 4 * 3 * 32 * 32];
//! let images = Tensor::new(&gpu, &[4, 3, 32, 32], &pixels)?;
//! let labels = upload_labels(&gpu, &[3, 1, 4, 1], 10)?;
//! let loss = net.train_step(&gpu, &images, &labels, Sgd::default())?;
//! let logits = net.predict(&gpu, &images)?; // 4 x 10, read back
//! println!("loss {loss}, {} logits", logits.len());
//! # Ok(())
//! # }
//! ```

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
