//! Tensors larger than one storage binding ([`Gpu::max_binding_bytes`]): the ops run them in
//! chunks that fit.
//!
//! A tensor may be as large as the adapter's largest buffer, but a shader can bind at most
//! `max_binding_bytes` of it. Each op checks at its top whether every tensor it binds fits; if
//! so it runs as always (the fast path). If not, it cuts the batch (or, for element-wise ops,
//! the flat range) into chunks whose every tensor fits, copies each chunk of the inputs into
//! temporary tensors (`copy_buffer_to_buffer` needs only 4-byte alignment, which every f32
//! offset has), runs its own fast path on them, and copies the outputs back. Per-channel and
//! weight tensors are bound whole and must fit; reductions over the batch (BN statistics, the
//! weight gradients, the loss, the probes' sums) add the chunks' results in chunk order, so the
//! results are deterministic.
//!
//! The temporaries are per-context scratch buffers, one per (role, size), reused by every later
//! chunk and call: each chunk writes them before it reads them, within its own commands, and
//! the queue runs commands in order (as for the convolutions' scratch in [`crate::ops::conv`]).
//! Nothing is allocated per call once the sizes have been seen, and no extra memory is used
//! when everything fits.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder};
use crate::tensor::Tensor;

/// Every tensor in `whole` fits one binding; `Error::TooLarge` naming the first that does not.
pub(crate) fn whole_fits(gpu: &Gpu, what: &str, whole: &[&Tensor]) -> Result<()> {
    // The message is formatted only for a tensor that does not fit: this runs per dispatch.
    for t in whole.iter().filter(|t| t.bytes() > gpu.max_binding_bytes) {
        let what = format!("{what}: tensor {:?} (bound whole; it has no batch to split)", t.dims());
        fits(gpu, what, t.bytes(), "storage-binding limit")?;
    }
    Ok(())
}

/// `bytes` fit one binding; `Error::TooLarge` about `what` otherwise.
fn fits(gpu: &Gpu, what: String, bytes: u64, of: &'static str) -> Result<()> {
    let limit = gpu.max_binding_bytes;
    if bytes <= limit { Ok(()) } else { Err(Error::TooLarge { what, bytes, limit, of }) }
}

/// The f16 path's checks of one of its tensors (`dims`, `bytes` in its buffer): the adapter
/// has shader-f16 (`Error::Invalid` otherwise), and the tensor fits one binding, as that path
/// binds whole tensors (`Error::TooLarge` naming it otherwise).
pub(crate) fn whole_fits_f16(gpu: &Gpu, what: &str, dims: &[usize], bytes: u64) -> Result<()> {
    if !gpu.report.features.contains(wgpu::Features::SHADER_F16) {
        return Err(Error::Invalid(format!("{what}: the adapter has no shader-f16")));
    }
    fits(gpu, format!("{what}: tensor {dims:?}"), bytes, F16_WHOLE)
}

/// The f16 path's check of a scratch buffer of `bytes` it binds whole (`Error::TooLarge`
/// naming it where it does not fit).
pub(crate) fn scratch_fits_f16(gpu: &Gpu, what: &str, name: &str, bytes: u64) -> Result<()> {
    fits(gpu, format!("{what}: {name}"), bytes, F16_WHOLE)
}

/// The limit the f16 path's refusals name.
const F16_WHOLE: &str = "storage-binding limit (the f16 path binds whole tensors: no chunks)";

/// `None` when every tensor of `batched` fits one binding (the fast path); else the most images
/// per chunk such that each tensor's chunk fits. Every tensor of `batched` has `n` images (its
/// first dimension); `whole` tensors are checked to fit as they are. One image that does not
/// fit is `Error::TooLarge`, naming its tensor and sizes.
pub(crate) fn batch_chunk(
    gpu: &Gpu,
    what: &str,
    n: usize,
    batched: &[&Tensor],
    whole: &[&Tensor],
) -> Result<Option<usize>> {
    batch_chunk_with(gpu, what, n, batched, whole, &[])
}

