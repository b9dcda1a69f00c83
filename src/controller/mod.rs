//! One thin reconciler per kind, sharing one [`Context`].

pub mod datastore;
pub mod echoes;
pub mod erasurerequest;
pub mod fresh;
pub mod legalhold;
mod resolve;
pub mod retentionpolicy;
pub mod stores;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::api::datastore::DataStore;
use crate::api::retentionpolicy::RetentionPolicy;
use crate::backends::{self, Category, Failure};
use crate::engine::Engine;
use crate::leader::Fence;
use crate::metrics::Metrics;

/// The field manager of every status the operator writes.
pub const FIELD_MANAGER: &str = "tombstone";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[source] kube::Error),
    #[error("Secret {0} not found")]
    SecretNotFound(String),
    #[error("Secret {secret} has no key {key}")]
    SecretKeyMissing { secret: String, key: String },
    #[error("Secret {secret}: the value of key {key} is not UTF-8 text")]
    SecretValueNotText { secret: String, key: String },
    #[error("DataStore {0} not found")]
    StoreNotFound(String),
    /// A Secret a DataStore names is not marked as store credentials: never read.
    #[error(
        "Secret {0} is not marked as store credentials: the operator reads a Secret for a \
         DataStore only if it carries the label tombstone.dev/credentials: \"true\""
    )]
    CredentialsNotPermitted(String),
    /// Credentials would travel in plain text and the DataStore does not say `insecure: true`.
    #[error("{0}")]
    InsecureTransport(String),
    /// An S3 DataStore without a Secret, and the operator does not lend its own identity.
    #[error("{0}")]
    AmbientCredentialsNotAllowed(String),
    #[error("{0}")]
    InvalidSpec(String),
    #[error(transparent)]
    Backend(#[from] backends::Error),
    /// This instance no longer holds the Lease (or could not renew it in time): it writes
    /// nothing more.
    #[error(transparent)]
    Leadership(#[from] crate::leader::Error),
    /// The subject-digest key could not be loaded or created (reason from `audit::Error`).
    #[error("{2}")]
    Digest(Category, &'static str, String),
}

impl Error {
    /// A stable PascalCase reason for conditions, events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::SecretNotFound(_) | Error::SecretKeyMissing { .. } => "SecretNotFound",
            Error::SecretValueNotText { .. } => "SecretValueNotText",
            Error::StoreNotFound(_) => "StoreNotFound",
            Error::CredentialsNotPermitted(_) => "CredentialsNotPermitted",
            Error::InsecureTransport(_) => "InsecureTransport",
            Error::AmbientCredentialsNotAllowed(_) => "AmbientCredentialsNotAllowed",
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::Backend(e) => e.reason(),
            Error::Leadership(e) => e.reason(),
            Error::Digest(_, reason, _) => reason,
        }
    }

    /// What kind of failure this is: the planners decide from it alone whether to retry
    /// with back-off, fail, or wait.
    pub fn category(&self) -> Category {
        match self {
            // The API server may answer again; the lease may be won again.
            Error::Kube(_) | Error::Leadership(_) => Category::Transient,
            // Secrets are not watched: a Secret created, relabelled or fixed later is only
            // noticed by trying again, so these are retried with back-off like a store's no.
            Error::SecretNotFound(_)
            | Error::SecretKeyMissing { .. }
            | Error::SecretValueNotText { .. }
            | Error::CredentialsNotPermitted(_) => Category::Refused,
            // Not there yet, often: objects applied together arrive in any order, so it is
            // retried like a store's no rather than left until the next scheduled sweep.
            Error::StoreNotFound(_) => Category::Refused,
            // Wait for the spec to change (or the operator to restart with other flags).
            Error::InvalidSpec(_)
            | Error::InsecureTransport(_)
            | Error::AmbientCredentialsNotAllowed(_) => Category::InvalidSpec,
            Error::Backend(e) => e.category(),
            // Decided where the digest key's error is known (its Secret gone while digests
            // made with it are in use needs a person).
            Error::Digest(category, ..) => *category,
        }
    }

    /// The error as a value the pure planning code can hold.
    pub fn failure(&self) -> Failure {
        match self {
            Error::Backend(e) => e.failure(),
            e => Failure::new(e.category(), e.reason(), e.to_string()),
        }
    }
}

