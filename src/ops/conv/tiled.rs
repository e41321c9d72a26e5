//! The tiled implicit-GEMM kernels (`shaders/conv_tiled.wgsl`): the tile configurations, one
//! module per (configuration, op, kernel size, stride) built from the template, the choice of a
//! configuration per (op, shape), and their dispatches.
//!
//! The choice: a configuration forced on the context ([`force`], or the environment variable
//! `RESNET_WGPU_CONV_TILE` naming one) wherever it fits the adapter; else, on a CPU adapter, a
//! fixed rule (timing there is slow and noisy, and CPU adapters mostly take the register path);
//! else the autotuner: on the first use of an (op, shape) it times every configuration that fits
//! on operands of that shape (GPU timestamps where the device has them, else the wall clock),
//! and the plan cache of `conv.rs` keeps the fastest for the life of the context. Where a data
//! op's rule splits its reduction, the same timing ([`tune_split`]) decides whether it does. Where
//! an op has a BN + ReLU prologue, the same timing ([`tune_prologue`]) decides whether it stays
//! fused or runs as a pass of its own. With `RESNET_WGPU_CONV_TUNE_LOG` set, each tuning prints its
//! timings to stderr.
//!
//! The f16 path, on a context with cooperative matrices (tensor cores; [`CoopMatrix`]), builds
//! its modules with `shaders/conv_tiled_coop.wgsl` in place of the template's plain tile
//! arithmetic for the configurations that divide into whole fragments and subgroups
//! ([`Tile::coop_layout`]): the tuner times those beside the plain ones; a forced configuration
//! that does not divide runs 64x64 with 16 steps on them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    Geometry, Op, Params, Plan, Stage, affine_binding, dispatch_pipeline, fold, leave_out_cell, partials,
    reduce_splits, scratch, tunes,
};
use crate::bench::{Run, Timer};
use crate::error::{Error, Result};
use crate::gpu::{CoopMatrix, Gpu, Recorder, unroll};
use crate::ops::batch_norm;
use crate::tensor::{HalfTensor, Tensor};

/// One tile configuration: a `bm` x `bn` output tile per workgroup, `bk` reduction steps staged
/// per tile, `tm` x `tn` outputs per invocation; `coop_only`: for the f16 path on cooperative
/// matrices only (their f16 tiles take half the workgroup memory of the plain ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tile {
    pub bm: usize,
    pub bn: usize,
    pub bk: usize,
    pub tm: usize,
    pub tn: usize,
    pub coop_only: bool,
}

const fn tile(bm: usize, bn: usize, bk: usize, tm: usize, tn: usize) -> Tile {
    Tile { bm, bn, bk, tm, tn, coop_only: false }
}

const fn coop_tile(bm: usize, bn: usize, bk: usize, tm: usize, tn: usize) -> Tile {
    Tile { coop_only: true, ..tile(bm, bn, bk, tm, tn) }
}

/// The candidates. Each is valid for all three ops (see [`Tile::valid`]); the first two are the
/// small tiles of the fixed rule (few output channels), the rest trade registers per invocation
/// against workgroups in flight. 128x128 with 16 steps needs 33 KiB of workgroup memory and is
/// left out where the adapter has less. The one after it keeps 128x128's 8x8 outputs per
/// invocation on a workgroup of 64 invocations: as many registers per output, four times the
/// workgroups on the deep layers' small grids (on the H200, 128x128 came within 5% of the best
/// there with fewer workgroups than multiprocessors). 128x64 and 64x128 with 8x8 take 8 steps:
/// 128x128 with 8 steps took a quarter less time than with 16 at 28x28 and 14x14 on the H200
/// (half the workgroup memory, more workgroups resident per multiprocessor). The last two, with
/// 32 steps (two products of 16x16 fragments per barrier), are the f16 path's on cooperative
/// matrices only.
pub(super) const TILES: &[Tile] = &[
    tile(64, 16, 16, 4, 4),
    tile(16, 64, 16, 4, 4),
    tile(64, 64, 16, 4, 4),
    tile(64, 32, 16, 4, 4),
    tile(32, 64, 16, 4, 4),
    tile(128, 32, 16, 8, 4),
    tile(128, 64, 16, 8, 4),
    tile(64, 128, 16, 4, 8),
    tile(128, 128, 8, 8, 8),
    tile(128, 64, 8, 8, 8),
    tile(64, 128, 8, 8, 8),
    tile(128, 128, 16, 8, 8),
    tile(64, 64, 16, 8, 8),
    coop_tile(64, 64, 32, 4, 4),
    coop_tile(128, 64, 32, 8, 4),
];

impl Tile {
    pub fn threads(&self) -> usize {
        (self.bm / self.tm) * (self.bn / self.tn)
    }

    pub fn name(&self) -> String {
        format!("{}x{}k{}t{}x{}", self.bm, self.bn, self.bk, self.tm, self.tn)
    }

    /// Two buffers of each operand tile, rows padded by one vec4.
    fn workgroup_bytes(&self) -> usize {
        2 * self.bk * (self.bm / 4 + 1 + self.bn / 4 + 1) * 16
    }

    /// The divisibility the template's staging loops assume, for both kernels: data (a fixed
    /// GEMM row per invocation, whole vec4 columns of B) and weight (a fixed reduction step per
    /// invocation).
    pub fn valid(&self) -> bool {
        let t = self.threads();
        let v4 = |n: usize| n.is_multiple_of(4);
        v4(self.tm)
            && v4(self.tn)
            && self.bm.is_multiple_of(self.tm)
            && self.bn.is_multiple_of(self.tn)
            && t.is_multiple_of(self.bm)
            && t.is_multiple_of(self.bn / 4)
            && (self.bk * self.bn / 4).is_multiple_of(t)
            && t.is_multiple_of(self.bk)
            && (self.bk * self.bm).is_multiple_of(t)
            && (self.bk * self.bn).is_multiple_of(t)
    }

    /// Whether the forward's STATS epilogue fits: one vec4 of column sums per (row thread,
    /// column group) in the A tile.
    pub fn stats_fit(&self) -> bool {
        (self.bm / self.tm) * (self.bn / 4) <= 2 * self.bk * (self.bm / 4 + 1)
    }

    /// Whether the adapter can run it.
    fn fits(&self, gpu: &Gpu) -> bool {
        self.fits_with(gpu, self.workgroup_bytes())
    }

    fn fits_with(&self, gpu: &Gpu, workgroup_bytes: usize) -> bool {
        let l = gpu.device.limits();
        let t = self.threads() as u32;
        t <= l.max_compute_invocations_per_workgroup
            && t <= l.max_compute_workgroup_size_x
            && workgroup_bytes as u32 <= l.max_compute_workgroup_storage_size
    }

    /// How this configuration runs on cooperative matrices `c` (conv_tiled_coop.wgsl) on this
    /// context's adapter, if it can: [`Tile::coop_shape`] with room in workgroup memory.
    fn coop_layout(&self, gpu: &Gpu, c: CoopMatrix) -> Option<CoopLayout> {
        self.coop_shape(c).filter(|l| self.fits_with(gpu, l.workgroup_bytes(self)))
    }

    /// The layout on cooperative matrices `c`, where the configuration divides into whole
    /// fragments (tile and reduction steps) and whole subgroups, with the fragment grid shared
    /// evenly among the subgroups.
    fn coop_shape(&self, c: CoopMatrix) -> Option<CoopLayout> {
        let (f, sg, t) = (c.size as usize, c.subgroup as usize, self.threads());
        if !(self.bm.is_multiple_of(f)
            && self.bn.is_multiple_of(f)
            && self.bk.is_multiple_of(f)
            && t.is_multiple_of(sg))
        {
            return None;
        }
        let (fm, fn_, warps) = (self.bm / f, self.bn / f, t / sg);
        // Subgroups nwr per fragment column and warps / nwr per row: the fewest fragment loads
        // per product (wr + wc).
        let (nwr, wr, wc) = (1..=warps)
            .filter(|&d| warps.is_multiple_of(d) && fm.is_multiple_of(d) && fn_.is_multiple_of(warps / d))
            .map(|d| (d, fm / d, fn_ / (warps / d)))
            .min_by_key(|&(_, wr, wc)| wr + wc)?;
        // tc: at most 16 KiB, whole fragment rows.
        let tcs = self.bn + 4;
        let mut tcr = self.bm;
        while tcr * tcs * 4 > 16384 && tcr.is_multiple_of(2 * f) {
            tcr /= 2;
        }
        Some(CoopLayout { f, sg, nwr, wr, wc, tcr, tcs })
    }

