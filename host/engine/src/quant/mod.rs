//! Weights kept quantised in memory, and the linear layer over them.
//!
//! A quantised weight is frozen (QLoRA trains adapters beside it). Its
//! linear layer computes `y = x · Wᵀ` by dequantising `W` a panel of rows
//! at a time, and its backward pass gives the input's gradient `g · W`
//! the same way (bitsandbytes' QLoRA maths), so no full-precision copy of
//! the weight lives beyond one panel, in the forward pass or in the graph
//! kept for the backward pass. Decoding (a few rows, no gradient) from
//! llama.cpp's block formats reads the blocks directly instead
//! ([`oxtune_kernels::blocks`]).

pub mod bnb4;

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use oxtune_kernels::blocks::BlockMatrix;

pub use bnb4::{Bnb4Parts, Bnb4Type, Bnb4Weight};

/// Values dequantised at once: a panel of rows of about this many values.
const PANEL_VALUES: usize = 1 << 20;

/// Panels for inputs of at most [`SHORT_INPUT_ROWS`] rows (a short prompt's
/// prefill): a quarter of [`PANEL_VALUES`], so the dequantised panel does
/// not set inference's peak memory; a large input keeps large panels,
/// whose products run at the GEMM's full rate (a training step of 4×128
/// rows ran 12–22% slower with the small ones).
const SHORT_INPUT_PANEL_VALUES: usize = 1 << 18;

/// See [`SHORT_INPUT_PANEL_VALUES`].
const SHORT_INPUT_ROWS: usize = 256;

/// Most rows of activations multiplied straight from the blocks (decoding,
/// a small batch of requests); more go through dequantised panels and
/// gemm, whose dequantisation the rows then share (`oxtune bench serve` on
/// SmolLM2: 32 clients 108 tokens/s at 8, 66 at 32).
const DECODE_ROWS: usize = 8;

/// How to quantise a model's linear layers as it loads.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct QuantizeOnLoad {
    /// NF4 or FP4.
    pub kind: Bnb4Type,
    /// Store the block scales in 8 bits too (bitsandbytes' double quantisation).
    pub double_quant: bool,
}

/// A frozen weight matrix kept quantised.
#[derive(Clone, Debug)]
pub enum QuantizedWeight {
    /// bitsandbytes 4-bit (NF4 or FP4).
    Bnb4(Bnb4Weight),
    /// llama.cpp's Q4_0, Q4_1 or Q8_0 blocks (a GGUF file kept quantised).
    Blocks(BlockMatrix),
}

impl QuantizedWeight {
    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            QuantizedWeight::Bnb4(w) => (w.rows, w.cols),
            QuantizedWeight::Blocks(w) => (w.rows, w.cols),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            QuantizedWeight::Bnb4(w) => w.bytes(),
            QuantizedWeight::Blocks(w) => w.bytes(),
        }
    }

    /// Rows `start..end`, dequantised to f32, row-major.
    pub fn rows(&self, start: usize, end: usize) -> Vec<f32> {
        match self {
            QuantizedWeight::Bnb4(w) => w.dequantize_rows(start, end),
            QuantizedWeight::Blocks(w) => w.dequantize_rows(start, end),
        }
    }

    /// The rows `ids` (an embedding lookup), dequantised as `dtype` on
    /// `device`, `[ids, cols]`.
    pub fn gather(&self, ids: &[u32], dtype: DType, device: &Device) -> Result<Tensor> {
        let (rows, cols) = self.dims();
        let mut values = Vec::with_capacity(ids.len() * cols);
        for &id in ids {
            let id = id as usize;
            if id >= rows {
                candle_core::bail!("index {id} is outside a table of {rows} rows");
            }
            values.extend(self.rows(id, id + 1));
        }
        Tensor::from_vec(values, (ids.len(), cols), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }

    /// Row ranges of about `values` values each.
    fn panels(&self, values: usize) -> impl Iterator<Item = (usize, usize)> {
        let (rows, cols) = self.dims();
        let step = (values / cols.max(1)).max(1);
        (0..rows).step_by(step).map(move |start| (start, (start + step).min(rows)))
    }

    fn panel(&self, (start, end): (usize, usize), device: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.rows(start, end), (end - start, self.dims().1), device)
    }

    /// The whole weight dequantised as `dtype` on `device` (merging,
    /// exporting, a tuner that reads the base weight).
    pub fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let (rows, _) = self.dims();
        self.panel((0, rows), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }
}

/// `x · Wᵀ` for `x` `[rows, in]` over a quantised `W`, differentiable in `x`.
pub fn linear(x: &Tensor, weight: &Arc<QuantizedWeight>) -> Result<Tensor> {
    let (_, cols) = weight.dims();
    if x.dim(1)? != cols {
        candle_core::bail!("a quantised linear layer of {cols} inputs got {:?}", x.dims());
    }
    if !x.device().is_cpu() {
        // Other devices: the dequantised weight on the device, through matmul.
        let w = weight.dequantize(x.dtype(), x.device())?;
        return x.matmul(&w.t()?);
    }
    let rows = x.dim(0)?;
    if let (QuantizedWeight::Blocks(blocks), false, true) = (weight.as_ref(), x.track_op(), rows <= DECODE_ROWS) {
        // Decoding: straight from the blocks.
        let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let y = blocks.matmul(&values, rows);
        return Tensor::from_vec(y, (rows, blocks.rows), &Device::Cpu)?.to_dtype(x.dtype());
    }
    let dtype = x.dtype();
    let y = x.to_dtype(DType::F32)?.contiguous()?.apply_op1(QuantLinear(weight.clone()))?;
    y.to_dtype(dtype)
}

/// The custom op behind [`linear`] on the CPU.
struct QuantLinear(Arc<QuantizedWeight>);

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("quantized-linear takes f32 inputs") };
        let (rows, cols) = layout.shape().dims2()?;
        let start = layout.start_offset();
        if !layout.is_contiguous() {
            candle_core::bail!("quantized-linear takes a contiguous input");
        }
        // Each panel's product goes straight into its columns of the
        // output: one dequantised panel alive at a time, the input read in place.
        let x = &data[start..start + rows * cols];
        let out = self.0.dims().0;
        let mut y = vec![0f32; rows * out];
        let values = if rows <= SHORT_INPUT_ROWS { SHORT_INPUT_PANEL_VALUES } else { PANEL_VALUES };
        for (first, end) in self.0.panels(values) {
            oxtune_kernels::panel_product_into(x, cols, &self.0.rows(first, end), &mut y, out, first);
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.to_dtype(DType::F32)?;
        let mut sum: Option<Tensor> = None;
        for (start, end) in self.0.panels(PANEL_VALUES) {
            let part = grad.narrow(1, start, end - start)?.matmul(&self.0.panel((start, end), &Device::Cpu)?)?;
            sum = Some(match sum {
                Some(s) => (s + part)?,
                None => part,
            });
        }
        let zero = || Tensor::zeros(arg.shape(), DType::F32, &Device::Cpu);
        Ok(Some(sum.map_or_else(zero, Ok)?.to_dtype(arg.dtype())?))
    }
}
