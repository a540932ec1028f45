//! `[buffer]`: the store-and-forward buffer's part of the configuration,
//! checked while building [`BufferSettings`].

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::BufferSettings;
use crate::problems::Problems;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Payload + topic bytes kept at most.
    pub max_bytes: u64,
    /// Messages older than this are dropped (0: no limit).
    pub max_age_secs: u64,
    pub when_full: WhenFull,
    /// `full`: fsync each group commit (survives power cuts); `normal`:
    /// survives a crash of the gateway, not of the machine.
    pub sync: SyncMode,
    /// Keep messages in memory while the cloud is reachable (SD card wear).
    pub memory_first: bool,
    /// Memory-first: beyond this many unacknowledged messages, write to disk.
    pub memory_max_messages: usize,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_bytes: 256 * 1024 * 1024,
            max_age_secs: 0,
            when_full: WhenFull::DropOldest,
            sync: SyncMode::Full,
            memory_first: false,
            memory_max_messages: 10_000,
        }
    }
}

/// What a full buffer does with a new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    DropOldest,
    DropNewest,
    Block,
}

/// How hard a group commit holds on to what it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    Full,
    Normal,
}

impl BufferConfig {
    pub fn validate(&self, problems: &mut Problems) {
        problems.take(self.settings(Path::new(".")));
    }

    /// The runtime settings; the database is `data_dir/buffer.sqlite`.
    pub fn settings(&self, data_dir: &Path) -> Result<BufferSettings, Problems> {
        let mut p = Problems::new();
        if self.max_bytes < 1024 {
            p.add("buffer.max_bytes", "must be at least 1024");
        }
        if !(1..=10_000_000).contains(&self.memory_max_messages) {
            p.add(
                "buffer.memory_max_messages",
                "must be between 1 and 10000000",
            );
        }
        p.or(|| BufferSettings {
            path: data_dir.join("buffer.sqlite"),
            max_bytes: self.max_bytes,
            max_age: (self.max_age_secs > 0).then(|| Duration::from_secs(self.max_age_secs)),
            when_full: self.when_full,
            sync: self.sync,
            memory_first: self.memory_first.then_some(self.memory_max_messages),
        })
    }
}
