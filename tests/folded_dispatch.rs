//! Dispatches past the device's limit on workgroups per dimension (65535 on most) fold into a
//! second dimension (`Gpu::groups_for`, `Gpu::fold`): each kernel recovers its flat index from
//! both and skips the workgroups past the end. Only large tensors fold (the element-wise kernels
//! at batch 128 on 64x56x56 activations), never the other tests' small ones, so here a context
//! folds past 2 workgroups (`GpuOptions::max_workgroups`) and every kernel family runs folded on
//! small shapes: units against the reference, and whole networks' training steps (f32 and f16)
//! bit for bit against an unfolded context.
mod common;
use common::*;
use resnet_wgpu::arch::{Combine, NetConfig, ShortcutOption, UnitKind};
use resnet_wgpu::net::{ResNet, Sgd};
use resnet_wgpu::ops::pool_fc_loss::upload_labels;
use resnet_wgpu::ops::{batch_norm as bn, conv, relu, sgd};
use resnet_wgpu::reference::{self as r, to_f64};
use resnet_wgpu::{Gpu, GpuOptions, Tensor};

/// Every dispatch of more than 2 workgroups folds (the kernels that take 4 elements per
/// invocation have 2 to 8 workgroups of 64 at these shapes), most with one past the end.
const FOLD_AT: u32 = 2;

/// A folding context of the calling test's own: the tests set kernel families on their
/// contexts, and run in parallel.
fn folded() -> Gpu {
    let opts = GpuOptions { max_workgroups: Some(FOLD_AT), ..GpuOptions::from_env() };
    Gpu::with_options(&opts).unwrap_or_else(|e| panic!("{e}"))
}

/// The kernel families, set alike on each context given: convolutions (the register path on
/// CPU adapters, tiled, Winograd) and batch norm's four variants.
fn set(gs: &[&Gpu], convs: conv::Kernels, winograd: bool, bns: bn::Kernels) {
    for g in gs {
        conv::set_kernels(g, convs);
        conv::force_winograd(g, Some(if winograd { "64x64t8x8" } else { "off" })).unwrap();
        bn::set_kernels(g, bns);
    }
}

#[test]
fn counts_fold_evenly_within_the_limit() {
    let g = &folded();
    for count in 0..200usize {
        let [x, y] = g.fold(count);
        let (n, cover) = (count.max(1), (x * y) as usize);
        assert!((1..=FOLD_AT).contains(&x), "fold({count}) = [{x}, {y}]");
        assert!(cover >= n && cover - n < y as usize, "fold({count}) = [{x}, {y}]");
    }
    assert_eq!(g.fold(2), [2, 1]);
    assert_eq!(g.fold(3), [2, 2]);
    assert_eq!(g.fold(10), [2, 5]);
    assert_eq!(g.groups_for(64 * 7 - 5), [2, 4, 1]);
    // Unfolded up to the device's limit (at least WebGPU's 65535).
    assert_eq!(gpu().fold(65535), [65535, 1]);
    assert_eq!(gpu().groups_for(64 * 65535), [65535, 1, 1]);
}

/// Units of both kinds (an identity unit at 16x16, where a CPU adapter takes the register path,
/// and the stride-2 projection unit on odd sizes) under each convolution and batch-norm kernel
/// family, folded, against the reference; on the tiled kernels with the wide batch norm (a GPU's
/// defaults) both with the BN + ReLU prologue in the convolutions' loads and as a pass of its
/// own (which the tuner may choose on a GPU).
#[test]
fn folded_units_match_the_reference() {
    let g = &folded();
    let mut rng = Rng::new(7);
    let (fused, separate) = (conv::Prologue::Fused, conv::Prologue::Separate);
    let families = [
        (conv::Kernels::Auto, false, bn::Kernels::Texture, fused),
        (conv::Kernels::Tiled, false, bn::Kernels::Wide, fused),
        (conv::Kernels::Tiled, false, bn::Kernels::Wide, separate),
        (conv::Kernels::Tiled, true, bn::Kernels::Vec4, fused),
        (conv::Kernels::Auto, false, bn::Kernels::Scalar, fused),
    ];
    for (i, (convs, winograd, bns, prologue)) in families.into_iter().enumerate() {
        set(&[g], convs, winograd, bns);
        conv::set_prologue(g, prologue);
        for kind in [UnitKind::PreAct, UnitKind::Original] {
            let cfg = one_unit_per_stage(kind, false, ShortcutOption::B, [4, 6, 8], 3);
            let units = cfg.units();
            let seed = 10 * i as u64;
            check_unit_on(g, &cfg, &units[0], [4, 4, 16, 16], seed, &mut rng);
            check_unit_on(g, &cfg, &units[1], [4, 4, 13, 9], seed + 1, &mut rng);
        }
    }
}

