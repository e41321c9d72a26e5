//! Shared test helpers: one GPU context per test binary, seeded data, and the comparison that
//! every GPU result goes through.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use resnet_wgpu::ops::batch_norm::{BnGrads, BnTensors};
use resnet_wgpu::reference::{max_abs, rel_l2};
use resnet_wgpu::{Gpu, Tensor};

pub use resnet_wgpu::rng::Rng;

/// The f32 bound on relative L2 error against the f64 reference.
pub const F32_TOL: f64 = 1e-5;

/// One context for the whole test binary; prints the adapter the first time.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let gpu = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
        // Written to stderr directly, past the test harness's capture, so every run names its
        // adapter.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "adapter: {}", gpu.report);
        gpu
    })
}

/// The bit patterns of `v`, for comparisons that claim the same bits.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `r` refused as an invalid argument or a bad shape whose message says `why`: not just any
/// error (a test of one refusal must not pass on another).
#[track_caller]
pub fn refused<T: std::fmt::Debug>(r: resnet_wgpu::Result<T>, why: &str) {
    match r {
        Err(resnet_wgpu::Error::Invalid(m) | resnet_wgpu::Error::Shape(m)) if m.contains(why) => {}
        other => panic!("expected a refusal saying {why:?}, got {other:?}"),
    }
}

/// Random BN + ReLU prologue values for `c` channels: means and betas in [-0.5, 0.5), scales
/// of both signs with |scale| in [0.5, 1.5), so that the ReLU cuts part of every channel.
pub fn affine_values(rng: &mut Rng, c: usize) -> Vec<f32> {
    (0..c)
        .flat_map(|_| {
            let s = rng.range(-1.0, 1.0);
            [0.5 * rng.range(-1.0, 1.0), s.signum() * 0.5 + s, 0.5 * rng.range(-1.0, 1.0), 0.0].map(|v| v as f32)
        })
        .collect()
}

/// One batch norm layer's per-channel values, all random: |gamma| in [0.5, 1.5) of either sign
/// and beta in [-0.5, 0.5) (so that a ReLU after them cuts some but not all of a channel),
/// running mean in [-1, 1), running variance in [0.5, 1.5).
pub struct BnHost {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub rm: Vec<f32>,
    pub rv: Vec<f32>,
}

impl BnHost {
    pub fn new(rng: &mut Rng, c: usize) -> BnHost {
        BnHost {
            gamma: rng.data(c).iter().map(|v| v.signum() * 0.5 + v).collect(),
            beta: rng.data(c).iter().map(|v| 0.5 * v).collect(),
            rm: rng.data(c),
            rv: rng.data(c).iter().map(|v| 0.5 + v.abs()).collect(),
        }
    }

    /// The reference's training forward of this layer on `x` `dims` (adding into `y_old` where
    /// given, then the ReLU where `relu`).
    pub fn forward_train(
        &self,
        x: &[f32],
        dims: [usize; 4],
        y_old: Option<&[f64]>,
        relu: bool,
    ) -> resnet_wgpu::reference::batch_norm::Train {
        let [g, b, m, v] = [&self.gamma, &self.beta, &self.rm, &self.rv].map(|t| resnet_wgpu::reference::to_f64(t));
        resnet_wgpu::reference::batch_norm::forward_train(
            &resnet_wgpu::reference::to_f64(x),
            dims,
            &g,
            &b,
            &m,
            &v,
            y_old,
            relu,
        )
    }
}

/// A [`BnHost`] on `g`'s device, with the layer's outputs NaN-poisoned: the saved mean and
/// invstd, the prologue values `affine` `[C, 4]`, dgamma, dbeta and the backward's `[2C]`
/// scratch.
pub struct BnDev {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub rm: Tensor,
    pub rv: Tensor,
    pub mean: Tensor,
    pub invstd: Tensor,
    pub affine: Tensor,
    pub dgamma: Tensor,
    pub dbeta: Tensor,
    pub scratch: Tensor,
}

impl BnDev {
    pub fn new(g: &Gpu, h: &BnHost) -> BnDev {
        let c = h.gamma.len();
        let up = |v: &[f32]| Tensor::new(g, &[c], v).expect("upload");
        let nan = |dims: &[usize]| Tensor::filled(g, dims, f32::NAN).expect("poisoned tensor");
        BnDev {
            gamma: up(&h.gamma),
            beta: up(&h.beta),
            rm: up(&h.rm),
            rv: up(&h.rv),
            mean: nan(&[c]),
            invstd: nan(&[c]),
            affine: nan(&[c, 4]),
            dgamma: nan(&[c]),
            dbeta: nan(&[c]),
            scratch: nan(&[2 * c]),
        }
    }

