//! Octopus transfer engine: peer-to-peer distribution of files and trees over QUIC.
//!
//! Layers, bottom up:
//! - [`manifest`]: what a content is and how every byte is checked (size-based MD5);
//! - [`frame`] and [`ticket`]: the wire format, with hard caps on every length;
//! - [`tls`]: mutual TLS identities and the trust hook;
//! - [`store`]: mmap serving, partial files, resume record, atomic rename;
//! - [`safefs`]: descriptor-relative file operations that never follow a planted link;
//! - [`limit`]: token buckets on both directions;
//! - `octopus_swarm` (crate `transfer/core`): the sans-IO swarm logic;
//! - [`node`]: the tokio runtime that drives the core over quinn.

pub mod frame;
pub mod limit;
pub mod manifest;
pub mod net;
pub mod node;
pub mod safefs;
pub mod store;
pub mod ticket;
pub mod tls;

pub use octopus_swarm as swarm;
