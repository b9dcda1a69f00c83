//! Retention sweeps of a prefix, one listing page at a time, with the listing position
//! checkpointed after every page.

use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::types::ObjectIdentifier;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::records::Matcher;
use super::{object_id, sdk_error, Refusal, S3Backend, LIST_PAGE};
use crate::api::retentionpolicy::Target;
use crate::api::StoreKind;
use crate::backends::driver::StoreDriver;
use crate::backends::identifier;
use crate::backends::{held_subject_locator, Error, Next, Step, StepBudget, SweepJob};

/// Refused items named in the target's message.
const NAMED_REFUSALS: usize = 5;
/// Delete markers of one key remembered across a page boundary; more are left for the next
/// sweep (a key with that many markers at a boundary is rare, and the cursor lives in status).
const CARRIED_MARKERS: usize = 100;
/// HeadObject requests in flight while reading the recorded age of young archives.
const HEAD_CONCURRENCY: usize = 16;

/// User metadata (sent as `x-amz-meta-tombstone-original-time`) in which a rewritten archive
/// keeps the time its content was first written, as RFC 3339: a rewrite gives the object a
/// fresh `LastModified`, and the archive must still expire when its content does.
pub(super) const ORIGINAL_TIME: &str = "tombstone-original-time";

/// Where a sweep resumes: the listing position and, on versioned buckets, what is known of
/// the key that straddles the page boundary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Cursor {
    /// Listing versions (the bucket is or was versioned) rather than objects.
    #[serde(rename = "v", default, skip_serializing_if = "std::ops::Not::not")]
    pub versions: bool,
    /// ListObjectsV2 continuation token.
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// ListObjectVersions key and version id markers.
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    pub key_marker: Option<String>,
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub version_marker: Option<String>,
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub carry: Option<Carry>,
    /// A real sweep's write-ahead intents ([`super::intent`]): absent in a dry run.
    #[serde(rename = "j", default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<super::intent::Journal>,
}

/// The key whose versions continue on the next page. Its delete markers can only be judged
/// once all its versions are seen, and the version the listing resumes after is deleted only
/// then (some servers cannot resume after a version that no longer exists).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Carry {
    #[serde(rename = "k")]
    pub key: String,
    /// A version of the key stays (young enough, or refused).
    #[serde(rename = "s", default)]
    pub survivor: bool,
    #[serde(rename = "m", default, skip_serializing_if = "Vec::is_empty")]
    pub markers: Vec<String>,
    /// An expired version still to delete.
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

/// How the previous version wrote a sweep's cursor in status.
const LEGACY_PREFIX: &str = "s3:";

impl Cursor {
    /// A cursor as the previous version wrote it in status (`s3:{…}`). Nothing in it needs
    /// checking beyond its types: the markers and the token are the store's own opaque
    /// names, sent as query parameters.
    pub(super) fn legacy(text: &str) -> Option<Self> {
        text.strip_prefix(LEGACY_PREFIX)
            .and_then(|json| serde_json::from_str(json).ok())
    }
}

/// One listed version or delete marker.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Entry {
    pub key: String,
    pub version_id: Option<String>,
    pub last_modified: Option<DateTime<Utc>>,
    pub delete_marker: bool,
    /// The current version of its key.
    pub latest: bool,
}

pub(super) fn to_chrono(t: Option<&aws_sdk_s3::primitives::DateTime>) -> Option<DateTime<Utc>> {
    t.and_then(|t| DateTime::from_timestamp(t.secs(), t.subsec_nanos()))
}

fn version_ids(pairs: &[(String, String)]) -> Result<Vec<ObjectIdentifier>, Error> {
    pairs.iter().map(|(k, v)| object_id(k, Some(v))).collect()
}

/// What a sweep keeps for the subjects a LegalHold holds: every key under one of their
/// prefixes, and every archive under the records prefix that holds one of their records.
#[derive(Clone, Default)]
pub(super) struct Holds {
    pub prefixes: Vec<String>,
    /// The records prefix and one matcher per held subject.
    pub records: Option<(String, Vec<Matcher>)>,
}

impl Holds {
    /// From the target's subject locator and the held subjects (identifiers used literally,
    /// as an erasure uses them).
    pub fn of(job: &SweepJob) -> Result<Self, Error> {
        if job.held.is_empty() {
            return Ok(Self::default());
        }
        let locator = held_subject_locator(&job.target, StoreKind::S3, |s| s.s3())?;
        let mut holds = Self::default();
        for (i, p) in locator.key_prefixes.iter().enumerate() {
            holds.prefixes.extend(job.held.expand_all(
                &format!("subject.s3.keyPrefixes[{i}]"),
                p,
                identifier::exact_forms,
            )?);
        }
        // An empty expansion would hold everything; the locator validation refuses such
        // prefixes, and a held subject whose prefix is empty keeps the whole target anyway.
        if let Some(spec) = &locator.records {
            let mut prefixes = job.held.expand_all(
                "subject.s3.records.prefix",
                &spec.prefix,
                identifier::exact_forms,
            )?;
            prefixes.sort();
            prefixes.dedup();
            let values =
                job.held
                    .expand_all("subject.s3.records.equals", &spec.equals, |t, ids| {
                        identifier::fill(t, ids).map(|f| vec![f])
                    })?;
            let matchers = values
                .iter()
                .map(|v| Matcher::new(&spec.field, v))
                .collect();
            // The records prefix normally has no placeholder; if it has, the shortest common
            // part is what every subject's archives are under.
            let prefix = match prefixes.as_slice() {
                [one] => one.clone(),
                _ => common_prefix(&prefixes),
            };
            holds.records = Some((prefix, matchers));
        }
        Ok(holds)
    }

