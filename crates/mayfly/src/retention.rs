//! Shared-cache retention: the server's periodic collection and `mayfly cache gc`.

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use mayfly_runtime::retention::{Report, Retention};
use std::time::Duration;

/// How long an ended execution's payloads are kept: None = forever (`off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keep(pub Option<Duration>);

/// `off` (keep forever) or a duration such as `7d`, `12h`, `30m`.
fn keep(s: &str) -> Result<Keep, String> {
    match s {
        "off" | "never" => Ok(Keep(None)),
        _ => humantime::parse_duration(s)
            .map(|d| Keep(Some(d)))
            .map_err(|e| format!("{e} (a duration such as 7d, 12h, 30m, or `off`)")),
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (a duration such as 1h, 10m, 30s)"))
}

/// How long the shared cache keeps payloads.
#[derive(Args, Clone, Debug)]
pub struct RetentionOpts {
    /// Keep the cached payloads an ended execution's events name this long after it ended
    /// (`7d`, `12h`, …); `off` keeps every payload forever. Live executions keep theirs.
    #[arg(long, default_value = "7d", value_parser = keep)]
    pub cache_keep: Keep,
    /// Never collect a payload stored (or stored again) less than this long ago: it may be
    /// a result whose completion is about to commit.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub cache_grace: Duration,
    /// How often the server collects.
    #[arg(long, default_value = "10m", value_parser = duration)]
    pub cache_gc_every: Duration,
}

impl RetentionOpts {
    /// The policy, or None when retention is off.
    pub fn policy(&self) -> Result<Option<Retention>> {
        if self.cache_gc_every < Duration::from_secs(1) {
            bail!("--cache-gc-every must be at least 1s");
        }
        Ok(self.cache_keep.0.map(|keep| Retention {
            keep,
            grace: self.cache_grace,
        }))
    }
}

#[derive(Subcommand)]
pub enum CacheCmd {
    /// Delete cached payloads no retained execution names (mark from the log, sweep the
    /// cache): the cache of a SQLite log (`<db>.cache`), of a Postgres log served without a
    /// queue (`./mayfly-cache`), or with `--queue nats://…` the server's object store bucket.
    Gc {
        /// The event log: a SQLite file or a postgres:// URL.
        #[arg(long)]
        db: std::path::PathBuf,
        /// Keep an ended execution's payloads this long after it ended.
        #[arg(long, default_value = "7d", value_parser = duration)]
        keep: Duration,
        /// Never collect payloads stored less than this long ago.
        #[arg(long, default_value = "1h", value_parser = duration)]
        grace: Duration,
        /// Report what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Distributed mode: the NATS server holding the cache bucket.
        #[arg(long, env = "MAYFLY_QUEUE")]
        queue: Option<String>,
        /// The server's `--queue-name` (its bucket is `<name>_<log id>-cache`).
        #[arg(long, default_value = "mayfly")]
        queue_name: String,
        #[command(flatten)]
        nats_auth: crate::NatsAuthOpts,
    },
}

/// Print a collection's report.
pub fn print(rep: &Report, dry_run: bool, json: bool) {
    if json {
        println!("{}", serde_json::json!({"dry_run": dry_run, "report": rep}));
        return;
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    println!(
        "{} payloads listed: {} referenced by retained executions, {} within the grace period, {verb} {} ({} bytes){}",
        rep.listed,
        rep.referenced,
        rep.young,
        rep.deleted,
        rep.deleted_bytes,
        if rep.spared > 0 {
            format!(", {} stored again meanwhile and kept", rep.spared)
        } else {
            String::new()
        }
    );
    if rep.failed > 0 {
        eprintln!(
            "warning: {} payloads could not be deleted (see the log); they are tried again next time",
            rep.failed
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_off() {
        assert_eq!(keep("off"), Ok(Keep(None)));
        assert_eq!(keep("7d"), Ok(Keep(Some(Duration::from_secs(7 * 86_400)))));
        assert_eq!(keep("90s"), Ok(Keep(Some(Duration::from_secs(90)))));
        assert!(keep("soon").is_err());
        assert_eq!(duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(duration("off").is_err());
    }
}
