//! Batch normalisation against the f64 reference, and the reference's backward against finite
//! differences.
mod common;
use common::*;
use resnet_wgpu::ops::batch_norm::{self as bn, BnTensors, Epilogue};
use resnet_wgpu::reference::{batch_norm as rbn, to_f64};
use resnet_wgpu::tensor::HalfTensor;
use resnet_wgpu::{Error, Tensor};

/// Batch 1 with H != W drawn from {1, 5, 7, 9, 32} and C from {1, 3, 5, 16}; plus batches of
/// several images (the batch index in the per-channel loops), the last with more runs of 16
/// values a channel (75) than the 64 threads of a final reduction's workgroup, so that its
/// threads take several each (where the scalar kernels run, as on CPU adapters; the other
/// kernels' long runs: `every_variant_matches_reference`).
const SHAPES: &[[usize; 4]] = &[
    [1, 1, 1, 5],
    [1, 3, 5, 7],
    [1, 5, 9, 1],
    [1, 16, 7, 32],
    [1, 3, 32, 9],
    [2, 5, 9, 7],
    [4, 3, 32, 5],
    [3, 2, 21, 19],
];

const EPILOGUES: [Epilogue; 4] = [
    Epilogue { add: false, relu: false },
    Epilogue { add: false, relu: true },
    Epilogue { add: true, relu: false },
    Epilogue { add: true, relu: true },
];

#[test]
fn forward_train_every_epilogue() {
    let g = gpu();
    let mut rng = Rng::new(11);
    for &dims in SHAPES {
        let (n, c) = (dims.iter().product::<usize>(), dims[1]);
        for ep in EPILOGUES {
            let (x, y_old, h) = (rng.data(n), rng.data(n), BnHost::new(&mut rng, c));
            let d = BnDev::new(gpu(), &h);
            let tx = upload(&dims, &x);
            let ty = if ep.add { upload(&dims, &y_old) } else { poisoned(&dims) };
            let (tmean, tinv) = (poisoned(&[c]), poisoned(&[c]));
            let mut rec = g.recorder("bn train");
            bn::forward_train(&mut rec, &tx, &ty, &d.tensors(), &tmean, &tinv, ep).unwrap();
            rec.run().unwrap();
            let old = to_f64(&y_old);
            let want = h.forward_train(&x, dims, ep.add.then_some(&old[..]), ep.relu);
            let tag = format!("{dims:?} {ep:?}");
            check(&format!("bn train y {tag}"), &read(&ty), &want.y, F32_TOL);
            check(&format!("bn train mean {tag}"), &read(&tmean), &want.mean, F32_TOL);
            check(&format!("bn train invstd {tag}"), &read(&tinv), &want.invstd, F32_TOL);
            check(&format!("bn train running mean {tag}"), &read(&d.rm), &want.running_mean, F32_TOL);
            check(&format!("bn train running var {tag}"), &read(&d.rv), &want.running_var, F32_TOL);
        }
    }
}

