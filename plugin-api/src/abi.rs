//! The types that cross the dynamic-library boundary.
//!
//! Everything here is `#[repr(C)]` and derives [`StableAbi`], so `abi_stable`
//! can check on load that a plugin and the host agree on every layout. The
//! rules for changing this module within API 1.x:
//!
//! - new ops are new variants of [`Op`] (a non-exhaustive enum with fixed
//!   storage): an older plugin never sends them, an older host answers them
//!   with an "unsupported op" error;
//! - new root-module functions and new trait methods go *after* the field
//!   marked `last_prefix_field`, each with `#[sabi(missing_field(option))]`,
//!   so an older plugin (which lacks them) still loads in a newer host and
//!   the host reads `None` for them (`tests/tests/api_compat.rs` proves it);
//! - nothing is ever removed, reordered or retyped: that is API 2.0.
//!
//! Plugin authors do not use these types directly: [`crate::graph`] and
//! [`crate::plugin`] wrap them in ordinary Rust.

// abi_stable's derives implement its traits for generated marker types.
#![allow(non_local_definitions)]

use abi_stable::{
    library::RootModule,
    nonexhaustive_enum::NonExhaustiveFor,
    package_version_strings, sabi_trait,
    sabi_types::{RMut, VersionStrings},
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

/// An opaque handle to a tensor owned by the host.
///
/// The host keeps the tensors of one call (a forward pass, a tuner hook) in an
/// arena and frees them all when the call ends; a handle from an earlier call
/// is rejected with an error, never dereferenced.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorId(pub u64);

/// An element type, as a stable numeric code (new codes can be added in 1.x).
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct DType(pub u8);

impl DType {
    /// 32-bit float.
    pub const F32: DType = DType(0);
    /// 64-bit float (used by gradient checks).
    pub const F64: DType = DType(1);
    /// IEEE half precision.
    pub const F16: DType = DType(2);
    /// bfloat16.
    pub const BF16: DType = DType(3);
    /// Unsigned 32-bit integer (token ids).
    pub const U32: DType = DType(4);
    /// Signed 64-bit integer.
    pub const I64: DType = DType(5);
    /// Unsigned byte.
    pub const U8: DType = DType(6);

    /// The conventional lower-case name (`f32`, `bf16`, ...).
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "f32",
            1 => "f64",
            2 => "f16",
            3 => "bf16",
            4 => "u32",
            5 => "i64",
            6 => "u8",
            _ => "unknown",
        }
    }
}

