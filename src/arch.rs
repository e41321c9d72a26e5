//! What a network is made of: the configuration, the residual units it expands to, and the
//! PyTorch-style names of every tensor. Shared by the GPU network ([`crate::net`]) and the CPU
//! reference ([`crate::reference::net`]), which compute it independently.
//!
//! A unit is `y_l = h(x_l) + F(x_l)`, `x_{l+1} = f(y_l)`:
//! - [`UnitKind::PreAct`] (full pre-activation, the default): each weight layer of `F` is
//!   BN -> ReLU -> conv, and `f` is the identity;
//! - [`UnitKind::Original`]: each weight layer is conv -> BN, with a ReLU between layers, and
//!   `f` is ReLU;
//! - the other placements of the paper's Table 2 ([`UnitKind::BnAfterAdd`],
//!   [`UnitKind::ReluBeforeAdd`], [`UnitKind::ReluOnlyPreAct`]).
//!
//! How `h(x_l)` and `F(x_l)` are combined into `y_l` is [`Combine`]: the plain sum, or one of
//! the paper's Table 1 variants (constant scaling, gating, dropout on the shortcut). The 1x1
//! convolution shortcut on every unit is [`ShortcutOption::C`]. [`Variant`] names a placement
//! and a combination together, as the command line takes them.
//!
//! `h` is the identity where the shape is kept. Where a unit changes shape (stride 2 or more
//! channels) `h` is option A, the input subsampled by the stride with the extra channels zero,
//! or option B, a 1x1 projection with the unit's stride (in pre-activation units it takes the
//! pre-activated input `ReLU(BN1(x))`; in original units it is conv -> BN, as torchvision does).

use crate::error::{Error, Result};

/// The placement of BN and ReLU in a unit (the paper's Table 2, written for two layers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnitKind {
    /// Full pre-activation: `F = conv(ReLU(BN(conv(ReLU(BN(x))))))`, `f = identity`.
    PreAct,
    /// Original: `F = BN(conv(ReLU(BN(conv(x)))))`, `f = ReLU`.
    Original,
    /// BN after addition: `F = conv(ReLU(BN(conv(x))))`, `f = ReLU(BN(.))`; the last layer's
    /// BN (`bn{k}`) normalises `y_l` instead of the branch.
    BnAfterAdd,
    /// ReLU before addition: `F = ReLU(BN(conv(ReLU(BN(conv(x))))))`, `f = identity`.
    ReluBeforeAdd,
    /// ReLU-only pre-activation: `F = BN(conv(ReLU(BN(conv(ReLU(x))))))`, `f = identity`.
    ReluOnlyPreAct,
}

impl UnitKind {
    /// Every placement, in the order of the paper's Table 2.
    pub const ALL: [UnitKind; 5] =
        [UnitKind::Original, UnitKind::BnAfterAdd, UnitKind::ReluBeforeAdd, UnitKind::ReluOnlyPreAct, UnitKind::PreAct];

    /// The name the command line takes.
    pub fn name(self) -> &'static str {
        match self {
            UnitKind::PreAct => "preact",
            UnitKind::Original => "original",
            UnitKind::BnAfterAdd => "bn-after-add",
            UnitKind::ReluBeforeAdd => "relu-before-add",
            UnitKind::ReluOnlyPreAct => "relu-only-preact",
        }
    }

    /// Whether BN comes before each convolution (normalising the layer's input, `bn{i}` has
    /// `c_in` channels) rather than after it (`c_out` channels).
    pub fn bn_before_conv(self) -> bool {
        self == UnitKind::PreAct
    }

    /// The stem: a plain conv (pre-activation) or conv -> BN -> ReLU (every other placement).
    pub fn stem_bn(self) -> bool {
        self != UnitKind::PreAct
    }
}

/// The shortcut of units that change shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShortcutOption {
    /// Parameter-free: subsample by the stride, zero the extra channels.
    A,
    /// A 1x1 projection convolution with the unit's stride.
    B,
    /// A 1x1 projection on every unit, also where the shape is kept (the paper's "1x1 conv
    /// shortcut" of Table 1).
    C,
}