    /// Under a held subject's prefix.
    pub fn holds_key(&self, key: &str) -> bool {
        self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

fn common_prefix(values: &[String]) -> String {
    let Some(first) = values.first() else {
        return String::new();
    };
    let mut end = first.len();
    for v in &values[1..] {
        end = end.min(
            first
                .char_indices()
                .zip(v.chars())
                .find(|((_, a), b)| a != b)
                .map_or(end.min(v.len()), |((i, _), _)| i),
        );
    }
    first[..end].to_string()
}

/// The time an archive's content was first written, as recorded in its metadata by a
/// rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Recorded {
    /// Never rewritten (or rewritten before times were recorded).
    Absent,
    At(DateTime<Utc>),
    /// There is a value but it is not RFC 3339: not trusted.
    Unreadable,
}

impl Recorded {
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            None => Self::Absent,
            Some(v) => DateTime::parse_from_rfc3339(v.trim())
                .map_or(Self::Unreadable, |t| Self::At(t.with_timezone(&Utc))),
        }
    }

    /// The age to judge a version by: the recorded time where there is one, never later
    /// than `LastModified`; an unreadable one is ignored (the version is judged by
    /// `LastModified`, which keeps it at least as long).
    pub fn judged(self, last_modified: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
        match (self, last_modified) {
            (Self::At(t), Some(m)) => Some(t.min(m)),
            (Self::At(t), None) => Some(t),
            _ => last_modified,
        }
    }

    /// The value a rewrite of a version with this metadata and `LastModified` records: an
    /// existing time is kept (a second rewrite must not make the content younger).
    pub fn for_rewrite(self, last_modified: Option<DateTime<Utc>>) -> Option<String> {
        let time = match self {
            Self::At(_) => self.judged(last_modified),
            Self::Absent | Self::Unreadable => last_modified,
        };
        time.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
    }
}

/// The part of the target's records prefix before its first placeholder: every archive an
/// erasure may rewrite is under it. `None` without a records locator: nothing under the
/// target is ever rewritten.
pub(super) fn rewritable_prefix(target: &Target) -> Option<String> {
    let records = target.subject.as_ref()?.s3()?.records.as_ref()?;
    let end = records.prefix.find('{').unwrap_or(records.prefix.len());
    Some(records.prefix[..end].to_string())
}

/// Whether a listed version must be read (HeadObject) for its recorded age: a data version
/// an erasure may have rewritten (under the records prefix) that is not already expired by
/// its `LastModified`. Everything else is judged from the listing alone.
pub(super) fn needs_recorded_age(
    entry: &Entry,
    rewritable: Option<&str>,
    cutoff: DateTime<Utc>,
) -> bool {
    !entry.delete_marker
        && rewritable.is_some_and(|p| entry.key.starts_with(p))
        && entry.last_modified.is_some_and(|t| t >= cutoff)
}

/// The operator's own objects ([`super::intent::PREFIX`]) are listed only to the operator
/// itself, when it lists that prefix: no sweep or erasure ever selects them.
fn reserved_visible(prefix: &str, key: &str) -> bool {
    !super::intent::is_reserved(key) || super::intent::is_reserved(prefix)
}

/// An object with no LastModified cannot be judged old and is kept.
fn expired(last_modified: Option<DateTime<Utc>>, cutoff: DateTime<Utc>) -> bool {
    last_modified.is_some_and(|t| t < cutoff)
}

/// What to do with one page of versions: a pure function of the page, the carried state and
/// the cutoff, so the decisions are unit-tested without a server.
#[derive(Debug, Default, PartialEq)]
pub(super) struct VersionPlan {
    pub scanned: u64,
    /// Expired data versions, deleted first.
    pub versions: Vec<(String, String)>,
    /// Delete markers of keys with no data version left, deleted once the versions are gone
    /// (and kept if a version is refused).
    pub markers: Vec<(String, String)>,
    pub carry: Option<Carry>,
}

