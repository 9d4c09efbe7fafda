//! mmgate's executor: the one process that owns the accelerator. Each model
//! runs as one or more engine instances fed by a dynamic batcher; samples are
//! read straight from the shared tensor pool, only ids and scores travel on
//! the gateway's socket.

mod backend_openvino;
mod batcher;
pub mod calibration;
pub mod check_model;
pub mod cuda;
mod engine;
mod error;
pub mod gpu;
mod instance;
pub mod onnxruntime;
pub mod openvino_cpu;
pub mod postprocess;
pub mod serve;

pub use batcher::{BatchPolicy, Batcher};
pub use engine::{Backends, Engine, LoadedModel, cpu_name, load, load_model, warm_up};
pub use error::ExecError;