/// What the operator was started with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long one sweep step may run before its progress is checkpointed in status.
    pub checkpoint_interval: Duration,
    /// Sweep steps running at once across all policies.
    pub max_concurrent_jobs: usize,
    /// Reconciles running at once per controller.
    pub reconcile_concurrency: u16,
    /// How often a Ready DataStore is probed again.
    pub probe_interval: Duration,
    /// The operator's own namespace: where the subject-digest key Secret lives.
    pub operator_namespace: String,
    /// Whether an S3 DataStore without a credentials Secret may use the operator's own
    /// cloud identity (the default AWS credential chain, e.g. IRSA). Off by default: any
    /// namespace could otherwise reach every bucket the operator can.
    pub allow_ambient_credentials: bool,
    /// The namespace watched (None: every namespace): where digests made with the key live.
    pub watch_namespace: Option<String>,
    /// When an erasure request counts as stalled (the `erasure_requests_stalled` gauge).
    pub stall_after: erasurerequest::plan::StallAfter,
    /// Where every receipt is also written; None: the audit log only.
    pub receipt_sink: Option<crate::audit::sink::SinkSettings>,
    /// How long a Completed erasure request is kept once its receipts are in the sink; then
    /// the operator deletes it. Without a sink nothing is deleted.
    pub completed_request_ttl: Duration,
    /// How erasure requests ready at the same time are batched per target.
    pub batches: crate::engine::batch::BatchSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            checkpoint_interval: Duration::from_secs(2),
            max_concurrent_jobs: 4,
            reconcile_concurrency: 16,
            probe_interval: Duration::from_secs(300),
            operator_namespace: "tombstone-system".into(),
            allow_ambient_credentials: false,
            watch_namespace: None,
            stall_after: Default::default(),
            receipt_sink: None,
            completed_request_ttl: Duration::from_secs(30 * 86_400),
            batches: Default::default(),
        }
    }
}

/// The objects reconciles read from watch caches, kept up to date by the controllers' watches.
#[derive(Clone)]
pub struct Caches {
    /// Every DataStore watched: steps read their stores here.
    pub stores: Store<DataStore>,
    /// Every RetentionPolicy watched: erasure steps read their targets here. (The scope of a
    /// new request is listed fresh: a policy missing from it would go unerased.)
    pub policies: Store<RetentionPolicy>,
}

/// Shared by every reconcile: built once.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// The name events are reported under (the recorder's controller).
    pub reporter: String,
    pub metrics: Arc<Metrics>,
    pub engine: Arc<Engine>,
    pub settings: Settings,
    /// Cancelled on shutdown: running steps stop at the next page and checkpoint.
    pub shutdown: CancellationToken,
    /// Whether this instance still leads; checked before every status write.
    pub fence: Fence,
    /// What reconciles read from watches instead of asking the API server at every step.
    pub caches: Caches,
    /// The subject-digest key once read: it never changes while digests made with it exist,
    /// so it is not read again at every step. Loaded by one reconcile at a time: the others
    /// wait for its answer instead of racing it to create the Secret.
    pub digest_key: tokio::sync::OnceCell<crate::audit::DigestKey>,
    /// The receipt sink, when one is configured.
    pub sink: Option<crate::audit::sink::SinkHandle>,
    /// Consecutive failures per object, for exponential backoff; reset on success, dropped
    /// when the object is deleted.
    failures: FailureCounts,
    /// The LegalHolds of each namespace, listed fresh and shared by the reconciles that ask
    /// at the same moment.
    holds: fresh::FreshReads<HoldList>,
    /// The same lists digested, with the Secrets their holds name read once, shared by the
    /// members of a batch asking at the same moment.
    pub hold_views: fresh::FreshReads<Arc<erasurerequest::holds::HoldView>>,
    /// Erasure requests ready at the same time, worked together per target.
    pub batcher: Arc<crate::engine::batch::Batcher>,
    /// Erasure reconciles talking to the API server at once (`reconcile_concurrency`). A
    /// reconcile gives its permit back while its targets are in a store step or a batch, so
    /// that the requests of one batch can all wait in it.
    pub request_permits: Arc<tokio::sync::Semaphore>,
    /// The versions this process's own writes produced: their watch events trigger nothing.
    pub own_writes: Arc<echoes::OwnWrites>,
}

