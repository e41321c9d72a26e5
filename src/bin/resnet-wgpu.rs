//! The `resnet-wgpu` command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use resnet_wgpu::arch::{NetConfig, ShortcutOption, UnitKind};
use resnet_wgpu::io::{self, HostTensor};
use resnet_wgpu::ops::pool_fc_loss::upload_labels;
use resnet_wgpu::{Error, Gpu, Result, Tensor};

#[derive(Parser)]
#[command(name = "resnet-wgpu", version, about = "Residual networks, forward and backward, as WGSL compute shaders")]
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

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ShortcutArg {
    /// Parameter-free: subsample, zero-pad the channels.
    A,
    /// 1x1 projection.
    B,
}

/// The network's shape, shared by the subcommands.
#[derive(clap::Args, Clone, Debug)]
struct NetArgs {
    /// Depth: 6n+2 with basic units (20, 32, 44, 56, 110, 1202), 9n+2 with --bottleneck (164, 1001).
    #[arg(long, default_value_t = 20)]
    depth: usize,
    /// Unit kind.
    #[arg(long, value_enum, default_value_t = Kind::Preact)]
    kind: Kind,
    /// Bottleneck units (1x1, 3x3, 1x1, expansion 4).
    #[arg(long)]
    bottleneck: bool,
    /// Shortcut of the units that change shape.
    #[arg(long, value_enum, default_value_t = ShortcutArg::B)]
    shortcut: ShortcutArg,
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    classes: usize,
}

impl NetArgs {
    fn config(&self) -> Result<NetConfig> {
        let mut c = NetConfig::cifar(self.depth, self.kind.into(), self.bottleneck, self.classes)?;
        c.shortcut = match self.shortcut {
            ShortcutArg::A => ShortcutOption::A,
            ShortcutArg::B => ShortcutOption::B,
        };
        Ok(c)
    }
}

#[derive(Subcommand)]
enum Command {
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
        None => info(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn info() -> Result<()> {
    let opts = resnet_wgpu::GpuOptions::from_env();
    println!("adapters ({:?}):", opts.backends);
    for a in resnet_wgpu::gpu::list_adapters(opts.backends) {
        println!("  {} ({:?}, {:?}, {} {})", a.name, a.backend, a.device_type, a.driver, a.driver_info);
    }
    let gpu = Gpu::with_options(&opts)?;
    println!("chosen: {}", gpu.report);
    Ok(())
}

fn grad(
    args: &NetArgs,
    weights: Option<&std::path::Path>,
    batch: &std::path::Path,
    out: &std::path::Path,
    seed: u64,
) -> Result<()> {
    let config = args.config()?;
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
    let images_t = Tensor::new(&gpu, &images.dims, &images.to_f32())?;
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
