//! Many data subjects in one bucket, in one pass (a batch): every member's key-prefix
//! objects deleted in shared `DeleteObjects` batches, and every archive under a records
//! prefix read (and, erasing, rewritten) once for all members, each record looked up by its
//! field value among the members' ([`MemberLookup`]).
//!
//! Work is ordered by member id ([`BatchMember::id`], a digest), so that a position holds
//! for any subset of the members it started with: the key prefixes a member leads (those no
//! member of a smaller id shares) come in the order of that id, and a records prefix shared
//! by every member (one without placeholders) comes first of all. The cursor names the
//! member id it stands at, never an index or a key.
//!
//! Counts are this step's only. An erase names a journal before anything is deleted; every
//! `DeleteObjects` batch and every archive rewrite is preceded by an intent that attributes
//! what it removes to members by id, so that a step repeated after its outcome was lost
//! counts, per member, what the lost one removed. A step that fails is handed back with the
//! cursor it started from and no counts: the intents of what it did count it in the next.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use aws_sdk_s3::types::ObjectIdentifier;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::intent::{self, Intent, Journal};
use super::records::{LookupMember, MemberLookup, MemberPass};
use super::subject::{self as single, Clock, Walk};
use super::{object_id, S3Backend, DELETE_BATCH};
use crate::api::retentionpolicy::UnparsedLines;
use crate::api::StoreKind;
use crate::backends::identifier::NotDistinctive;
use crate::backends::{
    subject_locator, template, BatchJob, BatchStep, Error, MemberStep, Next, StepBudget,
    SubjectAction,
};

/// The phases of a batch step, in order (as a subject step's).
const PREFIXES: u8 = 0;
/// Erase only: every current archive rewritten without the members' records.
const REWRITE: u8 = 1;
/// Every version of every archive read: counted, or (erase) older versions holding
/// records deleted.
const VERSIONS: u8 = 2;

/// Where a batch step resumes: shared positions only, valid for any subset of the members
/// it started with.
///
/// `at` is the id of the member whose units the step stands at (`""`: a records prefix
/// every member shares); units ordered before it are done. Within it, `unit` units are done
/// and `skip`/`skip_markers` entries of the current unit's listing were dealt with and are
/// still listed (as a subject cursor's). If that member left the batch, the step goes on
/// with the next one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchPosition {
    /// The action (`f`, `e`, `v`): a cursor of another action starts over.
    #[serde(rename = "a")]
    action: String,
    #[serde(rename = "p", default)]
    phase: u8,
    #[serde(rename = "at", default, skip_serializing_if = "Option::is_none")]
    at: Option<String>,
    #[serde(rename = "u", default)]
    unit: usize,
    #[serde(rename = "sv", default)]
    skip: u64,
    #[serde(rename = "sm", default)]
    skip_markers: u64,
    /// Versions an archive rewrite replaced that the store refused to delete (Object Lock)
    /// or that hold records of a member held since: the versions pass leaves them alone.
    #[serde(rename = "k", default, skip_serializing_if = "Vec::is_empty")]
    kept: Vec<String>,
    /// Per member id: lines that are not JSON holding its identifier, not dropped, found
    /// so far (only Find and Verify carry them; their members are not checkpointed between
    /// steps, so the map is written only when a batch stops midway).
    #[serde(rename = "um", default, skip_serializing_if = "BTreeMap::is_empty")]
    unparsed: BTreeMap<String, MemberUnparsed>,
    /// Such lines as earlier versions counted them, for the batch and not per member: read
    /// so that a batch resumed from such a cursor still fails every member safe.
    #[serde(rename = "ul", default, skip_serializing_if = "is_zero")]
    unparsed_lines: u64,
    #[serde(rename = "un", default, skip_serializing_if = "std::ops::Not::not")]
    not_distinctive: bool,
    /// An erase's write-ahead intents ([`super::intent`]), named and checkpointed before
    /// anything is removed.
    #[serde(rename = "j", default, skip_serializing_if = "Option::is_none")]
    journal: Option<Journal>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One member's lines that are not JSON still holding its identifier.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberUnparsed {
    #[serde(rename = "l")]
    lines: u64,
    /// The objects (versions) holding them.
    #[serde(rename = "o")]
    objects: u64,
}

/// Member ids are digests: anything longer is not one a step wrote.
const LONGEST_ID: usize = 256;

impl BatchPosition {
    fn start(action: SubjectAction) -> Self {
        Self {
            action: single::action_code(action).into(),
            ..Self::default()
        }
    }

    /// Refuses what a cursor the steps write never holds (it is read back from status).
    pub(super) fn validate(&self) -> Result<(), Error> {
        let bad = !["f", "e", "v"].contains(&self.action.as_str())
            || self.phase > VERSIONS
            || self.at.as_ref().is_some_and(|a| a.len() > LONGEST_ID);
        if bad {
            return Err(Error::InvalidSpec(
                "checkpoint cursor is not an S3 batch cursor".into(),
            ));
        }
        Ok(())
    }

