//! The receipt sink: an S3 bucket where every receipt is also written, one object per
//! receipt (keys from [`super::chain::object_key`]). Configured as a DataStore of kind s3 in
//! the operator's namespace, so its endpoint, credentials Secret and `insecure` rules are the
//! ones every S3 DataStore follows, plus a bucket (default: the DataStore's) and a prefix.
//! Where the bucket has Object Lock, every receipt is written with a retention (mode and
//! period configured), so that not even the operator can alter or delete it before then.

use std::sync::Arc;

use aws_sdk_s3::primitives::{ByteStream, DateTime as AwsDateTime};
use aws_sdk_s3::types::{ChecksumAlgorithm, ObjectLockEnabled, ObjectLockMode};
use kube::api::Api;
use tokio::sync::{Mutex, OnceCell};

use super::chain::{self, Head, Stored, Stream, StreamKind, StreamReport};
use crate::api::{DataStore, ErasureRequest, RetentionPolicy};
use crate::backends::s3::{sdk_error, S3Backend};
use crate::backends::Limits;

/// The Object Lock mode receipts are written with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` may still delete a receipt early.
    Governance,
    /// No one, not even the account root, can delete a receipt before its retention ends.
    Compliance,
}

/// How the operator finds its sink.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkSettings {
    /// The DataStore (kind s3) in `namespace`.
    pub datastore: String,
    /// The operator's namespace.
    pub namespace: String,
    /// The bucket; None: the DataStore's.
    pub bucket: Option<String>,
    /// Prepended to every key (e.g. `receipts/`).
    pub prefix: String,
    pub lock_mode: LockMode,
    /// How long each receipt is locked, where the bucket has Object Lock.
    pub lock_period: std::time::Duration,
    /// Whether the DataStore may go without a Secret (the operator's own cloud identity).
    pub allow_ambient_credentials: bool,
}

/// The default Object Lock retention of receipts: six years (the longest common limitation
/// period for claims an erasure may have to be proved against).
pub const DEFAULT_LOCK_PERIOD: &str = "2190d";
/// How long `verify` waits before it reads again a status that is behind the sink.
const BEYOND_HEAD_RECHECK: std::time::Duration = std::time::Duration::from_secs(3);

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "tombstone-receipts/";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the sink's DataStore or its Secret failed (reason from the controller).
    #[error("receipt sink DataStore: {0}")]
    Resolve(#[source] crate::controller::Error),
    #[error("receipt sink DataStore {0} is not of kind s3")]
    NotS3(String),
    #[error("receipt sink: {0}")]
    Store(#[source] crate::backends::Error),
}

impl Error {
    /// A stable PascalCase reason for events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Resolve(e) => e.reason(),
            Error::NotS3(_) => "SinkNotS3",
            Error::Store(e) => e.reason(),
        }
    }
}

/// A resolved sink: a client on its bucket.
pub struct Sink {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    lock_mode: LockMode,
    lock_period: std::time::Duration,
    object_lock: OnceCell<bool>,
}

impl Sink {
    /// Resolves the sink from its DataStore and Secret, as every S3 DataStore is.
    pub async fn resolve(client: &kube::Client, settings: &SinkSettings) -> Result<Sink, Error> {
        let stores: Api<DataStore> = Api::namespaced(client.clone(), &settings.namespace);
        let store = stores
            .get_opt(&settings.datastore)
            .await
            .map_err(|e| Error::Resolve(crate::controller::Error::Kube(e)))?
            .ok_or_else(|| {
                Error::Resolve(crate::controller::Error::StoreNotFound(
                    settings.datastore.clone(),
                ))
            })?;
        let controller_settings = crate::controller::Settings {
            allow_ambient_credentials: settings.allow_ambient_credentials,
            ..Default::default()
        };
        let spec = crate::controller::stores::connection_spec(client, &store, &controller_settings)
            .await
            .map_err(Error::Resolve)?;
        let Some(mut config) = spec
            .config::<crate::backends::s3::driver::S3Driver>()
            .cloned()
        else {
            return Err(Error::NotS3(settings.datastore.clone()));
        };
        if let Some(bucket) = &settings.bucket {
            config.bucket = bucket.clone();
        }
        let bucket = config.bucket.clone();
        let backend = S3Backend::new(config, Limits::default());
        let s3 = backend.client().await.map_err(Error::Store)?.clone();
        Ok(Sink::new(
            s3,
            bucket,
            settings.prefix.clone(),
            settings.lock_mode,
            settings.lock_period,
        ))
    }

