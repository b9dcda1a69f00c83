//! S3 and S3-compatible stores (MinIO, Ceph RGW, Garage, AWS) through `aws-sdk-s3`.
//!
//! Retention: objects under the target's prefix whose `LastModified` is older than the cutoff
//! are deleted with `DeleteObjects` batches. On a versioned bucket every version is listed and
//! deleted by version id (a plain delete would only add a delete marker and keep the data),
//! and delete markers left with no data behind them go too. The store's refusals (Object Lock
//! retention or legal hold) are counted as blocked, not failures.
//!
//! Erasure: every object and version under the subject's key prefixes, and the subject's
//! records inside JSON-lines archives (see `subject.rs` and `records.rs`).

mod batch;
pub mod driver;
pub mod intent;
pub mod records;
mod subject;
mod sweep;

use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::types::{BucketVersioningStatus, Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use tokio::sync::OnceCell;

use super::driver::StoreBackend;
use super::template::{self, Syntax};
use super::{
    BatchJob, BatchStep, Error, Limits, Step, StepBudget, SubjectJob, SubjectStep, SweepJob,
};
use crate::api::retentionpolicy::Target;
use crate::api::StoreKind;
pub use batch::BatchPosition as BatchCursor;
use driver::S3Cursor;
pub use subject::Position as SubjectCursor;
pub use sweep::Cursor as SweepCursor;

/// Keys per `DeleteObjects` request: the S3 maximum.
const DELETE_BATCH: usize = 1000;
/// Keys per listing page: the S3 maximum.
const LIST_PAGE: i32 = 1000;
/// Used when neither the DataStore nor the environment names a region (S3-compatible stores
/// generally ignore it, but requests must be signed for one).
const FALLBACK_REGION: &str = "us-east-1";

/// Static credentials from the DataStore's Secret.
#[derive(Clone, PartialEq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// How to reach one bucket, resolved from a DataStore and its Secret.
#[derive(Clone, PartialEq)]
pub struct S3Config {
    pub bucket: String,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub force_path_style: bool,
    /// None: the default AWS credential chain (environment, web identity, instance profile).
    pub credentials: Option<S3Credentials>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("force_path_style", &self.force_path_style)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|c| &c.access_key_id),
            )
            .finish()
    }
}

/// Called between reading an archive and writing it back; lets a test act as a concurrent
/// writer at exactly the moment a conditional write exists to guard.
pub type BeforeWriteHook = Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

pub struct S3Backend {
    config: S3Config,
    limits: Limits,
    client: OnceCell<Client>,
    before_write: Option<BeforeWriteHook>,
    /// Intents last modified before this are abandoned (tests); unset: seven days ago.
    abandoned_before: Option<chrono::DateTime<chrono::Utc>>,
}

impl S3Backend {
    pub fn new(config: S3Config, limits: Limits) -> Self {
        Self {
            config,
            limits,
            client: OnceCell::new(),
            before_write: None,
            abandoned_before: None,
        }
    }

    /// Judges intents last modified before `t` abandoned, rather than those older than
    /// [`intent::ABANDONED_AFTER`] (for tests, which cannot wait a week).
    pub fn with_abandoned_intents_before(mut self, t: chrono::DateTime<chrono::Utc>) -> Self {
        self.abandoned_before = Some(t);
        self
    }

    /// Runs `hook` before every conditional write of a rewritten archive.
    pub fn with_before_write_hook(mut self, hook: BeforeWriteHook) -> Self {
        self.before_write = Some(hook);
        self
    }

    pub fn bucket(&self) -> &str {
        &self.config.bucket
    }

