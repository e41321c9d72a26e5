//! Convolution forward and both backwards against the reference, the reference's backwards
//! against central finite differences, and shape errors.
mod common;
use common::*;
use resnet_wgpu::ops::conv;
use resnet_wgpu::reference::{self as r, to_f64};
use resnet_wgpu::{Error, Gpu, Tensor};
use std::sync::OnceLock;

/// One convolution: x [N,C,H,W], K output channels, kernel size, stride.
#[derive(Clone, Copy)]
struct Case {
    xd: [usize; 4],
    k: usize,
    ks: usize,
    stride: usize,
}

impl Case {
    fn wd(&self) -> [usize; 4] {
        [self.k, self.xd[1], self.ks, self.ks]
    }
    fn yd(&self) -> [usize; 4] {
        let [n, _, h, w] = self.xd;
        [n, self.k, conv::out_size(h, self.ks, self.stride), conv::out_size(w, self.ks, self.stride)]
    }
    fn name(&self) -> String {
        format!("x {:?} K {} k {} stride {}", self.xd, self.k, self.ks, self.stride)
    }
}

const fn case(xd: [usize; 4], k: usize, ks: usize, stride: usize) -> Case {
    Case { xd, k, ks, stride }
}

/// Batch 1 and 2; H, W from {1, 5, 7, 9, 32}, mostly H != W; C, K from {1, 3, 5, 16}; k 3 and 1;
/// stride 2 on odd and even sizes. Two 32x32 cases, the largest N=2, C=K=16.
const CASES: &[Case] = &[
    case([1, 1, 1, 1], 1, 3, 1),
    case([1, 3, 5, 7], 5, 3, 1),
    case([1, 3, 7, 5], 16, 3, 2),
    case([2, 1, 1, 9], 3, 3, 2),
    case([2, 5, 9, 1], 3, 3, 1),
    case([2, 5, 9, 5], 3, 1, 2),
    case([1, 16, 5, 9], 1, 1, 1),
    case([2, 16, 9, 7], 16, 3, 1),
    case([2, 3, 7, 9], 16, 1, 2),
    case([1, 16, 32, 32], 16, 3, 2),
    case([2, 16, 32, 32], 16, 3, 1),
];

/// Tile edges, checked through the tiled kernels too on a CPU adapter: row widths 4, 8, 16, 32
/// (the register path's quads) with odd heights and batches; K and C not multiples of 8 or of the
/// tiles (1, 5, 9, 12, 33, 40); 33 and 64 channels at small sizes; several weight windows (C = 64
/// with K = 40: windows of 16, 16, 8 channels); N*OH*OW not a multiple of any tile; rows of one
/// quad 3 high, so that a step of the register path's 8 lanes spans images.
const EDGES: &[Case] = &[
    case([3, 5, 7, 8], 33, 3, 1),
    case([3, 8, 3, 4], 12, 3, 1),
    case([2, 33, 5, 16], 9, 3, 2),
    case([1, 64, 4, 4], 64, 3, 1),
    case([2, 3, 6, 32], 16, 1, 2),
    case([1, 20, 3, 8], 40, 1, 1),
    case([2, 7, 9, 16], 12, 3, 2),
    case([1, 64, 4, 8], 40, 3, 1),
    case([1, 40, 3, 16], 64, 3, 2),
    case([3, 1, 5, 4], 1, 3, 2),
    case([1, 9, 2, 8], 5, 1, 2),
];

fn len(d: [usize; 4]) -> usize {
    d.iter().product()
}

fn plus(prior: &[f32], v: &[f64]) -> Vec<f64> {
    prior.iter().zip(v).map(|(&a, &b)| a as f64 + b).collect()
}

/// A second context whose convolutions always take the tiled kernels (on a CPU adapter the
/// first one takes the register path wherever it can).
fn tiled_gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
        conv::set_kernels(&g, conv::Kernels::Tiled);
        g
    })
}

/// A context on the tiled kernels whose BN + ReLU prologue runs as a pass of its own (the
/// autotuner's other choice on a GPU).
fn separate_gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
        conv::set_kernels(&g, conv::Kernels::Tiled);
        conv::set_prologue(&g, conv::Prologue::Separate);
        g
    })
}

/// On a GPU, a third context that takes the register path wherever the adapter's subgroups
/// allow it (on a CPU adapter the first context already does).
fn register_gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        (gpu().report.device_type != wgpu::DeviceType::Cpu).then(|| {
            let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
            conv::set_kernels(&g, conv::Kernels::Register);
            g
        })
    })
    .as_ref()
}

/// The contexts to check, with a name for messages: the default one, the forced register path
/// on a GPU, and (`tiled`) the forced tiled kernels.
fn contexts(tiled: bool) -> Vec<(&'static str, &'static Gpu)> {
    let mut v = vec![("auto", gpu())];
    v.extend(register_gpu().map(|g| ("register", g)));
    if tiled {
        v.push(("tiled", tiled_gpu()));
    }
    v
}

/// A context of its own (whose profile shows no other test's dispatches), where the adapter
/// has timestamp queries (else the dispatches go unnamed: the caller's test is skipped).
fn profiled_context() -> Option<Gpu> {
    let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    if !g.has_timestamps() {
        eprintln!("skipped: no timestamp queries on {} (the dispatches go unnamed)", g.report.name);
        return None;
    }
    Some(g)
}

fn up(g: &Gpu, dims: &[usize], data: &[f32]) -> Tensor {
    Tensor::new(g, dims, data).expect("upload")
}

fn nan(g: &Gpu, dims: &[usize]) -> Tensor {
    Tensor::filled(g, dims, f32::NAN).expect("poisoned tensor")
}

fn fetch(g: &Gpu, t: &Tensor) -> Vec<f32> {
    t.read(g).expect("read back")
}

fn check_forward(cases: &[Case], seed: u64, tiled: bool) {
    for (ctx, g) in contexts(tiled) {
        check_forward_on(ctx, g, cases, seed);
    }
}

fn check_forward_on(ctx: &str, g: &Gpu, cases: &[Case], seed: u64) {
    {
        let mut rng = Rng::new(seed);
        for c in cases {
            let (wd, yd) = (c.wd(), c.yd());
            let (x, w, prior) = (rng.data(len(c.xd)), rng.data(len(wd)), rng.data(len(yd)));
            let (tx, tw) = (up(g, &c.xd, &x), up(g, &wd, &w));
            let (ty, tacc) = (nan(g, &yd), up(g, &yd, &prior));
            let mut rec = g.recorder("conv forward");
            conv::forward(&mut rec, &tx, &tw, &ty, c.stride, false).unwrap();
            conv::forward(&mut rec, &tx, &tw, &tacc, c.stride, true).unwrap();
            rec.run().unwrap();
            let want = r::conv::forward(&to_f64(&x), c.xd, &to_f64(&w), wd, c.stride);
            check(&format!("{ctx} conv fwd {}", c.name()), &fetch(g, &ty), &want, F32_TOL);
            check(&format!("{ctx} conv fwd accumulate {}", c.name()), &fetch(g, &tacc), &plus(&prior, &want), F32_TOL);
        }
    }
}

fn check_backward_data(cases: &[Case], seed: u64, tiled: bool) {
    for (ctx, g) in contexts(tiled) {
        check_backward_data_on(ctx, g, cases, seed);
    }
}

fn check_backward_data_on(ctx: &str, g: &Gpu, cases: &[Case], seed: u64) {
    {
        let mut rng = Rng::new(seed);
        for c in cases {
            let (wd, yd) = (c.wd(), c.yd());
            let (dy, w, prior) = (rng.data(len(yd)), rng.data(len(wd)), rng.data(len(c.xd)));
            let (tdy, tw) = (up(g, &yd, &dy), up(g, &wd, &w));
            let (tdx, tacc) = (nan(g, &c.xd), up(g, &c.xd, &prior));
            let mut rec = g.recorder("conv backward_data");
            conv::backward_data(&mut rec, &tdy, &tw, &tdx, c.stride, false).unwrap();
            conv::backward_data(&mut rec, &tdy, &tw, &tacc, c.stride, true).unwrap();
            rec.run().unwrap();
            let want = r::conv::backward_data(&to_f64(&dy), &to_f64(&w), wd, c.xd, c.stride);
            check(&format!("{ctx} conv bwd data {}", c.name()), &fetch(g, &tdx), &want, F32_TOL);
            check(
                &format!("{ctx} conv bwd data accumulate {}", c.name()),
                &fetch(g, &tacc),
                &plus(&prior, &want),
                F32_TOL,
            );
        }
    }
}

fn check_backward_weight(cases: &[Case], seed: u64, tiled: bool) {
    for (ctx, g) in contexts(tiled) {
        check_backward_weight_on(ctx, g, cases, seed);
    }
}

fn check_backward_weight_on(ctx: &str, g: &Gpu, cases: &[Case], seed: u64) {
    {
        let mut rng = Rng::new(seed);
        for c in cases {
            let (wd, yd) = (c.wd(), c.yd());
            let (x, dy, prior) = (rng.data(len(c.xd)), rng.data(len(yd)), rng.data(len(wd)));
            let (tx, tdy) = (up(g, &c.xd, &x), up(g, &yd, &dy));
            let (tdw, tacc) = (nan(g, &wd), up(g, &wd, &prior));
            let mut rec = g.recorder("conv backward_weight");
            conv::backward_weight(&mut rec, &tx, &tdy, &tdw, c.stride, false).unwrap();
            conv::backward_weight(&mut rec, &tx, &tdy, &tacc, c.stride, true).unwrap();
            rec.run().unwrap();
            let want = r::conv::backward_weight(&to_f64(&x), c.xd, &to_f64(&dy), wd, c.stride);
            check(&format!("{ctx} conv bwd weight {}", c.name()), &fetch(g, &tdw), &want, F32_TOL);
            check(
                &format!("{ctx} conv bwd weight accumulate {}", c.name()),
                &fetch(g, &tacc),
                &plus(&prior, &want),
                F32_TOL,
            );
        }
    }
}

