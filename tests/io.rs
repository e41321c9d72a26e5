//! safetensors in and out: round trips, PyTorch names and dtypes, mismatches refused.
mod common;
use common::*;
use resnet_wgpu::Error;
use resnet_wgpu::arch::{Combine, NetConfig, ShortcutOption, UnitKind, Variant};
use resnet_wgpu::io::{self, Data};
use resnet_wgpu::net::{ResNet, Sgd};
use resnet_wgpu::ops::pool_fc_loss::upload_labels;

fn temp(tag: &str) -> TempDir {
    TempDir::new(&format!("io-{tag}"))
}

#[test]
fn weights_round_trip_under_pytorch_names() {
    let g = gpu();
    let cfg = NetConfig::cifar(20, UnitKind::PreAct, false, 10).unwrap();
    let state = random_state(&cfg, 3);
    let mut net = ResNet::from_state(g, &cfg, &state).unwrap();
    let dir = temp("w");
    let path = dir.join("w.safetensors");
    io::save_weights(&net, g, &path).unwrap();
    let file = io::read(&path).unwrap();
    assert_eq!(file.len(), cfg.tensors().len());
    for spec in cfg.tensors() {
        let t = &file[&spec.name];
        assert_eq!(t.dims, spec.dims, "{}", spec.name);
        if spec.name.ends_with("num_batches_tracked") {
            assert_eq!(t.data, Data::I64(vec![7]), "PyTorch keeps the counter as an i64 scalar");
        } else {
            assert_eq!(t.to_f32(), state[&spec.name], "{}", spec.name);
        }
    }
    for name in [
        "conv1.weight",
        "layer1.0.bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer2.0.shortcut.weight",
        "bn.weight",
        "fc.weight",
        "fc.bias",
    ] {
        assert!(file.contains_key(name), "{name}");
    }
    let back = io::load_net(g, &cfg, &path).unwrap();
    assert_eq!(back.state(g).unwrap(), net.state(g).unwrap());

    // A count past f32's exact integers (2^24) comes back as written, and goes out again so.
    net.batches_tracked = (1 << 24) + 1;
    let big = dir.join("big.safetensors");
    io::save_weights(&net, g, &big).unwrap();
    let back = io::load_net(g, &cfg, &big).unwrap();
    assert_eq!(back.batches_tracked, (1 << 24) + 1);
    io::save_weights(&back, g, &big).unwrap();
    assert_eq!(io::read(&big).unwrap()["bn.num_batches_tracked"].data, Data::I64(vec![(1 << 24) + 1]));

    // Without the counters (a converter's file, or one whose integer buffers were dropped):
    // loaded with them at 0, as PyTorch's batch norm fills them in.
    let counted = |t: &str| t.ends_with("num_batches_tracked");
    let uncounted: Vec<(String, io::HostTensor)> = file.into_iter().filter(|(n, _)| !counted(n)).collect();
    let bare = dir.join("bare.safetensors");
    io::write(&bare, &uncounted).unwrap();
    let back = io::load_net(g, &cfg, &bare).unwrap();
    assert_eq!(back.batches_tracked, 0);
    for ((n, a), (_, b)) in back.state(g).unwrap().iter().zip(&net.state(g).unwrap()) {
        if !counted(n) {
            assert_eq!(a, b, "{n}");
        }
    }
}

#[test]
fn checkpoints_keep_the_momentum() {
    let g = gpu();
    let mut rng = Rng::new(4);
    let cfg = NetConfig { widths: [3, 4, 5], ..NetConfig::cifar(20, UnitKind::Original, false, 4).unwrap() };
    let mut net = ResNet::new(g, &cfg, 1).unwrap();
    let labels = upload_labels(g, &[0, 3], 4).unwrap();
    net.train_step(g, &upload(&[2, 3, 6, 6], &rng.data(216)), &labels, Sgd::default()).unwrap();
    let dir = temp("ckpt");
    let path = dir.join("ckpt.safetensors");
    io::write(&path, &io::state_tensors(&net, g, true).unwrap()).unwrap();
    let back = io::load_net(g, &cfg, &path).unwrap();
    assert_eq!(back.batches_tracked, 1);
    for ((n, a), (_, b)) in net.params().into_iter().zip(back.params()) {
        assert_eq!(a.momentum.read(g).unwrap(), b.momentum.read(g).unwrap(), "momentum.{n}");
        assert!(a.momentum.read(g).unwrap().iter().any(|&v| v != 0.0), "momentum.{n} was updated");
    }
}

