//! A whole ResNet on the GPU: stem, stages of residual units, head and loss; trained with SGD.
//!
//! One training step records the stem's, every unit's and the head's forward into command
//! buffers of their own, then the backward in reverse, then the optimizer, and hands them to the
//! device as they are recorded (on GPUs a few at a time; on CPU adapters all at once at the
//! end): nothing returns to the host between units, and the stream `x_l` and its gradient stay
//! on the GPU (see [`crate::unit`]).

use crate::arch::{Layer, NetConfig, Role, Shortcut, UnitKind};
use crate::error::{Error, Result};
use crate::gpu::{BindCache, Gpu, Recorder, Stream};
use crate::ops::batch_norm::Epilogue;
use crate::ops::pool_fc_loss::{self as head, Labels};
use crate::ops::{cast, conv, probe, relu, residual, sgd};
use crate::rng::dropout_seed;
use crate::tensor::{HalfTensor, Tensor};
use crate::unit::{Bn, Chain, Conv, HalfKept, Kept, Mode, Param, Slot, State, Unit, Workspace};

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
    /// `x_0 .. x_L`, each kept for the backward (empty on the f16 network: `half` has them).
    streams: Vec<Tensor>,
    kept: Vec<Kept>,
    /// The stream's gradients, accumulated in place: `grads[grad_of[l]]` holds `dE/dx_l`. An
    /// identity-shortcut unit shares its output's buffer; any other unit gets another one.
    grads: Vec<Tensor>,
    grad_of: Vec<usize>,
    /// Networks with a stem BN (every placement but pre-activation): the stem convolution's
    /// output (its BN's input).
    stem_h: Option<Tensor>,
    /// Pre-activation networks: `ReLU(BN(x_L))` (ReLU-only pre-activation: `ReLU(x_L)`) and its
    /// gradient.
    z: Option<(Tensor, Tensor)>,
    pooled: Tensor,
    dpooled: Tensor,
    logits: Tensor,
    dlogits: Tensor,
    loss: Tensor,
    grad_images: Tensor,
    ws: Workspace,
    /// The f16 network's ([`ResNet::set_f16`]).
    half: Option<HalfActs>,
    /// The bind groups of the network's passes on these buffers, kept from step to step.
    binds: BindCache,
}

/// The f16 network's activations: the stream `x_0 .. x_L`, what each unit keeps and the
/// stream's gradients (shared as [`Acts::grads`]) as halves; `x_0` as the f32 stem writes it
/// and its gradient as the stem reads it, `x_L` as the f32 head reads it and its gradient as
/// the head writes it.
struct HalfActs {
    loss_scale: f32,
    x0: Tensor,
    g0: Tensor,
    xl: Tensor,
    gl: Tensor,
    /// Networks with a stem BN: the gradient at its input.
    stem_dh: Option<Tensor>,
    streams: Vec<HalfTensor>,
    kept: Vec<HalfKept>,
    grads: Vec<HalfTensor>,
    grad_of: Vec<usize>,
}

/// The stream's gradient buffers for streams of `dims` (`x_0 .. x_L`) around `units`, from the
/// last stream down: `grad_of[l]` indexes `dE/dx_l`'s. A stream reuses a buffer of its shape
/// unless it is the next stream's and the unit between them does not accumulate in place (an
/// identity-shortcut unit shares its output's).
fn grad_buffers<T>(
    units: &[Unit],
    dims: &[[usize; 4]],
    mut alloc: impl FnMut(&[usize; 4]) -> Result<T>,
) -> Result<(Vec<T>, Vec<usize>)> {
    let (mut grads, mut shapes, mut grad_of) = (Vec::new(), Vec::new(), vec![0; dims.len()]);
    for l in (0..dims.len()).rev() {
        let next = (l + 1 < dims.len()).then(|| grad_of[l + 1]);
        let shared = l < units.len() && units[l].spec.shortcut == Shortcut::Identity;
        grad_of[l] = match (shared, next) {
            (true, Some(i)) => i,
            _ => match (0..grads.len()).find(|&i| shapes[i] == dims[l] && Some(i) != next) {
                Some(i) => i,
                None => {
                    grads.push(alloc(&dims[l])?);
                    shapes.push(dims[l]);
                    grads.len() - 1
                }
            },
        };
    }
    Ok((grads, grad_of))
}

