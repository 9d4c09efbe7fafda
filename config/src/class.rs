//! Priority classes of tenants.

use serde::{Deserialize, Serialize};

/// A tenant's priority class. Queues serve classes in this order (with
/// aging, so that `batch` is never starved forever); under load `batch` is
/// shed first and `standard` videos are sampled more sparsely, while
/// `critical` keeps its latency.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Critical,
    #[default]
    Standard,
    Batch,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Critical, Class::Standard, Class::Batch];

    /// 0 for `critical`, 1 for `standard`, 2 for `batch`.
    pub fn rank(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Critical => "critical",
            Class::Standard => "standard",
            Class::Batch => "batch",
        }
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
