//! The f16 path's convolutions on cooperative matrices (tensor cores, wgpu's experimental
//! feature): every tile configuration that runs on them, forced, against the f64 reference on
//! awkward shapes, outputs poisoned. Where the adapter offers no cooperative matrices (Mesa's
//! lavapipe before 25.x, the CI machine's 22.3 among them) the f16 path runs plain arithmetic:
//! the test checks that it reports none and says so. Mesa 26's lavapipe offers 8x8x8 fragments,
//! NVIDIA's drivers 16x16x16.
mod common;
use common::*;
use resnet_wgpu::ops::conv;
use resnet_wgpu::reference::{self as r, to_f64};
use resnet_wgpu::tensor::HalfTensor;
use resnet_wgpu::{Gpu, GpuOptions, Tensor};

/// The bound for half outputs, as `tests/conv.rs`: relative L2 1e-3 against the f64 reference
/// on the same half inputs (one rounding of the f32 sum to f16, unit roundoff 4.9e-4). Also for
/// backward_weight through the BN + ReLU prologue: cooperative matrices take f16 operands, so
/// the prologue's f32 outputs are rounded to f16 before the products.
const F16_TOL: f64 = 1e-3;

/// x [N, C, H, W], K output channels, kernel size, stride: batch 1, odd sizes, channels that are
/// not multiples of 4 or of a fragment, stride 2 on odd sizes, a 1x1 kernel, a reduction of many
/// tiles, and one long enough (576 steps over a single output tile) that forward and
/// backward_data split it (f32 partial sums, rounded to f16 once). The last two reduce over 64
/// and 32 channels, which the data ops run tap-major (the others channel-major).
const CASES: &[([usize; 4], usize, usize, usize)] = &[
    ([1, 5, 7, 9], 6, 3, 1),
    ([2, 12, 7, 5], 20, 3, 2),
    ([1, 10, 9, 7], 12, 1, 2),
    ([2, 40, 6, 5], 36, 3, 1),
    ([1, 64, 5, 3], 64, 3, 1),
    ([2, 32, 7, 5], 32, 3, 2),
];

fn len(d: [usize; 4]) -> usize {
    d.iter().product()
}

fn halves(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&a| half::f16::from_f32(a).to_f32()).collect()
}

fn plus(prior: &[f32], v: &[f64]) -> Vec<f64> {
    prior.iter().zip(v).map(|(&a, &b)| a as f64 + b).collect()
}

/// The configurations at even positions of the list. The configurations are checked in two
/// tests, alternating through the list (so that each takes its share of the costly 8x8 register
/// blocks), each on a context of its own, so that a 2-core machine compiles their pipelines side
/// by side: on a CPU adapter that compiling is nearly all of the time (about 300 s for all of
/// them, one after the other, on Mesa 26's lavapipe).
#[test]
fn coop_even_configurations_match_reference() {
    check_alternate(0);
}

/// The configurations at odd positions of the list.
#[test]
fn coop_odd_configurations_match_reference() {
    check_alternate(1);
}

/// Every other configuration of the list, from position `first`, through `check_configurations`.
fn check_alternate(first: usize) {
    let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    let names = conv::coop_tile_names(&g);
    if g.report.coop.is_some() {
        // 64x64 with 16 steps is the f16 path's fallback where the chosen configuration cannot
        // run on cooperative matrices: it must be able to.
        assert!(names.iter().any(|n| n == "64x64k16t4x4"), "64x64k16t4x4 not among {names:?}");
    }
    check_configurations(&g, names.into_iter().skip(first).step_by(2).collect());
}