/// The LegalHolds of a namespace as listed, or why they could not be.
pub type HoldList = Result<Arc<Vec<crate::api::legalhold::LegalHold>>, Arc<kube::Error>>;

/// Consecutive failures per object (`namespace/name`).
#[derive(Debug, Default)]
pub struct FailureCounts(Mutex<HashMap<String, u32>>);

impl FailureCounts {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one more failure of `key`; returns how many there are in a row now.
    pub fn record(&self, key: &str) -> u32 {
        let mut map = self.map();
        let n = map.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    pub fn get(&self, key: &str) -> u32 {
        self.map().get(key).copied().unwrap_or(0)
    }

    pub fn reset(&self, key: &str) {
        self.map().remove(key);
    }

    /// Drops the counts of objects that no longer exist (`exists` says which do); returns
    /// how many were dropped.
    pub fn retain(&self, exists: impl Fn(&str) -> bool) -> usize {
        let mut map = self.map();
        let before = map.len();
        map.retain(|key, _| exists(key));
        before - map.len()
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Context {
    pub fn new(
        client: Client,
        (recorder, reporter): (Recorder, String),
        metrics: Arc<Metrics>,
        settings: Settings,
        shutdown: CancellationToken,
        fence: Fence,
        caches: Caches,
    ) -> Self {
        let engine = Arc::new(Engine::new(
            settings.max_concurrent_jobs,
            settings.checkpoint_interval,
            fence.clone(),
        ));
        let sink = settings
            .receipt_sink
            .clone()
            .map(crate::audit::sink::SinkHandle::new);
        Self {
            client,
            recorder,
            reporter,
            engine,
            shutdown,
            fence,
            caches,
            digest_key: tokio::sync::OnceCell::new(),
            sink,
            failures: FailureCounts::default(),
            holds: fresh::FreshReads::default(),
            hold_views: fresh::FreshReads::default(),
            batcher: crate::engine::batch::Batcher::new(settings.batches, metrics.clone()),
            metrics,
            request_permits: Arc::new(tokio::sync::Semaphore::new(
                usize::from(settings.reconcile_concurrency).max(1),
            )),
            own_writes: Arc::default(),
            settings,
        }
    }

    /// The LegalHolds of `namespace`, from a LIST sent after this call began (never an older
    /// one: a hold placed a moment ago wins), shared with the reconciles that ask meanwhile.
    pub async fn legal_holds(&self, namespace: &str) -> HoldList {
        self.holds
            .get(namespace, || async {
                let api: Api<crate::api::legalhold::LegalHold> =
                    Api::namespaced(self.client.clone(), namespace);
                api.list(&kube::api::ListParams::default())
                    .await
                    .map(|l| Arc::new(l.items))
                    .map_err(Arc::new)
            })
            .await
    }

    /// Writes `status` (see [`apply_status`]) only while this instance still leads by its
    /// monotonic clock: a process that was frozen and thawed after another instance took
    /// over must not overwrite the new leader's checkpoint with its stale one. Returns the
    /// object as written.
    pub async fn apply_status<K, S>(&self, api: &Api<K>, name: &str, status: &S) -> Result<K, Error>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
        S: Serialize,
    {
        // Test-only (debug builds): skip the lease check, the bug the chaos tests must report.
        if !crate::planted_bug("skip-lease-check") {
            self.fence.check()?;
        }
        match apply_status(api, name, status).await {
            Ok(written) => {
                self.own_writes.record(&written);
                Ok(written)
            }
            Err(e) => {
                let key = kind_key::<K>(api.namespace().unwrap_or_default(), name);
                self.own_writes.record_unknown(key);
                Err(e)
            }
        }
    }

    /// Sets the finalizers of `obj` to `finalizers`: a merge patch carrying the
    /// resourceVersion read, so a concurrent change to them is never overwritten (409,
    /// retried). Only while this instance leads.
    pub async fn patch_finalizers<K>(
        &self,
        api: &Api<K>,
        obj: &K,
        finalizers: Vec<String>,
    ) -> Result<(), Error>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    {
        self.fence.check()?;
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": obj.resource_version(), "finalizers": finalizers}
        });
        let written = api
            .patch(
                &obj.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| {
                self.own_writes.record_unknown(failure_key(obj));
                Error::Kube(e)
            })?;
        self.own_writes.record(&written);
        Ok(())
    }

    /// The object a reconcile works on: `cached`, as its watch brought it, when it holds
    /// every write of this process ([`echoes::OwnWrites::is_current`]); otherwise read
    /// afresh ([`fetch_fresh`]). Its status is the checkpoint of the work under way, and
    /// must never be older than the last one this process wrote. None: gone.
    pub async fn current<K>(&self, cached: &K) -> Result<Option<(Api<K>, K)>, Error>
    where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        if self.own_writes.is_current(cached) {
            let api: Api<K> =
                Api::namespaced(self.client.clone(), &cached.namespace().unwrap_or_default());
            return Ok(Some((api, cached.clone())));
        }
        fetch_fresh(&self.client, cached).await
    }

