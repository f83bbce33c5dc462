//! Named parameters, as a model plugin refers to them (Hugging Face names).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::quant::{bnb4, Bnb4Weight, QuantizeOnLoad, QuantizedWeight};

/// The output layer's name, which quantisation leaves in full precision.
pub const OUTPUT_LAYER: &str = "lm_head";

/// Whether the parameter `name` of shape `dims` is a linear layer's
/// weight: a matrix `….weight` that is not an embedding table. The one
/// rule the host uses (adapters' targets, `all-linear`, quantisation).
pub fn is_linear_weight(name: &str, dims: &[usize]) -> bool {
    dims.len() == 2 && name.strip_suffix(".weight").is_some_and(|layer| !layer.ends_with("embed_tokens"))
}

/// The parameters of one run, by name. Trainable ones are [`Var`]s so the
/// backward pass reaches them; frozen ones are plain tensors, or frozen
/// weight matrices kept quantised ([`QuantizedWeight`], QLoRA's base).
#[derive(Clone, Debug, Default)]
pub struct WeightStore {
    tensors: HashMap<String, Tensor>,
    vars: HashMap<String, Var>,
    quantized: HashMap<String, Arc<QuantizedWeight>>,
}

impl WeightStore {
    /// An empty store.
    pub fn new() -> WeightStore {
        WeightStore::default()
    }

    /// Adds a frozen parameter (replacing a quantised one of that name).
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        let name = name.into();
        self.quantized.remove(&name);
        self.tensors.insert(name, tensor);
    }

    /// Adds a frozen weight matrix kept quantised (replacing a tensor of that name).
    pub fn insert_quantized(&mut self, name: impl Into<String>, weight: QuantizedWeight) {
        let name = name.into();
        self.tensors.remove(&name);
        self.vars.remove(&name);
        self.quantized.insert(name, Arc::new(weight));
    }

    /// Adds a frozen parameter as it is loaded, quantised to 4 bits when
    /// `quantize` asks and it is a linear layer's weight (see
    /// [`is_linear_weight`]): one tensor at a time, so the model's full
    /// precision copy never exists at once.
    pub fn insert_loaded(
        &mut self,
        name: String,
        tensor: Tensor,
        quantize: Option<QuantizeOnLoad>,
    ) -> candle_core::Result<()> {
        match quantize {
            Some(q) if is_linear_weight(&name, tensor.dims()) && !name.starts_with(OUTPUT_LAYER) => {
                let values = tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let parts = bnb4::quantize(&values, tensor.dims(), q.kind, q.double_quant);
                let weight = Bnb4Weight::new(&parts).map_err(candle_core::Error::Msg)?;
                self.insert_quantized(name, QuantizedWeight::Bnb4(weight));
            }
            _ => self.insert(name, tensor),
        }
        Ok(())
    }

    /// The quantised weight `name`, if it is one.
    pub fn quantized(&self, name: &str) -> Option<&Arc<QuantizedWeight>> {
        self.quantized.get(name)
    }

    /// Bytes held by quantised weights.
    pub fn quantized_bytes(&self) -> usize {
        self.quantized.values().map(|q| q.bytes()).sum()
    }

    /// The parameter `name` as a full-precision tensor: itself, or a
    /// quantised weight dequantised (as `dtype`, on the store's device).
    pub fn dense(&self, name: &str, dtype: DType) -> Option<candle_core::Result<Tensor>> {
        if let Some(t) = self.tensors.get(name) {
            return Some(Ok(t.clone()));
        }
        let device = self.device();
        self.quantized.get(name).map(|q| q.dequantize(dtype, &device))
    }

    /// Adds a trainable parameter.
    pub fn insert_var(&mut self, name: impl Into<String>, var: Var) {
        let name = name.into();
        self.tensors.insert(name.clone(), var.as_tensor().clone());
        self.vars.insert(name, var);
    }

    /// Turns the frozen parameter `name` into a trainable one (a no-op if
    /// it already is, or is absent).
    pub fn make_trainable(&mut self, name: &str) -> candle_core::Result<()> {
        if self.vars.contains_key(name) {
            return Ok(());
        }
        if self.quantized.contains_key(name) {
            return Err(candle_core::Error::Msg(format!(
                "`{name}` is kept in 4 bits and cannot be trained: train an adapter on it (QLoRA: --tuner lora or dora)"
            )));
        }
        if let Some(tensor) = self.tensors.get(name) {
            let var = Var::from_tensor(tensor)?;
            self.insert_var(name.to_owned(), var);
        }
        Ok(())
    }

    /// The shape of parameter `name` (quantised or not), if present.
    pub fn dims(&self, name: &str) -> Option<Vec<usize>> {
        match (self.tensors.get(name), self.quantized.get(name)) {
            (Some(t), _) => Some(t.dims().to_vec()),
            (None, Some(q)) => Some(vec![q.dims().0, q.dims().1]),
            (None, None) => None,
        }
    }

    /// The full-precision parameter `name`, if present (`None` for a
    /// quantised one: see [`dense`](Self::dense)).
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Whether the store holds `name` (quantised or not).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.quantized.contains_key(name)
    }

    /// The trainable parameter `name`, if it is one.
    pub fn var(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// The trainable parameters.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.vars.values()
    }

    /// Keeps only the parameters whose name satisfies `keep`.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.tensors.retain(|name, _| keep(name));
        self.vars.retain(|name, _| keep(name));
        self.quantized.retain(|name, _| keep(name));
    }

    /// The device the parameters live on (the CPU for an empty store).
    pub fn device(&self) -> Device {
        self.tensors.values().next().map_or(Device::Cpu, |t| t.device().clone())
    }

    /// The dtype of the full-precision parameters (f32 for a store of none).
    pub fn dtype(&self) -> DType {
        self.tensors.values().next().map_or(DType::F32, |t| t.dtype())
    }

    /// All parameter names (quantised ones too), sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().chain(self.quantized.keys()).map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}
