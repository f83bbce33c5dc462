//! The first-party plugins linked into the `oxtune` binary.
//!
//! A plugin crate registers itself with `inventory` when it is linked; the
//! `use` lines below make sure the linker keeps each one.

use oxtune_plugin_datasets as _;
use oxtune_plugin_gemma3 as _;
use oxtune_plugin_llama as _;
use oxtune_plugin_phi3 as _;
use oxtune_plugin_qwen2 as _;
use oxtune_plugin_qwen3 as _;
use oxtune_plugin_qwen3_moe as _;
use oxtune_plugin_rewards as _;
use oxtune_plugin_tuners as _;
