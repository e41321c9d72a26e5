//! 2-D convolution (square kernel 1 or 3, padding `k / 2`, stride 1 or 2, no bias), forward and
//! both backwards, dispatching `shaders/conv.wgsl`. Reference: `reference::conv`.
//!
//! [`forward_bn_relu`] and [`backward_weight_bn_relu`] read their input through a batch norm and
//! a ReLU applied as each element is loaded (`a = ReLU(BN(x))` with per-channel values from
//! [`crate::ops::batch_norm::affine`]): a pre-activation unit's convolutions read the BN's input
//! itself, and the activation is neither written in the forward nor recomputed in the backward.
//! [`forward_stats`] and [`backward_data_bn`] also do the batch norm's reductions next to them:
//! the statistics of a forward's output, and the sums of the backward of the BN + ReLU before a
//! convolution, in the tiled kernels' epilogues (elsewhere the batch norm reads the activation).
//!
//! Three kernel families (see the head of each shader for their designs):
//!
//! * the *tiled* implicit GEMM through workgroup memory: any adapter, any shape;
//! * the *register* path for CPU adapters (lavapipe/llvmpipe) with subgroups of at least 8
//!   invocations, where workgroup memory is as slow as a storage buffer: the big operand goes
//!   through an rgba32f texture copy of the tensor (rgba16f on the f16 path), the weights through
//!   64 KiB uniform-buffer windows, and lanes share data by subgroup shuffles. It covers the
//!   shapes of CIFAR-style ResNets (row widths 4, 8, 16, 32); other shapes take the tiled
//!   kernels;
//! * *Winograd* for 3x3 kernels at stride 1 (`conv/winograd.rs`, `shaders/winograd.wgsl`):
//!   F(2x2, 3x3), transforms around 16 GEMMs, 2.25x fewer multiplies, on the f32 and f16 paths;
//!   F(4x4, 3x3), 36 GEMMs, 4x fewer, on the f16 path alone (it rounds past the f32 bound).
//!   Taken where the autotuner finds it faster than the tiled plan (GPUs) or by rule in place of
//!   the tiled kernels (CPU adapters). Its results round differently from the others'
//!   ([`force_winograd`] turns it off).
//!
//! The choice and the tile sizes are made per shape and cached in the context ([`Gpu::cached`]),
//! as are the scratch buffers (split-K partial sums, weight windows) and operand textures, one
//! per role and size: nothing is allocated per call once a shape has been seen, except each
//! dispatch's bind group (which a network keeps from step to step: [`crate::gpu::BindCache`])
//! and its slot in the recorder's parameter buffers (as in [`Recorder::dispatch`]). Reusing them
//! across calls is safe because every call fills and consumes them within its own commands, and
//! the queue runs commands in order.

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::{operand_texture, operand_texture_f16, texture_fits};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder, Shader};
use crate::ops::batch_norm::{self, BnGrads, BnTensors};
use crate::ops::{cast, split};
use crate::tensor::{HalfTensor, Tensor};

mod tiled;
mod winograd;
use tiled::Weights;

/// Output spatial size: (h + 2*pad - k) / stride + 1 with pad = k / 2.
///
/// Returns 0 where no output exists (stride 0, or a kernel larger than the padded input).
pub fn out_size(h: usize, k: usize, stride: usize) -> usize {
    let padded = match h.checked_add(k / 2 * 2) {
        Some(p) => p,
        None => return 0,
    };
    if stride == 0 || padded < k {
        return 0;
    }
    (padded - k) / stride + 1
}

/// The validated geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    ks: usize,
    oh: usize,
    ow: usize,
    stride: usize,
}

impl Geometry {
    /// Checks `x` `[N,C,H,W]`, `w` `[K,C,ks,ks]` and `y` `[N,K,OH,OW]` against each other;
    /// `what` and the names say which call and which tensors, in the error.
    fn check(what: &str, names: [&str; 3], x: &Tensor, w: &Tensor, y: &Tensor, stride: usize) -> Result<Geometry> {
        let xd = x.nchw(format_args!("{what}: {}", names[0]))?;
        let wd = w.nchw(format_args!("{what}: {} (OIHW)", names[1]))?;
        let yd = y.nchw(format_args!("{what}: {}", names[2]))?;
        Geometry::of_dims(what, names, [xd, wd, yd], stride)
    }

    /// The checks of [`Geometry::check`] on the three shapes.
    fn of_dims(what: &str, names: [&str; 3], dims: [[usize; 4]; 3], stride: usize) -> Result<Geometry> {
        let [[n, c, h, wd], [k, wc, kh, kw], [yn, yk, oh, ow]] = dims;
        if stride != 1 && stride != 2 {
            return Err(Error::Invalid(format!("{what}: stride must be 1 or 2, got {stride}")));
        }
        if kh != kw {
            return Err(Error::Shape(format!("{what}: kernel must be square, got {kh}x{kw}")));
        }
        if kh != 1 && kh != 3 {
            return Err(Error::Shape(format!("{what}: kernel size must be 1 or 3, got {kh}")));
        }
        if wc != c {
            return Err(Error::Shape(format!(
                "{what}: {} has {c} channels but {} {:?} expects {wc}",
                names[0], names[1], dims[1]
            )));
        }
        let (eh, ew) = (out_size(h, kh, stride), out_size(wd, kh, stride));
        if [yn, yk, oh, ow] != [n, k, eh, ew] {
            return Err(Error::Shape(format!(
                "{what}: {} {:?} with {} {:?} at stride {stride} needs {} [{n}, {k}, {eh}, {ew}], got {:?}",
                names[0], dims[0], names[1], dims[1], names[2], dims[2]
            )));
        }
        // The shaders index in u32 and offsets in i32: every tensor bound has at most i32::MAX
        // elements, as the context's binding limit is below that (larger ones run in chunks).
        Ok(Geometry { n, c, h, w: wd, k, ks: kh, oh, ow, stride })
    }

    fn pad(&self) -> usize {
        self.ks / 2
    }

    /// The shader's `Params` with the geometry filled in.
    fn params(&self, accumulate: bool) -> Params {
        let u = |v: usize| v as u32;
        Params {
            n: u(self.n),
            c: u(self.c),
            h: u(self.h),
            w: u(self.w),
            k: u(self.k),
            oh: u(self.oh),
            ow: u(self.ow),
            stride: u(self.stride),
            ks: u(self.ks),
            pad: u(self.pad()),
            accumulate: accumulate as u32,
            ..Params::default()
        }
    }
}

/// The shader's `Params` (conv.wgsl), padded to 128 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    k: u32,
    oh: u32,
    ow: u32,
    stride: u32,
    ks: u32,
    pad: u32,
    accumulate: u32,
    m: u32,
    base: u32,
    span: u32,
    chunk: u32,
    splits: u32,
    len: u32,
    _pad: [u32; 15],
}

/// Checks the shapes of input `x`, weights `w` and output `y` as [`forward`] takes them (the
/// backwards take the same: `dy` as `y`, `dx` as `x`, `dw` as `w`), for composite ops that check
/// before they record their first step.
pub(crate) fn check_shapes(what: &str, x: &Tensor, w: &Tensor, y: &Tensor, stride: usize) -> Result<()> {
    Geometry::check(what, ["x", "w", "y"], x, w, y, stride).map(|_| ())
}

/// Forces Winograd in configuration `name` (one of [`winograd_names`]) for every convolution it
/// applies to (3x3 at stride 1: forward, backward_data and backward_weight, f32 and f16 paths)
/// on this context, or (`"off"`) never takes it; `None` goes back to the automatic choice (timed
/// against the tiled kernels on GPUs). An F(4x4) configuration (`f4`) runs on the f32 path as the
/// F(2x2) one of its GEMM tile. The environment variable `RESNET_WGPU_CONV_WINOGRAD` does the
/// same for a new context. A forced tile configuration ([`force_tile`]) takes precedence.
/// Winograd rounds differently from the GEMM kernels (within each path's bound), so `"off"` keeps
/// a GPU's results independent of what the autotuner picks.
#[doc(hidden)]
pub fn force_winograd(gpu: &Gpu, name: Option<&str>) -> Result<()> {
    winograd::force(gpu, name)
}

/// The Winograd configurations' names (`wino <tile>` for F(2x2), `wino f4 <tile>` for F(4x4)).
#[doc(hidden)]
pub fn winograd_names() -> Vec<String> {
    winograd::names()
}

/// Which kernel family a context uses (a testing and benchmarking aid).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernels {
    /// The register path where the adapter and shape allow it (CPU adapters), else tiled.
    Auto,
    /// The register path wherever the adapter's subgroups and the shape allow it, on any
    /// adapter; else tiled.
    Register,
    /// The tiled kernels (or Winograd where it is forced: [`force_winograd`]).
    Tiled,
    /// The tiled kernels and Winograd, every choice timed as on a GPU (tiles, splits, prologue,
    /// Winograd, the f16 path's tiles on cooperative matrices and plain) even on a CPU adapter,
    /// which otherwise keeps rules: tests the autotuner where there is no GPU.
    Tuned,
}

