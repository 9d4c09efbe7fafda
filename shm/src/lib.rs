//! Shared memory and IPC for mmgate's processes.
//!
//! Tensor bytes move once: a preprocess worker writes a sample into a slot of
//! a memfd-backed tensor pool, the executor reads it from there. Only small
//! typed messages (slot ids, shapes, scores) travel on the Unix sockets. The
//! gateway's [`Ledger`] is the one owner of slot state; slot generations make
//! a late write or read through a stale handle fail instead of corrupting a
//! later request.

mod child;
mod frame;
mod input;
mod ipc;
mod ledger;
mod segment;
mod tensors;

pub use child::*;
pub use frame::*;
pub use input::*;
pub use ipc::*;
pub use ledger::*;
pub use tensors::*;

/// Failures of shared memory and IPC.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("shared memory: {0}")]
    Io(#[from] std::io::Error),
    #[error("shared memory: {0}")]
    Sys(#[from] nix::Error),
    #[error(
        "slot {slot} of model {model} was reused (handle generation {expected}, slot now {actual})"
    )]
    StaleSlot {
        model: u16,
        slot: u32,
        expected: u64,
        actual: u64,
    },
    #[error("slot {slot} of model {model} is out of range")]
    NoSuchSlot { model: u16, slot: u32 },
    #[error("IPC frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("IPC message: {0}")]
    Codec(#[from] postcard::Error),
    #[error("input of {len} bytes does not fit the {cap}-byte input slot")]
    InputTooLarge { len: usize, cap: usize },
}
