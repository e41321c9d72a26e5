//! Batch normalisation (PyTorch semantics), dispatching `shaders/batch_norm.wgsl`. Reference:
//! `reference::batch_norm`.
//!
//! Per channel `c` over the `M = N*H*W` elements of that channel:
//! `y = gamma * (x - mean) / sqrt(var + EPS) + beta`, with an optional [`Epilogue`]. Training
//! mode normalises by the batch statistics (biased variance), saves `mean` and
//! `invstd = 1/sqrt(var + EPS)` for the backward, and moves the running statistics by
//! [`MOMENTUM`] towards the batch mean and the unbiased variance `var * M/(M-1)`. Inference mode
//! normalises by the running statistics.
//!
//! Every kernel gives each invocation a run of consecutive elements of one `(n, c)` plane (so
//! per-channel values are loaded once per run: on CPU adapters each storage access is costly).
//! Kernels: `stats_partial` (per run of `REDUCE_CHUNK` elements: sum and squared deviations
//! into a per-context partials buffer) then `stats_final` (a workgroup per channel, combining its
//! runs in a fixed order: mean, invstd, running statistics, and the convolutions' prologue
//! values where [`BnTensors::affine`] is given); `normalize` / `normalize_eval` (runs of
//! `APPLY_CHUNK` elements); `backward_partial` (per run: `sum dz`, `sum dz*xhat`) then
//! `backward_final` (a workgroup per channel: into `scratch`, `dbeta`, `dgamma`) and
//! `backward_apply` (runs of `dx`). No atomics: results are deterministic. The run kernels come
//! in variants ([`Kernels`]): scalar, vec4, texture loads (CPU adapters) and wide (a workgroup
//! per run of 1024, for coalesced loads on GPUs). A batch past the storage-binding limit runs by
//! chunks of images (`split.rs`): `stats_merge` / `backward_merge` fold each chunk's partials
//! into the batch's statistics and sums in chunk order, then the element-wise kernels run chunk
//! by chunk.
//!
//! Every tensor passed to one call must be a distinct tensor (a buffer cannot be bound twice
//! when one binding is written); at most 65535 channels.

use crate::error::{Error, Result};
use std::sync::{Arc, Mutex};

use super::{MAX_CHANNELS, distinct, operand_texture, operand_texture_f16, texture_fits};
use crate::gpu::{Gpu, Recorder, Shader, WG};
use crate::ops::conv::affine_binding;
use crate::ops::split;
use crate::tensor::{HalfTensor, Tensor};

/// Added to the variance before the square root.
pub const EPS: f32 = 1e-5;
/// Weight of the batch statistics in the running statistics' update.
pub const MOMENTUM: f32 = 0.1;

/// Elements per invocation of the reductions' first pass: short runs keep the sequential part
/// of each sum short (16 matched the old tree's accuracy in tests/network.rs; 256 did not).
const REDUCE_CHUNK: usize = 16;
/// Elements per invocation of the element-wise kernels.
const APPLY_CHUNK: usize = 16;

/// What the forward does after normalising: an optional add into y (y = y_old + bn(x)) then an
/// optional ReLU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Epilogue {
    /// Add into `y` (`y = y_old + bn(x)`) instead of overwriting it.
    pub add: bool,
    /// Apply `max(., 0)` last (after the add, when both are set).
    pub relu: bool,
}

/// Per-channel parameters and buffers of one BN layer, all 1-D `[C]` tensors but `affine`.
pub struct BnTensors<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    /// Where given, `[C, 4]`: a training forward's statistics also write into it the values of
    /// the convolutions' BN + ReLU prologue, as [`affine`] computes them from the saved
    /// statistics (the same bits), in the same dispatch.
    pub affine: Option<&'a Tensor>,
}

impl BnTensors<'_> {
    /// Every tensor it holds.
    pub(crate) fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        [self.gamma, self.beta, self.running_mean, self.running_var].into_iter().chain(self.affine)
    }
}

/// The `[n, c, h, w]` of `x`, checking that every other activation has the same shape.
fn activations(what: &str, x: &Tensor, others: &[(&str, &Tensor)]) -> Result<[usize; 4]> {
    let d = x.nchw(format_args!("{what}: x"))?;
    for (name, t) in others {
        let e = t.nchw(format_args!("{what}: {name}"))?;
        if e != d {
            return Err(Error::Shape(format!("{what}: {name} is {e:?}, x is {d:?}")));
        }
    }
    if d[1] > MAX_CHANNELS {
        return Err(Error::Invalid(format!("{what}: {} channels, at most {MAX_CHANNELS} supported", d[1])));
    }
    Ok(d)
}

/// Each tensor is 1-D with `len` elements.
fn per_channel(what: &str, len: usize, ts: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in ts {
        if t.dims() != [len] {
            return Err(Error::Shape(format!("{what}: {name} must be [{len}], got {:?}", t.dims())));
        }
    }
    Ok(())
}

/// Runs of at most `chunk` elements per plane of `hw` elements.
fn parts(d: [usize; 4], chunk: usize) -> usize {
    (d[2] * d[3]).div_ceil(chunk)
}

/// How a kernel's runs cut the activations: `chunk` elements of a plane per run, over the same
/// span of `planes` consecutive images' planes of its channel (the wide kernels, where a plane
/// is shorter than their runs; 1 elsewhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Runs {
    chunk: usize,
    planes: usize,
}

impl Runs {
    fn per_plane(chunk: usize) -> Runs {
        Runs { chunk, planes: 1 }
    }

    /// The wide kernels' runs: [`WIDE_CHUNK`] elements of a plane, or where a plane is shorter,
    /// as many whole planes of a channel as fit in that many (a workgroup per plane of a 7x7
    /// image left 95% of its threads idle).
    fn wide(d: [usize; 4]) -> Runs {
        let hw = d[2] * d[3];
        if hw >= WIDE_CHUNK {
            Runs::per_plane(WIDE_CHUNK)
        } else {
            Runs { chunk: hw, planes: (WIDE_CHUNK / hw).min(d[0]) }
        }
    }

    /// Runs over all of `d`.
    fn count(&self, d: [usize; 4]) -> usize {
        d[1] * d[0].div_ceil(self.planes) * parts(d, self.chunk)
    }
}

/// Params for a kernel over `runs`.
fn params(d: [usize; 4], runs: Runs, relu: bool, add: bool, accumulate: bool, unbias: f32) -> [u32; 16] {
    let mut v = [0; 16];
    v[..11].copy_from_slice(&[
        d[0] as u32,
        d[1] as u32,
        (d[2] * d[3]) as u32,
        relu as u32,
        add as u32,
        accumulate as u32,
        EPS.to_bits(),
        MOMENTUM.to_bits(),
        unbias.to_bits(),
        runs.chunk as u32,
        parts(d, runs.chunk) as u32,
    ]);
    v[15] = runs.planes as u32;
    v
}

/// `prm` with the words of a batch run in chunks (`split.rs`): `prev` images before this chunk,
/// whether it is the `last`, and the elements per channel of the whole batch (`total`).
fn chunked(prm: [u32; 16], prev: usize, last: bool, total: u32) -> [u32; 16] {
    let mut v = prm;
    v[11..14].copy_from_slice(&[prev as u32, last as u32, total]);
    v
}

/// `prm` (of [`params`] or [`chunked`]) for the statistics' final kernels: `Params.affine` set
/// where they also write `p.affine`.
fn stats_words(prm: &[u32; 16], p: &BnTensors) -> [u32; 16] {
    let mut v = *prm;
    v[14] = p.affine.is_some() as u32;
    v
}

