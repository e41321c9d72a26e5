//! The benchmark harness: GPU timings of the kernels and of whole residual units, and the same
//! unit through peer implementations (burn on the same adapter, PyTorch on a CUDA GPU) in the
//! same run.
//!
//! What is timed, for each shape `N,C,H,W`:
//! - the 3x3 convolution `C -> C`, stride 1: forward, backward_data, backward_weight;
//! - batch norm in training mode: forward (statistics and normalisation) and backward;
//! - an identity-shortcut unit (`layer1.1` of a net with widths `[C, C, C]`), pre-activation
//!   and original: the training forward alone, and forward + backward (every parameter
//!   gradient and the input gradient).
//!
//! How: each measured run records fresh command buffers (untimed; the recording time is
//! reported apart as `record_ms`). Where the device has `TIMESTAMP_QUERY`, an empty compute pass
//! writes a timestamp before a run's first buffer and another after its last (Vulkan writes both
//! at the bottom of the pipe, i.e. once all earlier work has finished), the runs are queued back
//! to back and waited for once, and the row's `ms` is each run's difference. `wall_ms` (always
//! reported, and `ms` where there are no timestamps) is the wall time of submit + wait of each
//! run on its own. Warm-up runs first, then the median (and the minimum) of the measured runs.
//!
//! Rates: GFLOP/s count `2 * MACs` of the convolutions only (forward + backward of a unit is
//! three times its forward convolutions); GB/s for batch norm count the activation-sized
//! tensors its kernels read and write (see [`BN_FORWARD_PASSES`]).
//!
//! Peers are external programs; one that is missing or fails is reported and skipped.
//!
//! ```no_run
//! use resnet_wgpu::{Gpu, bench};
//! let gpu = Gpu::new()?;
//! let opts = bench::BenchOptions::for_adapter(&gpu, None);
//! let report = bench::run_all(&gpu, &opts)?;
//! bench::print_table(&report);
//! std::fs::write("bench.json", bench::to_json(&report)).unwrap();
//! # Ok::<(), resnet_wgpu::Error>(())
//! ```

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::arch::{Combine, NetConfig, ShortcutOption, UnitKind};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Stream};
use crate::net::{ResNet, Sgd};
use crate::ops::batch_norm::Epilogue;
use crate::ops::conv;
use crate::ops::pool_fc_loss::upload_labels;
use crate::rng::Rng;
use crate::tensor::{Tensor, read_buffer};
use crate::unit::{Bn, Mode, State, Unit, Workspace};

/// CIFAR stages at batch 128 (the widths of ResNet-110 and ResNet-1001).
pub const CIFAR_128: [[usize; 4]; 3] = [[128, 16, 32, 32], [128, 32, 16, 16], [128, 64, 8, 8]];
/// ImageNet-like stages at batch 32.
pub const IMAGENET_32: [[usize; 4]; 4] = [[32, 64, 56, 56], [32, 128, 28, 28], [32, 256, 14, 14], [32, 512, 7, 7]];
/// CIFAR stages at batch 32: the quick default on a software (CPU) adapter.
pub const CIFAR_32: [[usize; 4]; 3] = [[32, 16, 32, 32], [32, 32, 16, 16], [32, 64, 8, 8]];

/// Activation-sized tensors the training BN forward must move: its statistics read `x` once
/// (the wide and vec4 kernels keep a run in registers for the variance), `normalize` reads `x`
/// and writes `y`. A kernel that moves more (the scalar statistics kernel reads `x` twice, the
/// texture path copies it first) shows as a lower rate. Before 2026-12-07 this counted 4.
pub const BN_FORWARD_PASSES: u64 = 3;
/// The statistics alone (`stats_train`, what the fused units run): `x` read once (2 before
/// 2026-12-07).
pub const BN_STATS_PASSES: u64 = 1;
/// Likewise for the BN backward: `backward_partial` reads `x` and `dy`, `backward_apply` reads
/// `x` and `dy` and writes `dx`.
pub const BN_BACKWARD_PASSES: u64 = 5;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Shapes `[N, C, H, W]`; `None` takes [`default_shapes`].
    pub shapes: Option<Vec<[usize; 4]>>,
    /// Quick mode: only decides the default shapes (see [`default_shapes`]); the counts below
    /// are set by [`BenchOptions::new`].
    pub quick: bool,
    /// Untimed runs before the measured ones.
    pub warmup: usize,
    /// Measured runs (the median is reported).
    pub reps: usize,
    /// Only the benchmarks whose name contains this (e.g. `"unit"`, `"conv"`; [`ITEMS`] has
    /// the names). One that no name contains is an error.
    pub only: Option<String>,
    /// Leave out the benchmarks whose name contains this (e.g. `"train step"`). One that no
    /// name contains is an error.
    pub skip: Option<String>,
    /// Use timestamp queries where the device has them (else always wall time).
    pub timestamps: bool,
    /// After each benchmark, one more run with each dispatch timed on its own
    /// ([`crate::profile`]; needs timestamp queries): [`BenchRow::profile`].
    pub profile: bool,
    /// After each plain convolution row (forward, backward_data, backward_weight, forward f16),
    /// the same op timed again with each stage of the tiled kernels' main loop left out in turn
    /// ([`conv::leave_out`]; results wrong, times only): [`BenchRow::left_out`].
    pub leave_out: bool,
    /// The burn peer binary (`burn-unit N C H W REPS preact|original cpu|gpu`); `None`: skip.
    pub burn: Option<PathBuf>,
    /// `cpu` or `gpu` for the burn peer; `None`: `cpu` where our adapter is a CPU, else `gpu`.
    pub burn_adapter: Option<String>,
    /// The PyTorch peer script (`torch_unit.py`); `None`: skip.
    pub torch: Option<PathBuf>,
    /// The Python interpreter for the torch peer.
    pub python: String,
    /// Modes for the torch peer.
    pub torch_modes: String,
    /// Each peer invocation is killed after this long.
    pub peer_timeout: Duration,
}

impl BenchOptions {
    /// Quick (3 warm-up + 5 runs) or full (5 warm-up + 20 runs), no peers.
    pub fn new(quick: bool) -> BenchOptions {
        BenchOptions {
            shapes: None,
            quick,
            warmup: if quick { 3 } else { 5 },
            reps: if quick { 5 } else { 20 },
            only: None,
            skip: None,
            timestamps: true,
            profile: false,
            leave_out: false,
            burn: None,
            burn_adapter: None,
            torch: None,
            python: "python3".into(),
            torch_modes: "fp32,tf32,fp16".into(),
            peer_timeout: Duration::from_secs(900),
        }
    }

    /// Quick where `quick` is `Some(true)`, or where it is `None` and the adapter is a CPU
    /// (a software rasteriser).
    pub fn for_adapter(gpu: &Gpu, quick: Option<bool>) -> BenchOptions {
        BenchOptions::new(quick.unwrap_or_else(|| is_cpu_adapter(gpu)))
    }

    /// The shapes this run covers.
    pub fn shapes(&self, gpu: &Gpu) -> Vec<[usize; 4]> {
        self.shapes.clone().unwrap_or_else(|| default_shapes(gpu, self.quick))
    }
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions::new(false)
    }
}

/// Whether the adapter is a software rasteriser on the CPU (lavapipe, llvmpipe, WARP).
pub fn is_cpu_adapter(gpu: &Gpu) -> bool {
    gpu.report.device_type == wgpu::DeviceType::Cpu
}

/// CIFAR stages at batch 32 in quick mode on a CPU adapter; otherwise CIFAR at batch 128 and the
/// ImageNet-like stages at batch 32.
pub fn default_shapes(gpu: &Gpu, quick: bool) -> Vec<[usize; 4]> {
    if quick && is_cpu_adapter(gpu) {
        CIFAR_32.to_vec()
    } else {
        CIFAR_128.iter().chain(&IMAGENET_32).copied().collect()
    }
}

/// `"N,C,H,W"` as a shape.
pub fn parse_shape(s: &str) -> Result<[usize; 4]> {
    let v: Vec<usize> = s
        .split(',')
        .map(|t| t.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Invalid(format!("shape {s:?}: expected N,C,H,W (four positive integers)")))?;
    match v[..] {
        [n, c, h, w] if !v.contains(&0) => Ok([n, c, h, w]),
        _ => Err(Error::Invalid(format!("shape {s:?}: expected N,C,H,W (four positive integers)"))),
    }
}

/// The default place of the burn peer: `~/burn-unit/target/release/burn-unit`.
pub fn default_burn_path() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join("burn-unit/target/release/burn-unit")
}

