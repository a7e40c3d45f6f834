//! Piece states, and the only code allowed to change them.
//!
//! Why one owner: every bug class a swarm is famous for (a piece requested twice from
//! the same peer, a piece nobody will ever ask for again after a peer vanished, a
//! "have" bit set for a piece still marked in flight) is a state-bookkeeping bug. So
//! the state of a piece, the per-peer index of requests and the request deadlines are
//! all changed together, by the methods below, and nowhere else. [`PieceTracker::
//! check_invariants`] states what "together" means; `STATE.md` next to this crate's
//! manifest explains it in prose.
//!
//! The tracker also counts *availability*: how many connected peers hold each piece.
//! It does not know the peers' bitfields (the swarm does); it is told about them with
//! [`PieceTracker::add_available`] and friends, and the swarm checks the counts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::{Bitfield, PeerId, PieceIndex};

/// Where one piece is in its life. Each piece is in exactly one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PieceState {
    /// Wanted, and no request for it is outstanding.
    Missing,
    /// Requested from at least one peer (more than one only in endgame). Each entry is
    /// a distinct peer and the instant the request was sent.
    InFlight(Vec<(PeerId, Instant)>),
    /// Received and verified. Final: a piece never leaves this state.
    Have,
}

/// Piece states, per-peer outstanding requests, request deadlines, availability.
#[derive(Debug, Clone)]
pub struct PieceTracker {
    states: Vec<PieceState>,
    have: Bitfield,
    availability: Vec<u32>,
    /// Outstanding requests per peer; a peer with none has no entry.
    by_peer: BTreeMap<PeerId, BTreeSet<PieceIndex>>,
    /// Outstanding requests ordered by the instant they were sent (oldest first).
    by_time: BTreeSet<(Instant, PieceIndex, PeerId)>,
    missing: u32,
}

impl PieceTracker {
    /// A tracker for `piece_count` pieces, of which the set bits of `have` are held.
    ///
    /// # Panics
    /// If `have.len() != piece_count`.
    pub fn new(piece_count: u32, have: &Bitfield) -> PieceTracker {
        assert_eq!(
            have.len(),
            piece_count,
            "resume bitfield does not match piece count"
        );
        let states: Vec<PieceState> = (0..piece_count)
            .map(|i| {
                if have.get(i) {
                    PieceState::Have
                } else {
                    PieceState::Missing
                }
            })
            .collect();
        let missing = piece_count - have.count_ones();
        PieceTracker {
            states,
            have: have.clone(),
            availability: vec![0; piece_count as usize],
            by_peer: BTreeMap::new(),
            by_time: BTreeSet::new(),
            missing,
        }
    }

    pub fn piece_count(&self) -> u32 {
        self.states.len() as u32
    }

    /// State of `piece`. Panics if out of range.
    pub fn state(&self, piece: PieceIndex) -> &PieceState {
        &self.states[piece as usize]
    }

    /// The verified pieces.
    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    pub fn have_count(&self) -> u32 {
        self.have.count_ones()
    }

    /// Pieces in state `Missing`.
    pub fn missing_count(&self) -> u32 {
        self.missing
    }

    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    pub fn is_missing(&self, piece: PieceIndex) -> bool {
        matches!(self.states.get(piece as usize), Some(PieceState::Missing))
    }

    /// Pieces in state `InFlight`.
    pub fn in_flight_pieces(&self) -> u32 {
        self.states
            .iter()
            .filter(|s| matches!(s, PieceState::InFlight(_)))
            .count() as u32
    }

    /// Outstanding requests across all pieces and peers (endgame duplicates count).
    pub fn requests_in_flight(&self) -> usize {
        self.by_time.len()
    }

    /// Outstanding requests to `peer`.
    pub fn requests_to(&self, peer: PeerId) -> usize {
        self.by_peer.get(&peer).map_or(0, BTreeSet::len)
    }