/// Elements per channel, `N*H*W`, as the shader's u32.
fn per_channel_count(what: &str, d: [usize; 4]) -> Result<u32> {
    u32::try_from(d[0] * d[2] * d[3])
        .map_err(|_| Error::Invalid(format!("{what}: {d:?} has more than 2^32 elements per channel")))
}

/// Which variant of the run kernels a shape takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Scalar loads and stores, a run of 16 elements per invocation: any plane size.
    Scalar,
    /// vec4 loads and stores (planes of a multiple of 4 elements, so every run is whole vec4s).
    Vec4,
    /// As `Vec4`, but x and dy read from rgba32f texture copies (rgba16f on the f16 path): CPU
    /// adapters, where a texture fetch is one vector gather and a storage load a loop over the
    /// SIMD lanes (2x to 4x faster on lavapipe).
    Texture,
    /// A workgroup per run of [`WIDE_CHUNK`] elements, its threads reading consecutive
    /// elements (coalesced loads on GPUs): any plane size.
    Wide,
}

/// The wide variant's threads per workgroup and elements per thread (`FG` and `WIDE` in the
/// shader; a test in gpu.rs checks that they agree, and the host unrolls the shader's loops
/// over `WIDE`).
pub(crate) const WIDE_THREADS: usize = 64;
pub(crate) const WIDE: usize = 16;

/// Elements per run of the wide variant.
const WIDE_CHUNK: usize = WIDE_THREADS * WIDE;

impl Variant {
    /// The runs of the reductions' first pass over `d`.
    fn reduce_runs(self, d: [usize; 4]) -> Runs {
        if self == Variant::Wide { Runs::wide(d) } else { Runs::per_plane(REDUCE_CHUNK) }
    }

    /// The runs of the element-wise kernels over `d`.
    fn apply_runs(self, d: [usize; 4]) -> Runs {
        if self == Variant::Wide { Runs::wide(d) } else { Runs::per_plane(APPLY_CHUNK) }
    }
}

/// Which batch-norm kernels a context runs (shapes a forced variant cannot take run the scalar
/// kernels; a forced texture variant whose texture would be too large runs vec4). `Auto`:
/// texture loads on CPU adapters (vec4 where the texture would be too large), the wide kernels
/// on GPUs; `RESNET_WGPU_BN=scalar|vec4|texture|wide` changes that default (a benchmarking
/// aid). Every variant matches the reference; they differ in speed and in the order of their
/// sums.
///
/// On an H200 (BENCHMARKS.md, commits cef0a1d and e3382e3) the wide kernels' training forward
/// moved 2.1 and 1.7 TB/s at 32x64x56x56 and 32x128x28x28 where the scalar ones moved 0.75 and
/// 0.7 (runs of 16 elements per thread, loads not coalesced), and was 9x faster at
/// 128x16x32x32; with a run per plane they fell to 0.73 and 0.27 TB/s at 14x14 and 7x7 (scalar:
/// 0.54 and 0.36), where since e3c2917 a run takes several planes (not measured on a GPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    Auto,
    Scalar,
    Vec4,
    Texture,
    Wide,
}

fn kernels_cell(gpu: &Gpu) -> Arc<Mutex<Kernels>> {
    gpu.cached("batch_norm.kernels", || Arc::new(Mutex::new(Kernels::Auto)))
}

/// Chooses the batch-norm kernels of this context (a testing and benchmarking aid).
pub fn set_kernels(gpu: &Gpu, k: Kernels) {
    *kernels_cell(gpu).lock().unwrap_or_else(|p| p.into_inner()) = k;
}

/// The kernels this context runs: those [`set_kernels`] chose, or the default for its adapter
/// (never `Auto`).
pub fn kernels(gpu: &Gpu) -> Kernels {
    // RESNET_WGPU_BN, read once per process (this runs for every batch-norm call).
    static FROM_ENV: std::sync::OnceLock<Option<Kernels>> = std::sync::OnceLock::new();
    let from_env = FROM_ENV.get_or_init(|| {
        crate::gpu::env_choice("RESNET_WGPU_BN", "scalar, vec4, texture or wide", |v| match v {
            "scalar" => Some(Kernels::Scalar),
            "vec4" => Some(Kernels::Vec4),
            "texture" => Some(Kernels::Texture),
            "wide" => Some(Kernels::Wide),
            _ => None,
        })
    });
    match *kernels_cell(gpu).lock().unwrap_or_else(|p| p.into_inner()) {
        Kernels::Auto => match from_env {
            Some(k) => *k,
            None if gpu.report.device_type == wgpu::DeviceType::Cpu => Kernels::Texture,
            None => Kernels::Wide,
        },
        k => k,
    }
}

fn variant(gpu: &Gpu, d: [usize; 4]) -> Variant {
    let k = kernels(gpu);
    let quads = (d[2] * d[3]).is_multiple_of(4) && REDUCE_CHUNK.is_multiple_of(4) && APPLY_CHUNK.is_multiple_of(4);
    match k {
        Kernels::Wide => Variant::Wide,
        Kernels::Texture if quads && texture_fits(gpu, d.iter().product()) => Variant::Texture,
        Kernels::Texture | Kernels::Vec4 if quads => Variant::Vec4,
        _ => Variant::Scalar,
    }
}

/// Texture copies of x and dy where the variant reads them so (made once per call).
struct Views {
    x: Option<wgpu::TextureView>,
    dy: Option<wgpu::TextureView>,
}

impl Views {
    fn new(rec: &mut Recorder, v: Variant, x: Option<&Tensor>, dy: Option<&Tensor>) -> Views {
        let mut tex =
            |role, t: Option<&Tensor>| t.filter(|_| v == Variant::Texture).map(|t| operand_texture(rec, role, t));
        Views { x: tex("bn.x", x), dy: tex("bn.dy", dy) }
    }

    /// [`Views::new`] of half activations (rgba16f textures).
    fn new_f16(rec: &mut Recorder, v: Variant, x: Option<&HalfTensor>, dy: Option<&HalfTensor>) -> Views {
        let mut tex = |role, t: Option<&HalfTensor>| {
            t.filter(|_| v == Variant::Texture).map(|t| operand_texture_f16(rec, role, t))
        };
        Views { x: tex("bn.x", x), dy: tex("bn.dy", dy) }
    }
}

/// The activation-sized operands of a run kernel (those it uses).
#[derive(Clone, Copy, Default)]
struct Acts<'a> {
    x: Option<&'a Tensor>,
    y: Option<&'a Tensor>,
    dy: Option<&'a Tensor>,
    dx: Option<&'a Tensor>,
}

/// Records run kernel `entry` in variant `v` over `runs`, with the activations `acts`
/// (x and dy from `views` in the texture variant) and the per-channel buffers `others`.
#[allow(clippy::too_many_arguments)]
fn run_dispatch(
    rec: &mut Recorder,
    d: [usize; 4],
    v: Variant,
    entry: &'static str,
    prm: &[u32],
    runs: Runs,
    acts: Acts,
    views: &Views,
    others: &[(u32, &wgpu::Buffer)],
) {
    fn buf(t: &Tensor) -> wgpu::BindingResource<'_> {
        t.buffer.as_entire_binding()
    }
    let (shader, entry, b) = run_kernel(v, false, entry);
    let mut res: Vec<(u32, wgpu::BindingResource)> =
        others.iter().map(|(n, buf)| (*n, buf.as_entire_binding())).collect();
    if let Some(x) = acts.x {
        res.push((b[0], views.x.as_ref().map_or_else(|| buf(x), wgpu::BindingResource::TextureView)));
    }
    if let Some(y) = acts.y {
        res.push((b[1], buf(y)));
    }
    if let Some(dy) = acts.dy {
        res.push((b[2], views.dy.as_ref().map_or_else(|| buf(dy), wgpu::BindingResource::TextureView)));
    }
    if let Some(dx) = acts.dx {
        res.push((b[3], buf(dx)));
    }
    rec.dispatch_resources(shader, entry, prm, &res, variant_groups(rec.gpu, v, d, runs));
}

