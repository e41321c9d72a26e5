//! The CPU reference of whole networks (`reference::net`) against central finite differences
//! in f64: the gradient of `train_pass`'s loss with respect to every learned parameter and the
//! images, on tiny networks of every kind (pre-activation and original, shortcut A and B, basic
//! and bottleneck units); the per-unit backward alone; the stream identity of pre-activation
//! units; the running statistics' update; eval mode's independence of the batch; and the
//! paper's variants (every placement and shortcut combination), unit by unit and whole.

use resnet_wgpu::arch::{Combine, NetConfig, Role, Shortcut, ShortcutOption, UnitKind};
use resnet_wgpu::reference::net::{self, Dims, Tensors};
use resnet_wgpu::reference::{batch_norm, conv};
use resnet_wgpu::rng::Rng;

/// The finite-difference step. Central differences err by `h^2 f''' / 6` plus rounding
/// `~ 1e-16 |E| / h`. 1e-6 rather than 1e-5: in bottleneck nets with `widths[0] = 1`, an option-A
/// unit's zero channels carry `w_c * a` alone, which the next BN normalises with
/// `var = w_c^2 var(a) + eps`: for a small `w_c` that is strongly curved in `w_c` (at 1e-5 the
/// truncation error reached 8e-7 of a 0.16 gradient; at 1e-6 it is 8e-9, rounding about 1e-10).
const H: f64 = 1e-6;
/// Bound on `max |fd - analytic|` relative to `max(1e-2, max |analytic|)`, per tensor.
const TOL: f64 = 1e-6;

fn config(kind: UnitKind, bottleneck: bool, shortcut: ShortcutOption, widths: [usize; 3]) -> NetConfig {
    NetConfig {
        kind,
        combine: Combine::Add,
        units_per_stage: 1,
        bottleneck,
        shortcut,
        widths,
        in_channels: 3,
        classes: 3,
    }
}

/// Every tensor of `cfg`: He-initialised convolutions and PyTorch's FC initialisation, with BN
/// weights, biases and running statistics moved off their trivial initial values so that
/// every term of the equations shows.
fn params(cfg: &NetConfig, seed: u64) -> Tensors {
    let mut rng = Rng::new(seed ^ 0x5eed);
    cfg.tensors()
        .into_iter()
        .zip(cfg.initial_values(seed))
        .map(|(t, v)| {
            let v: Vec<f64> = match t.role {
                Role::BnWeight => v.iter().map(|_| rng.range(0.6, 1.4)).collect(),
                Role::BnBias => v.iter().map(|_| rng.range(-0.3, 0.3)).collect(),
                Role::RunningMean => v.iter().map(|_| rng.range(-0.5, 0.5)).collect(),
                Role::RunningVar => v.iter().map(|_| rng.range(0.5, 2.0)).collect(),
                Role::Count => vec![7.0],
                // Gates near 1/2, where both of their terms show.
                Role::GateBias => v.iter().map(|_| rng.range(-1.0, 1.0)).collect(),
                _ => v.iter().map(|&x| x as f64).collect(),
            };
            (t.name, v)
        })
        .collect()
}

fn data(rng: &mut Rng, len: usize) -> Vec<f64> {
    rng.data(len).iter().map(|&v| v as f64).collect()
}

/// `(max |fd - an|, max |an|)`, asserting the first is within `TOL` of the second (or of 1e-2
/// where the gradient is smaller).
fn compare(what: &str, fd: &[f64], an: &[f64]) -> (f64, f64) {
    assert_eq!(fd.len(), an.len(), "{what}: length");
    let err = fd.iter().zip(an).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    let scale = an.iter().fold(0.0f64, |m, a| m.max(a.abs()));
    assert!(err.is_finite() && scale.is_finite(), "{what}: non-finite");
    assert!(
        err <= TOL * scale.max(1e-2),
        "{what}: finite differences differ by {err:.3e} (gradient scale {scale:.3e})"
    );
    (err, scale)
}

