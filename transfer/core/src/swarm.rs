//! The swarm state machine for one content: which piece to ask whom for, which
//! requests to serve, and what to do when peers misbehave or vanish.
//!
//! Why it is shaped like this:
//!
//! * **Sans-IO.** Inputs are `handle_*` calls stamped with `now`; outputs are queued
//!   and drained with `poll_*`. Every `handle_*` call ends by scheduling every request
//!   that is useful right now, so the runtime never has to "kick" the core.
//! * **Rarest first, random tie-break.** Spreading the rarest pieces first keeps every
//!   node holding something its neighbours lack, so every uplink stays busy. Ties are
//!   broken by a seeded RNG so that nodes do not all chase the same piece, and so a
//!   simulation is reproducible.
//! * **Seeds last.** A seed (a peer with every piece, typically the original sharer)
//!   is asked only after every non-seed peer's request window is full, and for pieces
//!   no non-seed holds when possible, and only a small window at a time while other
//!   peers are around. The original sharer's uplink is then spent on injecting pieces
//!   the swarm lacks, not on serving copies the leechers could trade among themselves.
//! * **Super-seeding.** A seed also refuses a piece it has sent more often than its
//!   least-sent piece when another peer holds it, so each piece leaves the seed once
//!   before any leaves twice. A busy non-seed never refuses: it queues. (Refusing
//!   whenever all slots were busy, to send requesters elsewhere, made requests bounce
//!   between busy holders and left uplinks idle: 2.1 x ideal in the simulation
//!   against 1.3 x without.)
//! * **Endgame.** Once every missing piece that someone could give is already
//!   requested, idle request slots duplicate the oldest outstanding requests (bounded
//!   per piece); the first verified copy cancels the others. This keeps one slow peer
//!   from holding up the last pieces.
//! * **Upload slots with per-peer queues served round-robin.** A bounded number of
//!   uploads run at once so each finishes quickly (a finished piece can be re-shared
//!   at once, an unfinished one cannot); the queues keep one greedy peer from
//!   monopolising the slots, and their bound turns overload into explicit `Reject`s.
//! * **Untrusted peers.** Every index and bitfield from the network is checked; a
//!   protocol violation disconnects, a piece failing its hash bans the sender for
//!   good. A peer that stops answering loses requests to timeouts, and its request
//!   window shrinks (halved per timeout, grown back by one per delivered piece).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use crate::pieces::{PieceState, PieceTracker};
use crate::{
    Bitfield, Config, DisconnectReason, Event, PeerId, PeerMsg, PieceIndex, Stats, Transmit,
};

/// While a non-seed peer is connected, at most this many requests go to one seed.
/// The swarm at large should be the main source; see the module docs.
const SEED_WINDOW: usize = 2;
/// A queued request passed over for this many times `upload_slots` uploads is served
/// next (see `fill_upload_slots`).
const STARVE_AFTER_SLOTS: u64 = 16;

/// Deterministic xorshift64* generator: the tie-break needs no cryptographic quality,
/// only reproducibility from `Config::rng_seed`.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 scrambles small seeds (0, 1, 2 …) into well-spread states.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(z | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// What we know about one connected peer.
#[derive(Debug, Clone)]
struct Peer {
    /// Their pieces; `None` until their first message (which must be the bitfield).
    bitfield: Option<Bitfield>,
    /// Their requests waiting for an upload slot, oldest first.
    /// With the value of `Swarm::uploads_started` when each was queued (its age).
    queued: VecDeque<(PieceIndex, u64)>,
    /// Pieces they rejected, failed or timed out on: asked elsewhere when possible.
    avoid: BTreeSet<PieceIndex>,
    /// How many requests we may have outstanding to them (AIMD on timeouts).
    window: usize,
}

impl Peer {
    fn is_seed(&self) -> bool {
        self.bitfield.as_ref().is_some_and(Bitfield::is_full)
    }
}

/// One upload in progress (it holds a slot until `handle_upload_finished`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Upload {
    peer: PeerId,
    piece: PieceIndex,
    /// We told the runtime to abort it; the slot frees when the runtime confirms.
    aborted: bool,
}