    pub async fn client(&self) -> Result<&Client, Error> {
        self.client
            .get_or_try_init(|| async {
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
                if let Some(c) = &self.config.credentials {
                    loader = loader.credentials_provider(Credentials::new(
                        c.access_key_id.clone(),
                        c.secret_access_key.clone(),
                        c.session_token.clone(),
                        None,
                        "DataStore Secret",
                    ));
                }
                if let Some(region) = &self.config.region {
                    loader = loader.region(Region::new(region.clone()));
                }
                let shared = loader.load().await;
                let mut builder = aws_sdk_s3::config::Builder::from(&shared)
                    .force_path_style(self.config.force_path_style)
                    // A store that stops answering must not hold a job slot forever. No
                    // whole-operation timeout: rewriting a large archive takes its time.
                    .timeout_config(
                        aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                            .connect_timeout(std::time::Duration::from_secs(5))
                            .read_timeout(std::time::Duration::from_secs(60))
                            .build(),
                    )
                    // Checksums only where S3 requires them: S3-compatible stores differ in
                    // which of the newer checksum headers they understand.
                    .request_checksum_calculation(
                        aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
                    )
                    .response_checksum_validation(
                        aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
                    );
                if shared.region().is_none() {
                    builder = builder.region(Region::new(FALLBACK_REGION));
                }
                if let Some(endpoint) = &self.config.endpoint {
                    url::Url::parse(endpoint).map_err(|e| {
                        Error::InvalidSpec(format!("invalid S3 endpoint {endpoint:?}: {e}"))
                    })?;
                    builder = builder.endpoint_url(endpoint);
                }
                Ok(Client::from_conf(builder.build()))
            })
            .await
    }

    /// Whether the bucket keeps versions (Enabled or Suspended: a suspended bucket still holds
    /// the versions written while it was enabled).
    async fn versioned(&self) -> Result<bool, Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        let out = match client
            .get_bucket_versioning()
            .bucket(&self.config.bucket)
            .send()
            .await
        {
            Ok(out) => out,
            // Some S3-compatible servers name the document's root differently, which the SDK
            // refuses to parse; the answer is a 200 all the same and its Status is what counts.
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 200 => {
                let body = e.raw().body().bytes().unwrap_or_default();
                return Ok(versioning_status_in(&String::from_utf8_lossy(body)));
            }
            Err(e) => return Err(sdk_error(e, "GetBucketVersioning")),
        };
        Ok(matches!(
            out.status(),
            Some(BucketVersioningStatus::Enabled | BucketVersioningStatus::Suspended)
        ))
    }

    /// Deletes up to `DELETE_BATCH` objects (or versions) in one request. The store's
    /// refusals are returned, not raised: Object Lock makes them expected.
    async fn delete_batch(&self, objects: Vec<ObjectIdentifier>) -> Result<Deleted, Error> {
        let mut result = Deleted::default();
        if objects.is_empty() {
            return Ok(result);
        }
        let client = self.client().await?;
        for chunk in objects.chunks(DELETE_BATCH) {
            let delete = Delete::builder()
                .set_objects(Some(chunk.to_vec()))
                .quiet(true)
                .build()
                .map_err(|e| Error::Store(format!("DeleteObjects request: {e}")))?;
            self.limits.acquire(1).await;
            let out = client
                .delete_objects()
                .bucket(&self.config.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| sdk_error(e, "DeleteObjects"))?;
            let mut refused = 0;
            for error in out.errors() {
                let code = error.code().unwrap_or("");
                if is_refusal(code) {
                    refused += 1;
                    result.refused.push(Refusal {
                        key: error.key().unwrap_or_default().to_string(),
                        reason: error.message().unwrap_or(code).to_string(),
                    });
                } else {
                    return Err(Error::Store(format!(
                        "DeleteObjects: {code}: {}",
                        error.message().unwrap_or("")
                    )));
                }
            }
            result.deleted += (chunk.len() - refused) as u64;
        }
        Ok(result)
    }
}

