//! Image classification data in memory: CIFAR-10 and CIFAR-100 from their official binary files,
//! and `shapes10`, a synthetic set generated from a seed with nothing to download.
//!
//! A [`Dataset`] holds its images as f32 NCHW `[N, 3, 32, 32]`, already normalised per channel
//! (`(pixel / 255 - mean[c]) / std[c]`), beside their `u32` labels. Batches are copied out by index
//! ([`Dataset::gather`]), optionally through the training augmentation of He et al. (4-pixel pad,
//! random 32x32 crop, random horizontal flip: [`Dataset::gather_augmented`]), and an epoch's order
//! is a seeded Fisher-Yates shuffle ([`Dataset::epoch_order`]). Everything random is driven by
//! [`crate::rng::Rng`], so a seed names the same batches everywhere.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Channels of every image.
pub const CHANNELS: usize = 3;
/// Rows of every image.
pub const HEIGHT: usize = 32;
/// Columns of every image.
pub const WIDTH: usize = 32;
/// Pixels of one channel plane.
pub const PLANE: usize = HEIGHT * WIDTH;
/// Values of one image, `3 * 32 * 32`.
pub const IMAGE_LEN: usize = CHANNELS * PLANE;
/// Zero padding on each side before the random crop of the augmentation.
pub const PAD: usize = 4;

/// Per-channel mean of CIFAR-10's training images (pixels scaled to [0, 1]).
pub const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// Per-channel standard deviation of CIFAR-10's training images.
pub const CIFAR10_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
/// Per-channel mean of CIFAR-100's training images.
pub const CIFAR100_MEAN: [f32; 3] = [0.5071, 0.4865, 0.4409];
/// Per-channel standard deviation of CIFAR-100's training images.
pub const CIFAR100_STD: [f32; 3] = [0.2673, 0.2564, 0.2762];
/// Per-channel mean of `shapes10` (measured on 200 000 generated images; the channels are
/// symmetric by construction).
pub const SHAPES10_MEAN: [f32; 3] = [0.4352, 0.4352, 0.4352];
/// Per-channel standard deviation of `shapes10`.
pub const SHAPES10_STD: [f32; 3] = [0.2663, 0.2663, 0.2663];

/// CIFAR-10's class names, by label.
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// The name of the synthetic set, for the command line.
pub const SYNTHETIC_NAME: &str = "shapes10";
/// The synthetic set's class names, by label (see [`synthetic`]).
pub const SYNTHETIC_CLASSES: [&str; 10] =
    ["disk", "square", "triangle", "plus", "cross", "ring", "frame", "stripes", "checker", "bar"];

/// Images, labels and the normalisation they were made with.
///
/// Invariants (checked by [`Dataset::new`]): `images.len() == labels.len() * IMAGE_LEN`, every
/// label is below `classes`, every value of every image is finite.
#[derive(Clone)]
pub struct Dataset {
    name: String,
    images: Vec<f32>,
    labels: Vec<u32>,
    classes: usize,
    mean: [f32; 3],
    std: [f32; 3],
}

impl fmt::Debug for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dataset")
            .field("name", &self.name)
            .field("len", &self.len())
            .field("classes", &self.classes)
            .field("mean", &self.mean)
            .field("std", &self.std)
            .finish()
    }
}