/// forward_bn_relu and backward_weight_bn_relu (overwriting and accumulating) against the
/// reference convolutions of `ReLU(BN(x))`.
fn check_bn_relu_on(ctx: &str, g: &Gpu, cases: &[Case], seed: u64) {
    let mut rng = Rng::new(seed);
    for c in cases {
        let (wd, yd) = (c.wd(), c.yd());
        let (x, aff, w, dy) =
            (rng.data(len(c.xd)), affine_values(&mut rng, c.xd[1]), rng.data(len(wd)), rng.data(len(yd)));
        let (prior_y, prior_w) = (rng.data(len(yd)), rng.data(len(wd)));
        let (tx, taff, tw, tdy) = (up(g, &c.xd, &x), up(g, &[c.xd[1], 4], &aff), up(g, &wd, &w), up(g, &yd, &dy));
        let (ty, tyacc, tdw, tdwacc) = (nan(g, &yd), up(g, &yd, &prior_y), nan(g, &wd), up(g, &wd, &prior_w));
        let mut rec = g.recorder("conv bn relu");
        conv::forward_bn_relu(&mut rec, &tx, &taff, &tw, &ty, c.stride, false).unwrap();
        conv::forward_bn_relu(&mut rec, &tx, &taff, &tw, &tyacc, c.stride, true).unwrap();
        conv::backward_weight_bn_relu(&mut rec, &tx, &taff, &tdy, &tdw, c.stride, false).unwrap();
        conv::backward_weight_bn_relu(&mut rec, &tx, &taff, &tdy, &tdwacc, c.stride, true).unwrap();
        rec.run().unwrap();
        let a = r::batch_norm::prologue(&to_f64(&x), c.xd, &to_f64(&aff));
        let want_y = r::conv::forward(&a, c.xd, &to_f64(&w), wd, c.stride);
        let want_w = r::conv::backward_weight(&a, c.xd, &to_f64(&dy), wd, c.stride);
        let name = c.name();
        check(&format!("{ctx} conv fwd bn-relu {name}"), &fetch(g, &ty), &want_y, F32_TOL);
        check(
            &format!("{ctx} conv fwd bn-relu accumulate {name}"),
            &fetch(g, &tyacc),
            &plus(&prior_y, &want_y),
            F32_TOL,
        );
        check(&format!("{ctx} conv bwd weight bn-relu {name}"), &fetch(g, &tdw), &want_w, F32_TOL);
        check(
            &format!("{ctx} conv bwd weight bn-relu accumulate {name}"),
            &fetch(g, &tdwacc),
            &plus(&prior_w, &want_w),
            F32_TOL,
        );
    }
}

#[test]
fn bn_relu_prologue_matches_reference() {
    for (ctx, g) in contexts(true) {
        check_bn_relu_on(ctx, g, CASES, 44);
        check_bn_relu_on(ctx, g, EDGES, 45);
        // More channels than the register path's window of prologue values (4096): its
        // backward_weight would take this shape, the prologue makes it take the tiled kernels.
        check_bn_relu_on(ctx, g, &[case([1, 4097, 2, 4], 2, 1, 1)], 46);
    }
}

/// The prologue as a pass of its own (`batch_norm::affine_relu`, then the convolution without
/// one): the forward, backward_weight and forward_stats checks of the fused prologue.
#[test]
fn bn_relu_separate_prologue() {
    let g = separate_gpu();
    check_bn_relu_on("separate", g, CASES, 44);
    check_bn_relu_on("separate", g, EDGES, 45);
    check_stats_pre_acc("separate", g, EPILOGUE_CASES, 48);
}

/// With the prologue as a pass of its own, forward_stats runs that pass once a call, also where
/// the plan splits the reduction (`[1, 132, 3, 5]`: the statistics then come from the batch
/// norm's kernels after the convolution of the pass's output). A context of its own, so that
/// no other test's dispatches are profiled with these.
#[test]
fn forward_stats_runs_a_separate_prologue_once() {
    let Some(g) = profiled_context() else { return };
    conv::set_kernels(&g, conv::Kernels::Tiled);
    conv::set_prologue(&g, conv::Prologue::Separate);
    resnet_wgpu::profile::set(&g, true);
    check_stats_pre_acc("separate, profiled", &g, EPILOGUE_CASES, 48);
    resnet_wgpu::profile::set(&g, false);
    let labels: Vec<String> = resnet_wgpu::profile::take(&g).unwrap().into_iter().map(|s| s.label).collect();
    let passes = labels.iter().filter(|l| l.as_str() == "affine_relu").count();
    assert_eq!(passes, EPILOGUE_CASES.len(), "one prologue pass per forward_stats: {labels:?}");
}

/// forward_stats against the reference convolution and the reference batch norm's training
/// statistics of its output (and the prologue values from them, `BnTensors::affine`): without a
/// prologue overwriting y, and with one accumulating into y (the statistics are those of the
/// values written). On the tiled kernels the epilogue sums the
/// tiles; elsewhere the batch norm reads y. Cases with one value per channel are left out (no
/// training statistics).
fn check_stats_on(ctx: &str, g: &Gpu, cases: &[Case], seed: u64) {
    check_stats_with(ctx, g, cases, seed, &[(false, false), (true, true)]);
}

/// check_stats_on with only a prologue and accumulation: the epilogue is the same code either
/// way, and each tile configuration builds a module per variant.
fn check_stats_pre_acc(ctx: &str, g: &Gpu, cases: &[Case], seed: u64) {
    check_stats_with(ctx, g, cases, seed, &[(true, true)]);
}

fn check_stats_with(ctx: &str, g: &Gpu, cases: &[Case], seed: u64, variants: &[(bool, bool)]) {
    use resnet_wgpu::ops::batch_norm::BnTensors;
    let mut rng = Rng::new(seed);
    for c in cases.iter().filter(|c| c.yd()[0] * c.yd()[2] * c.yd()[3] > 1) {
        let (wd, yd, k) = (c.wd(), c.yd(), c.k);
        for &(with_pre, acc) in variants {
            let (x, aff, w, prior) =
                (rng.data(len(c.xd)), affine_values(&mut rng, c.xd[1]), rng.data(len(wd)), rng.data(len(yd)));
            let (rm, rv): (Vec<f32>, Vec<f32>) = (rng.data(k), rng.data(k).iter().map(|v| 0.5 + v.abs()).collect());
            let (tx, taff, tw) = (up(g, &c.xd, &x), up(g, &[c.xd[1], 4], &aff), up(g, &wd, &w));
            let ty = if acc { up(g, &yd, &prior) } else { nan(g, &yd) };
            let (gamma, beta) = (rng.data(k), rng.data(k));
            let (tg, tb, trm, trv) = (up(g, &[k], &gamma), up(g, &[k], &beta), up(g, &[k], &rm), up(g, &[k], &rv));
            let (tmean, tinv, tstats_aff) = (nan(g, &[k]), nan(g, &[k]), nan(g, &[k, 4]));
            let bn =
                BnTensors { gamma: &tg, beta: &tb, running_mean: &trm, running_var: &trv, affine: Some(&tstats_aff) };
            let pre = with_pre.then_some(&taff);
            let mut rec = g.recorder("conv forward_stats");
            conv::forward_stats(&mut rec, &tx, pre, &tw, &ty, c.stride, acc, &bn, &tmean, &tinv).unwrap();
            rec.run().unwrap();
            let a = if with_pre { r::batch_norm::prologue(&to_f64(&x), c.xd, &to_f64(&aff)) } else { to_f64(&x) };
            let mut want_y = r::conv::forward(&a, c.xd, &to_f64(&w), wd, c.stride);
            if acc {
                want_y = plus(&prior, &want_y);
            }
            let ones = vec![1.0; k];
            let st = r::batch_norm::forward_train(&want_y, yd, &ones, &ones, &to_f64(&rm), &to_f64(&rv), None, false);
            let tag = format!("{ctx} conv forward_stats pre {with_pre} acc {acc} {}", c.name());
            check(&format!("{tag} y"), &fetch(g, &ty), &want_y, F32_TOL);
            check(&format!("{tag} mean"), &fetch(g, &tmean), &st.mean, F32_TOL);
            check(&format!("{tag} invstd"), &fetch(g, &tinv), &st.invstd, F32_TOL);
            check(&format!("{tag} running mean"), &fetch(g, &trm), &st.running_mean, F32_TOL);
            check(&format!("{tag} running var"), &fetch(g, &trv), &st.running_var, F32_TOL);
            let want_aff = r::batch_norm::affine(&st.mean, &st.invstd, &to_f64(&gamma), &to_f64(&beta));
            check(&format!("{tag} affine"), &fetch(g, &tstats_aff), &want_aff, F32_TOL);
        }
    }
}

#[test]
fn forward_stats_matches_reference() {
    for (ctx, g) in contexts(true) {
        check_stats_on(ctx, g, CASES, 47);
        check_stats_on(ctx, g, EDGES, 48);
    }
}

#[test]
fn forward_stats_every_tile_configuration() {
    every_tile_on(check_stats_pre_acc, 49, EPILOGUE_CASES);
}

/// backward_data_bn against the reference: the convolution's input gradient `da` at the output
/// of a BN + ReLU over a random `x`, then that BN's backward with the ReLU mask (dx, dgamma,
/// dbeta), the statistics and prologue values made on the GPU first (stats_train, affine).
/// Overwriting or accumulating into `da` (the sums are those of the final `da`), and into `dx`
/// the same way in every other case, the other way in the rest. On the tiled kernels the
/// convolution's epilogue makes the BN's sums; elsewhere the BN does.
fn check_bn_backward_on(ctx: &str, g: &Gpu, cases: &[Case], seed: u64) {
    check_bn_backward_with(ctx, g, cases, seed, &[false, true]);
}

/// check_bn_backward_on accumulating into `da` only (one module per tile configuration).
fn check_bn_backward_acc(ctx: &str, g: &Gpu, cases: &[Case], seed: u64) {
    check_bn_backward_with(ctx, g, cases, seed, &[true]);
}

fn check_bn_backward_with(ctx: &str, g: &Gpu, cases: &[Case], seed: u64, accs: &[bool]) {
    use resnet_wgpu::ops::batch_norm as bn;
    use resnet_wgpu::reference::batch_norm as rbn;
    let mut rng = Rng::new(seed);
    // Every other case with the two flags apart (the projection unit adds into da and writes
    // dx; the identity unit the other way round).
    for (i, c) in cases.iter().filter(|c| c.xd[0] * c.xd[2] * c.xd[3] > 1).enumerate() {
        let (wd, yd, ch) = (c.wd(), c.yd(), c.xd[1]);
        for &acc in accs {
            let acc_dx = acc ^ (i % 2 == 1);
            let (x, w, dy) = (rng.data(len(c.xd)), rng.data(len(wd)), rng.data(len(yd)));
            let (prior_da, prior_dx) = (rng.data(len(c.xd)), rng.data(len(c.xd)));
            let h = BnHost::new(&mut rng, ch);
            let (tx, tw, tdy, d) = (up(g, &c.xd, &x), up(g, &wd, &w), up(g, &yd, &dy), BnDev::new(g, &h));
            let tda = if acc { up(g, &c.xd, &prior_da) } else { nan(g, &c.xd) };
            let tdx = if acc_dx { up(g, &c.xd, &prior_dx) } else { nan(g, &c.xd) };
            let mut rec = g.recorder("conv backward_data_bn");
            x_bn_prologue(&mut rec, &d, |rec, p| bn::stats_train(rec, &tx, p, &d.mean, &d.invstd));
            conv::backward_data_bn(&mut rec, &tdy, &tw, &tda, c.stride, acc, &tx, &d.affine, &d.grads(), &tdx, acc_dx)
                .unwrap();
            rec.run().unwrap();
            let mut want_da = r::conv::backward_data(&to_f64(&dy), &to_f64(&w), wd, c.xd, c.stride);
            if acc {
                want_da = plus(&prior_da, &want_da);
            }
            let (x64, g64, b64) = (to_f64(&x), to_f64(&h.gamma), to_f64(&h.beta));
            let (mut want_dx, want_dg, want_db) = rbn::backward(&x64, c.xd, &want_da, &g64, &b64, true);
            if acc_dx {
                want_dx = plus(&prior_dx, &want_dx);
            }
            let tag = format!("{ctx} conv backward_data_bn acc {acc} acc_dx {acc_dx} {}", c.name());
            check(&format!("{tag} da"), &fetch(g, &tda), &want_da, F32_TOL);
            check(&format!("{tag} dx"), &fetch(g, &tdx), &want_dx, F32_TOL);
            check(&format!("{tag} dgamma"), &fetch(g, &d.dgamma), &want_dg, F32_TOL);
            check(&format!("{tag} dbeta"), &fetch(g, &d.dbeta), &want_db, F32_TOL);
        }
    }
}

