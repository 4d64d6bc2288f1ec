//! The pure orchestration core: execution state is a fold of events, and `decide()` says
//! what happens next. No IO, no clocks, no randomness: replay reproduces every decision.

pub mod context;
pub mod decide;
pub mod output;
pub mod policy;
pub mod state;

pub use context::{Iteration, alias, binds_ref, context};
pub use decide::{DEFAULT_PARALLEL_WINDOW, MAX_LOOP_ITEMS, decide};
pub use state::{
    ApplyError, ExecState, LoopState, PendingCommand, Report, Status, StepRecord, Waiting,
};

#[cfg(test)]
mod tests;
