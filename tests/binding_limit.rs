//! Tensors larger than one storage binding: a context whose binding limit is forced down to
//! 2 KiB runs every op by chunks (of images, or of the flat range) and must match the
//! reference as the whole-tensor path does; so must a unit and whole networks. One image that
//! cannot fit, or a weight tensor past the limit, is a typed error naming the sizes.
mod common;
use common::*;
use resnet_wgpu::arch::{Combine, NetConfig, Shortcut, ShortcutOption, UnitKind};
use resnet_wgpu::net::{ResNet, Sgd};
use resnet_wgpu::ops::batch_norm::{self as bn, BnTensors, Epilogue};
use resnet_wgpu::ops::pool_fc_loss::{self as head, upload_labels};
use resnet_wgpu::ops::{conv, probe, relu, residual, sgd};
use resnet_wgpu::reference::{self as r, net as rnet, to_f64};
use resnet_wgpu::unit::{Mode, Unit, Workspace};
use resnet_wgpu::{Error, Gpu, GpuOptions, Tensor};
use std::sync::OnceLock;

/// The forced limit: a few images of the test shapes do not fit, one always does.
const LIMIT: u64 = 2048;

fn limited(kernels: conv::Kernels) -> Gpu {
    let opts = GpuOptions { max_binding_bytes: Some(LIMIT), ..GpuOptions::from_env() };
    let g = Gpu::with_options(&opts).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g.max_binding_bytes, LIMIT);
    conv::set_kernels(&g, kernels);
    g
}

/// The limited context (convolutions as the adapter chooses: the register path on a CPU
/// adapter where the shape allows).
fn small() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| limited(conv::Kernels::Auto))
}

