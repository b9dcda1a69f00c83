//! One data subject in a bucket: every object and version under the subject's key prefixes,
//! and the subject's records inside JSON-lines archives.
//!
//! Counts are of copies of personal data: each object version (and delete marker) under a key
//! prefix, and each matching record in each version of an archive. Find, Erase and Verify
//! count the same way, so a dry run's count is what the real run erases.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ObjectIdentifier;
use tokio_util::io::SyncIoBridge;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::records::{self, Counts, Matcher};
use super::sweep::{Cursor, Entry, Recorded, ORIGINAL_TIME};
use super::{object_id, sdk_error, S3Backend};
use crate::api::retentionpolicy::UnparsedLines;
use crate::api::StoreKind;
use crate::backends::identifier;
use crate::backends::template;
use crate::backends::{
    subject_locator, Error, LockedCopies, Next, StepBudget, SubjectAction, SubjectJob, SubjectStep,
};

/// Attempts at a conditional write before giving up on an archive that keeps changing.
pub(super) const WRITE_ATTEMPTS: u32 = 5;

/// Running totals of one subject step, from those the cursor carried.
#[derive(Default)]
struct Tally {
    count: u64,
    blocked: u64,
    malformed: u64,
    /// Objects (key, and whether an older version) with lines that are not JSON but hold
    /// the identifier, and how many, found in this step.
    unparsed: Vec<(String, bool, u64)>,
    /// Such lines and objects found in earlier steps (only counted: a cursor holds no key).
    earlier_lines: u64,
    earlier_objects: u64,
}

/// How many archive objects with unparsed copies a message names.
pub(super) const NAMED_OBJECTS: usize = 5;

/// The phases of a subject step, in order.
const PREFIXES: u8 = 0;
/// Erase only: every current archive rewritten without the subject's records.
const REWRITE: u8 = 1;
/// Every version of every archive read: counted (find, verify), or, if it is an older
/// version still holding records, deleted (erase).
const VERSIONS: u8 = 2;

/// How the previous version wrote a cursor in status.
const LEGACY_PREFIX: &str = "s3-subject:";

/// Where a subject step resumes, and the totals so far (the engine keeps only the cursor of
/// an unfinished step, so a finished step reports the whole count).
///
/// The listing position is not a key or a ListObjectVersions marker: keys under a
/// subject's prefix (`users/{userId}/…`) hold the identifier, and a cursor lives in status.
/// It is the number of entries of the current prefix's listing already dealt with that are
/// still listed, counted apart for versions and for delete markers (each in the listing's
/// own order, whatever its pages): a resumed step lists from the start and passes over
/// them. Erasing deletes what it deals with, so for an erase these are the versions the
/// store refused to delete. Version ids are the store's own opaque names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Position {
    /// The action (`f`, `e`, `v`): a cursor of another action starts over.
    #[serde(rename = "a")]
    action: String,
    #[serde(rename = "p", default)]
    phase: u8,
    /// The index of the prefix (of the phase's list) being worked on.
    #[serde(rename = "u", default)]
    unit: usize,
    #[serde(rename = "sv", default)]
    skip: u64,
    #[serde(rename = "sm", default)]
    skip_markers: u64,
    #[serde(rename = "c", default)]
    count: u64,
    #[serde(rename = "b", default)]
    blocked: u64,
    #[serde(rename = "m", default)]
    malformed: u64,
    #[serde(rename = "ul", default)]
    unparsed_lines: u64,
    #[serde(rename = "uo", default)]
    unparsed_objects: u64,
    /// Versions an archive rewrite replaced that the store refused to delete (Object
    /// Lock): already counted, so the versions pass leaves them alone.
    #[serde(rename = "k", default, skip_serializing_if = "Vec::is_empty")]
    kept: Vec<String>,
    /// An erase of archive records: its run, named in the metadata of every archive it
    /// rewrites with how many records it dropped there ([`DROPPED`]), so that a step
    /// repeating a lost one counts what that one dropped. Random, never an identifier.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    run: Option<String>,
    /// An erase's write-ahead intents ([`super::intent`]), one before each counted
    /// `DeleteObjects` batch (key-prefix objects, older archive versions holding records),
    /// so that what a batch of a step whose outcome was lost deleted is counted by the
    /// step that resumes. Named, and checkpointed, before the first batch.
    #[serde(rename = "j", default, skip_serializing_if = "Option::is_none")]
    journal: Option<super::intent::Journal>,
}

/// User metadata (sent as `x-amz-meta-tombstone-dropped`) in which a rewritten archive
/// records which erasure runs dropped how many records from it: `run:n`, newest first, a few
/// runs at most, within the 2 KB S3 allows for all user metadata.
pub(super) const DROPPED: &str = "tombstone-dropped";
/// Runs kept in [`DROPPED`] besides the newest.
const DROPPED_EARLIER: usize = 4;
/// What S3 allows for all user metadata of an object (keys and values), in bytes.
const METADATA_LIMIT: usize = 2048;

/// How many records `run` dropped, as recorded in a [`DROPPED`] value (0 if it did not).
pub(super) fn dropped_by(value: Option<&str>, run: &str) -> u64 {
    value
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter_map(|entry| entry.trim().split_once(':'))
        .filter(|(r, _)| *r == run)
        .filter_map(|(_, n)| n.parse::<u64>().ok())
        .fold(0, u64::saturating_add)
}

/// The [`DROPPED`] value after `run` dropped (in all) `n` records: its entry first, then up
/// to [`DROPPED_EARLIER`] entries of other runs, as many as fit in `room` bytes. None when
/// not even the run's own entry fits.
fn dropped_value(earlier: Option<&str>, run: &str, n: u64, room: usize) -> Option<String> {
    let mut value = format!("{run}:{n}");
    if value.len() > room {
        return None;
    }
    let others = earlier
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| {
            e.split_once(':')
                .is_some_and(|(r, c)| r != run && !r.is_empty() && c.parse::<u64>().is_ok())
        })
        .take(DROPPED_EARLIER);
    for entry in others {
        if value.len() + 1 + entry.len() > room {
            break;
        }
        value.push(',');
        value.push_str(entry);
    }
    Some(value)
}

