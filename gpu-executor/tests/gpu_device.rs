//! The GPU code without and with a GPU.
//!
//! Everywhere (CI has no GPU): the CUDA kernel compiles with the NVRTC that
//! set-up installs, the probe says why there is no GPU without panicking,
//! and ONNX Runtime's CPU library refuses the CUDA provider with its reason.
//!
//! With `MMGATE_GPU_TESTS=1` on a host with an NVIDIA GPU
//! (`load-tests/gpu-check.sh`): a stream per instance, the memfd tensor pool
//! registered with the driver, asynchronous copies out of its slots, and the
//! kernel's output equal to the CPU normalisation bit for bit. Elsewhere
//! those tests pass after printing why they did not run.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use config::{ColorOrder, Layout, Limits, ModelSpec};
use gpu_executor::cuda::{self, DeviceInput, HostSample};
use shm::{PoolLayout, SharedTensors, SlotRef};

/// The device, when the GPU tests are asked for; `None` (with the reason
/// printed) otherwise. Asked for but missing is a failure.
fn gpu() -> Option<cuda::Device> {
    if std::env::var("MMGATE_GPU_TESTS").as_deref() != Ok("1") {
        println!(
            "skipped: MMGATE_GPU_TESTS is not 1 (needs an NVIDIA GPU; see load-tests/gpu-check.sh)"
        );
        return None;
    }
    Some(cuda::probe(0).expect("MMGATE_GPU_TESTS=1 but no usable GPU"))
}

/// NVRTC from set-up's `.deps/nvrtc` when it is there, else whatever the
/// loader finds (a CUDA install on a GPU host).
fn load_nvrtc() {
    let dir = common::root().join(".deps/nvrtc");
    if dir.join("libnvrtc.so.13").is_file() {
        cuda::preload_nvrtc(&dir).unwrap();
    }
}

#[test]
fn the_normalisation_kernel_compiles_to_ptx() {
    let dir = common::root().join(".deps/nvrtc");
    assert!(
        dir.join("libnvrtc.so.13").is_file(),
        "{} is missing: run `bash scripts/setup.sh test` (make test does)",
        dir.display()
    );
    cuda::preload_nvrtc(&dir).unwrap();
    assert!(cuda::nvrtc_present());
    let ptx = cuda::compile_normalize_kernel("compute_75")
        .unwrap()
        .to_src();
    assert!(ptx.contains(".entry mmgate_normalize_u8"), "{ptx}");
    // No fused multiply-add: the device must round as the CPU does.
    assert!(!ptx.contains("fma."), "{ptx}");
    assert!(ptx.contains("div.rn.f32"), "{ptx}");
}

#[test]
fn the_probe_names_what_is_missing_and_never_panics() {
    match cuda::probe(0) {
        Ok(d) => println!("GPU found: {} sm_{}{}", d.name, d.sm.0, d.sm.1),
        Err(why) => {
            println!("no GPU: {why}");
            if !cuda::driver_present() {
                assert!(why.contains("libcuda.so.1"), "{why}");
            }
        }
    }
    if cuda::driver_present() {
        // A device the driver does not have is a reason, not a panic.
        let why = cuda::probe(999).unwrap_err();
        assert!(why.contains("999"), "{why}");
    }
}

#[test]
fn onnx_runtimes_cpu_library_refuses_the_gpu_providers_with_its_reason() {
    let env = gpu_executor::onnxruntime::environment(&common::ort_library()).unwrap();
    for backend in [
        config::Backend::OnnxruntimeCuda,
        config::Backend::OnnxruntimeTensorrt,
    ] {
        let options = gpu_executor::gpu::ProviderOptions {
            model: "m".into(),
            backend,
            device_id: 0,
            memory_limit: None,
            fp16: false,
            engine_cache: None,
            profile: None,
        };
        let builder = ort::session::Session::builder(&env).unwrap();
        let Err(err) = options.register_on(builder, None) else {
            panic!("the CPU library registered {}", backend.as_str());
        };
        let err = err.to_string();
        println!("{err}");
        assert!(
            err.contains(backend.as_str())
                && err.contains("cannot register it")
                && err.contains("not enabled in this build"),
            "{err}"
        );
    }
}

fn slot(i: u32) -> SlotRef {
    SlotRef {
        model: 0,
        slot: i,
        generation: 1,
    }
}

#[test]
fn each_instance_gets_its_own_stream() {
    let Some(device) = gpu() else { return };
    let a = device.new_stream().unwrap();
    let b = device.new_stream().unwrap();
    let (ra, rb) = (cuda::raw_stream(&a), cuda::raw_stream(&b));
    assert!(!ra.is_null() && !rb.is_null(), "never the null stream");
    assert_ne!(ra, rb);
}

