//! Whole networks on the GPU against the CPU reference: loss, logits, every parameter
//! gradient, the image gradient, the streams and the running statistics of a training pass;
//! inference logits; SGD steps.
mod common;
use common::*;
use resnet_wgpu::arch::{NetConfig, ShortcutOption, UnitKind};
use resnet_wgpu::net::{ResNet, Sgd};
use resnet_wgpu::ops::pool_fc_loss::upload_labels;
use resnet_wgpu::reference::{net as rnet, sgd as rsgd, to_f64};

/// One unit per stage: every shape-changing unit variant, at depth 11 (basic) or 29
/// (bottleneck); identity units are covered by ResNet-20 below and tests/units.rs. Bottleneck
/// stages carry 12, 20, 24 channels. (With 2-channel bottleneck layers one BN bias gradient is a
/// near-cancelling sum whose f32 rounding alone, 4e-7 absolute, is 4.5e-5 of its norm; such
/// layers are checked unit by unit in tests/units.rs.)
fn tiny(kind: UnitKind, bottleneck: bool, shortcut: ShortcutOption) -> NetConfig {
    one_unit_per_stage(kind, bottleneck, shortcut, [3, 5, 6], 5)
}

/// One training pass of `cfg` on random data, GPU against reference, every output compared.
fn compare_pass(cfg: &NetConfig, dims: [usize; 4], seed: u64, tol: f64) {
    compare_pass_on(gpu(), cfg, dims, seed, tol)
}

fn compare_pass_on(g: &resnet_wgpu::Gpu, cfg: &NetConfig, dims: [usize; 4], seed: u64, tol: f64) {
    let mut rng = Rng::new(seed);
    let state = random_state(cfg, seed);
    let params = to_ref(&state);
    let mut net = ResNet::from_state(g, cfg, &state).unwrap();
    for (_, p) in net.params() {
        p.grad.fill(g, f32::NAN).unwrap();
    }
    let x = rng.data(dims.iter().product());
    let labels: Vec<u32> = (0..dims[0]).map(|_| rng.below(cfg.classes) as u32).collect();
    let images = resnet_wgpu::Tensor::new(g, &dims, &x).unwrap();
    let tl = upload_labels(g, &labels, cfg.classes).unwrap();
    let loss = net.forward_backward(g, &images, &tl, true).unwrap();
    let lu: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    let want = rnet::train_pass(cfg, &params, &to_f64(&x), dims, &lu);
    // The gradients' bounds scale with how far rounding the inputs alone moves them.
    let spread =
        rnet::train_pass(cfg, &jiggled_state(cfg, &params, &mut rng), &jiggled(&to_f64(&x), &mut rng), dims, &lu);
    let tag = format!("{:?} bottleneck={} {:?} {dims:?}", cfg.kind, cfg.bottleneck, cfg.shortcut);
    check(&format!("{tag} loss"), &[loss], &[want.loss], tol);
    check(&format!("{tag} logits"), &net.logits(g).unwrap(), &want.logits, tol);
    let (images, got) = (&spread.grad_images, net.grad_images(g).unwrap());
    check_grad_conditioned(&format!("{tag} grad.images"), &got, &want.grad_images, images);
    // Every gradient and stream of the reference's, not only those the network lists.
    let grads = net.grads(g).unwrap();
    assert_eq!(grads.len(), want.grads.len(), "{tag}: gradients");
    for (name, gv) in grads {
        check_grad_conditioned(&format!("{tag} grad.{name}"), &gv, &want.grads[&name], &spread.grads[&name]);
    }
    assert_eq!(net.streams().unwrap().len(), want.streams.len(), "{tag}: streams");
    for (l, s) in net.streams().unwrap().iter().enumerate() {
        check(&format!("{tag} x_{l}"), &s.read(g).unwrap(), &want.streams[l], tol);
    }
    // Every buffer the reference updated, found in the network's state by name.
    let state: std::collections::HashMap<String, Vec<f32>> = net.state(g).unwrap().into_iter().collect();
    for (name, w) in &want.buffers {
        let v = state.get(name).unwrap_or_else(|| panic!("{tag}: {name} not in the network's state"));
        check(&format!("{tag} {name}"), v, w, tol);
    }
}