/// How a unit combines its shortcut and its branch into `y_l` (the paper's Table 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Combine {
    /// `y = h(x) + F(x)`.
    Add,
    /// Constant scaling: `y = lambda_h * h(x) + lambda_f * F(x)`.
    Scale { h: f32, f: f32 },
    /// Exclusive gating: `g = sigmoid(conv1x1(x) + b)`, `y = (1 - g) * h(x) + g * F(x)`; the
    /// gate's bias starts at `bias` (the paper's best is -6). Its weights are
    /// `{unit}.gate.weight` and `{unit}.gate.bias`.
    ExclusiveGate { bias: f32 },
    /// Shortcut-only gating: `y = (1 - g) * h(x) + F(x)`, `g` as for [`Combine::ExclusiveGate`].
    ShortcutGate { bias: f32 },
    /// Dropout on the shortcut: in training `y = m * h(x) / (1 - rate) + F(x)` with a seeded
    /// Bernoulli mask `m` (keep probability `1 - rate`); in inference `y = h(x) + F(x)`.
    /// This is inverted dropout, as Torch's and PyTorch's layers do it by default: the kept
    /// shortcut is scaled up, so its expected value is `h(x)`. The paper's explanation of its
    /// failure (a scale "with an expectation of 0.5" on the shortcut, as constant scaling by
    /// 0.5) reads as dropout without that rescaling; that variant is not offered.
    Dropout { rate: f32 },
}

impl Combine {
    /// Whether the unit has a gate (its own 1x1 convolution and bias).
    pub fn gated(self) -> bool {
        matches!(self, Combine::ExclusiveGate { .. } | Combine::ShortcutGate { .. })
    }

    /// Checks the constants.
    pub fn validate(self) -> Result<()> {
        let why = match self {
            Combine::Add => None,
            Combine::Scale { h, f } => (!h.is_finite() || !f.is_finite()).then_some("the scales must be finite"),
            Combine::ExclusiveGate { bias } | Combine::ShortcutGate { bias } => {
                (!bias.is_finite()).then_some("the gate's bias must be finite")
            }
            Combine::Dropout { rate } => {
                (!(0.0..1.0).contains(&rate)).then_some("the dropout rate must be at least 0 and below 1 (as an f32)")
            }
        };
        match why {
            None => Ok(()),
            Some(why) => Err(Error::Invalid(format!("impossible shortcut combination {self:?}: {why}"))),
        }
    }
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
#[derive(Clone, Debug, PartialEq)]
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
    /// How `h(x)` and `F(x)` are combined.
    pub combine: Combine,
    /// The weight layers of `F`, in order: `conv{i+1}` and `bn{i+1}` in the names.
    pub layers: Vec<Layer>,
}

impl UnitSpec {
    /// `x_{l+1} = x_l + F(x_l)` exactly: identity `h`, plain sum and identity `f`.
    pub fn is_identity(&self) -> bool {
        self.shortcut == Shortcut::Identity
            && self.combine == Combine::Add
            && matches!(self.kind, UnitKind::PreAct | UnitKind::ReluBeforeAdd | UnitKind::ReluOnlyPreAct)
    }

    /// The gate's 1x1 convolution (gated units): `c_in -> c_out` with the unit's stride.
    pub fn gate_layer(&self) -> Layer {
        Layer { c_in: self.c_in, c_out: self.c_out, k: 1, stride: self.stride }
    }
}

/// A CIFAR-style ResNet: stem conv, three stages, head.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConfig {
    pub kind: UnitKind,
    /// How each unit combines its shortcut and its branch.
    pub combine: Combine,
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

/// The most units a stage may have (ResNet-60002 with basic units): the lists of a network's
/// units and tensors are built before any buffer, and a depth from a file's metadata could ask
/// for more than the host's memory holds.
pub const MAX_UNITS_PER_STAGE: usize = 10_000;

/// The most classes a network may have: labels are u32 on the GPU (and a count past it made
/// `analyze`'s labels divide by zero, and a tensor's length overflow).
pub const MAX_CLASSES: usize = u32::MAX as usize;