    /// The forward's view (its statistics write no prologue values).
    pub fn tensors(&self) -> BnTensors<'_> {
        BnTensors { gamma: &self.gamma, beta: &self.beta, running_mean: &self.rm, running_var: &self.rv, affine: None }
    }

    /// The backward's view, from the saved statistics.
    pub fn grads(&self) -> BnGrads<'_> {
        BnGrads {
            gamma: &self.gamma,
            beta: &self.beta,
            save_mean: &self.mean,
            save_invstd: &self.invstd,
            dgamma: &self.dgamma,
            dbeta: &self.dbeta,
            scratch: &self.scratch,
        }
    }
}

/// A NaN-poisoned output tensor: an element the kernel forgets to write fails the comparison.
pub fn poisoned(dims: &[usize]) -> Tensor {
    Tensor::filled(gpu(), dims, f32::NAN).expect("poisoned tensor")
}

/// Uploads host data.
pub fn upload(dims: &[usize], data: &[f32]) -> Tensor {
    Tensor::new(gpu(), dims, data).expect("upload")
}

/// Reads back a tensor.
pub fn read(t: &Tensor) -> Vec<f32> {
    t.read(gpu()).expect("read back")
}

/// Asserts `got` (GPU, f32) matches `want` (reference, f64): no NaN, relative L2 <= tol.
/// Prints both error measures.
pub fn check(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let nan = got.iter().filter(|v| !v.is_finite()).count();
    let rel = rel_l2(got, want);
    let max = max_abs(got, want);
    eprintln!("{name}: rel L2 {rel:.2e}, max abs {max:.2e}");
    assert_eq!(nan, 0, "{name}: {nan} non-finite elements (unwritten or overflowed)");
    assert!(rel <= tol, "{name}: relative L2 error {rel:.3e} > {tol:.0e} (max abs {max:.3e})");
}

/// Every tensor of `cfg` with random values (BN scale, shift and running statistics moved off
/// their defaults so that a mix-up between them shows), as f32 for the GPU.
pub fn random_state(cfg: &resnet_wgpu::arch::NetConfig, seed: u64) -> std::collections::HashMap<String, Vec<f32>> {
    use resnet_wgpu::arch::Role;
    let mut rng = Rng::new(seed ^ 0x5eed);
    cfg.tensors()
        .into_iter()
        .zip(cfg.initial_values(seed))
        .map(|(t, v)| {
            let v: Vec<f32> = match t.role {
                Role::BnWeight => v.iter().map(|_| rng.range(0.6, 1.4) as f32).collect(),
                Role::BnBias => v.iter().map(|_| rng.range(-0.3, 0.3) as f32).collect(),
                Role::RunningMean => v.iter().map(|_| rng.range(-0.5, 0.5) as f32).collect(),
                Role::RunningVar => v.iter().map(|_| rng.range(0.5, 2.0) as f32).collect(),
                Role::Count => vec![7.0],
                // Gates near 1/2, where both of their terms show.
                Role::GateBias => v.iter().map(|_| rng.range(-1.0, 1.0) as f32).collect(),
                _ => v,
            };
            (t.name, v)
        })
        .collect()
}

/// The same state widened for the reference.
pub fn to_ref(state: &std::collections::HashMap<String, Vec<f32>>) -> std::collections::HashMap<String, Vec<f64>> {
    state.iter().map(|(k, v)| (k.clone(), resnet_wgpu::reference::to_f64(v))).collect()
}

/// [`check`], except for a gradient that is zero in exact arithmetic, where a relative error
/// means nothing: the BN after the addition removes any per-channel constant added to `y_l`, so
/// the gradient of a projection shortcut's BN bias is exactly zero in that placement, and f32
/// leaves only rounding residue (about 1e-7) there.
pub fn check_grad(name: &str, got: &[f32], want: &[f64]) {
    let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
    if norm > 1e-12 {
        return check(name, got, want, F32_TOL);
    }
    // f32::max drops a NaN: an unwritten (poisoned) gradient must fail here first.
    assert!(got.iter().all(|v| v.is_finite()), "{name}: non-finite values where the gradient is zero");
    let max = got.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    eprintln!("{name}: zero in exact arithmetic, max abs {max:.2e}");
    assert!(max <= 1e-5, "{name}: {max:e} where the gradient is zero");
}

/// How far the f64 reference itself moves when its inputs move by f32 roundings: each element
/// of `v` scaled by `1 + u 2^-24`, `u` uniform in [-1, 1].
pub fn jiggled(v: &[f64], rng: &mut Rng) -> Vec<f64> {
    v.iter().map(|x| x * (1.0 + rng.range(-1.0, 1.0) * f64::from(f32::EPSILON) / 2.0)).collect()
}