/// The default place of the torch peer: `../shared/peers/torch_unit.py` beside the crate.
pub fn default_torch_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/torch_unit.py")
}

/// A residual unit's pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    ForwardBackward,
}

/// One benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    ConvForward,
    ConvBackwardData,
    ConvBackwardWeight,
    /// The f16 path's forward (where the adapter has shader-f16).
    ConvForwardF16,
    /// The forward and weight gradient reading `ReLU(BN(x))` through the fused prologue.
    ConvForwardBnRelu,
    ConvBackwardWeightBnRelu,
    /// The forward followed by the next BN's training statistics of its output
    /// (`conv::forward_stats`: in the epilogue on the tiled kernels).
    ConvForwardStats,
    /// backward_data into a BN + ReLU's output gradient, then that BN's backward
    /// (`conv::backward_data_bn`: the BN's sums in the convolution's epilogue on the tiled
    /// kernels).
    ConvBackwardDataBn,
    BnForward,
    /// The training statistics alone (the fused units' BN forward).
    BnStatistics,
    BnBackward,
    Unit(UnitKind, Pass),
    /// A unit's forward+backward on the f16 path (where the adapter has shader-f16):
    /// `Unit::forward_f16` and `backward_f16`.
    UnitF16(UnitKind),
    /// One training step of the CIFAR ResNet-20 of this kind (forward, backward, SGD update),
    /// f32 or (`true`) the f16 network: at the shapes of its first stage (`N,16,32,32`), on `N`
    /// images of 32x32.
    Net(UnitKind, bool),
}

/// The network of the [`Item::Net`] rows: ResNet-20, the paper's smallest CIFAR network.
pub const NET_DEPTH: usize = 20;

/// Every benchmark, in the order rows are printed.
pub const ITEMS: [Item; 20] = [
    Item::ConvForward,
    Item::ConvBackwardData,
    Item::ConvBackwardWeight,
    Item::ConvForwardF16,
    Item::ConvForwardBnRelu,
    Item::ConvBackwardWeightBnRelu,
    Item::ConvForwardStats,
    Item::ConvBackwardDataBn,
    Item::BnForward,
    Item::BnStatistics,
    Item::BnBackward,
    Item::Unit(UnitKind::PreAct, Pass::Forward),
    Item::Unit(UnitKind::PreAct, Pass::ForwardBackward),
    Item::Unit(UnitKind::Original, Pass::Forward),
    Item::Unit(UnitKind::Original, Pass::ForwardBackward),
    Item::UnitF16(UnitKind::PreAct),
    Item::UnitF16(UnitKind::Original),
    Item::Net(UnitKind::PreAct, false),
    Item::Net(UnitKind::Original, false),
    Item::Net(UnitKind::PreAct, true),
];

fn unit_name(kind: UnitKind) -> &'static str {
    kind.name()
}

impl Item {
    pub fn name(self) -> String {
        match self {
            Item::ConvForward => "conv3x3 forward".into(),
            Item::ConvBackwardData => "conv3x3 backward_data".into(),
            Item::ConvBackwardWeight => "conv3x3 backward_weight".into(),
            Item::ConvForwardF16 => "conv3x3 forward f16".into(),
            Item::ConvForwardBnRelu => "conv3x3 forward bn-relu".into(),
            Item::ConvBackwardWeightBnRelu => "conv3x3 backward_weight bn-relu".into(),
            Item::ConvForwardStats => "conv3x3 forward +bn stats".into(),
            Item::ConvBackwardDataBn => "conv3x3 backward_data +bn bwd".into(),
            Item::BnForward => "bn forward (train)".into(),
            Item::BnStatistics => "bn statistics (train)".into(),
            Item::BnBackward => "bn backward".into(),
            Item::Unit(k, Pass::Forward) => format!("unit {} fwd", unit_name(k)),
            Item::Unit(k, Pass::ForwardBackward) => format!("unit {} fwd+bwd", unit_name(k)),
            Item::UnitF16(k) => format!("unit {} f16 fwd+bwd", unit_name(k)),
            Item::Net(k, half) => {
                format!("net ResNet-{NET_DEPTH} {}{} train step", unit_name(k), if half { " f16" } else { "" })
            }
        }
    }

    /// Convolution FLOPs of one run (`2 * MACs`), where counted.
    pub fn flops(self, [n, c, h, w]: [usize; 4]) -> Option<f64> {
        let conv = 2.0 * (n * c * c * 9 * h * w) as f64;
        match self {
            Item::ConvForward
            | Item::ConvBackwardData
            | Item::ConvBackwardWeight
            | Item::ConvForwardF16
            | Item::ConvForwardBnRelu
            | Item::ConvBackwardWeightBnRelu
            | Item::ConvForwardStats
            | Item::ConvBackwardDataBn => Some(conv),
            Item::Unit(_, Pass::Forward) => Some(2.0 * conv),
            Item::Unit(_, Pass::ForwardBackward) | Item::UnitF16(_) => Some(3.0 * 2.0 * conv),
            Item::BnForward | Item::BnStatistics | Item::BnBackward => None,
            // Forward and backward of every convolution (the stem's data gradient, which a
            // training step skips, counted too).
            Item::Net(..) => {
                let macs = NetConfig::cifar(NET_DEPTH, UnitKind::PreAct, false, 10).ok()?.conv_macs(h);
                Some(3.0 * 2.0 * (n * macs) as f64)
            }
        }
    }

    /// The row's shape for a benchmark shape `d`, or `None` where the item does not run there:
    /// the network rows run at their first stage's shape, on `N` images.
    pub fn shape_at(self, d: [usize; 4]) -> Option<[usize; 4]> {
        match self {
            Item::Net(..) if d[1..] == [16, 32, 32] => Some([d[0], 3, 32, 32]),
            Item::Net(..) => None,
            _ => Some(d),
        }
    }

    /// Bytes read and written by one run, where counted (batch norm).
    pub fn bytes(self, d: [usize; 4]) -> Option<f64> {
        let t = (d.iter().product::<usize>() * 4) as f64;
        match self {
            Item::BnForward => Some(BN_FORWARD_PASSES as f64 * t),
            Item::BnStatistics => Some(BN_STATS_PASSES as f64 * t),
            Item::BnBackward => Some(BN_BACKWARD_PASSES as f64 * t),
            _ => None,
        }
    }
}

/// How a row's `ms` was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timing {
    /// GPU timestamp queries around each run's command buffers, the runs queued back to back.
    Timestamps,
    /// Host wall clock of submit + wait.
    Wall,
}

impl Timing {
    pub fn name(self) -> &'static str {
        match self {
            Timing::Timestamps => "timestamps",
            Timing::Wall => "wall",
        }
    }
}

/// One of our measurements.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub item: Item,
    pub shape: [usize; 4],
    /// Median of the measured runs, by `timing`.
    pub ms: f64,
    /// Fastest measured run, by `timing`.
    pub min_ms: f64,
    /// Median wall time of submit + wait.
    pub wall_ms: f64,
    /// Median host time to record the command buffers (not in `ms` or `wall_ms`).
    pub record_ms: f64,
    pub timing: Timing,
    pub reps: usize,
    /// With [`BenchOptions::profile`]: one more run's dispatches, each timed on its own.
    pub profile: Vec<crate::profile::Span>,
    /// Network rows: the median wall time of [`ResNet::train_step`] as a caller sees it
    /// (recording, the passes handed to the device as they are recorded, the wait, the loss
    /// read back).
    pub step_ms: Option<f64>,
    /// Network rows on an adapter that streams ([`Gpu::stream`] submitting as it goes): the same
    /// step with all its passes in one submission, timed interleaved with `step_ms`'s runs (what
    /// streaming saves). `None` where the context submits a step at once anyway.
    pub step_one_ms: Option<f64>,
    /// With [`BenchOptions::leave_out`], on convolution rows: the op with each stage of the
    /// tiled kernels left out in turn (none where it runs the register path or Winograd).
    pub left_out: Vec<LeftOut>,
}

/// A convolution row's op timed with one stage of the tiled kernels' main loop left out
/// ([`BenchOptions::leave_out`]). Set beside the row's `ms`, what is left says what the stage
/// costs (roughly: the stages overlap). Only tiled plans leave anything out: the profile's
/// labels say which kernels did (`-loads`, ...).
#[derive(Clone, Debug)]
pub struct LeftOut {
    pub stage: conv::Stage,
    /// Median ms, timed as the row's.
    pub ms: f64,
    /// With [`BenchOptions::profile`]: one more run's dispatches, each timed on its own.
    pub profile: Vec<crate::profile::Span>,
}