/// Run kernel `entry` (`stats_partial`, `normalize`, `backward_partial`, `backward_apply`) in
/// variant `v` of the f32 or (`half`) f16 module: the module, the variant's entry point, and
/// its bindings of x, y, dy and dx (shaders/batch_norm.wgsl). The texture variant runs the vec4
/// kernels of a module that reads x and dy from textures.
fn run_kernel(v: Variant, half: bool, entry: &'static str) -> (Shader, &'static str, [u32; 4]) {
    let shader = match (half, v == Variant::Texture) {
        (false, false) => Shader::BatchNorm,
        (false, true) => Shader::BatchNormTexture,
        (true, false) => Shader::BatchNormF16,
        (true, true) => Shader::BatchNormF16Texture,
    };
    let named = match (v, entry) {
        (Variant::Scalar, e) => e,
        (Variant::Wide, "stats_partial") => "stats_partial_w",
        (Variant::Wide, "normalize") => "normalize_w",
        (Variant::Wide, "backward_partial") => "backward_partial_w",
        (Variant::Wide, _) => "backward_apply_w",
        (_, "stats_partial") => "stats_partial4",
        (_, "normalize") => "normalize4",
        (_, "backward_partial") => "backward_partial4",
        _ => "backward_apply4",
    };
    let binds = match v {
        Variant::Scalar | Variant::Wide => [1, 2, 9, 10],
        Variant::Vec4 => [15, 16, 17, 18],
        Variant::Texture => [19, 16, 20, 18],
    };
    (shader, named, binds)
}

/// Workgroups of variant `v` over `runs` of `d`: one invocation per run, or (the wide kernels)
/// a workgroup of WG threads per run.
fn variant_groups(gpu: &Gpu, v: Variant, d: [usize; 4], runs: Runs) -> [u32; 3] {
    let n = runs.count(d);
    gpu.groups_for(if v == Variant::Wide { n * WG as usize } else { n })
}

/// Workgroups for one invocation per run of `chunk` elements over all of `d`.
fn run_groups(gpu: &Gpu, d: [usize; 4], chunk: usize) -> [u32; 3] {
    gpu.groups_for(d[0] * d[1] * parts(d, chunk))
}

/// This context's buffer for the reductions' per-run partials (2 floats per run of
/// `REDUCE_CHUNK`; the wide kernels' longer runs need fewer), one per size. Calls recorded one
/// after another may share it: each reduction's final pass reads it before the next one's
/// first pass writes it.
fn partials(gpu: &Gpu, d: [usize; 4]) -> wgpu::Buffer {
    let bytes = d[0] as u64 * partials_per_image(d)[0].1;
    gpu.cached_buffer(("batch_norm.partials", bytes), "batch norm partials", bytes, wgpu::BufferUsages::STORAGE)
}

/// The f16 path's check that its partials fit one binding, as its tensors must.
fn partials_fit_f16(gpu: &Gpu, what: &str, d: [usize; 4]) -> Result<()> {
    let [(name, per_image)] = partials_per_image(d);
    split::scratch_fits_f16(gpu, what, name, d[0] as u64 * per_image)
}

/// The partials' bytes per image, for the chunk plan ([`split::batch_chunk_with`]): at 1x1
/// maps twice the activations'.
fn partials_per_image(d: [usize; 4]) -> [(&'static str, u64); 1] {
    [("the partials", (2 * d[1] * parts(d, REDUCE_CHUNK) * 4) as u64)]
}

/// Training mode: batch statistics saved into save_mean/save_invstd (`[C]`), running stats
/// updated (momentum 0.1, unbiased var), y written per `ep`.
///
/// With `ep.add`, `y` holds `y_old` on entry and `y = y_old + bn(x)` (then the ReLU, if set) on
/// exit. `N*H*W == 1` is [`Error::Invalid`] (no unbiased variance), as in PyTorch.
pub fn forward_train(
    rec: &mut Recorder,
    x: &Tensor,
    y: &Tensor,
    p: &BnTensors,
    save_mean: &Tensor,
    save_invstd: &Tensor,
    ep: Epilogue,
) -> Result<()> {
    const WHAT: &str = "batch norm forward_train";
    super::owned(rec, WHAT, [x, y, save_mean, save_invstd].into_iter().chain(p.tensors()))?;
    let d = activations(WHAT, x, &[("y", y)])?;
    let unbias = check_train(WHAT, x, Some(y), p, save_mean, save_invstd)?;
    let whole = [p.gamma, p.beta, p.running_mean, p.running_var, save_mean, save_invstd];
    if let Some(per) = split::batch_chunk_with(rec.gpu, WHAT, d[0], &[x, y], &whole, &partials_per_image(d))? {
        stats_chunked(rec, x, p, save_mean, save_invstd, per, unbias)?;
        // By chunks where x or y does not fit; whole where only the partials did not.
        return apply_saved(rec, x, y, p.gamma, p.beta, save_mean, save_invstd, ep);
    }
    // One texture copy of x (CPU adapters) serves both passes.
    let v = variant(rec.gpu, d);
    let views = Views::new(rec, v, Some(x), None);
    record_stats(rec, d, v, &views, x, p, save_mean, save_invstd, unbias);
    record_normalize(rec, d, v, &views, [x, y], [p.gamma, p.beta, save_mean, save_invstd], ep);
    Ok(())
}

/// Records `normalize` in variant `v` over `d` (x read from `views` in the texture variant):
/// `y = ep((x - mean) * invstd * gamma + beta)` with the statistics `[gamma, beta, mean,
/// invstd]`, the training forward's second pass and [`apply_saved`].
fn record_normalize(
    rec: &mut Recorder,
    d: [usize; 4],
    v: Variant,
    views: &Views,
    [x, y]: [&Tensor; 2],
    [gamma, beta, mean, invstd]: [&Tensor; 4],
    ep: Epilogue,
) {
    let runs = v.apply_runs(d);
    run_dispatch(
        rec,
        d,
        v,
        "normalize",
        &params(d, runs, ep.relu, ep.add, false, 1.0),
        runs,
        Acts { x: Some(x), y: Some(y), ..Acts::default() },
        views,
        &[(3, &gamma.buffer), (4, &beta.buffer), (7, &mean.buffer), (8, &invstd.buffer)],
    );
}

/// The checks of a training forward on `x` (and its output `y`) and the per-channel tensors;
/// returns the running variance's unbiasing factor `M / (M - 1)`.
pub(crate) fn check_train(
    what: &str,
    x: &Tensor,
    y: Option<&Tensor>,
    p: &BnTensors,
    save_mean: &Tensor,
    save_invstd: &Tensor,
) -> Result<f32> {
    let d = activations(what, x, &[])?;
    let named = train_tensors(p, save_mean, save_invstd);
    per_channel(what, d[1], &named)?;
    let mut all = vec![("x", x)];
    all.extend(y.map(|y| ("y", y)));
    all.extend(named);
    check_stats_affine(what, d[1], p, all)?;
    let m = d[0] * d[2] * d[3];
    if m == 1 {
        return Err(Error::Invalid(format!(
            "{what}: expected more than 1 value per channel when training, got input {d:?}"
        )));
    }
    Ok((m as f64 / (m - 1) as f64) as f32)
}

/// `p.affine`, where given, is `[c, 4]`; it and the others (`all`) are distinct tensors.
fn check_stats_affine<'a>(what: &str, c: usize, p: &BnTensors<'a>, mut all: Vec<(&str, &'a Tensor)>) -> Result<()> {
    if let Some(a) = p.affine {
        check_affine_out(what, "affine", c, a)?;
        all.push(("affine", a));
    }
    distinct(what, &all)
}

/// A training forward's per-channel tensors, named for errors.
fn train_tensors<'a>(
    p: &BnTensors<'a>,
    save_mean: &'a Tensor,
    save_invstd: &'a Tensor,
) -> [(&'static str, &'a Tensor); 6] {
    [
        ("gamma", p.gamma),
        ("beta", p.beta),
        ("running_mean", p.running_mean),
        ("running_var", p.running_var),
        ("save_mean", save_mean),
        ("save_invstd", save_invstd),
    ]
}