    /// The key prefix of receipts in the sink; None without a sink.
    pub fn sink_prefix(&self) -> Option<&str> {
        self.sink.as_ref().map(|s| s.settings().prefix.as_str())
    }

    /// Writes the receipts waiting in `chain` to the sink, oldest first; those written leave
    /// it. A failure is told in a Warning Event on `obj` and counted; the rest wait for the
    /// next try. Returns whether any still wait.
    pub async fn upload_receipts<K>(
        &self,
        obj: &K,
        chain: &mut Option<crate::api::receipts::ReceiptChainStatus>,
    ) -> bool
    where
        K: Resource<DynamicType = ()>,
    {
        let (Some(sink), Some(head)) = (&self.sink, chain.as_mut()) else {
            return false;
        };
        if head.pending_upload.is_empty() {
            return false;
        }
        // A sink that failed a moment ago is given time first; only the leader writes.
        if sink.deferred() || self.fence.check().is_err() {
            return true;
        }
        let (written, failure) = sink.upload(&self.client, &head.pending_upload).await;
        head.pending_upload
            .drain(..written.min(head.pending_upload.len()));
        if let Some(e) = failure {
            tracing::warn!(reason = e.reason(), error = %e, pending = head.pending_upload.len(), "could not write receipts to the sink; they wait in status");
            self.metrics.receipt_upload_failed(e.reason());
            let note = format!(
                "{} receipt(s) wait in status for the sink: {e}",
                head.pending_upload.len()
            );
            self.publish(
                obj,
                EventType::Warning,
                "ReceiptUploadFailed",
                "Audit",
                note,
            )
            .await;
        }
        !head.pending_upload.is_empty()
    }

    /// Records one more failure of `key` and returns how long to back off: 5s doubling up
    /// to a minute (Secrets are not watched, so a fixed one is noticed within that).
    pub fn backoff(&self, key: &str) -> Duration {
        backoff_for(self.failures.record(key))
    }

    pub fn failures(&self, key: &str) -> u32 {
        self.failures.get(key)
    }

    pub fn reset_failures(&self, key: &str) {
        self.failures.reset(key);
    }

    /// Forgets what the operator keeps in memory for objects that were deleted: the cached
    /// backend of each DataStore `store_exists` no longer knows (keys `namespace/name`), the
    /// failure count of each object `object_exists` no longer knows (keys [`failure_key`]).
    pub fn forget_deleted(
        &self,
        store_exists: impl Fn(&str) -> bool,
        object_exists: impl Fn(&str) -> bool,
    ) {
        let backends = self.engine.retain_stores(store_exists);
        let failures = self.failures.retain(&object_exists);
        self.own_writes.retain(&object_exists);
        self.holds.forget_idle();
        self.hold_views.forget_idle();
        if backends + failures > 0 {
            tracing::debug!(backends, failures, "forgot deleted objects");
        }
    }