/// Records in `metadata` that `run` dropped `n` records in all, within the metadata limit
/// (an archive whose other metadata leaves no room goes without the record).
pub(super) fn record_dropped(
    metadata: &mut std::collections::HashMap<String, String>,
    run: &str,
    n: u64,
) {
    let earlier = metadata.remove(DROPPED);
    let used: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    let room = METADATA_LIMIT.saturating_sub(used.saturating_add(DROPPED.len()));
    if let Some(value) = dropped_value(earlier.as_deref(), run, n, room) {
        metadata.insert(DROPPED.to_string(), value);
    }
}

pub(super) fn action_code(action: SubjectAction) -> &'static str {
    match action {
        SubjectAction::Find => "f",
        SubjectAction::Erase => "e",
        SubjectAction::Verify => "v",
    }
}

impl Position {
    fn start(action: SubjectAction) -> Self {
        Self {
            action: action_code(action).into(),
            ..Self::default()
        }
    }

    /// A cursor as the previous version wrote it in status (`s3-subject:{…}`); not yet
    /// checked ([`Position::validate`] is, before a step uses it).
    pub(super) fn legacy(text: &str) -> Option<Self> {
        text.strip_prefix(LEGACY_PREFIX)
            .and_then(|json| serde_json::from_str(json).ok())
    }

    /// Refuses what a cursor the steps write never holds (it is read back from status).
    pub(super) fn validate(&self) -> Result<(), Error> {
        if !["f", "e", "v"].contains(&self.action.as_str()) || self.phase > VERSIONS {
            return Err(Error::InvalidSpec(
                "checkpoint cursor is not an S3 subject cursor".into(),
            ));
        }
        Ok(())
    }

    /// Where a step for `action` resumes: one of another action starts over.
    fn resume(cursor: Option<Self>, action: SubjectAction) -> Self {
        match cursor {
            Some(p) if p.action == action_code(action) => p,
            _ => Self::start(action),
        }
    }

    fn next_unit(&mut self) {
        self.unit += 1;
        self.skip = 0;
        self.skip_markers = 0;
    }

    fn next_phase(&mut self) {
        self.phase += 1;
        self.unit = 0;
        self.skip = 0;
        self.skip_markers = 0;
    }
}

/// One prefix's listing within a step: the page position, and the entries already dealt
/// with in earlier steps still to pass over.
#[derive(Default)]
pub(super) struct Walk {
    pub listing: Cursor,
    pub skip: u64,
    pub skip_markers: u64,
    /// Erase, versioned: the version the listing resumes after, deleted once the listing
    /// is done or the step ends (some servers cannot resume after a version that no longer
    /// exists).
    pub deferred: Vec<ObjectIdentifier>,
}

impl Walk {
    fn at(pos: &Position) -> Self {
        Self {
            skip: pos.skip,
            skip_markers: pos.skip_markers,
            ..Self::default()
        }
    }

    /// The entries of a page not dealt with yet.
    pub fn fresh(&mut self, entries: Vec<Entry>) -> Vec<Entry> {
        entries
            .into_iter()
            .filter(|e| {
                let left = if e.delete_marker {
                    &mut self.skip_markers
                } else {
                    &mut self.skip
                };
                if *left > 0 {
                    *left -= 1;
                    false
                } else {
                    true
                }
            })
            .collect()
    }
}

/// When a step hands back control: once it did some work and its time is spent, or as soon
/// as it is cancelled.
pub(super) struct Clock<'a> {
    pub budget: &'a StepBudget,
    pub deadline: Instant,
    pub worked: bool,
}

impl Clock<'_> {
    pub fn stop(&self) -> bool {
        self.budget.cancel.is_cancelled() || (self.worked && Instant::now() >= self.deadline)
    }
}

/// The records locator, ready to run.
struct Records {
    prefixes: Vec<String>,
    matcher: Matcher,
    not_distinctive: Option<identifier::NotDistinctive>,
    drop: bool,
}