impl S3Backend {
    /// Writes the intent of the batch `objects` under the journal's next number, before the
    /// batch is sent.
    /// `weights` (empty: 1 each) is what each object counts for once gone.
    async fn write_intent(
        &self,
        journal: &mut intent::Journal,
        objects: &[ObjectIdentifier],
        weights: Vec<u64>,
    ) -> Result<(), Error> {
        let batch = intent::Intent {
            objects: intent_objects(objects),
            weights,
            ..intent::Intent::default()
        };
        let seq = journal.take_seq();
        self.put_intent(&intent::key(&journal.run, seq), &batch)
            .await
    }

    /// Writes an intent at `key`.
    async fn put_intent(&self, key: &str, batch: &intent::Intent) -> Result<(), Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        client
            .put_object()
            .bucket(&self.config.bucket)
            .key(key)
            .body(aws_sdk_s3::primitives::ByteStream::from(batch.encode()))
            .send()
            .await
            .map_err(|e| sdk_error(e, "PutObject (intent)"))?;
        Ok(())
    }

    /// Removes the intents of other runs abandoned long ago (a run given up after a spec
    /// change, a policy deleted, a request withdrawn): those last modified more than
    /// [`intent::ABANDONED_AFTER`] ago, which no cursor resumes any more (a checkpoint that
    /// old is as stale as an expired Redis ledger). Bounded: [`intent::ABANDONED_PAGES`]
    /// listing pages per call, one call per finished job. Returns how many went.
    async fn remove_abandoned_intents(&self, own_run: &str, versioned: bool) -> Result<u64, Error> {
        let before = self
            .abandoned_before
            .unwrap_or_else(|| chrono::Utc::now() - intent::ABANDONED_AFTER);
        let own = intent::run_prefix(own_run);
        let mut listing = sweep::Cursor::default();
        let mut old = Vec::new();
        for _ in 0..intent::ABANDONED_PAGES {
            let (entries, next) = self
                .list_intents(intent::INTENTS, &listing, versioned)
                .await?;
            for e in entries {
                if !e.key.starts_with(&own) && e.last_modified.is_some_and(|t| t < before) {
                    old.push(object_id(&e.key, e.version_id.as_deref())?);
                }
            }
            match next {
                Some(n) => listing = n,
                None => break,
            }
        }
        Ok(self.delete_batch(old).await?.deleted)
    }

    /// One page of the operator's intents under `prefix`. Where the bucket keeps versions (or
    /// once did), intents may have older versions and delete markers: ListObjectVersions
    /// lists them. Where it never did, ListObjectsV2 sees every intent there is, and is the
    /// cheaper listing: some servers walk every version of the bucket for a version listing,
    /// whatever its prefix.
    async fn list_intents(
        &self,
        prefix: &str,
        listing: &sweep::Cursor,
        versioned: bool,
    ) -> Result<(Vec<sweep::Entry>, Option<sweep::Cursor>), Error> {
        if versioned {
            self.list_versions(prefix, listing).await
        } else {
            self.list_objects(prefix, listing).await
        }
    }

    /// [`Self::remove_abandoned_intents`], best effort: a failure is logged, the job goes on.
    /// `versioned`: whether the bucket is or was versioned, as the caller asked this step.
    async fn tidy_abandoned_intents(&self, own_run: &str, versioned: bool) {
        match self.remove_abandoned_intents(own_run, versioned).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                intents = n,
                "removed abandoned intents of runs given up long ago"
            ),
            Err(e) => {
                tracing::warn!(reason = e.reason(), error = %e, "could not remove abandoned intents")
            }
        }
    }

    /// Deletes `objects` (counted: `weights`, empty for 1 each), the batch's intent written
    /// ahead when there is a journal.
    async fn delete_journalled(
        &self,
        journal: Option<&mut intent::Journal>,
        objects: Vec<ObjectIdentifier>,
        weights: Vec<u64>,
    ) -> Result<Deleted, Error> {
        if let Some(journal) = journal.filter(|_| !objects.is_empty()) {
            self.write_intent(journal, &objects, weights).await?;
        }
        self.delete_batch(objects).await
    }

    /// Settles the journal's intents: those below its number back counts already
    /// checkpointed and are removed; those at or above it were written by a step whose
    /// outcome was lost: what of their objects is gone is returned (counted by the caller),
    /// and the journal's number moves past them (they are removed once that count is
    /// checkpointed).
    async fn settle_intents(
        &self,
        journal: &mut intent::Journal,
        versioned: bool,
    ) -> Result<u64, Error> {
        let mut lost = 0u64;
        for key in self.lost_intents(journal, versioned).await? {
            let batch = self.read_intent(&key).await?;
            let gone = self.gone_in(&batch).await?;
            for (i, gone) in gone.into_iter().enumerate() {
                if gone {
                    lost = lost.saturating_add(batch.weight(i));
                }
            }
        }
        Ok(lost)
    }

    /// The keys of the journal's intents written by a step whose outcome was lost (at or
    /// above its number), whose number it moves past them; those below it are removed.
    async fn lost_intents(
        &self,
        journal: &mut intent::Journal,
        versioned: bool,
    ) -> Result<Vec<String>, Error> {
        let prefix = intent::run_prefix(&journal.run);
        let mut listing = sweep::Cursor::default();
        let mut stale = Vec::new();
        let mut lost = Vec::new();
        let mut next_seq = journal.seq;
        loop {
            let (entries, next) = self.list_intents(&prefix, &listing, versioned).await?;
            for entry in entries {
                let Some(seq) = intent::seq_of(&journal.run, &entry.key) else {
                    continue;
                };
                if seq < journal.seq || entry.delete_marker {
                    stale.push(object_id(&entry.key, entry.version_id.as_deref())?);
                } else if entry.latest {
                    lost.push(entry.key);
                    next_seq = next_seq.max(seq.saturating_add(1));
                }
            }
            match next {
                Some(n) => listing = n,
                None => break,
            }
        }
        journal.seq = next_seq;
        self.delete_batch(stale).await?;
        Ok(lost)
    }

    /// The intent at `key`.
    async fn read_intent(&self, key: &str) -> Result<intent::Intent, Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        let body = client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_error(e, "GetObject (intent)"))?
            .body
            .collect()
            .await
            .map_err(|e| Error::Unreachable(format!("GetObject (intent): {e}")))?
            .into_bytes();
        intent::Intent::decode(&body).ok_or_else(|| {
            Error::Store("an intent of this run is unreadable; its batch cannot be counted".into())
        })
    }

    /// Which objects of an intent's batch are gone. Gone is judged by
    /// listing the batch's key range (ListObjectVersions from just before its first key,
    /// under the keys' common prefix, until past its last: a page or two per batch, where a
    /// HEAD per object took a request each): a version id no longer listed, or a key
    /// without version id no longer listed as current; the first key's by `HeadObject`.
    async fn gone_in(&self, batch: &intent::Intent) -> Result<Vec<bool>, Error> {
        let wanted: std::collections::BTreeSet<&str> =
            batch.objects.iter().map(|(k, _)| k.as_str()).collect();
        let (Some(first), Some(last)) = (wanted.first(), wanted.last()) else {
            return Ok(Vec::new());
        };
        let prefix = intent::common_prefix(first, last);
        let mut listing = sweep::Cursor {
            versions: true,
            key_marker: intent::listed_before(first),
            ..Default::default()
        };
        let mut versions = std::collections::HashSet::new();
        let mut current = std::collections::HashSet::new();
        loop {
            let (entries, next) = self.list_versions(&prefix, &listing).await?;
            let mut past = false;
            for e in entries {
                if e.key.as_str() > *last {
                    past = true;
                } else if wanted.contains(e.key.as_str()) {
                    if e.latest && !e.delete_marker {
                        current.insert(e.key.clone());
                    }
                    if let Some(v) = e.version_id {
                        versions.insert((e.key, v));
                    }
                }
            }
            match next {
                Some(n) if !past => listing = n,
                _ => break,
            }
        }
        let mut gone = Vec::with_capacity(batch.objects.len());
        for (object, version) in &batch.objects {
            // A listing after a key marker may leave out the first entry at or after it
            // (moto does, where S3 starts strictly after the marker): the first key's
            // versions are asked for one by one.
            let present = if object.as_str() == *first {
                self.exists(object, version.as_deref()).await?
            } else {
                match version {
                    Some(v) => versions.contains(&(object.clone(), v.clone())),
                    None => current.contains(object),
                }
            };
            gone.push(!present);
        }
        Ok(gone)
    }

    /// Whether the object (or this version of it, a delete marker included) is still there:
    /// `HeadObject` answers 404 once it is gone (405 for a delete marker still there).
    async fn exists(&self, key: &str, version: Option<&str>) -> Result<bool, Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        match client
            .head_object()
            .bucket(&self.config.bucket)
            .key(key)
            .set_version_id(version.map(str::to_string))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => Ok(false),
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 405 => Ok(true),
            Err(e) => Err(sdk_error(e, "HeadObject (intent)")),
        }
    }
}

