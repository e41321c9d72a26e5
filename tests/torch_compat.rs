//! PyTorch compatibility: a state dict saved by PyTorch (tests/fixtures, made by
//! tools/torch_resnet.py) loads here, and the GPU's loss, logits and every gradient match the
//! ones PyTorch computed in float64; the f64 reference matches them to f32 rounding.
mod common;
use common::*;
use resnet_wgpu::arch::{NetConfig, ShortcutOption, UnitKind};
use resnet_wgpu::io;
use resnet_wgpu::ops::pool_fc_loss::upload_labels;
use resnet_wgpu::reference::{net as rnet, to_f64};
use std::path::Path;

#[test]
fn a_pytorch_state_dict_gives_pytorchs_gradients() {
    let g = gpu();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch-resnet20-original-b");
    let cfg = NetConfig { shortcut: ShortcutOption::B, ..NetConfig::cifar(20, UnitKind::Original, false, 10).unwrap() };
    let mut net = io::load_net(g, &cfg, &dir.join("weights.safetensors")).unwrap();
    let batch = io::read(&dir.join("batch.safetensors")).unwrap();
    let torch = io::read(&dir.join("torch.safetensors")).unwrap();
    let images = batch["images"].to_f32();
    let labels: Vec<u32> = batch["labels"].to_i64().unwrap().iter().map(|&l| l as u32).collect();
    let d = &batch["images"].dims;
    let dims = [d[0], d[1], d[2], d[3]];
    let loss = net.forward_backward(g, &upload(&dims, &images), &upload_labels(g, &labels, 10).unwrap(), true).unwrap();
    let want = |k: &str| to_f64(&torch[k].to_f32());
    check("torch loss", &[loss], &want("loss"), F32_TOL);
    check("torch logits", &net.logits(g).unwrap(), &want("logits"), F32_TOL);
    check("torch grad.images", &net.grad_images(g).unwrap(), &want("grad.images"), F32_TOL);
    let grads = net.grads(g).unwrap();
    let grads_len = grads.len();
    assert_eq!(grads_len + 3, torch.len(), "every parameter has PyTorch's gradient");
    for (name, gv) in grads {
        check(&format!("torch grad.{name}"), &gv, &want(&format!("grad.{name}")), F32_TOL);
    }

    // The reference in f64 against PyTorch in f64 (stored as f32): only the final rounding.
    let state = io::state_for(&cfg, &io::read(&dir.join("weights.safetensors")).unwrap(), &dir).unwrap();
    let params = state.iter().map(|(k, v)| (k.clone(), to_f64(v))).collect();
    let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    let pass = rnet::train_pass(&cfg, &params, &to_f64(&images), dims, &labels);
    let f32s = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    check("reference vs torch loss", &f32s(&[pass.loss]), &want("loss"), 1e-7);
    check("reference vs torch logits", &f32s(&pass.logits), &want("logits"), 1e-7);
    check("reference vs torch grad.images", &f32s(&pass.grad_images), &want("grad.images"), 1e-7);
    assert_eq!(pass.grads.len(), grads_len, "the reference has every parameter's gradient");
    for (name, gr) in &pass.grads {
        let w = want(&format!("grad.{name}"));
        let got: Vec<f32> = gr.iter().map(|&v| v as f32).collect();
        check(&format!("reference vs torch grad.{name}"), &got, &w, 1e-7);
    }
}
