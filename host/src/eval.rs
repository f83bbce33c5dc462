//! Evaluation measures shared by `oxtune eval` and the trainers.

use candle_core::{DType, Tensor};

use crate::backend::{ops, BatchInfo};
use crate::model::LoadedModel;

/// The mean negative log-likelihood of `ids[1..]` given their prefixes.
pub fn mean_nll(model: &LoadedModel, ids: &[u32]) -> anyhow::Result<f64> {
    let input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let logits = model.forward(&input, &BatchInfo::default(), None, None)?.squeeze(0)?;
    let n = ids.len();
    let log_probs = ops::log_softmax(&logits.narrow(0, 0, n - 1)?.to_dtype(DType::F64)?, 1)?;
    let targets = Tensor::new(&ids[1..], model.device())?.unsqueeze(1)?;
    let picked = log_probs.gather(&targets, 1)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(-picked.iter().sum::<f64>() / (n - 1) as f64)
}