/// [`batch_chunk`], where the op also binds scratch buffers sized by the images it runs on:
/// `scratch` names each and its bytes per image, and a chunk's scratch must fit too (a batch
/// norm's partials, two floats per plane, outgrow its tensors at 1x1 maps).
pub(crate) fn batch_chunk_with(
    gpu: &Gpu,
    what: &str,
    n: usize,
    batched: &[&Tensor],
    whole: &[&Tensor],
    scratch: &[(&str, u64)],
) -> Result<Option<usize>> {
    whole_fits(gpu, what, whole)?;
    let limit = gpu.max_binding_bytes;
    let fits = |bytes: u64| bytes <= limit;
    if batched.iter().all(|t| fits(t.bytes())) && scratch.iter().all(|(_, b)| fits(b.saturating_mul(n as u64))) {
        return Ok(None);
    }
    // The images a chunk can hold by one image of `image` bytes; the name is formatted only
    // for one that does not fit (this runs per dispatch).
    let images = |name: &dyn Fn() -> String, image: u64| -> Result<usize> {
        if fits(image) {
            return Ok((limit / image.max(1)) as usize);
        }
        Err(Error::TooLarge {
            what: format!("{what}: one image of {}", name()),
            bytes: image,
            limit,
            of: "storage-binding limit (tensors larger than it are split by image, and one image must fit)",
        })
    };
    let mut per = usize::MAX;
    for t in batched {
        if t.dims()[0] != n {
            return Err(Error::Shape(format!("{what}: {:?} does not have the batch's {n} images", t.dims())));
        }
        per = per.min(images(&|| format!("tensor {:?}", t.dims()), t.bytes() / n as u64)?);
    }
    for (name, bytes) in scratch {
        per = per.min(images(&|| name.to_string(), *bytes)?);
    }
    Ok(Some(per.max(1)))
}

/// `None` when every tensor fits one binding; else the most elements per chunk.
pub(crate) fn flat_chunk(gpu: &Gpu, what: &str, ts: &[&Tensor]) -> Result<Option<usize>> {
    let limit = gpu.max_binding_bytes;
    if ts.iter().all(|t| t.bytes() <= limit) {
        return Ok(None);
    }
    if limit < 4 {
        return Err(Error::TooLarge {
            what: format!("{what}: one element"),
            bytes: 4,
            limit,
            of: "storage-binding limit",
        });
    }
    Ok(Some((limit / 4) as usize))
}

/// Consecutive ranges of at most `per` out of `0..n`.
pub(crate) fn ranges(n: usize, per: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n).step_by(per.max(1)).map(move |s| s..(s + per).min(n))
}

/// Elements per image (per index of the first dimension) of `t`.
fn per_image(t: &Tensor) -> usize {
    t.len() / t.dims()[0]
}

/// The roles of a chunked op's temporaries (each role its own scratch tensor): at most 8
/// inputs and 8 outputs.
pub(crate) const IN: [&str; 8] = ["in0", "in1", "in2", "in3", "in4", "in5", "in6", "in7"];
pub(crate) const OUT: [&str; 8] = ["out0", "out1", "out2", "out3", "out4", "out5", "out6", "out7"];

/// This context's temporary of `dims` for `role`: a view of a cached buffer (see the module
/// doc), contents undefined.
pub(crate) fn temp(gpu: &Gpu, role: &'static str, dims: &[usize]) -> Tensor {
    let bytes = dims.iter().product::<usize>() as u64 * 4;
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let buffer = gpu.cached_buffer(("split", role, bytes), "split chunk", bytes.max(4), usage);
    Tensor::from_buffer(gpu, dims, buffer)
}

/// The dims of images `r` of `t`.
fn chunk_dims(t: &Tensor, r: &Range<usize>) -> Vec<usize> {
    let mut d = t.dims().to_vec();
    d[0] = r.len();
    d
}

/// A temporary holding images `r` of `t` (copied in when `load`).
pub(crate) fn images(rec: &mut Recorder, role: &'static str, t: &Tensor, r: &Range<usize>, load: bool) -> Tensor {
    let tmp = temp(rec.gpu, role, &chunk_dims(t, r));
    if load {
        let at = (r.start * per_image(t)) as u64 * 4;
        rec.encoder().copy_buffer_to_buffer(&t.buffer, at, &tmp.buffer, 0, tmp.bytes());
    }
    tmp
}