/// Plans one page. `entries` are in listing order (by key); `truncated` says whether the
/// last key may continue on the next page, and `resume_after` is the version the next page
/// starts after (its deletion is deferred).
pub(super) fn plan_versions(
    entries: &[Entry],
    carry: Option<Carry>,
    cutoff: DateTime<Utc>,
    truncated: bool,
    resume_after: Option<&str>,
) -> VersionPlan {
    let mut plan = VersionPlan::default();
    let mut groups: Vec<Carry> = Vec::new();
    let mut carry = carry;
    for entry in entries {
        plan.scanned += 1;
        if groups.last().is_none_or(|g| g.key != entry.key) {
            let start = match carry.take() {
                Some(c) if c.key == entry.key => c,
                Some(c) => {
                    // The carried key ended exactly at the page boundary.
                    groups.push(c);
                    Carry {
                        key: entry.key.clone(),
                        ..Default::default()
                    }
                }
                None => Carry {
                    key: entry.key.clone(),
                    ..Default::default()
                },
            };
            groups.push(start);
        }
        let Some(group) = groups.last_mut() else {
            continue;
        };
        let Some(version_id) = entry.version_id.clone() else {
            continue;
        };
        if entry.delete_marker {
            if group.markers.len() < CARRIED_MARKERS {
                group.markers.push(version_id);
            }
        } else if expired(entry.last_modified, cutoff) {
            if truncated && resume_after == Some(version_id.as_str()) {
                group.pending = Some(version_id);
            } else {
                plan.versions.push((entry.key.clone(), version_id));
            }
        } else {
            group.survivor = true;
        }
    }
    if let Some(c) = carry {
        groups.push(c);
    }
    if truncated {
        plan.carry = groups.pop();
    }
    for group in groups {
        if let Some(pending) = group.pending {
            plan.versions.push((group.key.clone(), pending));
        }
        if !group.survivor {
            plan.markers
                .extend(group.markers.into_iter().map(|m| (group.key.clone(), m)));
        }
    }
    plan
}

/// A step's counts before a page, to take the page back when it is judged again.
struct Judged {
    scanned: u64,
    deleted: u64,
    blocked: u64,
    blocked_items: usize,
    held: u64,
    unjudged: u64,
    oldest_remaining: Option<DateTime<Utc>>,
}

impl Judged {
    fn of(step: &Step<Cursor>) -> Self {
        Self {
            scanned: step.scanned,
            deleted: step.deleted,
            blocked: step.blocked,
            blocked_items: step.blocked_items.len(),
            held: step.held,
            unjudged: step.unjudged,
            oldest_remaining: step.oldest_remaining,
        }
    }

    fn restore(self, step: &mut Step<Cursor>) {
        step.scanned = self.scanned;
        step.deleted = self.deleted;
        step.blocked = self.blocked;
        step.blocked_items.truncate(self.blocked_items);
        step.held = self.held;
        step.unjudged = self.unjudged;
        step.oldest_remaining = self.oldest_remaining;
    }
}

/// Notes the LastModified of an object the sweep leaves in place.
fn keep_oldest(step: &mut Step<Cursor>, modified: Option<DateTime<Utc>>) {
    if let Some(t) = modified {
        step.oldest_remaining = Some(step.oldest_remaining.map_or(t, |o| o.min(t)));
    }
}

