//! The network head (global average pooling, the fully connected layer, softmax
//! cross-entropy), dispatching `shaders/pool_fc_loss.wgsl`. Reference: `reference::pool_fc_loss`.
//!
//! Shapes: `x` `[N,C,H,W]`, pooled `p` `[N,C]`, weight `w` `[K,C]` (PyTorch `Linear` layout),
//! bias `b` `[K]`, `logits` `[N,K]`, labels N values below K, `loss` `[1]`.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder, Shader};
use crate::ops::{distinct, residual, split};
use crate::tensor::Tensor;

/// Integer class labels in a u32 storage buffer, one per sample, each below `classes`.
#[derive(Debug)]
pub struct Labels {
    pub buffer: wgpu::Buffer,
    /// Number of labels (the batch size N). Private, as `classes`: the kernels trust them.
    len: usize,
    /// Number of classes K; every label is below it.
    classes: usize,
    /// The context that made them ([`Gpu::context`]).
    context: u64,
}

fn check_labels(labels: &[u32], classes: usize) -> Result<()> {
    if labels.is_empty() {
        return Err(Error::Invalid("labels: empty".into()));
    }
    if classes == 0 || classes > u32::MAX as usize {
        return Err(Error::Invalid(format!("labels: {classes} classes")));
    }
    if let Some((i, &l)) = labels.iter().enumerate().find(|&(_, &l)| l as usize >= classes) {
        return Err(Error::Invalid(format!("label {i} is {l}, not below the {classes} classes")));
    }
    Ok(())
}

/// Uploads `labels` (each below `classes`, at least one); `Error::Invalid` otherwise.
pub fn upload_labels(gpu: &Gpu, labels: &[u32], classes: usize) -> Result<Labels> {
    check_labels(labels, classes)?;
    let bytes = labels.len() as u64 * 4;
    if bytes > gpu.report.max_buffer {
        return Err(Error::TooLarge {
            what: format!("{} labels", labels.len()),
            bytes,
            limit: gpu.report.max_buffer,
            of: "largest buffer",
        });
    }
    // In an allocation scope, as a tensor's.
    gpu.allocation_scope(&format!("{} labels", labels.len()), || {
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let buffer = gpu.create_buffer("labels", bytes, usage);
        gpu.queue.write_buffer(&buffer, 0, bytemuck::cast_slice(labels));
        Ok(Labels { buffer, len: labels.len(), classes, context: gpu.context() })
    })
}

impl Labels {
    /// Number of labels (the batch size N).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: there is at least one label.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of classes K; every label is below it.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The number of the context that made them ([`Gpu::context`]).
    pub fn context(&self) -> u64 {
        self.context
    }

    /// Overwrites the labels in place (the next batch); same count, each below `classes`.
    pub fn write(&self, gpu: &Gpu, labels: &[u32]) -> Result<()> {
        gpu.check_owns("labels", self.context)?;
        if labels.len() != self.len {
            return Err(Error::Length { what: "labels".into(), expected: self.len, got: labels.len() });
        }
        check_labels(labels, self.classes)?;
        gpu.queue.write_buffer(&self.buffer, 0, bytemuck::cast_slice(labels));
        gpu.check_lost() // as `Tensor::write`'s
    }
}

/// The shape as `[rows, cols]`, or a shape error naming `what`.
fn two_d(t: &Tensor, what: &str) -> Result<[usize; 2]> {
    match t.dims()[..] {
        [r, c] => Ok([r, c]),
        _ => Err(Error::Shape(format!("{what} must be 2-D, got {:?}", t.dims()))),
    }
}

/// `t` has exactly the shape `want`.
fn expect(t: &Tensor, want: &[usize], what: &str) -> Result<()> {
    if t.dims() != want {
        return Err(Error::Shape(format!("{what} must be {want:?}, got {:?}", t.dims())));
    }
    Ok(())
}

/// Thread counts and indices are u32 in the shaders.
fn fits_u32(what: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Invalid(format!("{what}: {n} threads exceed u32 indexing")))
}

/// The 8-word parameter block of `pool_fc_loss.wgsl`.
struct Params {
    n: usize,
    c: usize,
    hw: usize,
    k: usize,
    len: u32,
    accumulate: bool,
    inv: f32,
}

impl Params {
    fn words(&self) -> [u32; 8] {
        [
            self.n as u32,
            self.c as u32,
            self.hw as u32,
            self.k as u32,
            self.len,
            self.accumulate as u32,
            self.inv.to_bits(),
            0,
        ]
    }
}

