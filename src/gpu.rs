//! The GPU context: instance, adapter, device and queue, the adapter's own limits, the optional
//! features this crate uses, and the compute pipelines, each built once per context and reused.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};

/// Which adapter to open. [`GpuOptions::from_env`] honours `WGPU_BACKEND`, `WGPU_POWER_PREF` and
/// `WGPU_ADAPTER_NAME`, as wgpu's own tools do, `RESNET_WGPU_COOP=0` and `RESNET_WGPU_SUBGROUPS=0`.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Backends to look at (Vulkan, Metal, DX12, GL, ...).
    pub backends: wgpu::Backends,
    /// Power preference when no adapter name is given.
    pub power: wgpu::PowerPreference,
    /// A case-insensitive substring of the adapter's name; `None` takes the preferred adapter.
    pub adapter_name: Option<String>,
    /// Lower the storage-binding limit below the adapter's (testing and debugging aid).
    pub max_binding_bytes: Option<u64>,
    /// Use wgpu's experimental cooperative matrices (tensor cores) for the f16 path's
    /// convolutions where the adapter offers them (see [`CoopMatrix`]); `false` keeps every
    /// kernel on plain arithmetic.
    pub cooperative_matrix: bool,
    /// Use subgroup operations where the adapter has them (`false`: run as on an adapter
    /// without them, the portable kernels only; a testing aid).
    pub subgroups: bool,
    /// Command buffers per submission while a network's passes are recorded ([`Gpu::stream`]);
    /// `None`: [`Stream::CHUNK`] on GPUs, all in one submission on CPU adapters.
    pub stream_chunk: Option<usize>,
    /// Build the tiled convolutions' modules, whose every index is in range by construction,
    /// without wgpu's bounds checks (`Some(false)`) or with them (`Some(true)`); `None`: without
    /// them on Vulkan GPUs only (see [`Gpu::shader_module_in_range`]). A testing aid.
    pub tiled_bounds_checks: Option<bool>,
    /// A file where the convolutions' autotuner keeps its choices for this adapter (created
    /// where there is none): a new context with the same file takes them instead of timing
    /// every candidate again. `None`: choices last as long as the context. See
    /// [`Gpu::tune_file`].
    pub tune_file: Option<std::path::PathBuf>,
    /// Fold a dispatch's workgroups into a second dimension past this many per dimension,
    /// instead of past the device's limit (65535 on most): a testing aid, so that the kernels'
    /// folded indices, which only large tensors reach otherwise, run on small ones
    /// (`RESNET_WGPU_MAX_WORKGROUPS`; see [`Gpu::groups_for`]).
    pub max_workgroups: Option<u32>,
    /// The bytes this context's buffers and textures may hold together: an allocation past it
    /// is [`Error::Allocation`] (see [`Gpu::allocation_scope`]). `None`: on a CPU adapter,
    /// [`memory_budget`]'s share of the host's memory (or of the process's cgroup limit, in a
    /// container), where its buffers live; elsewhere no cap beyond the driver's budget. The cap
    /// reads wgpu's counts of the memory allocated, kept on Vulkan and DX12 only: on another
    /// backend a cap given is refused ([`Error::Invalid`]) and a CPU adapter has none.
    pub memory_cap: Option<u64>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            backends: wgpu::Backends::all(),
            power: wgpu::PowerPreference::HighPerformance,
            adapter_name: None,
            max_binding_bytes: None,
            cooperative_matrix: true,
            subgroups: true,
            stream_chunk: None,
            tiled_bounds_checks: None,
            tune_file: None,
            max_workgroups: None,
            memory_cap: None,
        }
    }
}

impl GpuOptions {
    /// Defaults overridden by `WGPU_BACKEND`, `WGPU_POWER_PREF` and `WGPU_ADAPTER_NAME`, and by
    /// `RESNET_WGPU_COOP=0`, `RESNET_WGPU_SUBGROUPS=0` (or `off`), `RESNET_WGPU_STREAM_CHUNK=N`,
    /// `RESNET_WGPU_MAX_WORKGROUPS=N` and `RESNET_WGPU_TUNE_FILE=<path>`. A value that names
    /// nothing these take is said on stderr and ignored (a `WGPU_BACKEND` that names no backend
    /// at all is an error when the context opens).
    pub fn from_env() -> Self {
        let d = GpuOptions::default();
        GpuOptions {
            backends: env_backends().unwrap_or(d.backends),
            power: env_choice("WGPU_POWER_PREF", "high, low or none", |v| match v.to_lowercase().as_str() {
                "high" => Some(wgpu::PowerPreference::HighPerformance),
                "low" => Some(wgpu::PowerPreference::LowPower),
                "none" => Some(wgpu::PowerPreference::None),
                _ => None,
            })
            .unwrap_or(d.power),
            adapter_name: std::env::var("WGPU_ADAPTER_NAME").ok().filter(|s| !s.is_empty()),
            max_binding_bytes: None,
            cooperative_matrix: env_switch("RESNET_WGPU_COOP").unwrap_or(d.cooperative_matrix),
            subgroups: env_switch("RESNET_WGPU_SUBGROUPS").unwrap_or(d.subgroups),
            stream_chunk: env_number("RESNET_WGPU_STREAM_CHUNK"),
            tiled_bounds_checks: None,
            tune_file: std::env::var_os("RESNET_WGPU_TUNE_FILE").filter(|s| !s.is_empty()).map(Into::into),
            max_workgroups: env_number("RESNET_WGPU_MAX_WORKGROUPS"),
            memory_cap: None,
        }
    }
}

/// The value of environment variable `name` that `parse` makes of it, where it is set and not
/// empty; a value it cannot use (`None`) is reported on stderr, naming what it takes (`takes`),
/// and ignored. A typo in a variable must not pass for the default unseen.
pub(crate) fn env_choice<T>(name: &str, takes: &str, parse: impl FnOnce(&str) -> Option<T>) -> Option<T> {
    let v = std::env::var(name).ok().filter(|v| !v.is_empty())?;
    let parsed = parse(&v);
    if parsed.is_none() {
        eprintln!("{name}={v:?} ignored ({takes})");
    }
    parsed
}

/// `WGPU_BACKEND` as wgpu reads it (a comma-separated list), empty as unset, and each name it
/// does not know said on stderr: wgpu drops those silently, so `vulkn,gl` chose a GL adapter.
fn env_backends() -> Option<wgpu::Backends> {
    let v = std::env::var("WGPU_BACKEND").ok().filter(|v| !v.trim().is_empty())?;
    // wgpu-types' Backends::from_comma_list's names.
    const NAMES: [&str; 11] =
        ["vulkan", "vk", "dx12", "d3d12", "metal", "mtl", "opengl", "gles", "gl", "webgpu", "noop"];
    let unknown: Vec<&str> =
        v.split(',').map(str::trim).filter(|n| !NAMES.contains(&n.to_lowercase().as_str())).collect();
    if !unknown.is_empty() {
        eprintln!("WGPU_BACKEND: {} ignored (it takes vulkan, metal, dx12, gl)", unknown.join(", "));
    }
    Some(wgpu::Backends::from_comma_list(&v))
}

/// An on/off environment variable: `1`, `on`, `true` or `0`, `off`, `false`.
pub(crate) fn env_switch(name: &str) -> Option<bool> {
    env_choice(name, "on or off, 1 or 0", |v| match v.to_lowercase().as_str() {
        "1" | "on" | "true" => Some(true),
        "0" | "off" | "false" => Some(false),
        _ => None,
    })
}

/// A whole-number environment variable.
fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    env_choice(name, "a whole number", |v| v.parse().ok())
}

/// The cooperative matrices a context uses: square `size` x `size` fragments (8 or 16) of f16
/// operands with f32 accumulators, multiplied by subgroups of `subgroup` invocations (the
/// adapter's one subgroup size: the kernels assign fragments to subgroups by invocation index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopMatrix {
    pub size: u32,
    pub subgroup: u32,
}

/// The cooperative-matrix configuration the f16 path can use on `adapter`: 16x16x16 where
/// offered, else 8x8x8, f16 operands and f32 accumulators, on an adapter with one subgroup
/// size; `None` elsewhere.
fn coop_matrix(adapter: &wgpu::Adapter) -> Option<CoopMatrix> {
    let needed = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16;
    let info = adapter.get_info();
    if !adapter.features().contains(needed) || info.subgroup_min_size != info.subgroup_max_size {
        return None;
    }
    let props = adapter.cooperative_matrix_properties();
    let offered = |size: u32| {
        props.iter().any(|c| {
            c.m_size == size
                && c.n_size == size
                && c.k_size == size
                && c.ab_type == wgpu::CooperativeScalarType::F16
                && c.cr_type == wgpu::CooperativeScalarType::F32
        })
    };
    let size = [16, 8].into_iter().find(|&s| offered(s))?;
    Some(CoopMatrix { size, subgroup: info.subgroup_min_size })
}

/// The WGSL kernel families; one file each in `shaders/`, dispatched by the `ops` module of the
/// same name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shader {
    Conv,
    /// `conv.wgsl` with f16 activations: its register path on the f16 path (CPU adapters with
    /// `SHADER_F16`).
    ConvF16,
    BatchNorm,
    /// `batch_norm.wgsl` whose vec4 kernels read x and dy from textures (CPU adapters).
    BatchNormTexture,
    /// `batch_norm.wgsl` with f16 activations (the f16 path; adapters with `SHADER_F16` only).
    BatchNormF16,
    /// `BatchNormF16` whose vec4 kernels read x and dy from textures (CPU adapters).
    BatchNormF16Texture,
    Relu,
    /// `relu.wgsl` on f16 tensors (as `BatchNormF16`).
    ReluF16,
    Residual,
    /// `residual.wgsl` on f16 tensors (as `BatchNormF16`).
    ResidualF16,
    /// `cast.wgsl`: f32 <-> f16 (the f16 network's boundaries; adapters with `SHADER_F16` only).
    Cast,
    PoolFcLoss,
    Sgd,
    Probe,
    Mix,
    Gate,
}