/// Records the training statistics of x's batch norm (`stats`, on `d.tensors()`: f32 or f16
/// x) and its prologue values from them into `d.affine`, as a pre-activation unit's forward
/// leaves them for backward_data_bn.
fn x_bn_prologue(
    rec: &mut resnet_wgpu::Recorder,
    d: &BnDev,
    stats: impl FnOnce(&mut resnet_wgpu::Recorder, &resnet_wgpu::ops::batch_norm::BnTensors) -> resnet_wgpu::Result<()>,
) {
    stats(rec, &d.tensors()).unwrap();
    resnet_wgpu::ops::batch_norm::affine(rec, &d.gamma, &d.beta, &d.mean, &d.invstd, &d.affine).unwrap();
}

#[test]
fn backward_data_bn_matches_reference() {
    for (ctx, g) in contexts(true) {
        check_bn_backward_on(ctx, g, CASES, 50);
        check_bn_backward_on(ctx, g, EDGES, 51);
    }
}

/// The BN + ReLU prologue under every tile configuration: its values are loaded into
/// registers beside the prefetched elements (forward) or once per staged column
/// (backward_weight), arrays whose length depends on the configuration.
#[test]
fn bn_relu_every_tile_configuration() {
    every_tile_on(check_bn_relu_on, 47, EPILOGUE_CASES);
}

#[test]
fn backward_data_bn_every_tile_configuration() {
    every_tile_on(check_bn_backward_acc, 52, EPILOGUE_CASES);
}

/// The tiled kernels' cases: the tile edges, two 32x32 ones (several reduction tiles, split-K
/// backward_weight), channels past 128 (two tiles of the largest configurations), and
/// reductions over 32 channels at stride 2 (3x3 and 1x1), which the data ops run tap-major (as
/// they do 16 and 64 channels; 40 and 33 channel-major).
fn tile_cases() -> Vec<Case> {
    let mut v: Vec<Case> = EDGES.iter().map(|c| case(c.xd, c.k, c.ks, c.stride)).collect();
    v.extend([case([2, 16, 32, 32], 16, 3, 1), case([1, 16, 32, 32], 16, 3, 2), case([1, 130, 3, 5], 132, 3, 2)]);
    v.extend([case([2, 32, 7, 9], 40, 3, 2), case([2, 32, 5, 8], 32, 1, 2)]);
    v
}

/// Each tile configuration of the tiled kernels (the autotuner may pick any of them on a GPU),
/// forced in turn on a context of its own, through `check`; then the autotuner's own choice
/// (timed here even on a CPU adapter, with the pipelines already built).
fn every_tile(check: fn(&str, &Gpu, &[Case], u64), seed: u64) {
    every_tile_on(check, seed, &tile_cases());
}

/// every_tile over `cases`, on a context that builds the tiled modules without wgpu's bounds
/// checks, as Vulkan GPUs do (`Gpu::shader_module_in_range`): a tile index out of range would
/// read or write other workgroup memory here and fail the comparison (the driver keeps the
/// buffers' own bounds). The checked builds (CPU adapters, other backends) differ only by
/// clamps that change nothing in range; the tuned network tests run them.
fn every_tile_on(check: fn(&str, &Gpu, &[Case], u64), seed: u64, cases: &[Case]) {
    let opts = resnet_wgpu::GpuOptions { tiled_bounds_checks: Some(false), ..resnet_wgpu::GpuOptions::from_env() };
    let g = Gpu::with_options(&opts).unwrap_or_else(|e| panic!("{e}"));
    let names = conv::tile_names(&g);
    assert!(names.len() >= 8, "tile configurations that fit: {names:?}");
    for name in names {
        conv::force_tile(&g, Some(&name)).unwrap();
        check(&format!("tile {name}"), &g, cases, seed);
    }
    assert!(conv::force_tile(&g, Some("no-such-tile")).is_err());
    conv::force_tile(&g, None).unwrap();
    conv::set_kernels(&g, conv::Kernels::Tuned);
    check("tuned", &g, cases, seed);
}

/// The epilogues' cases under every tile configuration: what their indexing depends on (rows
/// over images and an odd spatial size, several row blocks, columns past one tile and not a
/// multiple of 4, stride 2's output sizes), in 3x3 kernels only (each kernel size and stride is a
/// module of its own per configuration). Two have columns past 128 for one op each (forward's
/// K, backward_data's C) and a long reduction for the other, which splits it and takes the
/// unfused form. The last reduces over 32 and 64 channels, tap-major (as the third, over 16;
/// the others channel-major).
const EPILOGUE_CASES: &[Case] = &[
    case([3, 5, 7, 8], 33, 3, 1),
    case([2, 33, 5, 16], 9, 3, 2),
    case([2, 16, 32, 32], 16, 3, 1),
    case([1, 40, 3, 5], 132, 3, 1),
    case([1, 132, 3, 5], 40, 3, 1),
    case([2, 32, 5, 7], 64, 3, 1),
];

#[test]
fn forward_every_tile_configuration() {
    every_tile(check_forward_on, 41);
}

#[test]
fn backward_data_every_tile_configuration() {
    every_tile(check_backward_data_on, 42);
}

#[test]
fn backward_weight_every_tile_configuration() {
    every_tile(check_backward_weight_on, 43);
}

/// Every tile configuration adds each output's terms in the same order, so all of them give the
/// same bits: the autotuner's choice (which may differ from run to run on a GPU) never changes
/// a result.
#[test]
fn every_tile_configuration_gives_the_same_bits() {
    let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::new(44);
    // The last two split backward_weight's reduction over several workgroups; in the last, a
    // split sized by each tile's own count of output tiles would differ between tiles.
    for c in [
        case([2, 5, 9, 7], 6, 3, 2),
        case([1, 130, 3, 5], 132, 3, 1),
        case([2, 16, 32, 32], 16, 3, 1),
        case([2, 8, 48, 48], 128, 3, 1),
    ] {
        let (wd, yd) = (c.wd(), c.yd());
        let (x, w, dy) = (rng.data(len(c.xd)), rng.data(len(wd)), rng.data(len(yd)));
        let (tx, tw, tdy) = (up(&g, &c.xd, &x), up(&g, &wd, &w), up(&g, &yd, &dy));
        let mut first: Option<[Vec<u32>; 3]> = None;
        for name in conv::tile_names(&g) {
            conv::force_tile(&g, Some(&name)).unwrap();
            let (ty, tdx, tdw) = (nan(&g, &yd), nan(&g, &c.xd), nan(&g, &wd));
            let mut rec = g.recorder("conv");
            conv::forward(&mut rec, &tx, &tw, &ty, c.stride, false).unwrap();
            conv::backward_data(&mut rec, &tdy, &tw, &tdx, c.stride, false).unwrap();
            conv::backward_weight(&mut rec, &tx, &tdy, &tdw, c.stride, false).unwrap();
            rec.run().unwrap();
            let bits = [&ty, &tdx, &tdw].map(|t| bits(&fetch(&g, t)));
            match &first {
                None => {
                    // Every element written (the outputs start as NaN, the same bits in each run).
                    let finite = bits.iter().flatten().all(|&b| f32::from_bits(b).is_finite());
                    assert!(finite, "{}: tile {name} left an output unwritten", c.name());
                    first = Some(bits)
                }
                Some(f) => {
                    for (op, (a, b)) in ["forward", "backward_data", "backward_weight"].iter().zip(f.iter().zip(&bits))
                    {
                        assert!(a == b, "{} {op}: tile {name} differs from the first configuration", c.name());
                    }
                }
            }
        }
    }
}

/// `set_tap_major(false)` keeps the data ops channel-major where they would run tap-major: both
/// orders match the reference, and the switch changes the order of the sums (the bits differ).
/// On a forced 64x64 tile, at 64 channels (3x3, stride 1 and 2).
#[test]
fn tap_major_can_be_turned_off() {
    let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    conv::force_tile(&g, Some("64x64k16t4x4")).unwrap();
    let mut rng = Rng::new(45);
    for c in [case([2, 64, 6, 5], 64, 3, 1), case([1, 64, 7, 9], 64, 3, 2)] {
        let (wd, yd) = (c.wd(), c.yd());
        let (x, w, dy) = (rng.data(len(c.xd)), rng.data(len(wd)), rng.data(len(yd)));
        let (tx, tw, tdy) = (up(&g, &c.xd, &x), up(&g, &wd, &w), up(&g, &yd, &dy));
        let want_y = r::conv::forward(&to_f64(&x), c.xd, &to_f64(&w), wd, c.stride);
        let want_dx = r::conv::backward_data(&to_f64(&dy), &to_f64(&w), wd, c.xd, c.stride);
        let mut runs = Vec::new();
        for on in [true, false] {
            conv::set_tap_major(&g, on);
            let (ty, tdx) = (nan(&g, &yd), nan(&g, &c.xd));
            let mut rec = g.recorder("conv tap order");
            conv::forward(&mut rec, &tx, &tw, &ty, c.stride, false).unwrap();
            conv::backward_data(&mut rec, &tdy, &tw, &tdx, c.stride, false).unwrap();
            rec.run().unwrap();
            let (y, dx) = (fetch(&g, &ty), fetch(&g, &tdx));
            check(&format!("tap-major {on} conv fwd {}", c.name()), &y, &want_y, F32_TOL);
            check(&format!("tap-major {on} conv bwd data {}", c.name()), &dx, &want_dx, F32_TOL);
            runs.push((bits(&y), bits(&dx)));
        }
        assert!(runs[0].0 != runs[1].0 && runs[0].1 != runs[1].1, "{}: the same bits in both orders", c.name());
    }
    conv::set_tap_major(&g, true);
}