/// Global average pooling: `p[n,c] = mean_{h,w} x[n,c,h,w]`; `p` is `[N,C]`.
pub fn pool_forward(rec: &mut Recorder, x: &Tensor, p: &Tensor) -> Result<()> {
    super::owned(rec, "head pool_forward", [x, p])?;
    let [n, c, h, w] = x.nchw("pool forward: x")?;
    expect(p, &[n, c], "pool forward: p")?;
    distinct("pool forward", &[("x", x), ("p", p)])?;
    let chunk = |rec: &mut Recorder, _: &_, i: &[Tensor], o: &[Tensor]| pool_forward(rec, &i[0], &o[0]);
    if split::batch_op(rec, "pool forward", &[x], &[(p, false)], &[], chunk)? {
        return Ok(());
    }
    let len = fits_u32("pool forward", n * c)?;
    let hw = h * w;
    let params = Params { n, c, hw, k: 0, len, accumulate: false, inv: 1.0 / hw as f32 };
    rec.dispatch(
        Shader::PoolFcLoss,
        "pool_forward",
        &params.words(),
        &[(1, &x.buffer), (2, &p.buffer)],
        rec.gpu.groups_for(len as usize),
    );
    Ok(())
}

/// `dx[n,c,h,w] (+)= dp[n,c] / (H*W)`; `dp` is `[N,C]`, `dx` `[N,C,H,W]`.
pub fn pool_backward(rec: &mut Recorder, dp: &Tensor, dx: &Tensor, accumulate: bool) -> Result<()> {
    super::owned(rec, "head pool_backward", [dp, dx])?;
    let [n, c, h, w] = dx.nchw("pool backward: dx")?;
    expect(dp, &[n, c], "pool backward: dp")?;
    distinct("pool backward", &[("dp", dp), ("dx", dx)])?;
    let chunk = |rec: &mut Recorder, _: &_, i: &[Tensor], o: &[Tensor]| pool_backward(rec, &i[0], &o[0], accumulate);
    if split::batch_op(rec, "pool backward", &[dp], &[(dx, accumulate)], &[], chunk)? {
        return Ok(());
    }
    let len = fits_u32("pool backward", dx.len())?;
    let hw = h * w;
    let params = Params { n, c, hw, k: 0, len, accumulate, inv: 1.0 / hw as f32 };
    rec.dispatch(
        Shader::PoolFcLoss,
        "pool_backward",
        &params.words(),
        &[(3, &dp.buffer), (4, &dx.buffer)],
        rec.gpu.groups_for(len as usize),
    );
    Ok(())
}

/// `logits = p · wᵀ + b`: `p` `[N,C]`, `w` `[K,C]`, `b` `[K]`, `logits` `[N,K]`.
pub fn fc_forward(rec: &mut Recorder, p: &Tensor, w: &Tensor, b: &Tensor, logits: &Tensor) -> Result<()> {
    super::owned(rec, "head fc_forward", [p, w, b, logits])?;
    let [n, c] = two_d(p, "fc forward: p")?;
    let [k, wc] = two_d(w, "fc forward: w")?;
    if wc != c {
        return Err(Error::Shape(format!("fc forward: w {:?} does not take p {:?}", w.dims(), p.dims())));
    }
    expect(b, &[k], "fc forward: b")?;
    expect(logits, &[n, k], "fc forward: logits")?;
    distinct("fc forward", &[("p", p), ("w", w), ("b", b), ("logits", logits)])?;
    let chunk = |rec: &mut Recorder, _: &_, i: &[Tensor], o: &[Tensor]| fc_forward(rec, &i[0], w, b, &o[0]);
    if split::batch_op(rec, "fc forward", &[p], &[(logits, false)], &[w, b], chunk)? {
        return Ok(());
    }
    let len = fits_u32("fc forward", n * k)?;
    let params = Params { n, c, hw: 0, k, len, accumulate: false, inv: 0.0 };
    rec.dispatch(
        Shader::PoolFcLoss,
        "fc_forward",
        &params.words(),
        &[(5, &p.buffer), (6, &w.buffer), (7, &b.buffer), (8, &logits.buffer)],
        rec.gpu.groups_for(len as usize),
    );
    Ok(())
}

/// The fully connected layer's backward: `dp (+)= dlogits · w` (by `accumulate_dp`),
/// `dw (+)= dlogitsᵀ · p` and `db (+)= sum_n dlogits` (by `accumulate_params`).
/// Shapes as [`fc_forward`], with each gradient shaped as its variable.
#[allow(clippy::too_many_arguments)]
pub fn fc_backward(
    rec: &mut Recorder,
    p: &Tensor,
    w: &Tensor,
    dlogits: &Tensor,
    dp: &Tensor,
    dw: &Tensor,
    db: &Tensor,
    accumulate_dp: bool,
    accumulate_params: bool,
) -> Result<()> {
    super::owned(rec, "head fc_backward", [p, w, dlogits, dp, dw, db])?;
    let [n, c] = two_d(p, "fc backward: p")?;
    let [k, wc] = two_d(w, "fc backward: w")?;
    if wc != c {
        return Err(Error::Shape(format!("fc backward: w {:?} does not take p {:?}", w.dims(), p.dims())));
    }
    expect(dlogits, &[n, k], "fc backward: dlogits")?;
    expect(dp, &[n, c], "fc backward: dp")?;
    expect(dw, &[k, c], "fc backward: dw")?;
    expect(db, &[k], "fc backward: db")?;
    distinct("fc backward", &[("p", p), ("w", w), ("dlogits", dlogits), ("dp", dp), ("dw", dw), ("db", db)])?;
    // By chunks: dw and db summed over the chunks in order (the first overwrites unless
    // `accumulate_params`).
    let chunk = |rec: &mut Recorder, r: &std::ops::Range<usize>, i: &[Tensor], o: &[Tensor]| {
        fc_backward(rec, &i[0], w, &i[1], &o[0], dw, db, accumulate_dp, accumulate_params || r.start > 0)
    };
    if split::batch_op(rec, "fc backward", &[p, dlogits], &[(dp, accumulate_dp)], &[w, dw, db], chunk)? {
        return Ok(());
    }
    let len_data = fits_u32("fc backward", n * c)?;
    let len_params = fits_u32("fc backward", k * c + k)?;

    let params = Params { n, c, hw: 0, k, len: len_data, accumulate: accumulate_dp, inv: 0.0 };
    rec.dispatch(
        Shader::PoolFcLoss,
        "fc_backward_data",
        &params.words(),
        &[(6, &w.buffer), (9, &dlogits.buffer), (10, &dp.buffer)],
        rec.gpu.groups_for(len_data as usize),
    );
    let params = Params { n, c, hw: 0, k, len: len_params, accumulate: accumulate_params, inv: 0.0 };
    rec.dispatch(
        Shader::PoolFcLoss,
        "fc_backward_params",
        &params.words(),
        &[(5, &p.buffer), (9, &dlogits.buffer), (11, &dw.buffer), (12, &db.buffer)],
        rec.gpu.groups_for(len_params as usize),
    );
    Ok(())
}