/// The network a file names is rebuilt from its metadata, for every kind of CIFAR network the
/// tool makes; a file without the names, or naming a network the options cannot make, gives none.
#[test]
fn a_files_network_is_rebuilt_from_its_metadata() {
    let mut configs = Vec::new();
    for (depth, bottleneck) in [(8, false), (20, false), (164, true)] {
        for variant in ["preact", "original", "bn-after-add", "preact+gate:-6", "scale:0.5:1", "conv", "dropout:0.25"] {
            for (shortcut, classes) in [(ShortcutOption::A, 10), (ShortcutOption::B, 100)] {
                let mut c = NetConfig::cifar(depth, UnitKind::PreAct, bottleneck, classes).unwrap();
                c.shortcut = shortcut;
                variant.parse::<Variant>().unwrap().apply(&mut c);
                configs.push(c);
            }
        }
    }
    for c in &configs {
        assert_eq!(io::named_network(&io::network_metadata(c)).as_ref(), Some(c), "{}", c.name());
    }
    assert_eq!(configs.iter().filter(|c| c.shortcut == ShortcutOption::C).count(), 6, "conv sets C");
    let wide = NetConfig { widths: [32, 64, 128], ..configs[0].clone() };
    assert_eq!(io::named_network(&io::network_metadata(&wide)), None, "no options make these widths");
    assert_eq!(io::named_network(&Default::default()), None);
}