/// stats_train (the statistics without the output) and the prologue values from them
/// (`affine`; and written by stats_train itself, `BnTensors::affine`, the same bits), and from
/// the running statistics (`affine_eval`), against the reference; and the
/// prologue as a pass of its own (`affine_relu`) from the values computed, against the
/// reference's prologue from the same values.
#[test]
fn statistics_and_prologue_values() {
    let g = gpu();
    let mut rng = Rng::new(17);
    for &dims in SHAPES {
        let (n, c) = (dims.iter().product::<usize>(), dims[1]);
        let (x, h) = (rng.data(n), BnHost::new(&mut rng, c));
        let d = BnDev::new(gpu(), &h);
        let tx = upload(&dims, &x);
        let (tmean, tinv, taff, teval) = (poisoned(&[c]), poisoned(&[c]), poisoned(&[c, 4]), poisoned(&[c, 4]));
        let (ta, tstats_aff) = (poisoned(&dims), poisoned(&[c, 4]));
        let mut rec = g.recorder("bn prologue");
        // The eval values first, from the running statistics before this step moves them.
        bn::affine_eval(&mut rec, &d.tensors(), &teval).unwrap();
        let p = BnTensors { affine: Some(&tstats_aff), ..d.tensors() };
        bn::stats_train(&mut rec, &tx, &p, &tmean, &tinv).unwrap();
        bn::affine(&mut rec, &d.gamma, &d.beta, &tmean, &tinv, &taff).unwrap();
        bn::affine_relu(&mut rec, &tx, &taff, &ta).unwrap();
        rec.run().unwrap();
        let (gamma, beta) = (to_f64(&h.gamma), to_f64(&h.beta));
        let (rm, rv) = (to_f64(&h.rm), to_f64(&h.rv));
        let want = rbn::forward_train(&to_f64(&x), dims, &gamma, &beta, &rm, &rv, None, false);
        let tag = format!("{dims:?}");
        check(&format!("bn stats mean {tag}"), &read(&tmean), &want.mean, F32_TOL);
        check(&format!("bn stats invstd {tag}"), &read(&tinv), &want.invstd, F32_TOL);
        check(&format!("bn stats running mean {tag}"), &read(&d.rm), &want.running_mean, F32_TOL);
        check(&format!("bn stats running var {tag}"), &read(&d.rv), &want.running_var, F32_TOL);
        let aff = rbn::affine(&want.mean, &want.invstd, &gamma, &beta);
        check(&format!("bn affine {tag}"), &read(&taff), &aff, F32_TOL);
        check(&format!("bn stats_train affine {tag}"), &read(&tstats_aff), &aff, F32_TOL);
        assert_eq!(bits(&read(&tstats_aff)), bits(&read(&taff)), "{tag}: stats_train's affine against affine's");
        let a = rbn::prologue(&to_f64(&x), dims, &to_f64(&read(&taff)));
        check(&format!("bn affine_relu {tag}"), &read(&ta), &a, F32_TOL);
        if g.report.features.contains(wgpu::Features::SHADER_F16) {
            // The f16 pass: the same expression on half x, rounded once to a half (unit
            // roundoff 4.9e-4; the f16 path's bound 1e-3), output poisoned first.
            let xh: Vec<f32> = x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
            let (txh, tah) = (
                HalfTensor::from_f32(g, &dims, &xh).unwrap(),
                HalfTensor::from_f32(g, &dims, &vec![f32::NAN; n]).unwrap(),
            );
            let mut rec = g.recorder("bn affine_relu_f16");
            bn::affine_relu_f16(&mut rec, &txh, &taff, &tah).unwrap();
            rec.run().unwrap();
            let a = rbn::prologue(&to_f64(&xh), dims, &to_f64(&read(&taff)));
            check(&format!("bn affine_relu_f16 {tag}"), &tah.read(g).unwrap(), &a, 1e-3);
        }
        let inv_eval: Vec<f64> = rv.iter().map(|v| 1.0 / (v + f64::from(bn::EPS)).sqrt()).collect();
        check(&format!("bn affine eval {tag}"), &read(&teval), &rbn::affine(&rm, &inv_eval, &gamma, &beta), F32_TOL);
    }
}

#[test]
fn forward_eval_every_epilogue() {
    let g = gpu();
    let mut rng = Rng::new(12);
    // Inference also takes a single value per channel.
    for &dims in SHAPES.iter().chain(&[[1, 3, 1, 1]]) {
        let (n, c) = (dims.iter().product::<usize>(), dims[1]);
        for ep in EPILOGUES {
            let (x, y_old, h) = (rng.data(n), rng.data(n), BnHost::new(&mut rng, c));
            let d = BnDev::new(gpu(), &h);
            let tx = upload(&dims, &x);
            let ty = if ep.add { upload(&dims, &y_old) } else { poisoned(&dims) };
            let mut rec = g.recorder("bn eval");
            bn::forward_eval(&mut rec, &tx, &ty, &d.tensors(), ep).unwrap();
            rec.run().unwrap();
            let old = to_f64(&y_old);
            let want = rbn::forward_eval(
                &to_f64(&x),
                dims,
                &to_f64(&h.gamma),
                &to_f64(&h.beta),
                &to_f64(&h.rm),
                &to_f64(&h.rv),
                ep.add.then_some(&old[..]),
                ep.relu,
            );
            check(&format!("bn eval y {dims:?} {ep:?}"), &read(&ty), &want, F32_TOL);
            // The running statistics are inputs only.
            assert_eq!(read(&d.rm), h.rm);
            assert_eq!(read(&d.rv), h.rv);
        }
    }
}

