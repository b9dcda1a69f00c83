//! The contract a store kind implements once: [`StoreDriver`], with its typed parts (the
//! DataStore's connection section and the connection it resolves to, the target's selector,
//! the subject locator), a pure `validate`, and what it can do ([`Capabilities`]).
//!
//! The rest of the operator never sees a concrete driver: [`Registered`] turns a typed driver
//! into the object-safe [`Driver`], and [`super::registry`] maps a [`StoreKind`] to it. The
//! engine, the controllers and the record of processing ask the registry, never `match` on a
//! kind, so adding a kind means adding its module, its CRD sections and one registry line.

use std::any::Any;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::api::datastore::DataStoreSpec;
use crate::api::retentionpolicy::{SubjectLocator, Target};
use crate::api::StoreKind;

use super::http::HttpAuth;
use super::{Backend, Error, Limits};

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
    fn connect(config: Self::Config, limits: Limits) -> Arc<dyn Backend>;

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

    /// What the deletion a cursor waits on is, where the cursor can tell (no identifier).
    fn describe_wait(cursor: &str) -> Option<String> {
        let _ = cursor;
        None
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
        D::connect(self.0.clone(), limits)
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
        D::describe_wait(cursor)
    }
}
