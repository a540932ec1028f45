//! The outgoing in-flight window of one session: the QoS 1/2 messages sent
//! to the client and not yet acknowledged, the packet id of each and where
//! its exchange stands, and the rule that holds further QoS 1/2 messages
//! back while `broker.max_inflight` of them are unacknowledged (MQTT 3.1.1
//! has no receive maximum; this is the broker's own).
//!
//! The window is a field of the session ([`SessionState::outgoing`]), under
//! its lock, so that it outlives the connection, is saved with the session,
//! and is sent again on resume. Its rules are here: the pump
//! (`connection/outbound.rs`) starts exchanges, the PUBACK / PUBREC /
//! PUBCOMP handlers (`connection/inbound.rs`) move them on. Nothing here allocates
//! beyond the window's own deque, and nothing locks: callers hold the
//! session lock.
//!
//! [`SessionState::outgoing`]: super::SessionState::outgoing

use std::collections::VecDeque;

use super::{Delivery, OutState, Outgoing};
use crate::message::QoS;

/// The QoS 1/2 exchanges in flight to a client, in the order sent.
#[derive(Debug, Default)]
pub struct Inflight {
    exchanges: VecDeque<Outgoing>,
    /// The packet id given last (0 before the first); saved with the
    /// session, so ids go on where they stopped.
    last_packet_id: u16,
}

impl Inflight {
    /// A window as it was saved: its exchanges in the order sent, and the
    /// packet id given last.
    pub fn restore(exchanges: VecDeque<Outgoing>, last_packet_id: u16) -> Self {
        Inflight {
            exchanges,
            last_packet_id,
        }
    }

    /// True while `max_inflight` exchanges wait for the client: no QoS 1/2
    /// message may go until one is acknowledged (QoS 0 ones are not held).
    pub fn blocked(&self, max_inflight: usize) -> bool {
        self.exchanges.len() >= max_inflight
    }

    /// Records a QoS 1/2 delivery as sent, under a packet id no exchange in
    /// flight uses; returns the exchange, to be encoded.
    pub fn start(&mut self, delivery: Delivery) -> &Outgoing {
        debug_assert!(
            delivery.qos > QoS::AtMostOnce,
            "QoS 0 messages are not acknowledged"
        );
        let packet_id = self.next_packet_id();
        let state = if delivery.qos == QoS::AtLeastOnce {
            OutState::AwaitPuback
        } else {
            OutState::AwaitPubrec
        };
        self.exchanges.push_back(Outgoing {
            packet_id,
            delivery,
            state,
        });
        self.exchanges.back().expect("just pushed")
    }

    /// PUBACK: ends the QoS 1 exchange with this id. False (and nothing
    /// changes) when none waits for it.
    pub fn puback(&mut self, packet_id: u16) -> bool {
        self.finish(packet_id, OutState::AwaitPuback)
    }

    /// PUBREC: the exchange with this id, whatever it waited for, now waits
    /// for PUBCOMP (the caller sends PUBREL either way). False when no
    /// exchange has this id.
    pub fn pubrec(&mut self, packet_id: u16) -> bool {
        match self.exchanges.iter_mut().find(|o| o.packet_id == packet_id) {
            Some(o) => {
                o.state = OutState::AwaitPubcomp;
                true
            }
            None => false,
        }
    }

    /// PUBCOMP: ends the QoS 2 exchange with this id. False (and nothing
    /// changes) when none waits for it.
    pub fn pubcomp(&mut self, packet_id: u16) -> bool {
        self.finish(packet_id, OutState::AwaitPubcomp)
    }

    fn finish(&mut self, packet_id: u16, awaited: OutState) -> bool {
        let found = self
            .exchanges
            .iter()
            .position(|o| o.packet_id == packet_id && o.state == awaited);
        match found {
            Some(i) => {
                self.exchanges.remove(i);
                true
            }
            None => false,
        }
    }

