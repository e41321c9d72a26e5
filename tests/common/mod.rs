//! Shared test helpers: one GPU context per test binary, seeded data, and the comparison that
//! every GPU result goes through.
#![allow(dead_code)]

use std::sync::OnceLock;

use resnet_wgpu::reference::{max_abs, rel_l2};
use resnet_wgpu::{Gpu, Tensor};

pub use resnet_wgpu::rng::Rng;

/// The f32 bound on relative L2 error against the f64 reference.
pub const F32_TOL: f64 = 1e-5;

/// One context for the whole test binary; prints the adapter the first time.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let gpu = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
        // Written to stderr directly, past the test harness's capture, so every run names its
        // adapter.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "adapter: {}", gpu.report);
        gpu
    })
}

/// A NaN-poisoned output tensor: an element the kernel forgets to write fails the comparison.
pub fn poisoned(dims: &[usize]) -> Tensor {
    Tensor::filled(gpu(), dims, f32::NAN).expect("poisoned tensor")
}

/// Uploads host data.
pub fn upload(dims: &[usize], data: &[f32]) -> Tensor {
    Tensor::new(gpu(), dims, data).expect("upload")
}

/// Reads back a tensor.
pub fn read(t: &Tensor) -> Vec<f32> {
    t.read(gpu()).expect("read back")
}

/// Asserts `got` (GPU, f32) matches `want` (reference, f64): no NaN, relative L2 <= tol.
/// Prints both error measures.
pub fn check(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let nan = got.iter().filter(|v| !v.is_finite()).count();
    let rel = rel_l2(got, want);
    let max = max_abs(got, want);
    eprintln!("{name}: rel L2 {rel:.2e}, max abs {max:.2e}");
    assert_eq!(nan, 0, "{name}: {nan} non-finite elements (unwritten or overflowed)");
    assert!(rel <= tol, "{name}: relative L2 error {rel:.3e} > {tol:.0e} (max abs {max:.3e})");
}
