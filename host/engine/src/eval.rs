//! Evaluation measures shared by `oxtune eval` and the trainers.

use candle_core::{DType, Tensor};

use crate::backend::{ops, BatchInfo, OpError};
use crate::model::{LoadedModel, ModelError};

/// The mean negative log-likelihood of `ids[1..]` given their prefixes.
/// A sequence of fewer than two ids has nothing to predict and is an error.
pub fn mean_nll(model: &LoadedModel, ids: &[u32]) -> Result<f64, ModelError> {
    let n = ids.len();
    let forward_error = |source| ModelError::Forward { model: model.dir().to_owned(), source };
    if n < 2 {
        let message = format!("a perplexity needs at least two tokens (one to predict from), got {n}");
        return Err(forward_error(OpError::Invalid { op: "mean_nll", message }));
    }
    let candle = |source| forward_error(OpError::Candle { op: "mean_nll", source });
    let input = Tensor::new(ids, model.device()).and_then(|t| t.unsqueeze(0)).map_err(candle)?;
    let logits = model.forward(&input, &BatchInfo::default(), None, None)?;
    let picked = (|| {
        let logits = logits.squeeze(0)?.narrow(0, 0, n - 1)?.to_dtype(DType::F64)?;
        let log_probs = ops::log_softmax(&logits, 1)?;
        let targets = Tensor::new(&ids[1..], model.device())?.unsqueeze(1)?;
        log_probs.gather(&targets, 1)?.flatten_all()?.to_vec1::<f64>()
    })()
    .map_err(candle)?;
    Ok(-picked.iter().sum::<f64>() / (n - 1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxtune_plugin_qwen3 as _;

    #[test]
    fn fewer_than_two_ids_is_an_error_not_a_panic() {
        let registry = oxtune_registry::Registry::discover(&oxtune_registry::Discovery::default()).unwrap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-qwen3");
        let model = LoadedModel::load(&registry, &dir, &Default::default()).unwrap();
        for ids in [&[][..], &[5][..]] {
            let err = mean_nll(&model, ids).unwrap_err();
            assert!(crate::error_chain(&err).contains("at least two tokens"), "{}", crate::error_chain(&err));
        }
        let nll = mean_nll(&model, &[5, 6, 7]).unwrap();
        assert!(nll.is_finite() && nll > 0.0, "{nll}");
    }
}
