//! One call's graph: the arena of tensors a plugin's handles point into, and
//! the dispatch of every [`Op`] to candle.
//!
//! A [`GraphSession`] lives for one forward pass (or tuner hook). Handles
//! carry the session's tag, so a handle kept from an earlier call is an
//! error, and all tensors are freed when the session is dropped.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RStr, RString, RVec};
use candle_core::{DType, Device, Tensor};
use oxtune_plugin_api::abi::{self, GraphHost, GraphHost_TO, GraphRef, NamedTensor, Op, OpCall, TensorId, TunerBox};

use super::batch::{build_mask, key_mask, BatchInfo, KvCache, MaskShape, MaskSpec};
use super::checkpoint::{Block, Checkpointing, Recording, Replay};
use super::hand_over::HandOver;
use super::ops;
use super::weights::WeightStore;
use crate::quant::QuantizedWeight;

/// An error while executing an op; its message reaches the plugin and the user.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// candle refused the computation (shape or dtype mismatch, ...).
    #[error("{op}")]
    Candle {
        /// The op that failed.
        op: &'static str,
        /// candle's error.
        source: candle_core::Error,
    },
    /// The op's arguments are invalid.
    #[error("{op}: {message}")]
    Invalid {
        /// The op that failed.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A named weight is not in the checkpoint.
    #[error("the checkpoint has no weight `{0}`")]
    MissingWeight(String),
    /// A handle from another call, or one never issued.
    #[error("tensor handle {0:#x} does not belong to this call (handles live for one forward pass)")]
    StaleHandle(u64),
    /// The plugin sent an op this host does not know (it needs a newer host).
    #[error("the plugin used an op this host does not implement (it was built against a newer oxtune-plugin-api than {host}); upgrade oxtune")]
    UnsupportedOp {
        /// This host's API version.
        host: &'static str,
    },
    /// A tuner plugin failed.
    #[error("{0}")]
    Plugin(String),
}

/// Which linear layers a tuner adapts, as PEFT's `target_modules` says.
#[derive(Clone, Debug)]
pub enum TargetModules {
    /// Module names (`q_proj`) or full layer names: a layer matches when its
    /// name is one, or ends with `.` and one.
    Names(Vec<String>),
    /// A regular expression the full layer name must match entirely.
    Regex(regex::Regex),
}

impl TargetModules {
    /// Whether `layer` (e.g. `model.layers.0.self_attn.q_proj`) is targeted.
    pub fn matches(&self, layer: &str) -> bool {
        match self {
            TargetModules::Names(names) => {
                names.iter().any(|m| layer == m || layer.strip_suffix(m.as_str()).is_some_and(|p| p.ends_with('.')))
            }
            TargetModules::Regex(re) => re.find(layer).is_some_and(|m| m.start() == 0 && m.end() == layer.len()),
        }
    }
}

/// A tuner attached to the `linear` hook of the layers it targets.
pub struct TunerBinding {
    /// The tuner plugin's instance.
    pub instance: TunerBox,
    /// The layers it adapts.
    pub target_modules: TargetModules,
}

impl TunerBinding {
    /// Whether `layer` is adapted.
    pub fn targets(&self, layer: &str) -> bool {
        self.target_modules.matches(layer)
    }
}

/// An adapter served beside others: its tuner and its own parameters,
/// kept apart from the model's weight store so that the rows of one
/// batch can each use a different adapter (a server's per-request LoRA).
pub struct ServedAdapter {
    /// The tuner and the layers it adapts.
    pub binding: TunerBinding,
    /// The adapter's parameters, by the names its tuner reads.
    pub weights: WeightStore,
}

/// The adapters of a batch's rows: each adapted layer's output is the
/// base output, plus, on the rows of each group, what that group's tuner
/// adds (computed on those rows only).
pub struct RowAdapters<'a> {
    /// Each adapter in use with the batch rows (`u32` indices) it serves,
    /// and the batch's row mask `[batch]` (f32: 0 on those rows, 1
    /// elsewhere), built once per forward pass, not once per layer.
    groups: Vec<(&'a ServedAdapter, Tensor, Tensor)>,
}

impl<'a> RowAdapters<'a> {
    /// `groups` (each adapter with the batch rows it serves) of a batch of
    /// `batch` rows on `device`.
    pub fn new(
        groups: Vec<(&'a ServedAdapter, Vec<u32>)>,
        batch: usize,
        device: &Device,
    ) -> candle_core::Result<RowAdapters<'a>> {
        let groups = groups
            .into_iter()
            .map(|(adapter, rows)| {
                let mut others = vec![1f32; batch];
                rows.iter().for_each(|&r| others[r as usize] = 0.0);
                Ok((adapter, Tensor::new(rows, device)?, Tensor::from_vec(others, batch, device)?))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(RowAdapters { groups })
    }
}

/// What one forward pass runs against.
pub struct ForwardContext<'a> {
    /// The parameters, by Hugging Face name.
    pub weights: &'a WeightStore,
    /// Positions, padding and packing of the batch.
    pub batch: &'a BatchInfo,
    /// The KV cache, during generation.
    pub cache: Option<&'a mut KvCache>,
    /// The tuner at the `linear` hook, if any.
    pub tuner: Option<&'a TunerBinding>,
}

/// What the model's output head computes (see [`Op::OutputHead`]); a
/// plugin that projects with a plain `linear` gets logits whatever this
/// says, and the caller finds that out from [`GraphSession::ran_output_head`].
#[derive(Copy, Clone, Debug, Default)]
pub enum Head<'a> {
    /// Logits at every position, `[batch, seq, vocab]`.
    #[default]
    Logits,
    /// Logits at the last position only, `[batch, 1, vocab]` (generation:
    /// a long prompt's prefill projects one row, not all of them).
    LastLogits,
    /// For the labels `[batch, seq]`: at each position `t` the
    /// log-probability of `labels[:, t + 1]`, `[batch, seq − 1]` (f32, 0
    /// where the label is [`IGNORE_INDEX`](crate::loss::IGNORE_INDEX)),
    /// computed without the logits on the CPU.
    LabelLogProbs(&'a Tensor),
}

/// The weight of a linear layer: a tensor, or kept quantised.
enum LinearWeight {
    Dense(Tensor),
    Quantized(Arc<QuantizedWeight>),
}

static NEXT_TAG: AtomicU32 = AtomicU32::new(1);

/// The arena and op dispatcher of one call.
pub struct GraphSession<'a> {
    ctx: ForwardContext<'a>,
    /// `None` where the plugin released the handle.
    arena: Vec<Option<Tensor>>,
    tag: u32,
    offset: usize,
    /// Additive masks of the naive attention (devices without a kernel).
    masks: HashMap<(MaskSpec, MaskShape, DType), Option<Tensor>>,
    /// RoPE tables of the CPU kernel, by frequencies, scale and batch shape.
    rope_tables: HashMap<(Vec<u32>, u32, usize, usize), oxtune_kernels::rope::RopeTables>,
    /// Mask rules of the memory-efficient CPU attention.
    key_masks: HashMap<(MaskSpec, MaskShape), oxtune_kernels::KeyMask>,
    /// Dropout ops run so far: each draws its own mask.
    dropouts: u64,
    /// What the output head computes.
    head: Head<'a>,
    /// The output head's result, once it ran.
    head_result: Option<TensorId>,
    /// Gradient checkpointing of blocks, when on.
    checkpointing: Option<Checkpointing>,
    /// The block being recorded (interior: reads are recorded by `get`).
    recording: RefCell<Option<Recording>>,
    /// Arena positions where the blocks now open (not checkpointed) began:
    /// at a block's end, the handles made inside are released (only its
    /// output lives on), so a forward pass holds one layer's activations
    /// handles at a time rather than every layer's.
    open_blocks: Vec<usize>,
    /// How many tuner hooks are running (their ops are not recorded: the
    /// replayed `linear` runs the hook again).
    tuner_depth: u32,
    /// The weights, shared by the replays of this session's blocks.
    weights_snapshot: Option<Arc<WeightStore>>,
    /// Per-row adapters at the linear hook, when rows differ.
    row_adapters: Option<&'a RowAdapters<'a>>,
    /// The parameters of the per-row adapter whose hook is running: its
    /// tuner's weight reads resolve here first.
    overlay: Option<&'a WeightStore>,
    /// The trainable scalar every checkpointed block hangs from (see
    /// [`checkpoint`](super::checkpoint)).
    block_anchor: Option<Tensor>,
    /// What the plugin kept with `collect`, by key, in order.
    collected: HashMap<String, Vec<Tensor>>,
    /// The forward pass's auxiliary outputs, by name.
    aux: AuxOutputs,
    /// Whether the auxiliary outputs will be differentiated (the trainer
    /// adds them to the loss): then a checkpointed block that collects a
    /// tensor runs connected, so the gradient reaches what it came from.
    aux_gradients: bool,
    /// `[batch, seq]` of the forward pass's `input_ids`.
    tokens_shape: Option<(usize, usize)>,
}

