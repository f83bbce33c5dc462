//! A reward script written in Rust and compiled to WebAssembly.
//!
//! Build (the target is installed once with
//! `rustup target add wasm32-unknown-unknown`):
//!
//! ```text
//! cargo build --release --target wasm32-unknown-unknown \
//!     --manifest-path examples/wasm-reward-rust/Cargo.toml
//! oxtune plugins --plugin examples/wasm-reward-rust/target/wasm32-unknown-unknown/release/repetition_wasm.wasm
//! ```
//!
//! It implements oxtune's core-module reward interface (see the README):
//! `oxtune_alloc` and `oxtune_reward`, and computes the same n-gram
//! repetition penalty as the built-in `repetition` reward, so the two can
//! be checked against each other. It imports nothing.

use std::collections::BTreeSet;

/// A buffer of `len` bytes for the host to write an input into. Each sample
/// runs in a fresh instance, so nothing needs freeing.
#[no_mangle]
pub extern "C" fn oxtune_alloc(len: i32) -> i32 {
    let mut buffer = Vec::<u8>::with_capacity(len.max(0) as usize);
    let ptr = buffer.as_mut_ptr();
    std::mem::forget(buffer);
    ptr as i32
}

/// `-(1 - distinct / total)` over lower-cased word 3-grams of the completion.
///
/// # Safety
/// The host passes pointers from `oxtune_alloc` and the lengths it wrote.
#[no_mangle]
pub unsafe extern "C" fn oxtune_reward(
    _prompt_ptr: i32,
    _prompt_len: i32,
    completion_ptr: i32,
    completion_len: i32,
    _columns_ptr: i32,
    _columns_len: i32,
) -> f64 {
    let bytes = std::slice::from_raw_parts(completion_ptr as *const u8, completion_len as usize);
    let completion = String::from_utf8_lossy(bytes).to_lowercase();
    let words: Vec<&str> = completion.split_whitespace().collect();
    const N: usize = 3;
    if words.len() < N {
        return 0.0;
    }
    let total = words.len() - N + 1;
    let distinct: BTreeSet<&[&str]> = words.windows(N).collect();
    -(1.0 - distinct.len() as f64 / total as f64)
}
