//! Shared by the runtime's test binaries.

use mayfly_engine::{ExecState, Report};
use mayfly_store::Store;
use std::path::PathBuf;

/// A file in the repository's `examples/`.
#[allow(dead_code)] // not every test binary runs the examples
pub fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

/// The log is the system of record: the execution's chain verifies and its events fold
/// back into exactly `report`.
pub async fn assert_replays(store: &dyn Store, report: &Report) {
    let events = store.read_all(&report.execution_id).await.expect("events");
    mayfly_trust::verify_chain(&events).expect("chain verifies");
    let replayed = ExecState::fold(report.execution_id.clone(), &events)
        .expect("fold")
        .report();
    assert_eq!(&replayed, report, "replay reproduces the final state");
}
