//! CPU reference for the whole network of [`crate::arch`] (f64): stem, residual units, head,
//! forward and backward, in training mode (batch statistics) and eval mode (running statistics).
//! Built only from the per-op references of this module's siblings; every step is written out
//! in the order of the equations, so that it can be read against them.
//!
//! A unit `l` computes `y_l = s_h h(x_l) + s_f F(x_l)` and `x_{l+1} = f(y_l)` (`s_h = s_f = 1`
//! but for the combinations of [`crate::arch::Combine`], see `reference::mix`). `F` is its
//! layers in turn: `a_i = pre_i(in_i)`, `o_i = conv_i(a_i)`, `in_{i+1} = post_i(o_i)`, with
//! `in_1 = x` and `F = in_{k+1}`; by placement ([`UnitKind`]):
//!
//! | placement | `pre_i` | `post_i` | `f` |
//! |---|---|---|---|
//! | pre-activation | ReLU(bn_i) | identity | identity |
//! | original | identity | bn_i, then ReLU but after the last layer | ReLU |
//! | BN after addition | identity | ReLU(bn_i) but the last layer: identity | ReLU(bn_k) |
//! | ReLU before addition | identity | ReLU(bn_i) | identity |
//! | ReLU-only pre-activation | ReLU | bn_i | identity |
//!
//! Shortcuts: option A ([`Shortcut::Subsample`]) subsamples the raw `x` by the unit stride and
//! pads the channels with zeros; a projection is `shortcut.weight` (1x1, with the unit's
//! stride) applied to `a_1` in pre-activation units, `shortcut.1(shortcut.0(x))` (BN of a 1x1
//! conv) in the others. A gate is `sigmoid(gate.weight * x + gate.bias)` (1x1, with the unit's
//! stride).
//!
//! The network: `x_0 = conv1(images)` (pre-activation) or `ReLU(bn1(conv1(images)))` (the
//! others); the units; then `z = ReLU(bn(x_L))` (pre-activation), `ReLU(x_L)` (ReLU-only
//! pre-activation) or `x_L`, global average pooling, `logits = p W^T + b` and softmax
//! cross-entropy against integer labels, mean over the batch.
//!
//! Parameters and buffers are a map from the names of [`NetConfig::tensors`] to their values in
//! PyTorch's layouts (conv weights OIHW, `fc.weight` [classes, C], `num_batches_tracked` one
//! value).

use std::collections::HashMap;

use super::{batch_norm as bn, conv, gate, mix, pool_fc_loss as head, relu, residual};
use crate::arch::{Layer, NetConfig, Role, Shortcut, UnitKind, UnitSpec};
use crate::rng::dropout_seed;

/// Named tensors: parameters, buffers or gradients, keyed by [`NetConfig::tensors`] names.
pub type Tensors = HashMap<String, Vec<f64>>;

/// Dimensions `[n, c, h, w]` of an activation.
pub type Dims = [usize; 4];

fn get<'a>(params: &'a Tensors, name: &str) -> &'a [f64] {
    params.get(name).unwrap_or_else(|| panic!("reference net: no tensor named {name}"))
}

fn numel(d: Dims) -> usize {
    d.iter().product()
}

/// The weight dimensions (OIHW) of a layer.
fn weight_dims(l: Layer) -> [usize; 4] {
    [l.c_out, l.c_in, l.k, l.k]
}

/// The 1x1 projection of a unit's shortcut.
fn projection(u: &UnitSpec) -> Layer {
    Layer { c_in: u.c_in, c_out: u.c_out, k: 1, stride: u.stride }
}

/// The stem's convolution.
fn stem_layer(cfg: &NetConfig) -> Layer {
    Layer { c_in: cfg.in_channels, c_out: cfg.stem_channels(), k: 3, stride: 1 }
}

/// `conv(x)` with the weight `name` of layer `l`; returns the output and its dimensions.
fn conv_forward(params: &Tensors, name: &str, x: &[f64], xd: Dims, l: Layer) -> (Vec<f64>, Dims) {
    assert_eq!(xd[1], l.c_in, "reference net: {name}: input channels");
    let y = conv::forward(x, xd, get(params, name), weight_dims(l), l.stride);
    let out = |s: usize| (s + 2 * (l.k / 2) - l.k) / l.stride + 1;
    let yd = [xd[0], l.c_out, out(xd[2]), out(xd[3])];
    assert_eq!(y.len(), numel(yd), "reference net: {name}: output size");
    (y, yd)
}