impl S3Backend {
    /// One bounded step: key prefixes page by page, then (erase) archives rewritten one by
    /// one, then archive versions read one by one, until done, the step's time is spent or
    /// it is cancelled; never in the middle of an archive's rewrite. A failure after some
    /// progress is returned with the cursor of what was done, so counts are kept.
    pub(super) async fn subject(
        &self,
        job: &SubjectJob,
        cursor: Option<Position>,
        budget: &StepBudget,
    ) -> Result<SubjectStep<Position>, Error> {
        let locator = subject_locator(&job.target, StoreKind::S3, |s| s.s3())?;
        let mut skipped = Vec::new();
        let mut ran = false;
        let mut prefixes = Vec::new();
        for (i, t) in locator.key_prefixes.iter().enumerate() {
            if let Some(forms) = expand(&format!("keyPrefixes[{i}]"), t, job, &mut skipped)? {
                ran = true;
                prefixes.extend(forms);
            }
        }
        let mut records = None;
        if let Some(spec) = &locator.records {
            let forms = expand("records.prefix", &spec.prefix, job, &mut skipped)?;
            let equals = fill_equals(&spec.equals, job, &mut skipped)?;
            if let (Some(forms), Some(equals)) = (forms, equals) {
                ran = true;
                // Lines that are not JSON are only dropped when the value can be told apart
                // from other text (the same rule as a Loki line filter's bare placeholder).
                let distinctive = equals.check_distinctive();
                let drop = spec.unparsed_lines == UnparsedLines::DropMatching;
                let matcher = Matcher::new(&spec.field, &equals)
                    .dropping_unparsed(drop && distinctive.is_ok());
                records = Some(Records {
                    prefixes: forms,
                    matcher,
                    not_distinctive: distinctive.err(),
                    drop,
                });
            }
        }
        let first_step = cursor.is_none();
        let mut pos = Position::resume(cursor, job.action);
        let erase = job.action == SubjectAction::Erase;
        let unnamed = (records.is_some() && pos.run.is_none()) || pos.journal.is_none();
        if erase && unnamed {
            if records.is_some() && pos.run.is_none() {
                pos.run = Some(crate::backends::redis::ledger::new_run());
            }
            if pos.journal.is_none() {
                pos.journal = Some(super::intent::Journal {
                    run: crate::backends::redis::ledger::new_run(),
                    ..Default::default()
                });
            }
            if first_step {
                // The run and the journal are checkpointed before any archive is rewritten or
                // any intent written under their names, so that a step repeating a lost one
                // knows its own rewrites and batches. Nothing erased yet, but an instance
                // that no longer leads does not start.
                budget.may_act()?;
                return Ok(SubjectStep {
                    count: 0,
                    blocked: 0,
                    malformed: 0,
                    ran,
                    skipped,
                    next: Next::Continue(pos.clone()),
                    failure: None,
                    notices: Vec::new(),
                });
            }
        }
        let versioned = self.versioned().await?;
        let mut lost = 0u64;
        if let Some(journal) = pos.journal.as_mut().filter(|_| erase) {
            // Batches of a step whose outcome was lost are counted now; intents of counted
            // batches are removed.
            lost = self.settle_intents(journal, versioned).await?;
        }
        let settled = erase && pos.journal.as_ref().is_some_and(|j| j.settled);
        pos.count = pos.count.saturating_add(lost);
        let mut tally = Tally {
            count: pos.count,
            blocked: pos.blocked,
            malformed: pos.malformed,
            unparsed: Vec::new(),
            earlier_lines: pos.unparsed_lines,
            earlier_objects: pos.unparsed_objects,
        };
        let mut clock = Clock {
            budget,
            deadline: Instant::now() + budget.max_time,
            worked: false,
        };
        let mut walk = Walk::at(&pos);
        // Archive versions replaced (rewrite) or to delete (versions pass) in this step.
        let mut replaced: Vec<(String, String)> = Vec::new();
        // Older archive versions to delete, each with the subject's records it holds.
        let mut doomed: Vec<(ObjectIdentifier, u64)> = Vec::new();
        let run = if settled {
            // Everything is done and counted; the intents are removed (above).
            if let Some(j) = &pos.journal {
                self.tidy_abandoned_intents(&j.run, versioned).await;
            }
            Ok(true)
        } else {
            self.subject_phases(
                job,
                versioned,
                &prefixes,
                records.as_ref(),
                &mut pos,
                &mut walk,
                &mut clock,
                &mut tally,
                &mut replaced,
                &mut doomed,
            )
            .await
        };
        // What this step left to delete is deleted before it returns: the next step lists
        // afresh.
        let flushed = self
            .flush(
                &mut pos,
                &mut walk,
                &mut tally,
                &mut replaced,
                &mut doomed,
                budget,
            )
            .await;
        let (mut finished, failure) = match (run, flushed) {
            (Ok(finished), Ok(())) => (finished, None),
            (Err(e), _) | (Ok(_), Err(e)) => (false, Some(e)),
        };
        if let Some(journal) = pos.journal.as_mut().filter(|j| finished && !j.settled) {
            if journal.seq > 0 {
                // Done: one more step removes this run's intents once this is checkpointed.
                journal.settled = true;
                finished = false;
            }
        }
        let failure = match (&failure, &records) {
            (None, Some(r)) if finished => {
                unparsed_failure(job, &tally, r.not_distinctive.clone(), r.drop)
            }
            _ => failure,
        };
        pos.count = tally.count;
        pos.blocked = tally.blocked;
        pos.malformed = tally.malformed;
        pos.unparsed_lines = tally
            .earlier_lines
            .saturating_add(tally.unparsed.iter().map(|(_, _, n)| n).sum());
        pos.unparsed_objects = tally
            .earlier_objects
            .saturating_add(tally.unparsed.len() as u64);
        // As every driver's: an unfinished step reports nothing, the finished one the whole
        // counts (the running totals travel in the cursor).
        let whole = |n: u64| if finished { n } else { 0 };
        Ok(SubjectStep {
            count: whole(tally.count),
            blocked: whole(tally.blocked),
            malformed: whole(tally.malformed),
            ran,
            skipped,
            next: if finished {
                Next::Done
            } else {
                Next::Continue(pos.clone())
            },
            failure,
            notices: Vec::new(),
        })
    }

    /// Works through the phases from `pos`; true once all are done.
    #[allow(clippy::too_many_arguments)]
    async fn subject_phases(
        &self,
        job: &SubjectJob,
        versioned: bool,
        prefixes: &[String],
        records: Option<&Records>,
        pos: &mut Position,
        walk: &mut Walk,
        clock: &mut Clock<'_>,
        tally: &mut Tally,
        replaced: &mut Vec<(String, String)>,
        doomed: &mut Vec<(ObjectIdentifier, u64)>,
    ) -> Result<bool, Error> {
        let erase = job.action == SubjectAction::Erase;
        loop {
            let (list, skip_phase) = match pos.phase {
                PREFIXES => (prefixes, false),
                REWRITE => (
                    records.map_or(&[][..], |r| &r.prefixes[..]),
                    !erase || records.is_none(),
                ),
                _ => (
                    records.map_or(&[][..], |r| &r.prefixes[..]),
                    records.is_none() || (erase && !versioned),
                ),
            };
            let Some(prefix) = list.get(pos.unit).filter(|_| !skip_phase) else {
                if pos.phase == REWRITE {
                    self.flush(pos, walk, tally, replaced, doomed, clock.budget)
                        .await?;
                }
                if pos.phase >= VERSIONS {
                    return Ok(true);
                }
                pos.next_phase();
                *walk = Walk::default();
                continue;
            };
            if clock.stop() {
                return Ok(false);
            }
            let done = match pos.phase {
                PREFIXES => {
                    let budget = clock.budget;
                    self.prefix_page(
                        prefix,
                        versioned,
                        job.action,
                        pos,
                        walk,
                        tally,
                        budget,
                        &mut clock.worked,
                    )
                    .await?
                }
                REWRITE => {
                    let Some(r) = records else { return Ok(true) };
                    self.rewrite_archives(prefix, &r.matcher, pos, walk, clock, tally, replaced)
                        .await?
                }
                _ => {
                    let Some(r) = records else { return Ok(true) };
                    self.archive_versions(
                        prefix, &r.matcher, versioned, job.action, pos, walk, clock, tally, doomed,
                    )
                    .await?
                }
            };
            if !done && pos.phase == PREFIXES {
                // One page done: the clock says whether the next one is.
                continue;
            }
            if !done {
                return Ok(false);
            }
            self.flush(pos, walk, tally, replaced, doomed, clock.budget)
                .await?;
            pos.next_unit();
            *walk = Walk::default();
        }
    }