/// A batch's objects as an intent lists them.
pub(super) fn intent_objects(objects: &[ObjectIdentifier]) -> Vec<(String, Option<String>)> {
    objects
        .iter()
        .map(|o| (o.key().to_string(), o.version_id().map(str::to_string)))
        .collect()
}

/// Whether a GetBucketVersioning document says Enabled or Suspended.
fn versioning_status_in(document: &str) -> bool {
    document.contains("<Status>Enabled</Status>") || document.contains("<Status>Suspended</Status>")
}

/// What one `DeleteObjects` call did.
#[derive(Debug, Default)]
pub(super) struct Deleted {
    pub deleted: u64,
    pub refused: Vec<Refusal>,
}

/// One object or version the store would not delete, with its message.
#[derive(Clone, Debug)]
pub(super) struct Refusal {
    pub key: String,
    reason: String,
}

/// Errors in a `DeleteObjects` answer that mean "not allowed to delete this one" (Object Lock
/// retention, legal hold, a bucket policy), as opposed to the request failing.
fn is_refusal(code: &str) -> bool {
    matches!(code, "AccessDenied" | "ObjectLocked" | "InvalidRequest")
}

fn object_id(key: &str, version_id: Option<&str>) -> Result<ObjectIdentifier, Error> {
    ObjectIdentifier::builder()
        .key(key)
        .set_version_id(version_id.map(str::to_string))
        .build()
        .map_err(|e| Error::Store(format!("object identifier: {e}")))
}

