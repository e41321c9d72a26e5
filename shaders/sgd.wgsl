// SGD with momentum and weight decay, as PyTorch's torch.optim.SGD (dampening 0, no Nesterov),
// in place on the weights and the momentum buffer:
//   d = g + weight_decay * w;  m = momentum * m + d;  w -= lr * m.
// (PyTorch's first step sets m = d, which is the same when m starts at zero.)

struct Params {
    len: u32,
    lr: u32,           // f32 bits
    momentum: u32,     // f32 bits
    weight_decay: u32, // f32 bits
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;

const WG: u32 = 64u;

@compute @workgroup_size(WG)
fn step(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.len { return; }
    let wi = w[i];
    let d = g[i] + bitcast<f32>(p.weight_decay) * wi;
    let mi = bitcast<f32>(p.momentum) * m[i] + d;
    m[i] = mi;
    w[i] = wi - bitcast<f32>(p.lr) * mi;
}
