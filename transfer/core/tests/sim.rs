//! Deterministic discrete-event simulation of a whole swarm under a virtual clock.
//!
//! Why a simulation: the properties that matter for a swarm (everyone finishes, close
//! to the time the links allow, without wearing out the original sharer, despite
//! liars, crashes and silent peers) only show up with many nodes. Because the core is
//! sans-IO, dozens of `Swarm`s can be driven in one thread, with no sockets or sleeps,
//! and every run is bit-for-bit reproducible.
//!
//! ## Model
//!
//! * **Clock.** One `Instant` is captured at start; every timestamp handed to a swarm
//!   is `base + Duration::from_nanos(t)` with `t` the virtual time in nanoseconds.
//! * **Topology.** Full mesh: every pair of nodes is connected at `t = 0`.
//! * **Control messages** arrive after a fixed latency ([`LATENCY_NS`], 5 ms), in order.
//! * **Piece data** is a fluid flow from the sender's uplink to the receiver's
//!   downlink. Concurrent flows share links by *max-min fairness* (progressive
//!   filling), recomputed whenever a flow starts or stops: this is roughly what
//!   competing TCP/QUIC congestion controllers converge to, and unlike a "reserve the
//!   link until t" model it neither serialises flows artificially nor leaves a link
//!   idle while a flow waits on someone else's link. A flow starts when the sender's
//!   core emits `Transmit::Upload` (if the receiver's core still expects the piece,
//!   as the runtime checks; otherwise the upload ends at once) and is delivered the
//!   instant its last byte is through (its propagation delay is negligible next to
//!   its transmission time and ignored).
//! * **Abort** (`Transmit::AbortUpload`) removes the flow; the bytes already sent
//!   count as uploaded but are wasted. `Disconnect` closes the connection: both ends
//!   see `handle_peer_lost` and their flows between the two are dropped.
//! * **Misbehaviour**: a *corrupt* node's uploads all fail the receiver's hash check;
//!   a *silent* node never answers requests; a *killed* node vanishes at a set time.
//!
//! After every step, `check_invariants` is called on every swarm the step touched
//! (the others did not change, so this is the same as checking all of them), and on
//! all of them at the end.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use octopus_swarm::{Bitfield, Config, Event, PeerId, PeerMsg, PieceIndex, Swarm, Transmit};

const LATENCY_NS: u64 = 5_000_000;
const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
/// 100 Mbit/s in bytes per second.
const MBIT100: f64 = 12_500_000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Honest,
    /// Every piece it sends fails the receiver's hash check.
    Corrupt,
    /// Ignores every request it receives: no data, no reject.
    Silent,
}

#[derive(Debug, Clone)]
struct NodeSpec {
    have: Bitfield,
    up: f64,
    down: f64,
    behaviour: Behaviour,
    kill_at: Option<Duration>,
}

#[derive(Debug)]
struct Node {
    swarm: Swarm,
    up: f64,
    down: f64,
    behaviour: Behaviour,
    alive: bool,
    finished_at: Option<u64>,
    uploaded: f64,
    completed_pieces: u32,
    requests_sent: Vec<PieceIndex>,
    banned: Vec<PeerId>,
    timer: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Deliver { from: usize, to: usize, msg: MsgKey },
    Timer { node: usize },
    Kill { node: usize },
}

/// `PeerMsg` is not `Ord`; the heap needs a total order, so messages are stored in a
/// side table and referenced by sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct MsgKey(u64);

#[derive(Debug, Clone)]
struct Flow {
    from: usize,
    to: usize,
    piece: PieceIndex,
    remaining: f64,
    rate: f64,
    finish: u64,
}

struct Sim {
    base: Instant,
    now: u64,
    piece_size: u64,
    piece_count: u32,
    nodes: Vec<Node>,
    connected: Vec<Vec<bool>>,
    heap: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    msgs: BTreeMap<u64, PeerMsg>,
    seq: u64,
    flows: Vec<Flow>,
    flows_updated_at: u64,
    steps: u64,
    /// Invariants are checked after every `check_every`-th step (1 = all of them).
    /// The large swarms sample, or the suite would take minutes.
    check_every: u64,
}

