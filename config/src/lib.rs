//! Configuration shared by every mmgate process: the server config and the
//! model specs. Parsed from TOML and validated once, in the gateway; children
//! receive the validated values over IPC and never read files themselves.

mod backend;
mod class;
mod config;
mod media;
mod model;

pub use backend::*;
pub use class::*;
pub use config::*;
pub use media::*;
pub use model::*;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn invalid(msg: impl Into<String>) -> SpecError {
    SpecError::Invalid(msg.into())
}
