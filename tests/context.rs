//! The GPU context: the adapter report, the typed error for a missing adapter, and tensors.
mod common;
use common::*;
use resnet_wgpu::arch::{NetConfig, UnitKind};
use resnet_wgpu::net::ResNet;
use resnet_wgpu::{Error, Gpu, GpuOptions, Tensor};

#[test]
fn reports_the_adapter() {
    let g = gpu();
    assert!(!g.report.name.is_empty());
    assert!(g.max_binding_bytes > 0);
    // The adapter's own limits were requested, not wgpu's defaults.
    let lim = g.adapter.limits();
    assert_eq!(g.device.limits().max_storage_buffer_binding_size, lim.max_storage_buffer_binding_size);
    assert_eq!(g.device.limits().max_compute_invocations_per_workgroup, lim.max_compute_invocations_per_workgroup);
}

#[test]
fn missing_adapter_is_a_typed_helpful_error() {
    // This machine has no adapter of a backend it cannot have (Metal off Apple, DX12 off Windows).
    let backends = if cfg!(target_os = "macos") { wgpu::Backends::DX12 } else { wgpu::Backends::METAL };
    match Gpu::with_options(&GpuOptions { backends, ..GpuOptions::default() }) {
        Err(e @ Error::NoAdapter { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("mesa-vulkan-drivers"), "{msg}");
            assert!(msg.contains("GPU driver"), "{msg}");
        }
        Err(e) => panic!("expected NoAdapter, got {e}"),
        Ok(g) => panic!("expected no adapter, got {}", g.report.name),
    }
}

/// Adapters there, but none of the name asked for: the name is wrong, not the driver missing;
/// the error lists the adapters seen.
#[test]
fn an_adapter_name_that_matches_none_is_named() {
    let opts = GpuOptions { adapter_name: Some("no-such-adapter-xyzzy".into()), ..GpuOptions::from_env() };
    match Gpu::with_options(&opts) {
        Err(Error::Invalid(msg)) => {
            assert!(msg.contains("no adapter's name contains \"no-such-adapter-xyzzy\""), "{msg}");
            assert!(msg.contains(&gpu().report.name) && !msg.contains("GPU driver"), "{msg}");
        }
        Err(e) => panic!("expected Error::Invalid, got {e}"),
        Ok(g) => panic!("expected no adapter, got {}", g.report.name),
    }
}

/// No backends at all (what wgpu makes of a misspelt `WGPU_BACKEND`) is an argument error,
/// not a missing driver.
#[test]
fn no_backends_is_an_invalid_argument() {
    match Gpu::with_options(&GpuOptions { backends: wgpu::Backends::empty(), ..GpuOptions::default() }) {
        Err(Error::Invalid(msg)) => assert!(msg.contains("WGPU_BACKEND takes"), "{msg}"),
        Err(e) => panic!("expected an invalid-argument error, got {e}"),
        Ok(g) => panic!("expected no adapter, got {}", g.report.name),
    }
}

#[test]
fn tensors_round_trip_and_validate() {
    let g = gpu();
    let mut rng = Rng::new(11);
    let data = rng.data(2 * 3 * 5 * 7);
    let t = Tensor::new(g, &[2, 3, 5, 7], &data).unwrap();
    assert_eq!(t.read(g).unwrap(), data);
    assert_eq!(t.nchw("t").unwrap(), [2, 3, 5, 7]);
    assert!(matches!(Tensor::new(g, &[2, 3], &data), Err(Error::Length { .. })));
    assert!(matches!(Tensor::new(g, &[0, 3], &[]), Err(Error::Shape(_))));
    assert!(matches!(Tensor::new(g, &[1, 2, 3, 4, 5], &[0.0; 120]), Err(Error::Shape(_))));
    assert!(matches!(Tensor::new(g, &[7], &data[..7]).unwrap().nchw("v"), Err(Error::Shape(_))));
    let z = Tensor::zeros(g, &[4]).unwrap();
    assert_eq!(z.read(g).unwrap(), vec![0.0; 4]);
}

