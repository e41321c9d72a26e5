// ReLU: forward y = max(x, 0); backward dx (=|+=) dy * [x > 0].

struct Params {
    len: u32,
    accumulate: u32, // backward: 1 adds into dx, 0 overwrites it
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

const WG: u32 = 64u;

@compute @workgroup_size(WG)
fn forward(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
           @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.len { return; }
    y[i] = max(x[i], 0.0);
}

@compute @workgroup_size(WG)
fn backward(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
            @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.len { return; }
    let g = select(0.0, dy[i], x[i] > 0.0);
    if p.accumulate == 1u { dx[i] += g; } else { dx[i] = g; }
}

// Backward of a ReLU whose output y is kept, in place on the gradient: dy *= [y > 0].
// (The original unit's f = ReLU after the addition: its input gradient overwrites its output's.)
@group(0) @binding(5) var<storage, read> y_kept: array<f32>;
@group(0) @binding(6) var<storage, read_write> g: array<f32>;

@compute @workgroup_size(WG)
fn mask_in_place(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                 @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.len { return; }
    g[i] = select(0.0, g[i], y_kept[i] > 0.0);
}
