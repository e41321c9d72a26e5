// 2-D convolution, square kernel ks in {1, 3}, padding ks / 2, stride 1 or 2, no bias.
// x [N,C,H,W], w [K,C,ks,ks] (OIHW), y [N,K,OH,OW] with OH = (H + 2*pad - ks) / stride + 1.
//
//   forward:         y  (=|+=) conv(x, w)
//   backward_data:   dx (=|+=) conv_transpose(dy, w)
//   backward_weight: dw (=|+=) corr(x, dy)
//
// Two kernel families, chosen per adapter and shape by ops/conv.rs (a third, Winograd for 3x3 at
// stride 1, has a file of its own: winograd.wgsl). Both are gathers with one writer per output
// element: no atomics, and every sum runs in a fixed order (bit-identical results from run to
// run).
//
// tl_*  Tiled implicit GEMM through workgroup memory, for any adapter and any shape: a template
//       of its own (conv_tiled.wgsl), built per tile configuration by ops/conv/tiled.rs, which
//       also picks the configuration (timed on the device on first use). This file keeps its
//       helper `reduce_splits` (the f32 split-K partial sums, added in split order, into an f32
//       output, or an f16 one in the f16 build).
//
// rp_*  Register path for CPU adapters (lavapipe/llvmpipe with subgroups of 8 or more). There a
//       workgroup runs on one core as SIMD lanes, a load from a storage buffer or from workgroup
//       memory is a scalar loop over the lanes (hundreds of cycles), branches run both ways,
//       while a texture fetch or a uniform-buffer gather is one vector gather and a subgroup
//       shuffle or broadcast is a register move. So: the big operand (x, or dy) is read from
//       an rgba32f texture copy of the tensor (a texel = 4 consecutive pixels of a row), the
//       weights from a 64 KiB uniform-buffer window, and what lanes share goes through subgroup
//       operations: the pixels left and right of a lane's quad come from its neighbour lanes,
//       the weights each lane gathers for its own channel go to all lanes by broadcast.
//       Workgroup = one group of 8 lanes, lane = a quad of 4 consecutive pixels of a row.
//       forward, backward_data (rp_data): 2 rows x 16 channels of a quad per lane, reduction
//         over input channels (or k) x taps, all accumulators in registers.
//       backward_weight (rp_wgt): lanes over the pixels, an 8 k x 4 c tile (x 9 taps; 1x1:
//         8 k x 16 c) per workgroup, per-lane sums reduced across the lanes by a fixed butterfly, splits
//         of the pixels reduced by reduce_splits as above.
//       Variants (stride, ks, op) are entry points passing literals to one function, so that
//       the driver folds the branches between them. The host picks this path where rows of
//       quads tile the 8 lanes exactly (quads per row 1, 2, 4 or 8) and the windows fit.
//       The host prepends the activations' storage type ST: f32, or f16 for the f16 path
//       (gpu.rs `Shader::ConvF16`), whose operand textures are rgba16f copies of the half
//       tensors (read as f32), whose weights are rounded to halves as they are read, and whose
//       y or dx is stored rounded once, after the sum (and the old value, accumulating) in f32;
//       dw stays f32.
//
// BN + ReLU prologue (both families, forward and backward_weight): with PRE (an override here, a
// template constant in conv_tiled.wgsl) the x operand is read as a = ReLU((x - mean) * scale +
// beta) per input channel, `aff[c] = (mean, scale = gamma * invstd, beta, invstd)`, applied to each
// element as it is loaded, before the zero padding: the convolution of a pre-activation unit
// reads the BN's input directly and the activation is never written (see ops/batch_norm.rs
// `affine`).

struct Params {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    k: u32,
    oh: u32,
    ow: u32,
    stride: u32,
    ks: u32,
    pad: u32,
    accumulate: u32, // 1 adds into the output, 0 overwrites it
    m: u32,          // tl: GEMM rows; rp data ops: output units of 2 rows x 4 columns (REG_ROWS
                     // in ops/conv.rs); rp backward_weight: quads of dy (4 pixels each)
    base: u32,       // rp data ops: first channel of this weight window; rp backward_weight:
                     // tiles of output channels
    span: u32,       // rp: channels in this weight window
    chunk: u32,      // backward_weight: reduction length (tl) or quads (rp) per split
    splits: u32,     // backward_weight: number of splits
    len: u32,        // reduce_splits: elements of the output
}

@group(0) @binding(0) var<uniform> p: Params;

// Tiled path operands.
@group(0) @binding(6) var<storage, read_write> dw: array<f32>;
@group(0) @binding(7) var<storage, read_write> part: array<f32>;
@group(0) @binding(8) var<storage, read> part_in: array<f32>;
@group(0) @binding(9) var<storage, read_write> out: array<ST>; // reduce_splits' sums

// Register path operands.
@group(0) @binding(10) var at: texture_2d<f32>;                 // x (forward, backward_weight) or dy (backward_data)
@group(0) @binding(11) var bt: texture_2d<f32>;                 // dy (backward_weight)
@group(0) @binding(12) var<uniform> wu: array<vec4f, 4096>;     // weight window
@group(0) @binding(13) var<storage, read_write> out4: array<vec4<ST>>; // y or dx, by quads
@group(0) @binding(5) var<uniform> affu: array<vec4f, 4096>;    // PRE: per input channel (mean, scale, beta, invstd)

// ------------------------------------------------------------------------------------------
// Helper of the tiled kernels (conv_tiled.wgsl, a template built per tile configuration)
// ------------------------------------------------------------------------------------------

