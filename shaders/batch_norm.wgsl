// Batch normalisation over NCHW activations, PyTorch semantics, per channel c over the
// M = N*H*W elements of that channel:
//   xhat = (x - mean) * invstd,  invstd = 1 / sqrt(var + eps),  z = gamma * xhat + beta,
//   y = z, or y = y_old + z (`add`), then optionally y = max(y, 0) (`relu`).
// Training: mean and the biased var are the batch statistics; the running statistics move by
// `momentum` towards mean and the unbiased var (var * M / (M - 1)).
// Inference: mean and var are the running statistics.
//
// Work split. Every kernel gives each invocation a run of consecutive elements of one (n, c)
// plane: a plane of hw elements is cut into `parts` runs of `chunk` elements (the last may be
// shorter). On CPU adapters (lavapipe) each storage-buffer load or store is a scalar loop over
// the SIMD lanes, so the per-channel values are loaded once per run instead of once per
// element and no per-element integer division is needed; only the small final reductions
// (one workgroup per channel over the per-run partials) use workgroup memory. The wide variants
// at the end give each run a workgroup instead, for coalesced loads on GPUs.
//
// Reductions are two kernels: `*_partial` (one invocation per short run: its sums into
// `part`), then `*_final` (one workgroup per channel: each thread sums a strided set of that
// channel's N * parts partials, then the threads' sums by `sum2`: a fixed tree in workgroup
// memory, or subgroup shuffles where the adapter has them), so results are deterministic on
// an adapter (no float atomics) and about as accurate as a tree over the elements (runs are
// short, REDUCE_CHUNK in ops/batch_norm.rs). The statistics combine per-run means and squared
// deviations (Chan et al.), each run being two-pass over its own elements.
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
    chunk: u32,      // elements per run
    parts: u32,      // runs per plane: ceil(hw / chunk)
    // Only when a batch runs in chunks (ops/split.rs); 0 otherwise.
    prev: u32,       // *_merge: images in the chunks before this one
    last: u32,       // *_merge: 1 on the last chunk
    total: u32,      // backward_apply: elements per channel of the whole batch (0: n * hw)
    affine: u32,     // stats_final, stats_merge: 1 also writes aff (the convolutions' prologue values)
    planes: u32,     // the wide kernels and their *_final: planes of one channel per run (0: 1)
}

@group(0) @binding(0) var<uniform> p: Params;
// ST, the storage type of the activations x, y, dy and dx (bindings 1, 2, 9, 10; the vec4
// kernels' 15 to 18), is f32, or f16 in the module of the f16 path (ops/batch_norm.rs `*_f16`;
// the host prepends the alias): loads widen to f32, stores round once, everything between is f32.
@group(0) @binding(1) var<storage, read> x: array<ST>;
@group(0) @binding(2) var<storage, read_write> y: array<ST>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> running_var: array<f32>;
@group(0) @binding(7) var<storage, read_write> save_mean: array<f32>;
@group(0) @binding(8) var<storage, read_write> save_invstd: array<f32>;
@group(0) @binding(9) var<storage, read> dy: array<ST>;
@group(0) @binding(10) var<storage, read_write> dx: array<ST>;
@group(0) @binding(11) var<storage, read_write> scratch: array<f32>; // [2C]: sum dz, sum dz*xhat
@group(0) @binding(12) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(13) var<storage, read_write> dbeta: array<f32>;
// affine_*, and the statistics kernels where p.affine: [C] (mean, scale, beta, invstd).
@group(0) @binding(21) var<storage, read_write> aff: array<vec4f>;
// Per-run partials, channel-major: run r of channel c at 2 * (c * runs_per_channel() + r)
// (N * parts runs per channel; fewer for the wide kernels over several planes).
@group(0) @binding(14) var<storage, read_write> part: array<f32>;

const WG: u32 = 64u; // runs per workgroup of the run kernels
const FG: u32 = 64u; // threads per workgroup (one per channel) of the final reductions

// sum2(t, v): the sums over the workgroup's FG threads of their v (thread t passes its own),
// returned to every thread, in a fixed order. Every thread of the workgroup must call it. Two
// versions; the host keeps one (gpu.rs `Shader::source`).
var<workgroup> red: array<vec2f, FG>;