/// Runs forward, backward_data and backward_weight of `c` on `g` (f32, or the f16 path's
/// halves with `half`, dw f32) into poisoned outputs; returns the three outputs and the labels
/// of the dispatches that ran (where the adapter has timestamps).
fn three_ops(g: &Gpu, c: &Case, [x, w, dy]: [&[f32]; 3], half: bool) -> ([Vec<f32>; 3], Vec<String>) {
    use resnet_wgpu::tensor::HalfTensor;
    let (wd, yd) = (c.wd(), c.yd());
    let h = |d: &[usize], v: &[f32]| HalfTensor::from_f32(g, d, v).unwrap();
    let hnan = |d: &[usize]| HalfTensor::from_f32(g, d, &vec![f32::NAN; d.iter().product()]).unwrap();
    resnet_wgpu::profile::set(g, true);
    let mut rec = g.recorder("conv stages");
    let tdw = nan(g, &wd);
    let out = if half {
        let (tx, tw, tdy, ty, tdx) = (h(&c.xd, x), h(&wd, w), h(&yd, dy), hnan(&yd), hnan(&c.xd));
        conv::forward_f16(&mut rec, &tx, &tw, &ty, c.stride, false).unwrap();
        conv::backward_data_f16(&mut rec, &tdy, &tw, &tdx, c.stride, false).unwrap();
        conv::backward_weight_f16(&mut rec, &tx, &tdy, &tdw, c.stride, false).unwrap();
        rec.run().unwrap();
        [ty.read(g).unwrap(), tdx.read(g).unwrap(), fetch(g, &tdw)]
    } else {
        let (tx, tw, tdy, ty, tdx) = (up(g, &c.xd, x), up(g, &wd, w), up(g, &yd, dy), nan(g, &yd), nan(g, &c.xd));
        conv::forward(&mut rec, &tx, &tw, &ty, c.stride, false).unwrap();
        conv::backward_data(&mut rec, &tdy, &tw, &tdx, c.stride, false).unwrap();
        conv::backward_weight(&mut rec, &tx, &tdy, &tdw, c.stride, false).unwrap();
        rec.run().unwrap();
        [fetch(g, &ty), fetch(g, &tdx), fetch(g, &tdw)]
    };
    resnet_wgpu::profile::set(g, false);
    let labels = resnet_wgpu::profile::take(g).unwrap().into_iter().map(|s| s.label).collect();
    (out, labels)
}

/// Each stage of the tiled kernels' main loop left out in turn (`conv::leave_out`, a
/// benchmarking aid whose results are wrong), f32 or (`half`) the f16 path (on cooperative
/// matrices where the adapter has them), on a forced 64x64 tile with 16 steps: 576 reduction
/// steps for the data ops and 60 for backward_weight, so several staged tiles. Every stage
/// changes every op's results, and the dispatches say which stage they leave out; with the
/// products left out, nearly every output is exactly zero (an invocation's first output holds
/// its probes' sum). Put back, the ops match the reference again: the kernels are kept per
/// stage, not mixed up.
fn check_stages_left_out(half: bool) {
    let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    if half && !g.report.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipped: the adapter has no shader-f16");
        return;
    }
    conv::force_tile(&g, Some("64x64k16t4x4")).unwrap();
    let c = case([2, 64, 6, 5], 64, 3, 1);
    let (wd, yd) = (c.wd(), c.yd());
    let mut rng = Rng::new(52);
    let round = |v: Vec<f32>| -> Vec<f32> {
        if half { v.iter().map(|&a| half::f16::from_f32(a).to_f32()).collect() } else { v }
    };
    let (x, w, dy) = (round(rng.data(len(c.xd))), round(rng.data(len(wd))), round(rng.data(len(yd))));
    let (x64, w64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&dy));
    let want = [
        r::conv::forward(&x64, c.xd, &w64, wd, 1),
        r::conv::backward_data(&dy64, &w64, wd, c.xd, 1),
        r::conv::backward_weight(&x64, c.xd, &dy64, wd, 1),
    ];
    let ops = ["forward", "backward_data", "backward_weight"];
    let tol = if half { [F16_TOL, F16_TOL, F32_TOL] } else { [F32_TOL; 3] };
    let tag = if half { "f16" } else { "f32" };
    let check_whole = |when: &str| {
        let (got, labels) = three_ops(&g, &c, [&x, &w, &dy], half);
        for k in 0..3 {
            check(&format!("{tag} {} {when}", ops[k]), &got[k], &want[k], tol[k]);
        }
        assert!(labels.iter().all(|l| !l.contains(" -")), "{tag} {when}: {labels:?}");
        got
    };
    let whole = check_whole("before");
    for stage in conv::Stage::ALL {
        conv::leave_out(&g, Some(stage));
        let (got, labels) = three_ops(&g, &c, [&x, &w, &dy], half);
        for k in 0..3 {
            assert!(bits(&got[k]) != bits(&whole[k]), "{tag} {} without {}: the whole op's bits", ops[k], stage.name());
            if stage == conv::Stage::Products {
                let zeros = got[k].iter().filter(|&&v| v == 0.0).count();
                assert!(zeros * 4 >= got[k].len() * 3, "{tag} {} without products: {zeros} zeros", ops[k]);
            }
        }
        if g.has_timestamps() {
            let mark = format!(" -{}", stage.name());
            let convs: Vec<&String> = labels.iter().filter(|l| l.starts_with("conv ")).collect();
            assert_eq!(convs.len(), 3, "{tag} without {}: {labels:?}", stage.name());
            assert!(convs.iter().all(|l| l.ends_with(&mark)), "{tag} without {}: {labels:?}", stage.name());
            if half && !conv::coop_tile_names(&g).is_empty() {
                assert!(convs.iter().all(|l| l.contains(" coop")), "{tag} without {}: {labels:?}", stage.name());
            }
        }
    }
    conv::leave_out(&g, None);
    check_whole("after");
}

#[test]
fn stages_left_out_change_the_results_until_put_back() {
    check_stages_left_out(false);
}

/// As above on the f16 path (CI runs it on cooperative matrices too: `.ci/run`).
#[test]
fn stages_left_out_f16() {
    check_stages_left_out(true);
}

/// Winograd's cases: 3x3 at stride 1 with a partial last block (odd H or W, H or W of 1), a
/// block count that is not a multiple of 4, channels not multiples of 4, output channels past
/// one GEMM tile (132) and input channels past several staged steps (132); enough blocks that
/// backward_weight splits its reduction (2x3x70x66: F(2x2) 2310 blocks in 9 ranges, F(4x4) 612
/// in 2, each with a partial last range); one stride-2 and one 1x1 case, which keep the other
/// kernels.
const WINOGRAD_CASES: &[Case] = &[
    case([1, 1, 1, 1], 1, 3, 1),
    case([1, 3, 5, 5], 5, 3, 1),
    case([3, 5, 7, 8], 33, 3, 1),
    case([2, 5, 9, 1], 3, 3, 1),
    case([2, 16, 9, 7], 16, 3, 1),
    case([1, 40, 3, 5], 132, 3, 1),
    case([1, 132, 3, 5], 40, 3, 1),
    case([2, 16, 32, 32], 16, 3, 1),
    case([2, 3, 70, 66], 5, 3, 1),
    case([1, 3, 7, 5], 16, 3, 2),
    case([1, 16, 5, 9], 1, 1, 1),
];

/// Winograd F(2x2, 3x3) in each GEMM configuration (the autotuner may pick any of them on a
/// GPU), forced on a context built without wgpu's bounds checks as on Vulkan GPUs: forward,
/// backward_data, backward_weight and the BN + ReLU prologue (overwriting poisoned outputs and
/// accumulating) against the reference. The configurations sum in the same order, so they give
/// the same bits, also where backward_weight splits its reduction (`split`: 9 splits of its
/// 2 x 35 x 33 blocks). Where the adapter has timestamps, the profile shows that Winograd ran. An
/// F(4x4) configuration forced on the f32 path runs as the F(2x2) one of its GEMM tile (F(4x4)
/// serves the f16 path alone: `winograd_f16_within_bound`).
#[test]
fn winograd_every_configuration() {
    let opts = resnet_wgpu::GpuOptions { tiled_bounds_checks: Some(false), ..resnet_wgpu::GpuOptions::from_env() };
    let g = Gpu::with_options(&opts).unwrap_or_else(|e| panic!("{e}"));
    let names = conv::winograd_names();
    let (f4, f2): (Vec<String>, Vec<String>) = names.iter().cloned().partition(|n| n.contains("f4"));
    assert!(f2.len() >= 2 && f4.len() >= 2, "{names:?}");
    let c = case([2, 16, 9, 7], 12, 3, 1);
    let (wd, yd) = (c.wd(), c.yd());
    let mut rng = Rng::new(48);
    let (x, w, dy) = (rng.data(len(c.xd)), rng.data(len(wd)), rng.data(len(yd)));
    let (tx, tw, tdy) = (up(&g, &c.xd, &x), up(&g, &wd, &w), up(&g, &yd, &dy));
    let split = case([2, 3, 70, 66], 5, 3, 1);
    let (sx, sdy) = (rng.data(len(split.xd)), rng.data(len(split.yd())));
    let (tsx, tsdy) = (up(&g, &split.xd, &sx), up(&g, &split.yd(), &sdy));
    // forward and backward_weight of `c`, and backward_weight of `split`, under the forced
    // configuration: their bits, and the GEMM dispatches' labels.
    let run = |name: &str| {
        conv::force_winograd(&g, Some(name)).unwrap();
        resnet_wgpu::profile::set(&g, true);
        let (ty, tdw, tsdw) = (nan(&g, &yd), nan(&g, &wd), nan(&g, &split.wd()));
        let mut rec = g.recorder("conv");
        conv::forward(&mut rec, &tx, &tw, &ty, 1, false).unwrap();
        conv::backward_weight(&mut rec, &tx, &tdy, &tdw, 1, false).unwrap();
        conv::backward_weight(&mut rec, &tsx, &tsdy, &tsdw, 1, false).unwrap();
        rec.run().unwrap();
        resnet_wgpu::profile::set(&g, false);
        let spans = resnet_wgpu::profile::take(&g).unwrap();
        let gemms: Vec<String> = spans.into_iter().map(|s| s.label).filter(|l| names.contains(l)).collect();
        ([&ty, &tdw, &tsdw].map(|t| bits(&fetch(&g, t))), gemms)
    };
    let mut first: Option<[Vec<u32>; 3]> = None;
    for name in &f2 {
        let ctx = format!("winograd {name}");
        conv::force_winograd(&g, Some(name)).unwrap();
        check_forward_on(&ctx, &g, WINOGRAD_CASES, 45);
        check_backward_data_on(&ctx, &g, WINOGRAD_CASES, 46);
        check_backward_weight_on(&ctx, &g, WINOGRAD_CASES, 49);
        check_bn_relu_on(&ctx, &g, WINOGRAD_CASES, 47);
        let (bits, gemms) = run(name);
        if g.has_timestamps() {
            assert_eq!(gemms, [name.clone(), name.clone(), name.clone()], "{ctx}: GEMM dispatches");
        }
        match &first {
            None => {
                // The first configuration's results against the reference; the others' bits
                // against these.
                let y: Vec<f32> = bits[0].iter().map(|&b| f32::from_bits(b)).collect();
                let dw: Vec<f32> = bits[1].iter().map(|&b| f32::from_bits(b)).collect();
                check(
                    &format!("{ctx} fwd {}", c.name()),
                    &y,
                    &r::conv::forward(&to_f64(&x), c.xd, &to_f64(&w), wd, 1),
                    F32_TOL,
                );
                let want_dw = r::conv::backward_weight(&to_f64(&x), c.xd, &to_f64(&dy), wd, 1);
                check(&format!("{ctx} bwd weight {}", c.name()), &dw, &want_dw, F32_TOL);
                let sdw: Vec<f32> = bits[2].iter().map(|&b| f32::from_bits(b)).collect();
                let want = r::conv::backward_weight(&to_f64(&sx), split.xd, &to_f64(&sdy), split.wd(), 1);
                check(&format!("{ctx} bwd weight {}", split.name()), &sdw, &want, F32_TOL);
                first = Some(bits);
            }
            Some(f) => assert!(f == &bits, "{ctx} differs from the first configuration"),
        }
    }
    // F(4x4) on the f32 path: its F(2x2) twin (the same name without `f4`) runs.
    for name in &f4 {
        let twin = name.replace("f4 ", "");
        let (bits, gemms) = run(name);
        if g.has_timestamps() {
            assert_eq!(gemms, [twin.clone(), twin.clone(), twin], "{name} on the f32 path: GEMM dispatches");
        }
        assert!(first.as_ref() == Some(&bits), "{name} on the f32 path differs from F(2x2)");
    }
    assert!(conv::force_winograd(&g, Some("no-such-configuration")).is_err());
    // Off, and back to the automatic choice (on a CPU adapter: the other kernels, untimed).
    for choice in [Some("off"), None] {
        conv::force_winograd(&g, choice).unwrap();
        check_forward_on(&format!("winograd {choice:?}"), &g, &WINOGRAD_CASES[2..3], 45);
    }
}