// out (=|+=) the sum of the `splits` partial results, added in split order, rounded once to
// ST: a split backward_weight's dw (f32, Shader::Conv) or a split data op's output (f32, or f16
// in Shader::ConvF16). An invocation sums 4 elements 64 apart (a workgroup 256 consecutive
// ones, each load coalesced), so that it has 4 independent loads in flight per split: with one,
// the H200 ran this at 1 TB/s of its 4.8 (BENCHMARKS.md, cfa22d4). Indices past the end read the
// last element, and are not stored.
@compute @workgroup_size(64)
fn reduce_splits(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                 @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid + vec4u(0u, 64u, 128u, 192u);
    let r = min(i, vec4u(p.len - 1u));
    var s = vec4f(part_in[r.x], part_in[r.y], part_in[r.z], part_in[r.w]);
    for (var j = 1u; j < p.splits; j++) {
        let o = j * p.len;
        s += vec4f(part_in[o + r.x], part_in[o + r.y], part_in[o + r.z], part_in[o + r.w]);
    }
    reduce_store(i.x, s.x);
    reduce_store(i.y, s.y);
    reduce_store(i.z, s.z);
    reduce_store(i.w, s.w);
}

fn reduce_store(i: u32, s: f32) {
    if i < p.len {
        var v = s;
        if p.accumulate == 1u {
            v = f32(out[i]) + v;
        }
        out[i] = ST(v);
    }
}

// @subgroups: the rest of this file uses subgroup operations. On an adapter without them the
// host builds the module without it (gpu.rs `Shader::source`), and ops/conv.rs never picks
// the register path there.
// ------------------------------------------------------------------------------------------
// Register path (CPU adapters)
// ------------------------------------------------------------------------------------------

const LANES: u32 = 8u;
const TEXW: u32 = 1024u; // texels per row of an operand texture (4096 floats)

// Whether the `at` operand (x: forward and backward_weight only) is read through the BN + ReLU
// prologue.
override PRE: bool = false;

// Texel `t` of an operand texture: elements 4t .. 4t+3 of the flattened tensor.
fn tex_a(t: u32) -> vec4f {
    return textureLoad(at, vec2u(t % TEXW, t / TEXW), 0);
}

fn tex_b(t: u32) -> vec4f {
    return textureLoad(bt, vec2u(t % TEXW, t / TEXW), 0);
}

// Element i of the weight window, as the activations' type holds it: the f16 path (ST = f16)
// convolves the weights rounded to halves, as its tiled kernels do (an identity where ST = f32).
fn wat(i: u32) -> f32 {
    return as_st(wu[i >> 2u][i & 3u]);
}

// The input of the 9 taps (t = ky * 3 + kx) for a lane's quad, or of tap 0 for ks = 1.
struct X9 {
    t0: vec4f, t1: vec4f, t2: vec4f,
    t3: vec4f, t4: vec4f, t5: vec4f,
    t6: vec4f, t7: vec4f, t8: vec4f,
}

// One lane's weights of the 9 taps for its channel (a: taps 0-3, b: taps 4-7, c: tap 8).
struct W9 {
    a: vec4f,
    b: vec4f,
    c: f32,
}

// Outputs of 8 channels (channel j of the block: lane j's weights) for a lane's quad.
struct Acc8 {
    a0: vec4f, a1: vec4f, a2: vec4f, a3: vec4f,
    a4: vec4f, a5: vec4f, a6: vec4f, a7: vec4f,
}

// Where a lane's quad is: q over [N * rows * quads per row) with `rows` and `cols` (a multiple
// of 4) the spatial size of the quads' tensor.
struct Quad {
    ok: bool,  // q is a real quad (the last group of 8 may be partial)
    n: u32,
    row: u32,
    qx: u32,   // quad within the row: columns 4qx .. 4qx+3
    qpr: u32,  // quads per row
    lok: bool, // a quad to the left in the same row (held by lane - 1)
    rok: bool, // a quad to the right in the same row (held by lane + 1)
}

fn quad(q: u32, total: u32, rows: u32, cols: u32) -> Quad {
    var o: Quad;
    o.ok = q < total;
    let qc = min(q, total - 1u);
    o.qpr = cols / 4u;
    o.qx = qc % o.qpr;
    let r = qc / o.qpr;
    o.row = r % rows;
    o.n = r / rows;
    o.lok = o.qx > 0u;
    o.rok = o.qx + 1u < o.qpr;
    return o;
}

// Row `iy` (may be outside [0, h)) of plane `plane` (n * C + c) of the `at` tensor, columns
// 4 * tq .. 4 * tq + 3 in texels: zero outside the rows.
// Where PRE, the texel goes through the prologue with the plane's channel values `pa` (from
// `pro`, read once per channel by the caller).
fn row_a(plane: u32, iy: i32, h: u32, w: u32, tq: u32, pa: vec4f) -> vec4f {
    let ok = iy >= 0 && iy < i32(h);
    let r = u32(clamp(iy, 0, i32(h) - 1));
    var v = tex_a((plane * h + r) * (w / 4u) + tq);
    if PRE {
        v = max(fma(v - vec4f(pa.x), vec4f(pa.y), vec4f(pa.z)), vec4f(0.0));
    }
    return select(vec4f(0.0), v, ok);
}

// The prologue's values of input channel c (unused unless PRE), from a uniform window: one
// vector gather.
fn pro(c: u32) -> vec4f {
    if PRE {
        return affu[c];
    }
    return vec4f(0.0);
}

// One input row for the 3 column taps of a stride-1 3x3 correlation at quad columns
// 4qx .. 4qx+3: columns shifted by -1 (l), 0 (m) and +1 (r). The neighbouring columns come from
// the lanes holding the quads to the left and right (zero padding at the row's ends).
struct Row3 {
    l: vec4f,
    m: vec4f,
    r: vec4f,
}

