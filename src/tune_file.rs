//! The autotuner's choices kept on disk, so that a new process on the same adapter takes them
//! instead of timing every candidate again (and building every candidate's pipelines: on a
//! GPU the tuner builds about ten per convolution shape, where a choice read back builds one).
//!
//! Opt-in: [`crate::GpuOptions::tune_file`] (`RESNET_WGPU_TUNE_FILE=<path>`). The file is JSON,
//! one object per context, each mapping a decision to the name of the candidate chosen:
//!
//! ```json
//! {
//!   "resnet-wgpu 0.1.0; NVIDIA H100 80GB HBM3 (Vulkan, DiscreteGpu, driver ...); features [...]; ...": {
//!     "tile Forward x [32, 64, 56, 56] k 64 ks 3 stride 1": "64x64k16t4x4",
//!     "split Forward x [32, 512, 7, 7] k 512 ks 3 stride 1 under 64x64k16t4x4 split 3": "whole"
//!   }
//! }
//! ```
//!
//! A context's key names what its timings depend on: the crate's version and its kernels' code,
//! the adapter, its driver, the features in use and how the shaders are built. Contexts that differ in any of
//! them (another card, `RESNET_WGPU_SHADER_CHECKS=none`) keep choices of their own in the same
//! file. A recorded name the tuner no longer offers is timed again and replaced; other
//! contexts' entries are kept as they are. An empty file is a tune file with no choices yet.
//!
//! Processes sharing a file take turns: each read-merge-write holds an advisory lock on
//! `<file>.lock` beside it (where the file system has such locks), so no process's choices are
//! lost to another's write, and each write goes through a temporary file of its own, synced,
//! then renamed over the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// Every context's choices: context key -> decision -> chosen candidate's name.
type Choices = BTreeMap<String, BTreeMap<String, String>>;

/// One read-and-write of a tune file at a time: in this process (contexts may share a file),
/// and between processes through an advisory lock on `<path>.lock`, held until both are
/// dropped. Where the lock cannot be had (a file system without locks), only this process's
/// turn is kept: between processes the last write then wins, and a choice lost so is timed
/// again later.
fn writing(path: &Path) -> (std::sync::MutexGuard<'static, ()>, Option<std::fs::File>) {
    static WRITING: Mutex<()> = Mutex::new(());
    let turn = WRITING.lock().unwrap_or_else(|e| e.into_inner());
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(lock).ok();
    (turn, file.filter(|f| f.lock().is_ok()))
}

/// A tune file opened for one context.
pub(crate) struct TuneFile {
    path: PathBuf,
    context: String,
    /// This context's choices: those read at opening, then those made since; and those made
    /// since alone, the ones a write merges into the file (the rest are the file's to keep:
    /// another process may have replaced them since).
    choices: Mutex<(BTreeMap<String, String>, BTreeMap<String, String>)>,
    /// Whether a failed write has been reported (once per context).
    warned: AtomicBool,
}

impl TuneFile {
    /// Reads `path`'s choices for `context`, or (no file there) creates it empty, so that a path
    /// that cannot be written is reported now rather than lost at the first choice.
    pub(crate) fn open(path: &Path, context: String) -> Result<TuneFile> {
        let _writing = writing(path);
        let all = match std::fs::read_to_string(path) {
            Ok(text) => parse(path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write(path, &Choices::new())?;
                Choices::new()
            }
            Err(source) => return Err(Error::Io { path: path.display().to_string(), source }),
        };
        let mine = all.get(&context).cloned().unwrap_or_default();
        let choices = Mutex::new((mine, BTreeMap::new()));
        Ok(TuneFile { path: path.to_path_buf(), context, choices, warned: AtomicBool::new(false) })
    }

    /// The path it was opened at.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// How many choices this context has.
    pub(crate) fn len(&self) -> usize {
        self.lock().0.len()
    }

    /// The recorded choice for `decision`, if any.
    pub(crate) fn get(&self, decision: &str) -> Option<String> {
        self.lock().0.get(decision).cloned()
    }

    /// Records `choice` for `decision` and writes the file: read again and merged with the
    /// choices this context made (another process may have added or replaced choices since,
    /// and those read at opening are not written back over them), then replaced whole through
    /// a temporary file, so that a reader never sees half a file. A write that fails is
    /// reported on stderr once and the choice kept in memory (and written with the next): the
    /// tuning itself stays valid.
    pub(crate) fn record(&self, decision: &str, choice: &str) {
        let _writing = writing(&self.path);
        let mut guard = self.lock();
        let (all_mine, made) = &mut *guard;
        all_mine.insert(decision.to_string(), choice.to_string());
        made.insert(decision.to_string(), choice.to_string());
        let on_disk = match std::fs::read_to_string(&self.path) {
            Ok(text) => parse(&self.path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Choices::new()),
            Err(source) => Err(Error::Io { path: self.path.display().to_string(), source }),
        };
        let written = on_disk.and_then(|mut all| {
            all.entry(self.context.clone()).or_default().extend(made.clone());
            write(&self.path, &all)
        });
        if let Err(e) = written
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            eprintln!("resnet-wgpu: the autotuner's choices were not saved: {e}");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (BTreeMap<String, String>, BTreeMap<String, String>)> {
        self.choices.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn parse(path: &Path, text: &str) -> Result<Choices> {
    // An empty file (made by `touch` or `mktemp`, or left by a crash mid-write on some file
    // systems) holds no choices yet.
    if text.trim().is_empty() {
        return Ok(Choices::new());
    }
    serde_json::from_str(text).map_err(|e| Error::Format {
        path: path.display().to_string(),
        msg: format!("not a tune file (a JSON object of objects of strings): {e}"),
    })
}

/// Writes `all` to `path` whole or not at all ([`crate::io::replace_file`]).
fn write(path: &Path, all: &Choices) -> Result<()> {
    let text = serde_json::to_string_pretty(all)
        .map_err(|e| Error::Format { path: path.display().to_string(), msg: e.to_string() })?;
    crate::io::replace_file(path, (text + "\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write merges the choices this process made, not those it read at opening: another
    /// process's replacement of one (or the user's removal) stays.
    #[test]
    fn a_record_leaves_what_it_read_at_opening_to_the_file() {
        let dir = std::env::temp_dir().join(format!("resnet-wgpu-tune-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tune.json");
        let at = |pairs: &[(&str, &str)]| -> Choices {
            let mine = pairs.iter().map(|(d, c)| (d.to_string(), c.to_string())).collect();
            [("ctx".to_string(), mine)].into_iter().collect()
        };
        write(&path, &at(&[("d1", "a"), ("d2", "x")])).unwrap();
        let file = TuneFile::open(&path, "ctx".into()).unwrap();
        assert_eq!(file.get("d1").as_deref(), Some("a"));
        // Meanwhile another process re-tuned d1, and d2 was removed.
        write(&path, &at(&[("d1", "b")])).unwrap();
        file.record("d3", "z");
        let on_disk = parse(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(on_disk, at(&[("d1", "b"), ("d3", "z")]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
