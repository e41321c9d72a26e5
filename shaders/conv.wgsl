// 2-D convolution, square kernel ks in {1, 3}, padding ks / 2, stride 1 or 2, no bias.
// x [N,C,H,W], w [K,C,ks,ks] (OIHW), y [N,K,OH,OW] with OH = (H + 2*pad - ks) / stride + 1.
//
//   forward:         y  (=|+=) conv(x, w)          one invocation per element of y
//   backward_data:   dx (=|+=) conv_transpose(dy, w) one invocation per element of dx
//   backward_weight: dw (=|+=) corr(x, dy)          one invocation per element of dw
//
// Plain gathers: every invocation sums its own terms, so there are no atomics and no races.

struct Params {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    k: u32,
    ks: u32,
    oh: u32,
    ow: u32,
    stride: u32,
    pad: u32,
    accumulate: u32, // 1 adds into the output, 0 overwrites it
    len: u32,        // elements of this entry point's output
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> wt: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;
@group(0) @binding(6) var<storage, read_write> dw: array<f32>;

const WG: u32 = 64u;

@compute @workgroup_size(WG)
fn forward(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
           @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.len { return; }
    let ox = i % p.ow;
    let oy = (i / p.ow) % p.oh;
    let k = (i / (p.ow * p.oh)) % p.k;
    let n = i / (p.ow * p.oh * p.k);
    let iy0 = i32(oy * p.stride) - i32(p.pad);
    let ix0 = i32(ox * p.stride) - i32(p.pad);
    var acc = 0.0;
    for (var c = 0u; c < p.c; c++) {
        let xbase = (n * p.c + c) * p.h;
        let wbase = (k * p.c + c) * p.ks;
        for (var ky = 0u; ky < p.ks; ky++) {
            let iy = iy0 + i32(ky);
            if iy < 0 || iy >= i32(p.h) { continue; }
            let xrow = (xbase + u32(iy)) * p.w;
            let wrow = (wbase + ky) * p.ks;
            for (var kx = 0u; kx < p.ks; kx++) {
                let ix = ix0 + i32(kx);
                if ix < 0 || ix >= i32(p.w) { continue; }
                acc += x[xrow + u32(ix)] * wt[wrow + kx];
            }
        }
    }
    if p.accumulate == 1u { y[i] += acc; } else { y[i] = acc; }
}

@compute @workgroup_size(WG)
fn backward_data(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                 @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.len { return; }
    let ix = i % p.w;
    let iy = (i / p.w) % p.h;
    let c = (i / (p.w * p.h)) % p.c;
    let n = i / (p.w * p.h * p.c);
    let s = i32(p.stride);
    var acc = 0.0;
    for (var k = 0u; k < p.k; k++) {
        let dbase = (n * p.k + k) * p.oh;
        let wbase = (k * p.c + c) * p.ks;
        for (var ky = 0u; ky < p.ks; ky++) {
            // iy = oy * stride - pad + ky  =>  oy = (iy + pad - ky) / stride, when exact.
            let ty = i32(iy + p.pad) - i32(ky);
            if ty < 0 || ty % s != 0 { continue; }
            let oy = ty / s;
            if oy >= i32(p.oh) { continue; }
            let drow = (dbase + u32(oy)) * p.ow;
            let wrow = (wbase + ky) * p.ks;
            for (var kx = 0u; kx < p.ks; kx++) {
                let tx = i32(ix + p.pad) - i32(kx);
                if tx < 0 || tx % s != 0 { continue; }
                let ox = tx / s;
                if ox >= i32(p.ow) { continue; }
                acc += dy[drow + u32(ox)] * wt[wrow + kx];
            }
        }
    }
    if p.accumulate == 1u { dx[i] += acc; } else { dx[i] = acc; }
}

@compute @workgroup_size(WG)
fn backward_weight(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
                   @builtin(local_invocation_id) lid: vec3u) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if i >= p.len { return; }
    let kx = i % p.ks;
    let ky = (i / p.ks) % p.ks;
    let c = (i / (p.ks * p.ks)) % p.c;
    let k = i / (p.ks * p.ks * p.c);
    var acc = 0.0;
    for (var n = 0u; n < p.n; n++) {
        let xbase = (n * p.c + c) * p.h;
        let dbase = (n * p.k + k) * p.oh;
        for (var oy = 0u; oy < p.oh; oy++) {
            let iy = i32(oy * p.stride + ky) - i32(p.pad);
            if iy < 0 || iy >= i32(p.h) { continue; }
            let xrow = (xbase + u32(iy)) * p.w;
            let drow = (dbase + oy) * p.ow;
            // One partial sum per output row keeps the f32 rounding error of long sums small.
            var row = 0.0;
            for (var ox = 0u; ox < p.ow; ox++) {
                let ix = i32(ox * p.stride + kx) - i32(p.pad);
                if ix < 0 || ix >= i32(p.w) { continue; }
                row += x[xrow + u32(ix)] * dy[drow + ox];
            }
            acc += row;
        }
    }
    if p.accumulate == 1u { dw[i] += acc; } else { dw[i] = acc; }
}