/// Maps an SDK error to the backend's categories. `what` is the operation's name only:
/// object keys may carry identifiers and never go into a message.
pub(crate) fn sdk_error<E>(err: SdkError<E, HttpResponse>, what: &str) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            classify(e.code(), e.message(), service.raw().status().as_u16(), what)
        }
        SdkError::TimeoutError(_) => Error::Unreachable(format!("{what}: timed out")),
        SdkError::DispatchFailure(dispatch) => {
            let detail = DisplayErrorContext(&err).to_string();
            if detail.contains("credentials") || detail.contains("Credentials") {
                Error::AuthenticationFailed(format!("{what}: no usable credentials: {detail}"))
            } else if dispatch.is_user() {
                Error::InvalidSpec(format!("{what}: {detail}"))
            } else {
                Error::Unreachable(format!("{what}: {detail}"))
            }
        }
        _ => {
            let detail = DisplayErrorContext(&err).to_string();
            if detail.contains("credentials") {
                Error::AuthenticationFailed(format!("{what}: no usable credentials: {detail}"))
            } else {
                Error::Store(format!("{what}: {detail}"))
            }
        }
    }
}

fn classify(code: Option<&str>, message: Option<&str>, status: u16, what: &str) -> Error {
    let detail = match (code, message) {
        (Some(c), Some(m)) => format!("{what}: {c}: {m}"),
        (Some(c), None) => format!("{what}: {c}"),
        (None, Some(m)) => format!("{what}: HTTP {status}: {m}"),
        (None, None) => format!("{what}: HTTP {status}"),
    };
    match code {
        Some(
            "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "InvalidToken"
            | "ExpiredToken"
            | "TokenRefreshRequired"
            | "InvalidSecurity"
            | "AccessDenied"
            | "AllAccessDisabled"
            | "AuthorizationHeaderMalformed"
            | "Forbidden",
        ) => Error::AuthenticationFailed(detail),
        // `NotFound` is what the SDK names a bodiless 404; the only HEAD used is HeadBucket.
        Some("NoSuchBucket" | "NotFound") => Error::BucketNotFound(detail),
        Some("SlowDown" | "ServiceUnavailable" | "InternalError" | "RequestTimeout") => {
            Error::Unreachable(detail)
        }
        Some(_) => Error::Store(detail),
        // HEAD answers carry no body, hence no code: the status has to speak.
        None => match status {
            401 | 403 => Error::AuthenticationFailed(format!(
                "{detail} (credentials refused or not allowed on the bucket)"
            )),
            404 => Error::BucketNotFound(detail),
            500..=599 => Error::Unreachable(detail),
            _ => Error::Store(detail),
        },
    }
}

