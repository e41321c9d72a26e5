//! The network head (pooling, fully connected, softmax cross-entropy) and the SGD step against
//! the reference, and the reference head's backward against central finite differences.
mod common;
use common::*;
use resnet_wgpu::Error;
use resnet_wgpu::ops::pool_fc_loss::{self as head, upload_labels};
use resnet_wgpu::ops::sgd;
use resnet_wgpu::reference::{self as r, to_f64};
use resnet_wgpu::tensor::Tensor;

fn labels(rng: &mut Rng, n: usize, k: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(k) as u32).collect()
}

fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    r::residual::add(a, b)
}

#[test]
fn pool_forward_backward() {
    let g = gpu();
    let mut rng = Rng::new(11);
    let shapes: &[[usize; 4]] =
        &[[1, 1, 1, 1], [1, 3, 5, 7], [3, 5, 7, 5], [5, 16, 8, 8], [3, 64, 1, 1], [5, 64, 8, 8]];
    for &[n, c, h, w] in shapes {
        let dims = [n, c, h, w];
        let (nx, np) = (n * c * h * w, n * c);
        let (x, dp, prior) = (rng.data(nx), rng.data(np), rng.data(nx));
        let (tx, tdp, tacc) = (upload(&dims, &x), upload(&[n, c], &dp), upload(&dims, &prior));
        let (tp, tdx) = (poisoned(&[n, c]), poisoned(&dims));
        let mut rec = g.recorder("pool");
        head::pool_forward(&mut rec, &tx, &tp).unwrap();
        head::pool_backward(&mut rec, &tdp, &tdx, false).unwrap();
        head::pool_backward(&mut rec, &tdp, &tacc, true).unwrap();
        rec.run().unwrap();
        check(
            &format!("pool fwd {dims:?}"),
            &read(&tp),
            &r::pool_fc_loss::pool_forward(&to_f64(&x), n, c, h * w),
            F32_TOL,
        );
        let want = r::pool_fc_loss::pool_backward(&to_f64(&dp), h * w);
        check(&format!("pool bwd {dims:?}"), &read(&tdx), &want, F32_TOL);
        check(&format!("pool bwd accumulate {dims:?}"), &read(&tacc), &add(&to_f64(&prior), &want), F32_TOL);
    }
}

#[test]
fn fc_forward_backward() {
    let g = gpu();
    let mut rng = Rng::new(12);
    // (N, C, K)
    let shapes: &[[usize; 3]] = &[[1, 1, 1], [1, 3, 10], [3, 5, 3], [5, 16, 10], [3, 64, 10], [5, 64, 1], [1, 64, 3]];
    for &[n, c, k] in shapes {
        let (p, w, b, dz) = (rng.data(n * c), rng.data(k * c), rng.data(k), rng.data(n * k));
        let (tp, tw, tb, tdz) = (upload(&[n, c], &p), upload(&[k, c], &w), upload(&[k], &b), upload(&[n, k], &dz));
        let tz = poisoned(&[n, k]);
        // Every combination of the two flags, each gradient either poisoned or holding a prior.
        let flags = [(false, false), (true, true), (true, false), (false, true)];
        let mut outs = Vec::new();
        let mut rec = g.recorder("fc");
        head::fc_forward(&mut rec, &tp, &tw, &tb, &tz).unwrap();
        for &(acc_dp, acc_params) in &flags {
            let prior = (rng.data(n * c), rng.data(k * c), rng.data(k));
            let out = |acc: bool, dims: &[usize], data: &[f32]| if acc { upload(dims, data) } else { poisoned(dims) };
            let tdp = out(acc_dp, &[n, c], &prior.0);
            let tdw = out(acc_params, &[k, c], &prior.1);
            let tdb = out(acc_params, &[k], &prior.2);
            head::fc_backward(&mut rec, &tp, &tw, &tdz, &tdp, &tdw, &tdb, acc_dp, acc_params).unwrap();
            outs.push((acc_dp, acc_params, prior, tdp, tdw, tdb));
        }
        rec.run().unwrap();
        let (p64, w64) = (to_f64(&p), to_f64(&w));
        let want_z = r::pool_fc_loss::fc_forward(&p64, &w64, &to_f64(&b), n, c, k);
        check(&format!("fc fwd {n}x{c}->{k}"), &read(&tz), &want_z, F32_TOL);
        let (dp, dw, db) = r::pool_fc_loss::fc_backward(&p64, &w64, &to_f64(&dz), n, c, k);
        for (acc_dp, acc_params, prior, tdp, tdw, tdb) in outs {
            let with =
                |acc: bool, prior: &[f32], want: &[f64]| if acc { add(&to_f64(prior), want) } else { want.to_vec() };
            let tag = format!("{n}x{c}->{k} acc dp {acc_dp} params {acc_params}");
            check(&format!("fc bwd dp {tag}"), &read(&tdp), &with(acc_dp, &prior.0, &dp), F32_TOL);
            check(&format!("fc bwd dw {tag}"), &read(&tdw), &with(acc_params, &prior.1, &dw), F32_TOL);
            check(&format!("fc bwd db {tag}"), &read(&tdb), &with(acc_params, &prior.2, &db), F32_TOL);
        }
    }
}

