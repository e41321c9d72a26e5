// Tiled implicit-GEMM convolution (ops/conv/tiled.rs), a template: the host prepends the
// constants of one tile configuration and one geometry family, and builds one module per
// (configuration, op, kernel size, stride):
//
//   BM, BN   output tile of a workgroup (GEMM rows x columns)
//   BK       reduction steps staged per tile
//   TM, TN   outputs per invocation (multiples of 4), held in registers as vec4s
//   THREADS  (BM / TM) * (BN / TN) invocations (also spelled out in @workgroup_size)
//   KS, KK, PAD, STRIDE   kernel size, its square, padding, stride (literals: the index
//            arithmetic folds)
//   MODE     0 forward, 1 backward_data (data_main only)
//   AS, BS   padded row strides (vec4s) of the workgroup tiles: BM / 4 + 1 and BN / 4 + 1
//   A_PER, B_PER  elements each invocation stages per tile (data_main: B_PER vec4s)
//   TA_LEN, TB_LEN  2 * BK * AS and 2 * BK * BS (two buffers each)
//   PRE      true: x is read through the BN + ReLU prologue (conv.wgsl's head), forward and
//            backward_weight only
//   TAPS, CB (data ops) TAPS true: the reduction runs by blocks of CB channels, tap-major
//            within a block: row r = (block * KK + tap) * CB + channel % CB, where the
//            reduction's channels (C forward, K backward_data) are a multiple of CB, the BK of
//            every configuration of the build's kind, plain or on cooperative matrices
//            (tiled.rs `taps`); false: channel-major, r = channel * KK + tap
//   STATS    true: the forward's epilogue also writes per-channel sums of its output tile for
//            the batch norm that follows (tile_moments, of the values as stored)
//   BSUMS    true: backward_data's epilogue also writes the per-channel sums of the backward of
//            the BN + ReLU before the convolution (in data_main's store loop, of the values as
//            stored)
//   ST       the storage type of x, dy, the weights, y and dx: f32, or f16 (the f16 path: f16
//            loads and stores, the tiles and all arithmetic in f32; dw stays f32; the weights
//            may also come as f32, transpose_main32)
//   COOP     (f16 builds, adapters with cooperative matrices) the block between @plain-begin and
//            @plain-end is replaced by conv_tiled_coop.wgsl: f16 tiles multiplied on cooperative
//            matrices (tensor cores), with constants of its own
//   LEAVE_OUT  0; else a benchmarking aid that times the kernel with one stage of its main
//            loop left out, its results wrong (ops/conv.rs `Stage`): 1 the global loads of the
//            tiles after the first (their registers take stand-in values, `stand_in`), 2 the
//            products (each staged tile read once instead, `staged_probe`, so that its staging
//            stays), 3 the loads and staging of the tiles after the first (every tile's products
//            read the first)
//
// GEMMs:
//   forward:         M = N*OH*OW output pixels, cols = K, reduction C*KK (im2col of x)
//   backward_data:   M = N*H*W input pixels,    cols = C, reduction K*KK (dy gathered at
//                    oy = (iy + pad - ky) / stride where that divides, zero elsewhere)
//   backward_weight: M = K, cols = C*KK, reduction N*OH*OW, split into `splits` ranges of
//                    `chunk` steps whose partial sums reduce_splits (conv.wgsl) adds in order.
//   The data ops split their reduction the same way where their output has few tiles (deep
//   layers on small images): split s of `splits` (the grid's y is column block + s * column
//   blocks) sums steps [s * chunk, (s + 1) * chunk) into part[s * len + o] (f32), which
//   reduce_splits (conv.wgsl) adds in order into the output, rounded once; with one split
//   (chunk = the whole reduction) the kernel writes the output itself.
//
// Design, for GPUs: the weights of the data ops come pre-transposed to [reduction][cols padded
// to 4] (transpose_main, below), so their tile loads are coalesced vec4 loads; the im2col
// operand is gathered as scalars, consecutive invocations on consecutive pixels (coalesced
// where the stride is 1), its position and bounds worked out once a tile where the reduction
// runs tap by tap (TAPS: a block's taps in consecutive tiles, so an element's reuse by the next
// tap comes a tile later), else per element. Tiles live in two workgroup buffers: while the
// invocations multiply out one, the next tile's global loads are already in flight into
// registers and are stored to the other buffer, so a tile costs one barrier. Rows of the
// workgroup tiles are padded by one vec4 so that invocations storing down a column (the
// reduction-fastest loads) spread over the banks. An invocation's TM rows (TN columns) are
// TM / 4 vec4s spaced BM / TM * 4 apart, so that a warp's vec4 reads of a tile row are
// consecutive. Every sum runs in a fixed order (bit-identical results from run to run).
//
// Every index is in range by construction, so that on Vulkan GPUs these modules are built
// without wgpu's bounds checks (gpu.rs `shader_module_in_range`; keep it so when editing):
// - storage: every load and store is guarded by the shape it reads or writes (tap_load's
//   `inside` with a channel below the reduction's: a_row's `r < r_end`, or where TAPS a tile
//   of BK channels of a block of CB, both multiples of BK, below them; b_weight, `b_ok && r < r_end`, `k < p.k`,
//   the epilogues' `live` and `col < cols`) or clamped (pro), and the splits' partials and the
//   moments are sized by the host for what the grid writes;
// - workgroup tiles: put_a / put_b take buf < 2, a reduction row below BK (arl + j * ASTEP <
//   ASTEP * A_PER = BK, and so on: Tile::valid's divisibility) and a row or column below BM or
//   BN; mac_step reads below BM / 4 (BN / 4) of a padded row, and so does staged_probe, in a
//   row below BK of a buffer below 2; the epilogues' column sums use
//   (BM / TM) * (BN / 4) vec4s of ta (Tile::stats_fit, the host's condition for STATS and
//   BSUMS) and BN / 4 of tb; the cooperative-matrix block's fragments lie inside their tiles
//   (conv_tiled_coop.wgsl);
// - registers: the host unrolls every loop that indexes a per-invocation array (below).

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
    m: u32,          // data: GEMM rows
    base: u32,
    span: u32,
    chunk: u32,      // reduction steps per split (a multiple of BK; data ops: the whole reduction when unsplit)
    splits: u32,     // number of splits
    len: u32,        // data ops: output elements (the stride of the splits' partial sums)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<ST>;         // x (forward, weight) or dy (backward_data)
