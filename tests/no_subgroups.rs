//! On an adapter without subgroup operations (`RESNET_WGPU_SUBGROUPS=0` makes this one act as
//! one): the modules leave out the kernels that need them, the ops take the portable kernels
//! (batch norm's reductions: the workgroup-memory tree), and units still match the reference.
mod common;
use common::*;
use resnet_wgpu::arch::{Combine, NetConfig, ShortcutOption, UnitKind};
use resnet_wgpu::ops::batch_norm::{Kernels, set_kernels};

#[test]
fn units_match_the_reference_without_subgroups() {
    // SAFETY: this binary's only test sets the variable before anything (wgpu included) has
    // started a thread that could read the environment.
    unsafe { std::env::set_var("RESNET_WGPU_SUBGROUPS", "0") };
    let g = gpu();
    assert!(!g.report.features.contains(wgpu::Features::SUBGROUP), "{}", g.report);
    let mut rng = Rng::new(5);
    // Batch norm's texture kernels (this adapter's default) and the wide ones (GPUs'): their
    // partial and final reductions both go through the tree here. The wide ones under both
    // units: the original unit's statistics come from its convolutions' epilogues (only its BN
    // backward runs the wide kernels), the pre-activation unit's first from stats_partial_w.
    let cases =
        [(UnitKind::PreAct, Kernels::Texture), (UnitKind::Original, Kernels::Wide), (UnitKind::PreAct, Kernels::Wide)];
    for (seed, (kind, kernels)) in cases.into_iter().enumerate() {
        set_kernels(g, kernels);
        let cfg = NetConfig {
            kind,
            combine: Combine::Add,
            units_per_stage: 1,
            bottleneck: false,
            shortcut: ShortcutOption::B,
            widths: [3, 5, 6],
            in_channels: 3,
            classes: 3,
        };
        let units = cfg.units();
        // An identity unit at 8x8 (where a subgroup adapter would take the register path) and
        // the stride-2 projection unit after it on odd sizes, batch 1.
        check_unit(&cfg, &units[0], [2, 3, 8, 8], seed as u64, &mut rng);
        check_unit(&cfg, &units[1], [1, 3, 7, 5], seed as u64 + 10, &mut rng);
    }
}