impl Sim {
    fn new(piece_size: u64, piece_count: u32, specs: Vec<NodeSpec>, config: &Config) -> Sim {
        let base = Instant::now();
        let n = specs.len();
        let mut sim = Sim {
            base,
            now: 0,
            piece_size,
            piece_count,
            nodes: Vec::new(),
            connected: vec![vec![false; n]; n],
            heap: BinaryHeap::new(),
            msgs: BTreeMap::new(),
            seq: 0,
            flows: Vec::new(),
            flows_updated_at: 0,
            steps: 0,
            check_every: 1,
        };
        for (i, s) in specs.into_iter().enumerate() {
            let cfg = Config {
                rng_seed: config.rng_seed.wrapping_mul(1000) + i as u64,
                ..config.clone()
            };
            sim.nodes.push(Node {
                swarm: Swarm::new(cfg, piece_count, s.have, base),
                up: s.up,
                down: s.down,
                behaviour: s.behaviour,
                alive: true,
                finished_at: None,
                uploaded: 0.0,
                completed_pieces: 0,
                requests_sent: Vec::new(),
                banned: Vec::new(),
                timer: None,
            });
            if let Some(at) = s.kill_at {
                sim.push(at.as_nanos() as u64, Ev::Kill { node: i });
            }
        }
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    sim.connected[a][b] = true;
                    let now = sim.instant();
                    sim.nodes[a].swarm.handle_peer_connected(now, b as PeerId);
                }
            }
        }
        for a in 0..n {
            sim.after(a);
        }
        sim
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, ev)));
    }

    fn content(&self) -> f64 {
        (self.piece_size * self.piece_count as u64) as f64
    }

    /// Runs until nothing is left to happen or `limit` of virtual time has passed.
    fn run(&mut self, limit: Duration) {
        let limit = limit.as_nanos() as u64;
        loop {
            let next_ev = self.heap.peek().map(|Reverse((t, _, _))| *t);
            let next_flow = self.flows.iter().map(|f| f.finish).min();
            let t = match (next_ev, next_flow) {
                (None, None) => break,
                (Some(a), None) | (None, Some(a)) => a,
                (Some(a), Some(b)) => a.min(b),
            };
            if t > limit {
                break;
            }
            if std::env::var_os("SIM_TRACE").is_some() && t / 50_000_000 != self.now / 50_000_000 {
                let have: u32 = self.nodes.iter().map(|n| n.swarm.stats().pieces_have).sum();
                let rate: f64 = self.flows.iter().map(|f| f.rate).sum();
                let inflight: usize = self
                    .nodes
                    .iter()
                    .map(|n| n.swarm.stats().requests_in_flight)
                    .sum();
                let up: usize = self
                    .nodes
                    .iter()
                    .map(|n| n.swarm.stats().uploads_active)
                    .sum();
                let seedflows = self.flows.iter().filter(|f| f.from == 0).count();
                let seedrate: f64 = self
                    .flows
                    .iter()
                    .filter(|f| f.from == 0)
                    .map(|f| f.rate)
                    .sum();
                let injected = (0..self.piece_count)
                    .filter(|&p| self.nodes.iter().skip(1).any(|n| n.swarm.have().get(p)))
                    .count();
                let minhave = self
                    .nodes
                    .iter()
                    .skip(1)
                    .map(|n| n.swarm.stats().pieces_have)
                    .min()
                    .unwrap();
                let idle_up = self
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !self.flows.iter().any(|f| f.from == *i))
                    .count();
                println!(
                    "t={:.2}s have={have} inj={injected} minhave={minhave} flows={} seedflows={seedflows} seedutil={:.2} util={:.2} idle_up={idle_up} inflight={inflight} uploads={up}",
                    secs(t),
                    self.flows.len(),
                    seedrate / MBIT100,
                    rate / (MBIT100 * self.nodes.len() as f64)
                );
            }
            if std::env::var_os("SIM_DUMP").is_some() && t / 500_000_000 != self.now / 500_000_000 {
                for (i, n) in self.nodes.iter().enumerate().take(8) {
                    let st = n.swarm.stats();
                    let missing: Vec<(u32, u32)> = (0..self.piece_count)
                        .filter(|&p| n.swarm.pieces().is_missing(p))
                        .map(|p| (p, n.swarm.pieces().availability(p)))
                        .collect();
                    println!("  node {i}: {st:?} missing(piece,avail)={missing:?}");
                }
            }
            self.now = t.max(self.now);
            self.steps += 1;
            if next_flow == Some(t) {
                self.finish_flows();
            } else {
                let Reverse((_, _, ev)) = self.heap.pop().expect("peeked");
                self.handle(ev);
            }
        }
        for n in &self.nodes {
            n.swarm.check_invariants().unwrap();
        }
    }

    fn handle(&mut self, ev: Ev) {
        let now = self.instant();
        match ev {
            Ev::Deliver { from, to, msg } => {
                let msg = self.msgs.remove(&msg.0).expect("stored message");
                if !self.nodes[to].alive || !self.connected[to][from] {
                    return;
                }
                if self.nodes[to].behaviour == Behaviour::Silent
                    && matches!(msg, PeerMsg::Request(_))
                {
                    return;
                }
                self.nodes[to]
                    .swarm
                    .handle_message(now, from as PeerId, msg);
                self.after(to);
            }
            Ev::Timer { node } => {
                if self.nodes[node].alive && self.nodes[node].timer == Some(self.now) {
                    self.nodes[node].timer = None;
                    self.nodes[node].swarm.handle_timeout(now);
                    self.after(node);
                }
            }
            Ev::Kill { node } => {
                self.nodes[node].alive = false;
                self.drop_flows(|f| f.from == node || f.to == node);
                for other in 0..self.nodes.len() {
                    if other != node && self.connected[other][node] {
                        self.connected[other][node] = false;
                        self.connected[node][other] = false;
                        if self.nodes[other].alive {
                            self.nodes[other]
                                .swarm
                                .handle_peer_lost(now, node as PeerId);
                            self.after(other);
                        }
                    }
                }
            }
        }
    }

    /// Drains what `node`'s swarm wants done, then checks its invariants and timer.
    fn after(&mut self, node: usize) {
        let mut work = vec![node];
        while let Some(n) = work.pop() {
            self.drain(n, &mut work);
            if std::env::var_os("SIM_NOCHECK").is_none()
                && self.steps.is_multiple_of(self.check_every)
            {
                if let Err(e) = self.nodes[n].swarm.check_invariants() {
                    panic!("node {n} at t={}ns: {e}", self.now);
                }
            }
            let want = self.nodes[n]
                .swarm
                .poll_timeout()
                .map(|t| (t - self.base).as_nanos() as u64);
            if want != self.nodes[n].timer {
                self.nodes[n].timer = want;
                if let Some(t) = want {
                    self.push(t.max(self.now), Ev::Timer { node: n });
                }
            }
        }
    }

    fn drain(&mut self, n: usize, work: &mut Vec<usize>) {
        let now = self.instant();
        while let Some(ev) = self.nodes[n].swarm.poll_event() {
            match ev {
                Event::PieceCompleted(_) => self.nodes[n].completed_pieces += 1,
                Event::Complete => {
                    assert!(
                        self.nodes[n].finished_at.is_none(),
                        "Complete emitted twice"
                    );
                    self.nodes[n].finished_at = Some(self.now);
                }
                Event::PeerBanned(p) => self.nodes[n].banned.push(p),
            }
        }
        let mut flows_changed = false;
        while let Some(tx) = self.nodes[n].swarm.poll_transmit() {
            match tx {
                Transmit::Control { peer, msg } => {
                    let to = peer as usize;
                    if let PeerMsg::Request(i) = msg {
                        self.nodes[n].requests_sent.push(i);
                    }
                    if self.connected[n][to] {
                        self.seq += 1;
                        let key = self.seq;
                        self.msgs.insert(key, msg);
                        self.push(
                            self.now + LATENCY_NS,
                            Ev::Deliver {
                                from: n,
                                to,
                                msg: MsgKey(key),
                            },
                        );
                    }
                }
                Transmit::Upload { peer, piece } => {
                    let to = peer as usize;
                    assert!(
                        self.nodes[n].swarm.have().get(piece),
                        "uploading a piece it lacks"
                    );
                    if self.connected[n][to] && self.nodes[to].swarm.is_expected(n as PeerId, piece)
                    {
                        self.advance_flows();
                        self.flows.push(Flow {
                            from: n,
                            to,
                            piece,
                            remaining: self.piece_size as f64,
                            rate: 0.0,
                            finish: u64::MAX,
                        });
                        flows_changed = true;
                    } else {
                        // The receiver refuses the stream: the upload ends at once.
                        self.nodes[n].swarm.handle_upload_finished(now, peer, piece);
                    }
                }
                Transmit::AbortUpload { peer, piece } => {
                    let to = peer as usize;
                    if let Some(pos) = self
                        .flows
                        .iter()
                        .position(|f| f.from == n && f.to == to && f.piece == piece)
                    {
                        self.advance_flows();
                        let f = self.flows.swap_remove(pos);
                        self.nodes[n].uploaded += self.piece_size as f64 - f.remaining;
                        flows_changed = true;
                    }
                    self.nodes[n].swarm.handle_upload_finished(now, peer, piece);
                }
                Transmit::Disconnect { peer, .. } => {
                    let to = peer as usize;
                    if self.connected[n][to] {
                        self.connected[n][to] = false;
                        self.connected[to][n] = false;
                        self.drop_flows(|f| {
                            (f.from == n && f.to == to) || (f.from == to && f.to == n)
                        });
                        // The runtime reports the closed connection on both sides; the
                        // side that asked for it ignores the report.
                        self.nodes[n].swarm.handle_peer_lost(now, peer);
                        if self.nodes[to].alive {
                            self.nodes[to].swarm.handle_peer_lost(now, n as PeerId);
                            work.push(to);
                        }
                    }
                }
            }
        }
        if flows_changed {
            self.recompute_rates();
        }
    }

    fn drop_flows(&mut self, pred: impl Fn(&Flow) -> bool) {
        self.advance_flows();
        let ps = self.piece_size as f64;
        let nodes = &mut self.nodes;
        self.flows.retain(|f| {
            if pred(f) {
                nodes[f.from].uploaded += ps - f.remaining;
                false
            } else {
                true
            }
        });
        self.recompute_rates();
    }

    fn advance_flows(&mut self) {
        let dt = (self.now - self.flows_updated_at) as f64 / 1e9;
        for f in &mut self.flows {
            f.remaining = (f.remaining - f.rate * dt).max(0.0);
        }
        self.flows_updated_at = self.now;
    }

    /// Max-min fair rates by progressive filling over uplinks and downlinks.
    fn recompute_rates(&mut self) {
        self.advance_flows();
        let n = self.nodes.len();
        let mut cap: Vec<f64> = self
            .nodes
            .iter()
            .map(|x| x.up)
            .chain(self.nodes.iter().map(|x| x.down))
            .collect();
        let mut on_link: Vec<Vec<usize>> = vec![Vec::new(); 2 * n];
        for (k, f) in self.flows.iter().enumerate() {
            on_link[f.from].push(k);
            on_link[n + f.to].push(k);
        }
        let mut count: Vec<usize> = on_link.iter().map(Vec::len).collect();
        let mut frozen = vec![false; self.flows.len()];
        loop {
            let mut best: Option<(f64, usize)> = None;
            for l in 0..2 * n {
                if count[l] > 0 {
                    let share = cap[l] / count[l] as f64;
                    if best.is_none_or(|(s, _)| share < s) {
                        best = Some((share, l));
                    }
                }
            }
            let Some((share, l)) = best else { break };
            for &k in &on_link[l] {
                if !frozen[k] {
                    frozen[k] = true;
                    let f = &mut self.flows[k];
                    f.rate = share;
                    for link in [f.from, n + f.to] {
                        cap[link] = (cap[link] - share).max(0.0);
                        count[link] -= 1;
                    }
                }
            }
        }
        for f in &mut self.flows {
            let secs = f.remaining / f.rate;
            f.finish = self.now + (secs * 1e9).ceil() as u64;
        }
    }

    fn finish_flows(&mut self) {
        self.advance_flows();
        let now_ns = self.now;
        let (done, rest): (Vec<Flow>, Vec<Flow>) = std::mem::take(&mut self.flows)
            .into_iter()
            .partition(|f| f.finish <= now_ns);
        self.flows = rest;
        self.recompute_rates();
        let now = self.instant();
        for f in done {
            self.nodes[f.from].uploaded += self.piece_size as f64;
            let ok = self.nodes[f.from].behaviour != Behaviour::Corrupt;
            self.nodes[f.from]
                .swarm
                .handle_upload_finished(now, f.to as PeerId, f.piece);
            self.after(f.from);
            if self.nodes[f.to].alive {
                self.nodes[f.to]
                    .swarm
                    .handle_piece_received(now, f.from as PeerId, f.piece, ok);
                self.after(f.to);
            }
        }
    }
}