/// The batch statistics of a training forward without its output: save_mean and save_invstd
/// written and the running statistics moved, as [`forward_train`] does, for a consumer that
/// applies the normalisation itself (the convolutions' BN + ReLU prologue, through
/// [`affine`]).
pub fn stats_train(
    rec: &mut Recorder,
    x: &Tensor,
    p: &BnTensors,
    save_mean: &Tensor,
    save_invstd: &Tensor,
) -> Result<()> {
    const WHAT: &str = "batch norm stats_train";
    super::owned(rec, WHAT, [x, save_mean, save_invstd].into_iter().chain(p.tensors()))?;
    let unbias = check_train(WHAT, x, None, p, save_mean, save_invstd)?;
    let d = x.nchw(WHAT)?;
    let whole = [p.gamma, p.beta, p.running_mean, p.running_var, save_mean, save_invstd];
    if let Some(per) = split::batch_chunk_with(rec.gpu, WHAT, d[0], &[x], &whole, &partials_per_image(d))? {
        return stats_chunked(rec, x, p, save_mean, save_invstd, per, unbias);
    }
    let v = variant(rec.gpu, d);
    let views = Views::new(rec, v, Some(x), None);
    record_stats(rec, d, v, &views, x, p, save_mean, save_invstd, unbias);
    Ok(())
}

/// Records the two statistics passes over `x` (shape `d`, read per variant `v`).
#[allow(clippy::too_many_arguments)]
fn record_stats(
    rec: &mut Recorder,
    d: [usize; 4],
    v: Variant,
    views: &Views,
    x: &Tensor,
    p: &BnTensors,
    save_mean: &Tensor,
    save_invstd: &Tensor,
    unbias: f32,
) {
    let part = partials(rec.gpu, d);
    let prm = params(d, v.reduce_runs(d), false, false, false, unbias);
    let xa = Acts { x: Some(x), ..Acts::default() };
    run_dispatch(rec, d, v, "stats_partial", &prm, v.reduce_runs(d), xa, views, &[(14, &part)]);
    record_final(rec, "stats_final", &prm, p, save_mean, save_invstd, &part);
}

/// [`stats_train`] of `x` from per-channel partials a convolution's epilogue wrote as it
/// produced `x` (`ops::conv::forward_stats`): for each channel, runs of `run` consecutive
/// elements of its `N*H*W` (in (n, h, w) order, the last run shorter), each run's sum and
/// squared deviations from its own mean at `part[2 * (c * runs + r)]` and the next float.
/// `stats_final` combines them as it does its own partials, with the channel as one plane.
pub(crate) fn stats_from_moments(
    rec: &mut Recorder,
    x: &Tensor,
    part: &wgpu::Buffer,
    run: usize,
    p: &BnTensors,
    save_mean: &Tensor,
    save_invstd: &Tensor,
) -> Result<()> {
    const WHAT: &str = "batch norm stats_train";
    let unbias = check_train(WHAT, x, None, p, save_mean, save_invstd)?;
    let d = x.nchw(WHAT)?;
    record_moments_final(rec, d, part, run, p, save_mean, save_invstd, unbias);
    Ok(())
}

/// `stats_final` over per-channel partials of runs of `run` elements of each channel's `N*H*W`
/// (x's shape `d`).
#[allow(clippy::too_many_arguments)]
fn record_moments_final(
    rec: &mut Recorder,
    d: [usize; 4],
    part: &wgpu::Buffer,
    run: usize,
    p: &BnTensors,
    save_mean: &Tensor,
    save_invstd: &Tensor,
    unbias: f32,
) {
    let plane = [1, d[1], d[0] * d[2] * d[3], 1];
    let prm = params(plane, Runs::per_plane(run), false, false, false, unbias);
    record_final(rec, "stats_final", &prm, p, save_mean, save_invstd, part);
}

/// `stats_final` or `stats_merge` (`entry`, with `prm`'s words) over the partials `part`, a
/// workgroup per channel: the saved and running statistics, and `p.affine` where given.
fn record_final(
    rec: &mut Recorder,
    entry: &'static str,
    prm: &[u32; 16],
    p: &BnTensors,
    save_mean: &Tensor,
    save_invstd: &Tensor,
    part: &wgpu::Buffer,
) {
    let aff = affine_binding(rec.gpu, p.affine);
    let bufs = [
        (3, &p.gamma.buffer),
        (4, &p.beta.buffer),
        (5, &p.running_mean.buffer),
        (6, &p.running_var.buffer),
        (7, &save_mean.buffer),
        (8, &save_invstd.buffer),
        (14, part),
        (21, &aff),
    ];
    rec.dispatch(Shader::BatchNorm, entry, &stats_words(prm, p), &bufs, [p.gamma.len() as u32, 1, 1]);
}

/// [`stats_train`] by chunks of `per` images: each chunk's statistics merged into the batch's
/// in chunk order.
fn stats_chunked(
    rec: &mut Recorder,
    x: &Tensor,
    p: &BnTensors,
    save_mean: &Tensor,
    save_invstd: &Tensor,
    per: usize,
    unbias: f32,
) -> Result<()> {
    const WHAT: &str = "batch norm stats_train";
    let d = x.nchw(WHAT)?;
    per_channel_count(WHAT, d)?;
    for r in split::ranges(d[0], per) {
        let dc = [r.len(), d[1], d[2], d[3]];
        let xt = split::images(rec, "in0", x, &r, true);
        let part = partials(rec.gpu, dc);
        let prm = params(dc, Runs::per_plane(REDUCE_CHUNK), false, false, false, unbias);
        rec.dispatch(
            Shader::BatchNorm,
            "stats_partial",
            &prm,
            &[(1, &xt.buffer), (14, &part)],
            run_groups(rec.gpu, dc, REDUCE_CHUNK),
        );
        let words = chunked(prm, r.start, r.end == d[0], 0);
        record_final(rec, "stats_merge", &words, p, save_mean, save_invstd, &part);
    }
    Ok(())
}

/// The per-channel values of the convolutions' BN + ReLU prologue
/// ([`crate::ops::conv::forward_bn_relu`]): `affine[c] = (mean, gamma * invstd, beta, invstd)`,
/// `[C, 4]`, from given statistics (those a training forward saved).
pub fn affine(
    rec: &mut Recorder,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
    out: &Tensor,
) -> Result<()> {
    const WHAT: &str = "batch norm affine";
    super::owned(rec, WHAT, [gamma, beta, mean, invstd, out])?;
    let c = gamma.len();
    per_channel(WHAT, c, &[("gamma", gamma), ("beta", beta), ("mean", mean), ("invstd", invstd)])?;
    check_affine_out(WHAT, "out", c, out)?;
    distinct(WHAT, &[("out", out), ("gamma", gamma), ("beta", beta), ("mean", mean), ("invstd", invstd)])?;
    let prm = [1, c as u32, 1, 0, 0, 0, EPS.to_bits()];
    let bufs = [(3, &gamma.buffer), (4, &beta.buffer), (7, &mean.buffer), (8, &invstd.buffer), (21, &out.buffer)];
    rec.dispatch(Shader::BatchNorm, "affine_saved", &prm, &bufs, rec.gpu.groups_for(c));
    Ok(())
}