    /// Publishes an event on `obj`. Failing to publish is logged, never fatal: events are a
    /// convenience, status is the record.
    pub async fn publish<K>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) where
        K: Resource<DynamicType = ()>,
    {
        let reference = obj.object_ref(&());
        let published = if type_ == EventType::Normal {
            // A Normal Event tells of one transition, made with the status write that makes
            // the object's version new: never a repeat to fold into a series. Created directly,
            // it is not kept in the recorder's cache (one entry per Event for minutes, which at
            // thousands of requests is memory and a scan at every publish).
            self.create_event(reason, action, note, reference).await
        } else {
            let event = Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: action.into(),
                secondary: None,
            };
            self.recorder.publish(&event, &reference).await
        };
        if let Err(e) = published {
            tracing::warn!(error = %e, reason, "failed to publish event");
        }
    }

    /// Creates a Normal Event as the recorder would (same fields, same naming), without
    /// caching it.
    async fn create_event(
        &self,
        reason: &str,
        action: &str,
        note: String,
        reference: k8s_openapi::api::core::v1::ObjectReference,
    ) -> Result<(), kube::Error> {
        use k8s_openapi::api::events::v1::Event as K8sEvent;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
        let now = jiff::Timestamp::now();
        let namespace = reference
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let controller = &self.reporter;
        let event = K8sEvent {
            action: Some(action.into()),
            reason: Some(reason.into()),
            event_time: Some(MicroTime(now)),
            note: Some(note),
            metadata: ObjectMeta {
                namespace: reference.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    reference.name.as_deref().unwrap_or(controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            regarding: Some(reference),
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(controller.clone()),
            type_: Some("Normal".into()),
            ..Default::default()
        };
        Api::<K8sEvent>::namespaced(self.client.clone(), &namespace)
            .create(&kube::api::PostParams::default(), &event)
            .await
            .map(|_| ())
    }
}

pub fn backoff_for(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << failures.saturating_sub(1).min(6));
    Duration::from_secs(secs.min(60))
}

/// When the object was created, at second precision; `fallback` if the server did not say.
pub fn creation_time<K: Resource>(
    obj: &K,
    fallback: crate::api::Timestamp,
) -> crate::api::Timestamp {
    obj.meta()
        .creation_timestamp
        .as_ref()
        .map_or(fallback, |t| {
            crate::api::Timestamp::truncate(
                chrono::DateTime::from_timestamp(t.0.as_second(), 0).unwrap_or(fallback.0),
            )
        })
}

/// The annotation `kubectl apply` keeps its last input in: never read by the operator.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops from an object what no reconcile reads: who manages which field (`managedFields`,
/// often as large as the spec) and `kubectl apply`'s copy of the object. Done to every
/// watched object before it is cached, and to every object read fresh, which a reconcile
/// may hold while it waits (thousands of requests wait in a batch at once).
pub fn strip_unread<K: kube::Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// Reads the object afresh from the API server. Its status is the checkpoint of the work
/// under way, and the reflector cache may not have seen our own last write yet. None: gone.
pub async fn fetch_fresh<K>(client: &Client, obj: &K) -> Result<Option<(Api<K>, K)>, Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    Ok(api
        .get_opt(&obj.name_any())
        .await
        .map_err(Error::Kube)?
        .map(|mut fresh| {
            strip_unread(&mut fresh);
            (api, fresh)
        }))
}

/// An API error shared by several callers (a read they shared), as one of their own: the
/// API server's answer as it was, any other failure by its message.
pub fn shared_error(e: &kube::Error) -> kube::Error {
    match e {
        kube::Error::Api(status) => kube::Error::Api(status.clone()),
        other => kube::Error::Service(other.to_string().into()),
    }
}

/// The finalizers with `finalizer` added, None when it is there already (pure).
pub fn with_finalizer(existing: &[String], finalizer: &str) -> Option<Vec<String>> {
    if existing.iter().any(|f| f == finalizer) {
        return None;
    }
    let mut all = existing.to_vec();
    all.push(finalizer.to_string());
    Some(all)
}

/// The finalizers with `finalizer` removed, None when it is not there (pure).
pub fn without_finalizer(existing: &[String], finalizer: &str) -> Option<Vec<String>> {
    existing.iter().any(|f| f == finalizer).then(|| {
        existing
            .iter()
            .filter(|f| *f != finalizer)
            .cloned()
            .collect()
    })
}

/// `namespace/name`, the key for caches and logs.
pub fn object_key<K: ResourceExt>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// `Kind/namespace/name`, the key of an object's failure count: objects of different kinds
/// may share a name.
pub fn failure_key<K: Resource<DynamicType = ()> + ResourceExt>(obj: &K) -> String {
    kind_key::<K>(&obj.namespace().unwrap_or_default(), &obj.name_any())
}

