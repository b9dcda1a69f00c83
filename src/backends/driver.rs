//! The contract a store kind implements once: [`StoreDriver`], with its typed parts (the
//! DataStore's connection section and the connection it resolves to, the target's selector,
//! the subject locator, the cursor), a pure `validate`, and what it can do
//! ([`Capabilities`]); and [`StoreBackend`], its steps over its typed cursor.
//!
//! The rest of the operator never sees a concrete driver: [`Registered`] turns a typed driver
//! into the object-safe [`Driver`], the blanket `impl Backend for StoreBackend` (the adapter)
//! turns its backend into the object-safe [`Backend`] with cursors encoded in status, and
//! [`super::registry`] maps a [`StoreKind`] to it. The engine, the controllers and the record
//! of processing ask the registry, never `match` on a kind, so adding a kind means adding its
//! module, its CRD sections and one registry line.

use std::any::Any;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::datastore::DataStoreSpec;
use crate::api::retentionpolicy::{SubjectLocator, Target};
use crate::api::StoreKind;

use super::http::HttpAuth;
use super::{
    Backend, BatchJob, BatchStep, Cancel, Error, Limits, LockedCopies, Next, Notice, Step,
    StepBudget, SubjectJob, SubjectStep, SweepJob,
};

/// What a store kind can do, for the planners (never a `match` on the kind).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// A Verify step can tell whether any of a subject's records remain.
    pub verify: bool,
    /// The store runs deletions by itself after a step returns, and they can be cancelled
    /// ([`Backend::cancel`]): a policy on such a store needs a finalizer.
    pub cancel: bool,
    /// A dry run counts exactly what a real run would delete.
    pub exact_dry_run: bool,
    /// An erasure can remove single records inside a larger item (hash fields, set members,
    /// archive lines, log lines, documents), not only whole items.
    pub record_level_erasure: bool,
}

/// Where a store's credentials would go and where they come from, read from its DataStore
/// section alone (the operator's trust checks run on it before any Secret is read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport<'a> {
    /// The URL requests go to; None: the provider's own endpoint (always TLS).
    pub endpoint: Option<&'a str>,
    /// The Secret the section names.
    pub secret: Option<&'a str>,
    /// Without a Secret, requests are signed with the operator's own cloud identity.
    pub ambient_without_secret: bool,
}

/// A key a Secret lacks (or holds as something other than UTF-8): never the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingKey(pub String);

/// The keys of the one Secret a DataStore names, already read and checked by the controller.
pub trait SecretKeys {
    /// A key as UTF-8; None when it is absent or not UTF-8.
    fn get(&self, key: &str) -> Option<String>;

    /// A key that must be there.
    fn required(&self, key: &str) -> Result<String, MissingKey> {
        self.get(key).ok_or_else(|| MissingKey(key.to_string()))
    }
}

/// Credentials for an HTTP store (pure): `token_key` (`token` for Loki, `apiKey` for
/// Elasticsearch), or `username` and `password`; no Secret, no credentials.
pub fn http_auth(secret: Option<&dyn SecretKeys>, token_key: &str) -> Result<HttpAuth, MissingKey> {
    let Some(secret) = secret else {
        return Ok(HttpAuth::None);
    };
    if let Some(token) = secret.get(token_key) {
        return Ok(if token_key == "apiKey" {
            HttpAuth::ApiKey(token)
        } else {
            HttpAuth::Bearer(token)
        });
    }
    match secret.get("username") {
        Some(username) => Ok(HttpAuth::Basic {
            username,
            password: secret.required("password")?,
        }),
        None => Err(MissingKey(format!(
            "{token_key} (or username and password)"
        ))),
    }
}

