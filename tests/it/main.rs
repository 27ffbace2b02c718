//! The single integration test crate of fencegate.
//!
//! Tests start real processes (nginx, etcd, fencegate itself) on free
//! loopback ports through the helpers in `support`. Missing tools make a
//! test fail with the command that installs them; no test skips silently.
//! `scripts/test` installs everything and runs the whole suite.

mod support;

mod affinity;
mod barrier;
mod bypass;
mod codings;
mod coordinator_faults;
mod crash_loop;
mod durability;
mod election;
mod etcd_harness;
mod etcd_security;
mod example_writer;
mod history;
mod hostile;
mod lane_wire;
mod logs;
mod metrics;
mod overrides;
mod pipelining;
mod responses;
mod smoke;
mod soak;
mod store_answers;
mod store_faults;
mod store_pipelining;
