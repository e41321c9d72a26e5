// Batch normalisation over NCHW activations, PyTorch semantics, per channel c over the
// M = N*H*W elements of that channel:
//   xhat = (x - mean) * invstd,  invstd = 1 / sqrt(var + eps),  z = gamma * xhat + beta,
//   y = z, or y = y_old + z (`add`), then optionally y = max(y, 0) (`relu`).
// Training: mean and the biased var are the batch statistics; the running statistics move by
// `momentum` towards mean and the unbiased var (var * M / (M - 1)).
// Inference: mean and var are the running statistics.
//
// Reductions (`stats`, `backward_reduce`) run one workgroup of RG threads per channel: each
// thread sums a strided slice of the channel sequentially, then a fixed tree in workgroup memory
// combines the partial sums, so results are deterministic (no float atomics). Statistics are
// computed once per channel; the element-wise kernels only read them.
//
// Backward (of training mode), with dz = dy * [z > 0] when `relu` (mask recomputed from x, the
// saved statistics, gamma and beta), dz = dy otherwise:
//   dbeta = sum dz,  dgamma = sum dz * xhat,
//   dx = gamma * invstd * (dz - dbeta / M - xhat * dgamma / M).

struct Params {
    n: u32,
    c: u32,
    hw: u32,
    relu: u32,       // forward: ReLU after the (optional) add; backward: mask dy by [z > 0]
    add: u32,        // forward: 1 adds into y (y = y_old + z), 0 overwrites y
    accumulate: u32, // backward: 1 adds into the gradient, 0 overwrites it
    eps: u32,        // f32 bits
    momentum: u32,   // f32 bits
    unbias: u32,     // f32 bits: M / (M - 1)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> running_var: array<f32>;
@group(0) @binding(7) var<storage, read_write> save_mean: array<f32>;
@group(0) @binding(8) var<storage, read_write> save_invstd: array<f32>;
@group(0) @binding(9) var<storage, read> dy: array<f32>;
@group(0) @binding(10) var<storage, read_write> dx: array<f32>;
@group(0) @binding(11) var<storage, read_write> scratch: array<f32>; // [2C]: sum dz, sum dz*xhat
@group(0) @binding(12) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(13) var<storage, read_write> dbeta: array<f32>;

const WG: u32 = 64u;  // element-wise kernels
const RG: u32 = 256u; // per-channel reductions: threads per workgroup

var<workgroup> red_a: array<f32, RG>;
var<workgroup> red_b: array<f32, RG>;

// Index of the j-th element (0 <= j < N*H*W) of channel c.
fn addr(j: u32, c: u32) -> u32 {
    let n = j / p.hw;
    return (n * p.c + c) * p.hw + (j - n * p.hw);
}

// Channel of flat element i.
fn channel(i: u32) -> u32 {
    return (i / p.hw) % p.c;
}

fn xhat(v: f32, mean: f32, invstd: f32) -> f32 {
    return (v - mean) * invstd;
}

// gamma * xhat + beta: the forward and the backward's ReLU mask use this one expression.
fn affine(xh: f32, c: u32) -> f32 {
    return xh * gamma[c] + beta[c];
}

// Writes z into y[i] per the epilogue; y is read only when adding.
fn epilogue(i: u32, z: f32) {
    var v = z;
    if p.add == 1u { v = y[i] + v; }
    if p.relu == 1u { v = max(v, 0.0); }
    y[i] = v;
}

// Tree sum of red_a[0..RG] into red_a[0]; every thread sees the result after return.
fn reduce_a(t: u32) {
    workgroupBarrier();
    for (var s = RG / 2u; s > 0u; s = s >> 1u) {
        if t < s { red_a[t] += red_a[t + s]; }
        workgroupBarrier();
    }
}

// Tree sums of red_a and red_b together.
fn reduce_ab(t: u32) {
    workgroupBarrier();
    for (var s = RG / 2u; s > 0u; s = s >> 1u) {
        if t < s {
            red_a[t] += red_a[t + s];
            red_b[t] += red_b[t + s];
        }
        workgroupBarrier();
    }
}

// Training statistics, one workgroup per channel: two passes (mean, then the mean squared
// deviation), save_mean, save_invstd, and the running statistics' update.
@compute @workgroup_size(RG)
fn stats(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let c = wid.x;
    let t = lid.x;
    let m = p.n * p.hw;
    var s = 0.0;
    for (var j = t; j < m; j += RG) {
        s += x[addr(j, c)];
    }
    red_a[t] = s;
    reduce_a(t);
    let mean = red_a[0] / f32(m);
    workgroupBarrier(); // everyone has read red_a[0] before it is overwritten
    var q = 0.0;
    for (var j = t; j < m; j += RG) {
        let d = x[addr(j, c)] - mean;
        q += d * d;
    }
    red_a[t] = q;
    reduce_a(t);
    if t == 0u {
        let var_b = red_a[0] / f32(m);
        let mo = bitcast<f32>(p.momentum);
        save_mean[c] = mean;
        save_invstd[c] = 1.0 / sqrt(var_b + bitcast<f32>(p.eps));
        running_mean[c] = (1.0 - mo) * running_mean[c] + mo * mean;
        running_var[c] = (1.0 - mo) * running_var[c] + mo * (var_b * bitcast<f32>(p.unbias));
    }
}

// Training-mode normalisation with the saved batch statistics, element-wise.
@compute @workgroup_size(WG)
fn normalize(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
             @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.n * p.c * p.hw { return; }
    let c = channel(i);
    epilogue(i, affine(xhat(x[i], save_mean[c], save_invstd[c]), c));
}

// Inference-mode normalisation with the running statistics, element-wise (1/sqrt(var + eps) is
// one ALU op per element of a memory-bound kernel: no per-channel buffer needed).
@compute @workgroup_size(WG)
fn normalize_eval(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                  @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.n * p.c * p.hw { return; }
    let c = channel(i);
    let invstd = 1.0 / sqrt(running_var[c] + bitcast<f32>(p.eps));
    epilogue(i, affine(xhat(x[i], running_mean[c], invstd), c));
}

// dz for element i of channel c with normalised input xh.
fn dz(i: u32, c: u32, xh: f32) -> f32 {
    let g = dy[i];
    if p.relu == 1u { return select(0.0, g, affine(xh, c) > 0.0); }
    return g;
}

// Per-channel sums of the backward, one workgroup per channel:
// scratch[c] = sum dz, scratch[C + c] = sum dz * xhat.
@compute @workgroup_size(RG)
fn backward_reduce(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let c = wid.x;
    let t = lid.x;
    let m = p.n * p.hw;
    let mean = save_mean[c];
    let invstd = save_invstd[c];
    var s1 = 0.0;
    var s2 = 0.0;
    for (var j = t; j < m; j += RG) {
        let i = addr(j, c);
        let xh = xhat(x[i], mean, invstd);
        let g = dz(i, c, xh);
        s1 += g;
        s2 += g * xh;
    }
    red_a[t] = s1;
    red_b[t] = s2;
    reduce_ab(t);
    if t == 0u {
        scratch[c] = red_a[0];
        scratch[p.c + c] = red_b[0];
    }
}

// dbeta (+)= scratch[c], dgamma (+)= scratch[C + c], one thread per channel.
@compute @workgroup_size(WG)
fn backward_params(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                   @builtin(local_invocation_id) lid: vec3u) {
    let c = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if c >= p.c { return; }
    let sb = scratch[c];
    let sg = scratch[p.c + c];
    if p.accumulate == 1u {
        dbeta[c] += sb;
        dgamma[c] += sg;
    } else {
        dbeta[c] = sb;
        dgamma[c] = sg;
    }
}

// dx (+)= gamma * invstd * (dz - sum dz / M - xhat * sum(dz * xhat) / M), element-wise.
@compute @workgroup_size(WG)
fn backward_apply(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                  @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.n * p.c * p.hw { return; }
    let c = channel(i);
    let invstd = save_invstd[c];
    let xh = xhat(x[i], save_mean[c], invstd);
    let inv_m = 1.0 / f32(p.n * p.hw);
    let g = gamma[c] * invstd * (dz(i, c, xh) - scratch[c] * inv_m - xh * (scratch[p.c + c] * inv_m));
    if p.accumulate == 1u { dx[i] += g; } else { dx[i] = g; }
}