impl Dataset {
    /// A dataset from images already normalised with `mean` / `std` (recorded, not applied).
    /// Errors where the lengths disagree, a label is not below `classes`, the normalisation is
    /// not finite and positive, or an image has a NaN or infinite value.
    pub fn new(
        name: impl Into<String>,
        images: Vec<f32>,
        labels: Vec<u32>,
        classes: usize,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Result<Dataset> {
        let name = name.into();
        if images.len() != labels.len() * IMAGE_LEN {
            return Err(Error::Length {
                what: format!("{name}: images for {} labels", labels.len()),
                expected: labels.len() * IMAGE_LEN,
                got: images.len(),
            });
        }
        if classes == 0 || classes > u32::MAX as usize {
            return Err(Error::Invalid(format!("{name}: {classes} classes")));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|&(_, &l)| l as usize >= classes) {
            return Err(Error::Invalid(format!("{name}: label {l} of image {i} is not below {classes} classes")));
        }
        if std.iter().any(|&s| !(s.is_finite() && s > 0.0)) || mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::Invalid(format!("{name}: normalisation mean {mean:?} std {std:?}")));
        }
        // A GPU may drop a NaN (ReLU's max) and train on silently: refuse one here.
        if let Some(i) = images.iter().position(|v| !v.is_finite()) {
            let v = images[i];
            return Err(Error::Invalid(format!("{name}: image {} has a non-finite value ({v})", i / IMAGE_LEN)));
        }
        Ok(Dataset { name, images, labels, classes, mean, std })
    }

    /// A dataset from 8-bit pixels, NCHW, normalised here: `(p / 255 - mean[c]) / std[c]`.
    pub fn from_bytes(
        name: impl Into<String>,
        pixels: &[u8],
        labels: Vec<u32>,
        classes: usize,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Result<Dataset> {
        let name = name.into();
        if pixels.len() != labels.len() * IMAGE_LEN {
            return Err(Error::Length {
                what: format!("{name}: pixels for {} labels", labels.len()),
                expected: labels.len() * IMAGE_LEN,
                got: pixels.len(),
            });
        }
        let lut = byte_lut(mean, std);
        let mut images = Vec::with_capacity(pixels.len());
        for image in pixels.chunks_exact(IMAGE_LEN) {
            push_normalised(&lut, image, &mut images);
        }
        Dataset::new(name, images, labels, classes, mean, std)
    }

    /// The dataset's short name (`cifar10`, `cifar100`, `shapes10`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of classes; every label is below it.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// All images, normalised, NCHW `[len, 3, 32, 32]`.
    pub fn images(&self) -> &[f32] {
        &self.images
    }

    /// All labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Image `i`, CHW `[3, 32, 32]`. Panics if `i >= len`.
    pub fn image(&self, i: usize) -> &[f32] {
        &self.images[i * IMAGE_LEN..(i + 1) * IMAGE_LEN]
    }

    /// Label of image `i`. Panics if `i >= len`.
    pub fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }

    /// The per-channel mean the images were normalised with (pixels in [0, 1]).
    pub fn mean(&self) -> [f32; 3] {
        self.mean
    }

    /// The per-channel standard deviation the images were normalised with.
    pub fn std(&self) -> [f32; 3] {
        self.std
    }

    /// Images per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// Keeps the first `n` images (all of them if there are fewer).
    pub fn truncate(&mut self, n: usize) {
        self.labels.truncate(n);
        self.images.truncate(self.labels.len() * IMAGE_LEN);
    }

    /// Copies the images and labels at `idx`, in that order, into `images` (NCHW
    /// `[idx.len(), 3, 32, 32]`) and `labels`, replacing what they held (their allocations are
    /// reused). Panics if an index is out of range.
    pub fn gather(&self, idx: &[usize], images: &mut Vec<f32>, labels: &mut Vec<u32>) {
        images.clear();
        labels.clear();
        images.reserve(idx.len() * IMAGE_LEN);
        labels.reserve(idx.len());
        for &i in idx {
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
    }

    /// [`Dataset::gather`] through the training augmentation, [`augment`] (three draws from
    /// `rng` per image): the same `rng` state gives the same batch.
    pub fn gather_augmented(&self, idx: &[usize], rng: &mut Rng, images: &mut Vec<f32>, labels: &mut Vec<u32>) {
        images.clear();
        labels.clear();
        images.resize(idx.len() * IMAGE_LEN, 0.0);
        labels.reserve(idx.len());
        for (dst, &i) in images.chunks_exact_mut(IMAGE_LEN).zip(idx) {
            augment(self.image(i), dst, rng);
            labels.push(self.labels[i]);
        }
    }

    /// The order of one epoch: `0..len` shuffled by [`shuffle`].
    pub fn epoch_order(&self, rng: &mut Rng) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        shuffle(&mut order, rng);
        order
    }
}

/// Shuffles in place by Fisher-Yates, uniformly over permutations, deterministic given `rng`.
pub fn shuffle<T>(items: &mut [T], rng: &mut Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i + 1);
        items.swap(i, j);
    }
}