/// Central differences of `f` at every element of `v`.
fn finite_differences(v: &mut [f64], mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    (0..v.len())
        .map(|j| {
            let x = v[j];
            v[j] = x + H;
            let plus = f(v);
            v[j] = x - H;
            let minus = f(v);
            v[j] = x;
            (plus - minus) / (2.0 * H)
        })
        .collect()
}

/// Checks `train_pass`'s gradients of network `cfg` on N=2 images of `h` x `w` against central
/// differences of its loss, for every learned tensor and the images.
fn gradcheck(cfg: &NetConfig, h: usize, w: usize, seed: u64) {
    cfg.validate().unwrap();
    let start = std::time::Instant::now();
    let mut rng = Rng::new(seed);
    let mut p = params(cfg, seed);
    let dims = [2, cfg.in_channels, h, w];
    let mut images = data(&mut rng, dims.iter().product());
    let labels = [rng.below(cfg.classes), rng.below(cfg.classes)];
    let pass = net::train_pass(cfg, &p, &images, dims, &labels);
    assert!(pass.loss.is_finite());
    let (mut worst, mut count) = (0.0f64, 0);
    for t in cfg.tensors().iter().filter(|t| t.role.learned()) {
        let mut v = p.remove(&t.name).unwrap();
        let fd = finite_differences(&mut v, |v| {
            p.insert(t.name.clone(), v.to_vec());
            net::train_pass(cfg, &p, &images, dims, &labels).loss
        });
        p.insert(t.name.clone(), v);
        let (err, scale) = compare(&format!("{:?} {:?} {}", cfg.kind, cfg.combine, t.name), &fd, &pass.grads[&t.name]);
        worst = worst.max(err / scale.max(1e-2));
        count += fd.len();
    }
    let fd = finite_differences(&mut images, |x| net::train_pass(cfg, &p, x, dims, &labels).loss);
    let (err, scale) = compare("images", &fd, &pass.grad_images);
    worst = worst.max(err / scale.max(1e-2));
    count += fd.len();
    eprintln!(
        "{:?} {:?} bottleneck={} shortcut={:?} widths={:?} {h}x{w}: {count} values, worst relative error \
         {worst:.2e}, loss {:.4}, {:.2?}",
        cfg.kind,
        cfg.combine,
        cfg.bottleneck,
        cfg.shortcut,
        cfg.widths,
        pass.loss,
        start.elapsed()
    );
}

#[test]
fn preact_basic_projection() {
    gradcheck(&config(UnitKind::PreAct, false, ShortcutOption::B, [2, 3, 4]), 5, 5, 1);
}

#[test]
fn preact_basic_subsample() {
    gradcheck(&config(UnitKind::PreAct, false, ShortcutOption::A, [2, 3, 4]), 6, 6, 2);
}

#[test]
fn original_basic_projection() {
    gradcheck(&config(UnitKind::Original, false, ShortcutOption::B, [2, 3, 4]), 5, 6, 3);
}

#[test]
fn original_basic_subsample() {
    gradcheck(&config(UnitKind::Original, false, ShortcutOption::A, [2, 3, 4]), 7, 7, 4);
}

#[test]
fn preact_bottleneck_projection() {
    gradcheck(&config(UnitKind::PreAct, true, ShortcutOption::B, [1, 2, 2]), 5, 5, 5);
}

#[test]
fn preact_bottleneck_subsample() {
    gradcheck(&config(UnitKind::PreAct, true, ShortcutOption::A, [1, 2, 2]), 5, 5, 6);
}

#[test]
fn original_bottleneck_projection() {
    gradcheck(&config(UnitKind::Original, true, ShortcutOption::B, [1, 2, 2]), 6, 5, 7);
}

#[test]
fn original_bottleneck_subsample() {
    gradcheck(&config(UnitKind::Original, true, ShortcutOption::A, [1, 2, 2]), 5, 5, 8);
}

