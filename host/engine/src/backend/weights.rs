//! Named parameters, as a model plugin refers to them (Hugging Face names).

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};

/// The parameters of one run, by name. Trainable ones are [`Var`]s so the
/// backward pass reaches them; frozen ones are plain tensors.
#[derive(Clone, Debug, Default)]
pub struct WeightStore {
    tensors: HashMap<String, Tensor>,
    vars: HashMap<String, Var>,
}

impl WeightStore {
    /// An empty store.
    pub fn new() -> WeightStore {
        WeightStore::default()
    }

    /// Adds a frozen parameter.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
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
        if let Some(tensor) = self.tensors.get(name) {
            let var = Var::from_tensor(tensor)?;
            self.insert_var(name.to_owned(), var);
        }
        Ok(())
    }

    /// The parameter `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Whether the store holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
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
    }

    /// The device the parameters live on (the CPU for an empty store).
    pub fn device(&self) -> Device {
        self.tensors.values().next().map_or(Device::Cpu, |t| t.device().clone())
    }

    /// All parameter names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}
