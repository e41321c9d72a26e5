//! ReLU and the residual add against the reference.
mod common;
use common::*;
use resnet_wgpu::ops::{relu, residual};
use resnet_wgpu::reference::{self as r, to_f64};

const SHAPES: &[[usize; 4]] = &[[1, 1, 1, 1], [1, 3, 5, 7], [2, 5, 9, 1], [3, 16, 7, 5], [2, 3, 32, 32]];

#[test]
fn relu_forward_backward() {
    let g = gpu();
    let mut rng = Rng::new(1);
    for dims in SHAPES {
        let n: usize = dims.iter().product();
        let (x, dy, prior) = (rng.data(n), rng.data(n), rng.data(n));
        let (tx, tdy) = (upload(dims, &x), upload(dims, &dy));
        let (ty, tdx) = (poisoned(dims), poisoned(dims));
        let tacc = upload(dims, &prior);
        let mut rec = g.recorder("relu");
        relu::forward(&mut rec, &tx, &ty).unwrap();
        relu::backward(&mut rec, &tx, &tdy, &tdx, false).unwrap();
        relu::backward(&mut rec, &tx, &tdy, &tacc, true).unwrap();
        rec.run().unwrap();
        check(&format!("relu fwd {dims:?}"), &read(&ty), &r::relu::forward(&to_f64(&x)), F32_TOL);
        let want = r::relu::backward(&to_f64(&x), &to_f64(&dy));
        check(&format!("relu bwd {dims:?}"), &read(&tdx), &want, F32_TOL);
        let want_acc = r::residual::add(&to_f64(&prior), &want);
        check(&format!("relu bwd accumulate {dims:?}"), &read(&tacc), &want_acc, F32_TOL);
    }
}

#[test]
fn residual_add_in_place() {
    let g = gpu();
    let mut rng = Rng::new(2);
    for dims in SHAPES {
        let n: usize = dims.iter().product();
        let (x, f) = (rng.data(n), rng.data(n));
        let (stream, branch) = (upload(dims, &x), upload(dims, &f));
        let mut rec = g.recorder("add");
        residual::add(&mut rec, &branch, &stream).unwrap();
        rec.run().unwrap();
        check(&format!("residual add {dims:?}"), &read(&stream), &r::residual::add(&to_f64(&x), &to_f64(&f)), F32_TOL);
    }
}

#[test]
fn mismatched_sizes_are_errors() {
    let g = gpu();
    let a = upload(&[1, 2, 3, 3], &[1.0; 18]);
    let b = upload(&[1, 2, 3, 4], &[1.0; 24]);
    let mut rec = g.recorder("bad");
    assert!(matches!(relu::forward(&mut rec, &a, &b), Err(resnet_wgpu::Error::Shape(_))));
    assert!(matches!(resnet_wgpu::Tensor::new(g, &[2, 2], &[1.0; 3]), Err(resnet_wgpu::Error::Length { .. })));
}

#[test]
fn relu_mask_in_place() {
    let g = gpu();
    let mut rng = Rng::new(3);
    for dims in SHAPES {
        let n: usize = dims.iter().product();
        let (y, dy) = (rng.data(n), rng.data(n));
        let (ty, tg) = (upload(dims, &y), upload(dims, &dy));
        let mut rec = g.recorder("mask");
        relu::mask_in_place(&mut rec, &ty, &tg).unwrap();
        rec.run().unwrap();
        check(&format!("relu mask {dims:?}"), &read(&tg), &r::relu::backward(&to_f64(&y), &to_f64(&dy)), F32_TOL);
    }
}

#[test]
fn option_a_shortcut_forward_backward() {
    let g = gpu();
    let mut rng = Rng::new(4);
    // (input dims, output channels): odd and even sizes, equal and wider channels.
    let cases: &[([usize; 4], usize, usize)] = &[
        ([1, 1, 1, 1], 1, 2),
        ([1, 3, 5, 7], 5, 2),
        ([2, 5, 9, 4], 16, 2),
        ([3, 16, 32, 32], 32, 2),
        ([2, 3, 5, 5], 16, 1),
    ];
    for &(xd, c_out, s) in cases {
        let [n, _, h, w] = xd;
        let yd = [n, c_out, h.div_ceil(s), w.div_ceil(s)];
        let (nx, ny) = (xd.iter().product::<usize>(), yd.iter().product::<usize>());
        let (x, dy, prior) = (rng.data(nx), rng.data(ny), rng.data(nx));
        let (tx, tdy) = (upload(&xd, &x), upload(&yd, &dy));
        let (ty, tdx, tacc) = (poisoned(&yd), poisoned(&xd), upload(&xd, &prior));
        let mut rec = g.recorder("option A");
        residual::subsample_forward(&mut rec, &tx, &ty, s).unwrap();
        residual::subsample_backward(&mut rec, &tdy, &tdx, s, false).unwrap();
        residual::subsample_backward(&mut rec, &tdy, &tacc, s, true).unwrap();
        rec.run().unwrap();
        let want = r::residual::subsample_forward(&to_f64(&x), xd, c_out, s);
        check(&format!("option A fwd {xd:?}->{c_out} s{s}"), &read(&ty), &want, F32_TOL);
        let want = r::residual::subsample_backward(&to_f64(&dy), xd, c_out, s);
        check(&format!("option A bwd {xd:?}->{c_out}"), &read(&tdx), &want, F32_TOL);
        let want = r::residual::add(&to_f64(&prior), &want);
        check(&format!("option A bwd accumulate {xd:?}->{c_out}"), &read(&tacc), &want, F32_TOL);
    }
}