    fn resume(cursor: Option<Self>, action: SubjectAction) -> Self {
        match cursor {
            Some(p) if p.action == single::action_code(action) => p,
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
        self.at = None;
        self.unit = 0;
        self.skip = 0;
        self.skip_markers = 0;
    }

    /// The unit the position stands at in `leaders` (sorted by leader), moving it on to
    /// the next one when the one it names is done or gone; None when all are done.
    fn locate(&mut self, leaders: &[Leader]) -> Option<(usize, usize)> {
        let mut at = match &self.at {
            None => 0,
            Some(at) => leaders
                .binary_search_by(|l| l.id.as_str().cmp(at))
                .unwrap_or_else(|i| i),
        };
        while let Some(leader) = leaders.get(at) {
            if self.at.as_deref() != Some(leader.id.as_str()) {
                self.at = Some(leader.id.clone());
                self.unit = 0;
                self.skip = 0;
                self.skip_markers = 0;
            }
            if self.unit < leader.units.len() {
                return Some((at, self.unit));
            }
            at += 1;
        }
        None
    }
}

/// The units one member leads (or, with id `""`, every member shares).
struct Leader {
    id: String,
    units: Vec<Unit>,
}

/// One prefix listed for the batch, and the members whose it is.
struct Unit {
    prefix: String,
    owners: Vec<usize>,
    /// Records prefixes: the lookup of its owners' records.
    lookup: Option<Arc<MemberLookup>>,
}

/// The members' locators filled, once per step.
struct Plan {
    prefixes: Vec<Leader>,
    archives: Vec<Leader>,
    /// Per member: whether a locator ran, and which were skipped.
    members: Vec<MemberStep>,
    /// Per member: why its value cannot be told apart in free text (None: it can).
    not_distinctive: Vec<Option<NotDistinctive>>,
    drop_unparsed: bool,
}

/// Units keyed by prefix, each with its owners, grouped under the member id that leads it:
/// the smallest of its owners' ids, or `""` when every member shares it by the template.
fn leaders(
    job: &BatchJob,
    owners: BTreeMap<String, Vec<usize>>,
    shared: bool,
    lookup: impl Fn(&[usize]) -> Option<Arc<MemberLookup>>,
) -> Vec<Leader> {
    let mut by_leader: BTreeMap<String, Vec<Unit>> = BTreeMap::new();
    for (prefix, owners) in owners {
        let id = if shared {
            String::new()
        } else {
            owners
                .iter()
                .filter_map(|i| job.members.get(*i).map(|m| m.id.clone()))
                .min()
                .unwrap_or_default()
        };
        let lookup = lookup(&owners);
        by_leader.entry(id).or_default().push(Unit {
            prefix,
            owners,
            lookup,
        });
    }
    by_leader
        .into_iter()
        .map(|(id, units)| Leader { id, units })
        .collect()
}

fn plan(job: &BatchJob) -> Result<Plan, Error> {
    let locator = subject_locator(&job.target, StoreKind::S3, |s| s.s3())?;
    let size = job.members.len();
    let mut members = vec![MemberStep::default(); size];
    let mut not_distinctive = vec![None; size];
    let mut prefix_owners: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut archive_owners: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut equals = vec![None; size];
    for (i, member) in job.members.iter().enumerate() {
        let one = member.job(job);
        let step = &mut members[i];
        for (t, template) in locator.key_prefixes.iter().enumerate() {
            let what = format!("keyPrefixes[{t}]");
            if let Some(forms) = single::expand(&what, template, &one, &mut step.skipped)? {
                step.ran = true;
                for form in forms {
                    own(&mut prefix_owners, form, i);
                }
            }
        }
        if let Some(spec) = &locator.records {
            let forms = single::expand("records.prefix", &spec.prefix, &one, &mut step.skipped)?;
            let filled = single::fill_equals(&spec.equals, &one, &mut step.skipped)?;
            if let (Some(forms), Some(filled)) = (forms, filled) {
                step.ran = true;
                for form in forms {
                    own(&mut archive_owners, form, i);
                }
                not_distinctive[i] = filled.check_distinctive().err();
                equals[i] = Some(filled);
            }
        }
    }
    let prefixes = leaders(job, prefix_owners, false, |_| None);
    let (archives, drop_unparsed) = match &locator.records {
        None => (Vec::new(), false),
        Some(spec) => {
            let drop = spec.unparsed_lines == UnparsedLines::DropMatching;
            let shared = template::placeholders(&spec.prefix).is_ok_and(|p| p.is_empty());
            let archives = leaders(job, archive_owners, shared, |owners| {
                Some(Arc::new(MemberLookup::new(
                    &spec.field,
                    size,
                    owners.iter().filter_map(|i| {
                        equals[*i].as_ref().map(|e| LookupMember {
                            index: *i,
                            equals: e,
                            drop_unparsed: drop && not_distinctive[*i].is_none(),
                        })
                    }),
                )))
            });
            (archives, drop)
        }
    };
    Ok(Plan {
        prefixes,
        archives,
        members,
        not_distinctive,
        drop_unparsed,
    })
}

fn own(owners: &mut BTreeMap<String, Vec<usize>>, prefix: String, member: usize) {
    let list = owners.entry(prefix).or_default();
    if !list.contains(&member) {
        list.push(member);
    }
}

/// One step's state.
struct Run<'a> {
    job: &'a BatchJob,
    erase: bool,
    versioned: bool,
    pos: BatchPosition,
    walk: Walk,
    /// Per member: this step's count and blocked.
    counts: Vec<MemberStep>,
    /// Members the gate held: their records are left from then on.
    excluded: BTreeSet<usize>,
    malformed: u64,
    /// Key-prefix objects (versions, delete markers) to delete, with their owners.
    pending: Vec<(ObjectIdentifier, Vec<usize>)>,
    /// Older archive versions holding records to delete, with each member's records.
    doomed: Vec<(ObjectIdentifier, Vec<(usize, u64)>)>,
    /// Versions rewrites replaced (key, version), with the members whose records they
    /// removed.
    replaced: Vec<(String, String, Vec<usize>)>,
    /// The key-prefix unit being listed: its prefix and owners.
    current: Option<(String, Vec<usize>)>,
    /// Per member: objects of this step with lines that are not JSON holding its
    /// identifier (key, whether an older version, lines), the first few; earlier steps'
    /// are counted in the position, not named (a cursor holds no key).
    unparsed_named: BTreeMap<usize, Vec<(String, bool, u64)>>,
}

