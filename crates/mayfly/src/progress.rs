//! Live progress for `mayfly run`: running steps, finished steps, loop progress, elapsed.
//! Draws on stderr only when it is a terminal (indicatif hides itself otherwise).

use indicatif::{ProgressBar, ProgressStyle};
use mayfly_dsl::Playbook;
use mayfly_types::{Event, EventKind, ExecutionId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

pub struct Display {
    task: JoinHandle<()>,
    bar: ProgressBar,
}

impl Display {
    pub async fn finish(self) {
        self.task.abort();
        let _ = self.task.await;
        self.bar.finish_and_clear();
    }
}

#[derive(Default)]
struct View {
    running: BTreeSet<String>,
    done: u64,
    loops: BTreeMap<String, (usize, usize)>,
    children: u64,
}

impl View {
    fn line(&self, total_steps: usize) -> String {
        let mut s = format!(
            "{} step runs done ({} steps in playbook)",
            self.done, total_steps
        );
        if !self.running.is_empty() {
            s.push_str(" · running: ");
            s.push_str(&self.running.iter().cloned().collect::<Vec<_>>().join(", "));
        }
        for (step, (done, total)) in &self.loops {
            s.push_str(&format!(" · loop {step} {done}/{total}"));
        }
        if self.children > 0 {
            s.push_str(&format!(" · {} child executions", self.children));
        }
        s
    }
}

pub fn spawn(
    mut rx: broadcast::Receiver<Arc<Event>>,
    pb: Arc<Playbook>,
    id: ExecutionId,
) -> Display {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(format!("starting {}", pb.path));
    let b = bar.clone();
    let task = tokio::spawn(async move {
        let mut v = View::default();
        loop {
            let e = match rx.recv().await {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            };
            if e.execution_id != id {
                if e.kind == EventKind::ExecutionRequested {
                    v.children += 1;
                }
                continue;
            }
            let step = e.step.clone().unwrap_or_default();
            let indexed = e.payload.get("index").is_some_and(|i| !i.is_null());
            match e.kind {
                EventKind::StepStarted if !indexed => {
                    v.running.insert(step);
                }
                EventKind::LoopStarted => {
                    let n = e
                        .payload
                        .get("items")
                        .and_then(|i| i.as_array())
                        .map(Vec::len)
                        .unwrap_or(0);
                    v.loops.insert(step, (0, n));
                }
                EventKind::StepFinished | EventKind::StepFailed if indexed => {
                    if let Some(l) = v.loops.get_mut(&step) {
                        l.0 += 1;
                    }
                }
                EventKind::StepFinished | EventKind::StepFailed => {
                    v.running.remove(&step);
                    v.done += 1;
                }
                EventKind::LoopDone => {
                    v.loops.remove(&step);
                    v.done += 1;
                }
                _ => {}
            }
            b.set_message(v.line(pb.steps.len()));
        }
    });
    Display { task, bar }
}