/// Every op of the f16 path, each configuration of `names` forced in turn, over `CASES`.
fn check_configurations(g: &Gpu, names: Vec<String>) {
    let Some(c) = g.report.coop else {
        assert!(names.is_empty(), "tile configurations on cooperative matrices without them: {names:?}");
        eprintln!("skipped: {} offers no f16 cooperative matrices (the f16 path runs plain arithmetic)", g.report.name);
        return;
    };
    eprintln!("adapter: {}", g.report);
    eprintln!("cooperative matrix {0}x{0}x{0}, subgroups of {1}; configurations {names:?}", c.size, c.subgroup);
    if names.is_empty() {
        eprintln!("skipped: none of this test's configurations runs on {0}x{0}x{0} fragments", c.size);
    }
    let up = |d: &[usize], v: &[f32]| Tensor::new(g, d, v).unwrap();
    let h = |d: &[usize], v: &[f32]| HalfTensor::from_f32(g, d, v).unwrap();
    let poison = |d: &[usize]| HalfTensor::from_f32(g, d, &vec![f32::NAN; d.iter().product()]).unwrap();
    let mut rng = Rng::new(97);
    for name in &names {
        conv::force_tile(g, Some(name)).unwrap();
        for &(xd, k, ks, stride) in CASES {
            let (oh, ow) = (conv::out_size(xd[2], ks, stride), conv::out_size(xd[3], ks, stride));
            let (wd, yd) = ([k, xd[1], ks, ks], [xd[0], k, oh, ow]);
            let (x, w, dy) = (halves(&rng.data(len(xd))), halves(&rng.data(len(wd))), halves(&rng.data(len(yd))));
            let (py, pdx, pdw) = (halves(&rng.data(len(yd))), halves(&rng.data(len(xd))), rng.data(len(wd)));
            // BN + ReLU prologue values: ReLU cuts part of every channel.
            let aff: Vec<f32> = (0..xd[1])
                .flat_map(|_| {
                    let s = rng.range(-1.0, 1.0);
                    [0.5 * rng.range(-1.0, 1.0), s.signum() * 0.5 + s, 0.5 * rng.range(-1.0, 1.0), 0.0]
                        .map(|v| v as f32)
                })
                .collect();
            let (tx, tw, tdy, taff) = (h(&xd, &x), h(&wd, &w), h(&yd, &dy), up(&[xd[1], 4], &aff));
            let (ty, tyacc, tdx, tdxacc) = (poison(&yd), h(&yd, &py), poison(&xd), h(&xd, &pdx));
            let (tdw, tdwacc) = (Tensor::filled(g, &wd, f32::NAN).unwrap(), up(&wd, &pdw));
            let (typre, tdwpre) = (poison(&yd), Tensor::filled(g, &wd, f32::NAN).unwrap());
            let mut rec = g.recorder("conv coop");
            conv::forward_f16(&mut rec, &tx, &tw, &ty, stride, false).unwrap();
            conv::forward_f16(&mut rec, &tx, &tw, &tyacc, stride, true).unwrap();
            conv::backward_data_f16(&mut rec, &tdy, &tw, &tdx, stride, false).unwrap();
            conv::backward_data_f16(&mut rec, &tdy, &tw, &tdxacc, stride, true).unwrap();
            conv::backward_weight_f16(&mut rec, &tx, &tdy, &tdw, stride, false).unwrap();
            conv::backward_weight_f16(&mut rec, &tx, &tdy, &tdwacc, stride, true).unwrap();
            conv::forward_bn_relu_f16(&mut rec, &tx, &taff, &tw, &typre, stride, false).unwrap();
            conv::backward_weight_bn_relu_f16(&mut rec, &tx, &taff, &tdy, &tdwpre, stride, false).unwrap();
            rec.run().unwrap();
            let (x64, w64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&dy));
            let a = r::batch_norm::prologue(&x64, xd, &to_f64(&aff));
            let y = r::conv::forward(&x64, xd, &w64, wd, stride);
            let dx = r::conv::backward_data(&dy64, &w64, wd, xd, stride);
            let dw = r::conv::backward_weight(&x64, xd, &dy64, wd, stride);
            let ypre = r::conv::forward(&a, xd, &w64, wd, stride);
            let dwpre = r::conv::backward_weight(&a, xd, &dy64, wd, stride);
            let tag = format!("coop {name} x {xd:?} K {k} k {ks} stride {stride}");
            let rd = |t: &HalfTensor| t.read(g).unwrap();
            let f = |t: &Tensor| t.read(g).unwrap();
            check(&format!("fwd {tag}"), &rd(&ty), &y, F16_TOL);
            check(&format!("fwd accumulate {tag}"), &rd(&tyacc), &plus(&py, &y), F16_TOL);
            check(&format!("bwd data {tag}"), &rd(&tdx), &dx, F16_TOL);
            check(&format!("bwd data accumulate {tag}"), &rd(&tdxacc), &plus(&pdx, &dx), F16_TOL);
            // Products of halves are exact in f32 and the sums f32: f32's bound.
            check(&format!("bwd weight {tag}"), &f(&tdw), &dw, F32_TOL);
            check(&format!("bwd weight accumulate {tag}"), &f(&tdwacc), &plus(&pdw, &dw), F32_TOL);
            check(&format!("fwd bn-relu {tag}"), &rd(&typre), &ypre, F16_TOL);
            check(&format!("bwd weight bn-relu {tag}"), &f(&tdwpre), &dwpre, F16_TOL);
        }
    }
    conv::force_tile(g, None).unwrap();
}

