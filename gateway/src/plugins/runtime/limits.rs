//! What one plugin store may use: its [`Limits`] as configured (memory,
//! the deadline in epoch ticks, fuel), and the [`PluginLimiter`] that holds
//! the store's memories and tables, summed, to them.

use std::time::Duration;

use wasmtime::ResourceLimiter;

use super::TICK;

/// Limits of one plugin's store.
#[derive(Debug, Clone)]
pub struct Limits {
    pub memory_bytes: usize,
    /// Epoch ticks a call may run (at least 2: a deadline of N fires
    /// between N-1 and N ticks).
    pub deadline_ticks: u64,
    /// Fuel per call; `None`: unlimited.
    pub fuel: Option<u64>,
}

impl Limits {
    pub fn new(memory_mb: u64, timeout: Duration, fuel: u64) -> Self {
        Limits {
            memory_bytes: (memory_mb * 1024 * 1024) as usize,
            deadline_ticks: (timeout.as_millis() as u64 / TICK.as_millis() as u64).max(1) + 1,
            fuel: (fuel > 0).then_some(fuel),
        }
    }
}

/// Table elements (function references) one store may hold in all its
/// tables: a Rust component uses a few hundred; each costs a pointer.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Bounds what one plugin instance (one store) may allocate, in total:
/// `memory_mb` is the sum over all its linear memories (wasmtime's
/// `StoreLimits` bounds each memory alone, so four memories could take
/// four times `memory_mb`), and table elements are bounded likewise. A
/// refused growth is an error the guest sees (`memory.grow` returns -1),
/// not a trap.
pub struct PluginLimiter {
    memory: Budget,
    tables: Budget,
}

/// One kind of resource, summed over every memory (or table) of a store.
struct Budget {
    limit: usize,
    used: usize,
    /// What the last permitted growth added, taken back if it then failed.
    last_grant: usize,
}

impl Budget {
    fn new(limit: usize) -> Self {
        Budget {
            limit,
            used: 0,
            last_grant: 0,
        }
    }

    /// May one memory (table) grow from `current` to `desired`?
    fn grow(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> bool {
        let more = desired.saturating_sub(current);
        let total = self.used.saturating_add(more);
        if total > self.limit || maximum.is_some_and(|m| desired > m) {
            return false;
        }
        self.used = total;
        self.last_grant = more;
        true
    }

    fn failed(&mut self) {
        self.used -= std::mem::take(&mut self.last_grant);
    }
}

impl PluginLimiter {
    pub fn new(memory_limit: usize) -> Self {
        PluginLimiter {
            memory: Budget::new(memory_limit),
            tables: Budget::new(MAX_TABLE_ELEMENTS),
        }
    }

    /// Bytes of linear memory granted so far.
    pub fn memory_used(&self) -> usize {
        self.memory.used
    }
}

impl ResourceLimiter for PluginLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.memory.grow(current, desired, maximum))
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory.failed();
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.tables.grow(current, desired, maximum))
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.tables.failed();
        Ok(())
    }

    fn instances(&self) -> usize {
        16
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `memory_mb` bounds all of a store's memories together: with
    /// wasmtime's per-memory limit, four memories could take four times it.
    #[test]
    fn memory_mb_bounds_the_sum_of_memories_and_tables_are_capped() {
        let mb = 1024 * 1024;
        let mut l = PluginLimiter::new(8 * mb);
        assert!(l.memory_growing(0, 5 * mb, None).unwrap());
        assert!(l.memory_growing(0, 3 * mb, None).unwrap());
        assert!(
            !l.memory_growing(0, 1, None).unwrap(),
            "a third memory over the sum"
        );
        assert!(!l.memory_growing(5 * mb, 5 * mb + 1, None).unwrap());
        assert_eq!(l.memory_used(), 8 * mb);
        // A permitted growth that then failed is given back.
        let mut l = PluginLimiter::new(8 * mb);
        assert!(l.memory_growing(0, 8 * mb, None).unwrap());
        l.memory_grow_failed(wasmtime::Error::msg("no")).unwrap();
        assert_eq!(l.memory_used(), 0);
        assert!(
            !l.memory_growing(0, 2 * mb, Some(mb)).unwrap(),
            "its own maximum"
        );
        // Table elements, over all tables.
        assert!(l.table_growing(0, MAX_TABLE_ELEMENTS / 2, None).unwrap());
        assert!(l.table_growing(0, MAX_TABLE_ELEMENTS / 2, None).unwrap());
        assert!(!l.table_growing(0, 1, None).unwrap());
    }
}
