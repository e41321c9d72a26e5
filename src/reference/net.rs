//! CPU reference for the whole network of [`crate::arch`] (f64): stem, residual units, head,
//! forward and backward, in training mode (batch statistics) and eval mode (running statistics).
//! Built only from the per-op references of this module's siblings; every step is written out
//! in the order of the equations, so that it can be read against them.
//!
//! A unit `l` computes `y_l = h(x_l) + F(x_l)` and `x_{l+1} = f(y_l)`:
//! - pre-activation ([`UnitKind::PreAct`]), layers `1..k`: `in_1 = x`,
//!   `a_i = ReLU(bn_i(in_i))`, `out_i = conv_i(a_i)`, `in_{i+1} = out_i`; `F = out_k`;
//!   `f` is the identity; a projection shortcut is `shortcut.weight` (1x1, unit stride) applied
//!   to `a_1`;
//! - original ([`UnitKind::Original`]): `in_1 = x`, `in_{i+1} = ReLU(bn_i(conv_i(in_i)))` for
//!   `i < k`, `F = bn_k(conv_k(in_k))`; `f` is ReLU; a projection shortcut is
//!   `shortcut.1(shortcut.0(x))`, BN of a 1x1 conv with the unit stride;
//! - option A ([`Shortcut::Subsample`]) subsamples the raw `x` by the unit stride and pads the
//!   channels with zeros, in both kinds.
//!
//! The network: `x_0 = conv1(images)` (pre-activation) or `ReLU(bn1(conv1(images)))`
//! (original); the units; then `z = ReLU(bn(x_L))` (pre-activation) or `z = x_L` (original),
//! global average pooling, `logits = p W^T + b` and softmax cross-entropy against integer
//! labels, mean over the batch.
//!
//! Parameters and buffers are a map from the names of [`NetConfig::tensors`] to their values in
//! PyTorch's layouts (conv weights OIHW, `fc.weight` [classes, C], `num_batches_tracked` one
//! value).

use std::collections::HashMap;

use super::{batch_norm as bn, conv, pool_fc_loss as head, relu, residual};
use crate::arch::{Layer, NetConfig, Shortcut, UnitKind, UnitSpec};

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
    /// Per weight layer `i`: the input of `bn_i` and its dimensions (pre-activation: `in_i`;
    /// original: `conv_i`'s output).
    pub bn_in: Vec<(Vec<f64>, Dims)>,
    /// Per weight layer `i`: the input of `conv_i` and its dimensions (pre-activation: `a_i`;
    /// original: `in_i`).
    pub conv_in: Vec<(Vec<f64>, Dims)>,
    /// Original units with a projection shortcut: the output of `shortcut.0` (the input of
    /// `shortcut.1`).
    pub shortcut_conv_out: Option<(Vec<f64>, Dims)>,
    /// `y_l = h(x_l) + F(x_l)`, before `f`.
    pub y: Vec<f64>,
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
/// [`UnitOut::buffers`]) or the running statistics in `params`.
pub fn unit_forward(spec: &UnitSpec, params: &Tensors, x: &[f64], xd: Dims, train: bool) -> UnitOut {
    assert_eq!(x.len(), numel(xd), "reference net: {}: input size", spec.name);
    assert_eq!(xd[1], spec.c_in, "reference net: {}: input channels", spec.name);
    let p = &spec.name;
    let mut buffers = Tensors::new();
    let (mut bn_in, mut conv_in) = (Vec::new(), Vec::new());
    let (mut cur, mut d) = (x.to_vec(), xd);
    let k = spec.layers.len();
    let mut shortcut_conv_out = None;
    let (branch, shortcut, y, out);
    match spec.kind {
        UnitKind::PreAct => {
            for (i, &l) in spec.layers.iter().enumerate() {
                // a_i = ReLU(bn_i(in_i)); out_i = conv_i(a_i).
                let a = bn_forward(params, &format!("{p}.bn{}", i + 1), &cur, d, true, train, &mut buffers);
                let (o, od) = conv_forward(params, &format!("{p}.conv{}.weight", i + 1), &a, d, l);
                bn_in.push((cur, d));
                conv_in.push((a, d));
                (cur, d) = (o, od);
            }
            branch = cur;
            shortcut = match spec.shortcut {
                Shortcut::Identity => x.to_vec(),
                Shortcut::Subsample => residual::subsample_forward(x, xd, spec.c_out, spec.stride),
                // The projection reads the pre-activated input a_1.
                Shortcut::Projection => {
                    conv_forward(params, &format!("{p}.shortcut.weight"), &conv_in[0].0, xd, projection(spec)).0
                }
            };
            y = residual::add(&shortcut, &branch);
            out = y.clone();
        }
        UnitKind::Original => {
            for (i, &l) in spec.layers.iter().enumerate() {
                // in_{i+1} = ReLU(bn_i(conv_i(in_i))), without the ReLU for the last layer.
                let (o, od) = conv_forward(params, &format!("{p}.conv{}.weight", i + 1), &cur, d, l);
                let last = i + 1 == k;
                let a = bn_forward(params, &format!("{p}.bn{}", i + 1), &o, od, !last, train, &mut buffers);
                conv_in.push((cur, d));
                bn_in.push((o, od));
                (cur, d) = (a, od);
            }
            branch = cur;
            shortcut = match spec.shortcut {
                Shortcut::Identity => x.to_vec(),
                Shortcut::Subsample => residual::subsample_forward(x, xd, spec.c_out, spec.stride),
                Shortcut::Projection => {
                    let (s, sd) = conv_forward(params, &format!("{p}.shortcut.0.weight"), x, xd, projection(spec));
                    let h = bn_forward(params, &format!("{p}.shortcut.1"), &s, sd, false, train, &mut buffers);
                    shortcut_conv_out = Some((s, sd));
                    h
                }
            };
            y = residual::add(&shortcut, &branch);
            out = relu::forward(&y);
        }
    }
    assert_eq!(shortcut.len(), branch.len(), "reference net: {}: h(x) and F(x) differ in size", spec.name);
    assert_eq!(d[1], spec.c_out, "reference net: {}: output channels", spec.name);
    let saved = UnitSaved { x: x.to_vec(), xd, bn_in, conv_in, shortcut_conv_out, y };
    UnitOut { out, dims: d, branch, shortcut, buffers, saved }
}

