//! The f16 network (`ResNet::set_f16`) against the f64 reference, and its casts.
mod common;
use common::*;
use resnet_wgpu::Error;
use resnet_wgpu::arch::{Combine, NetConfig, ShortcutOption, UnitKind};
use resnet_wgpu::net::ResNet;
use resnet_wgpu::ops::cast;
use resnet_wgpu::ops::pool_fc_loss::upload_labels;
use resnet_wgpu::reference::{cast as rcast, net as rnet, to_f64};
use resnet_wgpu::tensor::HalfTensor;

/// Whether the context has shader-f16 (the f16 network's tests are skipped elsewhere).
fn has_f16() -> bool {
    let ok = gpu().report.features.contains(wgpu::Features::SHADER_F16);
    if !ok {
        eprintln!("skipped: no shader-f16 on {}", gpu().report.name);
    }
    ok
}

/// to_half against `half`'s rounding, to_f32 exact (its inputs are halves; the scale a power of
/// two), scale exact; lengths not a multiple of 2 or 4, values across the half's range
/// (subnormals included, after the scale); outputs poisoned first.
#[test]
fn casts_match_the_reference() {
    if !has_f16() {
        return;
    }
    let g = gpu();
    let mut rng = Rng::new(90);
    for (dims, s) in [([1, 1, 1, 1], 1.0), ([1, 3, 5, 7], 1.0), ([2, 5, 3, 3], 1024.0), ([3, 7, 1, 9], 1.0 / 64.0)] {
        let n: usize = dims.iter().product();
        // Magnitudes of x * s from 1e-7 to 1e3: subnormal halves below 6.1e-5.
        let x: Vec<f32> = rng.data(n).iter().map(|&v| v * 10f32.powf(rng.range(-7.0, 3.0) as f32) / s).collect();
        let (tx, th, ty, tt) =
            (upload(&dims, &x), HalfTensor::zeros(g, &dims).unwrap(), poisoned(&dims), upload(&dims, &x));
        // The half tensor poisoned: NaN halves.
        th.write(g, &vec![f32::NAN; n]).unwrap();
        let mut rec = g.recorder("casts");
        cast::to_half(&mut rec, &tx, &th, s).unwrap();
        cast::to_f32(&mut rec, &th, &ty, 1.0 / s).unwrap();
        cast::scale(&mut rec, &tt, s).unwrap();
        rec.run().unwrap();
        let tag = format!("{dims:?} scale {s}");
        let halves = th.read(g).unwrap();
        let want = rcast::to_half(&x, s);
        // WGSL leaves the direction of an inexact f32 -> f16 conversion to the implementation:
        // each half is one of the two nearest to x * s (lavapipe rounds to the nearest, as
        // `half` does), so within 2^-11 = 4.9e-4 relative of it at most.
        for (i, (&h, &v)) in halves.iter().zip(&x).enumerate() {
            let xs = f64::from(v * s);
            let spacing = 2f64.powi(xs.abs().log2().floor().max(-14.0) as i32 - 10);
            assert!((f64::from(h) - xs).abs() < spacing, "to_half {tag} [{i}]: {h} for {xs}");
        }
        check(&format!("to_half {tag}"), &halves, &want, 4.9e-4);
        let back: Vec<f64> = halves.iter().map(|&h| f64::from(h / s)).collect();
        check(&format!("to_f32 {tag}"), &read(&ty), &back, 0.0);
        let scaled: Vec<f64> = x.iter().map(|&v| f64::from(v * s)).collect();
        check(&format!("scale {tag}"), &read(&tt), &scaled, 0.0);
    }
    // Shapes, scales.
    let mut rec = g.recorder("bad casts");
    let (x, h) = (upload(&[1, 2, 3, 4], &rng.data(24)), HalfTensor::zeros(g, &[1, 2, 4, 3]).unwrap());
    assert!(matches!(cast::to_half(&mut rec, &x, &h, 1.0), Err(Error::Shape(_))));
    assert!(matches!(cast::to_f32(&mut rec, &h, &x, 1.0), Err(Error::Shape(_))));
    let h = HalfTensor::zeros(g, &[1, 2, 3, 4]).unwrap();
    for s in [0.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(cast::to_half(&mut rec, &x, &h, s), Err(Error::Invalid(_))), "scale {s}");
        assert!(matches!(cast::to_f32(&mut rec, &h, &x, s), Err(Error::Invalid(_))), "scale {s}");
        assert!(matches!(cast::scale(&mut rec, &x, s), Err(Error::Invalid(_))), "scale {s}");
    }
    rec.run().unwrap();
}

