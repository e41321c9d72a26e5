//! What a network is made of: the configuration, the residual units it expands to, and the
//! PyTorch-style names of every tensor. Shared by the GPU network ([`crate::net`]) and the CPU
//! reference ([`crate::reference::net`]), which compute it independently.
//!
//! A unit is `y_l = h(x_l) + F(x_l)`, `x_{l+1} = f(y_l)`:
//! - [`UnitKind::PreAct`] (full pre-activation, the default): each weight layer of `F` is
//!   BN -> ReLU -> conv, and `f` is the identity;
//! - [`UnitKind::Original`]: each weight layer is conv -> BN, with a ReLU between layers, and
//!   `f` is ReLU.
//!
//! `h` is the identity where the shape is kept. Where a unit changes shape (stride 2 or more
//! channels) `h` is option A, the input subsampled by the stride with the extra channels zero,
//! or option B, a 1x1 projection with the unit's stride (in pre-activation units it takes the
//! pre-activated input `ReLU(BN1(x))`; in original units it is conv -> BN, as torchvision does).

use crate::error::{Error, Result};

/// The placement of BN and ReLU in a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnitKind {
    /// Full pre-activation: `F = conv(ReLU(BN(conv(ReLU(BN(x))))))`, `f = identity`.
    PreAct,
    /// Original: `F = BN(conv(ReLU(BN(conv(x)))))`, `f = ReLU`.
    Original,
}

/// The shortcut of units that change shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShortcutOption {
    /// Parameter-free: subsample by the stride, zero the extra channels.
    A,
    /// A 1x1 projection convolution with the unit's stride.
    B,
}

/// The shortcut `h` of one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shortcut {
    Identity,
    Subsample,
    Projection,
}

/// One weight layer of `F`: a square convolution without bias and its batch norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layer {
    pub c_in: usize,
    pub c_out: usize,
    /// Kernel size, 1 or 3 (padding k/2).
    pub k: usize,
    pub stride: usize,
}

/// One residual unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitSpec {
    /// PyTorch-style prefix, e.g. `layer2.0`.
    pub name: String,
    /// The stage, from 0.
    pub stage: usize,
    pub kind: UnitKind,
    pub c_in: usize,
    pub c_out: usize,
    pub stride: usize,
    pub shortcut: Shortcut,
    /// The weight layers of `F`, in order: `conv{i+1}` and `bn{i+1}` in the names.
    pub layers: Vec<Layer>,
}

/// A CIFAR-style ResNet: stem conv, three stages, head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub kind: UnitKind,
    /// Units per stage.
    pub units_per_stage: usize,
    /// Bottleneck units (1x1, 3x3, 1x1, expansion 4) instead of basic (3x3, 3x3).
    pub bottleneck: bool,
    pub shortcut: ShortcutOption,
    /// Channels of the stem and of the three stages' 3x3 layers (16, 32, 64 on CIFAR).
    pub widths: [usize; 3],
    pub in_channels: usize,
    pub classes: usize,
}

impl NetConfig {
    /// The CIFAR family: depth 6n+2 with basic units (20, 32, 44, 56, 110, 1202) or 9n+2 with
    /// bottleneck units (164, 1001).
    pub fn cifar(depth: usize, kind: UnitKind, bottleneck: bool, classes: usize) -> Result<NetConfig> {
        let per = if bottleneck { 9 } else { 6 };
        if depth < per + 2 || !(depth - 2).is_multiple_of(per) {
            return Err(Error::Invalid(format!(
                "depth {depth} is not {per}n+2 ({} units)",
                if bottleneck { "bottleneck" } else { "basic" }
            )));
        }
        if classes < 2 {
            return Err(Error::Invalid(format!("{classes} classes: need at least 2")));
        }
        Ok(NetConfig {
            kind,
            units_per_stage: (depth - 2) / per,
            bottleneck,
            shortcut: ShortcutOption::B,
            widths: [16, 32, 64],
            in_channels: 3,
            classes,
        })
    }