/// The named auxiliary outputs of a forward pass ([`Op::AuxOutput`]:
/// a mixture of experts' scalar `aux_loss`, a VL model's image features),
/// in the order the plugin reported them.
#[derive(Clone, Debug, Default)]
pub struct AuxOutputs(Vec<(String, Tensor)>);

impl AuxOutputs {
    /// The output called `name`, if the model reported one.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Every output, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.0.iter().map(|(n, t)| (n.as_str(), t))
    }
}

/// How many times plugins read a tensor's values back to the host
/// ([`GraphHost::read_f32`]) in this process: a forward pass that routes on
/// the device keeps this unchanged.
pub fn read_backs() -> u64 {
    READ_BACKS.load(Ordering::Relaxed)
}

static READ_BACKS: AtomicU64 = AtomicU64::new(0);

fn dim_index(op: &'static str, dim: i64, rank: usize) -> Result<usize, OpError> {
    let d = if dim < 0 { dim + rank as i64 } else { dim };
    if d < 0 || d >= rank as i64 {
        return Err(OpError::Invalid { op, message: format!("dim {dim} is out of range for a rank-{rank} tensor") });
    }
    Ok(d as usize)
}

/// Converts an ABI dtype to candle's.
pub fn to_candle_dtype(dtype: abi::DType) -> Option<DType> {
    Some(match dtype {
        abi::DType::F32 => DType::F32,
        abi::DType::F64 => DType::F64,
        abi::DType::F16 => DType::F16,
        abi::DType::BF16 => DType::BF16,
        abi::DType::U32 => DType::U32,
        abi::DType::I64 => DType::I64,
        abi::DType::U8 => DType::U8,
        _ => return None,
    })
}

/// Converts candle's dtype to the ABI's.
pub fn from_candle_dtype(dtype: DType) -> abi::DType {
    match dtype {
        DType::F32 => abi::DType::F32,
        DType::F64 => abi::DType::F64,
        DType::F16 => abi::DType::F16,
        DType::BF16 => abi::DType::BF16,
        DType::U32 => abi::DType::U32,
        DType::I64 => abi::DType::I64,
        DType::U8 => abi::DType::U8,
        _ => abi::DType(255),
    }
}

impl<'a> GraphSession<'a> {
    /// A new, empty session.
    pub fn new(ctx: ForwardContext<'a>) -> GraphSession<'a> {
        let offset = ctx.cache.as_ref().map_or(0, |c| c.seq_len());
        GraphSession {
            ctx,
            arena: Vec::new(),
            tag: NEXT_TAG.fetch_add(1, Ordering::Relaxed),
            offset,
            masks: HashMap::new(),
            key_masks: HashMap::new(),
            rope_tables: HashMap::new(),
            dropouts: 0,
            head: Head::Logits,
            head_result: None,
            checkpointing: None,
            recording: RefCell::new(None),
            open_blocks: Vec::new(),
            tuner_depth: 0,
            weights_snapshot: None,
            block_anchor: None,
            row_adapters: None,
            overlay: None,
            collected: HashMap::new(),
            aux: AuxOutputs::default(),
            aux_gradients: false,
            tokens_shape: None,
        }
    }

    /// This session with its auxiliary outputs differentiated (see
    /// [`Op::AuxOutput`]): blocks that collect tensors stay connected.
    pub fn with_aux_gradients(mut self, on: bool) -> GraphSession<'a> {
        self.aux_gradients = on;
        self
    }

    /// Sets the `[batch, seq]` of the forward pass's tokens, which
    /// [`Op::TokenMask`] covers ([`run_model`](Self::run_model) takes it
    /// from `input_ids`).
    pub fn set_tokens_shape(&mut self, shape: (usize, usize)) {
        self.tokens_shape = Some(shape);
    }

    /// The auxiliary outputs the forward pass reported.
    pub fn aux_outputs(&self) -> &AuxOutputs {
        &self.aux
    }

    /// Takes the auxiliary outputs out of the session (at its end).
    pub fn take_aux_outputs(&mut self) -> AuxOutputs {
        std::mem::take(&mut self.aux)
    }

    /// Adds tensors a block collected (see [`Op::Collect`]).
    pub(crate) fn merge_collected(&mut self, collected: Vec<(String, Tensor)>) {
        for (key, t) in collected {
            self.collected.entry(key).or_default().push(t);
        }
    }

    /// Takes what this session collected, in collection order per key.
    pub(crate) fn take_collected(&mut self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (key, ts) in std::mem::take(&mut self.collected) {
            out.extend(ts.into_iter().map(|t| (key.clone(), t)));
        }
        out
    }

