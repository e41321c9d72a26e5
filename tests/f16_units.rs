//! The f16 path's units (pre-activation and original, every shortcut, training forward and
//! backward) against the f64 reference on the same half-rounded input and
//! output gradient: `x_{l+1}`, `dE/dx_l`, every parameter gradient and the running statistics,
//! with the outputs and gradients poisoned first; and the units the f16 path refuses.
mod common;
use common::*;
use resnet_wgpu::Gpu;
use resnet_wgpu::arch::{Combine, NetConfig, Shortcut, ShortcutOption, UnitKind, UnitSpec};
use resnet_wgpu::ops::{batch_norm, conv};
use resnet_wgpu::reference::{net as rnet, to_f64};
use resnet_wgpu::tensor::HalfTensor;
use resnet_wgpu::unit::{Unit, Workspace};

/// The f16 units' stated bounds: relative L2 error against the f64 reference on the same half
/// inputs. The activations, what the unit keeps and the gradients at them are each rounded to
/// f16 once (unit roundoff 4.9e-4), as are the weights in the convolutions' operand.
/// - Outputs, input gradients, convolution weight gradients and running statistics: 5e-3
///   (2.1e-3 at worst measured on lavapipe over eight seeds, most near 1e-3).
const F16_UNIT_TOL: f64 = 5e-3;
/// - BN weight and bias gradients: 3e-2 (1.2e-2 at worst, same runs). Each is a sum over a
///   channel's N*H*W of rounded terms that largely cancel; the bottleneck's 2-channel BNs, at
///   35 to 90 values per channel, show it most.
const F16_BN_PARAM_TOL: f64 = 3e-2;

fn config(kind: UnitKind, bottleneck: bool, shortcut: ShortcutOption) -> NetConfig {
    NetConfig {
        kind,
        combine: Combine::Add,
        units_per_stage: 2,
        bottleneck,
        shortcut,
        widths: if bottleneck { [2, 3, 5] } else { [5, 6, 7] },
        in_channels: 3,
        classes: 3,
    }
}

/// One unit per shortcut, with its network's configuration: the identity unit `layer1.1` and
/// the projection unit `layer2.0` (option B: stride 2, widening), and option A's subsampling
/// unit `layer2.0`.
fn units(kind: UnitKind, bottleneck: bool) -> Vec<(NetConfig, UnitSpec)> {
    let pick = |cfg: NetConfig, name: &str, shortcut: Shortcut| {
        let spec = cfg.units().into_iter().find(|s| s.name == name).expect("unit exists");
        assert_eq!(spec.shortcut, shortcut, "{name}");
        (cfg, spec)
    };
    let (b, a) = (config(kind, bottleneck, ShortcutOption::B), config(kind, bottleneck, ShortcutOption::A));
    vec![
        pick(b.clone(), "layer1.1", Shortcut::Identity),
        pick(b, "layer2.0", Shortcut::Projection),
        pick(a, "layer2.0", Shortcut::Subsample),
    ]
}

fn half_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&a| half::f16::from_f32(a).to_f32()).collect()
}

/// Whether every ReLU input of the unit, in the reference's forward, keeps its margin from
/// zero, among those whose f16 value differs from the reference's: pre-activation `BN_i(in_i)`
/// for layers past the first (their inputs are convolution outputs), original `BN_i(h_i)`
/// before the last layer ([`BN_MARGIN`]) and the sum `y_l` before `f` ([`SUM_MARGIN`]). Where
/// one lies within the f16 path's error of zero its mask may flip: that element's gradient
/// differs by its whole value, and through the batch norm's means every other element's by
/// that over the channel's count (a tie, not an error).
fn clear_of_ties(spec: &UnitSpec, out: &rnet::UnitOut, params: &std::collections::HashMap<String, Vec<f64>>) -> bool {
    let bn_relu = |i: usize, v: &[f64], d: [usize; 4]| -> f64 {
        let name = &spec.name;
        let (gamma, beta) =
            (&params[&format!("{name}.bn{}.weight", i + 1)], &params[&format!("{name}.bn{}.bias", i + 1)]);
        let (c, hw) = (d[1], d[2] * d[3]);
        let mut margin = f64::INFINITY;
        for ch in 0..c {
            let vals: Vec<f64> = (0..d[0]).flat_map(|n| v[(n * c + ch) * hw..][..hw].to_vec()).collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / vals.len() as f64;
            let invstd = 1.0 / (var + 1e-5).sqrt();
            for a in vals {
                margin = margin.min((gamma[ch] * (a - mean) * invstd + beta[ch]).abs());
            }
        }
        margin
    };
    let s = &out.saved;
    match spec.kind {
        UnitKind::PreAct => s.layer_in.iter().enumerate().skip(1).all(|(i, (v, d))| bn_relu(i, v, *d) >= BN_MARGIN),
        _ => {
            let k = s.conv_out.len();
            let inner = s.conv_out[..k - 1].iter().enumerate().all(|(i, (v, d))| bn_relu(i, v, *d) >= BN_MARGIN);
            inner && s.y.iter().all(|a| a.abs() >= SUM_MARGIN)
        }
    }
}

