// ReLU: forward y = max(x, 0); backward dx (=|+=) dy * [x > 0].
// ST, the storage type of every tensor, is f32, or f16 in the module of the f16 path
// (ops/relu.rs `mask_in_place_f16`; the host prepends the alias).

struct Params {
    len: u32,
    accumulate: u32, // backward: 1 adds into dx, 0 overwrites it
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<ST>;
@group(0) @binding(2) var<storage, read_write> y: array<ST>;
@group(0) @binding(3) var<storage, read> dy: array<ST>;
@group(0) @binding(4) var<storage, read_write> dx: array<ST>;

const WG: u32 = 64u;

@compute @workgroup_size(WG)
fn forward(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
           @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.len { return; }
    y[i] = max(x[i], ST(0.0));
}

@compute @workgroup_size(WG)
fn backward(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
            @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.len { return; }
    let g = select(0.0, f32(dy[i]), x[i] > ST(0.0));
    if p.accumulate == 1u { dx[i] = ST(f32(dx[i]) + g); } else { dx[i] = ST(g); }
}

// Backward of a ReLU whose output y is kept, in place on the gradient: dy *= [y > 0].
// (The original unit's f = ReLU after the addition: its input gradient overwrites its output's.)
@group(0) @binding(5) var<storage, read> y_kept: array<ST>;
@group(0) @binding(6) var<storage, read_write> g: array<ST>;

// An invocation takes 4 elements WG apart (a workgroup 4 * WG consecutive ones) and, where all
// four exist, loads them before it stores any: four loads in flight, as in conv.wgsl's
// reduce_splits (one element per invocation ran at 1 TB/s on the H200, BENCHMARKS.md cfa22d4).
@compute @workgroup_size(WG)
fn mask_in_place(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                 @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * 4u * WG + lid.x + vec4u(0u, WG, 2u * WG, 3u * WG);
    if i.w < p.len {
        let keep = vec4<ST>(y_kept[i.x], y_kept[i.y], y_kept[i.z], y_kept[i.w]) > vec4<ST>(0.0);
        let m = select(vec4<ST>(0.0), vec4<ST>(g[i.x], g[i.y], g[i.z], g[i.w]), keep);
        g[i.x] = m.x;
        g[i.y] = m.y;
        g[i.z] = m.z;
        g[i.w] = m.w;
    } else {
        mask_one(i.x);
        mask_one(i.y);
        mask_one(i.z);
    }
}

fn mask_one(i: u32) {
    if i < p.len { g[i] = select(ST(0.0), g[i], y_kept[i] > ST(0.0)); }
}