/// `scale_many` on 11 tensors of odd lengths (two dispatches, the second with unused slots):
/// each scaled exactly as `scale` does; a tensor given twice and a bad scale are errors.
#[test]
fn scale_many_scales_each_tensor() {
    if !has_f16() {
        return;
    }
    let g = gpu();
    let mut rng = Rng::new(91);
    let lens = [1usize, 3, 64, 65, 7, 130, 2, 9, 1000, 5, 33];
    let data: Vec<Vec<f32>> = lens.iter().map(|&n| rng.data(n)).collect();
    let ts: Vec<_> = lens.iter().zip(&data).map(|(&n, v)| upload(&[n], v)).collect();
    let mut rec = g.recorder("scale_many");
    cast::scale_many(&mut rec, &ts.iter().collect::<Vec<_>>(), 1.0 / 256.0).unwrap();
    rec.run().unwrap();
    for (i, (t, v)) in ts.iter().zip(&data).enumerate() {
        let want: Vec<f64> = v.iter().map(|&x| f64::from(x / 256.0)).collect();
        check(&format!("scale_many tensor {i} of {}", v.len()), &read(t), &want, 0.0);
    }
    let mut rec = g.recorder("bad scale_many");
    assert!(matches!(cast::scale_many(&mut rec, &[&ts[0], &ts[1], &ts[0]], 2.0), Err(Error::Invalid(_))));
    assert!(matches!(cast::scale_many(&mut rec, &[&ts[0]], f32::NAN), Err(Error::Invalid(_))));
    rec.run().unwrap();
    // Nothing was recorded by the refusals: the tensors are as the first call left them.
    check("scale_many after refusals", &read(&ts[0]), &[f64::from(data[0][0] / 256.0)], 0.0);
}

/// One unit per stage, every shape-changing variant (tests/network.rs's `tiny`, a little wider:
/// the f16 roundings need BNs over more than a handful of values to be measurable).
fn tiny(kind: UnitKind, bottleneck: bool, shortcut: ShortcutOption) -> NetConfig {
    one_unit_per_stage(kind, bottleneck, shortcut, [4, 6, 8], 5)
}

/// The f16 network's bounds on its training pass against the f64 reference (on the same f32
/// weights and images). The stream, what the units keep and the stream's gradients are each
/// rounded to halves (unit roundoff 2^-11 = 4.9e-4) in every unit.
/// - The forward's results (loss, logits, running statistics): 5e-3 relative L2 each (7e-4 at
///   worst measured on lavapipe).
const F16_NET_FORWARD_TOL: f64 = 5e-3;
/// - The gradients, all parameters' and the images' as one vector: 1e-1 relative L2 (4.6e-2 at
///   worst measured on lavapipe, an original bottleneck network; 1e-3 to 2.2e-2 for the basic
///   ones). One tensor at a time they are not comparable this closely: a
///   whole network has thousands of ReLU inputs, some within the f16 error of zero, and where
///   one's mask flips its element's gradient differs by its whole value and, through its BN's
///   backward, every gradient of that channel and below (`tests/f16_units.rs` picks data clear
///   of such ties unit by unit). Tensors of small BN layers moved by up to 0.52 measured.
const F16_NET_GRAD_TOL: f64 = 1e-1;
/// - Each gradient tensor: finite and below 0.9 relative L2: an unwritten, zeroed, unscaled or
///   sign-flipped gradient is 1 or more. The head's (`fc.*`), with no ReLU mask between them
///   and the loss, are held to the forward's 5e-3 (2.0e-3 at worst measured on lavapipe).
const F16_NET_TENSOR_TOL: f64 = 0.9;

