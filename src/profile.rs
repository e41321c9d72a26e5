//! Per-dispatch GPU times (a profiling aid for the benchmark's `--profile`).
//!
//! With profiling on ([`set`]) and timestamp queries on the adapter, each dispatch a
//! [`Recorder`](crate::gpu::Recorder) records gets a compute pass of its own, with timestamps
//! at its start and end; [`take`] returns each dispatch's label and GPU milliseconds once the
//! recorded work has run. Passes of one dispatch each add barriers the normal path (consecutive
//! dispatches in one shared pass) does not have, so the spans add up to a little more than a
//! run takes.

use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::gpu::Gpu;
use crate::tensor::read_buffer;

/// One timed dispatch: its label (the kernel, and for convolutions the op, tile configuration
/// and variant) and its GPU milliseconds.
#[derive(Clone, Debug)]
pub struct Span {
    pub label: String,
    pub ms: f64,
}

/// The most dispatches one recorder times (later ones run untimed).
const SPANS: usize = 512;

#[derive(Default)]
struct State {
    on: bool,
    /// Each finished recorder's resolved timestamps and labels, until [`take`].
    pending: Vec<(wgpu::Buffer, Vec<String>)>,
}

fn state(gpu: &Gpu) -> Arc<Mutex<State>> {
    gpu.cached("profile", || Arc::new(Mutex::new(State::default())))
}

/// Turns per-dispatch timing on or off for the recorders this context makes from now on. It
/// stays off where the adapter has no timestamp queries.
pub fn set(gpu: &Gpu, on: bool) {
    state(gpu).lock().unwrap_or_else(|p| p.into_inner()).on = on && gpu.has_timestamps();
}

/// The dispatches timed since the last call, in recording order. Call it after the recorded
/// work has been submitted; a recorder's whose work never ran (its buffer dropped, or its
/// submission refused) left no timestamps, and none of its dispatches are returned.
pub fn take(gpu: &Gpu) -> Result<Vec<Span>> {
    let pending = std::mem::take(&mut state(gpu).lock().unwrap_or_else(|p| p.into_inner()).pending);
    let period_ns = gpu.queue.get_timestamp_period() as f64;
    let mut spans = Vec::new();
    for (buffer, labels) in pending {
        let raw = read_buffer(gpu, &buffer, buffer.size())?;
        for (label, c) in labels.into_iter().zip(raw.chunks_exact(2 * wgpu::QUERY_SIZE as usize)) {
            let t: [u64; 2] = bytemuck::pod_read_unaligned(c);
            // The resolve's buffer starts as zeros: a pair never written is a pass never run.
            if t != [0, 0] {
                spans.push(Span { label, ms: t[1].saturating_sub(t[0]) as f64 * period_ns * 1e-6 });
            }
        }
    }
    Ok(spans)
}

/// A recorder's timestamps: two per dispatch.
pub(crate) struct Spans {
    set: wgpu::QuerySet,
    labels: Vec<String>,
}

impl Spans {
    /// Spans for a new recorder, where profiling is on.
    pub(crate) fn begin(gpu: &Gpu) -> Option<Spans> {
        if !state(gpu).lock().unwrap_or_else(|p| p.into_inner()).on {
            return None;
        }
        let set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * SPANS as u32,
        });
        Some(Spans { set, labels: Vec::new() })
    }

    /// A compute pass for one dispatch labelled `label`, stamped at its start and end; `None`
    /// once this recorder's spans are used up.
    pub(crate) fn pass<'e>(
        &mut self,
        encoder: &'e mut wgpu::CommandEncoder,
        label: &str,
    ) -> Option<wgpu::ComputePass<'e>> {
        if self.labels.len() == SPANS {
            return None;
        }
        let i = 2 * self.labels.len() as u32;
        self.labels.push(label.to_string());
        Some(encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: &self.set,
                beginning_of_pass_write_index: Some(i),
                end_of_pass_write_index: Some(i + 1),
            }),
        }))
    }

    /// Resolves the timestamps at the end of the recorder's commands and leaves them for
    /// [`take`].
    pub(crate) fn finish(self, gpu: &Gpu, encoder: &mut wgpu::CommandEncoder) {
        if self.labels.is_empty() {
            return;
        }
        let n = 2 * self.labels.len() as u32;
        let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile resolved"),
            size: u64::from(n) * wgpu::QUERY_SIZE as u64,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        encoder.resolve_query_set(&self.set, 0..n, &buffer, 0);
        state(gpu).lock().unwrap_or_else(|p| p.into_inner()).pending.push((buffer, self.labels));
    }
}