@group(0) @binding(2) var<storage, read> wtt: array<vec4<ST>>;   // data: transposed weights
@group(0) @binding(3) var<storage, read_write> dst: array<ST>;   // data: y or dx
@group(0) @binding(4) var<storage, read> dys: array<ST>;         // weight: dy; BSUMS: the BN's input
@group(0) @binding(5) var<storage, read> aff: array<vec4f>;      // PRE, BSUMS: per input channel (mean, scale, beta, invstd)
@group(0) @binding(6) var<storage, read_write> dw: array<f32>;   // weight: dw
@group(0) @binding(7) var<storage, read_write> part: array<f32>; // weight: split partial sums; STATS: moments
@group(0) @binding(8) var<storage, read> wsrc: array<ST>;        // transpose_main: the weights
@group(0) @binding(9) var<storage, read_write> wtt_out: array<vec4<ST>>; // transpose_main*: transposed
@group(0) @binding(10) var<storage, read> wsrc32: array<f32>;    // transpose_main32: f32 weights

// @plain-begin: the tile storage and arithmetic. conv_tiled_coop.wgsl replaces this block where
// COOP (the f16 path on adapters with cooperative matrices); the kernels below see only the
// functions put_a, put_b, put_b4 (staging), tile_product (one staged tile into the accumulators)
// and drain (the accumulators into acc, the epilogues' registers), and the arrays ta and tb.

var<workgroup> ta: array<vec4f, TA_LEN>;
var<workgroup> tb: array<vec4f, TB_LEN>;

// The plain kernels accumulate straight into acc: no fragments.
alias Frags = u32;

// Element (reduction row r, GEMM row m) of buffer buf's A tile; (r, column n) of its B tile;
// B's vec4 column nv.
fn put_a(buf: u32, r: u32, m: u32, v: f32) { ta[(buf * BK + r) * AS + m / 4u][m % 4u] = v; }
fn put_b(buf: u32, r: u32, n: u32, v: f32) { tb[(buf * BK + r) * BS + n / 4u][n % 4u] = v; }
fn put_b4(buf: u32, r: u32, nv: u32, v: vec4f) { tb[(buf * BK + r) * BS + nv] = v; }

// LEAVE_OUT 2: one element of buffer buf's A tile and one of its B tile, at indices that vary
// over the invocations, standing in for the tile's products (so that its staging is not dead).
fn staged_probe(buf: u32, lid: u32) -> f32 {
    let r = buf * BK + lid % BK;
    return ta[r * AS + lid % (BM / 4u)].x + tb[r * BS + lid % (BN / 4u)].x;
}

// The BK reduction steps of buffer buf into this invocation's accumulators.
fn tile_product(acc: ptr<function, array<vec4f, ACC_LEN>>, frags: ptr<function, Frags>, buf: u32,
                lid: u32, tm: u32, tn: u32) {
    for (var rl = 0u; rl < BK; rl++) {
        mac_step(acc, (buf * BK + rl) * AS, (buf * BK + rl) * BS, tm, tn);
    }
}

fn drain(acc: ptr<function, array<vec4f, ACC_LEN>>, frags: ptr<function, Frags>, lid: u32, tm: u32,
         tn: u32) {}