impl BenchRow {
    pub fn name(&self) -> String {
        self.item.name()
    }

    pub fn gflops(&self) -> Option<f64> {
        self.item.flops(self.shape).map(|f| f / (self.ms * 1e-3) / 1e9)
    }

    pub fn gbytes_per_s(&self) -> Option<f64> {
        self.item.bytes(self.shape).map(|b| b / (self.ms * 1e-3) / 1e9)
    }
}

/// A peer's timing of one unit (median ms, as the peer measured it).
#[derive(Clone, Debug)]
pub struct PeerRow {
    /// e.g. `burn-0.22.1-wgpu`, `torch fp32`.
    pub peer: String,
    pub unit: UnitKind,
    pub shape: [usize; 4],
    pub forward_ms: f64,
    pub forward_backward_ms: f64,
    /// The peer's own clock: burn's is the host wall clock (recording, submission and a small
    /// read back included), torch's CUDA events (GPU time).
    pub timing: Timing,
    /// The device the peer names (torch), or the adapter it was asked for (burn).
    pub device: String,
}

/// Everything one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Our adapter: name, backend, type, driver.
    pub adapter: String,
    /// The batch-norm kernels the run used (`ops::batch_norm::Kernels`, resolved).
    pub bn_kernels: String,
    /// The cooperative matrices the f16 rows' convolutions used, or `none`.
    pub coop: String,
    pub warmup: usize,
    pub reps: usize,
    pub rows: Vec<BenchRow>,
    pub peers: Vec<PeerRow>,
    /// Peers that were skipped, and why.
    pub skipped: Vec<String>,
    /// `git rev-parse --short HEAD` where it answers.
    pub commit: Option<String>,
    /// Seconds since the Unix epoch at the start of the run.
    pub unix_time: u64,
    /// What the autotuner did during the run (its timings are not in the rows: each row's
    /// warm-up comes after them).
    pub tuning: crate::gpu::Tuning,
}

/// Our benchmarks and then the peers, into one report.
pub fn run_all(gpu: &Gpu, opts: &BenchOptions) -> Result<Report> {
    run_all_with(gpu, opts, |_| Ok(()))
}

/// [`run_all`], handing `ours` the report of our rows alone before any peer runs (the peers
/// take minutes: a run cut short then has our figures written already).
pub fn run_all_with(gpu: &Gpu, opts: &BenchOptions, ours: impl FnOnce(&Report) -> Result<()>) -> Result<Report> {
    check_peer_paths(opts.burn.as_deref(), opts.torch.as_deref())?;
    let unix_time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let rows = run(gpu, opts)?;
    let mut report = report_of(gpu, opts, rows, unix_time);
    if opts.burn.is_some() || opts.torch.is_some() {
        ours(&report)?;
        (report.peers, report.skipped) = run_peers(gpu, opts);
        report.tuning = gpu.tuning();
    }
    Ok(report)
}

/// The report of `rows`, without peers.
fn report_of(gpu: &Gpu, opts: &BenchOptions, rows: Vec<BenchRow>, unix_time: u64) -> Report {
    let (peers, skipped) = (Vec::new(), Vec::new());
    let r = &gpu.report;
    Report {
        adapter: format!("{} ({:?}, {:?}, driver {})", r.name, r.backend, r.device_type, r.driver),
        bn_kernels: format!("{:?}", crate::ops::batch_norm::kernels(gpu)),
        coop: r.coop.map_or("none".into(), |c| format!("{0}x{0}x{0} f16->f32, subgroups of {1}", c.size, c.subgroup)),
        warmup: opts.warmup,
        reps: opts.reps,
        rows,
        peers,
        skipped,
        commit: git_commit(),
        unix_time,
        tuning: gpu.tuning(),
    }
}