impl Shader {
    /// Every family, for [`module_sources`].
    const ALL: [Shader; 16] = [
        Shader::Conv,
        Shader::ConvF16,
        Shader::BatchNorm,
        Shader::BatchNormTexture,
        Shader::BatchNormF16,
        Shader::BatchNormF16Texture,
        Shader::Relu,
        Shader::ReluF16,
        Shader::Residual,
        Shader::ResidualF16,
        Shader::Cast,
        Shader::PoolFcLoss,
        Shader::Sgd,
        Shader::Probe,
        Shader::Mix,
        Shader::Gate,
    ];

    /// The module's WGSL for a device with subgroup operations of one size `Some(size)`, of
    /// several sizes `Some(0)`, or none: conv.wgsl leaves out what follows its `// @subgroups`
    /// line without them; batch_norm.wgsl keeps one of its two `sum2` blocks.
    fn source(self, subgroups: Option<u32>) -> std::borrow::Cow<'static, str> {
        const RELU: &str = include_str!("../shaders/relu.wgsl");
        const RESIDUAL: &str = include_str!("../shaders/residual.wgsl");
        let (f32s, f16s) = (storage_type(false), storage_type(true));
        let text = match self {
            Shader::Conv | Shader::ConvF16 => {
                let text = include_str!("../shaders/conv.wgsl");
                let text = match text.find("// @subgroups") {
                    Some(end) if subgroups.is_none() => &text[..end],
                    _ => text,
                };
                let ty = if self == Shader::Conv { f32s } else { f16s };
                return format!("{ty}{text}").into();
            }
            Shader::BatchNorm => return format!("{f32s}{}", batch_norm_source(subgroups, "texture")).into(),
            Shader::BatchNormTexture => return format!("{f32s}{}", batch_norm_source(subgroups, "buffer")).into(),
            Shader::BatchNormF16 => return format!("{f16s}{}", batch_norm_source(subgroups, "texture")).into(),
            Shader::BatchNormF16Texture => return format!("{f16s}{}", batch_norm_source(subgroups, "buffer")).into(),
            Shader::Relu => return format!("{f32s}{RELU}").into(),
            Shader::ReluF16 => return format!("{f16s}{RELU}").into(),
            Shader::Residual => return format!("{f32s}{RESIDUAL}").into(),
            Shader::ResidualF16 => return format!("{f16s}{RESIDUAL}").into(),
            Shader::Cast => include_str!("../shaders/cast.wgsl"),
            Shader::PoolFcLoss => include_str!("../shaders/pool_fc_loss.wgsl"),
            Shader::Sgd => include_str!("../shaders/sgd.wgsl"),
            Shader::Probe => include_str!("../shaders/probe.wgsl"),
            Shader::Mix => include_str!("../shaders/mix.wgsl"),
            Shader::Gate => include_str!("../shaders/gate.wgsl"),
        };
        text.into()
    }
}

/// The WGSL of every kind of module this crate builds, labelled, without a device: each
/// [`Shader`] family for adapters without subgroups, with subgroups of several sizes and of 32,
/// and an instance of each configuration and variant of the convolution templates (tiled, on
/// plain arithmetic and on cooperative matrices of 16x16 and 8x8 fragments, and Winograd).
/// `tests/portability.rs` translates each for Metal and DX12, which no test adapter here runs.
#[doc(hidden)]
pub fn module_sources() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for shader in Shader::ALL {
        for subgroups in [None, Some(0), Some(32)] {
            let wgsl = shader.source(subgroups).into_owned();
            if !out.iter().any(|(_, w)| *w == wgsl) {
                out.push((format!("{shader:?} subgroups {subgroups:?}"), wgsl));
            }
        }
    }
    out.extend(crate::ops::conv::module_sources());
    out
}

/// The head of a module whose storage type `ST` serves both paths: `ST` itself and `as_st(v)`,
/// `v` as an `ST` tensor would hold it (`shaders/f16_round.wgsl` for f16, else the identity).
pub(crate) fn storage_type(half: bool) -> String {
    match half {
        true => format!("enable f16;\nalias ST = f16;\n{}", include_str!("../shaders/f16_round.wgsl")),
        false => "alias ST = f32;\nfn as_st(v: f32) -> f32 { return v; }\n".to_string(),
    }
}

/// batch_norm.wgsl with one of its two `sum2` blocks: the subgroup one (with its `SG`) where
/// the device's subgroups have one size, a power of two from 4 to the workgroup's 64, else the
/// workgroup-memory tree; and one of its two blocks of vec4 loads, without `loads`' (`buffer` or
/// `texture`); its loops marked `// @unroll` written out ([`unroll`]: the wide kernels' over a
/// thread's `WIDE` elements, `stats_partial4`'s over its four vec4s).
fn batch_norm_source(subgroups: Option<u32>, loads: &str) -> String {
    const TEXT: &str = include_str!("../shaders/batch_norm.wgsl");
    let (left_out, head) = match subgroups.filter(|s| s.is_power_of_two() && (4..=64).contains(s)) {
        Some(sg) => ("tree", format!("const SG: u32 = {sg}u;\n")),
        None => ("subgroups", String::new()),
    };
    let text = without_block(&without_block(TEXT, left_out), &format!("{loads}-loads"));
    head + &unroll(&text, &[("WIDE", crate::ops::batch_norm::WIDE)])
}

/// `text` without its block `name`: the lines from `// @{name}-begin` to `// @{name}-end` (a
/// shader's alternative definitions, of which the host keeps one).
pub(crate) fn without_block(text: &str, name: &str) -> String {
    let (begin, end) = (format!("// @{name}-begin"), format!("// @{name}-end"));
    let mut s = text.to_string();
    match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) => s.replace_range(b..e + end.len(), ""),
        _ => unreachable!("the shader marks its {name} block"),
    }
    s
}

/// The marker of a loop to unroll, at the end of its header line.
pub(crate) const UNROLL: &str = " // @unroll\n";

/// `src` with every loop whose header line ends in `// @unroll` written out: `for (var v = a;
/// v < b; v++) {` (or `v += step`), the bounds literals or names in `consts`, becomes one block
/// `{ const v = <value>u; <body> }` per value, so that whatever the body indexes by `v` it
/// indexes by a constant (`shaders/conv_tiled.wgsl`'s comment says why). Nested marked loops
/// unroll too.
pub(crate) fn unroll(src: &str, consts: &[(&str, usize)]) -> String {
    let value = |t: &str| -> usize {
        let t = t.trim();
        match t.trim_end_matches('u').parse() {
            Ok(v) => v,
            Err(_) => match consts.iter().find(|(k, _)| *k == t) {
                Some((_, v)) => *v,
                None => unreachable!("an unrolled loop's bound {t:?} is a literal or a template constant"),
            },
        }
    };
    let mut s = src.to_string();
    while let Some(mark) = s.find(UNROLL) {
        let start = s[..mark].rfind('\n').map_or(0, |i| i + 1);
        let header = s[start..mark].trim();
        // for (var v = a; v < b; v++) {   or   for (var v = a; v < b; v += step) {
        let inner = header.strip_prefix("for (var ").and_then(|h| h.strip_suffix(") {"));
        let parts: Option<[&str; 3]> = inner.and_then(|h| h.split(';').collect::<Vec<_>>().try_into().ok());
        let Some([init, cond, next]) = parts else { unreachable!("an unrolled loop's header: {header}") };
        let (var, a) = init.split_once('=').map(|(v, a)| (v.trim(), value(a))).unwrap_or_default();
        let b = cond.split_once('<').map(|(_, b)| value(b));
        let next = next.trim();
        let step = if next == format!("{var}++") { Some(1) } else { next.split_once("+=").map(|(_, s)| value(s)) };
        let (Some(b), Some(step)) = (b, step.filter(|&s| s > 0 && !var.is_empty())) else {
            unreachable!("an unrolled loop's header: {header}")
        };
        // The body runs to the brace that closes the header's.
        let body_start = mark + UNROLL.len();
        let mut depth = 1;
        let mut end = body_start;
        for (i, c) in s[body_start..].char_indices() {
            depth += match c {
                '{' => 1,
                '}' => -1,
                _ => 0,
            };
            if depth == 0 {
                end = body_start + i;
                break;
            }
        }
        assert_eq!(depth, 0, "an unrolled loop without its closing brace: {header}");
        // Up to the closing brace's line (the body ends in a newline).
        let body = &s[body_start..s[..end].rfind('\n').map_or(end, |i| i + 1).max(body_start)];
        let indent = &s[start..start + s[start..].len() - s[start..].trim_start().len()];
        let mut out = String::new();
        for v in (a..b).step_by(step) {
            out.push_str(&format!("{indent}{{\n{indent}    const {var} = {v}u;\n{body}{indent}}}\n"));
        }
        // Past the closing brace and its line's end.
        let after = s[end..].find('\n').map_or(s.len(), |i| end + i + 1);
        s.replace_range(start..after, &out);
    }
    s
}

/// A pipeline's key: shader, entry point and the override constants' values (`None`: none, the
/// common case, looked up without allocating).
type PipelineKey = (Shader, &'static str, Option<String>);

/// What was opened, for printing.
#[derive(Clone, Debug)]
pub struct AdapterReport {
    pub name: String,
    pub backend: wgpu::Backend,
    pub device_type: wgpu::DeviceType,
    pub driver: String,
    pub features: wgpu::Features,
    pub max_storage_binding: u64,
    pub max_buffer: u64,
    pub max_workgroup_storage: u32,
    pub max_invocations: u32,
    /// The cooperative matrices in use, if any.
    pub coop: Option<CoopMatrix>,
}

impl std::fmt::Display for AdapterReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({:?}, {:?}, driver {}); features [{}]; storage binding {} MiB, buffer {} MiB, \
             workgroup storage {} KiB, {} invocations/workgroup",
            self.name,
            self.backend,
            self.device_type,
            self.driver,
            feature_names(self.features),
            self.max_storage_binding >> 20,
            self.max_buffer >> 20,
            self.max_workgroup_storage >> 10,
            self.max_invocations
        )?;
        if let Some(c) = self.coop {
            write!(f, "; cooperative matrix {0}x{0}x{0} f16->f32, subgroups of {1}", c.size, c.subgroup)?;
        }
        Ok(())
    }
}

fn feature_names(f: wgpu::Features) -> String {
    let mut v = Vec::new();
    for (flag, name) in OPTIONAL_FEATURES {
        if f.contains(*flag) {
            v.push(*name);
        }
    }
    v.join(", ")
}

