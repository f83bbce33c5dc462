//! Values computed before they enter the graph. A custom op's forward
//! pass must return an owned storage; the fused ops
//! ([`super::fused`]) and checkpointed blocks ([`super::checkpoint`])
//! compute their output with tensor ops on detached inputs and hand it to
//! their graph node this way, on any candle device.

use std::sync::Mutex;

use candle_core::{Result, Tensor};

/// An output computed before it enters the graph, handed over once.
pub(crate) struct HandOver(Mutex<Option<Tensor>>);

impl HandOver {
    /// Holds `value` until the graph takes it.
    pub(crate) fn new(value: Tensor) -> HandOver {
        HandOver(Mutex::new(Some(value)))
    }

    /// The value, contiguous (its storage is then cloned once, into the
    /// graph's output).
    pub(crate) fn take(&self, op: &str) -> Result<Tensor> {
        match self.0.lock().expect("not poisoned").take() {
            Some(value) => value.contiguous(),
            None => candle_core::bail!("{op}: the forward pass ran twice"),
        }
    }
}

/// The `cpu_fwd`, `cuda_fwd` and `metal_fwd` of a custom op of 1, 2 or 3
/// inputs whose struct holds its value in an `output` [`HandOver`]: each
/// hands the value over, ignoring the inputs' storages.
macro_rules! hand_over_forwards {
    (@one $variant:ident, $fwd:ident, $storage:ty, $($input:ident),+) => {
        fn $fwd(&self, $($input: &$storage, _: &candle_core::Layout),+)
            -> candle_core::Result<($storage, candle_core::Shape)> {
            let _ = ($($input),+);
            let value = self.output.take(self.name())?;
            let (storage, layout) = value.storage_and_layout();
            match &*storage {
                candle_core::Storage::$variant(s) => {
                    Ok((candle_core::backend::BackendStorage::try_clone(s, layout)?, value.shape().clone()))
                }
                _ => candle_core::bail!("{}: the output is on another device than the input", self.name()),
            }
        }
    };
    (@all $($input:ident),+) => {
        hand_over_forwards!(@one Cpu, cpu_fwd, candle_core::CpuStorage, $($input),+);
        hand_over_forwards!(@one Cuda, cuda_fwd, candle_core::CudaStorage, $($input),+);
        hand_over_forwards!(@one Metal, metal_fwd, candle_core::MetalStorage, $($input),+);
    };
    (1) => { hand_over_forwards!(@all a); };
    (2) => { hand_over_forwards!(@all a, b); };
    (3) => { hand_over_forwards!(@all a, b, c); };
}

pub(crate) use hand_over_forwards;
