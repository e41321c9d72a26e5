//! Training on the GPU with the paper's recipe: SGD with momentum 0.9 and weight decay 1e-4,
//! learning rate 0.1 divided by 10 at 50% and 75% of the run (after an optional warm-up at a
//! tenth of it), pad-and-crop and flip augmentation; evaluation on the test split each epoch;
//! checkpoints that resume exactly (with the same seed and network: [`Checkpoint`]; on a GPU
//! with the same autotuner choices, which decide the order of some sums: a context with a
//! tune file, [`crate::GpuOptions::tune_file`], as the `train` command keeps in its `--out`;
//! on a CPU adapter with as many cores, which split the register path's weight gradients);
//! the gradient flow per epoch ([`flow_at`]).
//!
//! # Example
//!
//! ```no_run
//! use resnet_wgpu::arch::{NetConfig, UnitKind};
//! use resnet_wgpu::net::ResNet;
//! use resnet_wgpu::train::{self, TrainOptions};
//! use resnet_wgpu::{Gpu, data};
//!
//! # fn main() -> resnet_wgpu::Result<()> {
//! let gpu = Gpu::new()?;
//! let (train_set, test_set) = data::load_cifar("cifar10".as_ref())?;
//! let config = NetConfig::cifar(110, UnitKind::PreAct, false, 10)?;
//! let mut net = ResNet::new(&gpu, &config, 0)?;
//! // The paper's CIFAR run (164 epochs of 128, the first 400 steps at 0.01), with the gradient
//! // flow recorded per epoch; curves, flow and checkpoints go to `out`.
//! let opts =
//!     TrainOptions { epochs: 164, warmup: 400, flow: true, out: "runs/r110".into(), ..TrainOptions::default() };
//! let history = train::train(&gpu, &mut net, &train_set, &test_set, &opts, 0, train::History::default())?;
//! let (loss, accuracy) = train::evaluate(&gpu, &mut net, &test_set, 256)?;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::{self, HostTensor};
use crate::net::{ResNet, Sgd};
use crate::ops::pool_fc_loss::{Labels, upload_labels};
use crate::report::{self, Series};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// How to train.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch: usize,
    /// The initial learning rate (divided by 10 at 50% and 75% of the epochs).
    pub lr: f32,
    /// Steps, counted from the start of the run, trained at no more than `lr / 10` ([`lr_at_step`]);
    /// 0 for none. He et al. warm their CIFAR ResNet-110 up this way, 400 steps at 0.01.
    pub warmup: usize,
    pub momentum: f32,
    pub weight_decay: f32,
    /// Pad-and-crop and flip augmentation.
    pub augment: bool,
    /// Shuffling and augmentation draw from this seed (and the epoch number).
    pub seed: u64,
    /// Batch size for evaluation, at most the training batch (a third of it on the f16 path):
    /// an evaluation pass allocates a training pass's activations at its batch, in f32 (the
    /// f16 path's take 0.43 to 0.79 of those), so a larger one could need more memory than
    /// training does and fail at the end of the first epoch.
    pub eval_batch: usize,
    /// Where CSV, SVG and checkpoints go.
    pub out: PathBuf,
    /// Show a progress bar.
    pub progress: bool,
    /// Check every step for NaN or infinity ([`ResNet::train_step_checked`]): slower, and
    /// stops naming the first unit and tensor that went non-finite.
    pub check_finite: bool,
    /// Train on the f16 path with this loss scale ([`ResNet::set_f16`]); f32 where `None`.
    /// Evaluation runs in f32 either way. Not with `check_finite` (its probes measure the f32
    /// network).
    pub f16: Option<f32>,
    /// Before the first epoch and after each, the gradient-flow analysis of the network as it
    /// stands ([`flow_at`]), written to `flow.csv` and `flow.svg`.
    pub flow: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            epochs: 10,
            batch: 128,
            lr: 0.1,
            warmup: 0,
            momentum: 0.9,
            weight_decay: 1e-4,
            augment: true,
            seed: 0,
            eval_batch: 256,
            out: PathBuf::from("runs/train"),
            progress: true,
            check_finite: false,
            f16: None,
            flow: false,
        }
    }
}

/// The learning rate of `epoch` (0-based) in a run of `epochs`: `lr` until half the run,
/// `lr/10` until three quarters, `lr/100` after.
pub fn lr_at(lr: f32, epoch: usize, epochs: usize) -> f32 {
    let f = epoch as f64 / epochs.max(1) as f64;
    if f < 0.5 {
        lr
    } else if f < 0.75 {
        lr / 10.0
    } else {
        lr / 100.0
    }
}