/// Copies the temporary `tmp` back into images `r` of `t`.
pub(crate) fn store_images(rec: &mut Recorder, tmp: &Tensor, t: &Tensor, r: &Range<usize>) {
    let at = (r.start * per_image(t)) as u64 * 4;
    rec.encoder().copy_buffer_to_buffer(&tmp.buffer, 0, &t.buffer, at, tmp.bytes());
}

/// A 1-D temporary holding elements `r` of `t` (copied in when `load`).
pub(crate) fn elements(rec: &mut Recorder, role: &'static str, t: &Tensor, r: &Range<usize>, load: bool) -> Tensor {
    let tmp = temp(rec.gpu, role, &[r.len()]);
    if load {
        rec.encoder().copy_buffer_to_buffer(&t.buffer, r.start as u64 * 4, &tmp.buffer, 0, tmp.bytes());
    }
    tmp
}

/// Copies the 1-D temporary `tmp` back into elements `r` of `t`.
pub(crate) fn store_elements(rec: &mut Recorder, tmp: &Tensor, t: &Tensor, r: &Range<usize>) {
    rec.encoder().copy_buffer_to_buffer(&tmp.buffer, 0, &t.buffer, r.start as u64 * 4, tmp.bytes());
}

/// An op over the batch, run by chunks of images when a tensor does not fit one binding.
///
/// Returns `Ok(false)` and records nothing when everything fits. Otherwise, per chunk of images
/// `r`: temporaries of `ins` (loaded) and `outs` (loaded where the flag says the op reads them:
/// accumulation), `f(rec, r, ins, outs)` (the op's fast path on the chunk), and the `outs`
/// copied back; then `Ok(true)`. `whole` tensors are bound as they are.
pub(crate) fn batch_op(
    rec: &mut Recorder,
    what: &str,
    ins: &[&Tensor],
    outs: &[(&Tensor, bool)],
    whole: &[&Tensor],
    mut f: impl FnMut(&mut Recorder, &Range<usize>, &[Tensor], &[Tensor]) -> Result<()>,
) -> Result<bool> {
    let first = ins.first().or(outs.first().map(|o| &o.0));
    let Some(n) = first.map(|t| t.dims()[0]) else { return Ok(false) };
    let batched: Vec<&Tensor> = ins.iter().copied().chain(outs.iter().map(|o| o.0)).collect();
    let Some(per) = batch_chunk(rec.gpu, what, n, &batched, whole)? else { return Ok(false) };
    for r in ranges(n, per) {
        let ti: Vec<Tensor> = ins.iter().enumerate().map(|(i, t)| images(rec, IN[i], t, &r, true)).collect();
        let to: Vec<Tensor> = outs.iter().enumerate().map(|(i, (t, load))| images(rec, OUT[i], t, &r, *load)).collect();
        f(rec, &r, &ti, &to)?;
        for ((t, _), tmp) in outs.iter().zip(&to) {
            store_images(rec, tmp, t, &r);
        }
    }
    Ok(true)
}

/// [`batch_op`] for element-wise ops: chunks of the flat range, as 1-D temporaries.
pub(crate) fn flat_op(
    rec: &mut Recorder,
    what: &str,
    ins: &[&Tensor],
    outs: &[(&Tensor, bool)],
    mut f: impl FnMut(&mut Recorder, &[Tensor], &[Tensor]) -> Result<()>,
) -> Result<bool> {
    let all: Vec<&Tensor> = ins.iter().copied().chain(outs.iter().map(|o| o.0)).collect();
    let Some(first) = all.first() else { return Ok(false) };
    let Some(per) = flat_chunk(rec.gpu, what, &all)? else { return Ok(false) };
    let n = first.len();
    if all.iter().any(|t| t.len() != n) {
        return Err(Error::Shape(format!("{what}: tensors differ in size")));
    }
    for r in ranges(n, per) {
        let ti: Vec<Tensor> = ins.iter().enumerate().map(|(i, t)| elements(rec, IN[i], t, &r, true)).collect();
        let to: Vec<Tensor> =
            outs.iter().enumerate().map(|(i, (t, load))| elements(rec, OUT[i], t, &r, *load)).collect();
        f(rec, &ti, &to)?;
        for ((t, _), tmp) in outs.iter().zip(&to) {
            store_elements(rec, tmp, t, &r);
        }
    }
    Ok(true)
}
