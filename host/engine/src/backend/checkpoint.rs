//! Gradient checkpointing: a block's activations recomputed in the
//! backward pass instead of kept.
//!
//! A plugin marks each repeated unit of its model (a transformer layer)
//! with `BlockBegin` / `BlockEnd`. While checkpointing, the session
//! records the ops the block runs (a *tape*: the plugin's closure is gone
//! by the backward pass, the ops are not), computes the block from a
//! detached copy of its input, and keeps only the output's values. The
//! output enters the graph as one [`Block`] op on the input (and on an
//! anchor, a trainable scalar that puts the op in the graph even when the
//! input needs no gradient: the first layer over a frozen embedding still
//! has LoRA matrices that do); its backward
//! pass replays the tape in a fresh session (same handles, same dropout
//! masks), differentiates the replayed block, hands the input its
//! gradient and puts the gradients of the block's parameters (LoRA
//! matrices, or every weight in full fine-tuning) in [`BlockGradients`],
//! which the trainer adds to the step's gradients. Peak memory is then one
//! block's activations plus every block's input, at the cost of a second
//! forward pass of each block.

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CustomOp2, Tensor, Var};
use oxtune_plugin_api::abi::{Op, TensorId};

use super::hand_over::{hand_over_forwards, HandOver};
use super::session::{ForwardContext, GraphSession, OpError, TunerBinding};
use super::{BatchInfo, WeightStore};

/// Gradients of parameters used inside checkpointed blocks, produced
/// while the backward pass runs; add them to the step's gradients with
/// [`merge_into`](Self::merge_into) after each `backward()`.
#[derive(Debug, Default)]
pub struct BlockGradients {
    pending: Mutex<Vec<(Tensor, Tensor)>>,
}

impl BlockGradients {
    /// An empty collection.
    pub fn new() -> BlockGradients {
        BlockGradients::default()
    }

    fn push(&self, var: &Tensor, grad: &Tensor) {
        self.pending.lock().expect("not poisoned").push((var.clone(), grad.clone()));
    }

    /// Adds every pending gradient to `grads` (summing with what the
    /// backward pass gave the same parameter outside the blocks) and
    /// empties the collection.
    pub fn merge_into(&self, grads: &mut GradStore) -> candle_core::Result<()> {
        let pending = std::mem::take(&mut *self.pending.lock().expect("not poisoned"));
        for (var, grad) in pending {
            let sum = match grads.get(&var) {
                Some(existing) => (existing + grad)?,
                None => grad,
            };
            grads.insert(&var, sum);
        }
        Ok(())
    }
}

/// What a session needs to checkpoint its blocks.
#[derive(Clone)]
pub struct Checkpointing {
    /// Where replayed blocks put their parameters' gradients.
    pub grads: Arc<BlockGradients>,
    /// The tuner at the linear hook, owned, for the replay.
    pub tuner: Option<Arc<TunerBinding>>,
}

/// A block being recorded by the session.
pub(crate) struct Recording {
    /// Arena index of the block's input handle; handles below it were made
    /// before the block.
    pub first_index: usize,
    /// The block's real (tracked) input.
    pub outer_input: Tensor,
    /// The ops the block ran at the plugin's level, with their results.
    pub tape: Vec<(Op, TensorId)>,
    /// Handles from before the block that it read, by arena index.
    pub captured: Vec<(usize, Tensor)>,
    /// Whether one of those needs a gradient: then the block cannot be
    /// cut from the graph.
    pub reads_tracked: bool,
    /// Dropout ops run before the block (so replayed masks match).
    pub dropouts: u64,
    /// `BlockBegin`s inside the block not yet closed (treated as identity).
    pub nested: usize,
    /// What the block collected (see `Op::Collect`), for the session to
    /// keep once the block ends.
    pub collected: Vec<(String, Tensor)>,
    /// Whether the block collected a tensor whose gradient the trainer
    /// needs: then, like `reads_tracked`, it cannot be cut from the graph.
    pub connect: bool,
}

impl Recording {
    /// Notes that the block read the handle at arena `index`.
    pub fn read(&mut self, index: usize, t: &Tensor) {
        if index < self.first_index && !self.captured.iter().any(|(i, _)| *i == index) {
            self.reads_tracked |= t.track_op();
            self.captured.push((index, t.clone()));
        }
    }
}

/// Everything a replay of one recorded block needs, owned.
pub(crate) struct Replay {
    pub tag: u32,
    pub first_index: usize,
    pub captured: Vec<(usize, Tensor)>,
    pub tape: Vec<(Op, TensorId)>,
    pub output: TensorId,
    pub dropouts: u64,
    pub batch: BatchInfo,
    pub weights: Arc<WeightStore>,
    pub tuner: Option<Arc<TunerBinding>>,
    /// Whether collected tensors keep their gradient (see `Op::Collect`).
    pub aux_gradients: bool,
}

impl Replay {
    /// Runs the block again on `input` and returns its output (tracked
    /// when `input` or the parameters are).
    pub fn run(&self, input: &Tensor) -> Result<Tensor, OpError> {
        self.run_collecting(input).map(|(output, _)| output)
    }

    /// [`run`](Self::run), and what the block collected.
    pub fn run_collecting(&self, input: &Tensor) -> Result<(Tensor, Vec<(String, Tensor)>), OpError> {
        let ctx =
            ForwardContext { weights: &self.weights, batch: &self.batch, cache: None, tuner: self.tuner.as_deref() };
        let mut session = GraphSession::new(ctx).with_aux_gradients(self.aux_gradients);
        session.restore(self.tag, self.first_index, &self.captured, input, self.dropouts);
        for (op, recorded) in &self.tape {
            let id = session.apply(op)?;
            if id != *recorded {
                return Err(OpError::Invalid {
                    op: "block",
                    message: "replaying the block made other handles than its first run; a block must compute the same way each time".into(),
                });
            }
        }
        let output = session.get(self.output)?.clone();
        Ok((output, session.take_collected()))
    }
}

/// A checkpointed block in the graph: its input (and the anchor) in, its
/// output's values out; the backward pass recomputes it.
pub(crate) struct Block {
    /// The output's values, taken by the forward pass.
    pub output: HandOver,
    pub replay: Replay,
    pub grads: Arc<BlockGradients>,
}

impl CustomOp2 for Block {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    hand_over_forwards!(2);

    fn bwd(
        &self,
        input: &Tensor,
        _anchor: &Tensor,
        _output: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // The input gets a gradient only if it needs one.
        let input = match input.track_op() {
            true => Var::from_tensor(&input.detach())?.as_tensor().clone(),
            false => input.detach(),
        };
        let output = self.replay.run(&input).map_err(|e| candle_core::Error::Msg(crate::error_chain(&e)))?;
        let grads = (output * grad.detach())?.sum_all()?.backward()?;
        for var in self.replay.weights.vars() {
            if let Some(g) = grads.get(var.as_tensor()) {
                self.grads.push(var.as_tensor(), g);
            }
        }
        Ok((grads.get(&input).cloned(), None))
    }
}
