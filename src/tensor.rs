//! GPU tensors: a shape and an f32 storage buffer, uploaded from and read back to the host.

use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// A dense row-major f32 tensor on the GPU. Activations are 4-D NCHW, convolution weights OIHW,
/// per-channel parameters 1-D.
#[derive(Debug)]
pub struct Tensor {
    dims: Vec<usize>,
    pub buffer: wgpu::Buffer,
    /// The context that made it ([`Gpu::context`]).
    context: u64,
}

/// The element count of a tensor of `dims` (1 to 4 non-zero sizes) whose buffer, at
/// `elem_bytes` an element padded to whole 4 bytes, fits the adapter's largest buffer; else an
/// error naming `what`.
pub(crate) fn check_dims(gpu: &Gpu, dims: &[usize], elem_bytes: u64, what: &str) -> Result<usize> {
    check_size(dims, elem_bytes, gpu.report.max_buffer, what)
}

/// [`check_dims`] against a largest buffer of `max_buffer` bytes.
fn check_size(dims: &[usize], elem_bytes: u64, max_buffer: u64, what: &str) -> Result<usize> {
    if dims.is_empty() || dims.len() > 4 || dims.contains(&0) {
        return Err(Error::Shape(format!("{what}: dimensions {dims:?} must be 1 to 4 non-zero sizes")));
    }
    let overflows = || Error::Shape(format!("{what}: {dims:?} overflows"));
    let len = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(overflows)?;
    let bytes = (len as u64).checked_mul(elem_bytes).and_then(|b| b.checked_next_multiple_of(4));
    let bytes = bytes.ok_or_else(overflows)?;
    // Up to the largest buffer: the ops run tensors past one storage binding in chunks.
    if bytes > max_buffer {
        return Err(Error::TooLarge {
            what: format!("{what} {dims:?}"),
            bytes,
            limit: max_buffer,
            of: "largest buffer",
        });
    }
    Ok(len)
}

impl Tensor {
    /// Uploads `data` as a tensor of shape `dims`; the length must match.
    pub fn new(gpu: &Gpu, dims: &[usize], data: &[f32]) -> Result<Tensor> {
        let len = check_dims(gpu, dims, 4, "tensor")?;
        if data.len() != len {
            return Err(Error::Length { what: format!("tensor {dims:?}"), expected: len, got: data.len() });
        }
        Tensor::allocate(gpu, dims, len, Some(data))
    }

    /// A tensor of zeros.
    pub fn zeros(gpu: &Gpu, dims: &[usize]) -> Result<Tensor> {
        let len = check_dims(gpu, dims, 4, "tensor")?;
        Tensor::allocate(gpu, dims, len, None) // wgpu zero-initialises new buffers
    }

    /// A tensor with every element `value` (NaN poisons an output so that unwritten elements show).
    pub fn filled(gpu: &Gpu, dims: &[usize], value: f32) -> Result<Tensor> {
        let len = check_dims(gpu, dims, 4, "tensor")?;
        Tensor::new(gpu, dims, &vec![value; len])
    }

    /// The buffer of `len` elements for `dims`, with `data` queued into it, inside an
    /// allocation scope: a buffer the device refuses (out of memory) is [`Error::Allocation`]
    /// here, not a tensor whose every later use fails.
    fn allocate(gpu: &Gpu, dims: &[usize], len: usize, data: Option<&[f32]>) -> Result<Tensor> {
        gpu.allocation_scope(&format!("tensor {dims:?}"), || {
            let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
            let buffer = gpu.create_buffer("tensor", (len as u64 * 4).max(4), usage);
            if let Some(data) = data {
                gpu.queue.write_buffer(&buffer, 0, bytemuck::cast_slice(data));
            }
            Ok(Tensor { dims: dims.to_vec(), buffer, context: gpu.context() })
        })
    }

    /// A tensor of `dims` over an existing buffer of `gpu`'s, of at least that size (the ops'
    /// temporaries).
    pub(crate) fn from_buffer(gpu: &Gpu, dims: &[usize], buffer: wgpu::Buffer) -> Tensor {
        Tensor { dims: dims.to_vec(), buffer, context: gpu.context() }
    }

    /// The number of the context that made it ([`Gpu::context`]).
    pub fn context(&self) -> u64 {
        self.context
    }