impl NetConfig {
    /// The CIFAR family: depth 6n+2 with basic units (20, 32, 44, 56, 110, 1202) or 9n+2 with
    /// bottleneck units (164, 1001), up to [`MAX_UNITS_PER_STAGE`] units a stage.
    pub fn cifar(depth: usize, kind: UnitKind, bottleneck: bool, classes: usize) -> Result<NetConfig> {
        let per = if bottleneck { 9 } else { 6 };
        if depth < per + 2 || !(depth - 2).is_multiple_of(per) {
            return Err(Error::Invalid(format!(
                "depth {depth} is not {per}n+2 ({} units)",
                if bottleneck { "bottleneck" } else { "basic" }
            )));
        }
        if (depth - 2) / per > MAX_UNITS_PER_STAGE {
            return Err(Error::Invalid(format!("depth {depth}: more than {MAX_UNITS_PER_STAGE} units a stage")));
        }
        if !(2..=MAX_CLASSES).contains(&classes) {
            return Err(Error::Invalid(format!("{classes} classes: need at least 2 and at most {MAX_CLASSES}")));
        }
        Ok(NetConfig {
            kind,
            combine: Combine::Add,
            units_per_stage: (depth - 2) / per,
            bottleneck,
            shortcut: ShortcutOption::B,
            widths: [16, 32, 64],
            in_channels: 3,
            classes,
        })
    }