/// Why a step stopped before its end.
enum Halt {
    /// The gate could not say who is held: nothing more may be committed.
    Gate(Error),
    Failed(Error),
}

impl From<Error> for Halt {
    fn from(e: Error) -> Self {
        Halt::Failed(e)
    }
}

impl Run<'_> {
    fn add(counts: &mut [MemberStep], m: usize, n: u64, blocked: bool) {
        if let Some(c) = counts.get_mut(m) {
            if blocked {
                c.blocked = c.blocked.saturating_add(n);
            } else {
                c.count = c.count.saturating_add(n);
            }
        }
    }

    fn id(&self, m: usize) -> String {
        self.job
            .members
            .get(m)
            .map(|x| x.id.clone())
            .unwrap_or_default()
    }

    fn journal(&mut self) -> Result<&mut Journal, Error> {
        self.pos
            .journal
            .as_mut()
            .ok_or_else(|| Error::Store("an erase step has no journal".into()))
    }

    /// Asks the gate who is held now (right before a commit); they join `excluded`.
    async fn ask_gate(&mut self, budget: &StepBudget) -> Result<(), Halt> {
        budget.may_act()?;
        let held = self.job.gate.held().await.map_err(Halt::Gate)?;
        let size = self.job.members.len();
        self.excluded.extend(held.into_iter().filter(|m| *m < size));
        Ok(())
    }
}

impl S3Backend {
    /// One bounded batch step (see the module docs): key prefixes page by page, then
    /// (erase) current archives rewritten one by one, then archive versions read one by one,
    /// until done, the step's time is spent or it is cancelled.
    pub(super) async fn subjects(
        &self,
        job: &BatchJob,
        cursor: Option<BatchPosition>,
        budget: &StepBudget,
    ) -> Result<BatchStep<BatchPosition>, Error> {
        let plan = plan(job)?;
        let start = BatchPosition::resume(cursor, job.action);
        let erase = job.action == SubjectAction::Erase;
        let mut pos = start.clone();
        let answer = |members: Vec<MemberStep>, next| BatchStep {
            members,
            ..BatchStep::empty(0, next)
        };
        if erase && pos.journal.is_none() {
            pos.journal = Some(Journal {
                run: crate::backends::redis::ledger::new_run(),
                ..Default::default()
            });
            // Checkpointed before any intent is written under its name (also when a cursor
            // of another action was handed in and the erase starts over).
            budget.may_act()?;
            return Ok(answer(plan.members.clone(), Next::Continue(pos)));
        }
        let versioned = self.versioned().await?;
        let mut counts = plan.members.clone();
        if let Some(journal) = pos.journal.as_mut().filter(|_| erase) {
            // What a step whose outcome was lost removed is counted now, per member.
            let lost = self.settle_batch_intents(journal, versioned).await?;
            for (m, member) in job.members.iter().enumerate() {
                if let Some(n) = lost.get(&member.id) {
                    Run::add(&mut counts, m, *n, false);
                }
            }
            if journal.settled {
                self.tidy_abandoned_intents(&journal.run, versioned).await;
                return Ok(answer(counts, Next::Done));
            }
        }
        let mut run = Run {
            job,
            erase,
            versioned,
            walk: walk_at(&pos),
            pos,
            counts,
            excluded: BTreeSet::new(),
            malformed: 0,
            pending: Vec::new(),
            doomed: Vec::new(),
            replaced: Vec::new(),
            current: None,
            unparsed_named: BTreeMap::new(),
        };
        let mut clock = Clock {
            budget,
            deadline: Instant::now() + budget.max_time,
            worked: false,
        };
        let mut result = self.batch_phases(&plan, &mut run, &mut clock).await;
        if result.is_ok() {
            result = self.flush_all(&mut run, budget).await.and(result);
        } else if let Err(Halt::Failed(_)) = &result {
            // Versions a rewrite replaced are deleted even so: left, their records would
            // be counted again by the versions pass the next step repeats.
            let _ = self.flush_replaced(&mut run, budget).await;
        }
        let mut finished = match result {
            Ok(finished) => finished,
            Err(Halt::Gate(e) | Halt::Failed(e)) => {
                // Nothing of this step is kept: the next one resumes where it started and
                // counts what this one removed from its intents.
                let mut step = answer(plan.members.clone(), Next::Continue(start));
                step.held = run.excluded;
                step.failure = Some(e);
                return Ok(step);
            }
        };
        let mut pos = run.pos;
        if let Some(journal) = pos.journal.as_mut().filter(|j| finished && !j.settled) {
            if journal.seq > 0 {
                // Done: one more step removes this run's intents once this is checkpointed.
                journal.settled = true;
                finished = false;
            }
        }
        let mut members = run.counts;
        if finished && !erase {
            // Each member whose copies remain fails alone; its batch-mates are verified.
            for (m, member) in job.members.iter().enumerate() {
                let Some(tally) = pos.unparsed.get(&member.id) else {
                    continue;
                };
                let named = run.unparsed_named.remove(&m).unwrap_or_default();
                let failure = single::unparsed_copies(
                    &member.job(job),
                    &named,
                    tally.objects.saturating_sub(named.len() as u64),
                    tally.lines,
                    plan.not_distinctive.get(m).cloned().flatten(),
                    plan.drop_unparsed,
                );
                if let (Some(e), Some(step)) = (failure, members.get_mut(m)) {
                    step.failure = Some(e.failure());
                }
            }
        }
        let failure = (finished && !erase && pos.unparsed_lines > 0).then(|| {
            legacy_unparsed_failure(
                &job.target.name,
                pos.unparsed_lines,
                pos.not_distinctive,
                plan.drop_unparsed,
            )
        });
        Ok(BatchStep {
            members,
            held: run.excluded,
            malformed: run.malformed,
            next: if finished {
                Next::Done
            } else {
                Next::Continue(pos)
            },
            failure,
            notices: Vec::new(),
        })
    }