fn row3_s1(plane: u32, iy: i32, h: u32, w: u32, g: Quad, pa: vec4f) -> Row3 {
    let m = row_a(plane, iy, h, w, g.qx, pa);
    let l = select(0.0, subgroupShuffleUp(m.w, 1u), g.lok);
    let r = select(0.0, subgroupShuffleDown(m.x, 1u), g.rok);
    return Row3(vec4f(l, m.xyz), m, vec4f(m.yzw, r));
}

// Stride 2 (pad 1): output quad columns 4qx .. 4qx+3 read input columns 8qx - 1 .. 8qx + 7.
fn row3_s2(plane: u32, iy: i32, h: u32, w: u32, g: Quad, pa: vec4f) -> Row3 {
    let a = row_a(plane, iy, h, w, 2u * g.qx, pa);
    let b = row_a(plane, iy, h, w, 2u * g.qx + 1u, pa);
    let l = select(0.0, subgroupShuffleUp(b.w, 1u), g.lok);
    return Row3(vec4f(l, a.y, a.w, b.y), vec4f(a.x, a.z, b.x, b.z), vec4f(a.y, a.w, b.y, b.w));
}

// The 9 taps from rows iy0 .. iy0+2 (t = ky * 3 + kx). `flip` mirrors the column taps (kx = 0
// takes column + 1): the transposed convolution of backward_data.
fn taps3(r0: Row3, r1: Row3, r2: Row3, flip: bool) -> X9 {
    var o = X9(r0.l, r0.m, r0.r, r1.l, r1.m, r1.r, r2.l, r2.m, r2.r);
    if flip {
        o = X9(r0.r, r0.m, r0.l, r1.r, r1.m, r1.l, r2.r, r2.m, r2.l);
    }
    return o;
}

// Lane `j`'s weights, to every lane.
fn wb0(w: W9) -> W9 { return W9(subgroupBroadcast(w.a, 0u), subgroupBroadcast(w.b, 0u), subgroupBroadcast(w.c, 0u)); }
fn wb1(w: W9) -> W9 { return W9(subgroupBroadcast(w.a, 1u), subgroupBroadcast(w.b, 1u), subgroupBroadcast(w.c, 1u)); }
fn wb2(w: W9) -> W9 { return W9(subgroupBroadcast(w.a, 2u), subgroupBroadcast(w.b, 2u), subgroupBroadcast(w.c, 2u)); }
fn wb3(w: W9) -> W9 { return W9(subgroupBroadcast(w.a, 3u), subgroupBroadcast(w.b, 3u), subgroupBroadcast(w.c, 3u)); }
fn wb4(w: W9) -> W9 { return W9(subgroupBroadcast(w.a, 4u), subgroupBroadcast(w.b, 4u), subgroupBroadcast(w.c, 4u)); }
fn wb5(w: W9) -> W9 { return W9(subgroupBroadcast(w.a, 5u), subgroupBroadcast(w.b, 5u), subgroupBroadcast(w.c, 5u)); }
fn wb6(w: W9) -> W9 { return W9(subgroupBroadcast(w.a, 6u), subgroupBroadcast(w.b, 6u), subgroupBroadcast(w.c, 6u)); }
fn wb7(w: W9) -> W9 { return W9(subgroupBroadcast(w.a, 7u), subgroupBroadcast(w.b, 7u), subgroupBroadcast(w.c, 7u)); }

// acc + sum over the 9 taps (or tap 0 alone when ks = 1) of input * weight.
fn mac9(acc: vec4f, x: X9, w: W9, ks: u32) -> vec4f {
    var a = fma(x.t0, vec4f(w.a.x), acc);
    if ks == 3u {
        a = fma(x.t1, vec4f(w.a.y), a);
        a = fma(x.t2, vec4f(w.a.z), a);
        a = fma(x.t3, vec4f(w.a.w), a);
        a = fma(x.t4, vec4f(w.b.x), a);
        a = fma(x.t5, vec4f(w.b.y), a);
        a = fma(x.t6, vec4f(w.b.z), a);
        a = fma(x.t7, vec4f(w.b.w), a);
        a = fma(x.t8, vec4f(w.c), a);
    }
    return a;
}

// The dy taps of a stride-2 transposed 3x3 convolution (pad 1) for a dx quad at columns
// 4qx .. 4qx+3 from one dy row: d.xy = dy columns m = 2qx, m + 1, d.z = column m + 2. Even
// columns of the quad take tap kx = 1 of column m (+1), odd columns kx = 0 of the column right
// of them and kx = 2 of the column left of them; w0, w1, w2 are the row's kx = 0, 1, 2 weights.
fn macd(acc: vec4f, d: vec4f, w0: f32, w1: f32, w2: f32) -> vec4f {
    var o = acc;
    o.x = fma(d.x, w1, o.x);
    o.y = fma(d.y, w0, fma(d.x, w2, o.y));
    o.z = fma(d.y, w1, o.z);
    o.w = fma(d.z, w0, fma(d.y, w2, o.w));
    return o;
}

// One channel. mode 0: a correlation with the taps of x (ks = 3, or tap 0 alone for ks = 1).
// mode 1: stride-2 transposed, even dx row: dy row in x.t0 through the ky = 1 weights.
// mode 2: stride-2 transposed, odd dx row: dy row below in x.t0 (ky = 0), above in x.t1 (ky = 2).
fn mac1(acc: vec4f, x: X9, w: W9, ks: u32, mode: u32) -> vec4f {
    var o: vec4f;
    if mode == 1u {
        o = macd(acc, x.t0, w.a.w, w.b.x, w.b.y);
    } else if mode == 2u {
        o = macd(macd(acc, x.t0, w.a.x, w.a.y, w.a.z), x.t1, w.b.z, w.b.w, w.c);
    } else {
        o = mac9(acc, x, w, ks);
    }
    return o;
}