    /// This session with its blocks checkpointed (see
    /// [`checkpoint`](super::checkpoint)).
    pub fn with_checkpointing(mut self, checkpointing: Option<Checkpointing>) -> GraphSession<'a> {
        self.checkpointing = checkpointing;
        self
    }

    /// Sets this (fresh) session up to replay a recorded block: the
    /// recording session's tag, the handles the block read, its input at
    /// `first_index`, and the dropout count before it.
    pub(crate) fn restore(
        &mut self,
        tag: u32,
        first_index: usize,
        captured: &[(usize, Tensor)],
        input: &Tensor,
        dropouts: u64,
    ) {
        self.tag = tag;
        self.arena = vec![None; first_index];
        for (index, t) in captured {
            self.arena[*index] = Some(t.clone());
        }
        self.arena.push(Some(input.clone()));
        self.dropouts = dropouts;
    }

    /// This session with `adapters` chosen per row at the linear hook
    /// (instead of one tuner for the whole batch).
    pub fn with_row_adapters(mut self, adapters: Option<&'a RowAdapters<'a>>) -> GraphSession<'a> {
        self.row_adapters = adapters;
        self
    }

    /// This session with the output head computing `head`.
    pub fn with_head(mut self, head: Head<'a>) -> GraphSession<'a> {
        self.head = head;
        self
    }

    /// Whether the plugin projected with the output-head op (so the
    /// output is what [`Head`] asked for), rather than a plain `linear`
    /// (so the output is logits at every position).
    pub fn ran_output_head(&self) -> bool {
        self.head_result.is_some()
    }

    /// Puts a host tensor in the arena (a model input) and returns its handle.
    pub fn insert(&mut self, t: Tensor) -> TensorId {
        let index = self.arena.len() as u64;
        self.arena.push(Some(t));
        TensorId(((self.tag as u64) << 32) | index)
    }

    /// The tensor behind a handle.
    pub fn get(&self, id: TensorId) -> Result<&Tensor, OpError> {
        if (id.0 >> 32) as u32 != self.tag {
            return Err(OpError::StaleHandle(id.0));
        }
        let index = (id.0 & 0xffff_ffff) as usize;
        match self.arena.get(index) {
            Some(Some(t)) => {
                if let Some(recording) = self.recording.borrow_mut().as_mut() {
                    recording.read(index, t);
                }
                Ok(t)
            }
            Some(None) => Err(OpError::Invalid {
                op: "handle",
                message: format!("tensor handle {:#x} was released by the plugin", id.0),
            }),
            None => Err(OpError::StaleHandle(id.0)),
        }
    }

    /// The parameter `name` (a served adapter's first, then the model's; a
    /// quantised weight dequantised).
    fn weight(&self, name: &str) -> Result<Tensor, OpError> {
        if let Some(t) = self.overlay.and_then(|o| o.get(name)) {
            return Ok(t.clone());
        }
        let weights = self.ctx.weights;
        match weights.dense(name, weights.dtype()) {
            Some(t) => t.map_err(|source| OpError::Candle { op: "weight", source: source }),
            None => Err(OpError::MissingWeight(name.to_owned())),
        }
    }

    /// Executes one op and returns its result's handle.
    pub fn apply(&mut self, op: &Op) -> Result<TensorId, OpError> {
        let plugin_level = self.tuner_depth == 0;
        let (recording, nested) = match self.recording.get_mut() {
            Some(r) => (true, r.nested),
            None => (false, 0),
        };
        match op {
            Op::BlockBegin { x } if plugin_level && !recording && self.checkpointing.is_some() => {
                return self.begin_block(*x);
            }
            Op::BlockEnd { x } if plugin_level && recording && nested == 0 => return self.end_block(*x),
            _ => {}
        }
        let t = self.execute(op)?;
        let id = self.insert(t);
        if let Op::OutputHead { .. } = op {
            self.head_result = Some(id);
        }
        if plugin_level && !recording {
            let index = (id.0 & 0xffff_ffff) as usize;
            match op {
                Op::BlockBegin { .. } => self.open_blocks.push(index),
                Op::BlockEnd { .. } => {
                    // The handles the block made are released (the block's
                    // contract); autograd keeps what a backward pass needs.
                    if let Some(start) = self.open_blocks.pop() {
                        self.arena[start..index].iter_mut().for_each(|slot| *slot = None);
                    }
                }
                _ => {}
            }
        }
        if let Some(recording) = self.recording.get_mut().as_mut().filter(|_| plugin_level) {
            match op {
                Op::BlockBegin { .. } => recording.nested += 1,
                Op::BlockEnd { .. } => recording.nested = recording.nested.saturating_sub(1),
                _ => {}
            }
            recording.tape.push((op.clone(), id));
        }
        Ok(id)
    }

    /// Starts recording a block.
    fn begin_block(&mut self, x: TensorId) -> Result<TensorId, OpError> {
        let outer = self.get(x)?.clone();
        let id = self.insert(outer.detach());
        *self.recording.get_mut() = Some(Recording {
            first_index: (id.0 & 0xffff_ffff) as usize,
            outer_input: outer,
            tape: Vec::new(),
            captured: Vec::new(),
            reads_tracked: false,
            dropouts: self.dropouts,
            nested: 0,
            collected: Vec::new(),
            connect: false,
        });
        Ok(id)
    }

    /// Ends the block being recorded: its output enters the graph as one
    /// checkpointed op on its input, and the handles made inside are
    /// released.
    fn end_block(&mut self, y: TensorId) -> Result<TensorId, OpError> {
        let output = self.get(y)?.clone();
        let recording = self.recording.get_mut().take().expect("checked by the caller");
        let checkpointing = self.checkpointing.clone().expect("recording implies checkpointing");
        let weights = self.weights_snapshot.get_or_insert_with(|| Arc::new(self.ctx.weights.clone())).clone();
        let replay = Replay {
            tag: self.tag,
            first_index: recording.first_index,
            captured: recording.captured,
            tape: recording.tape,
            output: y,
            dropouts: recording.dropouts,
            batch: self.ctx.batch.clone(),
            weights,
            tuner: checkpointing.tuner,
            aux_gradients: self.aux_gradients,
        };
        for slot in &mut self.arena[recording.first_index..] {
            *slot = None;
        }
        let candle = |source| OpError::Candle { op: "block", source: source };
        let result = if !output.track_op() && !recording.outer_input.track_op() {
            // Nothing in or inside needs a gradient: no graph to cut.
            self.merge_collected(recording.collected);
            output
        } else if recording.reads_tracked || recording.connect {
            // The block reads a tracked tensor besides its input, or
            // collects one the loss differentiates: run it again,
            // connected, and keep its activations.
            let (output, collected) = replay.run_collecting(&recording.outer_input)?;
            self.merge_collected(collected);
            output
        } else {
            self.merge_collected(recording.collected);
            let anchor = match &self.block_anchor {
                Some(anchor) => anchor.clone(),
                None => {
                    let var = candle_core::Var::zeros(1, output.dtype(), output.device()).map_err(candle)?;
                    self.block_anchor.insert(var.as_tensor().clone()).clone()
                }
            };
            let block = Block { output: HandOver::new(output.detach()), replay, grads: checkpointing.grads };
            recording.outer_input.apply_op2(&anchor, block).map_err(candle)?
        };
        Ok(self.insert(result))
    }

    /// Runs a model plugin's forward pass on named inputs and returns its output.
    pub fn run_model(&mut self, model: &abi::ModelBox, inputs: &[(&str, Tensor)]) -> Result<Tensor, OpError> {
        self.tokens_shape = inputs.iter().find(|(name, _)| *name == "input_ids").and_then(|(_, t)| t.dims2().ok());
        let named: Vec<NamedTensor> =
            inputs.iter().map(|(name, t)| NamedTensor { name: (*name).into(), id: self.insert(t.clone()) }).collect();
        let out = model.forward(self.as_graph_ref(), named.as_slice().into()).into_result();
        let id = out.map_err(|e| OpError::Plugin(e.into_string()))?;
        match self.head_result {
            Some(head) if head != id && !matches!(self.head, Head::Logits) => Err(OpError::Invalid {
                op: "output_head",
                message: "the forward pass returned something other than the output head's result; return it unchanged"
                    .into(),
            }),
            _ => self.get(id).cloned(),
        }
    }

    /// This session as the FFI graph handle a plugin receives.
    pub fn as_graph_ref(&mut self) -> GraphRef<'_> {
        GraphHost_TO::from_ptr(self, TD_Opaque)
    }

    fn execute(&mut self, op: &Op) -> Result<Tensor, OpError> {
        let name = op_name(op);
        let candle = |source| OpError::Candle { op: name, source: source };
        match op {
            Op::Weight { name } => self.weight(name),
            Op::Embedding { name, ids } => {
                let table_name = format!("{name}.weight");
                if let Some(table) = self.ctx.weights.quantized(&table_name).cloned() {
                    // A quantised table: only the rows looked up are dequantised.
                    let ids = self.get(*ids)?;
                    let mut out_shape = ids.dims().to_vec();
                    out_shape.push(table.dims().1);
                    let flat =
                        ids.flatten_all().and_then(|t| t.to_dtype(DType::U32)?.to_vec1::<u32>()).map_err(candle)?;
                    let dtype = self.ctx.weights.dtype();
                    return table.gather(&flat, dtype, ids.device()).and_then(|t| t.reshape(out_shape)).map_err(candle);
                }
                let table = self.weight(&table_name)?;
                let ids = self.get(*ids)?;
                let mut out_shape = ids.dims().to_vec();
                out_shape.push(table.dim(1).map_err(candle)?);
                let flat = ids.flatten_all().map_err(candle)?;
                table.index_select(&flat, 0).and_then(|t| t.reshape(out_shape)).map_err(candle)
            }
            Op::Linear { name, x } => self.linear(name, *x),
            Op::OutputHead { name, x, softcap } => self.output_head(name, *x, *softcap),
            // Without checkpointing (or nested) a block is the identity.
            Op::BlockBegin { x } | Op::BlockEnd { x } => Ok(self.get(*x)?.clone()),
            Op::RmsNorm { name, x, eps } => self.rms_norm(name, *x, *eps, 0.0),
            Op::RmsNormOffset { name, x, eps, offset } => self.rms_norm(name, *x, *eps, *offset),
            Op::LayerNorm { name, x, eps } => {
                let w = self.weight(&format!("{name}.weight"))?;
                let b = self.ctx.weights.get(&format!("{name}.bias"));
                ops::layer_norm(self.get(*x)?, &w, b, *eps).map_err(candle)
            }
            Op::Neg { x } => self.get(*x)?.neg().map_err(candle),
            Op::Exp { x } => self.get(*x)?.exp().map_err(candle),
            Op::Log { x } => self.get(*x)?.log().map_err(candle),
            Op::Sqrt { x } => self.get(*x)?.sqrt().map_err(candle),
            Op::Recip { x } => self.get(*x)?.recip().map_err(candle),
            Op::Abs { x } => self.get(*x)?.abs().map_err(candle),
            Op::Sqr { x } => self.get(*x)?.sqr().map_err(candle),
            Op::Tanh { x } => self.get(*x)?.tanh().map_err(candle),
            Op::Sigmoid { x } => ops::sigmoid(self.get(*x)?).map_err(candle),
            Op::Silu { x } => {
                let x = self.get(*x)?;
                match (x.device().is_cpu(), x.dtype()) {
                    (true, DType::F32 | DType::F64) => oxtune_kernels::silu(x),
                    _ => x.silu(),
                }
                .map_err(candle)
            }
            Op::Gelu { x } => self.get(*x)?.gelu().map_err(candle),
            Op::GeluErf { x } => self.get(*x)?.gelu_erf().map_err(candle),
            Op::Relu { x } => self.get(*x)?.relu().map_err(candle),
            Op::Sin { x } => self.get(*x)?.sin().map_err(candle),
            Op::Cos { x } => self.get(*x)?.cos().map_err(candle),
            Op::Affine { x, mul, add } => self.get(*x)?.affine(*mul, *add).map_err(candle),
            Op::PowScalar { x, exponent } => self.get(*x)?.powf(*exponent).map_err(candle),
            Op::Clamp { x, min, max } => self.get(*x)?.clamp(*min, *max).map_err(candle),
            Op::Add { a, b } => self.get(*a)?.broadcast_add(self.get(*b)?).map_err(candle),
            Op::Sub { a, b } => self.get(*a)?.broadcast_sub(self.get(*b)?).map_err(candle),
            Op::Mul { a, b } => self.get(*a)?.broadcast_mul(self.get(*b)?).map_err(candle),
            Op::Div { a, b } => self.get(*a)?.broadcast_div(self.get(*b)?).map_err(candle),
            Op::Maximum { a, b } => self.get(*a)?.broadcast_maximum(self.get(*b)?).map_err(candle),
            Op::Minimum { a, b } => self.get(*a)?.broadcast_minimum(self.get(*b)?).map_err(candle),
            Op::Sum { x, dim, keepdim } => self.reduce(name, *x, *dim, *keepdim, |t, d| t.sum_keepdim(d)),
            Op::Mean { x, dim, keepdim } => self.reduce(name, *x, *dim, *keepdim, |t, d| t.mean_keepdim(d)),
            Op::Max { x, dim, keepdim } => self.reduce(name, *x, *dim, *keepdim, |t, d| t.max_keepdim(d)),
            Op::Min { x, dim, keepdim } => self.reduce(name, *x, *dim, *keepdim, |t, d| t.min_keepdim(d)),
            Op::ArgMax { x, dim, keepdim } => self.reduce(name, *x, *dim, *keepdim, |t, d| t.argmax_keepdim(d)),
            Op::Softmax { x, dim } => {
                let t = self.get(*x)?;
                ops::softmax(t, dim_index(name, *dim, t.rank())?).map_err(candle)
            }
            Op::LogSoftmax { x, dim } => {
                let t = self.get(*x)?;
                ops::log_softmax(t, dim_index(name, *dim, t.rank())?).map_err(candle)
            }
            Op::Matmul { a, b } => {
                let (a, b) = (self.get(*a)?.contiguous().map_err(candle)?, self.get(*b)?);
                // candle's kernels take a batched right operand contiguous or
                // with its last two dims transposed (`k.transpose(-1, -2)`
                // of a contiguous `k`); anything else (the transpose of a
                // head-split view) is copied first.
                let plain = b.rank() <= 2 || b.is_contiguous() || b.t().map_err(candle)?.is_contiguous();
                let b = if plain { b.clone() } else { b.contiguous().map_err(candle)? };
                a.broadcast_matmul(&b).map_err(candle)
            }
            Op::Reshape { x, shape } => {
                let t = self.get(*x)?;
                let dims = resolve_shape(name, shape, t.elem_count())?;
                t.reshape(dims).map_err(candle)
            }
            Op::Transpose { x, dim0, dim1 } => {
                let t = self.get(*x)?;
                let (d0, d1) = (dim_index(name, *dim0, t.rank())?, dim_index(name, *dim1, t.rank())?);
                t.transpose(d0, d1).map_err(candle)
            }
            Op::Permute { x, dims } => {
                let t = self.get(*x)?;
                if dims.len() != t.rank() {
                    return Err(OpError::Invalid {
                        op: name,
                        message: format!("{} dims given for a rank-{} tensor", dims.len(), t.rank()),
                    });
                }
                let dims = dims.iter().map(|&d| dim_index(name, d, t.rank())).collect::<Result<Vec<_>, _>>()?;
                t.permute(dims).map_err(candle)
            }
            Op::Narrow { x, dim, start, len } => {
                let t = self.get(*x)?;
                t.narrow(dim_index(name, *dim, t.rank())?, *start as usize, *len as usize).map_err(candle)
            }
            Op::Cat { xs, dim } => {
                let ts = xs.iter().map(|id| self.get(*id)).collect::<Result<Vec<_>, _>>()?;
                let first = ts.first().ok_or(OpError::Invalid { op: name, message: "no tensors given".into() })?;
                Tensor::cat(&ts, dim_index(name, *dim, first.rank())?).map_err(candle)
            }
            Op::IndexSelect { x, ids, dim } => {
                let t = self.get(*x)?;
                t.index_select(self.get(*ids)?, dim_index(name, *dim, t.rank())?).map_err(candle)
            }
            Op::BroadcastAs { x, shape } => {
                let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                self.get(*x)?.broadcast_as(dims).map_err(candle)
            }
            Op::ToDType { x, dtype } => {
                let dt = to_candle_dtype(*dtype)
                    .ok_or_else(|| OpError::Invalid { op: name, message: format!("unknown dtype code {}", dtype.0) })?;
                self.get(*x)?.to_dtype(dt).map_err(candle)
            }
            Op::Detach { x } => Ok(self.get(*x)?.detach()),
            Op::Dropout { x, p } => self.dropout(*x, *p),
            Op::LowRankUpdate { base, x, a, b, scale, dropout } => {
                let mask = self.dropout_mask(*dropout)?;
                let (base, x, a, b) = (self.get(*base)?, self.get(*x)?, self.get(*a)?, self.get(*b)?);
                super::fused::low_rank_update(base, x, a, b, *scale, mask).map_err(candle)
            }
            Op::Release { xs, keep } => {
                // Every handle in `xs` is given up, `keep`'s too when it is
                // listed: the caller goes on with the new handle returned.
                let kept = self.get(*keep)?.clone();
                for id in xs.iter() {
                    if id == keep && self.get(*id).is_err() {
                        continue; // `keep` listed twice
                    }
                    self.get(*id)?;
                    self.arena[(id.0 & 0xffff_ffff) as usize] = None;
                }
                Ok(kept)
            }
            Op::Constant { values, shape, dtype } => {
                let dt = to_candle_dtype(*dtype)
                    .ok_or_else(|| OpError::Invalid { op: name, message: format!("unknown dtype code {}", dtype.0) })?;
                let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                if dims.iter().product::<usize>() != values.len() {
                    return Err(OpError::Invalid {
                        op: name,
                        message: format!("{} values for shape {dims:?}", values.len()),
                    });
                }
                let device = self.ctx.weights.device();
                Tensor::from_slice(values.as_slice(), dims, &device).and_then(|t| t.to_dtype(dt)).map_err(candle)
            }
            Op::Rope { x, inv_freq, interleaved, scale } => self.rope(*x, inv_freq, *interleaved, *scale),
            Op::Attention { layer, q, k, v, causal, scale, sliding_window, softcap } => {
                let spec = MaskSpec { causal: *causal, sliding_window: *sliding_window };
                self.attention(*layer, *q, *k, *v, spec, *scale, *softcap)
            }
            Op::TopK { x, k } => {
                let t = self.get(*x)?;
                let last =
                    t.rank().checked_sub(1).ok_or(OpError::Invalid { op: name, message: "scalar input".into() })?;
                let n = t.dim(last).map_err(candle)?;
                if *k == 0 || *k as usize > n {
                    return Err(OpError::Invalid { op: name, message: format!("k = {k} of a last dim of {n}") });
                }
                t.contiguous().and_then(|t| t.arg_sort_last_dim(false)?.narrow(last, 0, *k as usize)).map_err(candle)
            }
            Op::Gather { x, ids, dim } => {
                let t = self.get(*x)?;
                t.gather(&self.get(*ids)?.contiguous().map_err(candle)?, dim_index(name, *dim, t.rank())?)
                    .map_err(candle)
            }
            Op::IndexAdd { x, ids, src, dim } => {
                let t = self.get(*x)?;
                let d = dim_index(name, *dim, t.rank())?;
                let (ids, src) = (self.get(*ids)?, self.get(*src)?);
                t.contiguous().and_then(|t| t.index_add(ids, src, d)).map_err(candle)
            }
            Op::Compare { a, b, cmp } => {
                let (a, b) = (self.get(*a)?, self.get(*b)?);
                match *cmp {
                    abi::Compare::EQ => a.broadcast_eq(b),
                    abi::Compare::NE => a.broadcast_ne(b),
                    abi::Compare::LT => a.broadcast_lt(b),
                    abi::Compare::LE => a.broadcast_le(b),
                    abi::Compare::GT => a.broadcast_gt(b),
                    abi::Compare::GE => a.broadcast_ge(b),
                    other => {
                        return Err(OpError::Invalid {
                            op: name,
                            message: format!("unknown comparison code {}", other.0),
                        })
                    }
                }
                .map_err(candle)
            }
            Op::Where { cond, a, b } => {
                let (cond, a, b) = (self.get(*cond)?, self.get(*a)?, self.get(*b)?);
                let shape = cond
                    .shape()
                    .broadcast_shape_binary_op(a.shape(), name)
                    .and_then(|s| s.broadcast_shape_binary_op(b.shape(), name))
                    .map_err(candle)?;
                let [cond, a, b] = [cond, a, b].map(|t| t.broadcast_as(shape.clone()));
                cond.and_then(|c| c.where_cond(&a?, &b?)).map_err(candle)
            }
            Op::GroupedLinear { names, x, groups } => self.grouped_linear(names, *x, *groups),
            Op::Collect { key, x } => {
                let t = self.get(*x)?.clone();
                let kept = if self.aux_gradients { t.clone() } else { t.detach() };
                match self.recording.get_mut() {
                    Some(recording) => {
                        // Cut from the graph, the block would hand the aux
                        // loss's gradient neither to its input nor below.
                        recording.connect |= self.aux_gradients;
                        recording.collected.push((key.to_string(), kept));
                    }
                    None => self.collected.entry(key.to_string()).or_default().push(kept),
                }
                Ok(t)
            }
            Op::Collected { key } => match self.collected.get(key.as_str()) {
                Some(ts) if !ts.is_empty() => Tensor::cat(ts, 0).map_err(candle),
                _ => Err(OpError::Invalid { op: name, message: format!("nothing was collected under `{key}`") }),
            },
            Op::AuxOutput { name: output, x } => {
                let t = self.get(*x)?.clone();
                self.aux.0.retain(|(n, _)| n != output.as_str());
                self.aux.0.push((output.to_string(), t.clone()));
                Ok(t)
            }
            Op::TokenMask {} => self.token_mask(),
            // A variant from a newer API that this host predates.
            _ => Err(OpError::UnsupportedOp { host: oxtune_plugin_api::API_VERSION }),
        }
    }

    fn reduce(
        &self,
        op: &'static str,
        x: TensorId,
        dim: i64,
        keepdim: bool,
        f: impl Fn(&Tensor, usize) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor, OpError> {
        let t = self.get(x)?;
        let d = dim_index(op, dim, t.rank())?;
        let out = f(t, d).and_then(|r| if keepdim { Ok(r) } else { r.squeeze(d) });
        out.map_err(|source| OpError::Candle { op, source: source })
    }

    fn linear(&mut self, name: &str, x: TensorId) -> Result<Tensor, OpError> {
        let candle = |source| OpError::Candle { op: "linear", source: source };
        let weight_name = format!("{name}.weight");
        let weight = match self.ctx.weights.quantized(&weight_name) {
            Some(q) => LinearWeight::Quantized(q.clone()),
            None => LinearWeight::Dense(self.weight(&weight_name)?),
        };
        let b = self.ctx.weights.get(&format!("{name}.bias"));
        let input = self.get(x)?;
        let dims = input.dims().to_vec();
        let in_features = *dims.last().ok_or(OpError::Invalid { op: "linear", message: "scalar input".into() })?;
        let (out_features, weight_in) = match &weight {
            LinearWeight::Quantized(q) => q.dims(),
            LinearWeight::Dense(w) => w.dims2().map_err(candle)?,
        };
        if weight_in != in_features {
            return Err(OpError::Invalid {
                op: "linear",
                message: format!(
                    "`{name}.weight` is [{out_features}, {weight_in}] but its input has {in_features} features (input shape {dims:?})"
                ),
            });
        }
        let rows = input.elem_count() / in_features.max(1);
        let x2 = input.reshape((rows, in_features)).map_err(candle)?;
        // The two kernels below are CPU code; other devices run candle's matmul.
        let cpu = x2.device().is_cpu();
        let mut y = match &weight {
            // A quantised (frozen) weight: dequantised a panel at a time.
            LinearWeight::Quantized(q) => crate::quant::linear(&x2, q).map_err(candle)?,
            LinearWeight::Dense(w) => {
                // Decoding (a few rows, no gradient): a streaming kernel instead of gemm.
                let fast = cpu && rows <= 8 && w.dtype() == DType::F32 && !input.track_op() && !w.track_op();
                if fast {
                    oxtune_kernels::matvec(&x2.contiguous().map_err(candle)?, w).map_err(candle)?
                } else if cpu && !w.track_op() && (input.track_op() || matches!(w.dtype(), DType::BF16 | DType::F16)) {
                    // Training through a frozen weight: no gradient for the
                    // weight. A bf16/f16 weight goes this way without a
                    // gradient too: it multiplies in f32 a panel at a time.
                    oxtune_kernels::frozen_linear(&x2.contiguous().map_err(candle)?, w).map_err(candle)?
                } else {
                    x2.matmul(&w.t().map_err(candle)?).map_err(candle)?
                }
            }
        };
        if let Some(b) = b {
            y = y.broadcast_add(b).map_err(candle)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank checked above") = y.dim(1).map_err(candle)?;
        let base = y.reshape(out_dims).map_err(candle)?;
        match self.ctx.tuner {
            Some(tuner) if tuner.targets(name) => {
                let base_id = self.insert(base);
                self.tuner_depth += 1;
                let out = tuner.instance.forward(self.as_graph_ref(), name.into(), x, base_id).into_result();
                self.tuner_depth -= 1;
                let id = out.map_err(|e| OpError::Plugin(e.into_string()))?;
                self.get(id).cloned()
            }
            _ => match self.row_adapters {
                Some(rows) => self.row_adapted(name, x, base, rows),
                None => Ok(base),
            },
        }
    }

    /// `base` (the output of linear layer `name` for `x`) plus, on each
    /// group's rows, what the group's adapter adds there.
    fn row_adapted(
        &mut self,
        name: &str,
        x: TensorId,
        base: Tensor,
        rows: &'a RowAdapters<'a>,
    ) -> Result<Tensor, OpError> {
        let candle = |source| OpError::Candle { op: "linear", source: source };
        let input = self.get(x)?.clone();
        let mut out = base.clone();
        for (adapter, index, others) in &rows.groups {
            if !adapter.binding.targets(name) {
                continue;
            }
            let picked_x = self.insert(input.index_select(index, 0).map_err(candle)?);
            let base_id = self.insert(base.index_select(index, 0).map_err(candle)?);
            self.tuner_depth += 1;
            self.overlay = Some(&adapter.weights);
            let result =
                adapter.binding.instance.forward(self.as_graph_ref(), name.into(), picked_x, base_id).into_result();
            self.overlay = None;
            self.tuner_depth -= 1;
            let id = result.map_err(|e| OpError::Plugin(e.into_string()))?;
            // The group's rows become the tuner's output exactly: zeroed,
            // then its rows added.
            let mut shape = vec![1usize; out.rank()];
            shape[0] = others.elem_count();
            let others = others.to_dtype(out.dtype()).and_then(|o| o.reshape(shape)).map_err(candle)?;
            let tuned = self.get(id)?.clone();
            out = out.broadcast_mul(&others).and_then(|o| o.index_add(index, &tuned, 0)).map_err(candle)?;
        }
        Ok(out)
    }

    fn output_head(&mut self, name: &str, x: TensorId, softcap: f32) -> Result<Tensor, OpError> {
        let candle = |source| OpError::Candle { op: "output_head", source: source };
        let softcap = (softcap > 0.0).then_some(softcap as f64);
        let input = self.get(x)?.clone();
        let (b, s, hidden) = input.dims3().map_err(candle)?;
        let labels = match self.head {
            Head::Logits => return self.head_logits(name, x, softcap),
            Head::LastLogits => {
                let last = self.insert(input.narrow(1, s.saturating_sub(1), 1).map_err(candle)?);
                return self.head_logits(name, last, softcap);
            }
            Head::LabelLogProbs(labels) => labels,
        };
        let w = self.weight(&format!("{name}.weight"))?;
        let targets = crate::loss::next_token_targets(labels, (b, s), w.dim(0).map_err(candle)?).map_err(candle)?;
        let flat = input.reshape((b * s, hidden)).map_err(candle)?;
        let tuned = self.ctx.tuner.is_some_and(|t| t.targets(name));
        let biased = self.ctx.weights.get(&format!("{name}.bias")).is_some();
        let logps = if flat.device().is_cpu() && !tuned && !biased {
            // The chunked kernel: no logits, unlabelled rows skipped.
            let (x, w) = match (flat.dtype(), w.dtype()) {
                (DType::F32, DType::F32) | (DType::F64, DType::F64) => (flat, w),
                _ => (flat.to_dtype(DType::F32).map_err(candle)?, w.to_dtype(DType::F32).map_err(candle)?),
            };
            oxtune_kernels::label_log_probs(&x, &w, &targets, softcap).and_then(|t| t.to_dtype(DType::F32))
        } else {
            // Any device, any tuner: the labelled rows only, through the linear hook.
            let (rows, ids): (Vec<u32>, Vec<u32>) =
                targets.iter().enumerate().filter_map(|(r, t)| t.map(|t| (r as u32, t))).unzip();
            let device = flat.device().clone();
            let zeros = Tensor::zeros(b * s, DType::F32, &device).map_err(candle)?;
            if rows.is_empty() {
                Ok(zeros)
            } else {
                let rows = Tensor::new(rows, &device).map_err(candle)?;
                let picked = flat.index_select(&rows, 0).and_then(|t| t.unsqueeze(0)).map_err(candle)?;
                let picked = self.insert(picked);
                let logits = self.head_logits(name, picked, softcap)?;
                let ids = Tensor::new(ids, &device).and_then(|t| t.unsqueeze(1)).map_err(candle)?;
                logits
                    .squeeze(0)
                    .and_then(|l| ops::log_softmax(&l.to_dtype(DType::F32)?, 1))
                    .and_then(|l| l.gather(&ids, 1)?.squeeze(1))
                    .and_then(|l| zeros.index_add(&rows, &l, 0))
            }
        };
        logps.and_then(|l| l.reshape((b, s))?.narrow(1, 0, s - 1)).map_err(candle)
    }

    /// Logits of the output head `name` for `x`, through the tuner hook.
    fn head_logits(&mut self, name: &str, x: TensorId, softcap: Option<f64>) -> Result<Tensor, OpError> {
        let logits = self.linear(name, x)?;
        match softcap {
            Some(cap) => (logits / cap)
                .and_then(|z| z.tanh()?.affine(cap, 0.0))
                .map_err(|source| OpError::Candle { op: "output_head", source: source }),
            None => Ok(logits),
        }
    }

    /// Row `r` of `x` through linear layer `names[groups[r]]`: the rows of
    /// each group gathered, the group's layer applied (tuner hook
    /// included), the results put back in row order.
    fn grouped_linear(&mut self, names: &[RString], x: TensorId, groups: TensorId) -> Result<Tensor, OpError> {
        let candle = |source| OpError::Candle { op: "grouped_linear", source: source };
        let invalid = |message: String| OpError::Invalid { op: "grouped_linear", message };
        let input = self.get(x)?.clone();
        let (rows, _) =
            input.dims2().map_err(|_| invalid(format!("x must be [rows, features], not {:?}", input.dims())))?;
        let groups =
            self.get(groups)?.flatten_all().and_then(|g| g.to_dtype(DType::U32)?.to_vec1::<u32>()).map_err(candle)?;
        if groups.len() != rows {
            return Err(invalid(format!("{} group ids for {rows} rows", groups.len())));
        }
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); names.len()];
        for (row, &g) in groups.iter().enumerate() {
            members
                .get_mut(g as usize)
                .ok_or_else(|| invalid(format!("row {row} names group {g} of {} layers", names.len())))?
                .push(row as u32);
        }
        let device = input.device().clone();
        let (mut outputs, mut order) = (Vec::new(), Vec::with_capacity(rows));
        for (name, rows_of) in names.iter().zip(&members).filter(|(_, m)| !m.is_empty()) {
            let index = Tensor::new(rows_of.as_slice(), &device).map_err(candle)?;
            let picked = self.insert(input.index_select(&index, 0).map_err(candle)?);
            outputs.push(self.linear(name, picked)?);
            order.extend_from_slice(rows_of);
        }
        if outputs.is_empty() {
            return Err(invalid("no rows".into()));
        }
        // Back to row order: where each row landed in the concatenation.
        let mut position = vec![0u32; rows];
        order.iter().enumerate().for_each(|(at, &row)| position[row as usize] = at as u32);
        let position = Tensor::new(position, &device).map_err(candle)?;
        Tensor::cat(&outputs, 0).and_then(|t| t.index_select(&position, 0)).map_err(candle)
    }

    /// RMSNorm of `x` scaled by `{name}.weight + offset`.
    fn rms_norm(&self, name: &str, x: TensorId, eps: f64, offset: f64) -> Result<Tensor, OpError> {
        let candle = |source| OpError::Candle { op: "rms_norm", source: source };
        let mut w = self.weight(&format!("{name}.weight"))?;
        if offset != 0.0 {
            w = w.affine(1.0, offset).map_err(candle)?;
        }
        let x = self.get(x)?;
        match (x.device().is_cpu(), x.dtype(), w.dtype()) {
            (true, DType::F32, DType::F32) | (true, DType::F64, DType::F64) => {
                oxtune_kernels::rms_norm(x, &w, eps).map_err(candle)
            }
            // bf16/f16: the one-pass kernel in f32, rounded back once.
            (true, DType::BF16 | DType::F16, _) => {
                let widened = (x.to_dtype(DType::F32), w.to_dtype(DType::F32));
                let (xf, wf) = (widened.0.map_err(candle)?, widened.1.map_err(candle)?);
                oxtune_kernels::rms_norm(&xf, &wf, eps).and_then(|y| y.to_dtype(x.dtype())).map_err(candle)
            }
            _ => ops::rms_norm(x, &w, eps).map_err(candle),
        }
    }

    /// `[batch, seq]` f32: 1 at real tokens, 0 at padding.
    fn token_mask(&self) -> Result<Tensor, OpError> {
        let candle = |source| OpError::Candle { op: "token_mask", source: source };
        let (b, s) = self.tokens_shape.ok_or(OpError::Invalid {
            op: "token_mask",
            message: "the forward pass has no `input_ids` to take the shape from".into(),
        })?;
        match &self.ctx.batch.attention_mask {
            Some(mask) => {
                let width = mask.dim(1).map_err(candle)?;
                let new = mask.narrow(1, width.saturating_sub(s), s.min(width)).map_err(candle)?;
                new.ne(0u32).and_then(|m| m.to_dtype(DType::F32)).map_err(candle)
            }
            None => Tensor::ones((b, s), DType::F32, &self.ctx.weights.device()).map_err(candle),
        }
    }

    fn dropout(&mut self, x: TensorId, p: f64) -> Result<Tensor, OpError> {
        let t = self.get(x)?.clone();
        match self.dropout_mask(p)? {
            Some(mask) => {
                super::fused::dropout(&t, mask).map_err(|source| OpError::Candle { op: "dropout", source: source })
            }
            None => Ok(t),
        }
    }

    /// The mask of the forward pass's next dropout of probability `p`:
    /// `None` when not training or `p` is 0. Each dropout of a pass draws
    /// from its own seed (the batch's seed and the dropout's count), so a
    /// replayed block draws the same masks.
    fn dropout_mask(&mut self, p: f64) -> Result<Option<super::fused::DropoutMask>, OpError> {
        if !(0.0..1.0).contains(&p) {
            return Err(OpError::Invalid { op: "dropout", message: format!("p = {p} is not in [0, 1)") });
        }
        let Some(seed) = self.ctx.batch.dropout_seed.filter(|_| p > 0.0) else { return Ok(None) };
        self.dropouts += 1;
        Ok(Some(super::fused::DropoutMask { seed: seed ^ self.dropouts.wrapping_mul(0x9E37_79B9_7F4A_7C15), p }))
    }

    fn positions(&self, batch: usize, seq: usize, device: &Device) -> Result<Tensor, OpError> {
        if let Some(p) = &self.ctx.batch.position_ids {
            return Ok(p.clone());
        }
        let start = self.offset as u32;
        Tensor::arange(start, start + seq as u32, device)
            .and_then(|t| t.unsqueeze(0)?.broadcast_as((batch, seq))?.contiguous())
            .map_err(|source| OpError::Candle { op: "rope", source: source })
    }

    fn rope(&mut self, x: TensorId, inv_freq: &[f32], interleaved: bool, scale: f32) -> Result<Tensor, OpError> {
        let candle = |source| OpError::Candle { op: "rope", source: source };
        let t = self.get(x)?.clone();
        if t.device().is_cpu() && matches!(t.dtype(), DType::BF16 | DType::F16) {
            // The kernel in f32 (transformers rotates in the narrow dtype
            // with f32-built tables: this rounds once instead of twice).
            let wide = t.to_dtype(DType::F32).map_err(candle)?;
            let out = self.rope_of(wide, inv_freq, interleaved, scale);
            return out.and_then(|o| o.to_dtype(t.dtype()).map_err(candle));
        }
        self.rope_of(t, inv_freq, interleaved, scale)
    }

    /// [`Self::rope`] of the tensor `t`.
    fn rope_of(&mut self, t: Tensor, inv_freq: &[f32], interleaved: bool, scale: f32) -> Result<Tensor, OpError> {
        let candle = |source| OpError::Candle { op: "rope", source: source };
        let (b, _, s, _) = t.dims4().map_err(candle)?;
        if !(t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)) {
            let pos = self.positions(b, s, t.device())?;
            let (cos, sin) = ops::rope_tables(&pos, inv_freq, scale, t.dtype()).map_err(candle)?;
            return ops::rope(&t, &cos, &sin, interleaved).map_err(candle);
        }
        // The kernel, with tables built once per session for every layer's q and k.
        let key = (inv_freq.iter().map(|f| f.to_bits()).collect::<Vec<_>>(), scale.to_bits(), b, s);
        let tables = match self.rope_tables.get(&key) {
            Some(tables) => tables.clone(),
            None => {
                let pos = self.positions(b, s, t.device())?;
                let pos = pos.to_dtype(DType::F64).and_then(|p| p.to_vec2::<f64>()).map_err(candle)?;
                let tables = oxtune_kernels::rope::RopeTables::new(&pos, inv_freq, scale);
                self.rope_tables.entry(key).or_insert(tables).clone()
            }
        };
        oxtune_kernels::rope(&t, &tables, interleaved).map_err(candle)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        layer: u32,
        q: TensorId,
        k: TensorId,
        v: TensorId,
        spec: MaskSpec,
        scale: f64,
        softcap: f32,
    ) -> Result<Tensor, OpError> {
        let candle = |source| OpError::Candle { op: "attention", source: source };
        let (q, k, v) = (self.get(q)?.clone(), self.get(k)?.clone(), self.get(v)?.clone());
        let (b, _, s, d) = q.dims4().map_err(candle)?;
        let (k, v) = match self.ctx.cache.as_deref_mut() {
            Some(cache) => cache.append(layer as usize, &k, &v).map_err(candle)?,
            None => (k, v),
        };
        let t = k.dim(2).map_err(candle)?;
        let shape = MaskShape { batch: b, queries: s, keys: t, offset: t - s };
        let scale = if scale == 0.0 { 1.0 / (d as f64).sqrt() } else { scale };
        let softcap = (softcap > 0.0).then_some(softcap as f64);
        if q.device().is_cpu() {
            // Memory linear in the sequence; computed in f32 (or f64).
            if !self.key_masks.contains_key(&(spec, shape)) {
                let mask = key_mask(spec, shape, self.ctx.batch).map_err(candle)?;
                self.key_masks.insert((spec, shape), mask);
            }
            let dtype = q.dtype();
            let compute = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
            // f16 keys and values without a gradient (a KV cache's) are
            // read as they are: the kernel converts them a tile at a time.
            let half_kv = compute == DType::F32 && [&k, &v].iter().all(|t| t.dtype() == DType::F16 && !t.track_op());
            let q = q.to_dtype(compute);
            let [k, v] = [k, v].map(|t| if half_kv { Ok(t) } else { t.to_dtype(compute) });
            let out = oxtune_kernels::flash_attention(
                &q.map_err(candle)?,
                &k.map_err(candle)?,
                &v.map_err(candle)?,
                &self.key_masks[&(spec, shape)],
                scale,
                softcap,
            );
            return out.and_then(|o| o.to_dtype(dtype)).map_err(candle);
        }
        let key = (spec, shape, q.dtype());
        if !self.masks.contains_key(&key) {
            let mask = build_mask(spec, shape, self.ctx.batch, q.dtype(), q.device()).map_err(candle)?;
            self.masks.insert(key, mask);
        }
        let mask = self.masks[&key].as_ref();
        // A KV cache may store keys and values in another dtype.
        let [k, v] = [k, v].map(|t| t.to_dtype(q.dtype()).and_then(|t| t.contiguous()));
        let (k, v) = (k.map_err(candle)?, v.map_err(candle)?);
        ops::attention(&q.contiguous().map_err(candle)?, &k, &v, mask, scale, softcap).map_err(candle)
    }
}

