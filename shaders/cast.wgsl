// Conversions between f32 and f16 tensors of one length, with the loss scale of the f16 network
// (net.rs): its f32 stem's output enters the f16 units and its last unit's output enters the f32
// head; the head's gradient enters the units multiplied by the loss scale (so that the small
// gradients of a whole network stay above the half's subnormals), and leaves them divided by it.
//   to_half: y16 = f16(x32 * s)   (rounded to a half; values past the half range are not
//                                  representable)
//   to_f32:  y32 = f32(x16) * s
//   scale:   t32 *= s             (the f32 parameter gradients of the f16 units, unscaled)
// With s a power of two the scaling itself is exact.
enable f16;

struct Params {
    len: u32,
    s: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x32: array<f32>;
@group(0) @binding(2) var<storage, read_write> y16: array<f16>;
@group(0) @binding(3) var<storage, read> x16: array<f16>;
@group(0) @binding(4) var<storage, read_write> y32: array<f32>;

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