/// Optional features turned on where the adapter has them.
const OPTIONAL_FEATURES: &[(wgpu::Features, &str)] = &[
    (wgpu::Features::SHADER_F16, "shader-f16"),
    (wgpu::Features::SUBGROUP, "subgroup"),
    (wgpu::Features::TIMESTAMP_QUERY, "timestamp-query"),
];

/// An open GPU: device, queue, limits, and the pipeline cache.
pub struct Gpu {
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub report: AdapterReport,
    /// The largest buffer this context will bind to one shader. Tensors may be larger (up to
    /// the adapter's largest buffer): the ops run them in chunks that fit.
    pub max_binding_bytes: u64,
    /// This context's number, unique in the process (see [`Gpu::context`]).
    context: u64,
    /// The device's limit on workgroups per dimension of one dispatch.
    max_groups: u32,
    /// Where [`Gpu::groups_for`] folds: `max_groups`, or [`GpuOptions::max_workgroups`] below it.
    fold_at: u32,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    modules: Mutex<HashMap<Shader, wgpu::ShaderModule>>,
    /// [`Gpu::cached`]'s values: per (key type, value type), a map from key to value.
    cache: Mutex<HashMap<TypeId, Box<dyn Any + Send + Sync>>>,
    /// The first device error no scope caught since [`Gpu::take_error`] last looked.
    uncaptured: Arc<Mutex<Option<String>>>,
    /// Why the device was lost, once it is: from then on wgpu hands out invalid buffers
    /// without an error, so every later submission and allocation scope says so instead.
    lost: Arc<Mutex<Option<String>>>,
    submit_lock: Mutex<()>,
    /// Bytes of buffers requested through [`Gpu::create_buffer`] (and of the textures of
    /// [`Gpu::cached_texture`]) so far (never decreases).
    requested: AtomicU64,
    /// The device's alignment of uniform-buffer binding offsets (a parameter block's slot).
    uniform_align: u64,
    /// Command buffers per submission of [`Gpu::stream`].
    stream_chunk: usize,
    /// Whether [`Gpu::shader_module_in_range`] keeps wgpu's bounds checks.
    tiled_bounds_checks: bool,
    /// Where the autotuner's choices are kept across contexts ([`GpuOptions::tune_file`]).
    tune_file: Option<crate::tune_file::TuneFile>,
    /// What the autotuner did so far ([`Gpu::tuning`]).
    tuning: Mutex<Tuning>,
    /// The bytes this context's buffers may hold ([`GpuOptions::memory_cap`]), and where the
    /// figure comes from.
    memory_cap: Option<(u64, String)>,
}

/// What a context's autotuner did: choices it timed (and the wall time that took, the
/// candidates' pipeline builds included) and choices it read back from the tune file.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tuning {
    /// Choices made by timing the candidates.
    pub timed: usize,
    /// The wall time those took, in seconds.
    pub seconds: f64,
    /// Choices read back from the tune file.
    pub from_file: usize,
}

/// What the device holds now, from wgpu's internal counters: live buffers and textures and
/// the memory allocated for them (every buffer: tensors, scratch, parameter blocks, staging).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryCounts {
    pub buffers: i64,
    pub buffer_bytes: i64,
    pub textures: i64,
    pub texture_bytes: i64,
}

/// Lists the adapters of the given backends, one line each.
pub fn list_adapters(backends: wgpu::Backends) -> Vec<wgpu::AdapterInfo> {
    let instance = make_instance(backends);
    pollster::block_on(instance.enumerate_adapters(backends)).iter().map(|a| a.get_info()).collect()
}

/// The share of the device's memory budget, in percent, past which wgpu refuses a new buffer
/// (out of memory: [`Error::Allocation`] inside [`Gpu::allocation_scope`]) where the driver
/// reports a budget (Vulkan's `VK_EXT_memory_budget`, DX12): 95 by default, or
/// `RESNET_WGPU_MEMORY_BUDGET` (1 to 100, or `off` for no such check). Drivers do not all refuse
/// in time themselves: Mesa's lavapipe, whose memory is the host's, hands out buffers until the
/// kernel kills the process. Read once, when the process's first context opens; `None`: off.
pub fn memory_budget() -> Option<u8> {
    static PERCENT: OnceLock<Option<u8>> = OnceLock::new();
    *PERCENT.get_or_init(|| {
        env_choice("RESNET_WGPU_MEMORY_BUDGET", "a percent from 1 to 100, or off", |v| match v.parse::<u8>() {
            Ok(p @ 1..=100) => Some(Some(p)),
            _ if v.eq_ignore_ascii_case("off") => Some(None),
            _ => None,
        })
        .unwrap_or(Some(95))
    })
}

/// The memory this process may use, in bytes (Linux): the host's (`MemTotal`), or less where
/// its cgroup caps it (a container's memory limit, which `/proc/meminfo` does not show); `None`
/// where it cannot be read.
fn host_memory() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    memory_limit(&read("/proc/meminfo")?, &read("/proc/self/cgroup").unwrap_or_default(), read)
}

/// [`host_memory`] from the text of `/proc/meminfo` and `/proc/self/cgroup`, reading the
/// cgroup files with `read`: the least of `MemTotal` and every limit on the process's cgroup
/// and its ancestors (v2 `memory.max`, v1 `memory.limit_in_bytes`; `max` and v1's huge
/// "unlimited" are no limit).
fn memory_limit(meminfo: &str, cgroups: &str, read: impl Fn(&str) -> Option<String>) -> Option<u64> {
    let kib = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().strip_suffix("kB")?;
    let total = kib.trim().parse::<u64>().ok()? * 1024;
    let mut files = Vec::new();
    for line in cgroups.lines() {
        // "0::/path" (v2), "N:memory:/path" (v1); the files under each mount, up to its root.
        let (base, file, path) = match line.split_once(':').map(|(_, rest)| rest) {
            Some(rest) if rest.starts_with(':') => ("/sys/fs/cgroup", "memory.max", &rest[1..]),
            Some(rest) if rest.split(':').next().is_some_and(|c| c.split(',').any(|c| c == "memory")) => {
                ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", rest.split_once(':').map_or("", |r| r.1))
            }
            _ => continue,
        };
        let mut dir = path.trim_end_matches('/').to_string();
        loop {
            files.push(format!("{base}{dir}/{file}"));
            match dir.rfind('/') {
                Some(i) => dir.truncate(i),
                None => break,
            }
        }
    }
    let limits = files.iter().filter_map(|f| read(f)?.trim().parse::<u64>().ok());
    Some(limits.fold(total, u64::min))
}

/// The process's one wgpu instance for `backends`. Contexts share it so that a tensor of one
/// context passed to another is an error wgpu reports (its device checks), not a lookup of the
/// other context's resource of the same id: every instance numbers its buffers from the start.
fn make_instance(backends: wgpu::Backends) -> wgpu::Instance {
    static INSTANCES: Mutex<Vec<(wgpu::Backends, wgpu::Instance)>> = Mutex::new(Vec::new());
    let mut instances = INSTANCES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, i)) = instances.iter().find(|(b, _)| *b == backends) {
        return i.clone();
    }
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    desc.memory_budget_thresholds.for_resource_creation = memory_budget();
    let instance = wgpu::Instance::new(desc);
    instances.push((backends, instance.clone()));
    instance
}

/// Whether wgpu counts the memory allocated on `backend` ([`Gpu::memory`]), which a memory cap
/// reads: wgpu-hal keeps the counts on Vulkan and DX12 only.
pub fn counts_memory(backend: wgpu::Backend) -> bool {
    matches!(backend, wgpu::Backend::Vulkan | wgpu::Backend::Dx12)
}

thread_local! {
    /// The allocation errors of this thread's scratch resources while a caller captures them
    /// ([`capture_allocation_errors`]).
    static CAPTURED: std::cell::RefCell<Option<Vec<String>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the allocation errors of the scratch buffers and textures it asks for
/// ([`Gpu::cached_buffer`], [`Gpu::cached_texture`]) returned beside its result, instead of left
/// for the context's next submission: the autotuner records its candidates on threads of their
/// own, and each must answer for its own scratch, not fail the next one submitted.
pub(crate) fn capture_allocation_errors<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let outer = CAPTURED.with(|c| c.replace(Some(Vec::new())));
    let out = f();
    let errors = CAPTURED.with(|c| c.replace(outer)).unwrap_or_default();
    (out, errors)
}

impl Gpu {
    /// Opens the adapter the environment asks for (see [`GpuOptions::from_env`]).
    pub fn new() -> Result<Gpu> {
        Gpu::with_options(&GpuOptions::from_env())
    }

    /// Opens an adapter by explicit options.
    pub fn with_options(opts: &GpuOptions) -> Result<Gpu> {
        pollster::block_on(Gpu::open(opts))
    }

    /// This context's number, unique in the process. Tensors, labels and networks keep the
    /// number of the context that made them, and work only with that one: given another, their
    /// methods return [`Error::Invalid`] (see [`Gpu::check_owns`]).
    pub fn context(&self) -> u64 {
        self.context
    }