    /// Deletes what the step has left to delete: the version a prefix listing resumes
    /// after, archive versions a rewrite replaced (refusals are remembered, by version id),
    /// older archive versions holding records (those deleted no longer count as listed).
    async fn flush(
        &self,
        pos: &mut Position,
        walk: &mut Walk,
        tally: &mut Tally,
        replaced: &mut Vec<(String, String)>,
        doomed: &mut Vec<(ObjectIdentifier, u64)>,
        budget: &StepBudget,
    ) -> Result<(), Error> {
        if !walk.deferred.is_empty() {
            budget.may_act()?;
            let done = self
                .delete_journalled(
                    pos.journal.as_mut(),
                    std::mem::take(&mut walk.deferred),
                    Vec::new(),
                )
                .await?;
            tally.count += done.deleted;
            tally.blocked += done.refused.len() as u64;
            pos.skip += done.refused.len() as u64;
        }
        if !replaced.is_empty() {
            budget.may_act()?;
            let versions = std::mem::take(replaced);
            let mut ids = Vec::with_capacity(versions.len());
            for (key, version) in &versions {
                ids.push(object_id(key, Some(version))?);
            }
            let done = self.delete_batch(ids).await?;
            tally.blocked += done.refused.len() as u64;
            for (key, version) in versions {
                if done.refused.iter().any(|r| r.key == key) {
                    pos.kept.push(version);
                }
            }
        }
        if !doomed.is_empty() {
            budget.may_act()?;
            // Their records were counted when they were read: a lost step's are counted
            // from the intent.
            let (ids, weights): (Vec<_>, Vec<_>) = std::mem::take(doomed).into_iter().unzip();
            let done = self
                .delete_journalled(pos.journal.as_mut(), ids, weights)
                .await?;
            tally.blocked += done.refused.len() as u64;
            pos.skip = pos.skip.saturating_sub(done.deleted);
        }
        Ok(())
    }

    /// One listing page of objects, versions and delete markers under a key prefix:
    /// counted, or deleted. True once the prefix is done.
    #[allow(clippy::too_many_arguments)]
    async fn prefix_page(
        &self,
        prefix: &str,
        versioned: bool,
        action: SubjectAction,
        pos: &mut Position,
        walk: &mut Walk,
        tally: &mut Tally,
        budget: &StepBudget,
        worked: &mut bool,
    ) -> Result<bool, Error> {
        let (entries, next) = if versioned {
            self.list_versions(prefix, &walk.listing).await?
        } else {
            self.list_objects(prefix, &walk.listing).await?
        };
        // A page passed over whole (done by earlier steps) is no work: the step goes on.
        let entries = walk.fresh(entries);
        *worked |= !entries.is_empty();
        if action == SubjectAction::Erase {
            let resume_after = next
                .as_ref()
                .map(|n| (n.key_marker.as_deref(), n.version_marker.as_deref()));
            let mut now = Vec::with_capacity(entries.len());
            for e in &entries {
                let id = object_id(&e.key, e.version_id.as_deref())?;
                if versioned
                    && resume_after == Some((Some(e.key.as_str()), e.version_id.as_deref()))
                {
                    walk.deferred.push(id);
                } else {
                    now.push(id);
                }
            }
            if !now.is_empty() {
                budget.may_act()?;
            }
            let done = self
                .delete_journalled(pos.journal.as_mut(), now, Vec::new())
                .await?;
            tally.count += done.deleted;
            tally.blocked += done.refused.len() as u64;
            // Delete markers are never refused: what is refused is a version, still listed.
            pos.skip += done.refused.len() as u64;
        } else {
            tally.count += entries.len() as u64;
            let markers = entries.iter().filter(|e| e.delete_marker).count() as u64;
            pos.skip_markers += markers;
            pos.skip += entries.len() as u64 - markers;
        }
        match next {
            Some(n) => {
                walk.listing = n;
                Ok(false)
            }
            None => Ok(true),
        }
    }

    /// Rewrites the current archives under `prefix` one by one, from where the cursor
    /// stands, until the prefix is done (true) or the step's time is spent. Rewriting
    /// leaves the listing as it was, so the position is the number of archives done.
    #[allow(clippy::too_many_arguments)]
    async fn rewrite_archives(
        &self,
        prefix: &str,
        matcher: &Matcher,
        pos: &mut Position,
        walk: &mut Walk,
        clock: &mut Clock<'_>,
        tally: &mut Tally,
        replaced: &mut Vec<(String, String)>,
    ) -> Result<bool, Error> {
        loop {
            let (entries, next) = self.list_objects(prefix, &walk.listing).await?;
            for entry in walk.fresh(entries) {
                if clock.stop() {
                    return Ok(false);
                }
                clock.worked = true;
                clock.budget.may_act()?;
                let run = pos.run.clone().unwrap_or_default();
                let rewrite = self.rewrite_current(&entry.key, matcher, &run).await?;
                // What a lost step of this run dropped from this archive is counted now.
                tally.count += copies(&rewrite.counts, matcher).saturating_add(rewrite.earlier);
                tally.malformed += rewrite.counts.malformed;
                if rewrite.counts.unparsed > 0 {
                    tally
                        .unparsed
                        .push((entry.key.clone(), false, rewrite.counts.unparsed));
                }
                if let Some(v) = rewrite.replaced_version {
                    replaced.push((entry.key.clone(), v));
                }
                pos.skip += 1;
            }
            match next {
                Some(n) => walk.listing = n,
                None => return Ok(true),
            }
        }
    }

    /// Reads every version of every archive under `prefix` one by one (counted; an erase
    /// deletes the older versions still holding records, and leaves the current ones, just
    /// rewritten, and the replaced versions the store kept), until the prefix is done
    /// (true) or the step's time is spent. The position counts versions (delete markers
    /// are passed over).
    #[allow(clippy::too_many_arguments)]
    async fn archive_versions(
        &self,
        prefix: &str,
        matcher: &Matcher,
        versioned: bool,
        action: SubjectAction,
        pos: &mut Position,
        walk: &mut Walk,
        clock: &mut Clock<'_>,
        tally: &mut Tally,
        doomed: &mut Vec<(ObjectIdentifier, u64)>,
    ) -> Result<bool, Error> {
        loop {
            let (entries, next) = if versioned {
                self.list_versions(prefix, &walk.listing).await?
            } else {
                self.list_objects(prefix, &walk.listing).await?
            };
            for entry in walk.fresh(entries) {
                if entry.delete_marker {
                    continue;
                }
                if clock.stop() {
                    return Ok(false);
                }
                let version = entry.version_id.as_deref();
                let kept = version.is_some_and(|v| pos.kept.iter().any(|k| k == v));
                if action == SubjectAction::Erase && (entry.latest || kept) {
                    pos.skip += 1;
                    continue;
                }
                clock.worked = true;
                let counts = self.scan_object(&entry.key, version, matcher).await?;
                tally.malformed += counts.malformed;
                if counts.unparsed > 0 {
                    tally
                        .unparsed
                        .push((entry.key.clone(), !entry.latest, counts.unparsed));
                }
                let copies = copies(&counts, matcher);
                if copies > 0 {
                    tally.count += copies;
                    if action == SubjectAction::Erase {
                        doomed.push((object_id(&entry.key, version)?, copies));
                    }
                }
                pos.skip += 1;
            }
            match next {
                Some(n) => walk.listing = n,
                None => return Ok(true),
            }
        }
    }