// 8 channels: channel j of the block takes lane j's weights.
fn mac8(acc: ptr<function, Acc8>, x: X9, w: W9, ks: u32, mode: u32) {
    (*acc).a0 = mac1((*acc).a0, x, wb0(w), ks, mode);
    (*acc).a1 = mac1((*acc).a1, x, wb1(w), ks, mode);
    (*acc).a2 = mac1((*acc).a2, x, wb2(w), ks, mode);
    (*acc).a3 = mac1((*acc).a3, x, wb3(w), ks, mode);
    (*acc).a4 = mac1((*acc).a4, x, wb4(w), ks, mode);
    (*acc).a5 = mac1((*acc).a5, x, wb5(w), ks, mode);
    (*acc).a6 = mac1((*acc).a6, x, wb6(w), ks, mode);
    (*acc).a7 = mac1((*acc).a7, x, wb7(w), ks, mode);
}

// This lane's weights for window channel `wl` (of `span`) at reduction channel `r` (of
// `rn`): window layout [channel][r][tap] (forward) or [r][channel][tap] (backward_data, where
// r is the output channel k).
fn wload(wl: u32, r: u32, rn: u32, span: u32, ks: u32, rmajor: bool) -> W9 {
    let kk = ks * ks;
    let ok = wl < span;
    let wlc = min(wl, span - 1u);
    let i = select((wlc * rn + r) * kk, (r * span + wlc) * kk, rmajor);
    var o: W9;
    o.a.x = wat(i);
    if ks == 3u {
        o.a = vec4f(o.a.x, wat(i + 1u), wat(i + 2u), wat(i + 3u));
        o.b = vec4f(wat(i + 4u), wat(i + 5u), wat(i + 6u), wat(i + 7u));
        o.c = wat(i + 8u);
    }
    o.a = select(vec4f(0.0), o.a, ok);
    o.b = select(vec4f(0.0), o.b, ok);
    o.c = select(0.0, o.c, ok);
    return o;
}

// Writes channel `ch` (global, of `chans`) of output row `row` (of `rows`) at a lane's quad
// columns, if channel, row and quad are real.
fn put(ch: u32, chans: u32, g: Quad, row: u32, rows: u32, v: vec4f, ok: bool) {
    if ok && g.ok && ch < chans && row < rows {
        let o = ((g.n * chans + ch) * rows + row) * g.qpr + g.qx;
        if p.accumulate == 1u {
            out4[o] = vec4<ST>(vec4f(out4[o]) + v);
        } else {
            out4[o] = vec4<ST>(v);
        }
    }
}

fn sel8(a: Acc8, b: Acc8, c: bool) -> Acc8 {
    return Acc8(select(a.a0, b.a0, c), select(a.a1, b.a1, c), select(a.a2, b.a2, c), select(a.a3, b.a3, c),
                select(a.a4, b.a4, c), select(a.a5, b.a5, c), select(a.a6, b.a6, c), select(a.a7, b.a7, c));
}

// Channel j of a block.
fn pick8(a: Acc8, j: u32) -> vec4f {
    var v = a.a0;
    v = select(v, a.a1, j == 1u);
    v = select(v, a.a2, j == 2u);
    v = select(v, a.a3, j == 3u);
    v = select(v, a.a4, j == 4u);
    v = select(v, a.a5, j == 5u);
    v = select(v, a.a6, j == 6u);
    v = select(v, a.a7, j == 7u);
    return v;
}

// Input rows base .. base+4 of one plane of the `at` tensor, each with its 3 column taps.
struct In5 {
    i0: Row3, i1: Row3, i2: Row3, i3: Row3, i4: Row3,
}

// One input row for the column taps: stride 1 or 2, 3 taps, or 1 tap (in .m).
fn xrow(plane: u32, iy: i32, h: u32, w: u32, g: Quad, s: u32, ks: u32, pa: vec4f) -> Row3 {
    var o: Row3;
    if ks == 3u {
        if s == 1u {
            o = row3_s1(plane, iy, h, w, g, pa);
        } else {
            o = row3_s2(plane, iy, h, w, g, pa);
        }
    } else if s == 1u {
        o.m = row_a(plane, iy, h, w, g.qx, pa);
    } else {
        let a = row_a(plane, iy, h, w, 2u * g.qx, pa);
        let b = row_a(plane, iy, h, w, 2u * g.qx + 1u, pa);
        o.m = vec4f(a.x, a.z, b.x, b.z);
    }
    return o;
}

// The first `n` (a literal, at most 5) input rows from `base`; the others stay zero.
fn inputs(plane: u32, base: i32, h: u32, w: u32, g: Quad, s: u32, ks: u32, n: u32, pa: vec4f) -> In5 {
    var o: In5;
    o.i0 = xrow(plane, base, h, w, g, s, ks, pa);
    if n > 1u { o.i1 = xrow(plane, base + 1, h, w, g, s, ks, pa); }
    if n > 2u { o.i2 = xrow(plane, base + 2, h, w, g, s, ks, pa); }
    if n > 3u { o.i3 = xrow(plane, base + 3, h, w, g, s, ks, pa); }
    if n > 4u { o.i4 = xrow(plane, base + 4, h, w, g, s, ks, pa); }
    return o;
}

// Row j (a literal) of `ins`.
fn pick(ins: In5, j: u32) -> Row3 {
    var r = ins.i4;
    if j == 0u { r = ins.i0; }
    if j == 1u { r = ins.i1; }
    if j == 2u { r = ins.i2; }
    if j == 3u { r = ins.i3; }
    return r;
}