#[test]
fn tensors_past_the_binding_limit_are_allowed_up_to_the_largest_buffer() {
    let opts = GpuOptions { max_binding_bytes: Some(1024), ..GpuOptions::from_env() };
    let small = Gpu::with_options(&opts).unwrap();
    assert_eq!(small.max_binding_bytes, 1024);
    // Past the binding limit: allowed (the ops split it, see tests/binding_limit.rs).
    let data: Vec<f32> = (0..257).map(|i| i as f32).collect();
    let t = Tensor::new(&small, &[257], &data).unwrap();
    assert_eq!(t.read(&small).unwrap(), data);
    // Past the largest buffer: refused, naming the size and the limit.
    let max = small.report.max_buffer;
    let elems = (max / 4 + 1) as usize;
    match Tensor::zeros(&small, &[elems]) {
        Err(e @ Error::TooLarge { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&(elems as u64 * 4).to_string()) && msg.contains(&max.to_string()), "{msg}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn device_errors_while_allocating_are_typed_errors_naming_sizes() {
    let g = gpu();
    // A buffer the device refuses (past its largest), inside an allocation scope: an error
    // naming what and the bytes, and nothing left for the uncaptured-error handler.
    let bytes = g.report.max_buffer + 4;
    let got = g.allocation_scope("a test buffer", || {
        let _b = g.create_buffer("too large", bytes, wgpu::BufferUsages::STORAGE);
        Ok(())
    });
    match got {
        Err(e @ Error::Allocation { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("a test buffer") && msg.contains(&bytes.to_string()), "{msg}");
        }
        other => panic!("expected Error::Allocation, got {other:?}"),
    }
    g.wait().unwrap();
    assert!(g.allocation_scope("nothing", || Ok(1)).is_ok());

    // A network with a weight tensor past the largest buffer: refused, naming the tensor and
    // its bytes, before any value is drawn on the host (40000 x 40000 x 3 x 3 floats).
    let cfg = NetConfig { widths: [16, 16, 40000], ..NetConfig::cifar(20, UnitKind::PreAct, false, 10).unwrap() };
    match ResNet::new(g, &cfg, 0) {
        Err(e @ Error::TooLarge { bytes: 57_600_000_000, .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("layer3.0.conv2.weight") && msg.contains("57600000000"), "{msg}");
        }
        Err(other) => panic!("expected TooLarge, got {other:?}"),
        Ok(_) => panic!("expected TooLarge, got a network"),
    }
}

/// A scratch buffer or texture the device refuses (here one past the device's limits; on a GPU,
/// out of memory) is not kept: its error, naming it, comes back from the next wait or submission, and
/// the next request under the same key makes a new buffer instead of failing on the old one.
#[test]
fn a_refused_scratch_buffer_or_texture_is_reported_and_not_kept() {
    let g = Gpu::new().unwrap(); // its own context: its device error must not reach other tests
    let storage = wgpu::BufferUsages::STORAGE;
    let too_large = g.report.max_buffer + 4;
    let refused = g.cached_buffer("a test key", "a test scratch buffer", too_large, storage);
    assert_eq!(refused.size(), too_large);
    match g.wait() {
        Err(Error::Device(m)) => {
            assert!(m.contains("allocating a test scratch buffer failed"), "{m}");
            assert!(m.contains(&format!("({too_large} bytes of buffers requested)")), "{m}");
        }
        other => panic!("expected the refusal from wait, got {other:?}"),
    }
    let made = g.cached_buffer("a test key", "a test scratch buffer", 16, storage);
    assert_eq!(made.size(), 16, "the refused buffer was kept");
    let kept = g.cached_buffer("a test key", "a test scratch buffer", 32, storage);
    assert_eq!(kept.size(), 16, "the buffer made was not kept");
    g.wait().unwrap();

    // The same for a texture (the register path's operands): one taller than the device takes.
    let texture = |height: u32| wgpu::TextureDescriptor {
        label: Some("a test texture"),
        size: wgpu::Extent3d { width: 4, height, depth_or_array_layers: 1 },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::Rgba32Float,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    };
    let too_tall = g.device.limits().max_texture_dimension_2d + 1;
    g.cached_texture("a test key", &texture(too_tall));
    match g.wait() {
        Err(Error::Device(m)) => {
            assert!(m.contains("allocating a test texture failed"), "{m}");
            assert!(m.contains(&format!("({} bytes of buffers requested)", 4 * too_tall * 16)), "{m}");
        }
        other => panic!("expected the refusal from wait, got {other:?}"),
    }
    assert_eq!(g.cached_texture("a test key", &texture(2)).height(), 2, "the refused texture was kept");
    assert_eq!(g.cached_texture("a test key", &texture(3)).height(), 2, "the texture made was not kept");
    g.wait().unwrap();
}

/// A stream runs every buffer pushed to it, in push order, across its submissions: over more
/// than two submissions' worth, buffer `i` adds x into a sum (the first copies it) and copies
/// the sum into a snapshot of its own, `(i + 1) x`; a dropped buffer leaves its snapshot NaN,
/// and a repeated or reordered one changes the snapshots after it.
#[test]
fn a_stream_runs_its_buffers_in_order() {
    use resnet_wgpu::gpu::Stream;
    use resnet_wgpu::ops::residual;
    let g = gpu();
    let dims = [1, 3, 5, 7];
    let xs = Rng::new(31).data(dims.iter().product());
    let (x, acc) = (upload(&dims, &xs), poisoned(&dims));
    let n = 2 * Stream::CHUNK + 3;
    let snapshots: Vec<Tensor> = (0..n).map(|_| poisoned(&dims)).collect();
    let mut out = Stream::new(g, Stream::CHUNK);
    for (i, snapshot) in snapshots.iter().enumerate() {
        let mut rec = g.recorder("stream test");
        if i == 0 {
            residual::copy(&mut rec, &x, &acc).unwrap();
        } else {
            residual::add(&mut rec, &x, &acc).unwrap();
        }
        residual::copy(&mut rec, &acc, snapshot).unwrap();
        out.push(rec.finish());
    }
    out.finish().unwrap();
    for (i, snapshot) in snapshots.iter().enumerate() {
        let want: Vec<f64> = xs.iter().map(|&v| (i + 1) as f64 * v as f64).collect();
        check(&format!("stream buffer {i}"), &read(snapshot), &want, F32_TOL);
    }
}

/// A context of its own (its device error must not reach other tests) with an error pending: a
/// scratch buffer refused (returned, to record with). And x, random, and y, NaN, `[1,3,5,7]`.
fn a_refused_scratch(seed: u64) -> (Gpu, wgpu::Buffer, Tensor, Tensor) {
    let g = Gpu::new().unwrap();
    let x = Tensor::new(&g, &[1, 3, 5, 7], &Rng::new(seed).data(105)).unwrap();
    let y = Tensor::new(&g, &[1, 3, 5, 7], &[f32::NAN; 105]).unwrap();
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let refused = g.cached_buffer("a stream test key", "a refused scratch", g.report.max_buffer + 4, usage);
    (g, refused, x, y)
}

/// A stream stops at an error: a buffer recorded with a refused scratch buffer is invalid, and
/// wgpu refuses its submission, so the buffers after it would run on what it left unwritten (a
/// training step's update on the last step's gradients). Neither it nor they run.
#[test]
fn a_stream_submits_nothing_after_an_error() {
    use resnet_wgpu::gpu::Stream;
    use resnet_wgpu::ops::residual;
    let (g, refused, x, y) = a_refused_scratch(32);
    let mut out = Stream::new(&g, 1);
    let mut rec = g.recorder("a pass with a refused scratch buffer");
    rec.encoder().copy_buffer_to_buffer(&refused, 0, &x.buffer, 0, 16);
    out.push(rec.finish());
    let mut rec = g.recorder("the pass after it");
    residual::copy(&mut rec, &x, &y).unwrap();
    out.push(rec.finish());
    match out.finish() {
        Err(Error::Device(m)) => assert!(m.contains("allocating a refused scratch failed"), "{m}"),
        other => panic!("expected the refusal, got {other:?}"),
    }
    assert!(y.read(&g).unwrap().iter().all(|v| v.is_nan()), "the pass after the error ran");
}

/// The stream that finds an error pending takes it as its own and returns it, whatever other
/// streams of the context do meanwhile; another stream goes on. (Two streams that both stopped
/// on one error left it to the first to finish: the second returned Ok with its work dropped.)
#[test]
fn a_stopped_stream_returns_the_error_it_stopped_on() {
    use resnet_wgpu::gpu::Stream;
    use resnet_wgpu::ops::residual;
    let (g, _, x, y) = a_refused_scratch(33);
    let (mut stopped, mut other) = (Stream::new(&g, 1), Stream::new(&g, 1));
    stopped.push(g.recorder("the pass that meets the error").finish());
    let mut rec = g.recorder("another stream's pass");
    residual::copy(&mut rec, &x, &y).unwrap();
    other.push(rec.finish());
    other.finish().unwrap_or_else(|e| panic!("the other stream: {e}"));
    match stopped.finish() {
        Err(Error::Device(m)) => assert!(m.contains("allocating a refused scratch failed"), "{m}"),
        other => panic!("expected the error it stopped on, got {other:?}"),
    }
    assert_eq!(y.read(&g).unwrap(), x.read(&g).unwrap(), "the other stream's pass did not run");
}

#[test]
fn kept_bind_groups_are_reused_on_new_contents_and_swept() {
    use resnet_wgpu::gpu::BindCache;
    use resnet_wgpu::ops::relu;
    let g = gpu();
    let mut rng = Rng::new(41);
    let dims = [1, 3, 5, 7];
    let len = 105;
    let x = Tensor::new(g, &dims, &rng.data(len)).unwrap();
    let (y, z) = (Tensor::zeros(g, &dims).unwrap(), Tensor::zeros(g, &dims).unwrap());
    let cache = BindCache::new();
    let mut relu_into = |out: &Tensor| {
        let data = rng.data(len);
        x.write(g, &data).unwrap();
        out.write(g, &vec![f32::NAN; len]).unwrap(); // poisoned: an unwritten element fails
        let mut rec = g.recorder_cached("relu", &cache);
        relu::forward(&mut rec, &x, out).unwrap();
        rec.run().unwrap();
        let want: Vec<f32> = data.iter().map(|v| v.max(0.0)).collect();
        assert_eq!(out.read(g).unwrap(), want);
    };
    // The same dispatch on new contents of the same buffers: one bind group, used each time.
    for round in 0..3 {
        cache.sweep();
        relu_into(&y);
        assert_eq!(cache.len(), 1, "round {round}");
    }
    // Another output buffer: a bind group of its own.
    relu_into(&z);
    assert_eq!(cache.len(), 2);
    // Unused, they stay for KEEP sweeps and go at the next.
    for _ in 0..BindCache::KEEP {
        cache.sweep();
    }
    assert_eq!(cache.len(), 2);
    cache.sweep();
    assert!(cache.is_empty());
}

/// Once the device is lost (here destroyed; wgpu also loses it where a write's staging copy is
/// refused, out of memory), wgpu hands out invalid buffers without an error. Every later
/// allocation, write, read and pass of the context says the device is lost instead of
/// returning a tensor that fails at its first use, or an error about an invalid buffer.
#[test]
fn a_lost_device_is_said_by_everything_after() {
    use resnet_wgpu::net::Sgd;
    use resnet_wgpu::ops::pool_fc_loss::upload_labels;
    let g = Gpu::new().unwrap(); // its own context: the shared one must live on
    let cfg = NetConfig::cifar(8, UnitKind::PreAct, false, 3).unwrap();
    let mut net = ResNet::new(&g, &cfg, 1).unwrap();
    let x = resnet_wgpu::rng::Rng::new(2).data(2 * 3 * 5 * 5);
    let images = Tensor::new(&g, &[2, 3, 5, 5], &x).unwrap();
    let labels = upload_labels(&g, &[0, 2], 3).unwrap();
    net.train_step(&g, &images, &labels, Sgd::default()).unwrap();
    assert!(g.check_lost().is_ok());

    g.device.destroy();
    let lost = |r: resnet_wgpu::Result<()>, what: &str| match r {
        Err(Error::Device(m)) => assert!(m.contains("the device was destroyed; open a new Gpu context"), "{what}: {m}"),
        other => panic!("{what}: expected Error::Device naming the loss, got {other:?}"),
    };
    lost(g.wait(), "wait");
    lost(g.check_lost(), "check_lost");
    lost(Tensor::zeros(&g, &[4]).map(drop), "Tensor::zeros");
    lost(Tensor::new(&g, &[2], &[1.0, 2.0]).map(drop), "Tensor::new");
    lost(resnet_wgpu::tensor::HalfTensor::from_f32(&g, &[2], &[1.0, 2.0]).map(drop), "HalfTensor");
    lost(upload_labels(&g, &[1], 3).map(drop), "upload_labels");
    lost(images.write(&g, &x), "Tensor::write");
    lost(images.fill(&g, 0.5), "Tensor::fill");
    lost(labels.write(&g, &[1, 1]), "Labels::write");
    lost(images.read(&g).map(drop), "Tensor::read");
    lost(net.train_step(&g, &images, &labels, Sgd::default()).map(drop), "train_step");
    lost(net.predict(&g, &images).map(drop), "predict");
    // Still so after the first error was read.
    lost(g.wait(), "wait again");
}

/// A tensor uploaded counts once against the memory cap: wgpu stages each write in a buffer as
/// large as the data until the next submission completes, and counted with it, two 5 MiB tensors
/// (20 MiB counted) were refused under a 12 MiB cap. A half tensor of zeros uploads nothing.
#[test]
fn uploads_count_once_against_the_memory_cap() {
    use resnet_wgpu::tensor::HalfTensor;
    if !resnet_wgpu::gpu::counts_memory(gpu().report.backend) {
        return eprintln!("skipped: no memory cap on {:?}", gpu().report.backend);
    }
    let held = |g: &Gpu| g.memory().buffer_bytes as u64 + g.memory().texture_bytes as u64;
    let cap = held(&Gpu::new().unwrap()) + (12 << 20);
    let g = Gpu::with_options(&GpuOptions { memory_cap: Some(cap), ..GpuOptions::from_env() }).unwrap();
    let data = Rng::new(5).data(5 << 18);
    let first = Tensor::new(&g, &[5 << 18], &data).unwrap_or_else(|e| panic!("{e}"));
    let second = Tensor::new(&g, &[5 << 18], &data).unwrap_or_else(|e| panic!("{e}"));
    // (A readback stages its 5 MiB too.)
    drop(first);
    g.wait().unwrap();
    assert_eq!(second.read(&g).unwrap(), data);
    drop(second);
    g.wait().unwrap();
    let zeros = || HalfTensor::zeros(&g, &[5 << 19]).unwrap_or_else(|e| panic!("{e}"));
    let before = held(&g);
    let mut halves = vec![zeros()];
    assert!(held(&g) - before < 10 << 20, "a staging copy of zeros: {} bytes more", held(&g) - before);
    halves.push(zeros());
    halves.remove(0);
    g.wait().unwrap();
    assert!(halves[0].read(&g).unwrap().iter().all(|&v| v == 0.0));
}

/// An allocation that leaves a context's buffers past its memory cap is refused with
/// `Error::Allocation` naming the cap, and what it made is freed. A CPU adapter has one by
/// default, a share of the host's memory, where its buffers live: lavapipe hands out buffers
/// without touching their memory, and the kernel killed the process once the passes wrote them.
/// The cap reads wgpu's memory counts, kept on Vulkan and DX12 only: elsewhere a cap given is
/// refused, and there is no default.
#[test]
fn buffers_past_the_memory_cap_are_refused() {
    let d = gpu();
    if !resnet_wgpu::gpu::counts_memory(d.report.backend) {
        let opts = GpuOptions { memory_cap: Some(1 << 30), ..GpuOptions::from_env() };
        refused(Gpu::with_options(&opts).map(drop), "wgpu counts the memory allocated on Vulkan and DX12 only");
        assert_eq!(d.memory_cap(), None);
        return;
    }
    // What a new context holds before any tensor (wgpu's own buffers), and 12 MiB more.
    let held = |g: &Gpu| g.memory().buffer_bytes as u64 + g.memory().texture_bytes as u64;
    let cap = held(&Gpu::new().unwrap()) + (12 << 20);
    let g = Gpu::with_options(&GpuOptions { memory_cap: Some(cap), ..GpuOptions::from_env() }).unwrap();
    assert_eq!(g.memory_cap(), Some((cap, "GpuOptions::memory_cap")));
    let five_mib = [5 << 18];
    let first = Tensor::zeros(&g, &five_mib).unwrap();
    let second = Tensor::zeros(&g, &five_mib).unwrap();
    match Tensor::zeros(&g, &five_mib) {
        Err(e @ Error::Allocation { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("allocating tensor [1310720] failed"), "{msg}");
            assert!(msg.contains(&format!("past its cap of {cap} (GpuOptions::memory_cap)")), "{msg}");
        }
        other => panic!("expected Error::Allocation past the cap, got {other:?}"),
    }
    // 10 MiB held, 15 refused: the refused tensor was freed, so 1 MiB more still fits, and after
    // dropping one of the first two, 5 MiB more (11 MiB) does too.
    let _small = Tensor::zeros(&g, &[1 << 18]).unwrap();
    drop(first);
    g.wait().unwrap();
    let _third = Tensor::zeros(&g, &five_mib).unwrap();
    // A scratch buffer past the cap is not kept either, and the submission that uses it does
    // not run: the values copied from it never arrive.
    let kept = Tensor::new(&g, &[4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let scratch = g.cached_buffer("a cap test key", "a scratch past the cap", 5 << 20, usage);
    let mut rec = g.recorder("past the cap");
    rec.encoder().clear_buffer(&scratch, 0, None);
    rec.encoder().copy_buffer_to_buffer(&scratch, 0, &kept.buffer, 0, 16);
    match g.submit([rec.finish()]) {
        Err(Error::Device(m)) => assert!(m.contains("allocating a scratch past the cap failed"), "{m}"),
        other => panic!("expected the refusal from the submission, got {other:?}"),
    }
    assert_eq!(kept.read(&g).unwrap(), [1.0, 2.0, 3.0, 4.0], "the submission ran");
    drop(second);
    assert_eq!(g.cached_buffer("a cap test key", "a scratch", 16, usage).size(), 16, "the refused one was kept");

    // The default: on a CPU adapter, part of the host's memory (Linux reports it); elsewhere none.
    match (d.report.device_type, d.memory_cap()) {
        (wgpu::DeviceType::Cpu, Some((bytes, from))) => {
            let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
            let total: Option<u64> = info
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            let total = total.expect("a CPU adapter's cap comes from /proc/meminfo's MemTotal") * 1024;
            // 95% by default, of less than the host's memory where a cgroup limits the process
            // (src/gpu.rs's unit test checks that reading).
            assert!(bytes > 0 && bytes <= total / 100 * 95, "cap {bytes} of {total} bytes");
            assert!(from.contains("of the host's memory (or of the process's cgroup limit)"), "{from}");
        }
        (wgpu::DeviceType::Cpu, None) if cfg!(target_os = "linux") => panic!("no cap on a CPU adapter on Linux"),
        (wgpu::DeviceType::Cpu, None) => {} // the host's memory is read on Linux only
        (_, cap) => assert_eq!(cap, None),
    }
}

/// An op given a tensor, half tensor or labels of another context refuses it by name before
/// it records anything, also where that context was opened on other backends: another wgpu
/// instance, whose buffer numbers would name other buffers on this device.
#[test]
fn ops_refuse_another_contexts_operands() {
    use resnet_wgpu::ops::batch_norm::{self as bn, BnTensors, Epilogue};
    use resnet_wgpu::ops::{conv, pool_fc_loss as head, relu, sgd};
    use resnet_wgpu::tensor::HalfTensor;
    let g = gpu();
    let mut opts = GpuOptions::from_env();
    // A backend set of its own (one more backend that finds nothing here): its own instance.
    opts.backends ^= if cfg!(target_os = "macos") { wgpu::Backends::DX12 } else { wgpu::Backends::METAL };
    let other = Gpu::with_options(&opts).unwrap_or_else(|e| panic!("{e}"));
    let d = [1, 3, 4, 5];
    let theirs = Tensor::new(g, &d, &Rng::new(1).data(60)).unwrap();
    let up = |dims: &[usize], v: f32| Tensor::new(&other, dims, &vec![v; dims.iter().product()]).unwrap();
    let (x, y, w, c) = (up(&d, 1.0), up(&d, 0.0), up(&[3, 3, 3, 3], 0.5), up(&[3], 1.0));
    let (loss, z) = (up(&[1], 0.0), up(&[1, 3], 0.5));
    let mut rec = other.recorder("another context's operands");
    let said = "made on GPU context";
    refused(relu::forward(&mut rec, &theirs, &y), said);
    refused(conv::forward(&mut rec, &x, &theirs, &y, 1, false), said);
    refused(conv::forward(&mut rec, &theirs, &w, &y, 1, false), said);
    refused(sgd::step(&mut rec, &c, &c, &theirs, 0.1, 0.9, 0.0), said);
    let p = BnTensors { gamma: &c, beta: &c, running_mean: &c, running_var: &theirs, affine: None };
    let ep = Epilogue { add: false, relu: false };
    refused(bn::forward_train(&mut rec, &x, &y, &p, &c, &c, ep), said);
    let labels = head::upload_labels(g, &[2], 3).unwrap();
    refused(head::softmax_xent(&mut rec, &z, &labels, &loss, &z), said);
    if other.report.features.contains(wgpu::Features::SHADER_F16) {
        let (hx, hy) = (HalfTensor::zeros(g, &d).unwrap(), HalfTensor::zeros(&other, &d).unwrap());
        let hz = HalfTensor::zeros(&other, &d).unwrap();
        refused(conv::forward_f16(&mut rec, &hx, &w, &hy, 1, false), said);
        // The activations this context's, the weights (f32) the other's.
        refused(conv::forward_f16(&mut rec, &hz, &theirs, &hy, 1, false), said);
        // A unit's f16 pass with its output the other's: refused by the unit, before anything
        // is recorded (its identity shortcut's copy is a raw buffer copy, which across wgpu
        // instances names whichever buffer has that number here, and no op refuses).
        use resnet_wgpu::unit::{Unit, Workspace};
        let cfg = NetConfig { widths: [3, 3, 3], ..NetConfig::cifar(14, UnitKind::PreAct, false, 10).unwrap() };
        let spec = cfg.units().into_iter().find(|u| u.name == "layer1.1").unwrap();
        let unit = Unit::from_state(&other, &spec, &random_state(&cfg, 1)).unwrap();
        let kept = unit.allocate_f16(&other, d, &mut Workspace::default()).unwrap();
        refused(unit.forward_f16(&mut rec, &hz, &hx, &kept), &format!("layer1.1 forward_f16: {said}"));
        // A workspace shared with the other context's unit hands it this context's halves.
        let mut ws = Workspace::default();
        unit.allocate_f16(&other, d, &mut ws).unwrap();
        let mine = Unit::from_state(g, &spec, &random_state(&cfg, 1)).unwrap();
        let kept_mixed = mine.allocate_f16(g, d, &mut ws).unwrap();
        let gx = HalfTensor::zeros(g, &d).unwrap();
        let mut grec = g.recorder("a shared workspace");
        refused(
            mine.backward_f16(&mut grec, &gx, &gx, &gx, &gx, &kept_mixed),
            &format!("layer1.1 backward_f16: {said}"),
        );
        grec.run().unwrap();
    }
    // Nothing was recorded: the recording runs, and the outputs are as they were.
    rec.run().unwrap();
    assert_eq!(y.read(&other).unwrap(), vec![0.0; 60]);
    assert_eq!(c.read(&other).unwrap(), vec![1.0; 3]);
}

/// The profile holds only dispatches that ran: a recorder whose command buffer was dropped
/// unsubmitted (a stream stopped by an error, a bench item that failed) left its spans pending,
/// and they came back as 0 ms under its labels with the next run's.
#[test]
fn the_profile_leaves_out_what_never_ran() {
    use resnet_wgpu::ops::relu;
    let g = Gpu::new().unwrap(); // its own context: the profile is the context's
    if !g.has_timestamps() {
        return eprintln!("skipped: no timestamp queries on {}", g.report.name);
    }
    let x = Tensor::new(&g, &[1, 2, 3, 3], &Rng::new(9).data(18)).unwrap();
    let y = Tensor::zeros(&g, &[1, 2, 3, 3]).unwrap();
    resnet_wgpu::profile::set(&g, true);
    let mut rec = g.recorder("never submitted");
    relu::forward(&mut rec, &x, &y).unwrap();
    drop(rec.finish());
    let mut rec = g.recorder("run");
    relu::forward(&mut rec, &x, &y).unwrap();
    relu::backward(&mut rec, &x, &x, &y, false).unwrap();
    rec.run().unwrap();
    resnet_wgpu::profile::set(&g, false);
    let spans = resnet_wgpu::profile::take(&g).unwrap();
    let labels: Vec<&str> = spans.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(labels, ["forward", "backward"], "{spans:?}");
}
