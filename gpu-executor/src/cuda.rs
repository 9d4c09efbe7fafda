//! The CUDA driver, loaded at run time through `cudarc`: the probe that
//! decides whether a GPU backend can run, one non-default stream per engine
//! instance, registration of the shared tensor pool with the driver, and the
//! NVRTC kernel that normalises uint8 slots on the device.
//!
//! The code is always compiled and only called when a model asks for a GPU
//! backend. Every driver call is preceded by [`driver_present`]: cudarc
//! panics when it must load a library that is not there.
//!
//! This is the executor's only `unsafe` outside `shm`: raw driver calls on
//! memory that `shm` owns, and the stream handle given to ONNX Runtime. Each
//! block says why it holds.
#![allow(unsafe_code)]

use std::path::Path;
use std::sync::Arc;

use config::{ColorOrder, InputSpec, Layout, PreprocessSpec};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg, sys,
};

/// A usable CUDA device, as the probe found it.
#[derive(Debug, Clone)]
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub ordinal: u32,
    /// E.g. "NVIDIA H200".
    pub name: String,
    /// Compute capability, e.g. (9, 0).
    pub sm: (i32, i32),
    pub total_bytes: usize,
}

impl Device {
    /// Device memory in use now (all processes), bytes.
    pub fn used_bytes(&self) -> Option<u64> {
        let (free, total) = self.ctx.mem_get_info().ok()?;
        Some(total.saturating_sub(free) as u64)
    }

    /// A new non-blocking stream (never the null stream, which ONNX Runtime
    /// refuses as a user compute stream).
    pub fn new_stream(&self) -> Result<Arc<CudaStream>, String> {
        self.ctx
            .new_stream()
            .map_err(|e| format!("cannot create a CUDA stream: {e}"))
    }
}

/// Whether the CUDA driver library (libcuda.so.1) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver's candidate names and drops
    // the handle; no symbol is called.
    unsafe { sys::is_culib_present() }
}

/// Whether the NVRTC library can be loaded (the uint8 kernel's compiler).
pub fn nvrtc_present() -> bool {
    // SAFETY: as in `driver_present`, a dlopen attempt only.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The first two probe steps, in order: the driver library is there, and
/// device `ordinal` exists. The error is the reason, one line.
pub fn probe(ordinal: u32) -> Result<Device, String> {
    if !driver_present() {
        return Err(
            "the CUDA driver library (libcuda.so.1) is not installed: no NVIDIA driver on this host"
                .into(),
        );
    }
    let count = CudaContext::device_count()
        .map_err(|e| format!("the CUDA driver is present but cannot start: {e}"))?;
    if count <= 0 {
        return Err("the CUDA driver is present but sees no device".into());
    }
    if ordinal as i32 >= count {
        return Err(format!(
            "gpu.device is {ordinal}, but the driver sees {count} device(s)"
        ));
    }
    let ctx = CudaContext::new(ordinal as usize)
        .map_err(|e| format!("cannot open CUDA device {ordinal}: {e}"))?;
    let name = ctx
        .name()
        .unwrap_or_else(|_| format!("CUDA device {ordinal}"));
    let sm = ctx.compute_capability().unwrap_or((0, 0));
    let total_bytes = ctx.total_mem().unwrap_or(0);
    Ok(Device {
        ctx,
        ordinal,
        name,
        sm,
        total_bytes,
    })
}

/// The raw handle of `stream`, for ONNX Runtime's `user_compute_stream`.
/// The caller keeps `stream` alive as long as any session that uses it.
pub fn raw_stream(stream: &CudaStream) -> *mut () {
    stream.cu_stream() as *mut ()
}

/// A host range registered with the driver (page-locked), so copies from
/// it are asynchronous DMA; unregistered on drop.
#[derive(Debug)]
pub struct Registered {
    ptr: usize,
    len: usize,
    _ctx: Arc<CudaContext>,
}

impl Registered {
    /// Registers `range` (the tensor pool's mapping, as `shm` gives it) in
    /// `device`'s context, once for the process's lifetime.
    pub fn new(device: &Device, range: (*const u8, usize)) -> Result<Self, String> {
        let (ptr, len) = range;
        device
            .ctx
            .bind_to_thread()
            .map_err(|e| format!("cannot bind the CUDA context: {e}"))?;
        // SAFETY: `range` is a live MAP_SHARED mapping owned by `shm` for the
        // life of the process (the executor never unmaps, truncates or punches
        // holes in the tensor pool), so pinning its pages is sound; the
        // context is kept alive by `_ctx` until the range is unregistered.
        unsafe {
            sys::cuMemHostRegister_v2(
                ptr as *mut std::ffi::c_void,
                len,
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        }
        .result()
        .map_err(|e| format!("cannot register {len} bytes of the tensor pool: {e}"))?;
        Ok(Self {
            ptr: ptr as usize,
            len,
            _ctx: device.ctx.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether this registration is of exactly `range`.
    pub fn covers(&self, range: (*const u8, usize)) -> bool {
        (range.0 as usize, range.1) == (self.ptr, self.len)
    }

    /// The driver's flags for the registered range: an error unless the
    /// driver really holds it page-locked.
    pub fn flags(&self) -> Result<u32, String> {
        let mut flags = 0u32;
        // SAFETY: `ptr` is this registration's live host range; the driver
        // only writes the flags word.
        unsafe { sys::cuMemHostGetFlags(&mut flags, self.ptr as *mut std::ffi::c_void) }
            .result()
            .map_err(|e| format!("the range is not registered: {e}"))?;
        Ok(flags)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        // SAFETY: `ptr` was registered by `new` in this context, which is
        // still alive; no copy from it is in flight once its owner drops it.
        let _ = unsafe { sys::cuMemHostUnregister(self.ptr as *mut std::ffi::c_void) };
    }
}

/// The uint8 normalisation kernel's source (entry `mmgate_normalize_u8`).
pub const NORMALIZE_KERNEL: &str = include_str!("cuda/normalize.cu");

/// Loads NVRTC from `dir` (as set-up unpacks it: `libnvrtc.so.13` and the
/// `libnvrtc-builtins.so.13.0` it opens by name) for the rest of the
/// process, so that later loads by name find it although `dir` is not on
/// the loader's path.
pub fn preload_nvrtc(dir: &Path) -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    for name in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"] {
        let path = dir.join(name);
        // SAFETY: NVRTC's initialisers only set up its own state; the
        // handle is leaked so the library stays loaded for the process.
        let lib = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) }
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        std::mem::forget(lib);
    }
    Ok(())
}

/// Compiles [`NORMALIZE_KERNEL`] to PTX for `arch` (e.g. "compute_75"),
/// without FMA contraction (so it matches the CPU bit for bit).
pub fn compile_normalize_kernel(arch: &'static str) -> Result<cudarc::nvrtc::Ptx, String> {
    if !nvrtc_present() {
        return Err("the NVRTC library (libnvrtc.so.13) is not installed".into());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        fmad: Some(false),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(NORMALIZE_KERNEL, opts)
        .map_err(|e| format!("NVRTC: {e:?}"))
}

/// The virtual architecture NVRTC compiles for on `device`; PTX for it is
/// JIT-compiled by the driver. CUDA 13 supports sm_75 and newer.
fn arch_of(device: &Device) -> &'static str {
    match device.sm {
        (7, _) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 9) => "compute_89",
        (9, _) => "compute_90",
        (10, _) => "compute_100",
        (12, _) => "compute_120",
        _ => "compute_75",
    }
}