/// [`affine`] of inference mode: from the running statistics, `invstd = 1 / sqrt(var + EPS)`.
pub fn affine_eval(rec: &mut Recorder, p: &BnTensors, out: &Tensor) -> Result<()> {
    const WHAT: &str = "batch norm affine_eval";
    super::owned(rec, WHAT, [out].into_iter().chain(p.tensors()))?;
    let c = p.gamma.len();
    let named =
        [("gamma", p.gamma), ("beta", p.beta), ("running_mean", p.running_mean), ("running_var", p.running_var)];
    per_channel(WHAT, c, &named)?;
    check_affine_out(WHAT, "out", c, out)?;
    let mut all = vec![("out", out)];
    all.extend(named);
    distinct(WHAT, &all)?;
    let prm = [1, c as u32, 1, 0, 0, 0, EPS.to_bits()];
    let bufs = [
        (3, &p.gamma.buffer),
        (4, &p.beta.buffer),
        (5, &p.running_mean.buffer),
        (6, &p.running_var.buffer),
        (21, &out.buffer),
    ];
    rec.dispatch(Shader::BatchNorm, "affine_eval", &prm, &bufs, rec.gpu.groups_for(c));
    Ok(())
}

/// `y = ReLU((x - mean) * scale + beta)` per channel from `affine` ([`affine`]'s `[C, 4]`
/// values): the convolutions' BN + ReLU prologue ([`crate::ops::conv::forward_bn_relu`]) as a
/// pass of its own, with the prologue's expression and so the same bits. The convolutions run
/// it and then no prologue where that is faster on the adapter. One kernel on every adapter,
/// whatever [`Kernels`] says: a workgroup per wide run of a channel.
pub fn affine_relu(rec: &mut Recorder, x: &Tensor, affine: &Tensor, y: &Tensor) -> Result<()> {
    const WHAT: &str = "batch norm affine_relu";
    super::owned(rec, WHAT, [x, affine, y])?;
    let d = activations(WHAT, x, &[("y", y)])?;
    check_affine_out(WHAT, "affine", d[1], affine)?;
    distinct(WHAT, &[("x", x), ("y", y), ("affine", affine)])?;
    let chunk = |rec: &mut Recorder, _: &_, i: &[Tensor], o: &[Tensor]| affine_relu(rec, &i[0], affine, &o[0]);
    if split::batch_op(rec, WHAT, &[x], &[(y, false)], &[affine], chunk)? {
        return Ok(());
    }
    record_affine_relu(rec, Shader::BatchNorm, d, [&x.buffer, &y.buffer, &affine.buffer]);
    Ok(())
}

/// Records [`affine_relu`] (of module `shader`, f32 or f16) over `d` with buffers x, y and
/// affine: a workgroup per wide run of a channel on every adapter, its values loaded once a run.
fn record_affine_relu(rec: &mut Recorder, shader: Shader, d: [usize; 4], [x, y, affine]: [&wgpu::Buffer; 3]) {
    let runs = Runs::wide(d);
    let prm = params(d, runs, false, false, false, 1.0);
    let groups = variant_groups(rec.gpu, Variant::Wide, d, runs);
    rec.dispatch(shader, "affine_relu", &prm, &[(1, x), (2, y), (21, affine)], groups);
}

/// `t` (named `name`) holds the `[c, 4]` prologue values.
fn check_affine_out(what: &str, name: &str, c: usize, t: &Tensor) -> Result<()> {
    if t.dims() != [c, 4] {
        return Err(Error::Shape(format!("{what}: {name} must be [{c}, 4], got {:?}", t.dims())));
    }
    Ok(())
}

/// Inference mode with the running statistics.
///
/// With `ep.add`, `y` holds `y_old` on entry and `y = y_old + bn(x)` (then the ReLU, if set) on
/// exit.
pub fn forward_eval(rec: &mut Recorder, x: &Tensor, y: &Tensor, p: &BnTensors, ep: Epilogue) -> Result<()> {
    const WHAT: &str = "batch norm forward_eval";
    super::owned(rec, WHAT, [x, y].into_iter().chain(p.tensors()))?;
    let d = activations(WHAT, x, &[("y", y)])?;
    per_channel(
        WHAT,
        d[1],
        &[("gamma", p.gamma), ("beta", p.beta), ("running_mean", p.running_mean), ("running_var", p.running_var)],
    )?;
    distinct(
        WHAT,
        &[
            ("x", x),
            ("y", y),
            ("gamma", p.gamma),
            ("beta", p.beta),
            ("running_mean", p.running_mean),
            ("running_var", p.running_var),
        ],
    )?;
    let whole = [p.gamma, p.beta, p.running_mean, p.running_var];
    let chunk = |rec: &mut Recorder, _: &_, i: &[Tensor], o: &[Tensor]| forward_eval(rec, &i[0], &o[0], p, ep);
    if split::batch_op(rec, WHAT, &[x], &[(y, ep.add)], &whole, chunk)? {
        return Ok(());
    }
    rec.dispatch(
        Shader::BatchNorm,
        "normalize_eval",
        &params(d, Runs::per_plane(APPLY_CHUNK), ep.relu, ep.add, false, 1.0),
        &[
            (1, &x.buffer),
            (2, &y.buffer),
            (3, &p.gamma.buffer),
            (4, &p.beta.buffer),
            (5, &p.running_mean.buffer),
            (6, &p.running_var.buffer),
        ],
        run_groups(rec.gpu, d, APPLY_CHUNK),
    );
    Ok(())
}

/// A training BN's tensors for its backward: parameters and saved statistics (read), gradients
/// (written) and a `[2C]` scratch, all per channel.
pub struct BnGrads<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub save_mean: &'a Tensor,
    pub save_invstd: &'a Tensor,
    pub dgamma: &'a Tensor,
    pub dbeta: &'a Tensor,
    pub scratch: &'a Tensor,
}

impl BnGrads<'_> {
    /// Every tensor it holds.
    pub(crate) fn tensors(&self) -> [&Tensor; 7] {
        [self.gamma, self.beta, self.save_mean, self.save_invstd, self.dgamma, self.dbeta, self.scratch]
    }
}

/// The checks of [`backward`]; returns x's `[n, c, h, w]`.
pub(crate) fn check_backward(what: &str, x: &Tensor, dy: &Tensor, dx: &Tensor, b: &BnGrads) -> Result<[usize; 4]> {
    let BnGrads { gamma, beta, save_mean, save_invstd, dgamma, dbeta, scratch } = *b;
    let d = activations(what, x, &[("dy", dy), ("dx", dx)])?;
    let c = d[1];
    per_channel(
        what,
        c,
        &[
            ("gamma", gamma),
            ("beta", beta),
            ("save_mean", save_mean),
            ("save_invstd", save_invstd),
            ("dgamma", dgamma),
            ("dbeta", dbeta),
        ],
    )?;
    if scratch.len() != 2 * c {
        return Err(Error::Shape(format!(
            "{what}: scratch must hold 2*C = {} elements, got {:?}",
            2 * c,
            scratch.dims()
        )));
    }
    distinct(
        what,
        &[
            ("x", x),
            ("dy", dy),
            ("gamma", gamma),
            ("beta", beta),
            ("save_mean", save_mean),
            ("save_invstd", save_invstd),
            ("dx", dx),
            ("dgamma", dgamma),
            ("dbeta", dbeta),
            ("scratch", scratch),
        ],
    )?;
    if d[0] * d[2] * d[3] == 1 {
        return Err(Error::Invalid(format!(
            "{what}: expected more than 1 value per channel when training, got input {d:?}"
        )));
    }
    Ok(d)
}