/// The f16 path's three ops on case `c` (half inputs from `rng`; forward and backward_data
/// overwriting poisoned outputs and accumulating, dw f32) against the f64 reference on the same
/// halves, within the f16 bound (dw within f32's). The weights are halves, or (`f32_weights`)
/// f32 holding the same f16-representable values, as the f16 units keep them.
fn check_f16_ops(g: &Gpu, c: &Case, rng: &mut Rng, tag: &str, f32_weights: bool) {
    use resnet_wgpu::tensor::HalfTensor;
    let half = |v: &[f32]| -> Vec<f32> { v.iter().map(|&a| half::f16::from_f32(a).to_f32()).collect() };
    let h = |d: &[usize], v: &[f32]| HalfTensor::from_f32(g, d, v).unwrap();
    let poison = |d: &[usize]| HalfTensor::from_f32(g, d, &vec![f32::NAN; d.iter().product()]).unwrap();
    let (xd, wd, yd) = (c.xd, c.wd(), c.yd());
    let (x, w, dy) = (half(&rng.data(len(xd))), half(&rng.data(len(wd))), half(&rng.data(len(yd))));
    let (py, pdx, pdw) = (half(&rng.data(len(yd))), half(&rng.data(len(xd))), rng.data(len(wd)));
    let (tx, tw16, tw32, tdy) = (h(&xd, &x), h(&wd, &w), up(g, &wd, &w), h(&yd, &dy));
    let (ty, tyacc, tdx, tdxacc) = (poison(&yd), h(&yd, &py), poison(&xd), h(&xd, &pdx));
    let (tdw, tdwacc) = (nan(g, &wd), up(g, &wd, &pdw));
    let mut rec = g.recorder("conv f16");
    match f32_weights {
        false => {
            conv::forward_f16(&mut rec, &tx, &tw16, &ty, c.stride, false).unwrap();
            conv::forward_f16(&mut rec, &tx, &tw16, &tyacc, c.stride, true).unwrap();
            conv::backward_data_f16(&mut rec, &tdy, &tw16, &tdx, c.stride, false).unwrap();
            conv::backward_data_f16(&mut rec, &tdy, &tw16, &tdxacc, c.stride, true).unwrap();
        }
        true => {
            conv::forward_f16(&mut rec, &tx, &tw32, &ty, c.stride, false).unwrap();
            conv::forward_f16(&mut rec, &tx, &tw32, &tyacc, c.stride, true).unwrap();
            conv::backward_data_f16(&mut rec, &tdy, &tw32, &tdx, c.stride, false).unwrap();
            conv::backward_data_f16(&mut rec, &tdy, &tw32, &tdxacc, c.stride, true).unwrap();
        }
    }
    conv::backward_weight_f16(&mut rec, &tx, &tdy, &tdw, c.stride, false).unwrap();
    conv::backward_weight_f16(&mut rec, &tx, &tdy, &tdwacc, c.stride, true).unwrap();
    rec.run().unwrap();
    let (x64, w64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&dy));
    let y = r::conv::forward(&x64, xd, &w64, wd, c.stride);
    let dx = r::conv::backward_data(&dy64, &w64, wd, xd, c.stride);
    let dw = r::conv::backward_weight(&x64, xd, &dy64, wd, c.stride);
    let tag = format!("{tag} {}{}", c.name(), if f32_weights { " f32 weights" } else { "" });
    let rd = |t: &HalfTensor| t.read(g).unwrap();
    check(&format!("conv fwd {tag}"), &rd(&ty), &y, F16_TOL);
    check(&format!("conv fwd accumulate {tag}"), &rd(&tyacc), &plus(&py, &y), F16_TOL);
    check(&format!("conv bwd data {tag}"), &rd(&tdx), &dx, F16_TOL);
    check(&format!("conv bwd data accumulate {tag}"), &rd(&tdxacc), &plus(&pdx, &dx), F16_TOL);
    check(&format!("conv bwd weight {tag}"), &fetch(g, &tdw), &dw, F32_TOL);
    check(&format!("conv bwd weight accumulate {tag}"), &fetch(g, &tdwacc), &plus(&pdw, &dw), F32_TOL);
}

/// The f16 path's fused convolutions against the reference, on exact halves: the BN + ReLU
/// prologue (forward_bn_relu_f16, backward_weight_bn_relu_f16), the following BN's statistics
/// summed in the forward's epilogue (forward_stats_f16, of y as stored), and the BN + ReLU
/// backward folded into backward_data (backward_data_bn_f16, its sums of da as stored). Half
/// outputs within F16_TOL; the f32 ones (dw, statistics, dgamma, dbeta) within F32_TOL of the
/// reference on the values the GPU stored (dw within F16_TOL on cooperative matrices, whose
/// operands, the prologue's outputs, are halves).
fn check_f16_fused(g: &Gpu, c: &Case, rng: &mut Rng, tag: &str) {
    use resnet_wgpu::ops::batch_norm::{self as bn, BnTensors};
    use resnet_wgpu::reference::batch_norm as rbn;
    use resnet_wgpu::tensor::HalfTensor;
    let half = |v: &[f32]| -> Vec<f32> { v.iter().map(|&a| half::f16::from_f32(a).to_f32()).collect() };
    let h = |d: &[usize], v: &[f32]| HalfTensor::from_f32(g, d, v).unwrap();
    let poison = |d: &[usize]| HalfTensor::from_f32(g, d, &vec![f32::NAN; d.iter().product()]).unwrap();
    let (xd, wd, yd, k, ch) = (c.xd, c.wd(), c.yd(), c.k, c.xd[1]);
    let (x, w, dy) = (half(&rng.data(len(xd))), half(&rng.data(len(wd))), half(&rng.data(len(yd))));
    let aff = affine_values(rng, ch);
    let (tx, tw, tdy, taff) = (h(&xd, &x), up(g, &wd, &w), h(&yd, &dy), up(g, &[ch, 4], &aff));
    let (ty, ty2, tdw) = (poison(&yd), poison(&yd), nan(g, &wd));
    // The following BN (k channels) for forward_stats_f16.
    let (rm, rv): (Vec<f32>, Vec<f32>) = (rng.data(k), rng.data(k).iter().map(|v| 0.5 + v.abs()).collect());
    let (ones, zeros) = (vec![1.0; k], vec![0.0; k]);
    let (tg, tb, trm, trv) = (up(g, &[k], &ones), up(g, &[k], &zeros), up(g, &[k], &rm), up(g, &[k], &rv));
    let (tmean, tinv) = (nan(g, &[k]), nan(g, &[k]));
    let stats = BnTensors { gamma: &tg, beta: &tb, running_mean: &trm, running_var: &trv, affine: None };
    let mut rec = g.recorder("conv f16 fused");
    conv::forward_bn_relu_f16(&mut rec, &tx, &taff, &tw, &ty, c.stride, false).unwrap();
    conv::backward_weight_bn_relu_f16(&mut rec, &tx, &taff, &tdy, &tdw, c.stride, false).unwrap();
    conv::forward_stats_f16(&mut rec, &tx, Some(&taff), &tw, &ty2, c.stride, false, &stats, &tmean, &tinv).unwrap();
    rec.run().unwrap();
    let a = r::batch_norm::prologue(&to_f64(&x), xd, &to_f64(&aff));
    let want_y = r::conv::forward(&a, xd, &to_f64(&w), wd, c.stride);
    let want_dw = r::conv::backward_weight(&a, xd, &to_f64(&dy), wd, c.stride);
    let tag = format!("{tag} {}", c.name());
    check(&format!("conv fwd bn-relu f16 {tag}"), &ty.read(g).unwrap(), &want_y, F16_TOL);
    // On cooperative matrices the prologue's outputs are rounded to f16 (their operands).
    let dw_tol = if g.report.coop.is_some() { F16_TOL } else { F32_TOL };
    check(&format!("conv bwd weight bn-relu f16 {tag}"), &fetch(g, &tdw), &want_dw, dw_tol);
    let stored = ty2.read(g).unwrap();
    check(&format!("conv forward_stats f16 y {tag}"), &stored, &want_y, F16_TOL);
    let st = rbn::forward_train(
        &to_f64(&stored),
        yd,
        &to_f64(&ones),
        &to_f64(&zeros),
        &to_f64(&rm),
        &to_f64(&rv),
        None,
        false,
    );
    check(&format!("conv forward_stats f16 mean {tag}"), &fetch(g, &tmean), &st.mean, F32_TOL);
    check(&format!("conv forward_stats f16 invstd {tag}"), &fetch(g, &tinv), &st.invstd, F32_TOL);
    check(&format!("conv forward_stats f16 running mean {tag}"), &fetch(g, &trm), &st.running_mean, F32_TOL);
    check(&format!("conv forward_stats f16 running var {tag}"), &fetch(g, &trv), &st.running_var, F32_TOL);

    // backward_data_bn_f16: da = backward_data(dy, w), then the BN + ReLU backward of x's BN.
    let h = BnHost::new(rng, ch);
    let (d, tda, tdx) = (BnDev::new(g, &h), poison(&xd), poison(&xd));
    let mut rec = g.recorder("conv f16 backward_data_bn");
    x_bn_prologue(&mut rec, &d, |rec, p| bn::stats_train_f16(rec, &tx, p, &d.mean, &d.invstd));
    conv::backward_data_bn_f16(&mut rec, &tdy, &tw, &tda, c.stride, false, &tx, &d.affine, &d.grads(), &tdx, false)
        .unwrap();
    rec.run().unwrap();
    let want_da = r::conv::backward_data(&to_f64(&dy), &to_f64(&w), wd, xd, c.stride);
    let da = tda.read(g).unwrap();
    check(&format!("conv bwd data bn f16 da {tag}"), &da, &want_da, F16_TOL);
    let (want_dx, want_dg, want_db) =
        rbn::backward(&to_f64(&x), xd, &to_f64(&da), &to_f64(&h.gamma), &to_f64(&h.beta), true);
    check(&format!("conv bwd data bn f16 dx {tag}"), &tdx.read(g).unwrap(), &want_dx, F16_TOL);
    check(&format!("conv bwd data bn f16 dgamma {tag}"), &fetch(g, &d.dgamma), &want_dg, F32_TOL);
    check(&format!("conv bwd data bn f16 dbeta {tag}"), &fetch(g, &d.dbeta), &want_db, F32_TOL);
}