    /// The subject's copies in versions under Object Lock (retention not yet lapsed, or a
    /// legal hold), counted as Verify counts them: each version under a key prefix, each
    /// matching record in an archive version. Never the keys: only counts and dates.
    pub(super) async fn subject_locked_copies(
        &self,
        job: &SubjectJob,
    ) -> Result<LockedCopies, Error> {
        let mut locked = LockedCopies::default();
        let Some(locator) = job.target.subject.as_ref().and_then(|s| s.s3()) else {
            return Ok(locked);
        };
        if !self.versioned().await? {
            return Ok(locked);
        }
        let mut skipped = Vec::new();
        let mut prefixes = Vec::new();
        for (i, t) in locator.key_prefixes.iter().enumerate() {
            if let Some(forms) = expand(&format!("keyPrefixes[{i}]"), t, job, &mut skipped)? {
                prefixes.extend(forms.into_iter().map(|p| (p, None)));
            }
        }
        if let Some(spec) = &locator.records {
            let forms = expand("records.prefix", &spec.prefix, job, &mut skipped)?;
            let equals = fill_equals(&spec.equals, job, &mut skipped)?;
            if let (Some(forms), Some(equals)) = (forms, equals) {
                let matcher = Matcher::new(&spec.field, &equals);
                prefixes.extend(forms.into_iter().map(|p| (p, Some(matcher.clone()))));
            }
        }
        for (prefix, matcher) in prefixes {
            let mut position = Cursor::default();
            loop {
                let (entries, next) = self.list_versions(&prefix, &position).await?;
                for entry in entries.iter().filter(|e| !e.delete_marker) {
                    let version = entry.version_id.as_deref();
                    let Some((until, held)) = self.lock_state(&entry.key, version).await? else {
                        continue;
                    };
                    let copies = match &matcher {
                        None => 1,
                        Some(m) => self.scan_object(&entry.key, version, m).await?.matched,
                    };
                    if copies > 0 {
                        locked.add(copies, until, held);
                    }
                }
                match next {
                    Some(n) => position = n,
                    None => break,
                }
            }
        }
        Ok(locked)
    }

    /// A version's Object Lock, if one is in force now: (retain-until, legal hold).
    async fn lock_state(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<Option<(Option<chrono::DateTime<chrono::Utc>>, bool)>, Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        let head = client
            .head_object()
            .bucket(&self.config.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_string))
            .send()
            .await
            .map_err(|e| sdk_error(e, "HeadObject"))?;
        let held = head.object_lock_legal_hold_status()
            == Some(&aws_sdk_s3::types::ObjectLockLegalHoldStatus::On);
        let until = super::sweep::to_chrono(head.object_lock_retain_until_date())
            .filter(|u| *u > chrono::Utc::now() && head.object_lock_mode().is_some());
        Ok((held || until.is_some()).then_some((until, held)))
    }

    /// Counts the subject's records in one object (version), streaming it.
    pub(super) async fn scan_object(
        &self,
        key: &str,
        version_id: Option<&str>,
        matcher: &Matcher,
    ) -> Result<Counts, Error> {
        Ok(self.scan_filter(key, version_id, matcher.clone()).await?.0)
    }

    /// Runs `filter` over one object (version), streaming it; gives back the counts and
    /// the filter (with what it tallied).
    pub(super) async fn scan_filter<F: records::Filter + Send + 'static>(
        &self,
        key: &str,
        version_id: Option<&str>,
        mut filter: F,
    ) -> Result<(Counts, F), Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        let object = client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_string))
            .send()
            .await
            .map_err(|e| sdk_error(e, "GetObject"))?;
        let reader = SyncIoBridge::new(object.body.into_async_read());
        tokio::task::spawn_blocking(move || {
            records::scan_with(reader, &mut filter).map(|counts| (counts, filter))
        })
        .await
        .map_err(|e| Error::Store(format!("archive scan task failed: {e}")))?
        .map_err(|e| Error::Store(format!("GetObject: reading the archive: {e}")))
    }

    /// Reads the current version, writes it back without the subject's records if any were
    /// there, only if nobody wrote in between (`If-Match`); on a conflict, starts again from
    /// a fresh read. The rewritten archive records that `run` dropped the records (with what
    /// it dropped there before); `earlier` is what it had dropped there before, found in the
    /// archive's metadata (only a step whose outcome was lost leaves that behind).
    async fn rewrite_current(
        &self,
        key: &str,
        matcher: &Matcher,
        run: &str,
    ) -> Result<Rewrite, Error> {
        let mut last_conflict = None;
        for _ in 0..WRITE_ATTEMPTS {
            // A scan first: archives without the subject are never rewritten.
            let mut fetched = self.fetch_current(key).await?;
            let earlier = if run.is_empty() {
                0
            } else {
                dropped_by(fetched.dropped.as_deref(), run)
            };
            let (counts, _, spool) = filter_to_spool(fetched.body, matcher.clone()).await?;
            let dropped = copies(&counts, matcher);
            if dropped == 0 {
                return Ok(Rewrite {
                    counts,
                    replaced_version: None,
                    earlier,
                });
            }
            if let (false, Some(m)) = (run.is_empty(), fetched.metadata.metadata.as_mut()) {
                record_dropped(m, run, earlier.saturating_add(dropped));
            }
            match self
                .put_conditional(key, spool, fetched.metadata, &fetched.etag)
                .await?
            {
                None => {
                    return Ok(Rewrite {
                        counts,
                        replaced_version: fetched.version,
                        earlier,
                    })
                }
                Some(conflict) => last_conflict = Some(conflict),
            }
        }
        Err(last_conflict
            .unwrap_or_else(|| Error::Store("an archive kept changing during its rewrite".into())))
    }

    /// Reads an archive's current version for a rewrite: its body, its ETag (a rewrite is
    /// written only if it is still the current one), its version and what it keeps.
    pub(super) async fn fetch_current(&self, key: &str) -> Result<Fetched, Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        let object = client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_error(e, "GetObject"))?;
        let etag = object.e_tag().map(str::to_string).ok_or_else(|| {
            Error::Store("GetObject returned no ETag; a safe rewrite needs one".into())
        })?;
        let version = object.version_id().map(str::to_string);
        let dropped = object
            .metadata()
            .and_then(|m| m.get(DROPPED))
            .map(String::to_string);
        let mut metadata = Preserved::from(&object);
        if object.tag_count().is_some_and(|n| n > 0) {
            metadata.tagging = Some(self.tagging(key, version.as_deref()).await?);
        }
        Ok(Fetched {
            etag,
            version,
            metadata,
            body: object.body,
            dropped,
        })
    }

    /// Writes `spool` (from its start) as the archive's new content, only if its current
    /// version still has `etag` (`If-Match`). `Some`: it had changed (a conflict; read it
    /// again).
    pub(super) async fn put_conditional(
        &self,
        key: &str,
        mut spool: std::fs::File,
        metadata: Preserved,
        etag: &str,
    ) -> Result<Option<Error>, Error> {
        if let Some(hook) = &self.before_write {
            hook().await;
        }
        let client = self.client().await?;
        // The writer shared the file's offset: read it back from the start.
        std::io::Seek::rewind(&mut spool)
            .map_err(|e| Error::Store(format!("temporary file for a rewrite: {e}")))?;
        let length = spool
            .metadata()
            .map_err(|e| Error::Store(format!("temporary file for a rewrite: {e}")))?
            .len();
        let body = ByteStream::read_from()
            .file(tokio::fs::File::from_std(spool))
            .length(aws_sdk_s3::primitives::Length::Exact(length))
            .build()
            .await
            .map_err(|e| Error::Store(format!("temporary file for a rewrite: {e}")))?;
        self.limits.acquire(1).await;
        let put = metadata
            .apply(client.put_object())
            .bucket(&self.config.bucket)
            .key(key)
            .if_match(etag)
            // Buckets with Object Lock refuse writes without a checksum.
            .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32)
            .content_length(length as i64)
            .body(body)
            .send()
            .await;
        match put {
            Ok(_) => Ok(None),
            Err(e) if is_conflict(&e) => Ok(Some(sdk_error(e, "PutObject"))),
            Err(e) => Err(sdk_error(e, "PutObject")),
        }
    }
}

