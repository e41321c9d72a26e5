// The tile storage and arithmetic of conv_tiled.wgsl on cooperative matrices (tensor cores),
// replacing its plain block (@plain-begin .. @plain-end) in the f16 path's COOP builds
// (ops/conv/tiled.rs). The staged tiles are f16 (the operands rounded to f16 as they are
// stored: exact for the f16 loads, rounded for values through the BN + ReLU prologue); every
// product and sum is f32.
//
// The host adds, besides the template's constants:
//   F          fragment size: F x F f16 operands, F x F f32 accumulators (FragA, FragB, FragC)
//   SG         the adapter's subgroup size; subgroup w is invocations [w * SG, (w + 1) * SG)
//   NWR        subgroups per column of the fragment grid; subgroup w owns the WR x WC fragments
//   WR, WC     from fragment row (w % NWR) * WR and column (w / NWR) * WC
//   AHS, BHS   row strides (halves) of the f16 tiles: BM + 8 and BN + 8 (whole 16-byte rows,
//              staggered across banks)
//   TCR, TCS   rows and row stride (floats) of tc, through which drain moves the accumulators to
//              the plain layout's registers, TCR rows of the output tile at a time
//   TA_LEN, TB_LEN   here only the epilogues' column sums (tile_column_sums, tile_moments)
//
// Tiles: A is stored [reduction][GEMM row], so an A fragment (rows m, columns r) is column-major
// with stride AHS; B is [reduction][GEMM column], a B fragment row-major with stride BHS.

var<workgroup> tah: array<f16, 2 * BK * AHS>;
var<workgroup> tbh: array<f16, 2 * BK * BHS>;
var<workgroup> tc: array<f32, TCR * TCS>;
var<workgroup> ta: array<vec4f, TA_LEN>;
var<workgroup> tb: array<vec4f, TB_LEN>;

alias Frags = array<FragC, WR * WC>;

fn put_a(buf: u32, r: u32, m: u32, v: f32) { tah[(buf * BK + r) * AHS + m] = f16(v); }
fn put_b(buf: u32, r: u32, n: u32, v: f32) { tbh[(buf * BK + r) * BHS + n] = f16(v); }
fn put_b4(buf: u32, r: u32, nv: u32, v: vec4f) {
    let i = (buf * BK + r) * BHS + nv * 4u;
    tbh[i] = f16(v.x);
    tbh[i + 1u] = f16(v.y);
    tbh[i + 2u] = f16(v.z);
    tbh[i + 3u] = f16(v.w);
}

// LEAVE_OUT 2 (conv_tiled.wgsl): one element of each of buffer buf's tiles, standing in for
// its products.
fn staged_probe(buf: u32, lid: u32) -> f32 {
    let r = buf * BK + lid % BK;
    return f32(tah[r * AHS + lid % BM]) + f32(tbh[r * BHS + lid % BN]);
}

// This invocation's subgroup's first fragment row and column.
fn warp_origin(lid: u32) -> vec2u {
    let warp = lid / SG;
    return vec2u((warp % NWR) * WR, (warp / NWR) * WC);
}

// The BK reduction steps of buffer buf, F at a time, into the subgroup's fragments. (Loops
// marked `// @unroll` are unrolled by the host, as in conv_tiled.wgsl: the fragments are
// registers, indexed by constants.)
fn tile_product(acc: ptr<function, array<vec4f, ACC_LEN>>, frags: ptr<function, Frags>, buf: u32,
                lid: u32, tm: u32, tn: u32) {
    let o = warp_origin(lid);
    for (var s = 0u; s < BK; s += F) {
        var a: array<FragA, WR>;
        for (var i = 0u; i < WR; i++) { // @unroll
            a[i] = coopLoad<FragA>(&tah[(buf * BK + s) * AHS + (o.x + i) * F], AHS);
        }
        for (var j = 0u; j < WC; j++) { // @unroll
            let b = coopLoadT<FragB>(&tbh[(buf * BK + s) * BHS + (o.y + j) * F], BHS);
            for (var i = 0u; i < WR; i++) { // @unroll
                (*frags)[i * WC + j] = coopMultiplyAdd(a[i], b, (*frags)[i * WC + j]);
            }
        }
    }
}

// The fragments into acc, in the plain kernels' register layout (row group g * (BM / TM) + tm,
// column group h * (BN / TN) + tn), through tc: TCR rows of the tile per pass.
fn drain(acc: ptr<function, array<vec4f, ACC_LEN>>, frags: ptr<function, Frags>, lid: u32, tm: u32,
         tn: u32) {
    let o = warp_origin(lid);
    for (var r0 = 0u; r0 < BM; r0 += TCR) {
        for (var i = 0u; i < WR; i++) { // @unroll
            let row = (o.x + i) * F;
            if row >= r0 && row < r0 + TCR {
                for (var j = 0u; j < WC; j++) { // @unroll
                    coopStoreT((*frags)[i * WC + j], &tc[(row - r0) * TCS + (o.y + j) * F], TCS);
                }
            }
        }
        workgroupBarrier();
        for (var g = 0u; g < TMV; g++) { // @unroll
            for (var i = 0u; i < 4u; i++) { // @unroll
                let m = (g * (BM / TM) + tm) * 4u + i;
                if m >= r0 && m < r0 + TCR {
                    for (var h = 0u; h < TNV; h++) { // @unroll
                        let t = (m - r0) * TCS + (h * (BN / TN) + tn) * 4u;
                        (*acc)[(g * 4u + i) * TNV + h] = vec4f(tc[t], tc[t + 1u], tc[t + 2u], tc[t + 3u]);
                    }
                }
            }
        }
        workgroupBarrier();
    }
}