/// The GPU forward (which saves the statistics), then the backward with every combination of the
/// accumulate flags, with and without the ReLU mask.
#[test]
fn backward_relu_and_accumulate() {
    let g = gpu();
    let mut rng = Rng::new(13);
    for &dims in SHAPES {
        let (n, c) = (dims.iter().product::<usize>(), dims[1]);
        for relu in [false, true] {
            let (x, dy, h) = (rng.data(n), rng.data(n), BnHost::new(&mut rng, c));
            let d = BnDev::new(gpu(), &h);
            let (tx, tdy) = (upload(&dims, &x), upload(&dims, &dy));
            let (ty, tmean, tinv) = (poisoned(&dims), poisoned(&[c]), poisoned(&[c]));
            let mut rec = g.recorder("bn backward");
            bn::forward_train(&mut rec, &tx, &ty, &d.tensors(), &tmean, &tinv, Epilogue { add: false, relu }).unwrap();
            let mut outs = Vec::new();
            for (acc_dx, acc_p) in [(false, false), (true, true), (true, false), (false, true)] {
                let (pdx, pdg, pdb) = (rng.data(n), rng.data(c), rng.data(c));
                let tdx = if acc_dx { upload(&dims, &pdx) } else { poisoned(&dims) };
                let tdg = if acc_p { upload(&[c], &pdg) } else { poisoned(&[c]) };
                let tdb = if acc_p { upload(&[c], &pdb) } else { poisoned(&[c]) };
                let scratch = poisoned(&[2 * c]);
                bn::backward(
                    &mut rec, &tx, &tdy, &d.gamma, &d.beta, &tmean, &tinv, relu, &tdx, &tdg, &tdb, &scratch, acc_dx,
                    acc_p,
                )
                .unwrap();
                outs.push((acc_dx, acc_p, pdx, pdg, pdb, tdx, tdg, tdb));
            }
            rec.run().unwrap();
            let (x64, gamma, beta) = (to_f64(&x), to_f64(&h.gamma), to_f64(&h.beta));
            if relu {
                // The mask must matter: some, not all, of the forward's outputs are cut.
                let y = rbn::forward_train(&x64, dims, &gamma, &beta, &to_f64(&h.rm), &to_f64(&h.rv), None, true).y;
                let cut = y.iter().filter(|&&v| v == 0.0).count();
                assert!(cut > 0 && cut < n, "{dims:?}: ReLU cuts {cut} of {n}");
            }
            let (dx, dgamma, dbeta) = rbn::backward(&x64, dims, &to_f64(&dy), &gamma, &beta, relu);
            let plus = |prior: &[f32], acc: bool, v: &[f64]| -> Vec<f64> {
                if acc { prior.iter().zip(v).map(|(&p, &q)| p as f64 + q).collect() } else { v.to_vec() }
            };
            for (acc_dx, acc_p, pdx, pdg, pdb, tdx, tdg, tdb) in outs {
                let tag = format!("{dims:?} relu {relu} acc dx {acc_dx} params {acc_p}");
                check(&format!("bn bwd dx {tag}"), &read(&tdx), &plus(&pdx, acc_dx, &dx), F32_TOL);
                check(&format!("bn bwd dgamma {tag}"), &read(&tdg), &plus(&pdg, acc_p, &dgamma), F32_TOL);
                check(&format!("bn bwd dbeta {tag}"), &read(&tdb), &plus(&pdb, acc_p, &dbeta), F32_TOL);
            }
        }
    }
}

/// Each variant of the run kernels forced on a context of its own (the adapter's default runs
/// in the other tests): the training forward with each epilogue, the prologue as a pass of its
/// own (`affine_relu`, from the step's values; one kernel over wide runs in every variant), then
/// the backward with and without the ReLU mask, accumulating and not. Planes of a multiple of 4
/// elements take the vec4 and texture variants; the wide one (a workgroup per run of 1024) takes
/// any plane, here planes shorter than a run, of exactly one run, and of two runs with a short
/// last one.
#[test]
fn every_variant_matches_reference() {
    for k in [bn::Kernels::Scalar, bn::Kernels::Vec4, bn::Kernels::Texture, bn::Kernels::Wide] {
        variant_matches_reference(k);
    }
}

