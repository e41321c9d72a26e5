// Winograd F(2x2, 3x3) and F(4x4, 3x3) convolution for 3x3 kernels at stride 1
// (ops/conv/winograd.rs), a template: the host prepends the GEMM's tile constants and the
// block size, keeps the transforms of that size (the @f2 or the @f4 block below) and builds
// one module per configuration:
//
//   R, PT, E output block edge (2 or 4), input patch edge (R + 2) and elements of a
//            transformed tile (PT * PT: 16 or 36, the number of GEMMs)
//   BM, BN   output tile of a GEMM workgroup (co x blocks t)
//   BK       reduction steps (input channels) staged per tile
//   TM, TN   outputs per invocation (multiples of 4), held in registers as vec4s; TMV, TNV
//            = TM / 4, TN / 4
//   THREADS  (BM / TM) * (BN / TN) invocations (also spelled out in @workgroup_size)
//   A_PER, B_PER  vec4s of U and of V each invocation stages per tile
//   ST, WT   the storage types of the activations (x, dy, y, dx) and of the weights: f32, or
//            f16 on the f16 path (which keeps its weights f32 or f16, and dw f32); loads widen
//            to f32 (weights as ST holds them: the f16 path convolves halves, as its other
//            kernels do), stores round once, the transformed operands and everything else are
//            f32
//
// A 3x3 correlation at stride 1 and padding 1 (forward: x with w; backward_data: dy with the
// weights flipped and their channels swapped, w'[c][k][i][j] = w[k][c][2-i][2-j]) computes each
// R x R block of an output channel co from the PT x PT input patch d of every input channel ci
// as
//   Y = A^T [ sum_ci (G g G^T) .* (B^T d B) ] A        (Lavin and Gray, 2016)
// with g the 3x3 kernel of (co, ci): per input channel, 16 multiplies for a 2x2 block where the
// direct convolution makes 36 (2.25x fewer), 36 for a 4x4 block against 144 (4x fewer), fewer
// still where the blocks overhang the image. F(4x4)'s transforms scale by up to 8 and by 1/24,
// so it rounds more: up to 3.3e-6 relative L2 where F(2x2) makes 6e-7 (tests/conv.rs, 384
// channels), and 1.2e-5 on a unit's BN bias gradient (a sum that cancels), past the f32 bound of
// 1e-5: the host gives F(4x4) to the f16 path alone (ops/conv/winograd.rs `serves`). Every loop of the transforms is written out by the
// host (`// @unroll`), so that their arrays are indexed by constants and stay in registers
// (with the loops, lavapipe took F(4x4)'s input transform 7x slower).
// Four kernels per call, the sum over ci as E independent GEMMs:
//   wino_weights: U[e][ci][co] = (G g G^T)[e]           (co padded to CO4 = co rounded up to 4)
//   wino_input:   V[e][ci][t]  = (B^T d B)[e]           (d the patch of block t of channel ci,
//                 through the BN + ReLU prologue where p.pre; t padded to P4, zeros)
//   wino_gemm:    M[e][co][t]  = sum_ci U[e][ci][co] V[e][ci][t]   (e = the grid's z)
//   wino_output:  out[n][co][R by + a][R bx + b] (=|+=) (A^T M[.][co][t] A)[a][b]
// Block t = (n * TH + by) * TW + bx over TH = ceil(H / R) x TW = ceil(W / R) blocks per image;
// its patch starts at row R by - 1, column R bx - 1 (zeros outside the image). backward_weight,
// the same algebra differentiated in g, has kernels of its own before and after the same GEMM
// (below wino_input).
//
// The GEMM's operands are both reduction-major, so its tile loads are coalesced vec4 loads
// along co and t, and its stores are vec4s along t (what wino_output reads). A workgroup
// stages BK x BM of U and BK x BN of V per step; the next step's global loads are in flight in
// registers while the invocations multiply out the staged one. An invocation's TM rows (TN
// columns) are TM / 4 vec4s spaced BM / TM * 4 apart, so that a warp's reads of a tile row are
// consecutive (or one broadcast). Every sum runs in a fixed order.
//
// Every index is in range by construction (the host builds this module without wgpu's bounds
// checks on Vulkan GPUs, gpu.rs `shader_module_in_range`): each kernel returns past its last
// element; each storage load and store is guarded by the shape it reads or writes; the
// workgroup tiles take a row below BK and a vec4 below AS (BS): e < THREADS * A_PER = BK * AS;
// the register arrays are indexed by unrolled constants or by loops of constant bounds.

