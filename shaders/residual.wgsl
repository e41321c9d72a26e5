// The residual addition, in place on the stream: x_{l+1} = x_l + F(x_l).
// (Its backward is no kernel of its own: the branch's backward adds into the stream's gradient,
// g_l = g_{l+1} + (dF/dx_l)^T g_{l+1}, through the `accumulate` flag of the backward kernels.)

struct Params {
    len: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> branch: array<f32>;
@group(0) @binding(2) var<storage, read_write> stream: array<f32>;

const WG: u32 = 64u;

// stream += branch
@compute @workgroup_size(WG)
fn add(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
       @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.len { return; }
    stream[i] += branch[i];
}
