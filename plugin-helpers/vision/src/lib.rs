//! Helpers for vision-language model plugins: image and video
//! preprocessing ([`image`], [`processor`], Qwen-VL's in [`qwen`], dynamic
//! tiling in [`tiles`]) and the
//! tensor pieces vision towers share ([`layers`]: patch embedding, 2-D
//! rotary tables, segment attention, scattering vision rows into
//! placeholder tokens, multi-axis RoPE).
//!
//! Preprocessing is plugin code: the host hands a model plugin the media
//! files of a row ([`oxtune_plugin_api::media::MediaRequest`]) and gets
//! back pixel rows, grids and placeholder tokens
//! ([`oxtune_plugin_api::media::PreparedMedia`]); it never looks inside.

pub mod image;
pub mod layers;
pub mod processor;
pub mod qwen;
pub mod tiles;