// One reduction step of a tile: the outer product of this invocation's TM rows and TN columns.
fn mac_step(acc: ptr<function, array<vec4f, ACC_LEN>>, abase: u32, bbase: u32, tm: u32, tn: u32) {
    var av: array<vec4f, TMV>;
    var bv: array<vec4f, TNV>;
    for (var g = 0u; g < TMV; g++) { // @unroll
        av[g] = ta[abase + g * (BM / TM) + tm];
    }
    for (var h = 0u; h < TNV; h++) { // @unroll
        bv[h] = tb[bbase + h * (BN / TN) + tn];
    }
    for (var g = 0u; g < TMV; g++) { // @unroll
        for (var i = 0u; i < 4u; i++) { // @unroll
            let s = vec4f(av[g][i]);
            for (var h = 0u; h < TNV; h++) { // @unroll
                let j = (g * 4u + i) * TNV + h;
                (*acc)[j] = fma(s, bv[h], (*acc)[j]);
            }
        }
    }
}
// @plain-end

// Loops marked `// @unroll` are unrolled by the host (tiled.rs `unroll`: one block per value
// of the loop variable, which is a `const` there), so that every index into the register arrays
// (accumulators, operands, prefetched loads) is a constant: an array indexed by the variable of
// a loop that the driver leaves rolled lives in local memory, not registers, and the unrolling
// must not be left to the driver's heuristics.
//
// The epilogues visit the accumulators in order k = 0, 1, ... (k = (g * 4 + i) * TNV + h) as
// acc[0], each followed by a rotation that puts the value back last, so that their loops (too
// long to unroll) index acc by constants only.
fn rotate(acc: ptr<function, array<vec4f, ACC_LEN>>, last: vec4f) {
    for (var t = 1u; t < ACC_LEN; t++) { // @unroll
        (*acc)[t - 1u] = (*acc)[t];
    }
    (*acc)[ACC_LEN - 1u] = last;
}

// An operand element as loaded for the next tile, before anything is computed from it: the
// conversion to f32 and the prologue wait for the load, so they run when the element is
// staged, after the current tile's arithmetic (computed at load time, they would stall the
// invocation on the load before that arithmetic and undo the prefetch). `inside`: an element
// of x, not padding (the prologue applies to those only).
struct Raw {
    v: ST,
    inside: bool,
}

const OUTSIDE: Raw = Raw(ST(0.0), false);

// LEAVE_OUT 1: the value a register takes instead of a load, in the loop over tiles t (0 or 1,
// so that the sums stay small on the f16 path).
fn stand_in(t: u32) -> ST {
    return ST(f32(t & 1u));
}

// The prologue's values (mean, scale, beta) of input channel c where PRE (clamped: a column
// or reduction row past the end loads nothing). They are loaded with the elements they apply
// to (forward: per element, into registers beside the prefetched ones; backward_weight: once
// per column), so that staging does not wait on a load of its own.
fn pro(c: u32) -> vec3f {
    if PRE {
        return aff[min(c, p.c - 1u)].xyz;
    }
    return vec3f(0.0);
}

// The staged value of a loaded element of x with its channel's prologue values k: where PRE,
// ReLU((v - mean) * scale + beta); padding stays zero.
fn x_value(e: Raw, k: vec3f) -> f32 {
    let v = f32(e.v);
    if PRE && e.inside {
        return max(fma(v - k.x, k.y, k.z), 0.0);
    }
    return v;
}

// Where A[m][r] of the data ops lies for pixel (n, py, px) of the GEMM rows and tap t (< KK):
// im2col of x (forward), or the dy term that reaches input pixel (py, px) (backward_data).
// Channel c's element is src[base + c * plane] where `inside` (else zero: padding, a dy pixel
// the stride skips, or a GEMM row past the end, `ok` false).
struct Tap {
    base: u32,
    plane: u32,
    inside: bool,
}

fn tap_at(n: u32, py: u32, px: u32, ok: bool, t: u32) -> Tap {
    let ky = t / KS;
    let kx = t - ky * KS;
    if MODE == 0u {
        let iy = i32(py * STRIDE + ky) - i32(PAD);
        let ix = i32(px * STRIDE + kx) - i32(PAD);
        let inside = ok && iy >= 0 && ix >= 0 && iy < i32(p.h) && ix < i32(p.w);
        return Tap((n * p.c * p.h + u32(iy)) * p.w + u32(ix), p.h * p.w, inside);
    }
    // iy = oy * stride - pad + ky  =>  oy = (iy + pad - ky) / stride, when exact.
    let ty = i32(py + PAD) - i32(ky);
    let tx = i32(px + PAD) - i32(kx);
    let oy = u32(ty) / STRIDE;
    let ox = u32(tx) / STRIDE;
    let exact = ty >= 0 && tx >= 0 && ty % i32(STRIDE) == 0 && tx % i32(STRIDE) == 0;
    let inside = ok && exact && oy < p.oh && ox < p.ow;
    return Tap((n * p.k * p.oh + oy) * p.ow + ox, p.oh * p.ow, inside);
}

fn tap_load(a: Tap, c: u32) -> Raw {
    if !a.inside {
        return OUTSIDE;
    }
    return Raw(src[a.base + c * a.plane], true);
}