fn kernels_cell(gpu: &Gpu) -> Arc<AtomicU8> {
    gpu.cached("conv.kernels", || Arc::new(AtomicU8::new(0)))
}

/// Sets the kernel family of this context's convolutions (testing and benchmarking aid).
#[doc(hidden)]
pub fn set_kernels(gpu: &Gpu, kernels: Kernels) {
    kernels_cell(gpu).store(kernels as u8, Ordering::Relaxed);
}

/// Forces tile configuration `name` of the tiled kernels on this context (testing and
/// benchmarking aid; the environment variable `RESNET_WGPU_CONV_TILE` does the same for a new
/// context). A forced configuration takes the tiled kernels wherever it is used; `None` goes
/// back to the automatic choice. Errors for an unknown name or one that does not fit the adapter.
#[doc(hidden)]
pub fn force_tile(gpu: &Gpu, name: Option<&str>) -> Result<()> {
    tiled::force(gpu, name)
}

/// The names of the tile configurations this context's adapter can run.
#[doc(hidden)]
pub fn tile_names(gpu: &Gpu) -> Vec<String> {
    tiled::names(gpu)
}

/// The names of the tile configurations whose f16 convolutions run on this context's
/// cooperative matrices (tensor cores; [`crate::gpu::CoopMatrix`]): empty where the context has
/// none. Forced with [`force_tile`], one of these takes them.
#[doc(hidden)]
pub fn coop_tile_names(gpu: &Gpu) -> Vec<String> {
    tiled::coop_names(gpu)
}

fn kernels(gpu: &Gpu) -> Kernels {
    match kernels_cell(gpu).load(Ordering::Relaxed) {
        1 => Kernels::Register,
        2 => Kernels::Tiled,
        3 => Kernels::Tuned,
        _ => Kernels::Auto,
    }
}

/// Whether this context times its choices (tiles, splits, prologue, Winograd, the f16 path's
/// tiles): on GPUs, and on a CPU adapter told to ([`Kernels::Tuned`]), so that tests run the
/// GPU's choosing there; other CPU adapters keep rules, as timing would cost more than it wins.
fn tunes(gpu: &Gpu) -> bool {
    gpu.report.device_type != wgpu::DeviceType::Cpu || kernels(gpu) == Kernels::Tuned
}

/// Where the tiled convolutions apply a BN + ReLU prologue ([`forward_bn_relu`],
/// [`backward_weight_bn_relu`]; a testing and benchmarking aid, `RESNET_WGPU_PROLOGUE=fused` or
/// `separate` does the same for a new context).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prologue {
    /// Timed per (op, shape) where the tile configurations are (GPUs, [`Kernels::Tuned`]),
    /// fused elsewhere.
    Auto,
    /// In the convolution's loads.
    Fused,
    /// A pass of its own ([`batch_norm::affine_relu`] into a context temporary of the input's
    /// size), then the convolution without a prologue: one more write and read of the input,
    /// but no per-element prologue in the convolution's inner loop.
    Separate,
}

fn prologue_cell(gpu: &Gpu) -> Arc<Mutex<Prologue>> {
    gpu.cached("conv.prologue", || {
        let p = crate::gpu::env_choice("RESNET_WGPU_PROLOGUE", "fused, separate or auto", |v| match v {
            "fused" => Some(Prologue::Fused),
            "separate" => Some(Prologue::Separate),
            "auto" => Some(Prologue::Auto),
            _ => None,
        });
        Arc::new(Mutex::new(p.unwrap_or(Prologue::Auto)))
    })
}

/// Lets this context's tiled data ops (forward, backward_data) run their reduction tap-major
/// where the channels allow (`on`, the default), or keeps them channel-major (testing and
/// benchmarking aid; `RESNET_WGPU_CONV_TAPS=off` does the same for a new context). The order
/// of the sums changes the results' last bits.
#[doc(hidden)]
pub fn set_tap_major(gpu: &Gpu, on: bool) {
    tiled::set_tap_major(gpu, on);
}

/// A stage of the tiled kernels' main loop, which [`leave_out`] takes out of them to time what
/// is left (a benchmarking aid: "time variants that leave one stage out, and take
/// differences").
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The global loads of the staged tiles after the first (and their address arithmetic):
    /// their registers take stand-in values; the staging and the products stay.
    Loads,
    /// The products of the staged tiles: one read of each tile stands in for them, so that its
    /// loads and staging stay.
    Products,
    /// The loads and staging of the tiles after the first: every tile's products read the first.
    Staging,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Loads, Stage::Products, Stage::Staging];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Loads => "loads",
            Stage::Products => "products",
            Stage::Staging => "staging",
        }
    }
}

/// The stage a context's tiled kernels leave out ([`leave_out`]), and whether a kernel recorded
/// since has left it out ([`stage_left_out`]).
#[derive(Default)]
pub(super) struct LeaveOut {
    pub stage: Option<Stage>,
    pub taken: bool,
}

pub(super) fn leave_out_cell(gpu: &Gpu) -> Arc<Mutex<LeaveOut>> {
    gpu.cached("conv.leave-out", || Arc::new(Mutex::new(LeaveOut::default())))
}

/// Leaves `stage` out of this context's tiled convolution kernels from now on (`None` puts
/// everything back): **their results are wrong** while a stage is left out. A benchmarking aid
/// (`resnet-wgpu bench --leave-out`): the time of an op with each stage left out in turn, set
/// beside its whole time, says where the time goes. Ops that run the register path or Winograd
/// are unaffected, and so is the autotuner, which times whole kernels whatever is left out. The
/// dispatches' labels (profiles) end in `-{stage}`.
#[doc(hidden)]
pub fn leave_out(gpu: &Gpu, stage: Option<Stage>) {
    *leave_out_cell(gpu).lock().unwrap_or_else(|e| e.into_inner()) = LeaveOut { stage, taken: false };
}

/// Whether a tiled kernel recorded since the last [`leave_out`] has left its stage out (an op
/// on the register path or Winograd leaves nothing out).
#[doc(hidden)]
pub fn stage_left_out(gpu: &Gpu) -> bool {
    leave_out_cell(gpu).lock().unwrap_or_else(|e| e.into_inner()).taken
}

/// An instance of every configuration and variant of the tiled and Winograd templates
/// ([`crate::gpu::module_sources`]).
pub(crate) fn module_sources() -> Vec<(String, String)> {
    let mut out = tiled::module_sources();
    out.extend(winograd::module_sources());
    out
}

/// Sets where this context's tiled convolutions apply a BN + ReLU prologue (testing and
/// benchmarking aid).
#[doc(hidden)]
pub fn set_prologue(gpu: &Gpu, p: Prologue) {
    *prologue_cell(gpu).lock().unwrap_or_else(|e| e.into_inner()) = p;
}

/// Whether `op` (forward or backward_weight) with a prologue under tiled `plan` takes the
/// prologue as a pass of its own ([`Prologue`]); an automatic choice is timed once per (op,
/// shape, plan) and cached. On the H200 the fused prologue made a forward 0.08 to 0.14 ms
/// slower, where the separate pass would cost about 0.03 to 0.05 (BENCHMARKS.md).
fn separate_prologue(gpu: &Gpu, op: Op, g: &Geometry, plan: Plan, half: bool) -> bool {
    let mode = *prologue_cell(gpu).lock().unwrap_or_else(|e| e.into_inner());
    match mode {
        Prologue::Fused => false,
        Prologue::Separate => true,
        Prologue::Auto if !tunes(gpu) => false,
        Prologue::Auto => {
            gpu.cached(("conv.prologue", op, half, *g, plan), || tiled::tune_prologue(gpu, op, g, plan, half))
        }
    }
}

/// `ReLU(BN(x))` from `affine` into this context's temporary of x's size (one per size, reused
/// by every call: each use is recorded before the next call overwrites it, and commands run in
/// order).
fn prologue_pass(rec: &mut Recorder, x: &Tensor, affine: &Tensor) -> Result<Tensor> {
    let a =
        Tensor::from_buffer(rec.gpu, x.dims(), scratch(rec.gpu, "prologue", x.bytes(), wgpu::BufferUsages::STORAGE));
    batch_norm::affine_relu(rec, x, affine, &a)?;
    Ok(a)
}