#[async_trait]
impl StoreBackend for S3Backend {
    const KIND: StoreKind = StoreKind::S3;
    type Cursor = S3Cursor;

    fn legacy_cursor(text: &str) -> Option<S3Cursor> {
        // `s3-subject:` first: `s3:` is not its prefix, but be explicit about the order.
        SubjectCursor::legacy(text)
            .map(S3Cursor::Subject)
            .or_else(|| SweepCursor::legacy(text).map(S3Cursor::Sweep))
    }

    async fn probe_store(&self) -> Result<String, Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        let head = client
            .head_bucket()
            .bucket(&self.config.bucket)
            .send()
            .await;
        if let Err(e) = head {
            let error = sdk_error(e, "HeadBucket");
            // A HEAD answer has no body; a listing says which of the 403s this is.
            if matches!(error, Error::AuthenticationFailed(_)) {
                self.limits.acquire(1).await;
                if let Err(e) = client
                    .list_objects_v2()
                    .bucket(&self.config.bucket)
                    .max_keys(1)
                    .send()
                    .await
                {
                    return Err(sdk_error(e, "ListObjectsV2"));
                }
            }
            return Err(error);
        }
        let versioning = match self.versioned().await {
            Ok(true) => ", versioned",
            Ok(false) => "",
            // Reading the versioning state is a separate permission; sweeps report it if
            // they need it.
            Err(_) => ", versioning unknown",
        };
        Ok(format!("s3 bucket {}{versioning}", self.config.bucket))
    }

    async fn sweep(
        &self,
        job: &SweepJob,
        cursor: Option<S3Cursor>,
        budget: &StepBudget,
    ) -> Result<Step<S3Cursor>, Error> {
        let cursor = match cursor {
            None => None,
            Some(S3Cursor::Sweep(c)) => Some(c),
            Some(S3Cursor::Subject(_) | S3Cursor::Batch(_)) => {
                return Err(Error::InvalidSpec(
                    "the checkpoint is an S3 erasure cursor, not a sweep's".into(),
                ))
            }
        };
        Ok(S3Backend::sweep(self, job, cursor, budget)
            .await?
            .map_cursor(S3Cursor::Sweep))
    }

    async fn subject(
        &self,
        job: &SubjectJob,
        cursor: Option<S3Cursor>,
        budget: &StepBudget,
    ) -> Result<SubjectStep<S3Cursor>, Error> {
        let cursor = match cursor {
            None => None,
            Some(S3Cursor::Subject(c)) => {
                c.validate()?;
                Some(c)
            }
            Some(S3Cursor::Sweep(_) | S3Cursor::Batch(_)) => {
                return Err(Error::InvalidSpec(
                    "the checkpoint is not an S3 erasure cursor of one subject".into(),
                ))
            }
        };
        Ok(S3Backend::subject(self, job, cursor, budget)
            .await?
            .map_cursor(S3Cursor::Subject))
    }

    const BATCHES: bool = true;

    async fn subjects(
        &self,
        job: &BatchJob,
        cursor: Option<S3Cursor>,
        budget: &StepBudget,
    ) -> Result<BatchStep<S3Cursor>, Error> {
        let cursor = match cursor {
            None => None,
            Some(S3Cursor::Batch(c)) => {
                c.validate()?;
                Some(c)
            }
            Some(S3Cursor::Sweep(_) | S3Cursor::Subject(_)) => {
                return Err(Error::InvalidSpec(
                    "the checkpoint is not an S3 batch cursor".into(),
                ))
            }
        };
        Ok(S3Backend::subjects(self, job, cursor, budget)
            .await?
            .map_cursor(S3Cursor::Batch))
    }

    async fn locked(&self, job: &SubjectJob) -> Result<crate::backends::LockedCopies, Error> {
        self.subject_locked_copies(job).await
    }
}

