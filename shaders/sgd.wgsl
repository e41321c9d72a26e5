// SGD with momentum and weight decay, as PyTorch's torch.optim.SGD (dampening 0, no Nesterov),
// in place on the weights and the momentum buffer:
//   d = g + weight_decay * w;  m = momentum * m + d;  w -= lr * m.
// (PyTorch's first step sets m = d, which is the same when m starts at zero.)
//   step:  one tensor (w, g, m at bindings 1 to 3), p.len elements.
//   step8: up to 8 tensors in one dispatch (a network's parameters are many small tensors, and
//          the host's cost is per dispatch): tensor j has lens[j / 4][j % 4] elements (0: an
//          unused slot) and its w, g, m at bindings 4 + 3j, 5 + 3j, 6 + 3j.

struct Params {
    len: u32,
    lr: u32,           // f32 bits
    momentum: u32,     // f32 bits
    weight_decay: u32, // f32 bits
    lens: array<vec4u, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;

const WG: u32 = 64u;

// (new w, new m) from w, g and m.
fn updated(wi: f32, gi: f32, mi: f32) -> vec2f {
    let d = gi + bitcast<f32>(p.weight_decay) * wi;
    let mn = bitcast<f32>(p.momentum) * mi + d;
    return vec2f(wi - bitcast<f32>(p.lr) * mn, mn);
}

@compute @workgroup_size(WG)
fn step(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.len { return; }
    let r = updated(w[i], g[i], m[i]);
    w[i] = r.x;
    m[i] = r.y;
}

@group(0) @binding(4) var<storage, read_write> w0: array<f32>;
@group(0) @binding(5) var<storage, read> g0: array<f32>;
@group(0) @binding(6) var<storage, read_write> m0: array<f32>;
@group(0) @binding(7) var<storage, read_write> w1: array<f32>;
@group(0) @binding(8) var<storage, read> g1: array<f32>;
@group(0) @binding(9) var<storage, read_write> m1: array<f32>;
@group(0) @binding(10) var<storage, read_write> w2: array<f32>;
@group(0) @binding(11) var<storage, read> g2: array<f32>;
@group(0) @binding(12) var<storage, read_write> m2: array<f32>;
@group(0) @binding(13) var<storage, read_write> w3: array<f32>;
@group(0) @binding(14) var<storage, read> g3: array<f32>;
@group(0) @binding(15) var<storage, read_write> m3: array<f32>;
@group(0) @binding(16) var<storage, read_write> w4: array<f32>;
@group(0) @binding(17) var<storage, read> g4: array<f32>;
@group(0) @binding(18) var<storage, read_write> m4: array<f32>;
@group(0) @binding(19) var<storage, read_write> w5: array<f32>;
@group(0) @binding(20) var<storage, read> g5: array<f32>;
@group(0) @binding(21) var<storage, read_write> m5: array<f32>;
@group(0) @binding(22) var<storage, read_write> w6: array<f32>;
@group(0) @binding(23) var<storage, read> g6: array<f32>;
@group(0) @binding(24) var<storage, read_write> m6: array<f32>;
@group(0) @binding(25) var<storage, read_write> w7: array<f32>;
@group(0) @binding(26) var<storage, read> g7: array<f32>;
@group(0) @binding(27) var<storage, read_write> m7: array<f32>;

@compute @workgroup_size(WG)
fn step8(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
         @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    let a = p.lens[0];
    let b = p.lens[1];
    if i < a.x { let r = updated(w0[i], g0[i], m0[i]); w0[i] = r.x; m0[i] = r.y; }
    if i < a.y { let r = updated(w1[i], g1[i], m1[i]); w1[i] = r.x; m1[i] = r.y; }
    if i < a.z { let r = updated(w2[i], g2[i], m2[i]); w2[i] = r.x; m2[i] = r.y; }
    if i < a.w { let r = updated(w3[i], g3[i], m3[i]); w3[i] = r.x; m3[i] = r.y; }
    if i < b.x { let r = updated(w4[i], g4[i], m4[i]); w4[i] = r.x; m4[i] = r.y; }
    if i < b.y { let r = updated(w5[i], g5[i], m5[i]); w5[i] = r.x; m5[i] = r.y; }
    if i < b.z { let r = updated(w6[i], g6[i], m6[i]); w6[i] = r.x; m6[i] = r.y; }
    if i < b.w { let r = updated(w7[i], g7[i], m7[i]); w7[i] = r.x; m7[i] = r.y; }
}
