//! The admission decision: whether a message that arrives fits in the
//! buffer and, if not, what `when_full` makes of it. Pure (no SQLite, no
//! clock): the writer asks for each message, in sequence order, and acts on
//! the answer.
//!
//! Expiry by `max_age` is not part of it: that is a delete by age the
//! writer runs at most once a second, whatever arrives.

use super::WhenFull;

/// What to do with one incoming message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admit {
    /// It fits: store it.
    Store,
    /// Full under `drop_oldest`: delete the oldest stored messages, at least
    /// `bytes` of them, then store it. If that many are not stored (the
    /// message is larger than the whole buffer), the writer deletes all it
    /// has and drops the message anyway.
    Evict { bytes: u64 },
    /// Drop the incoming message: full under `drop_newest`, or larger than
    /// the whole buffer under `block` (no acknowledgement would make room).
    DropNewest,
    /// Full under `block`: hold it until acknowledgements free room. Only a
    /// message whose publisher waits for its PUBACK can be held; the writer
    /// drops one that cannot (QoS 0) and counts it.
    Hold,
}

/// `stored_bytes` are in the buffer now, `incoming_bytes` arrive; sizes are
/// topic plus payload.
pub(super) fn admit(
    stored_bytes: u64,
    incoming_bytes: u64,
    max_bytes: u64,
    when_full: WhenFull,
) -> Admit {
    if stored_bytes + incoming_bytes <= max_bytes {
        return Admit::Store;
    }
    match when_full {
        WhenFull::DropNewest => Admit::DropNewest,
        WhenFull::Block if incoming_bytes <= max_bytes => Admit::Hold,
        WhenFull::Block => Admit::DropNewest,
        WhenFull::DropOldest => Admit::Evict {
            bytes: stored_bytes + incoming_bytes - max_bytes,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::Admit::{Evict, Hold, Store};
    use super::WhenFull::{Block, DropOldest};
    use super::*;

    const MODES: [WhenFull; 3] = [DropOldest, WhenFull::DropNewest, Block];

    #[test]
    fn a_message_that_fits_is_stored_whatever_the_mode() {
        for mode in MODES {
            assert_eq!(admit(0, 10, 100, mode), Store, "{mode:?}");
            assert_eq!(admit(50, 10, 100, mode), Store, "{mode:?}");
            // Filling the buffer to the last byte is still fitting.
            assert_eq!(admit(90, 10, 100, mode), Store, "{mode:?}");
            assert_eq!(admit(0, 100, 100, mode), Store, "{mode:?}");
        }
    }

    #[test]
    fn full_under_drop_oldest_evicts_just_the_excess() {
        assert_eq!(admit(95, 10, 100, DropOldest), Evict { bytes: 5 });
        assert_eq!(admit(100, 10, 100, DropOldest), Evict { bytes: 10 });
        // A buffer over its limit (max_bytes lowered since) gives back the
        // excess too.
        assert_eq!(admit(150, 10, 100, DropOldest), Evict { bytes: 60 });
    }

    #[test]
    fn full_under_drop_newest_drops_the_incoming_message() {
        let drop_newest = |stored, incoming| admit(stored, incoming, 100, WhenFull::DropNewest);
        assert_eq!(drop_newest(95, 10), Admit::DropNewest);
        assert_eq!(drop_newest(100, 1), Admit::DropNewest);
    }

    #[test]
    fn full_under_block_holds_the_incoming_message() {
        assert_eq!(admit(95, 10, 100, Block), Hold);
        assert_eq!(admit(100, 100, 100, Block), Hold);
    }

    #[test]
    fn larger_than_the_whole_buffer_is_never_held() {
        // Even an empty buffer could not take it: holding it would block
        // every later message for good.
        assert_eq!(admit(0, 101, 100, Block), Admit::DropNewest);
        assert_eq!(admit(50, 101, 100, Block), Admit::DropNewest);
        assert_eq!(admit(0, 101, 100, WhenFull::DropNewest), Admit::DropNewest);
    }

    #[test]
    fn larger_than_the_whole_buffer_under_drop_oldest_asks_for_more_than_is_stored() {
        // More than the 50 stored bytes: the writer evicts all of them and
        // still drops the message (the behaviour this module was extracted
        // with).
        assert_eq!(admit(50, 101, 100, DropOldest), Evict { bytes: 51 });
        // Nothing stored: nothing to evict, the message is dropped.
        assert_eq!(admit(0, 101, 100, DropOldest), Evict { bytes: 1 });
    }
}