fn resolve_shape(op: &'static str, shape: &[i64], count: usize) -> Result<Vec<usize>, OpError> {
    let invalid = |message: String| OpError::Invalid { op, message };
    let known: i64 = shape.iter().filter(|&&d| d != -1).product();
    let holes = shape.iter().filter(|&&d| d == -1).count();
    if holes > 1 || shape.iter().any(|&d| d < -1) {
        return Err(invalid(format!("invalid shape {shape:?}")));
    }
    shape
        .iter()
        .map(|&d| {
            if d != -1 {
                Ok(d as usize)
            } else if known > 0 && count as i64 % known == 0 {
                Ok((count as i64 / known) as usize)
            } else {
                Err(invalid(format!("cannot infer -1 in {shape:?} for {count} elements")))
            }
        })
        .collect()
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Weight { .. } => "weight",
        Op::Embedding { .. } => "embedding",
        Op::Linear { .. } => "linear",
        Op::RmsNorm { .. } => "rms_norm",
        Op::LayerNorm { .. } => "layer_norm",
        Op::Neg { .. } => "neg",
        Op::Exp { .. } => "exp",
        Op::Log { .. } => "log",
        Op::Sqrt { .. } => "sqrt",
        Op::Recip { .. } => "recip",
        Op::Abs { .. } => "abs",
        Op::Sqr { .. } => "sqr",
        Op::Tanh { .. } => "tanh",
        Op::Sigmoid { .. } => "sigmoid",
        Op::Silu { .. } => "silu",
        Op::Gelu { .. } => "gelu",
        Op::GeluErf { .. } => "gelu_erf",
        Op::Relu { .. } => "relu",
        Op::Sin { .. } => "sin",
        Op::Cos { .. } => "cos",
        Op::Affine { .. } => "affine",
        Op::PowScalar { .. } => "pow",
        Op::Clamp { .. } => "clamp",
        Op::Add { .. } => "add",
        Op::Sub { .. } => "sub",
        Op::Mul { .. } => "mul",
        Op::Div { .. } => "div",
        Op::Maximum { .. } => "maximum",
        Op::Minimum { .. } => "minimum",
        Op::Sum { .. } => "sum",
        Op::Mean { .. } => "mean",
        Op::Max { .. } => "max",
        Op::Min { .. } => "min",
        Op::ArgMax { .. } => "argmax",
        Op::Softmax { .. } => "softmax",
        Op::LogSoftmax { .. } => "log_softmax",
        Op::Matmul { .. } => "matmul",
        Op::Reshape { .. } => "reshape",
        Op::Transpose { .. } => "transpose",
        Op::Permute { .. } => "permute",
        Op::Narrow { .. } => "narrow",
        Op::Cat { .. } => "cat",
        Op::IndexSelect { .. } => "index_select",
        Op::BroadcastAs { .. } => "broadcast_as",
        Op::ToDType { .. } => "to_dtype",
        Op::Detach { .. } => "detach",
        Op::Dropout { .. } => "dropout",
        Op::Constant { .. } => "constant",
        Op::Release { .. } => "release",
        Op::Rope { .. } => "rope",
        Op::Attention { .. } => "attention",
        Op::OutputHead { .. } => "output_head",
        Op::BlockBegin { .. } => "block_begin",
        Op::BlockEnd { .. } => "block_end",
        Op::TopK { .. } => "topk",
        Op::Gather { .. } => "gather",
        Op::IndexAdd { .. } => "index_add",
        Op::Compare { .. } => "compare",
        Op::Where { .. } => "where",
        Op::GroupedLinear { .. } => "grouped_linear",
        Op::Collect { .. } => "collect",
        Op::Collected { .. } => "collected",
        Op::AuxOutput { .. } => "aux_output",
        Op::TokenMask { .. } => "token_mask",
        Op::RmsNormOffset { .. } => "rms_norm_offset",
        Op::LowRankUpdate { .. } => "low_rank_update",
        _ => "unknown op",
    }
}

