// Conversions between f32 and f16 tensors of one length, with the loss scale of the f16 network
// (net.rs): its f32 stem's output enters the f16 units and its last unit's output enters the f32
// head; the head's gradient enters the units multiplied by the loss scale (so that the small
// gradients of a whole network stay above the half's subnormals), and leaves them divided by it.
//   to_half: y16 = f16(x32 * s)   (rounded to a half; values past the half range are not
//                                  representable)
//   to_f32:  y32 = f32(x16) * s
//   scale:   t32 *= s             (the f32 parameter gradients of the f16 units, unscaled)
//   scale8:  the same on up to 8 tensors in one dispatch (t0..t7, lengths p.lens)
// With s a power of two the scaling itself is exact.
enable f16;

struct Params {
    len: u32,
    s: f32,
    lens: array<vec4u, 2>, // scale8: the tensors' lengths (0 for an unused slot)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x32: array<f32>;
@group(0) @binding(2) var<storage, read_write> y16: array<f16>;
@group(0) @binding(3) var<storage, read> x16: array<f16>;
@group(0) @binding(4) var<storage, read_write> y32: array<f32>;
@group(0) @binding(5) var<storage, read_write> t0: array<f32>;
@group(0) @binding(6) var<storage, read_write> t1: array<f32>;
@group(0) @binding(7) var<storage, read_write> t2: array<f32>;
@group(0) @binding(8) var<storage, read_write> t3: array<f32>;
@group(0) @binding(9) var<storage, read_write> t4: array<f32>;
@group(0) @binding(10) var<storage, read_write> t5: array<f32>;
@group(0) @binding(11) var<storage, read_write> t6: array<f32>;
@group(0) @binding(12) var<storage, read_write> t7: array<f32>;

const WG: u32 = 64u;

fn index(wid: vec3u, nwg: vec3u, lid: vec3u) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid.x;
}

@compute @workgroup_size(WG)
fn to_half(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
           @builtin(local_invocation_id) lid: vec3u) {
    let i = index(wid, nwg, lid);
    if i >= p.len { return; }
    y16[i] = f16(x32[i] * p.s);
}

@compute @workgroup_size(WG)
fn to_f32(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
          @builtin(local_invocation_id) lid: vec3u) {
    let i = index(wid, nwg, lid);
    if i >= p.len { return; }
    y32[i] = f32(x16[i]) * p.s;
}

@compute @workgroup_size(WG)
fn scale(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
         @builtin(local_invocation_id) lid: vec3u) {
    let i = index(wid, nwg, lid);
    if i >= p.len { return; }
    y32[i] = y32[i] * p.s;
}

// Element i of each of the 8 tensors that has one.
@compute @workgroup_size(WG)
fn scale8(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
          @builtin(local_invocation_id) lid: vec3u) {
    let i = index(wid, nwg, lid);
    if i < p.lens[0].x { t0[i] *= p.s; }
    if i < p.lens[0].y { t1[i] *= p.s; }
    if i < p.lens[0].z { t2[i] *= p.s; }
    if i < p.lens[0].w { t3[i] *= p.s; }
    if i < p.lens[1].x { t4[i] *= p.s; }
    if i < p.lens[1].y { t5[i] *= p.s; }
    if i < p.lens[1].z { t6[i] *= p.s; }
    if i < p.lens[1].w { t7[i] *= p.s; }
}