/// The learning rate of step `step` (0-based, counted from the start of the run) in a run of
/// `epochs` epochs of `steps` steps each: [`lr_at`] of its epoch, and no more than `lr / 10`
/// in the first `warmup` steps.
///
/// The warm-up is the ResNet papers' for their 110-layer CIFAR networks: "0.01 to warm up the
/// training until the training error is below 80% (about 400 iterations), and then go back to
/// 0.1" (He et al. 2015, section 4.2), here a fixed number of steps.
pub fn lr_at_step(lr: f32, step: usize, steps: usize, epochs: usize, warmup: usize) -> f32 {
    let scheduled = lr_at(lr, step / steps.max(1), epochs);
    if step < warmup { scheduled.min(lr / 10.0) } else { scheduled }
}

/// One epoch's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochStats {
    pub epoch: usize,
    /// The learning rate of the epoch's last step.
    pub lr: f32,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    pub images_per_sec: f64,
}

/// The gradient flow of a network after `epoch` epochs (0: as initialised), as the analysis
/// measures it ([`ResNet::probe`]) on a fixed batch.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowStats {
    pub epoch: usize,
    /// The training-mode loss on the batch.
    pub loss: f64,
    /// `||dE/dx_0|| / ||dE/dx_L||`: how much the gradient grows from the last unit to the first.
    pub grad_ratio: f64,
    /// Per stage, `||x_end - (x_start + sum F)|| / ||x_end||` over its identity-shortcut units
    /// (NaN for a stage without them): 0 where the stream is additive.
    pub identity: Vec<f64>,
}

/// What a run has recorded: a row per epoch trained, and where it measured the gradient flow, a
/// row per measurement. A resumed run continues its checkpoint's ([`Checkpoint::history`]),
/// which keeps the rows as `curves.csv` and `flow.csv` print them (losses and accuracies to 6
/// decimals, the identity errors to 4 digits): its earlier rows are those, not the full f64
/// values the uninterrupted run's `History` holds, while the files are the same.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    pub epochs: Vec<EpochStats>,
    pub flow: Vec<FlowStats>,
}

/// Images for [`flow_at`]: the first 8 (at least 2, for batch norm) of `data`.
pub fn flow_batch(gpu: &Gpu, data: &Dataset, classes: usize) -> Result<(Tensor, Labels)> {
    let n = data.len().min(8);
    if n < 2 {
        return Err(Error::Invalid(format!(
            "{}: the gradient flow needs at least 2 test images (batch norm), not {n}",
            data.name()
        )));
    }
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    data.gather(&(0..n).collect::<Vec<_>>(), &mut images, &mut labels);
    Ok((Tensor::new(gpu, &[n, 3, 32, 32], &images)?, upload_labels(gpu, &labels, classes)?))
}

/// The generator of epoch `epoch`'s shuffle and augmentation, a function of `(seed, epoch)`
/// alone, so a resumed run repeats the epochs it has left exactly. The epoch is hashed before it
/// meets the seed (an earlier `seed ^ epoch * k`, with `k` SplitMix's own increment, started
/// epoch 1 one draw behind epoch 0 wherever the seed shares no bits with `k`, 0 the default
/// among them, and the two epochs' orders were nearly the same).
pub fn epoch_rng(seed: u64, epoch: usize) -> Rng {
    const EPOCHS: u64 = 0x6570_6F63_6873_0000; // "epochs": these streams apart from others of the seed
    Rng::new(seed ^ Rng::new(EPOCHS ^ epoch as u64).next_u64())
}

/// The gradient flow of `net` on `images` after `epoch` epochs. The probe runs on a copy in f32,
/// so that `net`'s batch-norm running statistics (which a training-mode pass updates), its
/// momentum and its f16 path are left as they were.
pub fn flow_at(gpu: &Gpu, net: &ResNet, images: &Tensor, labels: &Labels, epoch: usize) -> Result<FlowStats> {
    let state = net.state(gpu)?.into_iter().collect();
    let mut copy = ResNet::from_state(gpu, &net.config, &state)?;
    let p = copy.probe(gpu, images, labels)?;
    let grad = |l: usize| p.norms.get(l).map_or(f64::NAN, |v| v[2] as f64);
    Ok(FlowStats {
        epoch,
        loss: p.loss as f64,
        grad_ratio: grad(0) / grad(p.norms.len().saturating_sub(1)),
        identity: p.stage_identity.iter().map(|e| e.map_or(f64::NAN, |v| v as f64)).collect(),
    })
}

