//! The crate's one error type.

/// Everything a caller of this crate can get wrong, and everything the GPU can refuse.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter matched the request; the message says what to install.
    #[error(
        "no usable GPU adapter ({wanted}); adapters seen: [{seen}]. Install a GPU driver with \
         Vulkan, Metal or DX12 support, or on headless Linux Mesa's software Vulkan \
         (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers`)"
    )]
    NoAdapter { wanted: String, seen: String },

    /// The adapter refused to create a device.
    #[error("the adapter refused to create a device: {0}")]
    RequestDevice(#[from] wgpu::RequestDeviceError),

    /// Host data whose length does not match the shape it was given with.
    #[error("{what}: expected {expected} elements, got {got}")]
    Length { what: String, expected: usize, got: usize },

    /// Tensors whose shapes do not fit the operation.
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// A configuration or argument that cannot be honoured.
    #[error("invalid argument: {0}")]
    Invalid(String),

    /// A buffer larger than the adapter allows: `of` names the limit (the largest buffer, or
    /// the largest storage binding for what cannot be split into chunks that fit one).
    #[error("{what} needs {bytes} bytes, more than this adapter's {of} of {limit} bytes")]
    TooLarge { what: String, bytes: u64, limit: u64, of: &'static str },

    /// The device could not allocate what was asked: out of memory, or a buffer it refused.
    #[error("allocating {what} failed ({bytes} bytes of buffers requested): {detail}")]
    Allocation { what: String, bytes: u64, detail: String },

    /// Reading a buffer back to the host failed.
    #[error("reading a GPU buffer back failed: {0}")]
    Map(String),

    /// The device reported a validation error, ran out of memory or was lost.
    #[error("the GPU device reported an error: {0}")]
    Device(String),

    /// A pass produced a NaN or an infinity; the message names the first tensor that did.
    #[error("non-finite values: {0}")]
    NonFinite(String),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },

    /// A weights or batch file whose contents do not fit.
    #[error("{path}: {msg}")]
    Format { path: String, msg: String },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