#[test]
fn tiny_networks_of_every_variant_match_the_reference() {
    let mut seed = 30;
    for kind in [UnitKind::PreAct, UnitKind::Original] {
        for bottleneck in [false, true] {
            for shortcut in [ShortcutOption::A, ShortcutOption::B] {
                seed += 1;
                // Batch 1 with odd sizes, and batch 2 with H != W.
                let dims = if seed % 2 == 0 { [1, 3, 9, 7] } else { [2, 3, 5, 6] };
                compare_pass(&tiny(kind, bottleneck, shortcut), dims, seed, F32_TOL);
            }
        }
    }
}

/// A context on which the convolutions take the kernel family GPUs use (CPU adapters default
/// to another), shared by this binary's tests so that its pipelines are built once.
fn tiled_gpu() -> &'static resnet_wgpu::Gpu {
    static GPU: std::sync::OnceLock<resnet_wgpu::Gpu> = std::sync::OnceLock::new();
    GPU.get_or_init(|| {
        let g = resnet_wgpu::Gpu::new().unwrap();
        resnet_wgpu::ops::conv::set_kernels(&g, resnet_wgpu::ops::conv::Kernels::Tiled);
        g
    })
}

#[test]
fn tiled_conv_kernels_in_whole_networks_match_the_reference() {
    let g = tiled_gpu();
    // In training each convolution followed by a BN takes its statistics in its epilogue here
    // (conv::forward_stats); the bottlenecks have a convolution between two BNs of one unit.
    for (i, kind) in [UnitKind::PreAct, UnitKind::Original].into_iter().enumerate() {
        for shortcut in [ShortcutOption::A, ShortcutOption::B] {
            compare_pass_on(g, &tiny(kind, false, shortcut), [2, 3, 8, 8], 80 + i as u64, F32_TOL);
        }
        compare_pass_on(g, &tiny(kind, true, ShortcutOption::B), [2, 3, 8, 8], 82 + i as u64, F32_TOL);
    }
}

/// Whole networks on the kernels a GPU runs by default where CPU adapters take others: the
/// tiled convolutions with the wide batch-norm kernels, the BN + ReLU prologue as a pass of its
/// own (the tuner's choice for some shapes on a GPU; the other test has it fused), and the
/// passes submitted 4 command buffers at a time.
#[test]
fn gpu_defaults_in_whole_networks_match_the_reference() {
    use resnet_wgpu::ops::{batch_norm, conv};
    let opts = resnet_wgpu::GpuOptions { stream_chunk: Some(4), ..resnet_wgpu::GpuOptions::from_env() };
    let g = resnet_wgpu::Gpu::with_options(&opts).unwrap();
    conv::set_kernels(&g, conv::Kernels::Tiled);
    conv::set_prologue(&g, conv::Prologue::Separate);
    batch_norm::set_kernels(&g, batch_norm::Kernels::Wide);
    for (i, kind) in [UnitKind::PreAct, UnitKind::Original].into_iter().enumerate() {
        // Planes of 60 and 63 elements (and smaller ones deeper), several images a run: a
        // thread's step through a run crosses planes.
        compare_pass_on(&g, &tiny(kind, false, ShortcutOption::A), [3, 3, 6, 10], 92 + i as u64, F32_TOL);
        compare_pass_on(&g, &tiny(kind, true, ShortcutOption::B), [2, 3, 9, 7], 94 + i as u64, F32_TOL);
    }
}

/// Whole networks (forward and backward, every parameter gradient) with Winograd forced for
/// their 3x3 convolutions at stride 1, submitted a command buffer at a time as GPUs stream
/// them.
#[test]
fn winograd_in_whole_networks_matches_the_reference() {
    let opts = resnet_wgpu::GpuOptions { stream_chunk: Some(1), ..resnet_wgpu::GpuOptions::from_env() };
    let g = resnet_wgpu::Gpu::with_options(&opts).unwrap();
    resnet_wgpu::ops::conv::force_winograd(&g, Some("64x64t8x8")).unwrap();
    for (i, kind) in [UnitKind::PreAct, UnitKind::Original].into_iter().enumerate() {
        compare_pass_on(&g, &tiny(kind, false, ShortcutOption::B), [2, 3, 8, 8], 84 + i as u64, F32_TOL);
        compare_pass_on(&g, &tiny(kind, true, ShortcutOption::A), [1, 3, 9, 7], 86 + i as u64, F32_TOL);
    }
}

