//! A residual unit on the GPU: `y_l = h(x_l) + F(x_l)`, `x_{l+1} = f(y_l)` (see [`crate::arch`]
//! for the variants). Its forward and its backward are each recorded into a command buffer of
//! their own; the stream `x` and its gradient never leave the GPU.
//!
//! Forward (training): `x_{l+1}` starts as the shortcut `h(x_l)` (a copy for the identity) and
//! the branch is added into it in place by the fused epilogue of its last op: the last
//! convolution (`accumulate`) in pre-activation units, the last BN's add-then-ReLU in original
//! units.
//!
//! Backward: the stream's gradient is accumulated in place, `g_l = g_{l+1} + (dF/dx_l)^T g_{l+1}`:
//! the first op of the branch adds its input gradient into the buffer that holds `g_{l+1}`
//! (for the identity shortcut it is the same buffer). Units that change shape write `g_l` into
//! the next buffer: original units starting from the shortcut's own backward, pre-activation
//! units with a projection from their first BN's backward, after the projection's data
//! gradient was added into that BN's output gradient (the projection reads `ReLU(BN(x_l))`).
//!
//! Fusion: every `ReLU(BN(.))` that feeds a convolution (each layer of a pre-activation unit,
//! the layers after the first of an original unit) is never written: the BN computes its batch
//! statistics ([`Bn::prologue`]) and the convolution applies the normalisation and the ReLU as
//! it loads its input, in the forward ([`conv::forward_bn_relu`]) and in the weight gradient
//! ([`conv::backward_weight_bn_relu`]). The BN backward recomputes the ReLU mask from the BN's
//! input and the saved statistics. (On a GPU, where timing says a separate pass is faster for a
//! shape, the convolution writes `ReLU(BN(x))` into a context temporary first; the unit's memory
//! below is the same.)
//!
//! Memory: what a unit keeps for its backward.
//! - Pre-activation: its input `x_l` (the stream buffer) and the input of each later weight
//!   layer (`conv_i(...)`, the input of `bn_{i+1}`): 2 tensors for a basic unit, 3 for a
//!   bottleneck. Neither the BN outputs nor the ReLU outputs exist. PyTorch's autograd keeps 4
//!   tensors for the basic unit (x, ReLU(BN1(x)), conv1 output, ReLU(BN2(.))).
//! - Original: `x_l`, each convolution's output (the BN inputs), and for projection shortcuts
//!   the projection's output; `x_{l+1}` itself gives the final ReLU's mask.
//!
//! The paper's other variants (the placements of its Table 2 and the shortcut combinations of
//! Table 1, see [`crate::arch`]) run on a general path instead: `h(x_l)`, `F(x_l)`, the gate and
//! `y_l` are computed into buffers of their own and combined by `ops::mix`; it keeps every layer's
//! output, each BN's input, `h`, the gate and (BN after addition) `y_l`. Clear before fast.
//!
//! Per BN layer, two per-channel vectors (batch mean and inverse std) are saved.
//! Temporaries (recomputed activations and gradients inside the branch) live in a workspace
//! shared by all units of the network.

use std::collections::HashMap;

use crate::arch::{Combine, Layer, Shortcut, UnitKind, UnitSpec};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder};
use crate::ops::batch_norm::{self, BnGrads, BnTensors, Epilogue};
use crate::ops::{conv, gate, mix, relu, residual};
use crate::tensor::{HalfTensor, Tensor};

/// Training (batch statistics, running statistics updated) or inference (running statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// Host values by PyTorch name, as [`crate::arch::NetConfig::tensors`] lists them.
pub type State = HashMap<String, Vec<f32>>;

/// The values of `name`, which must have `len` elements.
pub fn take<'a>(state: &'a State, name: &str, len: usize) -> Result<&'a [f32]> {
    let v = state.get(name).ok_or_else(|| Error::Invalid(format!("missing tensor {name}")))?;
    if v.len() != len {
        return Err(Error::Length { what: name.to_string(), expected: len, got: v.len() });
    }
    Ok(v)
}

/// A learned tensor with its gradient and SGD momentum buffer.
#[derive(Debug)]
pub struct Param {
    pub value: Tensor,
    pub grad: Tensor,
    pub momentum: Tensor,
}

impl Param {
    pub fn new(gpu: &Gpu, dims: &[usize], data: &[f32]) -> Result<Param> {
        Ok(Param {
            value: Tensor::new(gpu, dims, data)?,
            grad: Tensor::zeros(gpu, dims)?,
            momentum: Tensor::zeros(gpu, dims)?,
        })
    }

    /// `name` from `state`, with shape `dims`.
    pub fn load(gpu: &Gpu, state: &State, name: &str, dims: &[usize]) -> Result<Param> {
        Param::new(gpu, dims, take(state, name, dims.iter().product())?)
    }
}

/// One batch-norm layer: learned scale and shift, running statistics, and what the forward
/// saves for the backward.
#[derive(Debug)]
pub struct Bn {
    pub gamma: Param,
    pub beta: Param,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    save_mean: Tensor,
    save_invstd: Tensor,
    scratch: Tensor,
    /// The convolutions' BN + ReLU prologue values, `[C, 4]`, of the last training statistics:
    /// every training forward's statistics write them ([`BnTensors::affine`]), and only those,
    /// so that a backward reads the values its forward used.
    pub affine: Tensor,
    /// The same values from the running statistics, for inference ([`Bn::prologue`]).
    eval_affine: Tensor,
}

impl Bn {
    /// From host values of weight, bias, running mean and running variance.
    pub fn new(gpu: &Gpu, gamma: &[f32], beta: &[f32], mean: &[f32], var: &[f32]) -> Result<Bn> {
        let c = gamma.len();
        Ok(Bn {
            gamma: Param::new(gpu, &[c], gamma)?,
            beta: Param::new(gpu, &[c], beta)?,
            running_mean: Tensor::new(gpu, &[c], mean)?,
            running_var: Tensor::new(gpu, &[c], var)?,
            save_mean: Tensor::zeros(gpu, &[c])?,
            save_invstd: Tensor::zeros(gpu, &[c])?,
            scratch: Tensor::zeros(gpu, &[2 * c])?,
            affine: Tensor::zeros(gpu, &[c, 4])?,
            eval_affine: Tensor::zeros(gpu, &[c, 4])?,
        })
    }

    /// `{prefix}.weight`, `.bias`, `.running_mean`, `.running_var` from `state`, `c` channels.
    pub fn load(gpu: &Gpu, state: &State, prefix: &str, c: usize) -> Result<Bn> {
        let get = |s: &str| take(state, &format!("{prefix}.{s}"), c);
        Bn::new(gpu, get("weight")?, get("bias")?, get("running_mean")?, get("running_var")?)
    }