/// One training pass on the f16 network against the reference: loss, logits, every running
/// statistic, the image gradient and every parameter gradient; then inference (f32) on the
/// same network, and the f32-only methods refused.
fn compare_f16_pass(cfg: &NetConfig, dims: [usize; 4], seed: u64) {
    let g = gpu();
    let mut rng = Rng::new(seed);
    let state = random_state(cfg, seed);
    let mut net = ResNet::from_state(g, cfg, &state).unwrap();
    net.set_f16(g, Some(1024.0)).unwrap();
    for (_, p) in net.params() {
        p.grad.fill(g, f32::NAN).unwrap();
    }
    let x = rng.data(dims.iter().product());
    let labels: Vec<u32> = (0..dims[0]).map(|_| rng.below(cfg.classes) as u32).collect();
    let images = upload(&dims, &x);
    let tl = upload_labels(g, &labels, cfg.classes).unwrap();
    let loss = net.forward_backward(g, &images, &tl, true).unwrap();
    let half_bytes = net.activation_bytes();
    let lu: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    let want = rnet::train_pass(cfg, &to_ref(&state), &to_f64(&x), dims, &lu);
    let tag = format!("f16 {:?} bottleneck={} {:?} {dims:?}", cfg.kind, cfg.bottleneck, cfg.shortcut);
    check(&format!("{tag} loss"), &[loss], &[want.loss], F16_NET_FORWARD_TOL);
    check(&format!("{tag} logits"), &net.logits(g).unwrap(), &want.logits, F16_NET_FORWARD_TOL);
    // Every running statistic of the reference, found in the network's state by name.
    let state: std::collections::HashMap<String, Vec<f32>> = net.state(g).unwrap().into_iter().collect();
    for (name, w) in &want.buffers {
        let v = state.get(name).unwrap_or_else(|| panic!("{tag}: {name} not in the network's state"));
        check(&format!("{tag} {name}"), v, w, F16_NET_FORWARD_TOL);
    }
    let mut grads = vec![("images".to_string(), net.grad_images(g).unwrap(), &want.grad_images)];
    grads.extend(net.grads(g).unwrap().into_iter().map(|(n, v)| (n.clone(), v, &want.grads[&n])));
    let (mut all_got, mut all_want) = (Vec::new(), Vec::new());
    for (name, got, want) in grads {
        // The head's gradients come from the f32 head on the pooled features: no ReLU mask
        // lies between them and the loss, so they hold the forward's bound.
        let head = name.starts_with("fc.");
        check(&format!("{tag} grad.{name}"), &got, want, if head { F16_NET_FORWARD_TOL } else { F16_NET_TENSOR_TOL });
        all_got.extend(got);
        all_want.extend(want);
    }
    check(&format!("{tag} every gradient"), &all_got, &all_want, F16_NET_GRAD_TOL);
    // The f32-only methods are refused; inference runs in f32 (the reference's eval logits,
    // with the running statistics this pass moved).
    let invalid = |r: Result<(), Error>, what: &str| assert!(matches!(r, Err(Error::Invalid(_))), "{what}: {r:?}");
    invalid(net.streams().map(|_| ()), "streams");
    invalid(net.probe(g, &images, &tl).map(|_| ()), "probe");
    let sgd = resnet_wgpu::net::Sgd::default();
    invalid(net.train_step_checked(g, &images, &tl, sgd).map(|_| ()), "train_step_checked");
    let logits = net.predict(g, &images).unwrap();
    let moved: std::collections::HashMap<String, Vec<f32>> = net.state(g).unwrap().into_iter().collect();
    check(&format!("{tag} eval logits"), &logits, &rnet::eval_logits(cfg, &to_ref(&moved), &to_f64(&x), dims), F32_TOL);
    // The f32 network at the same shape holds more (its activations are f32).
    net.set_f16(g, None).unwrap();
    net.forward_backward(g, &images, &tl, false).unwrap();
    let full_bytes = net.activation_bytes();
    eprintln!("{tag}: activations {half_bytes} bytes on the f16 path, {full_bytes} in f32");
    assert!(half_bytes < full_bytes, "f16 {half_bytes} bytes, f32 {full_bytes}");
}

#[test]
fn f16_networks_match_the_reference() {
    if !has_f16() {
        return;
    }
    let mut seed = 100;
    for kind in [UnitKind::PreAct, UnitKind::Original] {
        for (bottleneck, shortcut) in
            [(false, ShortcutOption::A), (false, ShortcutOption::B), (true, ShortcutOption::B)]
        {
            seed += 1;
            let dims = if seed % 2 == 0 { [6, 3, 17, 19] } else { [8, 3, 16, 16] };
            compare_f16_pass(&tiny(kind, bottleneck, shortcut), dims, seed);
        }
        // Two units per stage: identity units, whose gradient is accumulated in place.
        let deeper = NetConfig { units_per_stage: 2, ..tiny(kind, false, ShortcutOption::B) };
        compare_f16_pass(&deeper, [4, 3, 8, 8], seed + 10);
    }
}

