// The network head: global average pooling, the fully connected layer, and softmax
// cross-entropy with integer labels (mean over the batch), each forward beside its backward.
//
// Shapes: x [N,C,H,W], pooled p [N,C], weight w [K,C] (PyTorch Linear layout), bias b [K],
// logits [N,K], labels [N] (u32 < K), loss [1].
// Every reduction is a fixed-order loop or a fixed-shape workgroup tree: results are
// deterministic, and no kernel uses atomics.

struct Params {
    n: u32,          // batch N
    c: u32,          // channels C
    hw: u32,         // H*W (pooling)
    k: u32,          // classes K
    len: u32,        // threads the dispatch covers
    accumulate: u32, // backward: 1 adds into the gradient, 0 overwrites it
    inv: u32,        // f32 bits: 1/(H*W) (pooling) or 1/N (loss)
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> pooled: array<f32>;
@group(0) @binding(3) var<storage, read> dpooled: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;
@group(0) @binding(5) var<storage, read> feat: array<f32>;
@group(0) @binding(6) var<storage, read> w: array<f32>;
@group(0) @binding(7) var<storage, read> b: array<f32>;
@group(0) @binding(8) var<storage, read_write> logits: array<f32>;
@group(0) @binding(9) var<storage, read> dlogits: array<f32>;
@group(0) @binding(10) var<storage, read_write> dfeat: array<f32>;
@group(0) @binding(11) var<storage, read_write> dw: array<f32>;
@group(0) @binding(12) var<storage, read_write> db: array<f32>;
@group(0) @binding(13) var<storage, read> z: array<f32>;
@group(0) @binding(14) var<storage, read> labels: array<u32>;
@group(0) @binding(15) var<storage, read_write> loss: array<f32>;
@group(0) @binding(16) var<storage, read_write> dz: array<f32>;

const WG: u32 = 64u;

fn flat(wid: vec3u, nwg: vec3u, lid: vec3u) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid.x;
}

// ---- global average pooling ----

// pooled[n,c] = sum_{h,w} x[n,c,h,w] / (H*W); one thread per (n,c), len = N*C.
@compute @workgroup_size(WG)
fn pool_forward(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                @builtin(local_invocation_id) lid: vec3u) {
    let i = flat(wid, nwg, lid);
    if i >= p.len { return; }
    let base = i * p.hw;
    var s = 0.0;
    for (var j = 0u; j < p.hw; j++) {
        s += x[base + j];
    }
    pooled[i] = s * bitcast<f32>(p.inv);
}

// dx[n,c,h,w] (+)= dpooled[n,c] / (H*W); one thread per element of x, len = N*C*H*W.
@compute @workgroup_size(WG)
fn pool_backward(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                 @builtin(local_invocation_id) lid: vec3u) {
    let i = flat(wid, nwg, lid);
    if i >= p.len { return; }
    let g = dpooled[i / p.hw] * bitcast<f32>(p.inv);
    if p.accumulate == 1u { dx[i] += g; } else { dx[i] = g; }
}

// ---- fully connected ----

// logits[n,k] = b[k] + sum_c feat[n,c] * w[k,c]; one thread per (n,k), len = N*K.
@compute @workgroup_size(WG)
fn fc_forward(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
              @builtin(local_invocation_id) lid: vec3u) {
    let i = flat(wid, nwg, lid);
    if i >= p.len { return; }
    let n = i / p.k;
    let k = i % p.k;
    var s = 0.0;
    for (var c = 0u; c < p.c; c++) {
        s += feat[n * p.c + c] * w[k * p.c + c];
    }
    logits[i] = s + b[k];
}

// dfeat[n,c] (+)= sum_k dlogits[n,k] * w[k,c]; one thread per (n,c), len = N*C.
@compute @workgroup_size(WG)
fn fc_backward_data(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                    @builtin(local_invocation_id) lid: vec3u) {
    let i = flat(wid, nwg, lid);
    if i >= p.len { return; }
    let n = i / p.c;
    let c = i % p.c;
    var s = 0.0;
    for (var k = 0u; k < p.k; k++) {
        s += dlogits[n * p.k + k] * w[k * p.c + c];
    }
    if p.accumulate == 1u { dfeat[i] += s; } else { dfeat[i] = s; }
}

// dw[k,c] (+)= sum_n dlogits[n,k] * feat[n,c] for the first K*C threads,
// db[k] (+)= sum_n dlogits[n,k] for the last K; len = K*C + K.
@compute @workgroup_size(WG)
fn fc_backward_params(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                      @builtin(local_invocation_id) lid: vec3u) {
    let i = flat(wid, nwg, lid);
    if i >= p.len { return; }
    let kc = p.k * p.c;
    if i < kc {
        let k = i / p.c;
        let c = i % p.c;
        var s = 0.0;
        for (var n = 0u; n < p.n; n++) {
            s += dlogits[n * p.k + k] * feat[n * p.c + c];
        }
        if p.accumulate == 1u { dw[i] += s; } else { dw[i] = s; }
    } else {
        let k = i - kc;
        var s = 0.0;
        for (var n = 0u; n < p.n; n++) {
            s += dlogits[n * p.k + k];
        }
        if p.accumulate == 1u { db[k] += s; } else { db[k] = s; }
    }
}

// ---- softmax cross-entropy ----

var<workgroup> partial: array<f32, WG>;

// One workgroup. Thread t takes rows t, t+WG, ... in order: for each row, m = max_k z,
// s = sum_k exp(z - m), loss_n = log(s) - (z[label] - m), dz = (exp(z - m)/s - onehot) / N.
// The per-thread loss sums meet in a workgroup tree; loss[0] = their sum / N.
@compute @workgroup_size(WG)
fn softmax_xent(@builtin(local_invocation_id) lid: vec3u) {
    let t = lid.x;
    let inv_n = bitcast<f32>(p.inv);
    let rounds = (p.n + WG - 1u) / WG;
    var acc = 0.0;
    for (var r = 0u; r < rounds; r++) {
        let n = r * WG + t;
        if n < p.n {
            let row = n * p.k;
            var m = z[row];
            for (var k = 1u; k < p.k; k++) {
                m = max(m, z[row + k]);
            }
            var s = 0.0;
            for (var k = 0u; k < p.k; k++) {
                s += exp(z[row + k] - m);
            }
            let label = labels[n];
            acc += log(s) - (z[row + min(label, p.k - 1u)] - m);
            let inv_s = 1.0 / s;
            for (var k = 0u; k < p.k; k++) {
                let soft = exp(z[row + k] - m) * inv_s;
                dz[row + k] = (soft - select(0.0, 1.0, k == label)) * inv_n;
            }
        }
    }
    partial[t] = acc;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if t < stride {
            partial[t] += partial[t + stride];
        }
        workgroupBarrier();
    }
    if t == 0u {
        loss[0] = partial[0] * inv_n;
    }
}
