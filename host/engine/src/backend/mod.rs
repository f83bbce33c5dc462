//! The host's implementation of the tensor-op API on candle.
//!
//! [`session::GraphSession`] owns the tensors of one call and dispatches
//! every op a plugin sends; [`ops`] holds the differentiable versions of the
//! ops candle only has fused (forward-only) kernels for; [`batch`] holds what
//! the host knows about a batch (positions, masks, KV cache); [`weights`]
//! resolves parameters by name; [`checkpoint`] recomputes blocks in the
//! backward pass (gradient checkpointing).

pub mod batch;
pub mod checkpoint;
pub mod fused;
mod hand_over;
pub mod ops;
pub mod session;
pub mod weights;

pub use batch::{BatchInfo, KvCache};
pub use checkpoint::{BlockGradients, Checkpointing};
pub use session::{
    read_backs, AuxOutputs, ForwardContext, GraphSession, Head, OpError, RowAdapters, ServedAdapter, TargetModules,
    TunerBinding,
};
pub use weights::{is_linear_weight, WeightStore, OUTPUT_LAYER};
