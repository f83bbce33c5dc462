//! Model-building helpers for oxtune architecture plugins, on the op API of
//! `oxtune-plugin-api` alone: the decoder-only transformer Llama, Mistral
//! and Qwen share ([`Decoder`], with a replaceable feed-forward part,
//! [`FeedForward`]), the RoPE variants of transformers ([`rope`]) and
//! mixture-of-experts blocks ([`moe`]).
//!
//! This crate versions on its own: changing a helper never changes the
//! plugin ABI, and a plugin built with an older helper still loads.

mod decoder;
pub mod moe;
pub mod rope;

pub use decoder::*;