/// One line for the terminal, under the epochs' lines.
fn say_flow(f: &FlowStats, epochs: usize) {
    // A stage without identity units has no such error.
    let stages: Vec<String> =
        f.identity.iter().map(|e| if e.is_nan() { "-".into() } else { format!("{e:.2e}") }).collect();
    println!(
        "flow  {:>3}/{epochs}  loss {:.4}  ||dE/dx_0|| / ||dE/dx_L|| {:.4}  stream identity error per stage {}",
        f.epoch,
        f.loss,
        f.grad_ratio,
        stages.join(", ")
    );
}

/// `flow.csv` and `flow.svg` (the gradient's growth per epoch) in `dir`.
pub fn write_flow(dir: &Path, flow: &[FlowStats]) -> Result<()> {
    report::write_text(&dir.join("flow.csv"), &flow_csv(flow))?;
    let series = [Series {
        label: "||dE/dx_0|| / ||dE/dx_L||".into(),
        points: flow.iter().map(|f| (f.epoch as f64, f.grad_ratio)).collect(),
    }];
    report::line_chart(
        &dir.join("flow.svg"),
        "Gradient flow during training",
        "epoch",
        "gradient growth",
        &series,
        true,
    )
}

/// The text of `flow.csv`: a row per epoch.
fn flow_csv(flow: &[FlowStats]) -> String {
    let stages = flow.iter().map(|f| f.identity.len()).max().unwrap_or(0);
    let mut header = vec!["epoch".to_string(), "loss".into(), "grad_ratio".into()];
    header.extend((1..=stages).map(|s| format!("identity_error_stage{s}")));
    let rows: Vec<Vec<String>> = flow
        .iter()
        .map(|f| {
            let mut r = vec![f.epoch.to_string(), format!("{:.6}", f.loss), format!("{:.6e}", f.grad_ratio)];
            r.extend(f.identity.iter().map(|e| format!("{e:.3e}")));
            r
        })
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    report::csv_text(&header, &rows)
}

/// The rows of a `flow.csv` text of epochs up to `epochs`.
fn parse_flow(text: &str, epochs: usize) -> Vec<FlowStats> {
    report::csv_numbers(text)
        .into_iter()
        .filter_map(|v| {
            (v.len() >= 3 && v[0] <= epochs as f64).then(|| FlowStats {
                epoch: v[0] as usize,
                loss: v[1],
                grad_ratio: v[2],
                identity: v[3..].to_vec(),
            })
        })
        .collect()
}

/// Reads `flow.csv` in `dir` back, keeping the rows of epochs up to `epochs` (none where there
/// is no such file). A resumed run takes its rows from its checkpoint ([`Checkpoint::history`]);
/// this is for checkpoints written before they kept them.
pub fn read_flow(dir: &Path, epochs: usize) -> Vec<FlowStats> {
    parse_flow(&std::fs::read_to_string(dir.join("flow.csv")).unwrap_or_default(), epochs)
}

/// Loss (mean cross-entropy) and accuracy of `net` in inference mode over `data`, `batch`
/// images at a time. `data` must have the network's number of classes.
pub fn evaluate(gpu: &Gpu, net: &mut ResNet, data: &Dataset, batch: usize) -> Result<(f64, f64)> {
    if data.is_empty() {
        return Err(Error::Invalid(format!("{}: nothing to evaluate", data.name())));
    }
    if batch == 0 {
        return Err(Error::Invalid("evaluate: batch must be positive".into()));
    }
    check_classes(data, net)?;
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    let (mut loss, mut correct) = (0.0f64, 0usize);
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(batch) {
        data.gather(chunk, &mut images, &mut labels);
        let t = Tensor::new(gpu, &[chunk.len(), 3, 32, 32], &images)?;
        let logits = net.predict(gpu, &t)?;
        let (l, c) = score(&logits, &labels, net.config.classes);
        loss += l;
        correct += c;
    }
    Ok((loss / data.len() as f64, correct as f64 / data.len() as f64))
}

/// A dataset whose labels the network's logits can score (a label past them would index out of
/// the row).
fn check_classes(data: &Dataset, net: &ResNet) -> Result<()> {
    if data.classes() != net.config.classes {
        return Err(Error::Invalid(format!(
            "{} has {} classes, the network {}",
            data.name(),
            data.classes(),
            net.config.classes
        )));
    }
    Ok(())
}

/// Summed cross-entropy and the number of correct predictions of row-major logits.
fn score(logits: &[f32], labels: &[u32], classes: usize) -> (f64, usize) {
    let mut loss = 0.0;
    let mut correct = 0;
    for (row, &y) in logits.chunks_exact(classes).zip(labels) {
        let max = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let lse = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
        loss += lse - row[y as usize] as f64;
        let best = row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
        correct += (best == y as usize) as usize;
    }
    (loss, correct)
}

/// `Err` naming `dir` where a file cannot be made in it: an existing folder that cannot be
/// written fails before the first epoch, not after it.
fn check_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(".resnet-wgpu-write-test");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|source| Error::Io { path: dir.display().to_string(), source })
}