// The taps of an output row from rows j, j+1, j+2 (a literal j) of `ins`, top down (`flip`:
// bottom up and mirrored, for the transposed convolution), or from row j alone (ks = 1).
fn taps_at(ins: In5, j: u32, ks: u32, flip: bool) -> X9 {
    var o: X9;
    if ks == 1u {
        o.t0 = pick(ins, j).m;
    } else if flip {
        o = taps3(pick(ins, j + 2u), pick(ins, j + 1u), pick(ins, j), true);
    } else {
        o = taps3(pick(ins, j), pick(ins, j + 1u), pick(ins, j + 2u), false);
    }
    return o;
}

// Elements flat, flat + 1 (flat even) of the `at` tensor.
fn pair_a(flat: u32) -> vec2f {
    let t = tex_a(flat >> 2u);
    return select(t.xy, t.zw, (flat & 2u) != 0u);
}

// Row r of a dy plane at columns m = 2qx, m + 1 (xy) and m + 2 (z, from the lane to the
// right); zero past the rows or the row's end.
fn dy_pair(plane: u32, r: u32, rows: u32, cols: u32, g: Quad) -> vec4f {
    let v = select(vec2f(0.0), pair_a((plane * rows + min(r, rows - 1u)) * cols + 2u * g.qx), r < rows);
    let e = select(0.0, subgroupShuffleDown(v.x, 1u), g.rok);
    return vec4f(v, e, 0.0);
}

// forward (op 0) and backward_data (op 1); s (stride), ks and op are literals. A lane owns a
// quad of 2 output rows (row0 = 2 * g.row, row0 + 1) x 16 output channels (window channels
// wl0 = wid.y * 16 ..): a0, a1 hold row 0 (channels wl0 .., wl0 + 8 ..), a2, a3 row 1. The
// reduction runs over the input channels (forward) or the output channels k (backward_data);
// per reduction channel a lane gathers the weights of its 2 channels (wl0 + lane, wl0 + 8 +
// lane) and every lane takes them by broadcast, for both rows.
fn rp_data(wid: vec3u, nwg: vec3u, lane: u32, op: u32, s: u32, ks: u32) {
    var orows: u32; // output rows, columns and channels
    var ocols: u32;
    var ochans: u32;
    var irows: u32; // rows, columns and channels of the texture operand
    var icols: u32;
    var red: u32;
    if op == 0u {
        orows = p.oh; ocols = p.ow; ochans = p.k;
        irows = p.h; icols = p.w; red = p.c;
    } else {
        orows = p.h; ocols = p.w; ochans = p.c;
        irows = p.oh; icols = p.ow; red = p.k;
    }
    let g = quad((wid.z * nwg.x + wid.x) * LANES + lane, p.m, (orows + 1u) / 2u, ocols);
    let row0 = 2u * g.row;
    let wl0 = wid.y * 16u;
    // The input rows of the two output rows: `n` (a literal) from `base`; output row 1's taps
    // start s rows below row 0's. Transposed stride 2: dy rows row0 / 2 (ky = 1 of dx row0,
    // ky = 2 of row0 + 1) and row0 / 2 + 1 (ky = 0 of row0 + 1).
    let pad = i32(ks / 2u);
    let n = select(select(2u, ks + 2u, op == 0u), ks + 1u, s == 1u);
    let base = select(select(i32(row0 / 2u), 2 * i32(row0) - pad, op == 0u), i32(row0) - pad, s == 1u);
    // Transposed 1x1 stride 2: only even dx rows (and columns) take a term.
    let odd1x1 = op == 1u && s == 2u && ks == 1u;
    var a0: Acc8;
    var a1: Acc8;
    var a2: Acc8;
    var a3: Acc8;
    for (var c = 0u; c < red; c++) {
        let plane = g.n * red + c;
        var x0: X9;
        var x1: X9;
        var m0 = 0u;
        var m1 = 0u;
        if op == 1u && s == 2u {
            let d0 = dy_pair(plane, u32(base), irows, icols, g);
            let d1 = dy_pair(plane, u32(base) + 1u, irows, icols, g);
            if ks == 3u {
                x0.t0 = d0;
                m0 = 1u;
                x1.t0 = d1;
                x1.t1 = d0;
                m1 = 2u;
            } else {
                x0.t0 = vec4f(d0.x, 0.0, d0.y, 0.0);
            }
        } else {
            let ins = inputs(plane, base, irows, icols, g, s, ks, n, pro(c));
            x0 = taps_at(ins, 0u, ks, op == 1u);
            x1 = taps_at(ins, s, ks, op == 1u);
        }
        let w0 = wload(wl0 + lane, c, red, p.span, ks, op == 1u);
        let w1 = wload(wl0 + 8u + lane, c, red, p.span, ks, op == 1u);
        mac8(&a0, x0, w0, ks, m0);
        mac8(&a1, x0, w1, ks, m0);
        if !odd1x1 {
            mac8(&a2, x1, w0, ks, m1);
            mac8(&a3, x1, w1, ks, m1);
        }
    }
    // Stores in a loop (one store site: the code of a store is long on a CPU adapter): block
    // i = 2 * row + half, picked by selects.
    for (var i = 0u; i < 4u; i++) {
        var a = a0;
        a = sel8(a, a1, i == 1u);
        a = sel8(a, a2, i == 2u);
        a = sel8(a, a3, i == 3u);
        let wl = wl0 + 8u * (i % 2u);
        for (var j = 0u; j < 8u; j++) {
            put(p.base + wl + j, ochans, g, row0 + i / 2u, orows, pick8(a, j), wl + j < p.span);
        }
    }
}