    /// Works through the phases from the run's position; true once all are done.
    async fn batch_phases(
        &self,
        plan: &Plan,
        run: &mut Run<'_>,
        clock: &mut Clock<'_>,
    ) -> Result<bool, Halt> {
        loop {
            let (leaders, skip_phase) = match run.pos.phase {
                PREFIXES => (&plan.prefixes, false),
                REWRITE => (&plan.archives, !run.erase),
                _ => (&plan.archives, run.erase && !run.versioned),
            };
            let here = if skip_phase {
                None
            } else {
                run.pos.locate(leaders)
            };
            let Some((l, u)) = here else {
                self.flush_all(run, clock.budget).await?;
                run.current = None;
                if run.pos.phase >= VERSIONS {
                    return Ok(true);
                }
                run.pos.next_phase();
                run.walk = Walk::default();
                continue;
            };
            if clock.stop() {
                return Ok(false);
            }
            let unit = &leaders[l].units[u];
            if run.pos.phase == PREFIXES {
                run.current = Some((unit.prefix.clone(), unit.owners.clone()));
            }
            let done = match run.pos.phase {
                PREFIXES => self.batch_prefix_page(unit, run, clock).await?,
                REWRITE => self.batch_rewrites(unit, run, clock).await?,
                _ => self.batch_versions(unit, run, clock).await?,
            };
            if !done && run.pos.phase == PREFIXES {
                // One page done: the clock says whether the next one is.
                continue;
            }
            if !done {
                return Ok(false);
            }
            // The listing's deferred version goes with the next batch.
            let deferred = std::mem::take(&mut run.walk.deferred);
            run.pending
                .extend(deferred.into_iter().map(|id| (id, unit.owners.clone())));
            if run.pos.phase != PREFIXES {
                self.flush_all(run, clock.budget).await?;
            }
            run.current = None;
            run.pos.next_unit();
            run.walk = Walk::default();
            if run.pending.len() >= DELETE_BATCH {
                self.flush_pending(run, clock.budget, false).await?;
            }
        }
    }

    /// Deletes everything the step has left to delete.
    async fn flush_all(&self, run: &mut Run<'_>, budget: &StepBudget) -> Result<(), Halt> {
        let deferred = std::mem::take(&mut run.walk.deferred);
        if !deferred.is_empty() {
            // Still listed when the step resumes: passed over as dealt with unless deleted.
            let owners = run
                .current
                .as_ref()
                .map(|(_, o)| o.clone())
                .unwrap_or_default();
            run.pending
                .extend(deferred.into_iter().map(|id| (id, owners.clone())));
        }
        self.flush_pending(run, budget, true).await?;
        self.flush_replaced(run, budget).await?;
        self.flush_doomed(run, budget).await
    }

