//! Winograd F(2x2, 3x3) and F(4x4, 3x3) for 3x3 convolutions at stride 1, forward,
//! backward_data and backward_weight, dispatching `shaders/winograd.wgsl` (its head has the
//! algebra and the layouts): 2.25x (4x) fewer multiplies than the implicit GEMM, for four passes
//! over transformed operands (two transforms in, 16 (36) GEMMs, one transform out). F(4x4)
//! serves the f16 path alone ([`serves`]: it rounds past the f32 path's bound). Reference:
//! `reference::conv`, as for every kernel family.
//!
//! An autotuned candidate on GPUs, f32 and f16 paths alike: where it fits ([`fitting`]),
//! [`consider`] times it in each GEMM configuration against the tiled plan the tuner chose and
//! keeps the fastest. CPU adapters take it by rule in place of the tiled kernels (not of the
//! register path) where both channel counts are 16 or more (backward_weight: 32); [`force`]
//! takes it wherever it fits, or nowhere (tests, benchmarks, and results independent of the
//! autotuner). The transformed operands live in context scratch buffers, one per role and size
//! (F(2x2): 4x the input and the output, 16/9 the weights; F(4x4): 2.25x and 4x), for the shapes
//! that take it (the tuner times it in buffers of its own).

use std::sync::{Arc, Mutex};

use super::tiled::{self, Weights};
use super::{F16Weights, Geometry, Kernels, Op, Plan, affine_binding, scratch, tunes};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder, unroll, without_block};
use crate::tensor::{HalfTensor, Tensor};

/// A configuration: the output block's edge `r` (F(2x2, 3x3) or F(4x4, 3x3)), and the GEMM's
/// workgroup tile of `bm` x `bn` outputs (co x blocks), `tm` x `tn` per invocation.
#[derive(Clone, Copy, Debug)]
pub(super) struct Config {
    name: &'static str,
    r: usize,
    bm: usize,
    bn: usize,
    tm: usize,
    tn: usize,
}

/// Reduction steps staged per tile (`BK`).
const BK: usize = 16;

/// backward_weight's GEMM splits its reduction over the blocks until it has about this many
/// workgroups (a large GPU's SMs several times over), in ranges of at least
/// [`WEIGHT_MIN_CHUNK`] blocks: its output has (K / 64) x (C / 64) x E tiles (E = 16 or 36
/// GEMMs), E at 64 channels, with reductions of N * H * W / R^2 blocks.
const WEIGHT_WORKGROUPS: usize = 512;
const WEIGHT_MIN_CHUNK: usize = 256;

/// The configurations [`consider`] times. F(2x2): 256 invocations of 4x4, and 64 or 128 of 8x8
/// (more outputs per staged load, fewer workgroups). F(4x4) (`f4`), with 4x fewer blocks (fewer
/// where the image does not divide by 4) and so narrower GEMMs: 64 or 128 invocations of 8x8,
/// the taller tile for the deep layers' many output channels. Each fits WebGPU's default limits
/// (256 invocations, 16 KiB of workgroup memory), so every adapter runs all of them (the test
/// below).
pub(super) const CONFIGS: &[Config] = &[
    Config { name: "wino 64x64t4x4", r: 2, bm: 64, bn: 64, tm: 4, tn: 4 },
    Config { name: "wino 64x64t8x8", r: 2, bm: 64, bn: 64, tm: 8, tn: 8 },
    Config { name: "wino 128x64t8x8", r: 2, bm: 128, bn: 64, tm: 8, tn: 8 },
    Config { name: "wino 64x128t8x8", r: 2, bm: 64, bn: 128, tm: 8, tn: 8 },
    Config { name: "wino f4 64x64t8x8", r: 4, bm: 64, bn: 64, tm: 8, tn: 8 },
    Config { name: "wino f4 128x64t8x8", r: 4, bm: 128, bn: 64, tm: 8, tn: 8 },
];

impl Config {
    fn threads(&self) -> usize {
        (self.bm / self.tm) * (self.bn / self.tn)
    }

    /// The template with this configuration's constants (every vec4 of a staged tile has one
    /// loader: `A_PER` and `B_PER` are whole) and storage types `t`.
    fn source(&self, t: Types) -> String {
        let threads = self.threads();
        let consts = [
            ("BM", self.bm),
            ("BN", self.bn),
            ("BK", BK),
            ("TM", self.tm),
            ("TN", self.tn),
            ("TMV", self.tm / 4),
            ("TNV", self.tn / 4),
            ("THREADS", threads),
            ("A_PER", BK * self.bm / 4 / threads),
            ("B_PER", BK * self.bn / 4 / threads),
            ("R", self.r),
            ("PT", self.r + 2),
            ("E", (self.r + 2) * (self.r + 2)),
        ];
        let mut s = crate::gpu::storage_type(t.act_half);
        if t.w_half && !t.act_half {
            s.insert_str(0, "enable f16;\n");
        }
        s.push_str(&format!("alias WT = {};\n", if t.w_half { "f16" } else { "f32" }));
        s.extend(consts.iter().map(|(k, v)| format!("const {k}: u32 = {v}u;\n")));
        // The transforms of this block size (the template defines both).
        s.push_str(&without_block(TEMPLATE, if self.r == 2 { "f4" } else { "f2" }));
        unroll(&s, &consts)
    }
}