/// [`Checkpoint::generated_sizes`] of a run's options `run`.
pub fn generated_sizes(run: &BTreeMap<String, String>) -> (Option<usize>, Option<usize>) {
    let count = |key: &str, what: &str| -> Option<usize> {
        let v = run.get(key)?.strip_prefix(crate::data::SYNTHETIC_NAME)?;
        v.strip_prefix(" (")?.strip_suffix(&format!(" {what} images)"))?.parse().ok()
    };
    (count("data", "training"), count("test_data", "test"))
}

/// The metadata key of the seed in a weights file [`train`] wrote (a checkpoint holds it as a
/// tensor, `meta.seed`).
const WEIGHTS_SEED: &str = "run.seed";

/// What a weights file [`train`] wrote says of its run, from its `metadata`: its options, as
/// a checkpoint's [`Checkpoint::run`], and its seed. Empty and `None` for other files.
pub fn weights_run(metadata: &std::collections::HashMap<String, String>) -> (BTreeMap<String, String>, Option<u64>) {
    let seed = metadata.get(WEIGHTS_SEED).and_then(|s| s.parse().ok());
    let run = metadata
        .iter()
        .filter(|(k, _)| k.as_str() != WEIGHTS_SEED)
        .filter_map(|(k, v)| Some((k.strip_prefix("run.")?.to_string(), v.clone())))
        .collect();
    (run, seed)
}

/// Saves a checkpoint: weights, BN buffers, momentum, the options' seed and the epochs done,
/// and in the file's metadata its network ([`io::network_metadata`]: many variants have the
/// same tensors, so the names alone cannot tell one from another).
pub fn save_checkpoint(gpu: &Gpu, net: &ResNet, epochs_done: usize, seed: u64, path: &Path) -> Result<()> {
    let state = io::state_tensors(net, gpu, true)?;
    write_checkpoint(net, state, epochs_done, seed, Vec::new(), &History::default(), path, None)
}

/// [`save_checkpoint`] of `t`, the network's state as [`io::state_tensors`] read it (with the
/// momentum), with the run's options and history in the metadata too (`run.<name>`,
/// `history.*`); with `weights`, also the state dict alone there ([`io::save_weights`]'s
/// tensors, with the run's options and seed in its metadata: [`weights_run`]).
#[allow(clippy::too_many_arguments)]
fn write_checkpoint(
    net: &ResNet,
    mut t: Vec<(String, HostTensor)>,
    epochs_done: usize,
    seed: u64,
    run: Vec<(&str, String)>,
    history: &History,
    path: &Path,
    weights: Option<&Path>,
) -> Result<()> {
    // The run's options and seed go in the weights file's metadata too: eval scores the run's
    // own data from it ([`weights_run`]).
    let mut weights_metadata = io::network_metadata(&net.config);
    weights_metadata.extend(run.iter().map(|(k, v)| (format!("run.{k}"), v.clone())));
    weights_metadata.insert(WEIGHTS_SEED.into(), seed.to_string());
    // The state dict comes first, the momentum after it.
    let state_len = net.config.tensors().len();
    t.push((EPOCHS_DONE.into(), HostTensor::i64(&[], vec![epochs_done as i64])));
    t.push(("meta.seed".into(), HostTensor::i64(&[], vec![seed as i64])));
    let mut metadata = io::network_metadata(&net.config);
    metadata.extend(run.into_iter().map(|(k, v)| (format!("run.{k}"), v)));
    // The run's rows so far: resumed, it continues its own, not whatever its folder holds.
    if !history.epochs.is_empty() {
        metadata.insert(HISTORY_CURVES.into(), curves_csv(&history.epochs));
    }
    if !history.flow.is_empty() {
        metadata.insert(HISTORY_FLOW.into(), flow_csv(&history.flow));
    }
    // The checkpoint first: a write that fails after it leaves the weights an epoch behind,
    // never ahead of what the checkpoint and curves say.
    io::write_with_metadata(path, &t, metadata)?;
    match weights {
        Some(w) => io::write_with_metadata(w, &t[..state_len], weights_metadata),
        None => Ok(()),
    }
}