// The A rows [rt, rt + BK) of a tile for one GEMM row (n, py, px), as its invocation gathers
// them. TAPS: every row of the tile has the same tap (CB and rt are multiples of BK), so its
// position and bounds are worked out once a tile (`tap`), and row rt + rl is channel cb + rl.
// Else row r is channel r / KK, tap r % KK, worked out per element.
struct Rows {
    n: u32,
    py: u32,
    px: u32,
    ok: bool,
    rt: u32,
    r_end: u32,
    cb: u32,
    tap: Tap,
}

fn rows_at(n: u32, py: u32, px: u32, ok: bool, rt: u32, r_end: u32) -> Rows {
    if !TAPS {
        return Rows(n, py, px, ok, rt, r_end, 0u, Tap(0u, 0u, false));
    }
    let q = rt / CB; // (block, tap)
    let block = q / KK;
    let t = q - block * KK;
    return Rows(n, py, px, ok, rt, r_end, block * CB + rt - q * CB, tap_at(n, py, px, ok, t));
}

// Row rt + rl of the tile as loaded (zero past the reduction's end).
fn a_row(a: Rows, rl: u32) -> Raw {
    if TAPS {
        return tap_load(a.tap, a.cb + rl);
    }
    let r = a.rt + rl;
    if r >= a.r_end {
        return OUTSIDE;
    }
    let c = r / KK;
    return tap_load(tap_at(a.n, a.py, a.px, a.ok, r - c * KK), c);
}

// The channel of row rt + rl (the forward's prologue reads its values).
fn a_channel(a: Rows, rl: u32) -> u32 {
    if TAPS {
        return a.cb + rl;
    }
    return (a.rt + rl) / KK;
}