/// The backward of [`conv_forward`]: records `dE/dw` in `grads` under `name`, returns `dE/dx`.
fn conv_backward(
    params: &Tensors,
    name: &str,
    x: &[f64],
    xd: Dims,
    dy: &[f64],
    l: Layer,
    grads: &mut Tensors,
) -> Vec<f64> {
    let wd = weight_dims(l);
    grads.insert(name.to_string(), conv::backward_weight(x, xd, dy, wd, l.stride));
    conv::backward_data(dy, get(params, name), wd, xd, l.stride)
}

/// BN `prefix` of `x`, then ReLU if `relu`. Training mode uses the batch statistics and records
/// the updated `running_mean`, `running_var` and `num_batches_tracked` in `buffers`; eval mode
/// uses the running statistics and records nothing.
fn bn_forward(
    params: &Tensors,
    prefix: &str,
    x: &[f64],
    d: Dims,
    relu: bool,
    train: bool,
    buffers: &mut Tensors,
) -> Vec<f64> {
    let name = |s: &str| format!("{prefix}.{s}");
    let (gamma, beta) = (get(params, &name("weight")), get(params, &name("bias")));
    let (rm, rv) = (get(params, &name("running_mean")), get(params, &name("running_var")));
    assert_eq!(gamma.len(), d[1], "reference net: {prefix}: channels");
    if !train {
        return bn::forward_eval(x, d, gamma, beta, rm, rv, None, relu);
    }
    let t = bn::forward_train(x, d, gamma, beta, rm, rv, None, relu);
    let count = get(params, &name("num_batches_tracked"))[0] + 1.0;
    buffers.insert(name("running_mean"), t.running_mean);
    buffers.insert(name("running_var"), t.running_var);
    buffers.insert(name("num_batches_tracked"), vec![count]);
    t.y
}

/// The backward of [`bn_forward`] in training mode (`x` its input): records `dE/dgamma` and
/// `dE/dbeta` in `grads`, returns `dE/dx`.
fn bn_backward(
    params: &Tensors,
    prefix: &str,
    x: &[f64],
    d: Dims,
    dy: &[f64],
    relu: bool,
    grads: &mut Tensors,
) -> Vec<f64> {
    let (wname, bname) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
    let (dx, dgamma, dbeta) = bn::backward(x, d, dy, get(params, &wname), get(params, &bname), relu);
    grads.insert(wname, dgamma);
    grads.insert(bname, dbeta);
    dx
}

/// What [`unit_forward`] keeps for [`unit_backward`]: the unit's input and every intermediate
/// a backward step reads.
#[derive(Clone, Debug)]
pub struct UnitSaved {
    /// The unit's input `x_l`.
    pub x: Vec<f64>,
    pub xd: Dims,
    /// Per weight layer `i`: its input `in_i` and dimensions.
    pub layer_in: Vec<(Vec<f64>, Dims)>,
    /// Per weight layer `i`: the input of `conv_i` (`a_i`) and its dimensions.
    pub conv_in: Vec<(Vec<f64>, Dims)>,
    /// Per weight layer `i`: the output of `conv_i` and its dimensions.
    pub conv_out: Vec<(Vec<f64>, Dims)>,
    /// Projection shortcuts with a BN: the output of `shortcut.0` (the input of `shortcut.1`).
    pub shortcut_conv_out: Option<(Vec<f64>, Dims)>,
    /// `h(x_l)` and `F(x_l)`.
    pub shortcut: Vec<f64>,
    pub branch: Vec<f64>,
    /// Gated units: `g = sigmoid(conv1x1(x) + b)`.
    pub gate: Option<Vec<f64>>,
    /// The dropout mask's seed.
    pub seed: u32,
    /// `y_l = s_h h(x_l) + s_f F(x_l)`, before `f`, and its dimensions.
    pub y: Vec<f64>,
    pub yd: Dims,
}

/// What [`unit_forward`] returns.
#[derive(Clone, Debug)]
pub struct UnitOut {
    /// `x_{l+1} = f(y_l)`.
    pub out: Vec<f64>,
    /// Dimensions of `out`, `branch` and `shortcut`.
    pub dims: Dims,
    /// `F(x_l)`.
    pub branch: Vec<f64>,
    /// `h(x_l)`.
    pub shortcut: Vec<f64>,
    /// Training mode: the updated running statistics and counts of the unit's BN layers.
    /// Empty in eval mode.
    pub buffers: Tensors,
    pub saved: UnitSaved,
}