/// [`jiggled`] over every tensor of a state but the step count (an integer).
pub fn jiggled_state(
    cfg: &resnet_wgpu::arch::NetConfig,
    state: &std::collections::HashMap<String, Vec<f64>>,
    rng: &mut Rng,
) -> std::collections::HashMap<String, Vec<f64>> {
    use resnet_wgpu::arch::Role;
    let mut out = state.clone();
    for t in cfg.tensors() {
        if let (false, Some(v)) = (t.role == Role::Count, state.get(&t.name)) {
            out.insert(t.name, jiggled(v, rng));
        }
    }
    out
}

/// The f32 pass rounds at every operation, its inputs only once: a gradient's bound is this
/// many times the reference's own change under [`jiggled`] inputs, where that is above
/// [`F32_TOL`] / `SPREAD_FACTOR`.
pub const SPREAD_FACTOR: f64 = 20.0;

/// [`check_grad`] for a whole network's gradient, whose bound scales with its conditioning:
/// [`F32_TOL`], or [`SPREAD_FACTOR`] times the relative L2 change of the reference's `want`
/// under jiggled inputs (`spread`: the reference's result for them), whichever is larger. A
/// gradient of a BN over a handful of values per channel can move 1e-6 from one rounding of
/// its inputs; a wrong kernel moves it by far more.
pub fn check_grad_conditioned(name: &str, got: &[f32], want: &[f64], spread: &[f64]) {
    let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
    let diff = want.iter().zip(spread).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
    if norm <= 1e-12 {
        return check_grad(name, got, want);
    }
    let tol = (SPREAD_FACTOR * diff / norm).max(F32_TOL);
    // A cap, about twice the worst case here (1.4e-4: a batch-1 bottleneck network's first BN
    // on Winograd; the rest stay under 9e-5): without one, a badly conditioned case would
    // loosen its bound toward 1, where an output of zeros passes. Such a case must change.
    assert!(tol < 3e-4, "{name}: the reference moves {:.2e} under jiggled inputs", diff / norm);
    if tol > F32_TOL {
        eprintln!("{name}: the reference moves {:.2e} under jiggled inputs: bound {tol:.1e}", diff / norm);
    }
    check(name, got, want, tol);
}

/// The unit's learned tensors under their PyTorch names, gate included.
pub fn unit_params(u: &resnet_wgpu::unit::Unit) -> Vec<(String, &resnet_wgpu::unit::Param)> {
    let p = &u.spec.name;
    let mut v = Vec::new();
    for (i, (c, b)) in u.convs.iter().zip(&u.bns).enumerate() {
        v.push((format!("{p}.conv{}.weight", i + 1), &c.w));
        v.push((format!("{p}.bn{}.weight", i + 1), &b.gamma));
        v.push((format!("{p}.bn{}.bias", i + 1), &b.beta));
    }
    match (&u.proj, &u.proj_bn) {
        (Some(c), None) => v.push((format!("{p}.shortcut.weight"), &c.w)),
        (Some(c), Some(b)) => {
            v.push((format!("{p}.shortcut.0.weight"), &c.w));
            v.push((format!("{p}.shortcut.1.weight"), &b.gamma));
            v.push((format!("{p}.shortcut.1.bias"), &b.beta));
        }
        _ => {}
    }
    if let Some(gt) = &u.gate {
        v.push((format!("{p}.gate.weight"), &gt.w));
        v.push((format!("{p}.gate.bias"), &gt.b));
    }
    v
}

/// One unit of `cfg` (weights from `seed`) at input dims `xd`, training forward and backward
/// on the GPU against the reference, outputs poisoned first: `x_{l+1}`, `dE/dx_l`, every
/// parameter gradient and the running statistics, within [`F32_TOL`].
pub fn check_unit(
    cfg: &resnet_wgpu::arch::NetConfig,
    spec: &resnet_wgpu::arch::UnitSpec,
    xd: [usize; 4],
    seed: u64,
    rng: &mut Rng,
) {
    check_unit_on(gpu(), cfg, spec, xd, seed, rng)
}