    fn tensors(&self) -> BnTensors<'_> {
        BnTensors {
            gamma: &self.gamma.value,
            beta: &self.beta.value,
            running_mean: &self.running_mean,
            running_var: &self.running_var,
            affine: Some(&self.affine),
        }
    }

    /// `y = ep(BN(x))` in either mode.
    pub fn forward(&self, rec: &mut Recorder, mode: Mode, x: &Tensor, y: &Tensor, ep: Epilogue) -> Result<()> {
        match mode {
            Mode::Train => {
                batch_norm::forward_train(rec, x, y, &self.tensors(), &self.save_mean, &self.save_invstd, ep)
            }
            Mode::Eval => batch_norm::forward_eval(rec, x, y, &self.tensors(), ep),
        }
    }

    /// The forward of `ReLU(BN(x))` for a convolution that applies it itself as it loads `x`
    /// ([`conv::forward_bn_relu`]): in training the batch statistics (saved, running ones
    /// moved, and [`Bn::affine`] from them); in inference the values from the running
    /// statistics. Returns the values the convolution reads.
    pub fn prologue(&self, rec: &mut Recorder, mode: Mode, x: &Tensor) -> Result<&Tensor> {
        match mode {
            Mode::Train => {
                batch_norm::stats_train(rec, x, &self.tensors(), &self.save_mean, &self.save_invstd)?;
                Ok(&self.affine)
            }
            Mode::Eval => {
                batch_norm::affine_eval(rec, &self.tensors(), &self.eval_affine)?;
                Ok(&self.eval_affine)
            }
        }
    }

    /// `y (+)= conv(x, w)` (through the BN + ReLU prologue `pre` where given) followed by this
    /// BN's training statistics of `y` ([`conv::forward_stats`]: on the tiled kernels the
    /// convolution's epilogue sums its output, so `y` is not read again).
    #[allow(clippy::too_many_arguments)]
    pub fn conv_stats(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        pre: Option<&Tensor>,
        w: &Tensor,
        y: &Tensor,
        stride: usize,
        accumulate: bool,
    ) -> Result<()> {
        conv::forward_stats(rec, x, pre, w, y, stride, accumulate, &self.tensors(), &self.save_mean, &self.save_invstd)
    }

    /// The backward through the convolution that reads this BN's `ReLU(BN(x))`
    /// ([`conv::backward_data_bn`]): `da (+)=` the convolution's input gradient from `dy` and `w`,
    /// then this BN's backward with the ReLU mask into `dx` (+=, with `accumulate_dx`) and its
    /// parameter gradients, from [`Bn::affine`] (the last training statistics' values). On the
    /// tiled kernels the convolution's epilogue makes the BN's sums.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_backward(
        &self,
        rec: &mut Recorder,
        dy: &Tensor,
        w: &Tensor,
        stride: usize,
        da: &Tensor,
        accumulate: bool,
        x: &Tensor,
        dx: &Tensor,
        accumulate_dx: bool,
    ) -> Result<()> {
        conv::backward_data_bn(rec, dy, w, da, stride, accumulate, x, &self.affine, &self.grads(), dx, accumulate_dx)
    }

    /// What this BN's backward reads and writes per channel.
    fn grads(&self) -> BnGrads<'_> {
        BnGrads {
            gamma: &self.gamma.value,
            beta: &self.beta.value,
            save_mean: &self.save_mean,
            save_invstd: &self.save_invstd,
            dgamma: &self.gamma.grad,
            dbeta: &self.beta.grad,
            scratch: &self.scratch,
        }
    }

    /// Recomputes `ReLU(BN(x))` with the statistics the last training forward saved.
    pub fn recompute_relu(&self, rec: &mut Recorder, x: &Tensor, y: &Tensor) -> Result<()> {
        self.recompute(rec, x, y, Epilogue { add: false, relu: true })
    }

    /// Recomputes `ep(BN(x))` with the statistics the last training forward saved.
    pub fn recompute(&self, rec: &mut Recorder, x: &Tensor, y: &Tensor, ep: Epilogue) -> Result<()> {
        let (g, b) = (&self.gamma.value, &self.beta.value);
        batch_norm::apply_saved(rec, x, y, g, b, &self.save_mean, &self.save_invstd, ep)
    }

    /// [`Bn::recompute`] on f16 tensors.
    pub fn recompute_f16(&self, rec: &mut Recorder, x: &HalfTensor, y: &HalfTensor, ep: Epilogue) -> Result<()> {
        let (g, b) = (&self.gamma.value, &self.beta.value);
        batch_norm::apply_saved_f16(rec, x, y, g, b, &self.save_mean, &self.save_invstd, ep)
    }

    /// Backward of the last training forward: `dx (+)=`, the parameter gradients overwritten.
    pub fn backward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        dy: &Tensor,
        relu: bool,
        dx: &Tensor,
        accumulate: bool,
    ) -> Result<()> {
        batch_norm::backward(
            rec,
            x,
            dy,
            &self.gamma.value,
            &self.beta.value,
            &self.save_mean,
            &self.save_invstd,
            relu,
            dx,
            &self.gamma.grad,
            &self.beta.grad,
            &self.scratch,
            accumulate,
            false,
        )
    }
}

/// How a fused pre-activation unit's training forward shares batch statistics with its
/// neighbours ([`Unit::forward_chained`]): each BN's statistics taken in the epilogue of the
/// convolution that writes its input ([`conv::forward_stats`]), so no BN reads an activation.
#[derive(Clone, Copy, Default)]
pub struct Chain<'a> {
    /// The statistics of `x` for this unit's first BN are already taken (by the convolution that
    /// wrote `x`: the stem, or the previous unit's last).
    pub input_stats: bool,
    /// The BN that normalises `y` next (the next unit's first, or the network's final BN): its
    /// statistics are taken by this unit's last convolution.
    pub next_bn: Option<&'a Bn>,
}

/// A square convolution without bias.
#[derive(Debug)]
pub struct Conv {
    pub w: Param,
    pub stride: usize,
}

impl Conv {
    /// `name` from `state`: `c_out x c_in x k x k`.
    pub fn load(gpu: &Gpu, state: &State, name: &str, l: Layer) -> Result<Conv> {
        Ok(Conv { w: Param::load(gpu, state, name, &[l.c_out, l.c_in, l.k, l.k])?, stride: l.stride })
    }
}

/// Temporaries shared by every unit of a network, by shape and role: f32, and the f16 path's
/// halves ([`Unit::allocate_f16`]).
#[derive(Default)]
pub struct Workspace {
    map: HashMap<(Vec<usize>, Slot), Tensor>,
    half: HashMap<(Vec<usize>, HalfSlot), HalfTensor>,
}

/// The roles of the f16 path's temporaries: per layer `i`, the gradient at its convolution's
/// input activation, and the gradient at its input (pre-activation) or at its convolution's
/// output `h_i` (original; `Grad(k)` the projection's output), as [`HalfKept`]'s fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum HalfSlot {
    Da(usize),
    Grad(usize),
}

/// The roles of workspace tensors: a recomputed activation (the general path), an activation's
/// gradient, and two alternating gradients at layer inputs (so that one layer's output gradient
/// and input gradient never share a buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    Act,
    DAct,
    Grad(usize),
    /// The general path's gradients at a unit's output: `dE/dy_l`, at `h`, at `F`, at the gate.
    Mix(usize),
}

impl Workspace {
    /// Makes sure a tensor of `dims` exists for the gradient slots.
    pub fn reserve(&mut self, gpu: &Gpu, dims: &[usize]) -> Result<()> {
        self.reserve_slots(gpu, dims, &[Slot::DAct, Slot::Grad(0), Slot::Grad(1)])
    }

    /// Makes sure the general path's tensors of `dims` exist: [`Slot::Act`] and the gradient
    /// slots.
    pub fn reserve_general(&mut self, gpu: &Gpu, dims: &[usize]) -> Result<()> {
        self.reserve_slots(gpu, dims, &[Slot::Act, Slot::DAct, Slot::Grad(0), Slot::Grad(1)])
    }

    /// Makes sure the general path's [`Slot::Mix`] tensors of `dims` exist.
    pub fn reserve_mix(&mut self, gpu: &Gpu, dims: &[usize]) -> Result<()> {
        self.reserve_slots(gpu, dims, &[0, 1, 2, 3].map(Slot::Mix))
    }

    fn reserve_slots(&mut self, gpu: &Gpu, dims: &[usize], slots: &[Slot]) -> Result<()> {
        for &slot in slots {
            if let std::collections::hash_map::Entry::Vacant(e) = self.map.entry((dims.to_vec(), slot)) {
                e.insert(Tensor::zeros(gpu, dims)?);
            }
        }
        Ok(())
    }

    pub fn get(&self, dims: &[usize], slot: Slot) -> Result<&Tensor> {
        self.map
            .get(&(dims.to_vec(), slot))
            .ok_or_else(|| Error::Invalid(format!("workspace has no {slot:?} tensor of {dims:?}")))
    }

    /// A handle on the f16 temporary of `dims` in `slot`, made on first use (every unit given
    /// it shares that buffer: a unit uses its temporaries only within its own backward). It
    /// keeps the context that made it: a workspace shared with another context's units hands
    /// them tensors their ops refuse by name.
    fn half(&mut self, gpu: &Gpu, dims: &[usize; 4], slot: HalfSlot) -> Result<HalfTensor> {
        let t = match self.half.entry((dims.to_vec(), slot)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(HalfTensor::zeros(gpu, dims)?),
        };
        Ok(t.clone())
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.map.values().map(|t| t.bytes()).sum::<u64>() + self.half.values().map(|t| t.buffer.size()).sum::<u64>()
    }
}

/// A residual unit's parameters.
#[derive(Debug)]
pub struct Unit {
    pub spec: UnitSpec,
    /// The weight layers of `F`.
    pub convs: Vec<Conv>,
    /// `bn_i`: before `conv_i` in pre-activation units, after it in original units.
    pub bns: Vec<Bn>,
    /// The projection shortcut (option B).
    pub proj: Option<Conv>,
    /// The projection's BN (every placement but pre-activation).
    pub proj_bn: Option<Bn>,
    /// The gate of gated combinations: `g = sigmoid(conv1x1(x) + b)`.
    pub gate: Option<Gate>,
    /// The dropout mask's seed for the next forward and its backward (dropout shortcuts); the
    /// network sets it per step from [`crate::rng::dropout_seed`].
    pub seed: u32,
}