/// The limited context with the tiled convolution kernels forced; on a GPU also one with the
/// register path forced.
fn contexts() -> Vec<(&'static str, &'static Gpu)> {
    static TILED: OnceLock<Gpu> = OnceLock::new();
    static REGISTER: OnceLock<Option<Gpu>> = OnceLock::new();
    let mut v = vec![("auto", small()), ("tiled", TILED.get_or_init(|| limited(conv::Kernels::Tiled)))];
    let reg = REGISTER.get_or_init(|| {
        (small().report.device_type != wgpu::DeviceType::Cpu).then(|| limited(conv::Kernels::Register))
    });
    v.extend(reg.as_ref().map(|g| ("register", g)));
    v
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

fn plus(prior: &[f32], v: &[f64]) -> Vec<f64> {
    prior.iter().zip(v).map(|(&a, &b)| a as f64 + b).collect()
}

fn len(d: &[usize]) -> usize {
    d.iter().product()
}

/// Records with `f` and runs it.
fn run(g: &Gpu, f: impl FnOnce(&mut resnet_wgpu::gpu::Recorder) -> resnet_wgpu::Result<()>) {
    let mut rec = g.recorder("test");
    f(&mut rec).unwrap();
    rec.run().unwrap();
}

/// Past the limit, so that the split path runs.
fn big(t: &Tensor) -> &Tensor {
    assert!(t.bytes() > LIMIT, "{:?} is {} bytes, within the {LIMIT}-byte limit", t.dims(), t.bytes());
    t
}

/// Past the limit, or a batch norm's partials over it are (two floats per run of 16 elements
/// of a plane: at 1x1 maps twice the tensor), so that batch norm's split path runs.
fn past(t: &Tensor) -> &Tensor {
    let d = t.dims();
    let partials = (2 * d[0] * d[1] * (d[2] * d[3]).div_ceil(16) * 4) as u64;
    assert!(t.bytes().max(partials) > LIMIT, "{d:?} and its partials are within the {LIMIT}-byte limit");
    t
}

/// Split-K partial sums are bound whole, so their splits stay within the binding limit: at
/// 64 KiB, by chunks of 2 images, the tiled rule would split backward_weight's reduction 2 ways
/// (72 KiB of partials); it runs whole and matches the reference, as do the data ops.
#[test]
fn split_k_partials_stay_within_the_limit() {
    const WIDE: u64 = 64 << 10;
    let opts = GpuOptions { max_binding_bytes: Some(WIDE), ..GpuOptions::from_env() };
    let g = &Gpu::with_options(&opts).unwrap_or_else(|e| panic!("{e}"));
    conv::set_kernels(g, conv::Kernels::Tiled);
    let (xd, wd) = ([3, 32, 16, 16], [32, 32, 3, 3]);
    let mut rng = Rng::new(5);
    let (x, w, dy) = (rng.data(len(&xd)), rng.data(len(&wd)), rng.data(len(&xd)));
    let (rx, rw, rdy) = (to_f64(&x), to_f64(&w), to_f64(&dy));
    let (tx, tw, tdy) = (up(g, &xd, &x), up(g, &wd, &w), up(g, &xd, &dy));
    assert!(tx.bytes() > WIDE && tw.bytes() <= WIDE);
    let ty = nan(g, &xd);
    run(g, |rec| conv::forward(rec, &tx, &tw, &ty, 1, false));
    check("forward", &fetch(g, &ty), &r::conv::forward(&rx, xd, &rw, wd, 1), F32_TOL);
    let tdx = nan(g, &xd);
    run(g, |rec| conv::backward_data(rec, &tdy, &tw, &tdx, 1, false));
    check("backward_data", &fetch(g, &tdx), &r::conv::backward_data(&rdy, &rw, wd, xd, 1), F32_TOL);
    let tdw = nan(g, &wd);
    run(g, |rec| conv::backward_weight(rec, &tx, &tdy, &tdw, 1, false));
    check("backward_weight", &fetch(g, &tdw), &r::conv::backward_weight(&rx, xd, &rdy, wd, 1), F32_TOL);
}

/// The register path and the tiled kernels, each op run by chunks of images. (Winograd binds its
/// transformed operands whole, so under this limit it never applies: `winograd::fitting`.)
#[test]
fn convolutions_split_by_images() {
    // (x dims, K, kernel, stride): row widths 8 (the register path's quads) and odd sizes (the
    // tiled kernels); 1 or 2 images per chunk, the last chunk shorter; one image exactly at the
    // limit.
    let cases = [
        ([3, 4, 8, 8], 4, 3, 1),
        ([3, 4, 8, 8], 8, 3, 2),
        ([3, 8, 8, 8], 4, 1, 2),
        ([5, 3, 7, 5], 5, 3, 2),
        ([3, 5, 9, 8], 3, 1, 1),
    ];
    for (name, g) in contexts() {
        let mut rng = Rng::new(1);
        for (i, &(xd, k, ks, stride)) in cases.iter().enumerate() {
            let wd = [k, xd[1], ks, ks];
            let yd = [xd[0], k, conv::out_size(xd[2], ks, stride), conv::out_size(xd[3], ks, stride)];
            let tag = format!("{name} x {xd:?} K {k} k {ks} s {stride}");
            let (x, w, dy) = (rng.data(len(&xd)), rng.data(len(&wd)), rng.data(len(&yd)));
            let (rx, rw, rdy) = (to_f64(&x), to_f64(&w), to_f64(&dy));
            let (tx, tw, tdy) = (up(g, &xd, &x), up(g, &wd, &w), up(g, &yd, &dy));
            let acc = i % 2 == 1;

            // forward, overwriting (poisoned) or adding into a prior y
            let prior_y = rng.data(len(&yd));
            let ty = if acc { up(g, &yd, &prior_y) } else { nan(g, &yd) };
            run(g, |rec| conv::forward(rec, big(&tx), &tw, &ty, stride, acc));
            let want = r::conv::forward(&rx, xd, &rw, wd, stride);
            let want = if acc { plus(&prior_y, &want) } else { want };
            check(&format!("{tag} forward acc={acc}"), &fetch(g, &ty), &want, F32_TOL);

            // backward_data, the other flag
            let prior_dx = rng.data(len(&xd));
            let tdx = if !acc { up(g, &xd, &prior_dx) } else { nan(g, &xd) };
            run(g, |rec| conv::backward_data(rec, &tdy, &tw, big(&tdx), stride, !acc));
            let want = r::conv::backward_data(&rdy, &rw, wd, xd, stride);
            let want = if !acc { plus(&prior_dx, &want) } else { want };
            check(&format!("{tag} backward_data acc={}", !acc), &fetch(g, &tdx), &want, F32_TOL);

            // backward_weight: a sum over the chunks, overwriting or adding
            for acc in [false, true] {
                let prior_dw = rng.data(len(&wd));
                let tdw = if acc { up(g, &wd, &prior_dw) } else { nan(g, &wd) };
                run(g, |rec| conv::backward_weight(rec, big(&tx), &tdy, &tdw, stride, acc));
                let want = r::conv::backward_weight(&rx, xd, &rdy, wd, stride);
                let want = if acc { plus(&prior_dw, &want) } else { want };
                check(&format!("{tag} backward_weight acc={acc}"), &fetch(g, &tdw), &want, F32_TOL);
            }

            // the same two through the BN + ReLU prologue (one affine for every chunk)
            let aff = affine_values(&mut rng, xd[1]);
            let taff = up(g, &[xd[1], 4], &aff);
            let ra = r::batch_norm::prologue(&rx, xd, &to_f64(&aff));
            let ty = nan(g, &yd);
            run(g, |rec| conv::forward_bn_relu(rec, big(&tx), &taff, &tw, &ty, stride, false));
            check(
                &format!("{tag} forward_bn_relu"),
                &fetch(g, &ty),
                &r::conv::forward(&ra, xd, &rw, wd, stride),
                F32_TOL,
            );
            let tdw = nan(g, &wd);
            run(g, |rec| conv::backward_weight_bn_relu(rec, big(&tx), &taff, &tdy, &tdw, stride, false));
            let want = r::conv::backward_weight(&ra, xd, &rdy, wd, stride);
            check(&format!("{tag} backward_weight_bn_relu"), &fetch(g, &tdw), &want, F32_TOL);
        }
    }
}

/// On the limited context with the adapter's batch-norm kernels, and on one with the wide
/// kernels (the GPUs' default) forced.
#[test]
fn batch_norm_splits_with_batch_statistics() {
    let wide = limited(conv::Kernels::Auto);
    bn::set_kernels(&wide, bn::Kernels::Wide);
    for (label, g) in [("", small()), ("wide ", &wide)] {
        batch_norm_splits(g, label);
    }
}

fn batch_norm_splits(g: &Gpu, label: &str) {
    let mut rng = Rng::new(2);
    // 720 and 140 bytes an image: chunks of 2 of 3 images, and 14 of 15 (one image of 1 x 5 x 7).
    // At 1x1 the tensors fit whole (1200 bytes) and the reductions' partials do not (2400).
    for (case, d) in [[3usize, 5, 6, 6], [15, 5, 1, 7], [6, 50, 1, 1]].into_iter().enumerate() {
        let c = d[1];
        let x: Vec<f32> = rng.data(len(&d)).iter().map(|v| 2.0 * v + 0.7).collect();
        let (gamma, beta) = (rng.data(c), rng.data(c));
        let (rmean, rvar): (Vec<f32>, Vec<f32>) = (rng.data(c), (0..c).map(|_| rng.range(0.5, 2.0) as f32).collect());
        let (rx, rg, rb) = (to_f64(&x), to_f64(&gamma), to_f64(&beta));
        let tx = up(g, &d, &x);
        let (tg, tb) = (up(g, &[c], &gamma), up(g, &[c], &beta));
        for ep in [Epilogue { add: false, relu: true }, Epilogue { add: true, relu: true }] {
            let tag = format!("{label}bn {d:?} {ep:?}");
            let (trm, trv) = (up(g, &[c], &rmean), up(g, &[c], &rvar));
            let (tm, ti) = (nan(g, &[c]), nan(g, &[c]));
            let prior = rng.data(len(&d));
            let ty = if ep.add { up(g, &d, &prior) } else { nan(g, &d) };
            let p = BnTensors { gamma: &tg, beta: &tb, running_mean: &trm, running_var: &trv, affine: None };
            run(g, |rec| bn::forward_train(rec, past(&tx), &ty, &p, &tm, &ti, ep));
            let rp = to_f64(&prior);
            let want = r::batch_norm::forward_train(
                &rx,
                d,
                &rg,
                &rb,
                &to_f64(&rmean),
                &to_f64(&rvar),
                ep.add.then_some(&rp[..]),
                ep.relu,
            );
            check(&format!("{tag} train y"), &fetch(g, &ty), &want.y, F32_TOL);
            check(&format!("{tag} mean"), &fetch(g, &tm), &want.mean, F32_TOL);
            check(&format!("{tag} invstd"), &fetch(g, &ti), &want.invstd, F32_TOL);
            check(&format!("{tag} running_mean"), &fetch(g, &trm), &want.running_mean, F32_TOL);
            check(&format!("{tag} running_var"), &fetch(g, &trv), &want.running_var, F32_TOL);

            // the statistics alone (stats_train), from the same running statistics
            let (trm2, trv2) = (up(g, &[c], &rmean), up(g, &[c], &rvar));
            let (tm2, ti2, ta2) = (nan(g, &[c]), nan(g, &[c]), nan(g, &[c, 4]));
            let p2 = BnTensors { gamma: &tg, beta: &tb, running_mean: &trm2, running_var: &trv2, affine: Some(&ta2) };
            run(g, |rec| bn::stats_train(rec, past(&tx), &p2, &tm2, &ti2));
            check(&format!("{tag} stats_train mean"), &fetch(g, &tm2), &want.mean, F32_TOL);
            let want_aff = r::batch_norm::affine(&want.mean, &want.invstd, &rg, &rb);
            check(&format!("{tag} stats_train affine"), &fetch(g, &ta2), &want_aff, F32_TOL);
            check(&format!("{tag} stats_train invstd"), &fetch(g, &ti2), &want.invstd, F32_TOL);
            check(&format!("{tag} stats_train running_var"), &fetch(g, &trv2), &want.running_var, F32_TOL);

            // the prologue as a pass of its own, from those values
            let ta = nan(g, &d);
            run(g, |rec| bn::affine_relu(rec, &tx, &ta2, &ta));
            let want_a = r::batch_norm::prologue(&rx, d, &to_f64(&fetch(g, &ta2)));
            check(&format!("{tag} affine_relu"), &fetch(g, &ta), &want_a, F32_TOL);

            // apply_saved with the saved statistics: the training y again
            let ty2 = if ep.add { up(g, &d, &prior) } else { nan(g, &d) };
            run(g, |rec| bn::apply_saved(rec, &tx, &ty2, &tg, &tb, &tm, &ti, ep));
            check(&format!("{tag} apply_saved"), &fetch(g, &ty2), &want.y, F32_TOL);

            // eval with the running statistics (as the training forward left them)
            let te = if ep.add { up(g, &d, &prior) } else { nan(g, &d) };
            run(g, |rec| bn::forward_eval(rec, &tx, &te, &p, ep));
            let want_e = r::batch_norm::forward_eval(
                &rx,
                d,
                &rg,
                &rb,
                &to_f64(&fetch(g, &trm)),
                &to_f64(&fetch(g, &trv)),
                ep.add.then_some(&rp[..]),
                ep.relu,
            );
            check(&format!("{tag} eval"), &fetch(g, &te), &want_e, F32_TOL);

            // backward (after the relu-only forward's statistics), both accumulation flags
            if !ep.add {
                for (acc_dx, acc_p) in [(false, false), (true, true)] {
                    let dy = rng.data(len(&d));
                    let (pdx, pg, pb) = (rng.data(len(&d)), rng.data(c), rng.data(c));
                    let tdx = if acc_dx { up(g, &d, &pdx) } else { nan(g, &d) };
                    let (tdg, tdb) =
                        if acc_p { (up(g, &[c], &pg), up(g, &[c], &pb)) } else { (nan(g, &[c]), nan(g, &[c])) };
                    let scratch = nan(g, &[2 * c]);
                    let tdy = up(g, &d, &dy);
                    run(g, |rec| {
                        bn::backward(
                            rec,
                            past(&tx),
                            &tdy,
                            &tg,
                            &tb,
                            &tm,
                            &ti,
                            true,
                            &tdx,
                            &tdg,
                            &tdb,
                            &scratch,
                            acc_dx,
                            acc_p,
                        )
                    });
                    let (wdx, wdg, wdb) = r::batch_norm::backward(&rx, d, &to_f64(&dy), &rg, &rb, true);
                    let pick = |acc: bool, prior: &[f32], v: Vec<f64>| if acc { plus(prior, &v) } else { v };
                    check(&format!("{tag} {case} dx acc={acc_dx}"), &fetch(g, &tdx), &pick(acc_dx, &pdx, wdx), F32_TOL);
                    check(&format!("{tag} dgamma acc={acc_p}"), &fetch(g, &tdg), &pick(acc_p, &pg, wdg), F32_TOL);
                    check(&format!("{tag} dbeta acc={acc_p}"), &fetch(g, &tdb), &pick(acc_p, &pb, wdb), F32_TOL);
                }
            }
        }
    }
}

#[test]
fn element_wise_ops_split_by_ranges() {
    let g = small();
    let mut rng = Rng::new(3);
    let n = 1300; // 5200 bytes: chunks of 512 elements, the last of 276
    let (x, dy, prior) = (rng.data(n), rng.data(n), rng.data(n));
    let (rx, rdy) = (to_f64(&x), to_f64(&dy));
    let (tx, tdy) = (up(g, &[n], &x), up(g, &[n], &dy));

    let ty = nan(g, &[n]);
    run(g, |rec| relu::forward(rec, big(&tx), &ty));
    check("relu forward", &fetch(g, &ty), &r::relu::forward(&rx), F32_TOL);
    for acc in [false, true] {
        let tdx = if acc { up(g, &[n], &prior) } else { nan(g, &[n]) };
        run(g, |rec| relu::backward(rec, &tx, &tdy, &tdx, acc));
        let want = r::relu::backward(&rx, &rdy);
        let want = if acc { plus(&prior, &want) } else { want };
        check(&format!("relu backward acc={acc}"), &fetch(g, &tdx), &want, F32_TOL);
    }
    let tg = up(g, &[n], &dy);
    run(g, |rec| relu::mask_in_place(rec, &tx, &tg));
    check("relu mask", &fetch(g, &tg), &r::relu::backward(&rx, &rdy), F32_TOL);

    let ts = up(g, &[n], &prior);
    run(g, |rec| residual::add(rec, &tx, &ts));
    check("residual add", &fetch(g, &ts), &r::residual::add(&to_f64(&prior), &rx), F32_TOL);
    let tc = nan(g, &[n]);
    run(g, |rec| residual::copy(rec, &tx, &tc));
    assert_eq!(fetch(g, &tc), x, "copy");

    let tb = up(g, &[n], &prior);
    run(g, |rec| probe::subtract_from(rec, &tx, &tb));
    check("subtract_from", &fetch(g, &tb), &r::probe::subtract(&rx, &to_f64(&prior)), F32_TOL);
    let out = nan(g, &[3]);
    run(g, |rec| probe::sum_squares(rec, big(&tx), &out, 1));
    check("sum_squares", &fetch(g, &out)[1..2], &[r::probe::sum_squares(&rx)], F32_TOL);

    let (tw, tm) = (up(g, &[n], &x), up(g, &[n], &prior));
    run(g, |rec| sgd::step(rec, big(&tw), &tdy, &tm, 0.1, 0.9, 1e-3));
    let (mut w, mut m) = (rx.clone(), to_f64(&prior));
    r::sgd::step(&mut w, &rdy, &mut m, 0.1f32 as f64, 0.9f32 as f64, 1e-3f32 as f64);
    check("sgd w", &fetch(g, &tw), &w, F32_TOL);
    check("sgd m", &fetch(g, &tm), &m, F32_TOL);
}

#[test]
fn shortcut_and_head_split_by_images() {
    let g = small();
    let mut rng = Rng::new(4);

    // Option A: [5, 4, 8, 7] (896 bytes an image) -> [5, 8, 4, 4].
    let (xd, c_out, s) = ([5usize, 4, 8, 7], 8, 2);
    let yd = [5, c_out, 4, 4];
    let x = rng.data(len(&xd));
    let tx = up(g, &xd, &x);
    let ty = nan(g, &yd);
    run(g, |rec| residual::subsample_forward(rec, big(&tx), &ty, s));
    check("subsample forward", &fetch(g, &ty), &r::residual::subsample_forward(&to_f64(&x), xd, c_out, s), F32_TOL);
    let dy = rng.data(len(&yd));
    let prior = rng.data(len(&xd));
    for acc in [false, true] {
        let tdx = if acc { up(g, &xd, &prior) } else { nan(g, &xd) };
        run(g, |rec| residual::subsample_backward(rec, &up(g, &yd, &dy), &tdx, s, acc));
        let want = r::residual::subsample_backward(&to_f64(&dy), xd, c_out, s);
        let want = if acc { plus(&prior, &want) } else { want };
        check(&format!("subsample backward acc={acc}"), &fetch(g, &tdx), &want, F32_TOL);
    }

    // Pooling: [5, 6, 7, 3] (504 bytes an image).
    let (n, c, hw) = (5, 6, 21);
    let pd = [n, c, 7, 3];
    let px = rng.data(len(&pd));
    let tp = nan(g, &[n, c]);
    run(g, |rec| head::pool_forward(rec, big(&up(g, &pd, &px)), &tp));
    check("pool forward", &fetch(g, &tp), &r::pool_fc_loss::pool_forward(&to_f64(&px), n, c, hw), F32_TOL);
    let dp = rng.data(n * c);
    let tdx = nan(g, &pd);
    run(g, |rec| head::pool_backward(rec, &up(g, &[n, c], &dp), big(&tdx), false));
    check("pool backward", &fetch(g, &tdx), &r::pool_fc_loss::pool_backward(&to_f64(&dp), hw), F32_TOL);

    // Fully connected and loss: p [40, 16] (2560 bytes), 10 classes; logits [60, 10].
    let (n, c, k) = (40, 16, 10);
    let (p, w, b, dz) = (rng.data(n * c), rng.data(k * c), rng.data(k), rng.data(n * k));
    let (tp, tw, tb) = (up(g, &[n, c], &p), up(g, &[k, c], &w), up(g, &[k], &b));
    let tz = nan(g, &[n, k]);
    run(g, |rec| head::fc_forward(rec, big(&tp), &tw, &tb, &tz));
    let (rp, rw) = (to_f64(&p), to_f64(&w));
    check("fc forward", &fetch(g, &tz), &r::pool_fc_loss::fc_forward(&rp, &rw, &to_f64(&b), n, c, k), F32_TOL);
    let (wdp, wdw, wdb) = r::pool_fc_loss::fc_backward(&rp, &rw, &to_f64(&dz), n, c, k);
    for acc in [false, true] {
        let (pdp, pdw, pdb) = (rng.data(n * c), rng.data(k * c), rng.data(k));
        let tdp = if acc { up(g, &[n, c], &pdp) } else { nan(g, &[n, c]) };
        let (tdw, tdb) = if acc { (up(g, &[k, c], &pdw), up(g, &[k], &pdb)) } else { (nan(g, &[k, c]), nan(g, &[k])) };
        run(g, |rec| head::fc_backward(rec, &tp, &tw, &up(g, &[n, k], &dz), &tdp, &tdw, &tdb, acc, acc));
        let pick = |prior: &[f32], v: &[f64]| if acc { plus(prior, v) } else { v.to_vec() };
        check(&format!("fc backward dp acc={acc}"), &fetch(g, &tdp), &pick(&pdp, &wdp), F32_TOL);
        check(&format!("fc backward dw acc={acc}"), &fetch(g, &tdw), &pick(&pdw, &wdw), F32_TOL);
        check(&format!("fc backward db acc={acc}"), &fetch(g, &tdb), &pick(&pdb, &wdb), F32_TOL);
    }

    let n = 60;
    let z: Vec<f32> = rng.data(n * k).iter().map(|v| 3.0 * v).collect();
    let labels: Vec<u32> = (0..n).map(|_| rng.below(k) as u32).collect();
    let tl = upload_labels(g, &labels, k).unwrap();
    let (loss, tdz) = (nan(g, &[1]), nan(g, &[n, k]));
    run(g, |rec| head::softmax_xent(rec, big(&up(g, &[n, k], &z)), &tl, &loss, &tdz));
    let (wl, wdz) = r::pool_fc_loss::softmax_xent(&to_f64(&z), &labels, k);
    check("softmax xent loss", &fetch(g, &loss), &[wl], F32_TOL);
    check("softmax xent dlogits", &fetch(g, &tdz), &wdz, F32_TOL);
}

#[test]
fn a_unit_splits_as_a_whole() {
    let g = small();
    let mut rng = Rng::new(5);
    for (i, kind) in [UnitKind::PreAct, UnitKind::Original].into_iter().enumerate() {
        let cfg = NetConfig {
            kind,
            combine: Combine::Add,
            units_per_stage: 1,
            bottleneck: false,
            shortcut: if i == 0 { ShortcutOption::B } else { ShortcutOption::A },
            widths: [3, 5, 6],
            in_channels: 3,
            classes: 3,
        };
        let spec = cfg.units().into_iter().find(|s| s.shortcut != Shortcut::Identity).unwrap();
        let state = random_state(&cfg, 50 + i as u64);
        let unit = Unit::from_state(g, &spec, &state).unwrap();
        let xd = [6, spec.c_in, 8, 8]; // 768 bytes an image: chunks of 2
        let mut ws = Workspace::default();
        let kept = unit.allocate(g, xd, &mut ws).unwrap();
        let yd = unit.out_dims(xd);
        let (x, dy) = (rng.data(len(&xd)), rng.data(len(&yd)));
        let (tx, ty, tg_out, tg_in) = (up(g, &xd, &x), nan(g, &yd), up(g, &yd, &dy), nan(g, &xd));
        let mut rec = g.recorder("unit forward");
        unit.forward(&mut rec, Mode::Train, big(&tx), &ty, &kept, &ws).unwrap();
        let fwd = rec.finish();
        let mut rec = g.recorder("unit backward");
        unit.backward(&mut rec, &tx, &ty, &tg_out, &tg_in, &kept, &ws).unwrap();
        g.submit([fwd, rec.finish()]).unwrap();
        let params = to_ref(&state);
        let want = rnet::unit_forward(&spec, &params, &to_f64(&x), xd, true);
        let (want_dx, want_grads) = rnet::unit_backward(&spec, &params, &want.saved, &to_f64(&dy));
        let tag = format!("{kind:?} {:?}", spec.shortcut);
        check(&format!("{tag} x_l+1"), &fetch(g, &ty), &want.out, F32_TOL);
        check(&format!("{tag} dE/dx_l"), &fetch(g, &tg_in), &want_dx, F32_TOL);
        for (j, c) in unit.convs.iter().enumerate() {
            let name = format!("{}.conv{}.weight", spec.name, j + 1);
            check(&format!("{tag} grad {name}"), &fetch(g, &c.w.grad), &want_grads[&name], F32_TOL);
        }
    }
}

fn tiny(kind: UnitKind, shortcut: ShortcutOption) -> NetConfig {
    NetConfig {
        kind,
        combine: Combine::Add,
        units_per_stage: 1,
        bottleneck: false,
        shortcut,
        widths: [3, 5, 6],
        in_channels: 3,
        classes: 5,
    }
}

#[test]
fn networks_split_match_the_reference_and_the_unlimited_context() {
    let g = small();
    let dims = [6, 3, 8, 8]; // stem output 768 bytes an image: stage 1 in chunks of 2
    let mut seed = 60;
    for kind in [UnitKind::PreAct, UnitKind::Original] {
        for shortcut in [ShortcutOption::A, ShortcutOption::B] {
            seed += 1;
            let cfg = tiny(kind, shortcut);
            let tag = format!("{kind:?} {shortcut:?}");
            let mut rng = Rng::new(seed);
            let state = random_state(&cfg, seed);
            let x = rng.data(len(&dims));
            let labels: Vec<u32> = (0..dims[0]).map(|_| rng.below(cfg.classes) as u32).collect();

            // A training pass against the reference.
            let mut net = ResNet::from_state(g, &cfg, &state).unwrap();
            for (_, p) in net.params() {
                p.grad.fill(g, f32::NAN).unwrap();
            }
            let tl = upload_labels(g, &labels, cfg.classes).unwrap();
            let images = up(g, &dims, &x);
            let loss = net.forward_backward(g, &images, &tl, true).unwrap();
            let ul: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
            let want = rnet::train_pass(&cfg, &to_ref(&state), &to_f64(&x), dims, &ul);
            check(&format!("{tag} loss"), &[loss], &[want.loss], F32_TOL);
            check(&format!("{tag} logits"), &net.logits(g).unwrap(), &want.logits, F32_TOL);
            check(&format!("{tag} grad.images"), &net.grad_images(g).unwrap(), &want.grad_images, F32_TOL);
            for (name, gv) in net.grads(g).unwrap() {
                check(&format!("{tag} grad.{name}"), &gv, &want.grads[&name], F32_TOL);
            }
            // Every buffer the reference updated, found in the network's state by name.
            let state: std::collections::HashMap<String, Vec<f32>> = net.state(g).unwrap().into_iter().collect();
            for (name, w) in &want.buffers {
                let v = state.get(name).unwrap_or_else(|| panic!("{tag}: {name} not in the network's state"));
                check(&format!("{tag} {name}"), v, w, F32_TOL);
            }

            // Two SGD steps here and on the unlimited context.
            let opt = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-3 };
            let full = gpu();
            let mut a = ResNet::from_state(g, &cfg, &state).unwrap();
            let mut b = ResNet::from_state(full, &cfg, &state).unwrap();
            let tl_full = upload_labels(full, &labels, cfg.classes).unwrap();
            let images_full = up(full, &dims, &x);
            for step in 0..2 {
                let la = a.train_step(g, &images, &tl, opt).unwrap();
                let lb = b.train_step(full, &images_full, &tl_full, opt).unwrap();
                check(&format!("{tag} step {step} loss vs unlimited"), &[la], &[lb as f64], F32_TOL);
            }
            for ((name, va), (_, vb)) in a.state(g).unwrap().into_iter().zip(b.state(full).unwrap()) {
                check(&format!("{tag} after 2 steps {name} vs unlimited"), &va, &to_f64(&vb), F32_TOL);
            }
        }
    }
}