const TEMPLATE: &str = include_str!("../../../shaders/winograd.wgsl");

/// Storage types: the activations' (x, dy, y, dx) and the weights' f32 or (`true`) f16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Types {
    act_half: bool,
    w_half: bool,
}

impl Types {
    const F32: Types = Types { act_half: false, w_half: false };
    /// The f16 units' backward_weight, and what the tuner times the f16 path on: half
    /// activations, f32 weights (or dw).
    const HALF: Types = Types { act_half: true, w_half: false };
}

/// The shader's `Params`, padded to 64 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    ci: u32,
    co: u32,
    h: u32,
    w: u32,
    th: u32,
    tw: u32,
    np: u32,
    p4: u32,
    co4: u32,
    mode: u32,
    accumulate: u32,
    pre: u32,
    chunk: u32,
    splits: u32,
    _pad: u32,
}

/// The transformed problem of `op` on `g` in R x R blocks: input channels (backward_weight:
/// x's), output channels (dy's), blocks, and their rounding up to 4.
struct Dims {
    op: Op,
    /// Transformed elements per tile, (R + 2)^2: the number of GEMMs.
    e: usize,
    ci: usize,
    co: usize,
    th: usize,
    tw: usize,
    np: usize,
    p4: usize,
    co4: usize,
    /// backward_weight's GEMM reduction (over the blocks) in `splits` ranges of `chunk`; the data
    /// ops' in one.
    splits: usize,
    chunk: usize,
}

impl Dims {
    fn of(op: Op, g: &Geometry, r: usize) -> Dims {
        let (ci, co) = if op == Op::BackwardData { (g.k, g.c) } else { (g.c, g.k) };
        let e = (r + 2) * (r + 2);
        let (th, tw) = (g.h.div_ceil(r), g.w.div_ceil(r));
        let np = g.n * th * tw;
        let (p4, co4) = (np.div_ceil(4) * 4, co.div_ceil(4) * 4);
        let (splits, chunk) = match op {
            Op::BackwardWeight => {
                // Output tiles counted as 64x64 whatever the configuration, so that every
                // configuration splits alike (and gives the same bits).
                let tiles = e * co.div_ceil(64) * (ci.div_ceil(4) * 4).div_ceil(64);
                let splits = WEIGHT_WORKGROUPS.div_ceil(tiles).min(p4 / WEIGHT_MIN_CHUNK).max(1);
                let chunk = p4.div_ceil(splits).div_ceil(BK) * BK;
                (p4.div_ceil(chunk), chunk)
            }
            _ => (1, ci.div_ceil(BK) * BK),
        };
        Dims { op, e, ci, co, th, tw, np, p4, co4, splits, chunk }
    }

    fn ci4(&self) -> usize {
        self.ci.div_ceil(4) * 4
    }

    /// Bytes of U, V and M (backward_weight: DY, X and M).
    fn bytes(&self) -> [u64; 3] {
        let floats = match self.op {
            Op::BackwardWeight => [self.p4 * self.co4, self.p4 * self.ci4(), self.splits * self.co * self.ci4()],
            _ => [self.ci * self.co4, self.ci * self.p4, self.co * self.p4],
        };
        floats.map(|f| (self.e * f * 4) as u64)
    }

    /// The transforms' parameters.
    fn params(&self, g: &Geometry, acc: bool, pre: bool) -> Params {
        let u = |v: usize| v as u32;
        Params {
            n: u(g.n),
            ci: u(self.ci),
            co: u(self.co),
            h: u(g.h),
            w: u(g.w),
            th: u(self.th),
            tw: u(self.tw),
            np: u(self.np),
            p4: u(self.p4),
            co4: u(self.co4),
            mode: u32::from(self.op == Op::BackwardData),
            accumulate: u32::from(acc),
            pre: u32::from(pre),
            chunk: self.chunk as u32,
            splits: self.splits as u32,
            _pad: 0,
        }
    }
}

/// The most bytes one transformed operand may take: the context keeps them (per size) as long
/// as it lives, so beyond this the tiled kernels, which need no such workspace, run instead (at
/// batch 32 the ImageNet-like stages need 98 MiB at most).
const MAX_OPERAND_BYTES: u64 = 256 << 20;

