//! A small seeded generator (SplitMix64): test data, He initialisation, data augmentation.
//! Deterministic across platforms, so a seed names the same numbers everywhere.

/// SplitMix64.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// An integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// `len` values uniform in [-1, 1), none exactly zero: test data.
    pub fn data(&mut self, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                loop {
                    let v = self.range(-1.0, 1.0) as f32;
                    if v != 0.0 {
                        break v;
                    }
                }
            })
            .collect()
    }
}

/// A 32-bit integer hash (PCG's output permutation), the same on the host and in WGSL
/// (`shaders/mix.wgsl`): dropout masks are a pure function of a seed and an element index.
pub fn pcg_hash(v: u32) -> u32 {
    let state = v.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

/// Dropout drops element `i` when its hash falls below `rate * 2^32`.
pub fn dropout_threshold(rate: f32) -> u32 {
    (rate as f64 * 4_294_967_296.0).clamp(0.0, 4_294_967_295.0) as u32
}

/// Whether dropout with mask `seed` keeps element `i` (threshold from [`dropout_threshold`]).
pub fn dropout_keep(seed: u32, i: u32, threshold: u32) -> bool {
    pcg_hash(seed ^ pcg_hash(i)) >= threshold
}

/// The dropout seed of unit `unit` at training step `step` (BN's `num_batches_tracked` before
/// the step), so that the GPU and the reference draw the same masks.
pub fn dropout_seed(step: u64, unit: usize) -> u32 {
    pcg_hash(pcg_hash(step as u32 ^ ((step >> 32) as u32).rotate_left(16)) ^ unit as u32)
}
