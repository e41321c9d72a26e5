//! The f16 path's pre-activation units (identity shortcut, training forward and backward)
//! against the f64 reference on the same half-rounded input and output gradient: `x_{l+1}`,
//! `dE/dx_l`, every parameter gradient and the running statistics, with the outputs and
//! gradients poisoned first; and the units the f16 path refuses.
mod common;
use common::*;
use resnet_wgpu::Gpu;
use resnet_wgpu::arch::{Combine, NetConfig, Shortcut, ShortcutOption, UnitKind, UnitSpec};
use resnet_wgpu::ops::{batch_norm, conv};
use resnet_wgpu::reference::{net as rnet, to_f64};
use resnet_wgpu::tensor::HalfTensor;
use resnet_wgpu::unit::Unit;

/// The f16 units' stated bound: relative L2 error against the f64 reference on the same half
/// inputs, for every output, gradient and running statistic. The activations, what the unit
/// keeps and the gradients at them are each rounded to f16 once (unit roundoff 4.9e-4), as are
/// the weights in the convolutions' operand; the batch norm's backward subtracts its means
/// from the rounded gradients, which the parameter gradients feel most. Measured on lavapipe:
/// 1.7e-3 at worst (a BN bias gradient), 4e-4 to 9e-4 for the rest.
const F16_UNIT_TOL: f64 = 5e-3;

fn config(kind: UnitKind, bottleneck: bool) -> NetConfig {
    NetConfig {
        kind,
        combine: Combine::Add,
        units_per_stage: 2,
        bottleneck,
        shortcut: ShortcutOption::B,
        widths: if bottleneck { [2, 3, 5] } else { [5, 6, 7] },
        in_channels: 3,
        classes: 3,
    }
}

/// The identity unit of the first stage (`layer1.1`): basic (5 channels) or bottleneck
/// (8 channels around a width of 2).
fn identity_unit(cfg: &NetConfig) -> UnitSpec {
    let spec = cfg.units().into_iter().find(|s| s.name == "layer1.1").expect("layer1.1");
    assert_eq!(spec.shortcut, Shortcut::Identity);
    spec
}

fn half_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&a| half::f16::from_f32(a).to_f32()).collect()
}

/// The smallest |ReLU input| (`z = gamma * xhat + beta`) of the unit's BN + ReLUs that read a
/// convolution's output (layers past the first), in the reference's forward: where one lies
/// within the f16 path's rounding of zero, its mask may flip and that element's gradient
/// differs by its whole value (a tie, not an error).
fn relu_margin(out: &rnet::UnitOut, params: &std::collections::HashMap<String, Vec<f64>>, name: &str) -> f64 {
    let mut margin = f64::INFINITY;
    for (i, (v, d)) in out.saved.layer_in.iter().enumerate().skip(1) {
        let (gamma, beta) =
            (&params[&format!("{name}.bn{}.weight", i + 1)], &params[&format!("{name}.bn{}.bias", i + 1)]);
        let (c, hw) = (d[1], d[2] * d[3]);
        let m = (d[0] * hw) as f64;
        for ch in 0..c {
            let vals: Vec<f64> = (0..d[0]).flat_map(|n| v[(n * c + ch) * hw..][..hw].to_vec()).collect();
            let mean = vals.iter().sum::<f64>() / m;
            let var = vals.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / m;
            let invstd = 1.0 / (var + 1e-5).sqrt();
            for a in vals {
                margin = margin.min((gamma[ch] * (a - mean) * invstd + beta[ch]).abs());
            }
        }
    }
    margin
}

/// The least [`relu_margin`] of a test's data: about five times the f16 rounding of the ReLU
/// inputs (2^-11 relative to values of order 1).
const MARGIN: f64 = 3e-3;

