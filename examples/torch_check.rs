//! Runs the PyTorch fixture (tests/fixtures/torch-resnet20-original-b) with every pairing of
//! the conv kernels (the adapter's choice, tuned on GPUs, and each family forced) and batch
//! norm's (the adapter's choice: texture loads on CPU adapters, wide on GPUs; and the scalar,
//! vec4 and wide kernels forced), and prints the worst gradient errors against PyTorch: a
//! diagnostic for adapters. It exits non-zero where any pairing's loss, logits or a gradient is
//! past `BOUND` relative L2 (or not finite), as tests/torch_compat.rs bounds the default
//! kernels. The first argument, if any, is another fixture folder of the same network
//! (ResNet-20, original units, option B, 10 classes; `tools/torch_resnet.py make`).
use resnet_wgpu::arch::{NetConfig, ShortcutOption, UnitKind};
use resnet_wgpu::io;
use resnet_wgpu::ops::conv::{self, Kernels};
use resnet_wgpu::ops::pool_fc_loss::upload_labels;
use resnet_wgpu::reference::{rel_l2, to_f64};
use resnet_wgpu::{Gpu, Result, Tensor};
use std::path::Path;

/// The bound of tests/torch_compat.rs (F32_TOL): the fixture has no ReLU input near zero, so
/// any order of sums stays within it.
const BOUND: f64 = 1e-5;

fn main() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch-resnet20-original-b");
    let dir = std::env::args().nth(1).map(std::path::PathBuf::from).unwrap_or(dir);
    let cfg = NetConfig { shortcut: ShortcutOption::B, ..NetConfig::cifar(20, UnitKind::Original, false, 10)? };
    let batch = io::read(&dir.join("batch.safetensors"))?;
    let torch = io::read(&dir.join("torch.safetensors"))?;
    let labels: Vec<u32> = batch["labels"].to_i64().unwrap_or_default().iter().map(|&l| l as u32).collect();
    let families = [("auto", Kernels::Auto), ("tiled", Kernels::Tiled), ("register", Kernels::Register)];
    // Batch norm: as the adapter chooses, then the others forced (not the texture kernels,
    // Auto's on CPU adapters: each combination costs the GPU call a context and its tuning).
    use resnet_wgpu::ops::batch_norm::{self as bn, Kernels as Bn};
    let bn_modes = [Bn::Auto, Bn::Scalar, Bn::Vec4, Bn::Wide];
    let mut failed = Vec::new();
    for ((family, k), b) in families.into_iter().flat_map(|f| bn_modes.map(|m| (f, m))) {
        let gpu = Gpu::new()?;
        conv::set_kernels(&gpu, k);
        bn::set_kernels(&gpu, b);
        let name = format!("conv {family}, batch norm {b:?}");
        let mut net = io::load_net(&gpu, &cfg, &dir.join("weights.safetensors"))?;
        let images = Tensor::new(&gpu, &batch["images"].dims, &batch["images"].to_f32())?;
        let loss = net.forward_backward(&gpu, &images, &upload_labels(&gpu, &labels, 10)?, true)?;
        let want = |k: &str| to_f64(&torch[k].to_f32());
        let mut rows: Vec<(f64, String)> = net
            .grads(&gpu)?
            .into_iter()
            .map(|(n, g)| (rel_l2(&g, &to_f64(&torch[&format!("grad.{n}")].to_f32())), n))
            .collect();
        rows.push((rel_l2(&net.grad_images(&gpu)?, &want("grad.images")), "images".into()));
        rows.push((rel_l2(&[loss], &want("loss")), "loss".into()));
        rows.push((rel_l2(&net.logits(&gpu)?, &want("logits")), "logits".into()));
        // NaN first, then the largest.
        rows.sort_by(|a, b| b.0.is_nan().cmp(&a.0.is_nan()).then(b.0.total_cmp(&a.0)));
        println!("{name} ({}): worst {:?}", gpu.report.name, &rows[..3]);
        if rows[0].0.is_nan() || rows[0].0 > BOUND {
            failed.push(format!("{name}: {} at {:.2e}", rows[0].1, rows[0].0));
        }
    }
    match failed.is_empty() {
        true => Ok(()),
        false => Err(resnet_wgpu::Error::Invalid(format!("past {BOUND:e} against PyTorch: {}", failed.join("; ")))),
    }
}