/// A gate's 1x1 convolution (with the unit's stride) and bias.
#[derive(Debug)]
pub struct Gate {
    pub w: Param,
    pub b: Param,
}

/// The activations one unit keeps between its forward and its backward (see the module doc).
#[derive(Debug)]
pub struct Kept {
    /// The fused path's (pre-activation and original units with the plain sum).
    pub tensors: Vec<Tensor>,
    /// The general path's.
    pub general: Option<GeneralKept>,
}

impl Kept {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        let g = self.general.as_ref().map_or(0, |g| g.all().map(|t| t.bytes()).sum());
        self.tensors.iter().map(|t| t.bytes()).sum::<u64>() + g
    }
}

/// What a unit on the general path keeps: every intermediate its backward reads, by name.
#[derive(Debug)]
pub struct GeneralKept {
    /// Per layer `i`: `in_{i+1} = post_i(conv_i(a_i))`; the last is `F(x_l)`.
    pub layer_out: Vec<Tensor>,
    /// Per layer `i`: the convolution's output where a BN follows it (that BN's input).
    pub conv_out: Vec<Option<Tensor>>,
    /// `h(x_l)` for shortcuts other than the identity.
    pub h: Option<Tensor>,
    /// The projection's convolution output, where a BN follows it.
    pub proj_out: Option<Tensor>,
    /// The gate `g`.
    pub gate: Option<Tensor>,
    /// `y_l` before `f`, where `f` has a BN (BN after addition).
    pub y: Option<Tensor>,
}

impl GeneralKept {
    fn all(&self) -> impl Iterator<Item = &Tensor> {
        let opts = [&self.h, &self.proj_out, &self.gate, &self.y];
        self.layer_out.iter().chain(self.conv_out.iter().flatten()).chain(opts.into_iter().flatten())
    }
}

fn dims_of(t: &Tensor) -> Result<[usize; 4]> {
    t.nchw("unit activation")
}

impl Unit {
    /// The unit `spec` with its tensors from `state` (PyTorch names, see [`crate::arch`]).
    pub fn from_state(gpu: &Gpu, spec: &UnitSpec, state: &State) -> Result<Unit> {
        // The passes index the layers from both ends (the last layer's input is kept).
        if spec.layers.len() < 2 {
            return Err(Error::Invalid(format!(
                "{}: a unit has at least 2 weight layers, got {}",
                spec.name,
                spec.layers.len()
            )));
        }
        let mut convs = Vec::new();
        let mut bns = Vec::new();
        for (i, l) in spec.layers.iter().enumerate() {
            convs.push(Conv::load(gpu, state, &format!("{}.conv{}.weight", spec.name, i + 1), *l)?);
            // Pre-activation: bn_i normalises the layer's input; the others: its output.
            let c = if spec.kind.bn_before_conv() { l.c_in } else { l.c_out };
            bns.push(Bn::load(gpu, state, &format!("{}.bn{}", spec.name, i + 1), c)?);
        }
        let (mut proj, mut proj_bn) = (None, None);
        if spec.shortcut == Shortcut::Projection {
            let l = Layer { c_in: spec.c_in, c_out: spec.c_out, k: 1, stride: spec.stride };
            if spec.kind.bn_before_conv() {
                proj = Some(Conv::load(gpu, state, &format!("{}.shortcut.weight", spec.name), l)?);
            } else {
                proj = Some(Conv::load(gpu, state, &format!("{}.shortcut.0.weight", spec.name), l)?);
                proj_bn = Some(Bn::load(gpu, state, &format!("{}.shortcut.1", spec.name), spec.c_out)?);
            }
        }
        let gate = match spec.combine.gated() {
            true => Some(Gate {
                w: Param::load(gpu, state, &format!("{}.gate.weight", spec.name), &[spec.c_out, spec.c_in, 1, 1])?,
                b: Param::load(gpu, state, &format!("{}.gate.bias", spec.name), &[spec.c_out])?,
            }),
            false => None,
        };
        Ok(Unit { spec: spec.clone(), convs, bns, proj, proj_bn, gate, seed: 0 })
    }

    /// Whether this unit runs on the fused path: pre-activation or original with the plain sum.
    /// Every other variant runs on the general path, which computes `h`, `F` and their
    /// combination into buffers of their own (see the module doc).
    pub fn fused(&self) -> bool {
        self.spec.combine == Combine::Add && matches!(self.spec.kind, UnitKind::PreAct | UnitKind::Original)
    }

    /// Shapes of each weight layer's input and output for an input of `x` dims.
    pub fn layer_dims(&self, x: [usize; 4]) -> Vec<([usize; 4], [usize; 4])> {
        let mut d = x;
        self.spec
            .layers
            .iter()
            .map(|l| {
                let o = [d[0], l.c_out, conv::out_size(d[2], l.k, l.stride), conv::out_size(d[3], l.k, l.stride)];
                let io = (d, o);
                d = o;
                io
            })
            .collect()
    }

    /// The output dims for an input of `x` dims.
    pub fn out_dims(&self, x: [usize; 4]) -> [usize; 4] {
        self.layer_dims(x).last().map_or(x, |l| l.1)
    }

    /// Allocates what this unit keeps for an input of `x` dims, and reserves its temporaries.
    pub fn allocate(&self, gpu: &Gpu, x: [usize; 4], ws: &mut Workspace) -> Result<Kept> {
        if !self.fused() {
            return self.allocate_general(gpu, x, ws);
        }
        let dims = self.layer_dims(x);
        let mut tensors = Vec::new();
        for (i, (di, dout)) in dims.iter().enumerate() {
            ws.reserve(gpu, di)?;
            ws.reserve(gpu, dout)?;
            let keep = match self.spec.kind {
                UnitKind::PreAct => i + 1 < dims.len(), // the next layer's input
                _ => true,                              // the BN input
            };
            if keep {
                tensors.push(Tensor::zeros(gpu, dout)?);
            }
        }
        if self.spec.kind == UnitKind::Original && self.spec.shortcut == Shortcut::Projection {
            tensors.push(Tensor::zeros(gpu, &self.out_dims(x))?);
        }
        Ok(Kept { tensors, general: None })
    }

    /// How many tensors the fused path keeps ([`Unit::allocate`]): pre-activation `in_{i+1}`
    /// for all but the last layer; original `h_i` for every layer, then the projection's
    /// output.
    fn kept_count(&self) -> usize {
        let k = self.convs.len();
        match self.spec.kind {
            UnitKind::PreAct => k.saturating_sub(1),
            _ => k + usize::from(self.spec.shortcut == Shortcut::Projection),
        }
    }

    /// `Ok` where `kept` is of the kind and count [`Unit::allocate`] makes for this unit (the
    /// ops check the shapes): one allocated for another unit is refused, not indexed past.
    fn check_kept(&self, kept: &Kept) -> Result<()> {
        let fits = match (self.fused(), &kept.general) {
            (true, None) => kept.tensors.len() == self.kept_count(),
            (false, Some(g)) => kept.tensors.is_empty() && self.general_fits(g),
            _ => false,
        };
        match fits {
            true => Ok(()),
            false => {
                Err(Error::Invalid(format!("{}: the kept tensors were not allocated for this unit", self.spec.name)))
            }
        }
    }

    /// `Ok` where `y` (of `y_dims`) is this unit's output for an input of `x_dims`, and not the
    /// input itself (`aliased`): the backward reads x_l again, and y is written before x is
    /// done with.
    fn check_output(&self, pass: &str, x_dims: [usize; 4], y_dims: &[usize], aliased: bool) -> Result<()> {
        let out = self.out_dims(x_dims);
        if y_dims != out || aliased {
            return Err(Error::Shape(format!(
                "{} {pass}: y must be a tensor of its own of shape {out:?}, got {y_dims:?}",
                self.spec.name
            )));
        }
        Ok(())
    }

    /// `Ok` where `kept` is of the count [`Unit::allocate_f16`] makes for this unit.
    /// Every half tensor of a pass, `ts` and `kept`'s, is the recorder's context's: refused by
    /// name before anything is recorded (the identity shortcut's copy is a raw buffer copy,
    /// which no op checks, and another device's buffer in it makes the commands invalid).
    fn check_half_owned(&self, rec: &Recorder, pass: &str, ts: &[&HalfTensor], kept: &HalfKept) -> Result<()> {
        let what = format!("{} {pass}", self.spec.name);
        let all = ts.iter().copied().chain(&kept.tensors).chain(&kept.da).chain(&kept.grads);
        crate::ops::owned_f16(rec, &what, all)
    }