    /// The template with this configuration's constants and build `b`'s (op, kernel size,
    /// stride, variant) (and, for a COOP build, the cooperative-matrix block in place of the
    /// plain one).
    fn source(&self, b: Build, coop: Option<CoopLayout>) -> String {
        let Build { op, ks, stride, half, pre, stats, bsums, taps, .. } = b;
        let t = self.threads();
        let (a_per, b_per, step) = match op {
            // Data: A scalars and B vec4s per invocation, one fixed row / vec4 column each.
            Op::Forward | Op::BackwardData => (self.bk * self.bm / t, self.bk * self.bn / 4 / t, 0),
            // Weight: scalars of both, one fixed reduction step each.
            Op::BackwardWeight => (self.bk * self.bm / t, self.bk * self.bn / t, t / self.bk),
        };
        let consts = [
            ("BM", self.bm),
            ("BN", self.bn),
            ("BK", self.bk),
            ("TM", self.tm),
            ("TN", self.tn),
            ("TMV", self.tm / 4),
            ("TNV", self.tn / 4),
            ("THREADS", t),
            ("ACC_LEN", self.tm * self.tn / 4),
            ("KS", ks),
            ("KK", ks * ks),
            ("PAD", ks / 2),
            ("STRIDE", stride),
            ("MODE", usize::from(op == Op::BackwardData)),
            ("AS", self.bm / 4 + 1),
            ("BS", self.bn / 4 + 1),
            ("TA_LEN", 2 * self.bk * (self.bm / 4 + 1)),
            ("TB_LEN", 2 * self.bk * (self.bn / 4 + 1)),
            ("A_PER", a_per),
            ("B_PER", b_per),
            ("ASTEP", t / self.bm),
            ("BSTEP", t / (self.bn / 4)),
            ("RSTEP", step.max(1)),
            ("CB", taps.max(1)),
        ];
        let mut s = crate::gpu::storage_type(half);
        s.push_str(&format!(
            "const PRE: bool = {pre};\nconst STATS: bool = {stats};\nconst BSUMS: bool = {bsums};\nconst TAPS: bool = {};\n",
            taps > 0
        ));
        let leave_out = match b.leave_out {
            None => 0,
            Some(Stage::Loads) => 1,
            Some(Stage::Products) => 2,
            Some(Stage::Staging) => 3,
        };
        s.push_str(&format!("const LEAVE_OUT: u32 = {leave_out}u;\n"));
        let mut template = TEMPLATE.replace("@workgroup_size(THREADS)", &format!("@workgroup_size({t})"));
        let mut consts = consts.to_vec();
        if let Some(l) = coop {
            s.insert_str(0, "enable wgpu_cooperative_matrix;\n");
            let f = l.f;
            for role in ["A", "B"] {
                s.push_str(&format!("alias Frag{role} = coop_mat{f}x{f}<f16, {role}>;\n"));
            }
            s.push_str(&format!("alias FragC = coop_mat{f}x{f}<f32, C>;\n"));
            // ta and tb hold only the epilogues' column sums.
            let (ta_len, tb_len) = l.sums_lens(self);
            consts.retain(|(k, _)| !matches!(*k, "TA_LEN" | "TB_LEN"));
            consts.extend([
                ("TA_LEN", ta_len),
                ("TB_LEN", tb_len),
                ("F", f),
                ("SG", l.sg),
                ("NWR", l.nwr),
                ("WR", l.wr),
                ("WC", l.wc),
                ("AHS", self.bm + 8),
                ("BHS", self.bn + 8),
                ("TCR", l.tcr),
                ("TCS", l.tcs),
            ]);
            let (begin, end) = (template.find("// @plain-begin"), template.find("// @plain-end"));
            let (Some(begin), Some(end)) = (begin, end) else { unreachable!("the template marks its plain block") };
            template.replace_range(begin..end + "// @plain-end".len(), COOP_BLOCK);
        }
        s.extend(consts.iter().map(|(k, v)| format!("const {k}: u32 = {v}u;\n")));
        s.push_str(&template);
        unroll(&s, &consts)
    }
}

const TEMPLATE: &str = include_str!("../../../shaders/conv_tiled.wgsl");
const COOP_BLOCK: &str = include_str!("../../../shaders/conv_tiled_coop.wgsl");

/// A tile configuration on cooperative matrices ([`Tile::coop_layout`]): `f` x `f` fragments,
/// subgroups of `sg`, `nwr` subgroups per column of the fragment grid, each owning `wr` x `wc`
/// fragments; drain's staging buffer of `tcr` rows of stride `tcs` floats.
#[derive(Clone, Copy, Debug)]
struct CoopLayout {
    f: usize,
    sg: usize,
    nwr: usize,
    wr: usize,
    wc: usize,
    tcr: usize,
    tcs: usize,
}

impl CoopLayout {
    /// The vec4s of ta and tb the epilogues' column sums use (tile_column_sums, tile_moments).
    fn sums_lens(&self, t: &Tile) -> (usize, usize) {
        ((t.bm / t.tm) * (t.bn / 4), t.bn / 4)
    }

    /// Two f16 buffers of each operand tile, tc, and the column sums' vec4s.
    fn workgroup_bytes(&self, t: &Tile) -> usize {
        let (ta, tb) = self.sums_lens(t);
        2 * t.bk * (t.bm + 8 + t.bn + 8) * 2 + self.tcr * self.tcs * 4 + (ta + tb) * 16
    }
}

/// Which module of the template: the op, kernel size and stride, f16 storage (`half`), the
/// BN + ReLU prologue on x (`pre`), the forward's per-channel sums of y (`stats`) and
/// backward_data's sums for the backward of the BN + ReLU before the convolution (`bsums`),
/// (f16 only) the tile arithmetic on cooperative matrices (`coop`), and (data ops) the block of
/// channels of a tap-major reduction, 0 for channel-major ([`taps`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Build {
    op: Op,
    ks: usize,
    stride: usize,
    half: bool,
    pre: bool,
    stats: bool,
    bsums: bool,
    coop: bool,
    taps: usize,
    /// A stage of the main loop left out ([`super::leave_out`]; the template's LEAVE_OUT).
    leave_out: Option<Stage>,
}

impl Build {
    fn of(op: Op, g: &Geometry, half: bool, pre: bool) -> Build {
        Build {
            op,
            ks: g.ks,
            stride: g.stride,
            half,
            pre,
            stats: false,
            bsums: false,
            coop: false,
            taps: 0,
            leave_out: None,
        }
    }

    /// This build with the stage the context leaves out, if any (noted as taken).
    fn leaving_out(self, gpu: &Gpu) -> Build {
        let cell = leave_out_cell(gpu);
        let mut left = cell.lock().unwrap_or_else(|e| e.into_inner());
        left.taken |= left.stage.is_some();
        Build { leave_out: left.stage, ..self }
    }

    /// A dispatch label: the op, configuration `tile`, this build's variant and the splits;
    /// formatted once per context (dispatches look it up).
    fn dispatch_label(&self, gpu: &Gpu, tile: usize, splits: usize) -> Arc<str> {
        gpu.cached(("conv.label", *self, tile, splits), || Arc::from(self.label(tile, splits)))
    }

    /// The label of this build's module of configuration `tile`.
    fn module_label(&self, tile: usize) -> String {
        let Build { op, ks, stride, half, pre, stats, bsums, coop, taps, leave_out } = *self;
        format!(
            "conv.tiled.{}.{op:?}.k{ks}.s{stride}.{}{}{}{}{}{}{}",
            TILES[tile].name(),
            if half { "f16" } else { "f32" },
            if pre { ".pre" } else { "" },
            if stats { ".stats" } else { "" },
            if bsums { ".bsums" } else { "" },
            if coop { ".coop" } else { "" },
            if taps > 0 { format!(".taps{taps}") } else { String::new() },
            leave_out.map_or(String::new(), |s| format!(".no-{}", s.name()))
        )
    }

    fn label(&self, tile: usize, splits: usize) -> String {
        let flags = [
            (self.half, " f16"),
            (self.coop, " coop"),
            (self.pre, " bn-relu"),
            (self.stats, " +stats"),
            (self.bsums, " +bn-sums"),
        ];
        let flags: String = flags.iter().filter(|f| f.0).map(|f| f.1).collect();
        let splits = if splits > 1 { format!(" split {splits}") } else { String::new() };
        let left_out = self.leave_out.map_or(String::new(), |s| format!(" -{}", s.name()));
        format!("conv {:?} {}{flags}{splits}{left_out}", self.op, TILES[tile].name())
    }

    /// This build on cooperative matrices where the plan asks for them (`coop`), the build is
    /// f16, and configuration `tile` runs on this context's.
    fn with_coop(self, gpu: &Gpu, tile: usize, coop: bool) -> Build {
        Build { coop: coop && self.half && coop_layout(gpu, tile).is_some(), ..self }
    }
}

/// Configuration `tile`'s layout on this context's cooperative matrices, if it has them and the
/// configuration runs on them.
fn coop_layout(gpu: &Gpu, tile: usize) -> Option<CoopLayout> {
    gpu.report.coop.and_then(|c| TILES[tile].coop_layout(gpu, c))
}

/// The configuration of the f16 path for `op` on `g`, and whether it runs on cooperative
/// matrices; `f32_tile()` is the f32 plan's configuration. Without cooperative matrices, that
/// one. With them: the forced configuration, on them where it runs on them (else 64x64 with 16
/// steps, on them); where the context tunes (GPUs, `Kernels::Tuned`), the fastest of the
/// configurations, on cooperative matrices and plain, timed on f16 operands of that shape on
/// first use (cached); else (CPU adapters) the f32 plan's, plain: a CPU adapter's cooperative
/// matrices are emulated (on Mesa 26's lavapipe the f16 units ran 1.4x to 1.5x slower on them).
/// On GPUs the plain ones win where the output has few channels: a 16-channel output fills a
/// quarter of a tile of 64 columns on tensor cores.
pub(super) fn half_tile(gpu: &Gpu, op: Op, g: &Geometry, f32_tile: impl FnOnce() -> usize) -> (usize, bool) {
    if gpu.report.coop.is_none() {
        return (f32_tile(), false);
    }
    let square = index_of("64x64k16t4x4");
    let on_coop = |t: usize| match coop_layout(gpu, t).is_some() || coop_layout(gpu, square).is_none() {
        true => (t, coop_layout(gpu, t).is_some()),
        false => (square, true),
    };
    match forced_any(gpu) {
        Some(t) => on_coop(t),
        None if !tunes(gpu) => (f32_tile(), false),
        None => gpu.cached(("conv.half-tile", op, *g), || tune(gpu, op, g, true)),
    }
}

/// `plan` with its tile arithmetic on cooperative matrices (`coop`) or not.
pub(super) fn on_coop(plan: Plan, coop: bool) -> Plan {
    match plan {
        Plan::Tiled { tile, splits, chunk, .. } => Plan::Tiled { tile, splits, chunk, coop },
        p => p,
    }
}

/// What data_main's epilogue writes besides the output: nothing, the forward's moments
/// (`STATS`), or backward_data's BN sums (`BSUMS`, reading the BN's input `x`).
#[derive(Clone, Copy)]
enum Epi<'a> {
    None,
    Moments(&'a wgpu::Buffer),
    BnSums { part: &'a wgpu::Buffer, x: &'a wgpu::Buffer },
}

/// The pipeline of configuration `tile` for `b`, entry point `entry` of the template, built once
/// per context.
fn pipeline(gpu: &Gpu, tile: usize, b: Build, entry: &'static str) -> wgpu::ComputePipeline {
    let t = TILES[tile];
    debug_assert!(t.valid(), "{} breaks the template's staging assumptions", t.name());
    gpu.cached(("conv.tiled", tile, b, entry), || {
        let layout = if b.coop { coop_layout(gpu, tile) } else { None };
        in_range_pipeline(gpu, &format!("{}.{entry}", b.module_label(tile)), &t.source(b, layout), entry)
    })
}