fn spec(have: Bitfield, behaviour: Behaviour) -> NodeSpec {
    NodeSpec {
        have,
        up: MBIT100,
        down: MBIT100,
        behaviour,
        kill_at: None,
    }
}

fn swarm_specs(piece_count: u32, leechers: usize) -> Vec<NodeSpec> {
    let mut v = vec![spec(Bitfield::full(piece_count), Behaviour::Honest)];
    for _ in 0..leechers {
        v.push(spec(Bitfield::new(piece_count), Behaviour::Honest));
    }
    v
}

fn sim_config(seed: u64, piece_size: u64) -> Config {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let c = Config::for_piece_size(piece_size as u32);
    Config {
        rng_seed: seed,
        request_timeout: Duration::from_secs(5),
        upload_slots: env("SLOTS", c.upload_slots),
        max_requests_per_peer: env("REQS", c.max_requests_per_peer),
        max_requests_total: env("TOTAL", c.max_requests_total),
        endgame_max_duplicates: env("DUPS", c.endgame_max_duplicates),
        ..c
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Runs 1 seed + `leechers` on symmetric 100 Mbit/s links and returns (last finish
/// / ideal, seed upload / content). Ideal is size / link rate: the seed must send
/// everything once and every leecher must receive everything once.
fn one_seed_swarm(leechers: usize, content: u64, piece_size: u64, check_every: u64) -> (f64, f64) {
    let piece_count = (content / piece_size) as u32;
    let mut sim = Sim::new(
        piece_size,
        piece_count,
        swarm_specs(piece_count, leechers),
        &sim_config(1, piece_size),
    );
    sim.check_every = check_every;
    sim.run(Duration::from_secs(120));
    let ideal = sim.content() / MBIT100;
    let last = sim
        .nodes
        .iter()
        .skip(1)
        .map(|n| n.finished_at.expect("every leecher finishes"))
        .max()
        .unwrap();
    let ratio = secs(last) / ideal;
    let seed_ratio = sim.nodes[0].uploaded / sim.content();
    let dups: u64 = sim
        .nodes
        .iter()
        .map(|n| n.swarm.stats().duplicate_pieces_received)
        .sum();
    println!(
        "1 seed + {leechers} leechers, {} MiB in {} KiB pieces, 100 Mbit/s: last finish {:.3}s, \
         ideal {ideal:.3}s, ratio {ratio:.3}; seed uploaded {seed_ratio:.2}x content; \
         duplicates {dups}; steps {}",
        content / MIB,
        piece_size / KIB,
        secs(last),
        sim.steps
    );
    for n in &sim.nodes {
        assert!(n.swarm.is_complete());
        assert_eq!(n.swarm.stats().corrupt_pieces_received, 0);
    }
    (ratio, seed_ratio)
}

#[test]
fn one_seed_fifty_leechers_near_ideal() {
    // 512 pieces, about what `choose_piece_size` gives any content. Measured: 1.32 x
    // ideal, the seed sends 1.04 x the content. The loss is the start (the first
    // pieces must leave the seed before anyone can trade) and the tail (the last
    // injected pieces still have to reach 50 nodes).
    let (ratio, seed_ratio) = one_seed_swarm(50, 32 * MIB, 64 * KIB, 16);
    assert!(ratio <= 1.35, "last leecher finished at {ratio:.3} x ideal");
    assert!(
        seed_ratio <= 1.15,
        "seed uploaded {seed_ratio:.2} x content"
    );
}

#[test]
fn one_seed_sixteen_leechers_like_the_bench() {
    // The shape of the `octo swarm-bench` target (16 peers, 100 MiB, 128 KiB pieces).
    // Measured: 1.09 x ideal, seed 1.03 x. The bound for the real network is
    // 1.25 x and 2.5 x.
    let (ratio, seed_ratio) = one_seed_swarm(16, 100 * MIB, 128 * KIB, 4);
    assert!(ratio <= 1.15, "last leecher finished at {ratio:.3} x ideal");
    assert!(seed_ratio <= 1.1, "seed uploaded {seed_ratio:.2} x content");
}

/// Smaller swarms for the failure scenarios: 4 MiB in 128 KiB pieces.
const SMALL_PIECE: u64 = 128 * KIB;
const SMALL_COUNT: u32 = 32;

fn leechers_done(sim: &Sim, except: &[usize]) {
    for (i, n) in sim.nodes.iter().enumerate() {
        if !except.contains(&i) {
            assert!(
                n.swarm.is_complete(),
                "node {i} did not finish: {:?}",
                n.swarm.stats()
            );
            assert!(n.finished_at.is_some() || i == 0);
        }
    }
}

#[test]
fn corrupt_peer_is_banned_and_others_finish() {
    let mut specs = swarm_specs(SMALL_COUNT, 12);
    let liar = specs.len();
    specs.push(spec(Bitfield::new(SMALL_COUNT), Behaviour::Corrupt));
    let mut sim = Sim::new(SMALL_PIECE, SMALL_COUNT, specs, &sim_config(2, SMALL_PIECE));
    sim.run(Duration::from_secs(120));
    leechers_done(&sim, &[liar]);
    let corrupt: u64 = sim
        .nodes
        .iter()
        .map(|n| n.swarm.stats().corrupt_pieces_received)
        .sum();
    assert!(corrupt > 0, "the liar never got to send anything");
    for (i, n) in sim.nodes.iter().enumerate() {
        let st = n.swarm.stats();
        if st.corrupt_pieces_received > 0 {
            assert_eq!(
                n.banned,
                vec![liar as PeerId],
                "node {i} banned the wrong peers"
            );
            assert!(!sim.connected[i][liar], "node {i} still talks to the liar");
        } else {
            assert!(n.banned.is_empty());
        }
    }
    println!(
        "corrupt scenario: {corrupt} corrupt pieces received, liar banned by {} nodes",
        sim.nodes.iter().filter(|n| !n.banned.is_empty()).count()
    );
}

#[test]
fn killed_peer_does_not_stall_the_others() {
    let mut specs = swarm_specs(SMALL_COUNT, 20);
    let victim = 3;
    specs[victim].kill_at = Some(Duration::from_millis(250));
    let mut sim = Sim::new(SMALL_PIECE, SMALL_COUNT, specs, &sim_config(3, SMALL_PIECE));
    sim.run(Duration::from_secs(120));
    assert!(!sim.nodes[victim].alive);
    assert!(
        !sim.nodes[victim].swarm.is_complete(),
        "killed too late to matter"
    );
    leechers_done(&sim, &[victim]);
    for (i, n) in sim.nodes.iter().enumerate() {
        if i != victim {
            assert_eq!(
                n.swarm.stats().peers,
                sim.nodes.len() - 2,
                "the dead peer is forgotten"
            );
        }
    }
}

#[test]
fn silent_peer_requests_time_out_and_others_finish() {
    let mut specs = swarm_specs(SMALL_COUNT, 10);
    let mute = specs.len();
    // It holds half the content, so others have every reason to ask it.
    let mut half = Bitfield::new(SMALL_COUNT);
    for i in 0..SMALL_COUNT / 2 {
        half.set(i);
    }
    specs.push(spec(half, Behaviour::Silent));
    let config = Config {
        request_timeout: Duration::from_millis(150),
        ..sim_config(4, SMALL_PIECE)
    };
    let mut sim = Sim::new(SMALL_PIECE, SMALL_COUNT, specs, &config);
    sim.run(Duration::from_secs(300));
    leechers_done(&sim, &[mute]);
    let timed_out: u64 = sim
        .nodes
        .iter()
        .map(|n| n.swarm.stats().requests_timed_out)
        .sum();
    assert!(timed_out > 0, "nobody asked the silent peer");
    let last = sim
        .nodes
        .iter()
        .filter_map(|n| n.finished_at)
        .max()
        .unwrap();
    println!(
        "silent scenario: {timed_out} requests timed out, last finish {:.2}s",
        secs(last)
    );
}

#[test]
fn resumed_node_fetches_only_what_it_lacks() {
    let mut specs = swarm_specs(SMALL_COUNT, 4);
    let mut half = Bitfield::new(SMALL_COUNT);
    for i in (0..SMALL_COUNT).step_by(2) {
        half.set(i);
    }
    specs[1].have = half;
    let mut sim = Sim::new(SMALL_PIECE, SMALL_COUNT, specs, &sim_config(5, SMALL_PIECE));
    sim.run(Duration::from_secs(60));
    leechers_done(&sim, &[]);
    let n = &sim.nodes[1];
    assert!(
        n.requests_sent.iter().all(|i| i % 2 == 1),
        "asked for a piece it had"
    );
    assert_eq!(n.completed_pieces, SMALL_COUNT / 2);
    assert!(
        n.uploaded > 0.0,
        "the resumed half is shared from the start"
    );
}