#[test]
fn mismatched_files_are_refused_naming_the_first_mismatch() {
    let g = gpu();
    let cfg20 = NetConfig::cifar(20, UnitKind::PreAct, false, 10).unwrap();
    let dir = temp("w20");
    let path = dir.join("w20.safetensors");
    io::save_weights(&ResNet::new(g, &cfg20, 0).unwrap(), g, &path).unwrap();

    // Without a name (PyTorch's files have none), the tensors are compared: the first that
    // differs is named.
    let unnamed = dir.join("unnamed.safetensors");
    io::write(&unnamed, &io::read(&path).unwrap().into_iter().collect::<Vec<_>>()).unwrap();
    let cfg32 = NetConfig::cifar(32, UnitKind::PreAct, false, 10).unwrap();
    let e = io::load_net(g, &cfg32, &unnamed).err().expect("deeper net must not load");
    assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("layer1.3.conv1.weight"), "{e}");

    let cfg100 = NetConfig::cifar(20, UnitKind::PreAct, false, 100).unwrap();
    let e = io::load_net(g, &cfg100, &unnamed).err().expect("100 classes must not load");
    assert!(e.to_string().contains("fc.weight") && e.to_string().contains("[10, 64]"), "{e}");

    // A shallower configuration's tensors are all in the deeper file, with their shapes: the
    // rest must not be dropped silently.
    let cfg8 = NetConfig::cifar(8, UnitKind::PreAct, false, 10).unwrap();
    let e = io::load_net(g, &cfg8, &unnamed).err().expect("ResNet-20 weights must not load into ResNet-8");
    assert!(matches!(e, Error::Format { .. }), "{e}");
    assert!(e.to_string().contains("unexpected tensor layer1.1.bn1.bias (72 in all)"), "{e}");

    let orig = NetConfig::cifar(20, UnitKind::Original, false, 10).unwrap();
    let e = io::load_net(g, &orig, &unnamed).err().expect("original net must not load pre-act weights");
    assert!(e.to_string().contains("bn1.weight"), "{e}");
    // A variant with the same tensors: nothing but a name tells these apart.
    let scaled = NetConfig { combine: Combine::Scale { h: 0.5, f: 0.5 }, ..cfg20.clone() };
    assert!(io::load_net(g, &scaled, &unnamed).is_ok());

    // Our files name their network: another variant, depth, shortcut or number of classes is
    // refused by name, before the tensors are compared.
    let e = io::load_net(g, &orig, &path).err().expect("original net must not load pre-act weights");
    assert!(e.to_string().contains("weights of preact units, not original: load it as preact"), "{e}");
    let e = io::load_net(g, &scaled, &path).err().expect("scaled shortcuts must not load plain ones' weights");
    assert!(e.to_string().contains("not preact+scale:0.5:0.5"), "{e}");
    let shortcut_a = NetConfig { shortcut: ShortcutOption::A, ..cfg20.clone() };
    for (cfg, differs) in
        [(&cfg32, "ResNet-32"), (&cfg8, "ResNet-8"), (&cfg100, "100 classes"), (&shortcut_a, "shortcut A")]
    {
        let e = io::load_net(g, cfg, &path).err().expect("another network must not load");
        let m = e.to_string();
        assert!(matches!(e, Error::Invalid(_)), "{m}");
        assert!(
            m.contains(&format!("weights of a {}, not a {}", cfg20.name(), cfg.name())) && m.contains(differs),
            "{m}"
        );
    }
    assert!(io::load_net(g, &cfg20, &path).is_ok());

    // The header alone says what the whole read says of names and metadata.
    let header = io::read_header(&path).unwrap();
    let (tensors, metadata) = io::read_with_metadata(&path).unwrap();
    assert_eq!(header.metadata, metadata);
    let mut names = header.tensors.clone();
    names.sort();
    let mut want: Vec<String> = tensors.into_keys().collect();
    want.sort();
    assert_eq!(names, want);
    assert!(io::read_header(&unnamed).unwrap().metadata.is_empty());

    let junk_dir = temp("junk");
    let junk = junk_dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    assert!(matches!(io::read(&junk), Err(Error::Format { .. })));
    assert!(matches!(io::read_header(&junk), Err(Error::Format { .. })));
    std::fs::write(&junk, b"\x02\0\0\0\0\0\0\0{").unwrap();
    assert!(matches!(io::read_header(&junk), Err(Error::Format { .. })), "a header cut short");
    assert!(matches!(io::read_header(&junk_dir.join("missing.safetensors")), Err(Error::Io { .. })));
    assert!(matches!(io::read(&junk_dir.join("missing.safetensors")), Err(Error::Io { .. })));
    // A folder opens but does not read: an I/O error, as io::read says, not a format one.
    assert!(matches!(io::read_header(&junk_dir), Err(Error::Io { .. })), "{:?}", io::read_header(&junk_dir));
    assert!(matches!(io::read(&junk_dir), Err(Error::Io { .. })));
}