/// [`prologue_pass`] on the f16 path: `ReLU(BN(x))` rounded once to halves.
fn prologue_pass_f16(rec: &mut Recorder, x: &HalfTensor, affine: &Tensor) -> Result<HalfTensor> {
    let buf = scratch(rec.gpu, "prologue-f16", x.buffer.size(), wgpu::BufferUsages::STORAGE);
    let a = HalfTensor::from_buffer(rec.gpu, x.dims(), buf);
    batch_norm::affine_relu_f16(rec, x, affine, &a)?;
    Ok(a)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    Forward,
    BackwardData,
    BackwardWeight,
}

/// How one convolution runs; chosen per (op, geometry, kernel family) and cached per context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Plan {
    /// Register path, forward or backward_data: weight windows of `span` output channels (a
    /// multiple of [`REG_KB`]).
    Register { span: usize },
    /// Register path, backward_weight: `splits` ranges of `chunk` quads each.
    RegisterWeight { splits: usize, chunk: usize },
    /// Tiled GEMM with configuration `tile` (an index into `tiled::TILES`), its reduction in
    /// `splits` ranges of `chunk` steps (a multiple of every tile's steps; a data op unsplit:
    /// `splits` 1, `chunk` 0).
    /// `coop`: the f16 path's tile arithmetic on cooperative matrices.
    Tiled { tile: usize, splits: usize, chunk: usize, coop: bool },
    /// Winograd (3x3 kernels at stride 1, every op) in configuration `config` (an index into
    /// `winograd::CONFIGS`: F(2x2), or on the f16 path also F(4x4)); `tile` is the tiled
    /// configuration it was chosen over (the f16 path's starting point).
    Winograd { config: usize, tile: usize },
}

/// Floats in one weight window: a `var<uniform> array<vec4f, 4096>` (64 KiB, the smallest
/// `max_uniform_buffer_binding_size` a WebGPU adapter may have).
const WINDOW: usize = 16384;
const WINDOW_BYTES: u64 = WINDOW as u64 * 4;
/// Lanes of the register path's workgroup (`LANES` in the shader).
const LANES: usize = 8;
/// Register path, forward and backward_data: output rows and channels per lane (`rp_data`).
/// Two rows share the weights a lane gathers and broadcasts, and input rows; 2 x 16 channels of
/// a quad are 32 vec4 accumulators, as many as keep the shader's compile time on a CPU adapter
/// under a second.
const REG_ROWS: usize = 2;
const REG_KB: usize = 16;
/// Register path, backward_weight: the (k, c) tile of a workgroup (`rp_wgt`), 3x3 and 1x1.
const REG_WK: usize = 8;
const REG_WC: [usize; 2] = [4, 16];

/// Whether this context's adapter can run the register path at all, under `kernels`.
fn register_adapter(gpu: &Gpu, kernels: Kernels) -> bool {
    let capable = gpu.cached("conv.register-capable", || {
        let info = gpu.adapter.get_info();
        gpu.report.features.contains(wgpu::Features::SUBGROUP) && info.subgroup_min_size >= LANES as u32
    });
    let cpu = gpu.report.device_type == wgpu::DeviceType::Cpu;
    match kernels {
        Kernels::Auto => capable && cpu,
        Kernels::Register => capable,
        Kernels::Tiled | Kernels::Tuned => false,
    }
}

/// Whether the register path's lane layout fits the shape: the lanes' quads (4 pixels of a
/// row) tile the output rows exactly, whole rows per group of 8 lanes (quads per row 1, 2, 4 or
/// 8), and the rows of the texture operand start on texel boundaries.
fn register_layout(g: &Geometry, op: Op) -> bool {
    let quads_ok = |cols: usize| cols.is_multiple_of(4) && matches!(cols / 4, 1 | 2 | 4 | 8);
    match op {
        // Lanes own quads of y (forward) or of dy (backward_weight); x is the texture.
        Op::Forward | Op::BackwardWeight => quads_ok(g.ow) && g.w == g.stride * g.ow,
        // Lanes own quads of dx; dy is the texture (stride 2: two dy columns per quad).
        Op::BackwardData => quads_ok(g.w) && g.w == g.stride * g.ow,
    }
}

fn choose(gpu: &Gpu, op: Op, g: &Geometry, kernels: Kernels) -> Plan {
    let kk = g.ks * g.ks;
    if register_adapter(gpu, kernels) && register_layout(g, op) {
        match op {
            Op::Forward | Op::BackwardData => {
                let (chans, red, operand) = match op {
                    Op::Forward => (g.k, g.c, g.n * g.c * g.h * g.w),
                    _ => (g.c, g.k, g.n * g.k * g.oh * g.ow),
                };
                // A window holds whole blocks of REG_KB output channels.
                let per = red * kk;
                if REG_KB * per <= WINDOW && texture_fits(gpu, operand) {
                    let span = (WINDOW / per / REG_KB * REG_KB).min(chans.div_ceil(REG_KB) * REG_KB);
                    return Plan::Register { span };
                }
            }
            Op::BackwardWeight => {
                // A workgroup per weight tile in y, unfolded: within the device's limit.
                let tiles = g.k.div_ceil(REG_WK) * g.c.div_ceil(REG_WC[usize::from(g.ks == 1)]);
                let fits = tiles <= gpu.device.limits().max_compute_workgroups_per_dimension as usize;
                if fits && texture_fits(gpu, g.n * g.c * g.h * g.w) && texture_fits(gpu, g.n * g.k * g.oh * g.ow) {
                    let quads = g.n * g.oh * g.ow / 4;
                    // A CPU adapter runs a workgroup per core at a time: split the pixels so
                    // that every core has work (two workgroups each), in whole groups of 8
                    // quads of at least 8 steps.
                    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
                    // Their partial sums are bound whole: within the binding limit.
                    let most = tiled::most_partials(gpu) / (g.k * g.c * g.ks * g.ks);
                    let splits = (2 * cores).div_ceil(tiles).min(most).clamp(1, quads.div_ceil(8 * LANES).max(1));
                    let chunk = quads.div_ceil(splits).div_ceil(LANES) * LANES;
                    return Plan::RegisterWeight { splits: quads.div_ceil(chunk), chunk };
                }
            }
        }
    }
    tiled::choose(gpu, op, g)
}

fn plan(gpu: &Gpu, op: Op, g: &Geometry) -> Plan {
    let k = kernels(gpu);
    // A forced tile configuration takes the tiled kernels (and is part of the key).
    match tiled::forced(gpu, op, g) {
        Some(t) => gpu.cached(("conv.plan.tile", op, t, *g), || tiled::plan_for(op, g, t, tiled::most_partials(gpu))),
        None => gpu.cached(("conv.plan", op, k, winograd::choice(gpu), *g), || {
            winograd::consider(gpu, op, g, k, choose(gpu, op, g, k), false)
        }),
    }
}

/// [`plan`], where the BN + ReLU prologue (`pre`) with more channels than the register path's
/// window takes the tiled kernels.
fn plan_pre(gpu: &Gpu, op: Op, g: &Geometry, pre: bool) -> Plan {
    match plan(gpu, op, g) {
        Plan::Register { .. } | Plan::RegisterWeight { .. } if pre && g.c > AFFINE_WINDOW => {
            tiled::plan_for(op, g, tiled::rule(gpu, op, g), tiled::most_partials(gpu))
        }
        p => p,
    }
}

/// Records one dispatch of `pipeline` (`label` names it in debuggers).
fn dispatch_pipeline(
    rec: &mut Recorder,
    pipeline: &wgpu::ComputePipeline,
    label: &str,
    params: &Params,
    res: &[(u32, wgpu::BindingResource)],
    groups: [u32; 3],
) {
    rec.dispatch_pipeline(pipeline, label, bytemuck::bytes_of(params), res, groups);
}

/// `count` workgroups along x, folded into x and z where they exceed the per-dimension limit
/// ([`Gpu::fold`]; the shaders take `wid.z * nwg.x + wid.x`), `y` along y.
fn fold(gpu: &Gpu, count: usize, y: usize) -> [u32; 3] {
    let [x, z] = gpu.fold(count);
    [x, y as u32, z]
}

/// A context-lifetime scratch buffer of exactly `bytes` bytes, one per (`role`, size).
fn scratch(gpu: &Gpu, role: &'static str, bytes: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    gpu.cached_buffer(("conv.scratch", role, bytes), "conv scratch", bytes, usage)
}

/// Window `i` of a weight-window buffer, as a uniform binding.
fn window(buf: &wgpu::Buffer, i: usize) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer: buf,
        offset: i as u64 * WINDOW_BYTES,
        size: NonZeroU64::new(WINDOW_BYTES),
    })
}

