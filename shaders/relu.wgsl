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

@compute @workgroup_size(WG)
fn mask_in_place(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                 @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.len { return; }
    g[i] = select(ST(0.0), g[i], y_kept[i] > ST(0.0));
}
