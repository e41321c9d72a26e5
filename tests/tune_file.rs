//! The autotuner's tune file (`GpuOptions::tune_file`): choices recorded, taken back by a new
//! context without timing, timed again where the tuner no longer offers them, other contexts'
//! entries kept, and files that cannot be used refused. The convolutions tune here on the CPU
//! adapter too (`Kernels::Tuned`), and every result is checked against the reference.
mod common;
use common::*;
use resnet_wgpu::ops::conv;
use resnet_wgpu::reference::{self as r, to_f64};
use resnet_wgpu::{Error, Gpu, GpuOptions, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

type Choices = BTreeMap<String, BTreeMap<String, String>>;

/// x [2, 16, 9, 7] through 16 3x3 kernels: at stride 1 the tiles and Winograd are timed; at
/// stride 2 through the BN + ReLU prologue, the tiles and the prologue fused against separate.
const XD: [usize; 4] = [2, 16, 9, 7];
const WD: [usize; 4] = [16, 16, 3, 3];
const YD: [usize; 4] = [2, 16, 9, 7];
const YD2: [usize; 4] = [2, 16, 5, 4];

fn open(path: &Path) -> Gpu {
    let g = Gpu::with_options(&GpuOptions { tune_file: Some(path.into()), ..GpuOptions::from_env() })
        .unwrap_or_else(|e| panic!("{e}"));
    conv::set_kernels(&g, conv::Kernels::Tuned);
    g
}

fn read_choices(path: &Path) -> Choices {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

fn write_choices(path: &Path, c: &Choices) {
    std::fs::write(path, serde_json::to_string_pretty(c).unwrap()).unwrap();
}

/// Runs the forward and the forward at stride 2 through the BN + ReLU prologue on `g` with the
/// profile on, checks both against the reference, and returns the dispatches' labels.
fn run_and_check(g: &Gpu, ctx: &str) -> Vec<String> {
    let mut rng = Rng::new(71);
    let len = |d: [usize; 4]| d.iter().product::<usize>();
    let (x, w) = (rng.data(len(XD)), rng.data(len(WD)));
    // Per channel (mean, gamma * invstd, beta, invstd), scale away from 0 and both signs.
    let aff: Vec<f32> = (0..XD[1])
        .flat_map(|_| {
            let (mean, scale, beta) = (rng.range(-0.5, 0.5), rng.range(0.5, 1.5), rng.range(-0.3, 0.3));
            [mean as f32, scale as f32, beta as f32, scale as f32]
        })
        .collect();
    let up = |d: &[usize], v: &[f32]| Tensor::new(g, d, v).unwrap();
    let (tx, tw, taff) = (up(&XD, &x), up(&WD, &w), up(&[XD[1], 4], &aff));
    let (ty, typ) = (Tensor::filled(g, &YD, f32::NAN).unwrap(), Tensor::filled(g, &YD2, f32::NAN).unwrap());
    resnet_wgpu::profile::set(g, true);
    let mut rec = g.recorder("tune file");
    conv::forward(&mut rec, &tx, &tw, &ty, 1, false).unwrap();
    conv::forward_bn_relu(&mut rec, &tx, &taff, &tw, &typ, 2, false).unwrap();
    rec.run().unwrap();
    resnet_wgpu::profile::set(g, false);
    let labels = resnet_wgpu::profile::take(g).unwrap().into_iter().map(|s| s.label.to_string()).collect();
    let plane = XD[2] * XD[3];
    let pre: Vec<f64> = (0..len(XD))
        .map(|i| {
            let a = &aff[(i / plane % XD[1]) * 4..][..4];
            ((x[i] as f64 - a[0] as f64) * a[1] as f64 + a[2] as f64).max(0.0)
        })
        .collect();
    let want = r::conv::forward(&to_f64(&x), XD, &to_f64(&w), WD, 1);
    check(&format!("{ctx} forward"), &ty.read(g).unwrap(), &want, F32_TOL);
    let want = r::conv::forward(&pre, XD, &to_f64(&w), WD, 2);
    check(&format!("{ctx} forward bn-relu"), &typ.read(g).unwrap(), &want, F32_TOL);
    labels
}

/// The one decision of `kind` about the forward at `stride`.
fn decision<'a>(mine: &'a BTreeMap<String, String>, kind: &str, stride: usize) -> (&'a String, &'a String) {
    let found: Vec<_> = mine
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{kind} Forward")) && k.contains(&format!("stride {stride}")))
        .collect();
    assert_eq!(found.len(), 1, "decisions of kind {kind:?} in {mine:#?}");
    found[0]
}

#[test]
fn choices_are_recorded_and_taken_back_without_timing() {
    let dir = TempDir::new("tune-file");
    let path = dir.join("tune.json");
    // Another context's choices, which must survive.
    let other = ("resnet-wgpu 0.0.0; another adapter".to_string(), "tile Forward x [1]".to_string(), "8x8".to_string());
    write_choices(&path, &BTreeMap::from([(other.0.clone(), BTreeMap::from([(other.1.clone(), other.2.clone())]))]));

    // 1. A first context times the candidates and records its choices.
    let g = open(&path);
    assert_eq!(g.tune_file(), Some((path.as_path(), 0)));
    run_and_check(&g, "first context");
    let t = g.tuning();
    assert_eq!((t.timed, t.from_file), (4, 0), "{t:?}");
    assert!(t.seconds > 0.0, "{t:?}");
    drop(g);
    let recorded = read_choices(&path);
    assert_eq!(recorded.len(), 2, "this context and the other: {recorded:#?}");
    assert_eq!(recorded[&other.0], BTreeMap::from([(other.1.clone(), other.2.clone())]), "the other context's");
    let (context, mine) = recorded.iter().find(|(k, _)| **k != other.0).unwrap();
    eprintln!("this context's key: {context}");
    let tiles = conv::tile_names(&open(&dir.join("scratch.json")));
    let (tile_key, tile) = decision(mine, "tile", 1);
    assert!(tiles.contains(tile), "{tile} among {tiles:?}");
    let (wino_key, _) = decision(mine, "winograd", 1);
    let (_, pre_tile) = decision(mine, "tile", 2);
    let (_, prologue) = decision(mine, "prologue", 2);
    assert!(tiles.contains(pre_tile) && ["fused", "separate"].contains(&prologue.as_str()), "{mine:#?}");
    assert_eq!(mine.len(), 4, "{mine:#?}");

    // 2. Another tile and no Winograd written in: a new context takes them as they are (the
    // profile shows that tile ran), and times nothing (the file is left as it was).
    let other_tile = tiles.iter().find(|t| *t != tile).unwrap().clone();
    let mut edited = recorded.clone();
    let m = edited.get_mut(context).unwrap();
    m.insert(tile_key.clone(), other_tile.clone());
    // Winograd's decision names the tiled plan it was timed against.
    let against = format!("{} against {other_tile}", wino_key.split(" against ").next().unwrap());
    m.insert(against, "tiled".to_string());
    write_choices(&path, &edited);
    let before = std::fs::read_to_string(&path).unwrap();
    let g = open(&path);
    assert_eq!(g.tune_file(), Some((path.as_path(), 5)), "4 recorded, 1 written in");
    let labels = run_and_check(&g, "choices read back");
    let t = g.tuning();
    assert_eq!((t.timed, t.seconds, t.from_file), (0, 0.0, 4), "{t:?}");
    let want = format!("conv Forward {other_tile}");
    assert!(labels.contains(&want), "{want:?} among {labels:?}");
    assert!(!labels.iter().any(|l| l.starts_with("wino")), "no Winograd dispatch: {labels:?}");
    // Timing would run every candidate.
    let convs = labels.iter().filter(|l| l.starts_with("conv ")).count();
    assert_eq!(convs, 2, "one dispatch per convolution, no tuning: {labels:?}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before, "nothing timed, nothing written");

    // 3. A name the tuner does not offer is timed again and replaced.
    let mut stale = edited.clone();
    stale.get_mut(context).unwrap().insert(tile_key.clone(), "no-such-tile".to_string());
    write_choices(&path, &stale);
    run_and_check(&open(&path), "a stale choice");
    let after = read_choices(&path);
    assert!(tiles.contains(&after[context][tile_key]), "replaced by a tile: {:?}", after[context][tile_key]);
    assert_eq!(after[&other.0], recorded[&other.0], "the other context's, still");

    // 4. Choices timed on other kernels (another build's hash in the key) are not taken.
    let (head, rest) = context.split_once("(kernels ").expect("the key names the kernels");
    let built_otherwise = format!("{head}(kernels {:016x}{}", 0, &rest[16..]);
    assert_ne!(&built_otherwise, context);
    write_choices(&path, &BTreeMap::from([(built_otherwise, edited[context].clone())]));
    assert_eq!(open(&path).tune_file(), Some((path.as_path(), 0)), "another build's choices taken");
}

#[test]
fn files_that_cannot_be_used_are_refused() {
    let dir = TempDir::new("tune-file-refused");
    let opts = |p: &Path| GpuOptions { tune_file: Some(p.into()), ..GpuOptions::from_env() };
    // Not a tune file: refused, and left as it was.
    for text in ["not json", "[1, 2]", r#"{"context": {"decision": 3}}"#] {
        let path = dir.join("bad.json");
        std::fs::write(&path, text).unwrap();
        match Gpu::with_options(&opts(&path)) {
            Err(Error::Format { path: p, msg }) => {
                assert!(p.ends_with("bad.json") && msg.contains("tune file"), "{msg}")
            }
            Err(e) => panic!("{text:?}: {e}"),
            Ok(_) => panic!("{text:?} accepted as a tune file"),
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
    // A directory that does not exist: the file cannot be created.
    match Gpu::with_options(&opts(&dir.join("missing").join("tune.json"))) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("tune.json"), "{path}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a tune file in a missing directory accepted"),
    }
    // No file yet: created, empty.
    let path = dir.join("new.json");
    drop(Gpu::with_options(&opts(&path)).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(read_choices(&path), Choices::new());
    // An empty file (`touch`, `mktemp`): a tune file with no choices yet, not a broken one.
    for text in ["", "\n"] {
        let path = dir.join("empty.json");
        std::fs::write(&path, text).unwrap();
        let g = Gpu::with_options(&opts(&path)).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(g.tune_file(), Some((path.as_path(), 0)));
    }
}

/// backward_weight's split of its reduction is tuned among the rule's (8 splits for 2 images of
/// 32x32), twice and half as many: each, written into the tune file, runs as written and
/// matches the reference.
#[test]
fn every_weight_split_candidate_matches_the_reference() {
    let dir = TempDir::new("tune-file-weight-split");
    let path = dir.join("tune.json");
    let (xd, wd, yd) = ([2, 16, 32, 32], [16, 16, 3, 3], [2, 16, 32, 32]);
    let mut rng = Rng::new(72);
    let (x, dy) = (rng.data(xd.iter().product()), rng.data(yd.iter().product()));
    let want = r::conv::backward_weight(&to_f64(&x), xd, &to_f64(&dy), wd, 1);
    let run = |ctx: &str| -> (Vec<String>, BTreeMap<String, String>) {
        let g = open(&path);
        // The tiled kernels alone: Winograd would take this shape too.
        conv::force_winograd(&g, Some("off")).unwrap();
        let (tx, tdy) = (Tensor::new(&g, &xd, &x).unwrap(), Tensor::new(&g, &yd, &dy).unwrap());
        let tdw = Tensor::filled(&g, &wd, f32::NAN).unwrap();
        resnet_wgpu::profile::set(&g, true);
        let mut rec = g.recorder("weight split");
        conv::backward_weight(&mut rec, &tx, &tdy, &tdw, 1, false).unwrap();
        rec.run().unwrap();
        let labels = resnet_wgpu::profile::take(&g).unwrap().into_iter().map(|s| s.label.to_string()).collect();
        check(&format!("{ctx} backward_weight"), &tdw.read(&g).unwrap(), &want, F32_TOL);
        let choices = read_choices(&path);
        assert_eq!(choices.len(), 1, "{choices:#?}");
        (labels, choices.into_values().next().unwrap())
    };
    let (_, mine) = run("tuned");
    let found: Vec<_> = mine.iter().filter(|(k, _)| k.starts_with("weight split BackwardWeight")).collect();
    assert_eq!(found.len(), 1, "{mine:#?}");
    let (key, _) = found[0];
    assert!(key.ends_with(" split 8"), "the rule's plan: {key}");
    for name in ["split 8", "split 16", "split 4"] {
        let mut edited = read_choices(&path);
        edited.values_mut().next().unwrap().insert(key.clone(), name.to_string());
        write_choices(&path, &edited);
        let (labels, _) = run(name);
        let convs: Vec<_> = labels.iter().filter(|l| l.starts_with("conv BackwardWeight")).collect();
        assert!(convs.len() == 1 && convs[0].ends_with(&format!(" {name}")), "{name}: {labels:?}");
    }
}

/// Two contexts sharing a tune file, tuning different shapes at the same time: the file keeps
/// both contexts' choices.
#[test]
fn contexts_sharing_a_file_keep_each_others_choices() {
    let dir = TempDir::new("tune-file-shared");
    let path = dir.join("tune.json");
    let shapes = [[1, 16, 6, 10], [2, 16, 5, 7]];
    std::thread::scope(|s| {
        for (i, xd) in shapes.into_iter().enumerate() {
            let path = &path;
            s.spawn(move || {
                let g = open(path);
                conv::force_winograd(&g, Some("off")).unwrap();
                let mut rng = Rng::new(80 + i as u64);
                let (wd, yd) = ([16, 16, 3, 3], [xd[0], 16, xd[2], xd[3]]);
                let (x, w) = (rng.data(xd.iter().product()), rng.data(wd.iter().product()));
                let (tx, tw) = (Tensor::new(&g, &xd, &x).unwrap(), Tensor::new(&g, &wd, &w).unwrap());
                let ty = Tensor::filled(&g, &yd, f32::NAN).unwrap();
                let mut rec = g.recorder("shared");
                conv::forward(&mut rec, &tx, &tw, &ty, 1, false).unwrap();
                rec.run().unwrap();
                let want = r::conv::forward(&to_f64(&x), xd, &to_f64(&w), wd, 1);
                check(&format!("context {i} forward"), &ty.read(&g).unwrap(), &want, F32_TOL);
            });
        }
    });
    let choices = read_choices(&path);
    assert_eq!(choices.len(), 1, "one context key: {choices:#?}");
    let mine = choices.values().next().unwrap();
    for xd in shapes {
        let shape = format!("tile Forward x {xd:?} ");
        assert!(mine.keys().any(|k| k.starts_with(&shape)), "{shape} in {mine:#?}");
    }
}

/// forward_stats and backward_data_bn on a batch past the binding limit run it in chunks, and
/// plan (and time) only the chunks' shapes: the whole batch's, which never runs, is not timed
/// nor recorded in the tune file. Both against the reference convolution.
#[test]
fn a_batch_in_chunks_is_tuned_by_its_chunks_only() {
    let dir = TempDir::new("tune-chunks");
    let path = dir.join("tune.json");
    let opts = GpuOptions { tune_file: Some(path.clone()), max_binding_bytes: Some(2048), ..GpuOptions::from_env() };
    let g = Gpu::with_options(&opts).unwrap_or_else(|e| panic!("{e}"));
    conv::set_kernels(&g, conv::Kernels::Tuned);
    // 3 images of 4 x 8 x 8 floats: 3072 bytes, in chunks of 2 and 1.
    let (xd, wd) = ([3, 4, 8, 8], [4, 4, 3, 3]);
    let mut rng = Rng::new(73);
    let (x, w, dy) = (rng.data(768), rng.data(144), rng.data(768));
    let aff = affine_values(&mut rng, 4);
    let up = |d: &[usize], v: &[f32]| Tensor::new(&g, d, v).unwrap();
    let nan = |d: &[usize]| Tensor::filled(&g, d, f32::NAN).unwrap();
    let (tx, tw, tdy, taff) = (up(&xd, &x), up(&wd, &w), up(&xd, &dy), up(&[4, 4], &aff));
    let d = BnDev::new(&g, &BnHost::new(&mut rng, 4));
    let (ty, tda, tdx) = (nan(&xd), nan(&xd), nan(&xd));
    let mut rec = g.recorder("chunks");
    conv::forward_stats(&mut rec, &tx, None, &tw, &ty, 1, false, &d.tensors(), &d.mean, &d.invstd).unwrap();
    conv::backward_data_bn(&mut rec, &tdy, &tw, &tda, 1, false, &ty, &taff, &d.grads(), &tdx, false).unwrap();
    rec.run().unwrap();
    check(
        "chunks forward_stats y",
        &ty.read(&g).unwrap(),
        &r::conv::forward(&to_f64(&x), xd, &to_f64(&w), wd, 1),
        F32_TOL,
    );
    let want_da = r::conv::backward_data(&to_f64(&dy), &to_f64(&w), wd, xd, 1);
    check("chunks backward_data_bn da", &tda.read(&g).unwrap(), &want_da, F32_TOL);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.contains("x [2, 4, 8, 8]") && text.contains("x [1, 4, 8, 8]"), "the chunks' shapes: {text}");
    assert!(!text.contains("x [3, 4, 8, 8]"), "the whole batch's shape was planned: {text}");
}