/// Softmax cross-entropy, mean over the batch: `loss[0] = mean_n (logsumexp(z_n) - z_n[label_n])`
/// and `dlogits = (softmax(z) - onehot(labels)) / N` (overwritten). `logits` and `dlogits` are
/// `[N,K]`, `labels` N values with `classes == K`, `loss` `[1]`.
pub fn softmax_xent(
    rec: &mut Recorder,
    logits: &Tensor,
    labels: &Labels,
    loss: &Tensor,
    dlogits: &Tensor,
) -> Result<()> {
    super::owned(rec, "head softmax_xent", [logits, loss, dlogits])?;
    rec.gpu.check_owns("head softmax_xent", labels.context())?;
    let [n, k] = two_d(logits, "softmax xent: logits")?;
    if labels.len != n || labels.classes != k {
        return Err(Error::Shape(format!(
            "softmax xent: {} labels of {} classes for logits {:?}",
            labels.len,
            labels.classes,
            logits.dims()
        )));
    }
    if labels.buffer.size() < n as u64 * 4 {
        return Err(Error::Length {
            what: "softmax xent: labels buffer".into(),
            expected: n,
            got: labels.buffer.size() as usize / 4,
        });
    }
    expect(loss, &[1], "softmax xent: loss")?;
    expect(dlogits, &[n, k], "softmax xent: dlogits")?;
    distinct("softmax xent", &[("logits", logits), ("loss", loss), ("dlogits", dlogits)])?;
    let gpu = rec.gpu;
    // Every chunk scales by 1/N of the whole batch; the first chunk's loss goes to `loss`, each
    // later one's is added to it, in order.
    // Labels (4 bytes a row) fit wherever the logits (4K bytes a row) do.
    let Some(per) = split::batch_chunk(gpu, "softmax xent", n, &[logits, dlogits], &[loss])? else {
        return xent_dispatch(rec, logits, &labels.buffer, loss, dlogits, n, k, n);
    };
    for r in split::ranges(n, per) {
        let zt = split::images(rec, "in0", logits, &r, true);
        let dzt = split::images(rec, "out0", dlogits, &r, false);
        let lt = split::temp(gpu, "labels", &[r.len()]);
        rec.encoder().copy_buffer_to_buffer(&labels.buffer, r.start as u64 * 4, &lt.buffer, 0, lt.bytes());
        if r.start == 0 {
            xent_dispatch(rec, &zt, &lt.buffer, loss, &dzt, r.len(), k, n)?;
        } else {
            let part = split::temp(gpu, "loss", &[1]);
            xent_dispatch(rec, &zt, &lt.buffer, &part, &dzt, r.len(), k, n)?;
            residual::add(rec, &part, loss)?;
        }
        split::store_images(rec, &dzt, dlogits, &r);
    }
    Ok(())
}

/// One softmax_xent dispatch over `n` rows of `logits`, scaled by `1 / total`.
#[allow(clippy::too_many_arguments)]
fn xent_dispatch(
    rec: &mut Recorder,
    logits: &Tensor,
    labels: &wgpu::Buffer,
    loss: &Tensor,
    dlogits: &Tensor,
    n: usize,
    k: usize,
    total: usize,
) -> Result<()> {
    let len = fits_u32("softmax xent", n * k)?;
    let params = Params { n, c: 0, hw: 0, k, len, accumulate: false, inv: 1.0 / total as f32 };
    rec.dispatch(
        Shader::PoolFcLoss,
        "softmax_xent",
        &params.words(),
        &[(13, &logits.buffer), (14, labels), (15, &loss.buffer), (16, &dlogits.buffer)],
        [1, 1, 1],
    );
    Ok(())
}