    /// Deletes key-prefix objects in batches of [`DELETE_BATCH`] (all of them, or only
    /// full batches), the gate asked and the intent written before each.
    async fn flush_pending(
        &self,
        run: &mut Run<'_>,
        budget: &StepBudget,
        all: bool,
    ) -> Result<(), Halt> {
        while run.pending.len() >= DELETE_BATCH || (all && !run.pending.is_empty()) {
            let take = run.pending.len().min(DELETE_BATCH);
            let chunk: Vec<_> = run.pending.drain(..take).collect();
            run.ask_gate(budget).await?;
            let current = run.current.as_ref().map(|(p, _)| p.clone());
            let mut objects = Vec::with_capacity(chunk.len());
            let mut owners = Vec::with_capacity(chunk.len());
            for (id, who) in chunk {
                if who.iter().any(|m| run.excluded.contains(m)) {
                    // Left for its held owner; still listed.
                    if current.as_deref().is_some_and(|p| id.key().starts_with(p)) {
                        run.pos.skip += 1;
                    }
                    continue;
                }
                objects.push(id);
                owners.push(who);
            }
            if objects.is_empty() {
                continue;
            }
            let members = owners
                .iter()
                .map(|who| who.iter().map(|m| (run.id(*m), 1)).collect())
                .collect();
            let done = self
                .delete_attributed(run, objects.clone(), members)
                .await?;
            let mut refused = refused_keys(&done);
            for (id, who) in objects.iter().zip(owners) {
                let was_refused = take_refused(&mut refused, id.key());
                for m in &who {
                    Run::add(&mut run.counts, *m, 1, was_refused);
                }
                if was_refused && current.as_deref().is_some_and(|p| id.key().starts_with(p)) {
                    // Delete markers are never refused: what is refused is a version.
                    run.pos.skip += 1;
                }
            }
        }
        Ok(())
    }

    /// Deletes the versions rewrites replaced, but those holding records of a member the
    /// gate holds now (their last copy): those, and those the store refuses, are kept.
    async fn flush_replaced(&self, run: &mut Run<'_>, budget: &StepBudget) -> Result<(), Halt> {
        if run.replaced.is_empty() {
            return Ok(());
        }
        run.ask_gate(budget).await?;
        let replaced = std::mem::take(&mut run.replaced);
        let mut ids = Vec::new();
        let mut going = Vec::new();
        for (key, version, removed) in replaced {
            if removed.iter().any(|m| run.excluded.contains(m)) {
                run.pos.kept.push(version);
            } else {
                ids.push(object_id(&key, Some(&version))?);
                going.push((key, version, removed));
            }
        }
        let done = self.delete_batch(ids).await?;
        let mut refused = refused_keys(&done);
        for (key, version, removed) in going {
            if take_refused(&mut refused, &key) {
                run.pos.kept.push(version);
                for m in removed {
                    Run::add(&mut run.counts, m, 1, true);
                }
            }
        }
        Ok(())
    }

    /// Deletes older archive versions holding records (counted when read), but those
    /// holding records of a member the gate holds now.
    async fn flush_doomed(&self, run: &mut Run<'_>, budget: &StepBudget) -> Result<(), Halt> {
        while !run.doomed.is_empty() {
            let take = run.doomed.len().min(DELETE_BATCH);
            let chunk: Vec<_> = run.doomed.drain(..take).collect();
            run.ask_gate(budget).await?;
            let mut objects = Vec::new();
            let mut records = Vec::new();
            for (id, who) in chunk {
                if who.iter().any(|(m, _)| run.excluded.contains(m)) {
                    // Left; what the others' records counted when read is taken back.
                    for (m, n) in &who {
                        if let Some(c) = run.counts.get_mut(*m) {
                            c.count = c.count.saturating_sub(*n);
                        }
                    }
                    continue;
                }
                objects.push(id);
                records.push(who);
            }
            if objects.is_empty() {
                continue;
            }
            let members = records
                .iter()
                .map(|who| who.iter().map(|(m, n)| (run.id(*m), *n)).collect())
                .collect();
            let done = self
                .delete_attributed(run, objects.clone(), members)
                .await?;
            let mut refused = refused_keys(&done);
            for (id, who) in objects.iter().zip(records) {
                if take_refused(&mut refused, id.key()) {
                    for (m, _) in who {
                        Run::add(&mut run.counts, m, 1, true);
                    }
                }
            }
            run.pos.skip = run.pos.skip.saturating_sub(done.deleted);
        }
        Ok(())
    }

    /// One `DeleteObjects` batch whose intent attributes each object to members by id.
    async fn delete_attributed(
        &self,
        run: &mut Run<'_>,
        objects: Vec<ObjectIdentifier>,
        members: Vec<Vec<(String, u64)>>,
    ) -> Result<super::Deleted, Error> {
        let batch = Intent {
            objects: super::intent_objects(&objects),
            members,
            ..Intent::default()
        };
        let journal = run.journal()?;
        let seq = journal.take_seq();
        let key = intent::key(&journal.run, seq);
        self.put_intent(&key, &batch).await?;
        self.delete_batch(objects).await
    }

    /// One listing page under a member's key prefix: counted, or queued for deletion.
    /// True once the prefix is done.
    async fn batch_prefix_page(
        &self,
        unit: &Unit,
        run: &mut Run<'_>,
        clock: &mut Clock<'_>,
    ) -> Result<bool, Halt> {
        let (entries, next) = if run.versioned {
            self.list_versions(&unit.prefix, &run.walk.listing).await?
        } else {
            self.list_objects(&unit.prefix, &run.walk.listing).await?
        };
        let entries = run.walk.fresh(entries);
        clock.worked |= !entries.is_empty();
        if run.erase {
            let resume_after = next
                .as_ref()
                .map(|n| (n.key_marker.as_deref(), n.version_marker.as_deref()));
            for e in &entries {
                let id = object_id(&e.key, e.version_id.as_deref())?;
                if run.versioned
                    && resume_after == Some((Some(e.key.as_str()), e.version_id.as_deref()))
                {
                    // Some servers cannot resume after a version that no longer exists.
                    run.walk.deferred.push(id);
                } else {
                    run.pending.push((id, unit.owners.clone()));
                }
            }
            if run.pending.len() >= DELETE_BATCH {
                self.flush_pending(run, clock.budget, false).await?;
            }
        } else {
            for m in &unit.owners {
                Run::add(&mut run.counts, *m, entries.len() as u64, false);
            }
            let markers = entries.iter().filter(|e| e.delete_marker).count() as u64;
            run.pos.skip_markers += markers;
            run.pos.skip += entries.len() as u64 - markers;
        }
        match next {
            Some(n) => {
                run.walk.listing = n;
                Ok(false)
            }
            None => Ok(true),
        }
    }

