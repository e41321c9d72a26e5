// The residual addition and the parameter-free shortcut.
//
// The add is in place on the stream: x_{l+1} = x_l + F(x_l). Its backward is no kernel of its
// own: the branch's backward adds into the stream's gradient, g_l = g_{l+1} + (dF/dx_l)^T g_{l+1},
// through the `accumulate` flag of the backward kernels.
//
// Option A (units that change shape): h(x) = x subsampled by the stride, extra channels zero.
//
// ST, the storage type of every tensor, is f32, or f16 in the module of the f16 path
// (ops/residual.rs `*_f16`; the host prepends the alias).

struct Params {
    len: u32,    // elements written
    c_in: u32,   // channels of the unit's input
    c_out: u32,  // channels of the unit's output
    h_in: u32, w_in: u32, h_out: u32, w_out: u32,
    accumulate: u32,
    stride: u32, // 1 (channels padded only) or 2
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> branch: array<ST>;
@group(0) @binding(2) var<storage, read_write> stream: array<ST>;
@group(0) @binding(3) var<storage, read> src: array<ST>;
@group(0) @binding(4) var<storage, read_write> dst: array<ST>;

const WG: u32 = 64u;

fn flat(wid: vec3u, nwg: vec3u, lid: vec3u) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid.x;
}

// stream += branch
@compute @workgroup_size(WG)
fn add(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
       @builtin(local_invocation_id) lid: vec3u) {
    let i = flat(wid, nwg, lid);
    if i >= p.len { return; }
    stream[i] = ST(f32(stream[i]) + f32(branch[i]));
}

// dst [N, c_out, h_out, w_out] = x [N, c_in, h_in, w_in] at (s*h, s*w), zero where c >= c_in.
@compute @workgroup_size(WG)
fn subsample_forward(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                     @builtin(local_invocation_id) lid: vec3u) {
    let i = flat(wid, nwg, lid);
    if i >= p.len { return; }
    let ow = i % p.w_out;
    let oh = (i / p.w_out) % p.h_out;
    let c = (i / (p.w_out * p.h_out)) % p.c_out;
    let n = i / (p.w_out * p.h_out * p.c_out);
    var v = ST(0.0);
    if c < p.c_in {
        v = src[((n * p.c_in + c) * p.h_in + oh * p.stride) * p.w_in + ow * p.stride];
    }
    dst[i] = v;
}

// dst [N, c_in, h_in, w_in] (+)= the transpose: g_out at (h/s, w/s) where s divides h and w, else 0.
@compute @workgroup_size(WG)
fn subsample_backward(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                      @builtin(local_invocation_id) lid: vec3u) {
    let i = flat(wid, nwg, lid);
    if i >= p.len { return; }
    let iw = i % p.w_in;
    let ih = (i / p.w_in) % p.h_in;
    let c = (i / (p.w_in * p.h_in)) % p.c_in;
    let n = i / (p.w_in * p.h_in * p.c_in);
    var v = 0.0;
    if ih % p.stride == 0u && iw % p.stride == 0u {
        v = f32(src[((n * p.c_out + c) * p.h_out + ih / p.stride) * p.w_out + iw / p.stride]);
    }
    if p.accumulate == 1u { v += f32(dst[i]); }
    dst[i] = ST(v);
}