/// An instance of each configuration for each op ([`super::module_sources`]): f32 and f16 on
/// plain arithmetic, and f16 on cooperative matrices of 16x16 fragments in subgroups of 32 (as
/// NVIDIA's Vulkan drivers offer) and of 8x8 (as Metal's simdgroup matrices), where the
/// configuration divides into them; each with the variants' code in it (a forward with the
/// prologue and the statistics, a backward_data with the BN sums, tap-major where it can be).
pub(super) fn module_sources() -> Vec<(String, String)> {
    let coops = [CoopMatrix { size: 16, subgroup: 32 }, CoopMatrix { size: 8, subgroup: 32 }];
    let mut out = Vec::new();
    for (i, t) in TILES.iter().enumerate() {
        for op in [Op::Forward, Op::BackwardData, Op::BackwardWeight] {
            let b = Build {
                op,
                ks: 3,
                stride: 1,
                half: false,
                pre: op != Op::BackwardData,
                stats: op == Op::Forward,
                bsums: op == Op::BackwardData,
                coop: false,
                taps: if op == Op::BackwardWeight { 0 } else { max_bk(false) },
                leave_out: None,
            };
            let mut add = |b: Build, layout: Option<CoopLayout>| {
                let fragments = layout.map(|l| format!(" fragments {0}x{0}", l.f)).unwrap_or_default();
                out.push((b.module_label(i) + &fragments, t.source(b, layout)));
            };
            if !t.coop_only {
                add(b, None);
                add(Build { half: true, ..b }, None);
            }
            for l in coops.iter().filter_map(|&c| t.coop_shape(c)) {
                let taps = if b.taps > 0 { max_bk(true) } else { 0 };
                add(Build { half: true, coop: true, taps, ..b }, Some(l));
            }
        }
    }
    out
}

/// The pipeline of `entry` in `source`, a template instance whose every index is in range by
/// construction ([`Gpu::shader_module_in_range`]) and whose kernels store their workgroup tiles
/// before they read them (so wgpu need not zero them first). Shared with Winograd's template.
pub(super) fn in_range_pipeline(gpu: &Gpu, label: &str, source: &str, entry: &str) -> wgpu::ComputePipeline {
    let module = gpu.shader_module_in_range(label, source);
    gpu.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: None,
        module: &module,
        entry_point: Some(entry),
        compilation_options: wgpu::PipelineCompilationOptions {
            zero_initialize_workgroup_memory: false,
            ..Default::default()
        },
        cache: None,
    })
}

// ---------------------------------------------------------------------------------------------
// Forcing a configuration

/// The context's forced configuration (an index into [`TILES`]), first read from
/// `RESNET_WGPU_CONV_TILE`.
fn forced_cell(gpu: &Gpu) -> Arc<Mutex<Option<usize>>> {
    gpu.cached("conv.tiled.forced", || {
        let from_env = std::env::var("RESNET_WGPU_CONV_TILE").ok().filter(|s| !s.is_empty());
        let index = from_env.and_then(|name| match lookup(gpu, &name) {
            Ok(i) => Some(i),
            Err(e) => {
                eprintln!("RESNET_WGPU_CONV_TILE ignored: {e}");
                None
            }
        });
        Arc::new(Mutex::new(index))
    })
}

fn lookup(gpu: &Gpu, name: &str) -> Result<usize> {
    let i = TILES.iter().position(|t| t.name() == name).ok_or_else(|| {
        let all: Vec<String> = TILES.iter().map(Tile::name).collect();
        Error::Invalid(format!("no conv tile configuration {name:?} (there are {})", all.join(", ")))
    })?;
    let fits = if TILES[i].coop_only { coop_layout(gpu, i).is_some() } else { TILES[i].fits(gpu) };
    if !fits {
        return Err(Error::Invalid(format!("conv tile configuration {name} does not fit this adapter's limits")));
    }
    Ok(i)
}

/// Forces configuration `name` (or, `None`, lifts the force) on this context's tiled
/// convolutions from now on.
pub(super) fn force(gpu: &Gpu, name: Option<&str>) -> Result<()> {
    let index = name.map(|n| lookup(gpu, n)).transpose()?;
    *forced_cell(gpu).lock().unwrap_or_else(|p| p.into_inner()) = index;
    Ok(())
}

/// The forced configuration for `op` on `g` on the plain kernels: a configuration for
/// cooperative matrices only gives way to the rule's.
pub(super) fn forced(gpu: &Gpu, op: Op, g: &Geometry) -> Option<usize> {
    forced_any(gpu).map(|t| if TILES[t].coop_only { rule(gpu, op, g) } else { t })
}

fn forced_any(gpu: &Gpu) -> Option<usize> {
    *forced_cell(gpu).lock().unwrap_or_else(|p| p.into_inner())
}

/// The names of the configurations that fit this context's adapter (on the plain kernels).
pub(super) fn names(gpu: &Gpu) -> Vec<String> {
    TILES.iter().filter(|t| !t.coop_only && t.fits(gpu)).map(Tile::name).collect()
}

/// The names of the configurations the f16 path runs on this context's cooperative matrices
/// (none without them).
pub(super) fn coop_names(gpu: &Gpu) -> Vec<String> {
    coop_tiles(gpu).into_iter().map(|i| TILES[i].name()).collect()
}

fn coop_tiles(gpu: &Gpu) -> Vec<usize> {
    (0..TILES.len()).filter(|&i| coop_layout(gpu, i).is_some()).collect()
}

// ---------------------------------------------------------------------------------------------
// Choosing

fn index_of(name: &str) -> usize {
    TILES.iter().position(|t| t.name() == name).expect("the rule names listed tiles")
}

/// The fixed rule (CPU adapters, and the tuner's fallback): 64 x 64 tiles where there are more
/// than 32 output channels and enough tiles to fill a GPU (about 128 workgroups), else 64 x 16
/// (four times the workgroups); backward_weight 64 x 64 above 16 output channels, else 16 x 64.
/// An adapter whose workgroups hold less than the 64 x 64 tile's 17 KiB (16 KiB is wgpu's
/// default limit, and GL's) takes the smaller one.
pub(super) fn rule(gpu: &Gpu, op: Op, g: &Geometry) -> usize {
    rule_where(op, g, |t| t.fits(gpu))
}

fn rule_where(op: Op, g: &Geometry, fits: impl Fn(&Tile) -> bool) -> usize {
    let (m, cols) = gemm_rows_cols(op, g);
    let big = match op {
        Op::BackwardWeight => g.k > 16,
        _ => cols > 32 && m.div_ceil(64) * cols.div_ceil(64) >= 128,
    };
    let small = index_of(if op == Op::BackwardWeight { "16x64k16t4x4" } else { "64x16k16t4x4" });
    match index_of("64x64k16t4x4") {
        i if big && fits(&TILES[i]) => i,
        _ => small,
    }
}

/// Workgroups of 64x64 outputs that fill a large GPU: four per multiprocessor of a 132-SM
/// H100 or H200. A data op whose output has fewer tiles splits its reduction (`plan_for`).
const DATA_WORKGROUPS: usize = 528;

/// The fewest reduction steps per split that backward_weight's tuner tries ([`tune_weight_split`]).
const WEIGHT_MIN_CHUNK: usize = 128;
/// The fewest reduction steps of a data op's split.
const DATA_MIN_CHUNK: usize = 256;

/// The block of channels by which data op `op` on `g` runs its reduction tap-major (the
/// template's TAPS and CB), or 0 for channel-major: row `(block * KK + tap) * CB + channel %
/// CB`, where the block, CB, is the largest reduction step (a multiple of every other) of the
/// configurations that may run it
/// (plain arithmetic, or `coop`, cooperative matrices) and divides the reduction's channels (C
/// forward, K backward_data). All the rows of a staged tile then share one tap, so its gather
/// works out the tap's position and bounds once a tile instead of per element, and a block's
/// taps come in consecutive tiles, so an element is reused by the next tap a tile later. The
/// same for every plain configuration, as the splits are: whichever of them the autotuner
/// picks, the terms of a sum come in the same order (on cooperative matrices the f16 rounding
/// of the operands differs anyway).
fn taps(op: Op, g: &Geometry, coop: bool) -> usize {
    let chans = match op {
        Op::Forward => g.c,
        Op::BackwardData => g.k,
        Op::BackwardWeight => return 0,
    };
    let block = max_bk(coop);
    if chans.is_multiple_of(block) { block } else { 0 }
}

/// Whether this context may run data ops tap-major ([`taps`]): yes unless turned off by
/// [`set_tap_major`] or, for a new context, `RESNET_WGPU_CONV_TAPS=off` (channel-major
/// everywhere, as before 0af70fe: a benchmarking aid, to time one order against the other).
fn tap_major_cell(gpu: &Gpu) -> Arc<Mutex<bool>> {
    gpu.cached("conv.tap-major", || {
        Arc::new(Mutex::new(crate::gpu::env_switch("RESNET_WGPU_CONV_TAPS").unwrap_or(true)))
    })
}

pub(super) fn set_tap_major(gpu: &Gpu, on: bool) {
    *tap_major_cell(gpu).lock().unwrap_or_else(|e| e.into_inner()) = on;
}

fn tap_major(gpu: &Gpu) -> bool {
    *tap_major_cell(gpu).lock().unwrap_or_else(|e| e.into_inner())
}

/// The largest reduction step of the configurations, with those for cooperative matrices only
/// (`coop`) or without: split ranges are multiples of the first.
fn max_bk(coop: bool) -> usize {
    TILES.iter().filter(|t| coop || !t.coop_only).map(|t| t.bk).max().unwrap_or(16)
}

/// GEMM reduction length of `op`.
fn reduction(op: Op, g: &Geometry) -> usize {
    let kk = g.ks * g.ks;
    match op {
        Op::Forward => g.c * kk,
        Op::BackwardData => g.k * kk,
        Op::BackwardWeight => g.n * g.oh * g.ow,
    }
}

/// GEMM rows and columns of `op`.
fn gemm_rows_cols(op: Op, g: &Geometry) -> (usize, usize) {
    match op {
        Op::Forward => (g.n * g.oh * g.ow, g.k),
        Op::BackwardData => (g.n * g.h * g.w, g.c),
        Op::BackwardWeight => (g.k, g.c * g.ks * g.ks),
    }
}