    /// The exchanges in the order sent.
    pub fn iter(&self) -> std::collections::vec_deque::Iter<'_, Outgoing> {
        self.exchanges.iter()
    }

    pub fn len(&self) -> usize {
        self.exchanges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exchanges.is_empty()
    }

    pub fn last_packet_id(&self) -> u16 {
        self.last_packet_id
    }

    /// The next packet id after the last one, skipping 0 and the ids in
    /// flight.
    fn next_packet_id(&mut self) -> u16 {
        loop {
            self.last_packet_id = self.last_packet_id.wrapping_add(1);
            if self.last_packet_id == 0 {
                self.last_packet_id = 1;
            }
            let id = self.last_packet_id;
            if !self.exchanges.iter().any(|o| o.packet_id == id) {
                return id;
            }
        }
    }

    /// For tests elsewhere that set up a window by hand.
    #[cfg(test)]
    pub fn push_back(&mut self, exchange: Outgoing) {
        self.exchanges.push_back(exchange);
    }

    #[cfg(test)]
    pub fn clear(&mut self) {
        self.exchanges.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::message::{Message, Origin};

    fn delivery(qos: u8) -> Delivery {
        let qos = QoS::from_u8(qos).unwrap();
        Delivery {
            id: 0,
            message: Arc::new(Message::new("t", &b"x"[..], qos, false, Origin::Broker)),
            qos,
            retain: false,
        }
    }

    /// Starts an exchange; returns its packet id.
    fn send(w: &mut Inflight, qos: u8) -> u16 {
        w.start(delivery(qos)).packet_id
    }

    fn ids(w: &Inflight) -> Vec<u16> {
        w.iter().map(|o| o.packet_id).collect()
    }

    fn state(w: &Inflight, id: u16) -> Option<OutState> {
        w.iter().find(|o| o.packet_id == id).map(|o| o.state)
    }

    #[test]
    fn start_gives_increasing_ids_from_1_and_awaits_the_right_ack() {
        let mut w = Inflight::default();
        assert_eq!(send(&mut w, 1), 1);
        assert_eq!(send(&mut w, 2), 2);
        assert_eq!(state(&w, 1), Some(OutState::AwaitPuback));
        assert_eq!(state(&w, 2), Some(OutState::AwaitPubrec));
        assert_eq!(w.last_packet_id(), 2);
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn ack_of_an_unknown_id_changes_nothing() {
        let mut w = Inflight::default();
        assert!(!w.puback(1), "empty window");
        assert!(!w.pubrec(1));
        assert!(!w.pubcomp(1));
        send(&mut w, 1);
        assert!(!w.puback(7));
        assert!(!w.pubcomp(7));
        assert!(!w.pubrec(7));
        assert_eq!(ids(&w), [1]);
        assert_eq!(state(&w, 1), Some(OutState::AwaitPuback));
    }

    #[test]
    fn ack_of_the_wrong_kind_changes_nothing() {
        let mut w = Inflight::default();
        let q1 = send(&mut w, 1);
        let q2 = send(&mut w, 2);
        assert!(!w.pubcomp(q1), "a QoS 1 exchange ends with PUBACK");
        assert!(!w.puback(q2), "a QoS 2 exchange does not end with PUBACK");
        assert!(!w.pubcomp(q2), "PUBCOMP before PUBREC");
        assert_eq!(ids(&w), [q1, q2]);
    }

    #[test]
    fn out_of_order_acks_remove_just_their_exchange() {
        let mut w = Inflight::default();
        for _ in 0..4 {
            send(&mut w, 1);
        }
        assert!(w.puback(3));
        assert!(w.puback(1));
        assert_eq!(ids(&w), [2, 4], "the others keep their order");
        assert!(w.puback(4));
        assert!(w.puback(2));
        assert!(w.is_empty());
    }

    #[test]
    fn duplicate_acks_are_unknown_the_second_time() {
        let mut w = Inflight::default();
        let a = send(&mut w, 1);
        let b = send(&mut w, 2);
        assert!(w.puback(a));
        assert!(!w.puback(a));
        assert!(w.pubrec(b));
        assert!(w.pubrec(b), "PUBREC again: still waits for PUBCOMP");
        assert_eq!(state(&w, b), Some(OutState::AwaitPubcomp));
        assert!(w.pubcomp(b));
        assert!(!w.pubcomp(b));
        assert!(w.is_empty());
    }

    #[test]
    fn qos2_goes_pubrec_then_pubcomp() {
        let mut w = Inflight::default();
        let id = send(&mut w, 2);
        assert_eq!(state(&w, id), Some(OutState::AwaitPubrec));
        assert!(w.pubrec(id));
        assert_eq!(state(&w, id), Some(OutState::AwaitPubcomp));
        assert_eq!(w.len(), 1, "released, still in flight until PUBCOMP");
        assert!(w.pubcomp(id));
        assert!(w.is_empty());
    }

    #[test]
    fn the_window_fills_up_and_each_ack_frees_one_slot() {
        let mut w = Inflight::default();
        let max = 3;
        for _ in 0..max {
            assert!(!w.blocked(max));
            send(&mut w, 1);
        }
        assert!(w.blocked(max));
        let q2 = ids(&w)[1];
        assert!(!w.puback(99));
        assert!(w.blocked(max), "an unknown id frees nothing");
        assert!(w.puback(q2));
        assert!(!w.blocked(max));
        send(&mut w, 2);
        assert!(w.blocked(max));
        let last = w.last_packet_id();
        assert!(w.pubrec(last));
        assert!(w.blocked(max), "a released exchange still takes its slot");
        assert!(w.pubcomp(last));
        assert!(!w.blocked(max));
    }

    #[test]
    fn packet_ids_wrap_past_0_and_skip_those_in_flight() {
        let mut w = Inflight::restore(VecDeque::new(), u16::MAX - 1);
        assert_eq!(send(&mut w, 1), u16::MAX);
        assert_eq!(send(&mut w, 1), 1, "0 is not a packet id");
        assert_eq!(send(&mut w, 1), 2);
        // Around again with 1 and 2 still unacknowledged.
        let mut w = Inflight::restore(w.exchanges, u16::MAX);
        assert_eq!(send(&mut w, 1), 3);
        assert!(w.puback(1));
        let mut w = Inflight::restore(w.exchanges, u16::MAX);
        assert_eq!(send(&mut w, 1), 1, "free again once acknowledged");
    }

    #[test]
    fn restore_keeps_the_order_states_and_next_id() {
        let mut w = Inflight::restore(VecDeque::new(), 10);
        let (a, b) = (send(&mut w, 2), send(&mut w, 1));
        assert_eq!((a, b), (11, 12), "ids go on from the saved one");
        assert!(w.pubrec(a));
        let saved: VecDeque<Outgoing> = w.iter().cloned().collect();
        let mut w = Inflight::restore(saved, w.last_packet_id());
        assert_eq!(ids(&w), [a, b]);
        assert_eq!(state(&w, a), Some(OutState::AwaitPubcomp));
        assert_eq!(state(&w, b), Some(OutState::AwaitPuback));
        assert_eq!(send(&mut w, 1), b + 1);
    }
}