/// Winograd on the f16 path in each configuration, F(2x2) and F(4x4): half activations loaded to
/// f32 and stored rounded once, the weights as halves and as f32 (as the f16 units keep them), dw
/// f32; within the f16 path's bounds.
#[test]
fn winograd_f16_within_bound() {
    let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    if !g.report.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipped: no shader-f16 on {}", g.report.name);
        return;
    }
    for name in conv::winograd_names() {
        conv::force_winograd(&g, Some(&name)).unwrap();
        let mut rng = Rng::new(52);
        for (i, c) in WINOGRAD_CASES.iter().enumerate() {
            check_f16_ops(&g, c, &mut rng, &format!("f16 winograd {name}"), i % 2 == 1);
        }
    }
}

/// Each Winograd operand may take one storage binding: where F(2x2)'s are too large the f16
/// path still takes F(4x4), whose are 2.25x the input where F(2x2)'s are 4x. At 2x4x16x16 under
/// a 24 KiB binding F(2x2)'s transformed input takes 32 KiB (16 x 4 channels x 128 blocks x 4
/// bytes), F(4x4)'s 18 KiB (36 x 4 x 32 x 4): forced F(4x4) runs its GEMMs, forced F(2x2) the
/// other kernels (the register path on a CPU adapter), and both match the reference.
#[test]
fn winograd_f4_where_f2_is_too_large() {
    let opts = resnet_wgpu::GpuOptions { max_binding_bytes: Some(24 << 10), ..resnet_wgpu::GpuOptions::from_env() };
    let g = Gpu::with_options(&opts).unwrap_or_else(|e| panic!("{e}"));
    if !g.report.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipped: no shader-f16 on {}", g.report.name);
        return;
    }
    let names = conv::winograd_names();
    let c = case([2, 4, 16, 16], 4, 3, 1);
    for (name, gemm) in [("f4 64x64t8x8", Some("wino f4 64x64t8x8")), ("64x64t8x8", None)] {
        conv::force_winograd(&g, Some(name)).unwrap();
        resnet_wgpu::profile::set(&g, true);
        check_f16_ops(&g, &c, &mut Rng::new(53), &format!("f16 winograd {name} at 24 KiB"), true);
        resnet_wgpu::profile::set(&g, false);
        let spans = resnet_wgpu::profile::take(&g).unwrap();
        let gemms: Vec<String> = spans.into_iter().map(|s| s.label).filter(|l| names.contains(l)).collect();
        if g.has_timestamps() {
            // Two runs of each of the three ops.
            let want: Vec<String> = gemm.iter().flat_map(|n| vec![n.to_string(); 6]).collect();
            assert_eq!(gemms, want, "forced {name} at 24 KiB: GEMM dispatches");
        }
    }
}

#[test]
fn forward_matches_reference() {
    check_forward(CASES, 11, false);
}

#[test]
fn backward_data_matches_reference() {
    check_backward_data(CASES, 12, false);
}

#[test]
fn backward_weight_matches_reference() {
    check_backward_weight(CASES, 13, false);
}

/// A weight gradient of more tiles than one dispatch dimension holds (4096 x 2048 1x1: 65536 of
/// the register path's 8 x 16, one past the usual limit): the register path, whose tiles are
/// unfolded workgroups, leaves it to the tiled kernels, and the result is the reference's.
#[test]
fn backward_weight_past_a_dispatch_dimension() {
    for (ctx, g) in contexts(false) {
        check_backward_weight_on(ctx, g, &[case([1, 2048, 1, 4], 4096, 1, 1)], 14);
    }
}

#[test]
fn forward_tile_edges() {
    check_forward(EDGES, 21, true);
}

#[test]
fn backward_data_tile_edges() {
    check_backward_data(EDGES, 22, true);
}

#[test]
fn backward_weight_tile_edges() {
    check_backward_weight(EDGES, 23, true);
}

/// backward_weight sums in a fixed order: two runs give the same bits, with the reduction split
/// over several workgroups (small K and C: few output tiles) and without.
#[test]
fn backward_weight_is_deterministic() {
    for (ctx, g) in contexts(true) {
        let mut rng = Rng::new(31);
        for c in [case([4, 3, 16, 16], 5, 3, 1), case([2, 16, 16, 32], 24, 3, 2), case([2, 8, 8, 8], 8, 1, 1)] {
            let (wd, yd) = (c.wd(), c.yd());
            let (tx, tdy) = (up(g, &c.xd, &rng.data(len(c.xd))), up(g, &yd, &rng.data(len(yd))));
            let runs: Vec<Vec<u32>> = (0..2)
                .map(|_| {
                    let tdw = nan(g, &wd);
                    let mut rec = g.recorder("conv backward_weight");
                    conv::backward_weight(&mut rec, &tx, &tdy, &tdw, c.stride, false).unwrap();
                    rec.run().unwrap();
                    bits(&fetch(g, &tdw))
                })
                .collect();
            assert!(runs[0] == runs[1], "{ctx} conv bwd weight {}: two runs differ", c.name());
            let finite = runs[0].iter().all(|&b| f32::from_bits(b).is_finite());
            assert!(finite, "{ctx} conv bwd weight {}: an element left unwritten (NaN)", c.name());
        }
    }
}

/// `sum(forward(x, w) * rw)`: a scalar loss whose gradient to `y` is `rw`.
fn loss(x: &[f64], xd: [usize; 4], w: &[f64], wd: [usize; 4], stride: usize, rw: &[f64]) -> f64 {
    r::conv::forward(x, xd, w, wd, stride).iter().zip(rw).map(|(a, b)| a * b).sum()
}

/// Central differences of `f` at every element of `v`.
fn central_diff(v: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    const H: f64 = 1e-6;
    let mut v = v.to_vec();
    (0..v.len())
        .map(|i| {
            let orig = v[i];
            v[i] = orig + H;
            let up = f(&v);
            v[i] = orig - H;
            let down = f(&v);
            v[i] = orig;
            (up - down) / (2.0 * H)
        })
        .collect()
}

/// Relative L2 and relative max difference of two f64 vectors.
fn agreement(got: &[f64], want: &[f64]) -> (f64, f64) {
    let (mut num, mut den, mut max, mut scale) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g - w) * (g - w);
        den += w * w;
        max = max.max((g - w).abs());
        scale = scale.max(w.abs());
    }
    ((num / den).sqrt(), max / scale)
}

#[test]
fn reference_backwards_match_finite_differences() {
    let mut rng = Rng::new(14);
    for c in [case([2, 3, 5, 4], 2, 3, 2), case([2, 3, 5, 4], 2, 1, 1), case([1, 2, 4, 5], 3, 3, 1)] {
        let (wd, yd) = (c.wd(), c.yd());
        let x = to_f64(&rng.data(len(c.xd)));
        let w = to_f64(&rng.data(len(wd)));
        let rw = to_f64(&rng.data(len(yd)));
        let dx = r::conv::backward_data(&rw, &w, wd, c.xd, c.stride);
        let dw = r::conv::backward_weight(&x, c.xd, &rw, wd, c.stride);
        let fd_x = central_diff(&x, |x| loss(x, c.xd, &w, wd, c.stride, &rw));
        let fd_w = central_diff(&w, |w| loss(&x, c.xd, w, wd, c.stride, &rw));
        for (what, an, fd) in [("dx", &dx, &fd_x), ("dw", &dw, &fd_w)] {
            let (rel, max) = agreement(an, fd);
            eprintln!("gradcheck {what} {}: rel L2 {rel:.2e}, max rel {max:.2e}", c.name());
            assert!(an.iter().all(|v| v.is_finite()) && an.iter().any(|&v| v != 0.0), "{what}: degenerate");
            assert!(rel <= 1e-7 && max <= 1e-7, "{what} {}: rel L2 {rel:.3e}, max rel {max:.3e}", c.name());
        }
    }
}

#[test]
fn out_size_values() {
    assert_eq!(conv::out_size(32, 3, 1), 32);
    assert_eq!(conv::out_size(32, 3, 2), 16);
    assert_eq!(conv::out_size(7, 3, 2), 4);
    assert_eq!(conv::out_size(7, 1, 2), 4);
    assert_eq!(conv::out_size(1, 3, 2), 1);
    assert_eq!(conv::out_size(8, 1, 2), 4);
    // Degenerate arguments give 0, not a panic.
    assert_eq!(conv::out_size(5, 3, 0), 0);
    assert_eq!(conv::out_size(0, 3, 1), 0);
    assert_eq!(conv::out_size(1, 5, 1), 1);
    assert_eq!(conv::out_size(usize::MAX, 3, 1), 0);
}