/// An archive's current version, read for a rewrite ([`S3Backend::fetch_current`]).
pub(super) struct Fetched {
    pub etag: String,
    pub version: Option<String>,
    pub metadata: Preserved,
    pub body: ByteStream,
    /// Its [`DROPPED`] metadata: which runs dropped how many records from it.
    pub dropped: Option<String>,
}

/// Runs `filter` over an archive's body on a blocking thread, writing what it keeps to a
/// temporary file; gives back the counts, the filter (with what it tallied) and the file.
pub(super) async fn filter_to_spool<F: records::Filter + Send + 'static>(
    body: ByteStream,
    mut filter: F,
) -> Result<(Counts, F, std::fs::File), Error> {
    let spool = tempfile::tempfile()
        .map_err(|e| Error::Store(format!("temporary file for a rewrite: {e}")))?;
    let writer = spool
        .try_clone()
        .map_err(|e| Error::Store(format!("temporary file for a rewrite: {e}")))?;
    let reader = SyncIoBridge::new(body.into_async_read());
    let (counts, filter) = tokio::task::spawn_blocking(move || {
        records::rewrite_with(reader, &mut filter, writer).map(|counts| (counts, filter))
    })
    .await
    .map_err(|e| Error::Store(format!("archive rewrite task failed: {e}")))?
    .map_err(|e| Error::Store(format!("GetObject: reading the archive: {e}")))?;
    Ok((counts, filter, spool))
}

impl S3Backend {
    /// An object's tags, encoded the way PutObject takes them.
    async fn tagging(&self, key: &str, version_id: Option<&str>) -> Result<String, Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        let out = client
            .get_object_tagging()
            .bucket(&self.config.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_string))
            .send()
            .await
            .map_err(|e| sdk_error(e, "GetObjectTagging"))?;
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for tag in out.tag_set() {
            query.append_pair(tag.key(), tag.value());
        }
        Ok(query.finish())
    }
}

/// What one archive rewrite did.
struct Rewrite {
    counts: Counts,
    /// The version that was read and replaced (versioned buckets): it still holds the records.
    replaced_version: Option<String>,
    /// Records this run had dropped from the archive before, in a step whose outcome was lost.
    earlier: u64,
}

/// Whether a write failed only because the object changed since it was read.
fn is_conflict<E: aws_sdk_s3::error::ProvideErrorMetadata>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    match e {
        aws_sdk_s3::error::SdkError::ServiceError(s) => {
            matches!(s.raw().status().as_u16(), 409 | 412)
                || matches!(
                    s.err().code(),
                    Some("PreconditionFailed" | "ConditionalRequestConflict")
                )
        }
        _ => false,
    }
}

/// The attributes a rewritten archive keeps from the original.
pub(super) struct Preserved {
    content_type: Option<String>,
    content_encoding: Option<String>,
    content_disposition: Option<String>,
    content_language: Option<String>,
    cache_control: Option<String>,
    pub metadata: Option<std::collections::HashMap<String, String>>,
    storage_class: Option<aws_sdk_s3::types::StorageClass>,
    server_side_encryption: Option<aws_sdk_s3::types::ServerSideEncryption>,
    ssekms_key_id: Option<String>,
    /// Object tags as a URL query string, read separately (GetObject only counts them).
    tagging: Option<String>,
}

impl From<&aws_sdk_s3::operation::get_object::GetObjectOutput> for Preserved {
    fn from(o: &aws_sdk_s3::operation::get_object::GetObjectOutput) -> Self {
        Self {
            content_type: o.content_type().map(str::to_string),
            content_encoding: o.content_encoding().map(str::to_string),
            content_disposition: o.content_disposition().map(str::to_string),
            content_language: o.content_language().map(str::to_string),
            cache_control: o.cache_control().map(str::to_string),
            metadata: Some(original_time_kept(
                o.metadata().cloned().unwrap_or_default(),
                super::sweep::to_chrono(o.last_modified()),
            )),
            storage_class: o.storage_class().cloned(),
            server_side_encryption: o.server_side_encryption().cloned(),
            ssekms_key_id: o.ssekms_key_id().map(str::to_string),
            tagging: None,
        }
    }
}