/// The options besides the seed that a resumed run must repeat to continue as the
/// uninterrupted one would (`epochs` too: the learning rate's steps fall at its half and three
/// quarters), and the test split its curves score, as a checkpoint written by [`train`] records
/// them (eval scores the same images with the test split's size).
fn run_options(opts: &TrainOptions, train: &Dataset, test: &Dataset) -> Vec<(&'static str, String)> {
    vec![
        ("data", format!("{} ({} training images)", train.name(), train.len())),
        ("test_data", format!("{} ({} test images)", test.name(), test.len())),
        ("epochs", opts.epochs.to_string()),
        ("batch", opts.batch.to_string()),
        ("lr", opts.lr.to_string()),
        ("warmup", opts.warmup.to_string()),
        ("momentum", opts.momentum.to_string()),
        ("weight_decay", opts.weight_decay.to_string()),
        ("augment", opts.augment.to_string()),
        ("f16", opts.f16.map_or("off".into(), |s| format!("loss scale {s}"))),
    ]
}

/// The tensor that makes a file a checkpoint: the epochs done.
pub const EPOCHS_DONE: &str = "meta.epochs_done";

/// Checkpoint metadata: the run's `curves.csv` and `flow.csv` up to the epochs done.
const HISTORY_CURVES: &str = "history.curves";
const HISTORY_FLOW: &str = "history.flow";

/// A checkpoint written by [`save_checkpoint`], read once: what a resumed run must match (its
/// seed and unit variant), checked before anything else is done, and the tensors its network is
/// made from.
pub struct Checkpoint {
    path: PathBuf,
    file: std::collections::HashMap<String, HostTensor>,
    /// Epochs done when it was written.
    pub epochs_done: usize,
    /// The options' seed it was trained with (`None` in a file without one): the data order and
    /// augmentation follow it, so a run resumes exactly only with the same seed.
    pub seed: Option<u64>,
    /// Its unit variant (`None` in a file written before checkpoints named theirs).
    pub variant: Option<String>,
    /// Its network, as [`crate::arch::NetConfig::name`] says it (`None` in a file written
    /// before checkpoints named theirs).
    pub network: Option<String>,
    /// The options of the run that wrote it, by name (empty in a file written outside
    /// [`train`] or before checkpoints kept them): [`Checkpoint::changed`] compares them.
    pub run: BTreeMap<String, String>,
    /// What the run that wrote it recorded up to its epochs done, for a resumed run to continue
    /// (`None` in a file written outside [`train`] or before checkpoints kept it: then
    /// [`read_curves`] and [`read_flow`] read the run's folder).
    pub history: Option<History>,
}