#[test]
fn what_cannot_be_split_is_a_typed_error_naming_sizes() {
    let g = small();
    // One image of 16 x 8 x 8 is 4096 bytes, past the 2048-byte limit.
    let x = Tensor::zeros(g, &[2, 16, 8, 8]).unwrap();
    let w = Tensor::zeros(g, &[4, 16, 1, 1]).unwrap();
    let y = Tensor::zeros(g, &[2, 4, 8, 8]).unwrap();
    let mut rec = g.recorder("too large");
    match conv::forward(&mut rec, &x, &w, &y, 1, false) {
        Err(e @ Error::TooLarge { bytes: 4096, limit: LIMIT, .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("4096") && msg.contains("2048") && msg.contains("[2, 16, 8, 8]"), "{msg}");
        }
        other => panic!("expected TooLarge for one image, got {other:?}"),
    }
    // A weight tensor is bound whole: 8 x 8 x 3 x 3 floats are 2304 bytes.
    let x = Tensor::zeros(g, &[2, 8, 4, 4]).unwrap();
    let w = Tensor::zeros(g, &[8, 8, 3, 3]).unwrap();
    let y = Tensor::zeros(g, &[2, 8, 4, 4]).unwrap();
    match conv::forward(&mut rec, &x, &w, &y, 1, false) {
        Err(Error::TooLarge { bytes: 2304, limit: LIMIT, what, .. }) => {
            assert!(what.contains("[8, 8, 3, 3]"), "{what}")
        }
        other => panic!("expected TooLarge for the weights, got {other:?}"),
    }
    // Nothing was recorded: the recorder still runs.
    rec.run().unwrap();
    // A network whose weights do not fit fails its step with the error, not a panic.
    let cfg = NetConfig { widths: [8, 8, 8], ..tiny(UnitKind::PreAct, ShortcutOption::B) };
    let mut net = ResNet::new(g, &cfg, 0).unwrap();
    let images = Tensor::zeros(g, &[2, 3, 8, 8]).unwrap();
    let labels = upload_labels(g, &[0, 1], cfg.classes).unwrap();
    assert!(matches!(net.train_step(g, &images, &labels, Sgd::default()), Err(Error::TooLarge { .. })));
}

