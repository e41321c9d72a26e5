//! A long training run's GPU memory: `cargo run --release --example soak -- [--steps 2000]`
//! runs SGD steps of a tiny pre-activation network (widths 4, 8, 8; batch 4 of 3x8x8 random
//! images, new data each step) and prints the device's live buffers and their bytes (wgpu's
//! counters) along the way; they must stay flat after the first steps. Exits non-zero if not.
use resnet_wgpu::arch::{Combine, NetConfig, ShortcutOption, UnitKind};
use resnet_wgpu::{Gpu, train};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let steps = match args.iter().position(|a| a == "--steps") {
        Some(i) => args.get(i + 1).ok_or("--steps needs a number")?.parse()?,
        None => 2000,
    };
    let gpu = Gpu::new()?;
    println!("adapter: {}", gpu.report);
    let cfg = NetConfig {
        kind: UnitKind::PreAct,
        combine: Combine::Add,
        units_per_stage: 1,
        bottleneck: false,
        shortcut: ShortcutOption::B,
        widths: [4, 8, 8],
        in_channels: 3,
        classes: 10,
    };
    let points = train::soak(&gpu, &cfg, 4, 8, steps, (steps / 10).max(1), 7)?;
    println!(
        "{:>6} {:>9} {:>8} {:>12} {:>9} {:>13} {:>8}",
        "step", "loss", "buffers", "buffer bytes", "textures", "texture bytes", "s"
    );
    for p in &points {
        let m = p.memory;
        println!(
            "{:>6} {:>9.4} {:>8} {:>12} {:>9} {:>13} {:>8.1}",
            p.step, p.loss, m.buffers, m.buffer_bytes, m.textures, m.texture_bytes, p.seconds
        );
    }
    let base = points.iter().find(|p| p.step >= 10).ok_or("fewer than 10 steps")?;
    let flat = points.iter().filter(|p| p.step >= base.step).all(|p| p.memory == base.memory);
    println!("{}", if flat { "flat after step 10" } else { "NOT flat after step 10" });
    if !flat {
        std::process::exit(1);
    }
    Ok(())
}