impl Checkpoint {
    /// Reads `path`; a file without `meta.epochs_done` (a weights file) is a format error.
    pub fn read(path: &Path) -> Result<Checkpoint> {
        let (file, mut metadata) = io::read_with_metadata(path)?;
        let first = |name: &str| file.get(name).and_then(|t| t.to_i64()).and_then(|v| v.first().copied());
        let bad = |msg: &str| Error::Format { path: path.display().to_string(), msg: msg.into() };
        let done = match (file.contains_key(EPOCHS_DONE), first(EPOCHS_DONE)) {
            (_, Some(done)) => done,
            (true, None) => return Err(bad("meta.epochs_done is not a count of epochs")),
            (false, None) => return Err(bad("not a checkpoint: no meta.epochs_done")),
        };
        let seed = first("meta.seed").map(|s| s as u64);
        let done = usize::try_from(done)
            .map_err(|_| Error::Format { path: path.display().to_string(), msg: format!("{done} epochs done") })?;
        let curves = metadata.remove(HISTORY_CURVES);
        let flow = metadata.remove(HISTORY_FLOW);
        let history = (curves.is_some() || flow.is_some()).then(|| History {
            epochs: parse_curves(curves.as_deref().unwrap_or_default(), done),
            flow: parse_flow(flow.as_deref().unwrap_or_default(), done),
        });
        Ok(Checkpoint {
            path: path.to_path_buf(),
            epochs_done: done,
            seed,
            variant: metadata.remove("variant"),
            network: metadata.remove("network"),
            run: metadata.into_iter().filter_map(|(k, v)| Some((k.strip_prefix("run.")?.to_string(), v))).collect(),
            history,
            file,
        })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Ok` unless the checkpoint names another network than `config` ([`io::check_network`]).
    pub fn check_network(&self, config: &crate::arch::NetConfig) -> Result<()> {
        io::check_network(config, self.variant.as_deref(), self.network.as_deref(), &self.path, "a checkpoint")
    }

    /// The options of `opts` (and the training and test data) that differ from the run that wrote the
    /// checkpoint, each as `name: the run's value, now this one`. Resumed with them, training
    /// goes on, but the epochs done were trained under the others, so an uninterrupted run
    /// with `opts` could end elsewhere. Empty where nothing differs or the checkpoint recorded
    /// no options.
    pub fn changed(&self, opts: &TrainOptions, train: &Dataset, test: &Dataset) -> Vec<String> {
        run_options(opts, train, test)
            .into_iter()
            .filter_map(|(k, v)| {
                let was = self.run.get(k)?;
                (*was != v).then(|| format!("{k}: {was}, now {v}"))
            })
            .collect()
    }

    /// How many training and test images the run generated, where it trained on the embedded
    /// data ([`crate::data::synthetic`]) and its checkpoint says (`None` for each it does not):
    /// with its seed, they draw the same images again.
    pub fn generated_sizes(&self) -> (Option<usize>, Option<usize>) {
        generated_sizes(&self.run)
    }

    /// The network of `config` with the checkpoint's weights, BN buffers and momentum; another
    /// network's checkpoint is refused ([`Checkpoint::check_network`]).
    pub fn into_net(self, gpu: &Gpu, config: &crate::arch::NetConfig) -> Result<ResNet> {
        self.check_network(config)?;
        io::net_from(gpu, config, &self.file, &self.path)
    }
}

/// Loads a checkpoint written by [`save_checkpoint`]: the network and the epochs done
/// ([`Checkpoint::read`], then [`Checkpoint::into_net`]).
pub fn load_checkpoint(gpu: &Gpu, config: &crate::arch::NetConfig, path: &Path) -> Result<(ResNet, usize)> {
    let c = Checkpoint::read(path)?;
    let done = c.epochs_done;
    Ok((c.into_net(gpu, config)?, done))
}

/// Trains `net` for the epochs from `start_epoch` to `opts.epochs`, evaluating after each,
/// writing `curves.csv`, `curves.svg`, `checkpoint.safetensors` and `weights.safetensors` (the
/// state dict alone, as [`io::save_weights`] writes it (with the run's options and seed in its
/// metadata), for PyTorch's strict `load_state_dict`; with `flow`: `flow.csv`,
/// `flow.svg`) into `opts.out` after every epoch, and returns the run's history. `history` holds
/// what the epochs already done recorded: empty for a new run, a resumed run's checkpoint's
/// ([`Checkpoint::history`]); its rows past `start_epoch` are dropped.
/// Bad options (a learning rate, momentum or weight decay that is negative or not finite, a
/// batch larger than the data, an evaluation batch of 0, no test images, too few for the
/// flow's batch) are refused before anything is written.
pub fn train(
    gpu: &Gpu,
    net: &mut ResNet,
    train: &Dataset,
    test: &Dataset,
    opts: &TrainOptions,
    start_epoch: usize,
    mut history: History,
) -> Result<History> {
    // Before anything is written: a bad learning rate would otherwise fail at the first step.
    crate::ops::sgd::check_hyperparameters(opts.lr, opts.momentum, opts.weight_decay)?;
    if opts.batch == 0 || opts.batch > train.len() {
        return Err(Error::Invalid(format!("batch {} for {} training images", opts.batch, train.len())));
    }
    check_classes(train, net)?;
    check_classes(test, net)?;
    if opts.f16.is_some() && opts.check_finite {
        return Err(Error::Invalid("checking every step runs the f32 network: not with f16".into()));
    }
    if opts.eval_batch == 0 {
        return Err(Error::Invalid("an evaluation batch of 0 images".into()));
    }
    if test.is_empty() {
        return Err(Error::Invalid(format!("{}: no test images to evaluate each epoch on", test.name())));
    }
    let probe_batch = match opts.flow {
        true => Some(flow_batch(gpu, test, net.config.classes)?),
        false => None,
    };
    net.set_f16(gpu, opts.f16)?;
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::Io { path: opts.out.display().to_string(), source: e })?;
    check_writable(&opts.out)?;
    let steps = train.len() / opts.batch; // the last partial batch is dropped
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    // One batch's tensors, written each step: a step then binds the same buffers as the last,
    // and the network's passes reuse their bind groups.
    let t = Tensor::zeros(gpu, &[opts.batch, 3, 32, 32])?;
    let l = upload_labels(gpu, &vec![0; opts.batch], net.config.classes)?;
    history.epochs.retain(|s| s.epoch <= start_epoch);
    history.flow.retain(|f| f.epoch <= start_epoch);
    // The gradient flow: the rows of the epochs done kept, the network as it stands measured
    // (as initialised on a fresh run), then each epoch's.
    if let Some((images, labels)) = &probe_batch {
        if !history.flow.iter().any(|f| f.epoch == start_epoch) {
            history.flow.push(flow_at(gpu, net, images, labels, start_epoch)?);
        }
        history.flow.iter().for_each(|f| say_flow(f, opts.epochs));
    }
    // (The epochs left first: a checkpoint's count of epochs done is the file's.)
    if start_epoch < opts.epochs && opts.warmup > start_epoch * steps {
        let last = opts.warmup.min(opts.epochs * steps);
        println!(
            "warm-up: steps {}..={last} at lr {} (of {} steps)",
            start_epoch * steps + 1,
            opts.lr / 10.0,
            opts.epochs * steps
        );
    }
    for epoch in start_epoch..opts.epochs {
        let mut rng = epoch_rng(opts.seed, epoch);
        let order = train.epoch_order(&mut rng);
        let mut lr = lr_at(opts.lr, epoch, opts.epochs);
        let bar = progress_bar(opts.progress, steps as u64, epoch, opts.epochs);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        let start = Instant::now();
        for (i, chunk) in order.chunks_exact(opts.batch).enumerate() {
            lr = lr_at_step(opts.lr, epoch * steps + i, steps, opts.epochs, opts.warmup);
            let sgd = Sgd { lr, momentum: opts.momentum, weight_decay: opts.weight_decay };
            if opts.augment {
                train.gather_augmented(chunk, &mut rng, &mut images, &mut labels);
            } else {
                train.gather(chunk, &mut images, &mut labels);
            }
            t.write(gpu, &images)?;
            l.write(gpu, &labels)?;
            let loss = if opts.check_finite {
                net.train_step_checked(gpu, &t, &l, sgd).map_err(|e| match e {
                    Error::NonFinite(m) => Error::NonFinite(format!("epoch {}: {m}; no checkpoint written", epoch + 1)),
                    e => e,
                })?
            } else {
                net.train_step(gpu, &t, &l, sgd)?
            };
            if !loss.is_finite() {
                return Err(Error::NonFinite(format!(
                    "epoch {}: the training loss became {loss}{}; no checkpoint written",
                    epoch + 1,
                    f16_hint(opts)
                )));
            }
            let (_, c) = score(&net.logits(gpu)?, &labels, net.config.classes);
            loss_sum += loss as f64 * chunk.len() as f64;
            correct += c;
            seen += chunk.len();
            let ips = seen as f64 / start.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "loss {:.3} acc {:.1}% {ips:.0} img/s",
                loss_sum / seen as f64,
                100.0 * correct as f64 / seen as f64
            ));
            bar.inc(1);
        }
        let images_per_sec = seen as f64 / start.elapsed().as_secs_f64().max(1e-9);
        bar.finish_and_clear();
        // The state the checkpoint will hold, read back once, checked first: a NaN weight can
        // leave the loss finite (most GPUs' ReLU, a max, drops a NaN: the stream after it is 0,
        // the logits the bias), and the epoch's last update is checked by no loss.
        let state = io::state_tensors(net, gpu, true)?;
        if let Some((name, _)) = state.iter().find(|(_, t)| t.to_f32().iter().any(|v| !v.is_finite())) {
            return Err(Error::NonFinite(format!(
                "epoch {}: {name} is not finite after its steps{}; no checkpoint written",
                epoch + 1,
                f16_hint(opts)
            )));
        }
        let most = if opts.f16.is_some() { (opts.batch / 3).max(1) } else { opts.batch };
        let (test_loss, test_acc) = evaluate(gpu, net, test, opts.eval_batch.min(most))?;
        let s = EpochStats {
            epoch: epoch + 1,
            lr,
            train_loss: loss_sum / seen.max(1) as f64,
            train_acc: correct as f64 / seen.max(1) as f64,
            test_loss,
            test_acc,
            images_per_sec,
        };
        println!(
            "epoch {:>3}/{}  lr {:<6}  train loss {:.4} acc {:5.1}%  test loss {:.4} acc {:5.1}%  {:.0} img/s",
            s.epoch,
            opts.epochs,
            s.lr,
            s.train_loss,
            100.0 * s.train_acc,
            s.test_loss,
            100.0 * s.test_acc,
            s.images_per_sec
        );
        history.epochs.push(s);
        if let Some((images, labels)) = &probe_batch {
            let f = flow_at(gpu, net, images, labels, epoch + 1)?;
            say_flow(&f, opts.epochs);
            history.flow.push(f);
            write_flow(&opts.out, &history.flow)?;
        }
        let path = opts.out.join("checkpoint.safetensors");
        let run = run_options(opts, train, test);
        // The checkpoint also holds momentum and the run's state, which PyTorch's strict
        // load_state_dict refuses: the weights alone beside it.
        let weights = opts.out.join("weights.safetensors");
        write_checkpoint(net, state, epoch + 1, opts.seed, run, &history, &path, Some(&weights))?;
        write_curves(&opts.out, &history.epochs)?;
    }
    Ok(history)
}