/// [`check_unit`] on context `g`.
pub fn check_unit_on(
    g: &Gpu,
    cfg: &resnet_wgpu::arch::NetConfig,
    spec: &resnet_wgpu::arch::UnitSpec,
    xd: [usize; 4],
    seed: u64,
    rng: &mut Rng,
) {
    use resnet_wgpu::arch::Shortcut;
    use resnet_wgpu::reference::{net as rnet, to_f64};
    use resnet_wgpu::unit::{Mode, Unit, Workspace};
    let upload = |d: &[usize], v: &[f32]| Tensor::new(g, d, v).expect("upload");
    let poisoned = |d: &[usize]| Tensor::filled(g, d, f32::NAN).expect("poisoned tensor");
    let read = |t: &Tensor| t.read(g).expect("read back");
    let state = random_state(cfg, seed);
    let params = to_ref(&state);
    let unit = Unit::from_state(g, spec, &state).unwrap();
    let mut ws = Workspace::default();
    let kept = unit.allocate(g, xd, &mut ws).unwrap();
    let yd = unit.out_dims(xd);
    let x = rng.data(xd.iter().product());
    let dy = rng.data(yd.iter().product());
    let tx = upload(&xd, &x);
    let ty = poisoned(&yd);
    let tg_out = upload(&yd, &dy);
    let identity = spec.shortcut == Shortcut::Identity;
    let tg_in_own = poisoned(&xd);
    let tg_in = if identity { &tg_out } else { &tg_in_own };
    for (_, p) in unit_params(&unit) {
        p.grad.fill(g, f32::NAN).unwrap();
    }

    let mut rec = g.recorder("unit forward");
    unit.forward(&mut rec, Mode::Train, &tx, &ty, &kept, &ws).unwrap();
    let fwd = rec.finish();
    let mut rec = g.recorder("unit backward");
    unit.backward(&mut rec, &tx, &ty, &tg_out, tg_in, &kept, &ws).unwrap();
    g.submit([fwd, rec.finish()]).unwrap();

    let want = rnet::unit_forward(spec, &params, &to_f64(&x), xd, true);
    let (want_dx, want_grads) = rnet::unit_backward(spec, &params, &want.saved, &to_f64(&dy));
    let tag = format!("{:?} {} {:?} {:?}", spec.kind, spec.name, spec.shortcut, xd);
    check(&format!("{tag} x_l+1"), &read(&ty), &want.out, F32_TOL);
    check(&format!("{tag} dE/dx_l"), &read(tg_in), &want_dx, F32_TOL);
    for (name, p) in unit_params(&unit) {
        check(&format!("{tag} grad {name}"), &read(&p.grad), &want_grads[&name], F32_TOL);
    }
    for (name, t) in unit_buffers(&unit) {
        check(&format!("{tag} {name}"), &read(t), &want.buffers[&name], F32_TOL);
    }
}

/// The unit's running statistics under their PyTorch names.
pub fn unit_buffers(u: &resnet_wgpu::unit::Unit) -> Vec<(String, &resnet_wgpu::Tensor)> {
    let p = &u.spec.name;
    let mut bns: Vec<(String, &resnet_wgpu::unit::Bn)> =
        u.bns.iter().enumerate().map(|(i, b)| (format!("{p}.bn{}", i + 1), b)).collect();
    if let Some(b) = &u.proj_bn {
        bns.push((format!("{p}.shortcut.1"), b));
    }
    bns.into_iter()
        .flat_map(|(n, b)| {
            [(format!("{n}.running_mean"), &b.running_mean), (format!("{n}.running_var"), &b.running_var)]
        })
        .collect()
}

/// A network of one unit per stage (every shape-changing unit variant) with the plain sum, on
/// 3-channel images: the tests' small whole networks.
pub fn one_unit_per_stage(
    kind: resnet_wgpu::arch::UnitKind,
    bottleneck: bool,
    shortcut: resnet_wgpu::arch::ShortcutOption,
    widths: [usize; 3],
    classes: usize,
) -> resnet_wgpu::arch::NetConfig {
    resnet_wgpu::arch::NetConfig {
        kind,
        combine: resnet_wgpu::arch::Combine::Add,
        units_per_stage: 1,
        bottleneck,
        shortcut,
        widths,
        in_channels: 3,
        classes,
    }
}

/// A fresh directory under the system's temp dir, removed with everything in it when dropped,
/// so that a run of the suite leaves nothing behind. Derefs to its path.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `resnet-wgpu-<tag>-<pid>-<nanos>`: unique per test and per run.
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("resnet-wgpu-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Asserts that a context forcing the register path ran its three convolution ops (its profile
/// taken, `what` for the message), where the adapter's subgroups allow the path and dispatches
/// can be timed.
pub fn assert_register_path_ran(g: &Gpu, what: &str) {
    let spans = resnet_wgpu::profile::take(g).unwrap();
    let lanes = g.report.features.contains(wgpu::Features::SUBGROUP) && g.adapter.get_info().subgroup_min_size >= 8;
    if g.has_timestamps() && lanes {
        for entry in ["rp_forward", "rp_backward_data", "rp_backward_weight"] {
            assert!(spans.iter().any(|s| s.label.starts_with(entry)), "no {entry} dispatch in {what}");
        }
    }
}