/// Our benchmarks, shape by shape; prints a line per row to stderr as it goes.
pub fn run(gpu: &Gpu, opts: &BenchOptions) -> Result<Vec<BenchRow>> {
    if opts.reps == 0 {
        return Err(Error::Invalid("bench: at least one measured run".into()));
    }
    // A filter that matches no benchmark's name is a typo, not a request for an empty report.
    for (flag, filter) in [("only", &opts.only), ("skip", &opts.skip)] {
        if let Some(f) = filter.as_deref().filter(|f| !ITEMS.iter().any(|i| i.name().contains(f))) {
            let names: Vec<String> = ITEMS.iter().map(|i| i.name()).collect();
            return Err(Error::Invalid(format!(
                "bench --{flag} {f:?}: no benchmark's name contains it ({})",
                names.join(", ")
            )));
        }
    }
    let shapes = opts.shapes(gpu);
    for &shape in &shapes {
        check_shape(gpu, shape)?;
    }
    let timer = Timer::new(gpu, opts.timestamps);
    let mut rows = Vec::new();
    for shape in shapes {
        for item in ITEMS {
            let name = item.name();
            if opts.only.as_ref().is_some_and(|o| !name.contains(o.as_str()))
                || opts.skip.as_ref().is_some_and(|o| name.contains(o.as_str()))
            {
                continue;
            }
            let half = matches!(item, Item::ConvForwardF16 | Item::UnitF16(_) | Item::Net(_, true));
            if half && !gpu.report.features.contains(wgpu::Features::SHADER_F16) {
                continue;
            }
            let Some(shape) = item.shape_at(shape) else { continue };
            let row = bench_item(gpu, &timer, opts, item, shape)?;
            // The time of day lines the row up with a clock log of the GPU (tools/device_run.sh).
            // With its rate, so that a run cut short still has its figures in the log.
            let rate = match (row.gflops(), row.gbytes_per_s()) {
                (Some(f), _) => format!("{f:>9.1} GFLOP/s"),
                (None, Some(b)) => format!("{b:>9.1} GB/s   "),
                (None, None) => " ".repeat(17),
            };
            eprintln!(
                "  {:<26} {:<14} {:>10.3} ms {rate}  at {} UTC",
                row.name(),
                shape_str(shape),
                row.ms,
                utc_time_of_day()
            );
            for (label, count, ms) in profile_summary(&row.profile) {
                eprintln!("      {ms:>8.3} ms  {count:>3} x {label}");
            }
            if opts.leave_out && bare_conv(item) && row.left_out.is_empty() {
                eprintln!("    (no stage left out: no tiled kernel in this row)");
            }
            for l in &row.left_out {
                let share = 100.0 * l.ms / row.ms;
                eprintln!("    without {:<9} {:>10.3} ms  ({share:.0}% of the whole)", l.stage.name(), l.ms);
                for (label, count, ms) in profile_summary(&l.profile) {
                    eprintln!("      {ms:>8.3} ms  {count:>3} x {label}");
                }
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// A benchmark shape every row can run at, checked before any row runs (rather than after
/// the rows before it): its activations and its 3x3 weights within the adapter's largest
/// buffer (their host data is drawn before the tensors are made), and more than one value per
/// channel for batch norm's training statistics (which the convolution rows' set-up computes
/// too).
fn check_shape(gpu: &Gpu, d: [usize; 4]) -> Result<()> {
    let [n, c, h, w] = d;
    let shape = shape_str(d);
    for (what, dims) in [("activations", [n, c, h, w]), ("3x3 weights", [c, c, 3, 3])] {
        crate::tensor::check_dims(gpu, &dims, 4, &format!("bench shape {shape}: {what}"))?;
    }
    if n * h * w < 2 {
        return Err(Error::Invalid(format!(
            "bench shape {shape}: N*H*W must be at least 2 (batch norm's training statistics need more \
             than one value per channel)"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Timing

/// GPU timestamps around submissions, where the device has them (also the conv autotuner's
/// clock).
pub(crate) struct Timer {
    timestamps: bool,
    /// Nanoseconds per timestamp tick.
    period_ns: f64,
}

/// A run for [`Timer::time_queued`]: command buffers it needs first, untimed (restoring a
/// gradient the run accumulates into), then the timed ones.
pub(crate) struct Run {
    pub(crate) untimed: Vec<wgpu::CommandBuffer>,
    pub(crate) timed: Vec<wgpu::CommandBuffer>,
}

/// The most runs one query set of [`Timer::time_queued`] holds (wgpu allows 4096 queries).
const QUEUED_RUNS: usize = 1024;

impl Timer {
    pub(crate) fn new(gpu: &Gpu, use_timestamps: bool) -> Timer {
        Timer { timestamps: use_timestamps && gpu.has_timestamps(), period_ns: gpu.queue.get_timestamp_period() as f64 }
    }

    /// Whether this timer reads GPU timestamps.
    pub(crate) fn has_timestamps(&self) -> bool {
        self.timestamps
    }

    fn query_set(gpu: &Gpu, runs: usize) -> wgpu::QuerySet {
        gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("bench timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * runs as u32,
        })
    }

    /// A command buffer holding one empty compute pass that writes timestamp `index` at its
    /// start (`end` false) or its end.
    fn stamp(gpu: &Gpu, set: &wgpu::QuerySet, index: u32, end: bool) -> wgpu::CommandBuffer {
        let mut enc = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("timestamp") });
        let writes = wgpu::ComputePassTimestampWrites {
            query_set: set,
            beginning_of_pass_write_index: (!end).then_some(index),
            end_of_pass_write_index: end.then_some(index),
        };
        drop(enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("timestamp"),
            timestamp_writes: Some(writes),
        }));
        enc.finish()
    }

    /// Milliseconds between timestamps 2i and 2i + 1 of `set`, for each of `runs` runs (`None`
    /// where the end is not after the start, which it should be).
    fn read(&self, gpu: &Gpu, set: &wgpu::QuerySet, runs: usize) -> Result<Vec<Option<f64>>> {
        let bytes = 2 * runs as u64 * wgpu::QUERY_SIZE as u64;
        let resolve = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench timestamps resolved"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut enc = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("resolve") });
        enc.resolve_query_set(set, 0..2 * runs as u32, &resolve, 0);
        gpu.submit([enc.finish()])?;
        let raw = read_buffer(gpu, &resolve, bytes)?;
        Ok(raw
            .chunks_exact(2 * wgpu::QUERY_SIZE as usize)
            .map(|c| {
                let t: [u64; 2] = bytemuck::pod_read_unaligned(c);
                (t[1] > t[0]).then(|| (t[1] - t[0]) as f64 * self.period_ns * 1e-6)
            })
            .collect())
    }

    /// Submits `buffers` in one submission and waits: wall milliseconds.
    pub(crate) fn wall_ms(gpu: &Gpu, buffers: Vec<wgpu::CommandBuffer>) -> Result<f64> {
        let t = Instant::now();
        gpu.submit(buffers)?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    /// Submits the runs one after another without waiting in between, each between two
    /// timestamps, then waits once: the GPU runs them back to back, as a CUDA stream timed
    /// with events does, so its clocks stay up as they would in training. Each run's GPU
    /// milliseconds (`None` for a run without a reading); all `None` where the adapter has no
    /// timestamps.
    pub(crate) fn time_queued(&self, gpu: &Gpu, mut runs: Vec<Run>) -> Result<Vec<Option<f64>>> {
        let mut out = Vec::with_capacity(runs.len());
        while !runs.is_empty() {
            let rest = runs.split_off(runs.len().min(QUEUED_RUNS));
            let n = runs.len();
            let set = self.timestamps.then(|| Timer::query_set(gpu, n));
            for (i, run) in runs.into_iter().enumerate() {
                let mut all = run.untimed;
                all.extend(set.as_ref().map(|s| Timer::stamp(gpu, s, 2 * i as u32, false)));
                all.extend(run.timed);
                all.extend(set.as_ref().map(|s| Timer::stamp(gpu, s, 2 * i as u32 + 1, true)));
                gpu.submit_queued(all);
            }
            match &set {
                Some(s) => out.extend(self.read(gpu, s, n)?),
                None => {
                    gpu.wait()?;
                    out.extend(std::iter::repeat_n(None, n));
                }
            }
            runs = rest;
        }
        Ok(out)
    }
}

/// The wall clock's time of day, UTC, as `HH:MM:SS.mmm`.
fn utc_time_of_day() -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let s = ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}.{:03}", s / 3600, s / 60 % 60, s % 60, ms % 1000)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 { v[m] } else { 0.5 * (v[m - 1] + v[m]) }
}

/// The queued warm-up's time on a GPU, at least (its runs' GPU time, where the adapter has
/// timestamps; else from submission to completion, never the recording): a GPU that idled
/// between benchmarks (the CPU compiling and tuning) runs at a fraction of its clocks until it
/// has been busy a while.
const WARM_UP: Duration = Duration::from_millis(200);

/// The most wall time a row's warm-up takes (timestamps that read nothing, a slow host).
const WARM_UP_MOST: Duration = Duration::from_secs(3);

/// Warm-up, then the measured runs of `record` (which records fresh command buffers each time);
/// `prepare` records untimed commands that go before each run (restoring a gradient that the
/// run accumulates into).
///
/// GPU time: the runs queued back to back ([`Timer::time_queued`]), as PyTorch's CUDA events
/// time a stream. They are recorded before the warm-up (the first recording builds the
/// pipelines and may tune) and queued right after it, so that the GPU does not idle between
/// them. Wall time (and recording time): each run submitted and waited for on its own.
fn measure(
    gpu: &Gpu,
    timer: &Timer,
    opts: &BenchOptions,
    item: Item,
    shape: [usize; 4],
    prepare: &mut dyn FnMut() -> Result<Vec<wgpu::CommandBuffer>>,
    record: &mut dyn FnMut() -> Result<Vec<wgpu::CommandBuffer>>,
) -> Result<BenchRow> {
    let mut runs = |count: usize| -> Result<Vec<Run>> {
        (0..count).map(|_| Ok(Run { untimed: prepare()?, timed: record()? })).collect()
    };
    // Without timestamps the queued runs would read nothing: the wall clock below is the time.
    let measured = if timer.has_timestamps() { runs(opts.reps)? } else { Vec::new() };
    let warm = if is_cpu_adapter(gpu) { Duration::ZERO } else { WARM_UP };
    // Batches double (to QUEUED_RUNS), so that rows of microseconds reach the time in a few
    // batches; WARM_UP_MOST of wall time, from the first batch recorded (where there are no
    // timestamps its recording builds the pipelines and tunes), ends it whatever the
    // timestamps said.
    let (mut busy, mut count, mut start) = (Duration::ZERO, opts.warmup.max(1), None);
    loop {
        let batch = runs(count)?;
        let start = *start.get_or_insert_with(Instant::now);
        let submitted = Instant::now();
        let gpu_ms = timer.time_queued(gpu, batch)?;
        busy += match gpu_ms.iter().copied().collect::<Option<Vec<f64>>>() {
            Some(ms) if !ms.is_empty() => Duration::from_secs_f64(ms.iter().sum::<f64>() / 1e3),
            _ => submitted.elapsed(),
        };
        if busy >= warm || start.elapsed() >= WARM_UP_MOST {
            break;
        }
        count = (2 * count).min(QUEUED_RUNS);
    }
    let gpu_ms: Vec<f64> = match measured.is_empty() {
        false => timer.time_queued(gpu, measured)?.into_iter().flatten().collect(),
        true => Vec::new(),
    };
    let (mut wall_ms, mut record_ms) = (Vec::new(), Vec::new());
    for _ in 0..opts.reps {
        gpu.submit(prepare()?)?;
        let t = Instant::now();
        let buffers = record()?;
        record_ms.push(t.elapsed().as_secs_f64() * 1e3);
        wall_ms.push(Timer::wall_ms(gpu, buffers)?);
    }
    let mut profile = Vec::new();
    if opts.profile && timer.has_timestamps() {
        crate::profile::set(gpu, true);
        let untimed = prepare();
        let timed = record();
        crate::profile::set(gpu, false);
        gpu.submit(untimed?)?;
        gpu.submit(timed?)?;
        profile = crate::profile::take(gpu)?;
    }
    // Timestamps only where every measured run has one.
    let (timing, mut times) =
        if gpu_ms.len() == opts.reps { (Timing::Timestamps, gpu_ms) } else { (Timing::Wall, wall_ms.clone()) };
    let ms = median(&mut times);
    Ok(BenchRow {
        item,
        shape,
        ms,
        min_ms: times[0],
        wall_ms: median(&mut wall_ms),
        record_ms: median(&mut record_ms),
        timing,
        reps: opts.reps,
        profile,
        step_ms: None,
        step_one_ms: None,
        left_out: Vec::new(),
    })
}

/// A profile's dispatches grouped by label, in order of first appearance: (label, count, total
/// ms), then a last line with the sum.
pub fn profile_summary(spans: &[crate::profile::Span]) -> Vec<(String, usize, f64)> {
    let mut out: Vec<(String, usize, f64)> = Vec::new();
    for s in spans {
        match out.iter_mut().find(|(l, ..)| *l == s.label) {
            Some(e) => {
                e.1 += 1;
                e.2 += s.ms;
            }
            None => out.push((s.label.clone(), 1, s.ms)),
        }
    }
    if !out.is_empty() {
        out.push(("(sum of the dispatches)".into(), spans.len(), spans.iter().map(|s| s.ms).sum()));
    }
    out
}

/// A command buffer copying `from` into `to` (buffers of one size).
fn copy(gpu: &Gpu, from: &wgpu::Buffer, to: &wgpu::Buffer) -> wgpu::CommandBuffer {
    let mut enc = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("bench reset") });
    enc.copy_buffer_to_buffer(from, 0, to, 0, from.size());
    enc.finish()
}

/// Uploads its writes and waits.
fn flush(gpu: &Gpu) -> Result<()> {
    gpu.submit([])
}

// ---------------------------------------------------------------------------------------------
// The benchmarks

fn random(gpu: &Gpu, rng: &mut Rng, dims: &[usize]) -> Result<Tensor> {
    Tensor::new(gpu, dims, &rng.data(dims.iter().product()))
}

fn bench_item(gpu: &Gpu, timer: &Timer, opts: &BenchOptions, item: Item, d: [usize; 4]) -> Result<BenchRow> {
    let mut rng = Rng::new(0xbe9c);
    let c = d[1];
    let mut no_prep = || Ok(Vec::new());
    match item {
        Item::ConvForward
        | Item::ConvBackwardData
        | Item::ConvBackwardWeight
        | Item::ConvForwardBnRelu
        | Item::ConvBackwardWeightBnRelu
        | Item::ConvForwardStats
        | Item::ConvBackwardDataBn => {
            let x = random(gpu, &mut rng, &d)?;
            let dy = random(gpu, &mut rng, &d)?;
            let w = random(gpu, &mut rng, &[c, c, 3, 3])?;
            let aff: Vec<f32> = (0..c).flat_map(|_| [0.0, 1.0, 0.0, 0.0]).collect();
            let aff = Tensor::new(gpu, &[c, 4], &aff)?;
            let out = Tensor::zeros(gpu, &d)?;
            let dw = Tensor::zeros(gpu, &[c, c, 3, 3])?;
            let bn = Bn::new(gpu, &vec![1.0; c], &vec![0.0; c], &vec![0.0; c], &vec![1.0; c])?;
            let dx = Tensor::zeros(gpu, &d)?;
            // The statistics and prologue values of x, for the BN backward.
            let mut rec = gpu.recorder("bench conv setup");
            bn.prologue(&mut rec, Mode::Train, &x)?;
            rec.run()?;
            with_stages_left_out(gpu, timer, opts, item, d, &mut || {
                let mut rec = gpu.recorder("bench conv");
                match item {
                    Item::ConvForwardStats => bn.conv_stats(&mut rec, &x, None, &w, &out, 1, false)?,
                    Item::ConvBackwardDataBn => bn.conv_backward(&mut rec, &dy, &w, 1, &out, false, &x, &dx, false)?,
                    Item::ConvForward => conv::forward(&mut rec, &x, &w, &out, 1, false)?,
                    Item::ConvBackwardData => conv::backward_data(&mut rec, &dy, &w, &out, 1, false)?,
                    Item::ConvForwardBnRelu => conv::forward_bn_relu(&mut rec, &x, &aff, &w, &out, 1, false)?,
                    Item::ConvBackwardWeightBnRelu => {
                        conv::backward_weight_bn_relu(&mut rec, &x, &aff, &dy, &dw, 1, false)?
                    }
                    _ => conv::backward_weight(&mut rec, &x, &dy, &dw, 1, false)?,
                }
                Ok(vec![rec.finish()])
            })
        }
        Item::ConvForwardF16 => {
            use crate::tensor::HalfTensor;
            let x = HalfTensor::from_f32(gpu, &d, &rng.data(d.iter().product()))?;
            let w = HalfTensor::from_f32(gpu, &[c, c, 3, 3], &rng.data(c * c * 9))?;
            let out = HalfTensor::from_f32(gpu, &d, &vec![0.0; d.iter().product()])?;
            flush(gpu)?;
            with_stages_left_out(gpu, timer, opts, item, d, &mut || {
                let mut rec = gpu.recorder("bench conv f16");
                conv::forward_f16(&mut rec, &x, &w, &out, 1, false)?;
                Ok(vec![rec.finish()])
            })
        }
        Item::BnForward | Item::BnStatistics | Item::BnBackward => {
            let ones = vec![1.0; c];
            let zeros = vec![0.0; c];
            let bn = Bn::new(gpu, &ones, &zeros, &zeros, &ones)?;
            let x = random(gpu, &mut rng, &d)?;
            let dy = random(gpu, &mut rng, &d)?;
            let y = Tensor::zeros(gpu, &d)?;
            // A forward first: the backward needs its saved statistics.
            let mut rec = gpu.recorder("bench bn setup");
            bn.forward(&mut rec, Mode::Train, &x, &y, Epilogue::default())?;
            rec.run()?;
            measure(gpu, timer, opts, item, d, &mut no_prep, &mut || {
                let mut rec = gpu.recorder("bench bn");
                match item {
                    Item::BnForward => bn.forward(&mut rec, Mode::Train, &x, &y, Epilogue::default())?,
                    Item::BnStatistics => {
                        bn.prologue(&mut rec, Mode::Train, &x)?;
                    }
                    _ => bn.backward(&mut rec, &x, &dy, false, &y, false)?,
                }
                Ok(vec![rec.finish()])
            })
        }
        Item::Unit(kind, pass) => {
            let unit = identity_unit(gpu, kind, c)?;
            let mut ws = Workspace::default();
            let kept = unit.allocate(gpu, d, &mut ws)?;
            let x = random(gpu, &mut rng, &d)?;
            let y = Tensor::zeros(gpu, &d)?;
            let dy_host = rng.data(d.iter().product());
            let g = Tensor::new(gpu, &d, &dy_host)?;
            let g0 = Tensor::new(gpu, &d, &dy_host)?;
            flush(gpu)?;
            // The backward accumulates into g (the identity shortcut's gradient, in place):
            // restore it before each run, untimed.
            let mut reset = || Ok(vec![copy(gpu, &g0.buffer, &g.buffer)]);
            let mut record = || {
                let mut rec = gpu.recorder("bench unit forward");
                unit.forward(&mut rec, Mode::Train, &x, &y, &kept, &ws)?;
                let mut buffers = vec![rec.finish()];
                if pass == Pass::ForwardBackward {
                    let mut rec = gpu.recorder("bench unit backward");
                    unit.backward(&mut rec, &x, &y, &g, &g, &kept, &ws)?;
                    buffers.push(rec.finish());
                }
                Ok(buffers)
            };
            match pass {
                Pass::Forward => measure(gpu, timer, opts, item, d, &mut no_prep, &mut record),
                Pass::ForwardBackward => measure(gpu, timer, opts, item, d, &mut reset, &mut record),
            }
        }
        Item::UnitF16(kind) => {
            use crate::tensor::HalfTensor;
            let unit = identity_unit(gpu, kind, c)?;
            let kept = unit.allocate_f16(gpu, d, &mut crate::unit::Workspace::default())?;
            let x = HalfTensor::from_f32(gpu, &d, &rng.data(d.iter().product()))?;
            let y = HalfTensor::zeros(gpu, &d)?;
            let dy_host = rng.data(d.iter().product());
            let g = HalfTensor::from_f32(gpu, &d, &dy_host)?;
            let g0 = HalfTensor::from_f32(gpu, &d, &dy_host)?;
            flush(gpu)?;
            // As the f32 unit: the backward accumulates into g, restored before each run.
            let mut reset = || Ok(vec![copy(gpu, &g0.buffer, &g.buffer)]);
            let mut record = || {
                let mut rec = gpu.recorder("bench unit f16");
                unit.forward_f16(&mut rec, &x, &y, &kept)?;
                unit.backward_f16(&mut rec, &x, &y, &g, &g, &kept)?;
                Ok(vec![rec.finish()])
            };
            measure(gpu, timer, opts, item, d, &mut reset, &mut record)
        }
        Item::Net(kind, half) => {
            let mut net = ResNet::new(gpu, &NetConfig::cifar(NET_DEPTH, kind, false, 10)?, 7)?;
            if half {
                net.set_f16(gpu, Some(1024.0))?;
            }
            let images = random(gpu, &mut rng, &d)?;
            let labels: Vec<u32> = (0..d[0]).map(|_| rng.below(10) as u32).collect();
            let labels = upload_labels(gpu, &labels, 10)?;
            // Learning rate 0: every kernel of the update runs and the weights stay as they are.
            let opt = Sgd { lr: 0.0, ..Sgd::default() };
            let mut row = measure(gpu, timer, opts, item, d, &mut no_prep, &mut || {
                let mut out = Stream::held(gpu);
                net.record_train_step(gpu, &mut out, &images, &labels, opt)?;
                Ok(out.into_buffers())
            })?;
            // train_step as it is, and (where the context streams) the same step submitted at
            // once, run by run in turn so that drifting clocks weigh on both alike.
            let (mut step, mut step_one) = (Vec::with_capacity(opts.reps), Vec::with_capacity(opts.reps));
            for _ in 0..opts.reps {
                let t = Instant::now();
                net.train_step(gpu, &images, &labels, opt)?;
                step.push(t.elapsed().as_secs_f64() * 1e3);
                if gpu.streams() {
                    let t = Instant::now();
                    let mut out = Stream::new(gpu, usize::MAX);
                    net.record_train_step(gpu, &mut out, &images, &labels, opt)?;
                    net.finish_train_step(gpu, out)?;
                    step_one.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            row.step_ms = Some(median(&mut step));
            row.step_one_ms = (!step_one.is_empty()).then(|| median(&mut step_one));
            Ok(row)
        }
    }
}

/// The convolution rows that time a plain op (no BN prologue or epilogue), which
/// [`BenchOptions::leave_out`] times again with stages left out.
fn bare_conv(item: Item) -> bool {
    matches!(item, Item::ConvForward | Item::ConvBackwardData | Item::ConvBackwardWeight | Item::ConvForwardF16)
}

/// [`measure`] of a convolution `record`, then, with [`BenchOptions::leave_out`] on a
/// [`bare_conv`] row, the same with each stage of the tiled kernels left out in turn:
/// [`BenchRow::left_out`], empty where the op runs no tiled kernel. The stages are put back
/// whatever happens.
fn with_stages_left_out(
    gpu: &Gpu,
    timer: &Timer,
    opts: &BenchOptions,
    item: Item,
    d: [usize; 4],
    record: &mut dyn FnMut() -> Result<Vec<wgpu::CommandBuffer>>,
) -> Result<BenchRow> {
    let mut no_prep = || Ok(Vec::new());
    let mut row = measure(gpu, timer, opts, item, d, &mut no_prep, record)?;
    if !(opts.leave_out && bare_conv(item)) {
        return Ok(row);
    }
    for stage in conv::Stage::ALL {
        conv::leave_out(gpu, Some(stage));
        let r = measure(gpu, timer, opts, item, d, &mut no_prep, record);
        let taken = conv::stage_left_out(gpu);
        conv::leave_out(gpu, None);
        let r = r?;
        if !taken {
            // The register path or Winograd: nothing was left out.
            break;
        }
        row.left_out.push(LeftOut { stage, ms: r.ms, profile: r.profile });
    }
    Ok(row)
}

/// `layer1.1` of a basic network with widths `[c, c, c]`: an identity-shortcut unit `c -> c`,
/// stride 1, He-initialised.
fn identity_unit(gpu: &Gpu, kind: UnitKind, c: usize) -> Result<Unit> {
    let cfg = NetConfig {
        kind,
        combine: Combine::Add,
        units_per_stage: 2,
        bottleneck: false,
        shortcut: ShortcutOption::B,
        widths: [c, c, c],
        in_channels: 3,
        classes: 10,
    };
    let spec = cfg.units().into_iter().find(|u| u.name == "layer1.1").expect("layer1.1 exists with 2 units per stage");
    let state: State = cfg.tensors().into_iter().map(|t| t.name).zip(cfg.initial_values(7)).collect();
    Unit::from_state(gpu, &spec, &state)
}

// ---------------------------------------------------------------------------------------------
// Peers

/// A peer path that names no file is a typo: refused before the runs (with peers they take
/// minutes) rather than reported after them.
pub fn check_peer_paths(burn: Option<&Path>, torch: Option<&Path>) -> Result<()> {
    for (flag, path) in [("burn", burn), ("torch", torch)] {
        if let Some(p) = path.filter(|p| !p.is_file()) {
            return Err(Error::Invalid(format!("bench --{flag} {}: no such file", p.display())));
        }
    }
    Ok(())
}

/// Runs the peers that `opts` names, over the same shapes; returns their rows and, for each peer
/// skipped or failed, a line saying why. Never fails.
pub fn run_peers(gpu: &Gpu, opts: &BenchOptions) -> (Vec<PeerRow>, Vec<String>) {
    let shapes = opts.shapes(gpu);
    let (mut rows, mut skipped) = (Vec::new(), Vec::new());
    if let Some(path) = &opts.burn {
        let adapter =
            opts.burn_adapter.clone().unwrap_or_else(|| if is_cpu_adapter(gpu) { "cpu" } else { "gpu" }.into());
        run_burn(path, &adapter, &shapes, opts, &mut rows, &mut skipped);
    }
    if let Some(path) = &opts.torch {
        run_torch(path, &shapes, opts, &mut rows, &mut skipped);
    }
    for s in &skipped {
        eprintln!("peer skipped: {s}");
    }
    (rows, skipped)
}

fn run_burn(
    path: &Path,
    adapter: &str,
    shapes: &[[usize; 4]],
    opts: &BenchOptions,
    rows: &mut Vec<PeerRow>,
    skipped: &mut Vec<String>,
) {
    if !path.is_file() {
        skipped.push(format!("burn: no binary at {}", path.display()));
        return;
    }
    for kind in [UnitKind::PreAct, UnitKind::Original] {
        for &[n, c, h, w] in shapes {
            let mut cmd = Command::new(path);
            cmd.args([n, c, h, w, odd_reps(opts.reps)].map(|v| v.to_string())).args([unit_name(kind), adapter]);
            let what = format!("burn {} {}", unit_name(kind), shape_str([n, c, h, w]));
            eprintln!("  {what} ...");
            let out = match run_with_timeout(&mut cmd, opts.peer_timeout) {
                Ok(out) => out,
                Err(f) => {
                    skipped.push(format!("{what}: {}", f.why));
                    continue;
                }
            };
            let obj = out.lines().rev().filter_map(json_object).find(|o| o.contains_key("forward_ms"));
            let num = |k| obj.as_ref().and_then(|o| o.get(k)?.as_f64());
            let (Some(f), Some(fb)) = (num("forward_ms"), num("forward_backward_ms")) else {
                skipped
                    .push(format!("{what}: no forward_ms / forward_backward_ms in its output {:?}", last_line(&out)));
                continue;
            };
            rows.push(PeerRow {
                peer: obj.as_ref().and_then(|o| json_str(o, "peer")).unwrap_or_else(|| "burn".into()),
                unit: kind,
                shape: [n, c, h, w],
                forward_ms: f,
                forward_backward_ms: fb,
                timing: Timing::Wall,
                device: format!("{adapter} adapter"),
            });
        }
    }
}

fn run_torch(
    path: &Path,
    shapes: &[[usize; 4]],
    opts: &BenchOptions,
    rows: &mut Vec<PeerRow>,
    skipped: &mut Vec<String>,
) {
    if !path.is_file() {
        skipped.push(format!("torch: no script at {}", path.display()));
        return;
    }
    let probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)";
    match run_with_timeout(Command::new(&opts.python).args(["-c", probe]), Duration::from_secs(120)) {
        Ok(_) => {}
        Err(f) if f.why.contains("exit status: 3") => {
            skipped.push(format!("torch: {} has torch but no CUDA device", opts.python));
            return;
        }
        Err(f) => {
            skipped.push(format!("torch: {} cannot import torch ({})", opts.python, f.why));
            return;
        }
    }
    let mut cmd = Command::new(&opts.python);
    cmd.arg(path)
        .args([
            "--reps",
            &odd_reps(opts.reps.max(20)).to_string(),
            "--modes",
            &opts.torch_modes,
            "--units",
            "preact,original",
        ])
        .arg("--shapes")
        .args(shapes.iter().map(|&s| shape_str(s)));
    eprintln!("  torch {} ...", opts.torch_modes);
    // Killed part-way, it has printed a line per configuration done: those are kept.
    let out = match run_with_timeout(&mut cmd, opts.peer_timeout) {
        Ok(out) => out,
        Err(f) => {
            skipped.push(format!("torch: {}", f.why));
            f.stdout
        }
    };
    for line in out.lines().filter(|l| l.contains("\"forward_ms\"")) {
        let obj = json_object(line).unwrap_or_default();
        let num = |k| obj.get(k).and_then(serde_json::Value::as_f64);
        let (Some(n), Some(c), Some(h), Some(w), Some(f), Some(fb)) =
            (num("n"), num("c"), num("h"), num("w"), num("forward_ms"), num("forward_backward_ms"))
        else {
            skipped.push(format!("torch: unreadable line {line:?}"));
            continue;
        };
        let unit =
            if json_str(&obj, "unit").as_deref() == Some("original") { UnitKind::Original } else { UnitKind::PreAct };
        rows.push(PeerRow {
            peer: format!("torch {}", json_str(&obj, "mode").unwrap_or_default()),
            unit,
            shape: [n, c, h, w].map(|v| v as usize),
            forward_ms: f,
            forward_backward_ms: fb,
            timing: Timing::Timestamps,
            device: json_str(&obj, "gpu").unwrap_or_default(),
        });
    }
    if !out.contains("\"forward_ms\"") {
        skipped.push(format!("torch: no results in its output {:?}", last_line(&out)));
    }
}

/// `reps`, or one more where it is even: the peers take the upper of the two middle times
/// where ours average them; with an odd count both are the middle one.
fn odd_reps(reps: usize) -> usize {
    reps | 1
}

fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

/// How long a peer's output pipes may stay open after it ended (held by a process it started).
const PIPES_CLOSE: Duration = Duration::from_secs(2);

/// Why a peer's run failed, and what it wrote to stdout before (a peer killed part-way has
/// printed its first results).
struct Failed {
    why: String,
    stdout: String,
}

/// Runs `cmd` to completion (killed after `timeout`): its stdout, or why it failed. Its result
/// lines (those with `"forward_ms"`) are echoed to stderr as they come, so that a bench cut short
/// from outside still has the peers' figures so far in its log.
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> std::result::Result<String, Failed> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let failed = |why: String, stdout: String| Failed { why, stdout };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot start {program}: {e}"), String::new()))?;
    // Read both pipes on threads so that a chatty child never blocks on a full pipe, into
    // buffers read here: a process the child started (a wrapper that does not `exec` its
    // interpreter) may hold the pipes open past the child's end, and is not waited for.
    let drain = |r: Box<dyn Read + Send>, echo: bool| {
        let text = Arc::new(Mutex::new(String::new()));
        let into = Arc::clone(&text);
        let thread = std::thread::spawn(move || {
            // To the end whatever it holds (bytes that are not UTF-8 replaced), so that the
            // child never blocks on a full pipe.
            let (mut reader, mut line) = (std::io::BufReader::new(r), Vec::new());
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&line);
                if echo && text.contains("\"forward_ms\"") {
                    eprint!("    peer: {text}");
                }
                *into.lock().unwrap_or_else(|p| p.into_inner()) += &text;
                line.clear();
            }
        });
        (thread, text)
    };
    let (out, stdout) = drain(Box::new(child.stdout.take().expect("piped stdout")), true);
    let (err, stderr) = drain(Box::new(child.stderr.take().expect("piped stderr")), false);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("{program} killed after {} s", timeout.as_secs()));
            }
            Err(e) => break Err(format!("{program}: {e}")),
        }
    };
    // The pipes close when the child's last holder exits: PIPES_CLOSE for that, no more.
    let closing = Instant::now() + PIPES_CLOSE;
    while !(out.is_finished() && err.is_finished()) && Instant::now() < closing {
        std::thread::sleep(Duration::from_millis(20));
    }
    let held = !(out.is_finished() && err.is_finished());
    let take = |t: &Arc<Mutex<String>>| t.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (stdout, stderr) = (take(&stdout), take(&stderr));
    let status = match status {
        Err(why) if held => Err(format!("{why} (a process it started holds its output open and may still run)")),
        status => status,
    };
    match status {
        Ok(status) if status.success() => Ok(stdout),
        Ok(status) => Err(failed(format!("{program} failed ({status}): {}", last_line(&stderr)), stdout)),
        Err(why) => Err(failed(why, stdout)),
    }
}

