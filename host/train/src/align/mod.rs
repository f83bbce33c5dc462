//! Preference alignment: DPO (sigmoid, hinge, IPO, RPO), KTO, CPO, SimPO
//! and ORPO on the shared training loop, and GRPO with reward plugins.
//!
//! - preference rows (ms-swift's and TRL's forms) are encoded by
//!   `oxtune_data::preference`, labels on the completion only.
//! - [`logps`]: completion log-probabilities from one forward pass (per
//!   token: [`oxtune_engine::model::LoadedModel::label_logps`]).
//! - [`losses`]: each method's loss, as TRL defines it.
//! - [`objective`]: the objectives the training loop runs.

pub mod grpo;
pub mod logps;
pub mod losses;
pub mod objective;
