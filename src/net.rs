//! A whole ResNet on the GPU: stem, stages of residual units, head and loss; trained with SGD.
//!
//! One training step records the stem's, every unit's and the head's forward into command
//! buffers of their own, then the backward in reverse, then the optimizer, and submits them all
//! at once: nothing returns to the host between units, and the stream `x_l` and its gradient
//! stay on the GPU (see [`crate::unit`]).

use crate::arch::{Layer, NetConfig, Role, Shortcut, UnitKind};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batch_norm::Epilogue;
use crate::ops::pool_fc_loss::{self as head, Labels};
use crate::ops::{conv, probe, relu, residual, sgd};
use crate::rng::dropout_seed;
use crate::tensor::Tensor;
use crate::unit::{Bn, Chain, Conv, Kept, Mode, Param, Slot, State, Unit, Workspace};

/// SGD settings (PyTorch semantics: `d = g + wd*w; m = mu*m + d; w -= lr*m`).
#[derive(Clone, Copy, Debug)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

impl Default for Sgd {
    /// The paper's recipe: learning rate 0.1, momentum 0.9, weight decay 1e-4.
    fn default() -> Self {
        Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-4 }
    }
}

/// One named tensor of the network, as [`ResNet::entries`] lists them.
pub enum Entry<'a> {
    /// Learned: value, gradient and momentum.
    Param(&'a Param),
    /// A BN running statistic.
    Buffer(&'a Tensor),
    /// A BN `num_batches_tracked` (kept on the host; the same for every layer).
    Count,
}

/// Activations for one input shape, allocated when the shape first appears.
struct Acts {
    images: [usize; 4],
    /// `x_0 .. x_L`, each kept for the backward.
    streams: Vec<Tensor>,
    kept: Vec<Kept>,
    /// The stream's gradients, accumulated in place: `grads[grad_of[l]]` holds `dE/dx_l`. An
    /// identity-shortcut unit shares its output's buffer; any other unit gets another one.
    grads: Vec<Tensor>,
    grad_of: Vec<usize>,
    /// Original networks: the stem convolution's output (its BN's input).
    stem_h: Option<Tensor>,
    /// Pre-activation networks: `ReLU(BN(x_L))` and its gradient.
    z: Option<(Tensor, Tensor)>,
    pooled: Tensor,
    dpooled: Tensor,
    logits: Tensor,
    dlogits: Tensor,
    loss: Tensor,
    grad_images: Tensor,
    ws: Workspace,
}

/// What [`ResNet::probe`] measured.
#[derive(Clone, Debug)]
pub struct Probes {
    pub loss: f32,
    /// Per stream index `l = 0..=L`: `[||x_l||, ||F(x_l)||, ||dE/dx_l||]` (`F` is 0 at `l = L`).
    pub norms: Vec<[f32; 3]>,
    /// Per stage: `||x_end - (x_start + sum F)|| / ||x_end||` over its identity-shortcut units
    /// (`None` for a stage without them).
    pub stage_identity: Vec<Option<f32>>,
}

/// The first non-finite probe in the order the passes computed them: forward (`x_0`, then each
/// unit's `F` and output), the loss, then backward (`dE/dx_L` down to `dE/dx_0`).
fn first_non_finite(p: &Probes, units: &[Unit]) -> Option<String> {
    let name = |l: usize| units.get(l).map_or("the head".to_string(), |u| u.spec.name.clone());
    let bad = |v: f32| !v.is_finite();
    if bad(p.norms[0][0]) {
        return Some("x_0, the stem's output".into());
    }
    for l in 0..units.len() {
        if bad(p.norms[l][1]) {
            return Some(format!("F(x_{l}), the branch of unit {}", name(l)));
        }
        if bad(p.norms[l + 1][0]) {
            return Some(format!("x_{}, the output of unit {}", l + 1, name(l)));
        }
    }
    if bad(p.loss) {
        return Some("the loss".into());
    }
    for l in (0..=units.len()).rev() {
        if bad(p.norms[l][2]) {
            let at = if l == units.len() {
                "the head's backward".to_string()
            } else {
                format!("the backward of unit {}", name(l))
            };
            return Some(format!("dE/dx_{l}, from {at}"));
        }
    }
    None
}

/// A ResNet on the GPU.
pub struct ResNet {
    pub config: NetConfig,
    stem: Conv,
    stem_bn: Option<Bn>,
    pub units: Vec<Unit>,
    final_bn: Option<Bn>,
    fc_w: Param,
    fc_b: Param,
    /// BN's `num_batches_tracked`: training forwards run so far.
    pub batches_tracked: i64,
    acts: Option<Acts>,
}

impl ResNet {
    /// A network with fresh He-initialised weights drawn from `seed`.
    pub fn new(gpu: &Gpu, config: &NetConfig, seed: u64) -> Result<ResNet> {
        config.validate()?;
        // Refused before the host values are drawn: a tensor past the largest buffer.
        for t in config.tensors() {
            let bytes = (t.len() as u64).saturating_mul(4);
            if bytes > gpu.report.max_buffer {
                return Err(Error::TooLarge {
                    what: format!("network tensor {} {:?}", t.name, t.dims),
                    bytes,
                    limit: gpu.report.max_buffer,
                    of: "largest buffer",
                });
            }
        }
        let state = config.tensors().into_iter().map(|t| t.name).zip(config.initial_values(seed)).collect();
        ResNet::from_state(gpu, config, &state)
    }

    /// A network from named host values (every name of [`NetConfig::tensors`], PyTorch
    /// layouts). `num_batches_tracked` is taken from the first BN layer.
    pub fn from_state(gpu: &Gpu, config: &NetConfig, state: &State) -> Result<ResNet> {
        config.validate()?;
        // Out of memory or a refused buffer: an error naming what and how much, not an abort.
        gpu.allocation_scope(&format!("the weights of a depth-{} network", config.depth()), || {
            ResNet::allocate(gpu, config, state)
        })
    }

    fn allocate(gpu: &Gpu, config: &NetConfig, state: &State) -> Result<ResNet> {
        let c0 = config.stem_channels();
        let stem_l = Layer { c_in: config.in_channels, c_out: c0, k: 3, stride: 1 };
        let stem = Conv::load(gpu, state, "conv1.weight", stem_l)?;
        let stem_bn = config.kind.stem_bn().then(|| Bn::load(gpu, state, "bn1", c0)).transpose()?;
        let units = config.units().iter().map(|spec| Unit::from_state(gpu, spec, state)).collect::<Result<Vec<_>>>()?;
        let c = config.stage_channels(2);
        let final_bn = (config.kind == UnitKind::PreAct).then(|| Bn::load(gpu, state, "bn", c)).transpose()?;
        let fc_w = Param::load(gpu, state, "fc.weight", &[config.classes, c])?;
        let fc_b = Param::load(gpu, state, "fc.bias", &[config.classes])?;
        let first_count = config.tensors().into_iter().find(|t| t.role == Role::Count);
        let batches_tracked =
            first_count.and_then(|t| state.get(&t.name)).and_then(|v| v.first()).map_or(0, |&v| v as i64);
        Ok(ResNet { config: config.clone(), stem, stem_bn, units, final_bn, fc_w, fc_b, batches_tracked, acts: None })
    }

    /// Every named tensor, in the order of [`NetConfig::tensors`].
    pub fn entries(&self) -> Vec<(String, Entry<'_>)> {
        let mut v: Vec<(String, Entry)> = Vec::new();
        fn bn<'a>(v: &mut Vec<(String, Entry<'a>)>, p: &str, b: &'a Bn) {
            v.push((format!("{p}.weight"), Entry::Param(&b.gamma)));
            v.push((format!("{p}.bias"), Entry::Param(&b.beta)));
            v.push((format!("{p}.running_mean"), Entry::Buffer(&b.running_mean)));
            v.push((format!("{p}.running_var"), Entry::Buffer(&b.running_var)));
            v.push((format!("{p}.num_batches_tracked"), Entry::Count));
        }
        v.push(("conv1.weight".into(), Entry::Param(&self.stem.w)));
        if let Some(b) = &self.stem_bn {
            bn(&mut v, "bn1", b);
        }
        for u in &self.units {
            for (i, (c, b)) in u.convs.iter().zip(&u.bns).enumerate() {
                v.push((format!("{}.conv{}.weight", u.spec.name, i + 1), Entry::Param(&c.w)));
                bn(&mut v, &format!("{}.bn{}", u.spec.name, i + 1), b);
            }
            match (&u.proj, &u.proj_bn) {
                (Some(p), None) => v.push((format!("{}.shortcut.weight", u.spec.name), Entry::Param(&p.w))),
                (Some(p), Some(b)) => {
                    v.push((format!("{}.shortcut.0.weight", u.spec.name), Entry::Param(&p.w)));
                    bn(&mut v, &format!("{}.shortcut.1", u.spec.name), b);
                }
                _ => {}
            }
            if let Some(g) = &u.gate {
                v.push((format!("{}.gate.weight", u.spec.name), Entry::Param(&g.w)));
                v.push((format!("{}.gate.bias", u.spec.name), Entry::Param(&g.b)));
            }
        }
        if let Some(b) = &self.final_bn {
            bn(&mut v, "bn", b);
        }
        v.push(("fc.weight".into(), Entry::Param(&self.fc_w)));
        v.push(("fc.bias".into(), Entry::Param(&self.fc_b)));
        v
    }

    /// Every learned parameter.
    pub fn params(&self) -> Vec<(String, &Param)> {
        self.entries()
            .into_iter()
            .filter_map(|(n, e)| match e {
                Entry::Param(p) => Some((n, p)),
                _ => None,
            })
            .collect()
    }

    /// Reads every named tensor back to the host (`num_batches_tracked` as its value).
    pub fn state(&self, gpu: &Gpu) -> Result<Vec<(String, Vec<f32>)>> {
        self.entries()
            .into_iter()
            .map(|(n, e)| {
                let v = match e {
                    Entry::Param(p) => p.value.read(gpu)?,
                    Entry::Buffer(t) => t.read(gpu)?,
                    Entry::Count => vec![self.batches_tracked as f32],
                };
                Ok((n, v))
            })
            .collect()
    }

    /// Reads every parameter gradient of the last backward.
    pub fn grads(&self, gpu: &Gpu) -> Result<Vec<(String, Vec<f32>)>> {
        self.params().into_iter().map(|(n, p)| Ok((n, p.grad.read(gpu)?))).collect()
    }

    /// Bytes of activations (kept tensors, streams, workspace) held for the current input shape.
    pub fn activation_bytes(&self) -> u64 {
        self.acts.as_ref().map_or(0, |a| {
            let kept: u64 = a.kept.iter().map(|k| k.bytes()).sum();
            let streams: u64 = a.streams.iter().map(|t| t.bytes()).sum();
            let grads: u64 = a.grads.iter().map(|t| t.bytes()).sum();
            kept + streams + grads + a.ws.bytes()
        })
    }

    fn check_images(&self, images: &Tensor) -> Result<[usize; 4]> {
        let d = images.nchw("images")?;
        if d[1] != self.config.in_channels {
            return Err(Error::Shape(format!(
                "images have {} channels, the network takes {}",
                d[1], self.config.in_channels
            )));
        }
        Ok(d)
    }

    fn ensure_acts(&mut self, gpu: &Gpu, images: [usize; 4]) -> Result<()> {
        if self.acts.as_ref().is_some_and(|a| a.images == images) {
            return Ok(());
        }
        self.acts = None; // release the old shape's buffers first
        let what = format!("the activations for images {images:?}");
        let acts = gpu.allocation_scope(&what, || self.allocate_acts(gpu, images))?;
        self.acts = Some(acts);
        Ok(())
    }

    fn allocate_acts(&self, gpu: &Gpu, images: [usize; 4]) -> Result<Acts> {
        let [n, _, h, w] = images;
        let x0 = [n, self.config.stem_channels(), h, w];
        let mut ws = Workspace::default();
        let mut streams = vec![Tensor::zeros(gpu, &x0)?];
        let mut kept = Vec::new();
        let mut dims = vec![x0];
        let mut d = x0;
        for u in &self.units {
            kept.push(u.allocate(gpu, d, &mut ws)?);
            d = u.out_dims(d);
            streams.push(Tensor::zeros(gpu, &d)?);
            dims.push(d);
        }
        // Gradient buffers, from the last stream down: reuse one of the right shape unless it
        // is the next stream's and the unit between them does not accumulate in place.
        let (mut grads, mut grad_of) = (Vec::<Tensor>::new(), vec![0; dims.len()]);
        for l in (0..dims.len()).rev() {
            let next = (l + 1 < dims.len()).then(|| grad_of[l + 1]);
            let shared = l < self.units.len() && self.units[l].spec.shortcut == Shortcut::Identity;
            grad_of[l] = match (shared, next) {
                (true, Some(i)) => i,
                _ => match (0..grads.len()).find(|&i| grads[i].dims() == dims[l] && Some(i) != next) {
                    Some(i) => i,
                    None => {
                        grads.push(Tensor::zeros(gpu, &dims[l])?);
                        grads.len() - 1
                    }
                },
            };
        }
        let (c, k) = (d[1], self.config.classes);
        let z = match self.config.kind {
            UnitKind::PreAct | UnitKind::ReluOnlyPreAct => Some((Tensor::zeros(gpu, &d)?, Tensor::zeros(gpu, &d)?)),
            _ => None,
        };
        let stem_h = self.config.kind.stem_bn().then(|| Tensor::zeros(gpu, &x0)).transpose()?;
        Ok(Acts {
            images,
            streams,
            kept,
            grads,
            grad_of,
            stem_h,
            z,
            pooled: Tensor::zeros(gpu, &[n, c])?,
            dpooled: Tensor::zeros(gpu, &[n, c])?,
            logits: Tensor::zeros(gpu, &[n, k])?,
            dlogits: Tensor::zeros(gpu, &[n, k])?,
            loss: Tensor::zeros(gpu, &[1])?,
            grad_images: Tensor::zeros(gpu, &images)?,
            ws,
        })
    }

    fn acts(&self) -> Result<&Acts> {
        self.acts.as_ref().ok_or_else(|| Error::Invalid("no forward pass has run yet".into()))
    }

    /// Records the forward: the stem, each unit and the head in command buffers of their own.
    /// With labels, the head also computes the loss and its gradient at the logits.
    fn record_forward(
        &self,
        gpu: &Gpu,
        images: &Tensor,
        labels: Option<&Labels>,
        mode: Mode,
    ) -> Result<Vec<wgpu::CommandBuffer>> {
        let a = self.acts()?;
        let mut cbs = Vec::new();
        let chains = |l: usize| mode == Mode::Train && self.units.get(l).is_some_and(|u| u.chains());

        let mut rec = gpu.recorder("stem forward");
        match (&self.stem_bn, &a.stem_h) {
            (Some(bn), Some(h)) => {
                let (w, relu) = (&self.stem.w.value, Epilogue { add: false, relu: true });
                if mode == Mode::Train {
                    // The BN's statistics from the convolution's epilogue (conv::forward_stats).
                    bn.conv_stats(&mut rec, images, None, w, h, 1, false)?;
                    bn.recompute(&mut rec, h, &a.streams[0], relu)?;
                } else {
                    conv::forward(&mut rec, images, w, h, 1, false)?;
                    bn.forward(&mut rec, mode, h, &a.streams[0], relu)?;
                }
            }
            // A pre-activation stem's convolution takes the first unit's BN statistics of x_0.
            _ if chains(0) => {
                let bn = &self.units[0].bns[0];
                bn.conv_stats(&mut rec, images, None, &self.stem.w.value, &a.streams[0], 1, false)?
            }
            _ => conv::forward(&mut rec, images, &self.stem.w.value, &a.streams[0], 1, false)?,
        }
        cbs.push(rec.finish());

        let n = self.units.len();
        for (l, u) in self.units.iter().enumerate() {
            let mut rec = gpu.recorder(&u.spec.name);
            // Between chaining units, each x_l's BN statistics come from the epilogue of the
            // convolution that writes x_l (unit::Chain).
            let chain = Chain {
                input_stats: chains(l) && (l > 0 || self.stem_bn.is_none()) && (l == 0 || chains(l - 1)),
                next_bn: match l + 1 < n {
                    _ if !chains(l) => None,
                    true => chains(l + 1).then(|| &self.units[l + 1].bns[0]),
                    false => self.final_bn.as_ref(),
                },
            };
            u.forward_chained(&mut rec, mode, &a.streams[l], &a.streams[l + 1], &a.kept[l], &a.ws, chain)?;
            cbs.push(rec.finish());
        }

        let mut rec = gpu.recorder("head forward");
        let x_last = &a.streams[self.units.len()];
        // z = ReLU(BN(x_L)) (pre-activation), ReLU(x_L) (ReLU-only pre-activation) or x_L.
        let z = match (&self.final_bn, &a.z) {
            (Some(bn), Some((z, _))) => {
                let relu = Epilogue { add: false, relu: true };
                if n > 0 && chains(n - 1) {
                    bn.recompute(&mut rec, x_last, z, relu)?; // statistics from the last unit
                } else {
                    bn.forward(&mut rec, mode, x_last, z, relu)?;
                }
                z
            }
            (None, Some((z, _))) => {
                relu::forward(&mut rec, x_last, z)?;
                z
            }
            _ => x_last,
        };
        head::pool_forward(&mut rec, z, &a.pooled)?;
        head::fc_forward(&mut rec, &a.pooled, &self.fc_w.value, &self.fc_b.value, &a.logits)?;
        if let Some(labels) = labels {
            head::softmax_xent(&mut rec, &a.logits, labels, &a.loss, &a.dlogits)?;
        }
        cbs.push(rec.finish());
        Ok(cbs)
    }

    /// Records the backward of the last training forward, head to stem.
    /// With `norms`, each stream gradient's squared norm goes into slot `3l + 2`.
    fn record_backward(
        &self,
        gpu: &Gpu,
        images: &Tensor,
        image_grad: bool,
        norms: Option<&Tensor>,
    ) -> Result<Vec<wgpu::CommandBuffer>> {
        let a = self.acts()?;
        let grad = |l: usize| -> Result<&Tensor> {
            let i = a.grad_of.get(l).ok_or_else(|| Error::Invalid(format!("no stream gradient {l}")))?;
            Ok(&a.grads[*i])
        };
        let mut cbs = Vec::new();
        let l_count = self.units.len();

        let mut rec = gpu.recorder("head backward");
        head::fc_backward(
            &mut rec,
            &a.pooled,
            &self.fc_w.value,
            &a.dlogits,
            &a.dpooled,
            &self.fc_w.grad,
            &self.fc_b.grad,
            false,
            false,
        )?;
        let x_last = &a.streams[l_count];
        let g_last = grad(l_count)?;
        match (&self.final_bn, &a.z) {
            (Some(bn), Some((_, dz))) => {
                head::pool_backward(&mut rec, &a.dpooled, dz, false)?;
                bn.backward(&mut rec, x_last, dz, true, g_last, false)?;
            }
            (None, Some((_, dz))) => {
                head::pool_backward(&mut rec, &a.dpooled, dz, false)?;
                relu::backward(&mut rec, x_last, dz, g_last, false)?;
            }
            _ => head::pool_backward(&mut rec, &a.dpooled, g_last, false)?,
        }
        if let Some(n) = norms {
            probe::sum_squares(&mut rec, g_last, n, 3 * l_count + 2)?;
        }
        cbs.push(rec.finish());

        for (l, u) in self.units.iter().enumerate().rev() {
            let mut rec = gpu.recorder(&u.spec.name);
            let (x, y) = (&a.streams[l], &a.streams[l + 1]);
            u.backward(&mut rec, x, y, grad(l + 1)?, grad(l)?, &a.kept[l], &a.ws)?;
            if let Some(n) = norms {
                probe::sum_squares(&mut rec, grad(l)?, n, 3 * l + 2)?;
            }
            cbs.push(rec.finish());
        }

        let mut rec = gpu.recorder("stem backward");
        let g0 = grad(0)?;
        let dstem = match (&self.stem_bn, &a.stem_h) {
            (Some(bn), Some(h)) => {
                let dh = a.ws.get(h.dims(), Slot::DAct)?;
                bn.backward(&mut rec, h, g0, true, dh, false)?;
                dh
            }
            _ => g0,
        };
        conv::backward_weight(&mut rec, images, dstem, &self.stem.w.grad, 1, false)?;
        if image_grad {
            conv::backward_data(&mut rec, dstem, &self.stem.w.value, &a.grad_images, 1, false)?;
        }
        cbs.push(rec.finish());
        Ok(cbs)
    }

    fn record_sgd(&self, gpu: &Gpu, opt: Sgd) -> Result<wgpu::CommandBuffer> {
        let mut rec = gpu.recorder("sgd");
        for (_, p) in self.params() {
            sgd::step(&mut rec, &p.value, &p.grad, &p.momentum, opt.lr, opt.momentum, opt.weight_decay)?;
        }
        Ok(rec.finish())
    }

    fn prepare(&mut self, gpu: &Gpu, images: &Tensor, labels: Option<&Labels>) -> Result<()> {
        let d = self.check_images(images)?;
        if let Some(l) = labels {
            if l.len != d[0] || l.classes != self.config.classes {
                return Err(Error::Shape(format!(
                    "{} labels of {} classes for {} images and {} classes",
                    l.len, l.classes, d[0], self.config.classes
                )));
            }
        }
        // Dropout masks: a fresh one per training step and unit, the same in its backward.
        for (l, u) in self.units.iter_mut().enumerate() {
            u.seed = dropout_seed(self.batches_tracked as u64, l);
        }
        self.ensure_acts(gpu, d)
    }

    /// One training-mode forward and backward (no update): loss, logits, every parameter
    /// gradient, and with `image_grad` the gradient to the images. Returns the loss.
    pub fn forward_backward(&mut self, gpu: &Gpu, images: &Tensor, labels: &Labels, image_grad: bool) -> Result<f32> {
        self.prepare(gpu, images, Some(labels))?;
        let mut cbs = self.record_forward(gpu, images, Some(labels), Mode::Train)?;
        cbs.extend(self.record_backward(gpu, images, image_grad, None)?);
        gpu.submit(cbs)?;
        self.batches_tracked += 1;
        self.loss(gpu)
    }

    /// One SGD step on a batch: forward, backward and update in one submission. Returns the
    /// loss before the update.
    pub fn train_step(&mut self, gpu: &Gpu, images: &Tensor, labels: &Labels, opt: Sgd) -> Result<f32> {
        self.prepare(gpu, images, Some(labels))?;
        let mut cbs = self.record_forward(gpu, images, Some(labels), Mode::Train)?;
        cbs.extend(self.record_backward(gpu, images, false, None)?);
        cbs.push(self.record_sgd(gpu, opt)?);
        gpu.submit(cbs)?;
        self.batches_tracked += 1;
        self.loss(gpu)
    }

    /// [`ResNet::train_step`] with a check after the passes: the forward and backward run with
    /// the probes of [`ResNet::probe`], and if any stream `x_l`, branch `F(x_l)`, stream
    /// gradient `dE/dx_l` or the loss is not finite, the step returns [`Error::NonFinite`]
    /// naming the first one in the order they were computed, and the weights are not updated.
    pub fn train_step_checked(&mut self, gpu: &Gpu, images: &Tensor, labels: &Labels, opt: Sgd) -> Result<f32> {
        let p = self.probe(gpu, images, labels)?;
        if let Some(bad) = first_non_finite(&p, &self.units) {
            return Err(Error::NonFinite(bad));
        }
        gpu.submit([self.record_sgd(gpu, opt)?])?;
        Ok(p.loss)
    }

    /// Inference mode (running statistics): the logits, `[N, classes]` row-major.
    pub fn predict(&mut self, gpu: &Gpu, images: &Tensor) -> Result<Vec<f32>> {
        self.prepare(gpu, images, None)?;
        gpu.submit(self.record_forward(gpu, images, None, Mode::Eval)?)?;
        self.logits(gpu)
    }

    /// The loss of the last training forward.
    pub fn loss(&self, gpu: &Gpu) -> Result<f32> {
        Ok(self.acts()?.loss.read(gpu)?[0])
    }

    /// The logits of the last forward.
    pub fn logits(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        self.acts()?.logits.read(gpu)
    }

    /// The gradient to the images of the last `forward_backward` with `image_grad`.
    pub fn grad_images(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        self.acts()?.grad_images.read(gpu)
    }

    /// One training-mode forward and backward with probes (no update), for the analysis:
    /// per unit `l` the squared norms of `x_l`, `F(x_l)` and `dE/dx_l`, and per stage the
    /// identity check `x_end = x_start + sum F` over its identity-shortcut units, all computed
    /// on the GPU from its own buffers.
    pub fn probe(&mut self, gpu: &Gpu, images: &Tensor, labels: &Labels) -> Result<Probes> {
        self.prepare(gpu, images, Some(labels))?;
        let l_count = self.units.len();
        let mut cbs = self.record_forward(gpu, images, Some(labels), Mode::Train)?;
        let a = self.acts()?;
        // Slots: 3l + {0: x_l, 1: F(x_l), 2: dE/dx_l}, then per stage {diff, x_end}.
        let stage_base = 3 * (l_count + 1);
        let norms = Tensor::zeros(gpu, &[stage_base + 6])?;

        let mut rec = gpu.recorder("probe forward");
        let mut stage_start: Option<usize> = None;
        for (l, u) in self.units.iter().enumerate() {
            let (x, y) = (&a.streams[l], &a.streams[l + 1]);
            probe::sum_squares(&mut rec, x, &norms, 3 * l)?;
            let d = y.nchw("stream")?;
            let f = a.ws.get(&d, Slot::Grad(0))?;
            u.branch(&mut rec, &a.kept[l], f)?;
            probe::sum_squares(&mut rec, f, &norms, 3 * l + 1)?;
            // The additive identity over the stage's identity units.
            let acc = a.ws.get(&d, Slot::Grad(1))?;
            if u.spec.shortcut == Shortcut::Identity {
                if stage_start.is_none() {
                    stage_start = Some(l);
                    residual::copy(&mut rec, x, acc)?;
                }
                residual::add(&mut rec, f, acc)?;
            }
            let stage_ends = self.units.get(l + 1).is_none_or(|n| n.spec.stage != u.spec.stage);
            if stage_ends && stage_start.take().is_some() {
                let slot = stage_base + 2 * u.spec.stage;
                probe::subtract_from(&mut rec, y, acc)?; // acc = x_end - (x_start + sum F)
                probe::sum_squares(&mut rec, acc, &norms, slot)?;
                probe::sum_squares(&mut rec, y, &norms, slot + 1)?;
            }
        }
        probe::sum_squares(&mut rec, &a.streams[l_count], &norms, 3 * l_count)?;
        cbs.push(rec.finish());

        let mut bwd = self.record_backward(gpu, images, false, Some(&norms))?;
        cbs.append(&mut bwd);
        gpu.submit(cbs)?;
        self.batches_tracked += 1;
        let v = norms.read(gpu)?;
        let per_unit = (0..=l_count).map(|l| [v[3 * l].sqrt(), v[3 * l + 1].sqrt(), v[3 * l + 2].sqrt()]).collect();
        let stages = (0..3)
            .map(|s| {
                let (diff, x) = (v[stage_base + 2 * s], v[stage_base + 2 * s + 1]);
                (x > 0.0).then(|| (diff / x).sqrt())
            })
            .collect();
        Ok(Probes { loss: self.loss(gpu)?, norms: per_unit, stage_identity: stages })
    }

    /// The stream `x_l` of the last forward, `l = 0..=L` (GPU buffers, borrowed).
    pub fn streams(&self) -> Result<&[Tensor]> {
        Ok(&self.acts()?.streams)
    }
}