/// The f16 path binds whole tensors: one past the limit is `Error::TooLarge` naming it, from
/// the convolutions, the batch norm and a unit alike, with nothing recorded.
#[test]
fn the_f16_path_past_the_limit_is_a_typed_error() {
    use resnet_wgpu::tensor::HalfTensor;
    let g = small();
    if !g.report.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipped: no shader-f16 on {}", g.report.name);
        return;
    }
    // 2 x 16 x 8 x 8 halves are 4096 bytes; 2 x 4 x 8 x 8 are 1024.
    let half = |d: &[usize]| HalfTensor::zeros(g, d).unwrap();
    let (x, w, y) = (half(&[2, 16, 8, 8]), Tensor::zeros(g, &[4, 16, 1, 1]).unwrap(), half(&[2, 4, 8, 8]));
    let mut rec = g.recorder("f16 too large");
    match conv::forward_f16(&mut rec, &x, &w, &y, 1, false) {
        Err(Error::TooLarge { bytes: 4096, limit: LIMIT, what, .. }) => {
            assert!(what.contains("[2, 16, 8, 8]"), "{what}")
        }
        other => panic!("expected TooLarge for x, got {other:?}"),
    }
    let c = 16;
    let (ones, zeros) = (Tensor::filled(g, &[c], 1.0).unwrap(), Tensor::zeros(g, &[c]).unwrap());
    let (mean, invstd, rm, rv) = (zeros_of(g, c), zeros_of(g, c), zeros_of(g, c), zeros_of(g, c));
    let p = BnTensors { gamma: &ones, beta: &zeros, running_mean: &rm, running_var: &rv, affine: None };
    assert!(matches!(bn::stats_train_f16(&mut rec, &x, &p, &mean, &invstd), Err(Error::TooLarge { bytes: 4096, .. })));
    // At 1x1 a batch norm's partials (two floats a plane) outgrow its 600-byte tensor.
    let (x1, c1) = (half(&[6, 50, 1, 1]), 50);
    let (ones, zeros) = (Tensor::filled(g, &[c1], 1.0).unwrap(), Tensor::zeros(g, &[c1]).unwrap());
    let (mean, invstd, rm, rv) = (zeros_of(g, c1), zeros_of(g, c1), zeros_of(g, c1), zeros_of(g, c1));
    let p = BnTensors { gamma: &ones, beta: &zeros, running_mean: &rm, running_var: &rv, affine: None };
    match bn::stats_train_f16(&mut rec, &x1, &p, &mean, &invstd) {
        Err(Error::TooLarge { bytes: 2400, limit: LIMIT, what, .. }) => assert!(what.contains("partials"), "{what}"),
        other => panic!("expected TooLarge for the partials, got {other:?}"),
    }
    let (dx1, dy1, scratch) = (half(&[6, 50, 1, 1]), half(&[6, 50, 1, 1]), zeros_of(g, 2 * c1));
    let (dgamma, dbeta) = (zeros_of(g, c1), zeros_of(g, c1));
    let grads = bn::BnGrads {
        gamma: &ones,
        beta: &zeros,
        save_mean: &mean,
        save_invstd: &invstd,
        dgamma: &dgamma,
        dbeta: &dbeta,
        scratch: &scratch,
    };
    let backward = bn::backward_f16(&mut rec, &x1, &dy1, &grads, true, &dx1, false);
    assert!(matches!(backward, Err(Error::TooLarge { bytes: 2400, .. })), "{backward:?}");
    // A unit whose input does not fit.
    let cfg = NetConfig { widths: [16, 16, 16], units_per_stage: 2, ..tiny(UnitKind::PreAct, ShortcutOption::B) };
    let spec = cfg.units().into_iter().find(|u| u.name == "layer1.1").unwrap();
    let unit = Unit::from_state(g, &spec, &random_state(&cfg, 1)).unwrap();
    let kept = unit.allocate_f16(g, [2, 16, 8, 8], &mut Workspace::default()).unwrap();
    let out = half(&[2, 16, 8, 8]);
    assert!(matches!(unit.forward_f16(&mut rec, &x, &out, &kept), Err(Error::TooLarge { .. })));
    // Nothing was recorded: the recorder still runs.
    rec.run().unwrap();
}