    /// The pieces outstanding to `peer`, ascending.
    pub fn requested_from(&self, peer: PeerId) -> impl Iterator<Item = PieceIndex> + '_ {
        self.by_peer.get(&peer).into_iter().flatten().copied()
    }

    /// True iff a request for `piece` to `peer` is outstanding.
    pub fn is_requested(&self, piece: PieceIndex, peer: PeerId) -> bool {
        self.by_peer.get(&peer).is_some_and(|s| s.contains(&piece))
    }

    /// The peers `piece` is requested from, with the instants the requests were sent.
    pub fn requesters(&self, piece: PieceIndex) -> &[(PeerId, Instant)] {
        match self.states.get(piece as usize) {
            Some(PieceState::InFlight(r)) => r,
            _ => &[],
        }
    }

    /// How many connected peers hold `piece`.
    pub fn availability(&self, piece: PieceIndex) -> u32 {
        self.availability[piece as usize]
    }

    /// `Missing → InFlight`, or (endgame) add a further requester to an `InFlight`
    /// piece. Returns false and changes nothing if the piece is out of range, already
    /// `Have`, or already requested from this peer.
    pub fn request(&mut self, piece: PieceIndex, peer: PeerId, now: Instant) -> bool {
        let Some(state) = self.states.get_mut(piece as usize) else {
            return false;
        };
        match state {
            PieceState::Have => return false,
            PieceState::Missing => {
                *state = PieceState::InFlight(vec![(peer, now)]);
                self.missing -= 1;
            }
            PieceState::InFlight(reqs) => {
                if reqs.iter().any(|&(p, _)| p == peer) {
                    return false;
                }
                reqs.push((peer, now));
            }
        }
        self.by_peer.entry(peer).or_default().insert(piece);
        self.by_time.insert((now, piece, peer));
        true
    }

    /// Drops the request for `piece` to `peer` (cancelled, rejected, timed out, failed,
    /// or the peer is gone). The last requester leaving sends the piece back to
    /// `Missing`. Returns false if there was no such request.
    pub fn cancel(&mut self, piece: PieceIndex, peer: PeerId) -> bool {
        let Some(PieceState::InFlight(reqs)) = self.states.get_mut(piece as usize) else {
            return false;
        };
        let Some(pos) = reqs.iter().position(|&(p, _)| p == peer) else {
            return false;
        };
        let (_, sent) = reqs.swap_remove(pos);
        if reqs.is_empty() {
            self.states[piece as usize] = PieceState::Missing;
            self.missing += 1;
        }
        self.by_time.remove(&(sent, piece, peer));
        self.unindex_peer(peer, piece);
        true
    }

    /// `Missing | InFlight → Have`. Returns the peers the piece was still requested
    /// from (their requests are dropped; the caller cancels them on the wire), or
    /// `None` if the piece was already `Have` (a duplicate) or is out of range.
    pub fn complete(&mut self, piece: PieceIndex) -> Option<Vec<PeerId>> {
        let state = self.states.get_mut(piece as usize)?;
        let old = std::mem::replace(state, PieceState::Have);
        let reqs = match old {
            PieceState::Have => return None,
            PieceState::Missing => {
                self.missing -= 1;
                Vec::new()
            }
            PieceState::InFlight(reqs) => reqs,
        };
        self.have.set(piece);
        let mut peers = Vec::with_capacity(reqs.len());
        for (peer, sent) in reqs {
            self.by_time.remove(&(sent, piece, peer));
            self.unindex_peer(peer, piece);
            peers.push(peer);
        }
        Some(peers)
    }

    /// Drops every request outstanding to `peer` (it left, or was banned). Returns the
    /// pieces concerned; those with no other requester are `Missing` again.
    pub fn requeue_peer(&mut self, peer: PeerId) -> Vec<PieceIndex> {
        let pieces: Vec<PieceIndex> = self
            .by_peer
            .get(&peer)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for &piece in &pieces {
            self.cancel(piece, peer);
        }
        pieces
    }

    /// Outstanding requests sent at or before `now - timeout`, oldest first.
    pub fn expired(&self, now: Instant, timeout: Duration) -> Vec<(PieceIndex, PeerId)> {
        self.by_time
            .iter()
            .take_while(|(sent, _, _)| *sent + timeout <= now)
            .map(|&(_, piece, peer)| (piece, peer))
            .collect()
    }

    /// When the oldest outstanding request times out, if any is outstanding.
    pub fn next_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.by_time.first().map(|&(sent, _, _)| sent + timeout)
    }

    /// A peer holding the pieces set in `bits` became known.
    pub fn add_available(&mut self, bits: &Bitfield) {
        for i in bits.iter_ones() {
            self.availability[i as usize] += 1;
        }
    }

    /// A peer holding the pieces set in `bits` left.
    pub fn remove_available(&mut self, bits: &Bitfield) {
        for i in bits.iter_ones() {
            self.availability[i as usize] -= 1;
        }
    }

    /// A connected peer announced it now holds `piece`.
    pub fn add_available_piece(&mut self, piece: PieceIndex) {
        self.availability[piece as usize] += 1;
    }

    fn unindex_peer(&mut self, peer: PeerId, piece: PieceIndex) {
        if let Some(set) = self.by_peer.get_mut(&peer) {
            set.remove(&piece);
            if set.is_empty() {
                self.by_peer.remove(&peer);
            }
        }
    }

    /// Checks the bookkeeping invariants listed in `STATE.md` (the availability counts
    /// are checked by the swarm, which knows the bitfields).
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.states.len();
        if self.have.len() as usize != n || self.availability.len() != n {
            return Err("have/availability length differs from piece count".into());
        }
        let mut missing = 0;
        let mut requests = 0;
        for (i, state) in self.states.iter().enumerate() {
            let i = i as PieceIndex;
            if self.have.get(i) != (*state == PieceState::Have) {
                return Err(format!(
                    "piece {i}: have bit disagrees with state {state:?}"
                ));
            }
            match state {
                PieceState::Missing => missing += 1,
                PieceState::Have => {}
                PieceState::InFlight(reqs) => {
                    if reqs.is_empty() {
                        return Err(format!("piece {i}: InFlight with no requester"));
                    }
                    for (k, &(peer, sent)) in reqs.iter().enumerate() {
                        if reqs[..k].iter().any(|&(p, _)| p == peer) {
                            return Err(format!("piece {i}: requested twice from peer {peer}"));
                        }
                        if !self.is_requested(i, peer) {
                            return Err(format!("piece {i}: peer {peer} not in per-peer index"));
                        }
                        if !self.by_time.contains(&(sent, i, peer)) {
                            return Err(format!("piece {i}: peer {peer} has no deadline entry"));
                        }
                    }
                    requests += reqs.len();
                }
            }
        }
        if missing != self.missing {
            return Err(format!(
                "missing count {} but {missing} pieces Missing",
                self.missing
            ));
        }
        let indexed: usize = self.by_peer.values().map(BTreeSet::len).sum();
        if indexed != requests || self.by_time.len() != requests {
            return Err(format!(
                "{requests} requests in states, {indexed} in per-peer index, {} deadlines",
                self.by_time.len()
            ));
        }
        if self.by_peer.values().any(BTreeSet::is_empty) {
            return Err("empty per-peer request set kept".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn starts_from_resume_state() {
        let mut have = Bitfield::new(4);
        have.set(1);
        let pt = PieceTracker::new(4, &have);
        assert_eq!(pt.state(1), &PieceState::Have);
        assert_eq!(pt.state(0), &PieceState::Missing);
        assert_eq!(pt.missing_count(), 3);
        assert_eq!(pt.have_count(), 1);
        pt.check_invariants().unwrap();
    }

    #[test]
    fn request_cancel_complete_cycle() {
        let base = Instant::now();
        let mut pt = PieceTracker::new(3, &Bitfield::new(3));
        assert!(pt.request(0, 7, base));
        assert!(!pt.request(0, 7, base), "same peer twice is refused");
        assert!(
            pt.request(0, 8, t(base, 1)),
            "endgame duplicate to another peer"
        );
        assert_eq!(pt.requests_in_flight(), 2);
        assert_eq!(pt.missing_count(), 2);
        pt.check_invariants().unwrap();

        assert!(pt.cancel(0, 7));
        assert!(!pt.cancel(0, 7));
        assert!(matches!(pt.state(0), PieceState::InFlight(r) if r.len() == 1));
        assert!(pt.cancel(0, 8));
        assert_eq!(
            pt.state(0),
            &PieceState::Missing,
            "last requester gone: Missing"
        );
        pt.check_invariants().unwrap();

        pt.request(1, 7, base);
        pt.request(1, 9, base);
        assert_eq!(pt.complete(1), Some(vec![7, 9]));
        assert_eq!(pt.complete(1), None, "second copy is a duplicate");
        assert!(!pt.request(1, 3, base), "Have is final");
        assert!(pt.have().get(1));
        assert_eq!(pt.requests_to(7), 0);
        pt.check_invariants().unwrap();

        assert_eq!(
            pt.complete(2),
            Some(vec![]),
            "unrequested but verified data is kept"
        );
        assert_eq!(pt.complete(0), Some(vec![]));
        assert!(pt.is_complete());
        pt.check_invariants().unwrap();
    }

    #[test]
    fn requeue_peer_and_timeouts() {
        let base = Instant::now();
        let mut pt = PieceTracker::new(4, &Bitfield::new(4));
        pt.request(0, 1, t(base, 0));
        pt.request(1, 1, t(base, 10));
        pt.request(1, 2, t(base, 20));
        pt.request(2, 2, t(base, 30));
        let timeout = Duration::from_millis(100);
        assert_eq!(pt.next_deadline(timeout), Some(t(base, 100)));
        assert_eq!(pt.expired(t(base, 115), timeout), vec![(0, 1), (1, 1)]);

        let mut gone = pt.requeue_peer(1);
        gone.sort();
        assert_eq!(gone, vec![0, 1]);
        assert_eq!(pt.state(0), &PieceState::Missing);
        assert!(matches!(pt.state(1), PieceState::InFlight(r) if r[0].0 == 2));
        assert_eq!(pt.next_deadline(timeout), Some(t(base, 120)));
        pt.check_invariants().unwrap();
        assert!(pt.requeue_peer(99).is_empty());
    }

    #[test]
    fn out_of_range_is_refused_not_panicking() {
        let mut pt = PieceTracker::new(2, &Bitfield::new(2));
        assert!(!pt.request(2, 1, Instant::now()));
        assert!(!pt.cancel(5, 1));
        assert_eq!(pt.complete(9), None);
        assert!(!pt.is_missing(2));
        assert!(pt.requesters(7).is_empty());
    }

    #[test]
    fn availability_counts() {
        let mut pt = PieceTracker::new(3, &Bitfield::new(3));
        let full = Bitfield::full(3);
        pt.add_available(&full);
        pt.add_available_piece(2);
        assert_eq!(pt.availability(2), 2);
        pt.remove_available(&full);
        assert_eq!((pt.availability(0), pt.availability(2)), (0, 1));
    }
}