/// Checks an S3 target before anything runs (invariant 1: never outside the selector).
pub fn validate_target(target: &Target) -> Result<(), Error> {
    let invalid = |m: String| Err(Error::InvalidSpec(format!("target {}: {m}", target.name)));
    let Some(s3) = <driver::S3Driver as super::driver::StoreDriver>::selector(target) else {
        return invalid("needs an s3 selector for an s3 store".into());
    };
    if s3.prefix.is_empty() && !target.allow_match_all {
        return invalid(
            "an empty prefix selects every object in the bucket; set allowMatchAll: true if that is really meant"
                .into(),
        );
    }
    let Some(subject) = target.subject.as_ref().and_then(|s| s.s3()) else {
        return Ok(());
    };
    for (i, prefix) in subject.key_prefixes.iter().enumerate() {
        check_key_prefix(prefix)
            .or_else(|m| invalid(format!("subject.s3.keyPrefixes[{i}] {m}")))?;
    }
    if let Some(records) = &subject.records {
        if records.prefix.is_empty() && !target.allow_match_all {
            return invalid(
                "subject.s3.records.prefix is empty: every object in the bucket would be read and rewritten; set allowMatchAll: true if that is really meant"
                    .into(),
            );
        }
        for (what, t, syntax) in [
            ("prefix", &records.prefix, Syntax::Prefix),
            ("equals", &records.equals, Syntax::Exact),
        ] {
            if let Err(m) = template::check_bounded(t, syntax) {
                return invalid(format!("subject.s3.records.{what} {t:?} {m}"));
            }
        }
        if template::placeholders(&records.equals).is_ok_and(|p| p.is_empty()) {
            return invalid(
                "subject.s3.records.equals names no identifier ({email}, {userId}, …): it would match the same records for every subject"
                    .into(),
            );
        }
        if records.field.split('.').any(str::is_empty) {
            return invalid(format!(
                "subject.s3.records.field {:?} is not a dotted path",
                records.field
            ));
        }
    }
    Ok(())
}