@compute @workgroup_size(8)
fn rp_forward_s1k3(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                   @builtin(subgroup_invocation_id) lane: u32) {
    rp_data(wid, nwg, lane, 0u, 1u, 3u);
}

@compute @workgroup_size(8)
fn rp_forward_s2k3(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                   @builtin(subgroup_invocation_id) lane: u32) {
    rp_data(wid, nwg, lane, 0u, 2u, 3u);
}

@compute @workgroup_size(8)
fn rp_forward_s1k1(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                   @builtin(subgroup_invocation_id) lane: u32) {
    rp_data(wid, nwg, lane, 0u, 1u, 1u);
}

@compute @workgroup_size(8)
fn rp_forward_s2k1(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                   @builtin(subgroup_invocation_id) lane: u32) {
    rp_data(wid, nwg, lane, 0u, 2u, 1u);
}

@compute @workgroup_size(8)
fn rp_backward_data_s1k3(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                         @builtin(subgroup_invocation_id) lane: u32) {
    rp_data(wid, nwg, lane, 1u, 1u, 3u);
}

@compute @workgroup_size(8)
fn rp_backward_data_s2k3(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                         @builtin(subgroup_invocation_id) lane: u32) {
    rp_data(wid, nwg, lane, 1u, 2u, 3u);
}

@compute @workgroup_size(8)
fn rp_backward_data_s1k1(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                         @builtin(subgroup_invocation_id) lane: u32) {
    rp_data(wid, nwg, lane, 1u, 1u, 1u);
}

@compute @workgroup_size(8)
fn rp_backward_data_s2k1(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                         @builtin(subgroup_invocation_id) lane: u32) {
    rp_data(wid, nwg, lane, 1u, 2u, 1u);
}

// backward_weight: lanes = output quads (of dy), a tile of 8 k x 4 c (x 9 taps; 1x1: 8 k x 16
// c) per workgroup, partial sums per lane in registers, reduced across the lanes at the end.

// Sums over a lane's quads of one (k, c) pair, per tap.
struct A9 {
    t0: f32, t1: f32, t2: f32,
    t3: f32, t4: f32, t5: f32,
    t6: f32, t7: f32, t8: f32,
}

// One k of the tile: its 4 c.
struct Row4 {
    c0: A9, c1: A9, c2: A9, c3: A9,
}

struct Blk {
    k0: Row4, k1: Row4, k2: Row4, k3: Row4,
    k4: Row4, k5: Row4, k6: Row4, k7: Row4,
}

// dy of the tile's 8 channels for a lane's quad.
struct D8 {
    k0: vec4f, k1: vec4f, k2: vec4f, k3: vec4f,
    k4: vec4f, k5: vec4f, k6: vec4f, k7: vec4f,
}

fn dot4(acc: f32, a: vec4f, b: vec4f) -> f32 {
    return fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, acc))));
}

// The first nt (a literal: 1, 4 or 9) sums of a: += dot(d, x tap).
fn dot9(a: A9, d: vec4f, x: X9, nt: u32) -> A9 {
    var o = a;
    o.t0 = dot4(a.t0, d, x.t0);
    if nt > 1u {
        o.t1 = dot4(a.t1, d, x.t1);
        o.t2 = dot4(a.t2, d, x.t2);
        o.t3 = dot4(a.t3, d, x.t3);
    }
    if nt > 4u {
        o.t4 = dot4(a.t4, d, x.t4);
        o.t5 = dot4(a.t5, d, x.t5);
        o.t6 = dot4(a.t6, d, x.t6);
        o.t7 = dot4(a.t7, d, x.t7);
        o.t8 = dot4(a.t8, d, x.t8);
    }
    return o;
}

// Column 0 of the tile (input channel ct0 + 0, taps x) for all 8 k.
fn col0(b: ptr<function, Blk>, d: D8, x: X9, nt: u32) {
    (*b).k0.c0 = dot9((*b).k0.c0, d.k0, x, nt); (*b).k1.c0 = dot9((*b).k1.c0, d.k1, x, nt);
    (*b).k2.c0 = dot9((*b).k2.c0, d.k2, x, nt); (*b).k3.c0 = dot9((*b).k3.c0, d.k3, x, nt);
    (*b).k4.c0 = dot9((*b).k4.c0, d.k4, x, nt); (*b).k5.c0 = dot9((*b).k5.c0, d.k5, x, nt);
    (*b).k6.c0 = dot9((*b).k6.c0, d.k6, x, nt); (*b).k7.c0 = dot9((*b).k7.c0, d.k7, x, nt);
}

// Column 1 of the tile (input channel ct0 + 1, taps x) for all 8 k.
fn col1(b: ptr<function, Blk>, d: D8, x: X9, nt: u32) {
    (*b).k0.c1 = dot9((*b).k0.c1, d.k0, x, nt); (*b).k1.c1 = dot9((*b).k1.c1, d.k1, x, nt);
    (*b).k2.c1 = dot9((*b).k2.c1, d.k2, x, nt); (*b).k3.c1 = dot9((*b).k3.c1, d.k3, x, nt);
    (*b).k4.c1 = dot9((*b).k4.c1, d.k4, x, nt); (*b).k5.c1 = dot9((*b).k5.c1, d.k5, x, nt);
    (*b).k6.c1 = dot9((*b).k6.c1, d.k6, x, nt); (*b).k7.c1 = dot9((*b).k7.c1, d.k7, x, nt);
}

