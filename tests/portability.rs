//! Every kind of module the crate builds translates for each backend wgpu would run it on:
//! SPIR-V (Vulkan), MSL (Metal) and HLSL (DX12), by naga, wgpu's own translator, as those
//! backends call it. The test adapters here are all Vulkan, and build only the modules their
//! features pick (a CPU adapter never builds the GPUs' batch-norm kernels or the 16x16
//! cooperative-matrix convolutions), so this is the one check of the rest, and of Metal and DX12
//! at all. It needs no adapter: `resnet_wgpu::gpu::module_sources` lists the modules.

use naga::back::{PipelineConstants, hlsl, msl, pipeline_constants, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

/// The module's translations, once per set of its `override` values (conv.wgsl's `PRE`).
fn translate(wgsl: &str) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(wgsl).map_err(|e| e.emit_to_string(wgsl))?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .map_err(|e| format!("validation: {e:?}"))?;
    let mut constant_sets = vec![PipelineConstants::default()];
    for (_, o) in module.overrides.iter() {
        let name = o.name.clone().ok_or("an override without a name")?;
        constant_sets = constant_sets
            .into_iter()
            .flat_map(|c| {
                [0.0, 1.0].map(|v| {
                    let mut c = c.clone();
                    c.insert(name.clone(), v);
                    c
                })
            })
            .collect();
    }
    // wgpu offers cooperative matrices on Vulkan and Metal, not on DX12.
    let coop = wgsl.contains("enable wgpu_cooperative_matrix");
    for constants in &constant_sets {
        let (module, info) = pipeline_constants::process_overrides(&module, &info, None, constants)
            .map_err(|e| format!("overrides {constants:?}: {e:?}"))?;
        let spv_options = spv::Options { lang_version: (1, 3), ..Default::default() };
        spv::write_vec(&module, &info, &spv_options, None).map_err(|e| format!("SPIR-V: {e:?}"))?;
        // MSL 2.4 (macOS 12, iOS 15): past the 2.3 that wgpu's Metal backend asks of cooperative
        // matrices.
        let msl_options = msl::Options { lang_version: (2, 4), fake_missing_bindings: true, ..Default::default() };
        msl::write_string(&module, &info, &msl_options, &msl::PipelineOptions::default())
            .map_err(|e| format!("MSL: {e:?}"))?;
        if !coop {
            // Shader model 6.2: wgpu's DX12 backend offers f16 from it on.
            let hlsl_options = hlsl::Options {
                shader_model: hlsl::ShaderModel::V6_2,
                fake_missing_bindings: true,
                ..Default::default()
            };
            let mut out = String::new();
            hlsl::Writer::new(&mut out, &hlsl_options, &hlsl::PipelineOptions { entry_point: None })
                .write(&module, &info, None)
                .map_err(|e| format!("HLSL: {e:?}"))?;
        }
    }
    Ok(())
}

#[test]
fn every_module_translates_for_vulkan_metal_and_dx12() {
    let sources = resnet_wgpu::gpu::module_sources();
    let count = |s: &str| sources.iter().filter(|(label, _)| label.contains(s)).count();
    // The list covers each family: 16 shaders (some in two subgroup variants), the tiled
    // template's configurations on each path, Winograd's.
    let coop = sources.iter().filter(|(_, w)| w.contains("enable wgpu_cooperative_matrix")).count();
    println!(
        "{} modules: {} tiled ({coop} on cooperative matrices), {} Winograd",
        sources.len(),
        count("conv.tiled"),
        count("conv.winograd")
    );
    assert!(count("conv.tiled") >= 60 && coop >= 10, "too few modules listed");
    // Each Winograd configuration in its three pairs of storage types (f32; f16 activations with
    // f32 or f16 weights).
    let configs = resnet_wgpu::ops::conv::winograd_names().len();
    assert_eq!(count("conv.winograd"), 3 * configs, "Winograd modules for {configs} configurations");
    // Every file in shaders/ is in some module (its head, up to the first blank line).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for entry in std::fs::read_dir(&dir).expect("shaders/") {
        let path = entry.expect("a directory entry").path();
        let text = std::fs::read_to_string(&path).expect("a WGSL file");
        let head = text.split("\n\n").next().unwrap_or(&text);
        assert!(sources.iter().any(|(_, w)| w.contains(head)), "{} is in no listed module", path.display());
    }
    let failures: Vec<String> =
        sources.iter().filter_map(|(label, wgsl)| translate(wgsl).err().map(|e| format!("{label}: {e}"))).collect();
    assert!(failures.is_empty(), "{} of {} modules fail:\n{}", failures.len(), sources.len(), failures.join("\n"));
}