/// The three lookups every driver would write the same way, by its variant name in the
/// CRD's enums (`StoreSection`, `Selector`, `SubjectLocator`): `section`, `selector` and
/// `locator` of [`StoreDriver`]. Used inside `impl StoreDriver for …`:
/// `store_sections!(Redis);`.
#[macro_export]
macro_rules! store_sections {
    ($variant:ident) => {
        fn section(spec: &$crate::api::datastore::DataStoreSpec) -> Option<&Self::Section> {
            match &spec.store {
                Some($crate::api::datastore::StoreSection::$variant(section)) => Some(section),
                _ => None,
            }
        }

        fn selector(target: &$crate::api::retentionpolicy::Target) -> Option<&Self::Selector> {
            match &target.selector {
                Some($crate::api::retentionpolicy::Selector::$variant(selector)) => Some(selector),
                _ => None,
            }
        }

        fn locator(
            subject: &$crate::api::retentionpolicy::SubjectLocator,
        ) -> Option<&Self::Locator> {
            match subject {
                $crate::api::retentionpolicy::SubjectLocator::$variant(locator) => Some(locator),
                _ => None,
            }
        }
    };
}

/// Where an HTTP store's credentials go (its `url`) and come from (its
/// `credentialsSecretRef`), for [`StoreDriver::transport`].
pub fn http_transport<'a>(
    url: &'a str,
    secret: Option<&'a crate::api::common::SecretRef>,
) -> Transport<'a> {
    Transport {
        endpoint: Some(url),
        secret: secret.map(|s| s.name.as_str()),
        ambient_without_secret: false,
    }
}

/// One store kind, typed. Implemented once per kind, in the kind's own module.
pub trait StoreDriver: Send + Sync + 'static {
    const KIND: StoreKind;
    /// The DataStore's section for this kind.
    type Section;
    /// Everything needed to connect, resolved from the section and its Secret. Two equal
    /// configs share one backend (connections, rate limiter). `Debug` must redact secrets.
    type Config: Clone + PartialEq + std::fmt::Debug + Send + Sync + 'static;
    /// The target's selector for this kind.
    type Selector;
    /// The subject locator's section for this kind.
    type Locator;
    /// Where a step resumes: the driver's own typed cursor. The adapter encodes it in status.
    type Cursor: CursorType;
    /// The backend the steps run on, with its typed steps.
    type Backend: StoreBackend<Cursor = Self::Cursor>;

    fn capabilities() -> Capabilities;

    fn section(spec: &DataStoreSpec) -> Option<&Self::Section>;
    fn selector(target: &Target) -> Option<&Self::Selector>;
    fn locator(subject: &SubjectLocator) -> Option<&Self::Locator>;

    /// Where the section sends credentials, and from where.
    fn transport(section: &Self::Section) -> Transport<'_>;

    /// The connection, from the section and the Secret it names (pure).
    fn config(
        section: &Self::Section,
        secret: Option<&dyn SecretKeys>,
    ) -> Result<Self::Config, MissingKey>;

    /// The backend the engine runs steps on.
    fn connect(config: Self::Config, limits: Limits) -> Self::Backend;

    /// Checks a target before anything runs (pure; invariant 1: never outside the selector).
    fn validate(
        target: &Target,
        selector: &Self::Selector,
        locator: Option<&Self::Locator>,
    ) -> Result<(), Error>;

    /// The locator's templates a sweep uses to leave held subjects' data in place, each with
    /// the field it comes from (`subject.redis.keys[0]`).
    fn hold_templates(locator: &Self::Locator) -> Vec<(String, &str)>;

    /// Where the data lives, for the record of processing: never a URL or a Secret
    /// (`["redis", "keys session:*"]`, `["s3 bucket b in r", "prefix p"]`).
    fn describe(section: Option<&Self::Section>, selector: Option<&Self::Selector>) -> Vec<String>;
}

/// What a driver's cursor must be: plain data the adapter can write to status and read back
/// (serde), describe ([`JsonSchema`]) and log. Its `Debug` must show no identifier: a cursor
/// holds positions, counts, task ids and digests, never a key or a query of a subject.
pub trait CursorType:
    Serialize + DeserializeOwned + JsonSchema + std::fmt::Debug + Clone + Send + Sync + 'static
{
}

impl<T> CursorType for T where
    T: Serialize + DeserializeOwned + JsonSchema + std::fmt::Debug + Clone + Send + Sync + 'static
{
}

