//! safetensors in and out, under PyTorch's names and layouts ([`crate::arch::NetConfig::tensors`]),
//! so that a PyTorch state dict of the same architecture loads here, and back.
//!
//! Files written here: every tensor f32 except `*.num_batches_tracked`, an i64 scalar as in
//! PyTorch. A network keeps one such count for all its BN layers (they see the same batches):
//! a file's first is read, and written back for every layer. Checkpoints add
//! `momentum.<name>` for each learned parameter (SGD's buffer) and whatever else the caller
//! adds. Files read here may hold f32, f64, f16, bf16, i64, i32 or u8 tensors; values are
//! converted to f32. Writes go to a temporary file of their own, synced, then renamed
//! (`replace_file`), so an interrupted save never leaves a corrupt file.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::arch::{NetConfig, Role};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::net::{Entry, ResNet};

/// A host tensor read from or going to a file.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub dims: Vec<usize>,
    pub data: Data,
}

/// Element data: f32 values, or i64 (labels, counters).
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl HostTensor {
    pub fn f32(dims: &[usize], v: Vec<f32>) -> HostTensor {
        HostTensor { dims: dims.to_vec(), data: Data::F32(v) }
    }

    pub fn i64(dims: &[usize], v: Vec<i64>) -> HostTensor {
        HostTensor { dims: dims.to_vec(), data: Data::I64(v) }
    }

    /// The values as f32 (integers converted).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.clone(),
            Data::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The values as i64, if integral (an f32 past i64's range is not: `as` would saturate).
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        const RANGE: std::ops::Range<f32> = -9.223_372e18..9.223_372e18;
        match &self.data {
            Data::I64(v) => Some(v.clone()),
            Data::F32(v) => v.iter().map(|&x| (x.fract() == 0.0 && RANGE.contains(&x)).then_some(x as i64)).collect(),
        }
    }

    fn bytes(&self) -> (Dtype, Vec<u8>) {
        match &self.data {
            Data::F32(v) => (Dtype::F32, bytemuck::cast_slice(v).to_vec()),
            Data::I64(v) => (Dtype::I64, bytemuck::cast_slice(v).to_vec()),
        }
    }
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source: e }
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format { path: path.display().to_string(), msg: msg.into() }
}

/// Reads every tensor of a safetensors file.
pub fn read(path: &Path) -> Result<HashMap<String, HostTensor>> {
    Ok(read_with_metadata(path)?.0)
}

/// What a safetensors file's header says, read without its data ([`read_header`]).
#[derive(Clone, Debug)]
pub struct Header {
    /// The string metadata (`__metadata__`; empty where it has none).
    pub metadata: HashMap<String, String>,
    /// The tensors' names.
    pub tensors: Vec<String>,
}

/// The header of a safetensors file: its first 8 bytes give the length of the JSON that
/// follows. Reading it alone costs nothing, where [`read`] reads every tensor.
pub fn read_header(path: &Path) -> Result<Header> {
    use std::io::Read;
    let bad = |m: String| fmt_err(path, format!("not a safetensors file: {m}"));
    let mut file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    // A file too short is not one; a read that fails (a folder, a device error) is an I/O error.
    let read = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => bad(e.to_string()),
        _ => io_err(path, e),
    };
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(read)?;
    let n = u64::from_le_bytes(len);
    // safetensors' own bound on a header.
    if n > 100_000_000 {
        return Err(bad(format!("a header of {n} bytes")));
    }
    let mut json = vec![0u8; n as usize];
    file.read_exact(&mut json).map_err(read)?;
    let entries: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
    let mut header = Header { metadata: HashMap::new(), tensors: Vec::new() };
    for (name, value) in entries {
        if name != "__metadata__" {
            header.tensors.push(name);
            continue;
        }
        for (k, v) in value.as_object().into_iter().flatten() {
            if let Some(v) = v.as_str() {
                header.metadata.insert(k.clone(), v.to_string());
            }
        }
    }
    Ok(header)
}