/// The swarm core for one content. See the module documentation.
#[derive(Debug)]
pub struct Swarm {
    config: Config,
    rng: Rng,
    pieces: PieceTracker,
    peers: BTreeMap<PeerId, Peer>,
    /// Peers that were connected and are gone (lost, disconnected or banned): late
    /// messages about them are ignored.
    departed: BTreeSet<PeerId>,
    banned: BTreeSet<PeerId>,
    uploads: Vec<Upload>,
    /// How many uploads of each piece we have started: a free slot goes to the queued
    /// request for the piece sent fewest times, so a seed injects new pieces.
    sent: Vec<u32>,
    /// Uploads started so far: the clock that ages queued requests.
    uploads_started: u64,
    /// The minimum of `sent`, and how many pieces are at it (kept by `start_upload`).
    sent_min: u32,
    at_sent_min: u32,
    /// Peers with a non-empty upload queue, in round-robin order.
    upload_rr: VecDeque<PeerId>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    complete_emitted: bool,
    duplicate_pieces_received: u64,
    corrupt_pieces_received: u64,
    requests_timed_out: u64,
}

impl Swarm {
    /// A swarm for a content of `piece_count` pieces, holding the set bits of `have`
    /// (the resume state; a seed passes `Bitfield::full(piece_count)`).
    ///
    /// # Panics
    /// If `have` is not a valid bitfield of `piece_count` pieces: it comes from our own
    /// resume data, not from the network, so a mismatch is a bug in the caller.
    pub fn new(config: Config, piece_count: u32, have: Bitfield, now: Instant) -> Swarm {
        let _ = now;
        if let Err(e) = have.validate(piece_count) {
            panic!("invalid resume bitfield: {e}");
        }
        let complete_emitted = have.is_full();
        Swarm {
            rng: Rng::new(config.rng_seed),
            config,
            pieces: PieceTracker::new(piece_count, &have),
            peers: BTreeMap::new(),
            departed: BTreeSet::new(),
            banned: BTreeSet::new(),
            uploads: Vec::new(),
            sent: vec![0; piece_count as usize],
            sent_min: 0,
            uploads_started: 0,
            at_sent_min: piece_count,
            upload_rr: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            complete_emitted,
            duplicate_pieces_received: 0,
            corrupt_pieces_received: 0,
            requests_timed_out: 0,
        }
    }

    /// A connection to `peer` is up: we send it our bitfield. Ignored for a peer that
    /// is already connected, or was connected before (ids are never reused).
    pub fn handle_peer_connected(&mut self, now: Instant, peer: PeerId) {
        let _ = now;
        if self.peers.contains_key(&peer) || self.departed.contains(&peer) {
            return;
        }
        self.peers.insert(
            peer,
            Peer {
                bitfield: None,
                queued: VecDeque::new(),
                avoid: BTreeSet::new(),
                window: self.config.max_requests_per_peer.max(1),
            },
        );
        let msg = PeerMsg::Bitfield(self.pieces.have().clone());
        self.transmits.push_back(Transmit::Control { peer, msg });
    }

    /// The connection to `peer` is gone. Its requests to us are dropped (the runtime
    /// need not report the end of uploads to it, late reports are ignored), our
    /// requests to it are re-queued.
    pub fn handle_peer_lost(&mut self, now: Instant, peer: PeerId) {
        if self.remove_peer(peer) {
            self.fill_upload_slots();
            self.schedule(now);
        }
    }