/// Whether block size `r` runs `op` on `g` within `limit` bytes per operand: 3x3 at stride 1,
/// each of its three transformed operands within `limit`, the GEMM's grid within the
/// per-dimension limit.
fn fits(limit: u64, op: Op, g: &Geometry, r: usize) -> bool {
    let d = Dims::of(op, g, r);
    g.ks == 3 && g.stride == 1 && d.bytes().iter().all(|&b| b <= limit) && d.p4.max(d.ci4()).div_ceil(64) <= 65535
}

/// The configurations that may run `op` on `g` for the f32 path (`half` false) or the f16 path:
/// those that serve the path ([`serves`]) in a block size that [`fits`] within `limit` bytes.
/// F(2x2)'s operands are the larger (4x the input against 2.25x), so on the f16 path a problem
/// too large for F(2x2) may still take F(4x4).
fn fitting(limit: u64, op: Op, g: &Geometry, half: bool) -> Vec<usize> {
    (0..CONFIGS.len()).filter(|&c| serves(c, half) && fits(limit, op, g, CONFIGS[c].r)).collect()
}

/// The most bytes one transformed operand may take on `gpu`: [`MAX_OPERAND_BYTES`], or less
/// where a storage binding is smaller.
fn operand_limit(gpu: &Gpu) -> u64 {
    gpu.max_binding_bytes.min(MAX_OPERAND_BYTES)
}

/// Each configuration's module for each pair of storage types ([`super::module_sources`]).
pub(super) fn module_sources() -> Vec<(String, String)> {
    let types = [Types::F32, Types::HALF, Types { act_half: true, w_half: true }];
    let label = |c: &Config, t: Types| format!("conv.winograd.{}.{}{}", c.name, t.act_half as u8, t.w_half as u8);
    CONFIGS.iter().flat_map(|c| types.map(|t| (label(c, t), c.source(t)))).collect()
}

/// The pipeline of `entry` in configuration `config` for storage types `t`, built once per
/// context: the GEMM from the configuration's f32 module (it is the same for every type), the
/// transforms from the first configuration of that block size in types `t` (they are the same
/// for every configuration of one block size).
fn pipeline(gpu: &Gpu, config: usize, t: Types, entry: &'static str) -> wgpu::ComputePipeline {
    let first_of_size = CONFIGS.iter().position(|c| c.r == CONFIGS[config].r).unwrap_or(config);
    let (config, t) = if entry == "wino_gemm" { (config, Types::F32) } else { (first_of_size, t) };
    gpu.cached(("conv.winograd", config, t, entry), || {
        let c = CONFIGS[config];
        let label = format!("conv.winograd.{}.{}{}.{entry}", c.name, t.act_half as u8, t.w_half as u8);
        tiled::in_range_pipeline(gpu, &label, &c.source(t), entry)
    })
}

/// [`record`] on f32 tensors.
#[allow(clippy::too_many_arguments)]
pub(super) fn record_f32(
    rec: &mut Recorder,
    op: Op,
    g: &Geometry,
    config: usize,
    a: &Tensor,
    pre: Option<&Tensor>,
    b: &Tensor,
    out: &Tensor,
    acc: bool,
) {
    record(rec, op, g, config, Types::F32, &a.buffer, pre, &b.buffer, &out.buffer, acc, None)
}

/// [`record`] of a data op on the f16 path: `a` and `out` halves, the weights as given.
#[allow(clippy::too_many_arguments)]
pub(super) fn record_half_data(
    rec: &mut Recorder,
    op: Op,
    g: &Geometry,
    config: usize,
    a: &HalfTensor,
    pre: Option<&Tensor>,
    w: &impl F16Weights,
    out: &HalfTensor,
    acc: bool,
) {
    let t = Types { act_half: true, w_half: w.is_half() };
    record(rec, op, g, config, t, &a.buffer, pre, w.buffer(), &out.buffer, acc, None)
}

/// [`record`] of backward_weight on the f16 path: `x` and `dy` halves, `dw` f32.
#[allow(clippy::too_many_arguments)]
pub(super) fn record_half_weight(
    rec: &mut Recorder,
    g: &Geometry,
    config: usize,
    x: &HalfTensor,
    pre: Option<&Tensor>,
    dy: &HalfTensor,
    dw: &Tensor,
    acc: bool,
) {
    record(rec, Op::BackwardWeight, g, config, Types::HALF, &x.buffer, pre, &dy.buffer, &dw.buffer, acc, None)
}