// Column 2 of the tile (input channel ct0 + 2, taps x) for all 8 k.
fn col2(b: ptr<function, Blk>, d: D8, x: X9, nt: u32) {
    (*b).k0.c2 = dot9((*b).k0.c2, d.k0, x, nt); (*b).k1.c2 = dot9((*b).k1.c2, d.k1, x, nt);
    (*b).k2.c2 = dot9((*b).k2.c2, d.k2, x, nt); (*b).k3.c2 = dot9((*b).k3.c2, d.k3, x, nt);
    (*b).k4.c2 = dot9((*b).k4.c2, d.k4, x, nt); (*b).k5.c2 = dot9((*b).k5.c2, d.k5, x, nt);
    (*b).k6.c2 = dot9((*b).k6.c2, d.k6, x, nt); (*b).k7.c2 = dot9((*b).k7.c2, d.k7, x, nt);
}

// Column 3 of the tile (input channel ct0 + 3, taps x) for all 8 k.
fn col3(b: ptr<function, Blk>, d: D8, x: X9, nt: u32) {
    (*b).k0.c3 = dot9((*b).k0.c3, d.k0, x, nt); (*b).k1.c3 = dot9((*b).k1.c3, d.k1, x, nt);
    (*b).k2.c3 = dot9((*b).k2.c3, d.k2, x, nt); (*b).k3.c3 = dot9((*b).k3.c3, d.k3, x, nt);
    (*b).k4.c3 = dot9((*b).k4.c3, d.k4, x, nt); (*b).k5.c3 = dot9((*b).k5.c3, d.k5, x, nt);
    (*b).k6.c3 = dot9((*b).k6.c3, d.k6, x, nt); (*b).k7.c3 = dot9((*b).k7.c3, d.k7, x, nt);
}

// x (the `at` texture) of input channel c (clamped to the channels) at a lane's output quad,
// 1x1: row g.row (stride 1) or every other column of row 2 * g.row (stride 2).
fn x1(g: Quad, c: u32, s: u32) -> vec4f {
    let cc = min(c, p.c - 1u);
    let plane = g.n * p.c + cc;
    let pa = pro(cc);
    if s == 1u {
        return row_a(plane, i32(g.row), p.h, p.w, g.qx, pa);
    }
    let a = row_a(plane, 2 * i32(g.row), p.h, p.w, 2u * g.qx, pa);
    let b = row_a(plane, 2 * i32(g.row), p.h, p.w, 2u * g.qx + 1u, pa);
    return vec4f(a.x, a.z, b.x, b.z);
}

// The taps of x for a column of the tile at a lane's output quad: the 9 taps of input channel
// c (3x3), or (1x1) input channels c .. c + 3 in tap slots 0 .. 3.
fn wtaps(g: Quad, c: u32, s: u32, ks: u32) -> X9 {
    var xs: X9;
    if ks == 3u {
        let cc = min(c, p.c - 1u);
        let plane = g.n * p.c + cc;
        let pa = pro(cc);
        if s == 1u {
            let iy = i32(g.row) - 1;
            xs = taps3(row3_s1(plane, iy, p.h, p.w, g, pa), row3_s1(plane, iy + 1, p.h, p.w, g, pa),
                       row3_s1(plane, iy + 2, p.h, p.w, g, pa), false);
        } else {
            let iy = 2 * i32(g.row) - 1;
            xs = taps3(row3_s2(plane, iy, p.h, p.w, g, pa), row3_s2(plane, iy + 1, p.h, p.w, g, pa),
                       row3_s2(plane, iy + 2, p.h, p.w, g, pa), false);
        }
    } else {
        xs.t0 = x1(g, c, s);
        xs.t1 = x1(g, c + 1u, s);
        xs.t2 = x1(g, c + 2u, s);
        xs.t3 = x1(g, c + 3u, s);
    }
    return xs;
}

// dy quad of channel k (zero past the channels or the quads).
fn dquad(g: Quad, k: u32) -> vec4f {
    let t = ((g.n * p.k + min(k, p.k - 1u)) * p.oh + g.row) * g.qpr + g.qx;
    return select(vec4f(0.0), tex_b(t), g.ok && k < p.k);
}

// The sum over the 8 lanes, the same value in every lane, added in a fixed order.
fn lanes_sum(v: f32) -> f32 {
    let a = v + subgroupShuffleXor(v, 1u);
    let b = a + subgroupShuffleXor(a, 2u);
    return b + subgroupShuffleXor(b, 4u);
}

fn sum9(a: A9) -> A9 {
    return A9(lanes_sum(a.t0), lanes_sum(a.t1), lanes_sum(a.t2), lanes_sum(a.t3), lanes_sum(a.t4),
              lanes_sum(a.t5), lanes_sum(a.t6), lanes_sum(a.t7), lanes_sum(a.t8));
}

fn sum_row(r: Row4) -> Row4 {
    return Row4(sum9(r.c0), sum9(r.c1), sum9(r.c2), sum9(r.c3));
}

fn sum_blk(b: Blk) -> Blk {
    return Blk(sum_row(b.k0), sum_row(b.k1), sum_row(b.k2), sum_row(b.k3),
               sum_row(b.k4), sum_row(b.k5), sum_row(b.k6), sum_row(b.k7));
}

fn sel9(a: A9, b: A9, c: bool) -> A9 {
    return A9(select(a.t0, b.t0, c), select(a.t1, b.t1, c), select(a.t2, b.t2, c), select(a.t3, b.t3, c),
              select(a.t4, b.t4, c), select(a.t5, b.t5, c), select(a.t6, b.t6, c), select(a.t7, b.t7, c),
              select(a.t8, b.t8, c));
}