/// One tensor operation a plugin asks the host to perform.
///
/// Dimensions are `i64` so that negative values count from the end, as in
/// PyTorch. Every op is differentiable unless its documentation says
/// otherwise; the host records the graph and runs the backward pass.
///
/// The enum is non-exhaustive with fixed inline storage: it crosses the
/// boundary as [`OpCall`], and later 1.x versions append variants.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone)]
#[sabi(kind(WithNonExhaustive(size = [usize; 12], traits(Debug, Clone))))]
#[non_exhaustive]
pub enum Op {
    /// The named parameter itself, e.g. `model.norm.weight`.
    Weight { name: RString },
    /// Rows of the embedding matrix `{name}.weight` selected by integer `ids`.
    Embedding { name: RString, ids: TensorId },
    /// `x · {name}.weight^T (+ {name}.bias)`: the tuner hook. The host applies
    /// whatever tuner targets `name` (LoRA, DoRA, a quantized base, ...).
    Linear { name: RString, x: TensorId },
    /// RMSNorm over the last dim with weight `{name}.weight`, computed in f32.
    RmsNorm { name: RString, x: TensorId, eps: f64 },
    /// LayerNorm over the last dim with `{name}.weight` and, if present, `{name}.bias`.
    LayerNorm { name: RString, x: TensorId, eps: f64 },
    /// `-x`
    Neg { x: TensorId },
    /// `e^x`
    Exp { x: TensorId },
    /// Natural logarithm.
    Log { x: TensorId },
    /// Square root.
    Sqrt { x: TensorId },
    /// `1 / x`
    Recip { x: TensorId },
    /// `|x|`
    Abs { x: TensorId },
    /// `x²`
    Sqr { x: TensorId },
    /// Hyperbolic tangent.
    Tanh { x: TensorId },
    /// Logistic sigmoid.
    Sigmoid { x: TensorId },
    /// `x · sigmoid(x)` (SwiGLU's gate activation).
    Silu { x: TensorId },
    /// GELU, tanh approximation (`gelu_pytorch_tanh`).
    Gelu { x: TensorId },
    /// GELU, exact (erf).
    GeluErf { x: TensorId },
    /// `max(x, 0)`
    Relu { x: TensorId },
    /// Sine.
    Sin { x: TensorId },
    /// Cosine.
    Cos { x: TensorId },
    /// `x · mul + add`
    Affine { x: TensorId, mul: f64, add: f64 },
    /// `x ^ exponent` for a scalar exponent.
    PowScalar { x: TensorId, exponent: f64 },
    /// `min(max(x, min), max)`
    Clamp { x: TensorId, min: f64, max: f64 },
    /// `a + b`, broadcasting.
    Add { a: TensorId, b: TensorId },
    /// `a - b`, broadcasting.
    Sub { a: TensorId, b: TensorId },
    /// `a * b`, broadcasting.
    Mul { a: TensorId, b: TensorId },
    /// `a / b`, broadcasting.
    Div { a: TensorId, b: TensorId },
    /// Element-wise maximum, broadcasting.
    Maximum { a: TensorId, b: TensorId },
    /// Element-wise minimum, broadcasting.
    Minimum { a: TensorId, b: TensorId },
    /// Sum over `dim`.
    Sum { x: TensorId, dim: i64, keepdim: bool },
    /// Mean over `dim`.
    Mean { x: TensorId, dim: i64, keepdim: bool },
    /// Maximum over `dim`.
    Max { x: TensorId, dim: i64, keepdim: bool },
    /// Minimum over `dim`.
    Min { x: TensorId, dim: i64, keepdim: bool },
    /// Index of the maximum over `dim` (u32; not differentiable).
    ArgMax { x: TensorId, dim: i64, keepdim: bool },
    /// Softmax over `dim`.
    Softmax { x: TensorId, dim: i64 },
    /// Log-softmax over `dim`.
    LogSoftmax { x: TensorId, dim: i64 },
    /// Matrix product over the last two dims, broadcasting the batch dims.
    Matmul { a: TensorId, b: TensorId },
    /// New shape with the same element count; one entry may be `-1`.
    Reshape { x: TensorId, shape: RVec<i64> },
    /// Swaps two dims.
    Transpose { x: TensorId, dim0: i64, dim1: i64 },
    /// Reorders all dims.
    Permute { x: TensorId, dims: RVec<i64> },
    /// `len` entries of `dim` starting at `start`.
    Narrow { x: TensorId, dim: i64, start: u64, len: u64 },
    /// Concatenation along `dim`.
    Cat { xs: RVec<TensorId>, dim: i64 },
    /// Entries of `dim` picked by the integer tensor `ids` (1-D).
    IndexSelect { x: TensorId, ids: TensorId, dim: i64 },
    /// Broadcast to a larger shape (size-1 dims are repeated).
    BroadcastAs { x: TensorId, shape: RVec<u64> },
    /// Element type conversion.
    ToDType { x: TensorId, dtype: DType },
    /// Rotary position embedding of `x` laid out `[batch, heads, seq, head_dim]`.
    ///
    /// The plugin computes `inv_freq` (so every scaling scheme — linear,
    /// NTK, YaRN, llama3 — is plugin code); the host takes the positions
    /// from the batch (packing- and KV-cache-aware). `2 * inv_freq.len()`
    /// leading features rotate (partial rotary leaves the rest);
    /// `interleaved` pairs `(2i, 2i+1)` instead of the two halves (NeoX);
    /// cos and sin are multiplied by `scale` (YaRN's attention factor).
    Rope { x: TensorId, inv_freq: RVec<f32>, interleaved: bool, scale: f32 },
    /// The same values with no gradient flowing back through them (PyTorch's
    /// `detach`), for terms a method treats as constants (DoRA's weight norm).
    Detach { x: TensorId },
    /// Scaled dot-product attention owned by the host.
    ///
    /// `q` is `[batch, q_heads, seq, head_dim]`, `k`/`v` are
    /// `[batch, kv_heads, seq, head_dim]` with `q_heads` a multiple of
    /// `kv_heads` (GQA). The host adds the causal, padding, packing-segment
    /// and sliding-window masks, and appends to the KV cache of `layer`
    /// during generation. `scale == 0` means `1/sqrt(head_dim)`;
    /// `sliding_window == 0` means none; `softcap == 0` means none.
    /// Returns `[batch, q_heads, seq, head_dim]`.
    Attention {
        layer: u32,
        q: TensorId,
        k: TensorId,
        v: TensorId,
        causal: bool,
        scale: f64,
        sliding_window: u32,
        softcap: f32,
    },
    /// Dropout: while training, each element is zeroed with probability `p`
    /// and the rest scaled by `1 / (1 - p)`; at inference and evaluation the
    /// identity. The host draws the mask from the run's seed, so a training
    /// run (and a resumed one) is reproducible.
    Dropout { x: TensorId, p: f64 },
    /// A tensor of `shape` holding `values` (row-major), converted to
    /// `dtype`: index lists, position tables and masks a plugin computes
    /// itself (vision window orders, M-RoPE positions). Not differentiable.
    /// Added in 1.1.
    Constant { values: RVec<f32>, shape: RVec<u64>, dtype: DType },
    /// Gives up the handles `xs` and returns `keep` (a new handle to the
    /// same tensor): the host drops its references, so a long forward pass
    /// (a vision tower's blocks, a decoder's layer outputs) does not hold
    /// every intermediate until it ends. What the backward pass needs stays
    /// alive through the graph. Using a released handle is an error; `keep`
    /// may be among `xs` (only the returned handle stays valid; an older
    /// host may keep its old handle too, which costs memory, not
    /// correctness). Added in 1.1.
    Release { xs: RVec<TensorId>, keep: TensorId },
    /// The model's output projection, the last op of a forward pass:
    /// logits `x · {name}.weight^T (+ {name}.bias)` over the vocabulary,
    /// through the tuner hook like [`Op::Linear`], then capped at
    /// `softcap · tanh(z / softcap)` when `softcap > 0` (Gemma 2's final
    /// soft-capping). The forward pass must return this op's result
    /// unchanged: the host decides what it holds — every position's
    /// logits, only the last position's while generating, or, while
    /// training, each label's log-probability computed chunk by chunk
    /// without the `[tokens, vocab]` logits (positions without a label
    /// skip the projection). Added in 1.2.
    OutputHead { name: RString, x: TensorId, softcap: f32 },
    /// Opens a block, a repeated unit of the model such as a transformer
    /// layer, on its input `x`; returns the handle the block computes
    /// from. With gradient checkpointing the host keeps only the block's
    /// input and output and recomputes its inside in the backward pass,
    /// so a block must compute from its input, weights and tensors that
    /// need no gradient (constants, position tables), and the same way
    /// each time. Blocks do not nest (an inner pair is the identity).
    /// Added in 1.2.
    BlockBegin { x: TensorId },
    /// Closes the block opened last, whose result is `x`; returns the
    /// handle to use after it. Handles made inside the block are released
    /// (as [`Op::Release`] does). Added in 1.2.
    BlockEnd { x: TensorId },
    /// Indices (`u32`) of the `k` largest entries along the last dim, the
    /// largest first: `[.., k]`. Not differentiable; take the values with
    /// [`Op::Gather`]. Added in 1.2 (mixture-of-experts routing).
    TopK { x: TensorId, k: u32 },
    /// `out[i][j] = x[i][ids[i][j]]` along `dim` (PyTorch's `gather`):
    /// `ids` has `x`'s shape except along `dim`. Differentiable in `x`.
    /// Added in 1.2.
    Gather { x: TensorId, ids: TensorId, dim: i64 },
    /// `x` with the slices of `src` added at the 1-D integer positions
    /// `ids` along `dim` (PyTorch's `index_add`; repeated ids add up).
    /// Differentiable in `x` and `src`. Added in 1.2.
    IndexAdd { x: TensorId, ids: TensorId, src: TensorId, dim: i64 },
    /// Element-wise comparison `a <cmp> b`, broadcasting, as a `u8` mask
    /// (1 where it holds); `cmp` is one of the [`Compare`] codes. Not
    /// differentiable. Added in 1.2.
    Compare { a: TensorId, b: TensorId, cmp: Compare },
    /// `a` where `cond` (a `u8` mask) is non-zero, else `b`, broadcasting
    /// all three. Differentiable in `a` and `b`. Added in 1.2.
    Where { cond: TensorId, a: TensorId, b: TensorId },
    /// A grouped linear layer (a mixture of experts): row `r` of `x`
    /// (`[rows, in]`) goes through the linear layer `names[groups[r]]`,
    /// each through the tuner hook like [`Op::Linear`] (so LoRA can adapt
    /// single experts); `groups` is `[rows]`, integer. Returns `[rows,
    /// out]` in the rows' order. The host groups the rows itself: the
    /// plugin needs no read-back of the routing. Added in 1.2.
    GroupedLinear { names: RVec<RString>, x: TensorId, groups: TensorId },
    /// Keeps `x` under `key` until the forward pass ends, past the end of
    /// the block it was made in (a layer's router logits); returns `x`.
    /// [`Op::Collected`] concatenates what was kept. Added in 1.2.
    Collect { key: RString, x: TensorId },
    /// Everything [`Op::Collect`] kept under `key`, in order, concatenated
    /// along dim 0; an error when nothing was. Added in 1.2.
    Collected { key: RString },
    /// Reports `x` as the forward pass's auxiliary output `name` (the
    /// scalar `aux_loss`: the router's load-balancing loss, which the
    /// trainer adds to the loss with `--router-aux-loss-coef`; or any
    /// tensor a tool reads, such as a VL model's image features); returns
    /// `x`. The host reads them only when it passes the input
    /// [`WANT_AUX_OUTPUTS`]: compute them only then. Added in 1.2.
    AuxOutput { name: RString, x: TensorId },
    /// `[batch, seq]` f32: 1 at the batch's real tokens, 0 at padding (the
    /// attention mask of the new tokens), for statistics over tokens such
    /// as the router's load balance. Added in 1.2.
    TokenMask {},
    /// RMSNorm over the last dim with weight `{name}.weight + offset`
    /// (Gemma's `(1 + w)` is `offset` 1), computed in f32. Added in 1.2.
    RmsNormOffset { name: RString, x: TensorId, eps: f64, offset: f64 },
    /// `base + scale · dropout(x) · aᵀ · bᵀ`: a low-rank update of a linear
    /// layer's output `base` (`[.., out]`) from its input `x` (`[.., in]`),
    /// with `a` `[r, in]` and `b` `[out, r]` (LoRA's `lora_A` and `lora_B`)
    /// and dropout `p` on `x` while training (as [`Op::Dropout`]; 0 for
    /// none). The host runs it as one graph node that keeps no
    /// activation-sized intermediate for the backward pass (the dropout
    /// mask is kept as bits and `x · aᵀ` recomputed there), where the same
    /// maths in single ops keeps four. Differentiable in all four
    /// tensors. Added in 1.3.
    LowRankUpdate { base: TensorId, x: TensorId, a: TensorId, b: TensorId, scale: f64, dropout: f64 },
}