/// The f16 network's loss scale `s` ([`ResNet::set_f16`]): a positive power of two from 2^-126
/// to 2^126, so that scaling and unscaling (by 1/s, normal too) are exact.
pub fn check_loss_scale(s: f32) -> Result<()> {
    // A normal float with no mantissa bits, whose reciprocal is normal (not 2^127).
    if !(s.is_normal() && s > 0.0 && s.to_bits() & 0x007f_ffff == 0 && s < 2f32.powi(127)) {
        return Err(Error::Invalid(format!(
            "the f16 network: loss scale {s} must be a power of two from 2^-126 to 2^126"
        )));
    }
    Ok(())
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

/// Copies `stats` one after another into `saved` (`save`), or back from it.
fn copy_running(gpu: &Gpu, stats: &[&Tensor], saved: &Tensor, save: bool) -> wgpu::CommandBuffer {
    let mut rec = gpu.recorder("running statistics");
    let mut at = 0;
    for t in stats {
        match save {
            true => rec.encoder().copy_buffer_to_buffer(&t.buffer, 0, &saved.buffer, at, t.bytes()),
            false => rec.encoder().copy_buffer_to_buffer(&saved.buffer, at, &t.buffer, 0, t.bytes()),
        }
        at += t.bytes();
    }
    rec.finish()
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

/// A ResNet on the GPU, on the context that made it: its methods refuse another [`Gpu`], and
/// images and labels made on another ([`Gpu::check_owns`]).
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
    /// The f16 network's loss scale, where its training passes run on the f16 path.
    loss_scale: Option<f32>,
    acts: Option<Acts>,
    /// What the last pass left to read back.
    done: Done,
    /// The context that made it ([`Gpu::context`]): its every method takes that one only.
    context: u64,
}

/// What the last pass computed, for [`ResNet::loss`], [`ResNet::logits`],
/// [`ResNet::grad_images`], [`ResNet::grads`] and [`ResNet::streams`] (which a pass that has
/// its logits wrote). Each pass clears it as it begins and sets
/// what it computed once it has run, so that a failed pass, or one that computes less (a
/// `predict` after a training step, on new buffers where the batch changed), leaves nothing to
/// read as a result that it is not.
#[derive(Clone, Copy, Debug, Default)]
struct Done {
    loss: bool,
    logits: bool,
    grad_images: bool,
    grads: bool,
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
        Ok(ResNet {
            config: config.clone(),
            stem,
            stem_bn,
            units,
            final_bn,
            fc_w,
            fc_b,
            batches_tracked,
            loss_scale: None,
            acts: None,
            done: Done::default(),
            context: gpu.context(),
        })
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

    /// Reads every parameter gradient of the last training pass, where it ran to the end and
    /// no training pass has begun since; else [`Error::Invalid`].
    pub fn grads(&self, gpu: &Gpu) -> Result<Vec<(String, Vec<f32>)>> {
        self.computed(self.done.grads, "parameter gradients", "a training pass")?;
        self.params().into_iter().map(|(n, p)| Ok((n, p.grad.read(gpu)?))).collect()
    }

    /// Bytes of the units' activations held for the current input shape: what they keep, the
    /// streams and the stream's gradients, their workspace, and on the f16 path its halves and
    /// f32 copies at the ends (not the stem's and head's own tensors, nor the image gradient).
    pub fn activation_bytes(&self) -> u64 {
        self.acts.as_ref().map_or(0, |a| {
            let kept: u64 = a.kept.iter().map(|k| k.bytes()).sum();
            let streams: u64 = a.streams.iter().map(|t| t.bytes()).sum();
            let grads: u64 = a.grads.iter().map(|t| t.bytes()).sum();
            let half = a.half.as_ref().map_or(0, |h| {
                let f32s = [&h.x0, &h.g0, &h.xl, &h.gl].into_iter().chain(&h.stem_dh).map(|t| t.bytes()).sum::<u64>();
                let halves = h.streams.iter().chain(&h.grads).map(|t| t.buffer.size()).sum::<u64>();
                f32s + halves + h.kept.iter().map(HalfKept::bytes).sum::<u64>()
            });
            kept + streams + grads + a.ws.bytes() + half
        })
    }

    /// Runs the training passes ([`ResNet::forward_backward`], [`ResNet::train_step`]) on the
    /// f16 path (`Some(loss_scale)`) or in f32 (`None`, the default). On the f16 path the stem
    /// and the head stay f32 and every unit runs [`Unit::forward_f16`] and
    /// [`Unit::backward_f16`]: the stream, what the units keep and the stream's gradients are
    /// halves (about half the activation memory and traffic); weights, BN statistics and every
    /// parameter gradient are stored f32, and the arithmetic accumulates in f32 (the
    /// convolutions round the weights to halves as they read them, and on cooperative matrices
    /// multiply halves). The head's gradient enters the units multiplied by `loss_scale` (a
    /// power of two such as 1024: a whole network's gradients at the stream are small, and
    /// halves lose precision below 6.1e-5; a gradient past 65504 once scaled overflows to
    /// infinity (on the GPUs we know: WGSL lets an implementation saturate values below 2^16
    /// instead), and the step's weights become NaN, which [`crate::train::train`] reports at
    /// the next step whose loss they reach, at the latest at the epoch's end (a ReLU's `max`
    /// may drop a NaN and leave the loss finite): a smaller scale then) and the units' parameter
    /// gradients and the stem's are divided by it again, so [`ResNet::grads`] reads the true
    /// gradients. Inference ([`ResNet::predict`]) runs in f32 either way (it reallocates the
    /// f32 activations when it follows f16 training at the same shape); [`ResNet::probe`],
    /// [`ResNet::train_step_checked`] and [`ResNet::streams`] measure the f32 network and are
    /// refused on the f16 path.
    ///
    /// Errors: the adapter has no shader-f16, a unit the f16 path does not take (only
    /// pre-activation and original units with the plain sum), or a loss scale that is not a
    /// finite positive power of two.
    pub fn set_f16(&mut self, gpu: &Gpu, loss_scale: Option<f32>) -> Result<()> {
        gpu.check_owns("the network", self.context)?;
        if let Some(s) = loss_scale {
            if !gpu.report.features.contains(wgpu::Features::SHADER_F16) {
                return Err(Error::Invalid(format!("the f16 network: {} has no shader-f16", gpu.report.name)));
            }
            if let Some(u) = self.units.iter().find(|u| !u.half_capable()) {
                return Err(Error::Invalid(format!(
                    "the f16 network: unit {} ({:?}, {:?}) is not on the f16 path (pre-activation and original units with the plain sum)",
                    u.spec.name, u.spec.kind, u.spec.combine
                )));
            }
            check_loss_scale(s)?;
        }
        if loss_scale != self.loss_scale {
            self.acts = None;
            self.done = Done { grads: self.done.grads, ..Done::default() };
            self.loss_scale = loss_scale;
        }
        Ok(())
    }

    /// The f16 network's loss scale, where its training passes run on the f16 path
    /// ([`ResNet::set_f16`]).
    pub fn f16(&self) -> Option<f32> {
        self.loss_scale
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

    /// Activations for `images`, on the f16 path with `Some(loss_scale)`.
    fn ensure_acts(&mut self, gpu: &Gpu, images: [usize; 4], half: Option<f32>) -> Result<()> {
        let scale = |a: &Acts| a.half.as_ref().map(|h| h.loss_scale);
        if self.acts.as_ref().is_some_and(|a| a.images == images && scale(a) == half) {
            return Ok(());
        }
        self.acts = None; // release the old shape's buffers first
        let what = format!("the activations for images {images:?}");
        let acts = gpu.allocation_scope(&what, || self.allocate_acts(gpu, images, half))?;
        self.acts = Some(acts);
        Ok(())
    }

    fn allocate_acts(&self, gpu: &Gpu, images: [usize; 4], half: Option<f32>) -> Result<Acts> {
        let [n, _, h, w] = images;
        let x0 = [n, self.config.stem_channels(), h, w];
        let mut dims = vec![x0];
        for u in &self.units {
            dims.push(u.out_dims(dims[dims.len() - 1]));
        }
        let d = dims[dims.len() - 1];
        let mut ws = Workspace::default();
        let (mut streams, mut kept, mut grads, mut grad_of, mut half_acts) = (vec![], vec![], vec![], vec![], None);
        match half {
            None => {
                streams = dims.iter().map(|d| Tensor::zeros(gpu, d)).collect::<Result<_>>()?;
                kept =
                    self.units.iter().zip(&dims).map(|(u, &d)| u.allocate(gpu, d, &mut ws)).collect::<Result<_>>()?;
                (grads, grad_of) = grad_buffers(&self.units, &dims, |d| Tensor::zeros(gpu, d))?;
            }
            Some(loss_scale) => {
                let zeros = |d: &[usize; 4]| HalfTensor::zeros(gpu, d);
                let (grads, grad_of) = grad_buffers(&self.units, &dims, zeros)?;
                half_acts = Some(HalfActs {
                    loss_scale,
                    x0: Tensor::zeros(gpu, &x0)?,
                    g0: Tensor::zeros(gpu, &x0)?,
                    xl: Tensor::zeros(gpu, &d)?,
                    gl: Tensor::zeros(gpu, &d)?,
                    stem_dh: self.stem_bn.as_ref().map(|_| Tensor::zeros(gpu, &x0)).transpose()?,
                    streams: dims.iter().map(zeros).collect::<Result<_>>()?,
                    kept: self
                        .units
                        .iter()
                        .zip(&dims)
                        .map(|(u, &d)| u.allocate_f16(gpu, d, &mut ws))
                        .collect::<Result<_>>()?,
                    grads,
                    grad_of,
                });
            }
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
            half: half_acts,
            binds: BindCache::new(),
        })
    }

    fn acts(&self) -> Result<&Acts> {
        self.acts.as_ref().ok_or_else(|| Error::Invalid("no forward pass has run yet".into()))
    }

    /// Records the forward: the stem, each unit and the head in command buffers of their own,
    /// pushed to `out` as each is recorded (the device starts on them meanwhile). With labels,
    /// the head also computes the loss and its gradient at the logits.
    fn record_forward(
        &self,
        gpu: &Gpu,
        out: &mut Stream,
        images: &Tensor,
        labels: Option<&Labels>,
        mode: Mode,
    ) -> Result<()> {
        let a = self.acts()?;
        if let Some(h) = &a.half {
            return self.record_forward_f16(gpu, out, a, h, images, labels);
        }
        let chains = |l: usize| mode == Mode::Train && self.units.get(l).is_some_and(|u| u.chains());

        let mut rec = self.recorder(gpu, "stem forward");
        // A pre-activation stem's convolution takes the first unit's BN statistics of x_0.
        let first_bn = chains(0).then(|| &self.units[0].bns[0]);
        self.stem_forward(&mut rec, a, images, &a.streams[0], mode, first_bn)?;
        out.push(rec.finish());

        let n = self.units.len();
        for (l, u) in self.units.iter().enumerate() {
            let mut rec = self.recorder(gpu, &u.spec.name);
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
            out.push(rec.finish());
        }

        let mut rec = self.recorder(gpu, "head forward");
        self.head_forward(&mut rec, a, &a.streams[n], labels, mode, n > 0 && chains(n - 1))?;
        out.push(rec.finish());
        Ok(())
    }

    /// The f16 network's training forward: the f32 stem, `x_0` rounded to halves, every unit
    /// on the f16 path, `x_L` widened for the f32 head.
    fn record_forward_f16(
        &self,
        gpu: &Gpu,
        out: &mut Stream,
        a: &Acts,
        h: &HalfActs,
        images: &Tensor,
        labels: Option<&Labels>,
    ) -> Result<()> {
        let mut rec = self.recorder(gpu, "stem forward");
        self.stem_forward(&mut rec, a, images, &h.x0, Mode::Train, None)?;
        cast::to_half(&mut rec, &h.x0, &h.streams[0], 1.0)?;
        out.push(rec.finish());
        for (l, u) in self.units.iter().enumerate() {
            let mut rec = self.recorder(gpu, &u.spec.name);
            u.forward_f16(&mut rec, &h.streams[l], &h.streams[l + 1], &h.kept[l])?;
            out.push(rec.finish());
        }
        let mut rec = self.recorder(gpu, "head forward");
        cast::to_f32(&mut rec, &h.streams[self.units.len()], &h.xl, 1.0)?;
        self.head_forward(&mut rec, a, &h.xl, labels, Mode::Train, false)?;
        out.push(rec.finish());
        Ok(())
    }

    /// The stem: `x_0` from the images (through the stem BN and ReLU where there is one: every
    /// placement but pre-activation);
    /// with `first_bn`, that BN's training statistics of `x_0` from the convolution's epilogue.
    fn stem_forward(
        &self,
        rec: &mut Recorder,
        a: &Acts,
        images: &Tensor,
        x0: &Tensor,
        mode: Mode,
        first_bn: Option<&Bn>,
    ) -> Result<()> {
        match (&self.stem_bn, &a.stem_h, first_bn) {
            (Some(bn), Some(h), _) => {
                let (w, relu) = (&self.stem.w.value, Epilogue { add: false, relu: true });
                if mode == Mode::Train {
                    // The BN's statistics from the convolution's epilogue (conv::forward_stats).
                    bn.conv_stats(rec, images, None, w, h, 1, false)?;
                    bn.recompute(rec, h, x0, relu)
                } else {
                    conv::forward(rec, images, w, h, 1, false)?;
                    bn.forward(rec, mode, h, x0, relu)
                }
            }
            (_, _, Some(bn)) => bn.conv_stats(rec, images, None, &self.stem.w.value, x0, 1, false),
            _ => conv::forward(rec, images, &self.stem.w.value, x0, 1, false),
        }
    }

    /// The head from `x_L`: `z = ReLU(BN(x_L))` (pre-activation; `stats_done`: the last unit's
    /// epilogue made the BN's statistics), `ReLU(x_L)` (ReLU-only pre-activation) or `x_L`,
    /// pooled, the fully connected layer, and with labels the loss and its gradient.
    fn head_forward(
        &self,
        rec: &mut Recorder,
        a: &Acts,
        x_last: &Tensor,
        labels: Option<&Labels>,
        mode: Mode,
        stats_done: bool,
    ) -> Result<()> {
        let z = match (&self.final_bn, &a.z) {
            (Some(bn), Some((z, _))) => {
                let relu = Epilogue { add: false, relu: true };
                match stats_done {
                    true => bn.recompute(rec, x_last, z, relu)?,
                    false => bn.forward(rec, mode, x_last, z, relu)?,
                }
                z
            }
            (None, Some((z, _))) => {
                relu::forward(rec, x_last, z)?;
                z
            }
            _ => x_last,
        };
        head::pool_forward(rec, z, &a.pooled)?;
        head::fc_forward(rec, &a.pooled, &self.fc_w.value, &self.fc_b.value, &a.logits)?;
        if let Some(labels) = labels {
            head::softmax_xent(rec, &a.logits, labels, &a.loss, &a.dlogits)?;
        }
        Ok(())
    }

    /// Records the backward of the last training forward, head to stem.
    /// With `norms`, each stream gradient's squared norm goes into slot `3l + 2`.
    fn record_backward(
        &self,
        gpu: &Gpu,
        out: &mut Stream,
        images: &Tensor,
        image_grad: bool,
        norms: Option<&Tensor>,
    ) -> Result<()> {
        let a = self.acts()?;
        if let Some(h) = &a.half {
            return self.record_backward_f16(gpu, out, a, h, images, image_grad);
        }
        let grad = |l: usize| -> Result<&Tensor> {
            let i = a.grad_of.get(l).ok_or_else(|| Error::Invalid(format!("no stream gradient {l}")))?;
            Ok(&a.grads[*i])
        };
        let l_count = self.units.len();

        let mut rec = self.recorder(gpu, "head backward");
        let g_last = grad(l_count)?;
        self.head_backward(&mut rec, a, &a.streams[l_count], g_last)?;
        if let Some(n) = norms {
            probe::sum_squares(&mut rec, g_last, n, 3 * l_count + 2)?;
        }
        out.push(rec.finish());

        for (l, u) in self.units.iter().enumerate().rev() {
            let mut rec = self.recorder(gpu, &u.spec.name);
            let (x, y) = (&a.streams[l], &a.streams[l + 1]);
            u.backward(&mut rec, x, y, grad(l + 1)?, grad(l)?, &a.kept[l], &a.ws)?;
            if let Some(n) = norms {
                probe::sum_squares(&mut rec, grad(l)?, n, 3 * l + 2)?;
            }
            out.push(rec.finish());
        }

        let mut rec = self.recorder(gpu, "stem backward");
        let dh = a.stem_h.as_ref().map(|h| a.ws.get(h.dims(), Slot::DAct)).transpose()?;
        self.stem_backward(&mut rec, a, images, grad(0)?, dh, image_grad)?;
        out.push(rec.finish());
        Ok(())
    }

    /// The f16 network's backward: the f32 head's gradient at `x_L` times the loss scale,
    /// rounded to halves; every unit's backward on the f16 path; the gradient at `x_0` and the
    /// units' parameter gradients divided by the loss scale; the f32 stem.
    fn record_backward_f16(
        &self,
        gpu: &Gpu,
        out: &mut Stream,
        a: &Acts,
        h: &HalfActs,
        images: &Tensor,
        image_grad: bool,
    ) -> Result<()> {
        let grad = |l: usize| -> Result<&HalfTensor> {
            let i = h.grad_of.get(l).ok_or_else(|| Error::Invalid(format!("no stream gradient {l}")))?;
            Ok(&h.grads[*i])
        };
        let (l_count, s) = (self.units.len(), h.loss_scale);
        let mut rec = self.recorder(gpu, "head backward");
        self.head_backward(&mut rec, a, &h.xl, &h.gl)?;
        cast::to_half(&mut rec, &h.gl, grad(l_count)?, s)?;
        out.push(rec.finish());
        for (l, u) in self.units.iter().enumerate().rev() {
            let mut rec = self.recorder(gpu, &u.spec.name);
            u.backward_f16(&mut rec, &h.streams[l], &h.streams[l + 1], grad(l + 1)?, grad(l)?, &h.kept[l])?;
            out.push(rec.finish());
        }
        let mut rec = self.recorder(gpu, "stem backward");
        let grads: Vec<&Tensor> = self.unit_params().map(|p| &p.grad).collect();
        cast::scale_many(&mut rec, &grads, 1.0 / s)?;
        cast::to_f32(&mut rec, grad(0)?, &h.g0, 1.0 / s)?;
        self.stem_backward(&mut rec, a, images, &h.g0, h.stem_dh.as_ref(), image_grad)?;
        out.push(rec.finish());
        Ok(())
    }

    /// The head's backward to `g_last = dE/dx_L` (overwritten), and the fully connected layer's
    /// parameter gradients.
    fn head_backward(&self, rec: &mut Recorder, a: &Acts, x_last: &Tensor, g_last: &Tensor) -> Result<()> {
        head::fc_backward(
            rec,
            &a.pooled,
            &self.fc_w.value,
            &a.dlogits,
            &a.dpooled,
            &self.fc_w.grad,
            &self.fc_b.grad,
            false,
            false,
        )?;
        match (&self.final_bn, &a.z) {
            (Some(bn), Some((_, dz))) => {
                head::pool_backward(rec, &a.dpooled, dz, false)?;
                bn.backward(rec, x_last, dz, true, g_last, false)
            }
            (None, Some((_, dz))) => {
                head::pool_backward(rec, &a.dpooled, dz, false)?;
                relu::backward(rec, x_last, dz, g_last, false)
            }
            _ => head::pool_backward(rec, &a.dpooled, g_last, false),
        }
    }

    /// The stem's backward from `g0 = dE/dx_0` (through the stem BN where there is one, its
    /// input gradient into `dh`), and with `image_grad` the gradient to the images.
    fn stem_backward(
        &self,
        rec: &mut Recorder,
        a: &Acts,
        images: &Tensor,
        g0: &Tensor,
        dh: Option<&Tensor>,
        image_grad: bool,
    ) -> Result<()> {
        let dstem = match (&self.stem_bn, &a.stem_h, dh) {
            (Some(bn), Some(h), Some(dh)) => {
                bn.backward(rec, h, g0, true, dh, false)?;
                dh
            }
            _ => g0,
        };
        conv::backward_weight(rec, images, dstem, &self.stem.w.grad, 1, false)?;
        if image_grad {
            conv::backward_data(rec, dstem, &self.stem.w.value, &a.grad_images, 1, false)?;
        }
        Ok(())
    }

    /// The f16 units' learned parameters, whose gradients the f16 network divides by the loss
    /// scale: every convolution's weights and every BN's scale and shift (the f16 path takes no
    /// gated units).
    fn unit_params(&self) -> impl Iterator<Item = &Param> {
        self.units.iter().flat_map(|u| {
            let weights = u.convs.iter().chain(&u.proj).map(|c| &c.w);
            weights.chain(u.bns.iter().chain(&u.proj_bn).flat_map(|b| [&b.gamma, &b.beta]))
        })
    }

    fn record_sgd(&self, gpu: &Gpu, opt: Sgd) -> Result<wgpu::CommandBuffer> {
        let mut rec = self.recorder(gpu, "sgd");
        let params = self.params();
        let triples: Vec<[&Tensor; 3]> = params.iter().map(|(_, p)| [&p.value, &p.grad, &p.momentum]).collect();
        sgd::step_many(&mut rec, &triples, opt.lr, opt.momentum, opt.weight_decay)?;
        Ok(rec.finish())
    }

    /// Checks the batch and makes the activations for it: the f16 network's with
    /// `Some(loss_scale)`.
    fn prepare(&mut self, gpu: &Gpu, images: &Tensor, labels: Option<&Labels>, half: Option<f32>) -> Result<()> {
        // Before anything is allocated: activations made on another context would stay.
        gpu.check_owns("the network", self.context)?;
        gpu.check_owns("the images", images.context())?;
        if let Some(l) = labels {
            gpu.check_owns("the labels", l.context())?;
        }
        let d = self.check_images(images)?;
        if let Some(l) = labels
            && (l.len() != d[0] || l.classes() != self.config.classes)
        {
            return Err(Error::Shape(format!(
                "{} labels of {} classes for {} images and {} classes",
                l.len(),
                l.classes(),
                d[0],
                self.config.classes
            )));
        }
        // A training pass's batch norm needs 2 values per channel or more; the last stage's see
        // the fewest. Refused here, not at that stage, after the earlier ones ran (on GPUs a
        // stream submits as it goes) and moved their running statistics.
        if labels.is_some() {
            let x0 = [d[0], self.config.stem_channels(), d[2], d[3]];
            let last = self.units.iter().fold(x0, |x, u| u.out_dims(x));
            if last[0] * last[2] * last[3] == 1 {
                return Err(Error::Invalid(format!(
                    "a training pass over images {d:?}: the last stage's batch norm would see 1 value per \
                     channel ({last:?}); give more or larger images"
                )));
            }
        }
        // The arguments are good: from here the pass writes. An inference pass (no labels)
        // leaves the parameters' gradients as they were.
        self.done = Done { grads: self.done.grads && labels.is_none(), ..Done::default() };
        // Dropout masks: a fresh one per training step and unit, the same in its backward.
        for (l, u) in self.units.iter_mut().enumerate() {
            u.seed = dropout_seed(self.batches_tracked as u64, l);
        }
        self.ensure_acts(gpu, d, half)?;
        self.acts()?.binds.sweep();
        Ok(())
    }

    /// Bind groups kept from the last steps for the next (0 before the first pass).
    pub fn kept_bind_groups(&self) -> usize {
        self.acts.as_ref().map_or(0, |a| a.binds.len())
    }

    /// A recorder for one of the network's passes: its bind groups are kept with the
    /// activations, for the next step's passes.
    fn recorder<'a>(&'a self, gpu: &'a Gpu, label: &str) -> Recorder<'a> {
        match &self.acts {
            Some(a) => gpu.recorder_cached(label, &a.binds),
            None => gpu.recorder(label),
        }
    }

    /// One training-mode forward and backward (no update): loss, logits, every parameter
    /// gradient, and with `image_grad` the gradient to the images. Returns the loss.
    pub fn forward_backward(&mut self, gpu: &Gpu, images: &Tensor, labels: &Labels, image_grad: bool) -> Result<f32> {
        self.prepare(gpu, images, Some(labels), self.loss_scale)?;
        let mut out = gpu.stream();
        self.record_forward(gpu, &mut out, images, Some(labels), Mode::Train)?;
        self.record_backward(gpu, &mut out, images, image_grad, None)?;
        out.finish()?;
        self.batches_tracked = self.batches_tracked.saturating_add(1);
        self.done = Done { loss: true, logits: true, grad_images: image_grad, grads: true };
        self.loss(gpu)
    }

    /// One SGD step on a batch: forward, backward and update, handed to the device as they are
    /// recorded, then a wait for them and the loss read back. Returns the loss before the
    /// update.
    pub fn train_step(&mut self, gpu: &Gpu, images: &Tensor, labels: &Labels, opt: Sgd) -> Result<f32> {
        let mut out = gpu.stream();
        self.record_train_step(gpu, &mut out, images, labels, opt)?;
        self.finish_train_step(gpu, out)
    }

    /// Submits what [`ResNet::record_train_step`] recorded, waits, and reads the loss back.
    pub(crate) fn finish_train_step(&mut self, gpu: &Gpu, out: Stream) -> Result<f32> {
        out.finish()?;
        self.batches_tracked = self.batches_tracked.saturating_add(1);
        self.done = Done { loss: true, logits: true, grad_images: false, grads: true };
        self.loss(gpu)
    }

    /// Records [`ResNet::train_step`]'s passes into `out` (the bench times them queued).
    pub(crate) fn record_train_step(
        &mut self,
        gpu: &Gpu,
        out: &mut Stream,
        images: &Tensor,
        labels: &Labels,
        opt: Sgd,
    ) -> Result<()> {
        // Before any pass is recorded: on GPUs a stream submits as it goes, so a step refused
        // at its update would have run its passes (BN's running statistics moved).
        sgd::check_hyperparameters(opt.lr, opt.momentum, opt.weight_decay)?;
        self.prepare(gpu, images, Some(labels), self.loss_scale)?;
        self.record_forward(gpu, out, images, Some(labels), Mode::Train)?;
        self.record_backward(gpu, out, images, false, None)?;
        out.push(self.record_sgd(gpu, opt)?);
        Ok(())
    }

    /// [`ResNet::train_step`] with a check after the passes: the forward and backward run with
    /// the probes of [`ResNet::probe`], and if the loss or the sum of squares of any stream
    /// `x_l`, branch `F(x_l)` or stream gradient `dE/dx_l` is not finite (a NaN or an infinity
    /// in it, or values so large that their squares overflow f32), the step returns
    /// [`Error::NonFinite`] naming the first one in the order they were computed, and the step
    /// is undone: the weights and momentum are not updated, and BN's running statistics and
    /// batch count are as they were (the gradients are the failed pass's).
    pub fn train_step_checked(&mut self, gpu: &Gpu, images: &Tensor, labels: &Labels, opt: Sgd) -> Result<f32> {
        // Before the copy below reads the network's buffers on `gpu`'s device.
        gpu.check_owns("the network", self.context)?;
        self.f32_only("train_step_checked")?;
        sgd::check_hyperparameters(opt.lr, opt.momentum, opt.weight_decay)?;
        // The running statistics as they are, copied on the GPU: the probe's training-mode
        // forward moves them.
        // The copy is queued, not waited for: the probe's passes follow it on the same queue.
        let running: Vec<&Tensor> = self.running_stats();
        let saved = Tensor::zeros(gpu, &[running.iter().map(|t| t.len()).sum::<usize>().max(1)])?;
        gpu.submit_queued([copy_running(gpu, &running, &saved, true)]);
        let count = self.batches_tracked;
        let p = self.probe(gpu, images, labels)?;
        if let Some(bad) = first_non_finite(&p, &self.units) {
            gpu.submit([copy_running(gpu, &self.running_stats(), &saved, false)])?;
            self.batches_tracked = count;
            return Err(Error::NonFinite(bad));
        }
        gpu.submit([self.record_sgd(gpu, opt)?])?;
        Ok(p.loss)
    }

    /// Every BN running statistic, in the order of [`ResNet::entries`].
    fn running_stats(&self) -> Vec<&Tensor> {
        self.entries()
            .into_iter()
            .filter_map(|(_, e)| match e {
                Entry::Buffer(t) => Some(t),
                _ => None,
            })
            .collect()
    }

    /// Inference mode (running statistics): the logits, `[N, classes]` row-major.
    ///
    /// It runs on the buffers a training pass at the batch's shape uses (allocated where the
    /// shape is new, the gradients' too), in f32 also after f16 training: a batch that trained
    /// only on the f16 path may not fit here. Evaluate in smaller batches (as
    /// [`crate::train::train`] does, at a third of an f16 training batch).
    pub fn predict(&mut self, gpu: &Gpu, images: &Tensor) -> Result<Vec<f32>> {
        self.prepare(gpu, images, None, None)?;
        let mut out = gpu.stream();
        self.record_forward(gpu, &mut out, images, None, Mode::Eval)?;
        out.finish()?;
        self.done.logits = true;
        self.logits(gpu)
    }

    /// The loss of the last pass, where it was a training pass that ran to the end; else
    /// [`Error::Invalid`].
    pub fn loss(&self, gpu: &Gpu) -> Result<f32> {
        self.computed(self.done.loss, "a loss", "a training pass")?;
        Ok(self.acts()?.loss.read(gpu)?[0])
    }

    /// The logits of the last pass, where it ran to the end; else [`Error::Invalid`].
    pub fn logits(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        self.computed(self.done.logits, "logits", "a pass")?;
        self.acts()?.logits.read(gpu)
    }

    /// The gradient to the images of the last pass, where it was a `forward_backward` with
    /// `image_grad` that ran to the end; else [`Error::Invalid`].
    pub fn grad_images(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        self.computed(self.done.grad_images, "an image gradient", "a forward_backward with image_grad")?;
        self.acts()?.grad_images.read(gpu)
    }

    /// `Ok` where the last pass computed what is asked for.
    fn computed(&self, done: bool, what: &str, pass: &str) -> Result<()> {
        if done {
            return Ok(());
        }
        Err(Error::Invalid(format!("no {what} to read: the last pass was not {pass} that ran to the end")))
    }

    /// One training-mode forward and backward with probes (no update), for the analysis:
    /// per stream index `l = 0..=L` the norms of `x_l`, `F(x_l)` (0 at `L`) and `dE/dx_l`, and
    /// per stage the identity check `x_end = x_start + sum F` over its identity-shortcut units,
    /// all computed on the GPU from its own buffers.
    pub fn probe(&mut self, gpu: &Gpu, images: &Tensor, labels: &Labels) -> Result<Probes> {
        self.f32_only("probe")?;
        self.prepare(gpu, images, Some(labels), None)?;
        let l_count = self.units.len();
        let mut out = gpu.stream();
        self.record_forward(gpu, &mut out, images, Some(labels), Mode::Train)?;
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
        out.push(rec.finish());
        self.record_backward(gpu, &mut out, images, false, Some(&norms))?;
        out.finish()?;
        self.batches_tracked = self.batches_tracked.saturating_add(1);
        self.done = Done { loss: true, logits: true, grad_images: false, grads: true };
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
        self.f32_only("streams")?;
        // Every forward that ran to the end has its logits, and wrote every stream before them.
        self.computed(self.done.logits, "streams", "a pass")?;
        Ok(&self.acts()?.streams)
    }

    /// [`Error::Invalid`] for `what` on the f16 network ([`ResNet::set_f16`]).
    fn f32_only(&self, what: &str) -> Result<()> {
        match self.loss_scale {
            Some(_) => Err(Error::Invalid(format!("{what} measures the f32 network: call set_f16(gpu, None) first"))),
            None => Ok(()),
        }
    }
}