@compute @workgroup_size(THREADS)
fn data_main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3u,
             @builtin(num_workgroups) nwg: vec3u) {
    var cols: u32; // GEMM columns: output channels
    var red: u32;  // reduction length
    var sy: u32;   // spatial size of the GEMM rows' pixels
    var sx: u32;
    if MODE == 0u {
        cols = p.k;
        red = p.c * KK;
        sy = p.oh;
        sx = p.ow;
    } else {
        cols = p.c;
        red = p.k * KK;
        sy = p.h;
        sx = p.w;
    }
    let cv = (cols + 3u) / 4u; // vec4s per row of the transposed weights
    let m0 = (wid.z * nwg.x + wid.x) * BM;
    let cb = (cols + BN - 1u) / BN; // column blocks
    let split = wid.y / cb;
    let n0 = (wid.y - split * cb) * BN;
    // This split's reduction steps [r0, r_end).
    let r0 = split * p.chunk;
    let r_end = min(red, r0 + p.chunk);
    // A staging: one fixed row ml (THREADS is a multiple of BM), reduction rows arl + j * ASTEP.
    let ml = lid % BM;
    let arl = lid / BM;
    let am = m0 + ml;
    let a_ok = am < p.m;
    let amc = min(am, p.m - 1u);
    let ax = amc % sx;
    let ay = (amc / sx) % sy;
    let an = amc / (sx * sy);
    // B staging: one fixed vec4 column bv, reduction rows brl + j * BSTEP.
    let bv = lid % (BN / 4u);
    let brl = lid / (BN / 4u);
    let bcol = n0 / 4u + bv;
    let b_ok = bcol < cv;
    // Outputs: vec4 row groups g * (BM / TM) + tm, column groups h * (BN / TN) + tn.
    let tm = lid % (BM / TM);
    let tn = lid / (BM / TM);

    var acc: array<vec4f, ACC_LEN>;
    var frags: Frags;
    var ra: array<Raw, A_PER>;
    var rk: array<vec3f, A_PER>; // PRE: the prologue's values for ra's channels
    var rb: array<vec4<ST>, B_PER>;
    let nt = (r_end - r0 + BK - 1u) / BK;
    var kept = 0.0; // LEAVE_OUT 2: the staged tiles' probes

    // Tile 0 into buffer 0.
    let a0 = rows_at(an, ay, ax, a_ok, r0, r_end);
    for (var j = 0u; j < A_PER; j++) {
        let rl = arl + j * ASTEP;
        put_a(0u, rl, ml, x_value(a_row(a0, rl), pro(a_channel(a0, rl))));
    }
    for (var j = 0u; j < B_PER; j++) {
        let rl = brl + j * BSTEP;
        var v = vec4f(0.0);
        if b_ok && r0 + rl < r_end {
            v = vec4f(wtt[(r0 + rl) * cv + bcol]);
        }
        put_b4(0u, rl, bv, v);
    }
    workgroupBarrier();

    for (var t = 0u; t < nt; t++) {
        let cur = t & 1u;
        let more = t + 1u < nt && LEAVE_OUT != 3u;
        let r1 = r0 + (t + 1u) * BK;
        // The next tile's loads, into registers, before this tile's arithmetic.
        if more && LEAVE_OUT == 1u {
            for (var j = 0u; j < A_PER; j++) { // @unroll
                ra[j] = Raw(stand_in(t), true);
                rk[j] = vec3f(0.0, 1.0, 0.0);
            }
            for (var j = 0u; j < B_PER; j++) { // @unroll
                rb[j] = vec4<ST>(stand_in(t));
            }
        } else if more {
            let a1 = rows_at(an, ay, ax, a_ok, r1, r_end);
            for (var j = 0u; j < A_PER; j++) { // @unroll
                ra[j] = a_row(a1, arl + j * ASTEP);
                rk[j] = pro(a_channel(a1, arl + j * ASTEP));
            }
            for (var j = 0u; j < B_PER; j++) { // @unroll
                let r = r1 + brl + j * BSTEP;
                var v = vec4<ST>();
                if b_ok && r < r_end {
                    v = wtt[r * cv + bcol];
                }
                rb[j] = v;
            }
        }
        if LEAVE_OUT == 2u {
            kept += staged_probe(cur, lid);
        } else {
            tile_product(&acc, &frags, select(cur, 0u, LEAVE_OUT == 3u), lid, tm, tn);
        }
        if more {
            for (var j = 0u; j < A_PER; j++) { // @unroll
                put_a(cur ^ 1u, arl + j * ASTEP, ml, x_value(ra[j], rk[j]));
            }
            for (var j = 0u; j < B_PER; j++) { // @unroll
                put_b4(cur ^ 1u, brl + j * BSTEP, bv, vec4f(rb[j]));
            }
        }
        workgroupBarrier();
    }
    drain(&acc, &frags, lid, tm, tn);
    if LEAVE_OUT == 2u {
        acc[0].x += kept;
    }

    // BSUMS: per column, sum dz and sum dz * xhat of this invocation's outputs.
    var s1: array<vec4f, TNV>;
    var s2: array<vec4f, TNV>;
    let plane = sx * sy;
    for (var g = 0u; g < TMV; g++) {
        // Row m's image n and pixel in it, divided out for the group's first row and stepped.
        let m4 = m0 + (g * (BM / TM) + tm) * 4u;
        var n = m4 / plane;
        var pix = m4 - n * plane;
        for (var i = 0u; i < 4u; i++) {
            let m = m4 + i;
            let live = m < p.m;
            if i > 0u {
                pix += 1u;
                if pix == plane {
                    pix = 0u;
                    n += 1u;
                }
            }
            for (var h = 0u; h < TNV; h++) { // @unroll
                var v4 = acc[0]; // acc[(g * 4 + i) * TNV + h], through rotate
                for (var j = 0u; j < 4u && live; j++) {
                    let col = n0 + (h * (BN / TN) + tn) * 4u + j;
                    if col >= cols {
                        continue;
                    }
                    let o = (n * cols + col) * plane + pix;
                    if p.splits > 1u {
                        // A split's partial sum (never with STATS or BSUMS: the host checks).
                        part[split * p.len + o] = v4[j];
                        continue;
                    }
                    if p.accumulate == 1u {
                        v4[j] = f32(dst[o]) + v4[j];
                    }
                    if STATS || BSUMS {
                        v4[j] = as_st(v4[j]); // as stored (rounded where ST is f16), for their sums
                    }
                    dst[o] = ST(v4[j]);
                    if BSUMS {
                        // dz = da * [ReLU input > 0] with the forward prologue's own expression,
                        // xhat = (x_bn - mean) * invstd; x_bn (bound as dys) is at da's index.
                        let a = aff[col];
                        let t = f32(dys[o]) - a.x;
                        let dz = select(0.0, v4[j], t * a.y + a.z > 0.0);
                        s1[h][j] += dz;
                        s2[h][j] += dz * (t * a.w);
                    }
                }
                rotate(&acc, v4); // v4: the values written, for STATS
            }
        }
    }
    let block = wid.z * nwg.x + wid.x; // the row block
    if STATS {
        tile_moments(lid, m0, n0, cols, tm, tn, block, &acc);
    }
    if BSUMS {
        // BSUMS (backward_data, f32): dx is the gradient at the output of a BN + ReLU whose
        // input x_bn is bound as dys, aff = (mean, scale, beta, invstd): the BN backward's sums
        // per channel of this tile, as backward_final's per-run partials (ops/conv.rs
        // backward_data_bn).
        let t1 = tile_column_sums(lid, tm, tn, &s1);
        let t2 = tile_column_sums(lid, tm, tn, &s2);
        write_partials(lid, m0, n0, cols, block, t1, t2);
    }
}

// Sums a vec4 per (row thread, column group) of the tile from ta[] in a fixed order, for the
// first CG threads (the others get zeros); every thread calls it (it has barriers).
fn tile_column_sums(lid: u32, tm: u32, tn: u32, v: ptr<function, array<vec4f, TNV>>) -> vec4f {
    const CG: u32 = BN / 4u;
    for (var h = 0u; h < TNV; h++) { // @unroll
        ta[tm * CG + h * (BN / TN) + tn] = (*v)[h];
    }
    workgroupBarrier();
    var t = vec4f(0.0);
    if lid < CG {
        for (var r = 0u; r < BM / TM; r++) { t += ta[r * CG + lid]; }
    }
    workgroupBarrier();
    return t;
}