/// An [`Op`] as it crosses the boundary.
pub type OpCall = NonExhaustiveFor<Op>;

/// The comparisons of [`Op::Compare`].
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Compare(pub u8);

impl Compare {
    /// `a == b`
    pub const EQ: Compare = Compare(0);
    /// `a != b`
    pub const NE: Compare = Compare(1);
    /// `a < b`
    pub const LT: Compare = Compare(2);
    /// `a <= b`
    pub const LE: Compare = Compare(3);
    /// `a > b`
    pub const GT: Compare = Compare(4);
    /// `a >= b`
    pub const GE: Compare = Compare(5);
}

/// The forward input the host passes (a scalar) when it will read the
/// auxiliary outputs ([`Op::AuxOutput`]), as transformers'
/// `output_router_logits`: training and evaluation do, generation does
/// not, so a model computes its router loss only when asked. Added in 1.2.
pub const WANT_AUX_OUTPUTS: &str = "want_aux_outputs";

/// The host's side of a computation: a plugin calls these to build its
/// forward pass. Implemented by the host, called by plugins.
#[sabi_trait]
pub trait GraphHost {
    /// Performs `op` and returns the handle of its result.
    fn apply(&mut self, op: OpCall) -> RResult<TensorId, RString>;

    /// The shape of a tensor.
    fn shape(&self, x: TensorId) -> RResult<RVec<u64>, RString>;