#[test]
fn softmax_cross_entropy() {
    let g = gpu();
    let mut rng = Rng::new(13);
    // (N, K, logit scale): batch 1, odd sizes, more rows than the kernel's workgroup, and logits
    // large enough that exp overflows f32 without the max subtraction.
    let cases: &[(usize, usize, f32)] =
        &[(1, 1, 1.0), (1, 3, 1.0), (3, 10, 1.0), (5, 3, 4.0), (5, 10, 200.0), (130, 10, 3.0)];
    for &(n, k, scale) in cases {
        let z: Vec<f32> = rng.data(n * k).iter().map(|v| v * scale).collect();
        let lab = labels(&mut rng, n, k);
        let tz = upload(&[n, k], &z);
        let tl = upload_labels(g, &lab, k).unwrap();
        let (tloss, tdz) = (poisoned(&[1]), poisoned(&[n, k]));
        let (tloss2, tdz2) = (poisoned(&[1]), poisoned(&[n, k]));
        let mut rec = g.recorder("xent");
        head::softmax_xent(&mut rec, &tz, &tl, &tloss, &tdz).unwrap();
        head::softmax_xent(&mut rec, &tz, &tl, &tloss2, &tdz2).unwrap();
        rec.run().unwrap();
        let (loss, dz) = r::pool_fc_loss::softmax_xent(&to_f64(&z), &lab, k);
        let tag = format!("{n}x{k} scale {scale}");
        check(&format!("xent loss {tag}"), &read(&tloss), &[loss], F32_TOL);
        check(&format!("xent dlogits {tag}"), &read(&tdz), &dz, F32_TOL);
        // Deterministic: a second run gives the same bits.
        assert_eq!(read(&tloss)[0].to_bits(), read(&tloss2)[0].to_bits(), "{tag}: loss not deterministic");
        assert_eq!(bits(&read(&tdz)), bits(&read(&tdz2)), "{tag}: dlogits not deterministic");
    }
}