    /// A control message from `peer`. Anything malformed or out of order (index out of
    /// range, bitfield of the wrong size, a second bitfield, anything before the
    /// bitfield, a peer never connected) disconnects it with `ProtocolViolation`.
    pub fn handle_message(&mut self, now: Instant, peer: PeerId, msg: PeerMsg) {
        if self.departed.contains(&peer) {
            return;
        }
        if !self.peers.contains_key(&peer) {
            self.departed.insert(peer);
            self.disconnect(peer, DisconnectReason::ProtocolViolation);
            return;
        }
        let n = self.pieces.piece_count();
        let index = match &msg {
            PeerMsg::Bitfield(_) => None,
            PeerMsg::Have(i) | PeerMsg::Request(i) | PeerMsg::Cancel(i) | PeerMsg::Reject(i) => {
                Some(*i)
            }
        };
        let has_bitfield = self.peers[&peer].bitfield.is_some();
        let valid = match (&msg, index) {
            (PeerMsg::Bitfield(b), _) => !has_bitfield && b.validate(n).is_ok(),
            (_, Some(i)) => has_bitfield && i < n,
            (_, None) => false,
        };
        if !valid {
            self.violation(peer);
            self.schedule(now);
            return;
        }
        match msg {
            PeerMsg::Bitfield(b) => {
                self.pieces.add_available(&b);
                self.peer_mut(peer).bitfield = Some(b);
            }
            PeerMsg::Have(i) => {
                let p = self.peer_mut(peer);
                let bits = p.bitfield.as_mut().expect("checked above");
                if !bits.get(i) {
                    bits.set(i);
                    self.pieces.add_available_piece(i);
                }
            }
            PeerMsg::Request(i) => self.on_request(peer, i),
            PeerMsg::Cancel(i) => self.on_cancel(peer, i),
            PeerMsg::Reject(i) => {
                if self.pieces.cancel(i, peer) {
                    self.peer_mut(peer).avoid.insert(i);
                }
            }
        }
        self.schedule(now);
    }

    /// True iff a request for `piece` to `peer` is outstanding: the runtime accepts
    /// piece data only when this holds.
    pub fn is_expected(&self, peer: PeerId, piece: PieceIndex) -> bool {
        self.peers.contains_key(&peer) && self.pieces.is_requested(piece, peer)
    }

    /// The runtime received `piece` from `peer` and checked its hash.
    ///
    /// A good copy is kept even if its request had meanwhile timed out or the peer
    /// left; a bad one bans the peer, whatever its state.
    pub fn handle_piece_received(
        &mut self,
        now: Instant,
        peer: PeerId,
        piece: PieceIndex,
        verified: bool,
    ) {
        if self.banned.contains(&peer) {
            return;
        }
        if piece >= self.pieces.piece_count() {
            if self.peers.contains_key(&peer) {
                self.violation(peer);
                self.schedule(now);
            }
            return;
        }
        if !verified {
            self.corrupt_pieces_received += 1;
            self.ban(peer);
            self.schedule(now);
            return;
        }
        match self.pieces.complete(piece) {
            None => self.duplicate_pieces_received += 1,
            Some(requesters) => {
                for r in requesters {
                    if r != peer {
                        let msg = PeerMsg::Cancel(piece);
                        self.transmits.push_back(Transmit::Control { peer: r, msg });
                    }
                }
                self.events.push_back(Event::PieceCompleted(piece));
                for (&id, p) in &mut self.peers {
                    p.avoid.remove(&piece);
                    let msg = PeerMsg::Have(piece);
                    self.transmits
                        .push_back(Transmit::Control { peer: id, msg });
                }
                if self.pieces.is_complete() && !self.complete_emitted {
                    self.complete_emitted = true;
                    self.events.push_back(Event::Complete);
                }
            }
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.window = (p.window + 1).min(self.config.max_requests_per_peer.max(1));
        }
        self.schedule(now);
    }

