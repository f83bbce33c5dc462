//! A reward function as a WebAssembly component of oxtune's typed WIT world
//! (`registry/wit/reward.wit`): 1.0 when the completion mentions the row's
//! `keyword` column (case-insensitive), else 0.0 — the same rule as the
//! native example plugin's `keyword` reward.
//!
//! ```text
//! rustup target add wasm32-wasip2
//! cargo build --release --target wasm32-wasip2 --manifest-path examples/wasm-reward-component/Cargo.toml
//! oxtune plugins --plugin examples/wasm-reward-component/target/wasm32-wasip2/release/keyword_component.wasm
//! ```

wit_bindgen::generate!({ path: "../../registry/wit/reward.wit", world: "reward" });

struct Keyword;

impl Guest for Keyword {
    fn score(samples: Vec<Sample>) -> Result<Vec<f64>, String> {
        samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let columns: serde_json::Value =
                    serde_json::from_str(&s.columns).map_err(|e| format!("sample {i}: columns: {e}"))?;
                let keyword = columns
                    .get("keyword")
                    .and_then(|k| k.as_str())
                    .ok_or_else(|| format!("sample {i}: no string column `keyword`"))?;
                let hit = s.completion.to_lowercase().contains(&keyword.to_lowercase());
                Ok(if hit { 1.0 } else { 0.0 })
            })
            .collect()
    }
}

export!(Keyword);
