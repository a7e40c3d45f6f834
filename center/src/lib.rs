//! Octopus center: the management center (see ARCHITECTURE.md).
pub mod auth;
pub mod store;
pub mod target;
pub mod api;
pub mod center;