    /// `Ok` where `what`, made on context `owner`, is this context's; else an error naming both.
    /// A context's buffers and pipelines mean nothing to another's device.
    pub fn check_owns(&self, what: &str, owner: u64) -> Result<()> {
        if owner == self.context {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "{what}: made on GPU context {owner}, given with context {}; tensors, labels and networks \
             work only with the Gpu that made them",
            self.context
        )))
    }

    async fn open(opts: &GpuOptions) -> Result<Gpu> {
        // wgpu reads a misspelt WGPU_BACKEND as no backends at all: say so, rather than send
        // the user to install a driver they have.
        if opts.backends.is_empty() {
            let env = std::env::var("WGPU_BACKEND").map(|v| format!(" (WGPU_BACKEND={v:?} names none)"));
            return Err(Error::Invalid(format!(
                "no backends to look for adapters in{}: WGPU_BACKEND takes a comma-separated list of \
                 vulkan, metal, dx12, gl",
                env.unwrap_or_default()
            )));
        }
        let instance = make_instance(opts.backends);
        let adapters = instance.enumerate_adapters(opts.backends).await;
        let seen = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?})", i.name, i.backend)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let adapter = match &opts.adapter_name {
            Some(name) => {
                let want = name.to_lowercase();
                let found = adapters.iter().find(|a| a.get_info().name.to_lowercase().contains(&want)).cloned();
                // Adapters there, none of that name: a name to fix, not a driver to install.
                if found.is_none() && !adapters.is_empty() {
                    return Err(Error::Invalid(format!(
                        "no adapter's name contains {name:?} (WGPU_ADAPTER_NAME, or GpuOptions::adapter_name); \
                         adapters seen: [{seen}]"
                    )));
                }
                found
            }
            None => instance
                .request_adapter(&wgpu::RequestAdapterOptions { power_preference: opts.power, ..Default::default() })
                .await
                .ok(),
        };
        let adapter = adapter.ok_or_else(|| Error::NoAdapter {
            wanted: format!(
                "backends {:?}{}",
                opts.backends,
                opts.adapter_name.as_ref().map(|n| format!(", name containing {n:?}")).unwrap_or_default()
            ),
            seen,
        })?;

        let mut features = wgpu::Features::empty();
        for (f, _) in OPTIONAL_FEATURES {
            if adapter.features().contains(*f) && (opts.subgroups || *f != wgpu::Features::SUBGROUP) {
                features |= *f;
            }
        }
        let coop = coop_matrix(&adapter).filter(|_| opts.cooperative_matrix && opts.subgroups);
        let mut experimental = wgpu::ExperimentalFeatures::disabled();
        if coop.is_some() {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
            // SAFETY: wgpu's experimental cooperative matrices are used by the f16 path's tiled
            // convolutions only (`conv_tiled_coop.wgsl`), whose results the tests check against
            // the CPU reference wherever the adapter offers them; `RESNET_WGPU_COOP=0` (or
            // `GpuOptions::cooperative_matrix`) leaves the feature off.
            experimental = unsafe { wgpu::ExperimentalFeatures::enabled() };
        }
        static CONTEXTS: AtomicU64 = AtomicU64::new(1);
        let context = CONTEXTS.fetch_add(1, Ordering::Relaxed);
        // The adapter's own limits, not wgpu's conservative defaults.
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some(&format!("resnet-wgpu context {context}")),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: experimental,
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await?;

        let uncaptured = Arc::new(Mutex::new(None::<String>));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let msg = match e {
                // wgpu says only "Out of Memory", and says it where a small buffer of the ops
                // is refused, not the tensors that filled the memory.
                wgpu::Error::OutOfMemory { .. } => "out of memory (the device's; on a CPU adapter, the host's): \
                                                    a smaller batch or network needs less"
                    .to_string(),
                e => e.to_string(),
            };
            if let Ok(mut slot) = sink.lock() {
                slot.get_or_insert(msg);
            }
        }));
        // wgpu loses the device where a buffer of its own is refused (a write's staging copy
        // out of memory), and calls this then, or once the queue is idle after `destroy`.
        let lost = Arc::new(Mutex::new(None::<String>));
        let sink = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            let why = match reason {
                wgpu::DeviceLostReason::Destroyed => "destroyed".to_string(),
                _ if msg.is_empty() => "lost".to_string(),
                _ => format!("lost ({msg})"),
            };
            if let Ok(mut slot) = sink.lock() {
                slot.get_or_insert(why);
            }
        });

        let info = adapter.get_info();
        // At most i32::MAX elements in one binding: the shaders index in u32 and offset in i32.
        let max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size).min(i32::MAX as u64 * 4);
        let report = AdapterReport {
            name: info.name.clone(),
            backend: info.backend,
            device_type: info.device_type,
            driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
            features,
            max_storage_binding: limits.max_storage_buffer_binding_size as u64,
            max_buffer: limits.max_buffer_size,
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            coop,
        };
        let cpu = report.device_type == wgpu::DeviceType::Cpu;
        let stream_chunk = opts.stream_chunk.unwrap_or(if cpu { usize::MAX } else { Stream::CHUNK });
        // The cap reads wgpu's counts of the bytes allocated, which wgpu keeps on Vulkan and
        // DX12 only: elsewhere a cap would never be reached. One asked for is refused; the CPU
        // adapters' default is left out (`info` shows none).
        let counted = counts_memory(report.backend);
        if opts.memory_cap.is_some() && !counted {
            return Err(Error::Invalid(format!(
                "GpuOptions::memory_cap: wgpu counts the memory allocated on Vulkan and DX12 only, not on \
                 {:?}, so no cap can hold there",
                report.backend
            )));
        }
        let memory_cap = match (opts.memory_cap, cpu && counted, memory_budget(), host_memory()) {
            (Some(cap), ..) => Some((cap, "GpuOptions::memory_cap".to_string())),
            (None, true, Some(percent), Some(bytes)) => Some((
                bytes / 100 * percent as u64,
                format!(
                    "{percent}% of the host's memory (or of the process's cgroup limit), where a CPU \
                     adapter keeps its buffers: RESNET_WGPU_MEMORY_BUDGET"
                ),
            )),
            _ => None,
        };
        let tiled_bounds_checks = opts.tiled_bounds_checks.unwrap_or_else(|| in_range_checks(&report));
        let max_binding_bytes = opts.max_binding_bytes.map_or(max_binding, |m| m.min(max_binding));
        let max_groups = limits.max_compute_workgroups_per_dimension.max(1);
        let fold_at = opts.max_workgroups.map_or(max_groups, |m| m.clamp(1, max_groups));
        let tune_file = match &opts.tune_file {
            Some(path) => {
                let context = tune_context(&report, &info, tiled_bounds_checks, max_binding_bytes);
                Some(crate::tune_file::TuneFile::open(path, context)?)
            }
            None => None,
        };
        Ok(Gpu {
            context,
            adapter,
            device,
            queue,
            max_binding_bytes,
            max_groups,
            fold_at,
            pipelines: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            uncaptured,
            lost,
            submit_lock: Mutex::new(()),
            requested: AtomicU64::new(0),
            uniform_align: limits.min_uniform_buffer_offset_alignment.max(4) as u64,
            stream_chunk,
            tiled_bounds_checks,
            tune_file,
            tuning: Mutex::new(Tuning::default()),
            memory_cap,
            report,
        })
    }

    /// A buffer of `size` bytes, counted in the bytes an [`Gpu::allocation_scope`] reports.
    pub fn create_buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.requested.fetch_add(size, Ordering::Relaxed);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    }

    /// Runs `f`, which allocates `what`, inside error scopes: an out-of-memory or validation
    /// error the device raises meanwhile (on this thread) is returned as [`Error::Allocation`]
    /// naming `what` and the bytes of buffers `f` requested, instead of reaching the
    /// uncaptured-error handler (or aborting). So is an allocation that leaves the context's
    /// buffers past its [`GpuOptions::memory_cap`]; what `f` made is then dropped.
    pub fn allocation_scope<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let before = self.requested.load(Ordering::Relaxed);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        // Scopes pop innermost first.
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        // A lost device's buffers are invalid without an error in any scope.
        self.check_lost()?;
        let detail = match (o, v) {
            (None, None) => match self.past_memory_cap().and_then(|_| self.past_memory_cap_flushed()) {
                None => return out,
                Some(detail) => detail, // `out`, dropped, frees what `f` made
            },
            // Where memory ran out matters less than what fills it.
            (Some(e), _) => {
                let held = self.memory();
                format!("{e} (the device holds {} MiB in {} buffers)", held.buffer_bytes >> 20, held.buffers)
            }
            (None, Some(e)) => e.to_string(),
        };
        Err(Error::Allocation {
            what: what.to_string(),
            bytes: self.requested.load(Ordering::Relaxed) - before,
            detail,
        })
    }

    /// The bytes this context's buffers may hold ([`GpuOptions::memory_cap`]), and where the
    /// figure comes from; `None`: no cap beyond the driver's budget.
    pub fn memory_cap(&self) -> Option<(u64, &str)> {
        self.memory_cap.as_ref().map(|(cap, from)| (*cap, from.as_str()))
    }

    /// [`Gpu::past_memory_cap`] once the queued writes have run: wgpu stages each write in a
    /// buffer as large as the data, counted until the submission after it completes, so a
    /// tensor uploaded a moment before counted twice.
    fn past_memory_cap_flushed(&self) -> Option<String> {
        let _serial = self.submit_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.queue.submit([]);
        // A device error here is the next wait's to report; the count is read either way.
        let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
        self.past_memory_cap()
    }

    /// Why this context's buffers now hold more than its [`GpuOptions::memory_cap`], if they
    /// do. On a CPU adapter the cap stands in for the driver: lavapipe hands out buffers without
    /// touching their memory, so neither it nor the budget it reports (Mesa 26's counts only the
    /// memory in use) refuses in time, and the kernel kills the process once the passes write
    /// them.
    fn past_memory_cap(&self) -> Option<String> {
        let (cap, from) = self.memory_cap.as_ref()?;
        let held = self.memory();
        let bytes = (held.buffer_bytes + held.texture_bytes).max(0) as u64;
        (bytes > *cap)
            .then(|| format!("this context's buffers would hold {bytes} bytes, past its cap of {cap} ({from})"))
    }

    /// Live buffers and textures of this device and their memory (wgpu's internal counters,
    /// built with its `counters` feature; the memory is counted on Vulkan and DX12 only, 0
    /// elsewhere). Buffers freed by Rust are released once the GPU is done with them: read
    /// after [`Gpu::wait`] for settled figures.
    pub fn memory(&self) -> MemoryCounts {
        let hal = self.device.get_internal_counters().hal;
        MemoryCounts {
            buffers: hal.buffers.read() as i64,
            buffer_bytes: hal.buffer_memory.read() as i64,
            textures: hal.textures.read() as i64,
            texture_bytes: hal.texture_memory.read() as i64,
        }
    }

    /// Whether the device was opened with timestamp queries.
    pub fn has_timestamps(&self) -> bool {
        self.report.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// A shader module from WGSL, with the runtime checks of [`shader_checks`].
    pub fn shader_module(&self, label: &str, wgsl: &str) -> wgpu::ShaderModule {
        let desc = wgpu::ShaderModuleDescriptor { label: Some(label), source: wgpu::ShaderSource::Wgsl(wgsl.into()) };
        // SAFETY: `shader_checks` keeps wgpu's bounds checks on every buffer and array access
        // unless the user turns them off by name (RESNET_WGPU_SHADER_CHECKS=none), so a kernel
        // cannot touch memory outside its bindings. What it turns off: the counters naga adds to
        // bound every loop (which keep drivers from unrolling the register-tile loops, leaving
        // the accumulators in local memory) and the guards on integer division; every loop bound
        // and divisor in these kernels comes from shapes validated on the host.
        unsafe { self.device.create_shader_module_trusted(desc, shader_checks(self.report.device_type)) }
    }

    /// As [`Gpu::shader_module`], for a module whose every index is in range by construction:
    /// each storage access is guarded by the shape it reads or writes, or bounded by sizes the
    /// host validated, and each workgroup-array index is bounded by the module's constants (the
    /// tiled convolutions; `shaders/conv_tiled.wgsl` says why each index holds). On Vulkan GPUs
    /// it is built without wgpu's bounds checks too: naga's clamp on every workgroup-tile access
    /// cost the convolutions 4% to 7% on the H200 (BENCHMARKS.md, cfa22d4).
    pub fn shader_module_in_range(&self, label: &str, wgsl: &str) -> wgpu::ShaderModule {
        let desc = wgpu::ShaderModuleDescriptor { label: Some(label), source: wgpu::ShaderSource::Wgsl(wgsl.into()) };
        let mut checks = shader_checks(self.report.device_type);
        checks.bounds_checks &= self.tiled_bounds_checks;
        // SAFETY: as `shader_module`'s, and where the bounds checks are off as well: the module's
        // indices are in range by construction (above), and on Vulkan wgpu turns on the
        // driver's robust buffer access, so even an index this missed could not reach past
        // a binding. On every other backend and on CPU adapters the checks stay on.
        unsafe { self.device.create_shader_module_trusted(desc, checks) }
    }

    /// The compute pipeline for `entry` in `shader`, built on first use and cached for the life
    /// of this context.
    pub fn pipeline(&self, shader: Shader, entry: &'static str) -> wgpu::ComputePipeline {
        self.pipeline_with(shader, entry, &[])
    }

    /// As [`Gpu::pipeline`], with values for the shader's `override` constants (one pipeline per
    /// set of values).
    pub fn pipeline_with(
        &self,
        shader: Shader,
        entry: &'static str,
        constants: &[(&str, f64)],
    ) -> wgpu::ComputePipeline {
        let key = (shader, entry, (!constants.is_empty()).then(|| format!("{constants:?}")));
        let mut cache = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.get(&key) {
            return p.clone();
        }
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        let module = modules
            .entry(shader)
            .or_insert_with(|| {
                let subgroups = self.report.features.contains(wgpu::Features::SUBGROUP).then(|| {
                    let info = self.adapter.get_info();
                    if info.subgroup_min_size == info.subgroup_max_size { info.subgroup_min_size } else { 0 }
                });
                self.shader_module(&format!("{shader:?}"), &shader.source(subgroups))
            })
            .clone();
        let p = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants, ..Default::default() },
            cache: None,
        });
        cache.insert(key, p.clone());
        p
    }

    /// A per-context value of the ops (scratch buffers and textures, tile choices): built by
    /// `make` on the first call with `key` and type `T`, then shared by later calls for the life
    /// of the context. wgpu handles are reference-counted, so the clone of a cached buffer is the
    /// same buffer. `make` runs without the cache locked (it may use the cache itself); of two
    /// threads racing to build one key, the first to finish wins.
    pub fn cached<K, T>(&self, key: K, make: impl FnOnce() -> T) -> T
    where
        K: Hash + Eq + Send + Sync + 'static,
        T: Clone + Send + Sync + 'static,
    {
        let Ok(v) = self.try_cached(key, || Ok::<T, std::convert::Infallible>(make()));
        v
    }

    /// As [`Gpu::cached`], for a value `make` may fail to build: its error is returned and
    /// nothing is kept, so the next call with `key` builds again.
    fn try_cached<K, T, E>(&self, key: K, make: impl FnOnce() -> std::result::Result<T, E>) -> std::result::Result<T, E>
    where
        K: Hash + Eq + Send + Sync + 'static,
        T: Clone + Send + Sync + 'static,
    {
        // Keys are values, not formatted strings: the ops look their plans and scratch buffers
        // up on every dispatch, and the formatting cost more than the lookup.
        let lock = || self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let id = TypeId::of::<(K, T)>();
        if let Some(v) = lock().get(&id).and_then(|m| m.downcast_ref::<HashMap<K, T>>()).and_then(|m| m.get(&key)) {
            return Ok(v.clone());
        }
        let v = make()?;
        let mut cache = lock();
        let map = cache.entry(id).or_insert_with(|| Box::new(HashMap::<K, T>::new()));
        let map = map.downcast_mut::<HashMap<K, T>>().expect("cache maps are keyed by their types");
        Ok(map.entry(key).or_insert(v).clone())
    }

    /// A buffer kept for the life of the context under `key` (as [`Gpu::cached`]): the ops'
    /// scratch buffers, made while a pass is recorded. One the device refuses (out of memory)
    /// or that takes the context past its [`GpuOptions::memory_cap`] is not kept, so a later
    /// pass tries again instead of failing on it for good; the [`Error::Allocation`]'s text,
    /// naming `label`, comes back from the next wait or submission as an [`Error::Device`], as
    /// the device's own errors do, and the submission recorded with it does not run.
    pub fn cached_buffer<K>(&self, key: K, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer
    where
        K: Hash + Eq + Send + Sync + 'static,
    {
        self.cached_resource(key, label, || self.create_buffer(label, size, usage))
    }

    /// As [`Gpu::cached_buffer`], for a texture (the register path's operand textures).
    pub fn cached_texture<K>(&self, key: K, desc: &wgpu::TextureDescriptor) -> wgpu::Texture
    where
        K: Hash + Eq + Send + Sync + 'static,
    {
        let texels = desc.size.width as u64 * desc.size.height as u64 * desc.size.depth_or_array_layers as u64;
        let bytes = texels * desc.format.block_copy_size(None).unwrap_or(0) as u64;
        let label = desc.label.unwrap_or("a texture");
        self.cached_resource(key, label, || {
            self.requested.fetch_add(bytes, Ordering::Relaxed);
            self.device.create_texture(desc)
        })
    }

    /// What [`Gpu::cached_buffer`] and [`Gpu::cached_texture`] share: `make` runs inside an
    /// allocation scope, and what the device refused is not kept. Its error is left for the
    /// context's next check, or where the caller captures them ([`capture_allocation_errors`])
    /// returned to it.
    fn cached_resource<K, T>(&self, key: K, what: &str, make: impl Fn() -> T) -> T
    where
        K: Hash + Eq + Send + Sync + 'static,
        T: Clone + Send + Sync + Destroy + 'static,
    {
        let mut made = None;
        let kept = self.try_cached(key, || {
            self.allocation_scope(what, || {
                let resource = make();
                made = Some(resource.clone());
                Ok(resource)
            })
        });
        kept.unwrap_or_else(|e| {
            let e = e.to_string();
            let captured = CAPTURED.with(|c| c.borrow_mut().as_mut().map(|v| v.push(e.clone())).is_some());
            if !captured {
                self.uncaptured.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
            }
            let made = made.unwrap_or_else(make);
            // One past the cap is a valid resource the device would use: destroyed, it frees its
            // memory and fails the submission that uses it, as a refused one does.
            if self.past_memory_cap().is_some() {
                made.destroy();
            }
            made
        })
    }

    /// The tune file this context keeps the autotuner's choices in, if any
    /// ([`GpuOptions::tune_file`]), and how many choices it holds for this context.
    pub fn tune_file(&self) -> Option<(&std::path::Path, usize)> {
        self.tune_file.as_ref().map(|f| (f.path(), f.len()))
    }

    /// The autotuner's choice for `decision` (a description of what is chosen, for which op and
    /// shape) among the candidates `names`: the one this context's tune file recorded, where it
    /// is one of them; else `tune()`'s (an index into `names`, `None` where nothing could be
    /// timed), recorded in the tune file. Without a tune file, `tune()`'s.
    pub(crate) fn tuned(&self, decision: &str, names: &[&str], tune: impl FnOnce() -> Option<usize>) -> Option<usize> {
        let tuning = || self.tuning.lock().unwrap_or_else(|e| e.into_inner());
        let recorded = self.tune_file.as_ref().and_then(|file| file.get(decision));
        if let Some(i) = recorded.and_then(|name| names.iter().position(|n| *n == name)) {
            tuning().from_file += 1;
            return Some(i);
        }
        let start = std::time::Instant::now();
        let chosen = tune();
        let mut t = tuning();
        t.timed += 1;
        t.seconds += start.elapsed().as_secs_f64();
        drop(t);
        if let (Some(file), Some(k)) = (&self.tune_file, chosen) {
            file.record(decision, names[k]);
        }
        chosen
    }

    /// What this context's autotuner has done so far.
    pub fn tuning(&self) -> Tuning {
        *self.tuning.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A recorder for one command buffer.
    pub fn recorder(&self, label: &str) -> Recorder<'_> {
        Recorder { spans: crate::profile::Spans::begin(self), ..self.recorder_untimed(label) }
    }

    /// A recorder whose dispatches are never profiled ([`crate::profile`]): the autotuner's,
    /// whose candidates must not be timed with a pass each, nor show among the caller's spans.
    pub(crate) fn recorder_untimed(&self, label: &str) -> Recorder<'_> {
        Recorder {
            gpu: self,
            encoder: self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) }),
            pass: None,
            arena: Arena::default(),
            binds: None,
            spans: None,
        }
    }

    /// A recorder whose dispatches take their bind groups from `binds` where it has them (a
    /// pass recorded again on the same buffers with the same parameters), and leave there the
    /// ones they make.
    pub fn recorder_cached<'a>(&'a self, label: &str, binds: &'a BindCache) -> Recorder<'a> {
        Recorder { binds: Some(binds), ..self.recorder(label) }
    }

    /// Submits command buffers in one submission, waits for them, and reports any device error.
    pub fn submit(&self, buffers: impl IntoIterator<Item = wgpu::CommandBuffer>) -> Result<()> {
        // One submit-and-wait at a time: threads sharing a context (the test harness does)
        // otherwise race on submission indices inside wgpu.
        let _serial = self.submit_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.queue.submit(buffers);
        self.wait_locked()
    }

    /// Submits command buffers in one submission without waiting: their errors surface at the
    /// next [`Gpu::wait`] or [`Gpu::submit`].
    pub fn submit_queued(&self, buffers: impl IntoIterator<Item = wgpu::CommandBuffer>) {
        let _serial = self.submit_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.queue.submit(buffers);
    }

    /// A [`Stream`] of command buffers to this context's queue, submitting every
    /// [`GpuOptions::stream_chunk`] buffers: by default [`Stream::CHUNK`] on GPUs, and on CPU
    /// adapters everything at [`Stream::finish`], since there the host's recording would take
    /// the cores the adapter computes on (lavapipe: a ResNet-20 step 10% slower streamed).
    pub fn stream(&self) -> Stream<'_> {
        Stream::new(self, self.stream_chunk)
    }

    /// Whether [`Gpu::stream`] submits before its [`Stream::finish`] (on GPUs, by default).
    pub fn streams(&self) -> bool {
        self.stream_chunk != usize::MAX
    }

    /// Waits for everything submitted so far and returns any error the device raised since.
    pub fn wait(&self) -> Result<()> {
        let _serial = self.submit_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.wait_locked()
    }

    fn wait_locked(&self) -> Result<()> {
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Device(e.to_string()))?;
        self.take_error()
    }

    /// The first uncaptured device error since the last call, as an `Err`; and, once the
    /// device is lost, that on every call.
    pub fn take_error(&self) -> Result<()> {
        let first = self.uncaptured.lock().unwrap_or_else(|p| p.into_inner()).take();
        match (first, self.lost_message()) {
            (Some(msg), Some(lost)) => Err(Error::Device(format!("{msg}; {lost}"))),
            (msg, lost) => msg.or(lost).map_or(Ok(()), |m| Err(Error::Device(m))),
        }
    }

    /// The uncaptured device error waiting to be reported, taken aside (the autotuner's own
    /// submissions would report it as theirs), for [`Gpu::put_error_back`].
    pub(crate) fn set_error_aside(&self) -> Option<String> {
        self.uncaptured.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Leaves an error for the next check where one of the storage buffers in `resources`
    /// binds more than [`Gpu::max_binding_bytes`]. The ops plan their chunks so that none
    /// does; one that did would be refused by the device past its own limit, and under a limit
    /// forced lower ([`GpuOptions::max_binding_bytes`], the binding-limit tests) would run
    /// where the plan said it could not. The error comes back from the next wait or submission
    /// (a [`Stream`] then submits nothing more; [`Recorder::run`] has submitted its commands,
    /// which under a forced limit run).
    fn check_bindings(&self, label: &str, resources: &[(u32, wgpu::BindingResource)]) {
        for (binding, resource) in resources {
            let wgpu::BindingResource::Buffer(b) = resource else { continue };
            if !b.buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
                continue; // a uniform (its limit is the device's own, 64 KiB at least)
            }
            let bytes = b.size.map_or(b.buffer.size().saturating_sub(b.offset), |s| s.get());
            if bytes > self.max_binding_bytes {
                let e = format!(
                    "{label}: binding {binding} is {bytes} bytes, past the binding limit of {} bytes",
                    self.max_binding_bytes
                );
                self.uncaptured.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
            }
        }
    }

    /// Puts back an error [`Gpu::set_error_aside`] took, as the first one again.
    pub(crate) fn put_error_back(&self, error: Option<String>) {
        if let Some(e) = error {
            let mut slot = self.uncaptured.lock().unwrap_or_else(|p| p.into_inner());
            *slot = Some(match slot.take() {
                Some(later) => format!("{e}; then {later}"),
                None => e,
            });
        }
    }

    /// `Err` once the device is lost (out of memory, a driver reset, or `destroy`): nothing
    /// runs on this context any more, and a new one is needed.
    pub fn check_lost(&self) -> Result<()> {
        self.lost_message().map_or(Ok(()), |m| Err(Error::Device(m)))
    }

    fn lost_message(&self) -> Option<String> {
        let why = self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        Some(format!("the device was {why}; open a new Gpu context"))
    }
}