/// One unit's training forward and backward on `g` against the reference, on the first data
/// from `seed` on whose ReLU inputs keep [`MARGIN`] from zero.
fn check_unit(g: &Gpu, ctx: &str, cfg: &NetConfig, xd: [usize; 4], seed: u64) {
    let spec = identity_unit(cfg);
    let state = random_state(cfg, seed);
    let params = to_ref(&state);
    let unit = Unit::from_state(g, &spec, &state).unwrap();
    let kept = unit.allocate_f16(g, xd).unwrap();
    let (x, dy, want) = (seed..seed + 200)
        .find_map(|s| {
            let mut rng = Rng::new(s);
            let x = half_round(&rng.data(xd.iter().product()));
            let dy = half_round(&rng.data(xd.iter().product()));
            let want = rnet::unit_forward(&spec, &params, &to_f64(&x), xd, true);
            (relu_margin(&want, &params, &spec.name) >= MARGIN).then_some((x, dy, want))
        })
        .expect("data with no ReLU input near zero");
    let h = |v: &[f32]| HalfTensor::from_f32(g, &xd, v).unwrap();
    let (tx, tg) = (h(&x), h(&dy));
    let ty = h(&vec![f32::NAN; x.len()]);
    for (_, p) in unit_params(&unit) {
        p.grad.fill(g, f32::NAN);
    }
    let mut rec = g.recorder("f16 unit");
    unit.forward_f16(&mut rec, &tx, &ty, &kept).unwrap();
    unit.backward_f16(&mut rec, &tx, &tg, &kept).unwrap();
    rec.run().unwrap();

    let (want_dx, want_grads) = rnet::unit_backward(&spec, &params, &want.saved, &to_f64(&dy));
    let tag = format!("f16 {ctx} {:?} {} layers {xd:?}", spec.kind, spec.layers.len());
    check(&format!("{tag} x_l+1"), &ty.read(g).unwrap(), &want.out, F16_UNIT_TOL);
    check(&format!("{tag} dE/dx_l"), &tg.read(g).unwrap(), &want_dx, F16_UNIT_TOL);
    for (name, p) in unit_params(&unit) {
        check(&format!("{tag} grad {name}"), &p.grad.read(g).unwrap(), &want_grads[&name], F16_UNIT_TOL);
    }
    for (i, bn) in unit.bns.iter().enumerate() {
        let n = format!("{}.bn{}", spec.name, i + 1);
        for (stat, t) in [("running_mean", &bn.running_mean), ("running_var", &bn.running_var)] {
            let key = format!("{n}.{stat}");
            check(&format!("{tag} {key}"), &t.read(g).unwrap(), &want.buffers[&key], F16_UNIT_TOL);
        }
    }
}

/// Basic and bottleneck units, batch 1 and 2, odd sizes, channels not a multiple of 4; with the
/// context's own kernels, and with a large tile and the wide batch-norm kernels forced (each
/// tile configuration is a module of its own for each of the f16 path's prologue and epilogue
/// combinations; the batch norm's f16 kernels are the scalar or the wide ones).
#[test]
fn f16_preact_units_within_bound() {
    let g = gpu();
    if !g.report.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipped: no shader-f16 on {}", g.report.name);
        return;
    }
    let forced = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    conv::force_tile(&forced, Some("128x64k16t8x4")).unwrap();
    batch_norm::set_kernels(&forced, batch_norm::Kernels::Wide);
    for (ctx, g) in [("auto", g), ("tile 128x64k16t8x4, wide bn", &forced)] {
        for (i, bottleneck) in [false, true].into_iter().enumerate() {
            let cfg = config(UnitKind::PreAct, bottleneck);
            let c = identity_unit(&cfg).c_in;
            check_unit(g, ctx, &cfg, [1, c, 7, 5], 80 + i as u64);
            check_unit(g, ctx, &cfg, [2, c, 9, 11], 90 + i as u64);
        }
    }
}

/// Units other than pre-activation with the identity shortcut are refused, with a typed error
/// and nothing recorded.
#[test]
fn f16_path_refuses_other_units() {
    let g = gpu();
    let original = config(UnitKind::Original, false);
    let spec = identity_unit(&original);
    let unit = Unit::from_state(g, &spec, &random_state(&original, 3)).unwrap();
    assert!(!unit.half_capable());
    let err = unit.allocate_f16(g, [1, spec.c_in, 4, 4]).unwrap_err();
    assert!(matches!(err, resnet_wgpu::Error::Invalid(_)), "{err}");
    let preact = config(UnitKind::PreAct, false);
    let first = preact.units().into_iter().find(|s| s.shortcut == Shortcut::Projection).expect("a projection unit");
    let unit = Unit::from_state(g, &first, &random_state(&preact, 4)).unwrap();
    assert!(!unit.half_capable());
    assert!(matches!(unit.allocate_f16(g, [1, first.c_in, 8, 8]), Err(resnet_wgpu::Error::Invalid(_))));
}
