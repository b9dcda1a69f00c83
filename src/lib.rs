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
pub mod limits;
pub mod metrics;
pub mod operator;
pub mod plugin;
pub mod ropa;
pub mod schedule;

/// jemalloc, for every binary built on this library (the operator, its tests and benchmarks,
/// so that they measure what runs). A burst of reconciles (ten thousand requests waiting in
/// batches) frees its memory at the end; the system allocator kept most of it (the operator
/// stayed 215 MiB up after a 10k + 10k run), jemalloc gave back most of it (122 MiB).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Chooses the TLS crypto provider for the whole process. Two are compiled in (kube and Redis
/// use ring, the AWS SDK brings aws-lc-rs) and rustls refuses to guess, so this runs before any
/// client is built. Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Test-only: whether the known bug `name` is planted through the environment variable
/// `TOMBSTONE_TEST_PLANT_BUG` (a comma-separated list), so that the chaos tests can show they
/// catch it. Honoured only in debug builds: a release build never plants anything.
#[cfg(debug_assertions)]
pub fn planted_bug(name: &str) -> bool {
    std::env::var("TOMBSTONE_TEST_PLANT_BUG").is_ok_and(|v| v.split(',').any(|b| b.trim() == name))
}

/// Release builds: no bug can be planted.
#[cfg(not(debug_assertions))]
pub const fn planted_bug(_name: &str) -> bool {
    false
}
