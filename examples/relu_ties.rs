//! Why a whole network's f32 gradients can sit 1e-3 away from an f64 reference while every
//! kernel is within 1e-5: ReLU inputs within rounding of zero.
//!
//! Runs the PyTorch fixture's ResNet-20 (tests/fixtures/torch-resnet20-original-b) in the f64
//! reference and lists the ReLU inputs within 1e-5 of zero: after the stem's BN and each unit's
//! first BN, and after each unit's addition.
//! Then it prints the worst relative L2 error of our gradients (and of PyTorch's, in float64)
//! against the f64 reference, and how far our streams are from the reference's. Those grow
//! from 1e-7 to 2e-6 relative L2 through the network (single elements 1e-6 to 1e-5 off deep
//! in it), so such an input can land on the other side of zero: that one ReLU then
//! passes (or blocks) a gradient the f64 pass blocks (or passes), and every shallower gradient
//! moves by about 1e-3. Which batches show it changes with the order of any sum (a reduction's
//! run length, vec4 loads, FMA contraction on another adapter).
//!
//! `cargo run --release --example relu_ties [-- SEED [scalar|vec4|wide]]`: with SEED, random
//! images instead of the fixture's; with a variant, batch norm's kernels of that variant.
use resnet_wgpu::arch::{NetConfig, ShortcutOption, UnitKind};
use resnet_wgpu::ops::pool_fc_loss::upload_labels;
use resnet_wgpu::reference::{batch_norm as rbn, conv as rconv, net as rnet, rel_l2, to_f64};
use resnet_wgpu::{Gpu, Result, Tensor, io};
use std::collections::HashMap;
use std::path::Path;