// Writes the first CG threads' column sums a and b of row block rb to part[2 * (col * blocks +
// rb)] and the next float (the batch norm's per-run partials, runs of BM rows), except past the
// last row block (a folded grid's extra workgroups) or the last column.
fn write_partials(lid: u32, m0: u32, n0: u32, cols: u32, rb: u32, a: vec4f, b: vec4f) {
    if lid >= BN / 4u || m0 >= p.m {
        return;
    }
    let blocks = (p.m + BM - 1u) / BM;
    for (var j = 0u; j < 4u; j++) {
        let col = n0 + lid * 4u + j;
        if col < cols {
            part[2u * (col * blocks + rb)] = a[j];
            part[2u * (col * blocks + rb) + 1u] = b[j];
        }
    }
}

// STATS (forward, f32): the batch norm that follows gets, per output channel of this tile, the
// sum of the tile's outputs and their squared deviations from the tile's mean (two passes over
// the registers, threads combined in a fixed order through the free A tile), into
// part[2 * (col * row_blocks + rb)] and the next float: the per-run partials of batch_norm.wgsl's
// stats_final with runs of BM rows (ops/conv.rs forward_stats).
fn tile_moments(lid: u32, m0: u32, n0: u32, cols: u32, tm: u32, tn: u32, rb: u32,
                acc: ptr<function, array<vec4f, ACC_LEN>>) {
    const CG: u32 = BN / 4u; // vec4 column groups of the tile
    // A folded grid may have workgroups past the last row block (m0 >= p.m): they write nothing.
    let rows = select(1u, min(BM, p.m - m0), m0 < p.m);
    var s: array<vec4f, TNV>;
    for (var g = 0u; g < TMV; g++) {
        for (var i = 0u; i < 4u; i++) {
            let live = m0 + (g * (BM / TM) + tm) * 4u + i < p.m;
            for (var h = 0u; h < TNV; h++) { // @unroll
                let v = (*acc)[0]; // (*acc)[(g * 4 + i) * TNV + h], through rotate
                if live {
                    s[h] += v;
                }
                rotate(acc, v);
            }
        }
    }
    let sum = tile_column_sums(lid, tm, tn, &s);
    if lid < CG {
        tb[lid] = sum / f32(rows); // the tile's means, for every thread
    }
    workgroupBarrier();
    var q: array<vec4f, TNV>;
    for (var g = 0u; g < TMV; g++) {
        for (var i = 0u; i < 4u; i++) {
            let live = m0 + (g * (BM / TM) + tm) * 4u + i < p.m;
            for (var h = 0u; h < TNV; h++) { // @unroll
                let v = (*acc)[0];
                if live {
                    let d = v - tb[h * (BN / TN) + tn];
                    q[h] += d * d;
                }
                rotate(acc, v);
            }
        }
    }
    let m2 = tile_column_sums(lid, tm, tn, &q);
    write_partials(lid, m0, n0, cols, rb, sum, m2);
}

// backward_weight: dw[k][col] = sum_r dy[r][k] * im2col(x)[r][col], col = (c, ky, kx), r over
// N*OH*OW, restricted to split wid.z's range. Both operands are loaded reduction-fastest
// (consecutive pixels): staging row rl = lid % BK is fixed per invocation (THREADS is a
// multiple of BK), its GEMM rows (columns) are lid / BK + j * RSTEP.

// im2col(x) for a column (c, ky, kx) at output pixel (n, oy, ox), as loaded (zero in the
// padding): the pixel's window corner (iy0, ix0) = (oy, ox) * STRIDE - PAD and index
// ((n * C) * H + iy0) * W + ix0 are the tile's, the column's offset c * H * W + ky * W + kx
// the invocation's.
fn b_weight(corner: vec2i, base: i32, ok: bool, ky: u32, kx: u32, off: u32) -> Raw {
    let iy = corner.x + i32(ky);
    let ix = corner.y + i32(kx);
    if !ok || u32(iy) >= p.h || u32(ix) >= p.w {
        return OUTSIDE;
    }
    return Raw(src[u32(base + i32(off))], true);
}