/// `unit_forward`/`unit_backward` alone: the gradients of `E = sum(r * x_{l+1})` with respect to
/// the unit's input and parameters, for every unit of small networks.
#[test]
fn units_alone() {
    for (kind, bottleneck, shortcut) in [
        (UnitKind::PreAct, false, ShortcutOption::B),
        (UnitKind::Original, false, ShortcutOption::A),
        (UnitKind::PreAct, true, ShortcutOption::A),
        (UnitKind::Original, true, ShortcutOption::B),
    ] {
        let cfg = config(kind, bottleneck, shortcut, if bottleneck { [1, 2, 2] } else { [2, 3, 4] });
        check_units_alone(&cfg, 21);
    }
}

/// The paper's variants (Tables 1 and 2), unit by unit: every placement with option A and B,
/// and in bottleneck units and under a combination; every combination on the original and the
/// pre-activation unit, with option A, and the shortcut gate and scaling with projections (B).
#[test]
fn variant_units_alone() {
    let mut cases = Vec::new();
    for kind in [UnitKind::BnAfterAdd, UnitKind::ReluBeforeAdd, UnitKind::ReluOnlyPreAct] {
        for shortcut in [ShortcutOption::A, ShortcutOption::B] {
            cases.push((kind, Combine::Add, shortcut, false));
        }
        cases.push((kind, Combine::Add, ShortcutOption::B, true));
        cases.push((kind, Combine::ShortcutGate { bias: 0.5 }, ShortcutOption::B, false));
    }
    for kind in [UnitKind::Original, UnitKind::PreAct] {
        for combine in [
            Combine::Scale { h: 0.5, f: 0.75 },
            Combine::ExclusiveGate { bias: -6.0 },
            Combine::ShortcutGate { bias: -6.0 },
            Combine::Dropout { rate: 0.5 },
        ] {
            cases.push((kind, combine, ShortcutOption::A, false));
        }
        cases.push((kind, Combine::Add, ShortcutOption::C, false));
        // A projection's gradient through a gate or a scale (the original's shortcut BN too).
        cases.push((kind, Combine::ShortcutGate { bias: 0.5 }, ShortcutOption::B, false));
        cases.push((kind, Combine::Scale { h: 0.5, f: 0.75 }, ShortcutOption::B, false));
    }
    for (i, (kind, combine, shortcut, bottleneck)) in cases.into_iter().enumerate() {
        let cfg = NetConfig { combine, ..config(kind, bottleneck, shortcut, [2, 3, 4]) };
        check_units_alone(&cfg, 60 + i as u64);
    }
}

/// `unit_forward`/`unit_backward` alone: the gradients of `E = sum(r * x_{l+1})` with respect to
/// the unit's input and parameters, for every unit of `cfg`.
fn check_units_alone(cfg: &NetConfig, seed: u64) {
    let mut p = params(cfg, seed);
    let mut rng = Rng::new(seed + 1);
    for (l, spec) in cfg.units().into_iter().enumerate() {
        let xd: Dims = [2, spec.c_in, 5, 5];
        let mut x = data(&mut rng, xd.iter().product());
        let seed = l as u32 + 3;
        let u = net::unit_forward_seeded(&spec, &p, &x, xd, true, seed);
        let r = data(&mut rng, u.out.len());
        let energy = |p: &Tensors, x: &[f64]| {
            let out = net::unit_forward_seeded(&spec, p, x, xd, true, seed).out;
            out.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>()
        };
        let (dx, grads) = net::unit_backward(&spec, &p, &u.saved, &r);
        let what = format!("{:?} {:?} {} ({:?})", spec.kind, spec.combine, spec.name, spec.shortcut);
        let fd = finite_differences(&mut x, |x| energy(&p, x));
        compare(&format!("{what} dx"), &fd, &dx);
        let mut names: Vec<_> = grads.keys().cloned().collect();
        names.sort();
        for name in names {
            let mut v = p.remove(&name).unwrap();
            let fd = finite_differences(&mut v, |v| {
                p.insert(name.clone(), v.to_vec());
                energy(&p, &x)
            });
            p.insert(name.clone(), v);
            compare(&format!("{what} {name}"), &fd, &grads[&name]);
        }
        // Every learned tensor of the unit has its gradient.
        let own = cfg.tensors().into_iter().filter(|t| t.role.learned() && t.name.starts_with(&spec.name));
        assert_eq!(own.count(), grads.len(), "{what}: gradients");
    }
}