/// The archive's user metadata with the time its content was first written recorded (or
/// kept, on a second rewrite), so that sweeps judge its age by that rather than by the
/// `LastModified` the rewrite gives it. HTTP dates carry whole seconds.
fn original_time_kept(
    mut metadata: std::collections::HashMap<String, String>,
    last_modified: Option<chrono::DateTime<chrono::Utc>>,
) -> std::collections::HashMap<String, String> {
    let recorded = Recorded::parse(metadata.get(ORIGINAL_TIME).map(String::as_str));
    if let Some(time) = recorded.for_rewrite(last_modified) {
        metadata.insert(ORIGINAL_TIME.to_string(), time);
    }
    metadata
}

impl Preserved {
    fn apply(
        self,
        put: aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        put.set_content_type(self.content_type)
            .set_content_encoding(self.content_encoding)
            .set_content_disposition(self.content_disposition)
            .set_content_language(self.content_language)
            .set_cache_control(self.cache_control)
            .set_metadata(self.metadata)
            .set_storage_class(self.storage_class)
            .set_server_side_encryption(self.server_side_encryption)
            .set_ssekms_key_id(self.ssekms_key_id)
            .set_tagging(self.tagging)
    }
}

/// Fills in a template with canonical identifier values used literally (S3 prefixes are not
/// patterns): every exact form ([`identifier::exact_forms`]), or records why the locator is
/// skipped.
pub(super) fn expand(
    what: &str,
    t: &str,
    job: &SubjectJob,
    skipped: &mut Vec<String>,
) -> Result<Option<Vec<String>>, Error> {
    template::fill_or_skip(
        job,
        StoreKind::S3,
        what,
        t,
        identifier::exact_forms,
        skipped,
    )
}

/// The records locator's `equals` filled with canonical values, the one form every records
/// pass compares with; None (recorded in `skipped`) when the subject lacks an identifier.
pub(super) fn fill_equals(
    t: &str,
    job: &SubjectJob,
    skipped: &mut Vec<String>,
) -> Result<Option<identifier::Filled>, Error> {
    template::fill_or_skip(
        job,
        StoreKind::S3,
        "records.equals",
        t,
        identifier::fill,
        skipped,
    )
}

/// The copies of the subject's data a pass over one object found (or removed): its records,
/// and its unparsed lines holding the identifier when those are dropped.
fn copies(counts: &Counts, matcher: &Matcher) -> u64 {
    if matcher.drops_unparsed() {
        counts.matched + counts.unparsed
    } else {
        counts.matched
    }
}

/// Where unparsed copies are, for a status message: object keys (those holding an identifier
/// are not named) and line counts, the first few; never the identifier.
fn unparsed_places(job: &SubjectJob, unparsed: &[(String, bool, u64)], earlier: u64) -> String {
    let values: Vec<String> = job
        .identifiers
        .iter()
        .flat_map(|(t, v)| [identifier::canonical(t, v), v.trim().to_lowercase()])
        .filter(|v| !v.is_empty())
        .collect();
    let mut named: Vec<String> = unparsed
        .iter()
        .take(NAMED_OBJECTS)
        .map(|(key, older, lines)| {
            let lower = key.to_lowercase();
            let key = if values
                .iter()
                .any(|v| lower.contains(v.to_lowercase().as_str()))
            {
                "an object whose key holds an identifier".to_string()
            } else {
                key.clone()
            };
            let version = if *older { " (an older version)" } else { "" };
            let plural = if *lines == 1 { "" } else { "s" };
            format!("{key}{version}: {lines} line{plural}")
        })
        .collect();
    // Objects found by earlier steps are counted, not named: a cursor holds no key.
    let more = (unparsed.len() as u64)
        .saturating_add(earlier)
        .saturating_sub(named.len() as u64);
    if more > 0 {
        named.push(format!("and {more} more objects"));
    }
    named.join(", ")
}

/// Lines that are not JSON but hold the identifier are copies of the subject's data. When
/// they are not dropped with the records, finding and verifying fail the target and say
/// where they are (an erase step only removes what it can; its verify reports the rest).
fn unparsed_failure(
    job: &SubjectJob,
    tally: &Tally,
    not_distinctive: Option<identifier::NotDistinctive>,
    drop: bool,
) -> Option<Error> {
    if (tally.unparsed.is_empty() && tally.earlier_objects == 0)
        || job.action == SubjectAction::Erase
    {
        return None;
    }
    let lines: u64 = tally
        .unparsed
        .iter()
        .map(|(_, _, n)| n)
        .sum::<u64>()
        .saturating_add(tally.earlier_lines);
    unparsed_copies(
        job,
        &tally.unparsed,
        tally.earlier_objects,
        lines,
        not_distinctive,
        drop,
    )
}