/// A resource [`Gpu::cached_resource`] can free at once.
trait Destroy {
    fn destroy(&self);
}

impl Destroy for wgpu::Buffer {
    fn destroy(&self) {
        wgpu::Buffer::destroy(self)
    }
}

impl Destroy for wgpu::Texture {
    fn destroy(&self) {
        wgpu::Texture::destroy(self)
    }
}

/// Command buffers handed to the queue while the host records the next ones: [`Stream::push`]
/// submits (without waiting) every `chunk` buffers, so that the device runs a network's first
/// units while the host records the rest, instead of idling until the whole pass is recorded
/// ([`Gpu::stream`] picks the chunk). [`Stream::finish`] submits the rest and waits. The
/// buffers run in the order they were pushed, as in one submission. Dropped unfinished (a
/// recording that failed half way), it submits nothing more, and what it had submitted runs;
/// so where an error is pending when it would submit ([`Stream::push`]).
pub struct Stream<'g> {
    gpu: &'g Gpu,
    pending: Vec<wgpu::CommandBuffer>,
    chunk: usize,
    /// The error pending at a submission, taken as this stream's: nothing more is submitted, and
    /// [`Stream::finish`] returns it (another stream of the context goes on).
    stopped: Option<Error>,
}

impl Stream<'_> {
    /// Buffers per submission: a network's unit records one per pass, and a submission costs the
    /// host about as much as recording a small dispatch or two.
    pub const CHUNK: usize = 4;

    /// A stream that submits every `chunk` buffers (at least one) as they are pushed.
    pub fn new(gpu: &Gpu, chunk: usize) -> Stream<'_> {
        Stream { gpu, pending: Vec::new(), chunk: chunk.max(1), stopped: None }
    }

    /// A stream that submits nothing: the bench takes its buffers ([`Stream::into_buffers`]).
    pub(crate) fn held(gpu: &Gpu) -> Stream<'_> {
        Stream::new(gpu, usize::MAX)
    }

    pub(crate) fn into_buffers(self) -> Vec<wgpu::CommandBuffer> {
        self.pending
    }

    /// Adds a buffer; submits the pending ones when there are `chunk` of them, unless the
    /// context has an error pending (a scratch buffer refused while they were recorded, a
    /// recording wgpu found invalid): then the stream takes it as its own, and neither they nor
    /// any later buffer are submitted.
    /// wgpu refuses a submission holding an invalid buffer, so the later ones would run on what
    /// it left unwritten: a training step's update on the last step's gradients.
    pub fn push(&mut self, buffer: wgpu::CommandBuffer) {
        if self.stopped.is_some() {
            return;
        }
        self.pending.push(buffer);
        if self.pending.len() >= self.chunk {
            self.stopped = self.gpu.take_error().err();
            if self.stopped.is_some() {
                self.pending.clear();
            } else {
                self.gpu.submit_queued(self.pending.drain(..));
            }
        }
    }

    /// Submits what is left, waits for everything, and reports any device error; with an error
    /// pending (or taken when it stopped), submits nothing more and returns it.
    pub fn finish(mut self) -> Result<()> {
        if let Some(e) = self.stopped.take().or_else(|| self.gpu.take_error().err()) {
            self.pending.clear();
            // What was submitted before runs out (any error it raises stays the context's).
            let _ = self.gpu.device.poll(wgpu::PollType::wait_indefinitely());
            return Err(e);
        }
        self.gpu.submit(self.pending.drain(..))
    }
}