fn is_shape_error(r: resnet_wgpu::Result<()>) -> bool {
    matches!(r, Err(Error::Shape(_) | Error::Invalid(_)))
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let t = |dims: &[usize]| upload(dims, &vec![1.0; dims.iter().product()]);
    // Roles: forward(x, w, y), backward_data(dy = y, w, dx = x),
    // backward_weight(x, dy = y, dw = w).
    let all_three = |x: &Tensor, w: &Tensor, y: &Tensor, stride: usize| {
        let mut rec = g.recorder("bad");
        for acc in [false, true] {
            let f = conv::forward(&mut rec, x, w, y, stride, acc);
            let d = conv::backward_data(&mut rec, y, w, x, stride, acc);
            let wg = conv::backward_weight(&mut rec, x, y, w, stride, acc);
            assert!(is_shape_error(f), "forward {:?} {:?} {:?} stride {stride}", x.dims(), w.dims(), y.dims());
            assert!(is_shape_error(d), "backward_data {:?} {:?} {:?} stride {stride}", x.dims(), w.dims(), y.dims());
            assert!(is_shape_error(wg), "backward_weight {:?} {:?} {:?} stride {stride}", x.dims(), w.dims(), y.dims());
        }
        // Nothing was recorded: the empty command buffer runs cleanly.
        rec.run().unwrap();
    };
    let (x, w, y) = (t(&[2, 3, 7, 5]), t(&[4, 3, 3, 3]), t(&[2, 4, 4, 3]));
    // The valid triple, at stride 2, for contrast.
    {
        let mut rec = g.recorder("good");
        conv::forward(&mut rec, &x, &w, &y, 2, false).unwrap();
        conv::backward_data(&mut rec, &y, &w, &x, 2, true).unwrap();
        conv::backward_weight(&mut rec, &x, &y, &w, 2, true).unwrap();
        rec.run().unwrap();
    }
    // Strides other than 1 and 2 (stride 1 needs a 7x5 output).
    for s in [0, 3, usize::MAX] {
        all_three(&x, &w, &y, s);
    }
    all_three(&x, &w, &y, 1);
    // Stride 3 with the output it would give: refused for the stride itself (the others'
    // outputs are refused as the wrong shape whatever the stride check does).
    let y3 = t(&[2, 4, conv::out_size(7, 3, 3), conv::out_size(5, 3, 3)]);
    let mut rec = g.recorder("stride 3");
    refused(conv::forward(&mut rec, &x, &w, &y3, 3, false), "stride must be 1 or 2");
    refused(conv::backward_data(&mut rec, &y3, &w, &x, 3, false), "stride must be 1 or 2");
    refused(conv::backward_weight(&mut rec, &x, &y3, &w, 3, false), "stride must be 1 or 2");
    drop(rec);
    // Not 4-D.
    all_three(&t(&[3, 7, 5]), &w, &y, 2);
    all_three(&x, &t(&[4, 27]), &y, 2);
    all_three(&x, &w, &t(&[2, 4, 12]), 2);
    // Channel mismatch between x and w.
    all_three(&t(&[2, 2, 7, 5]), &w, &y, 2);
    // Kernels not square, or not 1 or 3.
    all_three(&x, &t(&[4, 3, 3, 1]), &y, 2);
    all_three(&x, &t(&[4, 3, 2, 2]), &y, 2);
    all_three(&x, &t(&[4, 3, 5, 5]), &y, 2);
    // Output batch, channels, height or width off.
    all_three(&x, &w, &t(&[1, 4, 4, 3]), 2);
    all_three(&x, &w, &t(&[2, 3, 4, 3]), 2);
    all_three(&x, &w, &t(&[2, 4, 3, 3]), 2);
    all_three(&x, &w, &t(&[2, 4, 4, 4]), 2);
    // An output aliasing an input.
    let sq = t(&[1, 2, 3, 3]);
    let w2 = t(&[2, 2, 3, 3]);
    let mut rec = g.recorder("alias");
    assert!(is_shape_error(conv::forward(&mut rec, &sq, &w2, &sq, 1, true)));
    assert!(is_shape_error(conv::backward_data(&mut rec, &sq, &w2, &sq, 1, true)));
    rec.run().unwrap();
    // The prologue's values must be [C, 4] (x has 3 channels).
    let mut rec = g.recorder("bad affine");
    for aff in [t(&[3, 3]), t(&[2, 4]), t(&[12]), t(&[3, 4, 1])] {
        assert!(is_shape_error(conv::forward_bn_relu(&mut rec, &x, &aff, &w, &y, 2, false)), "{:?}", aff.dims());
        assert!(
            is_shape_error(conv::backward_weight_bn_relu(&mut rec, &x, &aff, &y, &w, 2, false)),
            "{:?}",
            aff.dims()
        );
    }
    rec.run().unwrap();
}

/// The f16 path's stated bound for half outputs (forward, backward_data): relative L2 error at
/// most 1e-3 against the f64 reference on the same half-rounded inputs (one rounding of the
/// f32 result to f16: unit roundoff 4.9e-4). backward_weight writes f32: F32_TOL.
const F16_TOL: f64 = 1e-3;

/// The f16 path (where the adapter has shader-f16) on the tile-edge shapes, overwriting and
/// accumulating, with the automatic tile; each configuration forced on three of them (3x3 at
/// stride 1 and 2, channel-major, and over 64 channels, tap-major: the index arithmetic of
/// every configuration is checked in f32 above, this checks its f16 loads and stores).
#[test]
fn f16_path_within_bound() {
    use resnet_wgpu::tensor::HalfTensor;
    let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    if !g.report.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipped: no shader-f16 on {}", g.report.name);
        return;
    }
    let mut tiles = vec![None];
    tiles.extend(conv::tile_names(&g).into_iter().map(Some));
    for tile in tiles {
        conv::force_tile(&g, tile.as_deref()).unwrap();
        let mut rng = Rng::new(51);
        let cases = match tile {
            Some(_) => vec![EDGES[0], EDGES[2], EDGES[3]],
            None => tile_cases(),
        };
        for c in &cases {
            let tag = format!("f16 tile {}", tile.as_deref().unwrap_or("auto"));
            check_f16_ops(&g, c, &mut rng, &tag, false);
            // The fused ones need batch statistics (more than one value per channel); under a
            // forced tile, one case (stride 2 on odd sizes): each tile's fused modules take about
            // 10 s to build on lavapipe.
            let stats = c.xd[0] * c.xd[2] * c.xd[3] > 1 && c.yd()[0] * c.yd()[2] * c.yd()[3] > 1;
            if stats && (tile.is_none() || c.stride == 2) {
                check_f16_fused(&g, c, &mut rng, &tag);
            }
        }
    }
    // Shapes and aliasing are checked as in f32.
    let z = |d: &[usize]| HalfTensor::from_f32(&g, d, &vec![0.0; d.iter().product()]).unwrap();
    let mut rec = g.recorder("bad f16");
    assert!(is_shape_error(conv::forward_f16(
        &mut rec,
        &z(&[1, 2, 5, 5]),
        &z(&[3, 3, 3, 3]),
        &z(&[1, 3, 5, 5]),
        1,
        false
    )));
    let sq = z(&[1, 2, 3, 3]);
    assert!(is_shape_error(conv::backward_data_f16(&mut rec, &sq, &z(&[2, 2, 3, 3]), &sq, 1, false)));
    rec.run().unwrap();
}

/// A forced tile configuration takes the tiled kernels on the f32 and f16 paths alike, also
/// where Winograd would apply (3x3 at stride 1, 64 channels: a CPU adapter's rule takes it
/// there, a GPU's tuner may): the forced-tile tests above then test that configuration.
#[test]
fn forced_tile_takes_the_tiled_kernels() {
    use resnet_wgpu::tensor::HalfTensor;
    let Some(g) = profiled_context() else { return };
    let tile = "64x64k16t4x4";
    conv::force_tile(&g, Some(tile)).unwrap();
    let (xd, wd) = ([2, 64, 8, 8], [64, 64, 3, 3]);
    let mut rng = Rng::new(53);
    let (x, w) = (rng.data(len(xd)), rng.data(len(wd)));
    let labels = |record: &dyn Fn(&mut resnet_wgpu::Recorder)| {
        resnet_wgpu::profile::set(&g, true);
        let mut rec = g.recorder("forced tile");
        record(&mut rec);
        rec.run().unwrap();
        resnet_wgpu::profile::set(&g, false);
        resnet_wgpu::profile::take(&g).unwrap().into_iter().map(|s| s.label).collect::<Vec<_>>()
    };
    let (tx, tw, ty) = (up(&g, &xd, &x), up(&g, &wd, &w), nan(&g, &xd));
    let mut runs = vec![("f32", labels(&|rec| conv::forward(rec, &tx, &tw, &ty, 1, false).unwrap()))];
    if g.report.features.contains(wgpu::Features::SHADER_F16) {
        let h = |d: &[usize], v: &[f32]| HalfTensor::from_f32(&g, d, v).unwrap();
        let (hx, hy) = (h(&xd, &x), h(&xd, &vec![f32::NAN; len(xd)]));
        runs.push(("f16", labels(&|rec| conv::forward_f16(rec, &hx, &tw, &hy, 1, false).unwrap())));
    }
    for (path, l) in runs {
        assert!(l.iter().any(|s| s.contains(tile)) && !l.iter().any(|s| s.contains("wino")), "{path}: {l:?}");
    }
}

/// The autotuner's candidates are not profiled: with the profile on, a convolution's first
/// call (which tunes its shape, timing every candidate) shows the same dispatches as its second
/// (which does not), and its result is the reference's.
#[test]
fn tuning_leaves_the_profile_to_the_callers_dispatches() {
    let Some(g) = profiled_context() else { return };
    conv::set_kernels(&g, conv::Kernels::Tuned);
    let c = case([2, 8, 9, 7], 8, 3, 1);
    let mut rng = Rng::new(61);
    let (x, w) = (rng.data(len(c.xd)), rng.data(len(c.wd())));
    let (tx, tw, ty) = (up(&g, &c.xd, &x), up(&g, &c.wd(), &w), nan(&g, &c.yd()));
    let profiled = || {
        resnet_wgpu::profile::set(&g, true);
        let mut rec = g.recorder("profiled forward");
        conv::forward(&mut rec, &tx, &tw, &ty, 1, false).unwrap();
        rec.run().unwrap();
        resnet_wgpu::profile::set(&g, false);
        resnet_wgpu::profile::take(&g).unwrap().into_iter().map(|s| s.label).collect::<Vec<_>>()
    };
    let (first, second) = (profiled(), profiled());
    assert!(g.tuning().timed > 0, "the first call tuned nothing: {first:?}");
    assert_eq!(first, second, "the first call's profile holds the tuner's dispatches");
    check("tuned forward", &fetch(&g, &ty), &r::conv::forward(&to_f64(&x), c.xd, &to_f64(&w), c.wd(), 1), F32_TOL);
}