    /// The shape.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Never true: tensors have at least one element.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.len() as u64 * 4
    }

    /// The shape as `[n, c, h, w]`, or a shape error naming `what`.
    pub fn nchw(&self, what: impl std::fmt::Display) -> Result<[usize; 4]> {
        match self.dims[..] {
            [n, c, h, w] => Ok([n, c, h, w]),
            _ => Err(Error::Shape(format!("{what} must be 4-D NCHW, got {:?}", self.dims))),
        }
    }

    /// Overwrites the contents from the host.
    pub fn write(&self, gpu: &Gpu, data: &[f32]) -> Result<()> {
        gpu.check_owns("tensor", self.context)?;
        if data.len() != self.len() {
            return Err(Error::Length {
                what: format!("tensor {:?}", self.dims),
                expected: self.len(),
                got: data.len(),
            });
        }
        gpu.queue.write_buffer(&self.buffer, 0, bytemuck::cast_slice(data));
        // A staging copy the device refuses loses it (wgpu): said here, not at the next use.
        gpu.check_lost()
    }

    /// Sets every element to `value`.
    pub fn fill(&self, gpu: &Gpu, value: f32) -> Result<()> {
        gpu.check_owns("tensor", self.context)?;
        gpu.queue.write_buffer(&self.buffer, 0, bytemuck::cast_slice(&vec![value; self.len()]));
        gpu.check_lost()
    }

    /// Copies the contents back to the host (waits for all work queued before it).
    pub fn read(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        gpu.check_owns("tensor", self.context)?;
        read_buffer(gpu, &self.buffer, self.bytes()).map(|b| bytemuck::pod_collect_to_vec(&b))
    }
}

/// Copies `bytes` bytes of `buffer` to the host through a staging buffer.
pub fn read_buffer(gpu: &Gpu, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
    let staging = gpu.allocation_scope(&format!("a readback of {bytes} bytes"), || {
        let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        Ok(gpu.create_buffer("readback", bytes, usage))
    })?;
    let mut enc = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("readback") });
    enc.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
    gpu.submit([enc.finish()])?;
    let (tx, rx) = futures_intrusive::channel::shared::oneshot_channel();
    staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    gpu.wait()?; // runs the map callback
    match pollster::block_on(rx.receive()) {
        Some(Ok(())) => {}
        Some(Err(e)) => return Err(Error::Map(e.to_string())),
        None => return Err(Error::Map("the map callback never ran".into())),
    }
    let out = staging.slice(..).get_mapped_range().map_err(|e| Error::Map(e.to_string()))?.to_vec();
    staging.unmap();
    Ok(out)
}

/// A dense row-major tensor stored as IEEE half floats (the f16 convolution path,
/// [`crate::ops::conv::forward_f16`]). The buffer holds `len` halves, padded to whole 4 bytes.
/// A clone is another handle on the same buffer.
#[derive(Clone, Debug)]
pub struct HalfTensor {
    dims: Vec<usize>,
    pub buffer: wgpu::Buffer,
    /// The context that made it ([`Gpu::context`]).
    context: u64,
}

impl HalfTensor {
    /// Uploads `data` as a half tensor of shape `dims`.
    pub fn new(gpu: &Gpu, dims: &[usize], data: &[half::f16]) -> Result<HalfTensor> {
        let len = check_dims(gpu, dims, 2, "half tensor")?;
        if data.len() != len {
            return Err(Error::Length { what: format!("half tensor {dims:?}"), expected: len, got: data.len() });
        }
        HalfTensor::allocate(gpu, dims, len, Some(data))
    }

    /// As [`Tensor`]'s: the buffer inside an allocation scope, `data` queued into it (none: the
    /// zeros wgpu fills a new buffer with, and no staging copy as large as the tensor).
    fn allocate(gpu: &Gpu, dims: &[usize], len: usize, data: Option<&[half::f16]>) -> Result<HalfTensor> {
        gpu.allocation_scope(&format!("half tensor {dims:?}"), || {
            let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
            let buffer = gpu.create_buffer("half tensor", (len as u64 * 2).div_ceil(4) * 4, usage);
            let t = HalfTensor { dims: dims.to_vec(), buffer, context: gpu.context() };
            if let Some(data) = data {
                t.upload(gpu, data);
            }
            Ok(t)
        })
    }