/// The margin of a BN + ReLU's input: about three times the f16 path's error there (its input
/// rounded to f16, 2^-11 relative, and as much again from the weights' rounding, scaled by the
/// normalisation: about 1e-3 where the input's mean is of the order of its spread).
const BN_MARGIN: f64 = 3e-3;
/// The margin of the original unit's sum `y_l = x_l + BN(h_k)`: its BN's input has passed
/// through every layer's rounding (errors up to 3e-3 measured in a bottleneck).
const SUM_MARGIN: f64 = 1e-2;

/// One unit's training forward and backward on `g` against the reference, on the first data
/// from `seed` on that is [`clear_of_ties`].
fn check_unit(g: &Gpu, ctx: &str, cfg: &NetConfig, spec: &UnitSpec, n: usize, hw: [usize; 2], seed: u64) {
    let state = random_state(cfg, seed);
    let params = to_ref(&state);
    let unit = Unit::from_state(g, spec, &state).unwrap();
    let xd = [n, spec.c_in, hw[0], hw[1]];
    let yd = unit.out_dims(xd);
    let kept = unit.allocate_f16(g, xd, &mut Workspace::default()).unwrap();
    let (x, dy, want) = (seed..seed + 5000)
        .find_map(|s| {
            let mut rng = Rng::new(s);
            let x = half_round(&rng.data(xd.iter().product()));
            let dy = half_round(&rng.data(yd.iter().product()));
            let want = rnet::unit_forward(spec, &params, &to_f64(&x), xd, true);
            clear_of_ties(spec, &want, &params).then_some((x, dy, want))
        })
        .unwrap_or_else(|| panic!("{} {:?} {xd:?}: no data clear of ReLU ties", spec.name, spec.kind));
    let h = |d: &[usize], v: &[f32]| HalfTensor::from_f32(g, d, v).unwrap();
    let (tx, tg_out) = (h(&xd, &x), h(&yd, &dy));
    let ty = h(&yd, &vec![f32::NAN; dy.len()]);
    let identity = spec.shortcut == Shortcut::Identity;
    let tg_in_own = h(&xd, &vec![f32::NAN; x.len()]);
    let tg_in = if identity { &tg_out } else { &tg_in_own };
    for (_, p) in unit_params(&unit) {
        p.grad.fill(g, f32::NAN).unwrap();
    }
    let mut rec = g.recorder("f16 unit");
    unit.forward_f16(&mut rec, &tx, &ty, &kept).unwrap();
    unit.backward_f16(&mut rec, &tx, &ty, &tg_out, tg_in, &kept).unwrap();
    rec.run().unwrap();

    let (want_dx, want_grads) = rnet::unit_backward(spec, &params, &want.saved, &to_f64(&dy));
    let tag =
        format!("f16 {ctx} {:?} {} {:?} {} layers {xd:?}", spec.kind, spec.name, spec.shortcut, spec.layers.len());
    check(&format!("{tag} x_l+1"), &ty.read(g).unwrap(), &want.out, F16_UNIT_TOL);
    check(&format!("{tag} dE/dx_l"), &tg_in.read(g).unwrap(), &want_dx, F16_UNIT_TOL);
    for (name, p) in unit_params(&unit) {
        let bn_param = name.contains(".bn") || name.contains("shortcut.1");
        let tol = if bn_param { F16_BN_PARAM_TOL } else { F16_UNIT_TOL };
        check(&format!("{tag} grad {name}"), &p.grad.read(g).unwrap(), &want_grads[&name], tol);
    }
    let mut bns: Vec<(String, &resnet_wgpu::unit::Bn)> =
        unit.bns.iter().enumerate().map(|(i, b)| (format!("{}.bn{}", spec.name, i + 1), b)).collect();
    bns.extend(unit.proj_bn.as_ref().map(|b| (format!("{}.shortcut.1", spec.name), b)));
    for (n, bn) in bns {
        for (stat, t) in [("running_mean", &bn.running_mean), ("running_var", &bn.running_var)] {
            let key = format!("{n}.{stat}");
            check(&format!("{tag} {key}"), &t.read(g).unwrap(), &want.buffers[&key], F16_UNIT_TOL);
        }
    }
}