    pub fn new(
        client: aws_sdk_s3::Client,
        bucket: String,
        prefix: String,
        lock_mode: LockMode,
        lock_period: std::time::Duration,
    ) -> Sink {
        Sink {
            client,
            bucket,
            prefix,
            lock_mode,
            lock_period,
            object_lock: OnceCell::new(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Whether the bucket has Object Lock (asked once).
    async fn object_lock(&self) -> Result<bool, Error> {
        self.object_lock
            .get_or_try_init(|| async {
                match self
                    .client
                    .get_object_lock_configuration()
                    .bucket(&self.bucket)
                    .send()
                    .await
                {
                    Ok(out) => Ok(out
                        .object_lock_configuration()
                        .and_then(|c| c.object_lock_enabled())
                        == Some(&ObjectLockEnabled::Enabled)),
                    Err(e)
                        if e.as_service_error()
                            .and_then(|s| aws_sdk_s3::error::ProvideErrorMetadata::code(s))
                            == Some("ObjectLockConfigurationNotFoundError") =>
                    {
                        Ok(false)
                    }
                    Err(e) => Err(Error::Store(sdk_error(e, "GetObjectLockConfiguration"))),
                }
            })
            .await
            .copied()
    }

    /// Writes one receipt; with Object Lock, under a retention.
    pub async fn put(&self, key: &str, body: &str) -> Result<(), Error> {
        let mut put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(body.as_bytes().to_vec()));
        if self.object_lock().await? {
            let now = std::time::SystemTime::now();
            // A period too long for the clock locks for as long as it can say (a century).
            let until = now
                .checked_add(self.lock_period)
                .or_else(|| now.checked_add(std::time::Duration::from_secs(100 * 365 * 86_400)))
                .unwrap_or(now);
            put = put
                .object_lock_mode(match self.lock_mode {
                    LockMode::Governance => ObjectLockMode::Governance,
                    LockMode::Compliance => ObjectLockMode::Compliance,
                })
                .object_lock_retain_until_date(AwsDateTime::from(until))
                // Object Lock writes must carry a checksum.
                .checksum_algorithm(ChecksumAlgorithm::Crc32);
        }
        put.send()
            .await
            .map_err(|e| Error::Store(sdk_error(e, "PutObject")))?;
        Ok(())
    }

    /// Every key under `folder` (a prefix), sorted.
    pub async fn list(&self, folder: &str) -> Result<Vec<String>, Error> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(folder)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| Error::Store(sdk_error(e, "ListObjectsV2")))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from)),
            );
        }
        keys.sort();
        Ok(keys)
    }

    /// The body of one object; None when there is none under `key`.
    pub async fn get_opt(&self, key: &str) -> Result<Option<String>, Error> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => {
                let bytes = out.body.collect().await.map_err(|e| {
                    Error::Store(crate::backends::Error::Unreachable(format!(
                        "GetObject: reading the body: {e}"
                    )))
                })?;
                Ok(Some(
                    String::from_utf8_lossy(&bytes.into_bytes()).into_owned(),
                ))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(Error::Store(sdk_error(e, "GetObject"))),
        }
    }

    /// The body of one object.
    pub async fn get(&self, key: &str) -> Result<String, Error> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| Error::Store(sdk_error(e, "GetObject")))?;
        let bytes = out.body.collect().await.map_err(|e| {
            Error::Store(crate::backends::Error::Unreachable(format!(
                "GetObject: reading the body: {e}"
            )))
        })?;
        Ok(String::from_utf8_lossy(&bytes.into_bytes()).into_owned())
    }

    /// Every stream under the prefix (or under `folder`, a folder below it) with its
    /// receipts.
    pub async fn streams(&self, folder: Option<&str>) -> Result<Vec<(Stream, Vec<Stored>)>, Error> {
        let folder = folder.unwrap_or(&self.prefix);
        let mut streams: std::collections::BTreeMap<Stream, Vec<Stored>> = Default::default();
        for key in self.list(folder).await? {
            let Some((stream, sequence)) = chain::parse_key(&self.prefix, &key) else {
                continue;
            };
            let body = self.get(&key).await?;
            streams
                .entry(stream)
                .or_default()
                .push(Stored { sequence, body });
        }
        Ok(streams.into_iter().collect())
    }
}

/// What the cluster says of a stream's head: the object's status when it exists (by uid).
pub async fn head_in_cluster(client: &kube::Client, stream: &Stream) -> Result<Head, kube::Error> {
    match stream.kind {
        StreamKind::Policy => {
            let api: Api<RetentionPolicy> = Api::namespaced(client.clone(), &stream.namespace);
            Ok(match api.get_opt(&stream.name).await? {
                Some(p) if p.metadata.uid.as_deref() == Some(stream.uid.as_str()) => {
                    Head::Status(p.status.and_then(|s| s.receipts))
                }
                _ => Head::Gone,
            })
        }
        StreamKind::Request => {
            let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &stream.namespace);
            Ok(match api.get_opt(&stream.name).await? {
                Some(r) if r.metadata.uid.as_deref() == Some(stream.uid.as_str()) => {
                    Head::Status(r.status.and_then(|s| s.receipts))
                }
                _ => Head::Gone,
            })
        }
    }
}

