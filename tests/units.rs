//! Each residual unit variant on the GPU, forward and backward, against the reference: the
//! output `x_{l+1}`, the input gradient `dE/dx_l`, every parameter gradient and the running
//! statistics; and a stack of 20 pre-activation units whose stream stays additive.
mod common;
use common::*;
use resnet_wgpu::arch::{Combine, Layer, NetConfig, Shortcut, ShortcutOption, UnitKind, UnitSpec};
use resnet_wgpu::reference::{net as rnet, to_f64};
use resnet_wgpu::unit::{Mode, Unit, Workspace};

/// Every unit variant from small networks: identity, stride-2 with option A and B, and the
/// bottleneck's channel-widening first unit.
fn variants() -> Vec<(NetConfig, UnitSpec)> {
    let mut out = Vec::new();
    for kind in [UnitKind::PreAct, UnitKind::Original] {
        for bottleneck in [false, true] {
            for shortcut in [ShortcutOption::A, ShortcutOption::B] {
                let widths = if bottleneck { [2, 3, 5] } else { [3, 5, 6] };
                let cfg = NetConfig {
                    kind,
                    combine: Combine::Add,
                    units_per_stage: 2,
                    bottleneck,
                    shortcut,
                    widths,
                    in_channels: 3,
                    classes: 3,
                };
                for spec in cfg.units() {
                    // One identity unit per kind/bottleneck is enough; all the shape changers.
                    let keep = spec.shortcut != Shortcut::Identity
                        || (shortcut == ShortcutOption::A && spec.name == "layer1.1");
                    if keep {
                        out.push((cfg.clone(), spec));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn every_unit_variant_matches_the_reference() {
    let mut rng = Rng::new(21);
    let mut seen = std::collections::HashSet::new();
    for (i, (cfg, spec)) in variants().into_iter().enumerate() {
        // Odd sizes, H != W; batch 1 on every other case.
        let n = if i % 2 == 0 { 1 } else { 2 };
        seen.insert((spec.kind, spec.layers.len(), spec.shortcut));
        check_unit(&cfg, &spec, [n, spec.c_in, 7, 5], i as u64, &mut rng);
    }
    // Pre-activation and original, basic and bottleneck, with every shortcut.
    assert_eq!(seen.len(), 12, "variants covered: {seen:?}");
}

/// Every variant again with Winograd forced for its 3x3 convolutions at stride 1 (the
/// autotuner's other choice on a GPU; the fused units' BN statistics and BN backward sums then
/// come from the batch norm's own kernels).
#[test]
fn every_unit_variant_on_winograd() {
    let g = resnet_wgpu::Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::new(23);
    resnet_wgpu::ops::conv::force_winograd(&g, Some("64x64t4x4")).unwrap();
    for (i, (cfg, spec)) in variants().into_iter().enumerate() {
        let n = if i % 2 == 0 { 1 } else { 2 };
        check_unit_on(&g, &cfg, &spec, [n, spec.c_in, 7, 5], i as u64, &mut rng);
    }
}

/// A pre-activation and an original unit of 96 channels (the variants above have at most 6),
/// with their shape-changing successors, on Winograd and on the tiled kernels: each unit's
/// convolutions then sum hundreds of products per output, and their fused BN statistics and sums
/// run over as many channels.
#[test]
fn deep_units_on_winograd_and_the_tiled_kernels() {
    use resnet_wgpu::ops::conv;
    let g = resnet_wgpu::Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::new(31);
    for (family, winograd) in [("winograd", "64x64t8x8"), ("tiled", "off")] {
        conv::force_winograd(&g, Some(winograd)).unwrap();
        conv::set_kernels(&g, conv::Kernels::Tiled);
        for kind in [UnitKind::PreAct, UnitKind::Original] {
            // ResNet-14's units (2 per stage, option B), wider.
            let cfg = NetConfig { widths: [96, 112, 128], ..NetConfig::cifar(14, kind, false, 3).unwrap() };
            for spec in cfg.units().into_iter().filter(|s| ["layer1.1", "layer2.0"].contains(&s.name.as_str())) {
                resnet_wgpu::profile::set(&g, true);
                check_unit_on(&g, &cfg, &spec, [2, spec.c_in, 7, 5], 7, &mut rng);
                resnet_wgpu::profile::set(&g, false);
                // The family named ran (where the adapter can time dispatches).
                let spans = resnet_wgpu::profile::take(&g).unwrap();
                let wino = spans.iter().filter(|s| s.label.starts_with("wino")).count();
                if g.has_timestamps() {
                    assert_eq!(wino > 0, winograd != "off", "{family} {}: {wino} Winograd dispatches", spec.name);
                }
            }
        }
    }
}

/// An inference forward between a training forward and its backward (a validation batch, say)
/// leaves the backward as it was: the prologue values that the backward reads are the training
/// statistics', kept apart from inference's. The inference output is checked too, against the
/// reference with the running statistics the training forward moved.
#[test]
fn an_inference_forward_between_leaves_the_backward_alone() {
    let g = gpu();
    let mut rng = Rng::new(29);
    for (i, (cfg, spec)) in variants().into_iter().enumerate() {
        let xd = [2, spec.c_in, 5, 7];
        let state = random_state(&cfg, 100 + i as u64);
        let params = to_ref(&state);
        let unit = Unit::from_state(g, &spec, &state).unwrap();
        let (mut ws, mut ws_eval) = (Workspace::default(), Workspace::default());
        let kept = unit.allocate(g, xd, &mut ws).unwrap();
        let kept_eval = unit.allocate(g, xd, &mut ws_eval).unwrap();
        let yd = unit.out_dims(xd);
        let (n_in, n_out) = (xd.iter().product(), yd.iter().product());
        let (x, x_eval, dy) = (rng.data(n_in), rng.data(n_in), rng.data(n_out));
        let (tx, tx_eval, tg_out) = (upload(&xd, &x), upload(&xd, &x_eval), upload(&yd, &dy));
        let (ty, ty_eval, tg_in_own) = (poisoned(&yd), poisoned(&yd), poisoned(&xd));
        let tg_in = if spec.shortcut == Shortcut::Identity { &tg_out } else { &tg_in_own };
        for (_, p) in unit_params(&unit) {
            p.grad.fill(g, f32::NAN).unwrap();
        }
        let mut rec = g.recorder("train, eval, backward");
        unit.forward(&mut rec, Mode::Train, &tx, &ty, &kept, &ws).unwrap();
        unit.forward(&mut rec, Mode::Eval, &tx_eval, &ty_eval, &kept_eval, &ws_eval).unwrap();
        unit.backward(&mut rec, &tx, &ty, &tg_out, tg_in, &kept, &ws).unwrap();
        rec.run().unwrap();

        let want = rnet::unit_forward(&spec, &params, &to_f64(&x), xd, true);
        let (want_dx, want_grads) = rnet::unit_backward(&spec, &params, &want.saved, &to_f64(&dy));
        let mut moved = params.clone();
        moved.extend(want.buffers.clone());
        let want_eval = rnet::unit_forward(&spec, &moved, &to_f64(&x_eval), xd, false);
        let tag = format!("{:?} {} {:?}", spec.kind, spec.name, spec.shortcut);
        check(&format!("{tag} x_l+1"), &read(&ty), &want.out, F32_TOL);
        check(&format!("{tag} eval x_l+1"), &read(&ty_eval), &want_eval.out, F32_TOL);
        check(&format!("{tag} dE/dx_l"), &read(tg_in), &want_dx, F32_TOL);
        for (name, p) in unit_params(&unit) {
            check(&format!("{tag} grad {name}"), &read(&p.grad), &want_grads[&name], F32_TOL);
        }
    }
}

#[test]
fn stack_of_20_preact_units_keeps_the_stream_additive() {
    let g = gpu();
    let mut rng = Rng::new(22);
    let (c, xd) = (5, [2, 5, 9, 7]);
    let specs: Vec<UnitSpec> = (0..20)
        .map(|j| UnitSpec {
            name: format!("layer1.{j}"),
            stage: 0,
            kind: UnitKind::PreAct,
            c_in: c,
            c_out: c,
            stride: 1,
            shortcut: Shortcut::Identity,
            combine: Combine::Add,
            layers: vec![Layer { c_in: c, c_out: c, k: 3, stride: 1 }; 2],
        })
        .collect();
    // One stage of 20 identity units: the tensors of a 20-unit stage of a (widths c,c,c) net.
    let cfg = NetConfig {
        kind: UnitKind::PreAct,
        combine: Combine::Add,
        units_per_stage: 20,
        bottleneck: false,
        shortcut: ShortcutOption::B,
        widths: [c, c, c],
        in_channels: 3,
        classes: 3,
    };
    let state = random_state(&cfg, 5);
    let params = to_ref(&state);
    let units: Vec<Unit> = specs.iter().map(|s| Unit::from_state(g, s, &state).unwrap()).collect();
    let mut ws = Workspace::default();
    let kept: Vec<_> = units.iter().map(|u| u.allocate(g, xd, &mut ws).unwrap()).collect();
    let x0 = rng.data(xd.iter().product());
    let gl = rng.data(xd.iter().product());
    let mut streams = vec![upload(&xd, &x0)];
    for _ in &units {
        streams.push(poisoned(&xd));
    }
    let grad = upload(&xd, &gl);

    // Forward and backward: one command buffer per unit, one submission.
    let mut cbs = Vec::new();
    for (l, u) in units.iter().enumerate() {
        let mut rec = g.recorder(&u.spec.name);
        u.forward(&mut rec, Mode::Train, &streams[l], &streams[l + 1], &kept[l], &ws).unwrap();
        cbs.push(rec.finish());
    }
    for (l, u) in units.iter().enumerate().rev() {
        let mut rec = g.recorder(&u.spec.name);
        u.backward(&mut rec, &streams[l], &streams[l + 1], &grad, &grad, &kept[l], &ws).unwrap();
        cbs.push(rec.finish());
    }
    g.submit(cbs).unwrap();

    // The reference: x_L = x_0 + sum_i F(x_i), and dE/dx_0 through every unit's backward.
    let mut x = to_f64(&x0);
    let mut sum_f = vec![0.0; x.len()];
    let mut saved = Vec::new();
    for s in &specs {
        let out = rnet::unit_forward(s, &params, &x, xd, true);
        for (a, f) in sum_f.iter_mut().zip(&out.branch) {
            *a += f;
        }
        x = out.out;
        saved.push(out.saved);
    }
    let additive: Vec<f64> = to_f64(&x0).iter().zip(&sum_f).map(|(a, b)| a + b).collect();
    check("x_L vs x_0 + sum F (reference)", &read(&streams[20]), &additive, F32_TOL);
    let mut g_ref = to_f64(&gl);
    for (s, sv) in specs.iter().zip(&saved).rev() {
        g_ref = rnet::unit_backward(s, &params, sv, &g_ref).0;
    }
    check("dE/dx_0 through 20 units", &read(&grad), &g_ref, F32_TOL);
}

/// Only a fused pre-activation unit in training shares batch statistics with its neighbours
/// (`unit::Chain`): any other unit, or inference, refuses a chain instead of leaving a BN with
/// statistics nobody computed.
#[test]
fn a_chain_is_refused_where_it_cannot_be_honoured() {
    use resnet_wgpu::unit::Chain;
    let g = gpu();
    // variants()'s plain-sum units, and general-path ones: a gate on each kind.
    let gated = variants().into_iter().map(|(cfg, spec)| {
        let cfg = NetConfig { combine: Combine::ExclusiveGate { bias: 0.0 }, ..cfg };
        let spec = cfg.units().into_iter().find(|u| u.name == spec.name).unwrap();
        (cfg, spec)
    });
    let all: Vec<_> = variants().into_iter().chain(gated).collect();
    for (i, (cfg, spec)) in all.into_iter().enumerate().filter(|(_, (_, s))| s.shortcut == Shortcut::Identity) {
        let unit = Unit::from_state(g, &spec, &random_state(&cfg, i as u64)).unwrap();
        // Said from the spec, not from unit.chains(): the fused pre-activation units alone.
        let chains = spec.kind == UnitKind::PreAct && spec.combine == Combine::Add;
        assert_eq!(unit.chains(), chains, "{:?} {:?}", spec.kind, spec.combine);
        let xd = [2, spec.c_in, 4, 4];
        let mut ws = Workspace::default();
        let kept = unit.allocate(g, xd, &mut ws).unwrap();
        let (tx, ty) = (upload(&xd, &Rng::new(5).data(32 * spec.c_in)), poisoned(&unit.out_dims(xd)));
        let chain = Chain { input_stats: true, next_bn: None };
        for mode in [Mode::Train, Mode::Eval] {
            let mut rec = g.recorder("unit chain");
            let r = unit.forward_chained(&mut rec, mode, &tx, &ty, &kept, &ws, chain);
            let honoured = chains && mode == Mode::Train;
            assert_eq!(r.is_ok(), honoured, "{:?} {} {mode:?}: {r:?}", spec.kind, spec.name);
            if !honoured {
                assert!(matches!(r, Err(resnet_wgpu::Error::Invalid(_))), "{r:?}");
            }
        }
    }
}

/// What a unit keeps is made by [`Unit::allocate`] for that unit: one made for another (here:
/// none kept at all) is refused with a typed error, on every path, not indexed past.
#[test]
fn kept_tensors_of_another_unit_are_refused() {
    use resnet_wgpu::unit::Kept;
    let g = gpu();
    for (i, (cfg, spec)) in variants().into_iter().enumerate() {
        let unit = Unit::from_state(g, &spec, &random_state(&cfg, i as u64)).unwrap();
        let xd = [2, spec.c_in, 4, 4];
        let ws = {
            let mut ws = Workspace::default();
            unit.allocate(g, xd, &mut ws).unwrap();
            ws
        };
        let none = Kept { tensors: Vec::new(), general: None };
        let (tx, ty) = (upload(&xd, &Rng::new(5).data(32 * spec.c_in)), poisoned(&unit.out_dims(xd)));
        let tg = poisoned(&unit.out_dims(xd));
        let g_in = poisoned(&xd);
        let g_in = if spec.shortcut == Shortcut::Identity { &tg } else { &g_in };
        let mut rec = g.recorder("unit kept");
        let what = format!("{:?} {}", spec.kind, spec.name);
        let refused = |r: resnet_wgpu::Result<()>, pass: &str| match r {
            Err(resnet_wgpu::Error::Invalid(m)) => {
                assert!(m.contains("not allocated for this unit"), "{what} {pass}: {m}")
            }
            other => panic!("{what} {pass}: {other:?}"),
        };
        refused(unit.forward(&mut rec, Mode::Train, &tx, &ty, &none, &ws), "forward");
        refused(unit.backward(&mut rec, &tx, &ty, &tg, g_in, &none, &ws), "backward");
        refused(unit.branch(&mut rec, &none, &ty), "branch");
    }
}

/// On the general path too, the kept tensors of another unit are refused by name, not indexed
/// past or read as this unit's: those of a unit with the same layer shapes but other BNs (a
/// conv output kept or not), and those of a unit with more layers. A forward's output may not
/// be its input, on either path (the backward reads x_l again).
#[test]
fn general_kept_of_another_unit_and_an_aliased_output_are_refused() {
    let g = gpu();
    let unit_of = |kind: UnitKind, combine: Combine, bottleneck: bool| {
        let (units_per_stage, widths, in_channels, classes) = (2, [3, 5, 6], 3, 3);
        let shortcut = ShortcutOption::A;
        let cfg = NetConfig { kind, combine, units_per_stage, bottleneck, shortcut, widths, in_channels, classes };
        let spec = cfg.units().into_iter().find(|s| s.name == "layer1.1").unwrap();
        Unit::from_state(g, &spec, &random_state(&cfg, 1)).unwrap()
    };
    let scale = Combine::Scale { h: 0.5, f: 0.5 };
    let preact = unit_of(UnitKind::PreAct, scale, false);
    let others = [
        (unit_of(UnitKind::ReluBeforeAdd, scale, false), "other BNs"),
        (unit_of(UnitKind::PreAct, scale, true), "more layers"),
    ];
    let xd = [2, 3, 4, 4];
    let mut ws = Workspace::default();
    let kept = preact.allocate(g, xd, &mut ws).unwrap();
    let (x, y, gy) = (upload(&xd, &Rng::new(6).data(96)), poisoned(&xd), poisoned(&xd));
    let mut rec = g.recorder("general kept");
    for (unit, what) in &others {
        assert!(!unit.fused(), "{what}");
        let refuses = |r: resnet_wgpu::Result<()>| refused(r, "not allocated for this unit");
        refuses(unit.forward(&mut rec, Mode::Train, &x, &y, &kept, &ws));
        refuses(unit.backward(&mut rec, &x, &y, &gy, &gy, &kept, &ws));
        refuses(unit.branch(&mut rec, &kept, &y));
    }
    refused(preact.forward(&mut rec, Mode::Train, &x, &x, &kept, &ws), "y must be a tensor of its own");
    let fused = unit_of(UnitKind::Original, Combine::Add, false);
    let fused_kept = fused.allocate(g, xd, &mut ws).unwrap();
    refused(fused.forward(&mut rec, Mode::Train, &x, &x, &fused_kept, &ws), "y must be a tensor of its own");
    refused(fused.forward(&mut rec, Mode::Eval, &x, &poisoned(&[2, 3, 4, 5]), &fused_kept, &ws), "of shape");
    // Nothing was recorded for the refusals; the unit's own tensors still run.
    preact.forward(&mut rec, Mode::Train, &x, &y, &kept, &ws).unwrap();
    rec.run().unwrap();
    assert!(y.read(g).unwrap().iter().all(|v| v.is_finite()));
}