fn variant_matches_reference(k: bn::Kernels) {
    let g = resnet_wgpu::Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    bn::set_kernels(&g, k);
    let up = |dims: &[usize], v: &[f32]| resnet_wgpu::Tensor::new(&g, dims, v).unwrap();
    let nan = |dims: &[usize]| resnet_wgpu::Tensor::filled(&g, dims, f32::NAN).unwrap();
    let mut rng = Rng::new(14);
    let shapes: &[[usize; 4]] = if k == bn::Kernels::Wide {
        // Runs of a plane's part, of whole planes, and of several planes of a channel (20 of
        // 7x7 with a group of 3 after them; 3 of 15x20 with 1), and of planes shorter than a
        // thread's step through a run (1x1 and 1x7: a step crosses several planes).
        &[
            [1, 3, 5, 7],
            [2, 3, 33, 40],
            [3, 5, 4, 3],
            [1, 2, 32, 32],
            [23, 3, 7, 7],
            [4, 2, 15, 20],
            [5, 3, 1, 1],
            [9, 2, 1, 7],
            // 65 runs of a whole plane a channel: more than a final reduction's 64 threads.
            [65, 1, 32, 32],
        ]
    } else {
        // The last: 75 runs of 16 a channel, more than a final reduction's 64 threads.
        &[[1, 16, 7, 32], [4, 3, 32, 5], [2, 5, 4, 3], [3, 2, 21, 19]]
    };
    for &dims in shapes {
        let (n, c) = (dims.iter().product::<usize>(), dims[1]);
        for (ep, acc) in [(EPILOGUES[1], false), (EPILOGUES[3], true), (EPILOGUES[0], true)] {
            let (x, y_old, dy, h) = (rng.data(n), rng.data(n), rng.data(n), BnHost::new(&mut rng, c));
            let (tg, tb, trm, trv) = (up(&[c], &h.gamma), up(&[c], &h.beta), up(&[c], &h.rm), up(&[c], &h.rv));
            let p = BnTensors { gamma: &tg, beta: &tb, running_mean: &trm, running_var: &trv, affine: None };
            let (tx, tdy) = (up(&dims, &x), up(&dims, &dy));
            let ty = if ep.add { up(&dims, &y_old) } else { nan(&dims) };
            let (tmean, tinv, scratch) = (nan(&[c]), nan(&[c]), nan(&[2 * c]));
            let prior = rng.data(n);
            let tdx = if acc { up(&dims, &prior) } else { nan(&dims) };
            let (tdg, tdb) = (nan(&[c]), nan(&[c]));
            let relu = ep.relu && !ep.add;
            let (taff, ta) = (nan(&[c, 4]), nan(&dims));
            let mut rec = g.recorder("bn variant");
            bn::forward_train(&mut rec, &tx, &ty, &p, &tmean, &tinv, ep).unwrap();
            // The prologue as a pass of its own, from this step's values.
            bn::affine(&mut rec, &tg, &tb, &tmean, &tinv, &taff).unwrap();
            bn::affine_relu(&mut rec, &tx, &taff, &ta).unwrap();
            bn::backward(&mut rec, &tx, &tdy, &tg, &tb, &tmean, &tinv, relu, &tdx, &tdg, &tdb, &scratch, acc, false)
                .unwrap();
            rec.run().unwrap();
            let (x64, gamma, beta) = (to_f64(&x), to_f64(&h.gamma), to_f64(&h.beta));
            let old = to_f64(&y_old);
            let want = h.forward_train(&x, dims, ep.add.then_some(&old[..]), ep.relu);
            let (dx, dgamma, dbeta) = rbn::backward(&x64, dims, &to_f64(&dy), &gamma, &beta, relu);
            let dx: Vec<f64> = if acc { prior.iter().zip(&dx).map(|(&p, &q)| p as f64 + q).collect() } else { dx };
            let tag = format!("{k:?} {dims:?} {ep:?}");
            let rd = |t: &resnet_wgpu::Tensor| t.read(&g).unwrap();
            check(&format!("bn train y {tag}"), &rd(&ty), &want.y, F32_TOL);
            check(&format!("bn train mean {tag}"), &rd(&tmean), &want.mean, F32_TOL);
            check(&format!("bn train invstd {tag}"), &rd(&tinv), &want.invstd, F32_TOL);
            check(&format!("bn train running mean {tag}"), &rd(&trm), &want.running_mean, F32_TOL);
            check(&format!("bn train running var {tag}"), &rd(&trv), &want.running_var, F32_TOL);
            check(&format!("bn affine_relu {tag}"), &rd(&ta), &rbn::prologue(&x64, dims, &to_f64(&rd(&taff))), F32_TOL);
            check(&format!("bn bwd dx {tag}"), &rd(&tdx), &dx, F32_TOL);
            check(&format!("bn bwd dgamma {tag}"), &rd(&tdg), &dgamma, F32_TOL);
            check(&format!("bn bwd dbeta {tag}"), &rd(&tdb), &dbeta, F32_TOL);
        }
    }
}