/// With `cooperative_matrix` off, a context never uses them, whatever the adapter offers.
#[test]
fn coop_can_be_turned_off() {
    let g = Gpu::with_options(&GpuOptions { cooperative_matrix: false, ..GpuOptions::from_env() }).unwrap();
    assert_eq!(g.report.coop, None);
    assert!(conv::coop_tile_names(&g).is_empty());
}

/// A CPU adapter emulates its cooperative matrices, so its f16 path keeps plain arithmetic on
/// the tiled kernels unless a configuration is forced (on Mesa 26's lavapipe the f16 units ran
/// 1.4x to 1.5x slower on them): the profile's dispatches say which ran.
#[test]
fn cpu_adapters_keep_plain_arithmetic_unless_forced() {
    let g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    if g.report.coop.is_none() || g.report.device_type != wgpu::DeviceType::Cpu {
        eprintln!("skipped: not a CPU adapter with cooperative matrices ({})", g.report.name);
        return;
    }
    // Stride 2 on 9x9: the register path's lanes cannot tile its rows, Winograd takes stride 1.
    let (xd, wd, yd) = ([1, 16, 9, 9], [16, 16, 3, 3], [1, 16, 5, 5]);
    let mut rng = Rng::new(91);
    let x = HalfTensor::from_f32(&g, &xd, &rng.data(xd.iter().product())).unwrap();
    let w = Tensor::new(&g, &wd, &rng.data(wd.iter().product())).unwrap();
    let y = HalfTensor::from_f32(&g, &yd, &vec![f32::NAN; yd.iter().product()]).unwrap();
    let labels = |g: &Gpu| -> Vec<String> {
        resnet_wgpu::profile::set(g, true);
        let mut rec = g.recorder("coop rule");
        conv::forward_f16(&mut rec, &x, &w, &y, 2, false).unwrap();
        rec.run().unwrap();
        resnet_wgpu::profile::set(g, false);
        let spans = resnet_wgpu::profile::take(g).unwrap();
        spans.into_iter().map(|s| s.label.to_string()).filter(|l| l.starts_with("conv ")).collect()
    };
    let plain = labels(&g);
    assert!(!plain.is_empty() && plain.iter().all(|l| !l.contains("coop")), "{plain:?}");
    conv::force_tile(&g, Some(&conv::coop_tile_names(&g)[0])).unwrap();
    let forced = labels(&g);
    assert!(forced.iter().any(|l| l.contains("coop")), "{forced:?}");
}