@compute @workgroup_size(THREADS)
fn weight_main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3u) {
    let cols = p.c * KK;
    let ohw = p.oh * p.ow;
    let red = p.n * ohw;
    let m0 = wid.x * BM;
    let n0 = wid.y * BN;
    let r_begin = wid.z * p.chunk;
    let r_end = min(red, r_begin + p.chunk);
    let nt = (r_end - r_begin + BK - 1u) / BK;
    let rl = lid % BK;
    let row0 = lid / BK;
    let tm = lid % (BM / TM);
    let tn = lid / (BM / TM);

    // This invocation's staged columns are fixed: their taps (ky, kx), offsets in x and (PRE)
    // their channel's prologue values, once.
    var boff: array<u32, B_PER>;
    var bky: array<u32, B_PER>;
    var bkx: array<u32, B_PER>;
    var bok: array<bool, B_PER>;
    var bk: array<vec3f, B_PER>;
    for (var j = 0u; j < B_PER; j++) { // @unroll
        let col = n0 + row0 + j * RSTEP;
        bok[j] = col < cols;
        let c = col / KK;
        let t = col - c * KK;
        bk[j] = pro(c);
        bky[j] = t / KS;
        bkx[j] = t - bky[j] * KS;
        boff[j] = (c * p.h + bky[j]) * p.w + bkx[j];
    }

    var acc: array<vec4f, ACC_LEN>;
    var frags: Frags;
    var ra: array<ST, A_PER>;
    var rb: array<Raw, B_PER>;

    // The output pixel (n, oy, ox) of this invocation's reduction step r, divided out once and
    // then stepped BK pixels a tile (a division by a runtime value costs tens of instructions).
    // Past the end (r >= r_end) it goes on but loads nothing.
    var r = r_begin + rl;
    let rc = min(r, red - 1u);
    var n = rc / ohw;
    var oy = (rc - n * ohw) / p.ow;
    var ox = rc - n * ohw - oy * p.ow;
    let step_y = BK / p.ow;
    let step_x = BK - step_y * p.ow;
    var kept = 0.0; // LEAVE_OUT 2: the staged tiles' probes

    for (var t = 0u; t <= nt; t++) {
        // Tile t's loads and staging (LEAVE_OUT 3: the first tile's only).
        let stage = t < nt && (t == 0u || LEAVE_OUT != 3u);
        // Loads of tile t (where there is one) into registers...
        if stage && t > 0u && LEAVE_OUT == 1u {
            for (var j = 0u; j < A_PER; j++) { // @unroll
                ra[j] = stand_in(t);
            }
            for (var j = 0u; j < B_PER; j++) { // @unroll
                rb[j] = Raw(stand_in(t), true);
            }
        } else if stage {
            let r_ok = r < r_end;
            let pix = oy * p.ow + ox;
            let corner = vec2i(vec2u(oy, ox) * STRIDE) - i32(PAD);
            let base = i32(n * p.c * p.h * p.w) + corner.x * i32(p.w) + corner.y;
            for (var j = 0u; j < A_PER; j++) { // @unroll
                let k = m0 + row0 + j * RSTEP;
                var v = ST(0.0);
                if r_ok && k < p.k {
                    v = dys[(n * p.k + k) * ohw + pix];
                }
                ra[j] = v;
            }
            for (var j = 0u; j < B_PER; j++) { // @unroll
                rb[j] = b_weight(corner, base, r_ok && bok[j], bky[j], bkx[j], boff[j]);
            }
            r += BK;
            ox += step_x;
            oy += step_y;
            if ox >= p.ow {
                ox -= p.ow;
                oy += 1u;
            }
            while oy >= p.oh {
                oy -= p.oh;
                n += 1u;
            }
        }
        // ... the arithmetic of tile t - 1 meanwhile ...
        if t > 0u && LEAVE_OUT == 2u {
            kept += staged_probe((t - 1u) & 1u, lid);
        } else if t > 0u {
            tile_product(&acc, &frags, select((t - 1u) & 1u, 0u, LEAVE_OUT == 3u), lid, tm, tn);
        }
        // ... then tile t into the other buffer.
        if stage {
            let nxt = t & 1u;
            for (var j = 0u; j < A_PER; j++) { // @unroll
                put_a(nxt, rl, row0 + j * RSTEP, f32(ra[j]));
            }
            for (var j = 0u; j < B_PER; j++) { // @unroll
                put_b(nxt, rl, row0 + j * RSTEP, x_value(rb[j], bk[j]));
            }
        }
        workgroupBarrier();
    }
    drain(&acc, &frags, lid, tm, tn);
    if LEAVE_OUT == 2u {
        acc[0].x += kept;
    }

    let len = p.k * cols;
    for (var g = 0u; g < TMV; g++) {
        for (var i = 0u; i < 4u; i++) {
            let k = m0 + (g * (BM / TM) + tm) * 4u + i;
            let live = k < p.k;
            for (var h = 0u; h < TNV; h++) {
                let v4 = acc[0]; // acc[(g * 4 + i) * TNV + h], through rotate
                rotate(&acc, v4);
                for (var j = 0u; j < 4u && live; j++) {
                    let col = n0 + (h * (BN / TN) + tn) * 4u + j;
                    if col >= cols {
                        continue;
                    }
                    let o = k * cols + col;
                    if p.splits > 1u {
                        part[wid.z * len + o] = v4[j];
                    } else if p.accumulate == 1u {
                        dw[o] += v4[j];
                    } else {
                        dw[o] = v4[j];
                    }
                }
            }
        }
    }
}