/// What the f16 network refuses: a unit off the f16 path, a loss scale that is not a positive
/// power of two.
#[test]
fn f16_network_refusals() {
    if !has_f16() {
        return;
    }
    let g = gpu();
    let cfg = tiny(UnitKind::PreAct, false, ShortcutOption::B);
    let mut net = ResNet::new(g, &cfg, 1).unwrap();
    // (2^127: its reciprocal, the unscaling factor, is not a normal float.)
    for s in [0.0, -2.0, 1000.0, 0.3, f32::NAN, f32::INFINITY, f32::MIN_POSITIVE / 2.0, 2f32.powi(127)] {
        assert!(matches!(net.set_f16(g, Some(s)), Err(Error::Invalid(_))), "loss scale {s}");
    }
    assert_eq!(net.f16(), None);
    for s in [2f32.powi(126), 2f32.powi(-126)] {
        net.set_f16(g, Some(s)).unwrap_or_else(|e| panic!("loss scale {s}: {e}"));
    }
    net.set_f16(g, Some(0.5)).unwrap();
    assert_eq!(net.f16(), Some(0.5));
    let gated = NetConfig { combine: Combine::ExclusiveGate { bias: -6.0 }, ..cfg };
    let mut net = ResNet::new(g, &gated, 1).unwrap();
    assert!(matches!(net.set_f16(g, Some(1024.0)), Err(Error::Invalid(_))));
    assert_eq!(net.f16(), None);
}

/// The loss scale reaches the units and is taken out again: at 2^10 the gradients match the
/// reference as above; at 2^-30 the head's gradient underflows to zero in the halves, and so
/// do the units' and the stem's.
#[test]
fn f16_network_loss_scale_reaches_the_units() {
    if !has_f16() {
        return;
    }
    let g = gpu();
    let cfg = tiny(UnitKind::Original, false, ShortcutOption::B);
    let dims = [2, 3, 6, 5];
    let mut rng = Rng::new(120);
    let state = random_state(&cfg, 120);
    let x = rng.data(dims.iter().product());
    let labels: Vec<u32> = (0..dims[0]).map(|_| rng.below(cfg.classes) as u32).collect();
    let lu: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    let want = rnet::train_pass(&cfg, &to_ref(&state), &to_f64(&x), dims, &lu);
    let (images, tl) = (upload(&dims, &x), upload_labels(g, &labels, cfg.classes).unwrap());
    let mut net = ResNet::from_state(g, &cfg, &state).unwrap();
    let mut error = |s: f32| {
        net.set_f16(g, Some(s)).unwrap();
        net.forward_backward(g, &images, &tl, false).unwrap();
        let got = net.grads(g).unwrap().into_iter().find(|(n, _)| n == "conv1.weight").unwrap().1;
        resnet_wgpu::reference::rel_l2(&got, &want.grads["conv1.weight"])
    };
    let (scaled, underflowed) = (error(1024.0), error(2f32.powi(-30)));
    eprintln!("stem weight gradient: rel L2 {scaled:.2e} at loss scale 2^10, {underflowed:.2e} at 2^-30");
    assert!(scaled < 5e-2 && underflowed > 0.9, "loss scale 2^10: {scaled:.2e}, 2^-30: {underflowed:.2e}");
}

/// Training on the f16 path: SGD steps on one batch lower the loss as the f32 network's do,
/// step for step (the same weights, data and settings): within 5e-3 of it each step (7e-4 at
/// worst measured on lavapipe), and by over 30% in twelve steps.
#[test]
fn f16_training_follows_the_f32_losses() {
    if !has_f16() {
        return;
    }
    let g = gpu();
    let cfg = NetConfig { widths: [8, 16, 16], ..tiny(UnitKind::PreAct, false, ShortcutOption::A) };
    let dims = [16, 3, 12, 12];
    let mut rng = Rng::new(130);
    let x = rng.data(dims.iter().product());
    let labels: Vec<u32> = (0..dims[0]).map(|_| rng.below(cfg.classes) as u32).collect();
    let (images, tl) = (upload(&dims, &x), upload_labels(g, &labels, cfg.classes).unwrap());
    let sgd = resnet_wgpu::net::Sgd { lr: 0.05, ..Default::default() };
    let losses = |half: Option<f32>| -> Vec<f32> {
        let mut net = ResNet::new(g, &cfg, 131).unwrap();
        net.set_f16(g, half).unwrap();
        (0..12).map(|_| net.train_step(g, &images, &tl, sgd).unwrap()).collect()
    };
    let (full, half) = (losses(None), losses(Some(1024.0)));
    eprintln!("f32 losses {full:?}\nf16 losses {half:?}");
    for (i, (a, b)) in full.iter().zip(&half).enumerate() {
        assert!((a - b).abs() <= 5e-3 * a, "step {i}: f32 loss {a}, f16 {b}");
    }
    assert!(half[11] < 0.7 * half[0], "the f16 network's loss falls: {half:?}");
}
