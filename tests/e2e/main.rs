//! Integration tests against a real kube-apiserver: one test binary, so one API server
//! for all of them. Run with
//!
//!     KUBEBUILDER_ASSETS=$(hack/envtest-assets.sh) cargo test --test e2e

#[path = "../support/mod.rs"]
mod support;

mod api_load;
mod batch_faults;
mod batched;
mod bounded_steps;
mod chaos;
mod chart;
mod cluster_wide;
mod conformance;
mod crd_validation;
mod cursor_upgrade;
mod datastore;
mod digest;
mod elasticsearch;
mod erasure;
mod error_categories;
mod es_fast_path;
mod exact_counts;
mod fail_closed;
mod fixtures;
mod harness;
mod holds;
mod kustomize;
mod loki;
mod one_actor;
mod opensearch;
mod operational;
mod plugin;
mod receipts;
mod redis_batch;
mod ropa;
mod s3;
mod s3_batch;
mod scale;
mod spec_changes;
mod stale_views;
mod stalls;
mod subject;
mod sweep;