    /// Rewrites the current archives under a records prefix one by one, from where the
    /// position stands, until the prefix is done (true) or the step's time is spent.
    async fn batch_rewrites(
        &self,
        unit: &Unit,
        run: &mut Run<'_>,
        clock: &mut Clock<'_>,
    ) -> Result<bool, Halt> {
        let Some(lookup) = &unit.lookup else {
            return Ok(true);
        };
        loop {
            let (entries, next) = self.list_objects(&unit.prefix, &run.walk.listing).await?;
            for entry in run.walk.fresh(entries) {
                if clock.stop() {
                    return Ok(false);
                }
                clock.worked = true;
                clock.budget.may_act()?;
                self.rewrite_for_batch(&entry.key, unit, lookup, run, clock.budget)
                    .await?;
                run.pos.skip += 1;
            }
            match next {
                Some(n) => run.walk.listing = n,
                None => return Ok(true),
            }
        }
    }

    /// Reads the archive's current version, and writes it back without the records of
    /// the members not held if it had any, only if nobody wrote in between (`If-Match`).
    /// The gate is asked right before the write: a member held since whose records the
    /// pass dropped sends the archive through the pass again. The intent written before
    /// the write attributes what it drops to members; the archive records the intent
    /// ([`Intent::marker`]) so that a lost step's rewrite is told from one never written.
    async fn rewrite_for_batch(
        &self,
        key: &str,
        unit: &Unit,
        lookup: &Arc<MemberLookup>,
        run: &mut Run<'_>,
        budget: &StepBudget,
    ) -> Result<(), Halt> {
        let mut seq = None;
        let mut last_conflict = None;
        let mut attempts = 0;
        while attempts < single::WRITE_ATTEMPTS {
            let mut fetched = self.fetch_current(key).await?;
            let before = run.excluded.clone();
            let pass = MemberPass::new(Arc::clone(lookup), &before);
            let (counts, pass, spool) = single::filter_to_spool(fetched.body, pass).await?;
            if !pass.removed_any() {
                run.malformed = run.malformed.saturating_add(counts.malformed);
                note_unparsed(run, unit, &pass, key, false);
                return Ok(());
            }
            run.ask_gate(budget).await?;
            let newly_held = unit
                .owners
                .iter()
                .any(|m| run.excluded.contains(m) && !before.contains(m));
            if newly_held {
                // Its records must stay: the archive goes through the pass again.
                continue;
            }
            attempts += 1;
            let removed = per_owner(unit, |m| pass.removed_copies(m));
            let total = removed
                .iter()
                .map(|(_, n)| *n)
                .fold(0u64, u64::saturating_add);
            let journal = run.journal()?;
            let seq = *seq.get_or_insert_with(|| journal.take_seq());
            let marker = Intent::marker(&journal.run, seq);
            let intent_key = intent::key(&journal.run, seq);
            if let Some(m) = fetched.metadata.metadata.as_mut() {
                single::record_dropped(m, &marker, total);
            }
            let batch = Intent {
                objects: vec![(key.to_string(), None)],
                members: vec![removed.iter().map(|(m, n)| (run.id(*m), *n)).collect()],
                rewrite: true,
                ..Intent::default()
            };
            self.put_intent(&intent_key, &batch).await?;
            budget.may_act()?;
            match self
                .put_conditional(key, spool, fetched.metadata, &fetched.etag)
                .await?
            {
                None => {
                    for (m, n) in &removed {
                        Run::add(&mut run.counts, *m, *n, false);
                    }
                    run.malformed = run.malformed.saturating_add(counts.malformed);
                    note_unparsed(run, unit, &pass, key, false);
                    if let Some(v) = fetched.version.filter(|_| run.versioned) {
                        run.replaced.push((
                            key.to_string(),
                            v,
                            removed.iter().map(|(m, _)| *m).collect(),
                        ));
                    }
                    return Ok(());
                }
                Some(conflict) => last_conflict = Some(conflict),
            }
        }
        Err(Halt::Failed(last_conflict.unwrap_or_else(|| {
            Error::Store("an archive kept changing during its rewrite".into())
        })))
    }