/// The whole head on the GPU, forward and backward, against the composed reference; the next
/// batch's labels written into the same buffer.
#[test]
fn head_composed() {
    let g = gpu();
    let mut rng = Rng::new(14);
    let (n, c, h, w, k) = (3, 16, 5, 7, 10);
    let xd = [n, c, h, w];
    let (x, wt, b) = (rng.data(n * c * h * w), rng.data(k * c), rng.data(k));
    let tl = upload_labels(g, &labels(&mut rng, n, k), k).unwrap();
    let lab = labels(&mut rng, n, k);
    tl.write(g, &lab).unwrap();
    let (tx, tw, tb) = (upload(&xd, &x), upload(&[k, c], &wt), upload(&[k], &b));
    let (tp, tz, tloss, tdz) = (poisoned(&[n, c]), poisoned(&[n, k]), poisoned(&[1]), poisoned(&[n, k]));
    let (tdp, tdw, tdb, tdx) = (poisoned(&[n, c]), poisoned(&[k, c]), poisoned(&[k]), poisoned(&xd));
    let mut rec = g.recorder("head");
    head::pool_forward(&mut rec, &tx, &tp).unwrap();
    head::fc_forward(&mut rec, &tp, &tw, &tb, &tz).unwrap();
    head::softmax_xent(&mut rec, &tz, &tl, &tloss, &tdz).unwrap();
    head::fc_backward(&mut rec, &tp, &tw, &tdz, &tdp, &tdw, &tdb, false, false).unwrap();
    head::pool_backward(&mut rec, &tdp, &tdx, false).unwrap();
    rec.run().unwrap();
    let f = RefHead::new(n, c, h * w, k, lab);
    let (loss, dx, dw, db) = f.grad(&to_f64(&x), &to_f64(&wt), &to_f64(&b));
    check("head loss", &read(&tloss), &[loss], F32_TOL);
    check("head dx", &read(&tdx), &dx, F32_TOL);
    check("head dw", &read(&tdw), &dw, F32_TOL);
    check("head db", &read(&tdb), &db, F32_TOL);
}

/// The reference head, pool -> fc -> softmax cross-entropy, as a function of (x, w, b).
struct RefHead {
    n: usize,
    c: usize,
    hw: usize,
    k: usize,
    labels: Vec<u32>,
}

impl RefHead {
    fn new(n: usize, c: usize, hw: usize, k: usize, labels: Vec<u32>) -> RefHead {
        RefHead { n, c, hw, k, labels }
    }

    fn loss(&self, x: &[f64], w: &[f64], b: &[f64]) -> f64 {
        let p = r::pool_fc_loss::pool_forward(x, self.n, self.c, self.hw);
        let z = r::pool_fc_loss::fc_forward(&p, w, b, self.n, self.c, self.k);
        r::pool_fc_loss::softmax_xent(&z, &self.labels, self.k).0
    }

    /// `(loss, dx, dw, db)` by the reference backward.
    fn grad(&self, x: &[f64], w: &[f64], b: &[f64]) -> (f64, Vec<f64>, Vec<f64>, Vec<f64>) {
        let p = r::pool_fc_loss::pool_forward(x, self.n, self.c, self.hw);
        let z = r::pool_fc_loss::fc_forward(&p, w, b, self.n, self.c, self.k);
        let (loss, dz) = r::pool_fc_loss::softmax_xent(&z, &self.labels, self.k);
        let (dp, dw, db) = r::pool_fc_loss::fc_backward(&p, w, &dz, self.n, self.c, self.k);
        (loss, r::pool_fc_loss::pool_backward(&dp, self.hw), dw, db)
    }
}

/// Central differences of `f` at `v`, one coordinate at a time.
fn numeric(v: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    const H: f64 = 1e-6;
    let mut v = v.to_vec();
    (0..v.len())
        .map(|i| {
            let o = v[i];
            v[i] = o + H;
            let up = f(&v);
            v[i] = o - H;
            let down = f(&v);
            v[i] = o;
            (up - down) / (2.0 * H)
        })
        .collect()
}

fn close(name: &str, analytic: &[f64], numeric: &[f64]) {
    let (mut num, mut den, mut max) = (0.0f64, 0.0f64, 0.0f64);
    for (a, n) in analytic.iter().zip(numeric) {
        num += (a - n) * (a - n);
        den += n * n;
        max = max.max((a - n).abs());
    }
    let rel = (num / den).sqrt();
    eprintln!("gradcheck {name}: rel L2 {rel:.2e}, max abs {max:.2e}");
    assert!(rel < 1e-6 && max < 1e-7, "gradcheck {name}: rel L2 {rel:.3e}, max abs {max:.3e}");
}