/// One line of a peer's output as a JSON object, if it is one.
fn json_object(line: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    serde_json::from_str(line.trim()).ok()
}

/// The string at `key` of `obj`, if it is one.
fn json_str(obj: &serde_json::Map<String, serde_json::Value>, key: &str) -> Option<String> {
    obj.get(key)?.as_str().map(str::to_string)
}

fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

// ---------------------------------------------------------------------------------------------
// Output

/// `N,C,H,W`.
pub fn shape_str(d: [usize; 4]) -> String {
    format!("{},{},{},{}", d[0], d[1], d[2], d[3])
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

/// The report as a text table: our rows, then each peer beside our same unit and shape.
pub fn table(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let timing = if r.rows.iter().all(|row| row.timing == Timing::Timestamps) {
        "GPU timestamps around each run, the runs queued back to back"
    } else if r.rows.iter().all(|row| row.timing == Timing::Wall) {
        "wall clock of submit + wait (no timestamp queries)"
    } else {
        "mixed: see each row's timing"
    };
    let _ = writeln!(s, "adapter: {}", r.adapter);
    let _ = writeln!(s, "batch norm kernels: {}", r.bn_kernels);
    let _ = writeln!(s, "f16 convolutions on cooperative matrices: {}", r.coop);
    let _ = writeln!(
        s,
        "commit {}; median of {} runs after {} warm-up (on a GPU, batches doubling from it to 200 ms of GPU time); ms: {timing}",
        r.commit.as_deref().unwrap_or("?"),
        r.reps,
        r.warmup
    );
    let t = r.tuning;
    let _ = writeln!(
        s,
        "autotuner: {} choices timed in {:.1} s (the candidates' pipeline builds included), {} read from the tune file",
        t.timed, t.seconds, t.from_file
    );
    // The name column as wide as the longest name, so that the columns line up.
    let w = r.rows.iter().map(|row| row.name().len()).max().unwrap_or(0).max(26);
    let _ = writeln!(
        s,
        "{:<w$} {:<14} {:>10} {:>10} {:>10} {:>10} {:>9} {:>8}",
        "benchmark", "N,C,H,W", "ms", "min ms", "wall ms", "record ms", "GFLOP/s", "GB/s"
    );
    for row in &r.rows {
        let _ = writeln!(
            s,
            "{:<w$} {:<14} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>9} {:>8}{}",
            row.name(),
            shape_str(row.shape),
            row.ms,
            row.min_ms,
            row.wall_ms,
            row.record_ms,
            opt(row.gflops(), 2),
            opt(row.gbytes_per_s(), 2),
            if row.timing == Timing::Wall && r.rows.iter().any(|o| o.timing != Timing::Wall) { " (wall)" } else { "" },
        );
    }
    let nets: Vec<_> = r.rows.iter().filter_map(|row| row.step_ms.map(|step| (row, step))).collect();
    if !nets.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "networks: a training step as ResNet::train_step takes it (recording, the passes handed to the \
             device as they are recorded, the wait, the loss read back), median of {}; above, `ms` is the \
             same step's GPU time and `record ms` its recording",
            r.reps
        );
        let streams = nets.iter().any(|(row, _)| row.step_one_ms.is_some());
        if streams {
            let _ = writeln!(
                s,
                "(`one submission ms`: the same step with every pass submitted at the end, timed in turn with \
                 `step ms`, whose passes go to the device as they are recorded)"
            );
        }
        let one = if streams { format!(" {:>18}", "one submission ms") } else { String::new() };
        let _ = writeln!(s, "{:<w$} {:<14} {:>10} {:>10}{one}", "network", "N,C,H,W", "step ms", "images/s");
        for (row, step) in nets {
            let rate = row.shape[0] as f64 / (step * 1e-3);
            let one = row.step_one_ms.map_or(String::new(), |o| format!(" {o:>18.3}"));
            let _ = writeln!(s, "{:<w$} {:<14} {:>10.3} {:>10.0}{one}", row.name(), shape_str(row.shape), step, rate);
        }
    }
    if !r.peers.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "peers: ratio = peer ms / ours ms (> 1: ours faster). Ours is compared by the peer's own clock: \
             against a wall-clock peer (burn) ours is record + submit + wait; against a GPU-clock peer \
             (torch, CUDA events) ours is `ms`."
        );
        let _ = writeln!(
            s,
            "{:<9} {:<14} {:<8} {:<22} {:>10} {:>10} {:>8}",
            "unit", "N,C,H,W", "pass", "peer", "ours ms", "peer ms", "ratio"
        );
        for p in &r.peers {
            for (pass, peer_ms) in [(Pass::Forward, p.forward_ms), (Pass::ForwardBackward, p.forward_backward_ms)] {
                let ours = r.rows.iter().find(|row| row.item == Item::Unit(p.unit, pass) && row.shape == p.shape);
                let ours_ms = ours.map(|row| comparable_ms(row, p.timing));
                let _ = writeln!(
                    s,
                    "{:<9} {:<14} {:<8} {:<22} {:>10} {:>10.3} {:>8}",
                    unit_name(p.unit),
                    shape_str(p.shape),
                    if pass == Pass::Forward { "fwd" } else { "fwd+bwd" },
                    p.peer,
                    opt(ours_ms, 3),
                    peer_ms,
                    ours_ms.map_or("-".into(), |o| ratio_str(peer_ms / o)),
                );
            }
            // Our f16 path beside the same peer (the issue's target: faster than torch fp32).
            let f16 = r.rows.iter().find(|row| row.item == Item::UnitF16(p.unit) && row.shape == p.shape);
            if let Some(row) = f16 {
                let ours_ms = comparable_ms(row, p.timing);
                let _ = writeln!(
                    s,
                    "{:<9} {:<14} {:<8} {:<22} {:>10.3} {:>10.3} {:>8}",
                    unit_name(p.unit),
                    shape_str(p.shape),
                    "f16 f+b",
                    p.peer,
                    ours_ms,
                    p.forward_backward_ms,
                    ratio_str(p.forward_backward_ms / ours_ms),
                );
            }
        }
    }
    let mut devices: Vec<String> = r.peers.iter().map(|p| format!("{} on {}", p.peer, p.device)).collect();
    devices.sort();
    devices.dedup();
    if !devices.is_empty() {
        let _ = writeln!(s, "peer devices: {}", devices.join("; "));
    }
    for skip in &r.skipped {
        let _ = writeln!(s, "skipped: {skip}");
    }
    s
}