/// y (+)= conv(x, w). x `[N,C,H,W]`, w `[K,C,k,k]` (PyTorch OIHW, k in {1,3}, pad k/2, no
/// bias), y `[N,K,OH,OW]`, stride 1 or 2. accumulate = true adds into y: the fused residual add
/// (x_{l+1} = x_l + F).
pub fn forward(rec: &mut Recorder, x: &Tensor, w: &Tensor, y: &Tensor, stride: usize, accumulate: bool) -> Result<()> {
    super::owned(rec, "conv forward", [x, w, y])?;
    forward_with(rec, x, None, w, y, stride, accumulate)
}

/// y (+)= conv(ReLU(BN(x)), w): [`forward`] of the pre-activation `a = ReLU(gamma * (x - mean) *
/// invstd + beta)`, computed per element as x is loaded (zero padding stays zero), or, where the
/// autotuner found it faster for the shape, by a pass of its own into a context temporary
/// ([`Prologue`]). `affine` is `[C, 4]`, per channel `(mean, gamma * invstd, beta, invstd)`, as
/// [`crate::ops::batch_norm::affine`] writes it.
pub fn forward_bn_relu(
    rec: &mut Recorder,
    x: &Tensor,
    affine: &Tensor,
    w: &Tensor,
    y: &Tensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    super::owned(rec, "conv forward_bn_relu", [x, affine, w, y])?;
    forward_with(rec, x, Some(affine), w, y, stride, accumulate)
}

/// [`forward`] (or [`forward_bn_relu`], with `pre`) for a convolution whose output a training
/// batch norm normalises next, and that batch norm's statistics of `y` (as
/// [`batch_norm::stats_train`] computes them: `save_mean`, `save_invstd`, the running
/// statistics moved). Where the convolution runs on the tiled kernels with its reduction whole
/// (GPUs, mostly), its epilogue sums each output tile per channel as it stores it (sum and
/// squared deviations from the tile's mean, of the values written, after `accumulate`) and one
/// small kernel combines them: `y` is not read again. Elsewhere (the register path, Winograd, a
/// split reduction, a batch in chunks) `stats_train` reads `y` after the convolution. The two
/// sum in different orders: results agree to f32 rounding.
#[allow(clippy::too_many_arguments)]
pub fn forward_stats(
    rec: &mut Recorder,
    x: &Tensor,
    pre: Option<&Tensor>,
    w: &Tensor,
    y: &Tensor,
    stride: usize,
    accumulate: bool,
    bn: &BnTensors,
    save_mean: &Tensor,
    save_invstd: &Tensor,
) -> Result<()> {
    super::owned(
        rec,
        "conv forward_stats",
        [x, w, y, save_mean, save_invstd].into_iter().chain(pre).chain(bn.tensors()),
    )?;
    const WHAT: &str = "conv forward_stats";
    let g = Geometry::check(WHAT, ["x", "w", "y"], x, w, y, stride)?;
    super::distinct_out(WHAT, y, &[x, w])?;
    check_affine(WHAT, pre, g.c, &y.buffer)?;
    batch_norm::check_train(WHAT, y, None, bn, save_mean, save_invstd)?;
    // The epilogue's statistics where the whole batch binds at once (else forward_with runs it
    // in chunks, each planned on its own) and the tiled plan keeps its reduction whole.
    let whole: Vec<&Tensor> = std::iter::once(w).chain(pre).collect();
    if split::batch_chunk(rec.gpu, WHAT, g.n, &[x, y], &whole)?.is_none() {
        let plan = plan_pre(rec.gpu, Op::Forward, &g, pre.is_some());
        if matches!(plan, Plan::Tiled { splits: 1, .. }) {
            let (x, pre) = match pre {
                Some(aff) if separate_prologue(rec.gpu, Op::Forward, &g, plan, false) => {
                    (&prologue_pass(rec, x, aff)?, None)
                }
                _ => (x, pre),
            };
            let (xb, wf, yb) = (&x.buffer, Weights::F32(&w.buffer), &y.buffer);
            let Some((part, run)) = tiled::record_forward_stats(rec, &g, plan, false, xb, pre, wf, yb, accumulate)
            else {
                unreachable!("every tile configuration has room for the moments (tiled.rs every_tile_is_valid)")
            };
            return batch_norm::stats_from_moments(rec, y, &part, run, bn, save_mean, save_invstd);
        }
    }
    forward_with(rec, x, pre, w, y, stride, accumulate)?;
    batch_norm::stats_train(rec, y, bn, save_mean, save_invstd)
}

/// [`backward_data`] into `da`, the gradient at the output of a training BN + ReLU whose input
/// is `x` (a pre-activation convolution's input: `affine` as [`forward_bn_relu`] read it, from
/// the saved statistics), then that BN's backward with the ReLU mask
/// ([`batch_norm::backward`] with `relu`): `dx (+)=` the gradient at `x`, `dgamma` and `dbeta`
/// overwritten. On the tiled kernels, unsplit, the convolution's epilogue sums `dz` and
/// `dz * xhat` per channel as it stores `da`, so the BN's backward reads `da` and `x` once (for
/// `dx`) instead of twice. With `accumulate` the convolution adds into `da` (a second path into
/// the same activation, such as a projection shortcut) and the sums are those of the final
/// `da`. Elsewhere (the register path, Winograd, a split reduction, a batch in chunks) the BN's
/// backward makes its own sums.
#[allow(clippy::too_many_arguments)]
pub fn backward_data_bn(
    rec: &mut Recorder,
    dy: &Tensor,
    w: &Tensor,
    da: &Tensor,
    stride: usize,
    accumulate: bool,
    x: &Tensor,
    affine: &Tensor,
    bn: &BnGrads,
    dx: &Tensor,
    accumulate_dx: bool,
) -> Result<()> {
    const WHAT: &str = "conv backward_data_bn";
    super::owned(rec, WHAT, [dy, w, da, x, affine, dx].into_iter().chain(bn.tensors()))?;
    let g = Geometry::check(WHAT, ["da", "w", "dy"], da, w, dy, stride)?;
    super::distinct_out(WHAT, da, &[dy, w])?;
    check_affine(WHAT, Some(affine), g.c, &da.buffer)?;
    batch_norm::check_backward(WHAT, x, da, dx, bn)?;
    // As forward_stats: the epilogue's sums only where the batch binds whole and the plan does
    // not split its reduction.
    if split::batch_chunk(rec.gpu, WHAT, g.n, &[dy, da, x, dx], &[w])?.is_none() {
        let plan = plan(rec.gpu, Op::BackwardData, &g);
        if matches!(plan, Plan::Tiled { splits: 1, .. }) {
            let (dyb, wf, dab, xb) = (&dy.buffer, Weights::F32(&w.buffer), &da.buffer, &x.buffer);
            let Some((part, run)) =
                tiled::record_backward_data_sums(rec, &g, plan, false, dyb, wf, dab, accumulate, xb, affine)
            else {
                unreachable!("every tile configuration has room for the sums (tiled.rs every_tile_is_valid)")
            };
            return batch_norm::backward_from_sums(rec, x, da, bn, dx, accumulate_dx, &part, run);
        }
    }
    backward_data(rec, dy, w, da, stride, accumulate)?;
    let BnGrads { gamma, beta, save_mean, save_invstd, dgamma, dbeta, scratch } = *bn;
    batch_norm::backward(
        rec,
        x,
        da,
        gamma,
        beta,
        save_mean,
        save_invstd,
        true,
        dx,
        dgamma,
        dbeta,
        scratch,
        accumulate_dx,
        false,
    )
}

/// `affine` is `[C, 4]` for an input of `c` channels, and not the output.
fn check_affine(what: &str, affine: Option<&Tensor>, c: usize, out: &wgpu::Buffer) -> Result<()> {
    let Some(a) = affine else { return Ok(()) };
    if a.dims() != [c, 4] {
        return Err(Error::Shape(format!(
            "{what}: affine must be [{c}, 4] (mean, scale, beta, invstd), got {:?}",
            a.dims()
        )));
    }
    if a.buffer == *out {
        return Err(Error::Invalid(format!("{what}: the output must not alias an input")));
    }
    Ok(())
}

/// The buffer bound as a kernel's prologue values (the convolutions' binding 5, the batch-norm
/// statistics' 21): `pre`'s, or where there is none a small context buffer (the kernels declare
/// the binding either way).
pub(crate) fn affine_binding(gpu: &Gpu, pre: Option<&Tensor>) -> wgpu::Buffer {
    match pre {
        Some(t) => t.buffer.clone(),
        None => scratch(gpu, "affine-none", 16, wgpu::BufferUsages::STORAGE),
    }
}