fn to_rresult<T>(r: Result<T, OpError>) -> RResult<T, RString> {
    match r {
        Ok(v) => RResult::ROk(v),
        // The whole chain: the plugin sees a string, not the error's sources.
        Err(e) => RResult::RErr(crate::error_chain(&e).into()),
    }
}

impl GraphHost for GraphSession<'_> {
    fn apply(&mut self, op: OpCall) -> RResult<TensorId, RString> {
        to_rresult(match op.as_enum() {
            Ok(op) => GraphSession::apply(self, op),
            Err(_) => Err(OpError::UnsupportedOp { host: oxtune_plugin_api::API_VERSION }),
        })
    }

    fn shape(&self, x: TensorId) -> RResult<RVec<u64>, RString> {
        to_rresult(self.get(x).map(|t| t.dims().iter().map(|&d| d as u64).collect()))
    }

    fn dtype(&self, x: TensorId) -> RResult<abi::DType, RString> {
        to_rresult(self.get(x).map(|t| from_candle_dtype(t.dtype())))
    }

    fn has_weight(&self, name: RStr<'_>) -> bool {
        self.overlay.is_some_and(|o| o.contains(name.as_str())) || self.ctx.weights.contains(name.as_str())
    }

    fn read_f32(&self, x: TensorId) -> RResult<RVec<f32>, RString> {
        READ_BACKS.fetch_add(1, Ordering::Relaxed);
        to_rresult(self.get(x).and_then(|t| {
            t.flatten_all()
                .and_then(|f| f.to_dtype(DType::F32))
                .and_then(|f| f.to_vec1::<f32>())
                .map(RVec::from)
                .map_err(|source| OpError::Candle { op: "read_f32", source: source })
        }))
    }
}
