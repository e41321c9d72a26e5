//! A long run holds no more GPU memory than a short one: a tiny network's live buffers and
//! their bytes (wgpu's counters) after step 10 stay exactly as they are through 300 steps.
//! Its own test binary, so that no other test allocates meanwhile.
mod common;
use common::*;
use resnet_wgpu::arch::{Combine, NetConfig, ShortcutOption, UnitKind};
use resnet_wgpu::train::soak;

#[test]
fn three_hundred_steps_keep_the_buffer_count_and_bytes_flat() {
    let g = gpu();
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
    let points = soak(g, &cfg, 4, 8, 300, 50, 7).unwrap();
    for p in &points {
        eprintln!("{p:?}");
    }
    let first = points[0].memory;
    assert!(first.buffers > 0 && first.buffer_bytes > 0, "wgpu's counters are on: {first:?}");
    assert!(points.iter().all(|p| p.loss.is_finite()));
    let base = points.iter().find(|p| p.step == 10).unwrap().memory;
    for p in points.iter().filter(|p| p.step >= 10) {
        assert_eq!(p.memory, base, "step {}: live buffers and textures changed since step 10", p.step);
    }
    assert_eq!(points.last().unwrap().step, 300);
}