#[test]
fn slots_of_the_registered_pool_are_copied_to_the_device_asynchronously() {
    let Some(device) = gpu() else { return };
    let spec = common::open_nsfw();
    let n = spec.input.elements();
    let pool = SharedTensors::create(PoolLayout::new(&[(4, n * 4)])).unwrap();
    let pinned = cuda::Registered::new(&device, pool.mapped_range()).unwrap();
    assert_eq!(pinned.len(), pool.mapped_range().1);
    // The driver holds the memfd pages page-locked: what makes the copies
    // below DMA that does not wait for the CPU.
    let flags = pinned.flags().unwrap();
    println!("registered {} bytes, flags {flags:#x}", pinned.len());
    for i in 0..4 {
        pool.stamp(slot(i)).unwrap();
        pool.write_f32(slot(i), |s| {
            for (k, v) in s.iter_mut().enumerate() {
                *v = (k % 1000) as f32 + i as f32 * 0.25;
            }
        })
        .unwrap();
    }
    let stream = device.new_stream().unwrap();
    let mut input = DeviceInput::new(&device, stream.clone(), 4, &spec.input, None).unwrap();
    let slots: Vec<_> = (0..4).map(slot).collect();
    let (queued, back) = pool.read_many_f32(&slots, |all| {
        let samples: Vec<_> = all
            .into_iter()
            .map(|s| HostSample::F32(s.unwrap()))
            .collect();
        let t = Instant::now();
        input.assemble(&samples).unwrap();
        let queued = t.elapsed();
        stream.synchronize().unwrap();
        (queued, input.read_back(4).unwrap())
    });
    println!("4 × {} KiB queued in {queued:?}", n * 4 / 1024);
    let want: Vec<f32> = pool.read_many_f32(&slots, |all| {
        all.into_iter().flat_map(|s| s.unwrap().to_vec()).collect()
    });
    assert_eq!(back, want);
    drop(pinned);
}

/// Real photos' pixels in uint8 slots, normalised on the device, equal the
/// CPU normalisation of the same bytes bit for bit, in both layouts and
/// channel orders.
#[test]
fn the_kernel_normalises_as_the_cpu_does() {
    let Some(device) = gpu() else { return };
    load_nvrtc();
    let base = common::open_nsfw();
    let mut nchw = base.clone();
    nchw.input.layout = Layout::Nchw;
    nchw.preprocess.color_order = ColorOrder::Rgb;
    nchw.preprocess.scale = 1.0 / 255.0;
    nchw.preprocess.mean = [0.485, 0.456, 0.406];
    nchw.preprocess.std = [0.229, 0.224, 0.225];
    let photos = [
        "coffee.jpg",
        "chelsea.png",
        "camera.png",
        "astronaut_1536.jpg",
    ];
    for spec in [&base, &nchw] {
        check_kernel(&device, spec, &photos);
    }
}

fn check_kernel(device: &cuda::Device, spec: &ModelSpec, photos: &[&str]) {
    let n = spec.input.elements();
    let pool = SharedTensors::create(PoolLayout::new(&[(photos.len() as u32, n)])).unwrap();
    let _pinned = cuda::Registered::new(device, pool.mapped_range()).unwrap();
    for (i, name) in photos.iter().enumerate() {
        let data = std::fs::read(common::root().join("tests/fixtures/images").join(name)).unwrap();
        let s = slot(i as u32);
        pool.stamp(s).unwrap();
        pool.write_u8(s, |b| {
            let far = Instant::now() + Duration::from_secs(30);
            preprocess_worker::preprocess(&data, spec, &Limits::default(), far, b).unwrap();
        })
        .unwrap();
    }
    let stream: Arc<_> = device.new_stream().unwrap();
    let mut input = DeviceInput::new(
        device,
        stream.clone(),
        photos.len(),
        &spec.input,
        Some(&spec.preprocess),
    )
    .unwrap();
    let slots: Vec<_> = (0..photos.len() as u32).map(slot).collect();
    let (got, want) = pool.read_many_u8(&slots, |all| {
        let bytes: Vec<&[u8]> = all.into_iter().map(|s| s.unwrap()).collect();
        let samples: Vec<_> = bytes.iter().map(|b| HostSample::U8(b)).collect();
        input.assemble(&samples).unwrap();
        stream.synchronize().unwrap();
        let got = input.read_back(samples.len()).unwrap();
        let mut want = vec![0f32; samples.len() * n];
        for (b, out) in bytes.iter().zip(want.chunks_exact_mut(n)) {
            preprocess_worker::normalize_rgb8(b, &spec.input, &spec.preprocess, out);
        }
        (got, want)
    });
    let differ = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    println!(
        "{:?}: {differ} of {} values differ",
        spec.input.layout,
        want.len()
    );
    assert_eq!(differ, 0);
}
