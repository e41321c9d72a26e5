// Not a kernel family: the host prepends this to the f16 builds of the modules whose storage
// type ST serves both paths (gpu.rs `storage_type`); their f32 builds get `as_st` as the identity.
//
// as_st(v): v as an ST tensor would hold it, as f32: here v rounded to the nearest half (ties to
// even; past the half range, an infinity), as `half::f16::from_f32` and a store to f16 memory
// round. Integer arithmetic, not `f32(f16(v))`: a compiler may fold that round trip to v
// (Mesa 26's lavapipe does), and then the f16 path would convolve unrounded weights.
fn as_st(v: f32) -> f32 {
    let b = bitcast<u32>(v);
    let e = (b >> 23u) & 0xffu;
    let sign = b & 0x80000000u;
    if e == 0xffu {
        return v; // infinities and NaN
    }
    if e < 102u {
        return bitcast<f32>(sign); // below half the smallest subnormal half, 2^-25: zero
    }
    // The significand with its leading bit, rounded to the half's precision: 11 bits for a
    // normal half (e >= 113), fewer for a subnormal one (whose step is 2^-24).
    let m = (b & 0x7fffffu) | 0x800000u;
    let s = select(13u, 126u - e, e < 113u); // 13 .. 24
    var q = m >> s;
    let r = m & ((1u << s) - 1u);
    let tie = 1u << (s - 1u);
    if r > tie || (r == tie && (q & 1u) == 1u) {
        q += 1u;
    }
    if e > 142u || (e == 142u && (q << s) >= 0x1000000u) {
        return bitcast<f32>(sign | 0x7f800000u); // 2^16 and above: past 65504
    }
    // q << s <= 2^24 is exact in f32, and so is the power-of-two scaling.
    return bitcast<f32>(sign | bitcast<u32>(ldexp(f32(q << s), i32(e) - 150)));
}
