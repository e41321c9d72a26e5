//! `cargo bench`: the harness of `resnet_wgpu::bench`, printed as a table and written as JSON to
//! `target/bench.json`.
//!
//! Quick (3 warm-up + 5 runs, CIFAR stages at batch 32) on a CPU adapter, full (5 + 20, CIFAR at
//! batch 128 and ImageNet-like stages at batch 32) on a GPU, unless told otherwise:
//!
//!     cargo bench --bench units -- [--quick|--full] [--reps R] [--warmup W]
//!         [--shapes N,C,H,W ...] [--only SUBSTRING] [--skip SUBSTRING] [--profile]
//!         [--leave-out] [--wall] [--peers] [--burn PATH] [--burn-adapter cpu|gpu]
//!         [--torch PATH] [--python PY] [--json PATH]
//!
//! (`--shapes`, `--only`, `--skip`, `--profile`, `--leave-out`, `--burn`, `--torch` and `--json`
//! as in `resnet-wgpu bench`; `--shape N,C,H,W` takes one shape and may be repeated.)
//!
//! `--peers` runs both peers from their default places (`~/burn-unit/target/release/burn-unit`,
//! `../shared/peers/torch_unit.py`), those that are there; `--burn` or `--torch` naming no file
//! is an error. The same settings as environment variables: `BENCH_QUICK=1`, `BENCH_FULL=1`
//! (`0` or `off` for the other), `BENCH_REPS`, `BENCH_WARMUP`, `BENCH_SHAPES="N,C,H,W N,C,H,W"`,
//! `BENCH_ONLY`, `BENCH_SKIP`, `BENCH_BURN`, `BENCH_TORCH`, `BENCH_JSON`; arguments win.

use std::path::PathBuf;
use std::process::ExitCode;

use resnet_wgpu::bench::{self, BenchOptions};
use resnet_wgpu::{Error, Gpu, Result};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A switch variable: `1`/`on`/`true` or `0`/`off`/`false`; anything else is an error.
fn switch(name: &str) -> Result<Option<bool>> {
    match env(name).map(|v| v.to_lowercase()).as_deref() {
        None => Ok(None),
        Some("1" | "on" | "true") => Ok(Some(true)),
        Some("0" | "off" | "false") => Ok(Some(false)),
        Some(v) => Err(Error::Invalid(format!("{name} takes 1 or 0, on or off, got {v:?}"))),
    }
}

fn number(flag: &str, v: Option<String>) -> Result<usize> {
    v.as_deref().and_then(|s| s.parse().ok()).ok_or_else(|| Error::Invalid(format!("{flag} needs a number, got {v:?}")))
}

fn run() -> Result<()> {
    // `cargo bench` passes `--bench`; everything after `--` comes too.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();

    let mut quick = match (switch("BENCH_QUICK")?, switch("BENCH_FULL")?) {
        (Some(q), _) => Some(q),
        (_, Some(f)) => Some(!f),
        _ => None,
    };
    let mut reps = env("BENCH_REPS").map(|v| number("BENCH_REPS", Some(v))).transpose()?;
    let mut warmup = env("BENCH_WARMUP").map(|v| number("BENCH_WARMUP", Some(v))).transpose()?;
    let mut shapes: Vec<[usize; 4]> =
        env("BENCH_SHAPES").map_or(Ok(Vec::new()), |s| s.split_whitespace().map(bench::parse_shape).collect())?;
    let mut only = env("BENCH_ONLY");
    let mut skip = env("BENCH_SKIP");
    let mut burn = env("BENCH_BURN").map(PathBuf::from);
    let mut torch = env("BENCH_TORCH").map(PathBuf::from);
    let mut burn_adapter = None;
    let mut python = None;
    let mut wall = false;
    let mut profile = false;
    let mut leave_out = false;
    let default_json = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"), PathBuf::from)
        .join("bench.json");
    let mut json = env("BENCH_JSON").map_or(default_json, PathBuf::from);

    let mut it = args.into_iter().peekable();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = Some(true),
            "--full" => quick = Some(false),
            "--reps" => reps = Some(number("--reps", it.next())?),
            "--warmup" => warmup = Some(number("--warmup", it.next())?),
            "--shape" => shapes.push(bench::parse_shape(&it.next().unwrap_or_default())?),
            "--shapes" => {
                // The shapes up to the next flag, at least one.
                let first = it.next().unwrap_or_default();
                shapes.push(bench::parse_shape(&first)?);
                while let Some(s) = it.next_if(|s| !s.starts_with("--")) {
                    shapes.push(bench::parse_shape(&s)?);
                }
            }
            "--profile" => profile = true,
            "--leave-out" => leave_out = true,
            "--only" => only = it.next(),
            "--skip" => skip = it.next(),
            "--wall" => wall = true,
            "--peers" => {
                // Those found: a path given by hand that names no file is an error, a default
                // place that holds nothing is not.
                let found = |path: PathBuf| match path.is_file() {
                    true => Some(path),
                    false => {
                        eprintln!("note: no peer at {}: skipped", path.display());
                        None
                    }
                };
                burn = found(bench::default_burn_path());
                torch = found(bench::default_torch_path());
            }
            "--burn" => burn = it.next().map(PathBuf::from),
            "--burn-adapter" => burn_adapter = it.next(),
            "--torch" => torch = it.next().map(PathBuf::from),
            "--python" => python = it.next(),
            "--json" => json = it.next().map(PathBuf::from).unwrap_or(json),
            other => return Err(Error::Invalid(format!("unknown argument {other:?} (see benches/units.rs)"))),
        }
    }

    let gpu = Gpu::new()?;
    let mut opts = BenchOptions::for_adapter(&gpu, quick);
    if let Some(r) = reps {
        opts.reps = r;
    }
    if let Some(w) = warmup {
        opts.warmup = w;
    }
    if !shapes.is_empty() {
        opts.shapes = Some(shapes);
    }
    opts.only = only;
    opts.skip = skip;
    opts.timestamps = !wall;
    opts.profile = profile;
    opts.leave_out = leave_out;
    opts.burn = burn;
    opts.burn_adapter = burn_adapter;
    opts.torch = torch;
    if let Some(p) = python {
        opts.python = p;
    }
    eprintln!(
        "bench on {} ({} mode: {} warm-up + {} runs)",
        gpu.report.name,
        if opts.quick { "quick" } else { "full" },
        opts.warmup,
        opts.reps
    );

    let report = bench::run_all(&gpu, &opts)?;
    bench::print_table(&report);
    if let Some(dir) = json.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&json, bench::to_json(&report))
        .map_err(|source| Error::Io { path: json.display().to_string(), source })?;
    println!("wrote {}", json.display());
    Ok(())
}
