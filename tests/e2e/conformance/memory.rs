//! A small in-memory store driver, used only in tests, and its fixture: the proof that a
//! driver which passes the conformance suite is done, and the measure of what adding one
//! costs. Items are kept in a `Mutex<Store>` (key `<dataset>/<n>`), each with a timestamp
//! and its owner's identifiers as fields, beside a ledger of what each run deleted.
//!
//! This file and its `mod memory;` line are all the test driver needs. It is what a driver
//! writes: a `StoreBackend` with its cursor type ([`MemoryCursor`]) and its steps, which take
//! the cursor they returned before and return the next one. The adapter does the rest (the
//! cursor's format in status, reading it back, cancellation before a step, budget overruns). It reuses the
//! `elasticsearch` sections of `Target` (an `index` naming the dataset, `term` fields to
//! match) and answers `StoreKind::Elasticsearch`. It cannot register as a kind of its own
//! from the tests: a kind is a variant of `StoreKind` and of the CRD's tagged enums (closed
//! types, so that the schema and every `match` on a section stay exhaustive), and the
//! registry is a static list in `src/`, so a new kind is a change to `src/` by design.
//!
//! What a real new driver touches, taking Loki as the model (found with
//! `grep -rlE 'StoreKind::Loki|LokiTarget|LokiSubject|LokiConfig|LokiStore|Selector::Loki|StoreSection::Loki|\.loki\b|loki::' src/`
//! and read; files that name `loki` only in comments or test values are left out):
//! - its own module `src/backends/<kind>/` (Loki: 9 files), with `driver.rs` implementing
//!   `StoreDriver` (its DataStore section, connection, selector, locator and cursor types —
//!   the lookups by one `store_sections!` line —, validate, hold templates, capabilities,
//!   register description), its backend implementing `StoreBackend` (typed steps, the
//!   previous cursor format if it had one), and its conformance instance
//!   `tests/e2e/conformance/<kind>.rs` with its `mod` line;
//! - 4 more source files:
//!   1. `src/backends/mod.rs`: the `mod` line;
//!   2. `src/backends/registry.rs`: one line in `DRIVERS`;
//!   3. `src/api/datastore.rs`: its connection section, a `StoreSection` variant, a
//!      `StoreKind` variant (and their names);
//!   4. `src/api/retentionpolicy.rs`: its selector and a `Selector` variant, its locator and
//!      a `SubjectLocator` variant (with its key in that enum's reading and writing);
//! - 6 generated CRD files (`crds/`, `charts/tombstone/crds/`, `config/crd/bases/`, for
//!   DataStore and RetentionPolicy), the README, and a sample in `config/samples/`.
//!
//! So 4 hand-written source files outside the driver's module, two of them a single line
//! and two the CRD sections (10 with the generated CRDs): the "after" figure. Before the
//! registry it was 8 (14 with the generated CRDs): besides these four, `src/engine/mod.rs`
//! (a `ConnectionSpec` variant and the backend it builds), `src/controller/stores.rs`
//! (DataStore to connection, its Secrets, "exactly one of"),
//! `src/controller/retentionpolicy/plan.rs` (selector to kind, stores that delete by
//! themselves), `src/controller/erasurerequest/plan.rs` (which locator section a kind
//! reads) and `src/ropa/model.rs` (the kind in the record of processing), and
//! `src/backends/mod.rs` held `selector_kind`, `hold_exclusion` and `validate_target`
//! matches, not just the `mod` line.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use tombstone::api::retentionpolicy::{Selector, Target};
use tombstone::api::StoreKind;
use tombstone::backends::driver::StoreBackend;
use tombstone::backends::identifier;
use tombstone::backends::template::{self, Syntax};
use tombstone::backends::{
    Backend, Error, Next, Step, StepBudget, SubjectAction, SubjectJob, SubjectStep, SweepJob,
};

use super::{Fixture, Owner};

/// One stored item: when it was written and whose it is (identifier type → value).
#[derive(Clone, Debug)]
pub struct Item {
    pub at: DateTime<Utc>,
    pub fields: BTreeMap<String, String>,
}

/// The store: its items, and a ledger of what each run deleted, kept apart from them.
#[derive(Default)]
pub struct Store {
    pub items: BTreeMap<String, Item>,
    /// Run id → items that run deleted, updated under the same lock as the removal (as the
    /// Redis driver's ledger is, in the same script). Kept for the store's life here; a real
    /// driver expires entries (the Redis ledger after 7 days).
    pub ledger: BTreeMap<String, u64>,
}