#[test]
fn passes_submitted_a_command_buffer_at_a_time_match_the_reference() {
    // Each unit's command buffers handed to the device as soon as each is recorded (GPUs submit
    // every 4 by default; CPU adapters a whole pass at once).
    let opts = resnet_wgpu::GpuOptions { stream_chunk: Some(1), ..resnet_wgpu::GpuOptions::from_env() };
    let g = resnet_wgpu::Gpu::with_options(&opts).unwrap();
    compare_pass_on(&g, &tiny(UnitKind::PreAct, false, ShortcutOption::B), [2, 3, 5, 6], 90, F32_TOL);
    compare_pass_on(&g, &tiny(UnitKind::Original, true, ShortcutOption::A), [1, 3, 9, 7], 91, F32_TOL);
}

#[test]
fn resnet20_on_a_batch_of_4_matches_the_reference() {
    for (i, kind) in [UnitKind::PreAct, UnitKind::Original].into_iter().enumerate() {
        let cfg = NetConfig::cifar(20, kind, false, 10).unwrap();
        compare_pass(&cfg, [4, 3, 32, 32], 40 + i as u64, F32_TOL);
    }
}

#[test]
fn inference_logits_match_the_reference() {
    let g = gpu();
    let mut rng = Rng::new(50);
    for kind in [UnitKind::PreAct, UnitKind::Original] {
        let cfg = tiny(kind, false, ShortcutOption::B);
        let state = random_state(&cfg, 51);
        let mut net = ResNet::from_state(g, &cfg, &state).unwrap();
        let dims = [3, 3, 7, 9];
        let x = rng.data(dims.iter().product());
        let logits = net.predict(g, &upload(&dims, &x)).unwrap();
        let want = rnet::eval_logits(&cfg, &to_ref(&state), &to_f64(&x), dims);
        check(&format!("{kind:?} eval logits"), &logits, &want, F32_TOL);
    }
}

#[test]
fn sgd_steps_match_the_reference() {
    sgd_steps_on(gpu(), 60);
}

#[test]
fn sgd_steps_on_the_tiled_kernels_reuse_their_bind_groups_and_match_the_reference() {
    // The kernel family GPUs use: its dispatches bind buffers only, so a step's bind groups are
    // kept for the next (gpu::BindCache); the images and labels are written in place, as the
    // training loop does, so every later step's are the first's, bound to new values.
    let kept = sgd_steps_on(tiled_gpu(), 62);
    assert!(kept[0] > 0);
    assert_eq!(kept[1..], kept[..2], "a later step made bind groups of its own: {kept:?}");
}

/// Three SGD steps of a tiny network on fresh random batches, against the reference step by
/// step and in the state after them; returns the bind groups kept after each step.
fn sgd_steps_on(g: &resnet_wgpu::Gpu, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let cfg = tiny(UnitKind::PreAct, false, ShortcutOption::A);
    let state = random_state(&cfg, seed + 1);
    let mut params = to_ref(&state);
    let mut momentum: std::collections::HashMap<String, Vec<f64>> = std::collections::HashMap::new();
    let mut net = ResNet::from_state(g, &cfg, &state).unwrap();
    let opt = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-3 };
    let dims = [2, 3, 6, 5];
    let images = resnet_wgpu::Tensor::zeros(g, &dims).unwrap();
    let tl = upload_labels(g, &vec![0; dims[0]], cfg.classes).unwrap();
    let mut kept = vec![];
    for step in 0..3 {
        let x = rng.data(dims.iter().product());
        let labels: Vec<u32> = (0..dims[0]).map(|_| rng.below(cfg.classes) as u32).collect();
        images.write(g, &x).unwrap();
        tl.write(g, &labels).unwrap();
        let loss = net.train_step(g, &images, &tl, opt).unwrap();
        kept.push(net.kept_bind_groups());
        let want =
            rnet::train_pass(&cfg, &params, &to_f64(&x), dims, &labels.iter().map(|&l| l as usize).collect::<Vec<_>>());
        check(&format!("step {step} loss"), &[loss], &[want.loss], F32_TOL);
        for (name, gr) in &want.grads {
            let w = params.get_mut(name).unwrap();
            let m = momentum.entry(name.clone()).or_insert_with(|| vec![0.0; w.len()]);
            rsgd::step(w, gr, m, opt.lr as f64, opt.momentum as f64, opt.weight_decay as f64);
        }
        for (name, v) in want.buffers {
            params.insert(name, v);
        }
    }
    for (name, v) in net.state(g).unwrap() {
        check(&format!("after 3 steps: {name}"), &v, &params[&name], F32_TOL);
    }
    kept
}