    fn check_half_kept(&self, kept: &HalfKept) -> Result<()> {
        let k = self.convs.len();
        let first = usize::from(self.spec.kind == UnitKind::Original);
        let grads = if self.spec.kind == UnitKind::PreAct { k.saturating_sub(1) } else { self.kept_count() };
        let counts = (kept.tensors.len(), kept.da.len(), kept.grads.len());
        match counts == (self.kept_count(), k.saturating_sub(first), grads) {
            true => Ok(()),
            false => {
                Err(Error::Invalid(format!("{}: the kept halves were not allocated for this unit", self.spec.name)))
            }
        }
    }

    /// Records `y = x_{l+1}` from `x = x_l`.
    pub fn forward(
        &self,
        rec: &mut Recorder,
        mode: Mode,
        x: &Tensor,
        y: &Tensor,
        kept: &Kept,
        ws: &Workspace,
    ) -> Result<()> {
        self.forward_chained(rec, mode, x, y, kept, ws, Chain::default())
    }

    /// Whether this unit's training forward takes a [`Chain`]: the fused pre-activation units
    /// (their first BN normalises `x`, and the next BN `y`).
    pub fn chains(&self) -> bool {
        self.fused() && self.spec.kind == UnitKind::PreAct
    }

    /// [`Unit::forward`], sharing batch statistics with its neighbours as `chain` says (training,
    /// units that [`Unit::chains`]; anything but the default chain elsewhere is an error).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_chained(
        &self,
        rec: &mut Recorder,
        mode: Mode,
        x: &Tensor,
        y: &Tensor,
        kept: &Kept,
        ws: &Workspace,
        chain: Chain,
    ) -> Result<()> {
        self.check_kept(kept)?;
        let xd = x.nchw(format_args!("{} forward: x", self.spec.name))?;
        self.check_output("forward", xd, y.dims(), x.buffer == y.buffer)?;
        let linked = chain.input_stats || chain.next_bn.is_some();
        if linked && !(self.chains() && mode == Mode::Train) {
            return Err(Error::Invalid(format!(
                "{}: only a fused pre-activation unit in training shares batch statistics",
                self.spec.name
            )));
        }
        match self.spec.kind {
            _ if !self.fused() => self.forward_general(rec, mode, x, y, kept, ws),
            UnitKind::PreAct => self.forward_preact(rec, mode, x, y, kept, chain),
            _ => self.forward_original(rec, mode, x, y, kept),
        }
    }

    /// Records the backward. `g_out` holds `dE/dx_{l+1}` on entry; on exit `g_in` holds
    /// `dE/dx_l` (`g_in` and `g_out` are the same buffer for the identity shortcut) and every
    /// parameter gradient of the unit is written. `g_out` is a working buffer: where it is not
    /// `g_in` its contents on exit are not `dE/dx_{l+1}` (an original unit masks it in place).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        y: &Tensor,
        g_out: &Tensor,
        g_in: &Tensor,
        kept: &Kept,
        ws: &Workspace,
    ) -> Result<()> {
        self.check_kept(kept)?;
        let identity = self.spec.shortcut == Shortcut::Identity;
        if identity != std::ptr::eq(g_in, g_out) {
            return Err(Error::Invalid(format!(
                "{}: the identity shortcut's gradient is accumulated in place",
                self.spec.name
            )));
        }
        match self.spec.kind {
            _ if !self.fused() => self.backward_general(rec, x, y, g_out, g_in, kept, ws),
            UnitKind::PreAct => self.backward_preact(rec, x, g_out, g_in, kept, ws),
            _ => self.backward_original(rec, x, y, g_out, g_in, kept, ws),
        }
    }

    /// After a training forward, recomputes the branch `F(x_l)` into `out` from what the unit
    /// kept (for the analysis; independent of the stream buffers, so `x_{l+1} = h(x_l) + F`
    /// can be checked): pre-activation `F = conv_k(ReLU(BN_k(in_k)))`, original `F = BN_k(h_k)`.
    pub fn branch(&self, rec: &mut Recorder, kept: &Kept, out: &Tensor) -> Result<()> {
        self.check_kept(kept)?;
        let k = self.convs.len();
        if let Some(gk) = &kept.general {
            return residual::copy(rec, &gk.layer_out[k - 1], out);
        }
        match self.spec.kind {
            UnitKind::PreAct => {
                let input = &kept.tensors[k - 2]; // in_k, the last layer's input
                let (bn, conv) = (&self.bns[k - 1], &self.convs[k - 1]);
                conv::forward_bn_relu(rec, input, &bn.affine, &conv.w.value, out, conv.stride, false)
            }
            _ => self.bns[k - 1].recompute(rec, &kept.tensors[k - 1], out, Epilogue::default()),
        }
    }

    /// `h(x)` into `y` (overwriting it), for the parameter-free shortcuts.
    fn shortcut_free(&self, rec: &mut Recorder, x: &Tensor, y: &Tensor) -> Result<()> {
        match self.spec.shortcut {
            Shortcut::Identity => residual::copy(rec, x, y),
            Shortcut::Subsample => residual::subsample_forward(rec, x, y, self.spec.stride),
            Shortcut::Projection => Ok(()),
        }
    }

    fn proj(&self) -> Result<&Conv> {
        self.proj
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("{}: projection shortcut has no weights", self.spec.name)))
    }

    // ---- full pre-activation: a_i = ReLU(BN_i(in_i)), in_{i+1} = conv_i(a_i), y = h + in_k ----

    fn forward_preact(
        &self,
        rec: &mut Recorder,
        mode: Mode,
        x: &Tensor,
        y: &Tensor,
        kept: &Kept,
        chain: Chain,
    ) -> Result<()> {
        let k = self.convs.len();
        let train = mode == Mode::Train;
        let mut input = x;
        for i in 0..k {
            // conv_i(ReLU(BN_i(in_i))): the BN's normalisation and the ReLU as the convolution
            // loads in_i. In training BN_i's statistics come from conv_{i-1}'s epilogue (below),
            // BN_0's from x, or from the epilogue of the convolution that wrote x (`chain`).
            // (The statistics write BN_i's prologue values as well.)
            let bn = &self.bns[i];
            let own_stats = (i == 0 && !chain.input_stats) || !train;
            let aff = if own_stats { bn.prologue(rec, mode, input)? } else { &bn.affine };
            if i == 0 {
                match self.spec.shortcut {
                    // The projection takes the pre-activated input.
                    Shortcut::Projection => {
                        let p = &self.proj()?.w.value;
                        conv::forward_bn_relu(rec, x, aff, p, y, self.spec.stride, false)?
                    }
                    _ => self.shortcut_free(rec, x, y)?,
                }
            }
            let (w, stride) = (&self.convs[i].w.value, self.convs[i].stride);
            if i + 1 == k {
                // The last convolution adds F into the stream in place: x_{l+1} = h(x_l) + F(x_l)
                // (and takes the next BN's statistics of x_{l+1}, `chain`).
                match chain.next_bn {
                    Some(next) => next.conv_stats(rec, input, Some(aff), w, y, stride, true)?,
                    None => conv::forward_bn_relu(rec, input, aff, w, y, stride, true)?,
                }
                break;
            }
            let out = &kept.tensors[i];
            if train {
                self.bns[i + 1].conv_stats(rec, input, Some(aff), w, out, stride, false)?;
            } else {
                conv::forward_bn_relu(rec, input, aff, w, out, stride, false)?;
            }
            input = out;
        }
        Ok(())
    }

    fn backward_preact(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        g_out: &Tensor,
        g_in: &Tensor,
        kept: &Kept,
        ws: &Workspace,
    ) -> Result<()> {
        let k = self.convs.len();
        let mut d_out = g_out; // the gradient at conv_i's output
        for i in (0..k).rev() {
            let input = if i == 0 { x } else { &kept.tensors[i - 1] };
            let di = dims_of(input)?;
            let da = ws.get(&di, Slot::DAct)?;
            let (conv, bn) = (&self.convs[i], &self.bns[i]);
            // The weight gradient reads ReLU(BN_i(in_i)) through the prologue: nothing recomputed.
            conv::backward_weight_bn_relu(rec, input, &bn.affine, d_out, &conv.w.grad, conv.stride, false)?;
            // da = dE/d ReLU(BN_i(in_i)), then BN_i's backward (its sums in the convolution's
            // epilogue on the tiled kernels).
            let (w, stride) = (&conv.w.value, conv.stride);
            if i > 0 {
                let d_in = ws.get(&di, Slot::Grad(i % 2))?;
                bn.conv_backward(rec, d_out, w, stride, da, false, input, d_in, false)?;
                d_out = d_in;
                continue;
            }
            // The first layer: the shortcut's gradient, then the branch's added into g_l.
            match self.spec.shortcut {
                // g_in is g_out: g_l = g_{l+1} + ...
                Shortcut::Identity => bn.conv_backward(rec, d_out, w, stride, da, false, x, g_in, true)?,
                Shortcut::Subsample => {
                    residual::subsample_backward(rec, g_out, g_in, self.spec.stride, false)?;
                    bn.conv_backward(rec, d_out, w, stride, da, false, x, g_in, true)?;
                }
                Shortcut::Projection => {
                    // The projection also reads ReLU(BN_0(x)): its input gradient adds into da.
                    let p = self.proj()?;
                    conv::backward_weight_bn_relu(rec, x, &bn.affine, g_out, &p.w.grad, self.spec.stride, false)?;
                    conv::backward_data(rec, d_out, w, da, stride, false)?;
                    bn.conv_backward(rec, g_out, &p.w.value, self.spec.stride, da, true, x, g_in, false)?;
                }
            }
        }
        Ok(())
    }

    // ---- original: h_i = conv_i(in_i), in_{i+1} = ReLU(BN_i(h_i)), y = ReLU(h + BN_k(h_k)) ----

    fn forward_original(&self, rec: &mut Recorder, mode: Mode, x: &Tensor, y: &Tensor, kept: &Kept) -> Result<()> {
        let k = self.convs.len();
        let train = mode == Mode::Train;
        // h_i = conv_i(in_i), in_0 = x, in_i = ReLU(BN_{i-1}(h_{i-1})) applied as the convolution
        // loads. In training each convolution's epilogue takes its BN's statistics of h_i.
        for i in 0..k {
            let (h, conv) = (&kept.tensors[i], &self.convs[i]);
            let (input, pre) = if i == 0 {
                (x, None)
            } else {
                // (In training BN_{i-1}'s statistics wrote its prologue values.)
                let (hp, bn) = (&kept.tensors[i - 1], &self.bns[i - 1]);
                (hp, Some(if train { &bn.affine } else { bn.prologue(rec, mode, hp)? }))
            };
            match (train, pre) {
                (true, _) => self.bns[i].conv_stats(rec, input, pre, &conv.w.value, h, conv.stride, false)?,
                (false, None) => conv::forward(rec, input, &conv.w.value, h, conv.stride, false)?,
                (false, Some(a)) => conv::forward_bn_relu(rec, input, a, &conv.w.value, h, conv.stride, false)?,
            }
        }
        match self.spec.shortcut {
            Shortcut::Projection => {
                let (hs, pw, bn) = (&kept.tensors[k], &self.proj()?.w.value, self.proj_bn()?);
                if train {
                    bn.conv_stats(rec, x, None, pw, hs, self.spec.stride, false)?;
                    bn.recompute(rec, hs, y, Epilogue::default())?;
                } else {
                    conv::forward(rec, x, pw, hs, self.spec.stride, false)?;
                    bn.forward(rec, mode, hs, y, Epilogue::default())?;
                }
            }
            _ => self.shortcut_free(rec, x, y)?,
        }
        // x_{l+1} = ReLU(h(x_l) + BN_k(h_k)), added into the stream in place.
        let (hk, bn) = (&kept.tensors[k - 1], &self.bns[k - 1]);
        let ep = Epilogue { add: true, relu: true };
        if train { bn.recompute(rec, hk, y, ep) } else { bn.forward(rec, mode, hk, y, ep) }
    }

    fn proj_bn(&self) -> Result<&Bn> {
        self.proj_bn
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("{}: projection shortcut has no BN", self.spec.name)))
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_original(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        y: &Tensor,
        g_out: &Tensor,
        g_in: &Tensor,
        kept: &Kept,
        ws: &Workspace,
    ) -> Result<()> {
        let k = self.convs.len();
        // f = ReLU: dE/dy_l = dE/dx_{l+1} * [x_{l+1} > 0], in place.
        relu::mask_in_place(rec, y, g_out)?;
        match self.spec.shortcut {
            Shortcut::Identity => {}
            Shortcut::Subsample => residual::subsample_backward(rec, g_out, g_in, self.spec.stride, false)?,
            Shortcut::Projection => {
                let hs = &kept.tensors[k];
                let dhs = ws.get(&dims_of(hs)?, Slot::DAct)?;
                self.proj_bn()?.backward(rec, hs, g_out, false, dhs, false)?;
                let p = self.proj()?;
                conv::backward_weight(rec, x, dhs, &p.w.grad, self.spec.stride, false)?;
                conv::backward_data(rec, dhs, &p.w.value, g_in, self.spec.stride, false)?;
            }
        }
        // The gradient at the last BN's output is g_out itself (its ReLU, f, masked above).
        let hk = &kept.tensors[k - 1];
        let mut dh = ws.get(&dims_of(hk)?, Slot::Grad((k - 1) % 2))?; // dE/dh_i
        self.bns[k - 1].backward(rec, hk, g_out, false, dh, false)?;
        for i in (0..k).rev() {
            let conv = &self.convs[i];
            if i == 0 {
                conv::backward_weight(rec, x, dh, &conv.w.grad, conv.stride, false)?;
                // g_l = (shortcut's gradient) + the branch's.
                conv::backward_data(rec, dh, &conv.w.value, g_in, conv.stride, true)?;
                break;
            }
            // conv_i reads ReLU(BN_{i-1}(h_{i-1})): its weight gradient through the prologue, its
            // input gradient da, then BN_{i-1}'s backward with the ReLU mask into dh_{i-1} (the
            // BN's sums in the convolution's epilogue on the tiled kernels).
            let (hp, bn) = (&kept.tensors[i - 1], &self.bns[i - 1]);
            let (da, dhp) = (ws.get(&dims_of(hp)?, Slot::DAct)?, ws.get(&dims_of(hp)?, Slot::Grad((i - 1) % 2))?);
            conv::backward_weight_bn_relu(rec, hp, &bn.affine, dh, &conv.w.grad, conv.stride, false)?;
            bn.conv_backward(rec, dh, &conv.w.value, conv.stride, da, false, hp, dhp, false)?;
            dh = dhp;
        }
        Ok(())
    }

    // ---- the general path: every placement and combination, h, F and y in buffers of their own.
    // Layer i: a_i = pre_i(in_i), o_i = conv_i(a_i), in_{i+1} = post_i(o_i); F = in_{k+1};
    // y = s_h h + s_f F; x_{l+1} = f(y). The table of pre_i, post_i and f per placement is in
    // `reference::net`'s module doc. ----

    /// Whether `post_i` is a BN, and whether a ReLU follows it.
    fn post_bn(&self, i: usize) -> Option<bool> {
        let last = i + 1 == self.convs.len();
        match self.spec.kind {
            UnitKind::PreAct => None,
            UnitKind::Original => Some(!last),
            UnitKind::BnAfterAdd if last => None, // moved after the addition
            UnitKind::BnAfterAdd | UnitKind::ReluBeforeAdd => Some(true),
            UnitKind::ReluOnlyPreAct => Some(false),
        }
    }

    /// Whether the layers' `pre_i` is the identity (the convolution reads `in_i` itself).
    fn pre_identity(&self) -> bool {
        !matches!(self.spec.kind, UnitKind::PreAct | UnitKind::ReluOnlyPreAct)
    }

    /// `a_i = pre_i(in_i)`: `in_i` itself, or into the workspace. `mode` is `None` to recompute
    /// in the backward from the saved statistics.
    fn pre<'a>(
        &self,
        rec: &mut Recorder,
        mode: Option<Mode>,
        i: usize,
        input: &'a Tensor,
        ws: &'a Workspace,
    ) -> Result<&'a Tensor> {
        if self.pre_identity() {
            return Ok(input);
        }
        let a = ws.get(&dims_of(input)?, Slot::Act)?;
        match (self.spec.kind, mode) {
            (UnitKind::PreAct, Some(m)) => {
                self.bns[i].forward(rec, m, input, a, Epilogue { add: false, relu: true })?
            }
            (UnitKind::PreAct, None) => self.bns[i].recompute_relu(rec, input, a)?,
            _ => relu::forward(rec, input, a)?,
        }
        Ok(a)
    }

    fn allocate_general(&self, gpu: &Gpu, x: [usize; 4], ws: &mut Workspace) -> Result<Kept> {
        let dims = self.layer_dims(x);
        let out = self.out_dims(x);
        let (mut layer_out, mut conv_out) = (Vec::new(), Vec::new());
        for (i, (di, dout)) in dims.iter().enumerate() {
            ws.reserve_general(gpu, di)?;
            ws.reserve_general(gpu, dout)?;
            layer_out.push(Tensor::zeros(gpu, dout)?);
            conv_out.push(self.post_bn(i).map(|_| Tensor::zeros(gpu, dout)).transpose()?);
        }
        ws.reserve_mix(gpu, &out)?;
        let zeros_if = |c: bool| c.then(|| Tensor::zeros(gpu, &out)).transpose();
        let [h, proj_out, gate, y] = self.general_keeps();
        let general = GeneralKept {
            layer_out,
            conv_out,
            h: zeros_if(h)?,
            proj_out: zeros_if(proj_out)?,
            gate: zeros_if(gate)?,
            y: zeros_if(y)?,
        };
        Ok(Kept { tensors: Vec::new(), general: Some(general) })
    }

    /// Which of `h`, `proj_out`, `gate` and `y` the general path keeps for this unit.
    fn general_keeps(&self) -> [bool; 4] {
        let s = &self.spec;
        [
            s.shortcut != Shortcut::Identity,
            s.shortcut == Shortcut::Projection && !s.kind.bn_before_conv(),
            s.combine.gated(),
            s.kind == UnitKind::BnAfterAdd,
        ]
    }

    /// Whether `g` holds the tensors [`Unit::allocate_general`] makes for this unit (the ops
    /// check their shapes): a conv output kept where a BN follows, and each of
    /// [`Unit::general_keeps`].
    fn general_fits(&self, g: &GeneralKept) -> bool {
        let k = self.convs.len();
        let convs = g.conv_out.iter().enumerate().all(|(i, o)| o.is_some() == self.post_bn(i).is_some());
        let kept = [&g.h, &g.proj_out, &g.gate, &g.y].map(Option::is_some);
        g.layer_out.len() == k && g.conv_out.len() == k && convs && kept == self.general_keeps()
    }

    fn forward_general(
        &self,
        rec: &mut Recorder,
        mode: Mode,
        x: &Tensor,
        y: &Tensor,
        kept: &Kept,
        ws: &Workspace,
    ) -> Result<()> {
        let gk = general(kept)?;
        let (k, s) = (self.convs.len(), &self.spec);
        // F(x_l), layer by layer.
        let mut input = x;
        for i in 0..k {
            let a = self.pre(rec, Some(mode), i, input, ws)?;
            if i == 0 && s.shortcut == Shortcut::Projection && s.kind.bn_before_conv() {
                // The pre-activation projection reads a_1.
                conv::forward(rec, a, &self.proj()?.w.value, kept_h(gk)?, s.stride, false)?;
            }
            let (conv, out) = (&self.convs[i], &gk.layer_out[i]);
            match (&gk.conv_out[i], self.post_bn(i)) {
                (Some(o), Some(relu)) => {
                    conv::forward(rec, a, &conv.w.value, o, conv.stride, false)?;
                    self.bns[i].forward(rec, mode, o, out, Epilogue { add: false, relu })?;
                }
                _ => conv::forward(rec, a, &conv.w.value, out, conv.stride, false)?,
            }
            input = out;
        }
        let f = input;
        // h(x_l).
        let h = match s.shortcut {
            Shortcut::Identity => x,
            Shortcut::Subsample => {
                residual::subsample_forward(rec, x, kept_h(gk)?, s.stride)?;
                kept_h(gk)?
            }
            Shortcut::Projection if s.kind.bn_before_conv() => kept_h(gk)?, // computed above
            Shortcut::Projection => {
                let po = gk.proj_out.as_ref().ok_or_else(|| missing(s, "projection output"))?;
                conv::forward(rec, x, &self.proj()?.w.value, po, s.stride, false)?;
                self.proj_bn()?.forward(rec, mode, po, kept_h(gk)?, Epilogue::default())?;
                kept_h(gk)?
            }
        };
        // The gate g = sigmoid(conv1x1(x) + b).
        if let (Some(gt), Some(g)) = (&self.gate, &gk.gate) {
            gate::forward(rec, x, &gt.w.value, &gt.b.value, g, s.stride)?;
        }
        // y_l = s_h h + s_f F, and x_{l+1} = f(y_l).
        let train = mode == Mode::Train;
        let g = gk.gate.as_ref();
        match s.kind {
            UnitKind::Original => mix::forward(rec, s.combine, train, self.seed, h, f, g, y, true),
            UnitKind::BnAfterAdd => {
                let yl = gk.y.as_ref().ok_or_else(|| missing(s, "y"))?;
                mix::forward(rec, s.combine, train, self.seed, h, f, g, yl, false)?;
                self.bns[k - 1].forward(rec, mode, yl, y, Epilogue { add: false, relu: true })
            }
            _ => mix::forward(rec, s.combine, train, self.seed, h, f, g, y, false),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_general(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        y: &Tensor,
        g_out: &Tensor,
        g_in: &Tensor,
        kept: &Kept,
        ws: &Workspace,
    ) -> Result<()> {
        let gk = general(kept)?;
        let (k, s) = (self.convs.len(), &self.spec);
        let yd = dims_of(y)?;
        // dE/dy_l through f, into the workspace (g_out may be g_in, written below).
        let dy = ws.get(&yd, Slot::Mix(0))?;
        match s.kind {
            UnitKind::Original => relu::backward(rec, y, g_out, dy, false)?,
            UnitKind::BnAfterAdd => {
                let yl = gk.y.as_ref().ok_or_else(|| missing(s, "y"))?;
                self.bns[k - 1].backward(rec, yl, g_out, true, dy, false)?;
            }
            _ => residual::copy(rec, g_out, dy)?,
        }
        // y = s_h h + s_f F: the gradients at h, F and g. The identity's dh is g_l's first term.
        let identity = s.shortcut == Shortcut::Identity;
        let h = gk.h.as_ref().unwrap_or(x);
        let dh = if identity { g_in } else { ws.get(&yd, Slot::Mix(1))? };
        let (df, dg) = (ws.get(&yd, Slot::Mix(2))?, ws.get(&yd, Slot::Mix(3))?);
        let gate_dg = gk.gate.as_ref().map(|_| dg);
        mix::backward(rec, s.combine, self.seed, h, &gk.layer_out[k - 1], gk.gate.as_ref(), dy, dh, df, gate_dg)?;
        // g_in is written by the first of: the shortcut, the gate, the branch; the rest add.
        let mut written = identity;
        match s.shortcut {
            Shortcut::Identity => {}
            Shortcut::Subsample => {
                residual::subsample_backward(rec, dh, g_in, s.stride, false)?;
                written = true;
            }
            Shortcut::Projection if s.kind.bn_before_conv() => {} // joins the branch at a_1
            Shortcut::Projection => {
                let po = gk.proj_out.as_ref().ok_or_else(|| missing(s, "projection output"))?;
                let dpo = dy; // dy is spent
                self.proj_bn()?.backward(rec, po, dh, false, dpo, false)?;
                let p = self.proj()?;
                conv::backward_weight(rec, x, dpo, &p.w.grad, s.stride, false)?;
                conv::backward_data(rec, dpo, &p.w.value, g_in, s.stride, false)?;
                written = true;
            }
        }
        if let (Some(gt), Some(g)) = (&self.gate, &gk.gate) {
            gate::backward(rec, x, &gt.w.value, g, dg, &gt.w.grad, &gt.b.grad, g_in, s.stride, written)?;
            written = true;
        }
        // F, last layer first: d is the gradient at in_{i+1}.
        let mut d = df;
        for i in (0..k).rev() {
            let input = if i == 0 { x } else { &gk.layer_out[i - 1] };
            let (di, conv) = (dims_of(input)?, &self.convs[i]);
            let d_o = match (&gk.conv_out[i], self.post_bn(i)) {
                (Some(o), Some(relu)) => {
                    let t = ws.get(&dims_of(o)?, Slot::Grad(i % 2))?;
                    self.bns[i].backward(rec, o, d, relu, t, false)?;
                    t
                }
                _ => d,
            };
            let a = self.pre(rec, None, i, input, ws)?;
            conv::backward_weight(rec, a, d_o, &conv.w.grad, conv.stride, false)?;
            if i == 0 && self.pre_identity() {
                return conv::backward_data(rec, d_o, &conv.w.value, g_in, conv.stride, written);
            }
            let da = ws.get(&di, Slot::DAct)?;
            conv::backward_data(rec, d_o, &conv.w.value, da, conv.stride, false)?;
            if i == 0 && s.shortcut == Shortcut::Projection && s.kind.bn_before_conv() {
                let p = self.proj()?;
                conv::backward_weight(rec, a, dh, &p.w.grad, s.stride, false)?;
                conv::backward_data(rec, dh, &p.w.value, da, s.stride, true)?;
            }
            if self.pre_identity() {
                d = da;
                continue;
            }
            // Through pre_i: into g_in for the first layer.
            let d_in = if i == 0 { g_in } else { ws.get(&di, Slot::Grad(i % 2))? };
            let acc = i == 0 && written;
            match s.kind {
                UnitKind::PreAct => self.bns[i].backward(rec, input, da, true, d_in, acc)?,
                _ => relu::backward(rec, input, da, d_in, acc)?,
            }
            d = d_in;
        }
        Ok(())
    }
}

fn general(kept: &Kept) -> Result<&GeneralKept> {
    kept.general.as_ref().ok_or_else(|| Error::Invalid("this unit's kept tensors are not the general path's".into()))
}

fn kept_h(gk: &GeneralKept) -> Result<&Tensor> {
    gk.h.as_ref().ok_or_else(|| Error::Invalid("the shortcut's output was not allocated".into()))
}

fn missing(s: &UnitSpec, what: &str) -> Error {
    Error::Invalid(format!("{}: no kept {what}", s.name))
}

// ---- The f16 path: the fused pre-activation and original units (every shortcut), in
// training. The activations (x, y, what the unit keeps, the gradients at them)
// are halves; the weights, the BN parameters and statistics, every parameter gradient and all
// arithmetic are f32. The passes are the fused f32 units' on the tiled kernels: each BN +
// ReLU in the next convolution's loads, BN statistics and backward sums in the convolutions'
// epilogues, F added into the stream by the last convolution (pre-activation). ----

/// What an f16 unit keeps between its training forward and its backward, and handles on its
/// temporaries (shared through the [`Workspace`] with every unit of the same shapes).
#[derive(Debug)]
pub struct HalfKept {
    /// As [`Kept::tensors`]: pre-activation `in_{i+1}` for all but the last layer; original
    /// `h_i` for every layer, then the projection's convolution output.
    pub tensors: Vec<HalfTensor>,
    /// The gradient at a convolution's input activation: pre-activation per layer `i`,
    /// original per layer `i > 0` (layer 0 reads the unit's input).
    da: Vec<HalfTensor>,
    /// Pre-activation: per layer `i > 0`, the gradient at `in_i`. Original: per layer, the
    /// gradient at `h_i`, then at the projection's convolution output.
    grads: Vec<HalfTensor>,
}

impl HalfKept {
    /// Bytes held by this unit alone (its temporaries are the workspace's).
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.buffer.size()).sum()
    }
}