struct Params {
    n: u32,
    ci: u32,         // input channels (the reduction)
    co: u32,         // output channels
    h: u32,          // height and width of input and output
    w: u32,
    th: u32,         // R x R blocks per column and per row of an image
    tw: u32,
    np: u32,         // blocks: n * th * tw
    p4: u32,         // np rounded up to 4 (the rows of V and M)
    co4: u32,        // co rounded up to 4 (the rows of U)
    mode: u32,       // wino_weights: 0 forward (g = w[co][ci]), 1 backward_data (g = w[ci][co] flipped)
    accumulate: u32, // wino_output, wino_dw*: 1 adds into the output, 0 overwrites it
    pre: u32,        // wino_input, wino_input_t: 1 reads the input through the BN + ReLU prologue
    chunk: u32,      // wino_gemm: reduction steps per split (a multiple of BK; the split from wid.z)
    splits: u32,     // wino_dw_splits: partial sums to add (1 but for backward_weight)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<ST>;             // the transforms in: x or dy
@group(0) @binding(9) var<storage, read> wsrc: array<WT>;            // wino_weights: w
@group(0) @binding(2) var<storage, read> aff: array<vec4f>;          // input*, pre: per ci (mean, scale, beta, invstd)
@group(0) @binding(3) var<storage, read_write> tout: array<f32>;     // weights: U; input: V; input_t: X; dy_t: DY
@group(0) @binding(4) var<storage, read> u4: array<vec4f>;           // gemm: U
@group(0) @binding(5) var<storage, read> v4: array<vec4f>;           // gemm: V
@group(0) @binding(6) var<storage, read_write> m4: array<vec4f>;     // gemm: M
@group(0) @binding(7) var<storage, read> mres: array<f32>;           // output, wino_dw*: M
@group(0) @binding(8) var<storage, read_write> dst: array<ST>;       // wino_output: y or dx
@group(0) @binding(10) var<storage, read_write> dwo: array<f32>;     // wino_dw*: dw

fn flat(wid: vec3u, nwg: vec3u, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * 64u + lid;
}

// ---- the transforms of one block size (the host keeps one of the two blocks) ----
//   weight_transform: G g G^T (E values, row-major PT x PT) of a 3x3 kernel g (row-major)
//   input_transform:  B^T d B of a PT x PT patch d
//   output_transform: A^T m A (R x R, row-major in the first R * R of 16) of E values m
//   dy_transform:     A dY A^T (E values) of an R x R block dY (row-major in the first R * R)
//   dw_transform:     G^T m G (3x3, row-major) of E values m

// @f2-begin: F(2x2, 3x3); G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], A^T = [1 1 1 0; 0 1 -1 -1].
fn weight_transform(g: array<f32, 9>) -> array<f32, E> {
    // G g (4x3), then (G g) G^T (4x4).
    var gg: array<f32, 12>;
    for (var j = 0u; j < 3u; j++) { // @unroll
        gg[j] = g[j];
        gg[3u + j] = 0.5 * (g[j] + g[3u + j] + g[6u + j]);
        gg[6u + j] = 0.5 * (g[j] - g[3u + j] + g[6u + j]);
        gg[9u + j] = g[6u + j];
    }
    var u: array<f32, E>;
    for (var r = 0u; r < 4u; r++) { // @unroll
        let a = gg[r * 3u];
        let b = gg[r * 3u + 1u];
        let c = gg[r * 3u + 2u];
        u[r * 4u] = a;
        u[r * 4u + 1u] = 0.5 * (a + b + c);
        u[r * 4u + 2u] = 0.5 * (a - b + c);
        u[r * 4u + 3u] = c;
    }
    return u;
}

fn input_transform(d: array<f32, E>) -> array<f32, E> {
    // B^T d (rows), then (B^T d) B (columns).
    var e: array<f32, E>;
    for (var c = 0u; c < 4u; c++) { // @unroll
        e[c] = d[c] - d[8u + c];
        e[4u + c] = d[4u + c] + d[8u + c];
        e[8u + c] = d[8u + c] - d[4u + c];
        e[12u + c] = d[4u + c] - d[12u + c];
    }
    var v: array<f32, E>;
    for (var r = 0u; r < 4u; r++) { // @unroll
        v[r * 4u] = e[r * 4u] - e[r * 4u + 2u];
        v[r * 4u + 1u] = e[r * 4u + 1u] + e[r * 4u + 2u];
        v[r * 4u + 2u] = e[r * 4u + 2u] - e[r * 4u + 1u];
        v[r * 4u + 3u] = e[r * 4u + 1u] - e[r * 4u + 3u];
    }
    return v;
}

fn output_transform(m: array<f32, E>) -> array<f32, 16> {
    // A^T m (rows), then (A^T m) A (columns).
    var s: array<f32, 8>;
    for (var c = 0u; c < 4u; c++) { // @unroll
        s[c] = m[c] + m[4u + c] + m[8u + c];
        s[4u + c] = m[4u + c] - m[8u + c] - m[12u + c];
    }
    var o: array<f32, 16>;
    for (var a = 0u; a < 2u; a++) { // @unroll
        const r = a * 4u;
        o[a * 2u] = s[r] + s[r + 1u] + s[r + 2u];
        o[a * 2u + 1u] = s[r + 1u] - s[r + 2u] - s[r + 3u];
    }
    return o;
}

fn dy_transform(d: array<f32, 16>) -> array<f32, E> {
    // A dY (4x2), then (A dY) A^T (4x4); A = [1 0; 1 1; 1 -1; 0 -1].
    let r = array<vec2f, 4>(vec2f(d[0], d[1]), vec2f(d[0] + d[2], d[1] + d[3]), vec2f(d[0] - d[2], d[1] - d[3]),
                            vec2f(-d[2], -d[3]));
    var z: array<f32, E>;
    for (var q = 0u; q < 4u; q++) { // @unroll
        z[q * 4u] = r[q].x;
        z[q * 4u + 1u] = r[q].x + r[q].y;
        z[q * 4u + 2u] = r[q].x - r[q].y;
        z[q * 4u + 3u] = -r[q].y;
    }
    return z;
}

fn dw_transform(m: array<f32, E>) -> array<f32, 9> {
    // G^T m (3x4), then (G^T m) G (3x3); G^T = [1 .5 .5 0; 0 .5 -.5 0; 0 .5 .5 1].
    var q: array<f32, 12>;
    for (var j = 0u; j < 4u; j++) { // @unroll
        q[j] = m[j] + 0.5 * (m[4u + j] + m[8u + j]);
        q[4u + j] = 0.5 * (m[4u + j] - m[8u + j]);
        q[8u + j] = 0.5 * (m[4u + j] + m[8u + j]) + m[12u + j];
    }
    var g: array<f32, 9>;
    for (var r = 0u; r < 3u; r++) { // @unroll
        let a = q[r * 4u];
        let b = q[r * 4u + 1u];
        let cc = q[r * 4u + 2u];
        let d = q[r * 4u + 3u];
        g[r * 3u] = a + 0.5 * (b + cc);
        g[r * 3u + 1u] = 0.5 * (b - cc);
        g[r * 3u + 2u] = 0.5 * (b + cc) + d;
    }
    return g;
}
// @f2-end

// @f4-begin: F(4x4, 3x3), Lavin and Gray's points 0, 1, -1, 2, -2 and infinity:
//   G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]
//   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
//   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
// Each 2-D transform applies its 1-D one to the columns, then to the rows of the result.

// G x of a 3-vector.
fn g6(a: f32, b: f32, c: f32) -> array<f32, 6> {
    return array<f32, 6>(a / 4.0, -(a + b + c) / 6.0, -(a - b + c) / 6.0, a / 24.0 + b / 12.0 + c / 6.0,
                         a / 24.0 - b / 12.0 + c / 6.0, c);
}

// B^T x of a 6-vector.
fn bt6(x: array<f32, 6>) -> array<f32, 6> {
    return array<f32, 6>(4.0 * x[0] - 5.0 * x[2] + x[4], (x[3] + x[4]) - 4.0 * (x[1] + x[2]),
                         (x[4] - x[3]) + 4.0 * (x[1] - x[2]), (x[4] - x[2]) + 2.0 * (x[3] - x[1]),
                         (x[4] - x[2]) - 2.0 * (x[3] - x[1]), 4.0 * x[1] - 5.0 * x[3] + x[5]);
}

// A^T x of a 6-vector.
fn at6(x: array<f32, 6>) -> array<f32, 4> {
    let a = x[1] + x[2];
    let b = x[1] - x[2];
    let c = x[3] + x[4];
    let d = x[3] - x[4];
    return array<f32, 4>(x[0] + a + c, b + 2.0 * d, a + 4.0 * c, b + 8.0 * d + x[5]);
}

// A y of a 4-vector (A = (A^T)^T).
fn a4(y: array<f32, 4>) -> array<f32, 6> {
    let a = y[0] + y[2];
    let b = y[1] + y[3];
    let c = y[0] + 4.0 * y[2];
    let d = 2.0 * y[1] + 8.0 * y[3];
    return array<f32, 6>(y[0], a + b, a - b, c + d, c - d, y[3]);
}

// G^T x of a 6-vector.
fn gt6(x: array<f32, 6>) -> array<f32, 3> {
    let a = x[1] + x[2];
    let b = x[3] + x[4];
    return array<f32, 3>(x[0] / 4.0 - a / 6.0 + b / 24.0, (x[2] - x[1]) / 6.0 + (x[3] - x[4]) / 12.0,
                         (b - a) / 6.0 + x[5]);
}

fn weight_transform(g: array<f32, 9>) -> array<f32, E> {
    var gg: array<f32, 18>; // G g (6x3)
    for (var j = 0u; j < 3u; j++) { // @unroll
        let col = g6(g[j], g[3u + j], g[6u + j]);
        for (var r = 0u; r < 6u; r++) { // @unroll
            gg[r * 3u + j] = col[r];
        }
    }
    var u: array<f32, E>; // (G g) G^T
    for (var r = 0u; r < 6u; r++) { // @unroll
        let row = g6(gg[r * 3u], gg[r * 3u + 1u], gg[r * 3u + 2u]);
        for (var c = 0u; c < 6u; c++) { // @unroll
            u[r * 6u + c] = row[c];
        }
    }
    return u;
}

fn input_transform(d: array<f32, E>) -> array<f32, E> {
    var e: array<f32, E>; // B^T d
    for (var c = 0u; c < 6u; c++) { // @unroll
        let col = bt6(array<f32, 6>(d[c], d[6u + c], d[12u + c], d[18u + c], d[24u + c], d[30u + c]));
        for (var r = 0u; r < 6u; r++) { // @unroll
            e[r * 6u + c] = col[r];
        }
    }
    var v: array<f32, E>; // (B^T d) B
    for (var r = 0u; r < 6u; r++) { // @unroll
        const o = r * 6u;
        let row = bt6(array<f32, 6>(e[o], e[o + 1u], e[o + 2u], e[o + 3u], e[o + 4u], e[o + 5u]));
        for (var c = 0u; c < 6u; c++) { // @unroll
            v[o + c] = row[c];
        }
    }
    return v;
}

fn output_transform(m: array<f32, E>) -> array<f32, 16> {
    var s: array<f32, 24>; // A^T m (4x6)
    for (var c = 0u; c < 6u; c++) { // @unroll
        let col = at6(array<f32, 6>(m[c], m[6u + c], m[12u + c], m[18u + c], m[24u + c], m[30u + c]));
        for (var r = 0u; r < 4u; r++) { // @unroll
            s[r * 6u + c] = col[r];
        }
    }
    var o: array<f32, 16>; // (A^T m) A
    for (var r = 0u; r < 4u; r++) { // @unroll
        const i = r * 6u;
        let row = at6(array<f32, 6>(s[i], s[i + 1u], s[i + 2u], s[i + 3u], s[i + 4u], s[i + 5u]));
        for (var c = 0u; c < 4u; c++) { // @unroll
            o[r * 4u + c] = row[c];
        }
    }
    return o;
}

fn dy_transform(d: array<f32, 16>) -> array<f32, E> {
    var s: array<f32, 24>; // A dY (6x4)
    for (var c = 0u; c < 4u; c++) { // @unroll
        let col = a4(array<f32, 4>(d[c], d[4u + c], d[8u + c], d[12u + c]));
        for (var r = 0u; r < 6u; r++) { // @unroll
            s[r * 4u + c] = col[r];
        }
    }
    var z: array<f32, E>; // (A dY) A^T
    for (var r = 0u; r < 6u; r++) { // @unroll
        const i = r * 4u;
        let row = a4(array<f32, 4>(s[i], s[i + 1u], s[i + 2u], s[i + 3u]));
        for (var c = 0u; c < 6u; c++) { // @unroll
            z[r * 6u + c] = row[c];
        }
    }
    return z;
}

fn dw_transform(m: array<f32, E>) -> array<f32, 9> {
    var q: array<f32, 18>; // G^T m (3x6)
    for (var c = 0u; c < 6u; c++) { // @unroll
        let col = gt6(array<f32, 6>(m[c], m[6u + c], m[12u + c], m[18u + c], m[24u + c], m[30u + c]));
        for (var r = 0u; r < 3u; r++) { // @unroll
            q[r * 6u + c] = col[r];
        }
    }
    var g: array<f32, 9>; // (G^T m) G
    for (var r = 0u; r < 3u; r++) { // @unroll
        const i = r * 6u;
        let row = gt6(array<f32, 6>(q[i], q[i + 1u], q[i + 2u], q[i + 3u], q[i + 4u], q[i + 5u]));
        for (var c = 0u; c < 3u; c++) { // @unroll
            g[r * 3u + c] = row[c];
        }
    }
    return g;
}
// @f4-end

// U for (ci, co) of invocation i over ci x CO4 (co fastest, so the stores coalesce).
@compute @workgroup_size(64)
fn wino_weights(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if i >= p.ci * p.co4 {
        return;
    }
    let ci = i / p.co4;
    let co = i - ci * p.co4;
    var u: array<f32, E>; // zeros in the padding columns
    if co < p.co {
        var g: array<f32, 9>;
        for (var t = 0u; t < 9u; t++) { // @unroll
            if p.mode == 0u {
                g[t] = as_st(f32(wsrc[(co * p.ci + ci) * 9u + t]));
            } else {
                g[t] = as_st(f32(wsrc[(ci * p.co + co) * 9u + 8u - t]));
            }
        }
        u = weight_transform(g);
    }
    for (var e = 0u; e < E; e++) { // @unroll
        tout[(e * p.ci + ci) * p.co4 + co] = u[e];
    }
}

// Block t's image, block row and block column: (n, by, bx).
fn block(t: u32) -> vec3u {
    let rest = t / p.tw;
    return vec3u(rest / p.th, rest % p.th, t % p.tw);
}

// B^T d B for the patch of block t (< np) of input channel ci of src, through the prologue where
// p.pre; zeros for a padding block (t >= np).
fn input_tile(ci: u32, t: u32) -> array<f32, E> {
    var d: array<f32, E>; // the patch; zeros outside the image and in the padding blocks
    if t < p.np {
        let b = block(t);
        let n = b.x; let by = b.y; let bx = b.z;
        var a = vec4f(0.0);
        if p.pre == 1u {
            a = aff[ci];
        }
        let plane = (n * p.ci + ci) * p.h * p.w;
        for (var r = 0u; r < PT; r++) { // @unroll
            let y = R * by + r; // the image row plus 1
            for (var c = 0u; c < PT; c++) { // @unroll
                let x = R * bx + c;
                if y >= 1u && y <= p.h && x >= 1u && x <= p.w {
                    var v = f32(src[plane + (y - 1u) * p.w + x - 1u]);
                    if p.pre == 1u {
                        v = max((v - a.x) * a.y + a.z, 0.0);
                    }
                    d[r * PT + c] = v;
                }
            }
        }
    }
    return input_transform(d);
}

// V for (ci, t) of invocation i over ci x P4 (t fastest).
@compute @workgroup_size(64)
fn wino_input(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if i >= p.ci * p.p4 {
        return;
    }
    let ci = i / p.p4;
    let t = i - ci * p.p4;
    let v = input_tile(ci, t);
    for (var e = 0u; e < E; e++) { // @unroll
        tout[(e * p.ci + ci) * p.p4 + t] = v[e];
    }
}

// ------------------------------------------------------------------------------------------
// backward_weight: dw[k][c] = G^T [ sum_t (A dY A^T) .* (B^T d B) ] G over the blocks t of every
// image (the forward's algebra differentiated in g), with dY the R x R block of dy[n][k] and d the
// patch of x[n][c] (through the prologue where p.pre). Layouts, reduction-major for wino_gemm:
//   wino_input_t: X[e][t][c] (c padded to C4), wino_dy_t: DY[e][t][k] (k padded to K4),
//   wino_gemm (run with ci = P4, co = K, co4 = K4, p4 = C4): M[e][k][c] = sum_t DY X, in
//                 `splits` partial sums over ranges of blocks where the output has few tiles,
//   wino_dw: dw[k][c][i][j] (=|+=) (G^T M[.][k][c] G)[i][j] (wino_dw_splits: M the splits'
//                 sum in order).
// Here p.ci = C, p.co = K, p.co4 = K4, and the blocks as for the forward.
// ------------------------------------------------------------------------------------------

// X for (t, c) of invocation i over P4 x C4 (c fastest, so the stores coalesce).
@compute @workgroup_size(64)
fn wino_input_t(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let c4 = (p.ci + 3u) / 4u * 4u;
    if i >= p.p4 * c4 {
        return;
    }
    let t = i / c4;
    let c = i - t * c4;
    var v: array<f32, E>;
    if c < p.ci {
        v = input_tile(c, t);
    }
    for (var e = 0u; e < E; e++) { // @unroll
        tout[(e * p.p4 + t) * c4 + c] = v[e];
    }
}

// DY for (t, k) of invocation i over P4 x K4 (k fastest): A dY A^T.
@compute @workgroup_size(64)
fn wino_dy_t(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if i >= p.p4 * p.co4 {
        return;
    }
    let t = i / p.co4;
    let k = i - t * p.co4;
    var d: array<f32, 16>; // dY, row-major R x R; zeros outside the image
    if t < p.np && k < p.co {
        let b = block(t);
        let n = b.x; let by = b.y; let bx = b.z;
        let plane = (n * p.co + k) * p.h * p.w;
        for (var a = 0u; a < R; a++) { // @unroll
            for (var b = 0u; b < R; b++) { // @unroll
                let y = R * by + a;
                let x = R * bx + b;
                if y < p.h && x < p.w {
                    d[a * R + b] = f32(src[plane + y * p.w + x]);
                }
            }
        }
    }
    let z = dy_transform(d);
    for (var e = 0u; e < E; e++) { // @unroll
        tout[(e * p.p4 + t) * p.co4 + k] = z[e];
    }
}

// dw (=|+=) G^T m G for (k, c).
fn store_dw(k: u32, c: u32, m: array<f32, E>) {
    let g = dw_transform(m);
    for (var j = 0u; j < 9u; j++) { // @unroll
        let o = (k * p.ci + c) * 9u + j;
        if p.accumulate == 1u {
            dwo[o] += g[j];
        } else {
            dwo[o] = g[j];
        }
    }
}

// The E values of M at (k, c) in split s.
fn split_m(k: u32, c: u32, s: u32) -> array<f32, E> {
    let c4 = (p.ci + 3u) / 4u * 4u;
    var m: array<f32, E>;
    for (var e = 0u; e < E; e++) { // @unroll
        m[e] = mres[((s * E + e) * p.co + k) * c4 + c];
    }
    return m;
}

// dw for (k, c) of invocation i over K x C (c fastest), from an unsplit GEMM.
@compute @workgroup_size(64)
fn wino_dw(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
           @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if i < p.co * p.ci {
        store_dw(i / p.ci, i % p.ci, split_m(i / p.ci, i % p.ci, 0u));
    }
}

// wino_dw from p.splits partial sums, added in split order (an entry of its own: the loop over
// the splits made lavapipe's unsplit case 1.5x to 2x slower).
@compute @workgroup_size(64)
fn wino_dw_splits(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                  @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if i >= p.co * p.ci {
        return;
    }
    let k = i / p.ci;
    let c = i % p.ci;
    var m = split_m(k, c, 0u);
    for (var s = 1u; s < p.splits; s++) {
        var q = split_m(k, c, s);
        for (var e = 0u; e < E; e++) { // @unroll
            m[e] += q[e];
        }
    }
    store_dw(k, c, m);
}

// The output block (co, t) of invocation i over co x np (t fastest).
@compute @workgroup_size(64)
fn wino_output(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if i >= p.co * p.np {
        return;
    }
    let co = i / p.np;
    let t = i - co * p.np;
    var m: array<f32, E>;
    for (var e = 0u; e < E; e++) { // @unroll
        m[e] = mres[(e * p.co + co) * p.p4 + t];
    }
    let out = output_transform(m);
    let b = block(t);
    let n = b.x; let by = b.y; let bx = b.z;
    for (var a = 0u; a < R; a++) { // @unroll
        let y = R * by + a;
        for (var b = 0u; b < R; b++) { // @unroll
            let x = R * bx + b;
            if y < p.h && x < p.w {
                let o = ((n * p.co + co) * p.h + y) * p.w + x;
                if p.accumulate == 1u {
                    dst[o] = ST(f32(dst[o]) + out[a * R + b]);
                } else {
                    dst[o] = ST(out[a * R + b]);
                }
            }
        }
    }
}

const AS: u32 = BM / 4u; // vec4s per row of the U tile
const BS: u32 = BN / 4u; // vec4s per row of the V tile
var<workgroup> ta: array<vec4f, BK * AS>;
var<workgroup> tb: array<vec4f, BK * BS>;

// The vec4 of U at reduction row k (below `end`, the end of the split), vec4 column v of GEMM e
// (zeros past the end).
fn load_u(e: u32, k: u32, end: u32, v: u32) -> vec4f {
    if k < end && v < p.co4 / 4u {
        return u4[(e * p.ci + k) * (p.co4 / 4u) + v];
    }
    return vec4f(0.0);
}

fn load_v(e: u32, k: u32, end: u32, v: u32) -> vec4f {
    if k < end && v < p.p4 / 4u {
        return v4[(e * p.ci + k) * (p.p4 / 4u) + v];
    }
    return vec4f(0.0);
}

// GEMM e = wid.z % E: M[e][co][t] for the tile of co from wid.y * BM and t from wid.x * BN,
// over split s = wid.z / E of the reduction (steps [s * chunk, (s + 1) * chunk)), into
// M[s][e][co][t]: the splits' partial sums, which wino_dw_splits adds in split order (wino_dw
// takes the one split).
@compute @workgroup_size(THREADS)
fn wino_gemm(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) lid: u32) {
    let e = wid.z % E;
    let split = wid.z / E;
    let k_begin = split * p.chunk;
    let k_end = min(p.ci, k_begin + p.chunk);
    let cv0 = wid.y * AS; // first vec4 of co
    let tv0 = wid.x * BS; // first vec4 of t
    let tr = lid / (BN / TN);
    let tc = lid % (BN / TN);
    var acc: array<vec4f, TMV * 4u * TNV>;
    var ra: array<vec4f, A_PER>;
    var rb: array<vec4f, B_PER>;
    for (var j = 0u; j < A_PER; j++) { // @unroll
        let q = lid + j * THREADS;
        ra[j] = load_u(e, k_begin + q / AS, k_end, cv0 + q % AS);
    }
    for (var j = 0u; j < B_PER; j++) { // @unroll
        let q = lid + j * THREADS;
        rb[j] = load_v(e, k_begin + q / BS, k_end, tv0 + q % BS);
    }
    let steps = (k_end - min(k_begin, k_end) + BK - 1u) / BK;
    for (var s = 0u; s < steps; s++) {
        for (var j = 0u; j < A_PER; j++) { // @unroll
            ta[lid + j * THREADS] = ra[j];
        }
        for (var j = 0u; j < B_PER; j++) { // @unroll
            tb[lid + j * THREADS] = rb[j];
        }
        workgroupBarrier();
        if s + 1u < steps {
            let k0 = k_begin + (s + 1u) * BK;
            for (var j = 0u; j < A_PER; j++) { // @unroll
                let q = lid + j * THREADS;
                ra[j] = load_u(e, k0 + q / AS, k_end, cv0 + q % AS);
            }
            for (var j = 0u; j < B_PER; j++) { // @unroll
                let q = lid + j * THREADS;
                rb[j] = load_v(e, k0 + q / BS, k_end, tv0 + q % BS);
            }
        }
        for (var k = 0u; k < BK; k++) {
            var b: array<vec4f, TNV>;
            for (var h = 0u; h < TNV; h++) { // @unroll
                b[h] = tb[k * BS + h * (BN / TN) + tc];
            }
            for (var g = 0u; g < TMV; g++) { // @unroll
                let a = ta[k * AS + g * (BM / TM) + tr];
                for (var i = 0u; i < 4u; i++) { // @unroll
                    for (var h = 0u; h < TNV; h++) { // @unroll
                        acc[(g * 4u + i) * TNV + h] = fma(vec4f(a[i]), b[h], acc[(g * 4u + i) * TNV + h]);
                    }
                }
            }
        }
        workgroupBarrier();
    }
    for (var g = 0u; g < TMV; g++) { // @unroll
        for (var i = 0u; i < 4u; i++) { // @unroll
            let co = (cv0 + g * (BM / TM) + tr) * 4u + i;
            for (var h = 0u; h < TNV; h++) { // @unroll
                let tv = tv0 + h * (BN / TN) + tc;
                if co < p.co && tv < p.p4 / 4u {
                    m4[(wid.z * p.co + co) * (p.p4 / 4u) + tv] = acc[(g * 4u + i) * TNV + h];
                }
            }
        }
    }
}