/// The f16 path's batch norm in each variant (the f32 path's on the same shape: scalar, vec4,
/// texture loads, wide; shapes a variant cannot take run the scalar kernels): the training
/// statistics, the normalisation with each epilogue, the prologue pass (`affine_relu_f16`), and
/// the backward with and without the ReLU, accumulating and not, on half inputs against the f64
/// reference on the same halves. Half outputs within the f16 bound (1e-3: one rounding), the
/// f32 ones (running variance, dgamma, dbeta) within f32's; outputs poisoned first.
#[test]
fn f16_every_variant_matches_reference() {
    if !gpu().report.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipped: no shader-f16 on {}", gpu().report.name);
        return;
    }
    for k in [bn::Kernels::Scalar, bn::Kernels::Vec4, bn::Kernels::Texture, bn::Kernels::Wide] {
        let g = resnet_wgpu::Gpu::new().unwrap_or_else(|e| panic!("{e}"));
        bn::set_kernels(&g, k);
        let half = |dims: &[usize], v: &[f32]| HalfTensor::from_f32(&g, dims, v).unwrap();
        let round = |v: Vec<f32>| -> Vec<f32> { v.iter().map(|&a| half::f16::from_f32(a).to_f32()).collect() };
        let mut rng = Rng::new(15);
        for dims in [[1, 16, 7, 32], [4, 3, 32, 5], [2, 5, 4, 3], [2, 3, 5, 7], [4, 2, 15, 20], [1, 2, 32, 32]] {
            let (n, c) = (dims.iter().product::<usize>(), dims[1]);
            for (ep, acc) in [(EPILOGUES[1], false), (EPILOGUES[3], true), (EPILOGUES[0], true)] {
                let (x, y_old, dy, prior) =
                    (round(rng.data(n)), round(rng.data(n)), round(rng.data(n)), round(rng.data(n)));
                let h = BnHost::new(&mut rng, c);
                let d = BnDev::new(&g, &h);
                let (tx, tdy) = (half(&dims, &x), half(&dims, &dy));
                let ty = half(&dims, &if ep.add { y_old.clone() } else { vec![f32::NAN; n] });
                let tdx = half(&dims, &if acc { prior.clone() } else { vec![f32::NAN; n] });
                let relu = ep.relu && !ep.add;
                let ta = half(&dims, &vec![f32::NAN; n]);
                let mut rec = g.recorder("bn f16 variant");
                bn::stats_train_f16(&mut rec, &tx, &d.tensors(), &d.mean, &d.invstd).unwrap();
                bn::apply_saved_f16(&mut rec, &tx, &ty, &d.gamma, &d.beta, &d.mean, &d.invstd, ep).unwrap();
                bn::affine(&mut rec, &d.gamma, &d.beta, &d.mean, &d.invstd, &d.affine).unwrap();
                bn::affine_relu_f16(&mut rec, &tx, &d.affine, &ta).unwrap();
                bn::backward_f16(&mut rec, &tx, &tdy, &d.grads(), relu, &tdx, acc).unwrap();
                rec.run().unwrap();
                let (x64, gamma, beta, old) = (to_f64(&x), to_f64(&h.gamma), to_f64(&h.beta), to_f64(&y_old));
                let (rm, rv) = (to_f64(&h.rm), to_f64(&h.rv));
                let want = rbn::forward_train(&x64, dims, &gamma, &beta, &rm, &rv, ep.add.then_some(&old[..]), ep.relu);
                let (dx, dgamma, dbeta) = rbn::backward(&x64, dims, &to_f64(&dy), &gamma, &beta, relu);
                let dx: Vec<f64> = if acc { prior.iter().zip(&dx).map(|(&p, &q)| p as f64 + q).collect() } else { dx };
                let tag = format!("f16 {k:?} {dims:?} {ep:?}");
                let rd = |t: &resnet_wgpu::Tensor| t.read(&g).unwrap();
                check(&format!("bn train y {tag}"), &ty.read(&g).unwrap(), &want.y, 1e-3);
                // The statistics are f32, of inputs that are exact halves: f32's bound.
                check(&format!("bn train mean {tag}"), &rd(&d.mean), &want.mean, F32_TOL);
                check(&format!("bn train invstd {tag}"), &rd(&d.invstd), &want.invstd, F32_TOL);
                check(&format!("bn train running mean {tag}"), &rd(&d.rm), &want.running_mean, F32_TOL);
                check(&format!("bn train running var {tag}"), &rd(&d.rv), &want.running_var, F32_TOL);
                let prologue = rbn::prologue(&x64, dims, &to_f64(&rd(&d.affine)));
                check(&format!("bn affine_relu {tag}"), &ta.read(&g).unwrap(), &prologue, 1e-3);
                check(&format!("bn bwd dx {tag}"), &tdx.read(&g).unwrap(), &dx, 1e-3);
                check(&format!("bn bwd dgamma {tag}"), &rd(&d.dgamma), &dgamma, F32_TOL);
                check(&format!("bn bwd dbeta {tag}"), &rd(&d.dbeta), &dbeta, F32_TOL);
            }
        }
    }
}