fn forward_with(
    rec: &mut Recorder,
    x: &Tensor,
    pre: Option<&Tensor>,
    w: &Tensor,
    y: &Tensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    const WHAT: &str = "conv forward";
    let g = Geometry::check(WHAT, ["x", "w", "y"], x, w, y, stride)?;
    super::distinct_out(WHAT, y, &[x, w])?;
    check_affine(WHAT, pre, g.c, &y.buffer)?;
    let chunk = |rec: &mut Recorder, _: &_, i: &[Tensor], o: &[Tensor]| {
        forward_with(rec, &i[0], pre, w, &o[0], stride, accumulate)
    };
    let whole: Vec<&Tensor> = std::iter::once(w).chain(pre).collect();
    if split::batch_op(rec, WHAT, &[x], &[(y, accumulate)], &whole, chunk)? {
        return Ok(());
    }
    match plan_pre(rec.gpu, Op::Forward, &g, pre.is_some()) {
        Plan::Register { span } => {
            register_data(rec, &g, Op::Forward, (Acts::F32(x), Acts::F32(y)), pre, w, accumulate, span)
        }
        plan @ Plan::Tiled { .. } => match pre {
            Some(aff) if separate_prologue(rec.gpu, Op::Forward, &g, plan, false) => {
                let a = prologue_pass(rec, x, aff)?;
                tiled::record(rec, Op::Forward, &g, plan, &a, None, w, y, accumulate)
            }
            _ => tiled::record(rec, Op::Forward, &g, plan, x, pre, w, y, accumulate),
        },
        Plan::Winograd { config, .. } => winograd::record_f32(rec, Op::Forward, &g, config, x, pre, w, y, accumulate),
        Plan::RegisterWeight { .. } => unreachable!("a backward_weight plan for forward"),
    }
    Ok(())
}

/// dx (+)= gradient of the loss to the input, given dy.
pub fn backward_data(
    rec: &mut Recorder,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    const WHAT: &str = "conv backward_data";
    super::owned(rec, WHAT, [dy, w, dx])?;
    let g = Geometry::check(WHAT, ["dx", "w", "dy"], dx, w, dy, stride)?;
    super::distinct_out(WHAT, dx, &[dy, w])?;
    let chunk =
        |rec: &mut Recorder, _: &_, i: &[Tensor], o: &[Tensor]| backward_data(rec, &i[0], w, &o[0], stride, accumulate);
    if split::batch_op(rec, WHAT, &[dy], &[(dx, accumulate)], &[w], chunk)? {
        return Ok(());
    }
    match plan(rec.gpu, Op::BackwardData, &g) {
        Plan::Register { span } => {
            register_data(rec, &g, Op::BackwardData, (Acts::F32(dy), Acts::F32(dx)), None, w, accumulate, span)
        }
        plan @ Plan::Tiled { .. } => tiled::record(rec, Op::BackwardData, &g, plan, dy, None, w, dx, accumulate),
        Plan::Winograd { config, .. } => {
            winograd::record_f32(rec, Op::BackwardData, &g, config, dy, None, w, dx, accumulate)
        }
        Plan::RegisterWeight { .. } => unreachable!("a backward_weight plan for backward_data"),
    }
    Ok(())
}

/// dw (+)= gradient to the weights, given x and dy.
pub fn backward_weight(
    rec: &mut Recorder,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    super::owned(rec, "conv backward_weight", [x, dy, dw])?;
    backward_weight_with(rec, x, None, dy, dw, stride, accumulate)
}

/// dw (+)= the weight gradient of [`forward_bn_relu`]: [`backward_weight`] with its input
/// `ReLU(BN(x))` computed from x and `affine` as x is loaded.
pub fn backward_weight_bn_relu(
    rec: &mut Recorder,
    x: &Tensor,
    affine: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    super::owned(rec, "conv backward_weight_bn_relu", [x, affine, dy, dw])?;
    backward_weight_with(rec, x, Some(affine), dy, dw, stride, accumulate)
}

fn backward_weight_with(
    rec: &mut Recorder,
    x: &Tensor,
    pre: Option<&Tensor>,
    dy: &Tensor,
    dw: &Tensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    const WHAT: &str = "conv backward_weight";
    let g = Geometry::check(WHAT, ["x", "dw", "dy"], x, dw, dy, stride)?;
    super::distinct_out(WHAT, dw, &[x, dy])?;
    check_affine(WHAT, pre, g.c, &dw.buffer)?;
    // By chunks of images: the first chunk's sum overwrites dw (unless `accumulate`), each later
    // one is added to it, in order.
    let chunk = |rec: &mut Recorder, r: &std::ops::Range<usize>, i: &[Tensor], _: &[Tensor]| {
        backward_weight_with(rec, &i[0], pre, &i[1], dw, stride, accumulate || r.start > 0)
    };
    let whole: Vec<&Tensor> = std::iter::once(dw).chain(pre).collect();
    if split::batch_op(rec, WHAT, &[x, dy], &[], &whole, chunk)? {
        return Ok(());
    }
    match plan_pre(rec.gpu, Op::BackwardWeight, &g, pre.is_some()) {
        Plan::RegisterWeight { splits, chunk } => {
            register_weight(rec, &g, (Acts::F32(x), Acts::F32(dy)), pre, dw, accumulate, splits, chunk)
        }
        plan @ Plan::Tiled { .. } => match pre {
            Some(aff) if separate_prologue(rec.gpu, Op::BackwardWeight, &g, plan, false) => {
                let a = prologue_pass(rec, x, aff)?;
                tiled::record(rec, Op::BackwardWeight, &g, plan, &a, None, dy, dw, accumulate)
            }
            _ => tiled::record(rec, Op::BackwardWeight, &g, plan, x, pre, dy, dw, accumulate),
        },
        Plan::Winograd { config, .. } => {
            winograd::record_f32(rec, Op::BackwardWeight, &g, config, x, pre, dy, dw, accumulate)
        }
        Plan::Register { .. } => unreachable!("a data op's plan for backward_weight"),
    }
    Ok(())
}

/// out (=|+=) the f32 partial sums in `part` (`[splits][len]`), added in split order: f32, or
/// (`half`) rounded once to f16.
#[allow(clippy::too_many_arguments)]
fn reduce_splits(
    rec: &mut Recorder,
    part: &wgpu::Buffer,
    out: &wgpu::Buffer,
    len: usize,
    splits: usize,
    acc: bool,
    half: bool,
) {
    let params = Params { accumulate: acc as u32, splits: splits as u32, len: len as u32, ..Params::default() };
    let pipeline = rec.gpu.pipeline(if half { Shader::ConvF16 } else { Shader::Conv }, "reduce_splits");
    // 4 elements per invocation (conv.wgsl).
    let groups = rec.gpu.groups_for(len.div_ceil(4));
    let binds = [(8, part.as_entire_binding()), (9, out.as_entire_binding())];
    dispatch_pipeline(rec, &pipeline, "reduce_splits", &params, &binds, groups);
}

/// Scratch for `splits` partial copies of a `len`-element result (split-K partial sums).
///
/// One buffer per size for the life of the context, never one per call: a call's partial sums
/// are written and reduced by that call's own commands, and commands on the one queue run in
/// order (wgpu orders the uses with barriers), so every later call of that size, in the same
/// command buffer or another, reuses it. The split counts are bounded (the plan), so are these.
fn partials(gpu: &Gpu, splits: usize, len: usize) -> wgpu::Buffer {
    scratch(gpu, "partials", (splits * len * 4).max(16) as u64, wgpu::BufferUsages::STORAGE)
}

/// The f16 path's checks: the adapter has shader-f16, the shapes are those of [`forward`] (x,
/// w, y), and the output aliases no input.
fn check_f16(
    gpu: &Gpu,
    what: &str,
    names: [&str; 3],
    t: [(&[usize], &wgpu::Buffer); 3],
    out: usize,
    stride: usize,
) -> Result<Geometry> {
    let nchw = |i: usize| -> Result<[usize; 4]> {
        match t[i].0 {
            &[n, c, h, w] => Ok([n, c, h, w]),
            d => Err(Error::Shape(format!("{what}: {} must be 4-D, got {d:?}", names[i]))),
        }
    };
    let g = Geometry::of_dims(what, names, [nchw(0)?, nchw(1)?, nchw(2)?], stride)?;
    if (0..3).any(|i| i != out && t[i].1 == t[out].1) {
        return Err(Error::Invalid(format!("{what}: the output must not alias an input")));
    }
    for (name, (dims, buffer)) in names.iter().zip(t) {
        split::whole_fits_f16(gpu, &format!("{what}: {name}"), dims, buffer.size())?;
    }
    Ok(g)
}