    /// The element type of a tensor.
    fn dtype(&self, x: TensorId) -> RResult<DType, RString>;

    /// Whether the run's weights hold a parameter of this name.
    fn has_weight(&self, name: RStr<'_>) -> bool;

    /// The values of a tensor as f32, flattened (for small tensors such as
    /// a routing decision; not differentiable).
    #[sabi(last_prefix_field)]
    fn read_f32(&self, x: TensorId) -> RResult<RVec<f32>, RString>;
}

/// The graph handle a host passes to a plugin for one call.
pub type GraphRef<'a> = GraphHost_TO<'a, RMut<'a, ()>>;

/// A named input tensor of a forward pass (`input_ids`, `pixel_values`, ...).
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct NamedTensor {
    /// The input's name.
    pub name: RString,
    /// Its handle in the call's arena.
    pub id: TensorId,
}

/// One image or video of a dataset row or a request, as the host found it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct MediaItem {
    /// `image` or `video`.
    pub kind: RString,
    /// An image: its file. A video: its frame files in order, or one folder of frames.
    pub sources: RVec<RString>,
}

/// A media item turned into model inputs by the model plugin: the pixel
/// rows and grid the forward pass reads, and the placeholder tokens that
/// stand for it in the token sequence.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PreparedMedia {
    /// The forward input its pixel rows are concatenated into (`pixel_values`).
    pub pixels_input: RString,
    /// `[rows, features]` pixel rows, row-major.
    pub pixels: RVec<f32>,
    /// Features per pixel row.
    pub features: u64,
    /// The forward input its grid row is stacked into (`image_grid_thw`).
    pub grid_input: RString,
    /// Its grid (`[t, h, w]` in patches for Qwen-VL).
    pub grid: RVec<u64>,
    /// The token id the chat template renders once per item and the host
    /// repeats `positions.len() / axes` times.
    pub placeholder_token: u32,
    /// Position axes (3 for M-RoPE).
    pub axes: u32,
    /// `[axes, tokens]`: each placeholder token's position on each axis,
    /// relative to the item's first token. Text after the item continues
    /// one past the largest position of the item.
    pub positions: RVec<u32>,
    /// Which requested item (index into the request) this input belongs to:
    /// one request may give several inputs (a video's frame groups).
    pub request: u32,
    /// For the first input of a request: the text its tag becomes in the
    /// prompt, holding the placeholder token once per input of the request
    /// (Qwen3-VL puts a timestamp before each frame group). Empty: the
    /// model's usual placeholder text.
    pub prompt_text: RString,
}

