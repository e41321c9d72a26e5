// Probes for the analysis: squared norms and differences of GPU tensors, computed where the
// tensors live. One workgroup per reduction, a fixed-order tree: deterministic, no atomics.

struct Params {
    len: u32,
    slot: u32, // which element of `out` receives the result
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> a: array<f32>;
@group(0) @binding(4) var<storage, read_write> b: array<f32>;

const WG: u32 = 256u;
var<workgroup> part: array<f32, WG>;

// out[slot] = sum x[i]^2
@compute @workgroup_size(WG)
fn sum_squares(@builtin(local_invocation_id) lid: vec3u) {
    var s = 0.0;
    for (var i = lid.x; i < p.len; i += WG) {
        s += x[i] * x[i];
    }
    part[lid.x] = s;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w /= 2u) {
        if lid.x < w {
            part[lid.x] += part[lid.x + w];
        }
        workgroupBarrier();
    }
    if lid.x == 0u {
        out[p.slot] = part[0];
    }
}

// b = a - b, element-wise (the branch F = y - h(x) from the output and the shortcut).
@compute @workgroup_size(64)
fn subtract_from(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                 @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * 64u + lid.x;
    if i >= p.len { return; }
    b[i] = a[i] - b[i];
}