/// Every tensor of a safetensors file, and its string metadata (`__metadata__`; empty where it
/// has none), from one read of the file.
pub fn read_with_metadata(path: &Path) -> Result<(HashMap<String, HostTensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let not_safetensors = |e: safetensors::SafeTensorError| fmt_err(path, format!("not a safetensors file: {e}"));
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(not_safetensors)?;
    let st = SafeTensors::deserialize(&bytes).map_err(not_safetensors)?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let data = match view.dtype() {
            Dtype::F32 => Data::F32(d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            Dtype::F64 => Data::F32(
                d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect(),
            ),
            Dtype::F16 => {
                Data::F32(d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
            }
            Dtype::BF16 => {
                Data::F32(d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
            }
            Dtype::I64 => {
                Data::I64(d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
            }
            Dtype::I32 => {
                Data::I64(d.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect())
            }
            Dtype::U8 => Data::I64(d.iter().map(|&b| b as i64).collect()),
            other => return Err(fmt_err(path, format!("{name}: unsupported dtype {other:?}"))),
        };
        out.insert(name, HostTensor { dims: view.shape().to_vec(), data });
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// Writes tensors atomically (temporary file in the same folder, then rename).
pub fn write(path: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    write_with_metadata(path, tensors, HashMap::new())
}

/// [`write()`] with string metadata (safetensors' `__metadata__`, which PyTorch's loaders skip).
pub fn write_with_metadata(
    path: &Path,
    tensors: &[(String, HostTensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    // safetensors indexes past its own list for a name given twice (a panic), and reads a
    // tensor named `__metadata__` as the metadata.
    let mut names = std::collections::HashSet::new();
    if let Some((n, _)) = tensors.iter().find(|(n, _)| !names.insert(n.as_str()) || n == "__metadata__") {
        return Err(fmt_err(path, format!("tensor name {n:?} given twice or reserved")));
    }
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let (dt, b) = t.bytes();
            (n.clone(), dt, t.dims.clone(), b)
        })
        .collect();
    let mut views = Vec::new();
    for (n, dt, dims, b) in &encoded {
        // A shape whose size overflows (HostTensor's fields are public): refused here, where
        // safetensors would multiply it out unchecked.
        if dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none() {
            return Err(fmt_err(path, format!("{n}: shape {dims:?} has more elements than a usize holds")));
        }
        let v = safetensors::tensor::TensorView::new(*dt, dims.clone(), b)
            .map_err(|e| fmt_err(path, format!("{n}: {e}")))?;
        views.push((n.clone(), v));
    }
    let metadata = (!metadata.is_empty()).then_some(metadata);
    let bytes = safetensors::serialize(views, metadata).map_err(|e| fmt_err(path, e.to_string()))?;
    replace_file(path, &bytes)
}

/// Writes `bytes` to `path` whole or not at all: through a temporary file beside it, of this
/// write's own (created new, so no other writer's file or link is followed; the process id
/// alone is 1 in every container), synced to the disk, renamed over `path`, and the folder
/// synced too (where the system allows it), so that neither a killed process nor a machine
/// that stops leaves `path` empty or cut short. A failed write removes its temporary. Errors
/// are [`Error::Io`] naming `path`, not the temporary.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let file = path.file_name().filter(|_| !path.is_dir()).ok_or_else(|| fmt_err(path, "not a file path"))?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    // The name's first 100 bytes at most (whole characters): the temporary's own part would
    // take a long name past the system's limit (255 bytes), and the write would fail for it.
    let name = file.to_string_lossy();
    let mut end = name.len().min(100);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let stem = &name[..end];
    let tmp = path.with_file_name(format!(".{stem}.{}-{nanos}-{n}.tmp", std::process::id()));
    // Nothing is removed unless this call created it.
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| io_err(path, e))?;
    let written =
        f.write_all(bytes).and_then(|()| f.sync_all().or_else(|e| sync_unsupported(&e).then_some(()).ok_or(e)));
    drop(f);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    // The rename itself reaches the disk with the folder's entry. Some systems refuse to open
    // or sync a folder: the file is written either way.
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(dir) = std::fs::File::open(folder) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Whether a file's sync failed because its file system has none: macOS syncs with
/// `F_FULLFSYNC`, which SMB, NTFS, WebDAV and FUSE volumes refuse (EINVAL, ENOTTY, ENOTSUP;
/// EINVAL on Linux for files that cannot be synced). The file is written, as where a folder's
/// sync is refused; a failed sync of any other kind fails the write.
fn sync_unsupported(e: &std::io::Error) -> bool {
    // EINVAL and ENOTTY are 22 and 25 everywhere; ENOTSUP is 45 on macOS and 95 on Linux,
    // EOPNOTSUPP 102 on macOS.
    e.kind() == std::io::ErrorKind::Unsupported || matches!(e.raw_os_error(), Some(22 | 25 | 45 | 95 | 102))
}

/// The network's state under PyTorch's names: parameters and BN buffers, plus with
/// `optimizer` every `momentum.<name>`.
pub fn state_tensors(net: &ResNet, gpu: &Gpu, optimizer: bool) -> Result<Vec<(String, HostTensor)>> {
    let specs = net.config.tensors();
    let mut out = Vec::new();
    for (spec, (name, entry)) in specs.iter().zip(net.entries()) {
        let t = match entry {
            Entry::Param(p) => HostTensor::f32(&spec.dims, p.value.read(gpu)?),
            Entry::Buffer(b) => HostTensor::f32(&spec.dims, b.read(gpu)?),
            Entry::Count => HostTensor::i64(&[], vec![net.batches_tracked]),
        };
        out.push((name, t));
    }
    if optimizer {
        for (spec, (name, entry)) in specs.iter().zip(net.entries()) {
            if let Entry::Param(p) = entry {
                out.push((format!("momentum.{name}"), HostTensor::f32(&spec.dims, p.momentum.read(gpu)?)));
            }
        }
    }
    Ok(out)
}

/// Saves the network's parameters and BN buffers (a PyTorch-loadable state dict), naming its
/// network in the file's metadata as checkpoints do ([`load_net`] checks it).
pub fn save_weights(net: &ResNet, gpu: &Gpu, path: &Path) -> Result<()> {
    write_with_metadata(path, &state_tensors(net, gpu, false)?, network_metadata(&net.config))
}

/// The file metadata that names `config`: its unit variant (`variant`), the whole network
/// (`network`, [`NetConfig::name`]), and the options that rebuild a CIFAR network
/// ([`named_network`]: `depth`, `bottleneck`, `shortcut`, `classes`).
pub fn network_metadata(config: &NetConfig) -> HashMap<String, String> {
    [
        ("variant", crate::arch::Variant::of(config).to_string()),
        ("network", config.name()),
        ("depth", config.depth().to_string()),
        ("bottleneck", config.bottleneck.to_string()),
        ("shortcut", format!("{:?}", config.shortcut)),
        ("classes", config.classes.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The network a file's metadata names ([`network_metadata`]), where it is a CIFAR network
/// ([`NetConfig::cifar`], any variant and shortcut); `None` for a file without the names
/// (PyTorch's, or ours from before they were written) or with other widths.
pub fn named_network(metadata: &HashMap<String, String>) -> Option<NetConfig> {
    let get = |key: &str| metadata.get(key).map(String::as_str);
    let depth = get("depth")?.parse().ok()?;
    let bottleneck = get("bottleneck")?.parse().ok()?;
    let classes = get("classes")?.parse().ok()?;
    let mut config = NetConfig::cifar(depth, crate::arch::UnitKind::PreAct, bottleneck, classes).ok()?;
    config.shortcut = match get("shortcut")? {
        "A" => crate::arch::ShortcutOption::A,
        "B" => crate::arch::ShortcutOption::B,
        "C" => crate::arch::ShortcutOption::C,
        _ => return None,
    };
    get("variant")?.parse::<crate::arch::Variant>().ok()?.apply(&mut config);
    // The name says everything else (widths, input channels): it must be this network's.
    (get("network")? == config.name()).then_some(config)
}

/// `Ok` unless a file's metadata (`variant`, `network`; `None` where it has none, as PyTorch's
/// files) names another network than `config`. Many variants have the same tensors (a scaled or
/// dropped-out shortcut, the placements of the original unit), so only the name tells them
/// apart; for the others the name says which options load the file, where the tensors would
/// only name the first that differs. `what` says what the file holds, for the message.
pub fn check_network(
    config: &NetConfig,
    variant: Option<&str>,
    network: Option<&str>,
    path: &Path,
    what: &str,
) -> Result<()> {
    let want = crate::arch::Variant::of(config).to_string();
    if let Some(v) = variant.filter(|v| *v != want) {
        return Err(Error::Invalid(format!("{}: {what} of {v} units, not {want}: load it as {v}", path.display())));
    }
    match network {
        Some(n) if n != config.name() => {
            Err(Error::Invalid(format!("{}: {what} of a {n}, not a {}", path.display(), config.name())))
        }
        _ => Ok(()),
    }
}

/// Checks a file's tensors against a configuration and returns the values by name. The first
/// missing name or wrong shape is an error naming it; so is a tensor the configuration does not
/// have (as PyTorch's strict `load_state_dict` refuses one: a deeper network's weights would
/// otherwise load into a shallower one). Besides the configuration's, a file may hold a
/// checkpoint's `momentum.<parameter>` and `meta.*` tensors. A missing BN
/// `num_batches_tracked` is 0, as PyTorch's batch norm fills it in for a state dict without
/// version metadata (a safetensors file's).
pub fn state_for(
    config: &NetConfig,
    file: &HashMap<String, HostTensor>,
    path: &Path,
) -> Result<HashMap<String, Vec<f32>>> {
    config.validate()?;
    let specs = config.tensors();
    let mut out = HashMap::new();
    for spec in &specs {
        if spec.role == Role::Count && !file.contains_key(&spec.name) {
            out.insert(spec.name.clone(), vec![0.0]);
            continue;
        }
        let t = file.get(&spec.name).ok_or_else(|| {
            fmt_err(path, format!("missing tensor {} {:?} (the configuration is {:?})", spec.name, spec.dims, config))
        })?;
        // PyTorch's scalar counter may come as shape [] or [1].
        let same = t.dims == spec.dims || (spec.role == Role::Count && t.dims.iter().product::<usize>() == 1);
        if !same {
            return Err(fmt_err(
                path,
                format!("{} has shape {:?}, the configuration needs {:?}", spec.name, t.dims, spec.dims),
            ));
        }
        out.insert(spec.name.clone(), t.to_f32());
    }
    // Sets, not scans: a ResNet-1001 checkpoint holds thousands of tensors.
    let names: HashSet<&str> = specs.iter().map(|t| t.name.as_str()).collect();
    let learned: HashSet<&str> = specs.iter().filter(|t| t.role.learned()).map(|t| t.name.as_str()).collect();
    let known = |name: &str| {
        names.contains(name)
            || name.starts_with("meta.")
            || name.strip_prefix("momentum.").is_some_and(|n| learned.contains(n))
    };
    let mut unexpected: Vec<&String> = file.keys().filter(|n| !known(n)).collect();
    unexpected.sort();
    if let Some(first) = unexpected.first() {
        return Err(fmt_err(
            path,
            format!(
                "unexpected tensor {first} ({} in all): the configuration has no such tensor (another depth, width, unit kind or shortcut option?)",
                unexpected.len()
            ),
        ));
    }
    Ok(out)
}

/// Loads a network from a weights file or a checkpoint (a state dict saved here or from
/// PyTorch). A file that names its network (ours do) loads only into that network
/// ([`check_network`]).
pub fn load_net(gpu: &Gpu, config: &NetConfig, path: &Path) -> Result<ResNet> {
    let (file, metadata) = read_with_metadata(path)?;
    let named = |key: &str| metadata.get(key).map(String::as_str);
    check_network(config, named("variant"), named("network"), path, "weights")?;
    net_from(gpu, config, &file, path)
}

/// [`load_net`] on the tensors of `path` as [`read`] returned them.
pub(crate) fn net_from(
    gpu: &Gpu,
    config: &NetConfig,
    file: &HashMap<String, HostTensor>,
    path: &Path,
) -> Result<ResNet> {
    let state = state_for(config, file, path)?;
    let mut net = ResNet::from_state(gpu, config, &state)?;
    // The state holds f32s, exact to 2^24 only: the counter (which seeds dropout's masks, so
    // a resumed run repeats its draws) is taken from the file as the integer it is.
    let first_count = config.tensors().into_iter().find(|t| t.role == Role::Count);
    if let Some((name, t)) = first_count.and_then(|t| file.get(&t.name).map(|f| (t.name, f))) {
        let count = t.to_i64().and_then(|v| v.first().copied());
        net.batches_tracked = match count {
            Some(c) if c >= 0 => c,
            Some(c) => return Err(fmt_err(path, format!("a negative count of batches, {c}"))),
            None => return Err(fmt_err(path, format!("{name} is not a count of batches"))),
        };
    }
    load_momentum(gpu, &mut net, file, path)?;
    Ok(net)
}

/// Restores SGD's momentum buffers from `momentum.<name>` tensors where the file has them: all
/// (a checkpoint) or none (a weights file); a file with some is refused, as a run resumed from
/// it would not go on as the one that wrote it.
fn load_momentum(gpu: &Gpu, net: &mut ResNet, file: &HashMap<String, HostTensor>, path: &Path) -> Result<()> {
    let params = net.params();
    let missing: Vec<&String> =
        params.iter().map(|(name, _)| name).filter(|name| !file.contains_key(&format!("momentum.{name}"))).collect();
    if !missing.is_empty() && missing.len() < params.len() {
        return Err(fmt_err(path, format!("momentum.{} missing where other momentum buffers are there", missing[0])));
    }
    for (name, p) in params {
        if let Some(t) = file.get(&format!("momentum.{name}")) {
            if t.dims != p.momentum.dims() {
                return Err(fmt_err(
                    path,
                    format!("momentum.{name} has shape {:?}, needs {:?}", t.dims, p.momentum.dims()),
                ));
            }
            p.momentum.write(gpu, &t.to_f32())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A file system without a sync (macOS's F_FULLFSYNC refused on SMB, NTFS, FUSE) leaves
    /// the file written; other failures of the sync fail the write.
    #[test]
    fn a_sync_the_file_system_lacks_is_not_a_failure() {
        use std::io::{Error, ErrorKind};
        for code in [22, 25, 45, 95, 102] {
            assert!(super::sync_unsupported(&Error::from_raw_os_error(code)), "errno {code}");
        }
        assert!(super::sync_unsupported(&Error::from(ErrorKind::Unsupported)));
        for code in [5, 28, 122] {
            assert!(!super::sync_unsupported(&Error::from_raw_os_error(code)), "errno {code} (EIO, ENOSPC, EDQUOT)");
        }
    }
}