#[test]
fn option_a_reference_backward_is_the_transpose() {
    // <S x, dy> == <x, S^T dy> for random x, dy: the reference backward is the forward's adjoint.
    let mut rng = Rng::new(5);
    let (xd, c_out) = ([2, 3, 5, 7], 6);
    let yd = [2, c_out, 3, 4];
    let x = to_f64(&rng.data(xd.iter().product()));
    let dy = to_f64(&rng.data(yd.iter().product()));
    let sx = r::residual::subsample_forward(&x, xd, c_out, 2);
    let st = r::residual::subsample_backward(&dy, xd, c_out, 2);
    let lhs: f64 = sx.iter().zip(&dy).map(|(a, b)| a * b).sum();
    let rhs: f64 = x.iter().zip(&st).map(|(a, b)| a * b).sum();
    assert!((lhs - rhs).abs() < 1e-12 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
}

#[test]
fn option_a_rejects_bad_shapes() {
    let g = gpu();
    let x = upload(&[1, 4, 5, 5], &[1.0; 100]);
    let y = poisoned(&[1, 2, 3, 3]); // fewer channels
    let mut rec = g.recorder("bad");
    assert!(matches!(residual::subsample_forward(&mut rec, &x, &y, 2), Err(resnet_wgpu::Error::Shape(_))));
    let y = poisoned(&[1, 4, 5, 5]); // not halved
    assert!(matches!(residual::subsample_forward(&mut rec, &x, &y, 2), Err(resnet_wgpu::Error::Shape(_))));
}

/// An output that is also an input is refused before anything is recorded: these ops are not in
/// place, and wgpu refuses a buffer bound read-only and read-write in one dispatch (or copied
/// onto itself) only by refusing the whole submission, the other ops recorded with it included.
#[test]
fn an_output_aliasing_an_input_is_refused() {
    use resnet_wgpu::Error;
    use resnet_wgpu::ops::gate;
    let g = gpu();
    let dims = [1, 2, 3, 3];
    let (t, u) = (upload(&dims, &Rng::new(7).data(18)), upload(&dims, &Rng::new(8).data(18)));
    let out = poisoned(&dims);
    let one = upload(&[1, 1, 1, 1], &[0.5]); // a bias of one channel, and a [1,1,1,1] map
    let mut rec = g.recorder("aliased operands");
    let refusals: [(&str, resnet_wgpu::Result<()>); 11] = [
        ("relu forward", relu::forward(&mut rec, &t, &t)),
        ("relu backward, dx = x", relu::backward(&mut rec, &t, &u, &t, false)),
        ("relu backward, dx = dy", relu::backward(&mut rec, &u, &t, &t, true)),
        ("relu mask_in_place", relu::mask_in_place(&mut rec, &t, &t)),
        ("residual add", residual::add(&mut rec, &t, &t)),
        ("subsample_forward", residual::subsample_forward(&mut rec, &t, &t, 1)),
        ("subsample_backward", residual::subsample_backward(&mut rec, &t, &t, 1, true)),
        ("copy", residual::copy(&mut rec, &t, &t)),
        ("sigmoid_backward", gate::sigmoid_backward(&mut rec, &t, &t)),
        ("bias_sigmoid", gate::bias_sigmoid(&mut rec, &one, &one)),
        ("bias_grad", gate::bias_grad(&mut rec, &one, &one)),
    ];
    for (what, r) in refusals {
        assert!(matches!(&r, Err(Error::Invalid(m)) if m.contains("must not alias")), "{what}: {r:?}");
    }
    // The gate's backward with one tensor for both parameter gradients (a gate on one channel):
    // db would be overwritten by dw.
    let (d1, u1) = ([1, 1, 3, 3], upload(&[1, 1, 1, 1], &[0.3]));
    let (x1, g1, dg1, dx1) =
        (upload(&d1, &Rng::new(9).data(9)), upload(&d1, &[0.5; 9]), upload(&d1, &[1.0; 9]), poisoned(&d1));
    let r = gate::backward(&mut rec, &x1, &u1, &g1, &dg1, &one, &one, &dx1, 1, false);
    assert!(matches!(&r, Err(Error::Invalid(m)) if m.contains("dw and db")), "{r:?}");
    if g.report.features.contains(wgpu::Features::SHADER_F16) {
        let h = resnet_wgpu::tensor::HalfTensor::zeros(g, &dims).unwrap();
        let r = relu::mask_in_place_f16(&mut rec, &h, &h);
        assert!(matches!(&r, Err(Error::Invalid(m)) if m.contains("must not alias")), "f16 mask: {r:?}");
    }
    // Nothing was recorded: the recorder's other work runs.
    residual::copy(&mut rec, &u, &out).unwrap();
    rec.run().unwrap();
    assert_eq!(read(&out), read(&u));
}