/// Records compute dispatches into one command encoder.
///
/// Consecutive dispatches share one compute pass (wgpu still orders each dispatch after the
/// writes of the ones before it): wgpu validates each pass with usage scopes as large as the
/// device's resource count, which per dispatch made recording cost more than small kernels run.
/// The parameter blocks of the dispatches share a few uniform buffers (the arena) instead of one
/// buffer each.
pub struct Recorder<'a> {
    pub gpu: &'a Gpu,
    // Declared before the encoder, so that an unfinished recorder ends its pass first.
    pass: Option<wgpu::ComputePass<'static>>,
    encoder: wgpu::CommandEncoder,
    arena: Arena,
    /// Bind groups kept from earlier recordings ([`Gpu::recorder_cached`]).
    binds: Option<&'a BindCache>,
    /// Per-dispatch timestamps, where profiling is on ([`crate::profile`]).
    spans: Option<crate::profile::Spans>,
}

/// Bind groups kept from one recording of a network's passes to the next.
///
/// A training step records the same few hundred dispatches, on the same buffers with the same
/// parameters, every time; making their bind groups again (and their parameter slots) took a
/// third of the host's recording. An entry is keyed by the pipeline, the parameter bytes and
/// every bound buffer range, and binds its parameters in a uniform buffer of its own, written
/// once. Only dispatches that bind buffers alone are kept. An entry holds its buffers alive, so
/// the owner calls [`BindCache::sweep`] once per top-level pass, which drops the entries that no
/// recording used since [`BindCache::KEEP`] sweeps before (a caller's images tensor replaced
/// each step, say), and drops the cache with the buffers it was made for.
#[derive(Default)]
pub struct BindCache {
    state: Mutex<BindState>,
}

#[derive(Default)]
struct BindState {
    /// Entries by the hash of their key; a bucket holds the (rare) keys that share one.
    entries: HashMap<u64, Vec<BindEntry>>,
    epoch: u64,
}

struct BindEntry {
    pipeline: wgpu::ComputePipeline,
    params: Vec<u8>,
    buffers: Vec<(u32, wgpu::Buffer, u64, Option<wgpu::BufferSize>)>,
    group: wgpu::BindGroup,
    /// The sweep epoch of its last use.
    used: u64,
}

impl BindEntry {
    fn matches(&self, pipeline: &wgpu::ComputePipeline, params: &[u8], buffers: &[(u32, wgpu::BufferBinding)]) -> bool {
        self.pipeline == *pipeline
            && self.params == params
            && self.buffers.len() == buffers.len()
            && self.buffers.iter().zip(buffers).all(|((b, buf, offset, size), (b2, r))| {
                b == b2 && buf == r.buffer && *offset == r.offset && *size == r.size
            })
    }
}

impl BindCache {
    /// Sweeps an entry survives unused.
    pub const KEEP: u64 = 4;