pub type Items = Arc<Mutex<Store>>;

/// The driver. Every step handles at most [`BATCH`] items between budget checks.
///
/// Counts stay exact when a step's outcome is lost: the first step of a job only names a
/// run (random) and returns it in the cursor, to be checkpointed; every removal adds to the
/// run's ledger atomically; each step reports what the ledger gained since the count the
/// cursor carries (`mem:<run>:<counted>:<last key>`), so a step resumed from the cursor
/// before a lost one counts what the lost one deleted, once.
pub struct MemoryBackend {
    items: Items,
}

const BATCH: usize = 8;

impl MemoryBackend {
    pub fn new(items: Items) -> Self {
        Self { items }
    }

    /// The keys of `dataset` after `cursor`, at most `n`.
    fn page(
        &self,
        dataset: &str,
        cursor: Option<&str>,
        n: usize,
    ) -> Result<Vec<(String, Item)>, Error> {
        let store = self
            .items
            .lock()
            .map_err(|_| Error::Store("the memory store is poisoned".into()))?;
        let start = format!("{dataset}/");
        let from = cursor.map_or(start.clone(), |c| format!("{c}\u{0}"));
        Ok(store
            .items
            .range(from..)
            .take_while(|(k, _)| k.starts_with(&start))
            .take(n)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    /// Removes `keys` and adds what went to `run`'s ledger, in one go.
    fn remove(&self, run: &str, keys: &[String]) -> Result<(), Error> {
        let mut store = self
            .items
            .lock()
            .map_err(|_| Error::Store("the memory store is poisoned".into()))?;
        let n = keys
            .iter()
            .filter(|k| store.items.remove(*k).is_some())
            .count() as u64;
        let entry = store.ledger.entry(run.to_string()).or_default();
        *entry = entry.saturating_add(n);
        Ok(())
    }

    /// What `run` has deleted so far, by its ledger.
    fn deleted_by(&self, run: &str) -> Result<u64, Error> {
        let store = self
            .items
            .lock()
            .map_err(|_| Error::Store("the memory store is poisoned".into()))?;
        Ok(store.ledger.get(run).copied().unwrap_or(0))
    }
}

/// Where a job resumes: its run (named, and checkpointed, before anything is deleted under
/// it), what of the run's ledger status already counts, and the last key handled
/// (`<dataset>/<n>`: never an identifier). The driver only says what it is; the adapter
/// writes it to status (`v1:<kind>:{…}`), reads it back, and restarts the job with a
/// Warning Event if it cannot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MemoryCursor {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    run: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    counted: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl MemoryCursor {
    /// A job's first cursor: a run named afresh, nothing counted or handled.
    fn named() -> Self {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Self {
            run: format!(
                "{:x}{:x}",
                n,
                RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            ..Self::default()
        }
    }

    /// What the ledger gained since the count this cursor carries (taken as counted).
    fn count_since(&mut self, ledger: u64) -> u64 {
        let new = ledger.saturating_sub(self.counted);
        self.counted = self.counted.max(ledger);
        new
    }
}

static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn dataset(target: &Target) -> Result<&str, Error> {
    match &target.selector {
        Some(Selector::Elasticsearch(e)) => Some(e.index.as_str()),
        _ => None,
    }
    .ok_or_else(|| Error::InvalidSpec(format!("target {} has no selector", target.name)))
}

/// The pure check of a target: a dataset, and a subject locator whose every field names an
/// identifier.
pub fn validate_target(target: &Target) -> Result<(), Error> {
    let name = dataset(target)?;
    if name.is_empty() || (name.contains('*') && !target.allow_match_all) {
        return Err(Error::InvalidSpec(format!(
            "target {}: the dataset must be named",
            target.name
        )));
    }
    let Some(subject) = target.subject.as_ref().and_then(|s| s.elasticsearch()) else {
        return Ok(());
    };
    for (field, t) in &subject.term {
        let names = template::check_bounded(t, Syntax::Exact).map_err(|m| {
            Error::InvalidSpec(format!("target {}: term[{field}] {m}", target.name))
        })?;
        if names.is_empty() {
            return Err(Error::InvalidSpec(format!(
                "target {}: term[{field}] names no identifier: every erasure would take the same items",
                target.name
            )));
        }
    }
    Ok(())
}

/// Whether `item` is the subject's: every term field equals its filled template (e-mail
/// values in any case). `Ok(None)`: a template needs an identifier the subject lacks.
fn matches(
    terms: &BTreeMap<String, String>,
    ids: &BTreeMap<String, String>,
    item: &Item,
    skipped: &mut Vec<String>,
) -> Result<Option<bool>, Error> {
    let mut all = true;
    for (field, t) in terms {
        let filled = match identifier::fill(t, ids) {
            Ok(f) => f,
            Err(template::Error::MissingIdentifier(name)) => {
                let why = format!("term[{field}] needs {{{name}}}");
                if !skipped.contains(&why) {
                    skipped.push(why);
                }
                return Ok(None);
            }
            Err(template::Error::Malformed) => {
                return Err(Error::InvalidSpec(format!(
                    "term[{field}] is not a valid template"
                )))
            }
        };
        let want = filled.text();
        let have = item
            .fields
            .get(field)
            .map(String::as_str)
            .unwrap_or_default();
        all &= if filled.folds_whole_value() {
            have.to_lowercase() == want
        } else {
            have == want
        };
    }
    Ok(Some(all))
}

#[async_trait]
impl StoreBackend for MemoryBackend {
    const KIND: StoreKind = StoreKind::Elasticsearch;
    type Cursor = MemoryCursor;

    async fn probe_store(&self) -> Result<String, Error> {
        Ok("memory".into())
    }

    async fn sweep(
        &self,
        job: &SweepJob,
        cursor: Option<MemoryCursor>,
        budget: &StepBudget,
    ) -> Result<Step<MemoryCursor>, Error> {
        validate_target(&job.target)?;
        let dataset = dataset(&job.target)?;
        let Some(mut cursor) = cursor.filter(|c| !c.run.is_empty()) else {
            // The run is named, and checkpointed, before anything is deleted under it.
            return Ok(Step {
                next: Next::Continue(MemoryCursor::named()),
                failure: budget.may_act().err().filter(|_| !job.dry_run),
                ..Step::default()
            });
        };
        let deadline = Instant::now() + budget.max_time;
        // What a step whose outcome was lost deleted is counted now.
        let mut step = Step {
            deleted: cursor.count_since(self.deleted_by(&cursor.run)?),
            ..Step::default()
        };
        loop {
            if Instant::now() >= deadline || budget.cancel.is_cancelled() {
                step.next = Next::Continue(cursor.clone());
                return Ok(step);
            }
            let page = self.page(dataset, cursor.after.as_deref(), BATCH)?;
            let Some((last, _)) = page.last() else {
                return Ok(step);
            };
            let last = last.clone();
            let expired: Vec<String> = page
                .iter()
                .filter(|(_, item)| item.at < job.cutoff)
                .map(|(k, _)| k.clone())
                .collect();
            if !job.dry_run {
                if let Err(e) = budget.may_act() {
                    step.next = Next::Continue(cursor.clone());
                    step.failure = Some(e);
                    return Ok(step);
                }
            }
            step.scanned += page.len() as u64;
            if job.dry_run {
                step.deleted += expired.len() as u64;
            } else {
                self.remove(&cursor.run, &expired)?;
                step.deleted += cursor.count_since(self.deleted_by(&cursor.run)?);
            }
            cursor.after = Some(last);
        }
    }

    async fn subject(
        &self,
        job: &SubjectJob,
        cursor: Option<MemoryCursor>,
        budget: &StepBudget,
    ) -> Result<SubjectStep<MemoryCursor>, Error> {
        validate_target(&job.target)?;
        let dataset = dataset(&job.target)?;
        let terms = job
            .target
            .subject
            .as_ref()
            .and_then(|s| s.elasticsearch())
            .map(|e| e.term.clone())
            .unwrap_or_default();
        if terms.is_empty() {
            return Err(Error::InvalidSpec(format!(
                "target {} has no subject locator",
                job.target.name
            )));
        }
        let mut step = SubjectStep {
            ran: true,
            ..SubjectStep::default()
        };
        let erase = job.action == SubjectAction::Erase;
        let mut cursor = match cursor {
            Some(c) if !erase || !c.run.is_empty() => c,
            _ if erase => {
                // The run is named, and checkpointed, before anything is erased under it;
                // an instance that no longer leads does not start.
                budget.may_act()?;
                step.next = Next::Continue(MemoryCursor::named());
                return Ok(step);
            }
            _ => MemoryCursor::default(),
        };
        let deadline = Instant::now() + budget.max_time;
        if erase {
            // What a step whose outcome was lost erased is counted now.
            step.count = cursor.count_since(self.deleted_by(&cursor.run)?);
        }
        loop {
            if Instant::now() >= deadline || budget.cancel.is_cancelled() {
                step.next = Next::Continue(cursor.clone());
                return Ok(step);
            }
            let page = self.page(dataset, cursor.after.as_deref(), BATCH)?;
            let Some((last, _)) = page.last() else {
                return Ok(step);
            };
            let last = last.clone();
            let mut theirs = Vec::new();
            for (key, item) in &page {
                match matches(&terms, &job.identifiers, item, &mut step.skipped)? {
                    Some(true) => theirs.push(key.clone()),
                    Some(false) => {}
                    None => {
                        step.ran = false;
                        return Ok(step);
                    }
                }
            }
            if erase {
                if let Err(e) = budget.may_act() {
                    step.next = Next::Continue(cursor.clone());
                    step.failure = Some(e);
                    return Ok(step);
                }
                self.remove(&cursor.run, &theirs)?;
                step.count += cursor.count_since(self.deleted_by(&cursor.run)?);
            } else {
                step.count += theirs.len() as u64;
            }
            cursor.after = Some(last);
        }
    }
}

/// The fixture: one store per test.
pub struct MemoryFixture {
    items: Items,
    next: std::sync::atomic::AtomicU64,
}

impl MemoryFixture {
    fn insert(&self, key: String, at: DateTime<Utc>, fields: BTreeMap<String, String>) {
        self.items
            .lock()
            .expect("memory store")
            .items
            .insert(key, Item { at, fields });
    }

    fn next_key(&self, dataset: &str) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{dataset}/{n:06}")
    }
}

#[async_trait]
impl Fixture for MemoryFixture {
    // The memory driver shows the least a driver needs: it works subjects one at a time.
    const BATCHES: bool = false;