/// A model architecture instantiated from a `config.json`.
#[sabi_trait]
pub trait ModelInstance: Send + Sync {
    /// Builds the forward pass for `inputs` on `graph` and returns the logits
    /// (or, for models that are not language models, their output).
    #[sabi(last_prefix_field)]
    fn forward(&self, graph: GraphRef<'_>, inputs: RSlice<'_, NamedTensor>) -> RResult<TensorId, RString>;

    /// How the model reads media, as a JSON object — `position_axes` (how
    /// many position rows `position_ids` has), and per media kind the text
    /// that stands for one item in a prompt (`image_placeholder`, ...) —
    /// or `None` for a text-only model.
    ///
    /// Added in 1.1: a 1.0 plugin is text-only (this default runs in the host).
    fn media_spec(&self) -> RResult<ROption<RString>, RString> {
        RResult::ROk(ROption::RNone)
    }

    /// Decodes and preprocesses `items` (in row order) into model inputs.
    /// `options_json` is the model folder's `preprocessor_config.json`
    /// with the run's overrides (`min_pixels`, `max_pixels`, `fps`, ...)
    /// merged in.
    ///
    /// Added in 1.1: a 1.0 plugin reads no media.
    fn prepare_media(
        &self,
        items: RSlice<'_, MediaItem>,
        options_json: RStr<'_>,
    ) -> RResult<RVec<PreparedMedia>, RString> {
        let _ = (items, options_json);
        RResult::RErr(RString::from("this model reads text only"))
    }

    /// How the model is stored in a llama.cpp GGUF file, as a JSON object
    /// (see [`crate::gguf::GgufLayout`] for the fields), or `None` when
    /// llama.cpp has no such architecture.
    ///
    /// Added in 1.2: an older plugin's models have no GGUF form.
    fn gguf_layout(&self) -> RResult<ROption<RString>, RString> {
        RResult::ROk(ROption::RNone)
    }