// @tree-begin: adapters without subgroup operations: a fixed tree in workgroup memory.
fn sum2(t: u32, v: vec2f) -> vec2f {
    red[t] = v;
    workgroupBarrier();
    for (var s = FG / 2u; s > 0u; s = s >> 1u) {
        if t < s {
            red[t] += red[t + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier(); // every thread has read red[0] before a next call writes red
    return total;
}
// @tree-end

// @subgroups-begin: adapters with one subgroup size SG (a power of two, at most FG; the host
// prepends it): a butterfly of shuffles within each subgroup (every lane gets the same sum:
// IEEE addition commutes), then the FG / SG subgroup sums in order, so one barrier round
// instead of log2(FG). Subgroups are taken to be runs of SG consecutive invocations, as
// drivers form them for a one-dimensional workgroup.
fn sum2(t: u32, v: vec2f) -> vec2f {
    var s = v;
    for (var d = 1u; d < SG; d = d << 1u) {
        s += subgroupShuffleXor(s, d);
    }
    if t % SG == 0u {
        red[t / SG] = s;
    }
    workgroupBarrier();
    var total = red[0];
    for (var i = 1u; i < FG / SG; i++) {
        total += red[i];
    }
    workgroupBarrier(); // every thread has read red before a next call writes it
    return total;
}
// @subgroups-end

// One run of elements [start, end) (flat indices) of a plane of channel c, and of the same
// span of the `planes` - 1 planes of c after it (the wide kernels; 1 elsewhere); ok: it exists.
struct Run {
    c: u32,
    start: u32,
    end: u32,
    planes: u32,
    ok: bool,
}

// Planes per run: p.planes where the host sets it (the wide kernels on planes shorter than their
// runs), else 1.
fn group() -> u32 {
    return max(p.planes, 1u);
}

// Runs per channel: parts per plane, for each group of planes.
fn runs_per_channel() -> u32 {
    return (p.n + group() - 1u) / group() * p.parts;
}

// Run `inv` in plane-major order (n, c, part): the element-wise kernels' order.
fn plane_run(inv: u32) -> Run {
    let plane = inv / p.parts;
    let k = inv - plane * p.parts;
    let s = plane * p.hw + k * p.chunk;
    return Run(plane % p.c, s, plane * p.hw + min(p.hw, (k + 1u) * p.chunk), 1u, plane < p.n * p.c);
}

// Run `inv` in channel-major order (c, group of planes, part): the partial kernels' order, so
// that a channel's partials are contiguous (run inv's partials go to part[2 * inv],
// part[2 * inv + 1]).
fn channel_run(inv: u32) -> Run {
    let per_c = runs_per_channel();
    let c = inv / per_c;
    let r = inv - c * per_c;
    let g = r / p.parts;
    let k = r - g * p.parts;
    let n = g * group();
    let base = (n * p.c + c) * p.hw;
    return Run(c, base + k * p.chunk, base + min(p.hw, (k + 1u) * p.chunk), min(group(), p.n - n), c < p.c);
}

// Elements in run r (0 <= r < runs_per_channel()) of a channel.
fn run_len(r: u32) -> u32 {
    let g = r / p.parts;
    let k = r - g * p.parts;
    return min(group(), p.n - g * group()) * (min(p.hw, (k + 1u) * p.chunk) - k * p.chunk);
}

fn flat(wid: vec3u, nwg: vec3u, lid: vec3u) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid.x;
}

// Writes z into y[i] per the epilogue; y is read only when adding.
fn epilogue(i: u32, z: f32) {
    var v = z;
    if p.add == 1u { v = f32(y[i]) + v; }
    if p.relu == 1u { v = max(v, 0.0); }
    y[i] = ST(v);
}

// Training statistics, pass 1: per run, the sum and the sum of squared deviations from the
// run's own mean (two passes over the run).
@compute @workgroup_size(WG)
fn stats_partial(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                 @builtin(local_invocation_id) lid: vec3u) {
    let inv = flat(wid, nwg, lid);
    let r = channel_run(inv);
    if !r.ok { return; }
    var s = 0.0;
    for (var i = r.start; i < r.end; i++) { s += f32(x[i]); }
    let mu = s / f32(r.end - r.start);
    var q = 0.0;
    for (var i = r.start; i < r.end; i++) {
        let d = f32(x[i]) - mu;
        q += d * d;
    }
    part[2u * inv] = s;
    part[2u * inv + 1u] = q;
}

// Training statistics, pass 2, one workgroup per channel: mean, biased var (the runs' squared
// deviations plus n_r * (mean_r - mean)^2), save_mean, save_invstd and the running statistics.
@compute @workgroup_size(FG)
fn stats_final(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let mm = batch_moments(wid.x, lid.x);
    if lid.x == 0u { save_stats(wid.x, mm.x, mm.y / f32(p.n * p.hw)); }
}

// Channel c's mean and squared deviations over the p.n images of its runs' partials, by the
// FG threads t of a workgroup.
fn batch_moments(c: u32, t: u32) -> vec2f {
    let runs = runs_per_channel();
    let base = 2u * c * runs;
    var s = 0.0;
    for (var r = t; r < runs; r += FG) { s += part[base + 2u * r]; }
    let mean = sum2(t, vec2f(s, 0.0)).x / f32(p.n * p.hw);
    var q = 0.0;
    for (var r = t; r < runs; r += FG) {
        let nr = f32(run_len(r));
        let d = part[base + 2u * r] / nr - mean;
        q += part[base + 2u * r + 1u] + nr * d * d;
    }
    return vec2f(mean, sum2(t, vec2f(q, 0.0)).x);
}

// The end of a statistics pass for channel c, from the batch's mean and biased variance: the
// saved statistics, the running ones moved, and where p.affine the prologue values (as
// affine_saved computes them from the saved ones: the same bits).
fn save_stats(c: u32, mean: f32, var_b: f32) {
    let invstd = 1.0 / sqrt(var_b + bitcast<f32>(p.eps));
    let mo = bitcast<f32>(p.momentum);
    save_mean[c] = mean;
    save_invstd[c] = invstd;
    running_mean[c] = (1.0 - mo) * running_mean[c] + mo * mean;
    running_var[c] = (1.0 - mo) * running_var[c] + mo * (var_b * bitcast<f32>(p.unbias));
    if p.affine == 1u { aff[c] = vec4f(mean, gamma[c] * invstd, beta[c], invstd); }
}

// Training-mode normalisation with the saved batch statistics, one run per invocation. z is
// computed as (x - mean) * invstd * gamma + beta, the expression the backward's ReLU mask uses.
@compute @workgroup_size(WG)
fn normalize(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
             @builtin(local_invocation_id) lid: vec3u) {
    let r = plane_run(flat(wid, nwg, lid));
    if !r.ok { return; }
    let mean = save_mean[r.c];
    let invstd = save_invstd[r.c];
    let g = gamma[r.c];
    let b = beta[r.c];
    for (var i = r.start; i < r.end; i++) { epilogue(i, (f32(x[i]) - mean) * invstd * g + b); }
}

// Inference-mode normalisation with the running statistics, one run per invocation.
@compute @workgroup_size(WG)
fn normalize_eval(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                  @builtin(local_invocation_id) lid: vec3u) {
    let r = plane_run(flat(wid, nwg, lid));
    if !r.ok { return; }
    let mean = running_mean[r.c];
    let invstd = 1.0 / sqrt(running_var[r.c] + bitcast<f32>(p.eps));
    let g = gamma[r.c];
    let b = beta[r.c];
    for (var i = r.start; i < r.end; i++) { epilogue(i, (f32(x[i]) - mean) * invstd * g + b); }
}

// The per-channel values of the convolutions' BN + ReLU prologue (conv.wgsl), one invocation per
// channel: (mean, scale = gamma * invstd, beta, invstd), the prologue computing
// ReLU((x - mean) * scale + beta). From the saved statistics (training) ...
@compute @workgroup_size(WG)
fn affine_saved(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                @builtin(local_invocation_id) lid: vec3u) {
    let c = flat(wid, nwg, lid);
    if c >= p.c { return; }
    aff[c] = vec4f(save_mean[c], gamma[c] * save_invstd[c], beta[c], save_invstd[c]);
}

// ... or from the running statistics (inference).
@compute @workgroup_size(WG)
fn affine_eval(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
               @builtin(local_invocation_id) lid: vec3u) {
    let c = flat(wid, nwg, lid);
    if c >= p.c { return; }
    let invstd = 1.0 / sqrt(running_var[c] + bitcast<f32>(p.eps));
    aff[c] = vec4f(running_mean[c], gamma[c] * invstd, beta[c], invstd);
}

// Per-channel values of the backward, loaded once per run.
struct Chan {
    mean: f32,
    invstd: f32,
    gamma: f32,
    beta: f32,
}

fn chan(c: u32) -> Chan {
    return Chan(save_mean[c], save_invstd[c], gamma[c], beta[c]);
}

// dz for element i with normalised input xh (the mask is z = gamma * xhat + beta > 0, as the
// forward computes z up to rounding).
fn dz(i: u32, k: Chan, xh: f32) -> f32 {
    return dz_of(f32(dy[i]), k, xh);
}

// dz from a loaded dy value g.
fn dz_of(g: f32, k: Chan, xh: f32) -> f32 {
    if p.relu == 1u { return select(0.0, g, xh * k.gamma + k.beta > 0.0); }
    return g;
}

// Backward sums, pass 1: per run, sum dz and sum dz * xhat.
@compute @workgroup_size(WG)
fn backward_partial(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                    @builtin(local_invocation_id) lid: vec3u) {
    let inv = flat(wid, nwg, lid);
    let r = channel_run(inv);
    if !r.ok { return; }
    let k = chan(r.c);
    var s1 = 0.0;
    var s2 = 0.0;
    for (var i = r.start; i < r.end; i++) {
        let xh = (f32(x[i]) - k.mean) * k.invstd;
        let g = dz(i, k, xh);
        s1 += g;
        s2 += g * xh;
    }
    part[2u * inv] = s1;
    part[2u * inv + 1u] = s2;
}

// Backward sums, pass 2, one workgroup per channel: scratch[c] = sum dz,
// scratch[C + c] = sum dz * xhat, and dbeta (+)= sum dz, dgamma (+)= sum dz * xhat.
@compute @workgroup_size(FG)
fn backward_final(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let c = wid.x;
    let sums = backward_sums(c, lid.x);
    if lid.x == 0u {
        let b = sums.x;
        let g = sums.y;
        scratch[c] = b;
        scratch[p.c + c] = g;
        if p.accumulate == 1u {
            dbeta[c] += b;
            dgamma[c] += g;
        } else {
            dbeta[c] = b;
            dgamma[c] = g;
        }
    }
}

// Channel c's sum dz and sum dz * xhat over its runs' partials, by the FG threads t of a
// workgroup.
fn backward_sums(c: u32, t: u32) -> vec2f {
    let runs = runs_per_channel();
    let base = 2u * c * runs;
    var sb = 0.0;
    var sg = 0.0;
    for (var r = t; r < runs; r += FG) {
        sb += part[base + 2u * r];
        sg += part[base + 2u * r + 1u];
    }
    return sum2(t, vec2f(sb, sg));
}

// dx (+)= gamma * invstd * (dz - sum dz / M - xhat * sum(dz * xhat) / M), one run per
// invocation.
@compute @workgroup_size(WG)
fn backward_apply(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                  @builtin(local_invocation_id) lid: vec3u) {
    let r = plane_run(flat(wid, nwg, lid));
    if !r.ok { return; }
    let a = apply_values(r.c);
    for (var i = r.start; i < r.end; i++) { apply_one(i, a, f32(x[i]), f32(dy[i])); }
}

// Channel c's values of backward_apply: its Chan, gamma * invstd, sum dz / M, sum dz*xhat / M.
struct Apply {
    k: Chan,
    gi: f32,
    mb: f32,
    mg: f32,
}

fn apply_values(c: u32) -> Apply {
    let k = chan(c);
    let inv_m = 1.0 / f32(select(p.n * p.hw, p.total, p.total != 0u));
    return Apply(k, k.gamma * k.invstd, scratch[c] * inv_m, scratch[p.c + c] * inv_m);
}

// dx[i] (+)= backward_apply's value from x[i] = xv and dy[i] = dyv.
fn apply_one(i: u32, a: Apply, xv: f32, dyv: f32) {
    let xh = (xv - a.k.mean) * a.k.invstd;
    let g = a.gi * (dz_of(dyv, a.k, xh) - a.mb - xh * a.mg);
    if p.accumulate == 1u { dx[i] = ST(f32(dx[i]) + g); } else { dx[i] = ST(g); }
}

// ---- a batch in chunks (ops/split.rs): each chunk's runs are reduced as above, then merged in
// chunk order into per-channel accumulators, so the results stay deterministic ----

// Training statistics, pass 2 for a chunk of p.n images after p.prev others: the chunk's mean
// and squared deviations merged (Chan et al.) into save_mean (the mean so far) and save_invstd
// (the squared deviations so far); the last chunk turns them into the mean and invstd and
// moves the running statistics, as stats_final does.
@compute @workgroup_size(FG)
fn stats_merge(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let c = wid.x;
    let nb = f32(p.n * p.hw);
    let mm = batch_moments(c, lid.x);
    if lid.x == 0u {
        let mean_b = mm.x;
        var mean = mean_b;
        var m2 = mm.y;
        if p.prev > 0u {
            let na = f32(p.prev * p.hw);
            let delta = mean_b - save_mean[c];
            mean = save_mean[c] + delta * (nb / (na + nb));
            m2 = save_invstd[c] + m2 + delta * delta * (na * nb / (na + nb));
        }
        save_mean[c] = mean;
        save_invstd[c] = m2;
        if p.last == 1u { save_stats(c, mean, m2 / f32((p.prev + p.n) * p.hw)); }
    }
}

// Backward sums, pass 2 for a chunk after p.prev images: the chunk's sum dz and sum dz * xhat
// added to scratch (written by the first chunk); the last chunk also writes (or adds to)
// dbeta and dgamma, as backward_final does.
@compute @workgroup_size(FG)
fn backward_merge(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let c = wid.x;
    let sums = backward_sums(c, lid.x);
    if lid.x == 0u {
        var b = sums.x;
        var g = sums.y;
        if p.prev > 0u {
            b += scratch[c];
            g += scratch[p.c + c];
        }
        scratch[c] = b;
        scratch[p.c + c] = g;
        if p.last == 1u {
            if p.accumulate == 1u {
                dbeta[c] += b;
                dgamma[c] += g;
            } else {
                dbeta[c] = b;
                dgamma[c] = g;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// vec4 variants, where hw is a multiple of 4 (then every run starts and ends on a vec4): the
// same work with a quarter of the loads and stores, which on CPU adapters are the cost (each is
// a loop over the SIMD lanes). Sums run over the elements in the scalar kernels' order.
// They read x and dy through ld_x and ld_dy, from storage buffers or from textures: the host
// keeps one of the two blocks below per module (Shader::BatchNorm, Shader::BatchNormTexture and
// their f16 builds).
// ------------------------------------------------------------------------------------------

@group(0) @binding(15) var<storage, read> x4: array<vec4<ST>>;
@group(0) @binding(16) var<storage, read_write> y4: array<vec4<ST>>;
@group(0) @binding(17) var<storage, read> dy4: array<vec4<ST>>;
@group(0) @binding(18) var<storage, read_write> dx4: array<vec4<ST>>;

// @buffer-loads-begin
fn ld_x(q: u32) -> vec4f { return vec4f(x4[q]); }
fn ld_dy(q: u32) -> vec4f { return vec4f(dy4[q]); }
// @buffer-loads-end

// @texture-loads-begin: x and dy as rgba32float textures of TEXW texels a row (rgba16float
// where ST is f16; CPU adapters, whose texture loads run faster than their storage-buffer
// loads).
@group(0) @binding(19) var xt: texture_2d<f32>;
@group(0) @binding(20) var dyt: texture_2d<f32>;
const TEXW: u32 = 1024u;
fn ld_x(q: u32) -> vec4f { return textureLoad(xt, vec2u(q % TEXW, q / TEXW), 0); }
fn ld_dy(q: u32) -> vec4f { return textureLoad(dyt, vec2u(q % TEXW, q / TEXW), 0); }
// @texture-loads-end

// A full run (REDUCE_CHUNK = 16 elements) is loaded once into registers for both passes: on CPU
// adapters the loads are the cost.
@compute @workgroup_size(WG)
fn stats_partial4(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                  @builtin(local_invocation_id) lid: vec3u) {
    let inv = flat(wid, nwg, lid);
    let r = channel_run(inv);
    if !r.ok { return; }
    let q0 = r.start / 4u;
    var s = 0.0;
    var q = 0.0;
    if r.end - r.start == 16u {
        let v = array<vec4f, 4>(ld_x(q0), ld_x(q0 + 1u), ld_x(q0 + 2u), ld_x(q0 + 3u));
        for (var j = 0u; j < 4u; j++) { // @unroll
            s += v[j].x;
            s += v[j].y;
            s += v[j].z;
            s += v[j].w;
        }
        let mu = vec4f(s / 16.0);
        for (var j = 0u; j < 4u; j++) { // @unroll
            let d = v[j] - mu;
            q += d.x * d.x;
            q += d.y * d.y;
            q += d.z * d.z;
            q += d.w * d.w;
        }
    } else {
        for (var i = q0; i < r.end / 4u; i++) {
            let v = ld_x(i);
            s += v.x;
            s += v.y;
            s += v.z;
            s += v.w;
        }
        let mu = vec4f(s / f32(r.end - r.start));
        for (var i = q0; i < r.end / 4u; i++) {
            let d = ld_x(i) - mu;
            q += d.x * d.x;
            q += d.y * d.y;
            q += d.z * d.z;
            q += d.w * d.w;
        }
    }
    part[2u * inv] = s;
    part[2u * inv + 1u] = q;
}

@compute @workgroup_size(WG)
fn normalize4(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
              @builtin(local_invocation_id) lid: vec3u) {
    let r = plane_run(flat(wid, nwg, lid));
    if !r.ok { return; }
    let mean = vec4f(save_mean[r.c]);
    let invstd = save_invstd[r.c];
    let g = gamma[r.c];
    let b = vec4f(beta[r.c]);
    for (var i = r.start / 4u; i < r.end / 4u; i++) {
        var v = (ld_x(i) - mean) * invstd * g + b;
        if p.add == 1u { v = vec4f(y4[i]) + v; }
        if p.relu == 1u { v = max(v, vec4f(0.0)); }
        y4[i] = vec4<ST>(v);
    }
}

fn dz4(i: u32, k: Chan, xh: vec4f) -> vec4f {
    let g = ld_dy(i);
    if p.relu == 1u { return select(vec4f(0.0), g, xh * k.gamma + k.beta > vec4f(0.0)); }
    return g;
}

@compute @workgroup_size(WG)
fn backward_partial4(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                     @builtin(local_invocation_id) lid: vec3u) {
    let inv = flat(wid, nwg, lid);
    let r = channel_run(inv);
    if !r.ok { return; }
    let k = chan(r.c);
    var s1 = 0.0;
    var s2 = 0.0;
    for (var i = r.start / 4u; i < r.end / 4u; i++) {
        let xh = (ld_x(i) - vec4f(k.mean)) * k.invstd;
        let g = dz4(i, k, xh);
        let gx = g * xh;
        s1 += g.x;
        s1 += g.y;
        s1 += g.z;
        s1 += g.w;
        s2 += gx.x;
        s2 += gx.y;
        s2 += gx.z;
        s2 += gx.w;
    }
    part[2u * inv] = s1;
    part[2u * inv + 1u] = s2;
}

@compute @workgroup_size(WG)
fn backward_apply4(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                   @builtin(local_invocation_id) lid: vec3u) {
    let r = plane_run(flat(wid, nwg, lid));
    if !r.ok { return; }
    let a = apply_values(r.c);
    let k = a.k;
    let mb = vec4f(a.mb);
    for (var i = r.start / 4u; i < r.end / 4u; i++) {
        let xh = (ld_x(i) - vec4f(k.mean)) * k.invstd;
        let g = a.gi * (dz4(i, k, xh) - mb - xh * a.mg);
        if p.accumulate == 1u { dx4[i] = vec4<ST>(vec4f(dx4[i]) + g); } else { dx4[i] = vec4<ST>(g); }
    }
}

// ------------------------------------------------------------------------------------------
// Wide variants (for GPUs): one workgroup of FG threads per run of at most FG * WIDE elements,
// thread t taking the run's elements t + j * FG, so a warp's loads are consecutive (coalesced)
// where the kernels above give each thread its own run. Where a plane is shorter than that
// (14x14 holds 196 elements, 7x7 49), a run takes the same plane of p.planes consecutive images
// of its channel, so that the workgroup's threads are not idle (with a run per plane, 80% to
// 95% of them were). Each thread loads all its elements before it stores any. The reductions
// sum each thread's WIDE elements in order, then the threads by sum2, into per-run partials
// for the same *_final kernels (which read p.planes too). The host writes out the loops over a
// thread's elements (marked `// @unroll`, as in conv_tiled.wgsl: gpu.rs `unroll`), so that the
// arrays of its loaded values are indexed by constants and can stay in registers.
// ------------------------------------------------------------------------------------------

const WIDE: u32 = 16u; // elements per thread of a wide run: runs of at most FG * WIDE = 1024 (ops/batch_norm.rs)

// The run of workgroup `wid` (the workgroup grid folded as `flat`'s).
fn wide_run(wid: vec3u, nwg: vec3u) -> u32 {
    return wid.y * nwg.x + wid.x;
}

// Elements in wide run r.
fn wide_len(r: Run) -> u32 {
    return r.planes * (r.end - r.start);
}

// Thread t's walk over its elements t + j * FG (j = 0, 1, ...) of wide run r (the planes of a
// run lie p.c planes apart): the flat index of the next one (`at`) and its offset in the run's
// span of a plane (`o`). Element e lies at offset e % span of plane e / span; the two are divided
// out once and then stepped FG elements at a time, as a division by a runtime value costs tens
// of instructions (it was two per element).
struct Walk {
    at: u32,
    o: u32,
    span: u32,
    next: u32, // from a plane to the same channel's plane of the next image
    dr: u32,   // a step of FG elements: FG / span whole planes and dr elements more
    jump: u32, // the step's distance in the flat index before o wraps
}

fn wide_walk(r: Run, t: u32) -> Walk {
    let span = max(r.end - r.start, 1u);
    let next = p.c * p.hw;
    let dq = FG / span;
    let dr = FG - dq * span;
    let q = t / span;
    let o = t - q * span;
    return Walk(r.start + q * next + o, o, span, next, dr, dq * next + dr);
}

// The flat index of the walk's element; the walk moves on to the next (past the run's end the
// indices are out of range and not to be used).
fn wide_step(w: ptr<function, Walk>) -> u32 {
    let i = (*w).at;
    (*w).at += (*w).jump;
    (*w).o += (*w).dr;
    if (*w).o >= (*w).span {
        (*w).o -= (*w).span;
        (*w).at += (*w).next - (*w).span;
    }
    return i;
}

// Thread t's elements of x in wide run r, those below len (wide_len(r), or 0 for a run that
// does not exist; zeros after them), all loaded before the caller stores any.
fn wide_x(r: Run, t: u32, len: u32) -> array<f32, WIDE> {
    var w = wide_walk(r, t);
    var v: array<f32, WIDE>;
    for (var j = 0u; j < WIDE; j++) { // @unroll
        let i = wide_step(&w);
        if t + j * FG < len { v[j] = f32(x[i]); }
    }
    return v;
}

@compute @workgroup_size(FG)
fn stats_partial_w(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                   @builtin(local_invocation_id) lid: vec3u) {
    let inv = wide_run(wid, nwg);
    let r = channel_run(inv);
    let t = lid.x;
    let len = select(0u, wide_len(r), r.ok);
    // Every thread reaches the barriers; a run that does not exist sums nothing.
    let v = wide_x(r, t, len);
    var s = 0.0;
    for (var j = 0u; j < WIDE; j++) { // @unroll
        if t + j * FG < len { s += v[j]; }
    }
    let sum = sum2(t, vec2f(s, 0.0)).x;
    let mu = sum / f32(max(len, 1u));
    var q = 0.0;
    for (var j = 0u; j < WIDE; j++) { // @unroll
        if t + j * FG < len {
            let d = v[j] - mu;
            q += d * d;
        }
    }
    let m2 = sum2(t, vec2f(q, 0.0)).x;
    if t == 0u && r.ok {
        part[2u * inv] = sum;
        part[2u * inv + 1u] = m2;
    }
}

@compute @workgroup_size(FG)
fn normalize_w(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
               @builtin(local_invocation_id) lid: vec3u) {
    let r = channel_run(wide_run(wid, nwg));
    if !r.ok { return; }
    let len = wide_len(r);
    let v = wide_x(r, lid.x, len);
    // normalize's expression.
    let mean = save_mean[r.c];
    let invstd = save_invstd[r.c];
    let g = gamma[r.c];
    let b = beta[r.c];
    var w = wide_walk(r, lid.x);
    for (var j = 0u; j < WIDE; j++) { // @unroll
        let i = wide_step(&w);
        if lid.x + j * FG < len { epilogue(i, (v[j] - mean) * invstd * g + b); }
    }
}

// The prologue as a pass of its own: y = ReLU((x - mean) * scale + beta) from those values (aff),
// the expression of conv_tiled.wgsl's x_value (the same bits), over wide runs on every adapter:
// the channel's values loaded once a run. (Four elements per invocation with each one's
// channel divided out ran 1.9x slower on lavapipe, BENCHMARKS.md.) The convolutions take it and
// then no prologue where the autotuner finds that faster than their fused prologue (ops/conv.rs
// `separate_prologue`).
@compute @workgroup_size(FG)
fn affine_relu(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
               @builtin(local_invocation_id) lid: vec3u) {
    let r = channel_run(wide_run(wid, nwg));
    if !r.ok { return; }
    let len = wide_len(r);
    let v = wide_x(r, lid.x, len);
    let k = aff[r.c];
    var w = wide_walk(r, lid.x);
    for (var j = 0u; j < WIDE; j++) { // @unroll
        let i = wide_step(&w);
        if lid.x + j * FG < len { y[i] = ST(max(fma(v[j] - k.x, k.y, k.z), 0.0)); }
    }
}

@compute @workgroup_size(FG)
fn backward_partial_w(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                      @builtin(local_invocation_id) lid: vec3u) {
    let inv = wide_run(wid, nwg);
    let r = channel_run(inv);
    let t = lid.x;
    let len = select(0u, wide_len(r), r.ok);
    let k = chan(min(r.c, p.c - 1u));
    var w = wide_walk(r, t);
    var s1 = 0.0;
    var s2 = 0.0;
    for (var j = 0u; j < WIDE; j++) { // @unroll
        let i = wide_step(&w);
        if t + j * FG < len {
            let xh = (f32(x[i]) - k.mean) * k.invstd;
            let g = dz(i, k, xh);
            s1 += g;
            s2 += g * xh;
        }
    }
    let sums = sum2(t, vec2f(s1, s2));
    if t == 0u && r.ok {
        part[2u * inv] = sums.x;
        part[2u * inv + 1u] = sums.y;
    }
}

@compute @workgroup_size(FG)
fn backward_apply_w(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                    @builtin(local_invocation_id) lid: vec3u) {
    let r = channel_run(wide_run(wid, nwg));
    if !r.ok { return; }
    let len = wide_len(r);
    let start = wide_walk(r, lid.x);
    var w = start;
    var xv: array<f32, WIDE>;
    var dyv: array<f32, WIDE>;
    for (var j = 0u; j < WIDE; j++) { // @unroll
        let i = wide_step(&w);
        if lid.x + j * FG < len {
            xv[j] = f32(x[i]);
            dyv[j] = f32(dy[i]);
        }
    }
    let a = apply_values(r.c);
    w = start;
    for (var j = 0u; j < WIDE; j++) { // @unroll
        let i = wide_step(&w);
        if lid.x + j * FG < len { apply_one(i, a, xv[j], dyv[j]); }
    }
}
