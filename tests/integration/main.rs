//! The integration suite: one test binary against real Redis and Postgres (started by
//! `deploy/dev.sh test`) and the in-process LLM emulator.

mod api;
mod bad_input;
mod bench;
mod cache;
mod cli;
mod dashboard;
mod explain;
mod faults;
mod helpers;
mod http_front;
mod http_reads;
mod ledger;
mod llm;
mod metrics;
mod openapi;
mod partitions;
mod performance;
mod pipeline;
mod procfile;
mod proxy;
mod queue;
mod rate_limit;
mod reps;
mod schedule;
mod sdk;
mod seed;
mod stats;
mod tls;
mod warm;