/// The normalisation kernel, loaded on a device, with a model's constants.
#[derive(Debug)]
pub struct Normalizer {
    func: CudaFunction,
    height: u32,
    width: u32,
    nchw: i32,
    pick: [i32; 3],
    scale: f32,
    mean: [f32; 3],
    std: [f32; 3],
}

impl Normalizer {
    pub fn load(device: &Device, input: &InputSpec, p: &PreprocessSpec) -> Result<Self, String> {
        let ptx = compile_normalize_kernel(arch_of(device))?;
        let module = device
            .ctx
            .load_module(ptx)
            .map_err(|e| format!("cannot load the normalisation kernel: {e}"))?;
        let func = module
            .load_function("mmgate_normalize_u8")
            .map_err(|e| format!("no mmgate_normalize_u8 in the kernel: {e}"))?;
        Ok(Self {
            func,
            height: input.height,
            width: input.width,
            nchw: i32::from(input.layout == Layout::Nchw),
            pick: match p.color_order {
                ColorOrder::Rgb => [0, 1, 2],
                ColorOrder::Bgr => [2, 1, 0],
            },
            scale: p.scale,
            mean: p.mean,
            std: p.std,
        })
    }

    /// Queues the normalisation of `samples` windows in `src` into `dst`
    /// on `stream`.
    pub fn launch(
        &self,
        stream: &Arc<CudaStream>,
        src: &CudaSlice<u8>,
        dst: &mut CudaSlice<f32>,
        samples: u32,
    ) -> Result<(), String> {
        let n = samples as usize * self.height as usize * self.width as usize * 3;
        if src.len() < n || dst.len() < n {
            return Err(format!("{samples} samples do not fit the device buffers"));
        }
        let blocks = (n as u32).div_ceil(256).min(65_535);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.func);
        b.arg(src)
            .arg(dst)
            .arg(&samples)
            .arg(&self.height)
            .arg(&self.width);
        b.arg(&self.nchw)
            .arg(&self.pick[0])
            .arg(&self.pick[1])
            .arg(&self.pick[2]);
        b.arg(&self.scale)
            .arg(&self.mean[0])
            .arg(&self.mean[1])
            .arg(&self.mean[2]);
        b.arg(&self.std[0]).arg(&self.std[1]).arg(&self.std[2]);
        // SAFETY: the argument list matches the kernel's signature (16
        // arguments, in order, of these types); both buffers hold at least
        // `n` elements (checked above), and the kernel writes only below `n`.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| format!("normalisation kernel: {e}"))
    }
}