// The weights as the data ops' B operand: [reduction][cols rounded up to 4], zeros in the
// padding; MODE 0 forward B[(c, t)][k] = w[k][c][t], MODE 1 backward_data B[(k, t)][c] =
// w[k][c][t], rows (c, t) at c * KK + t, or by blocks where TAPS (b_row). Both are transposes
// of `batch` row-major matrices [cols][rows] that lie one after the other in w: forward one
// [K][C*KK], backward_data K of [C][KK] (block b of B's rows is the transpose of matrix b,
// before TAPS reorders the rows). transpose_main reads ST weights, transpose_main32 f32 ones
// (the f16 units' f32 weights); an f32 build serves the f32 path.
//
// A workgroup moves one tile of TT_S rows x TT_R columns of B through workgroup memory (as f32:
// exact for f16 values), so that its reads run along the weights' rows (TT_S consecutive
// elements per TT_S invocations) and its writes along B's rows (TT_R / 4 consecutive vec4s).
// Every index is in range: loads and stores are guarded by the shapes, the tile's by
// e < 4 * 256 = TT_S * TT_R (slot s * TT_P + r < TT_S * TT_P) and q < TT_R / 4.
const TT_S: u32 = 16u;       // rows of B per tile
const TT_R: u32 = 64u;       // columns of B per tile (16 vec4s)
const TT_P: u32 = TT_R + 1u; // padded row of the tile (spreads the column stores over banks)
var<workgroup> tt: array<f32, 1040>; // TT_S * TT_P

// The tile of B that workgroup wid moves: (matrix b, first row s0, first column r0), and B's
// shape (rows per matrix, cols, vec4s per row); `live` false past the last tile (uniform).
struct TTile {
    b: u32,
    s0: u32,
    r0: u32,
    rows: u32,
    cols: u32,
    quads: u32,
    live: bool,
}

fn transpose_tile(wid: vec3u, nwg: vec3u) -> TTile {
    var t: TTile;
    t.cols = p.k;
    t.rows = p.c * KK;
    var batch = 1u;
    if MODE == 1u {
        t.cols = p.c;
        t.rows = KK;
        batch = p.k;
    }
    t.quads = (t.cols + 3u) / 4u;
    let across = (t.quads * 4u + TT_R - 1u) / TT_R;
    let down = (t.rows + TT_S - 1u) / TT_S;
    let g = wid.z * nwg.x + wid.x;
    t.live = g < batch * down * across;
    t.b = g / (down * across);
    let rem = g - t.b * down * across;
    t.s0 = rem / across * TT_S;
    t.r0 = rem % across * TT_R;
    return t;
}

// Element e (< TT_S * TT_R) of the tile's load: its index in the weights, or -1 outside them
// (B's padding columns, rows past the end).
fn tile_source(t: TTile, e: u32) -> i32 {
    let s = t.s0 + e % TT_S;
    let r = t.r0 + e / TT_S;
    if s >= t.rows || r >= t.cols {
        return -1;
    }
    return i32((t.b * t.cols + r) * t.rows + s);
}

// Slot of element e of the load in tt: row e % TT_S, column e / TT_S.
fn tile_slot(e: u32) -> u32 {
    return e % TT_S * TT_P + e / TT_S;
}

// B's row of row s of transposed matrix t.b: channel-major, matrix after matrix; where TAPS,
// the A operand's order (block, tap, channel in the block) for channel c and tap t (forward:
// s = c * KK + t; backward_data: c = k, the matrix, and t = s).
fn b_row(t: TTile, s: u32) -> u32 {
    if !TAPS {
        return t.b * t.rows + s;
    }
    var c = t.b;
    var tap = s;
    if MODE == 0u {
        c = s / KK;
        tap = s - c * KK;
    }
    return (c / CB * KK + tap) * CB + c % CB;
}

// After the barrier: invocation lid writes the tile's vec4 at row lid / 16, vec4 lid % 16.
fn tile_store(t: TTile, lid: u32) {
    let s = lid / 16u;
    let q = lid % 16u;
    if t.s0 + s < t.rows && t.r0 / 4u + q < t.quads {
        let o = s * TT_P + q * 4u;
        wtt_out[b_row(t, t.s0 + s) * t.quads + t.r0 / 4u + q] =
            vec4<ST>(ST(tt[o]), ST(tt[o + 1u]), ST(tt[o + 2u]), ST(tt[o + 3u]));
    }
}

@compute @workgroup_size(256)
fn transpose_main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                  @builtin(local_invocation_index) lid: u32) {
    let t = transpose_tile(wid, nwg);
    if !t.live {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let e = lid + j * 256u;
        let i = tile_source(t, e);
        tt[tile_slot(e)] = select(0.0, f32(wsrc[max(i, 0)]), i >= 0);
    }
    workgroupBarrier();
    tile_store(t, lid);
}

@compute @workgroup_size(256)
fn transpose_main32(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                    @builtin(local_invocation_index) lid: u32) {
    let t = transpose_tile(wid, nwg);
    if !t.live {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let e = lid + j * 256u;
        let i = tile_source(t, e);
        tt[tile_slot(e)] = select(0.0, wsrc32[max(i, 0)], i >= 0);
    }
    workgroupBarrier();
    tile_store(t, lid);
}