/// One store kind's backend with typed steps: what a driver writes. Its steps take the
/// cursor they returned before (`None`: start) and return their next one; the one adapter
/// (the [`Backend`] every `StoreBackend` gets, below) owns everything around them, so that no
/// driver re-implements it:
/// - the cursor's encoding in status, one format for every kind ([`encode_cursor`]:
///   `v1:<kind>:<json>`), and reading it back: a checkpoint of the previous version's format
///   goes through [`StoreBackend::legacy_cursor`] and resumes; one that cannot be read (or
///   is of another kind) restarts the job, with a `CursorRestarted` [`Notice`] (a Warning
///   Event), never an error loop;
/// - cancellation, checked before the step (a cancelled step hands back its cursor
///   untouched), and the time budget: a step that runs far beyond it ([`overran`]) is
///   reported with a `StepOverran` notice and a warning in the log;
/// - errors keep their [`Error`] variant (its category and reason) all the way up.
#[async_trait]
pub trait StoreBackend: Send + Sync + 'static {
    const KIND: StoreKind;
    type Cursor: CursorType;

    /// Connects and authenticates; returns a short description such as `redis 7.0.15`.
    async fn probe_store(&self) -> Result<String, Error>;

    /// One bounded step of a retention sweep from `cursor` (None: start).
    async fn sweep(
        &self,
        job: &SweepJob,
        cursor: Option<Self::Cursor>,
        budget: &StepBudget,
    ) -> Result<Step<Self::Cursor>, Error>;

    /// One bounded step of finding, erasing or verifying one subject's records.
    async fn subject(
        &self,
        job: &SubjectJob,
        cursor: Option<Self::Cursor>,
        budget: &StepBudget,
    ) -> Result<SubjectStep<Self::Cursor>, Error>;

    /// Whether [`StoreBackend::subjects`] works many subjects in one pass.
    const BATCHES: bool = false;

    /// One bounded step of finding, erasing or verifying many subjects' records in one pass
    /// (see [`BatchJob`]): one scan or rewrite serves every member, each match is attributed
    /// to its member, and the gate is asked before every destructive commit. The cursor
    /// holds shared positions only (the batcher keeps each member's counts); a step repeated
    /// from an older cursor after its checkpoint was lost must count what it had deleted,
    /// as [`StoreBackend::subject`] does. Only called when [`StoreBackend::BATCHES`].
    async fn subjects(
        &self,
        job: &BatchJob,
        cursor: Option<Self::Cursor>,
        budget: &StepBudget,
    ) -> Result<BatchStep<Self::Cursor>, Error> {
        let _ = (job, cursor, budget);
        Err(Error::InvalidSpec(format!(
            "a {} store does not work subjects in batches",
            Self::KIND.as_str()
        )))
    }

    /// Cancels the deletion the store runs by itself that `cursor` waits on (see
    /// [`Backend::cancel`]).
    async fn cancel_deletion(&self, cursor: Self::Cursor) -> Result<Cancel, Error> {
        let _ = cursor;
        Ok(Cancel::Nothing)
    }

    /// See [`Backend::locked_copies`].
    async fn locked(&self, job: &SubjectJob) -> Result<LockedCopies, Error> {
        let _ = job;
        Ok(LockedCopies::default())
    }

    /// A cursor as the version before the common format wrote it in status (`es:{…}`,
    /// `loki:{…}`, Redis `node:scan:topology;ledger`, …): read, so that work in flight
    /// resumes after an upgrade. None: not one (the job restarts, with a notice).
    fn legacy_cursor(text: &str) -> Option<Self::Cursor> {
        let _ = text;
        None
    }

    /// What the deletion a cursor waits on is, where the cursor can tell (no identifier).
    fn describe_wait(cursor: &Self::Cursor) -> Option<String> {
        let _ = cursor;
        None
    }
}

/// The version tag of the cursor format in status.
pub const CURSOR_FORMAT: &str = "v1";

/// A cursor as status holds it: `v1:<kind>:<json>`; `null` for a job not started yet.
pub fn encode_cursor<B: StoreBackend>(cursor: Option<&B::Cursor>) -> String {
    // Plain data (the bound on cursors): serialising cannot fail; if it did, the job would
    // restart (with a notice) rather than resume from something else.
    let json = serde_json::to_string(&cursor).unwrap_or_else(|_| "null".into());
    format!("{CURSOR_FORMAT}:{}:{json}", B::KIND.as_str())
}