/// `Kind/namespace/name` of an object of kind `K` known by its namespace and name.
fn kind_key<K: Resource<DynamicType = ()>>(namespace: &str, name: &str) -> String {
    format!("{}/{namespace}/{name}", K::kind(&()))
}

/// Writes `status` with server-side apply. The patch always carries apiVersion and kind.
pub async fn apply_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_controller_error_has_a_category_and_backend_errors_keep_theirs() {
        use Category::*;
        let s = || "x".to_string();
        let cases = [
            (Error::SecretNotFound(s()), Refused),
            (
                Error::SecretKeyMissing {
                    secret: s(),
                    key: s(),
                },
                Refused,
            ),
            (
                Error::SecretValueNotText {
                    secret: s(),
                    key: s(),
                },
                Refused,
            ),
            (Error::CredentialsNotPermitted(s()), Refused),
            (Error::StoreNotFound(s()), Refused),
            (Error::InvalidSpec(s()), InvalidSpec),
            (Error::InsecureTransport(s()), InvalidSpec),
            (Error::AmbientCredentialsNotAllowed(s()), InvalidSpec),
            (
                Error::Leadership(crate::leader::Error::Expired(10)),
                Transient,
            ),
            (
                Error::Digest(NeedsAttention, "DigestKeyLost", s()),
                NeedsAttention,
            ),
            (Error::Backend(backends::Error::Unreachable(s())), Transient),
            (
                Error::Backend(backends::Error::UnparsedCopiesRemain(s())),
                NeedsAttention,
            ),
        ];
        for (e, category) in cases {
            assert_eq!(e.category(), category, "{}", e.reason());
            let f = e.failure();
            assert_eq!((f.category, f.reason), (category, e.reason()));
        }
    }

    #[test]
    fn failure_counts_reset_on_success_and_drop_deleted_objects() {
        let counts = FailureCounts::default();
        assert_eq!(counts.record("ns/a"), 1);
        assert_eq!(counts.record("ns/a"), 2);
        assert_eq!(counts.record("ns/b"), 1);
        assert_eq!(counts.record("ns/c"), 1);
        counts.reset("ns/c");
        assert_eq!((counts.get("ns/c"), counts.len()), (0, 2));
        assert_eq!(counts.retain(|k| k == "ns/a"), 1);
        assert_eq!((counts.get("ns/a"), counts.get("ns/b")), (2, 0));
        assert_eq!(counts.retain(|_| false), 1);
        assert!(counts.is_empty());
    }

    #[test]
    fn failure_keys_tell_kinds_apart() {
        use crate::api::{DataStore, RetentionPolicy};
        let mut store: DataStore = serde_json::from_value(serde_json::json!({
            "apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore",
            "metadata": {"name": "x", "namespace": "ns"},
            "spec": {"redis": {"url": "redis://r:6379"}}
        }))
        .expect("a DataStore");
        let policy = RetentionPolicy::new(
            "x",
            serde_json::from_value(serde_json::json!({
                "purpose": "p", "legalBasis": "contract", "dataSubjects": ["c"],
                "dataCategories": ["d"], "retention": "1d", "targets": []
            }))
            .expect("a spec"),
        );
        store.metadata.namespace = Some("ns".into());
        let mut policy = policy;
        policy.metadata.namespace = Some("ns".into());
        assert_eq!(object_key(&store), object_key(&policy));
        assert_eq!(failure_key(&store), "DataStore/ns/x");
        assert_eq!(failure_key(&policy), "RetentionPolicy/ns/x");
    }

    #[test]
    fn a_finalizer_is_added_once_and_removed_alone() {
        for ours in [
            erasurerequest::lifecycle::FINALIZER,
            retentionpolicy::plan::FINALIZER,
        ] {
            let others = vec!["other/x".to_string()];
            let with = with_finalizer(&others, ours).unwrap();
            assert_eq!(with, vec!["other/x".to_string(), ours.to_string()]);
            assert_eq!(with_finalizer(&with, ours), None);
            assert_eq!(without_finalizer(&with, ours), Some(others.clone()));
            assert_eq!(without_finalizer(&others, ours), None);
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_for(1), Duration::from_secs(5));
        assert_eq!(backoff_for(2), Duration::from_secs(10));
        assert_eq!(backoff_for(4), Duration::from_secs(40));
        assert_eq!(backoff_for(50), Duration::from_secs(60));
    }
}