/// The training augmentation of He et al. (2016) for CIFAR: pad 4 pixels on each side, crop a
/// random 32x32 window, mirror left-right with probability 1/2. Draws, in order, the crop's row
/// offset, its column offset (each uniform in `0..=8`) and the flip from `rng`, then calls
/// [`crop_flip`]. `src` and `dst` are one CHW image each.
///
/// The padding is zero *in normalised space*, i.e. each channel's mean colour, as in the
/// original Torch recipe (normalise first, then pad and crop); not black.
pub fn augment(src: &[f32], dst: &mut [f32], rng: &mut Rng) {
    let dy = rng.below(2 * PAD + 1);
    let dx = rng.below(2 * PAD + 1);
    let flip = rng.next_u64() >> 63 == 1;
    crop_flip(src, dst, dy, dx, flip);
}

/// The deterministic part of [`augment`]: with `P` the image zero-padded by [`PAD`] on each side,
/// `dst[c][y][x] = P[c][y + dy][x' + dx]`, `x' = 31 - x` when `flip`, else `x`. So `dy = dx = 4`
/// without flip is the identity, and with flip an exact mirror. Panics if `dy` or `dx` exceed
/// `2 * PAD` or either image is not `IMAGE_LEN` long.
pub fn crop_flip(src: &[f32], dst: &mut [f32], dy: usize, dx: usize, flip: bool) {
    assert!(dy <= 2 * PAD && dx <= 2 * PAD, "crop offset ({dy}, {dx}) beyond the padding");
    assert_eq!(src.len(), IMAGE_LEN, "crop_flip source length");
    assert_eq!(dst.len(), IMAGE_LEN, "crop_flip destination length");
    for c in 0..CHANNELS {
        let s = &src[c * PLANE..(c + 1) * PLANE];
        let d = &mut dst[c * PLANE..(c + 1) * PLANE];
        for y in 0..HEIGHT {
            let row = &mut d[y * WIDTH..(y + 1) * WIDTH];
            // Source row y + dy - PAD, if inside the image.
            let sy = (y + dy).wrapping_sub(PAD);
            if sy >= HEIGHT {
                row.fill(0.0);
                continue;
            }
            let srow = &s[sy * WIDTH..(sy + 1) * WIDTH];
            for (x, v) in row.iter_mut().enumerate() {
                let xx = if flip { WIDTH - 1 - x } else { x };
                let sx = (xx + dx).wrapping_sub(PAD);
                *v = if sx < WIDTH { srow[sx] } else { 0.0 };
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CIFAR

/// Which CIFAR, and how its files look.
#[derive(Clone, Copy, Debug)]
struct CifarKind {
    name: &'static str,
    train: &'static [&'static str],
    test: &'static str,
    /// Label bytes before the pixels of each record.
    label_bytes: usize,
    /// `(byte index, classes)` of each label byte, the last being the one kept.
    labels: &'static [(usize, usize)],
    classes: usize,
    mean: [f32; 3],
    std: [f32; 3],
    subdir: &'static str,
}

const CIFAR10: CifarKind = CifarKind {
    name: "cifar10",
    train: &["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"],
    test: "test_batch.bin",
    label_bytes: 1,
    labels: &[(0, 10)],
    classes: 10,
    mean: CIFAR10_MEAN,
    std: CIFAR10_STD,
    subdir: "cifar-10-batches-bin",
};

const CIFAR100: CifarKind = CifarKind {
    name: "cifar100",
    train: &["train.bin"],
    test: "test.bin",
    label_bytes: 2,
    // Coarse label (20 superclasses), then the fine label (100 classes) that is kept.
    labels: &[(0, 20), (1, 100)],
    classes: 100,
    mean: CIFAR100_MEAN,
    std: CIFAR100_STD,
    subdir: "cifar-100-binary",
};

impl CifarKind {
    fn record(&self) -> usize {
        self.label_bytes + IMAGE_LEN
    }

    /// Whether `dir` holds any of this kind's files.
    fn present_in(&self, dir: &Path) -> bool {
        self.train.iter().chain(std::iter::once(&self.test)).any(|f| dir.join(f).is_file())
    }
}

/// Loads CIFAR-10 or CIFAR-100, `(train, test)`, from their official binary files, normalised
/// with the usual per-channel mean and std ([`CIFAR10_MEAN`], [`CIFAR100_MEAN`], ...).
///
/// `dir` holds either CIFAR-10's `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`
/// (records of 1 label byte + 3072 pixel bytes) or CIFAR-100's `train.bin` and `test.bin` (2 label
/// bytes, coarse then fine, + 3072 pixel bytes; the fine label is used, 100 classes), or is the
/// parent of the archives' `cifar-10-batches-bin` / `cifar-100-binary` folders. Pixels are the red,
/// then green, then blue 32x32 plane, row-major: NCHW as stored.
///
/// Errors: [`Error::Io`] naming the directory when it cannot be read or holds neither set, or the
/// file when one is missing or unreadable; [`Error::Format`] naming the file when its size is not
/// a whole, non-zero number of records (truncated, or another set's records) or a label is out of
/// range. Any number of records per file is accepted.
pub fn load_cifar(dir: &Path) -> Result<(Dataset, Dataset)> {
    load_cifar_of(dir, 10)
}

/// [`load_cifar`], choosing CIFAR-100 where `dir` holds both sets (as the parent of both
/// archives' folders) and `classes` is 100.
pub fn load_cifar_of(dir: &Path, classes: usize) -> Result<(Dataset, Dataset)> {
    let (kind, dir) = detect_cifar(dir, classes)?;
    Ok((read_split(&kind, &dir, kind.train)?, read_split(&kind, &dir, &[kind.test])?))
}

/// The test split alone of [`load_cifar_of`], for what scores it (the training split is 150 MB
/// to read and 600 MB of floats); the training files are not read.
pub fn load_cifar_test_of(dir: &Path, classes: usize) -> Result<Dataset> {
    let (kind, dir) = detect_cifar(dir, classes)?;
    read_split(&kind, &dir, &[kind.test])
}

/// The records of `files` in `dir`, normalised, as one dataset.
fn read_split(kind: &CifarKind, dir: &Path, files: &[&str]) -> Result<Dataset> {
    let lut = byte_lut(kind.mean, kind.std);
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for file in files {
        read_records(kind, &dir.join(file), &lut, &mut images, &mut labels)?;
    }
    Dataset::new(kind.name, images, labels, kind.classes, kind.mean, kind.std)
}

fn path_string(path: &Path) -> String {
    path.display().to_string()
}

fn detect_cifar(dir: &Path, classes: usize) -> Result<(CifarKind, PathBuf)> {
    // Surface an unreadable or absent directory as itself.
    std::fs::read_dir(dir).map_err(|source| Error::Io { path: path_string(dir), source })?;
    let order = if classes == CIFAR100.classes { [CIFAR100, CIFAR10] } else { [CIFAR10, CIFAR100] };
    for kind in order {
        if kind.present_in(dir) {
            return Ok((kind, dir.to_path_buf()));
        }
        let sub = dir.join(kind.subdir);
        if kind.present_in(&sub) {
            return Ok((kind, sub));
        }
    }
    Err(Error::Io {
        path: path_string(dir),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no CIFAR-10 (data_batch_1.bin .. data_batch_5.bin, test_batch.bin) or CIFAR-100 \
             (train.bin, test.bin) binary files here or in cifar-10-batches-bin/ or cifar-100-binary/",
        ),
    })
}

/// Appends the records of one file, normalised, to `images` and `labels`.
fn read_records(
    kind: &CifarKind,
    path: &Path,
    lut: &[[f32; 256]; 3],
    images: &mut Vec<f32>,
    labels: &mut Vec<u32>,
) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path_string(path), source })?;
    let format = |msg: String| Error::Format { path: path_string(path), msg };
    let record = kind.record();
    if bytes.is_empty() {
        return Err(format(format!("empty file; expected {} records of {record} bytes", kind.name)));
    }
    if bytes.len() % record != 0 {
        return Err(format(format!(
            "{} bytes is not a whole number of {} records of {record} bytes ({} whole, then {} bytes): \
             truncated, or not {} binary data",
            bytes.len(),
            kind.name,
            bytes.len() / record,
            bytes.len() % record,
            kind.name,
        )));
    }
    let n = bytes.len() / record;
    images.reserve(n * IMAGE_LEN);
    labels.reserve(n);
    for (r, rec) in bytes.chunks_exact(record).enumerate() {
        for &(at, classes) in kind.labels {
            if rec[at] as usize >= classes {
                return Err(format(format!("record {r}: label byte {at} is {}, not below {classes}", rec[at])));
            }
        }
        labels.push(rec[kind.label_bytes - 1] as u32);
        push_normalised(lut, &rec[kind.label_bytes..], images);
    }
    Ok(())
}

