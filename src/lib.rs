//! fencegate: an HTTP proxy in front of a store that refuses writes from
//! writers that lost their leadership.
//!
//! A tour in reading order:
//! - [`token`] parses the fencing header once into a [`token::Token`];
//!   [`path`] normalizes the path so the path judged is the path forwarded.
//! - [`fencing`] is the admission rule as a pure function.
//! - [`gate`] holds each domain's live state (epoch, refusal mark, writes
//!   in flight) and runs raises with their barrier; [`committer`] makes
//!   raises durable in the [`state`] file, several raises per commit.
//! - [`proxy`] is the data path of one request, top to bottom; [`forward`],
//!   [`body`] and [`hop`] are its store side, bodies and header hygiene;
//!   [`pool`] and, where it is on, [`pipeline`] hold its store connections;
//!   [`socket`] is how both sides' connections read and write.
//! - [`error`] is the one place that turns refusals into HTTP answers.
//! - [`server`], [`admin`], [`metrics`], [`shutdown`] and [`app`] run the
//!   process; [`affinity`] pins its serving threads where asked;
//!   [`commands`] are the subcommands and their exit codes.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod affinity;
pub mod app;
pub mod body;
pub mod codec;
pub mod commands;
pub mod committer;
pub mod config;
pub mod connector;
pub mod coordinator;
pub mod drain;
pub mod election;
pub mod error;
pub mod fencing;
pub mod forward;
pub mod gate;
pub mod hop;
pub mod metrics;
pub mod path;
pub mod pipeline;
pub mod pool;
pub mod proxy;
pub mod server;
pub mod shutdown;
pub mod socket;
pub mod state;
pub mod timer;
pub mod token;
