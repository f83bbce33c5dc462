//! Text generation with the KV cache.

use candle_core::{DType, Tensor, D};

use crate::backend::{BatchInfo, KvCache};
use crate::model::{LoadedModel, ModelError};

/// Greedy decoding of one prompt (`[1, n]` ids): prefill the cache with the
/// prompt, then feed back the arg-max token `max_new_tokens` times. Returns
/// the new tokens.
pub fn greedy(model: &LoadedModel, prompt: &Tensor, max_new_tokens: usize) -> Result<Vec<u32>, ModelError> {
    let mut cache = KvCache::new();
    let batch = BatchInfo::default();
    let mut out = Vec::with_capacity(max_new_tokens);
    let mut input = prompt.clone();
    let candle = |source| ModelError::Forward {
        model: "generation".into(),
        source: crate::backend::OpError::Candle { op: "argmax", source },
    };
    for _ in 0..max_new_tokens {
        let logits = model.forward(&input, &batch, Some(&mut cache), None)?;
        let last = logits.narrow(1, logits.dim(1).map_err(candle)? - 1, 1).map_err(candle)?;
        let next = last.argmax(D::Minus1).and_then(|t| t.flatten_all()?.to_vec1::<u32>()).map_err(candle)?[0];
        out.push(next);
        input = Tensor::new(&[[next]], model.device()).and_then(|t| t.to_dtype(DType::U32)).map_err(candle)?;
    }
    Ok(out)
}