fn sel_row(a: Row4, b: Row4, c: bool) -> Row4 {
    return Row4(sel9(a.c0, b.c0, c), sel9(a.c1, b.c1, c), sel9(a.c2, b.c2, c), sel9(a.c3, b.c3, c));
}

// Row `i` of the tile (selects, not a dynamic index, so that the tile stays in registers).
fn pick_row(b: Blk, i: u32) -> Row4 {
    var r = b.k0;
    r = sel_row(r, b.k1, i == 1u);
    r = sel_row(r, b.k2, i == 2u);
    r = sel_row(r, b.k3, i == 3u);
    r = sel_row(r, b.k4, i == 4u);
    r = sel_row(r, b.k5, i == 5u);
    r = sel_row(r, b.k6, i == 6u);
    r = sel_row(r, b.k7, i == 7u);
    return r;
}

fn pick_col(r: Row4, i: u32) -> A9 {
    var a = r.c0;
    a = sel9(a, r.c1, i == 1u);
    a = sel9(a, r.c2, i == 2u);
    a = sel9(a, r.c3, i == 3u);
    return a;
}

fn pick_tap(a: A9, t: u32) -> f32 {
    var v = a.t0;
    v = select(v, a.t1, t == 1u);
    v = select(v, a.t2, t == 2u);
    v = select(v, a.t3, t == 3u);
    v = select(v, a.t4, t == 4u);
    v = select(v, a.t5, t == 5u);
    v = select(v, a.t6, t == 6u);
    v = select(v, a.t7, t == 7u);
    v = select(v, a.t8, t == 8u);
    return v;
}

// Split wid.x covers quads [wid.x * chunk, (wid.x + 1) * chunk) (chunk a multiple of 8); tile
// wid.y = (ct, kt) with kt fastest and p.base k-tiles. A tile is 8 k x 4 columns; a column is
// one input channel with its 9 taps (3x3), or 4 input channels (1x1: four times fewer dy
// fetches per sum than one channel a column).
fn rp_wgt(wid: vec3u, lane: u32, s: u32, ks: u32) {
    let per_col = select(1u, 4u, ks == 1u); // input channels per column
    let nt = select(9u, 4u, ks == 1u); // sums per (k, column)
    let kt0 = (wid.y % p.base) * 8u;
    let ct0 = (wid.y / p.base) * 4u * per_col;
    let begin = wid.x * p.chunk;
    let end = min(begin + p.chunk, p.m);
    var b: Blk;
    // The lane's quad, divided out for the first step and stepped: a step moves the 8 lanes
    // over LANES / qpr whole rows (quads per row divide 8), so the lane's column stays and its
    // row and image advance. Past the quads (ok false) the image is clamped, as quad() does.
    var g = quad(begin + lane, p.m, p.oh, p.ow);
    let rows_step = LANES / g.qpr;
    var n = g.n;
    for (var q0 = begin; q0 < end; q0 += LANES) {
        g.ok = q0 + lane < p.m;
        g.n = min(n, p.n - 1u);
        let d = D8(dquad(g, kt0), dquad(g, kt0 + 1u), dquad(g, kt0 + 2u), dquad(g, kt0 + 3u),
                   dquad(g, kt0 + 4u), dquad(g, kt0 + 5u), dquad(g, kt0 + 6u), dquad(g, kt0 + 7u));
        col0(&b, d, wtaps(g, ct0, s, ks), nt);
        col1(&b, d, wtaps(g, ct0 + per_col, s, ks), nt);
        col2(&b, d, wtaps(g, ct0 + 2u * per_col, s, ks), nt);
        col3(&b, d, wtaps(g, ct0 + 3u * per_col, s, ks), nt);
        g.row += rows_step;
        while g.row >= p.oh {
            g.row -= p.oh;
            n += 1u;
        }
    }
    // Every lane gets the tile's sums; lane i writes row i (k = kt0 + i), in a loop (one
    // store site: the code of a store is long on a CPU adapter).
    let r = pick_row(sum_blk(b), lane);
    let k = kt0 + lane;
    let kk = ks * ks;
    for (var cc = 0u; cc < 4u; cc++) {
        let a = pick_col(r, cc);
        for (var t = 0u; t < nt; t++) {
            // 3x3: channel ct0 + cc, tap t; 1x1: channel ct0 + 4 cc + t.
            let c = ct0 + cc * per_col + select(0u, t, ks == 1u);
            let o = (k * p.c + c) * kk + select(t, 0u, ks == 1u);
            if k < p.k && c < p.c {
                let v = pick_tap(a, t);
                if p.splits > 1u {
                    part[wid.x * p.len + o] = v;
                } else if p.accumulate == 1u {
                    dw[o] += v;
                } else {
                    dw[o] = v;
                }
            }
        }
    }
}

@compute @workgroup_size(8)
fn rp_backward_weight_s1k3(@builtin(workgroup_id) wid: vec3u, @builtin(subgroup_invocation_id) lane: u32) {
    rp_wgt(wid, lane, 1u, 3u);
}

@compute @workgroup_size(8)
fn rp_backward_weight_s2k3(@builtin(workgroup_id) wid: vec3u, @builtin(subgroup_invocation_id) lane: u32) {
    rp_wgt(wid, lane, 2u, 3u);
}

@compute @workgroup_size(8)
fn rp_backward_weight_s1k1(@builtin(workgroup_id) wid: vec3u, @builtin(subgroup_invocation_id) lane: u32) {
    rp_wgt(wid, lane, 1u, 1u);
}

@compute @workgroup_size(8)
fn rp_backward_weight_s2k1(@builtin(workgroup_id) wid: vec3u, @builtin(subgroup_invocation_id) lane: u32) {
    rp_wgt(wid, lane, 2u, 1u);
}