/// Pre-activation and original, basic and bottleneck, every shortcut; batch 1 and 2, odd
/// sizes, channels not a multiple of 4, with the context's own kernels. Then the basic identity
/// units again with a large tile and the wide batch-norm kernels forced (each tile
/// configuration is a module of its own for each of the f16 path's prologue and epilogue
/// combinations, which lavapipe takes seconds to compile; tests/batch_norm.rs checks the batch
/// norm's f16 kernels in every variant), and with the BN + ReLU prologues as passes of their
/// own (the autotuner's other choice on a GPU: the activations rounded to f16 before the
/// convolutions), and every unit with Winograd forced for its 3x3 convolutions at stride 1,
/// F(2x2) and F(4x4) (f16 loads and stores, f32 in between; the batch norm's own kernels for
/// the statistics and sums), and every unit on the register path (the CPU adapters' default
/// where the lanes tile the rows: widths 8 and 16 here), forced so that a GPU runs it too.
#[test]
fn f16_units_within_bound() {
    let g = gpu();
    if !g.report.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipped: no shader-f16 on {}", g.report.name);
        return;
    }
    let forced = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    conv::force_tile(&forced, Some("128x64k16t8x4")).unwrap();
    batch_norm::set_kernels(&forced, batch_norm::Kernels::Wide);
    let separate = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    conv::set_prologue(&separate, conv::Prologue::Separate);
    let winograd = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    conv::force_winograd(&winograd, Some("64x64t8x8")).unwrap();
    let winograd_f4 = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    conv::force_winograd(&winograd_f4, Some("f4 64x64t8x8")).unwrap();
    let register = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    conv::set_kernels(&register, conv::Kernels::Register);
    resnet_wgpu::profile::set(&register, true);
    let contexts = [
        ("auto", g),
        ("tile 128x64k16t8x4, wide bn", &forced),
        ("separate prologue", &separate),
        ("winograd", &winograd),
        ("winograd f4", &winograd_f4),
        ("register", &register),
    ];
    for (ctx, g) in contexts {
        let mut seed = 80;
        for kind in [UnitKind::PreAct, UnitKind::Original] {
            for bottleneck in [false, true] {
                for (cfg, spec) in units(kind, bottleneck) {
                    let every = ["auto", "winograd", "winograd f4", "register"].contains(&ctx);
                    let covered = every || (!bottleneck && spec.shortcut == Shortcut::Identity);
                    let sizes = if ctx == "register" { [[7, 8], [4, 16]] } else { [[7, 5], [5, 9]] };
                    if covered {
                        check_unit(g, ctx, &cfg, &spec, 1, sizes[0], seed);
                        check_unit(g, ctx, &cfg, &spec, 2, sizes[1], seed + 1);
                    }
                    seed += 2;
                }
            }
        }
    }
    assert_register_path_ran(&register, "the f16 units");
}

/// Units the f16 path does not take (the paper's other combinations: scaling, gates, dropout)
/// are refused, with a typed error and nothing recorded.
#[test]
fn f16_path_refuses_other_units() {
    let g = gpu();
    for (kind, combine) in [
        (UnitKind::Original, Combine::Scale { h: 0.5, f: 0.5 }),
        (UnitKind::PreAct, Combine::ExclusiveGate { bias: -6.0 }),
        (UnitKind::PreAct, Combine::Dropout { rate: 0.5 }),
    ] {
        let cfg = NetConfig { combine, ..config(kind, false, ShortcutOption::B) };
        let spec = cfg.units().into_iter().find(|s| s.name == "layer1.1").expect("layer1.1");
        let unit = Unit::from_state(g, &spec, &random_state(&cfg, 4)).unwrap();
        assert!(!unit.half_capable());
        let err = unit.allocate_f16(g, [1, spec.c_in, 4, 4], &mut Workspace::default()).unwrap_err();
        assert!(matches!(err, resnet_wgpu::Error::Invalid(_)), "{err}");
    }
}

/// A unit's halves are made by [`Unit::allocate_f16`] for that unit: a pre-activation unit's
/// given to an original one (one tensor fewer) is refused, not indexed past.
#[test]
fn f16_kept_halves_of_another_unit_are_refused() {
    let g = gpu();
    let unit = |kind| {
        let cfg = config(kind, false, ShortcutOption::B);
        let spec = cfg.units().into_iter().find(|s| s.name == "layer1.1").expect("layer1.1");
        (Unit::from_state(g, &spec, &random_state(&cfg, 4)).unwrap(), spec)
    };
    let ((pre, spec), (orig, _)) = (unit(UnitKind::PreAct), unit(UnitKind::Original));
    let xd = [2, spec.c_in, 4, 4];
    let mut ws = Workspace::default();
    let kept = pre.allocate_f16(g, xd, &mut ws).unwrap();
    orig.allocate_f16(g, xd, &mut ws).unwrap();
    let h = |v: f32| HalfTensor::from_f32(g, &xd, &vec![v; xd.iter().product()]).unwrap();
    let (x, y, dy) = (h(0.5), h(f32::NAN), h(0.25));
    let mut rec = g.recorder("f16 kept");
    for r in [orig.forward_f16(&mut rec, &x, &y, &kept), orig.backward_f16(&mut rec, &x, &y, &dy, &dy, &kept)] {
        match r {
            Err(resnet_wgpu::Error::Invalid(m)) => assert!(m.contains("not allocated for this unit"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