impl Unit {
    /// Whether the f16 path takes this unit: a pre-activation or original unit with the plain
    /// sum (any shortcut).
    pub fn half_capable(&self) -> bool {
        self.fused()
    }

    fn check_half(&self) -> Result<()> {
        if self.half_capable() {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "{}: the f16 path takes pre-activation and original units with the plain sum ({:?}, {:?} here)",
            self.spec.name, self.spec.kind, self.spec.combine
        )))
    }

    /// Allocates what [`Unit::forward_f16`] keeps for an input of `x` dims, and takes the
    /// temporaries of [`Unit::backward_f16`] from `ws` (made there on first use, shared by every
    /// unit given the same workspace).
    pub fn allocate_f16(&self, gpu: &Gpu, x: [usize; 4], ws: &mut Workspace) -> Result<HalfKept> {
        self.check_half()?;
        let dims = self.layer_dims(x);
        let zeros = |d: &[usize; 4]| HalfTensor::zeros(gpu, d);
        let first = usize::from(self.spec.kind == UnitKind::Original);
        let da = (first..dims.len()).map(|i| ws.half(gpu, &dims[i].0, HalfSlot::Da(i))).collect::<Result<_>>()?;
        let (mut tensors, mut grads): (Vec<HalfTensor>, Vec<HalfTensor>) = match self.spec.kind {
            UnitKind::PreAct => (
                dims[..dims.len() - 1].iter().map(|(_, o)| zeros(o)).collect::<Result<_>>()?,
                (1..dims.len()).map(|i| ws.half(gpu, &dims[i].0, HalfSlot::Grad(i))).collect::<Result<_>>()?,
            ),
            _ => (
                dims.iter().map(|(_, o)| zeros(o)).collect::<Result<_>>()?,
                (0..dims.len()).map(|i| ws.half(gpu, &dims[i].1, HalfSlot::Grad(i))).collect::<Result<_>>()?,
            ),
        };
        if self.spec.kind == UnitKind::Original && self.spec.shortcut == Shortcut::Projection {
            let out = self.out_dims(x);
            tensors.push(zeros(&out)?);
            grads.push(ws.half(gpu, &out, HalfSlot::Grad(dims.len()))?);
        }
        Ok(HalfKept { tensors, da, grads })
    }

    /// The training forward on the f16 path: `y = x_{l+1}` from `x = x_l`, both halves
    /// (`[N, C, H, W]`). The batch statistics are saved and the running ones moved, as
    /// [`Unit::forward`] does.
    pub fn forward_f16(&self, rec: &mut Recorder, x: &HalfTensor, y: &HalfTensor, kept: &HalfKept) -> Result<()> {
        self.check_half()?;
        self.check_half_kept(kept)?;
        self.check_half_owned(rec, "forward_f16", &[x, y], kept)?;
        let xd = x.nchw(format_args!("{} forward_f16: x", self.spec.name))?;
        self.check_output("forward_f16", xd, y.dims(), x.buffer == y.buffer)?;
        match self.spec.kind {
            UnitKind::PreAct => self.forward_preact_f16(rec, x, y, kept),
            _ => self.forward_original_f16(rec, x, y, kept),
        }
    }

    /// The backward of the last [`Unit::forward_f16`], as [`Unit::backward`]: `g_out` holds
    /// `dE/dx_{l+1}` on entry; on exit `g_in` holds `dE/dx_l` (`g_in` and `g_out` are the same
    /// tensor for the identity shortcut) and every parameter gradient (f32) is written.
    pub fn backward_f16(
        &self,
        rec: &mut Recorder,
        x: &HalfTensor,
        y: &HalfTensor,
        g_out: &HalfTensor,
        g_in: &HalfTensor,
        kept: &HalfKept,
    ) -> Result<()> {
        self.check_half()?;
        self.check_half_kept(kept)?;
        self.check_half_owned(rec, "backward_f16", &[x, y, g_out, g_in], kept)?;
        let identity = self.spec.shortcut == Shortcut::Identity;
        if identity != std::ptr::eq(g_in, g_out) {
            return Err(Error::Invalid(format!(
                "{}: the identity shortcut's gradient is accumulated in place",
                self.spec.name
            )));
        }
        match self.spec.kind {
            UnitKind::PreAct => self.backward_preact_f16(rec, x, g_out, g_in, kept),
            _ => self.backward_original_f16(rec, x, y, g_out, g_in, kept),
        }
    }

    // ---- pre-activation: a_i = ReLU(BN_i(in_i)), in_{i+1} = conv_i(a_i), y = h + in_k ----

    fn forward_preact_f16(&self, rec: &mut Recorder, x: &HalfTensor, y: &HalfTensor, kept: &HalfKept) -> Result<()> {
        let k = self.convs.len();
        let bn0 = &self.bns[0];
        batch_norm::stats_train_f16(rec, x, &bn0.tensors(), &bn0.save_mean, &bn0.save_invstd)?;
        let mut input = x;
        for i in 0..k {
            // conv_i(ReLU(BN_i(in_i))), BN_i applied as the convolution loads in_i; BN_{i+1}'s
            // statistics in its epilogue.
            let (bn, conv) = (&self.bns[i], &self.convs[i]);
            if i == 0 {
                match self.spec.shortcut {
                    // y = h(x): the projection reads the pre-activated x; the identity copies it.
                    Shortcut::Projection => {
                        let p = &self.proj()?.w.value;
                        conv::forward_bn_relu_f16(rec, x, &bn.affine, p, y, self.spec.stride, false)?;
                    }
                    _ => self.shortcut_free_f16(rec, x, y)?,
                }
            }
            if i + 1 == k {
                // The last convolution adds F into the stream: x_{l+1} = h(x_l) + F(x_l).
                return conv::forward_bn_relu_f16(rec, input, &bn.affine, &conv.w.value, y, conv.stride, true);
            }
            let (out, next) = (&kept.tensors[i], &self.bns[i + 1]);
            let (pre, w) = (Some(&bn.affine), &conv.w.value);
            let (stats, mean, invstd) = (next.tensors(), &next.save_mean, &next.save_invstd);
            conv::forward_stats_f16(rec, input, pre, w, out, conv.stride, false, &stats, mean, invstd)?;
            input = out;
        }
        Ok(())
    }

    fn backward_preact_f16(
        &self,
        rec: &mut Recorder,
        x: &HalfTensor,
        g_out: &HalfTensor,
        g_in: &HalfTensor,
        kept: &HalfKept,
    ) -> Result<()> {
        let k = self.convs.len();
        let mut d_out = g_out; // the gradient at conv_i's output
        for i in (0..k).rev() {
            let input = if i == 0 { x } else { &kept.tensors[i - 1] };
            let (conv, bn) = (&self.convs[i], &self.bns[i]);
            let (w, stride, da) = (&conv.w.value, conv.stride, &kept.da[i]);
            conv::backward_weight_bn_relu_f16(rec, input, &bn.affine, d_out, &conv.w.grad, stride, false)?;
            if i > 0 {
                // da, then BN_i's backward into the gradient at in_i.
                let d_in = &kept.grads[i - 1];
                conv::backward_data_bn_f16(
                    rec,
                    d_out,
                    w,
                    da,
                    stride,
                    false,
                    input,
                    &bn.affine,
                    &bn.grads(),
                    d_in,
                    false,
                )?;
                d_out = d_in;
                continue;
            }
            let grads = bn.grads();
            match self.spec.shortcut {
                // g_in is g_out: the branch's gradient added into it.
                Shortcut::Projection => {
                    // The projection also reads ReLU(BN_0(x)): its input gradient adds into da.
                    let (p, s) = (self.proj()?, self.spec.stride);
                    conv::backward_weight_bn_relu_f16(rec, x, &bn.affine, g_out, &p.w.grad, s, false)?;
                    conv::backward_data_f16(rec, d_out, w, da, stride, false)?;
                    conv::backward_data_bn_f16(
                        rec, g_out, &p.w.value, da, s, true, x, &bn.affine, &grads, g_in, false,
                    )?;
                }
                Shortcut::Subsample => {
                    residual::subsample_backward_f16(rec, g_out, g_in, self.spec.stride, false)?;
                    conv::backward_data_bn_f16(rec, d_out, w, da, stride, false, x, &bn.affine, &grads, g_in, true)?;
                }
                Shortcut::Identity => {
                    conv::backward_data_bn_f16(rec, d_out, w, da, stride, false, x, &bn.affine, &grads, g_in, true)?
                }
            }
        }
        Ok(())
    }

    /// `h(x)` into `y` (overwriting it) for the parameter-free shortcuts, on the f16 path.
    fn shortcut_free_f16(&self, rec: &mut Recorder, x: &HalfTensor, y: &HalfTensor) -> Result<()> {
        match self.spec.shortcut {
            Shortcut::Identity => {
                rec.encoder().copy_buffer_to_buffer(&x.buffer, 0, &y.buffer, 0, x.buffer.size());
                Ok(())
            }
            Shortcut::Subsample => residual::subsample_forward_f16(rec, x, y, self.spec.stride),
            Shortcut::Projection => Ok(()),
        }
    }

    // ---- original: h_i = conv_i(in_i), in_{i+1} = ReLU(BN_i(h_i)), y = ReLU(h + BN_k(h_k)) ----

    fn forward_original_f16(&self, rec: &mut Recorder, x: &HalfTensor, y: &HalfTensor, kept: &HalfKept) -> Result<()> {
        let k = self.convs.len();
        // h_i = conv_i(in_i), in_i = ReLU(BN_{i-1}(h_{i-1})) applied as the convolution loads;
        // each convolution's epilogue takes its BN's statistics of h_i.
        for i in 0..k {
            let (h, conv, bn) = (&kept.tensors[i], &self.convs[i], &self.bns[i]);
            let (input, pre) = match i {
                0 => (x, None),
                _ => (&kept.tensors[i - 1], Some(&self.bns[i - 1].affine)),
            };
            let (stats, mean, invstd) = (bn.tensors(), &bn.save_mean, &bn.save_invstd);
            conv::forward_stats_f16(rec, input, pre, &conv.w.value, h, conv.stride, false, &stats, mean, invstd)?;
        }
        match self.spec.shortcut {
            Shortcut::Projection => {
                let (hs, pw, bn) = (&kept.tensors[k], &self.proj()?.w.value, self.proj_bn()?);
                let (stats, mean, invstd) = (bn.tensors(), &bn.save_mean, &bn.save_invstd);
                conv::forward_stats_f16(rec, x, None, pw, hs, self.spec.stride, false, &stats, mean, invstd)?;
                bn.recompute_f16(rec, hs, y, Epilogue::default())?;
            }
            _ => self.shortcut_free_f16(rec, x, y)?,
        }
        // x_{l+1} = ReLU(h(x_l) + BN_k(h_k)), added into the stream in place.
        self.bns[k - 1].recompute_f16(rec, &kept.tensors[k - 1], y, Epilogue { add: true, relu: true })
    }

    fn backward_original_f16(
        &self,
        rec: &mut Recorder,
        x: &HalfTensor,
        y: &HalfTensor,
        g_out: &HalfTensor,
        g_in: &HalfTensor,
        kept: &HalfKept,
    ) -> Result<()> {
        let k = self.convs.len();
        // f = ReLU: dE/dy_l = dE/dx_{l+1} * [x_{l+1} > 0], in place.
        relu::mask_in_place_f16(rec, y, g_out)?;
        match self.spec.shortcut {
            Shortcut::Identity => {}
            Shortcut::Subsample => residual::subsample_backward_f16(rec, g_out, g_in, self.spec.stride, false)?,
            Shortcut::Projection => {
                let (hs, dhs, bn, p) = (&kept.tensors[k], &kept.grads[k], self.proj_bn()?, self.proj()?);
                batch_norm::backward_f16(rec, hs, g_out, &bn.grads(), false, dhs, false)?;
                conv::backward_weight_f16(rec, x, dhs, &p.w.grad, self.spec.stride, false)?;
                conv::backward_data_f16(rec, dhs, &p.w.value, g_in, self.spec.stride, false)?;
            }
        }
        // The gradient at the last BN's output is g_out itself (its ReLU, f, masked above).
        let mut dh = &kept.grads[k - 1]; // dE/dh_i
        batch_norm::backward_f16(rec, &kept.tensors[k - 1], g_out, &self.bns[k - 1].grads(), false, dh, false)?;
        for i in (0..k).rev() {
            let conv = &self.convs[i];
            if i == 0 {
                conv::backward_weight_f16(rec, x, dh, &conv.w.grad, conv.stride, false)?;
                // g_l = (shortcut's gradient) + the branch's.
                return conv::backward_data_f16(rec, dh, &conv.w.value, g_in, conv.stride, true);
            }
            // conv_i reads ReLU(BN_{i-1}(h_{i-1})): its weight gradient through the prologue,
            // then da and BN_{i-1}'s backward with the ReLU mask into dh_{i-1}.
            let (hp, bn, da, dhp) = (&kept.tensors[i - 1], &self.bns[i - 1], &kept.da[i - 1], &kept.grads[i - 1]);
            conv::backward_weight_bn_relu_f16(rec, hp, &bn.affine, dh, &conv.w.grad, conv.stride, false)?;
            let w = &conv.w.value;
            conv::backward_data_bn_f16(rec, dh, w, da, conv.stride, false, hp, &bn.affine, &bn.grads(), dhp, false)?;
            dh = dhp;
        }
        Ok(())
    }
}
