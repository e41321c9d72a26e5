//! The `resnet-wgpu` command-line tool.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use resnet_wgpu::analysis::{self, Network};
use resnet_wgpu::arch::{Combine, NetConfig, ShortcutOption, UnitKind, Variant};
use resnet_wgpu::io::{self, HostTensor};
use resnet_wgpu::net::ResNet;
use resnet_wgpu::ops::pool_fc_loss::upload_labels;
use resnet_wgpu::train::{self, TrainOptions};
use resnet_wgpu::{Error, Gpu, Result, Tensor};
use resnet_wgpu::{bench, data};

#[derive(Parser)]
#[command(
    name = "resnet-wgpu",
    version,
    about = "Residual networks, forward and backward, as WGSL compute shaders",
    after_help = "Without a command: the demo, a short training run on the embedded data (into runs/demo-train) \
                  and the analysis of ResNet-110 (into runs/demo-analyze)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Kind {
    /// Full pre-activation units (f = identity).
    Preact,
    /// Original units (f = ReLU after the addition).
    Original,
}

impl From<Kind> for UnitKind {
    fn from(k: Kind) -> UnitKind {
        match k {
            Kind::Preact => UnitKind::PreAct,
            Kind::Original => UnitKind::Original,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum ShortcutArg {
    /// Parameter-free: subsample, zero-pad the channels.
    A,
    /// 1x1 projection.
    B,
    /// 1x1 projection on every unit, also where the shape is kept.
    C,
}

/// The network's shape, shared by the subcommands. With a weights file or checkpoint that names
/// its network (`eval`, `grad --weights`, `train --resume`), an option not given is the file's.
#[derive(clap::Args, Clone, Debug, Default)]
struct NetArgs {
    /// Depth: 6n+2 with basic units (20, 32, 44, 56, 110, 1202), 9n+2 with --bottleneck (164,
    /// 1001) [default: 20, or the file's].
    #[arg(long)]
    depth: Option<usize>,
    /// Unit kind [default: preact, or the file's variant].
    #[arg(long, value_enum)]
    kind: Option<Kind>,
    /// A variant of the paper's Tables 1 and 2 instead of --kind: a placement (original,
    /// bn-after-add, relu-before-add, relu-only-preact, preact), a shortcut combination on the
    /// original unit (scale:H:F, gate:B, shortcut-gate:B, conv, dropout:P), or
    /// PLACEMENT+COMBINATION (e.g. preact+gate:-6).
    #[arg(long, conflicts_with = "kind")]
    unit: Option<Variant>,
    /// Bottleneck units (1x1, 3x3, 1x1, expansion 4).
    #[arg(long)]
    bottleneck: bool,
    /// Shortcut of the units that change shape (`--unit conv` sets c) [default: b, or the
    /// file's].
    #[arg(long, value_enum)]
    shortcut: Option<ShortcutArg>,
    /// Number of classes [default: 10, or the file's].
    #[arg(long)]
    classes: Option<usize>,
}

impl NetArgs {
    /// The network these options give, each option not given taken from `file` (the network a
    /// weights file or checkpoint names) where there is one, else its default. A file's
    /// bottleneck units are taken only with its depth. The conv variant is the 1x1 shortcut on
    /// every unit (shortcut c): a file's is taken with its variant, not with its shortcut alone,
    /// and a variant given as conv with a shortcut given as a or b is refused.
    fn config_over(&self, file: Option<&NetConfig>) -> Result<NetConfig> {
        let depth = self.depth.or(file.map(NetConfig::depth)).unwrap_or(20);
        let file_bottleneck = file.is_some_and(|f| f.bottleneck && f.depth() == depth);
        let bottleneck = self.bottleneck || file_bottleneck;
        let classes = self.classes.or(file.map(|f| f.classes)).unwrap_or(10);
        let mut c = NetConfig::cifar(depth, UnitKind::PreAct, bottleneck, classes)?;
        let given = self.unit.is_some() || self.kind.is_some();
        let mut variant = match (self.unit, self.kind, file) {
            (Some(v), _, _) => v,
            (None, Some(k), _) => Variant::of(&NetConfig { kind: k.into(), ..placeholder() }),
            (None, None, Some(f)) => Variant::of(f),
            (None, None, None) => Variant::of(&placeholder()),
        };
        c.shortcut = match (self.shortcut, file) {
            (Some(ShortcutArg::C), _) => ShortcutOption::C,
            (Some(s), _) if variant.conv_shortcut && given => {
                let s = if s == ShortcutArg::A { "a" } else { "b" };
                return Err(Error::Invalid(format!(
                    "the {variant} variant has a 1x1 convolution on every shortcut (shortcut c): not with --shortcut {s}"
                )));
            }
            (Some(s), _) => {
                // The file's conv variant is its shortcut: the one given replaces it.
                variant.conv_shortcut = false;
                if s == ShortcutArg::A { ShortcutOption::A } else { ShortcutOption::B }
            }
            // A conv file's shortcut c comes with its variant, not under another one given. (A
            // file with a combination on shortcut c keeps it under a combination given: its
            // variant's name does not say c.)
            (None, Some(f))
                if f.shortcut == ShortcutOption::C
                    && given
                    && (f.combine == Combine::Add || variant.combine == Combine::Add) =>
            {
                ShortcutOption::B
            }
            (None, Some(f)) => f.shortcut,
            (None, None) => ShortcutOption::B,
        };
        variant.apply(&mut c);
        c.validate()?;
        Ok(c)
    }
}

/// The network a weights file or checkpoint names in its metadata (its header only), where it
/// names one (files of ours do; PyTorch's do not); a file that cannot be read is an error
/// naming it.
fn named_network(path: &std::path::Path) -> Result<Option<NetConfig>> {
    Ok(io::named_network(&io::read_header(path)?.metadata))
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Split {
    Train,
    Test,
}

/// Where the training data comes from.
#[derive(clap::Args, Clone, Debug)]
struct DataArgs {
    /// A folder with CIFAR-10 or CIFAR-100 (with --classes 100) in the official binary format,
    /// or the parent of their archives' folders (--classes picks the set where both are there).
    /// Without it, the embedded generated dataset (10 classes of shapes, 3x32x32).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Training images generated for the embedded dataset [default: 10000; eval and --resume:
    /// the run's, as its checkpoint or weights file records it].
    #[arg(long, conflicts_with = "data")]
    train_size: Option<usize>,
    /// Test images generated for the embedded dataset [default: 2000; eval and --resume: the
    /// run's, as its checkpoint or weights file records it].
    #[arg(long, conflicts_with = "data")]
    test_size: Option<usize>,
}

impl DataArgs {
    fn load(&self, seed: u64, classes: usize) -> Result<(data::Dataset, data::Dataset)> {
        match &self.data {
            Some(dir) => data::load_cifar_of(dir, classes),
            None => {
                let (train, test) = (self.train_size.unwrap_or(10000), self.test_size.unwrap_or(2000));
                if train == 0 || test == 0 {
                    return Err(Error::Invalid("--train-size and --test-size must be positive".into()));
                }
                data::synthetic(train, test, seed)
            }
        }
    }
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Few repetitions (the default on a CPU adapter).
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Many repetitions (the default on a GPU).
    #[arg(long)]
    full: bool,
    /// Shapes N,C,H,W (repeatable); default: the CIFAR stages at batch 32 with --quick on a CPU
    /// adapter (its default), else the CIFAR stages at batch 128 and ImageNet-like ones at 32.
    #[arg(long = "shapes", value_delimiter = ' ', num_args = 1..)]
    shapes: Vec<String>,
    /// Only the benchmarks whose name contains this (e.g. `unit`, `conv`; text that no
    /// benchmark's name contains is an error that lists the names).
    #[arg(long)]
    only: Option<String>,
    /// Leave out the benchmarks whose name contains this (e.g. `train step`; likewise).
    #[arg(long)]
    skip: Option<String>,
    /// After each benchmark, one more run with every dispatch timed on its own (its own
    /// compute pass between timestamps): where the time goes, kernel by kernel. Needs the
    /// adapter's timestamp queries (without them, no profile is printed).
    #[arg(long)]
    profile: bool,
    /// After each plain convolution row, the same op with each stage of the tiled kernels'
    /// main loop left out in turn (loads, products, staging; the results are wrong, the times
    /// say where the time goes): lines `without <stage>` under the row.
    #[arg(long)]
    leave_out: bool,
    /// The burn peer binary (../shared/peers/burn-unit built with cargo build --release:
    /// its target/release/burn-unit).
    #[arg(long)]
    burn: Option<PathBuf>,
    /// The PyTorch peer script (../shared/peers/torch_unit.py; needs CUDA).
    #[arg(long)]
    torch: Option<PathBuf>,
    /// Where the JSON goes.
    #[arg(long, default_value = "runs/bench.json")]
    json: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Times the kernels and whole units on the GPU (timestamp queries where the adapter has
    /// them), with burn and PyTorch beside them when their paths are given.
    Bench(BenchArgs),
    /// Trains a ResNet with the paper's recipe (SGD 0.9, weight decay 1e-4, lr 0.1 divided by
    /// 10 at 50% and 75%, crop and flip); CSV, SVG and checkpoints go to --out.
    Train {
        #[command(flatten)]
        net: NetArgs,
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, default_value_t = 10)]
        epochs: usize,
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Initial learning rate.
        #[arg(long, default_value_t = 0.1)]
        lr: f32,
        /// Train the first STEPS steps at a tenth of --lr (He et al.'s ResNet-110 on CIFAR:
        /// 400 steps at 0.01); 0 for none.
        #[arg(long, value_name = "STEPS", default_value_t = 0)]
        warmup: usize,
        #[arg(long, default_value_t = 1e-4)]
        weight_decay: f32,
        /// Turn off crop-and-flip augmentation.
        #[arg(long)]
        no_augment: bool,
        /// Measure the gradient flow (as `analyze` does) before the first epoch and after each,
        /// on the first 8 test images: flow.csv and flow.svg in --out.
        #[arg(long)]
        flow: bool,
        /// Check every step for NaN/infinity and stop naming the first unit and tensor.
        #[arg(long, conflicts_with = "f16")]
        check_finite: bool,
        /// Train every unit on the f16 path (half activations; f32 weights, rounded to halves
        /// as the convolutions read them; f32 accumulation), with this loss scale (a power of
        /// two; 1024 when given without a value; a smaller one where gradients overflow).
        #[arg(long, value_name = "LOSS_SCALE", num_args = 0..=1, default_missing_value = "1024")]
        f16: Option<f32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Continue from a checkpoint written by an earlier run.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Output folder.
        #[arg(long, default_value = "runs/train")]
        out: PathBuf,
    },
    /// Loss and accuracy of given weights or a checkpoint on the test (or training) split, in
    /// inference mode (batch norm's running averages).
    Eval {
        #[command(flatten)]
        net: NetArgs,
        #[command(flatten)]
        data: DataArgs,
        /// Weights or a checkpoint (safetensors, PyTorch names), as `train` writes them or
        /// PyTorch saves a state dict.
        #[arg(long)]
        weights: PathBuf,
        /// The split to score.
        #[arg(long, value_enum, default_value_t = Split::Test)]
        split: Split,
        /// Images per forward pass.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// The embedded dataset's seed; by default the run's own, as its checkpoint or weights
        /// file records it (the images its run was tested on), else 0.
        #[arg(long, conflicts_with = "data")]
        seed: Option<u64>,
    },
    /// The identity-mapping analysis on the GPU: per-unit norms of x_l, F(x_l) and dE/dx_l at
    /// initialisation (or on trained weights), for each depth and unit variant; a table, CSV and SVG.
    Analyze {
        /// Depths: basic units for 6n+2 (20 to 110, 1202), bottleneck units for 9n+2 that are not
        /// 6n+2 (1001); with --bottleneck, bottleneck units for every depth (9n+2: 164, 1001)
        /// [default: 110,1001, or with --weights the file's network].
        #[arg(long, value_delimiter = ',')]
        depths: Vec<usize>,
        /// Bottleneck units for every depth (the paper's ResNet-164 is 9n+2 and 6n+2 both).
        #[arg(long)]
        bottleneck: bool,
        /// Shortcut of the units that change shape (`conv` variants set c) [default: b, or with
        /// --weights the file's].
        #[arg(long, value_enum)]
        shortcut: Option<ShortcutArg>,
        /// Unit kinds to compare [default: preact,original, or with --weights the file's].
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<Kind>,
        /// Unit variants to compare instead of --kinds (names as `train --unit` takes them),
        /// e.g. `preact,original,scale:0.5:1,gate:-6,bn-after-add`.
        #[arg(long, value_delimiter = ',', conflicts_with = "kinds")]
        variants: Vec<Variant>,
        /// Trained weights or a checkpoint to analyse instead of He initialisation: one network,
        /// the file's (which it names, where it is ours; else give its depth and kind or
        /// variant).
        #[arg(long)]
        weights: Option<PathBuf>,
        /// A CIFAR-10 or CIFAR-100 folder (as `train --data` takes): the batch is its first test
        /// images, not generated shapes10 ones.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Images in the batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Number of classes [default: 10, or with --weights the file's].
        #[arg(long)]
        classes: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Rows of the terminal table per network.
        #[arg(long, default_value_t = 12)]
        rows: usize,
        /// Output folder.
        #[arg(long, default_value = "runs/analyze")]
        out: PathBuf,
    },
    /// The adapters found, the one chosen, its limits and enabled features.
    Info,
    /// One training-mode forward and backward on given weights and batch; writes loss, logits
    /// and every gradient under PyTorch's names.
    Grad {
        #[command(flatten)]
        net: NetArgs,
        /// Weights (safetensors, PyTorch names). Without it, He initialisation from --seed.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Batch (safetensors): `images` f32 [N,3,H,W], `labels` i64 [N].
        #[arg(long)]
        batch: PathBuf,
        /// Output (safetensors): `loss`, `logits`, `grad.images`, `grad.<name>`.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Info) => info(),
        Some(Command::Grad { net, weights, batch, out, seed }) => grad(&net, weights.as_deref(), &batch, &out, seed),
        Some(Command::Train {
            net,
            data,
            epochs,
            batch,
            lr,
            warmup,
            weight_decay,
            no_augment,
            flow,
            check_finite,
            f16,
            seed,
            resume,
            out,
        }) => {
            let opts = TrainOptions {
                epochs,
                batch,
                lr,
                warmup,
                weight_decay,
                augment: !no_augment,
                flow,
                check_finite,
                f16,
                seed,
                out,
                ..TrainOptions::default()
            };
            train_cmd(&net, &data, &opts, resume.as_deref())
        }
        Some(Command::Eval { net, data, weights, split, batch, seed }) => {
            eval_cmd(&net, &data, &weights, split, batch, seed)
        }
        Some(Command::Analyze {
            depths,
            kinds,
            variants,
            weights,
            data,
            bottleneck,
            shortcut,
            batch,
            classes,
            seed,
            rows,
            out,
        }) => {
            // With --weights of ours, one network: the file's, each option not given taken from
            // it (as the other commands take theirs).
            let one = depths.len() <= 1 && kinds.len() <= 1 && variants.len() <= 1;
            // A file that cannot be read says so, before any option is held against it.
            let named = weights.as_deref().map(named_network).transpose().map(Option::flatten);
            let networks = named.and_then(|named| match named {
                Some(f) if one => {
                    let args = NetArgs {
                        depth: depths.first().copied(),
                        kind: kinds.first().copied(),
                        unit: variants.first().copied(),
                        bottleneck,
                        shortcut,
                        classes,
                    };
                    args.config_over(Some(&f)).map(|c| vec![Network { label: network_label(&c), config: c }])
                }
                _ => {
                    let depths = if depths.is_empty() { vec![110, 1001] } else { depths };
                    let kinds = if kinds.is_empty() { vec![Kind::Preact, Kind::Original] } else { kinds };
                    let variants = match variants.is_empty() {
                        true => {
                            kinds.iter().map(|&k| Variant::of(&NetConfig { kind: k.into(), ..placeholder() })).collect()
                        }
                        false => variants,
                    };
                    analysis_networks(&depths, &variants, classes.unwrap_or(10), bottleneck, shortcut)
                }
            });
            networks.and_then(|networks| {
                analyze_cmd(&networks, weights.as_deref(), data.as_deref(), batch, seed, rows, &out)
            })
        }
        Some(Command::Bench(args)) => bench_cmd(args),
        None => demo(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn train_cmd(args: &NetArgs, data: &DataArgs, opts: &TrainOptions, resume: Option<&std::path::Path>) -> Result<()> {
    // The arguments first: a bad configuration is named even where no adapter opens. A
    // checkpoint's network fills in the options not given.
    let config = args.config_over(resume.map(named_network).transpose()?.flatten().as_ref())?;
    if opts.batch == 0 {
        return Err(Error::Invalid("--batch must be positive".into()));
    }
    resnet_wgpu::ops::sgd::check_hyperparameters(opts.lr, opts.momentum, opts.weight_decay)?;
    if let Some(s) = opts.f16 {
        resnet_wgpu::net::check_loss_scale(s)
            .map_err(|_| Error::Invalid(format!("--f16 {s}: not a power of two from 2^-126 to 2^126")))?;
    }
    // The checkpoint, read once, before the data and the adapter: a run it cannot continue
    // exactly is refused first.
    let checkpoint = resume.map(train::Checkpoint::read).transpose()?;
    if let Some(c) = &checkpoint {
        c.check_network(&config)?;
        if let Some(s) = c.seed.filter(|&s| s != opts.seed) {
            return Err(Error::Invalid(format!(
                "{} was trained with --seed {s}: resume with it (the data order and augmentation follow the seed)",
                c.path().display()
            )));
        }
    }
    let (train_set, test_set) =
        data_of_run(data, &checkpoint.as_ref().map(|c| c.run.clone()).unwrap_or_default(), "continue it")?
            .load(opts.seed, config.classes)?;
    let gpu = training_gpu(&opts.out)?;
    println!("adapter: {}", gpu.report);
    println!(
        "data: {} ({} train, {} test, {} classes); network: {} ResNet-{} ({} classes)",
        train_set.name(),
        train_set.len(),
        test_set.len(),
        train_set.classes(),
        Variant::of(&config),
        config.depth(),
        config.classes
    );
    let (mut net, start, history) = match checkpoint {
        Some(mut c) => {
            let (done, from) = (c.epochs_done, c.path().display().to_string());
            let changed = c.changed(opts, &train_set, &test_set);
            let kept = c.history.take();
            let net = c.into_net(&gpu, &config)?;
            println!("resuming after epoch {done} from {from}");
            if !changed.is_empty() && done < opts.epochs {
                eprintln!(
                    "note: the checkpoint's run had other options ({}): it goes on from there, but an \
                     uninterrupted run with these could end elsewhere",
                    changed.join("; ")
                );
            }
            // A checkpoint keeps its run's rows; one written before they did leaves them to the
            // run's folder.
            let history = kept.unwrap_or_else(|| train::History {
                epochs: train::read_curves(&opts.out, done),
                flow: train::read_flow(&opts.out, done),
            });
            if history.epochs.len() != done {
                eprintln!(
                    "note: {}/curves.csv holds {} of the {done} epochs done: the curves written will lack the others \
                     (resume with the run's own --out to continue them)",
                    opts.out.display(),
                    history.epochs.len()
                );
            }
            (net, done, history)
        }
        None => (ResNet::new(&gpu, &config, opts.seed)?, 0, train::History::default()),
    };
    if let Some(s) = opts.f16 {
        println!("training on the f16 path, loss scale {s}");
    }
    let before = history.epochs.len();
    let h = train::train(&gpu, &mut net, &train_set, &test_set, opts, start, history)?;
    if h.epochs.len() == before {
        println!("nothing to train: {start} of {} epochs done", opts.epochs);
        return Ok(());
    }
    if let Some(last) = h.epochs.last() {
        println!("final test accuracy {:.1}% (chance {:.1}%)", 100.0 * last.test_acc, 100.0 / config.classes as f64);
    }
    let flow = if opts.flow { ", flow.csv, flow.svg" } else { "" };
    println!(
        "wrote {}/curves.csv, curves.svg{flow}, checkpoint.safetensors and weights.safetensors",
        opts.out.display()
    );
    Ok(())
}

/// `path` as a checkpoint, read before the adapter opens (so that a missing or broken file, or
/// one of another network than `config`, is named first); `None` for a weights file (its header
/// names no epochs done), which [`load_weights`] reads.
fn read_checkpoint(path: &std::path::Path, config: &NetConfig) -> Result<Option<train::Checkpoint>> {
    let header = io::read_header(path)?;
    if !header.tensors.iter().any(|t| t == train::EPOCHS_DONE) {
        let named = |key: &str| header.metadata.get(key).map(String::as_str);
        io::check_network(config, named("variant"), named("network"), path, "weights")?;
        return Ok(None);
    }
    let c = train::Checkpoint::read(path)?;
    c.check_network(config)?;
    Ok(Some(c))
}

/// The data of a run (its options, as a checkpoint or a weights file `train` wrote records
/// them) where `data` leaves it open. A run on CIFAR needs its folder (generated images of the
/// same 10 classes would pass every check, and a resumed run would replace the checkpoint); a
/// run on the generated set draws as many images as it did (with its seed, the same ones).
fn data_of_run(data: &DataArgs, run: &BTreeMap<String, String>, to: &str) -> Result<DataArgs> {
    needs_its_data(run, data.data.is_some(), to)?;
    let (train, test) = train::generated_sizes(run);
    Ok(DataArgs { train_size: data.train_size.or(train), test_size: data.test_size.or(test), ..data.clone() })
}

/// The context a training run takes: on a GPU, the autotuner's choices kept in `out/tune.json`
/// unless `RESNET_WGPU_TUNE_FILE` names a file. The choices decide the order of some sums (a
/// unit's BN statistics, split reductions), so a run resumed into the same folder makes the
/// same ones and continues bit for bit (and does not tune again). A CPU adapter keeps fixed
/// rules (one of them follows the host's core count): no file. `RESNET_WGPU_TUNE_FILE=`
/// (empty) keeps none.
fn training_gpu(out: &std::path::Path) -> Result<Gpu> {
    let opts = resnet_wgpu::GpuOptions::from_env();
    let gpu = Gpu::with_options(&opts)?;
    // RESNET_WGPU_TUNE_FILE set, to a file or empty (none), is the user's choice.
    let named = std::env::var_os("RESNET_WGPU_TUNE_FILE").is_some();
    if named || gpu.report.device_type == wgpu::DeviceType::Cpu {
        return Ok(gpu);
    }
    drop(gpu);
    std::fs::create_dir_all(out).map_err(|source| Error::Io { path: out.display().to_string(), source })?;
    Gpu::with_options(&resnet_wgpu::GpuOptions { tune_file: Some(out.join("tune.json")), ..opts })
}

/// `Err` where the run trained on a dataset read from files (CIFAR) and no `--data` is given.
fn needs_its_data(run: &BTreeMap<String, String>, given: bool, to: &str) -> Result<()> {
    match run.get("data").filter(|d| !given && !d.starts_with(data::SYNTHETIC_NAME)) {
        Some(set) => {
            Err(Error::Invalid(format!("the file's run trained on {set}: give --data with its folder to {to}")))
        }
        None => Ok(()),
    }
}

/// The run that wrote `path` as the file records it: its options and seed (a checkpoint's, or
/// a weights file's that `train` wrote; empty for other files).
fn run_of(
    path: &std::path::Path,
    checkpoint: Option<&train::Checkpoint>,
) -> Result<(BTreeMap<String, String>, Option<u64>)> {
    Ok(match checkpoint {
        Some(c) => (c.run.clone(), c.seed),
        None => train::weights_run(&io::read_header(path)?.metadata),
    })
}

/// The network of `config` from `path`: the checkpoint [`read_checkpoint`] read, else the
/// weights file; another unit variant's is refused either way.
fn load_weights(
    gpu: &Gpu,
    config: &NetConfig,
    path: &std::path::Path,
    checkpoint: Option<train::Checkpoint>,
) -> Result<ResNet> {
    match checkpoint {
        Some(c) => c.into_net(gpu, config),
        None => io::load_net(gpu, config, path),
    }
}

fn eval_cmd(
    args: &NetArgs,
    data: &DataArgs,
    weights: &std::path::Path,
    split: Split,
    batch: usize,
    seed: Option<u64>,
) -> Result<()> {
    let config = args.config_over(named_network(weights)?.as_ref())?;
    if batch == 0 {
        return Err(Error::Invalid("--batch must be positive".into()));
    }
    // A checkpoint, or the weights file of the same run, knows its run's data and seed, and so
    // which generated images it was tested on.
    let checkpoint = read_checkpoint(weights, &config)?;
    let (run, run_seed) = run_of(weights, checkpoint.as_ref())?;
    let seed = seed.or(run_seed).unwrap_or(0);
    let run_data = data_of_run(data, &run, "score its images")?;
    // Only the split scored is generated (one image of the other), or read from CIFAR's files
    // where that is the test split.
    let sizes = match split {
        Split::Train => DataArgs { test_size: Some(1), ..run_data },
        Split::Test => DataArgs { train_size: Some(1), ..run_data },
    };
    let (set, name) = match (split, &sizes.data) {
        (Split::Test, Some(dir)) => (data::load_cifar_test_of(dir, config.classes)?, "test"),
        (Split::Test, None) => (sizes.load(seed, config.classes)?.1, "test"),
        (Split::Train, _) => (sizes.load(seed, config.classes)?.0, "training"),
    };
    let gpu = Gpu::new()?;
    println!("adapter: {}", gpu.report);
    let mut net = load_weights(&gpu, &config, weights, checkpoint)?;
    println!(
        "data: {} {name} split ({} images, {} classes); network: {} ResNet-{} from {}",
        set.name(),
        set.len(),
        set.classes(),
        Variant::of(&config),
        config.depth(),
        weights.display()
    );
    let (loss, acc) = train::evaluate(&gpu, &mut net, &set, batch)?;
    println!("{name} loss {loss:.4}, accuracy {:.2}% (chance {:.1}%)", 100.0 * acc, 100.0 / config.classes as f64);
    Ok(())
}

/// Any configuration, to take a variant of.
fn placeholder() -> NetConfig {
    NetConfig::cifar(20, UnitKind::PreAct, false, 10).expect("ResNet-20 is a valid configuration")
}

/// The analysis' networks: each depth with each variant (bottleneck units for every depth with
/// `bottleneck`, else for the 9n+2 depths that are not 6n+2).
fn analysis_networks(
    depths: &[usize],
    variants: &[Variant],
    classes: usize,
    bottleneck: bool,
    shortcut: Option<ShortcutArg>,
) -> Result<Vec<Network>> {
    let mut v = Vec::new();
    for &d in depths {
        let bottleneck = bottleneck || ((d >= 2 && (d - 2) % 6 != 0) && (d >= 11 && (d - 2) % 9 == 0));
        for &variant in variants {
            let args = NetArgs {
                depth: Some(d),
                kind: None,
                unit: Some(variant),
                bottleneck,
                shortcut,
                classes: Some(classes),
            };
            let config = args.config_over(None)?;
            let label = network_label(&config);
            // Two networks of one name would be two runs of the same rows in one CSV.
            if v.iter().any(|n: &Network| n.label == label) {
                return Err(Error::Invalid(format!("analyze: {label} is asked for twice")));
            }
            v.push(Network { label, config });
        }
    }
    Ok(v)
}

/// An analysed network's name in the table, the CSV and the plot: its depth and variant, and
/// its shortcut where that is not option B and the variant does not say it (a 1x1 shortcut on
/// every unit names itself `conv` only with the plain sum).
fn network_label(c: &NetConfig) -> String {
    let variant = Variant::of(c);
    let shortcut = match c.shortcut {
        ShortcutOption::A => " shortcut A",
        ShortcutOption::C if c.combine != Combine::Add => " shortcut C",
        _ => "",
    };
    format!("ResNet-{} {variant}{shortcut}", c.depth())
}

fn analyze_cmd(
    networks: &[Network],
    weights: Option<&std::path::Path>,
    data: Option<&std::path::Path>,
    batch: usize,
    seed: u64,
    rows: usize,
    out: &std::path::Path,
) -> Result<()> {
    if batch < 2 {
        return Err(Error::Invalid("--batch must be at least 2 (batch norm needs statistics)".into()));
    }
    let Some(classes) = networks.first().map(|n| n.config.classes) else {
        return Err(Error::Invalid("analyze: no networks (give --depths)".into()));
    };
    let mut trained = match weights {
        Some(w) if networks.len() > 1 => {
            return Err(Error::Invalid(format!(
                "analyze --weights {}: one network, the file's, not {} (give one depth and one kind or variant)",
                w.display(),
                networks.len()
            )));
        }
        Some(w) => {
            let checkpoint = read_checkpoint(w, &networks[0].config)?;
            // The trained network measured on generated images would pass every check.
            needs_its_data(&run_of(w, checkpoint.as_ref())?.0, data.is_some(), "analyze it on its images")?;
            Some((w, checkpoint))
        }
        None => None,
    };
    // CIFAR's test images, read before the adapter opens: there must be a batch of them, of
    // the networks' classes.
    let cifar = match data {
        Some(dir) => {
            let test = data::load_cifar_test_of(dir, classes)?;
            if test.len() < batch || test.classes() != classes {
                return Err(Error::Invalid(format!(
                    "analyze --data {}: {} test images of {} classes, for a batch of {batch} and {classes} classes",
                    dir.display(),
                    test.len(),
                    test.classes()
                )));
            }
            Some(test)
        }
        None => None,
    };
    let gpu = Gpu::new()?;
    println!("adapter: {}", gpu.report);
    // The folder before the passes: a deep analysis is not to be lost to an unwritable --out.
    std::fs::create_dir_all(out).map_err(|e| Error::Io { path: out.display().to_string(), source: e })?;
    // The tensor first: a batch past the adapter's largest buffer is refused before its
    // images are drawn.
    let images = Tensor::zeros(&gpu, &[batch, 3, 32, 32])?;
    let set = match cifar {
        Some(test) => test,
        None => data::synthetic(batch, 1, seed)?.0,
    };
    let (mut host, mut labels) = (Vec::new(), Vec::new());
    set.gather(&(0..batch).collect::<Vec<_>>(), &mut host, &mut labels);
    if data.is_some() {
        println!("batch: the first {batch} test images of {}", set.name());
    }
    images.write(&gpu, &host)?;
    // shapes10's labels folded into the networks' classes (any number of them at
    // initialisation); CIFAR's match them.
    let labels = upload_labels(&gpu, &labels.iter().map(|&l| l % classes as u32).collect::<Vec<_>>(), classes)?;
    let mut measured = Vec::new();
    for v in networks {
        let t = std::time::Instant::now();
        let m = match trained.take() {
            Some((w, checkpoint)) => {
                let mut net = load_weights(&gpu, &v.config, w, checkpoint)?;
                let label = format!("{} from {}", v.label, w.display());
                analysis::measure_net(&gpu, &Network { label, ..v.clone() }, &mut net, &images, &labels)?
            }
            None => analysis::measure(&gpu, std::slice::from_ref(v), &images, &labels, seed)?.remove(0),
        };
        println!("\n{}({:.1} s)", analysis::table(&m, rows), t.elapsed().as_secs_f64());
        measured.push(m);
    }
    analysis::write_csv(&out.join("analysis.csv"), &measured)?;
    analysis::plot(&out.join("analysis.svg"), &measured, weights.is_some())?;
    println!("wrote {0}/analysis.csv and {0}/analysis.svg", out.display());
    Ok(())
}

/// `cargo run --release` with no arguments: a short training run on the embedded data, then
/// the analysis of a deep pre-activation / original pair.
fn demo() -> Result<()> {
    println!("resnet-wgpu demo: a small pre-activation ResNet trained on the embedded shapes10 data,");
    println!("then the gradient-flow analysis of ResNet-110, pre-activation against original.");
    println!("(`resnet-wgpu --help` lists the commands.)\n");
    let net = NetArgs { depth: Some(8), ..NetArgs::default() };
    let data = DataArgs { data: None, train_size: Some(3000), test_size: Some(1000) };
    let opts = TrainOptions { epochs: 3, batch: 64, lr: 0.1, out: "runs/demo-train".into(), ..TrainOptions::default() };
    train_cmd(&net, &data, &opts, None)?;
    println!();
    let variants = [UnitKind::PreAct, UnitKind::Original].map(|kind| Variant::of(&NetConfig { kind, ..placeholder() }));
    let networks = analysis_networks(&[110], &variants, 10, false, None)?;
    analyze_cmd(&networks, None, None, 4, 0, 8, std::path::Path::new("runs/demo-analyze"))
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    let shapes = a.shapes.iter().map(|s| bench::parse_shape(s)).collect::<Result<Vec<_>>>()?;
    bench::check_peer_paths(a.burn.as_deref(), a.torch.as_deref())?;
    let gpu = Gpu::new()?;
    let mode = if a.quick {
        Some(true)
    } else if a.full {
        Some(false)
    } else {
        None
    };
    let mut o = bench::BenchOptions::for_adapter(&gpu, mode);
    if !shapes.is_empty() {
        o.shapes = Some(shapes);
    }
    o.only = a.only;
    o.skip = a.skip;
    o.profile = a.profile;
    o.leave_out = a.leave_out;
    if a.profile && !gpu.has_timestamps() {
        eprintln!("note: {} has no timestamp queries: --profile prints nothing", gpu.report.name);
    }
    o.burn = a.burn;
    o.torch = a.torch;
    // The report's folder before the runs (with peers they take minutes): a bad --json fails
    // at once rather than after them.
    let json = &a.json;
    output_file("--json", json)?;
    let write = |report: &bench::Report| {
        bench::print_table(report);
        resnet_wgpu::report::write_text(json, &bench::to_json(report))?;
        println!("wrote {}", json.display());
        Ok(())
    };
    // With peers, our rows are written before they run (minutes), then again with theirs.
    let report = bench::run_all_with(&gpu, &o, |ours| {
        println!("our rows (the peers next):");
        write(ours)
    })?;
    write(&report)
}

fn info() -> Result<()> {
    let opts = resnet_wgpu::GpuOptions::from_env();
    println!("adapters ({:?}):", opts.backends);
    for a in resnet_wgpu::gpu::list_adapters(opts.backends) {
        println!("  {} ({:?}, {:?}, {} {})", a.name, a.backend, a.device_type, a.driver, a.driver_info);
    }
    let gpu = Gpu::with_options(&opts)?;
    println!("chosen: {}", gpu.report);
    match gpu.tune_file() {
        Some((path, n)) => println!("tune file: {} ({n} choices for this adapter and its settings)", path.display()),
        None => println!("tune file: none (RESNET_WGPU_TUNE_FILE keeps the autotuner's choices)"),
    }
    match resnet_wgpu::gpu::memory_budget() {
        Some(p) => println!(
            "memory budget: a buffer past {p}% of the budget the driver reports (where it reports one) is refused \
             (RESNET_WGPU_MEMORY_BUDGET)"
        ),
        None => println!("memory budget: no check (RESNET_WGPU_MEMORY_BUDGET=off)"),
    }
    match gpu.memory_cap() {
        Some((cap, from)) => println!("memory cap: {} MiB of buffers ({from})", cap >> 20),
        None => println!("memory cap: none (GPUs; or a backend where wgpu counts no memory: Vulkan and DX12 only)"),
    }
    // For RESNET_WGPU_CONV_TILE (tools/gpu_tune.sh reads this line).
    println!("conv tiles: {}", resnet_wgpu::ops::conv::tile_names(&gpu).join(" "));
    // For RESNET_WGPU_CONV_WINOGRAD (3x3 convolutions at stride 1; `off` never takes it).
    let wino: Vec<String> = resnet_wgpu::ops::conv::winograd_names().iter().map(|n| n.replace("wino ", "")).collect();
    println!("conv winograd: {}", wino.join(" "));
    // Whether wgpu's experimental cooperative matrices (tensor cores) exist on this adapter, and
    // in which shapes and types: what a tensor-core path would have to use.
    let coop = gpu.adapter.features().contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
    let configs: Vec<String> = gpu
        .adapter
        .cooperative_matrix_properties()
        .iter()
        .map(|c| format!("{}x{}x{} {:?}->{:?}", c.m_size, c.n_size, c.k_size, c.ab_type, c.cr_type))
        .collect();
    println!(
        "cooperative matrix: {}; configurations: {}",
        if coop { "offered" } else { "not offered" },
        if configs.is_empty() { "none".to_string() } else { configs.join(" ") }
    );
    Ok(())
}

/// Makes ready to write the file `path` that option `flag` names, before the work whose result
/// it will hold: its folder made, and a path that is a folder refused.
fn output_file(flag: &str, path: &std::path::Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.display().to_string(), source: e })?;
    }
    if path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(Error::Invalid(format!("{flag} {}: a folder, not a file", path.display())));
    }
    Ok(())
}

fn grad(
    args: &NetArgs,
    weights: Option<&std::path::Path>,
    batch: &std::path::Path,
    out: &std::path::Path,
    seed: u64,
) -> Result<()> {
    let config = args.config_over(weights.map(named_network).transpose()?.flatten().as_ref())?;
    output_file("--out", out)?;
    let gpu = Gpu::new()?;
    let mut net = match weights {
        Some(w) => io::load_net(&gpu, &config, w)?,
        None => resnet_wgpu::net::ResNet::new(&gpu, &config, seed)?,
    };
    let b = io::read(batch)?;
    let bad = |msg: String| Error::Format { path: batch.display().to_string(), msg };
    let images = b.get("images").ok_or_else(|| bad("no `images` tensor".into()))?;
    let labels = b.get("labels").ok_or_else(|| bad("no `labels` tensor".into()))?;
    let labels = labels.to_i64().ok_or_else(|| bad("`labels` must be integers".into()))?;
    if labels.iter().any(|&l| l < 0) {
        return Err(bad("`labels` must be non-negative".into()));
    }
    // GPUs may drop a NaN (WGSL lets max(NaN, 0) be 0): the loss would come out finite
    // beside NaN gradients, where PyTorch gives NaN throughout. Refuse such a batch instead.
    let pixels = images.to_f32();
    if let Some(i) = pixels.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!("`images` has a non-finite value ({}) at flat index {i}", pixels[i])));
    }
    let images_t = Tensor::new(&gpu, &images.dims, &pixels)?;
    let labels_u: Vec<u32> = labels.iter().map(|&l| l.min(u32::MAX as i64) as u32).collect();
    let labels_t = upload_labels(&gpu, &labels_u, config.classes)?;
    let loss = net.forward_backward(&gpu, &images_t, &labels_t, true)?;
    let n = images.dims[0];
    let mut tensors = vec![
        ("loss".to_string(), HostTensor::f32(&[], vec![loss])),
        ("logits".to_string(), HostTensor::f32(&[n, config.classes], net.logits(&gpu)?)),
        ("grad.images".to_string(), HostTensor::f32(&images.dims, net.grad_images(&gpu)?)),
    ];
    let dims: std::collections::HashMap<String, Vec<usize>> =
        config.tensors().into_iter().map(|t| (t.name, t.dims)).collect();
    for (name, g) in net.grads(&gpu)? {
        let d = dims.get(&name).cloned().unwrap_or_else(|| vec![g.len()]);
        tensors.push((format!("grad.{name}"), HostTensor::f32(&d, g)));
    }
    io::write(out, &tensors)?;
    println!("loss {loss:.6}; wrote {} tensors to {}", tensors.len(), out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 164 is 6n+2 and 9n+2 both: basic units by the depth's rule, the paper's bottleneck
    /// ResNet-164 with --bottleneck; 1001 is 9n+2 alone: bottleneck either way.
    #[test]
    fn analysis_depths_take_bottleneck_units_where_asked() {
        let v = [Variant::of(&placeholder())];
        let shape = |d: usize, b: bool| {
            let n = analysis_networks(&[d], &v, 10, b, None).unwrap_or_else(|e| panic!("{e}"));
            (n[0].config.bottleneck, n[0].config.units_per_stage)
        };
        assert_eq!(shape(164, false), (false, 27));
        assert_eq!(shape(164, true), (true, 18));
        assert_eq!(shape(1001, false), (true, 111));
        assert_eq!(shape(110, false), (false, 18));
        // 32 is 6n+2 alone: no bottleneck network of that depth.
        assert!(analysis_networks(&[32], &v, 10, true, None).is_err());
    }
}