    pub fn new() -> BindCache {
        BindCache::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BindState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a new epoch and drops the entries unused in the last [`BindCache::KEEP`].
    pub fn sweep(&self) {
        let mut s = self.lock();
        s.epoch += 1;
        let epoch = s.epoch;
        s.entries.retain(|_, bucket| {
            bucket.retain(|e| epoch - e.used <= Self::KEEP);
            !bucket.is_empty()
        });
    }

    /// Bind groups held.
    pub fn len(&self) -> usize {
        self.lock().entries.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bind group of a dispatch of `pipeline` with `params` at binding 0 and `resources`,
    /// from the cache or made and kept; `None` where a resource is not a buffer range.
    fn get(
        &self,
        gpu: &Gpu,
        pipeline: &wgpu::ComputePipeline,
        label: &str,
        params: &[u8],
        resources: &[(u32, wgpu::BindingResource)],
    ) -> Option<wgpu::BindGroup> {
        let mut buffers = Vec::with_capacity(resources.len());
        for (b, r) in resources {
            match r {
                wgpu::BindingResource::Buffer(range) => buffers.push((*b, range.clone())),
                _ => return None,
            }
        }
        let mut h = DefaultHasher::new();
        pipeline.hash(&mut h);
        params.hash(&mut h);
        for (b, r) in &buffers {
            (b, r.buffer, r.offset, r.size).hash(&mut h);
        }
        let key = h.finish();
        let mut s = self.lock();
        let epoch = s.epoch;
        let bucket = s.entries.entry(key).or_default();
        if let Some(e) = bucket.iter_mut().find(|e| e.matches(pipeline, params, &buffers)) {
            e.used = epoch;
            return Some(e.group.clone());
        }
        let mut bytes = params.to_vec();
        bytes.resize(params.len().next_multiple_of(16).max(16), 0);
        let uniform = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params (kept)"),
            size: bytes.len() as u64,
            usage: wgpu::BufferUsages::UNIFORM,
            mapped_at_creation: true,
        });
        // A mapping refused (it cannot be, on a buffer mapped at creation): the arena's way.
        uniform.slice(..).get_mapped_range_mut().ok()?.copy_from_slice(&bytes);
        uniform.unmap();
        let group = bind_group(gpu, pipeline, label, uniform.as_entire_binding(), resources);
        bucket.push(BindEntry {
            pipeline: pipeline.clone(),
            params: params.to_vec(),
            buffers: buffers.into_iter().map(|(b, r)| (b, r.buffer.clone(), r.offset, r.size)).collect(),
            group: group.clone(),
            used: epoch,
        });
        Some(group)
    }
}

/// A bind group of `pipeline` (its group 0): the parameter block `params` at binding 0, each
/// of `resources` at its binding.
fn bind_group(
    gpu: &Gpu,
    pipeline: &wgpu::ComputePipeline,
    label: &str,
    params: wgpu::BindingResource,
    resources: &[(u32, wgpu::BindingResource)],
) -> wgpu::BindGroup {
    let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: params }];
    for (b, r) in resources {
        entries.push(wgpu::BindGroupEntry { binding: *b, resource: r.clone() });
    }
    gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

/// The uniform buffers holding a recorder's parameter blocks, one slot per dispatch: the
/// current buffer and its bytes so far, written to it when it is full or the recorder finishes
/// (queue writes land before the next submission, so before the recorded commands run).
#[derive(Default)]
struct Arena {
    current: Option<(wgpu::Buffer, Vec<u8>)>,
    buffers: u32,
}

/// The largest arena buffer: 256 slots of 256 bytes.
const ARENA_BYTES: u64 = 64 << 10;

impl Arena {
    /// Places `bytes` in a slot and returns its buffer and offset.
    fn push(&mut self, gpu: &Gpu, bytes: &[u8]) -> (wgpu::Buffer, u64) {
        let slot = (bytes.len() as u64).div_ceil(gpu.uniform_align) * gpu.uniform_align;
        let fits = |staged: &Vec<u8>, buf: &wgpu::Buffer| staged.len() as u64 + slot <= buf.size();
        if !self.current.as_ref().is_some_and(|(buf, staged)| fits(staged, buf)) {
            self.flush(gpu);
            // Small recorders get small buffers; long ones grow to ARENA_BYTES.
            let size = (4096u64 << self.buffers.min(4)).min(ARENA_BYTES).max(slot);
            self.buffers += 1;
            let buf = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.current = Some((buf, Vec::with_capacity(size as usize)));
        }
        let (buf, staged) = self.current.as_mut().expect("a buffer with room was just made");
        let offset = staged.len() as u64;
        staged.extend_from_slice(bytes);
        staged.resize((offset + slot) as usize, 0);
        (buf.clone(), offset)
    }

    fn flush(&mut self, gpu: &Gpu) {
        if let Some((buf, staged)) = self.current.take() {
            gpu.queue.write_buffer(&buf, 0, &staged);
        }
    }
}

/// Threads per workgroup of the element-wise kernels (`WG` in the shaders).
pub const WG: u32 = 64;

impl Gpu {
    /// Workgroup counts covering `threads` invocations of [`WG`] threads: `[g, 1, 1]`, or where
    /// `g` exceeds the per-dimension limit, folded into two dimensions as evenly as they go
    /// (`[x, y, 1]`, `x * y >= g`, fewer than `y` workgroups past the end). Shaders recover
    /// the flat index as `(wid.y * nwg.x + wid.x) * WG + lid.x` and skip those past the end.
    pub fn groups_for(&self, threads: usize) -> [u32; 3] {
        let [x, y] = self.fold(threads.div_ceil(WG as usize));
        [x, y, 1]
    }

    /// `count` workgroups (at least one) as `[x, y]`, `x * y >= count`, each within the
    /// context's per-dimension limit: `[count, 1]` where it fits, else folded evenly (the last
    /// `x * y - count < y` run past the end; the kernels skip them).
    pub fn fold(&self, count: usize) -> [u32; 2] {
        let count = count.max(1);
        let at = self.fold_at as usize;
        if count <= at {
            return [count as u32, 1];
        }
        // Never past the device's own limit in y, whatever `fold_at` says.
        let y = count.div_ceil(at).min(self.max_groups as usize);
        [count.div_ceil(y) as u32, y as u32]
    }
}

impl Recorder<'_> {
    /// One dispatch of `entry` of `shader`, in the recorder's open compute pass (a new one after
    /// a copy; with profiling on, a pass of its own): `params` (u32 words; f32 as bits) is bound
    /// at binding 0 as a uniform, each `(binding, buffer)` as storage.
    pub fn dispatch(
        &mut self,
        shader: Shader,
        entry: &'static str,
        params: &[u32],
        buffers: &[(u32, &wgpu::Buffer)],
        groups: [u32; 3],
    ) {
        let res: Vec<_> = buffers.iter().map(|(b, buf)| (*b, buf.as_entire_binding())).collect();
        self.dispatch_resources(shader, entry, params, &res, groups);
    }

    /// As [`Recorder::dispatch`], with any binding resources (texture views too).
    pub fn dispatch_resources(
        &mut self,
        shader: Shader,
        entry: &'static str,
        params: &[u32],
        resources: &[(u32, wgpu::BindingResource)],
        groups: [u32; 3],
    ) {
        let pipeline = self.gpu.pipeline(shader, entry);
        let mut words = params.to_vec();
        // Zero-padded to a fixed 256 bytes: a shader's Params struct is shared by its file's entry
        // points, and an entry may be called with fewer words than the struct has.
        words.resize(params.len().div_ceil(4).max(16) * 4, 0);
        self.dispatch_pipeline(&pipeline, entry, bytemuck::cast_slice(&words), resources, groups);
    }

    /// One dispatch of `pipeline` (`label` names its bind group): `params` (bytes) is bound at
    /// binding 0 as a uniform, each resource at its binding.
    pub fn dispatch_pipeline(
        &mut self,
        pipeline: &wgpu::ComputePipeline,
        label: &str,
        params: &[u8],
        resources: &[(u32, wgpu::BindingResource)],
        groups: [u32; 3],
    ) {
        let gpu = self.gpu;
        gpu.check_bindings(label, resources);
        let bind = match self.binds.and_then(|c| c.get(gpu, pipeline, label, params, resources)) {
            Some(bind) => bind,
            None => {
                let (buffer, offset) = self.arena.push(gpu, params);
                let size = wgpu::BufferSize::new(params.len() as u64);
                let uniform = wgpu::BufferBinding { buffer: &buffer, offset, size };
                bind_group(gpu, pipeline, label, wgpu::BindingResource::Buffer(uniform), resources)
            }
        };
        let encoder = &mut self.encoder;
        if let Some(spans) = self.spans.as_mut() {
            // Profiling: a pass of its own, stamped at its start and end.
            self.pass = None;
            if let Some(mut pass) = spans.pass(encoder, label) {
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &bind, &[]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                return;
            }
        }
        let pass = self.pass.get_or_insert_with(|| {
            encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None })
                .forget_lifetime()
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
    }

    /// The command encoder, for commands outside compute passes (copies): ends the open pass.
    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        &mut self.encoder
    }

    /// The recorded commands.
    pub fn finish(mut self) -> wgpu::CommandBuffer {
        self.pass = None;
        self.arena.flush(self.gpu);
        if let Some(spans) = self.spans.take() {
            spans.finish(self.gpu, &mut self.encoder);
        }
        self.encoder.finish()
    }

    /// Finishes, submits and waits.
    pub fn run(self) -> Result<()> {
        let gpu = self.gpu;
        gpu.submit([self.finish()])
    }
}

/// The runtime checks our kernels are compiled with on an adapter of type `device`: on GPUs,
/// bounds checks on, loop bounding and integer-division guards off (see [`Gpu::shader_module`]);
/// on CPU adapters wgpu's default, all on (there the unbounded loops are unrolled by LLVM and
/// the tiled kernels take about 3x longer to build). `RESNET_WGPU_SHADER_CHECKS=all` turns
/// everything on, `gpu` picks the GPU choice everywhere, `none` turns everything off
/// (benchmarking aids).
pub fn shader_checks(device: wgpu::DeviceType) -> wgpu::ShaderRuntimeChecks {
    let mut checks = wgpu::ShaderRuntimeChecks::checked();
    let relaxed = match shader_checks_env() {
        Some("all") => false,
        Some("none") => return wgpu::ShaderRuntimeChecks::unchecked(),
        Some("gpu") => true,
        _ => device != wgpu::DeviceType::Cpu,
    };
    if relaxed {
        checks.force_loop_bounding = false;
        checks.int_div_checks = false;
    }
    checks
}