/// A deep layer on a small image, whose data ops split their reduction on the tiled kernels
/// (1x130x3x3 -> 132 channels: the splits' sum folds), the weight gradient's split reduction,
/// and the ops whole networks take only in some variants or on some adapters (ReLU as a pass
/// of its own, BN + ReLU as a pass of its own, a single-tensor SGD step), folded, against the
/// reference; outputs poisoned first.
#[test]
fn folded_split_reductions_and_single_ops_match_the_reference() {
    let g = &folded();
    set(&[g], conv::Kernels::Tiled, false, bn::Kernels::Auto);
    let mut rng = Rng::new(9);
    let (xd, wd, yd) = ([1, 130, 3, 3], [132, 130, 3, 3], [1, 132, 3, 3]);
    let (x, w, dy) = (rng.data(len(&xd)), rng.data(len(&wd)), rng.data(len(&yd)));
    let up = |d: &[usize], v: &[f32]| Tensor::new(g, d, v).unwrap();
    let nan = |d: &[usize]| Tensor::filled(g, d, f32::NAN).unwrap();
    let (tx, tw, tdy) = (up(&xd, &x), up(&wd, &w), up(&yd, &dy));
    let (ty, tdx, tdw) = (nan(&yd), nan(&xd), nan(&wd));
    let mut rec = g.recorder("split convolutions");
    conv::forward(&mut rec, &tx, &tw, &ty, 1, false).unwrap();
    conv::backward_data(&mut rec, &tdy, &tw, &tdx, 1, false).unwrap();
    conv::backward_weight(&mut rec, &tx, &tdy, &tdw, 1, false).unwrap();
    rec.run().unwrap();
    let (x, w, dy) = (to_f64(&x), to_f64(&w), to_f64(&dy));
    let read = |t: &Tensor| t.read(g).unwrap();
    check("folded split forward", &read(&ty), &r::conv::forward(&x, xd, &w, wd, 1), F32_TOL);
    check("folded split backward_data", &read(&tdx), &r::conv::backward_data(&dy, &w, wd, xd, 1), F32_TOL);
    check("folded backward_weight", &read(&tdw), &r::conv::backward_weight(&x, xd, &dy, wd, 1), F32_TOL);

    let d = [2, 5, 10, 10];
    let (x, dy, prior) = (rng.data(len(&d)), rng.data(len(&d)), rng.data(len(&d)));
    let affine = affine_values(&mut rng, 5);
    let (tx, tdy, taff) = (up(&d, &x), up(&d, &dy), up(&[5, 4], &affine));
    let (ty, tdx, tdx_acc, ta) = (nan(&d), nan(&d), up(&d, &prior), nan(&d));
    let mut rec = g.recorder("element-wise");
    relu::forward(&mut rec, &tx, &ty).unwrap();
    relu::backward(&mut rec, &tx, &tdy, &tdx, false).unwrap();
    relu::backward(&mut rec, &tx, &tdy, &tdx_acc, true).unwrap();
    bn::affine_relu(&mut rec, &tx, &taff, &ta).unwrap();
    rec.run().unwrap();
    let (x, dy) = (to_f64(&x), to_f64(&dy));
    let dx = r::relu::backward(&x, &dy);
    let dx_acc: Vec<f64> = dx.iter().zip(&prior).map(|(a, &b)| a + f64::from(b)).collect();
    check("folded relu forward", &read(&ty), &r::relu::forward(&x), 0.0);
    check("folded relu backward", &read(&tdx), &dx, 0.0);
    check("folded relu backward accumulate", &read(&tdx_acc), &dx_acc, F32_TOL);
    check("folded affine_relu", &read(&ta), &r::batch_norm::prologue(&x, d, &to_f64(&affine)), F32_TOL);

    let n = 1000;
    let (w0, grad, m0) = (rng.data(n), rng.data(n), rng.data(n));
    let (tw, tg, tm) = (up(&[n], &w0), up(&[n], &grad), up(&[n], &m0));
    let mut rec = g.recorder("sgd");
    sgd::step(&mut rec, &tw, &tg, &tm, 0.1, 0.9, 1e-3).unwrap();
    rec.run().unwrap();
    let (mut w, mut m) = (to_f64(&w0), to_f64(&m0));
    r::sgd::step(&mut w, &to_f64(&grad), &mut m, 0.1f32 as f64, 0.9f32 as f64, 1e-3f32 as f64);
    check("folded sgd weights", &read(&tw), &w, F32_TOL);
    check("folded sgd momentum", &read(&tm), &m, F32_TOL);
}

fn len(d: &[usize]) -> usize {
    d.iter().product()
}