/// The plan of configuration `tile` for `op` on `g`: split-K where the output alone has too
/// few tiles to fill a GPU, with at most 16 MiB of partial sums.
/// - backward_weight: about 256 workgroups of 64x64 outputs, in at most one split per 256
///   reduction steps.
/// - forward and backward_data, only where the output has fewer than [`DATA_WORKGROUPS`] tiles
///   of 64x64 (deep layers on small images: 512 channels at 7x7 make 200 at batch 32), each
///   split with at least [`DATA_MIN_CHUNK`] steps. Their fused epilogues need the whole sum, so
///   forward_stats and backward_data_bn take their unfused forms there.
///
/// `most` bounds the partial sums, in floats ([`most_partials`]: 16 MiB, or the context's
/// binding limit where that is lower, as the partials are bound whole).
///
/// The split depends on the shape alone, never on the tile: every configuration then adds each
/// output's terms in the same order (ascending within a split, splits in order), so whichever
/// configuration the autotuner picks, the outputs are the same bits. (The fused epilogues' BN
/// sums are not: their runs are a tile's rows, [`record_forward_stats`].)
pub(super) fn plan_for(op: Op, g: &Geometry, tile: usize, most: usize) -> Plan {
    let (rows, cols) = gemm_rows_cols(op, g);
    let tiles = rows.div_ceil(64) * cols.div_ceil(64);
    let red = reduction(op, g);
    let len = rows * cols;
    let cap = most / len.max(1);
    let splits = match op {
        Op::BackwardWeight => 256usize.div_ceil(tiles).min(red.div_ceil(256)),
        _ if tiles >= DATA_WORKGROUPS => 1,
        _ => DATA_WORKGROUPS.div_ceil(tiles).min(red / DATA_MIN_CHUNK),
    };
    split_plan(op, g, tile, splits.min(cap).max(1))
}

/// The most floats of split-K partial sums on `gpu`: 16 MiB of them, or what one binding holds
/// where that is less.
pub(crate) fn most_partials(gpu: &Gpu) -> usize {
    (gpu.max_binding_bytes / 4).min(4 << 20) as usize
}

/// Configuration `tile` for `op` on `g` with its reduction in about `splits` ranges: ranges of
/// whole reduction steps of every configuration, so `splits` may come out smaller.
fn split_plan(op: Op, g: &Geometry, tile: usize, splits: usize) -> Plan {
    if splits <= 1 && op != Op::BackwardWeight {
        return Plan::Tiled { tile, splits: 1, chunk: 0, coop: false };
    }
    let red = reduction(op, g);
    // A multiple of every configuration's reduction step.
    let step = max_bk(true);
    let chunk = red.div_ceil(splits.max(1)).div_ceil(step) * step;
    Plan::Tiled { tile, splits: red.div_ceil(chunk), chunk, coop: false }
}

/// The tiled plan for `op` on `g`: forced, ruled (where the context does not tune, [`tunes`]) or
/// tuned (the configuration, then how it splits its reduction, [`tune_split`]).
pub(super) fn choose(gpu: &Gpu, op: Op, g: &Geometry) -> Plan {
    let tile = match forced(gpu, op, g) {
        Some(i) => return plan_for(op, g, i, most_partials(gpu)),
        None if !tunes(gpu) => return plan_for(op, g, rule(gpu, op, g), most_partials(gpu)),
        None => tune(gpu, op, g, false).0,
    };
    tune_split(gpu, op, g, plan_for(op, g, tile, most_partials(gpu)), false)
}

/// The f16 path's plan for `op` on `g`: [`half_tile`]'s configuration, and where that was tuned,
/// whether a data op splits its reduction ([`tune_split`]); cached.
pub(super) fn half_plan(gpu: &Gpu, op: Op, g: &Geometry, f32_tile: impl FnOnce() -> usize) -> Plan {
    let (tile, coop) = half_tile(gpu, op, g, f32_tile);
    let plan = on_coop(plan_for(op, g, tile, most_partials(gpu)), coop);
    if forced_any(gpu).is_some() || !tunes(gpu) {
        return plan;
    }
    gpu.cached(("conv.half-split", op, *g, plan), || tune_split(gpu, op, g, plan, true))
}

/// The autotuner's warm-up on a GPU: this much wall time or this many rounds, the first reached.
const TUNE_WARM_UP: Duration = Duration::from_millis(100);
const TUNE_WARM_ROUNDS: usize = 10;

/// The fastest configuration that fits: as the tune file recorded it ([`Gpu::tuned`]), else
/// each timed on zero operands of `g`'s shape (warm-up rounds, then the median of three rounds);
/// the rule where nothing could be timed.
/// `half`: the f16 path's configurations, on cooperative matrices where the context has them
/// and plain, on f16 activations and f32 weights (as the f16 units run them); the choice says
/// which (`true`: on cooperative matrices).
fn tune(gpu: &Gpu, op: Op, g: &Geometry, half: bool) -> (usize, bool) {
    let plain = (0..TILES.len()).filter(|&i| !TILES[i].coop_only && TILES[i].fits(gpu)).map(|i| (i, false));
    let candidates: Vec<(usize, bool)> = match half {
        true => coop_tiles(gpu).into_iter().map(|i| (i, true)).chain(plain).collect(),
        false => plain.collect(),
    };
    let name = |(i, coop): (usize, bool)| format!("{}{}", TILES[i].name(), if coop { " coop" } else { "" });
    let names: Vec<String> = candidates.iter().map(|&c| name(c)).collect();
    let decision = format!("tile{} {}", if half { " f16" } else { "" }, tuned_shape(op, g));
    let chosen = tuned(gpu, &decision, &names, || time_tiles(gpu, op, g, half, &candidates, &names));
    chosen.map_or((rule(gpu, op, g), false), |k| candidates[k])
}

/// [`Gpu::tuned`] with `names` as strings, and the choice read back from the tune file shown in
/// the tune log.
pub(super) fn tuned(
    gpu: &Gpu,
    decision: &str,
    names: &[String],
    time: impl FnOnce() -> Option<usize>,
) -> Option<usize> {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    // The kernels differ with the tap order (RESNET_WGPU_CONV_TAPS, set_tap_major): a choice
    // timed with one is not the other's.
    let decision = if tap_major(gpu) { decision.to_string() } else { format!("{decision} channel-major") };
    let mut timed = false;
    let chosen = gpu.tuned(&decision, &names, || {
        timed = true;
        time()
    });
    if let (false, Some(k), true) = (timed, chosen, tune_log()) {
        eprintln!("conv tune {decision}: {} from the tune file", names[k]);
    }
    chosen
}

/// [`tune`]'s timing: the index of the fastest of `candidates` (named `names`), `None` where
/// none could be timed.
fn time_tiles(
    gpu: &Gpu,
    op: Op,
    g: &Geometry,
    half: bool,
    candidates: &[(usize, bool)],
    names: &[String],
) -> Option<usize> {
    let x = [g.n, g.c, g.h, g.w];
    let w = [g.k, g.c, g.ks, g.ks];
    let y = [g.n, g.k, g.oh, g.ow];
    // (input, weights or second input, output) of each op.
    let dims = match op {
        Op::Forward => [x, w, y],
        Op::BackwardData => [y, w, x],
        Op::BackwardWeight => [x, y, w],
    };
    let t = dims.iter().map(|d| Tensor::zeros(gpu, d)).collect::<Result<Vec<_>>>().ok()?;
    // The f16 path's activations: every operand but the weights (or dw).
    let wi = if op == Op::BackwardWeight { 2 } else { 1 };
    let halves = match half {
        true => Some(dims.iter().map(|d| HalfTensor::zeros(gpu, d)).collect::<Result<Vec<_>>>().ok()?),
        false => None,
    };
    let run = |k: usize| {
        let (i, coop) = candidates[k];
        let mut rec = gpu.recorder_untimed("conv tune");
        let plan = on_coop(plan_for(op, g, i, most_partials(gpu)), coop);
        match (&halves, op) {
            (None, _) => record(&mut rec, op, g, plan, &t[0], None, &t[1], &t[2], false),
            (Some(h), Op::BackwardWeight) => record_half_weight(&mut rec, g, plan, &h[0], None, &h[1], &t[wi], false),
            (Some(h), _) => {
                record_half_data(&mut rec, op, g, plan, &h[0], None, Weights::F32(&t[wi].buffer), &h[2], false)
            }
        }
        Ok(rec.finish())
    };
    let times = time_each(gpu, candidates.len(), run);
    let mut best: (f64, Option<usize>) = (f64::INFINITY, None);
    let mut report = Vec::new();
    for (k, ms) in times.into_iter().enumerate() {
        let Some(ms) = ms else {
            report.push(format!("{} failed", names[k]));
            continue;
        };
        report.push(format!("{} {ms:.4}", names[k]));
        if ms < best.0 {
            best = (ms, Some(k));
        }
    }
    if tune_log() {
        let chose = best.1.map_or("the rule", |k| &names[k]);
        eprintln!("conv tune {}: ms {}; chose {chose}", tuned_shape(op, g), report.join(", "));
    }
    best.1
}

/// `op` and `g` in the tuners' log lines (tools/gpu_tune.sh prints them).
pub(super) fn tuned_shape(op: Op, g: &Geometry) -> String {
    format!("{op:?} x [{}, {}, {}, {}] k {} ks {} stride {}", g.n, g.c, g.h, g.w, g.k, g.ks, g.stride)
}

/// Whether `RESNET_WGPU_CONV_TUNE_LOG` asks for the tuners' timings on stderr.
pub(super) fn tune_log() -> bool {
    crate::gpu::env_switch("RESNET_WGPU_CONV_TUNE_LOG").unwrap_or(false)
}

/// The median ms of each of `n` candidates (`run(k)` records candidate k), `None` for one that
/// failed. Each runs once on its own first ([`first_runs`]: its pipelines built, in parallel;
/// one the device rejects drops out), then rounds of all of them round-robin, queued back to
/// back: warm-up rounds on a GPU (whose clocks are down after idling while the CPU built
/// pipelines) for TUNE_WARM_UP of wall time or TUNE_WARM_ROUNDS rounds, whichever comes first
/// (small shapes, whose choice matters little, tune fast), then three timed rounds (GPU
/// timestamps where the device has them, else the wall clock, each run on its own).
pub(super) fn time_each(
    gpu: &Gpu,
    n: usize,
    run: impl Fn(usize) -> Result<wgpu::CommandBuffer> + Sync,
) -> Vec<Option<f64>> {
    // Whole kernels, whatever stage a benchmark leaves out of the context's (super::leave_out).
    let cell = leave_out_cell(gpu);
    let left_out = std::mem::take(&mut *cell.lock().unwrap_or_else(|e| e.into_inner()));
    // An error pending from the caller's recording is the caller's: the candidates' submissions
    // would take it as the first one's failure, and the caller's would find none.
    let pending = gpu.set_error_aside();
    let times = time_whole(gpu, n, run);
    gpu.put_error_back(pending);
    *cell.lock().unwrap_or_else(|e| e.into_inner()) = left_out;
    times
}