impl S3Backend {
    pub(super) async fn sweep(
        &self,
        job: &SweepJob,
        cursor: Option<Cursor>,
        budget: &StepBudget,
    ) -> Result<Step<Cursor>, Error> {
        let prefix = <super::driver::S3Driver as StoreDriver>::selector(&job.target)
            .map(|s| s.prefix.clone())
            .ok_or_else(|| Error::InvalidSpec("target has no s3 selector".into()))?;
        let holds = Holds::of(job)?;
        let mut position = match cursor {
            Some(c) => c,
            None => Cursor {
                versions: self.versioned().await?,
                ..Default::default()
            },
        };
        // A dry run deletes nothing, so it keeps no journal. Otherwise a run's journal is
        // named only when a page is found that would delete, and checkpointed before any
        // batch is written under that name. Until then pages are only judged, as in a dry
        // run: a sweep that finds nothing to delete ends in one step and writes no intent (a
        // checkpoint of an older version without a journal probes the same way).
        let mut journal = position.journal.take().filter(|_| !job.dry_run);
        let probing = journal.is_none() && !job.dry_run;
        // Copied only to probe: the job carries the held subjects' identifiers.
        let judged_only = probing.then(|| SweepJob {
            dry_run: true,
            ..job.clone()
        });
        let page_job = judged_only.as_ref().unwrap_or(job);
        let encode = |position: &Cursor, journal: &Option<super::intent::Journal>| {
            let mut p = position.clone();
            p.journal = journal.clone();
            p
        };
        let mut step = Step::default();
        if let Some(j) = journal.as_mut() {
            // Batches of a step whose outcome was lost are counted now; intents of counted
            // batches are removed.
            // Asked again, not taken from the cursor: a bucket versioned since the sweep
            // started keeps older versions of intents, which only the version listing finds.
            let versioned = self.versioned().await?;
            step.deleted = self.settle_intents(j, versioned).await?;
            if j.settled {
                self.tidy_abandoned_intents(&j.run, versioned).await;
                return Ok(step);
            }
        }
        let deadline = Instant::now() + budget.max_time;
        loop {
            let judged_before = Judged::of(&step);
            let page = if position.versions {
                self.versions_page(
                    page_job,
                    &prefix,
                    &position,
                    &holds,
                    &mut step,
                    budget,
                    journal.as_mut(),
                    probing,
                )
                .await
            } else {
                self.objects_page(
                    page_job,
                    &prefix,
                    &position,
                    &holds,
                    &mut step,
                    budget,
                    journal.as_mut(),
                )
                .await
            };
            if probing && page.is_ok() && step.deleted > judged_before.deleted {
                // The page would delete: it is judged again, for real, under a journal named
                // now and checkpointed first.
                judged_before.restore(&mut step);
                let named = Some(super::intent::Journal {
                    run: crate::backends::redis::ledger::new_run(),
                    ..Default::default()
                });
                step.next = Next::Continue(encode(&position, &named));
                // An instance that no longer leads says so at once, as a page would.
                step.failure = budget.may_act().err();
                return Ok(step);
            }
            match page {
                Ok(Some(next)) => position = next,
                Ok(None) => {
                    match journal.as_mut() {
                        // Done: the next step removes the intents once this is checkpointed.
                        Some(j) => {
                            j.settled = true;
                            step.next = Next::Continue(encode(&position, &journal));
                        }
                        // Nothing was deleted, so no intent of this run was written; those
                        // of runs abandoned long ago still go, as after any job.
                        None if probing => {
                            let versioned = self.versioned().await?;
                            self.tidy_abandoned_intents("", versioned).await;
                        }
                        None => {}
                    }
                    return Ok(step);
                }
                Err(e) => {
                    // The page is retried from its start: what it deleted is gone and is not
                    // counted twice.
                    step.failure = Some(e);
                    step.next = Next::Continue(encode(&position, &journal));
                    return Ok(step);
                }
            }
            if Instant::now() >= deadline || budget.cancel.is_cancelled() {
                step.next = Next::Continue(encode(&position, &journal));
                return Ok(step);
            }
        }
    }

    /// One ListObjectsV2 page: expired objects deleted. Returns where to continue.
    #[allow(clippy::too_many_arguments)]
    async fn objects_page(
        &self,
        job: &SweepJob,
        prefix: &str,
        position: &Cursor,
        holds: &Holds,
        step: &mut Step<Cursor>,
        budget: &StepBudget,
        journal: Option<&mut super::intent::Journal>,
    ) -> Result<Option<Cursor>, Error> {
        let (mut entries, next) = self.list_objects(prefix, position).await?;
        step.scanned += entries.len() as u64;
        entries.retain(|e| {
            let held = holds.holds_key(&e.key);
            if held {
                step.held += 1;
                keep_oldest(step, e.last_modified);
            }
            !held
        });
        self.recorded_ages(&mut entries, job, step).await?;
        let mut doomed = Vec::new();
        for e in &entries {
            if !expired(e.last_modified, job.cutoff) {
                keep_oldest(step, e.last_modified);
            } else if self.archive_held(holds, &e.key, None).await? {
                step.held += 1;
                keep_oldest(step, e.last_modified);
            } else {
                doomed.push(object_id(&e.key, None)?);
            }
        }
        let refused = self
            .delete_counted(doomed, job.dry_run, false, step, budget, journal)
            .await?;
        for r in &refused {
            let modified = entries
                .iter()
                .find(|e| e.key == r.key)
                .and_then(|e| e.last_modified);
            keep_oldest(step, modified);
        }
        Ok(next)
    }