/// A cursor read back from status.
#[derive(Debug, PartialEq)]
pub enum Decoded<C> {
    /// No cursor, or one of a job not started yet: start.
    Start,
    /// Resume here (`upgraded`: from a cursor in the previous version's format).
    Resume { cursor: C, upgraded: bool },
    /// Unreadable, or of another store kind: start over, and say so.
    Restart(Notice),
}

/// The reason of the notice a job that starts over because its checkpoint could not be
/// read carries.
pub const CURSOR_RESTARTED: &str = "CursorRestarted";

/// Reads a cursor from status (see [`StoreBackend`]). Never fails: what cannot be read
/// restarts the job with a notice. The notice does not quote the cursor (it could be
/// anything someone wrote into status).
pub fn decode_cursor<B: StoreBackend>(text: Option<&str>) -> Decoded<B::Cursor> {
    let Some(text) = text else {
        return Decoded::Start;
    };
    let kind = B::KIND.as_str();
    let restart = |why: &str| {
        Decoded::Restart(Notice {
            reason: CURSOR_RESTARTED,
            message: format!(
                "the checkpoint {why}; the job started over from the beginning (what was deleted before is gone and is not counted again)"
            ),
        })
    };
    if let Some(rest) = text
        .strip_prefix(CURSOR_FORMAT)
        .and_then(|r| r.strip_prefix(':'))
    {
        let Some((of, json)) = rest.split_once(':') else {
            return restart("is not a cursor this version can read");
        };
        if of != kind {
            return restart(&format!(
                "is a cursor of another store kind ({}), not of {kind}",
                short(of)
            ));
        }
        return match serde_json::from_str::<Option<B::Cursor>>(json) {
            Ok(Some(cursor)) => Decoded::Resume {
                cursor,
                upgraded: false,
            },
            Ok(None) => Decoded::Start,
            Err(_) => restart(&format!("is not a {kind} cursor this version can read")),
        };
    }
    match B::legacy_cursor(text) {
        Some(cursor) => Decoded::Resume {
            cursor,
            upgraded: true,
        },
        None => restart(&format!(
            "is not a {kind} cursor this version can read (written by another version, or by hand)"
        )),
    }
}

/// A store kind's name as quoted in a notice: short, and only if it is one.
fn short(of: &str) -> &str {
    StoreKind::ALL
        .iter()
        .map(|k| k.as_str())
        .find(|k| *k == of)
        .unwrap_or("unknown")
}

/// Whether a step that took `took` ran far beyond its budget `max_time`: more than three
/// times it and 10 s more (a step always finishes the batch under way, and the first batch
/// of a step with no time at all).
pub fn overran(took: Duration, max_time: Duration) -> bool {
    took > max_time
        .saturating_mul(3)
        .saturating_add(Duration::from_secs(10))
}

/// The reason of the notice of a step that [`overran`] its budget.
pub const STEP_OVERRAN: &str = "StepOverran";

fn overrun_notice(kind: StoreKind, took: Duration, max_time: Duration) -> Notice {
    tracing::warn!(
        kind = kind.as_str(),
        took_ms = took.as_millis() as u64,
        budget_ms = max_time.as_millis() as u64,
        "a step ran far beyond its time budget"
    );
    Notice {
        reason: STEP_OVERRAN,
        message: format!(
            "a {} step ran {:.1} s against a budget of {:.1} s: the store answered slowly, or a batch was too large",
            kind.as_str(),
            took.as_secs_f64(),
            max_time.as_secs_f64()
        ),
    }
}

/// The adapter: every typed backend is a [`Backend`] with cursors encoded in status.
#[async_trait]
impl<B: StoreBackend> Backend for B {
    fn kind(&self) -> StoreKind {
        B::KIND
    }

    async fn probe(&self) -> Result<String, Error> {
        self.probe_store().await
    }

