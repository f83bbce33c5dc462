//! `oxtune-train`: the training loop every trainer shares ([`train_with`]:
//! seeded data order, gradient accumulation, clipping, AdamW with warm-up
//! and decay, evaluation, metrics, atomic checkpoints and exact resume),
//! the objectives it runs — the causal-LM loss of SFT and pretraining
//! ([`objective`]), the preference losses and GRPO ([`align`]) — and what a
//! run needs around the loop: its output folder, what it records and where
//! it resumes ([`run`]).
//!
//! Builds on `oxtune-data` (encoded rows) and `oxtune-engine` (the model).

#![warn(missing_docs)]

pub mod align;
pub mod checkpoints;
pub mod objective;
pub mod optim;
pub mod run;
mod trainer;

pub use objective::{
    collate_packed, Objective, ObjectiveLoss, PackedSftObjective, PaddingFreeSftObjective, SftObjective,
};
pub use trainer::{
    train, train_items, train_with, StepMetrics, TrainConfig, TrainError, TrainerState, ROUTER_AUX_LOSS,
};