    /// Replaces the `LastModified` of the young versions an erasure may have rewritten with
    /// the time recorded in their metadata (one HeadObject each, several in flight). A value
    /// that does not parse is not trusted: that version is judged by `LastModified` and
    /// counted as unjudged, since its real age is unknown.
    async fn recorded_ages(
        &self,
        entries: &mut [Entry],
        job: &SweepJob,
        step: &mut Step<Cursor>,
    ) -> Result<(), Error> {
        let rewritable = rewritable_prefix(&job.target);
        let wanted: Vec<usize> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| needs_recorded_age(e, rewritable.as_deref(), job.cutoff))
            .map(|(i, _)| i)
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let heads: Vec<Result<(usize, Recorded), Error>> =
            futures::stream::iter(wanted.into_iter().map(|i| {
                let key = entries[i].key.clone();
                let version = entries[i].version_id.clone();
                async move {
                    self.limits.acquire(1).await;
                    match client
                        .head_object()
                        .bucket(&self.config.bucket)
                        .key(key)
                        .set_version_id(version)
                        .send()
                        .await
                    {
                        Ok(head) => Ok((
                            i,
                            Recorded::parse(
                                head.metadata()
                                    .and_then(|m| m.get(ORIGINAL_TIME))
                                    .map(String::as_str),
                            ),
                        )),
                        // Gone since the listing: judged as listed (young, so kept).
                        Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => {
                            Ok((i, Recorded::Absent))
                        }
                        Err(e) => Err(sdk_error(e, "HeadObject")),
                    }
                }
            }))
            .buffered(HEAD_CONCURRENCY)
            .collect()
            .await;
        for head in heads {
            let (i, recorded) = head?;
            let entry = &mut entries[i];
            if recorded == Recorded::Unreadable {
                step.unjudged += 1;
            }
            entry.last_modified = recorded.judged(entry.last_modified);
        }
        Ok(())
    }

    /// Whether an expired archive under the held records prefix holds a held subject's record
    /// (or a line that is not JSON, which cannot be told apart: fail closed). Such an archive
    /// is kept whole while the hold stands.
    async fn archive_held(
        &self,
        holds: &Holds,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<bool, Error> {
        let Some((prefix, matchers)) = &holds.records else {
            return Ok(false);
        };
        if !key.starts_with(prefix.as_str()) {
            return Ok(false);
        }
        for matcher in matchers {
            let counts = self.scan_object(key, version_id, matcher).await?;
            if counts.matched > 0 || counts.malformed > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// One ListObjectsV2 page as entries (no version ids), each key checked against the prefix
    /// again (the selector is never trusted to the server), and the position after it.
    pub(super) async fn list_objects(
        &self,
        prefix: &str,
        position: &Cursor,
    ) -> Result<(Vec<Entry>, Option<Cursor>), Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        let page = client
            .list_objects_v2()
            .bucket(&self.config.bucket)
            .prefix(prefix)
            .max_keys(LIST_PAGE)
            .set_continuation_token(position.token.clone())
            .send()
            .await
            .map_err(|e| sdk_error(e, "ListObjectsV2"))?;
        let entries = page
            .contents()
            .iter()
            .filter_map(|o| {
                let key = o
                    .key()
                    .filter(|k| k.starts_with(prefix) && reserved_visible(prefix, k))?;
                Some(Entry {
                    key: key.to_string(),
                    version_id: None,
                    last_modified: to_chrono(o.last_modified()),
                    delete_marker: false,
                    latest: true,
                })
            })
            .collect();
        let next = match (page.is_truncated(), page.next_continuation_token()) {
            (Some(true), Some(token)) => Some(Cursor {
                token: Some(token.to_string()),
                ..Default::default()
            }),
            (Some(true), None) => {
                return Err(Error::Store(
                    "ListObjectsV2 is truncated but has no continuation token".into(),
                ))
            }
            _ => None,
        };
        Ok((entries, next))
    }

    /// One ListObjectVersions page: expired versions deleted by version id, then the delete
    /// markers left with nothing behind them.
    #[allow(clippy::too_many_arguments)]
    async fn versions_page(
        &self,
        job: &SweepJob,
        prefix: &str,
        position: &Cursor,
        holds: &Holds,
        step: &mut Step<Cursor>,
        budget: &StepBudget,
        mut journal: Option<&mut super::intent::Journal>,
        probing: bool,
    ) -> Result<Option<Cursor>, Error> {
        let (mut entries, next) = self.list_versions(prefix, position).await?;
        // A held subject's keys are left out of the plan: none of their versions or markers
        // is touched.
        let listed = entries.len();
        entries.retain(|e| !holds.holds_key(&e.key));
        let held_out = (listed - entries.len()) as u64;
        step.held += held_out;
        step.scanned += held_out;
        self.recorded_ages(&mut entries, job, step).await?;
        let truncated = next.is_some();
        let resume_after = next.as_ref().and_then(|n| n.version_marker.clone());
        let mut plan = plan_versions(
            &entries,
            position.carry.clone(),
            job.cutoff,
            truncated,
            resume_after.as_deref(),
        );
        step.scanned += plan.scanned;
        if holds.records.is_some() {
            let mut kept = Vec::new();
            for (key, version) in std::mem::take(&mut plan.versions) {
                if self.archive_held(holds, &key, Some(&version)).await? {
                    step.held += 1;
                    kept.push(key);
                } else {
                    plan.versions.push((key, version));
                }
            }
            // A kept version keeps its key's delete markers, like a refused one.
            plan.markers.retain(|(key, _)| !kept.contains(key));
            if let Some(carry) = plan.carry.as_mut() {
                carry.survivor |= kept.contains(&carry.key);
            }
        }
        let versions = version_ids(&plan.versions)?;
        // Probing only asks whether the page would delete anything: a locked version is
        // found refused when the page is judged for real.
        let predict_locks = job.dry_run && !probing && self.object_lock_enabled().await;
        let refused = self
            .delete_counted(
                versions,
                job.dry_run,
                predict_locks,
                step,
                budget,
                journal.as_deref_mut(),
            )
            .await?;
        // A refused version stays, so its key's delete markers must stay too: removing them
        // would make the locked data current again.
        plan.markers
            .retain(|(key, _)| !refused.iter().any(|r| &r.key == key));
        if let Some(carry) = plan.carry.as_mut() {
            carry.survivor |= refused.iter().any(|r| r.key == carry.key);
        }
        let markers = version_ids(&plan.markers)?;
        self.delete_counted(markers, job.dry_run, false, step, budget, journal)
            .await?;
        Ok(next.map(|n| Cursor {
            versions: true,
            carry: plan.carry,
            ..n
        }))
    }

    /// One page of versions and delete markers under `prefix`, in key order, and the
    /// position after it if the listing is truncated.
    pub(super) async fn list_versions(
        &self,
        prefix: &str,
        position: &Cursor,
    ) -> Result<(Vec<Entry>, Option<Cursor>), Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        let page = client
            .list_object_versions()
            .bucket(&self.config.bucket)
            .prefix(prefix)
            .max_keys(LIST_PAGE)
            .set_key_marker(position.key_marker.clone())
            .set_version_id_marker(position.version_marker.clone())
            .send()
            .await
            .map_err(|e| sdk_error(e, "ListObjectVersions"))?;
        let versions = page.versions().iter().map(|v| Entry {
            key: v.key().unwrap_or_default().to_string(),
            version_id: v.version_id().map(str::to_string),
            last_modified: to_chrono(v.last_modified()),
            delete_marker: false,
            latest: v.is_latest().unwrap_or(false),
        });
        let markers = page.delete_markers().iter().map(|m| Entry {
            key: m.key().unwrap_or_default().to_string(),
            version_id: m.version_id().map(str::to_string),
            last_modified: to_chrono(m.last_modified()),
            delete_marker: true,
            latest: m.is_latest().unwrap_or(false),
        });
        let mut entries: Vec<Entry> = versions
            .chain(markers)
            .filter(|e| e.key.starts_with(prefix) && reserved_visible(prefix, &e.key))
            .collect();
        // Stable: within a key the server's newest-first order is kept.
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        if page.is_truncated() != Some(true) {
            return Ok((entries, None));
        }
        let key_marker = page.next_key_marker().ok_or_else(|| {
            Error::Store("ListObjectVersions is truncated but has no next key marker".into())
        })?;
        Ok((
            entries,
            Some(Cursor {
                versions: true,
                key_marker: Some(key_marker.to_string()),
                version_marker: page.next_version_id_marker().map(str::to_string),
                ..Default::default()
            }),
        ))
    }

    /// Deletes (or, in a dry run, counts) and adds to the step's counts; returns the refusals.
    /// A dry run on a bucket with Object Lock reads each version's lock (`predict_locks`), so
    /// that it reports as blocked exactly what the real run will be refused.
    async fn delete_counted(
        &self,
        objects: Vec<ObjectIdentifier>,
        dry_run: bool,
        predict_locks: bool,
        step: &mut Step<Cursor>,
        budget: &StepBudget,
        journal: Option<&mut super::intent::Journal>,
    ) -> Result<Vec<Refusal>, Error> {
        let done = if !dry_run {
            if !objects.is_empty() {
                budget.may_act()?;
                if let Some(journal) = journal {
                    // Written ahead, so a lost outcome of this batch is counted later.
                    self.write_intent(journal, &objects, Vec::new()).await?;
                }
            }
            self.delete_batch(objects).await?
        } else if predict_locks {
            let mut done = super::Deleted::default();
            for object in &objects {
                match self.lock_of(object).await? {
                    Some(reason) => done.refused.push(Refusal {
                        key: object.key().to_string(),
                        reason,
                    }),
                    None => done.deleted += 1,
                }
            }
            done
        } else {
            super::Deleted {
                deleted: objects.len() as u64,
                refused: Vec::new(),
            }
        };
        step.deleted += done.deleted;
        step.blocked += done.refused.len() as u64;
        for refusal in done.refused.iter() {
            if step.blocked_items.len() < NAMED_REFUSALS {
                step.blocked_items
                    .push(format!("{} ({})", refusal.key, refusal.reason));
            }
        }
        Ok(done.refused)
    }

    /// Why the store would refuse to delete this version, if it would.
    async fn lock_of(&self, object: &ObjectIdentifier) -> Result<Option<String>, Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        let head = client
            .head_object()
            .bucket(&self.config.bucket)
            .key(object.key())
            .set_version_id(object.version_id().map(str::to_string))
            .send()
            .await
            .map_err(|e| sdk_error(e, "HeadObject"))?;
        let held = head.object_lock_legal_hold_status()
            == Some(&aws_sdk_s3::types::ObjectLockLegalHoldStatus::On);
        let retained_until = to_chrono(head.object_lock_retain_until_date())
            .filter(|until| *until > Utc::now() && head.object_lock_mode().is_some());
        Ok(match (held, retained_until) {
            (true, _) => Some("Object Lock legal hold".into()),
            (false, Some(until)) => Some(format!("Object Lock retention until {until}")),
            (false, None) => None,
        })
    }

    /// Whether the bucket has Object Lock enabled (a failure to tell counts as no).
    async fn object_lock_enabled(&self) -> bool {
        let Ok(client) = self.client().await else {
            return false;
        };
        self.limits.acquire(1).await;
        client
            .get_object_lock_configuration()
            .bucket(&self.config.bucket)
            .send()
            .await
            .ok()
            .and_then(|out| out.object_lock_configuration().cloned())
            .is_some_and(|c| {
                c.object_lock_enabled() == Some(&aws_sdk_s3::types::ObjectLockEnabled::Enabled)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_never_select_the_operators_intents() {
        for prefix in ["", ".", ".tomb", "logs/"] {
            assert!(
                !reserved_visible(prefix, ".tombstone/intents/0a1b/00000000000000000001"),
                "{prefix:?}"
            );
        }
        assert!(reserved_visible("", "logs/1"));
        assert!(reserved_visible("", ".tombstoned"));
        assert!(reserved_visible(
            ".tombstone/intents/0a1b/",
            ".tombstone/intents/0a1b/00000000000000000001"
        ));
        let c = Cursor {
            journal: Some(super::super::intent::Journal {
                run: "0a1b".into(),
                seq: 7,
                settled: true,
            }),
            ..Default::default()
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#"{"j":{"r":"0a1b","q":7,"z":true}}"#);
        assert_eq!(Cursor::legacy(&format!("s3:{json}")), Some(c));
    }

    fn t(s: &str) -> Option<DateTime<Utc>> {
        Some(s.parse().unwrap())
    }

    fn version(key: &str, id: &str, when: &str) -> Entry {
        Entry {
            key: key.into(),
            version_id: Some(id.into()),
            last_modified: t(when),
            delete_marker: false,
            latest: false,
        }
    }

    fn marker(key: &str, id: &str) -> Entry {
        Entry {
            delete_marker: true,
            ..version(key, id, "2026-01-01T00:00:00Z")
        }
    }

    const OLD: &str = "2026-01-01T00:00:00Z";
    const NEW: &str = "2026-11-20T00:00:00Z";

    fn cutoff() -> DateTime<Utc> {
        "2026-06-01T00:00:00Z".parse().unwrap()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn expired_versions_go_and_markers_only_when_nothing_is_left() {
        let entries = vec![
            marker("a", "a3"),
            version("a", "a2", OLD),
            version("a", "a1", OLD),
            version("b", "b2", NEW),
            marker("b", "bm"),
            version("b", "b1", OLD),
            version("c", "c1", NEW),
        ];
        let plan = plan_versions(&entries, None, cutoff(), false, None);
        assert_eq!(plan.scanned, 7);
        assert_eq!(
            plan.versions,
            pairs(&[("a", "a2"), ("a", "a1"), ("b", "b1")])
        );
        assert_eq!(plan.markers, pairs(&[("a", "a3")]), "b still has data");
        assert_eq!(plan.carry, None);
    }

    #[test]
    fn a_key_across_pages_is_judged_once_all_its_versions_are_seen() {
        // Page 1 ends inside key "a": its marker must wait, and so must the version the
        // listing resumes after.
        let page1 = vec![marker("a", "a3"), version("a", "a2", OLD)];
        let plan1 = plan_versions(&page1, None, cutoff(), true, Some("a2"));
        assert!(plan1.versions.is_empty() && plan1.markers.is_empty());
        let carry = plan1.carry.clone().unwrap();
        assert_eq!(carry.pending.as_deref(), Some("a2"));
        // Page 2: a young version of "a" survives, so its marker stays.
        let page2 = vec![version("a", "a1", NEW), version("b", "b1", OLD)];
        let plan2 = plan_versions(&page2, Some(carry.clone()), cutoff(), false, None);
        assert_eq!(plan2.versions, pairs(&[("b", "b1"), ("a", "a2")]));
        assert!(plan2.markers.is_empty());
        // Page 2 instead starts with another key: "a" is complete and orphaned.
        let page2 = vec![version("b", "b1", NEW)];
        let plan2 = plan_versions(&page2, Some(carry), cutoff(), false, None);
        assert_eq!(plan2.versions, pairs(&[("a", "a2")]));
        assert_eq!(plan2.markers, pairs(&[("a", "a3")]));
    }

    #[test]
    fn a_carried_key_at_the_end_of_the_listing_is_completed() {
        let carry = Carry {
            key: "z".into(),
            survivor: false,
            markers: vec!["zm".into()],
            pending: Some("z1".into()),
        };
        let plan = plan_versions(&[], Some(carry), cutoff(), false, None);
        assert_eq!(plan.versions, pairs(&[("z", "z1")]));
        assert_eq!(plan.markers, pairs(&[("z", "zm")]));
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = Cursor {
            versions: true,
            key_marker: Some("logs/a".into()),
            version_marker: Some("v1".into()),
            carry: Some(Carry {
                key: "logs/a".into(),
                survivor: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Cursor>(&json).unwrap(), c);
        assert_eq!(Cursor::legacy(&format!("s3:{json}")), Some(c));
        assert_eq!(Cursor::legacy("0:1234"), None);
        assert_eq!(Cursor::legacy("s3:{"), None);
    }

    #[test]
    fn a_recorded_original_time_makes_a_rewritten_archive_old_and_garbage_is_not_trusted() {
        let rewritten = t(NEW);
        assert_eq!(Recorded::parse(None), Recorded::Absent);
        assert_eq!(Recorded::parse(Some("not a time")), Recorded::Unreadable);
        assert_eq!(Recorded::parse(Some("1735689600")), Recorded::Unreadable);
        let old = Recorded::parse(Some("2026-01-01T00:00:00Z"));
        assert_eq!(old, Recorded::At(t(OLD).unwrap()));
        assert_eq!(old.judged(rewritten), t(OLD));
        assert!(expired(old.judged(rewritten), cutoff()));
        // Unreadable or absent: judged by LastModified, so the young archive is kept.
        for r in [Recorded::Absent, Recorded::Unreadable] {
            assert_eq!(r.judged(rewritten), rewritten);
            assert!(!expired(r.judged(rewritten), cutoff()));
        }
        // A recorded time cannot make a version younger than its LastModified.
        let later = Recorded::parse(Some("2027-01-01T00:00:00+01:00"));
        assert_eq!(later.judged(rewritten), rewritten);
    }

    #[test]
    fn a_second_rewrite_keeps_the_first_recorded_time() {
        let first = Recorded::Absent.for_rewrite(t(OLD)).unwrap();
        assert_eq!(first, "2026-01-01T00:00:00Z");
        // The second rewrite reads a version whose LastModified is the first rewrite's.
        let second = Recorded::parse(Some(&first)).for_rewrite(t(NEW));
        assert_eq!(second.as_deref(), Some("2026-01-01T00:00:00Z"));
        // Garbage is replaced by the LastModified of the version read.
        let fixed = Recorded::parse(Some("soon")).for_rewrite(t(NEW));
        assert_eq!(fixed.as_deref(), Some("2026-11-20T00:00:00Z"));
        assert_eq!(Recorded::Absent.for_rewrite(None), None);
    }

    fn records_target(prefix: &str, records: Option<&str>) -> Target {
        let mut t = serde_json::json!({
            "name": "archive", "store": "archive", "s3": {"prefix": prefix}
        });
        if let Some(r) = records {
            t["subject"] = serde_json::json!({"s3": {"records": {
                "prefix": r, "field": "to", "equals": "{email}"
            }}});
        }
        serde_json::from_value(t).unwrap()
    }

    #[test]
    fn only_young_data_versions_under_the_records_prefix_are_read_for_their_age() {
        assert_eq!(rewritable_prefix(&records_target("logs/", None)), None);
        assert_eq!(
            rewritable_prefix(&records_target("logs/", Some("logs/mail/"))).as_deref(),
            Some("logs/mail/")
        );
        assert_eq!(
            rewritable_prefix(&records_target("logs/", Some("logs/{userId}/"))).as_deref(),
            Some("logs/")
        );
        let rewritable = rewritable_prefix(&records_target("logs/", Some("logs/mail/")));
        let rewritable = rewritable.as_deref();
        let young = version("logs/mail/a.jsonl", "1", NEW);
        assert!(needs_recorded_age(&young, rewritable, cutoff()));
        // Expired by LastModified already: the listing decides.
        let old = version("logs/mail/b.jsonl", "1", OLD);
        assert!(!needs_recorded_age(&old, rewritable, cutoff()));
        // Outside the records prefix nothing is ever rewritten.
        for key in ["logs/app/a.jsonl", "logs/mai", "logs/mailer.jsonl"] {
            assert!(!needs_recorded_age(
                &version(key, "1", NEW),
                rewritable,
                cutoff()
            ));
        }
        // No records locator: no HeadObject at all.
        assert!(!needs_recorded_age(&young, None, cutoff()));
        // Delete markers and versions without a time are never read.
        let young_marker = Entry {
            delete_marker: true,
            ..young.clone()
        };
        assert!(!needs_recorded_age(&young_marker, rewritable, cutoff()));
        let timeless = Entry {
            last_modified: None,
            ..young.clone()
        };
        assert!(!needs_recorded_age(&timeless, rewritable, cutoff()));
    }

    #[test]
    fn held_prefixes_of_several_subjects_share_their_common_start() {
        assert_eq!(
            common_prefix(&["logs/a/".into(), "logs/b/".into()]),
            "logs/"
        );
        assert_eq!(common_prefix(&["logs/".into()]), "logs/");
        assert_eq!(common_prefix(&[]), "");
        assert_eq!(common_prefix(&["é/x".into(), "é/y".into()]), "é/");
    }
}