    /// The model's linear layers, as a JSON list of `{"name", "role"}`
    /// objects (see [`crate::plugin::LinearLayer`]): which weights PEFT's
    /// `all-linear` adapts (not a router, not the output head), and how
    /// tensor parallelism may split them. `None`: the host infers them
    /// from the weights' shapes and names.
    ///
    /// Added in 1.2: an older plugin declares none.
    fn linear_layers(&self) -> RResult<ROption<RString>, RString> {
        RResult::ROk(ROption::RNone)
    }
}

/// An owned model instance crossing the boundary.
pub type ModelBox = ModelInstance_TO<'static, RBox<()>>;

/// How a tuner's new parameter is initialised.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
#[sabi(kind(WithNonExhaustive(size = [usize; 4], traits(Debug, Clone, PartialEq))))]
#[non_exhaustive]
pub enum ParamInit {
    /// All zeros (LoRA's B).
    Zeros,
    /// All ones (IA3's scaling vectors).
    Ones,
    /// Normal with the given standard deviation.
    Normal { std: f64 },
    /// Uniform on `[-bound, bound]`.
    Uniform { bound: f64 },
    /// The L2 norm of each row of the adapted layer's base weight (DoRA's magnitude).
    WeightRowNorm,
}

/// A trainable parameter a tuner adds to one adapted layer.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ParamSpec {
    /// Full parameter name, e.g. `model.layers.0.mlp.down_proj.ia3_l`.
    pub name: RString,
    /// Its shape.
    pub shape: RVec<u64>,
    /// Its initialisation.
    pub init: NonExhaustiveFor<ParamInit>,
}

/// A tuner instantiated from its configuration.
#[sabi_trait]
pub trait TunerInstance: Send + Sync {
    /// The parameters the tuner adds to the linear layer `layer`
    /// (`in_features → out_features`).
    fn params(&self, layer: RStr<'_>, in_features: u64, out_features: u64) -> RResult<RVec<ParamSpec>, RString>;

    /// The adapted output of `layer` for input `x`, given the frozen base
    /// layer's output `base`.
    fn forward(&self, graph: GraphRef<'_>, layer: RStr<'_>, x: TensorId, base: TensorId) -> RResult<TensorId, RString>;

    /// The weight `[out, in]` that computes the adapted layer alone (the
    /// tuner merged into the base weight), for export and faster inference.
    #[sabi(last_prefix_field)]
    fn merge(&self, graph: GraphRef<'_>, layer: RStr<'_>) -> RResult<TensorId, RString>;

    /// Whether the base parameter `name` (a Hugging Face name, any
    /// parameter, not only linear weights) is trained in place: full
    /// fine-tuning says yes to all, freeze to those its pattern matches.
    /// A tuner that trains base parameters is saved as a whole model.
    ///
    /// Added after the 1.0 prefix: a plugin without it trains no base
    /// parameter (this default runs in the host).
    fn trains_base(&self, name: RStr<'_>) -> RResult<bool, RString> {
        let _ = name;
        RResult::ROk(false)
    }

    /// The `adapter_config.json` to save with the adapter (JSON text),
    /// for tuners whose files follow a format such as PEFT's; `None`
    /// saves the configuration the tuner was loaded with.
    ///
    /// Added after the 1.0 prefix: a plugin without it gets `None`.
    fn saved_config(&self) -> RResult<ROption<RString>, RString> {
        RResult::ROk(ROption::RNone)
    }

    /// The bias `[out]` of the merged layer when the tuner changes it (IA³
    /// scaling a layer's output scales its bias too); `None`: the base
    /// bias, if any, stands.
    ///
    /// Added in 1.2: an older plugin's merges leave biases alone.
    fn merge_bias(&self, graph: GraphRef<'_>, layer: RStr<'_>) -> RResult<ROption<TensorId>, RString> {
        let _ = (graph, layer);
        RResult::ROk(ROption::RNone)
    }
}

/// An owned tuner instance crossing the boundary.
pub type TunerBox = TunerInstance_TO<'static, RBox<()>>;

/// The four kinds of component a plugin can provide.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ComponentKind {
    /// A model architecture (forward pass + loading metadata).
    Model,
    /// A tuner: how a frozen linear layer is adapted.
    Tuner,
    /// A reward function for GRPO and evaluation.
    Reward,
    /// A dataset adapter: one raw record to the standard conversation row.
    DatasetAdapter,
}

impl ComponentKind {
    /// The name used on the command line and in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Model => "model",
            ComponentKind::Tuner => "tuner",
            ComponentKind::Reward => "reward",
            ComponentKind::DatasetAdapter => "dataset-adapter",
        }
    }
}

