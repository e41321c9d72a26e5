//! 2-D convolution (square kernel 1 or 3, padding `k / 2`, stride 1 or 2, no bias), forward and
//! both backwards, dispatching `shaders/conv.wgsl`. Reference: `reference::conv`.

use crate::error::{Error, Result};
use crate::gpu::{Recorder, Shader, groups_for};
use crate::tensor::Tensor;

/// Output spatial size: (h + 2*pad - k) / stride + 1 with pad = k / 2.
///
/// Returns 0 where no output exists (stride 0, or a kernel larger than the padded input).
pub fn out_size(h: usize, k: usize, stride: usize) -> usize {
    let padded = match h.checked_add(k / 2 * 2) {
        Some(p) => p,
        None => return 0,
    };
    if stride == 0 || padded < k {
        return 0;
    }
    (padded - k) / stride + 1
}

/// The validated geometry of one convolution, in the shader's parameter order.
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    ks: usize,
    oh: usize,
    ow: usize,
    stride: usize,
}

impl Geometry {
    /// Checks `x` [N,C,H,W], `w` [K,C,ks,ks] and `y` [N,K,OH,OW] against each other; `what` and
    /// the names say which call and which tensors, in the error.
    fn check(what: &str, names: [&str; 3], x: &Tensor, w: &Tensor, y: &Tensor, stride: usize) -> Result<Geometry> {
        let [n, c, h, wd] = x.nchw(&format!("{what}: {}", names[0]))?;
        let [k, wc, kh, kw] = w.nchw(&format!("{what}: {} (OIHW)", names[1]))?;
        let [yn, yk, oh, ow] = y.nchw(&format!("{what}: {}", names[2]))?;
        if stride != 1 && stride != 2 {
            return Err(Error::Invalid(format!("{what}: stride must be 1 or 2, got {stride}")));
        }
        if kh != kw {
            return Err(Error::Shape(format!("{what}: kernel must be square, got {kh}x{kw}")));
        }
        if kh != 1 && kh != 3 {
            return Err(Error::Shape(format!("{what}: kernel size must be 1 or 3, got {kh}")));
        }
        if wc != c {
            return Err(Error::Shape(format!(
                "{what}: {} has {c} channels but {} {:?} expects {wc}",
                names[0],
                names[1],
                w.dims()
            )));
        }
        let (eh, ew) = (out_size(h, kh, stride), out_size(wd, kh, stride));
        if [yn, yk, oh, ow] != [n, k, eh, ew] {
            return Err(Error::Shape(format!(
                "{what}: {} {:?} with {} {:?} at stride {stride} needs {} [{n}, {k}, {eh}, {ew}], got {:?}",
                names[0],
                x.dims(),
                names[1],
                w.dims(),
                names[2],
                y.dims()
            )));
        }
        // The shader indexes in u32 and offsets in i32.
        for t in [x, w, y] {
            if t.len() > i32::MAX as usize {
                return Err(Error::TooLarge {
                    what: format!("{what}: tensor {:?}", t.dims()),
                    bytes: t.bytes(),
                    limit: i32::MAX as u64 * 4,
                });
            }
        }
        Ok(Geometry { n, c, h, w: wd, k, ks: kh, oh, ow, stride })
    }

    /// The shader's `Params`, for an entry point writing `len` elements.
    fn params(&self, accumulate: bool, len: usize) -> [u32; 12] {
        let g = self;
        [g.n, g.c, g.h, g.w, g.k, g.ks, g.oh, g.ow, g.stride, g.ks / 2, accumulate as usize, len].map(|v| v as u32)
    }
}

/// An output that is also an input would be a read-write and read-only binding of one buffer.
fn distinct(what: &str, out: &Tensor, ins: [&Tensor; 2]) -> Result<()> {
    if ins.iter().any(|t| t.buffer == out.buffer) {
        return Err(Error::Invalid(format!("{what}: the output must not alias an input")));
    }
    Ok(())
}

/// y (+)= conv(x, w). x [N,C,H,W], w [K,C,k,k] (PyTorch OIHW, k in {1,3}, pad k/2, no bias), y [N,K,OH,OW], stride 1 or 2.
/// accumulate = true adds into y: the fused residual add (x_{l+1} = x_l + F).
pub fn forward(rec: &mut Recorder, x: &Tensor, w: &Tensor, y: &Tensor, stride: usize, accumulate: bool) -> Result<()> {
    const WHAT: &str = "conv forward";
    let g = Geometry::check(WHAT, ["x", "w", "y"], x, w, y, stride)?;
    distinct(WHAT, y, [x, w])?;
    let len = y.len();
    rec.dispatch(
        Shader::Conv,
        "forward",
        &g.params(accumulate, len),
        &[(1, &x.buffer), (2, &w.buffer), (3, &y.buffer)],
        groups_for(len),
    );
    Ok(())
}

/// dx (+)= gradient of the loss to the input, given dy.
pub fn backward_data(
    rec: &mut Recorder,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    const WHAT: &str = "conv backward_data";
    let g = Geometry::check(WHAT, ["dx", "w", "dy"], dx, w, dy, stride)?;
    distinct(WHAT, dx, [dy, w])?;
    let len = dx.len();
    rec.dispatch(
        Shader::Conv,
        "backward_data",
        &g.params(accumulate, len),
        &[(2, &w.buffer), (4, &dy.buffer), (5, &dx.buffer)],
        groups_for(len),
    );
    Ok(())
}

/// dw (+)= gradient to the weights, given x and dy.
pub fn backward_weight(
    rec: &mut Recorder,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    stride: usize,
    accumulate: bool,
) -> Result<()> {
    const WHAT: &str = "conv backward_weight";
    let g = Geometry::check(WHAT, ["x", "dw", "dy"], x, dw, dy, stride)?;
    distinct(WHAT, dw, [x, dy])?;
    let len = dw.len();
    rec.dispatch(
        Shader::Conv,
        "backward_weight",
        &g.params(accumulate, len),
        &[(1, &x.buffer), (4, &dy.buffer), (6, &dw.buffer)],
        groups_for(len),
    );
    Ok(())
}
