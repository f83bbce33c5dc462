//! Named parameters, as a model plugin refers to them (Hugging Face names).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::quant::QuantizedWeight;

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