/// The plan of the f16 path for `op` on `g` (with the BN + ReLU prologue where `pre`): the
/// register path where the f32 op takes it (CPU adapters); else a tile configuration, the f32
/// op's (forced, tuned or ruled) or, on a context with cooperative matrices, its own choice, on
/// them or plain ([`tiled::half_tile`]); or Winograd where it is considered faster.
fn half_plan(gpu: &Gpu, op: Op, g: &Geometry, pre: bool) -> Plan {
    // The f32 plan is looked up first only where the register path can apply: elsewhere (GPUs)
    // it may be timed, and the f16 path on cooperative matrices does not need it. A forced
    // Winograd configuration that fits goes first (F(4x4) may fit where the f32 path's F(2x2)
    // does not).
    if register_adapter(gpu, kernels(gpu))
        && register_layout(g, op)
        && winograd::forced(gpu, op, g, true).is_none()
        && let p @ (Plan::Register { .. } | Plan::RegisterWeight { .. }) = plan_pre(gpu, op, g, pre)
    {
        return p;
    }
    let f32_tile = || match plan(gpu, op, g) {
        Plan::Tiled { tile, .. } | Plan::Winograd { tile, .. } => tile,
        _ => tiled::rule(gpu, op, g),
    };
    let tiled = tiled::half_plan(gpu, op, g, f32_tile);
    // A forced tile configuration takes the tiled kernels, as in `plan`.
    if tiled::forced(gpu, op, g).is_some() {
        return tiled;
    }
    let (k, choice) = (kernels(gpu), winograd::choice(gpu));
    gpu.cached(("conv.half-winograd", op, k, choice, *g, tiled), || winograd::consider(gpu, op, g, k, tiled, true))
}

/// `half_plan` without splits (the fused epilogues need the whole sum); Winograd as it is.
fn half_plan_unsplit(gpu: &Gpu, op: Op, g: &Geometry, pre: bool) -> Plan {
    match half_plan(gpu, op, g, pre) {
        Plan::Tiled { tile, coop, .. } => Plan::Tiled { tile, splits: 1, chunk: 0, coop },
        p => p,
    }
}

/// The f16 path: y (+)= conv(x, w) with x, w and y stored as halves and everything in between
/// in f32, on adapters with `SHADER_F16`: the f32 forward's kernels with f16 loads and stores
/// (the tiled ones in its tile configuration, f32 tiles and accumulation; Winograd; on CPU
/// adapters the register path, its operand an rgba16f texture). Shapes as [`forward`].
/// Where the context has cooperative matrices ([`crate::gpu::CoopMatrix`]: tensor cores) and the
/// tile configuration runs on them (forced, or the tuner's choice), the tiles are f16 and their
/// products run on them, with f32 accumulators; the bound below holds either way
/// (`tests/coop.rs`).
///
/// Error: the exact convolution of the stored halves, accumulated in f32, rounded once to f16
/// (with `accumulate`, after adding the old value in f32): relative L2 error about the f16 unit
/// roundoff, 2^-11 = 4.9e-4, at most; `tests/conv.rs` holds it to 1e-3 against the f64
/// reference on the same (half) inputs.
pub fn forward_f16(
    rec: &mut Recorder,
    x: &HalfTensor,
    w: &impl F16Weights,
    y: &HalfTensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    super::owned_f16(rec, "conv forward_f16", [x, y])?;
    rec.gpu.check_owns("conv forward_f16", w.context())?;
    let t = [(x.dims(), &x.buffer), (w.shape(), w.buffer()), (y.dims(), &y.buffer)];
    let g = check_f16(rec.gpu, "conv forward_f16", ["x", "w", "y"], t, 2, stride)?;
    match half_plan(rec.gpu, Op::Forward, &g, false) {
        Plan::Register { span } => {
            let w = register_weights_f16(rec, w)?;
            register_data(rec, &g, Op::Forward, (Acts::F16(x), Acts::F16(y)), None, &w, accumulate, span)
        }
        Plan::Winograd { config, .. } => {
            winograd::record_half_data(rec, Op::Forward, &g, config, x, None, w, y, accumulate)
        }
        plan => tiled::record_half_data(rec, Op::Forward, &g, plan, x, None, operand(w), y, accumulate),
    }
    Ok(())
}

/// The f16 backward_data: dx (+)= the input gradient, dy, w and dx stored as halves (as
/// [`forward_f16`], with the same bound).
pub fn backward_data_f16(
    rec: &mut Recorder,
    dy: &HalfTensor,
    w: &impl F16Weights,
    dx: &HalfTensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    super::owned_f16(rec, "conv backward_data_f16", [dy, dx])?;
    rec.gpu.check_owns("conv backward_data_f16", w.context())?;
    let t = [(dx.dims(), &dx.buffer), (w.shape(), w.buffer()), (dy.dims(), &dy.buffer)];
    let g = check_f16(rec.gpu, "conv backward_data_f16", ["dx", "w", "dy"], t, 0, stride)?;
    match half_plan(rec.gpu, Op::BackwardData, &g, false) {
        Plan::Register { span } => {
            let w = register_weights_f16(rec, w)?;
            register_data(rec, &g, Op::BackwardData, (Acts::F16(dy), Acts::F16(dx)), None, &w, accumulate, span)
        }
        Plan::Winograd { config, .. } => {
            winograd::record_half_data(rec, Op::BackwardData, &g, config, dy, None, w, dx, accumulate)
        }
        plan => tiled::record_half_data(rec, Op::BackwardData, &g, plan, dy, None, operand(w), dx, accumulate),
    }
    Ok(())
}

/// The f16 backward_weight: dw (+)= the weight gradient from half x and dy, into an f32 `dw`
/// (weights and their gradients stay f32). Nothing is rounded to f16 after the loads (products
/// of halves are exact in f32, on cooperative matrices too): within f32 accuracy (1e-5
/// relative L2) of the f64 reference on the same half inputs.
pub fn backward_weight_f16(
    rec: &mut Recorder,
    x: &HalfTensor,
    dy: &HalfTensor,
    dw: &Tensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    super::owned(rec, "conv backward_weight_f16", [dw])?;
    super::owned_f16(rec, "conv backward_weight_f16", [x, dy])?;
    let t = [(x.dims(), &x.buffer), (dw.dims(), &dw.buffer), (dy.dims(), &dy.buffer)];
    let g = check_f16(rec.gpu, "conv backward_weight_f16", ["x", "dw", "dy"], t, 1, stride)?;
    match half_plan(rec.gpu, Op::BackwardWeight, &g, false) {
        Plan::RegisterWeight { splits, chunk } => {
            register_weight(rec, &g, (Acts::F16(x), Acts::F16(dy)), None, dw, accumulate, splits, chunk)
        }
        Plan::Winograd { config, .. } => winograd::record_half_weight(rec, &g, config, x, None, dy, dw, accumulate),
        plan => tiled::record_half_weight(rec, &g, plan, x, None, dy, dw, accumulate),
    }
    Ok(())
}

/// The weights the f16 path's forward and backward_data take: halves ([`HalfTensor`]), or
/// f32 ([`Tensor`], rounded to f16 as the kernels read them: the f16
/// units keep f32 weights, and their gradients are f32 either way).
pub trait F16Weights {
    /// The shape, `[K, C, k, k]`.
    fn shape(&self) -> &[usize];
    /// The buffer.
    fn buffer(&self) -> &wgpu::Buffer;
    /// Whether the buffer holds halves (else f32).
    fn is_half(&self) -> bool;
    /// The context that made it ([`Gpu::context`]).
    fn context(&self) -> u64;
}

impl F16Weights for HalfTensor {
    fn shape(&self) -> &[usize] {
        self.dims()
    }
    fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    fn is_half(&self) -> bool {
        true
    }
    fn context(&self) -> u64 {
        HalfTensor::context(self)
    }
}

impl F16Weights for Tensor {
    fn shape(&self) -> &[usize] {
        self.dims()
    }
    fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    fn is_half(&self) -> bool {
        false
    }
    fn context(&self) -> u64 {
        Tensor::context(self)
    }
}

/// The tiled kernels' view of f16-path weights.
fn operand(w: &impl F16Weights) -> Weights<'_> {
    if w.is_half() { Weights::F16(w.buffer()) } else { Weights::F32(w.buffer()) }
}

// ---- The f16 units' convolutions: f16 activations, f32 weights (rounded to f16 as they are
// read, as in every f16 convolution) and weight gradients, the batch norms' values and sums
// in f32. On the tiled kernels with their epilogues unsplit; forward_bn_relu_f16 split as the
// plan says (deep layers on small images), its partial sums f32. On Winograd and the register
// path (CPU adapters) the batch norm's own kernels make the statistics and sums. ----

