// The gate of the gated shortcuts: g = sigmoid(z + b), where z = conv1x1(x) comes from the
// convolution kernels (shaders/conv.wgsl). Backward: dz = dg * g * (1 - g) and db = the sum of
// dz over N, H and W, one workgroup per channel in a fixed order (deterministic).

struct Params {
    len: u32,
    c: u32,  // channels
    hw: u32, // H * W
    n: u32,  // batch
    accumulate: u32, // bias_grad: 1 adds into db (a later chunk of the batch)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> z: array<f32>;   // z in, g out
@group(0) @binding(3) var<storage, read> g: array<f32>;
@group(0) @binding(4) var<storage, read_write> d: array<f32>;   // dg in, dz out
@group(0) @binding(5) var<storage, read> dz: array<f32>;
@group(0) @binding(6) var<storage, read_write> db: array<f32>;

const WG: u32 = 64u;

fn flat(wid: vec3u, nwg: vec3u, lid: vec3u) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid.x;
}

// z = sigmoid(z + b[c]), in place
@compute @workgroup_size(WG)
fn bias_sigmoid(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                @builtin(local_invocation_id) lid: vec3u) {
    let i = flat(wid, nwg, lid);
    if i >= p.len { return; }
    let c = (i / p.hw) % p.c;
    z[i] = 1.0 / (1.0 + exp(-(z[i] + b[c])));
}

// d = d * g * (1 - g), in place
@compute @workgroup_size(WG)
fn sigmoid_backward(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                    @builtin(local_invocation_id) lid: vec3u) {
    let i = flat(wid, nwg, lid);
    if i >= p.len { return; }
    let s = g[i];
    d[i] = d[i] * s * (1.0 - s);
}

var<workgroup> part: array<f32, WG>;

// db[c] = sum over n, h, w of dz; workgroup c.
@compute @workgroup_size(WG)
fn bias_grad(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let c = wid.x;
    var s = 0.0;
    for (var n = 0u; n < p.n; n++) {
        let base = (n * p.c + c) * p.hw;
        for (var j = lid.x; j < p.hw; j += WG) {
            s += dz[base + j];
        }
    }
    part[lid.x] = s;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k /= 2u) {
        if lid.x < k { part[lid.x] += part[lid.x + k]; }
        workgroupBarrier();
    }
    if lid.x == 0u {
        if p.accumulate == 1u { db[c] += part[0]; } else { db[c] = part[0]; }
    }
}