/// Buffers for the transformed operands of `op` on `g` (U, V, M) in any of `configs`' block
/// sizes, of the caller's: the autotuner's, dropped after timing, so that only the shapes that
/// take Winograd keep their workspace in the context. Made as the context's other buffers are
/// (an allocation scope, the memory cap): one refused is [`Error::Allocation`], not an error
/// left for the caller's next submission, nor a context past its cap.
fn workspace(gpu: &Gpu, op: Op, g: &Geometry, configs: &[usize]) -> Result<[wgpu::Buffer; 3]> {
    let sizes = configs.iter().map(|&c| Dims::of(op, g, CONFIGS[c].r).bytes());
    let max = sizes.fold([0; 3], |m, b| [0, 1, 2].map(|i| m[i].max(b[i])));
    gpu.allocation_scope("winograd tuning workspace", || {
        Ok(max.map(|size| gpu.create_buffer("winograd tuning workspace", size, wgpu::BufferUsages::STORAGE)))
    })
}

/// Records `op` on `g` by Winograd in GEMM configuration `config`, storage types `t`: forward
/// (a = x, b = w, out = y), backward_data (a = dy, b = w, out = dx) or backward_weight (a = x,
/// b = dy, out = dw, f32 whatever `t`); x through the BN + ReLU prologue with `pre`'s
/// per-channel values where given (forward and backward_weight); `acc` adds into `out`. The
/// transformed operands go to `ws` where given, else to the context's scratch buffers.
#[allow(clippy::too_many_arguments)]
fn record(
    rec: &mut Recorder,
    op: Op,
    g: &Geometry,
    config: usize,
    t: Types,
    a: &wgpu::Buffer,
    pre: Option<&Tensor>,
    b: &wgpu::Buffer,
    out: &wgpu::Buffer,
    acc: bool,
    ws: Option<&[wgpu::Buffer; 3]>,
) {
    let c = CONFIGS[config];
    let d = Dims::of(op, g, c.r);
    let params = d.params(g, acc, pre.is_some());
    let gpu = rec.gpu;
    let [ub, vb, mb] = d.bytes();
    let storage = wgpu::BufferUsages::STORAGE;
    let [u, v, m] = match ws {
        Some(ws) => ws.clone(),
        None => [
            scratch(gpu, "wino-u", ub, storage),
            scratch(gpu, "wino-v", vb, storage),
            scratch(gpu, "wino-m", mb, storage),
        ],
    };
    let aff = affine_binding(gpu, pre);
    let mut run = |entry: &'static str, label: &str, prm: &Params, res: &[(u32, wgpu::BindingResource)], groups| {
        rec.dispatch_pipeline(&pipeline(gpu, config, t, entry), label, bytemuck::bytes_of(prm), res, groups);
    };
    let (a, b, out) = (a.as_entire_binding(), b.as_entire_binding(), out.as_entire_binding());
    let gemm = [(4, u.as_entire_binding()), (5, v.as_entire_binding()), (6, m.as_entire_binding())];
    if op == Op::BackwardWeight {
        // The GEMM over the blocks: rows k (K4 wide), columns c (C4 wide).
        let gp = Params { ci: params.p4, p4: d.ci4() as u32, ..params };
        let (x, dy) = (a, b);
        run(
            "wino_input_t",
            "wino_input_t",
            &params,
            &[(1, x), (2, aff.as_entire_binding()), (3, v.as_entire_binding())],
            gpu.groups_for(d.p4 * d.ci4()),
        );
        run("wino_dy_t", "wino_dy_t", &params, &[(1, dy), (3, u.as_entire_binding())], gpu.groups_for(d.p4 * d.co4));
        let z = (d.e * d.splits) as u32;
        run("wino_gemm", c.name, &gp, &gemm, [d.ci4().div_ceil(c.bn) as u32, d.co.div_ceil(c.bm) as u32, z]);
        let dw = if d.splits > 1 { "wino_dw_splits" } else { "wino_dw" };
        run(dw, dw, &params, &[(7, m.as_entire_binding()), (10, out)], gpu.groups_for(d.co * d.ci));
        return;
    }
    let w = b;
    run("wino_weights", "wino_weights", &params, &[(9, w), (3, u.as_entire_binding())], gpu.groups_for(d.ci * d.co4));
    run(
        "wino_input",
        "wino_input",
        &params,
        &[(1, a), (2, aff.as_entire_binding()), (3, v.as_entire_binding())],
        gpu.groups_for(d.ci * d.p4),
    );
    run("wino_gemm", c.name, &params, &gemm, [d.p4.div_ceil(c.bn) as u32, d.co.div_ceil(c.bm) as u32, d.e as u32]);
    run("wino_output", "wino_output", &params, &[(7, m.as_entire_binding()), (8, out)], gpu.groups_for(d.co * d.np));
}

// ---------------------------------------------------------------------------------------------
// Choosing it

/// What a context does about Winograd: time it where it fits (GPUs), never, or always in one
/// configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Choice {
    Auto,
    Off,
    Config(usize),
}