#[test]
fn reference_head_backward_matches_finite_differences() {
    let mut rng = Rng::new(15);
    let (n, c, h, w, k) = (2, 3, 2, 3, 4);
    let x = to_f64(&rng.data(n * c * h * w)).iter().map(|v| 3.0 * v).collect::<Vec<_>>();
    let (wt, b) = (to_f64(&rng.data(k * c)), to_f64(&rng.data(k)));
    let f = RefHead::new(n, c, h * w, k, labels(&mut rng, n, k));
    let (_, dx, dw, db) = f.grad(&x, &wt, &b);
    close("dx", &dx, &numeric(&x, |v| f.loss(v, &wt, &b)));
    close("dw", &dw, &numeric(&wt, |v| f.loss(&x, v, &b)));
    close("db", &db, &numeric(&b, |v| f.loss(&x, &wt, v)));
}

#[test]
fn sgd_steps() {
    let g = gpu();
    let mut rng = Rng::new(16);
    // (length, lr, momentum, weight decay, momentum buffer starts at zero)
    let cases: &[(usize, f32, f32, f32, bool)] = &[
        (1, 0.1, 0.9, 5e-4, true),
        (7, 0.05, 0.9, 1e-4, false),
        (27 * 16, 0.1, 0.9, 5e-4, true),
        (1000, 0.01, 0.0, 0.0, false),
        (333, 0.2, 0.5, 1e-2, false),
    ];
    const STEPS: usize = 5;
    for &(len, lr, mu, wd, zero_m) in cases {
        let w0 = rng.data(len);
        let m0 = if zero_m { vec![0.0; len] } else { rng.data(len) };
        let grads: Vec<Vec<f32>> = (0..STEPS).map(|_| rng.data(len)).collect();
        let (tw, tm) = (upload(&[len], &w0), upload(&[len], &m0));
        let tg: Vec<_> = grads.iter().map(|gr| upload(&[len], gr)).collect();
        let mut rec = g.recorder("sgd");
        for t in &tg {
            sgd::step(&mut rec, &tw, t, &tm, lr, mu, wd).unwrap();
        }
        rec.run().unwrap();
        let (mut w, mut m) = (to_f64(&w0), to_f64(&m0));
        for gr in &grads {
            r::sgd::step(&mut w, &to_f64(gr), &mut m, lr as f64, mu as f64, wd as f64);
        }
        let tag = format!("{len} lr {lr} momentum {mu} wd {wd} zero m {zero_m}");
        check(&format!("sgd w after {STEPS} steps {tag}"), &read(&tw), &w, F32_TOL);
        check(&format!("sgd m after {STEPS} steps {tag}"), &read(&tm), &m, F32_TOL);
    }
}