    async fn sweep_step(
        &self,
        job: &SweepJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<Step, Error> {
        let (cursor, notices) = resume::<B>(cursor);
        if budget.cancel.is_cancelled() {
            return Ok(Step {
                next: Next::Continue(encode_cursor::<B>(cursor.as_ref())),
                notices,
                ..Step::default()
            });
        }
        let started = tokio::time::Instant::now();
        let step = self.sweep(job, cursor, budget).await?;
        let mut step = step.map_cursor(|c| encode_cursor::<B>(Some(&c)));
        step.notices
            .extend(after_step::<B>(notices, started, budget.max_time));
        Ok(step)
    }

    async fn cancel(&self, cursor: &str) -> Result<Cancel, Error> {
        match decode_cursor::<B>(Some(cursor)) {
            Decoded::Resume { cursor, .. } => self.cancel_deletion(cursor).await,
            Decoded::Start | Decoded::Restart(_) => Ok(Cancel::Nothing),
        }
    }

    async fn locked_copies(&self, job: &SubjectJob) -> Result<LockedCopies, Error> {
        self.locked(job).await
    }

    async fn subject_step(
        &self,
        job: &SubjectJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<SubjectStep, Error> {
        let (cursor, notices) = resume::<B>(cursor);
        if budget.cancel.is_cancelled() {
            return Ok(SubjectStep {
                // Nothing was looked at: whether a locator would run is not known yet, and
                // a cancelled step's answer is only its cursor.
                ran: true,
                next: Next::Continue(encode_cursor::<B>(cursor.as_ref())),
                notices,
                ..SubjectStep::default()
            });
        }
        let started = tokio::time::Instant::now();
        let step = self.subject(job, cursor, budget).await?;
        let mut step = step.map_cursor(|c| encode_cursor::<B>(Some(&c)));
        step.notices
            .extend(after_step::<B>(notices, started, budget.max_time));
        Ok(step)
    }
    fn batches(&self) -> bool {
        B::BATCHES
    }

    async fn batch_step(
        &self,
        job: &BatchJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<BatchStep, Error> {
        let (cursor, notices) = resume::<B>(cursor);
        if budget.cancel.is_cancelled() {
            let mut step = BatchStep::empty(
                job.members.len(),
                Next::Continue(encode_cursor::<B>(cursor.as_ref())),
            );
            step.notices = notices;
            return Ok(step);
        }
        let started = tokio::time::Instant::now();
        let step = self.subjects(job, cursor, budget).await?;
        if step.members.len() != job.members.len() {
            return Err(Error::InvalidSpec(format!(
                "a {} batch step answered for {} members of {}",
                B::KIND.as_str(),
                step.members.len(),
                job.members.len()
            )));
        }
        let mut step = step.map_cursor(|c| encode_cursor::<B>(Some(&c)));
        step.notices
            .extend(after_step::<B>(notices, started, budget.max_time));
        Ok(step)
    }
}

/// What the adapter adds to a step's own notices: those reading its cursor gave, and a
/// step that ran far beyond its budget.
fn after_step<B: StoreBackend>(
    mut notices: Vec<Notice>,
    started: tokio::time::Instant,
    budget: Duration,
) -> Vec<Notice> {
    let took = started.elapsed();
    if overran(took, budget) {
        notices.push(overrun_notice(B::KIND, took, budget));
    }
    notices
}

/// The typed cursor to resume from, and the notices reading it gave.
fn resume<B: StoreBackend>(text: Option<&str>) -> (Option<B::Cursor>, Vec<Notice>) {
    match decode_cursor::<B>(text) {
        Decoded::Start => (None, Vec::new()),
        Decoded::Resume { cursor, upgraded } => {
            if upgraded {
                tracing::info!(
                    kind = B::KIND.as_str(),
                    "resuming from a checkpoint in the previous cursor format"
                );
            }
            (Some(cursor), Vec::new())
        }
        Decoded::Restart(notice) => {
            tracing::warn!(
                kind = B::KIND.as_str(),
                reason = notice.reason,
                "{}",
                notice.message
            );
            (None, vec![notice])
        }
    }
}

/// A resolved connection to one store, of any kind. Equal specs share one backend.
#[derive(Clone)]
pub struct ConnectionSpec(Arc<dyn Connection>);

trait Connection: Send + Sync {
    fn kind(&self) -> StoreKind;
    fn connect(&self, limits: Limits) -> Arc<dyn Backend>;
    fn as_any(&self) -> &dyn Any;
    fn same(&self, other: &dyn Connection) -> bool;
    fn debug(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result;
}

struct Typed<D: StoreDriver>(D::Config);

impl<D: StoreDriver> Connection for Typed<D> {
    fn kind(&self) -> StoreKind {
        D::KIND
    }

    fn connect(&self, limits: Limits) -> Arc<dyn Backend> {
        Arc::new(D::connect(self.0.clone(), limits))
    }

    fn as_any(&self) -> &dyn Any {
        &self.0
    }

    fn same(&self, other: &dyn Connection) -> bool {
        other
            .as_any()
            .downcast_ref::<D::Config>()
            .is_some_and(|o| *o == self.0)
    }

    fn debug(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl ConnectionSpec {
    /// The connection of a store of kind `D`.
    pub fn new<D: StoreDriver>(config: D::Config) -> Self {
        Self(Arc::new(Typed::<D>(config)))
    }

    pub fn kind(&self) -> StoreKind {
        self.0.kind()
    }

    /// A new backend for this connection.
    pub fn connect(&self, limits: Limits) -> Arc<dyn Backend> {
        self.0.connect(limits)
    }

    /// The typed configuration, if this is a connection of kind `D` (for code that uses one
    /// kind's client directly, as the receipt sink uses S3's).
    pub fn config<D: StoreDriver>(&self) -> Option<&D::Config> {
        self.0.as_any().downcast_ref::<D::Config>()
    }
}

impl PartialEq for ConnectionSpec {
    fn eq(&self, other: &Self) -> bool {
        self.0.same(other.0.as_ref())
    }
}

impl std::fmt::Debug for ConnectionSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.debug(f)
    }
}

/// A store kind as the rest of the operator sees it (object-safe; see [`Registered`]).
pub trait Driver: Send + Sync {
    fn kind(&self) -> StoreKind;
    fn capabilities(&self) -> Capabilities;
    /// Whether the DataStore sets this kind's section.
    fn configured(&self, spec: &DataStoreSpec) -> bool;
    /// Whether the target sets this kind's selector.
    fn selects(&self, target: &Target) -> bool;
    /// Whether the locator has this kind's section.
    fn locates(&self, subject: &SubjectLocator) -> bool;
    /// None when the DataStore has no section for this kind.
    fn transport<'a>(&self, spec: &'a DataStoreSpec) -> Option<Transport<'a>>;
    /// None when the DataStore has no section for this kind.
    fn connection(
        &self,
        spec: &DataStoreSpec,
        secret: Option<&dyn SecretKeys>,
    ) -> Option<Result<ConnectionSpec, MissingKey>>;
    /// The target checked for a store of this kind: it must have this kind's selector.
    fn validate(&self, target: &Target) -> Result<(), Error>;
    /// The hold templates of the locator's section for this kind; None without one.
    fn hold_templates<'a>(&self, subject: &'a SubjectLocator) -> Option<Vec<(String, &'a str)>>;
    fn describe(&self, spec: Option<&DataStoreSpec>, target: &Target) -> Vec<String>;
    fn describe_wait(&self, cursor: &str) -> Option<String>;
}

/// The one adapter from a typed [`StoreDriver`] to [`Driver`].
pub struct Registered<D>(PhantomData<fn() -> D>);

impl<D> Registered<D> {
    pub const DRIVER: Self = Self(PhantomData);
}

impl<D: StoreDriver> Driver for Registered<D> {
    fn kind(&self) -> StoreKind {
        D::KIND
    }

    fn capabilities(&self) -> Capabilities {
        D::capabilities()
    }

    fn configured(&self, spec: &DataStoreSpec) -> bool {
        D::section(spec).is_some()
    }

    fn selects(&self, target: &Target) -> bool {
        D::selector(target).is_some()
    }

    fn locates(&self, subject: &SubjectLocator) -> bool {
        D::locator(subject).is_some()
    }

    fn transport<'a>(&self, spec: &'a DataStoreSpec) -> Option<Transport<'a>> {
        D::section(spec).map(D::transport)
    }

    fn connection(
        &self,
        spec: &DataStoreSpec,
        secret: Option<&dyn SecretKeys>,
    ) -> Option<Result<ConnectionSpec, MissingKey>> {
        D::section(spec).map(|s| D::config(s, secret).map(ConnectionSpec::new::<D>))
    }

    fn validate(&self, target: &Target) -> Result<(), Error> {
        let kind = D::KIND.as_str();
        let selector = D::selector(target).ok_or_else(|| {
            Error::InvalidSpec(format!(
                "target {}: its store is of kind {kind}, and the target has no {kind} selector",
                target.name
            ))
        })?;
        if let Some(problem) = target
            .subject
            .as_ref()
            .and_then(|s| s.problem(&target.name, Some(D::KIND)))
        {
            // Stored before the schema refused it: this policy is refused, not every one.
            return Err(Error::InvalidSpec(problem));
        }
        let locator = target.subject.as_ref().and_then(D::locator);
        D::validate(target, selector, locator)
    }

    fn hold_templates<'a>(&self, subject: &'a SubjectLocator) -> Option<Vec<(String, &'a str)>> {
        D::locator(subject).map(D::hold_templates)
    }