/// The context's [`Choice`], first read from `RESNET_WGPU_CONV_WINOGRAD`.
fn choice_cell(gpu: &Gpu) -> Arc<Mutex<Choice>> {
    gpu.cached("conv.winograd.choice", || {
        let from_env = std::env::var("RESNET_WGPU_CONV_WINOGRAD").ok().filter(|s| !s.is_empty());
        let choice = from_env.map_or(Choice::Auto, |name| {
            parse(&name).unwrap_or_else(|e| {
                eprintln!("RESNET_WGPU_CONV_WINOGRAD ignored: {e}");
                Choice::Auto
            })
        });
        Arc::new(Mutex::new(choice))
    })
}

/// `"off"`, or a configuration's name with or without its `wino ` prefix.
fn parse(name: &str) -> Result<Choice> {
    if name == "off" {
        return Ok(Choice::Off);
    }
    let index = CONFIGS.iter().position(|c| c.name == name || c.name.strip_prefix("wino ") == Some(name));
    index.map(Choice::Config).ok_or_else(|| {
        let known: Vec<&str> = CONFIGS.iter().map(|c| c.name).collect();
        Error::Invalid(format!("unknown Winograd configuration {name:?}; known: {known:?} or \"off\""))
    })
}

/// This context's [`Choice`].
pub(super) fn choice(gpu: &Gpu) -> Choice {
    *choice_cell(gpu).lock().unwrap_or_else(|e| e.into_inner())
}

/// Forces configuration `name` (with or without its `wino ` prefix) wherever it fits (on the
/// f32 path, its F(2x2) twin: [`for_path`]), or (`"off"`) the other kernels everywhere; `None`
/// goes back to the automatic choice. Errors for an unknown name.
pub(super) fn force(gpu: &Gpu, name: Option<&str>) -> Result<()> {
    let choice = name.map(parse).transpose()?.unwrap_or(Choice::Auto);
    *choice_cell(gpu).lock().unwrap_or_else(|e| e.into_inner()) = choice;
    Ok(())
}

/// The configuration forced on this context ([`force`]) for `op` on `g`, on the f32 path
/// (`half` false: an F(4x4) one's F(2x2) twin, [`for_path`]) or the f16 path, where it fits;
/// `None` where none is forced or it does not fit.
pub(super) fn forced(gpu: &Gpu, op: Op, g: &Geometry, half: bool) -> Option<usize> {
    let Choice::Config(config) = choice(gpu) else { return None };
    let config = for_path(config, half);
    fitting(operand_limit(gpu), op, g, half).contains(&config).then_some(config)
}

/// The configurations' names.
pub(super) fn names() -> Vec<String> {
    CONFIGS.iter().map(|c| c.name.to_string()).collect()
}

/// Whether configuration `config` serves the f32 path (`half` false) or the f16 path: F(4x4)
/// serves the f16 path alone. It rounds more than F(2x2): 3.3e-6 relative L2 on a convolution
/// of 384 channels where F(2x2) makes 6e-7, and 1.2e-5 on a BN bias gradient of a unit (a sum
/// that cancels), past the f32 path's bound of 1e-5; far inside the f16 path's.
fn serves(config: usize, half: bool) -> bool {
    half || CONFIGS[config].r == 2
}

/// `config`, or on the f32 path for an F(4x4) one the F(2x2) configuration of the same GEMM
/// tile ([`serves`]).
fn for_path(config: usize, half: bool) -> usize {
    let c = CONFIGS[config];
    let twin = CONFIGS.iter().position(|t| t.r == 2 && (t.bm, t.bn, t.tm, t.tn) == (c.bm, c.bn, c.tm, c.tn));
    if serves(config, half) { config } else { twin.unwrap_or(CPU_F2) }
}

/// The F(2x2) configuration CPU adapters take by rule (64x64t8x8).
const CPU_F2: usize = 1;

/// The configuration CPU adapters take by rule, where both channel counts reach
/// [`cpu_min_channels`]: F(2x2) in 64x64t8x8 ran 1.4x to 7x faster than the tiled kernels' CPU
/// rule there on lavapipe, and slower below (BENCHMARKS.md). On the f16 path, F(4x4) in
/// 64x64t8x8 ran 1.3x to 1.7x faster than that where its GEMMs are at least a tile (64 blocks)
/// wide, and up to 2.3x slower on narrower ones (2 images of 7x7: 8 blocks).
fn cpu_config(op: Op, g: &Geometry, half: bool) -> usize {
    if half && Dims::of(op, g, 4).p4 >= 64 { 4 } else { CPU_F2 }
}

/// The data ops from 16 channels, backward_weight from 32 (whose GEMM, over the blocks, has
/// few output tiles: 1.6x slower than the tiled kernels at 16 channels, 2.3x faster at 32).
fn cpu_min_channels(op: Op) -> usize {
    if op == Op::BackwardWeight { 32 } else { 16 }
}