/// Backward of forward_train: dx (+)= ..., dgamma (+)= ..., dbeta (+)= ... . If `relu`, dy is
/// first multiplied by the recomputed mask `[gamma*xhat+beta > 0]`. `scratch` is a `[2*C]` tensor
/// for the per-channel sums (caller-owned so nothing is allocated per call).
///
/// `relu` is for a forward run with `Epilogue { add: false, relu: true }` only: the mask is
/// recomputed from `x`, the saved statistics, `gamma` and `beta`, so the forward's output need
/// not be kept. After `Epilogue { add: true, relu: true }` the mask depends on `y_old` as well:
/// the caller masks the gradient by the forward's output itself and passes `relu: false`.
/// `accumulate_dx` adds into `dx` instead of overwriting it, `accumulate_params` likewise into
/// `dgamma` and `dbeta`. `scratch` may hold anything on entry (any shape of `2*C` elements).
/// `N*H*W == 1` is [`Error::Invalid`], as in [`forward_train`].
#[allow(clippy::too_many_arguments)]
pub fn backward(
    rec: &mut Recorder,
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    save_mean: &Tensor,
    save_invstd: &Tensor,
    relu: bool,
    dx: &Tensor,
    dgamma: &Tensor,
    dbeta: &Tensor,
    scratch: &Tensor,
    accumulate_dx: bool,
    accumulate_params: bool,
) -> Result<()> {
    const WHAT: &str = "batch norm backward";
    super::owned(rec, WHAT, [x, dy, gamma, beta, save_mean, save_invstd, dx, dgamma, dbeta, scratch])?;
    let bg = BnGrads { gamma, beta, save_mean, save_invstd, dgamma, dbeta, scratch };
    let d = check_backward(WHAT, x, dy, dx, &bg)?;
    let c = d[1];
    let whole = [gamma, beta, save_mean, save_invstd, dgamma, dbeta, scratch];
    if let Some(per) = split::batch_chunk_with(rec.gpu, WHAT, d[0], &[x, dy, dx], &whole, &partials_per_image(d))? {
        // The sums over the chunks first (merged in chunk order), then dx chunk by chunk.
        let total = per_channel_count(WHAT, d)?;
        let stat = [(3, gamma), (4, beta), (7, save_mean), (8, save_invstd)];
        for r in split::ranges(d[0], per) {
            let dc = [r.len(), d[1], d[2], d[3]];
            let (xt, dyt) = (split::images(rec, "in0", x, &r, true), split::images(rec, "in1", dy, &r, true));
            let part = partials(rec.gpu, dc);
            let mut binds = vec![(1, &xt.buffer), (9, &dyt.buffer), (14, &part)];
            binds.extend(stat.iter().map(|(b, t)| (*b, &t.buffer)));
            let prm = params(dc, Runs::per_plane(REDUCE_CHUNK), relu, false, accumulate_params, 1.0);
            rec.dispatch(Shader::BatchNorm, "backward_partial", &prm, &binds, run_groups(rec.gpu, dc, REDUCE_CHUNK));
            rec.dispatch(
                Shader::BatchNorm,
                "backward_merge",
                &chunked(prm, r.start, r.end == d[0], 0),
                &[(11, &scratch.buffer), (12, &dgamma.buffer), (13, &dbeta.buffer), (14, &part)],
                [c as u32, 1, 1],
            );
        }
        for r in split::ranges(d[0], per) {
            let dc = [r.len(), d[1], d[2], d[3]];
            let (xt, dyt) = (split::images(rec, "in0", x, &r, true), split::images(rec, "in1", dy, &r, true));
            let dxt = split::images(rec, "out0", dx, &r, accumulate_dx);
            let mut binds = vec![(1, &xt.buffer), (9, &dyt.buffer), (10, &dxt.buffer), (11, &scratch.buffer)];
            binds.extend(stat.iter().map(|(b, t)| (*b, &t.buffer)));
            let prm =
                chunked(params(dc, Runs::per_plane(APPLY_CHUNK), relu, false, accumulate_dx, 1.0), 0, false, total);
            rec.dispatch(Shader::BatchNorm, "backward_apply", &prm, &binds, run_groups(rec.gpu, dc, APPLY_CHUNK));
            split::store_images(rec, &dxt, dx, &r);
        }
        return Ok(());
    }
    let part = partials(rec.gpu, d);
    let v = variant(rec.gpu, d);
    let views = Views::new(rec, v, Some(x), Some(dy));
    let (xs, dys) = (Some(x), Some(dy));
    run_dispatch(
        rec,
        d,
        v,
        "backward_partial",
        &params(d, v.reduce_runs(d), relu, false, false, 1.0),
        v.reduce_runs(d),
        Acts { x: xs, dy: dys, ..Acts::default() },
        &views,
        &[(3, &gamma.buffer), (4, &beta.buffer), (7, &save_mean.buffer), (8, &save_invstd.buffer), (14, &part)],
    );
    rec.dispatch(
        Shader::BatchNorm,
        "backward_final",
        &params(d, v.reduce_runs(d), relu, false, accumulate_params, 1.0),
        &[(11, &scratch.buffer), (12, &dgamma.buffer), (13, &dbeta.buffer), (14, &part)],
        [c as u32, 1, 1],
    );
    run_dispatch(
        rec,
        d,
        v,
        "backward_apply",
        &params(d, v.apply_runs(d), relu, false, accumulate_dx, 1.0),
        v.apply_runs(d),
        Acts { x: xs, dy: dys, dx: Some(dx), ..Acts::default() },
        &views,
        &[
            (3, &gamma.buffer),
            (4, &beta.buffer),
            (7, &save_mean.buffer),
            (8, &save_invstd.buffer),
            (11, &scratch.buffer),
        ],
    );
    Ok(())
}

/// [`backward`] with `relu` (mask recomputed) of a batch norm whose sums `sum dz` and
/// `sum dz * xhat` a convolution's epilogue wrote as it produced `dy`
/// (`ops::conv::backward_data_bn`), as per-run partials in `part`: runs of `run` elements of
/// each channel's `N*H*W`, as [`stats_from_moments`] reads them. Then `backward_final` (dgamma,
/// dbeta overwritten) and `backward_apply` (dx (+)=) as [`backward`] runs them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_from_sums(
    rec: &mut Recorder,
    x: &Tensor,
    dy: &Tensor,
    b: &BnGrads,
    dx: &Tensor,
    accumulate_dx: bool,
    part: &wgpu::Buffer,
    run: usize,
) -> Result<()> {
    const WHAT: &str = "batch norm backward";
    let d = check_backward(WHAT, x, dy, dx, b)?;
    record_sums_final(rec, d, b, part, run);
    let v = variant(rec.gpu, d);
    let views = Views::new(rec, v, Some(x), Some(dy));
    run_dispatch(
        rec,
        d,
        v,
        "backward_apply",
        &params(d, v.apply_runs(d), true, false, accumulate_dx, 1.0),
        v.apply_runs(d),
        Acts { x: Some(x), dy: Some(dy), dx: Some(dx), ..Acts::default() },
        &views,
        &[
            (3, &b.gamma.buffer),
            (4, &b.beta.buffer),
            (7, &b.save_mean.buffer),
            (8, &b.save_invstd.buffer),
            (11, &b.scratch.buffer),
        ],
    );
    Ok(())
}

