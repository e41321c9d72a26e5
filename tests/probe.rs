//! The analysis probes: the kernels against the reference, and a probed pass's per-unit norms
//! of x_l, F(x_l) and dE/dx_l against the reference network's own tensors.
mod common;
use common::*;
use resnet_wgpu::arch::{Combine, NetConfig, ShortcutOption, UnitKind};
use resnet_wgpu::net::ResNet;
use resnet_wgpu::ops::pool_fc_loss::upload_labels;
use resnet_wgpu::ops::probe;
use resnet_wgpu::reference::{net as rnet, probe as rprobe, to_f64};

#[test]
fn probe_kernels_match_the_reference() {
    let g = gpu();
    let mut rng = Rng::new(70);
    for n in [1usize, 5, 255, 256, 257, 3000] {
        let (a, b) = (rng.data(n), rng.data(n));
        let (ta, tb) = (upload(&[n], &a), upload(&[n], &b));
        let out = poisoned(&[3]);
        let mut rec = g.recorder("probe");
        probe::sum_squares(&mut rec, &ta, &out, 1).unwrap();
        probe::subtract_from(&mut rec, &ta, &tb).unwrap();
        rec.run().unwrap();
        let got = read(&out);
        assert!(got[0].is_nan() && got[2].is_nan(), "only the slot is written");
        check(&format!("sum_squares {n}"), &got[1..2], &[rprobe::sum_squares(&to_f64(&a))], F32_TOL);
        check(&format!("subtract {n}"), &read(&tb), &rprobe::subtract(&to_f64(&a), &to_f64(&b)), F32_TOL);
    }
    let mut rec = g.recorder("bad");
    let (t, out) = (upload(&[2], &[1.0, 2.0]), poisoned(&[2]));
    refused(probe::sum_squares(&mut rec, &t, &out, 2), "past the 2 outputs");
    refused(probe::sum_squares(&mut rec, &t, &t, 1), "of its own");
    // b = a - b with b = a: one buffer bound read-only and read-write (wgpu refuses the whole
    // submission); past the binding limit it ran, as zeros.
    refused(probe::subtract_from(&mut rec, &t, &t), "must not alias");
}

fn norm(v: &[f64]) -> f64 {
    rprobe::sum_squares(v).sqrt()
}

#[test]
fn probed_norms_match_the_reference() {
    let g = gpu();
    let mut rng = Rng::new(71);
    for kind in [UnitKind::PreAct, UnitKind::Original] {
        let cfg = NetConfig {
            kind,
            combine: Combine::Add,
            units_per_stage: 3,
            bottleneck: false,
            shortcut: ShortcutOption::B,
            widths: [3, 5, 6],
            in_channels: 3,
            classes: 4,
        };
        let state = random_state(&cfg, 72);
        let mut net = ResNet::from_state(g, &cfg, &state).unwrap();
        let dims = [2, 3, 7, 6];
        let x = rng.data(dims.iter().product());
        let labels = [1u32, 3];
        let p = net.probe(g, &upload(&dims, &x), &upload_labels(g, &labels, 4).unwrap()).unwrap();
        let want = rnet::train_pass(&cfg, &to_ref(&state), &to_f64(&x), dims, &[1, 3]);
        let l_count = cfg.units().len();
        assert_eq!(p.norms.len(), l_count + 1);
        for l in 0..=l_count {
            let f = if l < l_count { norm(&want.branches[l]) } else { 0.0 };
            // Each norm on its own: the gradient's is a few percent of the stream's.
            let w = [norm(&want.streams[l]), f, norm(&want.stream_grads[l])];
            for (i, what) in ["|x_l|", "|F_l|", "|dE/dx_l|"].into_iter().enumerate() {
                if l == l_count && i == 1 {
                    assert_eq!(p.norms[l][1], 0.0, "{kind:?}: no branch after the last unit");
                } else {
                    check(&format!("{kind:?} {what} at l={l}"), &p.norms[l][i..=i], &w[i..=i], F32_TOL);
                }
            }
        }
        // Stages 1..3 each have identity units; pre-activation streams are additive within a
        // stage, original ones (f = ReLU) are not.
        for (s, e) in p.stage_identity.iter().enumerate() {
            let e = e.expect("every stage has identity units");
            eprintln!("{kind:?} stage {s}: |x_end - (x_start + sum F)| / |x_end| = {e:.2e}");
            match kind {
                UnitKind::PreAct => assert!(e < 1e-5, "stage {s}: {e}"),
                _ => assert!(e > 1e-3, "stage {s}: {e}"),
            }
        }
    }
}