/// `step_many`, a network's update: 11 tensors of awkward lengths (two dispatches of up to 8, the
/// second with unused slots) after 3 steps, each against the reference; every element of every
/// w and m moves, so one left unwritten fails. Then its refusals.
#[test]
fn sgd_many_steps() {
    let g = gpu();
    let mut rng = Rng::new(17);
    let lens = [1usize, 7, 432, 1000, 333, 5, 9, 64, 100, 17, 2305];
    let (lr, mu, wd) = (0.1f32, 0.9f32, 5e-4f32);
    const STEPS: usize = 3;
    let w0: Vec<Vec<f32>> = lens.iter().map(|&n| rng.data(n)).collect();
    let m0: Vec<Vec<f32>> = lens.iter().map(|&n| rng.data(n)).collect();
    let grads: Vec<Vec<Vec<f32>>> = (0..STEPS).map(|_| lens.iter().map(|&n| rng.data(n)).collect()).collect();
    let tw: Vec<_> = w0.iter().zip(&lens).map(|(v, &n)| upload(&[n], v)).collect();
    let tm: Vec<_> = m0.iter().zip(&lens).map(|(v, &n)| upload(&[n], v)).collect();
    for gs in &grads {
        let tg: Vec<_> = gs.iter().zip(&lens).map(|(v, &n)| upload(&[n], v)).collect();
        let triples: Vec<[&Tensor; 3]> = (0..lens.len()).map(|j| [&tw[j], &tg[j], &tm[j]]).collect();
        let mut rec = g.recorder("sgd many");
        sgd::step_many(&mut rec, &triples, lr, mu, wd).unwrap();
        rec.run().unwrap();
    }
    for (j, &n) in lens.iter().enumerate() {
        let (mut w, mut m) = (to_f64(&w0[j]), to_f64(&m0[j]));
        for gs in &grads {
            r::sgd::step(&mut w, &to_f64(&gs[j]), &mut m, lr as f64, mu as f64, wd as f64);
        }
        check(&format!("sgd many w, tensor {j} of {n}"), &read(&tw[j]), &w, F32_TOL);
        check(&format!("sgd many m, tensor {j} of {n}"), &read(&tm[j]), &m, F32_TOL);
    }
    let t = |n: usize| upload(&[n], &vec![0.5; n]);
    let (a, b, c, d) = (t(4), t(4), t(4), t(4));
    let mut rec = g.recorder("sgd many refusals");
    let shared = sgd::step_many(&mut rec, &[[&a, &b, &c], [&d, &b, &t(4)]], lr, mu, wd);
    assert!(matches!(shared, Err(Error::Invalid(_))), "a gradient shared by two parameters: {shared:?}");
    assert!(matches!(sgd::step_many(&mut rec, &[[&a, &b, &t(5)]], lr, mu, wd), Err(Error::Shape(_))));
    assert!(matches!(sgd::step_many(&mut rec, &[[&a, &a, &c]], lr, mu, wd), Err(Error::Invalid(_))));
    assert!(matches!(sgd::step_many(&mut rec, &[[&a, &b, &c]], -0.1, mu, wd), Err(Error::Invalid(_))));
}