/// `backward_final` (with the ReLU mask) over per-channel partials of runs of `run` elements of
/// each channel's `N*H*W` (x's shape `d`): dgamma, dbeta overwritten, the sums into scratch.
fn record_sums_final(rec: &mut Recorder, d: [usize; 4], b: &BnGrads, part: &wgpu::Buffer, run: usize) {
    let plane = [1, d[1], d[0] * d[2] * d[3], 1];
    rec.dispatch(
        Shader::BatchNorm,
        "backward_final",
        &params(plane, Runs::per_plane(run), true, false, false, 1.0),
        &[(11, &b.scratch.buffer), (12, &b.dgamma.buffer), (13, &b.dbeta.buffer), (14, part)],
        [d[1] as u32, 1, 1],
    );
}

/// `y = ep(BN(x))` with given statistics (`mean`, `invstd`, e.g. those a training forward
/// saved), touching no running statistics: the backward's recomputation of `ReLU(BN(x))`.
#[allow(clippy::too_many_arguments)]
pub fn apply_saved(
    rec: &mut Recorder,
    x: &Tensor,
    y: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
    ep: Epilogue,
) -> Result<()> {
    const WHAT: &str = "batch norm apply_saved";
    super::owned(rec, WHAT, [x, y, gamma, beta, mean, invstd])?;
    let d = activations(WHAT, x, &[("y", y)])?;
    per_channel(WHAT, d[1], &[("gamma", gamma), ("beta", beta), ("mean", mean), ("invstd", invstd)])?;
    distinct(WHAT, &[("x", x), ("y", y), ("gamma", gamma), ("beta", beta), ("mean", mean), ("invstd", invstd)])?;
    let chunk = |rec: &mut Recorder, _: &_, i: &[Tensor], o: &[Tensor]| {
        apply_saved(rec, &i[0], &o[0], gamma, beta, mean, invstd, ep)
    };
    if split::batch_op(rec, WHAT, &[x], &[(y, ep.add)], &[gamma, beta, mean, invstd], chunk)? {
        return Ok(());
    }
    let v = variant(rec.gpu, d);
    let views = Views::new(rec, v, Some(x), None);
    record_normalize(rec, d, v, &views, [x, y], [gamma, beta, mean, invstd], ep);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The f16 path: f16 activations (`HalfTensor`), f32 per-channel tensors and arithmetic; the
// kernels of batch_norm.wgsl built with ST = f16 (`Shader::BatchNormF16`, and
// `Shader::BatchNormF16Texture` for the texture variant), in the f32 path's variant for the
// shape. A batch runs whole (no chunks): every activation fits one storage binding.

/// The f16 path's checks: the adapter has shader-f16; `x` and `others` share one 4-D shape,
/// fit one storage binding each and are distinct buffers; returns the shape.
fn half_activations(gpu: &Gpu, what: &str, x: &HalfTensor, others: &[(&str, &HalfTensor)]) -> Result<[usize; 4]> {
    let d = x.nchw(format_args!("{what}: x"))?;
    let all: Vec<(&str, &HalfTensor)> = std::iter::once(("x", x)).chain(others.iter().copied()).collect();
    for (i, (name, t)) in all.iter().enumerate() {
        let e = t.nchw(format_args!("{what}: {name}"))?;
        if e != d {
            return Err(Error::Shape(format!("{what}: {name} is {e:?}, x is {d:?}")));
        }
        split::whole_fits_f16(gpu, &format!("{what}: {name}"), t.dims(), t.buffer.size())?;
        if all[..i].iter().any(|(_, o)| o.buffer == t.buffer) {
            return Err(Error::Invalid(format!("{what}: {name} must be a tensor of its own")));
        }
    }
    if d[1] > MAX_CHANNELS {
        return Err(Error::Invalid(format!("{what}: {} channels, at most {MAX_CHANNELS} supported", d[1])));
    }
    if d[0] * d[2] * d[3] == 1 {
        return Err(Error::Invalid(format!(
            "{what}: expected more than 1 value per channel when training, got input {d:?}"
        )));
    }
    Ok(d)
}

/// Records run kernel `entry` of the f16 module in variant `v` over `d`, with `binds`, whose
/// activations x, y, dy and dx are given at the scalar kernels' bindings 1, 2, 9 and 10 (moved
/// to the variant's; x and dy read from `views` in the texture variant).
fn half_dispatch(
    rec: &mut Recorder,
    d: [usize; 4],
    v: Variant,
    entry: &'static str,
    prm: &[u32],
    binds: &[(u32, &wgpu::Buffer)],
    views: &Views,
) {
    let runs = if entry.ends_with("_partial") { v.reduce_runs(d) } else { v.apply_runs(d) };
    let (shader, entry, b) = run_kernel(v, true, entry);
    fn or_view<'a>(view: &'a Option<wgpu::TextureView>, buf: &'a wgpu::Buffer) -> wgpu::BindingResource<'a> {
        view.as_ref().map_or_else(|| buf.as_entire_binding(), wgpu::BindingResource::TextureView)
    }
    let res: Vec<(u32, wgpu::BindingResource)> = binds
        .iter()
        .map(|&(n, buf)| match n {
            1 => (b[0], or_view(&views.x, buf)),
            2 => (b[1], buf.as_entire_binding()),
            9 => (b[2], or_view(&views.dy, buf)),
            10 => (b[3], buf.as_entire_binding()),
            _ => (n, buf.as_entire_binding()),
        })
        .collect();
    rec.dispatch_resources(shader, entry, prm, &res, variant_groups(rec.gpu, v, d, runs));
}

/// [`stats_train`] of an f16 `x`: the batch statistics (saved, running ones moved), in f32.
pub fn stats_train_f16(
    rec: &mut Recorder,
    x: &HalfTensor,
    p: &BnTensors,
    save_mean: &Tensor,
    save_invstd: &Tensor,
) -> Result<()> {
    const WHAT: &str = "batch norm stats_train_f16";
    super::owned(rec, WHAT, [save_mean, save_invstd].into_iter().chain(p.tensors()))?;
    super::owned_f16(rec, WHAT, [x])?;
    let (d, unbias) = check_train_f16(rec.gpu, WHAT, x, p, save_mean, save_invstd)?;
    partials_fit_f16(rec.gpu, WHAT, d)?;
    let v = variant(rec.gpu, d);
    let part = partials(rec.gpu, d);
    let prm = params(d, v.reduce_runs(d), false, false, false, unbias);
    let views = Views::new_f16(rec, v, Some(x), None);
    half_dispatch(rec, d, v, "stats_partial", &prm, &[(1, &x.buffer), (14, &part)], &views);
    record_final(rec, "stats_final", &prm, p, save_mean, save_invstd, &part);
    Ok(())
}

/// The checks of a training forward on an f16 `x`; returns its shape and the running
/// variance's unbiasing factor.
pub(crate) fn check_train_f16(
    gpu: &Gpu,
    what: &str,
    x: &HalfTensor,
    p: &BnTensors,
    save_mean: &Tensor,
    save_invstd: &Tensor,
) -> Result<([usize; 4], f32)> {
    let d = half_activations(gpu, what, x, &[])?;
    let named = train_tensors(p, save_mean, save_invstd);
    per_channel(what, d[1], &named)?;
    check_stats_affine(what, d[1], p, named.to_vec())?;
    let m = d[0] * d[2] * d[3];
    Ok((d, (m as f64 / (m - 1) as f64) as f32))
}

/// [`stats_from_moments`] for an f16 `x` (`ops::conv::forward_stats_f16`).
pub(crate) fn stats_from_moments_f16(
    rec: &mut Recorder,
    x: &HalfTensor,
    part: &wgpu::Buffer,
    run: usize,
    p: &BnTensors,
    save_mean: &Tensor,
    save_invstd: &Tensor,
) -> Result<()> {
    let (d, unbias) = check_train_f16(rec.gpu, "batch norm stats_train_f16", x, p, save_mean, save_invstd)?;
    record_moments_final(rec, d, part, run, p, save_mean, save_invstd, unbias);
    Ok(())
}

/// The checks of [`backward_f16`]'s tensors; returns x's shape.
pub(crate) fn check_backward_f16(
    gpu: &Gpu,
    what: &str,
    x: &HalfTensor,
    dy: &HalfTensor,
    dx: &HalfTensor,
    b: &BnGrads,
) -> Result<[usize; 4]> {
    let d = half_activations(gpu, what, x, &[("dy", dy), ("dx", dx)])?;
    let BnGrads { gamma, beta, save_mean, save_invstd, dgamma, dbeta, scratch } = *b;
    let named = [
        ("gamma", gamma),
        ("beta", beta),
        ("save_mean", save_mean),
        ("save_invstd", save_invstd),
        ("dgamma", dgamma),
        ("dbeta", dbeta),
    ];
    per_channel(what, d[1], &named)?;
    if scratch.len() != 2 * d[1] {
        return Err(Error::Shape(format!("{what}: scratch must hold 2*C = {} elements", 2 * d[1])));
    }
    let mut all = named.to_vec();
    all.push(("scratch", scratch));
    distinct(what, &all)?;
    Ok(d)
}

/// [`backward_from_sums`] for f16 `x`, `dy` and `dx` (`ops::conv::backward_data_bn_f16`):
/// the gradients dgamma, dbeta in f32, `dx (+)=` rounded once to f16.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_from_sums_f16(
    rec: &mut Recorder,
    x: &HalfTensor,
    dy: &HalfTensor,
    b: &BnGrads,
    dx: &HalfTensor,
    accumulate_dx: bool,
    part: &wgpu::Buffer,
    run: usize,
) -> Result<()> {
    let d = check_backward_f16(rec.gpu, "batch norm backward_f16", x, dy, dx, b)?;
    record_sums_final(rec, d, b, part, run);
    let v = variant(rec.gpu, d);
    let binds = [
        (1, &x.buffer),
        (9, &dy.buffer),
        (10, &dx.buffer),
        (3, &b.gamma.buffer),
        (4, &b.beta.buffer),
        (7, &b.save_mean.buffer),
        (8, &b.save_invstd.buffer),
        (11, &b.scratch.buffer),
    ];
    let prm = params(d, v.apply_runs(d), true, false, accumulate_dx, 1.0);
    let views = Views::new_f16(rec, v, Some(x), Some(dy));
    half_dispatch(rec, d, v, "backward_apply", &prm, &binds, &views);
    Ok(())
}