/// Whole networks of the paper's variants: each placement of Table 2, each combination of
/// Table 1 (on the original unit, as the paper's), and a gated pre-activation network.
#[test]
fn variant_networks() {
    for (i, kind) in [UnitKind::BnAfterAdd, UnitKind::ReluBeforeAdd, UnitKind::ReluOnlyPreAct].into_iter().enumerate() {
        gradcheck(&config(kind, false, ShortcutOption::B, [2, 3, 4]), 5, 5, 80 + i as u64);
    }
    // A newer placement on option A, and one under a combination (fed by the after-add BN).
    gradcheck(&config(UnitKind::ReluBeforeAdd, false, ShortcutOption::A, [2, 3, 4]), 5, 5, 83);
    let dropped = NetConfig {
        combine: Combine::Dropout { rate: 0.3 },
        ..config(UnitKind::BnAfterAdd, false, ShortcutOption::B, [2, 3, 4])
    };
    gradcheck(&dropped, 5, 5, 84);
    for (i, combine) in [
        Combine::Scale { h: 0.5, f: 0.5 },
        Combine::ExclusiveGate { bias: -6.0 },
        Combine::ShortcutGate { bias: -6.0 },
        Combine::Dropout { rate: 0.5 },
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = NetConfig { combine, ..config(UnitKind::Original, false, ShortcutOption::A, [2, 3, 4]) };
        gradcheck(&cfg, 5, 5, 90 + i as u64);
    }
    gradcheck(&config(UnitKind::Original, false, ShortcutOption::C, [2, 3, 4]), 5, 5, 95);
    let gated = NetConfig {
        combine: Combine::ExclusiveGate { bias: 0.0 },
        ..config(UnitKind::PreAct, false, ShortcutOption::B, [2, 3, 4])
    };
    gradcheck(&gated, 5, 5, 96);
}

/// Pre-activation units with identity shortcuts add their branches to the stream:
/// `x_L = x_l + sum_{i >= l} F(x_i)` within stage 1.
#[test]
fn preact_stream_identity() {
    let mut cfg = config(UnitKind::PreAct, false, ShortcutOption::B, [2, 3, 4]);
    cfg.units_per_stage = 3;
    let units = cfg.units();
    assert!(units[..3].iter().all(|u| u.shortcut == Shortcut::Identity));
    let mut rng = Rng::new(31);
    let dims = [2, 3, 6, 6];
    let images = data(&mut rng, dims.iter().product());
    let pass = net::train_pass(&cfg, &params(&cfg, 31), &images, dims, &[1, 2]);
    let last = &pass.streams[3];
    for l in 0..=3 {
        let mut sum = pass.streams[l].clone();
        for b in &pass.branches[l..3] {
            sum.iter_mut().zip(b).for_each(|(s, v)| *s += v);
        }
        let err = sum.iter().zip(last).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-12, "x_3 - (x_{l} + sum F): {err:e}");
    }
    // The branches are not trivially zero.
    assert!(pass.branches[..3].iter().all(|b| b.iter().any(|v| v.abs() > 1e-3)));
}

/// Per channel: batch mean and unbiased variance by hand.
fn channel_stats(x: &[f64], d: Dims) -> (Vec<f64>, Vec<f64>) {
    let [n, c, h, w] = d;
    let m = (n * h * w) as f64;
    let vals = |ch: usize| (0..n).flat_map(move |b| (0..h * w).map(move |s| x[(b * c + ch) * h * w + s]));
    let mean: Vec<f64> = (0..c).map(|ch| vals(ch).sum::<f64>() / m).collect();
    let var = (0..c).map(|ch| vals(ch).map(|v| (v - mean[ch]).powi(2)).sum::<f64>() / (m - 1.0)).collect();
    (mean, var)
}

