//! Where the logs go: under systemd (stderr is the journal's stream), each
//! event goes to journald with its fields as journal fields (`CLIENT_ID`,
//! `SENSOR`, `TOPIC`, `PLUGIN`, …, so `journalctl -u capteurs-gateway
//! SENSOR=cuisine` works); otherwise structured lines on stderr.

use std::fmt::Write as _;

use serde::Deserialize;
use systemd_journal_logger::{connected_to_journal, JournalLog};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::problems::Problems;

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `debug`, `capteurs_gateway::broker=debug`…
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

impl LogConfig {
    pub fn validate(&self, problems: &mut Problems) {
        if let Err(e) = EnvFilter::try_new(&self.level) {
            problems.add(
                "log.level",
                format!("{:?} is not a log filter ({e})", self.level),
            );
        }
    }
}

/// Where [`init`] sent the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Journal,
    Stderr,
}

/// Installs the global subscriber: `RUST_LOG` wins over `level` (tracing's
/// filter syntax). Journald when stderr is connected to it, stderr
/// otherwise (or when the journal socket cannot be opened).
pub fn init(level: &str) -> Destination {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    if connected_to_journal() {
        if let Ok(journal) = JournalLog::new() {
            tracing_subscriber::registry()
                .with(filter)
                .with(JournalLayer(journal))
                .init();
            return Destination::Journal;
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    Destination::Stderr
}

/// Sends each event to journald: `MESSAGE` is the text followed by its
/// fields (what `journalctl` shows), and each field is also a journal field
/// of its own, upper-cased.
struct JournalLayer(JournalLog);

impl<S: Subscriber> Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let level = match *meta.level() {
            Level::ERROR => log::Level::Error,
            Level::WARN => log::Level::Warn,
            Level::INFO => log::Level::Info,
            Level::DEBUG => log::Level::Debug,
            Level::TRACE => log::Level::Trace,
        };
        let mut text = fields.message;
        for (k, v) in &fields.pairs {
            let _ = write!(text, " {k}={v}");
        }
        let kvs: Vec<(&str, &str)> = fields.pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let _ = self.0.journal_send(
            &log::Record::builder()
                .level(level)
                .target(meta.target())
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .key_values(&kvs)
                .args(format_args!("{text}"))
                .build(),
        );
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.pairs.push((field.name(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.pairs.push((field.name(), format!("{value:?}")));
        }
    }
}