/// A tune file's key for a context: what the autotuner's timings depend on besides the op and
/// shape. The crate's version and a hash of the convolution kernels' code (the version alone
/// stayed 0.1.0 while the kernels changed), the adapter, its driver, features and limits (as
/// `report` prints them), how the shaders are built, and the binding limit (where tensors are
/// split).
fn tune_context(report: &AdapterReport, info: &wgpu::AdapterInfo, tiled_checks: bool, max_binding: u64) -> String {
    let c = shader_checks(report.device_type);
    let checks = [(c.bounds_checks, "bounds"), (c.force_loop_bounding, "loops"), (c.int_div_checks, "division")];
    let checks: Vec<&str> = checks.iter().filter(|c| c.0).map(|c| c.1).collect();
    // FNV-1a over every tiled and Winograd module's name and source, once a process (about
    // 0.1 s to generate them).
    static KERNELS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let hash = *KERNELS.get_or_init(|| {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for (name, source) in crate::ops::conv::module_sources() {
            for b in name.bytes().chain(source.bytes()) {
                hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        hash
    });
    format!(
        "resnet-wgpu {} (kernels {hash:016x}); {report}; device {:04x}:{:04x}; shader checks [{}], tiled {}; \
         bindings up to {max_binding} bytes",
        env!("CARGO_PKG_VERSION"),
        info.vendor,
        info.device,
        checks.join(", "),
        if tiled_checks { "checked" } else { "unchecked" },
    )
}

/// Whether [`Gpu::shader_module_in_range`] keeps wgpu's bounds checks on adapter `report` by
/// default: not on Vulkan GPUs. `RESNET_WGPU_SHADER_CHECKS` as for [`shader_checks`]: `all`
/// keeps them everywhere, `gpu` drops them on any Vulkan adapter (CPU ones too), `none` drops
/// them everywhere.
pub fn in_range_checks(report: &AdapterReport) -> bool {
    let vulkan = report.backend == wgpu::Backend::Vulkan;
    match shader_checks_env() {
        Some("all") => true,
        Some("none") => false,
        Some("gpu") => !vulkan,
        _ => !(vulkan && report.device_type != wgpu::DeviceType::Cpu),
    }
}

/// `RESNET_WGPU_SHADER_CHECKS` where it names a choice, read once per process.
fn shader_checks_env() -> Option<&'static str> {
    static CHOICE: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        env_choice("RESNET_WGPU_SHADER_CHECKS", "all, gpu or none", |v| {
            ["all", "gpu", "none"].into_iter().find(|c| *c == v)
        })
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn memory_limit_takes_the_least_of_the_host_and_its_cgroups() {
        let meminfo = "MemTotal:       16384 kB\nMemFree:  1 kB\n";
        let files = |pairs: &'static [(&'static str, &'static str)]| {
            move |path: &str| pairs.iter().find(|(p, _)| *p == path).map(|(_, v)| v.to_string())
        };
        // No cgroup files: the host's.
        assert_eq!(memory_limit(meminfo, "0::/\n", files(&[])), Some(16 << 20));
        // cgroup v2, limited at the container's root, unlimited below.
        let v2 = files(&[("/sys/fs/cgroup/memory.max", "4194304\n"), ("/sys/fs/cgroup/a/b/memory.max", "max\n")]);
        assert_eq!(memory_limit(meminfo, "0::/a/b\n", v2), Some(4 << 20));
        // cgroup v1 (here the memory controller shares a line with another), a limit on the
        // process's own cgroup; v1's "unlimited" at the root.
        let v1 = files(&[
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
            ("/sys/fs/cgroup/memory/job/memory.limit_in_bytes", "8388608\n"),
        ]);
        assert_eq!(memory_limit(meminfo, "4:cpu,memory:/job\n1:cpu:/x\n0::/\n", v1), Some(8 << 20));
        // A limit above the host's memory: the host's.
        let high = files(&[("/sys/fs/cgroup/memory.max", "1099511627776")]);
        assert_eq!(memory_limit(meminfo, "0::/\n", high), Some(16 << 20));
        assert_eq!(memory_limit("no total here", "0::/\n", files(&[])), None);
    }

    /// The indices into per-invocation arrays (function-space variables, arguments and loaded
    /// or composed array values) that are not constants in naga's IR (`Access`, where a
    /// constant index is `AccessIndex`, a literal or a constant), by function.
    pub(crate) fn runtime_indices(src: &str) -> Vec<String> {
        use wgpu::naga::valid::{Capabilities, ValidationFlags, Validator};
        use wgpu::naga::{AddressSpace, Expression, TypeInner};
        let m = wgpu::naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
        let info = Validator::new(ValidationFlags::all(), Capabilities::all())
            .validate(&m)
            .unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
        let functions = m.functions.iter().map(|(h, f)| (f, &info[h]));
        let entries = m.entry_points.iter().enumerate().map(|(i, e)| (&e.function, info.get_entry_point(i)));
        let mut found = Vec::new();
        for (f, fi) in functions.chain(entries) {
            for (_, e) in f.expressions.iter() {
                let Expression::Access { base, index } = *e else { continue };
                if matches!(f.expressions[index], Expression::Literal(_) | Expression::Constant(_)) {
                    continue;
                }
                let local_array = match *fi[base].ty.inner_with(&m.types) {
                    TypeInner::Pointer { base, space: AddressSpace::Function } => {
                        matches!(m.types[base].inner, TypeInner::Array { .. })
                    }
                    TypeInner::Array { .. } => true,
                    _ => false,
                };
                if local_array {
                    found.push(format!("{}: {:?}", f.name.clone().unwrap_or_default(), f.expressions[index]));
                }
            }
        }
        found
    }

    /// No module this crate builds (every family, and an instance of each configuration and
    /// variant of the convolution templates) indexes a per-invocation array by a runtime value,
    /// and none keeps a loop marked for unrolling; batch_norm.wgsl's `WIDE` and `FG` are the
    /// host's (`ops::batch_norm`'s runs and unrolling count on them).
    #[test]
    fn per_invocation_arrays_are_indexed_by_constants_everywhere() {
        use crate::ops::batch_norm::{WIDE, WIDE_THREADS};
        let text = include_str!("../shaders/batch_norm.wgsl");
        assert!(text.contains(&format!("const WIDE: u32 = {WIDE}u;")), "the shader's WIDE is {WIDE}");
        assert!(text.contains(&format!("const FG: u32 = {WIDE_THREADS}u;")), "the shader's FG is {WIDE_THREADS}");
        for (label, src) in module_sources() {
            assert!(!src.contains(UNROLL), "{label}: a marked loop left");
            let found = runtime_indices(&src);
            assert!(found.is_empty(), "{label}: runtime indices in {found:?}");
        }
    }

    #[test]
    fn unroll_writes_out_marked_loops() {
        let src = "fn f() {\n    for (var g = 0u; g < TWO; g++) { // @unroll\n        for (var i = 1u; i < 6u; i += 2u) { // @unroll\n            x[g * 4u + i] = 1.0;\n        }\n    }\n    for (var k = 0u; k < 3u; k++) {\n    }\n}\n";
        let want = "fn f() {\n    {\n        const g = 0u;\n        {\n            const i = 1u;\n            x[g * 4u + i] = 1.0;\n        }\n        {\n            const i = 3u;\n            x[g * 4u + i] = 1.0;\n        }\n        {\n            const i = 5u;\n            x[g * 4u + i] = 1.0;\n        }\n    }\n    {\n        const g = 1u;\n        {\n            const i = 1u;\n            x[g * 4u + i] = 1.0;\n        }\n        {\n            const i = 3u;\n            x[g * 4u + i] = 1.0;\n        }\n        {\n            const i = 5u;\n            x[g * 4u + i] = 1.0;\n        }\n    }\n    for (var k = 0u; k < 3u; k++) {\n    }\n}\n";
        assert_eq!(unroll(src, &[("TWO", 2)]), want);
    }

    /// One `sum2` per batch-norm module: the subgroup one where the subgroups have one size
    /// that divides the workgroup, else the tree; conv.wgsl without subgroup operations
    /// where there are none.
    #[test]
    fn modules_fit_the_subgroups() {
        for (subgroups, sg) in
            [(Some(32), Some(32)), (Some(8), Some(8)), (Some(0), None), (Some(128), None), (None, None)]
        {
            let s = Shader::BatchNorm.source(subgroups);
            assert_eq!(s.matches("fn sum2(").count(), 1, "{subgroups:?}");
            // One set of vec4 loads: storage buffers here, textures in BatchNormTexture.
            let t = Shader::BatchNormTexture.source(subgroups);
            let (h, ht) = (Shader::BatchNormF16.source(subgroups), Shader::BatchNormF16Texture.source(subgroups));
            for (m, tex) in [(&s, false), (&t, true), (&h, false), (&ht, true)] {
                assert_eq!(m.matches("fn ld_x(").count(), 1, "{subgroups:?}");
                assert_eq!(m.contains("textureLoad(xt"), tex, "{subgroups:?}");
            }
            assert_eq!(s.contains("subgroupShuffleXor"), sg.is_some(), "{subgroups:?}");
            assert_eq!(s.contains(&format!("const SG: u32 = {}u;", sg.unwrap_or(0))), sg.is_some(), "{subgroups:?}");
            let conv = Shader::Conv.source(subgroups);
            assert_eq!(conv.contains("subgroupShuffle"), subgroups.is_some(), "{subgroups:?}");
            // The same file on f16 activations: only the storage type differs.
            let half = Shader::ConvF16.source(subgroups);
            let (f32s, f16s) = (storage_type(false), storage_type(true));
            assert!(f16s.starts_with("enable f16;\nalias ST = f16;\n") && f16s.contains("fn as_st("));
            assert_eq!(conv.strip_prefix(&f32s), half.strip_prefix(&f16s));
            assert!(conv.strip_prefix(&f32s).is_some());
        }
    }
}