    async fn start() -> Self {
        Self {
            items: Arc::default(),
            next: Default::default(),
        }
    }

    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(MemoryBackend::new(self.items.clone()))
    }

    fn target(&self, dataset: &str) -> Target {
        serde_json::from_value(json!({"name": dataset, "store": "memory",
            "elasticsearch": {"index": dataset, "timestampField": "at"},
            "subject": {"elasticsearch": {"term": {"user": "{userId}", "mail": "{email}"}}}}))
        .expect("a valid target")
    }

    fn target_without_identifier(&self, dataset: &str) -> Target {
        serde_json::from_value(json!({"name": dataset, "store": "memory",
            "elasticsearch": {"index": dataset, "timestampField": "at"},
            "subject": {"elasticsearch": {"term": {"user": "everyone"}}}}))
        .expect("a valid target")
    }

    fn validate(&self, target: &Target) -> Result<(), Error> {
        validate_target(target)
    }

    async fn seed(&self, dataset: &str, expired: usize, young: usize) -> DateTime<Utc> {
        let now = Utc::now();
        for i in 0..expired + young {
            let at = if i < expired {
                now - chrono::Duration::days(90)
            } else {
                now
            };
            self.insert(self.next_key(dataset), at, BTreeMap::new());
        }
        now - chrono::Duration::days(30)
    }

