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