/// One residual unit `spec` on `x` (dimensions `xd`): `x_{l+1} = f(h(x) + F(x))`, see the module
/// documentation. `train` picks batch statistics (and reports updated running statistics in
/// [`UnitOut::buffers`]) or the running statistics in `params`. Dropout shortcuts use mask 0.
pub fn unit_forward(spec: &UnitSpec, params: &Tensors, x: &[f64], xd: Dims, train: bool) -> UnitOut {
    unit_forward_seeded(spec, params, x, xd, train, 0)
}

/// [`unit_forward`] with the dropout mask `seed` (see [`crate::rng::dropout_seed`]).
pub fn unit_forward_seeded(spec: &UnitSpec, params: &Tensors, x: &[f64], xd: Dims, train: bool, seed: u32) -> UnitOut {
    assert_eq!(x.len(), numel(xd), "reference net: {}: input size", spec.name);
    assert_eq!(xd[1], spec.c_in, "reference net: {}: input channels", spec.name);
    let p = &spec.name;
    let mut buffers = Tensors::new();
    let (mut layer_in, mut conv_in, mut conv_out) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cur, mut d) = (x.to_vec(), xd);
    let k = spec.layers.len();
    // F: layer by layer, a_i = pre_i(in_i), o_i = conv_i(a_i), in_{i+1} = post_i(o_i).
    for (i, &l) in spec.layers.iter().enumerate() {
        let last = i + 1 == k;
        let bn = format!("{p}.bn{}", i + 1);
        let a = match spec.kind {
            UnitKind::PreAct => bn_forward(params, &bn, &cur, d, true, train, &mut buffers),
            UnitKind::ReluOnlyPreAct => relu::forward(&cur),
            UnitKind::Original | UnitKind::BnAfterAdd | UnitKind::ReluBeforeAdd => cur.clone(),
        };
        let (o, od) = conv_forward(params, &format!("{p}.conv{}.weight", i + 1), &a, d, l);
        let next = match spec.kind {
            UnitKind::PreAct => o.clone(),
            UnitKind::Original => bn_forward(params, &bn, &o, od, !last, train, &mut buffers),
            // The last layer's BN moves after the addition.
            UnitKind::BnAfterAdd if last => o.clone(),
            UnitKind::BnAfterAdd | UnitKind::ReluBeforeAdd => {
                bn_forward(params, &bn, &o, od, true, train, &mut buffers)
            }
            UnitKind::ReluOnlyPreAct => bn_forward(params, &bn, &o, od, false, train, &mut buffers),
        };
        layer_in.push((cur, d));
        conv_in.push((a, d));
        conv_out.push((o, od));
        (cur, d) = (next, od);
    }
    let branch = cur;
    // h.
    let mut shortcut_conv_out = None;
    let shortcut = match spec.shortcut {
        Shortcut::Identity => x.to_vec(),
        Shortcut::Subsample => residual::subsample_forward(x, xd, spec.c_out, spec.stride),
        // Pre-activation: the projection reads the pre-activated input a_1.
        Shortcut::Projection if spec.kind.bn_before_conv() => {
            conv_forward(params, &format!("{p}.shortcut.weight"), &conv_in[0].0, xd, projection(spec)).0
        }
        Shortcut::Projection => {
            let (s, sd) = conv_forward(params, &format!("{p}.shortcut.0.weight"), x, xd, projection(spec));
            let h = bn_forward(params, &format!("{p}.shortcut.1"), &s, sd, false, train, &mut buffers);
            shortcut_conv_out = Some((s, sd));
            h
        }
    };
    assert_eq!(shortcut.len(), branch.len(), "reference net: {}: h(x) and F(x) differ in size", spec.name);
    assert_eq!(d[1], spec.c_out, "reference net: {}: output channels", spec.name);
    // y = s_h h + s_f F, with the gate g = sigmoid(conv1x1(x) + b) where there is one.
    let gate = spec.combine.gated().then(|| {
        let (z, zd) = conv_forward(params, &format!("{p}.gate.weight"), x, xd, spec.gate_layer());
        gate::forward(&z, zd, get(params, &format!("{p}.gate.bias")))
    });
    let y = mix::forward(spec.combine, &shortcut, &branch, gate.as_deref(), seed, train);
    // x_{l+1} = f(y).
    let out = match spec.kind {
        UnitKind::Original => relu::forward(&y),
        UnitKind::BnAfterAdd => bn_forward(params, &format!("{p}.bn{k}"), &y, d, true, train, &mut buffers),
        UnitKind::PreAct | UnitKind::ReluBeforeAdd | UnitKind::ReluOnlyPreAct => y.clone(),
    };
    let saved = UnitSaved {
        x: x.to_vec(),
        xd,
        layer_in,
        conv_in,
        conv_out,
        shortcut_conv_out,
        shortcut: shortcut.clone(),
        branch: branch.clone(),
        gate,
        seed,
        y,
        yd: d,
    };
    UnitOut { out, dims: d, branch, shortcut, buffers, saved }
}