/// One sample of a batch, where it lies in the (registered) tensor pool.
#[derive(Debug, Clone, Copy)]
pub enum HostSample<'a> {
    F32(&'a [f32]),
    U8(&'a [u8]),
}

/// A GPU instance's input: samples copied from their slots straight into a
/// device buffer on the instance's stream (asynchronous DMA when the pool
/// is registered), uint8 windows normalised there by the kernel.
#[derive(Debug)]
pub struct DeviceInput {
    stream: Arc<CudaStream>,
    elements: usize,
    input: CudaSlice<f32>,
    /// uint8 models: the windows, and the kernel that normalises them.
    pixels: Option<(CudaSlice<u8>, Normalizer)>,
}

impl DeviceInput {
    pub fn new(
        device: &Device,
        stream: Arc<CudaStream>,
        max_batch: usize,
        input: &InputSpec,
        pixels: Option<&PreprocessSpec>,
    ) -> Result<Self, String> {
        let elements = input.elements();
        let alloc = |what: &str, e: cudarc::driver::DriverError| {
            format!("cannot allocate the device {what} buffer: {e}")
        };
        let buffer = stream
            .alloc_zeros::<f32>(max_batch * elements)
            .map_err(|e| alloc("input", e))?;
        let pixels = match pixels {
            None => None,
            Some(p) => Some((
                stream
                    .alloc_zeros::<u8>(max_batch * elements)
                    .map_err(|e| alloc("pixel", e))?,
                Normalizer::load(device, input, p)?,
            )),
        };
        Ok(Self {
            stream,
            elements,
            input: buffer,
            pixels,
        })
    }

    /// Queues the copies (and the normalisation) of `samples` on the stream
    /// and returns the device address of the batch's f32 input. The copies
    /// complete before anything queued later on the stream runs (the
    /// session's inference); the caller must not let the slots be reused
    /// before the stream has passed that point.
    pub fn assemble(&mut self, samples: &[HostSample<'_>]) -> Result<u64, String> {
        // The raw copies below need the context current on this thread.
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| format!("cannot bind the CUDA context: {e}"))?;
        let n = samples.len();
        if n * self.elements > self.input.len() {
            return Err(format!("a batch of {n} is over the device buffer"));
        }
        let raw = self.stream.cu_stream();
        let copy = |e: cudarc::driver::DriverError| format!("host-to-device copy: {e}");
        match &mut self.pixels {
            None => {
                let (base, _sync) = self.input.device_ptr(&self.stream);
                for (i, s) in samples.iter().enumerate() {
                    let HostSample::F32(data) = s else {
                        return Err("a uint8 sample for a float model".into());
                    };
                    if data.len() != self.elements {
                        return Err(format!("a sample of {} values", data.len()));
                    }
                    let at = base + (i * self.elements * 4) as u64;
                    // SAFETY: `at` .. + elements f32s lies inside `input`
                    // (size checked above); `data` stays valid until the
                    // stream passes this copy (the caller's contract).
                    unsafe { cudarc::driver::result::memcpy_htod_async(at, data, raw) }
                        .map_err(copy)?;
                }
            }
            Some((staging, normalizer)) => {
                {
                    let (base, _sync) = staging.device_ptr(&self.stream);
                    for (i, s) in samples.iter().enumerate() {
                        let HostSample::U8(data) = s else {
                            return Err("a float sample for a uint8 model".into());
                        };
                        if data.len() != self.elements {
                            return Err(format!("a sample of {} bytes", data.len()));
                        }
                        let at = base + (i * self.elements) as u64;
                        // SAFETY: as above, inside `staging`.
                        unsafe { cudarc::driver::result::memcpy_htod_async(at, data, raw) }
                            .map_err(copy)?;
                    }
                }
                normalizer.launch(&self.stream, staging, &mut self.input, n as u32)?;
            }
        }
        let (ptr, _sync) = self.input.device_ptr(&self.stream);
        Ok(ptr)
    }

    /// The first `n` samples of the assembled input, copied back (tests).
    pub fn read_back(&self, n: usize) -> Result<Vec<f32>, String> {
        let all = self
            .stream
            .clone_dtoh(&self.input)
            .map_err(|e| format!("device-to-host copy: {e}"))?;
        Ok(all[..n * self.elements].to_vec())
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}