/// `y (+)= conv(ReLU(BN(x)), w)`, [`forward_bn_relu`] on the f16 path: x and y halves, `w` f32
/// or halves ([`F16Weights`]).
pub fn forward_bn_relu_f16(
    rec: &mut Recorder,
    x: &HalfTensor,
    affine: &Tensor,
    w: &impl F16Weights,
    y: &HalfTensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    const WHAT: &str = "conv forward_bn_relu_f16";
    super::owned(rec, WHAT, [affine])?;
    super::owned_f16(rec, WHAT, [x, y])?;
    rec.gpu.check_owns(WHAT, w.context())?;
    let t = [(x.dims(), &x.buffer), (w.shape(), w.buffer()), (y.dims(), &y.buffer)];
    let g = check_f16(rec.gpu, WHAT, ["x", "w", "y"], t, 2, stride)?;
    check_affine(WHAT, Some(affine), g.c, &y.buffer)?;
    let plan = half_plan(rec.gpu, Op::Forward, &g, true);
    match plan {
        Plan::Register { span } => {
            let w = register_weights_f16(rec, w)?;
            let acts = (Acts::F16(x), Acts::F16(y));
            register_data(rec, &g, Op::Forward, acts, Some(affine), &w, accumulate, span);
            return Ok(());
        }
        Plan::Winograd { config, .. } => {
            winograd::record_half_data(rec, Op::Forward, &g, config, x, Some(affine), w, y, accumulate);
            return Ok(());
        }
        _ => {}
    }
    match separate_prologue(rec.gpu, Op::Forward, &g, plan, true) {
        true => {
            let a = prologue_pass_f16(rec, x, affine)?;
            tiled::record_half_data(rec, Op::Forward, &g, plan, &a, None, operand(w), y, accumulate)
        }
        false => tiled::record_half_data(rec, Op::Forward, &g, plan, x, Some(affine), operand(w), y, accumulate),
    }
    Ok(())
}

/// [`forward_stats`] on the f16 path: `y (+)= conv(x, w)` (x through the BN + ReLU prologue
/// `pre` where given), x and y halves, `w` f32 or halves, and the following batch norm's training
/// statistics of `y` as stored (f16), summed in the convolution's epilogue.
#[allow(clippy::too_many_arguments)]
pub fn forward_stats_f16(
    rec: &mut Recorder,
    x: &HalfTensor,
    pre: Option<&Tensor>,
    w: &impl F16Weights,
    y: &HalfTensor,
    stride: usize,
    accumulate: bool,
    bn: &BnTensors,
    save_mean: &Tensor,
    save_invstd: &Tensor,
) -> Result<()> {
    const WHAT: &str = "conv forward_stats_f16";
    super::owned(rec, WHAT, [save_mean, save_invstd].into_iter().chain(pre).chain(bn.tensors()))?;
    super::owned_f16(rec, WHAT, [x, y])?;
    rec.gpu.check_owns(WHAT, w.context())?;
    let t = [(x.dims(), &x.buffer), (w.shape(), w.buffer()), (y.dims(), &y.buffer)];
    let g = check_f16(rec.gpu, WHAT, ["x", "w", "y"], t, 2, stride)?;
    check_affine(WHAT, pre, g.c, &y.buffer)?;
    batch_norm::check_train_f16(rec.gpu, WHAT, y, bn, save_mean, save_invstd)?;
    let plan = half_plan_unsplit(rec.gpu, Op::Forward, &g, pre.is_some());
    // Elsewhere than the tiled kernels, the statistics by the batch norm's own kernels, reading y.
    match plan {
        Plan::Register { span } => {
            let w = register_weights_f16(rec, w)?;
            register_data(rec, &g, Op::Forward, (Acts::F16(x), Acts::F16(y)), pre, &w, accumulate, span);
            return batch_norm::stats_train_f16(rec, y, bn, save_mean, save_invstd);
        }
        Plan::Winograd { config, .. } => {
            winograd::record_half_data(rec, Op::Forward, &g, config, x, pre, w, y, accumulate);
            return batch_norm::stats_train_f16(rec, y, bn, save_mean, save_invstd);
        }
        _ => {}
    }
    let (x, pre) = match pre {
        Some(aff) if separate_prologue(rec.gpu, Op::Forward, &g, plan, true) => {
            (&prologue_pass_f16(rec, x, aff)?, None)
        }
        _ => (x, pre),
    };
    let (xb, yb) = (&x.buffer, &y.buffer);
    let Some((part, run)) = tiled::record_forward_stats(rec, &g, plan, true, xb, pre, operand(w), yb, accumulate)
    else {
        unreachable!("every tile configuration has room for the moments (tiled.rs every_tile_is_valid)")
    };
    batch_norm::stats_from_moments_f16(rec, y, &part, run, bn, save_mean, save_invstd)
}

/// [`backward_weight_bn_relu`] on the f16 path: `dw (+)=` the weight gradient (f32) from half
/// `x`, read through the BN + ReLU prologue, and half `dy`. On cooperative matrices the
/// prologue's outputs are rounded to f16 (their operands): 1e-3 relative L2 (`tests/coop.rs`).
pub fn backward_weight_bn_relu_f16(
    rec: &mut Recorder,
    x: &HalfTensor,
    affine: &Tensor,
    dy: &HalfTensor,
    dw: &Tensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    const WHAT: &str = "conv backward_weight_bn_relu_f16";
    super::owned(rec, WHAT, [affine, dw])?;
    super::owned_f16(rec, WHAT, [x, dy])?;
    let t = [(x.dims(), &x.buffer), (dw.dims(), &dw.buffer), (dy.dims(), &dy.buffer)];
    let g = check_f16(rec.gpu, WHAT, ["x", "dw", "dy"], t, 1, stride)?;
    check_affine(WHAT, Some(affine), g.c, &dw.buffer)?;
    let plan = half_plan(rec.gpu, Op::BackwardWeight, &g, true);
    match plan {
        Plan::RegisterWeight { splits, chunk } => {
            let acts = (Acts::F16(x), Acts::F16(dy));
            register_weight(rec, &g, acts, Some(affine), dw, accumulate, splits, chunk);
            return Ok(());
        }
        Plan::Winograd { config, .. } => {
            winograd::record_half_weight(rec, &g, config, x, Some(affine), dy, dw, accumulate);
            return Ok(());
        }
        _ => {}
    }
    match separate_prologue(rec.gpu, Op::BackwardWeight, &g, plan, true) {
        true => {
            let a = prologue_pass_f16(rec, x, affine)?;
            tiled::record_half_weight(rec, &g, plan, &a, None, dy, dw, accumulate)
        }
        false => tiled::record_half_weight(rec, &g, plan, x, Some(affine), dy, dw, accumulate),
    }
    Ok(())
}

/// [`backward_data_bn`] on the f16 path: `da (+)=` the input gradient from half `dy` and `w`
/// (f32 or halves), then the backward of the BN + ReLU whose input is `x` (its sums in the
/// convolution's epilogue, of `da` as stored): `dx (+)=` (half), dgamma and dbeta overwritten
/// (f32).
#[allow(clippy::too_many_arguments)]
pub fn backward_data_bn_f16(
    rec: &mut Recorder,
    dy: &HalfTensor,
    w: &impl F16Weights,
    da: &HalfTensor,
    stride: usize,
    accumulate: bool,
    x: &HalfTensor,
    affine: &Tensor,
    bn: &BnGrads,
    dx: &HalfTensor,
    accumulate_dx: bool,
) -> Result<()> {
    const WHAT: &str = "conv backward_data_bn_f16";
    super::owned(rec, WHAT, [affine].into_iter().chain(bn.tensors()))?;
    super::owned_f16(rec, WHAT, [dy, da, x, dx])?;
    rec.gpu.check_owns(WHAT, w.context())?;
    let t = [(da.dims(), &da.buffer), (w.shape(), w.buffer()), (dy.dims(), &dy.buffer)];
    let g = check_f16(rec.gpu, WHAT, ["da", "w", "dy"], t, 0, stride)?;
    check_affine(WHAT, Some(affine), g.c, &da.buffer)?;
    batch_norm::check_backward_f16(rec.gpu, WHAT, x, da, dx, bn)?;
    let plan = half_plan_unsplit(rec.gpu, Op::BackwardData, &g, false);
    // Elsewhere than the tiled kernels, the sums by the batch norm's own kernels, reading da.
    match plan {
        Plan::Register { span } => {
            let w = register_weights_f16(rec, w)?;
            register_data(rec, &g, Op::BackwardData, (Acts::F16(dy), Acts::F16(da)), None, &w, accumulate, span);
            return batch_norm::backward_f16(rec, x, da, bn, true, dx, accumulate_dx);
        }
        Plan::Winograd { config, .. } => {
            winograd::record_half_data(rec, Op::BackwardData, &g, config, dy, None, w, da, accumulate);
            return batch_norm::backward_f16(rec, x, da, bn, true, dx, accumulate_dx);
        }
        _ => {}
    }
    let (dyb, wf, dab, xb) = (&dy.buffer, operand(w), &da.buffer, &x.buffer);
    let Some((part, run)) = tiled::record_backward_data_sums(rec, &g, plan, true, dyb, wf, dab, accumulate, xb, affine)
    else {
        unreachable!("every tile configuration has room for the sums (tiled.rs every_tile_is_valid)")
    };
    batch_norm::backward_from_sums_f16(rec, x, da, bn, dx, accumulate_dx, &part, run)
}

