//! Ordinary-looking tensor code on top of the host's op API.
//!
//! While the host runs a plugin's forward pass (or tuner hook), the graph
//! handle it passed in is installed as the thread's *current graph*; a
//! [`Tensor`] is a plain copyable handle whose methods send ops to it. So a
//! plugin author writes
//!
//! ```ignore
//! let h = x.matmul(&w)?.silu()?;
//! ```
//!
//! and never touches FFI types. Using a `Tensor` outside such a call is an
//! error, not undefined behaviour.

use std::cell::{Cell, RefCell};
use std::ptr;

use abi_stable::nonexhaustive_enum::NonExhaustive;
use abi_stable::std_types::{RString, RVec};

use crate::abi::{Compare, DType, GraphRef, Op, TensorId};
use crate::{Error, Result};

thread_local! {
    static CURRENT: Cell<*mut GraphRef<'static>> = const { Cell::new(ptr::null_mut()) };
    /// Handles made inside the innermost [`scope`], to release at its end.
    static SCOPED: RefCell<Option<Vec<TensorId>>> = const { RefCell::new(None) };
}

/// Runs `f` with `graph` installed as this thread's current graph, restoring
/// the previous one afterwards (calls nest: a tuner hook runs inside a
/// model's forward pass).
pub fn with_graph<R>(graph: &mut GraphRef<'_>, f: impl FnOnce() -> R) -> R {
    struct Restore(*mut GraphRef<'static>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    // The lifetime is erased only for the duration of `f`; `Restore` puts
    // the previous pointer back even if `f` unwinds.
    let erased = graph as *mut GraphRef<'_> as *mut GraphRef<'static>;
    let _restore = Restore(CURRENT.with(|c| c.replace(erased)));
    f()
}

fn with_current<R>(f: impl FnOnce(&mut GraphRef<'static>) -> Result<R>) -> Result<R> {
    let p = CURRENT.with(|c| c.get());
    if p.is_null() {
        return Err(Error::new(
            "tensor used outside a forward call: oxtune tensors exist only while the host runs the plugin",
        ));
    }
    // SAFETY: the pointer was installed by `with_graph`, whose borrow of the
    // graph outlives every call made while it is installed.
    f(unsafe { &mut *p })
}

fn apply(op: Op) -> Result<Tensor> {
    let t = with_current(|g| g.apply(NonExhaustive::new(op)).into_result().map(Tensor).map_err(Error::from))?;
    SCOPED.with(|s| {
        if let Some(made) = s.borrow_mut().as_mut() {
            made.push(t.0);
        }
    });
    Ok(t)
}

/// Runs `f` and releases every handle it made except the tensor it returns
/// (see [`Op::Release`]): wrap each block of a long stack so the host frees
/// what no later op needs. A host older than API 1.1 keeps them (the
/// release is skipped); the result is the same.
pub fn scope(f: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
    /// Puts the enclosing scope's list back, even if `f` unwinds.
    struct Restore(Option<Option<Vec<TensorId>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                SCOPED.with(|s| s.replace(outer));
            }
        }
    }
    let mut restore = Restore(Some(SCOPED.with(|s| s.replace(Some(Vec::new())))));
    let result = f();
    let outer = restore.0.take().expect("set above");
    let made = SCOPED.with(|s| s.replace(outer)).unwrap_or_default();
    let kept = result?;
    match apply(Op::Release { xs: made.into(), keep: kept.0 }) {
        Ok(t) => Ok(t),
        Err(e) if e.to_string().contains("does not implement") => Ok(kept),
        Err(e) => Err(e),
    }
}

/// Gives up the handles `xs` (any of them may be `keep`) and returns `keep`
/// as a new handle (see [`Op::Release`]): a loop over layers releases each
/// layer's input once the next exists, so a forward pass holds one layer's
/// hidden states, not all of them. A host older than API 1.1 keeps them.
pub fn release(xs: &[Tensor], keep: &Tensor) -> Result<Tensor> {
    let mut ids: Vec<TensorId> = Vec::with_capacity(xs.len());
    for x in xs {
        if !ids.contains(&x.0) {
            ids.push(x.0);
        }
    }
    match apply(Op::Release { xs: ids.into(), keep: keep.0 }) {
        Ok(t) => Ok(t),
        Err(e) if e.to_string().contains("does not implement") => Ok(*keep),
        Err(e) => Err(e),
    }
}

/// A handle to a tensor owned by the host, valid during one call.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Tensor(pub(crate) TensorId);