/// The backward of [`unit_forward`] in training mode: given `dout = dE/dx_{l+1}`, returns
/// `dE/dx_l` and the gradients of the unit's learned parameters (every conv weight, BN weight
/// and bias and gate of the unit, by name).
pub fn unit_backward(spec: &UnitSpec, params: &Tensors, saved: &UnitSaved, dout: &[f64]) -> (Vec<f64>, Tensors) {
    assert_eq!(dout.len(), saved.y.len(), "reference net: {}: gradient size", spec.name);
    let p = &spec.name;
    let mut grads = Tensors::new();
    let (x, xd) = (&saved.x, saved.xd);
    let k = spec.layers.len();
    // dE/dy_l through f.
    let dy = match spec.kind {
        UnitKind::Original => relu::backward(&saved.y, dout),
        UnitKind::BnAfterAdd => bn_backward(params, &format!("{p}.bn{k}"), &saved.y, saved.yd, dout, true, &mut grads),
        UnitKind::PreAct | UnitKind::ReluBeforeAdd | UnitKind::ReluOnlyPreAct => dout.to_vec(),
    };
    // y = s_h h + s_f F: the gradients at h, F and the gate.
    let (dh, dbranch, dgate) =
        mix::backward(spec.combine, &saved.shortcut, &saved.branch, saved.gate.as_deref(), saved.seed, &dy);
    // Pre-activation projection: its gradient joins the branch's at a_1.
    let mut da1_from_shortcut = None;
    if spec.shortcut == Shortcut::Projection && spec.kind.bn_before_conv() {
        let (a1, a1d) = &saved.conv_in[0];
        let name = format!("{p}.shortcut.weight");
        da1_from_shortcut = Some(conv_backward(params, &name, a1, *a1d, &dh, projection(spec), &mut grads));
    }
    // F, last layer first: g is the gradient at in_{i+1}.
    let mut g = dbranch;
    for i in (0..k).rev() {
        let last = i + 1 == k;
        let bn = format!("{p}.bn{}", i + 1);
        let (o, od) = &saved.conv_out[i];
        let d_o = match spec.kind {
            UnitKind::PreAct => g,
            UnitKind::Original => bn_backward(params, &bn, o, *od, &g, !last, &mut grads),
            UnitKind::BnAfterAdd if last => g,
            UnitKind::BnAfterAdd | UnitKind::ReluBeforeAdd => bn_backward(params, &bn, o, *od, &g, true, &mut grads),
            UnitKind::ReluOnlyPreAct => bn_backward(params, &bn, o, *od, &g, false, &mut grads),
        };
        let (a, ad) = &saved.conv_in[i];
        let mut da =
            conv_backward(params, &format!("{p}.conv{}.weight", i + 1), a, *ad, &d_o, spec.layers[i], &mut grads);
        if i == 0
            && let Some(extra) = &da1_from_shortcut
        {
            da = residual::add(&da, extra);
        }
        let (input, ind) = &saved.layer_in[i];
        g = match spec.kind {
            UnitKind::PreAct => bn_backward(params, &bn, input, *ind, &da, true, &mut grads),
            UnitKind::ReluOnlyPreAct => relu::backward(input, &da),
            UnitKind::Original | UnitKind::BnAfterAdd | UnitKind::ReluBeforeAdd => da,
        };
    }
    // Then the shortcut h.
    let dx_h = match spec.shortcut {
        Shortcut::Identity => dh,
        Shortcut::Subsample => residual::subsample_backward(&dh, xd, spec.c_out, spec.stride),
        // Already added to the branch's gradient at a_1.
        Shortcut::Projection if spec.kind.bn_before_conv() => vec![0.0; x.len()],
        Shortcut::Projection => {
            let (s, sd) = saved.shortcut_conv_out.as_ref().expect("projection: saved conv output");
            let ds = bn_backward(params, &format!("{p}.shortcut.1"), s, *sd, &dh, false, &mut grads);
            conv_backward(params, &format!("{p}.shortcut.0.weight"), x, xd, &ds, projection(spec), &mut grads)
        }
    };
    let mut dx = residual::add(&g, &dx_h);
    // And the gate.
    if let Some(gv) = &saved.gate {
        let (dz, db) = gate::backward(gv, saved.yd, &dgate);
        grads.insert(format!("{p}.gate.bias"), db);
        let dxg = conv_backward(params, &format!("{p}.gate.weight"), x, xd, &dz, spec.gate_layer(), &mut grads);
        dx = residual::add(&dx, &dxg);
    }
    (dx, grads)
}