    fn describe(&self, spec: Option<&DataStoreSpec>, target: &Target) -> Vec<String> {
        D::describe(spec.and_then(D::section), D::selector(target))
    }

    fn describe_wait(&self, cursor: &str) -> Option<String> {
        match decode_cursor::<D::Backend>(Some(cursor)) {
            Decoded::Resume { cursor, .. } => D::Backend::describe_wait(&cursor),
            Decoded::Start | Decoded::Restart(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio_util::sync::CancellationToken;

    /// A typed backend whose cursor counts its steps; a step takes `takes` (paused clock).
    #[derive(Default)]
    struct Counting {
        steps: AtomicU32,
        takes: Duration,
    }

    #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, JsonSchema)]
    struct Steps {
        done: u32,
    }

    #[async_trait]
    impl StoreBackend for Counting {
        const KIND: StoreKind = StoreKind::Redis;
        type Cursor = Steps;

        fn legacy_cursor(text: &str) -> Option<Steps> {
            text.strip_prefix("old:")?
                .parse()
                .ok()
                .map(|done| Steps { done })
        }

        async fn probe_store(&self) -> Result<String, Error> {
            Ok("counting".into())
        }

        async fn sweep(
            &self,
            _job: &SweepJob,
            cursor: Option<Steps>,
            _budget: &StepBudget,
        ) -> Result<Step<Steps>, Error> {
            self.steps.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.takes).await;
            let done = cursor.map_or(0, |c| c.done) + 1;
            Ok(Step {
                deleted: 1,
                next: Next::Continue(Steps { done }),
                ..Step::default()
            })
        }

        async fn subject(
            &self,
            _job: &SubjectJob,
            _cursor: Option<Steps>,
            _budget: &StepBudget,
        ) -> Result<SubjectStep<Steps>, Error> {
            Ok(SubjectStep::default())
        }
    }

    fn job() -> SweepJob {
        SweepJob {
            target: serde_json::from_value(serde_json::json!(
                {"name": "t", "store": "s", "redis": {"keyPattern": "k:*"}}
            ))
            .expect("a target"),
            retention: "1d".parse().expect("a duration"),
            dry_run: false,
            cutoff: chrono::Utc::now(),
            held: Default::default(),
        }
    }

    fn budget(max_time: Duration) -> StepBudget {
        StepBudget {
            max_time,
            cancel: CancellationToken::new(),
            fence: Default::default(),
        }
    }

    fn decoded(text: &str) -> Decoded<Steps> {
        decode_cursor::<Counting>(Some(text))
    }

    #[test]
    fn one_format_in_status_and_the_previous_one_resumes() {
        let text = encode_cursor::<Counting>(Some(&Steps { done: 4 }));
        assert_eq!(text, r#"v1:redis:{"done":4}"#);
        assert_eq!(
            decoded(&text),
            Decoded::Resume {
                cursor: Steps { done: 4 },
                upgraded: false
            }
        );
        assert_eq!(encode_cursor::<Counting>(None), "v1:redis:null");
        assert_eq!(decoded("v1:redis:null"), Decoded::Start);
        assert_eq!(decode_cursor::<Counting>(None), Decoded::Start);
        assert_eq!(
            decoded("old:7"),
            Decoded::Resume {
                cursor: Steps { done: 7 },
                upgraded: true
            }
        );
    }

    #[test]
    fn an_unreadable_checkpoint_restarts_with_a_notice_that_does_not_quote_it() {
        for (text, says) in [
            (r#"v1:s3:{"done":4}"#, "another store kind (s3)"),
            (
                r#"v1:nosuchkind-4711:{"done":4}"#,
                "another store kind (unknown)",
            ),
            (r#"v1:redis:{"done":"x4711"}"#, "not a redis cursor"),
            ("v1:redis", "not a cursor"),
            ("es:{\"t\":\"x4711\"}", "not a redis cursor"),
            ("old:x4711", "not a redis cursor"),
            ("", "not a redis cursor"),
        ] {
            let Decoded::Restart(notice) = decoded(text) else {
                panic!("{text:?} did not restart");
            };
            assert_eq!(notice.reason, CURSOR_RESTARTED);
            assert!(
                notice.message.contains(says),
                "{text:?}: {}",
                notice.message
            );
            assert!(!notice.message.contains("4711"), "{}", notice.message);
        }
    }

    #[tokio::test]
    async fn the_adapter_encodes_resumes_and_restarts_for_the_driver() {
        let backend = Counting::default();
        let step = backend
            .sweep_step(&job(), Some("old:2"), &budget(Duration::from_secs(5)))
            .await
            .expect("a step");
        assert_eq!(step.next, Next::Continue(r#"v1:redis:{"done":3}"#.into()));
        assert!(step.notices.is_empty());
        let step = backend
            .sweep_step(&job(), Some("garbage"), &budget(Duration::from_secs(5)))
            .await
            .expect("a step");
        assert_eq!(step.next, Next::Continue(r#"v1:redis:{"done":1}"#.into()));
        assert_eq!(step.notices.len(), 1);
        assert_eq!(step.notices[0].reason, "CursorRestarted");
    }

    #[tokio::test]
    async fn a_cancelled_step_hands_back_its_cursor_without_running() {
        let backend = Counting::default();
        let cancelled = budget(Duration::from_secs(5));
        cancelled.cancel.cancel();
        let text = r#"v1:redis:{"done":9}"#;
        let step = backend
            .sweep_step(&job(), Some(text), &cancelled)
            .await
            .expect("a step");
        assert_eq!(step.next, Next::Continue(text.into()));
        assert_eq!(step.deleted, 0);
        let fresh = backend
            .sweep_step(&job(), None, &cancelled)
            .await
            .expect("a step");
        assert_eq!(fresh.next, Next::Continue("v1:redis:null".into()));
        assert_eq!(
            backend.steps.load(Ordering::SeqCst),
            0,
            "the driver never ran"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_far_beyond_its_budget_is_reported() {
        let slow = Counting {
            takes: Duration::from_secs(60),
            ..Counting::default()
        };
        let step = slow
            .sweep_step(&job(), None, &budget(Duration::from_secs(5)))
            .await
            .expect("a step");
        assert_eq!(step.notices.len(), 1);
        assert_eq!(step.notices[0].reason, STEP_OVERRAN);
        assert!(
            step.notices[0].message.contains("60.0 s"),
            "{:?}",
            step.notices
        );
        let on_time = Counting {
            takes: Duration::from_secs(20),
            ..Counting::default()
        };
        let step = on_time
            .sweep_step(&job(), None, &budget(Duration::from_secs(5)))
            .await
            .expect("a step");
        assert!(step.notices.is_empty(), "within 3 × 5 s + 10 s");
        assert!(!overran(Duration::from_secs(9), Duration::ZERO));
        assert!(overran(Duration::from_secs(11), Duration::ZERO));
    }
}
