//! Property tests of the public entry points: random configurations and inputs, valid and
//! invalid. Valid ones match the reference; invalid ones return `Err`, and nothing panics
//! (proptest fails a case that panics). Few cases each: the suite runs on 2 cores.
mod common;
use common::*;
use proptest::prelude::{Just, ProptestConfig, Strategy, any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest};
use proptest::test_runner::RngSeed;
use resnet_wgpu::arch::{Combine, NetConfig, ShortcutOption, UnitKind};
use resnet_wgpu::net::{ResNet, Sgd};
use resnet_wgpu::ops::batch_norm::{self as bn, BnTensors, Epilogue};
use resnet_wgpu::ops::pool_fc_loss::{self as head, upload_labels};
use resnet_wgpu::ops::{conv, relu, residual, sgd};
use resnet_wgpu::reference::{self as r, net as rnet, to_f64};
use resnet_wgpu::{Tensor, io};

fn cases() -> ProptestConfig {
    // Seeded, as every test here; no failure files: a failing case is printed with its inputs.
    ProptestConfig {
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5eed_0006),
        ..ProptestConfig::with_cases(16)
    }
}

/// Mostly 0 (a valid input), sometimes 1 (a flaw).
fn rarely() -> impl Strategy<Value = usize> {
    prop_oneof![5 => Just(0usize), 1 => Just(1usize)]
}

/// A tensor of `dims` with seeded data, or the error creating it gave.
fn make(dims: &[usize], rng: &mut Rng) -> resnet_wgpu::Result<(Tensor, Vec<f32>)> {
    let data = rng.data(dims.iter().product());
    Tensor::new(gpu(), dims, &data).map(|t| (t, data))
}

