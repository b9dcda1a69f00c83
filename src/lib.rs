//! Tombstone: a Kubernetes operator that enforces GDPR storage limitation (Art. 5(1)(e))
//! and the right to erasure (Art. 17) on Redis, S3, Loki and Elasticsearch.

pub mod api;
pub mod audit;
pub mod backends;
pub mod controller;
pub mod crds;
pub mod engine;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod operator;
pub mod schedule;