/// The backward of [`unit_forward`] in training mode: given `dout = dE/dx_{l+1}`, returns
/// `dE/dx_l` and the gradients of the unit's learned parameters (every conv weight and BN
/// weight and bias of the unit, by name).
pub fn unit_backward(spec: &UnitSpec, params: &Tensors, saved: &UnitSaved, dout: &[f64]) -> (Vec<f64>, Tensors) {
    assert_eq!(dout.len(), saved.y.len(), "reference net: {}: gradient size", spec.name);
    let p = &spec.name;
    let mut grads = Tensors::new();
    let (x, xd) = (&saved.x, saved.xd);
    let k = spec.layers.len();
    // dE/dy_l through f.
    let dy = match spec.kind {
        UnitKind::PreAct => dout.to_vec(),
        UnitKind::Original => relu::backward(&saved.y, dout),
    };
    // y = h + F: both receive dy. First the branch F, last layer first.
    let mut g = dy.clone();
    // Pre-activation projection: its gradient joins the branch's at a_1.
    let mut da1_from_shortcut = None;
    match spec.kind {
        UnitKind::PreAct => {
            if spec.shortcut == Shortcut::Projection {
                let (a1, a1d) = &saved.conv_in[0];
                let name = format!("{p}.shortcut.weight");
                da1_from_shortcut = Some(conv_backward(params, &name, a1, *a1d, &dy, projection(spec), &mut grads));
            }
            for i in (0..k).rev() {
                let (a, ad) = &saved.conv_in[i];
                let mut da =
                    conv_backward(params, &format!("{p}.conv{}.weight", i + 1), a, *ad, &g, spec.layers[i], &mut grads);
                if i == 0
                    && let Some(extra) = &da1_from_shortcut
                {
                    da = residual::add(&da, extra);
                }
                let (b, bd) = &saved.bn_in[i];
                g = bn_backward(params, &format!("{p}.bn{}", i + 1), b, *bd, &da, true, &mut grads);
            }
        }
        UnitKind::Original => {
            for i in (0..k).rev() {
                let last = i + 1 == k;
                let (b, bd) = &saved.bn_in[i];
                let dc = bn_backward(params, &format!("{p}.bn{}", i + 1), b, *bd, &g, !last, &mut grads);
                let (c, cd) = &saved.conv_in[i];
                g = conv_backward(
                    params,
                    &format!("{p}.conv{}.weight", i + 1),
                    c,
                    *cd,
                    &dc,
                    spec.layers[i],
                    &mut grads,
                );
            }
        }
    }
    // Then the shortcut h.
    let dh = match (spec.shortcut, spec.kind) {
        (Shortcut::Identity, _) => dy,
        (Shortcut::Subsample, _) => residual::subsample_backward(&dy, xd, spec.c_out, spec.stride),
        // Already added to the branch's gradient at a_1.
        (Shortcut::Projection, UnitKind::PreAct) => vec![0.0; x.len()],
        (Shortcut::Projection, UnitKind::Original) => {
            let (s, sd) = saved.shortcut_conv_out.as_ref().expect("original projection: saved conv output");
            let ds = bn_backward(params, &format!("{p}.shortcut.1"), s, *sd, &dy, false, &mut grads);
            conv_backward(params, &format!("{p}.shortcut.0.weight"), x, xd, &ds, projection(spec), &mut grads)
        }
    };
    (residual::add(&g, &dh), grads)
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
    let x0 = match cfg.kind {
        UnitKind::PreAct => stem_conv.clone(),
        UnitKind::Original => bn_forward(params, "bn1", &stem_conv, d0, true, train, &mut buffers),
    };
    // Units.
    let (mut streams, mut stream_dims, mut branches, mut units) = (vec![x0], vec![d0], Vec::new(), Vec::new());
    for spec in cfg.units() {
        let u = unit_forward(&spec, params, streams.last().unwrap(), *stream_dims.last().unwrap(), train);
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
        UnitKind::Original => xl.clone(),
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
    /// `dE/dθ` for every learned tensor ([`crate::arch::Role::learned`]), by name, in PyTorch's layout.
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
        UnitKind::Original => dz,
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
    let dconv = match cfg.kind {
        UnitKind::PreAct => stream_grads[0].clone(),
        UnitKind::Original => {
            bn_backward(params, "bn1", &fwd.stem_conv, fwd.stream_dims[0], &stream_grads[0], true, &mut grads)
        }
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