#[test]
fn bad_labels_and_shapes_are_errors() {
    let g = gpu();
    // Labels.
    assert!(matches!(upload_labels(g, &[0, 3, 1], 3), Err(Error::Invalid(_))));
    assert!(matches!(upload_labels(g, &[0, 7], 3), Err(Error::Invalid(_))));
    assert!(matches!(upload_labels(g, &[], 3), Err(Error::Invalid(_))));
    assert!(matches!(upload_labels(g, &[0], 0), Err(Error::Invalid(_))));
    let tl = upload_labels(g, &[0, 2], 3).unwrap();
    assert!(matches!(tl.write(g, &[0, 3]), Err(Error::Invalid(_))));
    assert!(matches!(tl.write(g, &[0]), Err(Error::Length { .. })));

    let t = |dims: &[usize]| upload(dims, &vec![0.5; dims.iter().product()]);
    let mut rec = g.recorder("bad");
    // Pooling: p must be [N,C]; x 4-D.
    let x = t(&[2, 3, 4, 4]);
    assert!(matches!(head::pool_forward(&mut rec, &x, &t(&[2, 4])), Err(Error::Shape(_))));
    assert!(matches!(head::pool_forward(&mut rec, &x, &t(&[2, 3, 1, 1])), Err(Error::Shape(_))));
    assert!(matches!(head::pool_forward(&mut rec, &t(&[6, 16]), &t(&[6, 16])), Err(Error::Shape(_))));
    assert!(matches!(head::pool_backward(&mut rec, &t(&[3, 3]), &x, false), Err(Error::Shape(_))));
    // Fully connected.
    let (p, w, b, z) = (t(&[2, 3]), t(&[5, 3]), t(&[5]), t(&[2, 5]));
    assert!(matches!(head::fc_forward(&mut rec, &p, &t(&[5, 4]), &b, &z), Err(Error::Shape(_))));
    assert!(matches!(head::fc_forward(&mut rec, &p, &t(&[3, 5]), &b, &z), Err(Error::Shape(_))));
    assert!(matches!(head::fc_forward(&mut rec, &p, &w, &t(&[4]), &z), Err(Error::Shape(_))));
    assert!(matches!(head::fc_forward(&mut rec, &p, &w, &b, &t(&[5, 2])), Err(Error::Shape(_))));
    assert!(matches!(head::fc_forward(&mut rec, &t(&[1, 2, 3]), &w, &b, &z), Err(Error::Shape(_))));
    let (dp, dw, db) = (t(&[2, 3]), t(&[5, 3]), t(&[5]));
    assert!(matches!(
        head::fc_backward(&mut rec, &p, &w, &t(&[2, 4]), &dp, &dw, &db, false, false),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        head::fc_backward(&mut rec, &p, &w, &z, &t(&[3, 2]), &dw, &db, false, false),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        head::fc_backward(&mut rec, &p, &w, &z, &dp, &t(&[3, 5]), &db, false, false),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        head::fc_backward(&mut rec, &p, &w, &z, &dp, &dw, &t(&[5, 1]), false, false),
        Err(Error::Shape(_))
    ));
    // One buffer as two operands.
    assert!(matches!(head::fc_backward(&mut rec, &p, &w, &z, &p, &dw, &db, true, false), Err(Error::Invalid(_))));
    // Softmax cross-entropy: label count and classes must match the logits.
    let (loss, dz) = (t(&[1]), t(&[2, 5]));
    let l5 = upload_labels(g, &[4, 0], 5).unwrap();
    assert!(matches!(head::softmax_xent(&mut rec, &z, &tl, &loss, &dz), Err(Error::Shape(_))));
    assert!(matches!(
        head::softmax_xent(&mut rec, &z, &upload_labels(g, &[4, 0, 1], 5).unwrap(), &loss, &dz),
        Err(Error::Shape(_))
    ));
    assert!(matches!(head::softmax_xent(&mut rec, &z, &l5, &t(&[2]), &dz), Err(Error::Shape(_))));
    assert!(matches!(head::softmax_xent(&mut rec, &z, &l5, &loss, &t(&[5, 2])), Err(Error::Shape(_))));
    assert!(matches!(head::softmax_xent(&mut rec, &z, &l5, &loss, &z), Err(Error::Invalid(_))));
    // Two labels over a buffer that holds one (the buffer is a public field).
    let mut short = upload_labels(g, &[1, 4], 5).unwrap();
    short.buffer = upload_labels(g, &[1], 5).unwrap().buffer;
    assert_eq!((short.len(), short.classes()), (2, 5));
    assert!(matches!(head::softmax_xent(&mut rec, &z, &short, &loss, &dz), Err(Error::Length { .. })));
    // SGD.
    let (w, m) = (t(&[5, 3]), t(&[5, 3]));
    assert!(matches!(sgd::step(&mut rec, &w, &t(&[15]), &m, 0.1, 0.9, 0.0), Err(Error::Shape(_))));
    assert!(matches!(sgd::step(&mut rec, &w, &t(&[3, 5]), &m, 0.1, 0.9, 0.0), Err(Error::Shape(_))));
    assert!(matches!(sgd::step(&mut rec, &w, &dw, &t(&[5, 4]), 0.1, 0.9, 0.0), Err(Error::Shape(_))));
    assert!(matches!(sgd::step(&mut rec, &w, &dw, &w, 0.1, 0.9, 0.0), Err(Error::Invalid(_))));
    assert!(matches!(sgd::step(&mut rec, &w, &dw, &m, -0.1, 0.9, 0.0), Err(Error::Invalid(_))));
    assert!(matches!(sgd::step(&mut rec, &w, &dw, &m, f32::NAN, 0.9, 0.0), Err(Error::Invalid(_))));
    assert!(matches!(sgd::step(&mut rec, &w, &dw, &m, 0.1, 0.9, f32::INFINITY), Err(Error::Invalid(_))));
    // Nothing was recorded by the refused calls: the empty recording runs cleanly.
    rec.run().unwrap();
}