fn time_whole(gpu: &Gpu, n: usize, run: impl Fn(usize) -> Result<wgpu::CommandBuffer> + Sync) -> Vec<Option<f64>> {
    let ok = first_runs(gpu, n, &run);
    let mut out = vec![None; n];
    if ok.is_empty() {
        return out;
    }
    let round =
        || -> Result<Vec<Run>> { ok.iter().map(|&k| Ok(Run { untimed: Vec::new(), timed: vec![run(k)?] })).collect() };
    let timer = Timer::new(gpu, true);
    let warm_rounds = if gpu.report.device_type == wgpu::DeviceType::Cpu { 1 } else { TUNE_WARM_ROUNDS };
    let start = Instant::now();
    for _ in 0..warm_rounds {
        if round().and_then(|r| timer.time_queued(gpu, r)).is_err() || start.elapsed() >= TUNE_WARM_UP {
            break;
        }
    }
    let timed: Vec<Option<f64>> = match timer.has_timestamps() {
        true => (0..3)
            .map(|_| round())
            .collect::<Result<Vec<_>>>()
            .and_then(|r| timer.time_queued(gpu, r.into_iter().flatten().collect()))
            .unwrap_or_default(),
        false => {
            (0..3).flat_map(|_| ok.iter().map(|&k| run(k).and_then(|b| Timer::wall_ms(gpu, vec![b])).ok())).collect()
        }
    };
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); ok.len()];
    for (j, ms) in timed.into_iter().enumerate() {
        times[j % ok.len()].extend(ms);
    }
    for (&k, mut t) in ok.iter().zip(times) {
        if t.len() == 3 {
            t.sort_by(f64::total_cmp);
            out[k] = Some(t[1]);
        }
    }
    out
}