/// The register path's activations: f32, or halves (the f16 path: `Shader::ConvF16`, its
/// operands copied into rgba16f textures).
#[derive(Clone, Copy)]
enum Acts<'a> {
    F32(&'a Tensor),
    F16(&'a HalfTensor),
}

impl Acts<'_> {
    fn texture(self, rec: &mut Recorder, role: &'static str) -> wgpu::TextureView {
        match self {
            Acts::F32(t) => operand_texture(rec, role, t),
            Acts::F16(t) => operand_texture_f16(rec, role, t),
        }
    }

    fn buffer(&self) -> &wgpu::Buffer {
        match self {
            Acts::F32(t) => &t.buffer,
            Acts::F16(t) => &t.buffer,
        }
    }

    fn shader(self) -> Shader {
        match self {
            Acts::F32(_) => Shader::Conv,
            Acts::F16(_) => Shader::ConvF16,
        }
    }
}

/// The f16 path's weights as the register path's windows copy them: f32 (`w` itself, rounded to
/// halves by the shader as it reads them), or halves widened into a context scratch tensor.
fn register_weights_f16(rec: &mut Recorder, w: &impl F16Weights) -> Result<Tensor> {
    let dims = w.shape();
    if !w.is_half() {
        return Ok(Tensor::from_buffer(rec.gpu, dims, w.buffer().clone()));
    }
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let wide = Tensor::from_buffer(
        rec.gpu,
        dims,
        scratch(rec.gpu, "weights-f32", 4 * dims.iter().product::<usize>() as u64, usage),
    );
    cast::to_f32(rec, &HalfTensor::from_buffer(rec.gpu, dims, w.buffer().clone()), &wide, 1.0)?;
    Ok(wide)
}

/// Register-path forward (a = x, out = y) or backward_data (a = dy, out = dx); `out` has `a`'s
/// type, the weights are f32.
#[allow(clippy::too_many_arguments)]
fn register_data(
    rec: &mut Recorder,
    g: &Geometry,
    op: Op,
    (a, out): (Acts, Acts),
    pre: Option<&Tensor>,
    w: &Tensor,
    acc: bool,
    span: usize,
) {
    let kk = g.ks * g.ks;
    // Quads: 4 columns x REG_ROWS rows of the output.
    let (chans, red, quads) = match op {
        Op::Forward => (g.k, g.c, g.n * g.oh.div_ceil(REG_ROWS) * g.ow / 4),
        _ => (g.c, g.k, g.n * g.h.div_ceil(REG_ROWS) * g.w / 4),
    };
    let windows = chans.div_ceil(span);
    let view = a.texture(rec, "conv.a");
    let buf = scratch(
        rec.gpu,
        "windows",
        windows as u64 * WINDOW_BYTES,
        wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
    );
    // Window i: output channels [i * span, i * span + n) of the weights, laid out
    // [channel][reduction channel][tap] for forward (a contiguous block of OIHW) and
    // [reduction channel][channel][tap] for backward_data (one copy per k).
    for i in 0..windows {
        let (c0, n) = (i * span, span.min(chans - i * span));
        let dst = i as u64 * WINDOW_BYTES;
        match op {
            Op::Forward => rec.encoder().copy_buffer_to_buffer(
                &w.buffer,
                (c0 * red * kk * 4) as u64,
                &buf,
                dst,
                Some((n * red * kk * 4) as u64),
            ),
            _ => {
                for k in 0..g.k {
                    let src = ((k * g.c + c0) * kk * 4) as u64;
                    rec.encoder().copy_buffer_to_buffer(
                        &w.buffer,
                        src,
                        &buf,
                        dst + (k * n * kk * 4) as u64,
                        Some((n * kk * 4) as u64),
                    );
                }
            }
        }
    }
    let entry = register_entry(op, g.stride, g.ks);
    let pipeline = register_pipeline(rec.gpu, a.shader(), entry, pre.is_some());
    let aff = affine_window(rec, pre);
    for i in 0..windows {
        let (c0, n) = (i * span, span.min(chans - i * span));
        let mut params = g.params(acc);
        params.m = quads as u32;
        params.base = c0 as u32;
        params.span = n as u32;
        let binds = [
            (10, wgpu::BindingResource::TextureView(&view)),
            (12, window(&buf, i)),
            (13, out.buffer().as_entire_binding()),
            (5, window(&aff, 0)),
        ];
        dispatch_pipeline(
            rec,
            &pipeline,
            entry,
            &params,
            &binds,
            fold(rec.gpu, quads.div_ceil(LANES), n.div_ceil(REG_KB)),
        );
    }
}

/// Channels the register path's prologue window holds (a 64 KiB uniform `array<vec4f, 4096>`).
const AFFINE_WINDOW: usize = WINDOW / 4;

/// The register path's prologue values as a uniform window (a vector gather on a CPU adapter,
/// where a storage load is a loop over the lanes): `pre` copied into a context scratch buffer,
/// or that buffer unfilled where there is no prologue. At most [`AFFINE_WINDOW`] channels (the
/// plan takes the tiled kernels past that).
fn affine_window(rec: &mut Recorder, pre: Option<&Tensor>) -> wgpu::Buffer {
    let buf = scratch(rec.gpu, "affine", WINDOW_BYTES, wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST);
    if let Some(a) = pre {
        rec.encoder().copy_buffer_to_buffer(&a.buffer, 0, &buf, 0, Some(a.bytes()));
    }
    buf
}

/// The register path's pipeline for `entry` of `shader` (conv.wgsl on f32 or f16
/// activations), with the BN + ReLU prologue on x where `pre` (the shader's `PRE` override).
fn register_pipeline(gpu: &Gpu, shader: Shader, entry: &'static str, pre: bool) -> wgpu::ComputePipeline {
    gpu.pipeline_with(shader, entry, if pre { &[("PRE", 1.0)] } else { &[] })
}

fn register_entry(op: Op, stride: usize, ks: usize) -> &'static str {
    match (op, stride, ks) {
        (Op::Forward, 1, 3) => "rp_forward_s1k3",
        (Op::Forward, 2, 3) => "rp_forward_s2k3",
        (Op::Forward, 1, _) => "rp_forward_s1k1",
        (Op::Forward, _, _) => "rp_forward_s2k1",
        (_, 1, 3) => "rp_backward_data_s1k3",
        (_, 2, 3) => "rp_backward_data_s2k3",
        (_, 1, _) => "rp_backward_data_s1k1",
        _ => "rp_backward_data_s2k1",
    }
}

/// Register-path backward_weight: 8 x 4 (k, c) tiles (1x1: 8 x 16), each split over `splits`
/// ranges of `chunk` quads; partial sums go to scratch and `reduce_splits` when there is more than
/// one.
#[allow(clippy::too_many_arguments)]
fn register_weight(
    rec: &mut Recorder,
    g: &Geometry,
    (x, dy): (Acts, Acts),
    pre: Option<&Tensor>,
    dw: &Tensor,
    acc: bool,
    splits: usize,
    chunk: usize,
) {
    let xv = x.texture(rec, "conv.a");
    let dv = dy.texture(rec, "conv.b");
    let part = partials(rec.gpu, if splits > 1 { splits } else { 0 }, dw.len());
    let ktiles = g.k.div_ceil(REG_WK);
    let ctiles = g.c.div_ceil(REG_WC[usize::from(g.ks == 1)]);
    let mut params = g.params(acc);
    params.m = (g.n * g.oh * g.ow / 4) as u32;
    params.base = ktiles as u32;
    params.chunk = chunk as u32;
    params.splits = splits as u32;
    params.len = dw.len() as u32;
    let entry = match (g.stride, g.ks) {
        (1, 3) => "rp_backward_weight_s1k3",
        (2, 3) => "rp_backward_weight_s2k3",
        (1, _) => "rp_backward_weight_s1k1",
        _ => "rp_backward_weight_s2k1",
    };
    let aff = affine_window(rec, pre);
    let binds = [
        (10, wgpu::BindingResource::TextureView(&xv)),
        (11, wgpu::BindingResource::TextureView(&dv)),
        (6, dw.buffer.as_entire_binding()),
        (7, part.as_entire_binding()),
        (5, window(&aff, 0)),
    ];
    let pipeline = register_pipeline(rec.gpu, x.shader(), entry, pre.is_some());
    dispatch_pipeline(rec, &pipeline, entry, &params, &binds, [splits as u32, (ktiles * ctiles) as u32, 1]);
    if splits > 1 {
        reduce_splits(rec, &part, &dw.buffer, dw.len(), splits, acc, false);
    }
}