/// Verifies every stream in the sink (or those under `folder`): hashes, links, gaps and,
/// with a cluster, each head against the status of its object.
pub async fn verify(
    sink: &Sink,
    cluster: Option<&kube::Client>,
    folder: Option<&str>,
) -> Result<Vec<StreamReport>, Error> {
    let mut reports = Vec::new();
    let head_of = |stream: &Stream| {
        let stream = stream.clone();
        async move {
            match cluster {
                Some(client) => head_in_cluster(client, &stream)
                    .await
                    .map_err(|e| Error::Resolve(crate::controller::Error::Kube(e))),
                None => Ok(Head::Unknown),
            }
        }
    };
    for (stream, stored) in sink.streams(folder).await? {
        // Read after the sink: the operator writes a receipt, then the status naming it.
        let mut report = chain::verify_stream(&stream, &stored, &head_of(&stream).await?);
        if report
            .breaks
            .iter()
            .any(|b| matches!(b, chain::Break::BeyondHead { .. }))
        {
            // Between those two writes, the sink is one ahead: look at status again.
            tokio::time::sleep(BEYOND_HEAD_RECHECK).await;
            report = chain::verify_stream(&stream, &stored, &head_of(&stream).await?);
        }
        reports.push(report);
    }
    Ok(reports)
}

/// The operator's sink: resolved on first use, and again after a failure (the DataStore or
/// its Secret may have been fixed).
pub struct SinkHandle {
    settings: SinkSettings,
    resolved: Mutex<Option<Arc<Sink>>>,
    /// After a failed upload, no other is tried before this instant (5s doubling up to a
    /// minute, reset by a success): a sink that is down must not slow every sweep step down by
    /// a connection timeout.
    breaker: std::sync::Mutex<Breaker>,
}

#[derive(Default)]
struct Breaker {
    failures: u32,
    until: Option<std::time::Instant>,
}

/// How long uploads pause after `failures` failures in a row (pure).
fn pause_after(failures: u32) -> std::time::Duration {
    let secs = 5u64.saturating_mul(1u64 << failures.saturating_sub(1).min(6));
    std::time::Duration::from_secs(secs.min(60))
}

impl SinkHandle {
    pub fn new(settings: SinkSettings) -> Self {
        Self {
            settings,
            resolved: Mutex::new(None),
            breaker: Default::default(),
        }
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether uploads pause after a recent failure.
    pub fn deferred(&self) -> bool {
        self.breaker()
            .until
            .is_some_and(|until| std::time::Instant::now() < until)
    }

    fn record(&self, ok: bool) {
        let mut breaker = self.breaker();
        if ok {
            *breaker = Breaker::default();
        } else {
            breaker.failures = breaker.failures.saturating_add(1);
            breaker.until = Some(std::time::Instant::now() + pause_after(breaker.failures));
        }
    }

    pub fn settings(&self) -> &SinkSettings {
        &self.settings
    }

    /// The sink, resolved now unless it already is.
    async fn sink(&self, client: &kube::Client) -> Result<Arc<Sink>, Error> {
        let mut resolved = self.resolved.lock().await;
        if let Some(s) = resolved.as_ref() {
            return Ok(s.clone());
        }
        let s = Arc::new(Sink::resolve(client, &self.settings).await?);
        *resolved = Some(s.clone());
        Ok(s)
    }

    /// The receipt under `key` in the sink, None when there is none.
    pub async fn fetch(&self, client: &kube::Client, key: &str) -> Result<Option<String>, Error> {
        let sink = self.sink(client).await?;
        let got = sink.get_opt(key).await;
        if got.is_err() {
            *self.resolved.lock().await = None;
        }
        got
    }

    /// Writes the receipts in order, up to the first failure; returns how many were written
    /// and the failure, if any.
    pub async fn upload(
        &self,
        client: &kube::Client,
        pending: &[crate::api::receipts::PendingReceipt],
    ) -> (usize, Option<Error>) {
        if pending.is_empty() {
            return (0, None);
        }
        let sink = match self.sink(client).await {
            Ok(s) => s,
            Err(e) => {
                self.record(false);
                return (0, Some(e));
            }
        };
        for (i, receipt) in pending.iter().enumerate() {
            if let Err(e) = sink.put(&receipt.key, &receipt.body).await {
                *self.resolved.lock().await = None;
                self.record(false);
                return (i, Some(e));
            }
        }
        self.record(true);
        (pending.len(), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> SinkHandle {
        SinkHandle::new(SinkSettings {
            datastore: "sink".into(),
            namespace: "ns".into(),
            bucket: None,
            prefix: DEFAULT_PREFIX.into(),
            lock_mode: LockMode::Compliance,
            lock_period: std::time::Duration::from_secs(60),
            allow_ambient_credentials: false,
        })
    }

    #[test]
    fn uploads_pause_after_a_failure_longer_each_time_and_resume_after_a_success() {
        assert_eq!(pause_after(1).as_secs(), 5);
        assert_eq!(pause_after(2).as_secs(), 10);
        assert_eq!(pause_after(40).as_secs(), 60);
        let h = handle();
        assert!(!h.deferred());
        h.record(false);
        assert!(h.deferred());
        h.record(true);
        assert!(!h.deferred());
    }
}