    /// Reads every version of every archive under a records prefix one by one (counted
    /// per member; an erase queues the older versions still holding records, and leaves
    /// the current ones and those kept), until the prefix is done (true) or the step's time
    /// is spent.
    async fn batch_versions(
        &self,
        unit: &Unit,
        run: &mut Run<'_>,
        clock: &mut Clock<'_>,
    ) -> Result<bool, Halt> {
        let Some(lookup) = &unit.lookup else {
            return Ok(true);
        };
        loop {
            let (entries, next) = if run.versioned {
                self.list_versions(&unit.prefix, &run.walk.listing).await?
            } else {
                self.list_objects(&unit.prefix, &run.walk.listing).await?
            };
            for entry in run.walk.fresh(entries) {
                if entry.delete_marker {
                    continue;
                }
                if clock.stop() {
                    return Ok(false);
                }
                let version = entry.version_id.as_deref();
                let kept = version.is_some_and(|v| run.pos.kept.iter().any(|k| k == v));
                if run.erase && (entry.latest || kept) {
                    run.pos.skip += 1;
                    continue;
                }
                clock.worked = true;
                let pass = MemberPass::new(Arc::clone(lookup), &BTreeSet::new());
                let (counts, pass) = self.scan_filter(&entry.key, version, pass).await?;
                run.malformed = run.malformed.saturating_add(counts.malformed);
                note_unparsed(run, unit, &pass, &entry.key, !entry.latest);
                let found = per_owner(unit, |m| pass.found_copies(m));
                for (m, n) in &found {
                    Run::add(&mut run.counts, *m, *n, false);
                }
                if run.erase && !found.is_empty() {
                    run.doomed.push((object_id(&entry.key, version)?, found));
                }
                run.pos.skip += 1;
            }
            match next {
                Some(n) => run.walk.listing = n,
                None => return Ok(true),
            }
        }
    }

    /// Settles the journal's intents (see [`S3Backend::settle_intents`]): what the lost
    /// ones removed, per member id.
    async fn settle_batch_intents(
        &self,
        journal: &mut Journal,
        versioned: bool,
    ) -> Result<BTreeMap<String, u64>, Error> {
        let mut lost = BTreeMap::new();
        for key in self.lost_intents(journal, versioned).await? {
            let batch = self.read_intent(&key).await?;
            let gone = if batch.rewrite {
                let seq = intent::seq_of(&journal.run, &key).unwrap_or(u64::MAX);
                let marker = Intent::marker(&journal.run, seq);
                let mut written = Vec::with_capacity(batch.objects.len());
                for (archive, _) in &batch.objects {
                    written.push(self.records_marker(archive, &marker).await?);
                }
                written
            } else {
                self.gone_in(&batch).await?
            };
            batch.attribute(&gone, &mut lost);
        }
        Ok(lost)
    }

    /// Whether the archive's current version records `marker` among the runs that dropped
    /// records from it (a rewrite under that intent was written).
    async fn records_marker(&self, key: &str, marker: &str) -> Result<bool, Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        match client
            .head_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(head) => Ok(single::dropped_by(
                head.metadata()
                    .and_then(|m| m.get(single::DROPPED))
                    .map(String::as_str),
                marker,
            ) > 0),
            Err(aws_sdk_s3::error::SdkError::ServiceError(e))
                if e.raw().status().as_u16() == 404 =>
            {
                Ok(false)
            }
            Err(e) => Err(super::sdk_error(e, "HeadObject")),
        }
    }
}

/// The walk a position resumes: from the start of its unit's listing, passing over what it
/// dealt with.
fn walk_at(pos: &BatchPosition) -> Walk {
    Walk {
        skip: pos.skip,
        skip_markers: pos.skip_markers,
        ..Walk::default()
    }
}