/// A key prefix template must name an identifier, bounded on both sides; a prefix is open
/// at its end, so it must not end with one: `users/{userId}` would make user 47's prefix
/// also select user 4711's objects.
fn check_key_prefix(prefix: &str) -> Result<(), String> {
    let names =
        template::check_bounded(prefix, Syntax::Prefix).map_err(|m| format!("{prefix:?} {m}"))?;
    if names.is_empty() {
        return Err(format!(
            "{prefix:?} names no identifier: it would select the same objects for every subject"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::retentionpolicy::{S3Records, S3Subject, S3Target, SubjectLocator};

    fn target(prefix: &str, subject: Option<S3Subject>) -> Target {
        Target {
            name: "archive".into(),
            store: "archive".into(),
            selector: Some(crate::api::retentionpolicy::Selector::S3(S3Target {
                prefix: prefix.into(),
            })),
            subject: subject.map(SubjectLocator::S3),
            allow_match_all: false,
        }
    }

    fn prefixes(p: &[&str]) -> Option<S3Subject> {
        Some(S3Subject {
            key_prefixes: p.iter().map(|s| s.to_string()).collect(),
            records: None,
            retained_copies: None,
        })
    }

    #[test]
    fn selectors_that_could_widen_are_refused() {
        assert!(validate_target(&target("logs/", None)).is_ok());
        assert!(validate_target(&target("", None)).is_err());
        let mut all = target("", None);
        all.allow_match_all = true;
        assert!(validate_target(&all).is_ok());
        assert!(validate_target(&target("logs/", prefixes(&["users/{userId}/"]))).is_ok());
        for bad in [
            "users/{userId}",
            "users/",
            "users/{userId",
            "users-{userId}/",
            "u/{userId}.json",
            "u/{userId}{email}/",
        ] {
            let err = validate_target(&target("logs/", prefixes(&[bad]))).unwrap_err();
            assert!(matches!(err, Error::InvalidSpec(_)), "{bad}: {err}");
        }
        let records = |prefix: &str, field: &str, equals: &str| {
            Some(S3Subject {
                key_prefixes: vec![],
                records: Some(S3Records {
                    prefix: prefix.into(),
                    field: field.into(),
                    equals: equals.into(),
                    unparsed_lines: Default::default(),
                }),
                retained_copies: None,
            })
        };
        assert!(validate_target(&target("l/", records("l/", "a.b", "{email}"))).is_ok());
        assert!(validate_target(&target("l/", records("", "a", "{email}"))).is_err());
        assert!(validate_target(&target("l/", records("l/", "a..b", "{email}"))).is_err());
        assert!(validate_target(&target("l/", records("l/", "a", "alice"))).is_err());
        assert!(validate_target(&target("l/", records("l/", "a", "u{userId}"))).is_err());
        assert!(validate_target(&target("l/", records("l/{userId}", "a", "{userId}"))).is_err());
        assert!(validate_target(&target("l/", records("l/{userId}/", "a", "{userId}"))).is_ok());
        // The retention prefix must not be empty (it would select the whole bucket).
        for (prefix, ok) in [("", false), ("logs/", true), ("a", true)] {
            assert_eq!(
                validate_target(&target(prefix, None)).is_ok(),
                ok,
                "{prefix:?}"
            );
        }
    }

    #[test]
    fn errors_are_classified_by_code_then_status() {
        let c = |code, status| classify(code, None, status, "Op").reason();
        assert_eq!(c(Some("InvalidAccessKeyId"), 403), "AuthenticationFailed");
        assert_eq!(
            c(Some("SignatureDoesNotMatch"), 403),
            "AuthenticationFailed"
        );
        assert_eq!(c(Some("NoSuchBucket"), 404), "BucketNotFound");
        assert_eq!(c(None, 404), "BucketNotFound");
        assert_eq!(c(Some("NotFound"), 404), "BucketNotFound");
        assert_eq!(c(Some("Forbidden"), 403), "AuthenticationFailed");
        assert_eq!(c(None, 403), "AuthenticationFailed");
        assert_eq!(c(None, 503), "Unreachable");
        assert_eq!(c(Some("NoSuchKey"), 404), "StoreError");
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let config = S3Config {
            bucket: "b".into(),
            region: None,
            endpoint: None,
            force_path_style: true,
            credentials: Some(S3Credentials {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: "very-secret".into(),
                session_token: Some("token-secret".into()),
            }),
        };
        let shown = format!("{config:?}");
        assert!(shown.contains("AKIDEXAMPLE") && !shown.contains("secret"));
    }
}