/// Three training steps on different batches through one layer: the running statistics (and the
/// last step's outputs) follow the reference.
#[test]
fn running_statistics_over_steps() {
    let g = gpu();
    let mut rng = Rng::new(14);
    for dims in [[2, 5, 9, 7], [1, 16, 7, 32]] {
        let (n, c) = (dims.iter().product::<usize>(), dims[1]);
        let h = BnHost::new(&mut rng, c);
        let d = BnDev::new(gpu(), &h);
        let (mut rm, mut rv) = (to_f64(&h.rm), to_f64(&h.rv));
        let (tmean, tinv) = (poisoned(&[c]), poisoned(&[c]));
        for step in 0..3 {
            let x = rng.data(n);
            let tx = upload(&dims, &x);
            let ty = poisoned(&dims);
            let ep = Epilogue { add: false, relu: step % 2 == 1 };
            let mut rec = g.recorder("bn step");
            bn::forward_train(&mut rec, &tx, &ty, &d.tensors(), &tmean, &tinv, ep).unwrap();
            rec.run().unwrap();
            let want =
                rbn::forward_train(&to_f64(&x), dims, &to_f64(&h.gamma), &to_f64(&h.beta), &rm, &rv, None, ep.relu);
            (rm, rv) = (want.running_mean, want.running_var);
            let tag = format!("{dims:?} step {step}");
            check(&format!("bn steps y {tag}"), &read(&ty), &want.y, F32_TOL);
            check(&format!("bn steps mean {tag}"), &read(&tmean), &want.mean, F32_TOL);
            check(&format!("bn steps invstd {tag}"), &read(&tinv), &want.invstd, F32_TOL);
        }
        check(&format!("bn steps running mean {dims:?}"), &read(&d.rm), &rm, F32_TOL);
        check(&format!("bn steps running var {dims:?}"), &read(&d.rv), &rv, F32_TOL);
    }
}