fn zeros_of(g: &Gpu, c: usize) -> Tensor {
    Tensor::zeros(g, &[c]).unwrap()
}

/// The paper's variants past the limit: the combination and gate kernels by chunks (the dropout
/// mask must stay that of the whole tensor), and whole variant networks.
#[test]
fn variant_kernels_and_networks_split_match_the_reference() {
    use resnet_wgpu::ops::{gate, mix};
    let g = small();
    let mut rng = Rng::new(90);
    let d = [6, 5, 8, 8]; // 1280 bytes an image, 7680 in all: flat chunks of 512 elements
    let n = len(&d);
    let (h, f, gv, dy) =
        (rng.data(n), rng.data(n), rng.data(n).iter().map(|v| 0.5 + 0.4 * v).collect::<Vec<_>>(), rng.data(n));
    for (i, combine) in
        [Combine::Scale { h: 0.5, f: 1.0 }, Combine::ExclusiveGate { bias: 0.0 }, Combine::Dropout { rate: 0.5 }]
            .into_iter()
            .enumerate()
    {
        let (th, tf, tg, tdy) = (up(g, &d, &h), up(g, &d, &f), up(g, &d, &gv), up(g, &d, &dy));
        let (ty, tdh, tdf, tdg) = (nan(g, &d), nan(g, &d), nan(g, &d), nan(g, &d));
        let gated = combine.gated();
        let seed = 40 + i as u32;
        run(g, |rec| {
            mix::forward(rec, combine, true, seed, big(&th), &tf, gated.then_some(&tg), &ty, false)?;
            mix::backward(rec, combine, seed, &th, &tf, gated.then_some(&tg), &tdy, &tdh, &tdf, gated.then_some(&tdg))
        });
        let (h, f, gv, dy) = (to_f64(&h), to_f64(&f), to_f64(&gv), to_f64(&dy));
        let gr = gated.then_some(&gv[..]);
        let (dh, df, dg) = r::mix::backward(combine, &h, &f, gr, seed, &dy);
        check(
            &format!("split mix {combine:?} y"),
            &fetch(g, &ty),
            &r::mix::forward(combine, &h, &f, gr, seed, true),
            F32_TOL,
        );
        check(&format!("split mix {combine:?} dh"), &fetch(g, &tdh), &dh, F32_TOL);
        check(&format!("split mix {combine:?} dF"), &fetch(g, &tdf), &df, F32_TOL);
        if gated {
            check(&format!("split mix {combine:?} dg"), &fetch(g, &tdg), &dg, F32_TOL);
        }
    }
    // The gate: 1x1 convolution, bias and sigmoid, and back.
    let (xd, c_out) = ([6, 5, 8, 8], 4);
    let yd = [6, c_out, 8, 8];
    let (x, w, b, dg) = (rng.data(len(&xd)), rng.data(c_out * 5), rng.data(c_out), rng.data(len(&yd)));
    let (tx, tw, tb) = (up(g, &xd, &x), up(g, &[c_out, 5, 1, 1], &w), up(g, &[c_out], &b));
    let (tg, tdg, tdw, tdb, tdx) =
        (nan(g, &yd), up(g, &yd, &dg), nan(g, &[c_out, 5, 1, 1]), nan(g, &[c_out]), nan(g, &xd));
    run(g, |rec| {
        gate::forward(rec, big(&tx), &tw, &tb, big(&tg), 1)?;
        gate::backward(rec, &tx, &tw, &tg, &tdg, &tdw, &tdb, &tdx, 1, false)
    });
    let (x, w, b, dg) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&dg));
    let wd = [c_out, 5, 1, 1];
    let want_g = r::gate::forward(&r::conv::forward(&x, xd, &w, wd, 1), yd, &b);
    let (dz, db) = r::gate::backward(&want_g, yd, &dg);
    check("split gate g", &fetch(g, &tg), &want_g, F32_TOL);
    check("split gate db", &fetch(g, &tdb), &db, F32_TOL);
    check("split gate dw", &fetch(g, &tdw), &r::conv::backward_weight(&x, xd, &dz, wd, 1), F32_TOL);
    check("split gate dx", &fetch(g, &tdx), &r::conv::backward_data(&dz, &w, wd, xd, 1), F32_TOL);

    // Whole networks of the variants.
    let dims = [6, 3, 8, 8];
    for (i, (kind, combine)) in [
        (UnitKind::Original, Combine::ExclusiveGate { bias: -1.0 }),
        (UnitKind::Original, Combine::Dropout { rate: 0.5 }),
        (UnitKind::BnAfterAdd, Combine::Add),
        (UnitKind::ReluOnlyPreAct, Combine::ShortcutGate { bias: 0.0 }),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = NetConfig { combine, ..tiny(kind, ShortcutOption::B) };
        let seed = 95 + i as u64;
        let mut rng = Rng::new(seed);
        let state = random_state(&cfg, seed);
        let x = rng.data(len(&dims));
        let labels: Vec<u32> = (0..dims[0]).map(|_| rng.below(cfg.classes) as u32).collect();
        let mut net = ResNet::from_state(g, &cfg, &state).unwrap();
        // Poisoned, so that a gradient the split path never writes fails.
        for (_, p) in net.params() {
            p.grad.fill(g, f32::NAN).unwrap();
        }
        let tl = upload_labels(g, &labels, cfg.classes).unwrap();
        let loss = net.forward_backward(g, &up(g, &dims, &x), &tl, true).unwrap();
        let ul: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
        let want = rnet::train_pass(&cfg, &to_ref(&state), &to_f64(&x), dims, &ul);
        let tag = format!("split {kind:?} {combine:?}");
        check(&format!("{tag} loss"), &[loss], &[want.loss], F32_TOL);
        check(&format!("{tag} grad.images"), &net.grad_images(g).unwrap(), &want.grad_images, F32_TOL);
        for (name, gv) in net.grads(g).unwrap() {
            check_grad(&format!("{tag} grad.{name}"), &gv, &want.grads[&name]);
        }
    }
}