    /// The data stream for `piece` from `peer` broke (reset, timeout, I/O error). The
    /// request is dropped and the piece asked again, elsewhere if possible. No ban:
    /// networks fail without malice.
    pub fn handle_piece_failed(&mut self, now: Instant, peer: PeerId, piece: PieceIndex) {
        if self.pieces.cancel(piece, peer) {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.avoid.insert(piece);
            }
            self.schedule(now);
        }
    }

    /// The upload of `piece` to `peer` ended (done, failed or aborted): its slot goes
    /// to the next queued request, round-robin across peers.
    pub fn handle_upload_finished(&mut self, now: Instant, peer: PeerId, piece: PieceIndex) {
        let _ = now;
        // If an aborted and a fresh upload of the same piece coexist, the aborted one
        // (started first) is the one that ends first.
        let matching = |u: &Upload| u.peer == peer && u.piece == piece;
        let pos = (self.uploads.iter().position(|u| matching(u) && u.aborted))
            .or_else(|| self.uploads.iter().position(matching));
        if let Some(pos) = pos {
            self.uploads.swap_remove(pos);
            self.fill_upload_slots();
        }
    }

    /// Expires requests older than `request_timeout`: cancel on the wire, re-queue,
    /// shrink the peer's window.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired = self.pieces.expired(now, self.config.request_timeout);
        if expired.is_empty() {
            return;
        }
        for (piece, peer) in expired {
            self.pieces.cancel(piece, peer);
            self.requests_timed_out += 1;
            if let Some(p) = self.peers.get_mut(&peer) {
                p.avoid.insert(piece);
                p.window = (p.window / 2).max(1);
            }
            let msg = PeerMsg::Cancel(piece);
            self.transmits.push_back(Transmit::Control { peer, msg });
        }
        self.schedule(now);
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` should next be called: the earliest request deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pieces.next_deadline(self.config.request_timeout)
    }

    pub fn have(&self) -> &Bitfield {
        self.pieces.have()
    }

    pub fn is_complete(&self) -> bool {
        self.pieces.is_complete()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            pieces_have: self.pieces.have_count(),
            pieces_total: self.pieces.piece_count(),
            peers: self.peers.len(),
            requests_in_flight: self.pieces.requests_in_flight(),
            uploads_active: self.uploads.len(),
            duplicate_pieces_received: self.duplicate_pieces_received,
            corrupt_pieces_received: self.corrupt_pieces_received,
            requests_timed_out: self.requests_timed_out,
        }
    }

    /// True iff `peer` is connected and its bitfield is full.
    pub fn peer_is_seed(&self, peer: PeerId) -> bool {
        self.peers.get(&peer).is_some_and(Peer::is_seed)
    }

    /// The piece tracker, read-only (for diagnostics and tests).
    pub fn pieces(&self) -> &PieceTracker {
        &self.pieces
    }

    /// Checks every invariant listed in `STATE.md`.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pieces.check_invariants()?;
        let n = self.pieces.piece_count();
        // Availability equals the number of connected peers whose bitfield holds it.
        let mut avail = vec![0u32; n as usize];
        for p in self.peers.values() {
            if let Some(b) = &p.bitfield {
                b.validate(n)
                    .map_err(|e| format!("stored peer bitfield invalid: {e}"))?;
                for i in b.iter_ones() {
                    avail[i as usize] += 1;
                }
            }
        }
        for (i, &a) in avail.iter().enumerate() {
            if self.pieces.availability(i as PieceIndex) != a {
                return Err(format!(
                    "piece {i}: availability {} but {a} peers hold it",
                    self.pieces.availability(i as PieceIndex)
                ));
            }
        }
        for (&id, p) in &self.peers {
            if self.departed.contains(&id) || self.banned.contains(&id) {
                return Err(format!("peer {id} is both connected and departed"));
            }
            let requested = self.pieces.requests_to(id);
            if requested > 0 {
                let Some(b) = &p.bitfield else {
                    return Err(format!("request to peer {id} before its bitfield"));
                };
                if let Some(i) = self.pieces.requested_from(id).find(|&i| !b.get(i)) {
                    return Err(format!("piece {i} requested from peer {id} lacking it"));
                }
            }
            if requested > self.max_window() {
                return Err(format!(
                    "{requested} requests to peer {id} exceed the window"
                ));
            }
            if p.window == 0 || p.window > self.config.max_requests_per_peer.max(1) {
                return Err(format!("peer {id} window {} out of range", p.window));
            }
            if p.queued.len() > self.config.max_queued_requests_per_peer {
                return Err(format!("peer {id} has {} queued requests", p.queued.len()));
            }
            for (k, &(q, _)) in p.queued.iter().enumerate() {
                if !self.pieces.have().get(q) {
                    return Err(format!("peer {id} queued piece {q} we do not have"));
                }
                if p.queued.iter().take(k).any(|&(o, _)| o == q)
                    || self.uploads.iter().any(|u| u.peer == id && u.piece == q)
                {
                    return Err(format!("peer {id} piece {q} queued twice"));
                }
            }
            let in_rr = self.upload_rr.iter().filter(|&&r| r == id).count();
            if in_rr != usize::from(!p.queued.is_empty()) {
                return Err(format!(
                    "peer {id} appears {in_rr} times in the upload rotation"
                ));
            }
        }
        if self.upload_rr.iter().any(|r| !self.peers.contains_key(r)) {
            return Err("departed peer in the upload rotation".into());
        }
        if self
            .departed
            .iter()
            .any(|d| self.pieces.requests_to(*d) > 0)
        {
            return Err("request outstanding to a departed peer".into());
        }
        for (k, u) in self.uploads.iter().enumerate() {
            if !self.peers.contains_key(&u.peer) {
                return Err(format!("upload to departed peer {}", u.peer));
            }
            if !self.pieces.have().get(u.piece) {
                return Err(format!("uploading piece {} we do not have", u.piece));
            }
            let same = |o: &&Upload| o.peer == u.peer && o.piece == u.piece && !o.aborted;
            if !u.aborted && self.uploads[..k].iter().filter(same).count() > 0 {
                return Err(format!("piece {} uploaded twice to {}", u.piece, u.peer));
            }
        }
        if self.uploads.len() > self.config.upload_slots {
            return Err(format!(
                "{} uploads exceed {} slots",
                self.uploads.len(),
                self.config.upload_slots
            ));
        }
        if self.uploads.len() < self.config.upload_slots && !self.upload_rr.is_empty() {
            return Err("a free upload slot while requests wait".into());
        }
        if self.complete_emitted != self.pieces.is_complete() {
            return Err("Complete emitted iff every piece is held".into());
        }
        if let Some(reason) = self.schedulable() {
            return Err(format!("useful request left unscheduled: {reason}"));
        }
        Ok(())
    }

    // ----- uploads -------------------------------------------------------------------

    fn on_request(&mut self, peer: PeerId, piece: PieceIndex) {
        if !self.pieces.have().get(piece) {
            let msg = PeerMsg::Reject(piece);
            self.transmits.push_back(Transmit::Control { peer, msg });
            return;
        }
        let p = &self.peers[&peer];
        let active = self
            .uploads
            .iter()
            .any(|u| u.peer == peer && u.piece == piece && !u.aborted);
        if active || p.queued.iter().any(|&(q, _)| q == piece) {
            return; // a repeated request: already being served
        }
        let busy = self.uploads.len() >= self.config.upload_slots;
        if self.seed_refuses(piece) {
            // We are a seed still injecting: spend the uplink on pieces the swarm
            // lacks; someone else holds this one.
            let msg = PeerMsg::Reject(piece);
            self.transmits.push_back(Transmit::Control { peer, msg });
        } else if !busy {
            self.start_upload(peer, piece);
        } else if p.queued.len() >= self.config.max_queued_requests_per_peer {
            let msg = PeerMsg::Reject(piece);
            self.transmits.push_back(Transmit::Control { peer, msg });
        } else {
            let age = self.uploads_started;
            let p = self.peer_mut(peer);
            p.queued.push_back((piece, age));
            if p.queued.len() == 1 {
                self.upload_rr.push_back(peer);
            }
        }
    }

    fn on_cancel(&mut self, peer: PeerId, piece: PieceIndex) {
        let p = self.peer_mut(peer);
        if let Some(pos) = p.queued.iter().position(|&(q, _)| q == piece) {
            p.queued.remove(pos);
            if p.queued.is_empty() {
                self.upload_rr.retain(|&r| r != peer);
            }
            return;
        }
        if let Some(u) = self
            .uploads
            .iter_mut()
            .find(|u| u.peer == peer && u.piece == piece && !u.aborted)
        {
            u.aborted = true;
            self.transmits
                .push_back(Transmit::AbortUpload { peer, piece });
        }
    }

    /// Super-seeding: a seed refuses a piece it has already sent more often than its
    /// least-sent piece, as long as another peer holds it (the requester can get it
    /// there). Until every piece has left the seed once, its uplink is the swarm's
    /// bottleneck, and a second copy of one piece delays the first of another.
    fn seed_refuses(&self, piece: PieceIndex) -> bool {
        self.pieces.is_complete()
            && self.sent[piece as usize] > self.sent_min
            && self.pieces.availability(piece) > 0
    }

    fn start_upload(&mut self, peer: PeerId, piece: PieceIndex) {
        self.uploads_started += 1;
        self.sent[piece as usize] += 1;
        if self.sent[piece as usize] == self.sent_min + 1 {
            self.at_sent_min -= 1;
            if self.at_sent_min == 0 {
                // A full round is done: every piece left at least `sent_min + 1` times.
                self.sent_min += 1;
                let min = self.sent_min;
                self.at_sent_min = self.sent.iter().filter(|&&c| c == min).count() as u32;
            }
        }
        self.uploads.push(Upload {
            peer,
            piece,
            aborted: false,
        });
        self.transmits.push_back(Transmit::Upload { peer, piece });
    }

    /// Gives free slots to queued requests: the piece we sent fewest times first, then
    /// the rarest, then round-robin across peers (oldest first within a peer). A
    /// request passed over for `STARVE_AFTER_SLOTS` x `upload_slots` uploads goes
    /// first, oldest first: without that, a request for a piece we have sent often
    /// waited behind a stream of fresher ones until its requester timed it out (30 s
    /// stragglers in the namespace benchmark).
    fn fill_upload_slots(&mut self) {
        let starve = STARVE_AFTER_SLOTS * self.config.upload_slots.max(1) as u64;
        while self.uploads.len() < self.config.upload_slots && !self.upload_rr.is_empty() {
            let mut best: Option<((bool, u64, u32, usize), usize)> = None;
            for (k, peer) in self.upload_rr.iter().enumerate() {
                for (j, &(piece, queued_at)) in self.peers[peer].queued.iter().enumerate() {
                    let starved = self.uploads_started - queued_at >= starve;
                    let key = if starved {
                        (false, queued_at, 0, k)
                    } else {
                        (
                            true,
                            u64::from(self.sent[piece as usize]),
                            self.pieces.availability(piece),
                            k,
                        )
                    };
                    if best.is_none_or(|(b, _)| key < b) {
                        best = Some((key, j));
                    }
                }
            }
            let ((_, _, _, k), j) = best.expect("peers in rotation have queued requests");
            let peer = self.upload_rr.remove(k).expect("index from the rotation");
            let p = self.peer_mut(peer);
            let (piece, _) = p.queued.remove(j).expect("index from the queue");
            if !p.queued.is_empty() {
                self.upload_rr.push_back(peer);
            }
            if self.seed_refuses(piece) {
                // Another peer got it while this request waited: same as on arrival.
                let msg = PeerMsg::Reject(piece);
                self.transmits.push_back(Transmit::Control { peer, msg });
                continue;
            }
            self.start_upload(peer, piece);
        }
    }

    // ----- peers leaving -------------------------------------------------------------

    /// Forgets a connected peer entirely. Returns false if it was not connected.
    fn remove_peer(&mut self, peer: PeerId) -> bool {
        let Some(p) = self.peers.remove(&peer) else {
            return false;
        };
        self.departed.insert(peer);
        self.pieces.requeue_peer(peer);
        if let Some(b) = &p.bitfield {
            self.pieces.remove_available(b);
        }
        if !p.queued.is_empty() {
            self.upload_rr.retain(|&r| r != peer);
        }
        self.uploads.retain(|u| u.peer != peer);
        true
    }

    fn disconnect(&mut self, peer: PeerId, reason: DisconnectReason) {
        self.transmits
            .push_back(Transmit::Disconnect { peer, reason });
    }

    fn violation(&mut self, peer: PeerId) {
        self.disconnect(peer, DisconnectReason::ProtocolViolation);
        self.remove_peer(peer);
        self.fill_upload_slots();
    }

    fn ban(&mut self, peer: PeerId) {
        if !self.banned.insert(peer) {
            return;
        }
        if self.remove_peer(peer) {
            self.disconnect(peer, DisconnectReason::Banned);
            self.fill_upload_slots();
        } else {
            self.departed.insert(peer);
        }
        self.events.push_back(Event::PeerBanned(peer));
    }

    fn peer_mut(&mut self, peer: PeerId) -> &mut Peer {
        self.peers
            .get_mut(&peer)
            .expect("caller checked the peer is connected")
    }

    // ----- requests ------------------------------------------------------------------

    /// How many more requests may go to `peer` right now (within its window and the
    /// total budget).
    fn free_slots(&self, id: PeerId, p: &Peer, non_seeds: bool) -> usize {
        let mut window = p.window;
        if self.peers.len() == 1 && p.window == self.config.max_requests_per_peer.max(1) {
            // A lone peer (a plain two-node transfer) gets the whole budget: the
            // window exists to spread requests across holders, and there are none
            // to spread across. A peer whose window shrank on timeouts keeps it.
            window = self.max_window();
        }
        if non_seeds && p.is_seed() {
            window = window.min(SEED_WINDOW);
        }
        window
            .saturating_sub(self.pieces.requests_to(id))
            .min(self.budget())
    }

    /// The most requests one peer may ever have outstanding from us.
    fn max_window(&self) -> usize {
        self.config
            .max_requests_per_peer
            .max(self.config.max_requests_total)
            .max(1)
    }

    /// How many more requests may be outstanding in total.
    fn budget(&self) -> usize {
        self.config
            .max_requests_total
            .max(1)
            .saturating_sub(self.pieces.requests_in_flight())
    }

    /// Whether `peer` may be asked for Missing `piece`: it holds it, and either it did
    /// not refuse it before or every holder did.
    fn may_ask(&self, p: &Peer, piece: PieceIndex, avoiders: &[u32]) -> bool {
        let holds = p.bitfield.as_ref().is_some_and(|b| b.get(piece));
        holds
            && (!p.avoid.contains(&piece)
                || self.pieces.availability(piece) <= avoiders[piece as usize])
    }

    fn avoiders(&self) -> Vec<u32> {
        let mut v = vec![0u32; self.pieces.piece_count() as usize];
        for p in self.peers.values() {
            for &i in &p.avoid {
                v[i as usize] += 1;
            }
        }
        v
    }

    fn has_non_seed(&self) -> bool {
        self.peers
            .values()
            .any(|p| p.bitfield.is_some() && !p.is_seed())
    }

    /// Sends every request that is useful now. See the module docs for the policy.
    fn schedule(&mut self, now: Instant) {
        if self.pieces.missing_count() == 0 && self.pieces.requests_in_flight() == 0 {
            return;
        }
        let non_seeds = self.has_non_seed();
        let seeds = self.peers.values().filter(|p| p.is_seed()).count() as u32;
        // Non-seeds first, in a fresh random order each time so no peer is favoured.
        let mut order: Vec<(bool, u64, PeerId)> = Vec::new();
        for (&id, p) in &self.peers {
            if p.bitfield.is_some() && self.free_slots(id, p, non_seeds) > 0 {
                order.push((p.is_seed(), self.rng.next(), id));
            }
        }
        if order.is_empty() {
            return;
        }
        order.sort_unstable();

        if self.pieces.missing_count() > 0 {
            let mut missing: Vec<PieceIndex> = (0..self.pieces.piece_count())
                .filter(|&i| self.pieces.is_missing(i))
                .collect();
            let avoiders = self.avoiders();
            for &(is_seed, _, id) in &order {
                if missing.is_empty() {
                    break;
                }
                let p = &self.peers[&id];
                let free = self.free_slots(id, p, non_seeds);
                if free == 0 {
                    continue;
                }
                let mut cands: Vec<(u32, u32, u64, PieceIndex)> = Vec::new();
                for &i in &missing {
                    if self.may_ask(p, i, &avoiders) {
                        let avail = self.pieces.availability(i);
                        // From a seed, prefer what no non-seed peer could give us.
                        let class = u32::from(is_seed && avail > seeds);
                        cands.push((class, avail, self.rng.next(), i));
                    }
                }
                take_smallest(&mut cands, free);
                for &(_, _, _, i) in &cands {
                    self.send_request(i, id, now);
                }
                missing.retain(|&i| self.pieces.is_missing(i));
            }
            // Endgame only once no missing piece could be asked of anyone.
            if missing.iter().any(|&i| self.pieces.availability(i) > 0) {
                return;
            }
        }

        // Endgame: duplicate the oldest outstanding requests onto idle slots.
        let max_dup = self.config.endgame_max_duplicates.max(1);
        let in_flight: Vec<PieceIndex> = (0..self.pieces.piece_count())
            .filter(|&i| matches!(self.pieces.state(i), PieceState::InFlight(_)))
            .collect();
        if in_flight.is_empty() {
            return;
        }
        for &(_, _, id) in &order {
            let p = &self.peers[&id];
            let free = self.free_slots(id, p, non_seeds);
            if free == 0 {
                continue;
            }
            let bits = p.bitfield.as_ref().expect("ordered peers have bitfields");
            let mut cands: Vec<(usize, Instant, u64, PieceIndex)> = Vec::new();
            for &i in &in_flight {
                let reqs = self.pieces.requesters(i);
                if bits.get(i) && reqs.len() < max_dup && reqs.iter().all(|&(r, _)| r != id) {
                    let oldest = reqs.iter().map(|&(_, t)| t).min().expect("InFlight");
                    cands.push((reqs.len(), oldest, self.rng.next(), i));
                }
            }
            take_smallest(&mut cands, free);
            for &(_, _, _, i) in &cands {
                self.send_request(i, id, now);
            }
        }
    }

    fn send_request(&mut self, piece: PieceIndex, peer: PeerId, now: Instant) {
        let ok = self.pieces.request(piece, peer, now);
        debug_assert!(ok, "scheduler picked an unrequestable piece");
        self.transmits.push_back(Transmit::Control {
            peer,
            msg: PeerMsg::Request(piece),
        });
    }

    /// Describes a request `schedule` should have sent but did not, if any.
    fn schedulable(&self) -> Option<String> {
        let non_seeds = self.has_non_seed();
        let avoiders = self.avoiders();
        let mut missing_available = false;
        for i in 0..self.pieces.piece_count() {
            if !self.pieces.is_missing(i) {
                continue;
            }
            missing_available |= self.pieces.availability(i) > 0;
            for (&id, p) in &self.peers {
                if self.may_ask(p, i, &avoiders) && self.free_slots(id, p, non_seeds) > 0 {
                    return Some(format!("Missing piece {i} could go to idle peer {id}"));
                }
            }
        }
        if missing_available {
            return None;
        }
        let max_dup = self.config.endgame_max_duplicates.max(1);
        for i in 0..self.pieces.piece_count() {
            let reqs = self.pieces.requesters(i);
            if reqs.is_empty() || reqs.len() >= max_dup {
                continue;
            }
            for (&id, p) in &self.peers {
                let holds = p.bitfield.as_ref().is_some_and(|b| b.get(i));
                if holds
                    && reqs.iter().all(|&(r, _)| r != id)
                    && self.free_slots(id, p, non_seeds) > 0
                {
                    return Some(format!("endgame piece {i} could go to idle peer {id}"));
                }
            }
        }
        None
    }
}

/// Keeps the `k` smallest elements of `v`, sorted ascending.
fn take_smallest<T: Ord>(v: &mut Vec<T>, k: usize) {
    if v.len() > k {
        if k == 0 {
            v.clear();
            return;
        }
        v.select_nth_unstable(k - 1);
        v.truncate(k);
    }
    v.sort_unstable();
}