/// The whole forward pass: what [`forward`] returns.
#[derive(Clone, Debug)]
pub struct Forward {
    /// [N, classes].
    pub logits: Vec<f64>,
    /// `x_0 .. x_L`: the stem's output and every unit's output.
    pub streams: Vec<Vec<f64>>,
    /// Dimensions of each stream.
    pub stream_dims: Vec<Dims>,
    /// `F(x_l)` per unit, before the addition and `f`.
    pub branches: Vec<Vec<f64>>,
    /// Training mode: every buffer (`running_mean`, `running_var`, `num_batches_tracked`)
    /// updated. Empty in eval mode.
    pub buffers: Tensors,
    /// The stem's conv output (the input of `bn1` in original networks).
    stem_conv: Vec<f64>,
    /// The saved state of every unit.
    units: Vec<UnitSaved>,
    /// The pooled head input `p` [N,C]: the average of `ReLU(bn(x_L))` (pre-activation) or
    /// `x_L` (original) over each channel.
    pooled: Vec<f64>,
}

/// The forward pass of network `cfg` on `images` (dimensions `dims`, [N, in_channels, H, W]):
/// batch statistics if `train`, running statistics otherwise.
pub fn forward(cfg: &NetConfig, params: &Tensors, images: &[f64], dims: Dims, train: bool) -> Forward {
    for t in cfg.tensors() {
        assert_eq!(get(params, &t.name).len(), t.len(), "reference net: {} size", t.name);
    }
    assert_eq!(images.len(), numel(dims), "reference net: images size");
    assert_eq!(dims[1], cfg.in_channels, "reference net: image channels");
    let mut buffers = Tensors::new();
    // Stem.
    let (stem_conv, d0) = conv_forward(params, "conv1.weight", images, dims, stem_layer(cfg));
    let x0 = if cfg.kind.stem_bn() {
        bn_forward(params, "bn1", &stem_conv, d0, true, train, &mut buffers)
    } else {
        stem_conv.clone()
    };
    // Units.
    let (mut streams, mut stream_dims, mut branches, mut units) = (vec![x0], vec![d0], Vec::new(), Vec::new());
    // Dropout masks are drawn per step (BN's num_batches_tracked before it) and unit.
    let step = cfg.tensors().iter().find(|t| t.role == Role::Count).map_or(0.0, |t| get(params, &t.name)[0]);
    for (l, spec) in cfg.units().iter().enumerate() {
        let (x, xd) = (streams.last().unwrap(), *stream_dims.last().unwrap());
        let u = unit_forward_seeded(spec, params, x, xd, train, dropout_seed(step as u64, l));
        buffers.extend(u.buffers);
        streams.push(u.out);
        stream_dims.push(u.dims);
        branches.push(u.branch);
        units.push(u.saved);
    }
    // Head.
    let (xl, [n, c, h, w]) = (streams.last().unwrap(), *stream_dims.last().unwrap());
    let z = match cfg.kind {
        UnitKind::PreAct => bn_forward(params, "bn", xl, [n, c, h, w], true, train, &mut buffers),
        UnitKind::ReluOnlyPreAct => relu::forward(xl),
        UnitKind::Original | UnitKind::BnAfterAdd | UnitKind::ReluBeforeAdd => xl.clone(),
    };
    let pooled = head::pool_forward(&z, n, c, h * w);
    let logits = head::fc_forward(&pooled, get(params, "fc.weight"), get(params, "fc.bias"), n, c, cfg.classes);
    if train {
        for t in cfg.tensors().iter().filter(|t| !t.role.learned()) {
            assert!(buffers.contains_key(&t.name), "reference net: buffer {} not updated", t.name);
        }
    }
    Forward { logits, streams, stream_dims, branches, buffers, stem_conv, units, pooled }
}