    /// Weight layers counted as the paper does.
    pub fn depth(&self) -> usize {
        self.units_per_stage * 3 * if self.bottleneck { 3 } else { 2 } + 2
    }

    /// Channels of the stream out of stage `s`.
    pub fn stage_channels(&self, s: usize) -> usize {
        self.widths[s] * if self.bottleneck { 4 } else { 1 }
    }

    /// Channels of the stem's output (the stream `x_0`).
    pub fn stem_channels(&self) -> usize {
        self.widths[0]
    }

    /// Checks the configuration for sizes a network can have.
    pub fn validate(&self) -> Result<()> {
        if self.units_per_stage == 0 || self.widths.contains(&0) || self.in_channels == 0 || self.classes < 2 {
            return Err(Error::Invalid(format!("impossible network configuration {self:?}")));
        }
        if self.shortcut == ShortcutOption::A && self.widths.windows(2).any(|w| w[1] < w[0]) {
            return Err(Error::Invalid("option-A shortcuts need non-decreasing widths".into()));
        }
        Ok(())
    }

    /// The units, stage by stage: the first unit of stages 2 and 3 has stride 2.
    pub fn units(&self) -> Vec<UnitSpec> {
        let mut units = Vec::new();
        let mut c = self.stem_channels();
        for s in 0..3 {
            let (mid, out) = (self.widths[s], self.stage_channels(s));
            for j in 0..self.units_per_stage {
                let stride = if s > 0 && j == 0 { 2 } else { 1 };
                let layers = if self.bottleneck {
                    vec![
                        Layer { c_in: c, c_out: mid, k: 1, stride: 1 },
                        Layer { c_in: mid, c_out: mid, k: 3, stride },
                        Layer { c_in: mid, c_out: out, k: 1, stride: 1 },
                    ]
                } else {
                    vec![Layer { c_in: c, c_out: out, k: 3, stride }, Layer { c_in: out, c_out: out, k: 3, stride: 1 }]
                };
                let shortcut = if stride == 1 && c == out {
                    Shortcut::Identity
                } else if self.shortcut == ShortcutOption::A {
                    Shortcut::Subsample
                } else {
                    Shortcut::Projection
                };
                units.push(UnitSpec {
                    name: format!("layer{}.{}", s + 1, j),
                    stage: s,
                    kind: self.kind,
                    c_in: c,
                    c_out: out,
                    stride,
                    shortcut,
                    layers,
                });
                c = out;
            }
        }
        units
    }