macro_rules! unary_ops {
    ($($(#[$doc:meta])* $method:ident => $variant:ident;)*) => {
        $($(#[$doc])* pub fn $method(&self) -> Result<Tensor> {
            apply(Op::$variant { x: self.0 })
        })*
    };
}

macro_rules! binary_ops {
    ($($(#[$doc:meta])* $method:ident => $variant:ident;)*) => {
        $($(#[$doc])* pub fn $method(&self, other: &Tensor) -> Result<Tensor> {
            apply(Op::$variant { a: self.0, b: other.0 })
        })*
    };
}

macro_rules! reduce_ops {
    ($($(#[$doc:meta])* $method:ident, $method_keepdim:ident => $variant:ident;)*) => {
        $(
            $(#[$doc])* pub fn $method(&self, dim: i64) -> Result<Tensor> {
                apply(Op::$variant { x: self.0, dim, keepdim: false })
            }
            $(#[$doc])* /// Keeps the reduced dim with size 1.
            pub fn $method_keepdim(&self, dim: i64) -> Result<Tensor> {
                apply(Op::$variant { x: self.0, dim, keepdim: true })
            }
        )*
    };
}

impl Tensor {
    /// Wraps a raw handle received from the host (e.g. a model input).
    pub fn from_id(id: TensorId) -> Tensor {
        Tensor(id)
    }

    /// The raw handle, to return to the host.
    pub fn id(&self) -> TensorId {
        self.0
    }

    /// The tensor's shape.
    pub fn dims(&self) -> Result<Vec<usize>> {
        with_current(|g| {
            let dims = g.shape(self.0).into_result().map_err(Error::from)?;
            Ok(dims.iter().map(|&d| d as usize).collect())
        })
    }

    /// The size of one dim (negative counts from the end).
    pub fn dim(&self, dim: i64) -> Result<usize> {
        let dims = self.dims()?;
        let rank = dims.len() as i64;
        let d = if dim < 0 { dim + rank } else { dim };
        if d < 0 || d >= rank {
            return Err(Error::new(format!("dim {dim} out of range for a rank-{rank} tensor")));
        }
        Ok(dims[d as usize])
    }

    /// The element type.
    pub fn dtype(&self) -> Result<DType> {
        with_current(|g| g.dtype(self.0).into_result().map_err(Error::from))
    }

    /// The values as f32, flattened (not differentiable; for small tensors).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        with_current(|g| Ok(g.read_f32(self.0).into_result().map_err(Error::from)?.into_vec()))
    }

    unary_ops! {
        /// `-x`
        neg => Neg;
        /// `e^x`
        exp => Exp;
        /// Natural logarithm.
        log => Log;
        /// Square root.
        sqrt => Sqrt;
        /// `1 / x`
        recip => Recip;
        /// `|x|`
        abs => Abs;
        /// `x²`
        sqr => Sqr;
        /// Hyperbolic tangent.
        tanh => Tanh;
        /// Logistic sigmoid.
        sigmoid => Sigmoid;
        /// `x · sigmoid(x)`
        silu => Silu;
        /// GELU, tanh approximation.
        gelu => Gelu;
        /// GELU, exact.
        gelu_erf => GeluErf;
        /// `max(x, 0)`
        relu => Relu;
        /// Sine.
        sin => Sin;
        /// Cosine.
        cos => Cos;
    }

    binary_ops! {
        /// `self + other`, broadcasting.
        add => Add;
        /// `self - other`, broadcasting.
        sub => Sub;
        /// `self * other`, broadcasting.
        mul => Mul;
        /// `self / other`, broadcasting.
        div => Div;
        /// Element-wise maximum.
        maximum => Maximum;
        /// Element-wise minimum.
        minimum => Minimum;
        /// Matrix product over the last two dims, broadcasting batch dims.
        matmul => Matmul;
    }

    reduce_ops! {
        /// Sum over `dim`.
        sum, sum_keepdim => Sum;
        /// Mean over `dim`.
        mean, mean_keepdim => Mean;
        /// Maximum over `dim`.
        max, max_keepdim => Max;
        /// Minimum over `dim`.
        min, min_keepdim => Min;
        /// Index of the maximum over `dim` (not differentiable).
        argmax, argmax_keepdim => ArgMax;
    }

    /// `self * mul + add`
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        apply(Op::Affine { x: self.0, mul, add })
    }

    /// `self * s`
    pub fn scale(&self, s: f64) -> Result<Tensor> {
        self.affine(s, 0.0)
    }

    /// `self ^ exponent`
    pub fn powf(&self, exponent: f64) -> Result<Tensor> {
        apply(Op::PowScalar { x: self.0, exponent })
    }

    /// Clamps every element into `[min, max]`.
    pub fn clamp(&self, min: f64, max: f64) -> Result<Tensor> {
        apply(Op::Clamp { x: self.0, min, max })
    }

    /// Softmax over `dim`.
    pub fn softmax(&self, dim: i64) -> Result<Tensor> {
        apply(Op::Softmax { x: self.0, dim })
    }

    /// Log-softmax over `dim`.
    pub fn log_softmax(&self, dim: i64) -> Result<Tensor> {
        apply(Op::LogSoftmax { x: self.0, dim })
    }

    /// Same elements, new shape; one entry may be `-1`.
    pub fn reshape(&self, shape: &[i64]) -> Result<Tensor> {
        apply(Op::Reshape { x: self.0, shape: RVec::from(shape) })
    }

    /// Swaps two dims.
    pub fn transpose(&self, dim0: i64, dim1: i64) -> Result<Tensor> {
        apply(Op::Transpose { x: self.0, dim0, dim1 })
    }

    /// Reorders all dims.
    pub fn permute(&self, dims: &[i64]) -> Result<Tensor> {
        apply(Op::Permute { x: self.0, dims: RVec::from(dims) })
    }

    /// `len` entries of `dim` starting at `start`.
    pub fn narrow(&self, dim: i64, start: usize, len: usize) -> Result<Tensor> {
        apply(Op::Narrow { x: self.0, dim, start: start as u64, len: len as u64 })
    }

    /// Concatenates tensors along `dim`.
    pub fn cat(xs: &[Tensor], dim: i64) -> Result<Tensor> {
        let xs: RVec<TensorId> = xs.iter().map(|t| t.0).collect();
        apply(Op::Cat { xs, dim })
    }

    /// Entries of `dim` picked by the 1-D integer tensor `ids`.
    pub fn index_select(&self, ids: &Tensor, dim: i64) -> Result<Tensor> {
        apply(Op::IndexSelect { x: self.0, ids: ids.0, dim })
    }

    /// Broadcasts to `shape`.
    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Tensor> {
        apply(Op::BroadcastAs { x: self.0, shape: shape.iter().map(|&d| d as u64).collect() })
    }

    /// The same values, with no gradient flowing back through them.
    pub fn detach(&self) -> Result<Tensor> {
        apply(Op::Detach { x: self.0 })
    }

    /// Dropout with probability `p` while training, the identity otherwise (see [`Op::Dropout`]).
    pub fn dropout(&self, p: f64) -> Result<Tensor> {
        apply(Op::Dropout { x: self.0, p })
    }

    /// Converts the element type.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        apply(Op::ToDType { x: self.0, dtype })
    }

    /// Rotary position embedding (see [`Op::Rope`]); positions come from the batch.
    pub fn rope(&self, inv_freq: &[f32], interleaved: bool, scale: f32) -> Result<Tensor> {
        apply(Op::Rope { x: self.0, inv_freq: RVec::from(inv_freq), interleaved, scale })
    }

    /// Indices (`u32`, `[.., k]`) of the `k` largest entries along the
    /// last dim, largest first (see [`Op::TopK`]).
    pub fn topk_indices(&self, k: usize) -> Result<Tensor> {
        apply(Op::TopK { x: self.0, k: k as u32 })
    }

    /// Entries picked along `dim` by the integer tensor `ids` (PyTorch's
    /// `gather`, see [`Op::Gather`]).
    pub fn gather(&self, ids: &Tensor, dim: i64) -> Result<Tensor> {
        apply(Op::Gather { x: self.0, ids: ids.0, dim })
    }

    /// This tensor with the slices of `src` added at positions `ids`
    /// along `dim` (PyTorch's `index_add`, see [`Op::IndexAdd`]).
    pub fn index_add(&self, ids: &Tensor, src: &Tensor, dim: i64) -> Result<Tensor> {
        apply(Op::IndexAdd { x: self.0, ids: ids.0, src: src.0, dim })
    }

    /// The `u8` mask of `self <cmp> other`, broadcasting (see [`Op::Compare`]).
    pub fn compare(&self, other: &Tensor, cmp: Compare) -> Result<Tensor> {
        apply(Op::Compare { a: self.0, b: other.0, cmp })
    }

    /// `on_true` where this `u8` mask is non-zero, else `on_false` (see [`Op::Where`]).
    pub fn where_cond(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        apply(Op::Where { cond: self.0, a: on_true.0, b: on_false.0 })
    }
}

/// Row `r` of `x` (`[rows, in]`) through the linear layer
/// `names[groups[r]]`, each through the tuner hook (see
/// [`Op::GroupedLinear`]): the experts of a mixture of experts.
pub fn grouped_linear(names: &[String], x: &Tensor, groups: &Tensor) -> Result<Tensor> {
    let names: RVec<RString> = names.iter().map(|n| RString::from(n.as_str())).collect();
    apply(Op::GroupedLinear { names, x: x.0, groups: groups.0 })
}

/// `base + scale · dropout(x) · aᵀ · bᵀ`, a LoRA layer's output from the
/// base layer's `base` and input `x`, with `a` `[r, in]` and `b` `[out, r]`
/// and dropout `p` on `x` while training (see [`Op::LowRankUpdate`]: one
/// node that keeps no activation-sized intermediate). Needs a 1.3 host.
pub fn low_rank_update(base: &Tensor, x: &Tensor, a: &Tensor, b: &Tensor, scale: f64, dropout: f64) -> Result<Tensor> {
    apply(Op::LowRankUpdate { base: base.0, x: x.0, a: a.0, b: b.0, scale, dropout })
}

/// Keeps `x` under `key` until the forward pass ends, past the end of its
/// block (see [`Op::Collect`]); returns `x`.
pub fn collect(key: &str, x: &Tensor) -> Result<Tensor> {
    apply(Op::Collect { key: RString::from(key), x: x.0 })
}

/// What [`collect`] kept under `key`, concatenated along dim 0.
pub fn collected(key: &str) -> Result<Tensor> {
    apply(Op::Collected { key: RString::from(key) })
}

/// Reports `x` as the auxiliary output `name` of the forward pass (the
/// scalar `aux_loss`, or features a tool reads; see [`Op::AuxOutput`]);
/// returns `x`.
pub fn aux_output(name: &str, x: &Tensor) -> Result<Tensor> {
    apply(Op::AuxOutput { name: RString::from(name), x: x.0 })
}

/// `[batch, seq]` f32, 1 at real tokens and 0 at padding (see [`Op::TokenMask`]).
pub fn token_mask() -> Result<Tensor> {
    apply(Op::TokenMask {})
}

/// A tensor of `shape` holding `values` (row-major) as `dtype` (see
/// [`Op::Constant`]): index lists, position tables and masks the plugin
/// computes itself. Integer dtypes hold the values exactly up to 2^24.
pub fn constant(values: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let count: usize = shape.iter().product();
    if count != values.len() {
        return Err(Error::new(format!("constant: {} values for shape {shape:?}", values.len())));
    }
    apply(Op::Constant { values: values.into(), shape: shape.iter().map(|&d| d as u64).collect(), dtype })
}

/// A named parameter of the run's weights, e.g. `model.norm.weight`.
pub fn weight(name: &str) -> Result<Tensor> {
    apply(Op::Weight { name: RString::from(name) })
}

/// Whether the run's weights hold a parameter of this name (for optional
/// biases and tied embeddings).
pub fn has_weight(name: &str) -> Result<bool> {
    with_current(|g| Ok(g.has_weight(name.into())))
}

/// Options of [`attention`], with the defaults of a causal decoder.
#[derive(Copy, Clone, Debug)]
pub struct AttentionSpec {
    /// Apply the causal mask.
    pub causal: bool,
    /// Score scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f64>,
    /// Attend only to the last `n` positions.
    pub sliding_window: Option<u32>,
    /// Gemma-style `tanh` soft-capping of the scores.
    pub softcap: Option<f32>,
}

impl Default for AttentionSpec {
    fn default() -> Self {
        AttentionSpec { causal: true, scale: None, sliding_window: None, softcap: None }
    }
}

/// Scaled dot-product attention of layer `layer` (see [`Op::Attention`]):
/// the host owns the masks, GQA and the KV cache.
pub fn attention(layer: u32, q: &Tensor, k: &Tensor, v: &Tensor, spec: AttentionSpec) -> Result<Tensor> {
    apply(Op::Attention {
        layer,
        q: q.0,
        k: k.0,
        v: v.0,
        causal: spec.causal,
        scale: spec.scale.unwrap_or(0.0),
        sliding_window: spec.sliding_window.unwrap_or(0),
        softcap: spec.softcap.unwrap_or(0.0),
    })
}

/// The model's output head (see [`Op::OutputHead`]): logits over the
/// vocabulary from the final hidden states `x` with the linear layer
/// `name` (`lm_head`, or the token embedding when tied), capped when
/// `softcap` is given. Return its result from the forward pass as is.
pub fn output_head(name: &str, x: &Tensor, softcap: Option<f32>) -> Result<Tensor> {
    apply(Op::OutputHead { name: RString::from(name), x: x.0, softcap: softcap.unwrap_or(0.0) })
}

/// Runs `f` on `x` as one block of the model (see [`Op::BlockBegin`]): a
/// transformer layer, whose activations the host may recompute in the
/// backward pass instead of keeping them (gradient checkpointing). `f`
/// must compute from its argument, weights and tensors that need no
/// gradient; handles it makes are released when it returns.
pub fn block(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let input = apply(Op::BlockBegin { x: x.0 })?;
    // Handles made inside are the host's to release: keep them off any
    // enclosing scope's list.
    let outer = SCOPED.with(|s| s.replace(None));
    let result = f(&input);
    SCOPED.with(|s| s.replace(outer));
    apply(Op::BlockEnd { x: result?.0 })
}

/// The op API's escape hatch: sends any [`Op`], including ones added in a
/// later 1.x version that have no method here yet.
pub fn apply_op(op: Op) -> Result<Tensor> {
    apply(op)
}