/// The logits [N, classes] in eval mode (running statistics).
pub fn eval_logits(cfg: &NetConfig, params: &Tensors, images: &[f64], dims: Dims) -> Vec<f64> {
    forward(cfg, params, images, dims, false).logits
}

/// One training-mode forward and backward pass: what [`train_pass`] returns.
#[derive(Clone, Debug)]
pub struct Pass {
    /// Softmax cross-entropy, mean over the batch.
    pub loss: f64,
    /// [N, classes].
    pub logits: Vec<f64>,
    /// `dE/dθ` for every learned tensor ([`crate::arch::Role::learned`]), by name, in PyTorch's
    /// layout.
    pub grads: Tensors,
    /// `dE/d images`.
    pub grad_images: Vec<f64>,
    /// `x_0 .. x_L`.
    pub streams: Vec<Vec<f64>>,
    /// Dimensions of each stream.
    pub stream_dims: Vec<Dims>,
    /// `F(x_l)` per unit, before the addition and `f`.
    pub branches: Vec<Vec<f64>>,
    /// `dE/dx_l` for `l = 0 .. L`.
    pub stream_grads: Vec<Vec<f64>>,
    /// Every buffer after the pass: running statistics updated with momentum 0.1 (unbiased
    /// variance), `num_batches_tracked` plus one.
    pub buffers: Tensors,
}

/// Forward and backward of network `cfg` in training mode on `images` ([N, in_channels, H, W]
/// = `dims`) with `labels` (N values below `cfg.classes`).
pub fn train_pass(cfg: &NetConfig, params: &Tensors, images: &[f64], dims: Dims, labels: &[usize]) -> Pass {
    assert_eq!(labels.len(), dims[0], "reference net: one label per image");
    assert!(labels.iter().all(|&l| l < cfg.classes), "reference net: label out of range");
    let fwd = forward(cfg, params, images, dims, true);
    let labels: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let (loss, dlogits) = head::softmax_xent(&fwd.logits, &labels, cfg.classes);
    let mut grads = Tensors::new();
    // Head, backwards.
    let (xl, [n, c, h, w]) = (fwd.streams.last().unwrap(), *fwd.stream_dims.last().unwrap());
    let (dp, dw, db) = head::fc_backward(&fwd.pooled, get(params, "fc.weight"), &dlogits, n, c, cfg.classes);
    grads.insert("fc.weight".into(), dw);
    grads.insert("fc.bias".into(), db);
    let dz = head::pool_backward(&dp, h * w);
    let dxl = match cfg.kind {
        UnitKind::PreAct => bn_backward(params, "bn", xl, [n, c, h, w], &dz, true, &mut grads),
        UnitKind::ReluOnlyPreAct => relu::backward(xl, &dz),
        UnitKind::Original | UnitKind::BnAfterAdd | UnitKind::ReluBeforeAdd => dz,
    };
    // Units, last first.
    let specs = cfg.units();
    let mut stream_grads = vec![Vec::new(); specs.len() + 1];
    stream_grads[specs.len()] = dxl;
    for l in (0..specs.len()).rev() {
        let (dx, g) = unit_backward(&specs[l], params, &fwd.units[l], &stream_grads[l + 1]);
        grads.extend(g);
        stream_grads[l] = dx;
    }
    // Stem.
    let dconv = if cfg.kind.stem_bn() {
        bn_backward(params, "bn1", &fwd.stem_conv, fwd.stream_dims[0], &stream_grads[0], true, &mut grads)
    } else {
        stream_grads[0].clone()
    };
    let grad_images = conv_backward(params, "conv1.weight", images, dims, &dconv, stem_layer(cfg), &mut grads);
    for t in cfg.tensors() {
        assert_eq!(grads.contains_key(&t.name), t.role.learned(), "reference net: gradient of {}", t.name);
        if let Some(g) = grads.get(&t.name) {
            assert_eq!(g.len(), t.len(), "reference net: gradient size of {}", t.name);
        }
    }
    Pass {
        loss,
        logits: fwd.logits,
        grads,
        grad_images,
        streams: fwd.streams,
        stream_dims: fwd.stream_dims,
        branches: fwd.branches,
        stream_grads,
        buffers: fwd.buffers,
    }
}