    /// The network in words, everything that shapes its tensors or its passes: `ResNet-20
    /// preact (basic units, shortcut B, widths 16-32-64, 3 input channels, 10 classes)`. Files
    /// written here carry it, and load only into the network it names.
    pub fn name(&self) -> String {
        let [a, b, c] = self.widths;
        format!(
            "ResNet-{} {} ({} units, shortcut {:?}, widths {a}-{b}-{c}, {} input channels, {} classes)",
            self.depth(),
            Variant::of(self),
            if self.bottleneck { "bottleneck" } else { "basic" },
            self.shortcut,
            self.in_channels,
            self.classes
        )
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

    /// Multiply-adds of every convolution in one image's forward at `size` x `size` input: the
    /// 3x3 stem, each unit's layers, gate and projection shortcut (the head's FC left out).
    pub fn conv_macs(&self, size: usize) -> usize {
        let mut s = size;
        let mut macs = self.in_channels * self.stem_channels() * 9 * s * s;
        for u in self.units() {
            let s_out = s.div_ceil(u.stride); // (s - 1) / stride + 1, and 0 at 0
            let mut t = s;
            for l in &u.layers {
                t = t.div_ceil(l.stride);
                macs += l.c_in * l.c_out * l.k * l.k * t * t;
            }
            if u.shortcut == Shortcut::Projection {
                macs += u.c_in * u.c_out * s_out * s_out;
            }
            if u.combine.gated() {
                macs += u.c_in * u.c_out * s_out * s_out;
            }
            s = s_out;
        }
        macs
    }

    /// Checks the configuration for sizes a network can have.
    pub fn validate(&self) -> Result<()> {
        if self.units_per_stage == 0 || self.widths.contains(&0) || self.in_channels == 0 || self.classes < 2 {
            return Err(Error::Invalid(format!("impossible network configuration {self:?}")));
        }
        if self.classes > MAX_CLASSES {
            return Err(Error::Invalid(format!("{} classes: at most {MAX_CLASSES}", self.classes)));
        }
        let most = crate::ops::MAX_CHANNELS;
        // Widths compared before the bottleneck's factor 4, which could overflow.
        let widest = if self.bottleneck { most / 4 } else { most };
        if self.in_channels > most || self.widths.iter().any(|&w| w > widest) {
            return Err(Error::Invalid(format!(
                "{} input channels, stages of {:?} channels{}: at most {most} a layer",
                self.in_channels,
                self.widths,
                if self.bottleneck { " times 4" } else { "" }
            )));
        }
        if self.units_per_stage > MAX_UNITS_PER_STAGE {
            return Err(Error::Invalid(format!(
                "{} units a stage: at most {MAX_UNITS_PER_STAGE}",
                self.units_per_stage
            )));
        }
        self.combine.validate()?;
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
                let shortcut = if stride == 1 && c == out && self.shortcut != ShortcutOption::C {
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
                    combine: self.combine,
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
    /// - stem: `conv1.weight`; every placement but pre-activation also `bn1.*` after it;
    /// - unit `layer{s}.{j}`: `conv{i}.weight` and `bn{i}.*` for each weight layer `i`; a
    ///   projection shortcut is `shortcut.weight` in pre-activation units and `shortcut.0.weight`
    ///   with `shortcut.1.*` (its BN) in the others; a gate is `gate.weight` `[C_out, C_in, 1, 1]`
    ///   and `gate.bias` `[C_out]`;
    /// - pre-activation networks: the final `bn.*` before pooling;
    /// - head: `fc.weight` `[classes, C]`, `fc.bias` `[classes]`.
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
        if self.kind.stem_bn() {
            bn(&mut v, "bn1".into(), stem.c_out);
        }
        for u in self.units() {
            for (i, l) in u.layers.iter().enumerate() {
                conv(&mut v, format!("{}.conv{}.weight", u.name, i + 1), *l);
                // Pre-activation: bn_i normalises the layer's input; the others: its output.
                let c = if u.kind.bn_before_conv() { l.c_in } else { l.c_out };
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
            if u.combine.gated() {
                conv(&mut v, format!("{}.gate.weight", u.name), u.gate_layer());
                v.push(TensorSpec { name: format!("{}.gate.bias", u.name), dims: vec![u.c_out], role: Role::GateBias });
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
    /// A gate's bias (initialised to the configured value).
    GateBias,
}

impl Role {
    /// Learned by SGD (has a gradient and a momentum buffer).
    pub fn learned(self) -> bool {
        matches!(self, Role::Weight | Role::BnWeight | Role::BnBias | Role::FcWeight | Role::FcBias | Role::GateBias)
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
    /// `+-1/sqrt(C)` (PyTorch's default for Linear); a gate's bias is the configured value.
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
                    Role::GateBias => match self.combine {
                        Combine::ExclusiveGate { bias } | Combine::ShortcutGate { bias } => vec![bias; n],
                        _ => vec![0.0; n],
                    },
                }
            })
            .collect()
    }
}

/// A unit variant as the command line names it: a placement (the paper's Table 2) and a
/// combination of shortcut and branch (Table 1), written `PLACEMENT[+COMBINATION]` or
/// `COMBINATION` alone (on the original unit, as the paper's Table 1 is):
/// - placements: `original`, `bn-after-add`, `relu-before-add`, `relu-only-preact`, `preact`;
/// - combinations: `add` (the default), `scale:H:F` (`scale` is 0.5:0.5), `gate:B` (exclusive
///   gating, gate bias starting at B; `gate` is -6), `shortcut-gate:B`, `conv` (a 1x1
///   convolution shortcut on every unit), `dropout:P` (`dropout` is 0.5).
///
/// Examples: `preact`, `scale:0.5:1`, `original+gate:-6`, `preact+dropout:0.5`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Variant {
    pub kind: UnitKind,
    pub combine: Combine,
    /// A 1x1 convolution shortcut on every unit ([`ShortcutOption::C`]).
    pub conv_shortcut: bool,
}

impl Variant {
    /// Applies the variant to a configuration (the shortcut option becomes C for `conv`).
    pub fn apply(self, cfg: &mut NetConfig) {
        cfg.kind = self.kind;
        cfg.combine = self.combine;
        if self.conv_shortcut {
            cfg.shortcut = ShortcutOption::C;
        }
    }

    /// The variant of a configuration.
    pub fn of(cfg: &NetConfig) -> Variant {
        Variant { kind: cfg.kind, combine: cfg.combine, conv_shortcut: cfg.shortcut == ShortcutOption::C }
    }

    fn combination(&self) -> Option<String> {
        match self.combine {
            Combine::Add if self.conv_shortcut => Some("conv".into()),
            Combine::Add => None,
            Combine::Scale { h, f } => Some(format!("scale:{h}:{f}")),
            Combine::ExclusiveGate { bias } => Some(format!("gate:{bias}")),
            Combine::ShortcutGate { bias } => Some(format!("shortcut-gate:{bias}")),
            Combine::Dropout { rate } => Some(format!("dropout:{rate}")),
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.combination() {
            None => write!(f, "{}", self.kind.name()),
            Some(c) if self.kind == UnitKind::Original => write!(f, "{c}"),
            Some(c) => write!(f, "{}+{c}", self.kind.name()),
        }
    }
}

/// The names of the shortcut combinations, as `--unit` takes them.
const COMBINATIONS: [&str; 6] = ["add", "scale", "gate", "shortcut-gate", "conv", "dropout"];

impl std::str::FromStr for Variant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Variant> {
        let bad = |why: &str| Error::Invalid(format!("unit variant {s:?}: {why}"));
        // The placement ends at the first '+' before any ':' (a number's exponent may have one).
        let (placement, combination) = match s.split_once('+') {
            Some((p, c)) if !p.contains(':') => (Some(p), Some(c)),
            Some(_) => (None, Some(s)),
            None if UnitKind::ALL.iter().any(|k| k.name() == s) => (Some(s), None),
            None => (None, Some(s)),
        };
        let kind = match placement {
            None => UnitKind::Original,
            Some(p) => *UnitKind::ALL.iter().find(|k| k.name() == p).ok_or_else(|| {
                // A combination before the '+': two of them (gate+dropout, conv+gate).
                match COMBINATIONS.contains(&p) {
                    true => bad("one placement and one combination at most, PLACEMENT+COMBINATION (conv with \
                         another combination: --shortcut c)"),
                    false => bad("unknown placement (original, bn-after-add, relu-before-add, relu-only-preact, \
                         preact) before '+'"),
                }
            })?,
        };
        let mut v = Variant { kind, combine: Combine::Add, conv_shortcut: false };
        let Some(c) = combination else { return Ok(v) };
        // Another name after a '+' (not a number's exponent): a second combination.
        if c.split('+').skip(1).any(|p| p.starts_with(|ch: char| ch.is_ascii_alphabetic())) {
            return Err(bad("one placement and one combination at most, PLACEMENT+COMBINATION (conv with another \
                 combination: --shortcut c)"));
        }
        let mut parts = c.split(':');
        let name = parts.next().unwrap_or_default();
        let nums = parts.map(|p| p.parse::<f32>().map_err(|_| bad(&format!("{p:?} is not a number"))));
        let nums = nums.collect::<Result<Vec<f32>>>()?;
        // The one number of gate, shortcut-gate and dropout, or its default.
        let one = |default: f32| match nums[..] {
            [] => Ok(default),
            [x] => Ok(x),
            _ => Err(bad(&format!("{name} takes one number"))),
        };
        v.combine = match (name, &nums[..]) {
            ("add", []) => Combine::Add,
            ("conv", []) => {
                v.conv_shortcut = true;
                Combine::Add
            }
            ("add" | "conv", _) => return Err(bad(&format!("{name} takes no number"))),
            ("scale", []) => Combine::Scale { h: 0.5, f: 0.5 },
            ("scale", &[h, f]) => Combine::Scale { h, f },
            ("scale", _) => return Err(bad("scale takes two numbers, scale:H:F")),
            ("gate", _) => Combine::ExclusiveGate { bias: one(-6.0)? },
            ("shortcut-gate", _) => Combine::ShortcutGate { bias: one(-6.0)? },
            ("dropout", _) => Combine::Dropout { rate: one(0.5)? },
            _ => {
                return Err(bad("unknown combination (add, scale, gate, shortcut-gate, conv, dropout) or placement \
                     (original, bn-after-add, relu-before-add, relu-only-preact, preact)"));
            }
        };
        v.combine.validate()?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A depth past MAX_UNITS_PER_STAGE is refused before its lists are built: a file's
    /// metadata naming ResNet-600000002 made the loaders build 300 million units' names.
    #[test]
    fn depths_past_the_most_units_are_refused() {
        let most = 6 * MAX_UNITS_PER_STAGE + 2;
        assert!(NetConfig::cifar(most, UnitKind::PreAct, false, 10).is_ok());
        for depth in [most + 6, 600_000_002] {
            match NetConfig::cifar(depth, UnitKind::PreAct, false, 10) {
                Err(Error::Invalid(m)) => assert!(m.contains("units a stage"), "{m}"),
                other => panic!("depth {depth}: {other:?}"),
            }
        }
        let mut c = NetConfig::cifar(20, UnitKind::PreAct, false, 10).unwrap();
        c.units_per_stage = MAX_UNITS_PER_STAGE + 1;
        assert!(matches!(c.validate(), Err(Error::Invalid(_))));
        // A file naming it completely (its name is made without its lists).
        c.units_per_stage = 100_000_000;
        let name = c.name();
        let named: std::collections::HashMap<String, String> = [
            ("depth", "600000002"),
            ("bottleneck", "false"),
            ("classes", "10"),
            ("shortcut", "B"),
            ("variant", "preact"),
            ("network", name.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert!(crate::io::named_network(&named).is_none());
    }

    /// Class and channel counts past what the GPU's kernels take are refused: `--classes
    /// 4294967296` made analyze's labels divide by zero, and 2^58 classes overflowed the fc
    /// weight's length (0 in release builds: an empty tensor taken as the network's).
    #[test]
    fn class_and_channel_counts_past_the_kernels_are_refused() {
        assert!(NetConfig::cifar(20, UnitKind::PreAct, false, MAX_CLASSES).is_ok());
        for classes in [MAX_CLASSES + 1, 1 << 58] {
            match NetConfig::cifar(20, UnitKind::PreAct, false, classes) {
                Err(Error::Invalid(m)) => assert!(m.contains("at most"), "{m}"),
                other => panic!("{classes} classes: {other:?}"),
            }
        }
        let ok = NetConfig::cifar(20, UnitKind::PreAct, false, 10).unwrap();
        let mut c = ok.clone();
        c.classes = 1 << 58;
        assert!(matches!(c.validate(), Err(Error::Invalid(_))));
        // Widths: batch norm's 65535 channels, bottleneck stages four times the width.
        let bottleneck = NetConfig::cifar(164, UnitKind::PreAct, true, 10).unwrap();
        for (base, widths, fine) in [(&ok, [65535, 16, 16], true), (&ok, [65536, 16, 16], false)]
            .into_iter()
            .chain([(&bottleneck, [16, 16, 16383], true), (&bottleneck, [16, 16, 16384], false)])
        {
            let c = NetConfig { widths, ..base.clone() };
            assert_eq!(c.validate().is_ok(), fine, "{widths:?} bottleneck {}", c.bottleneck);
        }
        let c = NetConfig { widths: [16, 16, 1 << 62], ..bottleneck.clone() };
        assert!(matches!(c.validate(), Err(Error::Invalid(_))), "a width whose 4x overflows");
        let c = NetConfig { in_channels: 1 << 40, ..ok.clone() };
        assert!(matches!(c.validate(), Err(Error::Invalid(_))));
    }

    /// ResNet-20 on 32x32 CIFAR images: the 41 M multiply-adds usually quoted, counted by hand:
    /// stem, 6 + 6 + 6 3x3 layers over three stages at 32, 16 and 8 pixels (the first of stages
    /// 2 and 3 at stride 2), and two 1x1 projections.
    #[test]
    fn resnet20_conv_macs() {
        let cfg = NetConfig::cifar(20, UnitKind::PreAct, false, 10).unwrap();
        let stage = |c_in: usize, c: usize, s: usize| c_in * c * 9 * s * s + 5 * c * c * 9 * s * s;
        let want = 3 * 16 * 9 * 32 * 32
            + stage(16, 16, 32)
            + stage(16, 32, 16)
            + 16 * 32 * 16 * 16
            + stage(32, 64, 8)
            + 32 * 64 * 8 * 8;
        assert_eq!(cfg.conv_macs(32), want);
        assert_eq!(want, 40_812_544);
        // Odd input sizes round up at the stride-2 layers, as the convolutions do (pad k/2).
        assert!(cfg.conv_macs(33) > cfg.conv_macs(32));
        assert_eq!(cfg.conv_macs(0), 0, "no image, no work");
        // At 1 pixel every layer's output is 1 pixel, the strided ones too.
        let layers = 6 * 16 * 16 + 16 * 32 + 5 * 32 * 32 + 32 * 64 + 5 * 64 * 64;
        assert_eq!(cfg.conv_macs(1), 3 * 16 * 9 + 9 * layers + 16 * 32 + 32 * 64);
    }
}
