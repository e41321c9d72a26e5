//! The seed's analysis, measured on the GPU: for each network (any depth, placement and
//! shortcut combination of [`crate::arch::Variant`]), one training-mode forward and backward
//! at initialisation (or on given weights: [`measure_net`]), and per unit `l` the norms
//! `||x_l||`, `||F(x_l)||`, `||dE/dx_l||` and `||dE/dx_l|| / ||dE/dx_L||`; plus the check that
//! within a stage the stream is additive, `x_L = x_l + sum F` (pre-activation), or is not
//! (original, `f = ReLU`).

use std::path::Path;

use crate::arch::{Combine, NetConfig};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::net::{Probes, ResNet};
use crate::ops::pool_fc_loss::Labels;
use crate::report::{self, Series};
use crate::tensor::Tensor;

/// One network to analyse.
#[derive(Clone, Debug)]
pub struct Network {
    pub label: String,
    pub config: NetConfig,
}

/// The measurements of one variant.
#[derive(Clone, Debug)]
pub struct Measured {
    pub network: Network,
    pub probes: Probes,
}

impl Measured {
    /// `||dE/dx_l|| / ||dE/dx_L||` for `l = 0..=L`.
    pub fn ratios(&self) -> Vec<f64> {
        let n = &self.probes.norms;
        let last = n.last().map_or(1.0, |v| v[2] as f64);
        n.iter().map(|v| v[2] as f64 / last).collect()
    }
}

/// Runs the probed pass of each network (weights He-initialised from `seed`) on one batch.
pub fn measure(gpu: &Gpu, networks: &[Network], images: &Tensor, labels: &Labels, seed: u64) -> Result<Vec<Measured>> {
    let mut out = Vec::new();
    for v in networks {
        let mut net = ResNet::new(gpu, &v.config, seed)?;
        out.push(measure_net(gpu, v, &mut net, images, labels)?);
    }
    Ok(out)
}

/// Runs the probed pass of `net` (trained weights, say; `network` labels it) on one batch.
pub fn measure_net(
    gpu: &Gpu,
    network: &Network,
    net: &mut ResNet,
    images: &Tensor,
    labels: &Labels,
) -> Result<Measured> {
    let probes = net.probe(gpu, images, labels)?;
    Ok(Measured { network: network.clone(), probes })
}

/// A terminal table: every unit for shallow networks, about `rows` evenly spaced units (with
/// the first and last) for deep ones.
pub fn table(m: &Measured, rows: usize) -> String {
    let n = m.probes.norms.len();
    let step = n.div_ceil(rows.max(2)).max(1);
    let ratios = m.ratios();
    let mut s = format!(
        "{}: loss {:.4}\n{:>5} {:>12} {:>12} {:>12} {:>14}\n",
        m.network.label, m.probes.loss, "l", "||x_l||", "||F(x_l)||", "||dE/dx_l||", "/ ||dE/dx_L||"
    );
    for l in (0..n).filter(|l| l % step == 0 || *l == n - 1) {
        let v = m.probes.norms[l];
        let f = if l + 1 < n { format!("{:12.4e}", v[1]) } else { format!("{:>12}", "-") };
        // Fixed point where it reads at four decimals, else in exponent form (a scaled
        // shortcut's ratios fall to 1e-17).
        let r = ratios[l];
        let r = if (1e-2..1e7).contains(&r.abs()) { format!("{r:14.4}") } else { format!("{r:14.4e}") };
        s += &format!("{l:>5} {:12.4e} {f} {:12.4e} {r}\n", v[0], v[2]);
    }
    // The seed's direct term of dE/dx_l: with identity h and f it is dE/dx_L itself; a constant
    // scale on the shortcut multiplies it by lambda_h once per unit, so only the paths through
    // the weights are left to carry the gradient.
    if let Combine::Scale { h, .. } = m.network.config.combine {
        let units = n - 1;
        s += &format!(
            "shortcut scaled by {h}: the shortcut-only path scales dE/dx_L by {h}^{units} = {:.2e} on its way to \
             x_0 (measured, all paths: ||dE/dx_0|| / ||dE/dx_L|| = {:.2e})\n",
            (h as f64).powi(units as i32),
            ratios[0]
        );
    }
    for (i, e) in m.probes.stage_identity.iter().enumerate() {
        if let Some(e) = e {
            s += &format!("stage {}: ||x_end - (x_start + sum F)|| / ||x_end|| = {e:.2e}\n", i + 1);
        }
    }
    s
}

/// Writes every stream index `l = 0..=L` of every variant as CSV rows: `||x_l||`, the branch
/// `||F(x_l)||` of the unit it feeds (empty at `L`, which feeds none), `||dE/dx_l||` and its
/// ratio to `||dE/dx_L||`.
pub fn write_csv(path: &Path, ms: &[Measured]) -> Result<()> {
    let mut rows = Vec::new();
    for m in ms {
        let last = m.probes.norms.len().saturating_sub(1);
        for (l, (v, r)) in m.probes.norms.iter().zip(m.ratios()).enumerate() {
            rows.push(vec![
                m.network.label.clone(),
                l.to_string(),
                format!("{:e}", v[0]),
                if l < last { format!("{:e}", v[1]) } else { String::new() },
                format!("{:e}", v[2]),
                format!("{r:e}"),
            ]);
        }
    }
    report::write_csv(path, &["variant", "l", "x_norm", "branch_norm", "grad_norm", "grad_ratio_to_last"], &rows)
}

/// The gradient norms against the unit index (as a fraction of the depth, so networks of
/// different depths share the axis), variants side by side, log scale; `trained` says in the
/// title that the weights were loaded, not drawn at initialisation.
pub fn plot(path: &Path, ms: &[Measured], trained: bool) -> Result<()> {
    let series: Vec<Series> = ms
        .iter()
        .map(|m| {
            let r = m.ratios();
            let last = (r.len() - 1).max(1) as f64;
            Series {
                label: m.network.label.clone(),
                points: r.iter().enumerate().map(|(l, &v)| (l as f64 / last, v)).collect(),
            }
        })
        .collect();
    let at = if trained { "with trained weights" } else { "at initialisation" };
    report::line_chart(
        path,
        &format!("Gradient reaching unit l {at}: ||dE/dx_l|| / ||dE/dx_L||"),
        "unit index l / L",
        "||dE/dx_l|| / ||dE/dx_L||",
        &series,
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::UnitKind;

    /// The ratio column reads at four decimals where it can, and in exponent form where a
    /// fixed-point `0.0000` would hide it (a scaled shortcut's 1e-17).
    #[test]
    fn small_ratios_keep_their_digits() {
        let config = NetConfig::cifar(8, UnitKind::PreAct, false, 10).unwrap();
        let norms = vec![[1.0, 1.0, 3e-20], [1.0, 1.0, 0.5], [1.0, 1.0, 2e-3], [1.0, 0.0, 1.0]];
        let probes = Probes { loss: 2.3, norms, stage_identity: vec![None; 3] };
        let m = Measured { network: Network { label: "t".into(), config }, probes };
        let t = table(&m, 8);
        for want in ["3.0000e-20", "0.5000", "2.0000e-3", "1.0000"] {
            assert!(t.contains(want), "{want} missing:\n{t}");
        }
    }
}