/// What a model consumes, for matching models to data.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Modality(pub u8);

impl Modality {
    /// Text in, text out.
    pub const TEXT: Modality = Modality(0);
    /// Images (and video frames) and text in, text out.
    pub const VISION_LANGUAGE: Modality = Modality(1);

    /// The name used in listings.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "text",
            1 => "vision-language",
            _ => "unknown",
        }
    }
}

/// Everything the registry needs to know about one component, available
/// without loading any weights.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ComponentDescriptor {
    /// Which kind of component this is.
    pub kind: ComponentKind,
    /// Its name, unique within its kind (`qwen3`, `lora`, `format`, `alpaca`).
    pub name: RString,
    /// The component's own version.
    pub version: RString,
    /// One line saying what it does.
    pub description: RString,
    /// Models: the HF `architectures` entries served (`Qwen3ForCausalLM`).
    pub architectures: RVec<RString>,
    /// Models: the HF `model_type`s served (`qwen3`).
    pub model_types: RVec<RString>,
    /// Models: what the model consumes.
    pub modality: Modality,
    /// Dataset adapters: the columns whose presence selects this adapter.
    pub columns: RVec<RString>,
    /// Open-ended metadata as a JSON object (chat-template defaults,
    /// image-token rules, ...), read by later hosts without a layout change.
    pub metadata_json: RString,
}

/// A plugin library's identity.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginInfo {
    /// The plugin's name.
    pub name: RString,
    /// The plugin's own version.
    pub version: RString,
    /// The `oxtune-plugin-api` version it was built against.
    pub api_version: RString,
}

/// The root module every plugin exports: the functions the host calls.
///
/// Every function returns `RResult` and never unwinds: the plugin side wraps
/// each body so that a panic becomes an error naming the plugin.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The plugin's identity.
    pub info: extern "C" fn() -> PluginInfo,
    /// The components it provides.
    pub components: extern "C" fn() -> RResult<RVec<ComponentDescriptor>, RString>,
    /// Scores a batch with the reward `name`; `samples_json` is a JSON array
    /// of [`crate::data::RewardSample`]. Returns one score per sample.
    pub score: extern "C" fn(name: RStr<'_>, samples_json: RStr<'_>) -> RResult<RVec<f64>, RString>,
    /// Converts one raw record (a JSON object) with the dataset adapter
    /// `name` into a standard row (a JSON object).
    pub adapt: extern "C" fn(name: RStr<'_>, record_json: RStr<'_>) -> RResult<RString, RString>,
    /// Instantiates the model architecture `name` from a `config.json` text.
    pub load_model: extern "C" fn(name: RStr<'_>, config_json: RStr<'_>) -> RResult<ModelBox, RString>,
    /// Instantiates the tuner `name` from its configuration (a JSON object).
    #[sabi(last_prefix_field)]
    pub load_tuner: extern "C" fn(name: RStr<'_>, config_json: RStr<'_>) -> RResult<TunerBox, RString>,
    /// The `config.json` (text) of model architecture `name` for a
    /// llama.cpp GGUF file whose architecture metadata is
    /// `metadata_json` (`{"architecture": "qwen3moe", "values": {key:
    /// value, ...}, "config": {...}}`: every key under the architecture,
    /// and the host's generic translation of the shared keys); `None` when
    /// that translation serves as it is.
    /// Added in 1.2.
    #[sabi(missing_field(option))]
    pub config_from_gguf: extern "C" fn(name: RStr<'_>, metadata_json: RStr<'_>) -> RResult<ROption<RString>, RString>,
}

impl RootModule for PluginModRef {
    abi_stable::declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "oxtune_plugin";
    const NAME: &'static str = "oxtune_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The name of the plain C symbol holding the API version a plugin was built
/// against (a NUL-terminated string in a 32-byte array). The host reads it
/// before the layout check so that a mismatch is reported in one line.
pub const API_VERSION_SYMBOL: &[u8] = b"OXTUNE_PLUGIN_API_VERSION\0";

/// Encodes a version string as the 32-byte value of [`API_VERSION_SYMBOL`].
pub const fn encode_api_version(version: &str) -> [u8; 32] {
    let bytes = version.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < bytes.len() && i < 31 {
        out[i] = bytes[i];
        i += 1;
    }
    out
}
