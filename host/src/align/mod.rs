//! Preference alignment: DPO (sigmoid, hinge, IPO, RPO), KTO, CPO, SimPO
//! and ORPO on the shared training loop, and GRPO with reward plugins.
//!
//! - [`pairs`]: preference rows of ms-swift's and TRL's forms, encoded with
//!   the chat template, labels on the completion only.
//! - [`logps`]: completion log-probabilities from one forward pass (per
//!   token: [`crate::loss::next_token_logps`]).
//! - [`losses`]: each method's loss, as TRL defines it.
//! - [`objective`]: the objectives the training loop runs.

pub mod grpo;
pub mod logps;
pub mod losses;
pub mod objective;
pub mod pairs;