const UNITS: [&str; 9] =
    ["layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2", "layer3.0", "layer3.1", "layer3.2"];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The fixture beside the sources, or under the working directory (a copied binary).
    let fixture = "tests/fixtures/torch-resnet20-original-b";
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(fixture);
    let dir = if built.exists() { built } else { Path::new(fixture).to_path_buf() };
    let cfg = NetConfig { shortcut: ShortcutOption::B, ..NetConfig::cifar(20, UnitKind::Original, false, 10)? };
    let batch = io::read(&dir.join("batch.safetensors"))?;
    let torch = io::read(&dir.join("torch.safetensors"))?;
    let params: HashMap<String, Vec<f64>> =
        io::read(&dir.join("weights.safetensors"))?.iter().map(|(k, v)| (k.clone(), to_f64(&v.to_f32()))).collect();
    let labels: Vec<usize> = batch["labels"].to_i64().unwrap_or_default().iter().map(|&l| l as usize).collect();
    let seed = args.first().and_then(|s| s.parse::<u64>().ok());
    // Random batches are 4x3x32x32 (CIFAR's size); the fixture's are its own (4x3x16x16).
    let d = &batch["images"].dims;
    let (dims, images) = match seed {
        Some(s) => {
            ([4, 3, 32, 32], resnet_wgpu::rng::Rng::new(s).data(4 * 3 * 32 * 32).iter().map(|v| 2.0 * v).collect())
        }
        None => ([d[0], d[1], d[2], d[3]], batch["images"].to_f32()),
    };

    // The f64 reference: ReLU inputs near zero after each unit's bn1 (batch statistics).
    let fwd = rnet::forward(&cfg, &params, &to_f64(&images), dims, true);
    let mut near = Vec::new();
    let stem = rconv::forward(&to_f64(&images), dims, &params["conv1.weight"], [16, 3, 3, 3], 1);
    near_zero(&batch_norm_train(&params, "bn1", &stem, dims[0]), "bn1", &mut near);
    for (l, name) in UNITS.iter().enumerate() {
        let (x, d) = (&fwd.streams[l], fwd.stream_dims[l]);
        let w = &params[&format!("{name}.conv1.weight")];
        let stride = d[2] / fwd.stream_dims[l + 1][2];
        let h = rconv::forward(x, d, w, [w.len() / (d[1] * 9), d[1], 3, 3], stride);
        let bn = format!("{name}.bn1");
        near_zero(&batch_norm_train(&params, &bn, &h, d[0]), &bn, &mut near);
    }
    // ... and the ReLU after each unit's addition, h(x_l) + F(x_l): h = x_l, or for the
    // projection units BN(conv1x1(x_l)) with the batch statistics.
    for (l, name) in UNITS.iter().enumerate() {
        let (x, d) = (&fwd.streams[l], fwd.stream_dims[l]);
        let h = if d == fwd.stream_dims[l + 1] {
            x.clone()
        } else {
            let w = &params[&format!("{name}.shortcut.0.weight")];
            let p = rconv::forward(x, d, w, [w.len() / d[1], d[1], 1, 1], 2);
            batch_norm_train(&params, &format!("{name}.shortcut.1"), &p, d[0])
        };
        let sum: Vec<f64> = h.iter().zip(&fwd.branches[l]).map(|(x, f)| x + f).collect();
        near_zero(&sum, &format!("{name} output"), &mut near);
    }
    println!("images: {}", seed.map_or("the fixture's".to_string(), |s| format!("random, seed {s}")));
    println!("ReLU inputs within 1e-5 of zero (f64): {near:?}");

    // Ours (and PyTorch's, for the fixture's images) against the f64 reference.
    let want = rnet::train_pass(&cfg, &params, &to_f64(&images), dims, &labels);
    let gpu = Gpu::new()?;
    {
        use resnet_wgpu::ops::batch_norm::{Kernels, set_kernels};
        for (name, k) in [("scalar", Kernels::Scalar), ("vec4", Kernels::Vec4), ("wide", Kernels::Wide)] {
            if args.iter().any(|a| a == name) {
                set_kernels(&gpu, k);
            }
        }
    }
    let mut net = io::load_net(&gpu, &cfg, &dir.join("weights.safetensors"))?;
    let l32: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    net.forward_backward(&gpu, &Tensor::new(&gpu, &dims, &images)?, &upload_labels(&gpu, &l32, 10)?, true)?;
    // Our forward's streams against the reference's: how far f32 rounding has grown, unit by unit.
    let ours = net.streams()?;
    let growth: Vec<String> = ours
        .iter()
        .zip(&fwd.streams)
        .map(|(t, w)| Ok(format!("{:.0e}", rel_l2(&t.read(&gpu)?, w))))
        .collect::<Result<_>>()?;
    println!("our streams x_0 .. x_9 against the f64 reference (relative L2): {}", growth.join(" "));
    let mut worst = (0.0, String::new());
    let mut torch_worst = 0.0f64;
    for (n, g) in net.grads(&gpu)? {
        let e = rel_l2(&g, &want.grads[&n]);
        if e > worst.0 {
            worst = (e, n.clone());
        }
        if seed.is_none() {
            torch_worst = torch_worst.max(rel_l2(&torch[&format!("grad.{n}")].to_f32(), &want.grads[&n]));
        }
    }
    println!("ours ({}): worst gradient against the f64 reference {:.2e} ({})", gpu.report.name, worst.0, worst.1);
    if seed.is_none() {
        println!("PyTorch's (the fixture): worst gradient against the f64 reference {torch_worst:.2e}");
    }
    Ok(())
}

/// The elements of `v` (the input of a ReLU, named `what`) within 1e-5 of zero, into `near`.
fn near_zero(v: &[f64], what: &str, near: &mut Vec<String>) {
    for (i, z) in v.iter().enumerate().filter(|(_, z)| z.abs() < 1e-5) {
        near.push(format!("{what} element {i}: {z:.1e}"));
    }
}

/// Batch norm `bn` of the activations `h` of `n` images with the batch statistics (the
/// reference's), as the training forward computes it before its ReLU.
fn batch_norm_train(params: &HashMap<String, Vec<f64>>, bn: &str, h: &[f64], n: usize) -> Vec<f64> {
    let (gamma, beta) = (&params[&format!("{bn}.weight")], &params[&format!("{bn}.bias")]);
    let k = gamma.len();
    let (zeros, ones) = (vec![0.0; k], vec![1.0; k]);
    rbn::forward_train(h, [n, k, 1, h.len() / (n * k)], gamma, beta, &zeros, &ones, None, false).y
}