/// `dims` with `delta` added to dimension `at` (when `delta > 0`).
fn nudge(mut dims: Vec<usize>, at: usize, delta: usize) -> Vec<usize> {
    if delta > 0 {
        let i = at % dims.len();
        dims[i] += delta;
    }
    dims
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn tensors_validate_their_shapes(dims in prop::collection::vec(0usize..5, 0..6), extra in 0usize..2) {
        let len: usize = dims.iter().product();
        let ok = !dims.is_empty() && dims.len() <= 4 && len > 0 && extra == 0;
        let got = Tensor::new(gpu(), &dims, &vec![1.0; len + extra]);
        prop_assert_eq!(got.is_ok(), ok, "{:?} + {} -> {:?}", dims, extra, got.err());
        prop_assert_eq!(Tensor::zeros(gpu(), &dims).is_ok(), !dims.is_empty() && dims.len() <= 4 && len > 0);
    }

    #[test]
    fn convolutions_match_the_reference_or_refuse(
        n in 1usize..3, c in 1usize..5, h in 1usize..8, w in 1usize..8, k in 1usize..5,
        ks in prop_oneof![3 => Just(3usize), 2 => Just(1usize), 1 => 0usize..6],
        stride in prop_oneof![3 => Just(1usize), 3 => Just(2usize), 1 => 0usize..5],
        wc in rarely(), bad_at in 0usize..4, bad in rarely(), ac in rarely(),
        op in 0usize..5, seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let xd = [n, c, h, w];
        let wd = [k, c + wc, ks, ks];
        let (oh, ow) = (conv::out_size(h, ks, stride), conv::out_size(w, ks, stride));
        let yd = nudge(vec![n, k, oh, ow], bad_at, bad);
        // ops 3 and 4 read ReLU(BN(x)) through the prologue, whose values are [C, 4]
        let valid = matches!(ks, 1 | 3) && matches!(stride, 1 | 2) && wc == 0 && bad == 0 && (op < 3 || ac == 0);
        let (x, wt, y) = (make(&xd, &mut rng), make(&wd, &mut rng), make(&yd, &mut rng));
        let aff = make(&[c + ac, 4], &mut rng);
        let (Ok((tx, vx)), Ok((tw, vw)), Ok((ty, vy)), Ok((ta, va))) = (x, wt, y, aff) else {
            prop_assert!(!valid, "a valid shape failed to allocate");
            return Ok(());
        };
        let mut rec = gpu().recorder("prop conv");
        let got = match op {
            0 => conv::forward(&mut rec, &tx, &tw, &ty, stride, false),
            1 => conv::backward_data(&mut rec, &ty, &tw, &tx, stride, false),
            2 => conv::backward_weight(&mut rec, &tx, &ty, &tw, stride, false),
            3 => conv::forward_bn_relu(&mut rec, &tx, &ta, &tw, &ty, stride, false),
            _ => conv::backward_weight_bn_relu(&mut rec, &tx, &ta, &ty, &tw, stride, false),
        };
        prop_assert_eq!(got.is_ok(), valid, "op {} x {:?} w {:?} y {:?} stride {}: {:?}", op, xd, wd, yd, stride, got.err());
        rec.run().unwrap();
        if valid {
            let (rx, rw, ry) = (to_f64(&vx), to_f64(&vw), to_f64(&vy));
            // (ops 3 and 4 only: the others may take affine values of other channels, unread)
            let ra = if op >= 3 { r::batch_norm::prologue(&rx, xd, &to_f64(&va)) } else { Vec::new() };
            match op {
                0 => check("conv forward", &read(&ty), &r::conv::forward(&rx, xd, &rw, [k, c, ks, ks], stride), F32_TOL),
                1 => check("conv backward_data", &read(&tx), &r::conv::backward_data(&ry, &rw, [k, c, ks, ks], xd, stride), F32_TOL),
                2 => check("conv backward_weight", &read(&tw), &r::conv::backward_weight(&rx, xd, &ry, [k, c, ks, ks], stride), F32_TOL),
                3 => check("conv forward_bn_relu", &read(&ty), &r::conv::forward(&ra, xd, &rw, [k, c, ks, ks], stride), F32_TOL),
                _ => check("conv backward_weight_bn_relu", &read(&tw), &r::conv::backward_weight(&ra, xd, &ry, [k, c, ks, ks], stride), F32_TOL),
            }
        }
    }

    #[test]
    fn batch_norm_matches_the_reference_or_refuses(
        n in 1usize..3, c in 1usize..5, h in 1usize..5, w in 1usize..5,
        pc in rarely(), which in 0usize..4, y_bad in rarely(), relu_ep in any::<bool>(), seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let d = [n, c, h, w];
        let (x, vx) = make(&d, &mut rng).unwrap();
        let (y, _) = make(&nudge(d.to_vec(), 1, y_bad), &mut rng).unwrap();
        // One per-channel tensor (`which`) may have the wrong length.
        let per: Vec<Tensor> = (0..4).map(|i| make(&[c + if i == which { pc } else { 0 }], &mut rng).unwrap().0).collect();
        let (m, s) = (make(&[c], &mut rng).unwrap().0, make(&[c], &mut rng).unwrap().0);
        let (gamma, beta, rm) = (read(&per[0]), read(&per[1]), read(&per[2]));
        let var: Vec<f32> = (0..c).map(|_| rng.range(0.5, 2.0) as f32).collect();
        per[3].write(gpu(), &var).ok();
        let p = BnTensors { gamma: &per[0], beta: &per[1], running_mean: &per[2], running_var: &per[3], affine: None };
        let ep = Epilogue { add: false, relu: relu_ep };
        let valid = pc == 0 && y_bad == 0 && n * h * w > 1;
        let mut rec = gpu().recorder("prop bn");
        let got = bn::forward_train(&mut rec, &x, &y, &p, &m, &s, ep);
        prop_assert_eq!(got.is_ok(), valid, "{:?} {:?}", d, got.err());
        rec.run().unwrap();
        if valid {
            let want = r::batch_norm::forward_train(&to_f64(&vx), d, &to_f64(&gamma), &to_f64(&beta), &to_f64(&rm), &to_f64(&var), None, relu_ep);
            check("bn y", &read(&y), &want.y, F32_TOL);
            check("bn running_mean", &read(&per[2]), &want.running_mean, F32_TOL);
            check("bn running_var", &read(&per[3]), &want.running_var, F32_TOL);
        }
    }

    #[test]
    fn head_ops_match_the_reference_or_refuse(
        n in 1usize..5, c in 1usize..6, k in 1usize..5, bad in rarely(), bad_at in 0usize..3,
        label_over in rarely(), seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let labels: Vec<u32> = (0..n).map(|i| if label_over == 1 && i == n - 1 { k as u32 } else { rng.below(k) as u32 }).collect();
        let tl = upload_labels(gpu(), &labels, k);
        prop_assert_eq!(tl.is_ok(), label_over == 0);
        let (p, vp) = make(&[n, c], &mut rng).unwrap();
        let (w, vw) = make(&nudge(vec![k, c], bad_at, if bad_at < 2 { bad } else { 0 }), &mut rng).unwrap();
        let (b, vb) = make(&[k + if bad_at == 2 { bad } else { 0 }], &mut rng).unwrap();
        let logits = Tensor::filled(gpu(), &[n, k], f32::NAN).unwrap();
        let mut rec = gpu().recorder("prop fc");
        let got = head::fc_forward(&mut rec, &p, &w, &b, &logits);
        prop_assert_eq!(got.is_ok(), bad == 0, "{:?}", got.err());
        rec.run().unwrap();
        if bad == 0 {
            let z = read(&logits);
            check("fc forward", &z, &r::pool_fc_loss::fc_forward(&to_f64(&vp), &to_f64(&vw), &to_f64(&vb), n, c, k), F32_TOL);
            if let Ok(tl) = tl {
                // Poisoned: with one class the loss and its gradient are 0, as zeros would be.
                let (loss, dz) = (Tensor::filled(gpu(), &[1], f32::NAN).unwrap(), Tensor::filled(gpu(), &[n, k], f32::NAN).unwrap());
                let mut rec = gpu().recorder("prop xent");
                head::softmax_xent(&mut rec, &logits, &tl, &loss, &dz).unwrap();
                // Labels of another batch size are refused.
                let other = upload_labels(gpu(), &vec![0; n + 1], k).unwrap();
                prop_assert!(head::softmax_xent(&mut rec, &logits, &other, &loss, &dz).is_err());
                rec.run().unwrap();
                let (wl, wdz) = r::pool_fc_loss::softmax_xent(&to_f64(&z), &labels, k);
                check("loss", &read(&loss), &[wl], F32_TOL);
                check("dlogits", &read(&dz), &wdz, F32_TOL);
            }
        }
        // Pooling of a tensor that does not give [n, c].
        let (x, _) = make(&[n, c + bad, 3, 2], &mut rng).unwrap();
        let mut rec = gpu().recorder("prop pool");
        prop_assert_eq!(head::pool_forward(&mut rec, &x, &p).is_ok(), bad == 0);
        rec.run().unwrap();
    }

    #[test]
    fn element_wise_and_shortcut_ops_refuse_mismatches(
        len in 1usize..50, differ in rarely(), c_in in 1usize..4, c_out in 1usize..6,
        h in 1usize..7, w in 1usize..7, stride in 0usize..4,
        lr_kind in prop_oneof![3 => Just(0usize), 1 => 1usize..4], seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let other = len + differ;
        let (a, va) = make(&[len], &mut rng).unwrap();
        let (b, _) = make(&[other], &mut rng).unwrap();
        let mut rec = gpu().recorder("prop elementwise");
        prop_assert_eq!(relu::forward(&mut rec, &a, &b).is_ok(), len == other);
        prop_assert_eq!(residual::add(&mut rec, &a, &b).is_ok(), len == other);
        let lr = [0.1, -0.1, f32::NAN, f32::INFINITY][lr_kind];
        let (g, m) = (make(&[len], &mut rng).unwrap().0, Tensor::zeros(gpu(), &[other]).unwrap());
        let got = sgd::step(&mut rec, &a, &g, &m, lr, 0.9, 1e-4);
        prop_assert_eq!(got.is_ok(), len == other && lr_kind == 0, "{:?}", got.err());
        prop_assert!(sgd::step(&mut rec, &a, &a, &m, 0.1, 0.9, 0.0).is_err(), "w and g aliased");
        rec.run().unwrap();
        if len == other && lr_kind == 0 {
            let (mut wv, mut mv) = (to_f64(&va), vec![0.0; len]);
            r::sgd::step(&mut wv, &to_f64(&read(&g)), &mut mv, 0.1f32 as f64, 0.9f32 as f64, 1e-4f32 as f64);
            check("sgd", &read(&a), &wv, F32_TOL);
        }

        let xd = [2, c_in, h, w];
        let (x, vx) = make(&xd, &mut rng).unwrap();
        let s = stride.max(1);
        let yd = [2, c_out, h.div_ceil(s), w.div_ceil(s)];
        let y = Tensor::filled(gpu(), &yd, f32::NAN).unwrap();
        let valid = matches!(stride, 1 | 2) && c_out >= c_in;
        let mut rec = gpu().recorder("prop subsample");
        let got = residual::subsample_forward(&mut rec, &x, &y, stride);
        prop_assert_eq!(got.is_ok(), valid, "{:?} -> {:?} s {}: {:?}", xd, yd, stride, got.err());
        rec.run().unwrap();
        if valid {
            check("subsample", &read(&y), &r::residual::subsample_forward(&to_f64(&vx), xd, c_out, stride), F32_TOL);
        }
    }

    #[test]
    fn network_configurations_are_checked(
        depth in 0usize..40, classes in 0usize..4, bottleneck in any::<bool>(), preact in any::<bool>(),
    ) {
        let kind = if preact { UnitKind::PreAct } else { UnitKind::Original };
        let per = if bottleneck { 9 } else { 6 };
        let ok = depth >= per + 2 && (depth - 2) % per == 0 && classes >= 2;
        let got = NetConfig::cifar(depth, kind, bottleneck, classes);
        prop_assert_eq!(got.is_ok(), ok, "depth {} classes {}: {:?}", depth, classes, got.err());
        if let Ok(cfg) = got {
            prop_assert_eq!(cfg.depth(), depth);
        }
    }

    #[test]
    fn small_networks_pass_forward_like_the_reference_or_refuse(
        widths in prop::array::uniform3(1usize..4), shortcut in 0usize..3, kind in 0usize..5, combine in 0usize..6,
        n in 1usize..3, h in 1usize..10, w in 1usize..10, flaw in 0usize..10, seed in any::<u64>(),
    ) {
        // flaw: 0 no units, 1 a zero width, 2 one class, 3 no input channels, 4 images of other
        // channels, 5 a label past the classes; else none.
        let classes = if flaw == 2 { 1 } else { 3 };
        // Every placement, shortcut option and shortcut combination of the paper's variants: the
        // training pass runs (or is refused), its loss and logits are the reference's (the
        // gradients of such networks: tests/network.rs and tests/variants.rs).
        let combine = [
            Combine::Add,
            Combine::Scale { h: 0.5, f: 1.0 },
            Combine::ExclusiveGate { bias: -1.0 },
            Combine::ShortcutGate { bias: 1.0 },
            Combine::Dropout { rate: 0.5 },
            Combine::Add,
        ][combine];
        let cfg = NetConfig {
            kind: UnitKind::ALL[kind],
            combine,
            units_per_stage: usize::from(flaw != 0),
            bottleneck: false,
            shortcut: [ShortcutOption::A, ShortcutOption::B, ShortcutOption::C][shortcut],
            widths: if flaw == 1 { [widths[0], 0, widths[2]] } else { widths },
            in_channels: if flaw == 3 { 0 } else { 2 },
            classes,
        };
        let g = gpu();
        let net = ResNet::new(g, &cfg, seed);
        // Option A cannot narrow the stream.
        let option_a = shortcut == 0;
        let cfg_ok = flaw > 3 && !(option_a && (widths[1] < widths[0] || widths[2] < widths[1]));
        prop_assert_eq!(net.is_ok(), cfg_ok, "{:?}: {:?}", cfg, net.as_ref().err());
        let Ok(mut net) = net else { return Ok(()) };
        let mut rng = Rng::new(seed);
        let dims = [n, if flaw == 4 { 3 } else { 2 }, h, w];
        let x = rng.data(dims.iter().product());
        let images = Tensor::new(g, &dims, &x).unwrap();
        let labels: Vec<u32> =
            (0..n).map(|i| if flaw == 5 && i == 0 { classes as u32 } else { rng.below(classes) as u32 }).collect();
        let Ok(tl) = upload_labels(g, &labels, classes) else {
            prop_assert_eq!(flaw, 5);
            return Ok(());
        };
        let state: std::collections::HashMap<String, Vec<f32>> = net.state(g).unwrap().into_iter().collect();
        let got = net.forward_backward(g, &images, &tl, false);
        // Refused: images of other channels, or a BN layer that sees a single value per
        // channel (batch 1 with 1x1 maps in the last stage).
        let side = |v: usize| v.div_ceil(4);
        let single = n * side(h) * side(w) == 1;
        prop_assert_eq!(got.is_ok(), flaw != 4 && !single, "{:?} {:?}: {:?}", cfg, dims, got.as_ref().err());
        // BN over 2 or 3 values per channel (the last stage of tiny inputs) is ill-conditioned
        // in f32 (xhat of near-equal values is a cancelling difference: up to 2e-4 relative
        // loss error in a scan of such cases): those only need to be finite.
        let well_conditioned = n * side(h) * side(w) >= 4;
        if let Ok(loss) = got {
            prop_assert!(loss.is_finite());
        }
        if let (Ok(loss), true) = (got, well_conditioned) {
            let ul: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
            let want = rnet::train_pass(&cfg, &to_ref(&state), &to_f64(&x), dims, &ul);
            check("loss", &[loss], &[want.loss], F32_TOL);
            check("logits", &net.logits(g).unwrap(), &want.logits, F32_TOL);
            // A step with a bad learning rate is refused.
            let bad_lr = Sgd { lr: f32::NAN, ..Sgd::default() };
            prop_assert!(net.train_step(g, &images, &tl, bad_lr).is_err(), "a NaN learning rate was accepted");
        }
    }

    #[test]
    fn units_of_too_few_layers_are_refused(layers in 0usize..4, preact in any::<bool>()) {
        let cfg = NetConfig { units_per_stage: 1, widths: [2, 2, 2], ..NetConfig::cifar(8, UnitKind::PreAct, false, 3).unwrap() };
        let cfg = NetConfig { kind: if preact { UnitKind::PreAct } else { UnitKind::Original }, ..cfg };
        let state: std::collections::HashMap<String, Vec<f32>> =
            cfg.tensors().into_iter().map(|t| t.name).zip(cfg.initial_values(0)).collect();
        let mut spec = cfg.units()[0].clone();
        let first = spec.layers[0];
        spec.layers.resize(layers, first);
        let unit = resnet_wgpu::unit::Unit::from_state(gpu(), &spec, &state);
        // Layers past the second have no weights in the state: refused too.
        prop_assert_eq!(unit.is_ok(), layers == 2, "{} layers: {:?}", layers, unit.as_ref().err());
    }

    #[test]
    fn malformed_safetensors_are_errors(
        cut in 0usize..2000, flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        garbage in prop::collection::vec(any::<u8>(), 0..64), which in 0usize..3,
    ) {
        let cfg = NetConfig { units_per_stage: 1, widths: [2, 2, 2], classes: 3, ..NetConfig::cifar(8, UnitKind::PreAct, false, 3).unwrap() };
        // A good file's bytes, written once per test binary.
        static GOOD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let mut bytes = GOOD
            .get_or_init(|| {
                let dir = TempDir::new("prop-good");
                let net = ResNet::new(gpu(), &cfg, 1).unwrap();
                io::save_weights(&net, gpu(), &dir.join("good.safetensors")).unwrap();
                std::fs::read(dir.join("good.safetensors")).unwrap()
            })
            .clone();
        let dir = TempDir::new("prop");
        match which {
            0 => bytes.truncate(cut.min(bytes.len().saturating_sub(1))),
            1 => {
                for (at, v) in &flips {
                    let i = at % bytes.len();
                    bytes[i] ^= v | 1;
                }
            }
            _ => bytes = garbage.clone(),
        }
        let path = dir.join(format!("bad-{which}-{cut}-{}.safetensors", flips.len()));
        std::fs::write(&path, &bytes).unwrap();
        // Either an error, or (a flip inside the values only) a network: never a panic.
        let read = io::read(&path);
        let net = io::load_net(gpu(), &cfg, &path);
        if which != 1 {
            prop_assert!(read.is_err() && net.is_err(), "truncated or garbage bytes were accepted");
        }
    }
}