/// A ratio to three significant digits.
fn ratio_str(r: f64) -> String {
    let decimals = if r > 0.0 { (2 - r.log10().floor() as i64).clamp(0, 6) as usize } else { 2 };
    format!("{r:.decimals$}")
}

/// Our time measured as the peer measures its own.
fn comparable_ms(row: &BenchRow, peer: Timing) -> f64 {
    match peer {
        Timing::Wall => row.record_ms + row.wall_ms,
        Timing::Timestamps => row.ms,
    }
}

/// Prints [`table`] to stdout.
pub fn print_table(r: &Report) {
    print!("{}", table(r));
}

/// The report as JSON: one object with `rows`, `peers` and `skipped` arrays of flat objects
/// (`null` for a figure not measured).
pub fn to_json(r: &Report) -> String {
    use serde_json::json;
    let spans =
        |ps: &[crate::profile::Span]| -> Vec<_> { ps.iter().map(|p| json!({"label": p.label, "ms": p.ms})).collect() };
    let rows: Vec<serde_json::Value> = r
        .rows
        .iter()
        .map(|row| {
            let profile = spans(&row.profile);
            let left_out: Vec<_> = row
                .left_out
                .iter()
                .map(|l| json!({"stage": l.stage.name(), "ms": l.ms, "profile": spans(&l.profile)}))
                .collect();
            json!({
                "name": row.name(),
                "shape": row.shape,
                "ms": row.ms,
                "min_ms": row.min_ms,
                "wall_ms": row.wall_ms,
                "record_ms": row.record_ms,
                "timing": row.timing.name(),
                "reps": row.reps,
                "gflops": row.gflops(),
                "gbytes_per_s": row.gbytes_per_s(),
                "step_ms": row.step_ms,
                "step_one_ms": row.step_one_ms,
                "profile": profile,
                "left_out": left_out,
            })
        })
        .collect();
    let peers: Vec<serde_json::Value> = r
        .peers
        .iter()
        .map(|p| {
            let ours = |pass| {
                r.rows
                    .iter()
                    .find(|row| row.item == Item::Unit(p.unit, pass) && row.shape == p.shape)
                    .map(|row| comparable_ms(row, p.timing))
            };
            let (of, ofb) = (ours(Pass::Forward), ours(Pass::ForwardBackward));
            json!({
                "peer": p.peer,
                "unit": unit_name(p.unit),
                "shape": p.shape,
                "forward_ms": p.forward_ms,
                "forward_backward_ms": p.forward_backward_ms,
                "timing": p.timing.name(),
                "device": p.device,
                "ours_forward_ms": of,
                "ours_forward_backward_ms": ofb,
                "ratio_forward": of.map(|o| p.forward_ms / o),
                "ratio_forward_backward": ofb.map(|o| p.forward_backward_ms / o),
            })
        })
        .collect();
    let t = r.tuning;
    let report = json!({
        "adapter": r.adapter,
        "bn_kernels": r.bn_kernels,
        "coop": r.coop,
        "commit": r.commit,
        "unix_time": r.unix_time,
        "warmup": r.warmup,
        "reps": r.reps,
        "tuning": {"timed": t.timed, "seconds": t.seconds, "from_file": t.from_file},
        "rows": rows,
        "peers": peers,
        "skipped": r.skipped,
    });
    // Serialising a `Value` cannot fail.
    serde_json::to_string_pretty(&report).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_peer_lines() {
        let l = r#" {"peer": "burn-0.22.1-wgpu", "unit": "preact", "n": 32, "forward_ms": 309.125, "forward_backward_ms": 4.5e2}"#;
        let o = json_object(l).unwrap();
        assert_eq!(o.get("forward_ms").and_then(serde_json::Value::as_f64), Some(309.125));
        assert_eq!(o.get("forward_backward_ms").and_then(serde_json::Value::as_f64), Some(450.0));
        assert_eq!(json_str(&o, "peer").as_deref(), Some("burn-0.22.1-wgpu"));
        assert_eq!(json_str(&o, "n"), None);
        assert!(json_object("forward_ms: 3").is_none());
    }

    /// A peer killed at its timeout keeps the result lines it printed before; one that fails
    /// says why, with its last line of stderr.
    #[cfg(unix)]
    #[test]
    fn a_peer_cut_short_keeps_what_it_printed() {
        let line = r#"{"unit": "preact", "forward_ms": 1.5, "forward_backward_ms": 4.0}"#;
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("echo '{line}'; exec sleep 10")]);
        let Err(f) = run_with_timeout(&mut cmd, Duration::from_millis(1500)) else { panic!("not killed") };
        assert!(f.why.contains("killed after 1 s"), "{}", f.why);
        assert_eq!(f.stdout.trim(), line);
        // A wrapper that does not exec: its child holds the pipes after it is killed, and is
        // not waited for (the sleep's 30 s).
        let start = Instant::now();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("echo '{line}'; sleep 30; true")]);
        let Err(f) = run_with_timeout(&mut cmd, Duration::from_millis(1000)) else { panic!("not killed") };
        assert!(start.elapsed() < Duration::from_secs(10), "waited {:?}", start.elapsed());
        assert!(f.why.contains("killed after 1 s") && f.why.contains("holds its output open"), "{}", f.why);
        assert_eq!(f.stdout.trim(), line);
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo 'no CUDA' >&2; exit 2"]);
        let Err(f) = run_with_timeout(&mut cmd, Duration::from_secs(10)) else { panic!("no failure") };
        assert!(f.why.contains("exit status: 2") && f.why.ends_with("no CUDA"), "{}", f.why);
        assert_eq!(f.stdout, "out\n");
        // A line that is not UTF-8 does not stop the reading (the child would block on a full
        // pipe): it comes back with its bytes replaced, and the lines after it too.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("printf '\\377\\n'; echo '{line}'")]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(10)).unwrap_or_else(|f| panic!("{}", f.why));
        assert_eq!(out, format!("{}\n{line}\n", char::REPLACEMENT_CHARACTER));
        assert_eq!(odd_reps(20), 21);
        assert_eq!(odd_reps(21), 21);
    }

    #[test]
    fn parses_shapes() {
        assert_eq!(parse_shape("32,16,32,32").unwrap(), [32, 16, 32, 32]);
        assert!(parse_shape("32,16,32").is_err());
        assert!(parse_shape("32,0,32,32").is_err());
    }

    #[test]
    fn counts_flops() {
        let d = [1, 2, 3, 4];
        let conv = 2.0 * (2 * 2 * 9 * 12) as f64;
        assert_eq!(Item::ConvForward.flops(d), Some(conv));
        assert_eq!(Item::Unit(UnitKind::PreAct, Pass::ForwardBackward).flops(d), Some(6.0 * conv));
        // x read once for the statistics, once more to normalise, y written; 24 f32 elements.
        assert_eq!(Item::BnForward.bytes(d), Some(3.0 * 24.0 * 4.0));
        assert_eq!(Item::BnStatistics.bytes(d), Some(24.0 * 4.0));
        assert_eq!(Item::BnBackward.bytes(d), Some(5.0 * 24.0 * 4.0));
    }
}