/// [`apply_saved`] on f16 tensors: `y = ep(BN(x))` with given statistics (`y_old` read as f16
/// where `ep.add`; the result rounded once).
#[allow(clippy::too_many_arguments)]
pub fn apply_saved_f16(
    rec: &mut Recorder,
    x: &HalfTensor,
    y: &HalfTensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
    ep: Epilogue,
) -> Result<()> {
    const WHAT: &str = "batch norm apply_saved_f16";
    super::owned(rec, WHAT, [gamma, beta, mean, invstd])?;
    super::owned_f16(rec, WHAT, [x, y])?;
    let d = half_activations(rec.gpu, WHAT, x, &[("y", y)])?;
    let named = [("gamma", gamma), ("beta", beta), ("mean", mean), ("invstd", invstd)];
    per_channel(WHAT, d[1], &named)?;
    distinct(WHAT, &named)?;
    let v = variant(rec.gpu, d);
    let prm = params(d, v.apply_runs(d), ep.relu, ep.add, false, 1.0);
    let binds =
        [(1, &x.buffer), (2, &y.buffer), (3, &gamma.buffer), (4, &beta.buffer), (7, &mean.buffer), (8, &invstd.buffer)];
    let views = Views::new_f16(rec, v, Some(x), None);
    half_dispatch(rec, d, v, "normalize", &prm, &binds, &views);
    Ok(())
}

/// [`affine_relu`] on f16 tensors: `y = ReLU((x - mean) * scale + beta)` in f32 from the half
/// `x`, rounded once to the half `y`.
pub fn affine_relu_f16(rec: &mut Recorder, x: &HalfTensor, affine: &Tensor, y: &HalfTensor) -> Result<()> {
    const WHAT: &str = "batch norm affine_relu_f16";
    super::owned(rec, WHAT, [affine])?;
    super::owned_f16(rec, WHAT, [x, y])?;
    let d = x.nchw(format_args!("{WHAT}: x"))?;
    if y.dims() != x.dims() {
        return Err(Error::Shape(format!("{WHAT}: y is {:?}, x is {d:?}", y.dims())));
    }
    if y.buffer == x.buffer {
        return Err(Error::Invalid(format!("{WHAT}: y must be a tensor of its own")));
    }
    for (name, t) in [("x", x), ("y", y)] {
        split::whole_fits_f16(rec.gpu, &format!("{WHAT}: {name}"), t.dims(), t.buffer.size())?;
    }
    check_affine_out(WHAT, "affine", d[1], affine)?;
    record_affine_relu(rec, Shader::BatchNormF16, d, [&x.buffer, &y.buffer, &affine.buffer]);
    Ok(())
}

/// [`backward`] on f16 `x`, `dy` and `dx` (the parameter gradients f32, overwritten): the
/// sums, then `dx (+)=` rounded once to f16; with `relu`, `dy` masked by the recomputed
/// `[gamma * xhat + beta > 0]`.
pub fn backward_f16(
    rec: &mut Recorder,
    x: &HalfTensor,
    dy: &HalfTensor,
    b: &BnGrads,
    relu: bool,
    dx: &HalfTensor,
    accumulate_dx: bool,
) -> Result<()> {
    super::owned(rec, "batch norm backward_f16", b.tensors())?;
    super::owned_f16(rec, "batch norm backward_f16", [x, dy, dx])?;
    let d = check_backward_f16(rec.gpu, "batch norm backward_f16", x, dy, dx, b)?;
    partials_fit_f16(rec.gpu, "batch norm backward_f16", d)?;
    let v = variant(rec.gpu, d);
    let part = partials(rec.gpu, d);
    let stat = [(3, &b.gamma.buffer), (4, &b.beta.buffer), (7, &b.save_mean.buffer), (8, &b.save_invstd.buffer)];
    let mut binds = vec![(1, &x.buffer), (9, &dy.buffer), (14, &part)];
    binds.extend(stat);
    // One texture copy of x and dy (CPU adapters) serves both passes.
    let views = Views::new_f16(rec, v, Some(x), Some(dy));
    let prm = params(d, v.reduce_runs(d), relu, false, false, 1.0);
    half_dispatch(rec, d, v, "backward_partial", &prm, &binds, &views);
    rec.dispatch(
        Shader::BatchNorm,
        "backward_final",
        &prm,
        &[(11, &b.scratch.buffer), (12, &b.dgamma.buffer), (13, &b.dbeta.buffer), (14, &part)],
        [d[1] as u32, 1, 1],
    );
    let mut binds = vec![(1, &x.buffer), (9, &dy.buffer), (10, &dx.buffer), (11, &b.scratch.buffer)];
    binds.extend(stat);
    let prm = params(d, v.apply_runs(d), relu, false, accumulate_dx, 1.0);
    half_dispatch(rec, d, v, "backward_apply", &prm, &binds, &views);
    Ok(())
}
