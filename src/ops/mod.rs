//! GPU ops: one file per shader file, each recording its kernels into a [`Recorder`].
//!
//! Conventions: every function validates shapes and returns a typed error before recording
//! anything. A composite (`gate`'s forward and backward: a convolution and the gate's own
//! kernels) checks every shape first, but an error from a later step (an aliased output, a
//! tensor that cannot be split) can come after earlier steps were recorded: drop the recorder
//! on an error, as the unit and network code do. Most backward functions take `accumulate`:
//! `true` adds into the gradient buffer (the residual stream's gradient, or a gradient shared by
//! several uses), `false` overwrites it; `batch_norm::backward` and `pool_fc_loss::fc_backward`
//! take a flag per output, and `mix::backward` overwrites. Tensors larger than one storage
//! binding are run in chunks that fit (see `split.rs`); the f16 path binds whole tensors and
//! returns `Error::TooLarge` instead.
//!
//! [`Recorder`]: crate::gpu::Recorder

pub mod batch_norm;
pub mod cast;
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
use crate::gpu::{Gpu, Recorder};
use crate::tensor::{HalfTensor, Tensor};

/// The most channels an op with a workgroup per channel in one grid dimension takes (batch
/// norm's final reductions, the gate's bias gradient): the usual per-dimension limit.
pub(crate) const MAX_CHANNELS: usize = 65535;

/// `Err` where two of the named tensors `ts` share a buffer: wgpu refuses a buffer bound
/// read-only and read-write in one dispatch, and an op's outputs are not its inputs.
pub(crate) fn distinct(what: &str, ts: &[(&str, &Tensor)]) -> Result<()> {
    for (i, (a, ta)) in ts.iter().enumerate() {
        for (b, tb) in &ts[i + 1..] {
            if ta.buffer == tb.buffer {
                return Err(Error::Invalid(format!("{what}: {a} and {b} must be different tensors")));
            }
        }
    }
    Ok(())
}

/// `Err` where the output `out` is one of the inputs `ins`: the op is not in place, and wgpu
/// refuses a buffer bound read-only and read-write in one dispatch (or copied onto itself) only
/// when the whole submission is refused.
pub(crate) fn distinct_out(what: &str, out: &Tensor, ins: &[&Tensor]) -> Result<()> {
    if ins.iter().any(|t| t.buffer == out.buffer) {
        return Err(Error::Invalid(format!("{what}: the output must not alias an input")));
    }
    Ok(())
}

/// Texels per row of an operand texture (`TEXW` in the shaders): 4096 floats.
pub(crate) const TEXW: usize = 1024;

/// Whether a tensor of `len` elements fits an operand texture (whole texels).
pub(crate) fn texture_fits(gpu: &Gpu, len: usize) -> bool {
    len.is_multiple_of(4) && (len / 4).div_ceil(TEXW) <= gpu.adapter.limits().max_texture_dimension_2d as usize
}

/// Copies `t` into this context's rgba32f operand texture `role` of its size (texel i holds
/// elements 4i .. 4i+3) and returns a view of it. The length is a multiple of 4 (checked by
/// the plan).
pub(crate) fn operand_texture(rec: &mut Recorder, role: &'static str, t: &Tensor) -> wgpu::TextureView {
    texture_copy(rec, role, &t.buffer, t.len(), false)
}

/// [`operand_texture`] of half activations: an rgba16f texture (its loads return f32).
pub(crate) fn operand_texture_f16(rec: &mut Recorder, role: &'static str, t: &HalfTensor) -> wgpu::TextureView {
    texture_copy(rec, role, &t.buffer, t.len(), true)
}

fn texture_copy(
    rec: &mut Recorder,
    role: &'static str,
    buffer: &wgpu::Buffer,
    len: usize,
    half: bool,
) -> wgpu::TextureView {
    let (format, texel_bytes) = match half {
        false => (wgpu::TextureFormat::Rgba32Float, 16),
        true => (wgpu::TextureFormat::Rgba16Float, 8),
    };
    let texels = len / 4;
    let rows = texels.div_ceil(TEXW);
    let gpu = rec.gpu;
    let desc = wgpu::TextureDescriptor {
        label: Some("conv operand"),
        size: wgpu::Extent3d { width: TEXW as u32, height: rows as u32, depth_or_array_layers: 1 },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    };
    let tex = gpu.cached_texture(("texture", role, rows, format), &desc);
    let row_bytes = (TEXW * texel_bytes) as u32;
    let (full, rest) = (texels / TEXW, texels % TEXW);
    let copy = |enc: &mut wgpu::CommandEncoder, offset: u64, y: usize, width: usize, height: usize| {
        enc.copy_buffer_to_texture(
            wgpu::TexelCopyBufferInfo {
                buffer,
                layout: wgpu::TexelCopyBufferLayout { offset, bytes_per_row: Some(row_bytes), rows_per_image: None },
            },
            wgpu::TexelCopyTextureInfo {
                texture: &tex,
                mip_level: 0,
                origin: wgpu::Origin3d { x: 0, y: y as u32, z: 0 },
                aspect: wgpu::TextureAspect::All,
            },
            wgpu::Extent3d { width: width as u32, height: height as u32, depth_or_array_layers: 1 },
        );
    };
    if full > 0 {
        copy(rec.encoder(), 0, 0, TEXW, full);
    }
    if rest > 0 {
        copy(rec.encoder(), (full * TEXW * texel_bytes) as u64, full, rest, 1);
    }
    tex.create_view(&wgpu::TextureViewDescriptor::default())
}

/// `n` storage buffers of 4 bytes for the unused slots of the grouped kernels (`sgd::step_many`,
/// `cast::scale_many`), built once per context: a slot of length 0 is never touched, and each has
/// its own buffer since two writable bindings of one dispatch must not share one.
pub(crate) fn spare_slots(gpu: &Gpu, n: usize) -> Vec<wgpu::Buffer> {
    gpu.cached(("spare slots", n), || {
        let make = || {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("unused slot"),
                size: 4,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        (0..n).map(|_| make()).collect()
    })
}

/// `Ok` where each of `ts` was made on `rec`'s context; else [`Error::Invalid`] naming `what`
/// ([`Gpu::check_owns`]). Every op checks its operands so before it records anything: a
/// buffer means nothing to another context's device, and under another wgpu instance (a
/// context opened on other backends) its number may name one of that device's own buffers.
pub(crate) fn owned<'a>(rec: &Recorder, what: &str, ts: impl IntoIterator<Item = &'a Tensor>) -> Result<()> {
    ts.into_iter().try_for_each(|t| rec.gpu.check_owns(what, t.context()))
}

/// [`owned`] of half tensors.
pub(crate) fn owned_f16<'a>(rec: &Recorder, what: &str, ts: impl IntoIterator<Item = &'a HalfTensor>) -> Result<()> {
    ts.into_iter().try_for_each(|t| rec.gpu.check_owns(what, t.context()))
}

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
