// Combining a unit's shortcut and branch, the paper's Table 1: y = s_h * h + s_f * F, then an
// optional ReLU (the original unit's f). Per element i, (s_h, s_f) is
//   mode 0, constant scaling:      (lambda_h, lambda_f)   (the plain sum is (1, 1))
//   mode 1, exclusive gating:      (1 - g[i], g[i])
//   mode 2, shortcut-only gating:  (1 - g[i], 1)
//   mode 3, dropout on h:          (keep(i) ? lambda_h : 0, 1), lambda_h = 1 / (1 - rate)
// keep(i) is a hash of the seed and i (the same function as rng::dropout_keep on the host), so
// the backward redraws the forward's mask instead of storing it.

struct Params {
    len: u32,
    mode: u32,
    lambda_h: f32,
    lambda_f: f32,
    seed: u32,
    threshold: u32, // dropout drops i when its hash is below this
    relu: u32,      // forward: y = max(., 0)
    base: u32,      // the flat index of element 0 (a chunk of a larger tensor): the mask's index
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> h: array<f32>;
@group(0) @binding(2) var<storage, read> f: array<f32>;
@group(0) @binding(3) var<storage, read> g: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read_write> dh: array<f32>;
@group(0) @binding(7) var<storage, read_write> df: array<f32>;
@group(0) @binding(8) var<storage, read_write> dg: array<f32>;

const WG: u32 = 64u;

fn pcg_hash(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn coefficients(i: u32) -> vec2f {
    switch p.mode {
        case 1u: { return vec2f(1.0 - g[i], g[i]); }
        case 2u: { return vec2f(1.0 - g[i], 1.0); }
        case 3u: {
            if pcg_hash(p.seed ^ pcg_hash(p.base + i)) >= p.threshold { return vec2f(p.lambda_h, 1.0); }
            return vec2f(0.0, 1.0);
        }
        default: { return vec2f(p.lambda_h, p.lambda_f); }
    }
}

fn flat(wid: vec3u, nwg: vec3u, lid: vec3u) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid.x;
}

// y = s_h * h + s_f * F (then ReLU if p.relu)
@compute @workgroup_size(WG)
fn forward(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
           @builtin(local_invocation_id) lid: vec3u) {
    let i = flat(wid, nwg, lid);
    if i >= p.len { return; }
    let s = coefficients(i);
    var v = s.x * h[i] + s.y * f[i];
    if p.relu == 1u { v = max(v, 0.0); }
    y[i] = v;
}

// dh = s_h * dy, dF = s_f * dy
@compute @workgroup_size(WG)
fn backward(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
            @builtin(local_invocation_id) lid: vec3u) {
    let i = flat(wid, nwg, lid);
    if i >= p.len { return; }
    let s = coefficients(i);
    let d = dy[i];
    dh[i] = s.x * d;
    df[i] = s.y * d;
}

// The gated modes also give dE/dg: exclusive y = h + g (F - h), shortcut-only y = h - g h + F.
@compute @workgroup_size(WG)
fn backward_gate(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                 @builtin(local_invocation_id) lid: vec3u) {
    let i = flat(wid, nwg, lid);
    if i >= p.len { return; }
    let s = coefficients(i);
    let d = dy[i];
    let hi = h[i];
    dh[i] = s.x * d;
    df[i] = s.y * d;
    if p.mode == 1u { dg[i] = d * (f[i] - hi); } else { dg[i] = -d * hi; }
}
