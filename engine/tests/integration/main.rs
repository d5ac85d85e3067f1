//! The engine's integration tests, one module per area, linked into one test binary (one link of the
//! whole dependency graph instead of one per file: CI's build time and disk stay small). Run one area with
//! `cargo nextest run -p voicegate-engine --test integration <module>::`.

mod fair_use_support;

mod audio_offline;
mod audio_proptest;
mod conversation_store;
mod fair_use_bench;
mod fair_use_facade;
mod fair_use_lifecycle;
mod fair_use_plans;
mod fair_use_resolver;
mod fair_use_stages;
mod fair_use_store;
mod layers;
mod lease_store;
mod meter_actor;
mod meter_config;
mod meter_memory;
mod meter_oracle;
mod meter_outage;
mod meter_reference;
mod meter_window;
mod store_cluster;
mod store_redis;
mod store_replicas;
mod stt_local;
mod supervisor_concurrency;
mod supervisor_faults;
mod supervisor_heuristic;
mod supervisor_nodes;
mod supervisor_openai;
mod sync_jobs_store;