/// Where the tiled plan would fuse its unit's BN reductions into its epilogue (unsplit data ops),
/// Winograd is taken only if it runs in this fraction of the plan's time or less: the
/// reductions' own passes cost a few percent of a convolution (BENCHMARKS.md, cfa22d4: 25 to 40
/// us against 0.35 to 0.45 ms at batch 32).
const FUSED_MARGIN: f64 = 0.9;

/// `plan` (the choice for `op` on `g` without Winograd), or Winograd in a configuration that
/// serves the path and fits ([`fitting`]) where: it is forced ([`force`]); or, on a CPU adapter
/// under the automatic kernels, the rule says so; or, on a GPU (or a CPU adapter that tunes,
/// `Kernels::Tuned`), timing each such configuration (as the tiled tuner times its
/// configurations, on zero operands of `g`'s shape) finds one faster than `plan` (or the tune
/// file recorded so, [`Gpu::tuned`]). Register plans and the explicit families
/// (`Kernels::Tiled`, `Kernels::Register`) are kept unless forced. `half`: for the f16 path
/// (`plan` its tiled plan, both timed on f16 activations and f32 weights, as the f16 units run
/// them).
pub(super) fn consider(gpu: &Gpu, op: Op, g: &Geometry, kernels: Kernels, plan: Plan, half: bool) -> Plan {
    let fit = fitting(operand_limit(gpu), op, g, half);
    if fit.is_empty() {
        return plan;
    }
    let tile = match plan {
        Plan::Tiled { tile, .. } => tile,
        _ => tiled::rule(gpu, op, g),
    };
    match choice(gpu) {
        // forced()'s choice, from the configurations that fit, worked out above.
        Choice::Config(c) => {
            let config = for_path(c, half);
            return if fit.contains(&config) { Plan::Winograd { config, tile } } else { plan };
        }
        Choice::Off => return plan,
        Choice::Auto => {}
    }
    if !matches!(plan, Plan::Tiled { .. }) || matches!(kernels, Kernels::Tiled | Kernels::Register) {
        return plan;
    }
    if !tunes(gpu) {
        let config = cpu_config(op, g, half);
        let d = Dims::of(op, g, CONFIGS[config].r);
        return match d.ci.min(d.co) >= cpu_min_channels(op) && fit.contains(&config) {
            true => Plan::Winograd { config, tile },
            false => plan,
        };
    }
    // The tiled plan (k = 0), then the configurations that serve this path and fit.
    let candidates = fit;
    let names: Vec<String> =
        std::iter::once("tiled").chain(candidates.iter().map(|&c| CONFIGS[c].name)).map(str::to_string).collect();
    let f16 = if half { " f16" } else { "" };
    let decision = format!("winograd{f16} {} against {}", tiled::tuned_shape(op, g), tiled::plan_name(plan));
    match tiled::tuned(gpu, &decision, &names, || time_against(gpu, op, g, plan, half, &candidates)) {
        Some(k) if k > 0 => Plan::Winograd { config: candidates[k - 1], tile },
        _ => plan,
    }
}

