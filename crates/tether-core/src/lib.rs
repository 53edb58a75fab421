//! Tether core: a gateway that makes Model Context Protocol sessions durable.
//!
//! Layers, with dependencies pointing down only (see `ARCHITECTURE.md`):
//! - [`app`]: wiring; the only module that knows all others.
//! - [`front`]: the HTTP front door (Streamable HTTP and 2024-11-05 HTTP+SSE).
//! - [`listener`]: bounded connections (caps, header and write timeouts) for any router.
//! - [`session`]: sessions, rehydration, id rewriting, routing, upstream supervision.
//! - [`upstream`]: stdio children and Streamable HTTP upstream connections.
//! - [`store`]: durable session records and stream event logs (SQLite by default).
//! - [`tasks`]: durable tasks (issue 28, begun): the record and its shapes in both eras.
//! - [`client`]: the client side: `tether connect` ([`connect`]) and `tether check` ([`check`]).
//! - [`policy`], [`protocol`], [`modern`], [`config`]: pure decisions, JSON-RPC envelopes,
//!   the 2026-07-28 era's rules and translations, settings.
//! - [`error`]: the one error (kind, origin, retry advice) and its JSON-RPC form.
//! - [`wire`]: the typed JSON-RPC message, parsed once at each edge.
//! - [`ids`], [`telemetry`], [`log_limit`], [`metrics`], [`ledger`], [`fault`], [`threads`]: the ground floor.
//!
//! Must not: export anything a binary could use to bypass the session layer's rules.

pub mod admin;
pub mod app;
pub mod auth;
pub mod client;
pub mod config;
pub mod error;
pub mod fault;
pub mod front;
pub mod fuzz;
pub mod hub;
pub mod ids;
pub mod ledger;
pub mod listener;
pub mod log_limit;
pub mod metrics;
pub mod modern;
pub mod policy;
pub mod protocol;
pub mod servers;
pub mod session;
pub mod state_dir;
pub mod store;
pub mod tasks;
pub mod telemetry;
pub mod threads;
pub mod upstream;
pub mod wire;

/// Where the client tools lived before `client/`; kept so existing paths still work.
pub use client::{check, connect};