    async fn seed_owner(&self, dataset: &str, owner: &Owner, n: usize) -> u64 {
        let fields: BTreeMap<String, String> = [
            ("user".to_string(), owner.user_id.clone()),
            ("mail".to_string(), owner.email.clone()),
        ]
        .into();
        for _ in 0..n {
            self.insert(self.next_key(dataset), Utc::now(), fields.clone());
        }
        n as u64
    }

    async fn count(&self, dataset: &str, cutoff: DateTime<Utc>) -> (u64, u64) {
        let store = self.items.lock().expect("memory store");
        let prefix = format!("{dataset}/");
        store
            .items
            .iter()
            .filter(|(k, item)| k.starts_with(&prefix) && item.fields.is_empty())
            .fold((0, 0), |(old, young), (_, item)| {
                if item.at < cutoff {
                    (old + 1, young)
                } else {
                    (old, young + 1)
                }
            })
    }

    async fn count_owner(&self, dataset: &str, owner: &Owner) -> u64 {
        let store = self.items.lock().expect("memory store");
        let prefix = format!("{dataset}/");
        store
            .items
            .iter()
            .filter(|(k, item)| {
                k.starts_with(&prefix) && item.fields.get("user") == Some(&owner.user_id)
            })
            .count() as u64
    }
}

crate::conformance!(tests, MemoryFixture);
