//! Throughput of the three convolution kernels on ResNet-like shapes.
//!
//!     cargo run --release --example conv_timing [reps] [filter]
//!
//! Each kernel is recorded alone in a command buffer, submitted and waited for; the first run
//! (pipeline build) is discarded and the median of `reps` runs (default 7) is reported, since other
//! work may share the CPU cores of a software adapter. GFLOP/s counts 2*N*K*C*k*k*OH*OW flops for
//! every kernel (padding taps included).
//!
//! `CONV_KERNELS=tiled` (or `register`) forces a kernel family; `CONV_KERNEL=forward` (or
//! `bwd_data`, `bwd_weight`) times one kernel only.
use std::time::{Duration, Instant};

use resnet_wgpu::ops::conv;
use resnet_wgpu::rng::Rng;
use resnet_wgpu::{Gpu, Recorder, Tensor};

/// x [N,C,H,W], K, kernel size, stride.
const SHAPES: &[([usize; 4], usize, usize, usize)] = &[
    ([32, 16, 32, 32], 16, 3, 1),
    ([32, 32, 16, 16], 32, 3, 1),
    ([32, 64, 8, 8], 64, 3, 1),
    ([32, 16, 32, 32], 32, 3, 2),
    ([32, 16, 32, 32], 32, 1, 2),
    ([32, 64, 8, 8], 64, 1, 1),
];

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(7);
    let filter = args.get(2).cloned().unwrap_or_default();
    let g = Gpu::new().unwrap();
    match std::env::var("CONV_KERNELS").as_deref() {
        Ok("tiled") => conv::set_kernels(&g, conv::Kernels::Tiled),
        Ok("register") => conv::set_kernels(&g, conv::Kernels::Register),
        _ => {}
    }
    println!("adapter: {}", g.report);
    let mut rng = Rng::new(1);
    let mut data = |n: usize| -> Vec<f32> { rng.data(n) };
    let mut total = [Duration::ZERO; 3];
    for &(xd, k, ks, stride) in SHAPES {
        let [n, c, h, w] = xd;
        let (oh, ow) = (conv::out_size(h, ks, stride), conv::out_size(w, ks, stride));
        let (wd, yd) = ([k, c, ks, ks], [n, k, oh, ow]);
        let x = Tensor::new(&g, &xd, &data(xd.iter().product())).unwrap();
        let wt = Tensor::new(&g, &wd, &data(wd.iter().product())).unwrap();
        let y = Tensor::new(&g, &yd, &data(yd.iter().product())).unwrap();
        let dx = Tensor::zeros(&g, &xd).unwrap();
        let dw = Tensor::zeros(&g, &wd).unwrap();
        let flops = 2.0 * (n * k * c * ks * ks * oh * ow) as f64;
        let name = format!("N{n} C{c} K{k} {h}x{w} k{ks} s{stride}");
        if !name.contains(&filter) {
            continue;
        }
        type Kernel<'a> = Box<dyn Fn(&mut Recorder) + 'a>;
        let kernels: [(&str, Kernel); 3] = [
            ("forward", Box::new(|r: &mut Recorder| conv::forward(r, &x, &wt, &y, stride, false).unwrap())),
            ("bwd_data", Box::new(|r: &mut Recorder| conv::backward_data(r, &y, &wt, &dx, stride, false).unwrap())),
            ("bwd_weight", Box::new(|r: &mut Recorder| conv::backward_weight(r, &x, &y, &dw, stride, false).unwrap())),
        ];
        let only = std::env::var("CONV_KERNEL").unwrap_or_default();
        for (i, (kname, f)) in kernels.iter().enumerate() {
            if !kname.contains(&only) {
                continue;
            }
            let mut times = Vec::new();
            let mut first = Duration::ZERO;
            for rep in 0..=reps {
                let mut rec = g.recorder(kname);
                f(&mut rec);
                let t = Instant::now();
                rec.run().unwrap();
                if rep > 0 {
                    times.push(t.elapsed());
                } else {
                    first = t.elapsed();
                }
            }
            let best = *times.iter().min().unwrap();
            let med = median(times);
            total[i] += med;
            println!(
                "{name:<28} {kname:<10} median {:8.2} ms  {:6.2} GFLOP/s  (best {:6.2}; first run {:.0} ms)",
                med.as_secs_f64() * 1e3,
                flops / med.as_secs_f64() / 1e9,
                flops / best.as_secs_f64() / 1e9,
                first.as_secs_f64() * 1e3
            );
        }
    }
    println!(
        "total medians: forward {:.1} ms, bwd_data {:.1} ms, bwd_weight {:.1} ms",
        total[0].as_secs_f64() * 1e3,
        total[1].as_secs_f64() * 1e3,
        total[2].as_secs_f64() * 1e3
    );
}