#[test]
fn other_dtypes_are_converted() {
    // f16 and f64 weights and an i32 counter (as other tools may save them) load as f32 / i64.
    use safetensors::{Dtype, tensor::TensorView};
    let h: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
    let d: Vec<u8> = [0.25f64, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let i: Vec<u8> = 3i32.to_le_bytes().to_vec();
    let b: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
    let l: Vec<u8> = (-7i64).to_le_bytes().to_vec();
    let u = [200u8, 3];
    let views = vec![
        ("h", TensorView::new(Dtype::F16, vec![2], &h).unwrap()),
        ("d", TensorView::new(Dtype::F64, vec![2], &d).unwrap()),
        ("n", TensorView::new(Dtype::I32, vec![], &i).unwrap()),
        ("b", TensorView::new(Dtype::BF16, vec![2], &b).unwrap()),
        ("l", TensorView::new(Dtype::I64, vec![], &l).unwrap()),
        ("u", TensorView::new(Dtype::U8, vec![2], &u).unwrap()),
    ];
    let dir = temp("dtypes");
    let path = dir.join("dtypes.safetensors");
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let f = io::read(&path).unwrap();
    assert_eq!(f["h"].to_f32(), vec![1.5, -2.0]);
    assert_eq!(f["d"].to_f32(), vec![0.25, 3.0]);
    assert_eq!(f["n"].to_i64(), Some(vec![3]));
    assert_eq!(f["b"].to_f32(), vec![1.5, -2.0]);
    assert_eq!(f["l"].to_i64(), Some(vec![-7]));
    assert_eq!(f["u"].to_i64(), Some(vec![200, 3]));
    // A float past i64's range is not an integer (`as` would saturate to i64::MAX).
    assert_eq!(io::HostTensor::f32(&[2], vec![3.0, 1e30]).to_i64(), None);
    // A dtype with no meaning here is refused, naming it.
    let flags = [1u8, 0];
    let views = vec![("flags", TensorView::new(Dtype::BOOL, vec![2], &flags).unwrap())];
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    match io::read(&path) {
        Err(Error::Format { msg, .. }) => assert!(msg.contains("unsupported dtype"), "{msg}"),
        other => panic!("expected the dtype refused, got {:?}", other.map(|f| f.len())),
    }
}

/// A name given twice (safetensors panicked, indexing past its list) or the metadata's own is
/// refused; a file name near the system's limit writes (the temporary's name took it past).
#[test]
fn names_that_cannot_be_written_are_refused_and_long_ones_written() {
    let dir = temp("names");
    let t = io::HostTensor::f32(&[2], vec![1.0, 2.0]);
    for names in [["x", "x"], ["x", "__metadata__"]] {
        let tensors: Vec<(String, io::HostTensor)> = names.iter().map(|n| (n.to_string(), t.clone())).collect();
        match io::write(&dir.join("dup.safetensors"), &tensors) {
            Err(Error::Format { msg, .. }) => assert!(msg.contains("given twice or reserved"), "{msg}"),
            other => panic!("{names:?}: {other:?}"),
        }
    }
    // A shape whose size overflows (the fields are public): a Format error, not a panic.
    let huge = io::HostTensor { dims: vec![1 << 62, 4], data: Data::F32(Vec::new()) };
    match io::write(&dir.join("huge.safetensors"), &[("x".into(), huge)]) {
        Err(Error::Format { msg, .. }) => assert!(msg.contains("more elements than"), "{msg}"),
        other => panic!("an overflowing shape: {other:?}"),
    }
    // 240 bytes in ASCII, and in three-byte characters (fewer than 100 of them).
    for long in ["a".repeat(228), "€".repeat(76)] {
        let long = dir.join(format!("{long}.safetensors"));
        io::write(&long, &[("x".into(), t.clone())]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(io::read(&long).unwrap()["x"], t);
    }
}

/// A file that cannot be written is an error naming that file, not the temporary beside it;
/// a folder is not a file; and no temporary is left behind.
#[test]
fn an_unwritable_file_is_named() {
    let d = temp("unwritable");
    let t = vec![("x".to_string(), io::HostTensor::f32(&[2], vec![1.0, 2.0]))];
    let missing = d.join("no-such-folder").join("w.safetensors");
    match io::write(&missing, &t) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing.display().to_string()),
        other => panic!("expected an Io error naming {}, got {other:?}", missing.display()),
    }
    assert!(matches!(io::write(&d, &t), Err(Error::Format { .. })), "a folder written as a file");
    io::write(&d.join("w.safetensors"), &t).unwrap();
    let names: Vec<String> =
        std::fs::read_dir(&*d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(names, ["w.safetensors"]);
}

/// A write goes through a temporary of its own: a link beside the file under the name the
/// temporary once always had (`.<name>.tmp`) is neither followed nor replaced, and the file
/// written is a plain file. (Each temporary's name is new, pid, time and count, and it is
/// created new: a link at that name cannot be planted here to show it.)
#[cfg(unix)]
#[test]
fn a_write_follows_no_link_beside_it() {
    let d = temp("link");
    let victim = d.join("victim");
    std::fs::write(&victim, "keep").unwrap();
    let link = d.join(".w.safetensors.tmp");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let t = vec![("x".to_string(), io::HostTensor::f32(&[2], vec![1.0, 2.0]))];
    let path = d.join("w.safetensors");
    io::write(&path, &t).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_file());
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(io::read(&path).unwrap()["x"].to_f32(), vec![1.0, 2.0]);
    assert_eq!(std::fs::read_dir(&*d).unwrap().count(), 3, "a temporary left behind");
}