/// The unit's owners with a count that is not zero, each with it.
fn per_owner(unit: &Unit, count: impl Fn(usize) -> u64) -> Vec<(usize, u64)> {
    unit.owners
        .iter()
        .map(|m| (*m, count(*m)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Refused keys, each as often as refused.
fn refused_keys(done: &super::Deleted) -> BTreeMap<String, usize> {
    let mut refused = BTreeMap::new();
    for r in &done.refused {
        *refused.entry(r.key.clone()).or_default() += 1;
    }
    refused
}

fn take_refused(refused: &mut BTreeMap<String, usize>, key: &str) -> bool {
    match refused.get_mut(key) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    }
}

/// Lines not JSON holding a member's identifier that the pass of `key` kept: copies that
/// remain, each member's own. Told by Find and Verify only: an erase removes what it can,
/// and the verify after it reports the rest (nor does each checkpoint carry them).
fn note_unparsed(run: &mut Run<'_>, unit: &Unit, pass: &MemberPass, key: &str, older: bool) {
    if run.erase {
        return;
    }
    for m in &unit.owners {
        let kept = pass
            .unparsed
            .get(*m)
            .copied()
            .unwrap_or(0)
            .saturating_sub(pass.unparsed_removed.get(*m).copied().unwrap_or(0));
        if kept == 0 {
            continue;
        }
        let id = run.id(*m);
        let tally = run.pos.unparsed.entry(id).or_default();
        tally.lines = tally.lines.saturating_add(kept);
        tally.objects = tally.objects.saturating_add(1);
        let named = run.unparsed_named.entry(*m).or_default();
        if named.len() < single::NAMED_OBJECTS {
            named.push((key.to_string(), older, kept));
        }
    }
}

/// The failure of a finished Find or Verify resumed from a cursor of an earlier version,
/// which counted such lines for the batch, not per member: every member fails safe.
fn legacy_unparsed_failure(target: &str, lines: u64, not_distinctive: bool, drop: bool) -> Error {
    if not_distinctive {
        return Error::IdentifierNotDistinctive(format!(
            "target {target}: {lines} archive lines that are not JSON may hold a batch member's identifier, but a member's value cannot be told apart from other text (subject.s3.records.equals is a bare placeholder and the value is short or only digits): they are neither counted nor dropped; check and remove them by hand"
        ));
    }
    let hint = if drop {
        ""
    } else {
        "; set subject.s3.records.unparsedLines: DropMatching to drop them with the records, or remove them by hand"
    };
    Error::UnparsedCopiesRemain(format!(
        "target {target}: {lines} archive lines that are not JSON still hold a batch member's identifier{hint}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(id: &str, units: usize) -> Leader {
        Leader {
            id: id.into(),
            units: (0..units)
                .map(|u| Unit {
                    prefix: format!("p{u}/"),
                    owners: vec![0],
                    lookup: None,
                })
                .collect(),
        }
    }

    #[test]
    fn a_position_holds_for_any_subset_of_the_members() {
        let all = [
            leader("", 1),
            leader("0a", 2),
            leader("0b", 1),
            leader("0c", 1),
        ];
        let mut pos = BatchPosition::start(SubjectAction::Find);
        assert_eq!(pos.locate(&all), Some((0, 0)));
        pos.next_unit();
        assert_eq!(pos.locate(&all), Some((1, 0)));
        assert_eq!(pos.at.as_deref(), Some("0a"));
        pos.next_unit();
        pos.skip = 7;
        assert_eq!(pos.locate(&all), Some((1, 1)));
        assert_eq!(pos.skip, 7, "the position within the unit is kept");
        // Member 0a left the batch: the step goes on with the next member, from its start.
        let without = [leader("", 1), leader("0b", 1), leader("0c", 1)];
        let mut resumed = pos.clone();
        assert_eq!(resumed.locate(&without), Some((1, 0)));
        assert_eq!((resumed.at.as_deref(), resumed.skip), (Some("0b"), 0));
        // 0b left too, and 0c is the last: then nothing is left after it.
        let mut last = pos.clone();
        last.at = Some("0c".into());
        last.unit = 1;
        assert_eq!(last.locate(&without), None);
    }

    #[test]
    fn a_batch_cursor_round_trips_holds_no_key_and_refuses_what_no_step_writes() {
        let mut p = BatchPosition::start(SubjectAction::Erase);
        p.phase = REWRITE;
        p.at = Some("5f0c1e".into());
        p.skip = 3;
        p.kept = vec!["3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY".into()];
        p.journal = Some(Journal {
            run: "0a1b".into(),
            seq: 4,
            settled: false,
        });
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"a":"e","p":1,"at":"5f0c1e","u":0,"sv":3,"sm":0,"k":["3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"],"j":{"r":"0a1b","q":4}}"#
        );
        let read: BatchPosition = serde_json::from_str(&json).unwrap();
        assert_eq!(read, p);
        assert!(read.validate().is_ok());
        assert_eq!(BatchPosition::resume(Some(read), SubjectAction::Erase), p);
        assert_eq!(
            BatchPosition::resume(Some(p), SubjectAction::Find),
            BatchPosition::start(SubjectAction::Find),
            "another action starts over"
        );
        for bad in [
            r#"{"a":"x"}"#,
            r#"{"a":"e","p":3}"#,
            &format!(r#"{{"a":"e","at":"{}"}}"#, "a".repeat(300)),
        ] {
            let p: BatchPosition = serde_json::from_str(bad).unwrap();
            assert_eq!(p.validate().unwrap_err().reason(), "InvalidSpec", "{bad}");
        }
        assert!(serde_json::from_str::<BatchPosition>(r#"{"a":"e","key":"users/47/"}"#).is_err());
    }

    #[test]
    fn members_are_planned_by_id_and_a_shared_records_prefix_comes_first() {
        let target = serde_json::from_value(serde_json::json!({
            "name": "t", "store": "s", "s3": {"prefix": "app/"},
            "subject": {"s3": {"keyPrefixes": ["app/u/{userId}/"],
                "records": {"prefix": "app/logs/", "field": "to", "equals": "{email}"}}}
        }))
        .unwrap();
        let member = crate::backends::BatchMember::of;
        let job = BatchJob {
            target,
            action: SubjectAction::Find,
            members: vec![
                member("ff", &[("userId", "7"), ("email", "a@example.org")]),
                member("0a", &[("userId", "7"), ("email", "B@example.org")]),
                member("5c", &[("email", "c@example.org")]),
            ],
            gate: Arc::new(crate::backends::NoHolds),
        };
        let plan = plan(&job).unwrap();
        // Two members with the same user id share its prefix, led by the smaller id.
        assert_eq!(plan.prefixes.len(), 1);
        assert_eq!(plan.prefixes[0].id, "0a");
        assert_eq!(plan.prefixes[0].units[0].owners, vec![0, 1]);
        // One pass over the shared records prefix for all three.
        assert_eq!(plan.archives.len(), 1);
        assert_eq!(plan.archives[0].id, "");
        assert_eq!(plan.archives[0].units[0].owners, vec![0, 1, 2]);
        assert!(plan.members.iter().all(|m| m.ran));
        assert_eq!(
            plan.members[2].skipped,
            vec!["keyPrefixes[0] needs {userId}"]
        );
    }
}