/// `lut[c][p] = (p / 255 - mean[c]) / std[c]`.
fn byte_lut(mean: [f32; 3], std: [f32; 3]) -> [[f32; 256]; 3] {
    let mut lut = [[0.0; 256]; 3];
    for c in 0..3 {
        for (p, v) in lut[c].iter_mut().enumerate() {
            *v = (p as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    lut
}

fn push_normalised(lut: &[[f32; 256]; 3], image: &[u8], out: &mut Vec<f32>) {
    for (c, plane) in image.chunks_exact(PLANE).enumerate() {
        out.extend(plane.iter().map(|&p| lut[c][p as usize]));
    }
}

// ---------------------------------------------------------------------------------------------
// shapes10

/// `shapes10`: a synthetic 10-class set of 3x32x32 images, `(train, test)`, drawn procedurally
/// from `seed` with no download, in the same layout and normalisation convention as CIFAR
/// (normalised with [`SHAPES10_MEAN`] / [`SHAPES10_STD`]).
///
/// Each image is one foreground object on a cluttered background. The classes (labels 0..9) are
/// the object's *shape or texture*; nothing else depends on the class:
///
/// | label | name       | object |
/// |------:|------------|--------|
/// | 0 | `disk`     | a filled disk |
/// | 1 | `square`   | a filled square, any rotation |
/// | 2 | `triangle` | a filled equilateral triangle, any rotation |
/// | 3 | `plus`     | an upright `+` (rotated at most 12 degrees) |
/// | 4 | `cross`    | a diagonal `x` (a plus turned 45 +- 12 degrees) |
/// | 5 | `ring`     | an annulus (hollow circle) |
/// | 6 | `frame`    | a hollow square, any rotation |
/// | 7 | `stripes`  | a disk filled with a two-colour grating, any orientation, period 3.5-6 px |
/// | 8 | `checker`  | a square filled with a two-colour checkerboard, cells 2.5-4 px, any rotation |
/// | 9 | `bar`      | a long thin bar (about 3-5 px wide), any orientation |
///
/// Per image, independent of the class: the object's centre (up to 6 px from the image centre on each axis),
/// size (radius 6-11 px), rotation, and colours (foreground, background and the grating's second
/// colour drawn at random, with some contrast between them, light-on-dark 70% of the time); a
/// brightness ramp across the background; 2-5 clutter items (small dots and thin short strokes,
/// translucent, in random colours, some over the object); uniform pixel noise of random strength;
/// anti-aliased edges. So mean colour says almost nothing about the class and a linear
/// classifier on raw pixels does poorly (about 15% held out), while convolutional features pick
/// the classes up quickly.
///
/// Labels are balanced: `i % 10`, shuffled within each block of 10 images, so any prefix of a
/// multiple of 10 images holds every class equally often. Train and test images come from
/// disjoint streams; image `i` of a split in a whole block of 10 depends only on
/// `(seed, split, i)` (a last, partial block is shuffled at its own length), so a split's first
/// `10 k` images are the same whatever its size. Generation runs on all cores and is
/// deterministic regardless of their number.
///
/// Errors: [`Error::Invalid`] where a split's images need more host memory than can be
/// allocated (an extra zero or three in a size).
pub fn synthetic(train: usize, test: usize, seed: u64) -> Result<(Dataset, Dataset)> {
    Ok((shapes_split(train, seed, 0)?, shapes_split(test, seed, 1)?))
}

fn shapes_split(n: usize, seed: u64, split: u64) -> Result<Dataset> {
    // Reserved first: a size past the host's memory is an error, not an abort.
    let too_large = || Error::Invalid(format!("{n} generated images: more host memory than can be allocated"));
    let len = n.checked_mul(IMAGE_LEN).ok_or_else(too_large)?;
    let mut images: Vec<f32> = Vec::new();
    images.try_reserve_exact(len).map_err(|_| too_large())?;
    images.resize(len, 0.0);
    let stream = Rng::new(seed).next_u64() ^ split.wrapping_mul(0xA076_1D64_78BD_642F);
    let mut labels: Vec<u32> = (0..n).map(|i| (i % 10) as u32).collect();
    // Shuffle within consecutive blocks of 10 so that the labels of image i depend only on its
    // block: every prefix of a whole number of blocks stays exactly balanced.
    for (b, block) in labels.chunks_mut(10).enumerate() {
        let mut r = Rng::new(stream ^ (b as u64).wrapping_mul(0xE703_7ED1_A0B4_28DB) ^ 0x5851_F42D_4C95_7F2D);
        shuffle(block, &mut r);
    }
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n.div_ceil(256)).max(1);
    let per = n.div_ceil(threads).max(1);
    let labels_ref = &labels;
    std::thread::scope(|s| {
        for (t, chunk) in images.chunks_mut(per * IMAGE_LEN).enumerate() {
            s.spawn(move || {
                for (k, img) in chunk.chunks_exact_mut(IMAGE_LEN).enumerate() {
                    let i = t * per + k;
                    let mut rng = Rng::new(stream ^ (i as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25));
                    draw_shape(img, labels_ref[i] as usize, &mut rng);
                    normalise_in_place(img, SHAPES10_MEAN, SHAPES10_STD);
                }
            });
        }
    });
    Dataset::new(SYNTHETIC_NAME, images, labels, 10, SHAPES10_MEAN, SHAPES10_STD)
}

fn normalise_in_place(img: &mut [f32], mean: [f32; 3], std: [f32; 3]) {
    for (c, plane) in img.chunks_exact_mut(PLANE).enumerate() {
        let inv = 1.0 / std[c];
        for v in plane {
            *v = (*v - mean[c]) * inv;
        }
    }
}

type Rgb = [f32; 3];

fn rand_rgb(rng: &mut Rng, lo: f32, hi: f32) -> Rgb {
    [
        rng.range(lo as f64, hi as f64) as f32,
        rng.range(lo as f64, hi as f64) as f32,
        rng.range(lo as f64, hi as f64) as f32,
    ]
}

fn rgb_dist(a: Rgb, b: Rgb) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// A colour in `[lo, hi)^3` at least `min` away from `from` (the last try if none is).
fn contrasting(rng: &mut Rng, lo: f32, hi: f32, from: Rgb, min: f32) -> Rgb {
    let mut c = rand_rgb(rng, lo, hi);
    for _ in 0..8 {
        if rgb_dist(c, from) >= min {
            break;
        }
        c = rand_rgb(rng, lo, hi);
    }
    c
}

/// Signed distance to an axis-aligned box of half-extents `hx`, `hy` centred at the origin.
#[inline]
fn sd_box(x: f32, y: f32, hx: f32, hy: f32) -> f32 {
    let qx = x.abs() - hx;
    let qy = y.abs() - hy;
    let ox = qx.max(0.0);
    let oy = qy.max(0.0);
    (ox * ox + oy * oy).sqrt() + qx.max(qy).min(0.0)
}

/// Blends colour `mix(a, b, t)` over `img` with coverage `clamp(0.5 - d, 0, 1) * alpha`, where
/// `(d, t) = f(x, y)` at each pixel centre `(x, y)` in pixel units; `d` is a signed distance in
/// pixels (negative inside), so edges are anti-aliased over about one pixel. Only pixels within
/// `r` of `(cx, cy)` are visited.
#[inline]
fn paint(
    img: &mut [f32],
    (cx, cy): (f32, f32),
    r: f32,
    a: Rgb,
    b: Rgb,
    alpha: f32,
    f: impl Fn(f32, f32) -> (f32, f32),
) {
    let x0 = (cx - r).floor().max(0.0) as usize;
    let x1 = ((cx + r).ceil().max(0.0) as usize).min(WIDTH);
    let y0 = (cy - r).floor().max(0.0) as usize;
    let y1 = ((cy + r).ceil().max(0.0) as usize).min(HEIGHT);
    for y in y0..y1 {
        for x in x0..x1 {
            let (d, t) = f(x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let cover = (0.5 - d).clamp(0.0, 1.0) * alpha;
            if cover <= 0.0 {
                continue;
            }
            for c in 0..CHANNELS {
                let col = a[c] + (b[c] - a[c]) * t;
                let p = &mut img[c * PLANE + y * WIDTH + x];
                *p += (col - *p) * cover;
            }
        }
    }
}

/// One clutter item: a translucent small dot or thin short stroke anywhere.
fn clutter(img: &mut [f32], rng: &mut Rng) {
    let cx = rng.range(0.0, WIDTH as f64) as f32;
    let cy = rng.range(0.0, HEIGHT as f64) as f32;
    let col = rand_rgb(rng, 0.0, 1.0);
    let alpha = rng.range(0.35, 0.8) as f32;
    if rng.uniform() < 0.4 {
        let r = rng.range(0.7, 1.8) as f32;
        paint(img, (cx, cy), r + 1.0, col, col, alpha, |x, y| ((x * x + y * y).sqrt() - r, 0.0));
    } else {
        let half = rng.range(1.5, 4.5) as f32;
        let w = rng.range(0.4, 0.7) as f32;
        let th = rng.range(0.0, std::f64::consts::PI) as f32;
        let (s, c) = th.sin_cos();
        paint(img, (cx, cy), half + w + 1.0, col, col, alpha, |x, y| {
            let u = x * c + y * s;
            let v = -x * s + y * c;
            (sd_box(u, v, half, 0.0) - w, 0.0)
        });
    }
}

/// Draws one `shapes10` image of class `class` into `img` (CHW, values in [0, 1]).
fn draw_shape(img: &mut [f32], class: usize, rng: &mut Rng) {
    use std::f32::consts::{FRAC_PI_4, PI, TAU};
    // Colours.
    let light_on_dark = rng.uniform() < 0.7;
    let (bg, fg) = if light_on_dark {
        let bg = rand_rgb(rng, 0.0, 0.55);
        (bg, contrasting(rng, 0.35, 1.0, bg, 0.45))
    } else {
        let bg = rand_rgb(rng, 0.45, 1.0);
        (bg, contrasting(rng, 0.0, 0.65, bg, 0.45))
    };
    let fg2 = contrasting(rng, 0.0, 1.0, fg, 0.4);

    // Background with a brightness ramp.
    let gx = rng.range(-0.12, 0.12) as f32 / 16.0;
    let gy = rng.range(-0.12, 0.12) as f32 / 16.0;
    for c in 0..CHANNELS {
        let plane = &mut img[c * PLANE..(c + 1) * PLANE];
        for y in 0..HEIGHT {
            let base = bg[c] + gy * (y as f32 - 15.5);
            for x in 0..WIDTH {
                plane[y * WIDTH + x] = base + gx * (x as f32 - 15.5);
            }
        }
    }

    // Clutter, some under and some over the object.
    let items = 2 + rng.below(4);
    let over = rng.below(items.min(2) + 1);
    for _ in 0..items - over {
        clutter(img, rng);
    }

    // The object.
    let cx = 16.0 + rng.range(-6.0, 6.0) as f32;
    let cy = 16.0 + rng.range(-6.0, 6.0) as f32;
    let s = rng.range(6.0, 11.0) as f32;
    let mut th = rng.range(0.0, TAU as f64) as f32;
    if class == 3 {
        th = rng.range(-12.0, 12.0) as f32 * PI / 180.0;
    } else if class == 4 {
        th = FRAC_PI_4 + rng.range(-12.0, 12.0) as f32 * PI / 180.0;
    }
    let (sn, cs) = th.sin_cos();
    let rot = move |x: f32, y: f32| (x * cs + y * sn, -x * sn + y * cs);
    // Radius around the centre that holds the object and its anti-aliased edge.
    let reach = match class {
        0 | 5 | 7 => s + 1.0,
        2..=4 => 1.1 * s + 1.0,
        1 | 8 => 0.8 * std::f32::consts::SQRT_2 * s + 1.0,
        6 => 0.85 * std::f32::consts::SQRT_2 * s + 1.0,
        _ => (1.35 * s).min(15.0) + 3.5,
    };
    match class {
        0 => paint(img, (cx, cy), reach, fg, fg, 1.0, |x, y| ((x * x + y * y).sqrt() - s, 0.0)),
        1 => {
            let h = 0.8 * s;
            paint(img, (cx, cy), reach, fg, fg, 1.0, |x, y| {
                let (u, v) = rot(x, y);
                (sd_box(u, v, h, h), 0.0)
            })
        }
        2 => {
            // Equilateral triangle, circumradius 1.1 s: the max of three edge half-planes.
            let r_in = 0.55 * s;
            let n: [(f32, f32); 3] = [0.0, 1.0, 2.0].map(|k: f32| {
                let a = th + PI / 2.0 + k * TAU / 3.0;
                (a.cos(), a.sin())
            });
            paint(img, (cx, cy), reach, fg, fg, 1.0, |x, y| {
                let d = n.iter().map(|&(nx, ny)| nx * x + ny * y).fold(f32::MIN, f32::max);
                (d - r_in, 0.0)
            })
        }
        3 | 4 => {
            let w = s * rng.range(0.2, 0.3) as f32;
            paint(img, (cx, cy), reach, fg, fg, 1.0, |x, y| {
                let (u, v) = rot(x, y);
                (sd_box(u, v, s, w).min(sd_box(u, v, w, s)), 0.0)
            })
        }
        5 => {
            let w = s * rng.range(0.14, 0.22) as f32;
            let r = s - w;
            paint(img, (cx, cy), reach, fg, fg, 1.0, |x, y| (((x * x + y * y).sqrt() - r).abs() - w, 0.0))
        }
        6 => {
            let w = s * rng.range(0.11, 0.17) as f32;
            let h = 0.85 * s - w;
            paint(img, (cx, cy), reach, fg, fg, 1.0, |x, y| {
                let (u, v) = rot(x, y);
                (sd_box(u, v, h, h).abs() - w, 0.0)
            })
        }
        7 => {
            let k = TAU / rng.range(3.5, 6.0) as f32;
            let phase = rng.range(0.0, TAU as f64) as f32;
            // A square wave with edges about a pixel wide.
            let sharp = 2.0 / k;
            paint(img, (cx, cy), reach, fg, fg2, 1.0, |x, y| {
                let (u, _) = rot(x, y);
                ((x * x + y * y).sqrt() - s, (0.5 + sharp * (k * u + phase).sin()).clamp(0.0, 1.0))
            })
        }
        8 => {
            let cell = rng.range(2.5, 4.0) as f32;
            let h = 0.8 * s;
            let (ox, oy) = (rng.range(0.0, cell as f64) as f32, rng.range(0.0, cell as f64) as f32);
            paint(img, (cx, cy), reach, fg, fg2, 1.0, |x, y| {
                let (u, v) = rot(x, y);
                let parity = (((u + ox) / cell).floor() + ((v + oy) / cell).floor()) as i32 & 1;
                (sd_box(u, v, h, h), parity as f32)
            })
        }
        _ => {
            let len = (1.35 * s).min(15.0);
            let w = rng.range(1.4, 2.4) as f32;
            paint(img, (cx, cy), reach, fg, fg, 1.0, |x, y| {
                let (u, v) = rot(x, y);
                (sd_box(u, v, len, w), 0.0)
            })
        }
    }

    for _ in 0..over {
        clutter(img, rng);
    }

    // Pixel noise, uniform with standard deviation sigma, four 16-bit draws per u64.
    let sigma = rng.range(0.02, 0.08) as f32;
    let amp = sigma * 3f32.sqrt() / 32768.0;
    for quad in img.chunks_exact_mut(4) {
        let bits = rng.next_u64();
        for (k, v) in quad.iter_mut().enumerate() {
            let r = ((bits >> (16 * k)) & 0xFFFF) as i32 - 32768;
            *v = (*v + r as f32 * amp).clamp(0.0, 1.0);
        }
    }
}
