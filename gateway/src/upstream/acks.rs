//! Which packet id carries which buffered row. rumqttc's `publish()`
//! returns no packet id; its `Outgoing::Publish(pkid)` events come in the
//! order the requests were handed to it, so the requests are queued here
//! and each event names the packet id of the oldest one.

use std::collections::{HashMap, VecDeque};

use crate::message::{QoS, Seq};

/// The forwarder's requests and in-flight rows on one connection.
#[derive(Debug, Default)]
pub(super) struct Acks {
    /// Requests handed to rumqttc, in order: `Some((seq, qos))` for
    /// buffered rows, `None` for the gateway's own status messages.
    handed: VecDeque<Option<(Seq, QoS)>>,
    /// Packet id -> sequence number of the QoS 1/2 rows written and not
    /// yet acknowledged.
    inflight: HashMap<u16, Seq>,
}

/// What the PUBLISH rumqttc just wrote was.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sent {
    /// A QoS 0 row: done once written.
    Settled(Seq),
    /// A QoS 1/2 row, now waiting for its PUBACK / PUBCOMP.
    InFlight,
    /// One of the gateway's own messages.
    Own,
    /// Nothing was handed over: rumqttc wrote a PUBLISH nobody asked for.
    Unasked,
}

impl Acks {
    /// A buffered row was handed to rumqttc.
    pub(super) fn handed_row(&mut self, seq: Seq, qos: QoS) {
        self.handed.push_back(Some((seq, qos)));
    }

    /// One of the gateway's own messages (status, stats) was handed over.
    pub(super) fn handed_own(&mut self) {
        self.handed.push_back(None);
    }

    /// rumqttc wrote the oldest request handed over as packet `pkid`.
    pub(super) fn sent(&mut self, pkid: u16) -> Sent {
        match self.handed.pop_front() {
            Some(Some((seq, QoS::AtMostOnce))) => Sent::Settled(seq),
            Some(Some((seq, _))) => {
                self.inflight.insert(pkid, seq);
                Sent::InFlight
            }
            Some(None) => Sent::Own,
            None => Sent::Unasked,
        }
    }

    /// The cloud acknowledged packet `pkid` (PUBACK, PUBCOMP): the row it
    /// carried, if it carried one still in flight.
    pub(super) fn acked(&mut self, pkid: u16) -> Option<Seq> {
        self.inflight.remove(&pkid)
    }

    /// Requests handed over and rows in flight: what the window counts.
    pub(super) fn len(&self) -> usize {
        self.handed.len() + self.inflight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(a: &mut Acks, seq: u64, qos: u8) {
        a.handed_row(Seq(seq), QoS::from_u8(qos).unwrap());
    }

    #[test]
    fn packet_ids_follow_the_order_requests_were_handed_over() {
        let mut a = Acks::default();
        a.handed_own();
        row(&mut a, 10, 1);
        row(&mut a, 11, 0);
        row(&mut a, 12, 2);
        assert_eq!(a.len(), 4);
        assert_eq!(a.sent(1), Sent::Own);
        assert_eq!(a.sent(2), Sent::InFlight);
        assert_eq!(a.sent(3), Sent::Settled(Seq(11)));
        assert_eq!(a.sent(4), Sent::InFlight);
        assert_eq!(a.len(), 2);
        // Acknowledged out of order, each for its own row.
        assert_eq!(a.acked(4), Some(Seq(12)));
        assert_eq!(a.acked(2), Some(Seq(10)));
        assert_eq!(a.len(), 0);
    }

    #[test]
    fn unknown_and_repeated_acks_settle_nothing() {
        let mut a = Acks::default();
        assert_eq!(a.sent(7), Sent::Unasked);
        row(&mut a, 1, 1);
        assert_eq!(a.sent(7), Sent::InFlight);
        assert_eq!(a.acked(8), None);
        assert_eq!(a.acked(7), Some(Seq(1)));
        assert_eq!(a.acked(7), None, "a duplicate PUBACK");
    }

    #[test]
    fn a_reused_packet_id_carries_its_new_row() {
        let mut a = Acks::default();
        row(&mut a, 1, 1);
        a.sent(5);
        assert_eq!(a.acked(5), Some(Seq(1)));
        row(&mut a, 2, 1);
        a.sent(5);
        assert_eq!(a.acked(5), Some(Seq(2)));
    }
}