/// The failure of a finished Find or Verify that found `lines` lines that are not JSON
/// holding the subject's identifier: in `named` (object key, whether an older version, its
/// lines) and `earlier` objects more; None when they were dropped with the records. The
/// same for a subject alone and for a member of a batch.
pub(super) fn unparsed_copies(
    job: &SubjectJob,
    named: &[(String, bool, u64)],
    earlier: u64,
    lines: u64,
    not_distinctive: Option<identifier::NotDistinctive>,
    drop: bool,
) -> Option<Error> {
    let places = unparsed_places(job, named, earlier);
    let target = &job.target.name;
    match not_distinctive {
        // Dropped with the records, and counted with them.
        None if drop => None,
        None => Some(Error::UnparsedCopiesRemain(format!(
            "target {target}: {lines} archive lines that are not JSON still hold the subject's identifier ({places}); set subject.s3.records.unparsedLines: DropMatching to drop them with the subject's records, or remove them by hand"
        ))),
        Some(e) => Some(Error::IdentifierNotDistinctive(format!(
            "target {target}: {lines} archive lines that are not JSON may hold the subject's identifier ({places}), but subject.s3.records.equals is {{{}}} and this subject's value {}, so free text cannot tell it from other data (a timestamp 10:42:13 holds 42); they are neither counted as erased nor dropped: check and remove them by hand", e.placeholder, e.why
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBE: &str = "Unparsed-Probe-5e1@Example.org";

    fn job(action: SubjectAction, identifiers: &[(&str, &str)]) -> SubjectJob {
        SubjectJob {
            target: serde_json::from_value(serde_json::json!({
                "name": "archive", "store": "archive", "s3": {"prefix": "logs/"}
            }))
            .unwrap(),
            identifiers: identifiers
                .iter()
                .map(|(t, v)| (t.to_string(), v.to_string()))
                .collect(),
            action,
        }
    }

    fn tally(unparsed: &[(&str, bool, u64)]) -> Tally {
        Tally {
            unparsed: unparsed
                .iter()
                .map(|(k, older, n)| (k.to_string(), *older, *n))
                .collect(),
            ..Tally::default()
        }
    }

    #[test]
    fn unparsed_copies_are_named_by_key_and_count_never_by_identifier() {
        let verify = job(SubjectAction::Verify, &[("email", PROBE)]);
        let key_with_id = format!("logs/{}.log", PROBE.to_lowercase());
        let t = tally(&[
            ("logs/day1.log", false, 2),
            ("logs/day0.log", true, 1),
            (&key_with_id, false, 1),
        ]);
        let e = unparsed_failure(&verify, &t, None, false).unwrap();
        assert_eq!(e.reason(), "UnparsedCopiesRemain");
        let message = e.to_string();
        assert!(
            message.contains("4 archive lines")
                && message.contains("logs/day1.log: 2 lines")
                && message.contains("logs/day0.log (an older version): 1 line")
                && message.contains("an object whose key holds an identifier: 1 line"),
            "{message}"
        );
        assert!(
            !message.to_lowercase().contains("unparsed-probe"),
            "{message}"
        );
        // Dropped with the records: counted, no failure. Erase leaves judging to verify.
        assert!(unparsed_failure(&verify, &t, None, true).is_none());
        let erase = job(SubjectAction::Erase, &[("email", PROBE)]);
        assert!(unparsed_failure(&erase, &t, None, false).is_none());
        assert!(unparsed_failure(&verify, &tally(&[]), None, false).is_none());
    }

    #[test]
    fn unparsed_lines_a_short_value_cannot_judge_fail_either_way() {
        let find = job(SubjectAction::Find, &[("userId", "42")]);
        let t = tally(&[("logs/day1.log", false, 1)]);
        let why = identifier::NotDistinctive {
            placeholder: "userId".into(),
            why: "is only digits",
        };
        for drop in [false, true] {
            let e = unparsed_failure(&find, &t, Some(why.clone()), drop).unwrap();
            assert_eq!(e.reason(), "IdentifierNotDistinctive");
            assert!(e.to_string().contains("{userId}") && e.to_string().contains("is only digits"));
        }
        let many: Vec<(String, bool, u64)> = (0..7)
            .map(|i| (format!("logs/{i}.log"), false, 1))
            .collect();
        let places = unparsed_places(&find, &many, 0);
        assert!(places.ends_with("and 2 more objects"), "{places}");
    }
}

#[cfg(test)]
mod cursor_tests {
    use super::*;

    #[test]
    fn archives_record_which_run_dropped_how_many_within_the_metadata_limit() {
        assert_eq!(dropped_by(None, "0a1b"), 0);
        assert_eq!(dropped_by(Some("0a1b:3"), "0a1b"), 3);
        assert_eq!(dropped_by(Some("ffee:9, 0a1b:3"), "0a1b"), 3);
        assert_eq!(dropped_by(Some("ffee:9,garbage,0a1b:x"), "0a1b"), 0);
        assert_eq!(
            dropped_value(Some("ffee:9,0a1b:3"), "0a1b", 5, 2048).as_deref(),
            Some("0a1b:5,ffee:9"),
            "the run's entry replaced, first"
        );
        let many = (0..10)
            .map(|i| format!("r{i}:1"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            dropped_value(Some(&many), "0a1b", 2, 2048).as_deref(),
            Some("0a1b:2,r0:1,r1:1,r2:1,r3:1"),
            "a few earlier runs at most"
        );
        assert_eq!(
            dropped_value(Some(&many), "0a1b", 2, 12).as_deref(),
            Some("0a1b:2,r0:1")
        );
        assert_eq!(dropped_value(None, "0a1b", 2, 5), None);
        let mut metadata = std::collections::HashMap::from([
            (
                "tombstone-original-time".to_string(),
                "2026-01-01T00:00:00Z".to_string(),
            ),
            ("big".to_string(), "x".repeat(1900)),
        ]);
        record_dropped(&mut metadata, "0a1b", u64::MAX);
        let used: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(used <= METADATA_LIMIT, "{used}");
        assert_eq!(
            dropped_by(metadata.get(DROPPED).map(String::as_str), "0a1b"),
            u64::MAX
        );
        let mut full = std::collections::HashMap::from([("big".to_string(), "x".repeat(2040))]);
        record_dropped(&mut full, "0a1b", 7);
        assert!(
            !full.contains_key(DROPPED),
            "no room: written without the record"
        );
    }

    #[test]
    fn a_cursor_round_trips_and_holds_no_key() {
        let mut p = Position::start(SubjectAction::Erase);
        p.phase = REWRITE;
        p.unit = 1;
        p.skip = 12;
        p.count = 90;
        p.kept = vec!["3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY".into()];
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains("users/"), "{json}");
        let read: Position = serde_json::from_str(&json).unwrap();
        assert_eq!(read, p);
        assert!(read.validate().is_ok());
        assert_eq!(
            Position::legacy(&format!("s3-subject:{json}")),
            Some(p.clone())
        );
        assert_eq!(Position::resume(Some(read), SubjectAction::Erase), p);
        // Another action starts over.
        assert_eq!(
            Position::resume(Some(p), SubjectAction::Verify),
            Position::start(SubjectAction::Verify)
        );
    }

    #[test]
    fn malformed_cursors_are_refused_never_a_panic() {
        // Not a subject cursor at all: not read (the adapter restarts the job).
        for bad in [
            "",
            "s3-subject:",
            "s3-subject:{}",
            "s3-subject:{\"a\":\"e\",\"u\":-1}",
            "s3-subject:{\"a\":\"e\",\"key\":\"users/47/\"}",
            "s3:{\"t\":\"abc\"}",
            "subject:e:0:0:0:0:0",
        ] {
            assert_eq!(Position::legacy(bad), None, "{bad}");
        }
        // Read, but holding what no step writes: refused.
        for bad in [
            "s3-subject:{\"a\":\"x\"}",
            "s3-subject:{\"a\":\"e\",\"p\":3}",
        ] {
            let e = Position::legacy(bad).unwrap().validate().unwrap_err();
            assert_eq!(e.reason(), "InvalidSpec", "{bad}");
            assert!(!e.to_string().contains("users/47"), "{e}");
        }
    }
}