/// The reference backward against central differences of `L = sum(y * r)` in f64.
#[test]
fn reference_backward_matches_finite_differences() {
    const H: f64 = 1e-6;
    const TOL: f64 = 1e-6;
    let mut rng = Rng::new(15);
    for dims in [[1, 2, 3, 5], [2, 3, 1, 3], [3, 1, 2, 2]] {
        let (n, c) = (dims.iter().product::<usize>(), dims[1]);
        for relu in [false, true] {
            let x = to_f64(&rng.data(n));
            let r = to_f64(&rng.data(n));
            let gamma = to_f64(&rng.data(c));
            let beta = to_f64(&rng.data(c));
            let (rm, rv) = (vec![0.0; c], vec![1.0; c]);
            let loss = |x: &[f64], gamma: &[f64], beta: &[f64]| -> f64 {
                let y = rbn::forward_train(x, dims, gamma, beta, &rm, &rv, None, relu).y;
                y.iter().zip(&r).map(|(a, b)| a * b).sum()
            };
            let central = |v: &[f64], f: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
                (0..v.len())
                    .map(|i| {
                        let (mut p, mut m) = (v.to_vec(), v.to_vec());
                        p[i] += H;
                        m[i] -= H;
                        (f(&p) - f(&m)) / (2.0 * H)
                    })
                    .collect()
            };
            let fd_dx = central(&x, &|v| loss(v, &gamma, &beta));
            let fd_dg = central(&gamma, &|v| loss(&x, v, &beta));
            let fd_db = central(&beta, &|v| loss(&x, &gamma, v));
            let (dx, dg, db) = rbn::backward(&x, dims, &r, &gamma, &beta, relu);
            for (name, got, want) in [("dx", &dx, &fd_dx), ("dgamma", &dg, &fd_dg), ("dbeta", &db, &fd_db)] {
                let num = got.iter().zip(want.iter()).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
                let den = want.iter().map(|b| b * b).sum::<f64>().sqrt();
                let rel = num / den;
                eprintln!("bn reference {name} {dims:?} relu {relu}: rel L2 vs finite differences {rel:.2e}");
                assert!(den > 0.0, "{name}: finite-difference gradient is zero");
                assert!(rel <= TOL, "{name} {dims:?} relu {relu}: rel L2 {rel:.3e} > {TOL:.0e}");
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let mut rng = Rng::new(16);
    let dims = [1, 3, 5, 7];
    let n: usize = dims.iter().product();
    let h = BnHost::new(&mut rng, 3);
    let d = BnDev::new(gpu(), &h);
    let x = upload(&dims, &rng.data(n));
    let y = poisoned(&dims);
    let (m, s) = (poisoned(&[3]), poisoned(&[3]));
    let (dx, dgm, dbt, scratch) = (poisoned(&dims), poisoned(&[3]), poisoned(&[3]), poisoned(&[6]));
    let ep = Epilogue::default();
    let shape =
        |r: resnet_wgpu::Result<()>| assert!(matches!(r, Err(Error::Shape(_))), "expected a shape error: {r:?}");
    let invalid = |r: resnet_wgpu::Result<()>| assert!(matches!(r, Err(Error::Invalid(_))), "expected invalid: {r:?}");
    let mut rec = g.recorder("bad");

    // Not 4-D; y of another shape; per-channel tensors of the wrong length or rank.
    let flat = upload(&[n], &rng.data(n));
    let flat_y = poisoned(&[n]);
    shape(bn::forward_train(&mut rec, &flat, &flat_y, &d.tensors(), &m, &s, ep));
    shape(bn::forward_eval(&mut rec, &flat, &flat_y, &d.tensors(), ep));
    let other = poisoned(&[1, 3, 7, 5]);
    shape(bn::forward_train(&mut rec, &x, &other, &d.tensors(), &m, &s, ep));
    shape(bn::forward_eval(&mut rec, &x, &other, &d.tensors(), ep));
    let four = upload(&[4], &rng.data(4));
    let row = upload(&[1, 3], &rng.data(3));
    for bad in [&four, &row] {
        let p = BnTensors { gamma: bad, ..d.tensors() };
        shape(bn::forward_train(&mut rec, &x, &y, &p, &m, &s, ep));
        shape(bn::forward_eval(&mut rec, &x, &y, &p, ep));
        let p = BnTensors { running_var: bad, ..d.tensors() };
        shape(bn::forward_train(&mut rec, &x, &y, &p, &m, &s, ep));
        shape(bn::forward_eval(&mut rec, &x, &y, &p, ep));
        shape(bn::forward_train(&mut rec, &x, &y, &d.tensors(), bad, &s, ep));
        shape(bn::forward_train(&mut rec, &x, &y, &d.tensors(), &m, bad, ep));
        shape(bn::backward(&mut rec, &x, &y, bad, &d.beta, &m, &s, false, &dx, &dgm, &dbt, &scratch, false, false));
        shape(bn::backward(&mut rec, &x, &y, &d.gamma, &d.beta, &m, &s, false, &dx, bad, &dbt, &scratch, false, false));
    }
    // Backward: dy or dx of another shape, scratch not 2*C long.
    shape(bn::backward(&mut rec, &x, &other, &d.gamma, &d.beta, &m, &s, true, &dx, &dgm, &dbt, &scratch, false, false));
    shape(bn::backward(&mut rec, &x, &y, &d.gamma, &d.beta, &m, &s, true, &other, &dgm, &dbt, &scratch, false, false));
    shape(bn::backward(
        &mut rec, &flat, &flat_y, &d.gamma, &d.beta, &m, &s, true, &dx, &dgm, &dbt, &scratch, true, true,
    ));
    let short = poisoned(&[3]);
    shape(bn::backward(&mut rec, &x, &y, &d.gamma, &d.beta, &m, &s, false, &dx, &dgm, &dbt, &short, false, false));

    // Training with one value per channel has no unbiased variance.
    let one = upload(&[1, 3, 1, 1], &rng.data(3));
    let one_y = poisoned(&[1, 3, 1, 1]);
    let one_dx = poisoned(&[1, 3, 1, 1]);
    invalid(bn::forward_train(&mut rec, &one, &one_y, &d.tensors(), &m, &s, ep));
    invalid(bn::backward(
        &mut rec, &one, &one_y, &d.gamma, &d.beta, &m, &s, false, &one_dx, &dgm, &dbt, &scratch, false, false,
    ));
    // The same tensor in two places.
    invalid(bn::forward_train(&mut rec, &x, &x, &d.tensors(), &m, &s, ep));
    invalid(bn::forward_eval(&mut rec, &x, &x, &d.tensors(), ep));
    invalid(bn::forward_train(&mut rec, &x, &y, &d.tensors(), &m, &m, ep));
    invalid(bn::backward(&mut rec, &x, &y, &d.gamma, &d.beta, &m, &s, false, &y, &dgm, &dbt, &scratch, false, false));

    // The statistics and the prologue values: the same checks, and the values must be [C, 4].
    shape(bn::stats_train(&mut rec, &flat, &d.tensors(), &m, &s));
    shape(bn::stats_train(&mut rec, &x, &d.tensors(), &four, &s));
    invalid(bn::stats_train(&mut rec, &one, &d.tensors(), &m, &s));
    invalid(bn::stats_train(&mut rec, &x, &d.tensors(), &m, &m));
    let aff = poisoned(&[3, 4]);
    for bad in [&four, &row, &poisoned(&[3, 3]), &poisoned(&[12])] {
        shape(bn::affine(&mut rec, &d.gamma, &d.beta, &m, &s, bad));
        shape(bn::affine_eval(&mut rec, &d.tensors(), bad));
        // ... and where the statistics write them.
        shape(bn::stats_train(&mut rec, &x, &BnTensors { affine: Some(bad), ..d.tensors() }, &m, &s));
        shape(bn::forward_train(&mut rec, &x, &y, &BnTensors { affine: Some(bad), ..d.tensors() }, &m, &s, ep));
    }
    shape(bn::affine(&mut rec, &d.gamma, &four, &m, &s, &aff));
    invalid(bn::affine(&mut rec, &d.gamma, &d.beta, &m, &m, &aff));
    // The prologue pass: x and y of one shape, [C, 4] values, three distinct tensors.
    for bad in [&four, &row, &poisoned(&[3, 3]), &poisoned(&[12])] {
        shape(bn::affine_relu(&mut rec, &x, bad, &y));
    }
    shape(bn::affine_relu(&mut rec, &flat, &aff, &y));
    shape(bn::affine_relu(&mut rec, &x, &aff, &other));
    invalid(bn::affine_relu(&mut rec, &x, &aff, &x));

    // Nothing was recorded: the (empty) command buffer runs cleanly.
    rec.run().unwrap();
}

/// Statistics of data whose mean is large against its spread (100 + U(-1, 1)), every kernel
/// variant: the variance of each run is taken about the run's own mean and merged (Chan et
/// al.), so it keeps f32's precision; E[x^2] - E[x]^2 would lose about 3 of its digits here
/// (and all of them at 1000 + U(-1, 1)). The output y is held to 1e-4: the mean itself is
/// rounded in f32 to about 4e-6 of 100, which moves every xhat by up to 1e-5.
#[test]
fn statistics_of_data_far_from_zero() {
    for k in [bn::Kernels::Scalar, bn::Kernels::Vec4, bn::Kernels::Texture, bn::Kernels::Wide] {
        let g = resnet_wgpu::Gpu::new().unwrap_or_else(|e| panic!("{e}"));
        bn::set_kernels(&g, k);
        let mut rng = Rng::new(19);
        for dims in [[4, 3, 32, 5], [23, 3, 7, 7], [65, 1, 32, 32]] {
            let (n, c) = (dims.iter().product::<usize>(), dims[1]);
            let x: Vec<f32> = rng.data(n).iter().map(|v| 100.0 + v).collect();
            let h = BnHost::new(&mut rng, c);
            let d = BnDev::new(&g, &h);
            let (tx, ty) = (Tensor::new(&g, &dims, &x).unwrap(), Tensor::filled(&g, &dims, f32::NAN).unwrap());
            let mut rec = g.recorder("bn far from zero");
            bn::forward_train(&mut rec, &tx, &ty, &d.tensors(), &d.mean, &d.invstd, EPILOGUES[0]).unwrap();
            rec.run().unwrap();
            let want = h.forward_train(&x, dims, None, false);
            let tag = format!("{k:?} {dims:?}");
            let got = |t: &Tensor| t.read(&g).unwrap();
            check(&format!("mean {tag}"), &got(&d.mean), &want.mean, F32_TOL);
            check(&format!("invstd {tag}"), &got(&d.invstd), &want.invstd, F32_TOL);
            check(&format!("running var {tag}"), &got(&d.rv), &want.running_var, F32_TOL);
            check(&format!("y {tag}"), &got(&ty), &want.y, 1e-4);
        }
    }
}