/// On the f16 path, what a value gone non-finite most likely means: the loss scale is static,
/// and a gradient past f16's 65504 once scaled is infinite.
fn f16_hint(opts: &TrainOptions) -> String {
    opts.f16.map_or(String::new(), |s| {
        format!(" (on the f16 path at loss scale {s}, a gradient may have overflowed f16: try a smaller scale)")
    })
}

fn progress_bar(show: bool, steps: u64, epoch: usize, epochs: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps);
    let style = indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(format!("{}/{}", epoch + 1, epochs));
    bar
}

/// `curves.csv` and `curves.svg` (losses and accuracies per epoch) in `dir`.
pub fn write_curves(dir: &Path, h: &[EpochStats]) -> Result<()> {
    report::write_text(&dir.join("curves.csv"), &curves_csv(h))?;
    let line = |label: &str, f: &dyn Fn(&EpochStats) -> f64| Series {
        label: label.into(),
        points: h.iter().map(|s| (s.epoch as f64, f(s))).collect(),
    };
    let series = [
        line("train loss", &|s| s.train_loss),
        line("test loss", &|s| s.test_loss),
        line("train error", &|s| 1.0 - s.train_acc),
        line("test error", &|s| 1.0 - s.test_acc),
    ];
    report::line_chart(&dir.join("curves.svg"), "Training curves", "epoch", "loss / error rate", &series, false)
}

