//! Plain-data types shared by the host and plugins, passed as JSON.

use serde::{Deserialize, Serialize};

/// One completion to score: what a reward function sees.
///
/// `columns` holds every other column of the dataset row (a `solution`
/// column reaches an accuracy reward this way).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardSample {
    /// The prompt as rendered text.
    pub prompt: String,
    /// The generated completion.
    pub completion: String,
    /// The row's other columns.
    #[serde(default)]
    pub columns: serde_json::Map<String, serde_json::Value>,
}
