//! `oxtune`: the host. It owns the tensors (the candle op backend in
//! [`backend`]), finds plugins through `oxtune-registry`, and drives them
//! from the command line ([`cli`]): models ([`model`], [`text`],
//! [`generate`]), the shared training loop ([`train`]) with SFT and
//! pretraining, and alignment ([`align`]: preference losses and GRPO).

pub mod align;
pub mod backend;
pub mod builtin;
pub mod cli;
pub mod data;
pub mod eval;
pub mod generate;
pub mod loss;
pub mod media;
pub mod memory;
pub mod model;
pub mod rng;
pub mod text;
pub mod train;