/// [`consider`]'s timing: the tiled `plan` (0) against each of `candidates` (1 on), on zero
/// operands of `g`'s shape; the fastest, `None` where none could be timed.
fn time_against(gpu: &Gpu, op: Op, g: &Geometry, plan: Plan, half: bool, candidates: &[usize]) -> Option<usize> {
    let (x, wd, y) = ([g.n, g.c, g.h, g.w], [g.k, g.c, 3, 3], [g.n, g.k, g.oh, g.ow]);
    let dims = match op {
        Op::Forward => [x, wd, y],
        Op::BackwardData => [y, wd, x],
        Op::BackwardWeight => [x, y, wd],
    };
    // The operands as the path runs them: all f32 (in `dims`' order), or (`half`) the weights
    // (or dw) f32 and the two activations f16.
    let wi = if op == Op::BackwardWeight { 2 } else { 1 };
    let f32s = match half {
        false => dims.iter().map(|d| Tensor::zeros(gpu, d)).collect::<Result<Vec<_>>>(),
        true => Tensor::zeros(gpu, &dims[wi]).map(|w| vec![w]),
    };
    let acts = (0..3).filter(|&i| half && i != wi);
    let (Ok(t), Ok(h)) = (f32s, acts.map(|i| HalfTensor::zeros(gpu, &dims[i])).collect::<Result<Vec<_>>>()) else {
        return None;
    };
    // Without its workspace Winograd cannot run here (its passes' scratch is as large).
    let ws = workspace(gpu, op, g, candidates).ok()?;
    let run = |k: usize| {
        let config = candidates.get(k.wrapping_sub(1)).copied().unwrap_or_default();
        let mut rec = gpu.recorder_untimed("conv tune winograd");
        let (t32, t16) = (Types::F32, Types::HALF);
        let ws = Some(&ws);
        match (half, op == Op::BackwardWeight, k) {
            (false, _, 0) => tiled::record(&mut rec, op, g, plan, &t[0], None, &t[1], &t[2], false),
            (false, _, _) => {
                record(&mut rec, op, g, config, t32, &t[0].buffer, None, &t[1].buffer, &t[2].buffer, false, ws)
            }
            (true, true, 0) => tiled::record_half_weight(&mut rec, g, plan, &h[0], None, &h[1], &t[0], false),
            (true, true, _) => {
                record(&mut rec, op, g, config, t16, &h[0].buffer, None, &h[1].buffer, &t[0].buffer, false, ws)
            }
            (true, false, 0) => {
                tiled::record_half_data(&mut rec, op, g, plan, &h[0], None, Weights::F32(&t[0].buffer), &h[1], false)
            }
            (true, false, _) => {
                record(&mut rec, op, g, config, t16, &h[0].buffer, None, &t[0].buffer, &h[1].buffer, false, ws)
            }
        }
        Ok(rec.finish())
    };
    let times = tiled::time_each(gpu, 1 + candidates.len(), run);
    // An unsplit tiled data op also takes its unit's BN statistics or BN backward sums in its
    // epilogue, which Winograd leaves to passes of their own: there it must win by a margin.
    let fused = matches!(plan, Plan::Tiled { splits: 1, .. }) && op != Op::BackwardWeight;
    let handicap = if fused { 1.0 / FUSED_MARGIN } else { 1.0 };
    let mut best: (f64, Option<usize>) = (f64::INFINITY, None);
    let mut report = Vec::new();
    for (k, ms) in times.into_iter().enumerate() {
        let (name, weight) = match k {
            0 => ("tiled", 1.0),
            _ => (CONFIGS[candidates[k - 1]].name, handicap),
        };
        match ms {
            Some(ms) => {
                report.push(format!("{name} {ms:.4}"));
                if ms * weight < best.0 {
                    best = (ms * weight, Some(k));
                }
            }
            None => report.push(format!("{name} failed")),
        }
    }
    if tiled::tune_log() {
        let chose = match best.1 {
            Some(k) if k > 0 => CONFIGS[candidates[k - 1]].name,
            Some(_) => "tiled",
            None => "tiled (nothing timed)",
        };
        let what = if half { "winograd f16" } else { "winograd" };
        let margin = if fused { format!(" (Winograd by {FUSED_MARGIN}x)") } else { String::new() };
        eprintln!("conv tune {what} {}: ms {}; chose {chose}{margin}", tiled::tuned_shape(op, g), report.join(", "));
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tuner's workspace is refused past the memory cap, as the context's other buffers
    /// are, and leaves no error behind; within it, it is made.
    #[test]
    fn the_tuning_workspace_keeps_to_the_memory_cap() {
        let fresh = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
        if !crate::gpu::counts_memory(fresh.report.backend) {
            return eprintln!("skipped: no memory cap on {:?}", fresh.report.backend);
        }
        let held = (fresh.memory().buffer_bytes + fresh.memory().texture_bytes) as u64;
        let opts = crate::GpuOptions { memory_cap: Some(held + (2 << 20)), ..crate::GpuOptions::from_env() };
        let gpu = Gpu::with_options(&opts).unwrap_or_else(|e| panic!("{e}"));
        let g = |n| Geometry { n, c: 32, h: 32, w: 32, k: 32, ks: 3, oh: 32, ow: 32, stride: 1 };
        let f2 = [0];
        assert_eq!(CONFIGS[f2[0]].r, 2);
        // 4 images: V and M of 16 x 32 x 1024 floats, 2 MiB each; 1 image, a quarter of that.
        match workspace(&gpu, Op::Forward, &g(4), &f2) {
            Err(Error::Allocation { what, .. }) => assert_eq!(what, "winograd tuning workspace"),
            Err(e) => panic!("expected Error::Allocation, got {e}"),
            Ok(_) => panic!("a workspace past the cap was made"),
        }
        gpu.take_error().unwrap_or_else(|e| panic!("an error was left behind: {e}"));
        workspace(&gpu, Op::Forward, &g(1), &f2).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Every configuration's tiles are staged whole (each vec4 has one loader) and fit WebGPU's
    /// default limits, in a block size the template has.
    #[test]
    fn configurations_fit_the_template_and_the_default_limits() {
        for c in CONFIGS {
            let t = c.threads();
            assert!(c.bm % c.tm == 0 && c.bn % c.tn == 0 && c.tm % 4 == 0 && c.tn % 4 == 0, "{}", c.name);
            assert!((BK * c.bm / 4).is_multiple_of(t) && (BK * c.bn / 4).is_multiple_of(t), "{}", c.name);
            assert!(t <= 256 && BK * (c.bm + c.bn) * 4 <= 16384, "{}", c.name);
            // The template has the transforms of these two block sizes.
            assert!(matches!(c.r, 2 | 4), "{}", c.name);
        }
    }

    /// No module indexes a per-invocation array by a runtime value (the transforms' tiles, the
    /// GEMM's accumulators and prefetched loads), so drivers can keep them in registers: with
    /// the transforms' loops left in, lavapipe ran F(4x4)'s input transform 7x slower.
    #[test]
    fn per_invocation_arrays_are_indexed_by_constants() {
        let types = [Types::F32, Types::HALF, Types { act_half: true, w_half: true }];
        for c in CONFIGS {
            for t in types {
                let found = crate::gpu::tests::runtime_indices(&c.source(t));
                assert!(found.is_empty(), "{} {t:?}: runtime indices in {found:?}", c.name);
            }
        }
    }

    /// CPU adapters take F(4x4) on the f16 path where its GEMMs are a tile wide (64 blocks),
    /// F(2x2) below and on the f32 path, in the same GEMM tile.
    #[test]
    fn cpu_rule_takes_f4_on_the_f16_path_where_its_gemms_are_a_tile_wide() {
        let g = |n: usize, c: usize, hw: usize| Geometry { n, c, h: hw, w: hw, k: c, ks: 3, oh: hw, ow: hw, stride: 1 };
        for op in [Op::Forward, Op::BackwardData, Op::BackwardWeight] {
            // 8 images of 14x14: 8 * 16 = 128 blocks of 4x4; 2 of 7x7: 8 blocks.
            let wide = CONFIGS[cpu_config(op, &g(8, 64, 14), true)];
            let narrow = CONFIGS[cpu_config(op, &g(2, 256, 7), true)];
            let f32_wide = CONFIGS[cpu_config(op, &g(8, 64, 14), false)];
            assert_eq!((wide.r, narrow.r, f32_wide.r), (4, 2, 2), "{op:?}");
            assert_eq!((wide.bm, wide.bn, wide.tm), (narrow.bm, narrow.bn, narrow.tm), "{op:?}");
        }
    }

    /// The configurations that fit: all that serve the path at batch 32 of 64x56x56; at batch
    /// 128, whose F(2x2) input takes 392 MiB (16 x 64 channels x 128 x 28 x 28 blocks x 4 bytes)
    /// and F(4x4)'s 220 MiB, only F(4x4), so only on the f16 path; none past 3x3 at stride 1.
    #[test]
    fn f4_runs_the_f16_path_where_only_f2_is_too_large() {
        let g = |n: usize, stride: usize, ks: usize| {
            let o = (56 + 2 * (ks / 2) - ks) / stride + 1;
            Geometry { n, c: 64, h: 56, w: 56, k: 64, ks, oh: o, ow: o, stride }
        };
        let serving = |half: bool| (0..CONFIGS.len()).filter(|&c| serves(c, half)).collect::<Vec<_>>();
        let f4: Vec<usize> = (0..CONFIGS.len()).filter(|&c| CONFIGS[c].r == 4).collect();
        for op in [Op::Forward, Op::BackwardData, Op::BackwardWeight] {
            for half in [false, true] {
                assert_eq!(fitting(MAX_OPERAND_BYTES, op, &g(32, 1, 3), half), serving(half), "{op:?}");
                assert_eq!(fitting(MAX_OPERAND_BYTES, op, &g(32, 2, 3), half), Vec::<usize>::new(), "{op:?}");
                assert_eq!(fitting(MAX_OPERAND_BYTES, op, &g(32, 1, 1), half), Vec::<usize>::new(), "{op:?}");
            }
            assert_eq!(fitting(MAX_OPERAND_BYTES, op, &g(128, 1, 3), true), f4, "{op:?}");
            assert_eq!(fitting(MAX_OPERAND_BYTES, op, &g(128, 1, 3), false), Vec::<usize>::new(), "{op:?}");
        }
    }

    /// F(4x4) serves the f16 path alone: a forced F(4x4) configuration runs on the f32 path as
    /// the F(2x2) one of the same GEMM tile.
    #[test]
    fn f4_is_for_the_f16_path() {
        for (i, c) in CONFIGS.iter().enumerate() {
            assert_eq!(for_path(i, true), i, "{}", c.name);
            let f32 = CONFIGS[for_path(i, false)];
            assert_eq!((f32.r, f32.bm, f32.bn, f32.tm, f32.tn), (2, c.bm, c.bn, c.tm, c.tn), "{}", c.name);
        }
    }
}