/// The candidates among `n` that record (`run(k)`) and run once without an error. They are
/// recorded on as many threads as the host has cores, each under error scopes of its own (wgpu's
/// are per thread), so that a driver that compiles at pipeline creation builds the candidates'
/// pipelines in parallel: the tuner builds about ten per decision. Then each runs on its own,
/// in order. (Lavapipe compiles at a pipeline's first dispatch instead: there the first runs
/// take the compile time, 8.5 of 9.8 s for three ops at one shape with its cache off, with or
/// without the threads.)
fn first_runs(gpu: &Gpu, n: usize, run: &(impl Fn(usize) -> Result<wgpu::CommandBuffer> + Sync)) -> Vec<usize> {
    let record = |k: usize| {
        let validation = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let internal = gpu.device.push_error_scope(wgpu::ErrorFilter::Internal);
        // A scratch buffer refused is this candidate's failure, not the next submission's.
        let (buffer, refused) = crate::gpu::capture_allocation_errors(|| run(k));
        let errors = [internal.pop(), validation.pop()].map(pollster::block_on);
        buffer.ok().filter(|_| refused.is_empty() && errors.iter().all(Option::is_none))
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(4, |c| c.get()).min(n);
    let mut recorded: Vec<(usize, wgpu::CommandBuffer)> = std::thread::scope(|s| {
        let worker = || {
            let mut mine = Vec::new();
            loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if k >= n {
                    return mine;
                }
                mine.extend(record(k).map(|b| (k, b)));
            }
        };
        let threads: Vec<_> = (0..workers).map(|_| s.spawn(worker)).collect();
        threads.into_iter().flat_map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    recorded.sort_by_key(|(k, _)| *k);
    recorded.into_iter().filter_map(|(k, b)| Timer::wall_ms(gpu, vec![b]).ok().map(|_| k)).collect()
}

/// Whether `op` (forward or backward_weight) under tiled `plan` on `g` runs faster with its
/// BN + ReLU prologue as a pass of its own ([`batch_norm::affine_relu`] into a temporary, then
/// the convolution without a prologue) than fused into the convolution's loads, on f32 or
/// (`half`) f16 activations: both timed as [`tune`] times configurations, on zero operands of
/// `g`'s shape. Fused where only the fused one runs or neither does.
pub(super) fn tune_prologue(gpu: &Gpu, op: Op, g: &Geometry, plan: Plan, half: bool) -> bool {
    let x = [g.n, g.c, g.h, g.w];
    let (b, out) = match op {
        Op::BackwardWeight => ([g.n, g.k, g.oh, g.ow], [g.k, g.c, g.ks, g.ks]),
        _ => ([g.k, g.c, g.ks, g.ks], [g.n, g.k, g.oh, g.ow]),
    };
    // x, the second operand, the output, the prologue values, and the separate pass's output.
    let dims = [&x[..], &b, &out, &[g.c, 4], &x];
    let Ok(t) = dims.iter().map(|d| Tensor::zeros(gpu, d)).collect::<Result<Vec<_>>>() else {
        return false;
    };
    // The f16 path's activations (the weights, dw and prologue values stay f32).
    let h = match half {
        true => dims.iter().map(|d| HalfTensor::zeros(gpu, d)).collect::<Result<Vec<_>>>(),
        false => Ok(Vec::new()),
    };
    let Ok(h) = h else { return false };
    let run = |separate: usize| {
        let mut rec = gpu.recorder_untimed("conv tune prologue");
        let (xi, pre) = if separate == 1 { (4, None) } else { (0, Some(&t[3])) };
        if separate == 1 {
            match half {
                false => batch_norm::affine_relu(&mut rec, &t[0], &t[3], &t[4])?,
                true => batch_norm::affine_relu_f16(&mut rec, &h[0], &t[3], &h[4])?,
            }
        }
        match (half, op) {
            (false, _) => record(&mut rec, op, g, plan, &t[xi], pre, &t[1], &t[2], false),
            (true, Op::BackwardWeight) => record_half_weight(&mut rec, g, plan, &h[xi], pre, &h[1], &t[2], false),
            (true, _) => record_half_data(&mut rec, op, g, plan, &h[xi], pre, Weights::F32(&t[1].buffer), &h[2], false),
        }
        Ok(rec.finish())
    };
    let names = ["fused", "separate"].map(str::to_string);
    fastest(gpu, ("prologue", half, op, g, plan), &names, run) == Some(1)
}

/// The fastest of several ways to run `op` on `g` under `plan` (`run(k)` records way k, named
/// `names[k]`), timed as [`time_each`] times them (the first of equal times), or as the tune
/// file recorded; `None` where none ran. With the tune log, prints the timings as `conv tune
/// {what}` and the choice.
fn fastest(
    gpu: &Gpu,
    (what, half, op, g, plan): (&str, bool, Op, &Geometry, Plan),
    names: &[String],
    run: impl Fn(usize) -> Result<wgpu::CommandBuffer> + Sync,
) -> Option<usize> {
    let f16 = if half { " f16" } else { "" };
    let decision = format!("{what}{f16} {} under {}", tuned_shape(op, g), plan_name(plan));
    let time = || {
        let times = time_each(gpu, names.len(), run);
        let ran = (0..names.len()).filter_map(|k| Some((k, times[k]?)));
        let best = ran.min_by(|a, b| a.1.total_cmp(&b.1)).map(|(k, _)| k);
        if tune_log() {
            let ms = |t: Option<f64>| t.map_or("failed".to_string(), |ms| format!("{ms:.4}"));
            let each: Vec<String> = names.iter().zip(&times).map(|(n, &t)| format!("{n} {}", ms(t))).collect();
            let chose = best.map_or("none", |k| &names[k]);
            eprintln!("conv tune {what}{f16} {}: ms {}; chose {chose}", tuned_shape(op, g), each.join(", "));
        }
        best
    };
    tuned(gpu, &decision, names, time)
}

/// A tiled plan's name in the tune file's decisions: its configuration, split and whether it
/// runs on cooperative matrices (another plan's `Debug` form).
pub(super) fn plan_name(plan: Plan) -> String {
    match plan {
        Plan::Tiled { tile, splits, coop, .. } => {
            let split = if splits > 1 { format!(" split {splits}") } else { String::new() };
            format!("{}{split}{}", TILES[tile].name(), if coop { " coop" } else { "" })
        }
        p => format!("{p:?}"),
    }
}

/// backward_weight's `plan` as [`tune_weight_split`] chooses it. Else `plan`, or the same
/// configuration without splitting the reduction, whichever runs `op` faster on `g`, where
/// `plan` is a data op's (forward or backward_data) that [`plan_for`]'s rule split
/// (its output has fewer tiles than [`DATA_WORKGROUPS`]); f32 or (`half`) f16 activations. Both
/// are timed as [`tune`] times configurations, on zero operands of `g`'s shape, the split one with
/// its reduction pass. On the H200 the rule split every ImageNet-like data op from 14x14 down, and
/// the split's reductions took 0.05 to 0.11 ms of a unit's 2.5 (BENCHMARKS.md, cfa22d4); unsplit,
/// a unit's fused epilogues (BN statistics, BN backward sums) apply as well, which this timing
/// leaves out. `plan` where only it runs or neither does.
pub(super) fn tune_split(gpu: &Gpu, op: Op, g: &Geometry, plan: Plan, half: bool) -> Plan {
    let Plan::Tiled { tile, splits, coop, .. } = plan else { return plan };
    if op == Op::BackwardWeight {
        return tune_weight_split(gpu, g, plan, half);
    }
    if splits == 1 {
        return plan;
    }
    let whole = Plan::Tiled { tile, splits: 1, chunk: 0, coop };
    let (x, y) = ([g.n, g.c, g.h, g.w], [g.n, g.k, g.oh, g.ow]);
    let (a, out) = if op == Op::Forward { (x, y) } else { (y, x) };
    // The weights in f32 (as the f16 units keep them); the activations in f32 or f16.
    let Ok(w) = Tensor::zeros(gpu, &[g.k, g.c, g.ks, g.ks]) else { return plan };
    let acts = match half {
        false => [a, out].iter().map(|d| Tensor::zeros(gpu, d)).collect::<Result<Vec<_>>>().map(|t| (t, Vec::new())),
        true => [a, out].iter().map(|d| HalfTensor::zeros(gpu, d)).collect::<Result<Vec<_>>>().map(|h| (Vec::new(), h)),
    };
    let Ok((t, h)) = acts else { return plan };
    let plans = [plan, whole];
    let run = |k: usize| {
        let mut rec = gpu.recorder_untimed("conv tune split");
        match half {
            false => record(&mut rec, op, g, plans[k], &t[0], None, &w, &t[1], false),
            true => record_half_data(&mut rec, op, g, plans[k], &h[0], None, Weights::F32(&w.buffer), &h[1], false),
        }
        Ok(rec.finish())
    };
    let names = [format!("split {splits}"), "whole".to_string()];
    match fastest(gpu, ("split", half, op, g, plan), &names, run) {
        Some(1) => whole,
        _ => plan,
    }
}

/// backward_weight's plan `plan` (the rule's split of the reduction over N * OH * OW: about 256
/// workgroups), or the same configuration in twice or half as many splits, whichever runs
/// fastest on `g`, f32 or (`half`) f16 activations; timed as [`tune`] times configurations, on
/// zero operands of `g`'s shape, with the splits' reduction pass. Twice as many at most where
/// each split keeps [`WEIGHT_MIN_CHUNK`] steps and the partial sums stay within 16 MiB. On the
/// H200 backward_weight ran 1.2x to 1.3x slower than the forward at 28x28 and 14x14 (cfa22d4),
/// on 256 to 300 workgroups.
fn tune_weight_split(gpu: &Gpu, g: &Geometry, plan: Plan, half: bool) -> Plan {
    let op = Op::BackwardWeight;
    let plans = weight_splits(g, plan, most_partials(gpu));
    if plans.len() == 1 {
        return plan;
    }
    let dims = [[g.n, g.c, g.h, g.w], [g.n, g.k, g.oh, g.ow]];
    let Ok(dw) = Tensor::zeros(gpu, &[g.k, g.c, g.ks, g.ks]) else { return plan };
    let acts = match half {
        false => dims.iter().map(|d| Tensor::zeros(gpu, d)).collect::<Result<Vec<_>>>().map(|t| (t, Vec::new())),
        true => dims.iter().map(|d| HalfTensor::zeros(gpu, d)).collect::<Result<Vec<_>>>().map(|h| (Vec::new(), h)),
    };
    let Ok((t, h)) = acts else { return plan };
    let run = |k: usize| {
        let mut rec = gpu.recorder_untimed("conv tune weight split");
        match half {
            false => record(&mut rec, op, g, plans[k], &t[0], None, &t[1], &dw, false),
            true => record_half_weight(&mut rec, g, plans[k], &h[0], None, &h[1], &dw, false),
        }
        Ok(rec.finish())
    };
    let names: Vec<String> = plans
        .iter()
        .map(|p| match p {
            Plan::Tiled { splits: 1, .. } => "whole".to_string(),
            Plan::Tiled { splits, .. } => format!("split {splits}"),
            _ => unreachable!("tiled plans"),
        })
        .collect();
    fastest(gpu, ("weight split", half, op, g, plan), &names, run).map_or(plan, |k| plans[k])
}

/// [`tune_weight_split`]'s candidates: `plan`, then the same configuration in twice and half as
/// many splits, where those differ from it and each other (their partial sums within `most`
/// floats, as [`plan_for`]'s).
fn weight_splits(g: &Geometry, plan: Plan, most: usize) -> Vec<Plan> {
    let Plan::Tiled { tile, splits, coop, .. } = plan else { return vec![plan] };
    let op = Op::BackwardWeight;
    let len = g.k * g.c * g.ks * g.ks;
    let most = (most / len.max(1)).min(reduction(op, g) / WEIGHT_MIN_CHUNK).max(1);
    let mut plans = vec![plan];
    for s in [splits * 2, splits / 2] {
        let p = on_coop(split_plan(op, g, tile, s.clamp(1, most)), coop);
        if !plans.contains(&p) {
            plans.push(p);
        }
    }
    plans
}

// ---------------------------------------------------------------------------------------------
// Recording

/// Records `op` under a tiled `plan`: forward (a = x, b = w, out = y), backward_data (a = dy,
/// b = w, out = dx) or backward_weight (a = x, b = dy, out = dw); x through the BN + ReLU
/// prologue with `pre`'s per-channel values where given (forward and backward_weight).
#[allow(clippy::too_many_arguments)]
pub(super) fn record(
    rec: &mut Recorder,
    op: Op,
    g: &Geometry,
    plan: Plan,
    a: &Tensor,
    pre: Option<&Tensor>,
    b: &Tensor,
    out: &Tensor,
    acc: bool,
) {
    let Plan::Tiled { tile, splits, chunk, .. } = plan else { unreachable!("a tiled plan") };
    let build = Build::of(op, g, false, pre.is_some());
    let aff = affine_binding(rec.gpu, pre);
    match op {
        Op::BackwardWeight => weight(rec, g, tile, build, [&a.buffer, &b.buffer, &aff], out, acc, splits, chunk),
        _ => data(rec, g, build, plan, [&a.buffer, &aff], Weights::F32(&b.buffer), &out.buffer, acc, Epi::None),
    }
}

/// The weights of the data ops: f32, or halves (the f16 path's own weights; the f16 path also
/// takes f32 weights, rounding them as it transposes them).
#[derive(Clone, Copy)]
pub(super) enum Weights<'a> {
    F32(&'a wgpu::Buffer),
    F16(&'a wgpu::Buffer),
}

/// The forward under a tiled `plan` whose epilogue also writes the per-channel moments of y
/// (`tile_moments` in the template), x and y f32 or (`half`) f16: returns the partials buffer
/// (`2 * K * blocks` floats, a context scratch buffer: read it before the next such call) and
/// the rows per block, or `None`, recording nothing, where the configuration has no room for
/// that epilogue or the plan splits the reduction.
#[allow(clippy::too_many_arguments)]
pub(super) fn record_forward_stats(
    rec: &mut Recorder,
    g: &Geometry,
    plan: Plan,
    half: bool,
    x: &wgpu::Buffer,
    pre: Option<&Tensor>,
    w: Weights,
    y: &wgpu::Buffer,
    acc: bool,
) -> Option<(wgpu::Buffer, usize)> {
    let Plan::Tiled { tile, splits, .. } = plan else { unreachable!("a tiled plan") };
    let t = TILES[tile];
    if !t.stats_fit() || splits > 1 {
        return None;
    }
    let (m, cols) = gemm_rows_cols(Op::Forward, g);
    let bytes = (2 * cols * m.div_ceil(t.bm) * 4) as u64;
    let part = scratch(rec.gpu, "moments", bytes, wgpu::BufferUsages::STORAGE);
    let build = Build { stats: true, ..Build::of(Op::Forward, g, half, pre.is_some()) };
    let aff = affine_binding(rec.gpu, pre);
    data(rec, g, build, plan, [x, &aff], w, y, acc, Epi::Moments(&part));
    Some((part, t.bm))
}

/// backward_data under a tiled `plan` (dy -> da) whose epilogue also writes the sums of the
/// backward of the BN + ReLU that produced the convolution's input, from that BN's input `x`
/// and its `affine` values (`BSUMS` in the template), activations f32 or (`half`) f16: returns
/// the partials buffer and the rows per block (as [`record_forward_stats`]), or `None`,
/// recording nothing, where the configuration has no room for that epilogue or the plan splits
/// the reduction.
#[allow(clippy::too_many_arguments)]
pub(super) fn record_backward_data_sums(
    rec: &mut Recorder,
    g: &Geometry,
    plan: Plan,
    half: bool,
    dy: &wgpu::Buffer,
    w: Weights,
    da: &wgpu::Buffer,
    acc: bool,
    x: &wgpu::Buffer,
    affine: &Tensor,
) -> Option<(wgpu::Buffer, usize)> {
    let Plan::Tiled { tile, splits, .. } = plan else { unreachable!("a tiled plan") };
    let t = TILES[tile];
    if !t.stats_fit() || splits > 1 {
        return None;
    }
    let (m, cols) = gemm_rows_cols(Op::BackwardData, g);
    let bytes = (2 * cols * m.div_ceil(t.bm) * 4) as u64;
    let part = scratch(rec.gpu, "bn-sums", bytes, wgpu::BufferUsages::STORAGE);
    let build = Build { bsums: true, ..Build::of(Op::BackwardData, g, half, false) };
    data(rec, g, build, plan, [dy, &affine.buffer], w, da, acc, Epi::BnSums { part: &part, x });
    Some((part, t.bm))
}

/// The f16 forward (a = x, out = y; x through the BN + ReLU prologue with `pre`'s values where
/// given) or backward_data (a = dy, out = dx) under a tiled `plan` (its splits' partial sums
/// f32, rounded to f16 once by [`reduce_splits`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn record_half_data(
    rec: &mut Recorder,
    op: Op,
    g: &Geometry,
    plan: Plan,
    a: &HalfTensor,
    pre: Option<&Tensor>,
    w: Weights,
    out: &HalfTensor,
    acc: bool,
) {
    let aff = affine_binding(rec.gpu, pre);
    data(rec, g, Build::of(op, g, true, pre.is_some()), plan, [&a.buffer, &aff], w, &out.buffer, acc, Epi::None);
}

/// Forward (a = x, out = y) or backward_data (a = dy, out = dx), f32 or (`build.half`) f16: the
/// weights transposed to the GEMM's B operand (a context scratch buffer of their size; f16
/// where the activations are), then the tiled GEMM (with what `epi` says its epilogue writes
/// besides; `build` says the same), its splits summed where the plan has several (never with an
/// epilogue) by [`reduce_splits`], into f32 or f16.
#[allow(clippy::too_many_arguments)]
fn data(
    rec: &mut Recorder,
    g: &Geometry,
    build: Build,
    plan: Plan,
    [a, aff]: [&wgpu::Buffer; 2],
    w: Weights,
    out: &wgpu::Buffer,
    acc: bool,
    epi: Epi,
) {
    let Plan::Tiled { tile, splits, chunk, coop } = plan else { unreachable!("a tiled plan") };
    let t = TILES[tile];
    let op = build.op;
    let (m, cols) = gemm_rows_cols(op, g);
    let red = reduction(op, g);
    let cp = cols.div_ceil(4) * 4;
    let gpu = rec.gpu;
    let params = data_params(g, op, acc, splits, chunk);
    let build = build.with_coop(gpu, tile, coop);
    let build = Build { taps: if tap_major(gpu) { taps(op, g, build.coop) } else { 0 }, ..build }.leaving_out(gpu);
    // The transposition (the template's, from the weights' own type to the activations').
    let (entry, source) = match (build.half, w) {
        (true, Weights::F16(w)) | (false, Weights::F32(w)) => ("transpose_main", (8, w)),
        (true, Weights::F32(w)) => ("transpose_main32", (10, w)),
        (false, Weights::F16(_)) => unreachable!("f16 weights take the f16 path"),
    };
    let elem = if build.half { 2 } else { 4 };
    let wtt = scratch(gpu, "wtt", (red * cp * elem).div_ceil(4) as u64 * 4, wgpu::BufferUsages::STORAGE);
    // The transposition depends on the op, kernel size, type and tap-major block alone: one
    // pipeline for every tile configuration, stride and epilogue (fewer shader compiles).
    let canonical = Build { stride: 1, pre: false, stats: false, bsums: false, coop: false, leave_out: None, ..build };
    let transpose = pipeline(gpu, 0, canonical, entry);
    let binds = [(source.0, source.1.as_entire_binding()), (9, wtt.as_entire_binding())];
    dispatch_pipeline(rec, &transpose, entry, &params, &binds, fold(gpu, transpose_tiles(op, g), 1));
    let mut binds = vec![
        (1, a.as_entire_binding()),
        (2, wtt.as_entire_binding()),
        (3, out.as_entire_binding()),
        (5, aff.as_entire_binding()),
    ];
    let [none_part, none_x] = epilogue_none(gpu);
    let len = m * cols;
    let split_part = (splits > 1).then(|| partials(gpu, splits, len));
    let (part, x) = match (epi, &split_part) {
        (Epi::None, Some(sp)) => (sp, &none_x),
        (Epi::None, None) => (&none_part, &none_x),
        (Epi::Moments(part), None) => (part, &none_x),
        (Epi::BnSums { part, x }, None) => (part, x),
        (_, Some(_)) => unreachable!("the epilogues' callers take unsplit plans"),
    };
    binds.extend([(7, part.as_entire_binding()), (4, x.as_entire_binding())]);
    let p = pipeline(gpu, tile, build, "data_main");
    let groups = fold(gpu, m.div_ceil(t.bm), cols.div_ceil(t.bn) * splits);
    dispatch_pipeline(rec, &p, &build.dispatch_label(rec.gpu, tile, splits), &params, &binds, groups);
    if let Some(sp) = &split_part {
        reduce_splits(rec, sp, out, len, splits, acc, build.half);
    }
}

/// Workgroups of the template's transpose_main*: tiles of 16 rows x 64 columns of B (its
/// columns padded to 4) over `batch` transposed matrices of `rows` rows each (as
/// `transpose_tile` counts them).
fn transpose_tiles(op: Op, g: &Geometry) -> usize {
    let kk = g.ks * g.ks;
    let (cols, rows, batch) = if op == Op::BackwardData { (g.c, kk, g.k) } else { (g.k, g.c * kk, 1) };
    batch * rows.div_ceil(16) * (cols.div_ceil(4) * 4).div_ceil(64)
}

/// The data ops' parameters: GEMM rows, and the reduction in `splits` ranges of `chunk` steps
/// (one range of all of it where unsplit).
fn data_params(g: &Geometry, op: Op, acc: bool, splits: usize, chunk: usize) -> Params {
    let (m, cols) = gemm_rows_cols(op, g);
    let mut params = g.params(acc);
    params.m = m as u32;
    params.splits = splits as u32;
    params.chunk = if splits > 1 { chunk } else { reduction(op, g) } as u32;
    params.len = (m * cols) as u32;
    params
}

/// The buffers bound as data_main's epilogue buffers without STATS or BSUMS (the template
/// declares them either way): one for the partials (binding 7, written) and another for the
/// BN's input (binding 4, read; one buffer cannot be bound both ways in a dispatch).
fn epilogue_none(gpu: &Gpu) -> [wgpu::Buffer; 2] {
    ["epilogue-none-part", "epilogue-none-x"].map(|role| scratch(gpu, role, 16, wgpu::BufferUsages::STORAGE))
}

/// The f16 backward_weight: half x (through the BN + ReLU prologue with `pre`'s values where
/// given) and dy, an f32 dw.
#[allow(clippy::too_many_arguments)]
pub(super) fn record_half_weight(
    rec: &mut Recorder,
    g: &Geometry,
    plan: Plan,
    x: &HalfTensor,
    pre: Option<&Tensor>,
    dy: &HalfTensor,
    dw: &Tensor,
    acc: bool,
) {
    let Plan::Tiled { tile, splits, chunk, coop } = plan else { unreachable!("a tiled plan") };
    let aff = affine_binding(rec.gpu, pre);
    let build = Build::of(Op::BackwardWeight, g, true, pre.is_some()).with_coop(rec.gpu, tile, coop);
    weight(rec, g, tile, build, [&x.buffer, &dy.buffer, &aff], dw, acc, splits, chunk);
}

/// backward_weight: `dw (+)= ` the GEMM of `x` and `dy` (`[x, dy, prologue]`, f16 where
/// `build.half`) over N*OH*OW, in `splits` of `chunk` steps summed by [`reduce_splits`].
#[allow(clippy::too_many_arguments)]
fn weight(
    rec: &mut Recorder,
    g: &Geometry,
    tile: usize,
    build: Build,
    [x, dy, aff]: [&wgpu::Buffer; 3],
    dw: &Tensor,
    acc: bool,
    splits: usize,
    chunk: usize,
) {
    let t = TILES[tile];
    let (rows, cols) = gemm_rows_cols(Op::BackwardWeight, g);
    let mut params: Params = g.params(acc);
    params.chunk = chunk as u32;
    params.splits = splits as u32;
    // With one split the kernel writes dw itself and `part` is bound but unused.
    let part = partials(rec.gpu, if splits > 1 { splits } else { 0 }, dw.len());
    let binds = [
        (1, x.as_entire_binding()),
        (4, dy.as_entire_binding()),
        (6, dw.buffer.as_entire_binding()),
        (7, part.as_entire_binding()),
        (5, aff.as_entire_binding()),
    ];
    let build = build.leaving_out(rec.gpu);
    let p = pipeline(rec.gpu, tile, build, "weight_main");
    let groups = [rows.div_ceil(t.bm) as u32, cols.div_ceil(t.bn) as u32, splits as u32];
    dispatch_pipeline(rec, &p, &build.dispatch_label(rec.gpu, tile, splits), &params, &binds, groups);
    if splits > 1 {
        reduce_splits(rec, &part, &dw.buffer, dw.len(), splits, acc, false);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The tuner's first runs record the candidates on threads of their own: one the device
    /// rejects while it is recorded drops out, the others stay in order, and the error is the
    /// thread's own (caught by its scope, not left for the context's next check).
    #[test]
    fn first_runs_drop_what_the_device_rejects() {
        let gpu = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
        let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let (a, b) = (gpu.create_buffer("a", 16, usage), gpu.create_buffer("b", 16, usage));
        let run = |k: usize| {
            let mut enc = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
            // Candidate 3 copies past the end of both buffers.
            enc.copy_buffer_to_buffer(&a, 0, &b, 0, if k == 3 { 32 } else { 16 });
            Ok(enc.finish())
        };
        assert_eq!(first_runs(&gpu, 6, &run), [0, 1, 2, 4, 5]);
        gpu.take_error().unwrap_or_else(|e| panic!("an error escaped its scope: {e}"));
    }

    /// An error pending from the caller's recording (here a refused scratch buffer) is neither
    /// the first candidate's failure nor lost: every candidate is timed, and the caller's next
    /// check reports it.
    #[test]
    fn tuning_leaves_the_callers_pending_error_to_the_caller() {
        let gpu = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
        let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let (a, b) = (gpu.create_buffer("a", 16, usage), gpu.create_buffer("b", 16, usage));
        gpu.cached_buffer("a tuning test key", "the caller's refused scratch", gpu.report.max_buffer + 4, usage);
        let run = |_: usize| {
            let mut enc = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
            enc.copy_buffer_to_buffer(&a, 0, &b, 0, 16);
            Ok(enc.finish())
        };
        let times = time_each(&gpu, 3, run);
        assert!(times.iter().all(Option::is_some), "{times:?}");
        match gpu.take_error() {
            Err(Error::Device(m)) => assert!(m.contains("allocating the caller's refused scratch failed"), "{m}"),
            other => panic!("expected the caller's error, got {other:?}"),
        }
    }

    /// A candidate whose scratch buffer the context refuses (here past its memory cap) drops
    /// out alone: the refusal is its own, not the error of the next candidate submitted.
    #[test]
    fn first_runs_drop_a_candidate_whose_scratch_is_refused() {
        let fresh = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
        if !crate::gpu::counts_memory(fresh.report.backend) {
            return eprintln!("skipped: no memory cap on {:?} (wgpu counts no memory there)", fresh.report.backend);
        }
        let held = fresh.memory().buffer_bytes + fresh.memory().texture_bytes;
        let opts = crate::GpuOptions { memory_cap: Some(held as u64 + (1 << 20)), ..crate::GpuOptions::from_env() };
        let gpu = Gpu::with_options(&opts).unwrap_or_else(|e| panic!("{e}"));
        let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let (a, b) = (gpu.create_buffer("a", 16, usage), gpu.create_buffer("b", 16, usage));
        let run = |k: usize| {
            // Candidate 3 copies from a scratch buffer of 4 MiB, past the cap.
            let src = if k == 3 { gpu.cached_buffer("a test key", "candidate 3", 4 << 20, usage) } else { a.clone() };
            let mut enc = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
            enc.copy_buffer_to_buffer(&src, 0, &b, 0, 16);
            Ok(enc.finish())
        };
        assert_eq!(first_runs(&gpu, 6, &run), [0, 1, 2, 4, 5]);
        gpu.take_error().unwrap_or_else(|e| panic!("an error escaped its candidate: {e}"));
    }

    #[test]
    fn every_tile_is_valid() {
        for t in TILES {
            assert!(t.valid(), "{} breaks the template's staging assumptions", t.name());
            // Else forward_stats falls back to reading y for that configuration.
            assert!(t.stats_fit(), "{} has no room for the forward's moments", t.name());
        }
    }

    /// On NVIDIA's cooperative matrices (16x16x16, warps of 32) every configuration with
    /// steps of 16 or more has a layout within 48 KiB of workgroup memory (NVIDIA's Vulkan
    /// limit), with whole fragments per warp; lavapipe's (8x8x8, subgroups of 8) too.
    #[test]
    fn coop_layouts() {
        for c in [CoopMatrix { size: 16, subgroup: 32 }, CoopMatrix { size: 8, subgroup: 8 }] {
            for t in TILES {
                let Some(l) = t.coop_shape(c) else {
                    assert!(t.bk < c.size as usize, "{} has no layout on {c:?}", t.name());
                    continue;
                };
                let warps = t.threads() / l.sg;
                assert_eq!(l.nwr * l.wr * l.f, t.bm, "{}", t.name());
                assert_eq!((warps / l.nwr) * l.wc * l.f, t.bn, "{}", t.name());
                assert!(t.bm.is_multiple_of(l.tcr) && l.tcr.is_multiple_of(l.f), "{}", t.name());
                assert!(l.workgroup_bytes(t) <= 48 << 10, "{}: {} bytes", t.name(), l.workgroup_bytes(t));
            }
        }
        // 64x64 tiles: 2 x 1 fragments of 16 for each of 8 warps, drained 32 rows at a time.
        let l = TILES[index_of("64x64k16t4x4")].coop_shape(CoopMatrix { size: 16, subgroup: 32 });
        assert!(matches!(l, Some(CoopLayout { nwr: 2, wr: 2, wc: 1, tcr: 32, .. })), "{l:?}");
    }

    /// Every build of every configuration has its marked loops unrolled: each FMA (MMA) into
    /// the accumulators (fragments) once per accumulator (fragment), none left marked.
    #[test]
    fn every_build_is_unrolled() {
        let coop = CoopMatrix { size: 16, subgroup: 32 };
        let count = |src: &str, line: &str| src.lines().filter(|l| l.trim() == line).count();
        for t in TILES {
            for (op, taps) in [(Op::Forward, 0), (Op::Forward, 16), (Op::BackwardData, 16), (Op::BackwardWeight, 0)] {
                let b = Build {
                    op,
                    ks: 3,
                    stride: 1,
                    half: true,
                    pre: false,
                    stats: false,
                    bsums: false,
                    coop: false,
                    taps,
                    leave_out: None,
                };
                let plain = t.source(b, None);
                assert!(!plain.contains(crate::gpu::UNROLL), "{}", t.name());
                let fma = "(*acc)[j] = fma(s, bv[h], (*acc)[j]);";
                assert_eq!(count(&plain, fma), t.tm * t.tn / 4, "{}", t.name());
                if let Some(l) = t.coop_shape(coop) {
                    let src = t.source(Build { coop: true, ..b }, Some(l));
                    assert!(!src.contains(crate::gpu::UNROLL), "{}", t.name());
                    let mma = "(*frags)[i * WC + j] = coopMultiplyAdd(a[i], b, (*frags)[i * WC + j]);";
                    assert_eq!(count(&src, mma), l.wr * l.wc, "{}", t.name());
                }
            }
        }
    }

    /// No build of any configuration indexes a per-invocation array (accumulators, prefetched
    /// loads, fragments) by a runtime value, so drivers can keep them in registers: the big
    /// tiles ran 11x to 25x slower than 64x64 on the H200, as if those arrays lived in local
    /// memory (BENCHMARKS.md). Checked on naga's IR of every module the pipelines compile.
    #[test]
    fn per_invocation_arrays_are_indexed_by_constants() {
        let coop = CoopMatrix { size: 16, subgroup: 32 };
        for t in TILES {
            for op in [Op::Forward, Op::BackwardData, Op::BackwardWeight] {
                let epilogue = |stats: bool| match op {
                    Op::Forward => (stats, false),
                    Op::BackwardData => (false, stats),
                    Op::BackwardWeight => (false, false),
                };
                for (half, pre, fused) in [(false, false, false), (false, true, true), (true, true, true)] {
                    let (stats, bsums) = epilogue(fused);
                    let pre = pre && op != Op::BackwardData;
                    let b =
                        Build { op, ks: 3, stride: 2, half, pre, stats, bsums, coop: false, taps: 0, leave_out: None };
                    let mut builds = vec![(b, None)];
                    if op != Op::BackwardWeight {
                        builds.push((Build { taps: 16, ..b }, None)); // the data ops' two reduction orders
                    }
                    if let (true, Some(l)) = (half, t.coop_shape(coop)) {
                        let taps = if op == Op::BackwardWeight { 0 } else { 32 };
                        builds.push((Build { coop: true, taps, ..b }, Some(l)));
                    }
                    for (b, l) in builds {
                        let found = crate::gpu::tests::runtime_indices(&t.source(b, l));
                        assert!(
                            found.is_empty(),
                            "{} {op:?} {}: runtime indices in {found:?}",
                            t.name(),
                            b.label(0, 1)
                        );
                    }
                }
            }
        }
    }

    fn geometry(n: usize, c: usize, hw: usize, k: usize) -> Geometry {
        Geometry { n, c, h: hw, w: hw, k, ks: 3, oh: hw, ow: hw, stride: 1 }
    }

    fn splits(op: Op, g: &Geometry) -> (usize, usize) {
        match plan_for(op, g, 0, 4 << 20) {
            Plan::Tiled { splits, chunk, .. } => (splits, chunk),
            p => panic!("{p:?}"),
        }
    }

    /// The fixed rule's 64 x 64 tile (17 KiB of workgroup memory) only where it fits: at wgpu's
    /// default limit of 16 KiB (GL's too) a large op takes the small tile, which fits there.
    #[test]
    fn the_rule_takes_a_tile_that_fits() {
        const DEFAULT: usize = 16384;
        let fits = |t: &Tile| t.workgroup_bytes() <= DEFAULT;
        for op in [Op::Forward, Op::BackwardData, Op::BackwardWeight] {
            let g = geometry(32, 128, 28, 128);
            let (roomy, small) = (rule_where(op, &g, |_| true), rule_where(op, &g, fits));
            assert_eq!(TILES[roomy].name(), "64x64k16t4x4", "{op:?}");
            assert!(TILES[roomy].workgroup_bytes() > DEFAULT, "{op:?}");
            assert!(
                fits(&TILES[small]),
                "{op:?}: {} needs {} bytes",
                TILES[small].name(),
                TILES[small].workgroup_bytes()
            );
        }
    }

    /// The data ops split only deep layers on small images, into whole steps of every tile.
    #[test]
    fn data_ops_split_few_tiles_only() {
        for op in [Op::Forward, Op::BackwardData] {
            // ImageNet-like stages at batch 32: 200 and 392 tiles of 64x64 split 3 and 2 ways;
            // 784 and more do not.
            assert_eq!(splits(op, &geometry(32, 512, 7, 512)), (3, 1536), "{op:?}");
            assert_eq!(splits(op, &geometry(32, 256, 14, 256)), (2, 1152), "{op:?}");
            assert_eq!(splits(op, &geometry(32, 128, 28, 128)).0, 1, "{op:?}");
            assert_eq!(splits(op, &geometry(32, 64, 56, 64)).0, 1, "{op:?}");
            // Short reductions never split, however few the tiles.
            assert_eq!(splits(op, &geometry(1, 16, 4, 16)).0, 1, "{op:?}");
            // Every chunk is whole tiles of every configuration, and the last split is not empty.
            let g = geometry(1, 130, 3, 132);
            let (s, chunk) = splits(op, &g);
            assert!(s > 1 && chunk.is_multiple_of(16) && (s - 1) * chunk < reduction(op, &g), "{op:?}: {s} x {chunk}");
        }
    }

    /// The data ops run tap-major, by blocks of every configuration's steps (16 for plain
    /// arithmetic, 32 on cooperative matrices), where those blocks divide the reduction's
    /// channels (the CIFAR and ImageNet-like stages; 16 channels plain only); never
    /// backward_weight, whose reduction is over pixels.
    #[test]
    fn tap_major_where_the_channels_allow() {
        assert_eq!((max_bk(false), max_bk(true)), (16, 32));
        for (c, k, coop, fwd, bwd) in [
            (64, 64, true, 32, 32),
            (512, 512, false, 16, 16),
            (16, 16, false, 16, 16),
            (16, 16, true, 0, 0),
            (3, 32, true, 0, 32),
            (8, 24, false, 0, 0),
        ] {
            let g = geometry(32, c, 8, k);
            let both = (taps(Op::Forward, &g, coop), taps(Op::BackwardData, &g, coop));
            assert_eq!(both, (fwd, bwd), "{c} -> {k}, coop {coop}");
            assert_eq!(taps(Op::BackwardWeight, &g, coop), 0);
        }
    }

    /// backward_weight's tuner tries the rule's split, twice and half as many, each split of at
    /// least WEIGHT_MIN_CHUNK whole steps covering the reduction, the last one not empty.
    #[test]
    fn weight_split_candidates() {
        let count = |g: &Geometry| -> Vec<usize> {
            let plans = weight_splits(g, plan_for(Op::BackwardWeight, g, 0, 4 << 20), 4 << 20);
            let red = reduction(Op::BackwardWeight, g);
            plans
                .iter()
                .map(|p| match *p {
                    Plan::Tiled { splits, chunk, .. } => {
                        assert!(chunk.is_multiple_of(16) && splits * chunk >= red && (splits - 1) * chunk < red);
                        assert!(splits == 1 || chunk >= WEIGHT_MIN_CHUNK, "{splits} x {chunk}");
                        splits
                    }
                    p => panic!("{p:?}"),
                })
                .collect()
        };
        // 28x28 at batch 32, 128 channels: 36 tiles of 64x64, the rule's 8 splits of 3136 steps.
        assert_eq!(count(&geometry(32, 128, 28, 128)), [8, 16, 4]);
        // 56x56 at 64 channels: 9 tiles, 29 splits of 3488 steps.
        assert_eq!(count(&geometry(32, 64, 56, 64)), [29, 58, 14]);
        // A short reduction (1 image of 4x4): one split; two would leave 8 steps each.
        assert_eq!(count(&geometry(1, 16, 4, 16)), [1]);
        // 512 channels at 7x7: 16 MiB of partial sums hold one copy of dw (9.4 MB): no split,
        // and none tried.
        assert_eq!(count(&geometry(32, 512, 7, 512)), [1]);
    }
}
