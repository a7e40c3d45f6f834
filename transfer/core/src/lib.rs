//! The sans-IO swarm core of the Octopus transfer engine.
//!
//! Why sans-IO: the hard part of a swarm (which piece to ask for, from whom, when to
//! give up on a request, when to duplicate requests at the end) is pure logic. Keeping
//! it free of sockets, clocks and tokio lets a deterministic simulation drive hundreds
//! of nodes under a virtual clock, and lets property tests check the invariants after
//! every single step. The runtime in `octopus-transfer` owns the sockets and the disk;
//! it feeds this core events stamped with `now` and drains what the core wants done.
//!
//! The model follows quinn-proto: `handle_*` methods take inputs, `poll_transmit`,
//! `poll_event` and `poll_timeout` hand back outputs. Nothing here blocks or sleeps.
//!
//! Piece states and their invariants are written down in `STATE.md` next to this file.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

mod bitfield;
mod pieces;
mod swarm;

pub use bitfield::{Bitfield, BitfieldError};
pub use pieces::{PieceState, PieceTracker};
pub use swarm::Swarm;

/// Runtime-assigned handle of a connected peer. Never reused within one `Swarm`.
pub type PeerId = u64;

/// Index of a piece in the manifest's piece table.
pub type PieceIndex = u32;

/// Control messages exchanged between two peers about one content.
///
/// Piece payloads never travel as a `PeerMsg`; the runtime sends them as raw bytes on
/// their own stream when the core emits [`Transmit::Upload`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// The full set of pieces the sender holds. Sent once, first, after connecting.
    Bitfield(Bitfield),
    /// The sender has just verified this piece.
    Have(PieceIndex),
    /// Please send this piece.
    Request(PieceIndex),
    /// Never mind this earlier request (endgame duplicate, or it timed out).
    Cancel(PieceIndex),
    /// The sender will not serve this request (does not hold it, or its queue is full).
    Reject(PieceIndex),
}

/// Tuning knobs.
///
/// The runtime should build this with [`Config::for_piece_size`], which sizes the
/// request window to the content's piece size; [`Config::default`] suits 256 KiB
/// pieces. The deterministic simulation in `tests/sim.rs` runs with exactly what
/// `for_piece_size` returns, so what it measures is what the runtime gets.
#[derive(Debug, Clone)]
pub struct Config {
    /// Requests in flight to one peer (pipelining depth). Deeper than "one being sent
    /// plus one waiting" buys nothing: a request queued behind others at a busy peer
    /// pins its piece there while another holder's uplink may be idle.
    pub max_requests_per_peer: usize,
    /// Requests in flight across all peers. Bounds how many pieces are half-fetched
    /// at once, so each arrives (and can be re-shared) sooner.
    pub max_requests_total: usize,
    /// Uploads served at once by this node, across all peers. Few, so each finishes
    /// quickly and its piece can be re-shared by the receiver; enough that one slow
    /// receiver does not leave the uplink idle.
    pub upload_slots: usize,
    /// Requests a peer may queue with us beyond the slots; more are answered `Reject`.
    pub max_queued_requests_per_peer: usize,
    /// An unanswered request is cancelled and its piece re-queued after this long.
    pub request_timeout: Duration,
    /// In endgame, how many peers may be asked for the same piece at once.
    pub endgame_max_duplicates: usize,
    /// Seed for the deterministic random tie-break.
    pub rng_seed: u64,
}

/// Bytes a node keeps requested across all its peers: 4 MiB keeps a 100 Mbit/s
/// downlink busy across 300 ms of round trip, and is few pieces at common sizes.
const TOTAL_IN_FLIGHT_BYTES: u64 = 4 << 20;

impl Config {
    /// The configuration for a content cut in pieces of `piece_size` bytes. The
    /// runtime calls this (then sets `rng_seed`); the simulation validates it.
    ///
    /// * `max_requests_per_peer`: 2 (one piece arriving, one waiting at the sender so
    ///   its uplink does not idle for a round trip between pieces).
    /// * `max_requests_total`: `ceil(4 MiB / piece_size)` clamped to `[4, 32]`.
    /// * the rest as [`Config::default`].
    pub fn for_piece_size(piece_size: u32) -> Config {
        let total = TOTAL_IN_FLIGHT_BYTES.div_ceil(u64::from(piece_size.max(1)));
        Config {
            max_requests_total: total.clamp(4, 32) as usize,
            ..Config::default()
        }
    }
}

impl Default for Config {
    /// Suits 256 KiB pieces; prefer [`Config::for_piece_size`].
    fn default() -> Self {
        Config {
            max_requests_per_peer: 2,
            max_requests_total: 16,
            upload_slots: 8,
            max_queued_requests_per_peer: 64,
            request_timeout: Duration::from_secs(30),
            endgame_max_duplicates: 2,
            rng_seed: 0,
        }
    }
}

/// Something the runtime must do on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// Send a control message to a peer.
    Control { peer: PeerId, msg: PeerMsg },
    /// Start sending this piece's bytes to the peer. The runtime reports the end with
    /// [`Swarm::handle_upload_finished`] (whether it succeeded or not).
    Upload { peer: PeerId, piece: PieceIndex },
    /// Stop an upload in progress (the peer cancelled it).
    AbortUpload { peer: PeerId, piece: PieceIndex },
    /// Close the connection to this peer.
    Disconnect {
        peer: PeerId,
        reason: DisconnectReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The peer sent a piece that failed its MD5 check.
    Banned,
    /// The peer broke the protocol (for example, a piece index out of range).
    ProtocolViolation,
}

/// Something the runtime should know about (progress, bans, completion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A piece was received and verified; the runtime records it for resume.
    PieceCompleted(PieceIndex),
    /// A peer was banned for this content; the runtime must never reconnect to it.
    PeerBanned(PeerId),
    /// Every piece is held. Emitted exactly once (or never, for a node that starts complete).
    Complete,
}

/// Counters for progress display and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub pieces_have: u32,
    pub pieces_total: u32,
    pub peers: usize,
    pub requests_in_flight: usize,
    pub uploads_active: usize,
    pub duplicate_pieces_received: u64,
    pub corrupt_pieces_received: u64,
    pub requests_timed_out: u64,
}

/// Convenience for callers that only need a fixed base instant.
pub fn at(base: Instant, offset: Duration) -> Instant {
    base + offset
}
