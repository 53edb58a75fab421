//! The client tools: `tether connect` (a stdio MCP server relaying to a remote one) and
//! `tether check` (the connection test). They speak MCP to servers, Tether or not, and use
//! the gateway's own code only where it is the same job (`upstream::http`).
//! Must not: depend on the session layer, the stores or the front door.

pub mod check;
pub mod connect;