    /// Every parameter and buffer, in a fixed order, with its PyTorch name and shape.
    ///
    /// The scheme (a PyTorch module of the same architecture produces the same state dict):
    /// - stem: `conv1.weight`; original networks also `bn1.*` after it;
    /// - unit `layer{s}.{j}`: `conv{i}.weight` and `bn{i}.*` for each weight layer `i`; a
    ///   projection shortcut is `shortcut.weight` in pre-activation units and `shortcut.0.weight`
    ///   with `shortcut.1.*` (its BN) in original units;
    /// - pre-activation networks: the final `bn.*` before pooling;
    /// - head: `fc.weight` [classes, C], `fc.bias` [classes].
    ///
    /// `bn*.` expands to `weight`, `bias` (learned) and `running_mean`, `running_var`,
    /// `num_batches_tracked` (buffers).
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut v = Vec::new();
        let conv = |v: &mut Vec<TensorSpec>, name: String, l: Layer| {
            v.push(TensorSpec { name, dims: vec![l.c_out, l.c_in, l.k, l.k], role: Role::Weight })
        };
        let bn = |v: &mut Vec<TensorSpec>, prefix: String, c: usize| {
            v.push(TensorSpec { name: format!("{prefix}.weight"), dims: vec![c], role: Role::BnWeight });
            v.push(TensorSpec { name: format!("{prefix}.bias"), dims: vec![c], role: Role::BnBias });
            v.push(TensorSpec { name: format!("{prefix}.running_mean"), dims: vec![c], role: Role::RunningMean });
            v.push(TensorSpec { name: format!("{prefix}.running_var"), dims: vec![c], role: Role::RunningVar });
            v.push(TensorSpec { name: format!("{prefix}.num_batches_tracked"), dims: vec![], role: Role::Count });
        };
        let stem = Layer { c_in: self.in_channels, c_out: self.stem_channels(), k: 3, stride: 1 };
        conv(&mut v, "conv1.weight".into(), stem);
        if self.kind == UnitKind::Original {
            bn(&mut v, "bn1".into(), stem.c_out);
        }
        for u in self.units() {
            for (i, l) in u.layers.iter().enumerate() {
                conv(&mut v, format!("{}.conv{}.weight", u.name, i + 1), *l);
                // Pre-activation: bn_i normalises the layer's input; original: its output.
                let c = if u.kind == UnitKind::PreAct { l.c_in } else { l.c_out };
                bn(&mut v, format!("{}.bn{}", u.name, i + 1), c);
            }
            if u.shortcut == Shortcut::Projection {
                let l = Layer { c_in: u.c_in, c_out: u.c_out, k: 1, stride: u.stride };
                if u.kind == UnitKind::PreAct {
                    conv(&mut v, format!("{}.shortcut.weight", u.name), l);
                } else {
                    conv(&mut v, format!("{}.shortcut.0.weight", u.name), l);
                    bn(&mut v, format!("{}.shortcut.1", u.name), u.c_out);
                }
            }
        }
        let c = self.stage_channels(2);
        if self.kind == UnitKind::PreAct {
            bn(&mut v, "bn".into(), c);
        }
        v.push(TensorSpec { name: "fc.weight".into(), dims: vec![self.classes, c], role: Role::FcWeight });
        v.push(TensorSpec { name: "fc.bias".into(), dims: vec![self.classes], role: Role::FcBias });
        v
    }
}

/// What a named tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A convolution weight (learned; He initialisation).
    Weight,
    BnWeight,
    BnBias,
    RunningMean,
    RunningVar,
    /// BN's `num_batches_tracked` (an i64 scalar in PyTorch).
    Count,
    FcWeight,
    FcBias,
}

impl Role {
    /// Learned by SGD (has a gradient and a momentum buffer).
    pub fn learned(self) -> bool {
        matches!(self, Role::Weight | Role::BnWeight | Role::BnBias | Role::FcWeight | Role::FcBias)
    }
}

/// A named tensor of a network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// PyTorch's shape (empty for scalars).
    pub dims: Vec<usize>,
    pub role: Role,
}

impl TensorSpec {
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl NetConfig {
    /// Initial values of [`NetConfig::tensors`], in order, drawn from `seed`: convolutions
    /// He-normal with fan-out (`std = sqrt(2 / (k*k*c_out))`, as the paper's code), BN weight 1
    /// and bias 0, running mean 0 and variance 1, and the FC weight and bias uniform in
    /// `+-1/sqrt(C)` (PyTorch's default for Linear).
    pub fn initial_values(&self, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = crate::rng::Rng::new(seed);
        let fc_bound = 1.0 / (self.stage_channels(2) as f64).sqrt();
        self.tensors()
            .iter()
            .map(|t| {
                let n = t.len();
                match t.role {
                    Role::Weight => {
                        let std = (2.0 / (t.dims[0] * t.dims[2] * t.dims[3]) as f64).sqrt();
                        (0..n).map(|_| (rng.normal() * std) as f32).collect()
                    }
                    Role::BnWeight | Role::RunningVar => vec![1.0; n],
                    Role::BnBias | Role::RunningMean | Role::Count => vec![0.0; n],
                    Role::FcWeight | Role::FcBias => (0..n).map(|_| rng.range(-fc_bound, fc_bound) as f32).collect(),
                }
            })
            .collect()
    }
}
