//! mmgate's executor: the one process that owns the accelerator. Each model
//! runs as one or more engine instances fed by a dynamic batcher; samples are
//! read straight from the shared tensor pool, only ids and scores travel on
//! the gateway's socket.

mod batcher;
mod engine;
mod error;
mod instance;
pub mod ort_cpu;
pub mod postprocess;
pub mod serve;

pub use batcher::{BatchPolicy, Batcher};
pub use engine::{Backends, Engine, load, load_instances, warm_up};
pub use error::ExecError;
