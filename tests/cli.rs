//! The `resnet-wgpu` tool end to end on tiny settings, and its messages for bad arguments.
mod common;
use common::*;
use resnet_wgpu::arch::{NetConfig, UnitKind};
use resnet_wgpu::io::{self, HostTensor};
use resnet_wgpu::reference::{net as rnet, to_f64};
use std::path::Path;
use std::process::Command;

/// A PyTorch state dict (it names no network).
const TORCH_FILE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/torch-resnet20-original-b/torch.safetensors");

/// The tool as a command, through cargo's test runner where one is set for this target (as
/// CI's Mesa 26 step sets `tools/lavapipe_coop.sh`, whose libraries the tool needs too).
fn command() -> Command {
    let exe = env!("CARGO_BIN_EXE_resnet-wgpu");
    match std::env::var("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER") {
        Ok(runner) if cfg!(all(target_arch = "x86_64", target_os = "linux")) && !runner.is_empty() => {
            let mut cmd = Command::new(runner);
            cmd.arg(exe);
            cmd
        }
        _ => Command::new(exe),
    }
}

/// Runs the tool with `args`, without a tune file whatever the caller's environment names.
fn tool(args: &[&str]) -> (bool, String) {
    let out = command().args(args).env_remove("RESNET_WGPU_TUNE_FILE").output().expect("run resnet-wgpu");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn dir(name: &str) -> TempDir {
    TempDir::new(&format!("cli-{name}"))
}

#[test]
fn info_names_the_adapter() {
    let (ok, text) = tool(&["info"]);
    assert!(ok, "{text}");
    assert!(text.contains("chosen:") && text.contains(&gpu().report.name), "{text}");
    // The names RESNET_WGPU_CONV_WINOGRAD takes.
    assert!(text.contains("conv winograd: 64x64t4x4 "), "{text}");
    assert!(text.contains("tune file: none"), "{text}");
}

/// `info` names the tune file; one that is not a tune file stops the tool with its path.
#[test]
fn info_names_the_tune_file_and_refuses_a_bad_one() {
    let d = dir("tune-file");
    let path = d.join("tune.json");
    let run = || {
        let out = command().arg("info").env("RESNET_WGPU_TUNE_FILE", &path).output().expect("run resnet-wgpu");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = run();
    assert!(ok && text.contains(&format!("tune file: {} (0 choices", path.display())), "{text}");
    std::fs::write(&path, "{").unwrap();
    let (ok, text) = run();
    assert!(!ok && text.contains(&path.display().to_string()) && text.contains("not a tune file"), "{text}");
}

#[test]
fn grad_writes_what_the_reference_computes() {
    let d = dir("grad");
    let cfg = NetConfig::cifar(8, UnitKind::Original, false, 10).unwrap();
    let state = random_state(&cfg, 9);
    let weights = d.join("w.safetensors");
    let tensors: Vec<(String, HostTensor)> = cfg
        .tensors()
        .into_iter()
        .map(|t| {
            let v = state[&t.name].clone();
            let h =
                if t.dims.is_empty() { HostTensor::i64(&[], vec![v[0] as i64]) } else { HostTensor::f32(&t.dims, v) };
            (t.name, h)
        })
        .collect();
    io::write(&weights, &tensors).unwrap();
    let mut rng = Rng::new(10);
    let dims = [2, 3, 9, 7];
    let images = rng.data(dims.iter().product());
    let batch = d.join("b.safetensors");
    io::write(
        &batch,
        &[
            ("images".into(), HostTensor::f32(&dims, images.clone())),
            ("labels".into(), HostTensor::i64(&[2], vec![4, 9])),
        ],
    )
    .unwrap();
    let out = d.join("o.safetensors");
    let p = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (ok, text) = tool(&[
        "grad",
        "--depth",
        "8",
        "--kind",
        "original",
        "--weights",
        &p(&weights),
        "--batch",
        &p(&batch),
        "--out",
        &p(&out),
    ]);
    assert!(ok, "{text}");
    let got = io::read(&out).unwrap();
    let want = rnet::train_pass(&cfg, &to_ref(&state), &to_f64(&images), dims, &[4, 9]);
    check("cli loss", &got["loss"].to_f32(), &[want.loss], F32_TOL);
    check("cli logits", &got["logits"].to_f32(), &want.logits, F32_TOL);
    check("cli grad.images", &got["grad.images"].to_f32(), &want.grad_images, F32_TOL);
    for (name, g) in &want.grads {
        check(&format!("cli grad.{name}"), &got[&format!("grad.{name}")].to_f32(), g, F32_TOL);
    }
}

/// A NaN or infinite pixel is refused: a GPU may drop a NaN in ReLU's max and report a finite
/// loss beside NaN gradients.
#[test]
fn grad_refuses_a_batch_with_a_non_finite_pixel() {
    let d = dir("grad-nan");
    let dims = [2, 3, 5, 7];
    for (at, bad) in [(0, f32::NAN), (200, f32::INFINITY)] {
        let mut images = Rng::new(11).data(dims.iter().product());
        images[at] = bad;
        let batch = d.join("b.safetensors");
        let labels = HostTensor::i64(&[2], vec![1, 2]);
        io::write(&batch, &[("images".into(), HostTensor::f32(&dims, images)), ("labels".into(), labels)]).unwrap();
        let out = d.join("o.safetensors");
        let (ok, text) =
            tool(&["grad", "--depth", "8", "--batch", batch.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        let want = format!("`images` has a non-finite value ({bad}) at flat index {at}");
        assert!(!ok && text.contains(&want), "expected {want:?} in {text}");
        assert!(!out.exists(), "an output was written");
    }
}

#[test]
fn train_and_analyze_run_on_tiny_settings() {
    let d = dir("train");
    let out = d.to_str().unwrap();
    let (ok, text) = tool(&[
        "train",
        "--depth",
        "8",
        "--train-size",
        "64",
        "--test-size",
        "20",
        "--epochs",
        "1",
        "--batch",
        "32",
        "--warmup",
        "5",
        "--flow",
        "--out",
        out,
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("epoch   1/1") && text.contains("test"), "{text}");
    // Two steps, both warmed up.
    assert!(text.contains("warm-up: steps 1..=2 at lr 0.01 (of 2 steps)") && text.contains("lr 0.01 "), "{text}");
    // The gradient flow before and after the epoch (ResNet-8's one unit a stage: only stage 1
    // has an identity unit).
    assert!(text.contains("flow    0/1  loss ") && text.contains("flow    1/1  loss "), "{text}");
    assert!(text.contains("stream identity error per stage 0.00e0, -, -"), "{text}");
    assert!(text.contains("curves.svg, flow.csv, flow.svg, checkpoint.safetensors and weights"), "{text}");
    for f in ["curves.csv", "curves.svg", "flow.csv", "flow.svg", "checkpoint.safetensors", "weights.safetensors"] {
        assert!(d.join(f).exists(), "{f}");
    }
    // weights.safetensors is the state dict alone, every tensor of the network and no other, as
    // PyTorch's strict load_state_dict takes it.
    let mut names = io::read_header(&d.join("weights.safetensors")).unwrap().tensors;
    names.sort();
    let mut want: Vec<String> =
        NetConfig::cifar(8, UnitKind::PreAct, false, 10).unwrap().tensors().into_iter().map(|t| t.name).collect();
    want.sort();
    assert_eq!(names, want);
    // The checkpoint's values of the same tensors.
    let (weights, ckpt) =
        (io::read(&d.join("weights.safetensors")).unwrap(), io::read(&d.join("checkpoint.safetensors")).unwrap());
    assert!(weights.iter().all(|(n, t)| ckpt[n].data == t.data), "weights.safetensors differs from the checkpoint");
    let ckpt = d.join("checkpoint.safetensors");
    let (ok, text) = tool(&[
        "train",
        "--depth",
        "8",
        "--train-size",
        "64",
        "--test-size",
        "20",
        "--epochs",
        "2",
        "--batch",
        "32",
        "--out",
        out,
        "--resume",
        ckpt.to_str().unwrap(),
        // The second epoch on the f16 path, from the f32 run's checkpoint.
        "--f16",
    ]);
    assert!(ok && text.contains("resuming after epoch 1") && text.contains("epoch   2/2"), "{text}");
    assert!(text.contains("f16 path, loss scale 1024"), "{text}");
    // Resumed with other options than the run's (and without its warm-up): said.
    let want = "other options (epochs: 1, now 2; warmup: 5, now 0; f16: off, now loss scale 1024)";
    assert!(text.contains(want), "{text}");
    // Resumed with another seed (the data order would differ): refused, naming the seed; with
    // every epoch done: nothing trained, nothing claimed written.
    let resume = |out: &str, epochs: &str, seed: &str| {
        let ck = ckpt.to_str().unwrap();
        let a = ["train", "--depth", "8", "--train-size", "64", "--test-size", "20", "--batch", "32", "--out", out];
        tool(&[&a[..], &["--epochs", epochs, "--seed", seed, "--resume", ck]].concat())
    };
    let (ok, text) = resume(out, "2", "3");
    assert!(!ok && text.contains("was trained with --seed 0"), "{text}");
    // Resumed as another variant with the same tensors: refused, naming the checkpoint's.
    let (ok, text) =
        tool(&["train", "--depth", "8", "--unit", "preact+scale:0.5:1", "--resume", ckpt.to_str().unwrap()]);
    assert!(!ok && text.contains("checkpoint of preact units") && text.contains("load it as preact"), "{text}");
    let (ok, text) = resume(out, "2", "0");
    assert!(ok && text.contains("nothing to train: 2 of 2 epochs done") && !text.contains("wrote"), "{text}");
    assert!(!text.contains("curves.csv holds"), "{text}");
    // Without --depth: the checkpoint's network (ResNet-8, not the default ResNet-20); without
    // the sizes: the run's generated images (not the default 10000 and 2000).
    let a = ["train", "--batch", "32", "--epochs", "2", "--out", out];
    let (ok, text) = tool(&[&a[..], &["--resume", ckpt.to_str().unwrap(), "--warmup", "100"]].concat());
    assert!(ok && text.contains("network: preact ResNet-8") && text.contains("nothing to train"), "{text}");
    assert!(text.contains("(64 train, 20 test, 10 classes)"), "{text}");
    assert!(!text.contains("warm-up"), "no warm-up announced with nothing to train: {text}");
    // Into another folder, holding another run's curves: the checkpoint's own rows continue.
    let elsewhere = dir("resume-elsewhere");
    std::fs::write(elsewhere.join("curves.csv"), "epoch,lr,a,b,c,d,e\n1,0.5,9,0,9,0,1\n").unwrap();
    let (ok, text) = resume(elsewhere.to_str().unwrap(), "3", "0");
    assert!(ok && text.contains("epoch   3/3") && !text.contains("curves.csv holds"), "{text}");
    let rows = |d: &Path| std::fs::read_to_string(d.join("curves.csv")).unwrap().lines().count() - 1;
    let first = |d: &Path| std::fs::read_to_string(d.join("curves.csv")).unwrap().lines().nth(1).map(str::to_string);
    assert_eq!((rows(&elsewhere), rows(&d)), (3, 2));
    assert_eq!(first(&elsewhere), first(&d));

    let a = dir("analyze");
    let (ok, text) = tool(&["analyze", "--depths", "8", "--batch", "2", "--out", a.to_str().unwrap()]);
    assert!(ok, "{text}");
    // With option A's shortcuts: other networks, so other figures (the same batch and seed).
    let csv = |d: &Path| std::fs::read_to_string(d.join("analysis.csv")).unwrap();
    let short = dir("analyze-a");
    let (ok, labels) =
        tool(&["analyze", "--depths", "8", "--batch", "2", "--shortcut", "a", "--out", short.to_str().unwrap()]);
    assert!(ok && labels.contains("ResNet-8 preact shortcut A"), "{labels}");
    assert_ne!(csv(&short), csv(&a), "--shortcut a made no difference");
    // Option C with a combination: its label says so (the variant's name says `conv` only
    // with the plain sum).
    let c = dir("analyze-c");
    let args = ["analyze", "--depths", "8", "--batch", "2", "--variants", "scale,conv", "--shortcut", "c"];
    let (ok, labels) = tool(&[&args[..], &["--out", c.to_str().unwrap()]].concat());
    assert!(
        ok && labels.contains("ResNet-8 scale:0.5:0.5 shortcut C") && labels.contains("ResNet-8 conv:"),
        "{labels}"
    );
    assert!(
        text.contains("ResNet-8 preact") && text.contains("ResNet-8 original") && text.contains("stage 1"),
        "{text}"
    );
    assert!(a.join("analysis.csv").exists() && a.join("analysis.svg").exists());
}

#[test]
fn variants_train_and_analyze() {
    let d = dir("variant");
    let (ok, text) = tool(&[
        "train",
        "--depth",
        "8",
        "--unit",
        "preact+gate:-6",
        "--train-size",
        "32",
        "--test-size",
        "16",
        "--epochs",
        "1",
        "--batch",
        "16",
        "--seed",
        "9",
        "--out",
        d.to_str().unwrap(),
    ]);
    assert!(ok && text.contains("network: preact+gate:-6 ResNet-8"), "{text}");
    // The checkpoint scores the test split as the run's last evaluation did (its seed, so its
    // images), another seed's images otherwise, and the training split too.
    let test_loss = |text: &str| text.split("test loss ").nth(1).map(|t| t[..6].to_string());
    let ck = d.join("checkpoint.safetensors");
    let eval = |extra: &[&str]| {
        let a = ["eval", "--depth", "8", "--unit", "preact+gate:-6", "--train-size", "32", "--test-size", "16"];
        tool(&[&a[..], &["--batch", "7", "--weights", ck.to_str().unwrap()], extra].concat())
    };
    let (ok, scored) = eval(&[]);
    assert!(ok && scored.contains("shapes10 test split (16 images, 10 classes)"), "{scored}");
    assert_eq!(test_loss(&scored), test_loss(&text), "{scored}\n{text}");
    // Without the network's options or the data's sizes: the checkpoint names its network, and
    // how many images its run generated.
    let (ok, unnamed) = tool(&["eval", "--batch", "7", "--weights", ck.to_str().unwrap()]);
    assert!(ok && unnamed.contains("network: preact+gate:-6 ResNet-8 from"), "{unnamed}");
    assert!(unnamed.contains("test split (16 images"), "{unnamed}");
    assert_eq!(test_loss(&unnamed), test_loss(&text), "{unnamed}");
    // The run's weights file alone, as well: it records the run's data and seed (it scored
    // 10000 images of seed 0).
    let w = d.join("weights.safetensors");
    let (ok, weights) = tool(&["eval", "--batch", "7", "--weights", w.to_str().unwrap()]);
    assert!(ok && weights.contains("test split (16 images"), "{weights}");
    assert_eq!(test_loss(&weights), test_loss(&text), "{weights}");
    let (ok, scored) = tool(&["eval", "--split", "train", "--batch", "7", "--weights", ck.to_str().unwrap()]);
    assert!(ok && scored.contains("training split (32 images"), "{scored}");
    let (ok, other) = eval(&["--seed", "0"]);
    assert!(ok && test_loss(&other).is_some() && test_loss(&other) != test_loss(&text), "{other}");
    let (ok, scored) = eval(&["--split", "train"]);
    assert!(ok && scored.contains("(32 images, 10 classes)") && scored.contains("training loss "), "{scored}");
    // The analysis of the trained weights, against the same network at initialisation on the
    // same images: the file's weights, not fresh ones.
    let trained = dir("variant-analyze-trained");
    let analyze = |extra: &[&str]| {
        let a = ["analyze", "--depths", "8", "--variants", "preact+gate:-6", "--batch", "4", "--seed", "0"];
        tool(&[&a[..], &["--out", trained.to_str().unwrap()], extra].concat())
    };
    let loss = |text: &str| text.split(": loss ").nth(1).map(|t| t[..6].to_string());
    let title = || std::fs::read_to_string(trained.join("analysis.svg")).unwrap();
    let (ok, at_init) = analyze(&[]);
    assert!(ok && loss(&at_init).is_some(), "{at_init}");
    assert!(title().contains("Gradient reaching unit l at initialisation"));
    let (ok, text) = analyze(&["--weights", ck.to_str().unwrap()]);
    assert!(ok && text.contains("ResNet-8 preact+gate:-6 from ") && text.contains("stage 1"), "{text}");
    assert!(loss(&text).is_some() && loss(&text) != loss(&at_init), "{text}\n{at_init}");
    assert!(title().contains("Gradient reaching unit l with trained weights"), "the chart's title");
    // The file's network without its options.
    let (ok, named) =
        tool(&["analyze", "--batch", "4", "--out", trained.to_str().unwrap(), "--weights", ck.to_str().unwrap()]);
    assert!(ok && loss(&named) == loss(&text), "{named}\n{text}");
    let (ok, text) = tool(&["analyze", "--depths", "8", "--variants", "preact", "--weights", ck.to_str().unwrap()]);
    assert!(!ok && text.contains("a checkpoint of preact+gate:-6 units, not preact"), "{text}");
    // On CIFAR-10's first test images (a folder of a few records here) instead of shapes10's.
    let cifar = tiny_cifar("analyze-cifar");
    let (ok, text) = analyze(&["--data", cifar.to_str().unwrap()]);
    assert!(ok && text.contains("batch: the first 4 test images of cifar10"), "{text}");
    assert!(loss(&text).is_some() && loss(&text) != loss(&at_init), "{text}\n{at_init}");
    let (ok, text) = tool(&["analyze", "--depths", "8", "--kinds", "preact", "--data", cifar.to_str().unwrap()]);
    assert!(!ok && text.contains("4 test images of 10 classes, for a batch of 8"), "{text}");
    // The checkpoint holds the gates under their names.
    let ckpt = io::read(&d.join("checkpoint.safetensors")).unwrap();
    assert!(ckpt.contains_key("layer1.0.gate.weight") && ckpt.contains_key("layer3.0.gate.bias"));

    let a = dir("variants-analyze");
    let variants = "scale:0.5:1,relu-only-preact,dropout";
    let (ok, text) =
        tool(&["analyze", "--depths", "8", "--variants", variants, "--batch", "2", "--out", a.to_str().unwrap()]);
    assert!(ok, "{text}");
    for label in ["ResNet-8 scale:0.5:1", "ResNet-8 relu-only-preact", "ResNet-8 dropout:0.5", "0.5^3 = 1.25e-1"] {
        assert!(text.contains(label), "{label} missing from {text}");
    }
    let csv = std::fs::read_to_string(a.join("analysis.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3 * 4, "{csv}");
    // A row per stream index l = 0..=3; x_3 feeds no unit, so it has no branch norm.
    assert!(csv.starts_with("variant,l,x_norm,branch_norm,"), "{csv}");
    let last = csv.lines().nth(4).unwrap_or_default();
    assert!(last.starts_with("ResNet-8 scale:0.5:1,3,") && last.split(',').nth(3) == Some(""), "{csv}");
}

/// A CIFAR-10 folder of a few records: one training image in each of the five batches, four
/// test images.
fn tiny_cifar(name: &str) -> TempDir {
    let cifar = dir(name);
    let record = |r: usize| -> Vec<u8> {
        let pixels = (0..3072).map(|i| ((i * 7 + r * 131) % 251) as u8);
        std::iter::once((r % 10) as u8).chain(pixels).collect()
    };
    for b in 1..=5 {
        std::fs::write(cifar.join(format!("data_batch_{b}.bin")), record(b)).unwrap();
    }
    std::fs::write(cifar.join("test_batch.bin"), (0..4).flat_map(record).collect::<Vec<_>>()).unwrap();
    cifar
}

/// A checkpoint (or the weights file) of a run on CIFAR scores CIFAR's images: without `--data`
/// eval refuses, rather than score generated shapes (whose 10 classes would pass every check).
#[test]
fn eval_of_a_cifar_checkpoint_needs_its_data() {
    let cifar = tiny_cifar("eval-cifar");
    let out = dir("eval-cifar-run");
    let data = cifar.to_str().unwrap();
    let a = ["train", "--depth", "8", "--epochs", "1", "--batch", "4", "--data", data, "--out", out.to_str().unwrap()];
    let (ok, text) = tool(&a);
    assert!(ok, "{text}");
    let ck = out.join("checkpoint.safetensors");
    for file in [ck.clone(), out.join("weights.safetensors")] {
        let (ok, text) = tool(&["eval", "--weights", file.to_str().unwrap()]);
        assert!(!ok && text.contains("trained on cifar10") && text.contains("--data"), "{file:?}: {text}");
        // Nor is it analysed on generated images.
        let (ok, text) = tool(&["analyze", "--batch", "4", "--weights", file.to_str().unwrap()]);
        assert!(!ok && text.contains("trained on cifar10") && text.contains("--data"), "{file:?}: {text}");
    }
    let (ok, text) = tool(&["eval", "--batch", "4", "--weights", ck.to_str().unwrap(), "--data", data]);
    assert!(ok && text.contains("data: cifar10 test split (4 images"), "{text}");
    // Nor is it resumed on generated images, which would replace its checkpoint: refused before
    // anything is written.
    let before = std::fs::read(&ck).unwrap();
    let again = ["train", "--epochs", "2", "--batch", "4", "--out", out.to_str().unwrap(), "--resume"];
    let (ok, text) = tool(&[&again[..], &[ck.to_str().unwrap()]].concat());
    assert!(!ok && text.contains("trained on cifar10") && text.contains("--data"), "{text}");
    assert!(std::fs::read(&ck).unwrap() == before, "the checkpoint was rewritten");
    // The test split is read alone where it is all that is scored: with a training file
    // truncated, eval of the test split and analyze run, eval of the training split names it.
    std::fs::write(cifar.join("data_batch_3.bin"), [1u8; 100]).unwrap();
    let (ok, text) = tool(&["eval", "--batch", "4", "--weights", ck.to_str().unwrap(), "--data", data]);
    assert!(ok && text.contains("data: cifar10 test split (4 images"), "{text}");
    let (ok, text) =
        tool(&["eval", "--batch", "4", "--weights", ck.to_str().unwrap(), "--data", data, "--split", "train"]);
    assert!(!ok && text.contains("data_batch_3.bin"), "{text}");
    let analysis = dir("eval-cifar-analyze");
    let a = ["analyze", "--depths", "8", "--kinds", "preact", "--batch", "4", "--data", data, "--out"];
    let (ok, text) = tool(&[&a[..], &[analysis.to_str().unwrap()]].concat());
    assert!(ok && text.contains("cifar10"), "{text}");
    // The run's weights, analysed on its data.
    let a = ["analyze", "--depths", "8", "--batch", "4", "--data", data, "--weights", ck.to_str().unwrap(), "--out"];
    let (ok, text) = tool(&[&a[..], &[analysis.to_str().unwrap()]].concat());
    assert!(ok && text.contains("from"), "{text}");
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

/// The bench report's row named `name`.
fn row<'a>(j: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    let rows = j["rows"].as_array().unwrap_or_else(|| panic!("no rows in {j}"));
    rows.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no row {name:?} in {j}"))
}

#[test]
fn bench_times_a_tiny_shape_and_writes_json() {
    let d = dir("bench");
    let json = d.join("bench.json");
    let args = ["bench", "--quick", "--shapes", "2,3,5,5", "--profile", "--skip", "original fwd+bwd", "--json"];
    let (ok, text) = tool(&[&args[..], &[json.to_str().unwrap()]].concat());
    assert!(ok, "{text}");
    for row in ["conv3x3 forward", "bn backward", "unit preact fwd+bwd", "unit original fwd"] {
        assert!(text.contains(row), "{row} missing from {text}");
    }
    assert!(!text.contains("unit original fwd+bwd"), "--skip left the row in: {text}");
    let j = read_json(&json);
    assert!(j["adapter"].as_str().is_some_and(|a| a.contains(&gpu().report.name)), "{j}");
    // A CPU adapter keeps a fixed choice: nothing timed (a GPU tunes, its tune file unset).
    let timed = j["tuning"]["timed"].as_u64().unwrap_or_else(|| panic!("no tuning count in {j}"));
    assert!(text.contains(&format!("autotuner: {timed} choices timed")), "{text}");
    if gpu().report.device_type == wgpu::DeviceType::Cpu {
        assert_eq!(timed, 0, "{j}");
    }
    let unit = row(&j, "unit preact fwd+bwd");
    assert_eq!(unit["shape"], serde_json::json!([2, 3, 5, 5]), "{unit}");
    assert!(unit["ms"].as_f64().is_some_and(|ms| ms > 0.0), "{unit}");
    // --profile, where the adapter has timestamps: each row's dispatches, timed one by one.
    if text.contains("GPU timestamps") {
        assert!(text.contains("x (sum of the dispatches)"), "no profile in {text}");
        let spans = unit["profile"].as_array().map_or(0, Vec::len);
        assert!(spans >= 8, "a pre-activation unit's forward+backward profiled as {spans} dispatches: {unit}");
    }
}

/// With peers, our rows are printed and written to the JSON before the peers run, then the
/// whole report again; each peer's result line is echoed as it comes. The burn peer here is a
/// script that prints one unit's times (and that our JSON is there already).
#[cfg(unix)]
#[test]
fn bench_writes_our_rows_before_the_peers_run() {
    use std::os::unix::fs::PermissionsExt;
    let d = dir("bench-peers");
    let json = d.join("bench.json");
    let peer = d.join("burn-unit");
    let script = format!(
        "#!/bin/sh\ntest -s {} && echo '{{\"peer\": \"fake\", \"forward_ms\": 9.5, \"forward_backward_ms\": 30}}'\n",
        json.display()
    );
    std::fs::write(&peer, script).unwrap();
    std::fs::set_permissions(&peer, std::fs::Permissions::from_mode(0o755)).unwrap();
    let args = ["bench", "--quick", "--shapes", "2,3,5,5", "--only", "unit preact", "--burn", peer.to_str().unwrap()];
    let (ok, text) = tool(&[&args[..], &["--json", json.to_str().unwrap()]].concat());
    assert!(ok, "{text}");
    let ours = text.find("our rows (the peers next):").unwrap_or_else(|| panic!("no early table in {text}"));
    assert!(text[ours..].contains("peer: {\"peer\": \"fake\""), "the peer's line not echoed: {text}");
    assert_eq!(text.matches("wrote ").count(), 2, "{text}");
    // The peer found our JSON written (else it printed nothing, and was skipped).
    let j = read_json(&json);
    let peers = j["peers"].as_array().unwrap_or_else(|| panic!("no peers in {j}"));
    assert_eq!(peers.len(), 2, "preact and original, one shape: {j}");
    assert_eq!(peers[0]["forward_ms"], 9.5, "{j}");
}

/// `bench --leave-out`: the plain convolution rows timed again with each stage of the tiled
/// kernels left out, on the tiled kernels (a forced configuration); the rows with a BN prologue
/// or epilogue are not. Where a plain row runs no tiled kernel (on a CPU adapter, the register
/// path), it says so and lists nothing.
#[test]
fn bench_leaves_stages_out_of_the_tiled_convolutions() {
    for tile in [Some("64x64k16t4x4"), None] {
        let d = dir("bench-leave-out");
        let json = d.join("bench.json");
        let mut cmd = command();
        cmd.args(["bench", "--quick", "--shapes", "2,8,8,8", "--only", "conv3x3 forward", "--leave-out", "--json"]);
        cmd.arg(&json);
        if let Some(t) = tile {
            cmd.env("RESNET_WGPU_CONV_TILE", t);
        }
        let out = cmd.output().expect("run resnet-wgpu");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        let j = read_json(&json);
        let stages = |name: &str| -> Vec<String> {
            let r = row(&j, name);
            let left = r["left_out"].as_array().unwrap_or_else(|| panic!("{r}"));
            assert!(left.iter().all(|l| l["ms"].as_f64().is_some_and(|ms| ms > 0.0)), "{r}");
            left.iter().map(|l| l["stage"].as_str().unwrap_or_default().to_string()).collect()
        };
        assert_eq!(stages("conv3x3 forward bn-relu"), Vec::<String>::new());
        let half = gpu().report.features.contains(wgpu::Features::SHADER_F16);
        let plain: &[&str] = if half { &["conv3x3 forward", "conv3x3 forward f16"] } else { &["conv3x3 forward"] };
        if tile.is_some() {
            for name in plain {
                assert_eq!(stages(name), ["loads", "products", "staging"], "{name}");
            }
            assert!(text.contains("without products"), "{text}");
        } else if gpu().report.device_type == wgpu::DeviceType::Cpu {
            assert_eq!(stages("conv3x3 forward"), Vec::<String>::new());
            assert!(text.contains("no stage left out: no tiled kernel"), "{text}");
        }
    }
}

/// The network rows: one ResNet-20 training step timed queued and as `train_step` takes it,
/// at the first stage's shape; GFLOP/s from the network's convolutions (40.8 M multiply-adds an
/// image, forward and backward). Where the context streams (here forced by
/// `RESNET_WGPU_STREAM_CHUNK`), the same step in one submission beside it.
#[test]
fn bench_times_a_network_training_step() {
    for chunk in [None, Some("4")] {
        let d = dir("bench-net");
        let json = d.join("bench.json");
        let args = ["bench", "--quick", "--shapes", "2,16,32,32", "--only", "preact train step", "--json"];
        let mut cmd = command();
        cmd.args(args).arg(&json);
        if let Some(c) = chunk {
            cmd.env("RESNET_WGPU_STREAM_CHUNK", c);
        }
        let out = cmd.output().expect("run resnet-wgpu");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("net ResNet-20 preact train step") && text.contains("networks:"), "{text}");
        let j = read_json(&json);
        let row = row(&j, "net ResNet-20 preact train step");
        let field = |name: &str| -> f64 { row[name].as_f64().unwrap_or_else(|| panic!("{name} in {row}")) };
        assert_eq!(row["shape"], serde_json::json!([2, 3, 32, 32]), "{row}");
        let (ms, step) = (field("ms"), field("step_ms"));
        assert!(ms > 0.0 && step > 0.0, "{row}");
        let want = 6.0 * 2.0 * 40_812_544.0 / (ms * 1e-3) / 1e9;
        assert!((field("gflops") - want).abs() <= 1e-3 * want, "{row}: GFLOP/s against {want}");
        // The one-submission step: timed where the context streams, absent where it does not.
        let streams = chunk.is_some() || gpu().streams();
        assert_eq!(!row["step_one_ms"].is_null(), streams, "{row}");
        assert_eq!(text.contains("one submission ms"), streams, "{text}");
        if streams {
            assert!(field("step_one_ms") > 0.0, "{row}");
        }
    }
}

#[test]
fn bad_arguments_get_clear_messages() {
    for (args, want) in [
        (vec!["train", "--depth", "21"], "depth 21 is not 6n+2"),
        (vec!["train", "--kind", "sideways"], "invalid value 'sideways'"),
        (
            vec!["grad", "--batch", "/nonexistent/b.safetensors", "--out", "/tmp/x.safetensors"],
            "/nonexistent/b.safetensors",
        ),
        (vec!["train", "--data", "/nonexistent-cifar"], "/nonexistent-cifar"),
        (vec!["analyze", "--batch", "1"], "at least 2"),
        // Refused before 1.2 TB of images are drawn on the host.
        (vec!["analyze", "--depths", "8", "--batch", "100000000"], "largest buffer"),
        (vec!["train", "--depth", "8", "--train-size", "10", "--batch", "32"], "batch 32 for 10"),
        (vec!["bench", "--shapes", "2,3,5"], "N,C,H,W"),
        (
            vec!["bench", "--shapes", "2,3,5,5", "--only", "unti"],
            "bench --only \"unti\": no benchmark's name contains it",
        ),
        (vec!["bench", "--shapes", "2,3,5,5", "--skip", "trian step"], "bench --skip \"trian step\": no benchmark"),
        (vec!["train", "--unit", "sideways"], "or placement (original, bn-after-add"),
        (vec!["train", "--unit", "conv+gate:-6"], "one combination at most, PLACEMENT+COMBINATION (conv with"),
        (vec!["train", "--unit", "gate+dropout"], "one placement and one combination at most"),
        (vec!["train", "--unit", "pre-act+gate"], "unknown placement (original"),
        (vec!["train", "--unit", "scale:0.5:0.5+gate:-6"], "one placement and one combination at most"),
        (vec!["train", "--depth", "8", "--train-size", "64", "--batch", "32", "--f16", "1000"], "power of two"),
        (
            vec!["train", "--depth", "8", "--train-size", "64", "--batch", "32", "--f16", "--check-finite"],
            "cannot be used with '--check-finite'",
        ),
        (vec!["train", "--depth", "8", "--batch", "0"], "--batch must be positive"),
        (
            vec!["train", "--depth", "8", "--train-size", "64", "--test-size", "1", "--batch", "32", "--flow"],
            "the gradient flow needs at least 2 test images",
        ),
        (vec!["analyze", "--variants", "scale:2"], "scale takes two numbers"),
        (vec!["train", "--unit", "dropout:1.5"], "the dropout rate must be at least 0 and below 1"),
        // The generated set's sizes and seed mean nothing with CIFAR's images.
        (vec!["train", "--data", "/nonexistent-cifar", "--train-size", "100"], "cannot be used with"),
        (vec!["eval", "--weights", "w.safetensors", "--data", "d", "--seed", "3"], "cannot be used with"),
        // analyze's shortcut meets its variants as train's does.
        (vec!["analyze", "--depths", "8", "--variants", "conv", "--shortcut", "a"], "not with --shortcut a"),
    ] {
        let (ok, text) = tool(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(text.contains(want), "{args:?}: expected {want:?} in {text}");
    }
}

/// An output folder (or bench report) that cannot be written is named before the work, not after it.
#[test]
fn an_unusable_out_folder_fails_before_the_work() {
    let d = dir("out-file");
    let file = d.join("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    let out = file.to_str().unwrap();
    let json = format!("{out}/bench.json");
    for (args, work) in [
        (vec!["analyze", "--depths", "8", "--batch", "2", "--out", out], "stage 1:"),
        (
            vec!["train", "--depth", "8", "--train-size", "64", "--test-size", "20", "--batch", "32", "--out", out],
            "epoch",
        ),
        (vec!["bench", "--quick", "--shapes", "2,3,5,5", "--only", "bn", "--json", &json], "bn forward"),
        (vec!["bench", "--quick", "--shapes", "2,3,5,5", "--only", "bn", "--json", d.to_str().unwrap()], "bn forward"),
        (vec!["grad", "--depth", "8", "--batch", "/nonexistent/b.safetensors", "--out", d.to_str().unwrap()], "loss"),
    ] {
        let (ok, text) = tool(&args);
        // The error names the argument, or the file in its way.
        let path = args.last().unwrap();
        assert!(
            !ok && (text.contains(path) || text.contains(out)),
            "{args:?}: expected an error naming {path} in {text}"
        );
        assert!(!text.contains(work), "{args:?}: the work ran before the error: {text}");
    }
    // A folder train cannot write in (here its probe's name is taken by a folder: refused even
    // to root, who may write anywhere) fails before the first epoch, naming it.
    let blocked = dir("out-blocked");
    std::fs::create_dir_all(blocked.join(".resnet-wgpu-write-test")).unwrap();
    let b = blocked.to_str().unwrap();
    let (ok, text) =
        tool(&["train", "--depth", "8", "--train-size", "64", "--test-size", "20", "--batch", "32", "--out", b]);
    assert!(!ok && text.contains(b) && !text.contains("epoch"), "{text}");
}

/// A bench shape that a row cannot run at is refused before any row runs, not after the
/// rows of the shapes before it: batch norm over one value per channel, a tensor past the
/// adapter's largest buffer (whose host data used to abort the tool, out of memory).
#[test]
fn bench_refuses_a_shape_before_any_row_runs() {
    for (bad, want) in [("1,1,1,1", "N*H*W must be at least 2"), ("4096,512,56,56", "largest buffer")] {
        let (ok, text) = tool(&["bench", "--quick", "--shapes", "2,3,5,5", bad, "--only", "conv3x3 forward"]);
        assert!(!ok && text.contains(&format!("bench shape {bad}")) && text.contains(want), "{bad}: {text}");
        assert!(!text.contains(" ms "), "{bad}: rows ran before the error: {text}");
    }
}

/// A misspelt backend is named as such, not answered with "install a GPU driver".
#[test]
fn a_misspelt_backend_is_named() {
    let out = command().arg("info").env("WGPU_BACKEND", "vulkna").output().expect("run resnet-wgpu");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let want = "WGPU_BACKEND=\"vulkna\" names none";
    assert!(
        !out.status.success() && text.contains(want) && !text.contains("GPU driver"),
        "expected {want:?} in {text}"
    );
    // Beside a name it knows: said, and the known one used (wgpu drops the other silently).
    let out = command().arg("info").env("WGPU_BACKEND", "vulkna, Vulkan").output().expect("run resnet-wgpu");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("WGPU_BACKEND: vulkna ignored"), "{text}");
    assert!(text.contains("chosen:") && text.contains("(Vulkan,"), "{text}");
    // Empty: unset, as the other variables.
    let out = command().arg("info").env("WGPU_BACKEND", "").output().expect("run resnet-wgpu");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A bad configuration is named before any adapter is opened: also where none opens.
#[test]
fn configuration_errors_come_before_the_adapter() {
    // The system's words for a missing file, where they are known.
    let missing = if cfg!(unix) { "/nonexistent/w.safetensors: No such file" } else { "/nonexistent/w.safetensors" };
    for (args, want) in [
        (vec!["train", "--depth", "21"], "depth 21 is not 6n+2"),
        (vec!["train", "--unit", "dropout:1.5"], "impossible shortcut combination"),
        (vec!["analyze", "--depths", "21"], "depth 21 is not 6n+2"),
        (vec!["analyze", "--depths", "32", "--bottleneck"], "depth 32 is not 9n+2"),
        (vec!["train", "--depth", "8", "--f16", "3"], "--f16 3: not a power of two"),
        (vec!["train", "--depth", "8", "--train-size", "0"], "--train-size and --test-size must be positive"),
        (vec!["train", "--depth", "8", "--lr", "nan"], "lr = NaN must be finite and not negative"),
        (vec!["train", "--depth", "8", "--lr=-0.1"], "lr = -0.1 must be finite and not negative"),
        (vec!["train", "--depth", "8", "--weight-decay", "inf"], "weight_decay = inf must be finite"),
        (vec!["bench", "--shapes", "2,3,5"], "N,C,H,W"),
        // Past the host's memory: an error, where the allocation used to abort the tool.
        (vec!["train", "--depth", "8", "--train-size", "100000000000000"], "generated images: more host memory"),
        (vec!["bench", "--burn", "/nonexistent/burn-unit"], "bench --burn /nonexistent/burn-unit: no such file"),
        (vec!["bench", "--torch", "/nonexistent/torch_unit.py"], "bench --torch /nonexistent/torch_unit.py: no such"),
        (vec!["analyze", "--depths", "8,14,8"], "ResNet-8 preact is asked for twice"),
        (vec!["analyze", "--depths", "8", "--kinds", "original,original"], "ResNet-8 original is asked for twice"),
        (vec!["eval", "--depth", "8", "--weights", "/nonexistent/w.safetensors"], "/nonexistent/w.safetensors"),
        (vec!["analyze", "--depths", "8", "--weights", TORCH_FILE], "one network, the file's, not 2"),
        // A file that cannot be read is named as such, whatever the options.
        (vec!["analyze", "--weights", "/nonexistent/w.safetensors"], missing),
        (vec!["eval", "--weights", "/nonexistent/w.safetensors"], missing),
        (vec!["analyze", "--depths", "8", "--kinds", "preact", "--weights", "/nonexistent/w"], "/nonexistent/w"),
        (vec!["analyze", "--depths", "8", "--kinds", "preact", "--data", "/nonexistent/c"], "/nonexistent/c"),
        (vec!["eval", "--depth", "8", "--weights", TORCH_FILE, "--batch", "0"], "--batch must be positive"),
    ] {
        let out = command()
            .args(&args)
            .env("WGPU_ADAPTER_NAME", "no adapter has this name")
            .output()
            .expect("run resnet-wgpu");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && text.contains(want), "{args:?}: expected {want:?} in {text}");
    }
}

/// A variable the crate reads, set to a value it cannot use, is named on stderr rather than
/// taken silently for the default; a switch takes `off` as well as `0`.
#[test]
fn unusable_environment_values_are_named() {
    let d = dir("env-values");
    let bad = [
        ("WGPU_POWER_PREF", "hihg"),
        ("RESNET_WGPU_COOP", "of"),
        ("RESNET_WGPU_STREAM_CHUNK", "4k"),
        ("RESNET_WGPU_MAX_WORKGROUPS", "-1"),
        ("RESNET_WGPU_BN", "wide4"),
        ("RESNET_WGPU_SHADER_CHECKS", "some"),
        ("RESNET_WGPU_PROLOGUE", "fuse"),
        ("RESNET_WGPU_CONV_TAPS", "of"),
        ("RESNET_WGPU_MEMORY_BUDGET", "101"),
    ];
    let out = command()
        .args(["analyze", "--depths", "8", "--batch", "2", "--kinds", "preact", "--out", d.to_str().unwrap()])
        .envs(bad)
        // The tiled kernels, which read the last two.
        .env("RESNET_WGPU_CONV_TILE", "64x64k16t4x4")
        .output()
        .expect("run resnet-wgpu");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for (var, value) in bad {
        assert!(text.contains(&format!("{var}={value:?} ignored (")), "{var}={value}: not named in {text}");
    }

    // `RESNET_WGPU_SUBGROUPS=off` turns subgroups off as `0` does (it used to leave them on).
    let features = |value: &str| {
        let out = command().arg("info").env("RESNET_WGPU_SUBGROUPS", value).output().expect("run resnet-wgpu");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find(|l| l.starts_with("chosen:"))
            .unwrap_or_else(|| panic!("no chosen line in {text}"))
            .to_string()
    };
    if features("on").contains("subgroup") {
        for off in ["0", "off", "false"] {
            assert!(!features(off).contains("subgroup"), "RESNET_WGPU_SUBGROUPS={off} left subgroups on");
        }
    }
}

/// The network options given on the command line meet the file's: those not given are the
/// file's, those given must match it, and a conv file's shortcut goes with its variant.
#[test]
fn network_options_given_meet_the_files() {
    let d = dir("options");
    let file = |name: &str, cfg: &NetConfig| {
        let state = random_state(cfg, 3);
        let tensors: Vec<(String, HostTensor)> = cfg
            .tensors()
            .into_iter()
            .map(|t| {
                let v = state[&t.name].clone();
                let h = match t.dims.is_empty() {
                    true => HostTensor::i64(&[], vec![v[0] as i64]),
                    false => HostTensor::f32(&t.dims, v),
                };
                (t.name, h)
            })
            .collect();
        let path = d.join(name);
        io::write_with_metadata(&path, &tensors, io::network_metadata(cfg)).unwrap();
        path.to_str().unwrap().to_string()
    };
    let mut conv = NetConfig::cifar(8, UnitKind::Original, false, 10).unwrap();
    resnet_wgpu::arch::Variant::of(&NetConfig { shortcut: resnet_wgpu::arch::ShortcutOption::C, ..conv.clone() })
        .apply(&mut conv);
    let conv = file("conv.safetensors", &conv);
    let bottleneck = file("bn.safetensors", &NetConfig::cifar(11, UnitKind::PreAct, true, 10).unwrap());
    let original = file("o14.safetensors", &NetConfig::cifar(14, UnitKind::Original, false, 10).unwrap());
    let eval = |w: &str, extra: &[&str]| {
        tool(&[&["eval", "--test-size", "8", "--batch", "8", "--weights", w], extra].concat())
    };

    // Given options that contradict the file are refused, not replaced by the file's.
    for extra in [&["--unit", "original"][..], &["--shortcut", "a"], &["--kind", "original"]] {
        let (ok, text) = eval(&conv, extra);
        assert!(!ok && text.contains("weights of conv units, not original"), "{extra:?}: {text}");
        assert!(!text.contains("adapter:"), "refused before the adapter opens: {text}");
    }
    let (ok, text) = eval(&conv, &["--unit", "conv", "--shortcut", "c"]);
    assert!(ok && text.contains("network: conv ResNet-8 from"), "{text}");
    // A combination on shortcut c: its variant's name does not say c, and the file's own
    // variant given keeps the file's shortcut (it was replaced by B, and refused).
    let mut gate_c = NetConfig {
        shortcut: resnet_wgpu::arch::ShortcutOption::C,
        ..NetConfig::cifar(8, UnitKind::Original, false, 10).unwrap()
    };
    "gate:-6".parse::<resnet_wgpu::arch::Variant>().unwrap().apply(&mut gate_c);
    let gate_c = file("gate-c.safetensors", &gate_c);
    let (ok, text) = eval(&gate_c, &["--unit", "gate:-6"]);
    assert!(ok && text.contains("network: gate:-6 ResNet-8 from"), "{text}");
    // Another variant given is refused naming it (not as conv, which was never asked for).
    let (ok, text) = eval(&gate_c, &["--kind", "original"]);
    assert!(!ok && text.contains("weights of gate:-6 units, not original"), "{text}");
    let (ok, text) = tool(&["train", "--depth", "8", "--unit", "conv", "--shortcut", "a"]);
    assert!(!ok && text.contains("shortcut c): not with --shortcut a"), "{text}");
    // A bottleneck file's own depth, given, is its depth with bottleneck units.
    let (ok, text) = eval(&bottleneck, &["--depth", "11"]);
    assert!(ok && text.contains("network: preact ResNet-11 from"), "{text}");
    // analyze takes the options not given from the file as the other commands do.
    let out = d.join("analyze");
    for extra in [&["--depths", "14"][..], &["--classes", "10"], &["--kinds", "original"]] {
        let a = ["analyze", "--batch", "2", "--out", out.to_str().unwrap(), "--weights", &original];
        let (ok, text) = tool(&[&a[..], extra].concat());
        assert!(ok && text.contains("ResNet-14 original from"), "{extra:?}: {text}");
    }
}