/// Asserts the running statistics of BN `prefix` after a pass equal
/// `0.9 * old + 0.1 * batch statistic` (unbiased variance) of its input `x`.
fn check_running(prefix: &str, p: &Tensors, buffers: &Tensors, x: &[f64], d: Dims) {
    let (mean, var) = channel_stats(x, d);
    let key = |s: &str| format!("{prefix}.{s}");
    for (stat, batch) in [("running_mean", &mean), ("running_var", &var)] {
        let (old, new) = (&p[&key(stat)], &buffers[&key(stat)]);
        assert_eq!(new.len(), d[1]);
        for ch in 0..d[1] {
            let want = 0.9 * old[ch] + 0.1 * batch[ch];
            assert!((new[ch] - want).abs() <= 1e-12, "{prefix}.{stat}[{ch}]: {} != {want}", new[ch]);
        }
    }
    assert_eq!(buffers[&key("num_batches_tracked")], vec![p[&key("num_batches_tracked")][0] + 1.0]);
}

#[test]
fn running_statistics() {
    let mut rng = Rng::new(41);
    let dims = [2, 3, 5, 5];
    let images = data(&mut rng, dims.iter().product());
    for kind in [UnitKind::Original, UnitKind::PreAct] {
        let cfg = config(kind, false, ShortcutOption::B, [2, 3, 4]);
        let p = params(&cfg, 41);
        let pass = net::train_pass(&cfg, &p, &images, dims, &[0, 1]);
        // Every buffer is reported, and no learned tensor.
        for t in cfg.tensors() {
            assert_eq!(pass.buffers.contains_key(&t.name), !t.role.learned(), "{}", t.name);
        }
        match kind {
            UnitKind::Original => {
                // The stem's bn1 normalises conv1(images).
                let wd = [2, 3, 3, 3];
                let c = conv::forward(&images, dims, &p["conv1.weight"], wd, 1);
                check_running("bn1", &p, &pass.buffers, &c, [2, 2, 5, 5]);
            }
            _ => {
                // layer1.0.bn1 normalises x_0, the final bn normalises x_L.
                check_running("layer1.0.bn1", &p, &pass.buffers, &pass.streams[0], pass.stream_dims[0]);
                let l = pass.streams.len() - 1;
                check_running("bn", &p, &pass.buffers, &pass.streams[l], pass.stream_dims[l]);
            }
        }
        assert_eq!(batch_norm::MOMENTUM, 0.1);
    }
}

/// Eval mode uses the running statistics: each image's logits do not depend on the rest of the
/// batch (training mode's do).
#[test]
fn eval_is_per_image() {
    let mut rng = Rng::new(51);
    for kind in [UnitKind::Original, UnitKind::PreAct] {
        let cfg = config(kind, false, ShortcutOption::A, [2, 3, 4]);
        let p = params(&cfg, 51);
        let dims = [3, 3, 5, 5];
        let images = data(&mut rng, dims.iter().product());
        let all = net::eval_logits(&cfg, &p, &images, dims);
        let per = 3 * 25;
        for b in 0..3 {
            let one = net::eval_logits(&cfg, &p, &images[b * per..(b + 1) * per], [1, 3, 5, 5]);
            for k in 0..3 {
                assert!((one[k] - all[b * 3 + k]).abs() <= 1e-12, "{kind:?}: image {b} logit {k}");
            }
        }
        // Training mode differs (batch statistics).
        let train = net::forward(&cfg, &p, &images, dims, true).logits;
        assert!(train.iter().zip(&all).any(|(a, b)| (a - b).abs() > 1e-6));
    }
}