/// Two SGD steps of a whole network (stem, units, head, loss, the multi-tensor update; f16
/// adds the casts and the loss scale) on context `g`: the losses, then every parameter,
/// running statistic and the image gradient of a third pass, and (f32) the analysis's probes,
/// as bits.
fn steps(g: &Gpu, cfg: &NetConfig, f16: bool, seed: u64) -> Vec<(String, Vec<u32>)> {
    let mut rng = Rng::new(seed);
    let mut net = ResNet::from_state(g, cfg, &random_state(cfg, seed)).unwrap();
    if f16 {
        net.set_f16(g, Some(256.0)).unwrap();
    }
    let dims = [4, 3, 16, 16];
    let opt = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-3 };
    let images = Tensor::new(g, &dims, &rng.data(dims.iter().product())).unwrap();
    let labels: Vec<u32> = (0..dims[0]).map(|_| rng.below(cfg.classes) as u32).collect();
    let labels = upload_labels(g, &labels, cfg.classes).unwrap();
    let mut out = vec![];
    for step in 0..2 {
        let loss = net.train_step(g, &images, &labels, opt).unwrap();
        out.push((format!("loss {step}"), bits(&[loss])));
    }
    net.forward_backward(g, &images, &labels, true).unwrap();
    out.push(("grad.images".into(), bits(&net.grad_images(g).unwrap())));
    out.extend(net.state(g).unwrap().into_iter().map(|(name, v)| (name, bits(&v))));
    if !f16 {
        let p = net.probe(g, &images, &labels).unwrap();
        out.push(("probe norms".into(), bits(&p.norms.concat())));
        let identity: Vec<f32> = p.stage_identity.iter().flatten().copied().collect();
        out.push(("probe identity".into(), bits(&identity)));
    }
    out
}

/// Whole networks' training steps, folded and not, give the same bits: the element-wise,
/// batch-norm, head, update, cast and probe kernels, each convolution family's, and the
/// shortcut variants' gate and mix kernels, with every workgroup count past 2 folded.
#[test]
fn folded_networks_match_the_unfolded_context_bit_for_bit() {
    // Each case's steps on a context: every case on the unfolded one first, then on the folded
    // one. On a GPU the autotuner times its choices, and a split reduction's changes the bits:
    // the folded context opens after the unfolded one has made them and takes them from their
    // tune file (its key does not name the fold).
    let dir = TempDir::new("folded");
    let tune = Some(dir.join("tune.json"));
    let run_all = |g: &Gpu| {
        let mut out = vec![];
        let f16 = g.report.features.contains(wgpu::Features::SHADER_F16);
        let families = [
            (conv::Kernels::Auto, false, bn::Kernels::Auto),
            (conv::Kernels::Tiled, false, bn::Kernels::Wide),
            (conv::Kernels::Tiled, true, bn::Kernels::Auto),
        ];
        for (i, (convs, winograd, bns)) in families.into_iter().enumerate() {
            set(&[g], convs, winograd, bns);
            for (j, kind) in [UnitKind::PreAct, UnitKind::Original].into_iter().enumerate() {
                let shortcut = [ShortcutOption::A, ShortcutOption::B][j];
                let cfg = one_unit_per_stage(kind, false, shortcut, [4, 6, 8], 5);
                for half in [false, true].into_iter().filter(|&h| !h || f16) {
                    let tag = format!("{convs:?} winograd={winograd} {bns:?} {kind:?} f16={half}");
                    out.push((tag, steps(g, &cfg, half, 40 + 2 * i as u64 + j as u64)));
                }
            }
        }
        if !f16 {
            eprintln!("f16 networks skipped: no shader-f16 on {}", g.report.name);
        }
        set(&[g], conv::Kernels::Auto, false, bn::Kernels::Auto);
        let combines =
            [Combine::ExclusiveGate { bias: -1.0 }, Combine::Dropout { rate: 0.3 }, Combine::Scale { h: 0.5, f: 1.0 }];
        for (i, combine) in combines.into_iter().enumerate() {
            let cfg =
                NetConfig { combine, ..one_unit_per_stage(UnitKind::PreAct, false, ShortcutOption::B, [4, 6, 8], 5) };
            out.push((format!("{combine:?}"), steps(g, &cfg, false, 50 + i as u64)));
        }
        out
    };
    let plain = Gpu::with_options(&GpuOptions { tune_file: tune.clone(), ..GpuOptions::from_env() }).unwrap();
    let want = run_all(&plain);
    drop(plain);
    let opts = GpuOptions { max_workgroups: Some(FOLD_AT), tune_file: tune, ..GpuOptions::from_env() };
    let got = run_all(&Gpu::with_options(&opts).unwrap());
    assert_eq!(got.len(), want.len());
    for ((tag, a), (_, b)) in got.iter().zip(&want) {
        assert_eq!(a.len(), b.len(), "{tag}");
        for ((name, got), (_, want)) in a.iter().zip(b) {
            assert!(got.iter().all(|&v| f32::from_bits(v).is_finite()), "{tag} {name}: not finite");
            assert!(got == want, "{tag} {name}: folded differs from unfolded");
        }
    }
}