/// The f16 path where the context times its choices, as on a GPU (forced here,
/// `Kernels::Tuned`): its tile among the cooperative-matrix and plain configurations where the
/// adapter has cooperative matrices (the f32 plan's tile without them), whether a data op
/// splits (the forward of the third shape would), and Winograd on f16 operands; the three ops
/// within the f16 bounds, with half and f32 weights, and the choices recorded in a tune file as
/// f16 decisions.
#[test]
fn f16_tuned_path_within_bound() {
    let dir = TempDir::new("conv-f16-tuned");
    let path = dir.join("tune.json");
    let opts = resnet_wgpu::GpuOptions { tune_file: Some(path.clone()), ..resnet_wgpu::GpuOptions::from_env() };
    let g = Gpu::with_options(&opts).unwrap_or_else(|e| panic!("{e}"));
    if !g.report.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipped: no shader-f16 on {}", g.report.name);
        return;
    }
    conv::set_kernels(&g, conv::Kernels::Tuned);
    let mut rng = Rng::new(59);
    // 3x3 at stride 1 (Winograd's candidate), the second with f32 weights, the third with a
    // long reduction over a one-tile output (the rule splits its forward 4 ways).
    for (i, c) in [EDGES[0], EDGES[1], EPILOGUE_CASES[4]].iter().enumerate() {
        check_f16_ops(&g, c, &mut rng, "f16 tuned", i == 1);
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let decisions = |kind: &str| text.matches(&format!("\"{kind} ")).count();
    // Three ops on three shapes; without cooperative matrices the f16 path takes the f32 plan's
    // tile, which is tuned as such.
    let tiles = if g.report.coop.is_some() { decisions("tile f16") } else { decisions("tile") };
    assert_eq!(tiles, 9, "tile decisions in {text}");
    assert!(decisions("winograd f16") >= 3, "Winograd decisions in {text}");
    assert!(decisions("split f16") >= 1, "split decisions in {text}");
}

/// The register path on the f16 path (CPU adapters: rgba16f operand textures, the weights
/// rounded to halves as they are read, y and dx stored rounded once), forced on a context of its
/// own so that a GPU runs it too: the three ops on every case and tile edge (those whose rows
/// the lanes cannot tile take the tiled kernels), half and f32 weights in turn, within the f16
/// path's bounds; and the profile shows that it ran, where the adapter's subgroups allow it.
#[test]
fn f16_register_path_within_bound() {
    let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    if !g.report.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipped: no shader-f16 on {}", g.report.name);
        return;
    }
    conv::set_kernels(&g, conv::Kernels::Register);
    let mut rng = Rng::new(57);
    resnet_wgpu::profile::set(&g, true);
    for (i, c) in CASES.iter().chain(EDGES).enumerate() {
        check_f16_ops(&g, c, &mut rng, "f16 register", i % 2 == 1);
    }
    resnet_wgpu::profile::set(&g, false);
    assert_register_path_ran(&g, "the f16 convolutions");
}

/// The f16 path convolves f32 weights rounded to halves, whichever kernels run: weights of
/// 1 + 2^-11 (a tie, rounded to 1) on inputs of ones give small whole numbers of taps, exactly,
/// where the unrounded weights would give a half above them (12.0078 for 12, 18.0156 for 18).
#[test]
fn f16_path_rounds_f32_weights_to_halves() {
    use resnet_wgpu::tensor::HalfTensor;
    let auto = gpu();
    if !auto.report.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipped: no shader-f16 on {}", auto.report.name);
        return;
    }
    let forced = |winograd: Option<&str>| {
        let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
        match winograd {
            Some(name) => conv::force_winograd(&g, Some(name)).unwrap(),
            None => conv::set_kernels(&g, conv::Kernels::Tiled),
        }
        g
    };
    let (tiled, f2, f4) = (forced(None), forced(Some("64x64t8x8")), forced(Some("f4 64x64t8x8")));
    let (xd, wd) = ([1, 3, 4, 8], [3, 3, 3, 3]);
    let tie = 1.0 + f32::powi(2.0, -11);
    let ones = vec![1.0; len(xd)];
    let want = r::conv::forward(&to_f64(&ones), xd, &vec![1.0; len(wd)], wd, 1);
    let want_dx = r::conv::backward_data(&to_f64(&ones), &vec![1.0; len(wd)], wd, xd, 1);
    for (ctx, g) in [("auto", auto), ("tiled", &tiled), ("winograd", &f2), ("winograd f4", &f4)] {
        let (x, w) = (HalfTensor::from_f32(g, &xd, &ones).unwrap(), up(g, &wd, &vec![tie; len(wd)]));
        let poison = || HalfTensor::from_f32(g, &xd, &vec![f32::NAN; len(xd)]).unwrap();
        let (y, dx) = (poison(), poison());
        let mut rec = g.recorder("f16 weights");
        conv::forward_f16(&mut rec, &x, &w, &y, 1, false).unwrap();
        conv::backward_data_f16(&mut rec, &x, &w, &dx, 1, false).unwrap();
        rec.run().unwrap();
        for (op, got, want) in
            [("forward", y.read(g).unwrap(), &want), ("backward_data", dx.read(g).unwrap(), &want_dx)]
        {
            let exact = got.iter().zip(want.iter()).all(|(&a, &b)| a as f64 == b);
            assert!(exact, "{ctx} {op}: {:?} against {:?}", &got[..8], &want[..8]);
        }
    }
}

/// `as_st` (shaders/f16_round.wgsl), the f16 path's rounding of f32 values to halves inside
/// its kernels, rounds as `half::f16::from_f32` does, bit for bit: ties to even at every
/// exponent, subnormal halves, the half range's end (65504, 65520 and above to infinity), f32
/// subnormals, signed zeros, infinities and NaN, and random bit patterns. Its own kernel here,
/// as the convolutions' compiled sums would hide most single roundings. (Written in integer
/// arithmetic since Mesa 26's lavapipe folded `f32(f16(v))` to `v`: with that form, this test
/// fails there.)
#[test]
fn as_st_rounds_as_half_does() {
    let g = gpu();
    if !g.report.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipped: no shader-f16 on {}", g.report.name);
        return;
    }
    let p = |e: i32| f32::powi(2.0, e);
    let mut v: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        1.0 + p(-11),
        1.0 + 3.0 * p(-11),
        -(1.0 + p(-11)),
        1.0 + p(-11) + p(-20),
        1.0 - p(-12),
        1.0 - p(-13),
        2047.5,
        2048.5,
        4095.0,
        65504.0,
        65519.0,
        65519.996,
        65520.0,
        65536.0,
        -65520.0,
        1e6,
        f32::MAX,
        p(-14),
        p(-14) - p(-26),
        p(-15) + p(-25),
        p(-24),
        p(-25),
        p(-25) * 1.0001,
        3.0 * p(-25),
        -3.0 * p(-25),
        p(-26),
        1e-8,
        1e-40,
        -1e-45,
        f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
    ];
    // Random bit patterns, half of them with exponents around the half range.
    let mut rng = Rng::new(71);
    while v.len() < 64 * 1024 {
        let b = rng.next_u64() as u32;
        let b = if v.len().is_multiple_of(2) { (b & 0x807f_ffff) | ((95 + (b >> 8) % 52) << 23) } else { b };
        v.push(f32::from_bits(b));
    }
    let (x, y) = (upload(&[v.len()], &v), poisoned(&[v.len()]));
    let source = format!(
        "enable f16;\n{}\n{}",
        include_str!("../shaders/f16_round.wgsl"),
        "@group(0) @binding(0) var<storage, read> x: array<f32>;
         @group(0) @binding(1) var<storage, read_write> y: array<f32>;
         @compute @workgroup_size(64)
         fn main(@builtin(global_invocation_id) i: vec3u) { y[i.x] = as_st(x[i.x]); }"
    );
    let module = g.device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("as_st test"),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let pipeline = g.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("as_st test"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let bind = g.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry { binding: 0, resource: x.buffer.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 1, resource: y.buffer.as_entire_binding() },
        ],
    });
    let mut encoder = g.device.create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(v.len() as u32 / 64, 1, 1);
    }
    g.queue.submit([encoder.finish()]);
    let got = read(&y);
    let mut wrong = 0;
    for (&a, &b) in v.iter().zip(&got) {
        let want = half::f16::from_f32(a).to_f32();
        // NaN stays NaN (an unwritten NaN-poisoned element passes here: 2 of 65536).
        let ok = if a.is_nan() { b.is_nan() } else { b.to_bits() == want.to_bits() };
        if !ok && wrong < 8 {
            eprintln!("as_st({a:e} = {:#010x}) = {b:e}, half rounds to {want:e}", a.to_bits());
        }
        wrong += usize::from(!ok);
    }
    assert_eq!(wrong, 0, "{wrong} of {} values rounded unlike half::f16", v.len());
}

/// Winograd and the tiled kernels at the depths of the ImageNet-like layers (hundreds of input
/// channels in each sum; the cases above stop at 132): the three ops within the f32 bound, and
/// on the f16 path (Winograd F(2x2) and F(4x4)) within its bounds.
#[test]
fn deep_layers_within_the_f32_bound() {
    let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    let cases = [case([1, 384, 7, 5], 320, 3, 1), case([2, 256, 6, 6], 256, 3, 1)];
    let f16 = g.report.features.contains(wgpu::Features::SHADER_F16);
    let mut rng = Rng::new(64);
    conv::force_winograd(&g, Some("64x64t8x8")).unwrap();
    check_forward_on("winograd deep", &g, &cases, 61);
    check_backward_data_on("winograd deep", &g, &cases, 62);
    check_backward_weight_on("winograd deep", &g, &cases, 63);
    for config in ["64x64t8x8", "f4 64x64t8x8"] {
        conv::force_winograd(&g, Some(config)).unwrap();
        if f16 {
            check_f16_ops(&g, &cases[0], &mut rng, &format!("f16 winograd {config} deep"), true);
        }
    }
    conv::force_winograd(&g, Some("off")).unwrap();
    conv::set_kernels(&g, conv::Kernels::Tiled);
    check_forward_on("tiled deep", &g, &cases, 61);
    check_backward_data_on("tiled deep", &g, &cases, 62);
    check_backward_weight_on("tiled deep", &g, &cases, 63);
    if f16 {
        check_f16_ops(&g, &cases[0], &mut rng, "f16 tiled deep", true);
    }
}