    /// Overwrites the contents with `data` rounded to the nearest half (queued: it lands
    /// before the next submission's work).
    pub fn write(&self, gpu: &Gpu, data: &[f32]) -> Result<()> {
        gpu.check_owns("half tensor", self.context)?;
        if data.len() != self.len() {
            return Err(Error::Length {
                what: format!("half tensor {:?}", self.dims),
                expected: self.len(),
                got: data.len(),
            });
        }
        let h: Vec<half::f16> = data.iter().map(|&v| half::f16::from_f32(v)).collect();
        self.upload(gpu, &h);
        gpu.check_lost() // as `Tensor::write`'s
    }

    /// Queues `data` (of this tensor's length) into the buffer, padded to whole 4 bytes.
    fn upload(&self, gpu: &Gpu, data: &[half::f16]) {
        let mut bytes: Vec<u8> = bytemuck::cast_slice(data).to_vec();
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        gpu.queue.write_buffer(&self.buffer, 0, &bytes);
    }

    /// A half tensor of shape `dims` over `gpu`'s `buffer` (at least `dims`' halves, padded to
    /// whole 4 bytes).
    pub(crate) fn from_buffer(gpu: &Gpu, dims: &[usize], buffer: wgpu::Buffer) -> HalfTensor {
        HalfTensor { dims: dims.to_vec(), buffer, context: gpu.context() }
    }

    /// The number of the context that made it ([`Gpu::context`]).
    pub fn context(&self) -> u64 {
        self.context
    }

    /// A half tensor of zeros.
    pub fn zeros(gpu: &Gpu, dims: &[usize]) -> Result<HalfTensor> {
        let len = check_dims(gpu, dims, 2, "half tensor")?;
        HalfTensor::allocate(gpu, dims, len, None)
    }

    /// Uploads f32 data rounded to the nearest half.
    pub fn from_f32(gpu: &Gpu, dims: &[usize], data: &[f32]) -> Result<HalfTensor> {
        let h: Vec<half::f16> = data.iter().map(|&v| half::f16::from_f32(v)).collect();
        HalfTensor::new(gpu, dims, &h)
    }

    /// The shape.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Never true: tensors have at least one element.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The shape as `[n, c, h, w]`, or a shape error naming `what`.
    pub fn nchw(&self, what: impl std::fmt::Display) -> Result<[usize; 4]> {
        match self.dims[..] {
            [n, c, h, w] => Ok([n, c, h, w]),
            _ => Err(Error::Shape(format!("{what} must be 4-D NCHW, got {:?}", self.dims))),
        }
    }

    /// Copies the contents back to the host, widened to f32 (waits for all work queued before it).
    pub fn read(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        gpu.check_owns("half tensor", self.context)?;
        let bytes = read_buffer(gpu, &self.buffer, (self.len() as u64 * 2).div_ceil(4) * 4)?;
        let h: Vec<half::f16> = bytemuck::pod_collect_to_vec(&bytes[..self.len() * 2]);
        Ok(h.iter().map(|v| v.to_f32()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A half tensor's buffer holds 2 bytes an element: it may be twice as long as an f32 one.
    #[test]
    fn sizes_count_the_element_bytes_against_the_largest_buffer() {
        let max = 1024;
        assert_eq!(check_size(&[256], 4, max, "t").unwrap(), 256);
        assert_eq!(check_size(&[512], 2, max, "t").unwrap(), 512);
        assert_eq!(check_size(&[3, 5], 2, 32, "t").unwrap(), 15, "15 halves pad to 32 bytes");
        match check_size(&[257], 4, max, "t") {
            Err(Error::TooLarge { bytes: 1028, limit: 1024, .. }) => {}
            other => panic!("expected TooLarge for 257 floats, got {other:?}"),
        }
        match check_size(&[513], 2, max, "t") {
            Err(Error::TooLarge { bytes: 1028, limit: 1024, .. }) => {}
            other => panic!("expected TooLarge for 513 halves, got {other:?}"),
        }
        assert!(matches!(check_size(&[usize::MAX, 2], 2, max, "t"), Err(Error::Shape(_))));
        assert!(matches!(check_size(&[usize::MAX / 2], 4, max, "t"), Err(Error::Shape(_))));
        assert!(matches!(check_size(&[usize::MAX / 2], 2, max, "t"), Err(Error::Shape(_))), "padding overflows");
    }
}