#[test]
fn entries_follow_the_configurations_names() {
    let g = gpu();
    for kind in [UnitKind::PreAct, UnitKind::Original] {
        for bottleneck in [false, true] {
            let cfg = tiny(kind, bottleneck, ShortcutOption::B);
            let net = ResNet::new(g, &cfg, 0).unwrap();
            let names: Vec<String> = net.entries().into_iter().map(|(n, _)| n).collect();
            let want: Vec<String> = cfg.tensors().into_iter().map(|t| t.name).collect();
            assert_eq!(names, want);
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let g = gpu();
    let cfg = tiny(UnitKind::PreAct, false, ShortcutOption::B);
    let mut net = ResNet::new(g, &cfg, 0).unwrap();
    let labels = upload_labels(g, &[0, 1], cfg.classes).unwrap();
    let wrong_channels = upload(&[2, 4, 5, 5], &[0.5; 200]);
    refused(net.forward_backward(g, &wrong_channels, &labels, false), "channels");
    let three = upload(&[3, 3, 5, 5], &[0.5; 225]);
    refused(net.forward_backward(g, &three, &labels, false), "labels"); // 3 images, 2 labels
    refused(upload_labels(g, &[0, 5], cfg.classes), "not below the"); // label out of range
    let one_pixel = upload(&[1, 3, 1, 1], &[0.5; 3]);
    let one = upload_labels(g, &[0], cfg.classes).unwrap();
    refused(net.forward_backward(g, &one_pixel, &one, false), "1 value per channel"); // BN over one value
    refused(NetConfig::cifar(21, UnitKind::PreAct, false, 10), "not 6n+2");
    assert!(NetConfig::cifar(164, UnitKind::PreAct, true, 10).is_ok());
    let mut missing = random_state(&cfg, 0);
    missing.remove("layer2.0.conv1.weight");
    refused(ResNet::from_state(g, &cfg, &missing).map(drop), "layer2.0.conv1.weight");
}

/// `loss`, `logits`, `grad_images`, `grads` and `streams` read only what the last pass computed: nothing
/// before a pass, nothing a failed pass half wrote, no loss or image gradient after a
/// `predict` on a new batch size (whose buffers are new), no image gradient without
/// `image_grad`. A pass refused for its arguments writes nothing, and leaves them readable.
#[test]
fn results_are_read_only_where_the_last_pass_computed_them() {
    let g = gpu();
    let cfg = tiny(UnitKind::PreAct, false, ShortcutOption::B);
    let mut net = ResNet::new(g, &cfg, 0).unwrap();
    let mut rng = Rng::new(12);
    let images = upload(&[2, 3, 5, 5], &rng.data(150));
    let labels = upload_labels(g, &[0, 3], cfg.classes).unwrap();
    // [loss, logits, grad_images, grads, streams] readable?
    let readable = |net: &ResNet| {
        let invalid = |r: Result<(), resnet_wgpu::Error>| match r {
            Ok(()) => true,
            Err(resnet_wgpu::Error::Invalid(m)) => {
                assert!(m.contains("the last pass was not"), "{m}");
                false
            }
            Err(e) => panic!("expected an invalid-argument error, got {e}"),
        };
        [
            invalid(net.loss(g).map(drop)),
            invalid(net.logits(g).map(drop)),
            invalid(net.grad_images(g).map(drop)),
            invalid(net.grads(g).map(drop)),
            invalid(net.streams().map(drop)),
        ]
    };
    assert_eq!(readable(&net), [false; 5], "before any pass");
    let loss = net.forward_backward(g, &images, &labels, false).unwrap();
    assert_eq!(readable(&net), [true, true, false, true, true], "after forward_backward without image_grad");
    assert_eq!(net.loss(g).unwrap(), loss);
    net.forward_backward(g, &images, &labels, true).unwrap();
    assert_eq!(readable(&net), [true; 5], "after forward_backward with image_grad");
    // Refused for its arguments (3 images, 2 labels) before anything is written.
    let three = upload(&[3, 3, 5, 5], &rng.data(225));
    assert!(net.train_step(g, &three, &labels, Sgd::default()).is_err());
    assert_eq!(readable(&net), [true; 5], "after a refused step");
    let grads = net.grads(g).unwrap();
    let logits = net.predict(g, &three).unwrap();
    assert_eq!(logits.len(), 3 * cfg.classes);
    assert_eq!(readable(&net), [false, true, false, true, true], "after predict on a new batch size");
    assert_eq!(net.grads(g).unwrap(), grads, "predict changed the parameters' gradients");
    net.train_step(g, &images, &labels, Sgd::default()).unwrap();
    assert_eq!(readable(&net), [true, true, false, true, true], "after train_step");
    // A batch whose batch norm would see one value per channel: refused before anything is
    // written too (it once failed part-way, in the recording of the stage that saw it).
    let one_pixel = upload(&[1, 3, 1, 1], &[0.5, -0.25, 1.0]);
    let one = upload_labels(g, &[0], cfg.classes).unwrap();
    assert!(net.train_step(g, &one_pixel, &one, Sgd::default()).is_err());
    assert_eq!(readable(&net), [true, true, false, true, true], "after a refused step");
}

#[test]
fn stride_2_units_on_1x1_maps_keep_their_own_gradient_buffer() {
    // A stride-2 unit on a 1x1 map keeps the shape; its input and output gradients must still
    // be two buffers (once they were one per shape, and the backward refused the unit).
    for (i, kind) in [UnitKind::PreAct, UnitKind::Original].into_iter().enumerate() {
        for shortcut in [ShortcutOption::A, ShortcutOption::B] {
            let cfg = NetConfig { widths: [3, 3, 3], ..tiny(kind, false, shortcut) };
            compare_pass(&cfg, [8, 3, 2, 2], 90 + i as u64, F32_TOL);
        }
    }
}

/// A network, tensor or labels given with a context other than the one that made them is
/// refused by name before anything is written or allocated, and the network still trains on
/// its own context afterwards. (Each wgpu instance numbers its resources from the start, so a
/// buffer handed to another context's device used to be taken for one of that device's own
/// buffers, or to panic inside wgpu.) Below the network, an op recorded on another context's
/// recorder refuses it as well (tests/context.rs: every kind of op, and another instance).
#[test]
fn another_contexts_network_tensors_and_labels_are_refused() {
    use resnet_wgpu::ops::relu;
    use resnet_wgpu::{Error, Gpu, Tensor};
    let g = gpu();
    let other = Gpu::new().unwrap();
    assert_ne!(g.context(), other.context());
    let cfg = NetConfig::cifar(8, UnitKind::PreAct, false, 5).unwrap();
    let mut net = ResNet::new(g, &cfg, 3).unwrap();
    let mut rng = Rng::new(4);
    let dims = [2, 3, 9, 7];
    let x = rng.data(dims.iter().product());
    let (images, labels) = (Tensor::new(g, &dims, &x).unwrap(), upload_labels(g, &[1, 4], 5).unwrap());
    let (images2, labels2) = (Tensor::new(&other, &dims, &x).unwrap(), upload_labels(&other, &[1, 4], 5).unwrap());
    let before = net.state(g).unwrap();

    let refused = |r: resnet_wgpu::Result<()>, what: &str| match r {
        Err(Error::Invalid(m)) => assert!(m.starts_with(what) && m.contains("GPU context"), "{what}: {m}"),
        other => panic!("{what}: expected Error::Invalid, got {other:?}"),
    };
    let sgd = Sgd::default();
    refused(net.train_step(&other, &images, &labels, sgd).map(drop), "the network");
    refused(net.train_step_checked(&other, &images, &labels, sgd).map(drop), "the network");
    refused(net.forward_backward(&other, &images, &labels, true).map(drop), "the network");
    refused(net.predict(&other, &images).map(drop), "the network");
    refused(net.set_f16(&other, None), "the network");
    refused(net.state(&other).map(drop), "tensor");
    refused(net.train_step(g, &images2, &labels, sgd).map(drop), "the images");
    refused(net.train_step(g, &images, &labels2, sgd).map(drop), "the labels");
    refused(net.predict(g, &images2).map(drop), "the images");
    refused(images.read(&other).map(drop), "tensor");
    refused(images.write(&other, &x), "tensor");
    refused(images.fill(&other, 0.0), "tensor");
    refused(labels.write(&other, &[0, 0]), "labels");

    // Nothing reached either device; the weights are as they were, and the network trains.
    other.take_error().unwrap();
    g.take_error().unwrap();
    assert_eq!(net.state(g).unwrap(), before);
    assert!(net.train_step(g, &images, &labels, sgd).unwrap().is_finite());
    assert_eq!(images.read(g).unwrap(), x);

    // An op below the network refuses it too, by name, recording nothing.
    let y = Tensor::zeros(&other, &dims).unwrap();
    let mut rec = other.recorder("relu of another context's tensor");
    refused(relu::forward(&mut rec, &images, &y), "relu forward");
    rec.run().unwrap();
}