/// The text of `curves.csv`: a row per epoch.
fn curves_csv(h: &[EpochStats]) -> String {
    let rows: Vec<Vec<String>> = h
        .iter()
        .map(|s| {
            vec![
                s.epoch.to_string(),
                s.lr.to_string(),
                format!("{:.6}", s.train_loss),
                format!("{:.6}", s.train_acc),
                format!("{:.6}", s.test_loss),
                format!("{:.6}", s.test_acc),
                format!("{:.1}", s.images_per_sec),
            ]
        })
        .collect();
    let header = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_sec"];
    report::csv_text(&header, &rows)
}

/// The first `epochs` rows of a `curves.csv` text.
fn parse_curves(text: &str, epochs: usize) -> Vec<EpochStats> {
    report::csv_numbers(text)
        .into_iter()
        .filter_map(|v| {
            (v.len() == 7).then(|| EpochStats {
                epoch: v[0] as usize,
                lr: v[1] as f32,
                train_loss: v[2],
                train_acc: v[3],
                test_loss: v[4],
                test_acc: v[5],
                images_per_sec: v[6],
            })
        })
        .take(epochs)
        .collect()
}

/// Reads `curves.csv` in `dir` back, keeping the first `epochs` rows (none where there is no
/// such file). A resumed run takes its rows from its checkpoint ([`Checkpoint::history`]); this
/// is for checkpoints written before they kept them.
pub fn read_curves(dir: &Path, epochs: usize) -> Vec<EpochStats> {
    parse_curves(&std::fs::read_to_string(dir.join("curves.csv")).unwrap_or_default(), epochs)
}

/// One reading of a long run: after `step` steps, the device's live buffers and textures.
#[derive(Clone, Copy, Debug)]
pub struct SoakPoint {
    pub step: usize,
    pub loss: f32,
    pub memory: crate::gpu::MemoryCounts,
    pub seconds: f64,
}

/// A long run for leak checks: `steps` SGD steps of `config` (He-initialised from `seed`) on
/// batches of `batch` random images of `config.in_channels` x `size` x `size`, new data and
/// labels written into the same tensors each step as training does. The device's live buffers
/// and textures are read (after waiting for the device) after steps 1 and 10, then every `every`
/// steps and after the last: once every pipeline and scratch buffer exists, they must stay flat.
pub fn soak(
    gpu: &Gpu,
    config: &crate::arch::NetConfig,
    batch: usize,
    size: usize,
    steps: usize,
    every: usize,
    seed: u64,
) -> Result<Vec<SoakPoint>> {
    let mut net = ResNet::new(gpu, config, seed)?;
    let mut rng = Rng::new(seed);
    let dims = [batch, config.in_channels, size, size];
    let len = dims.iter().product();
    let images = Tensor::zeros(gpu, &dims)?;
    let labels = upload_labels(gpu, &vec![0; batch], config.classes)?;
    let opt = Sgd { lr: 0.01, ..Sgd::default() };
    let start = Instant::now();
    let mut points = Vec::new();
    for step in 1..=steps {
        images.write(gpu, &rng.data(len))?;
        labels.write(gpu, &(0..batch).map(|_| rng.below(config.classes) as u32).collect::<Vec<_>>())?;
        let loss = net.train_step(gpu, &images, &labels, opt)?;
        if step == 1 || step == 10 || step % every.max(1) == 0 || step == steps {
            gpu.wait()?;
            points.push(SoakPoint { step, loss, memory: gpu.memory(), seconds: start.elapsed().as_secs_f64() });
        }
    }
    Ok(points)
}
