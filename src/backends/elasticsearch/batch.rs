//! Many subjects' documents in one pass: counted per member with one search per chunk
//! (Find, Verify), or deleted with one `_delete_by_query` task per chunk (Erase), submitted
//! by the single path's protocol (a marker checkpointed first, sent as the `X-Opaque-Id`, a
//! task of a lost step adopted). Members are taken in the order of their ids, so the cursor
//! holds ids and task ids, never an identifier or a member's place in the batch.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::Method;
use tokio::time::Instant;

use super::cursor::{BatchPosition, Cursor};
use super::erasure::pattern_and_locator;
use super::query::{self, Term};
use super::sweep::Polled;
use super::transport::{Quote, LENIENT};
use super::{task, ElasticsearchBackend};
use crate::backends::{BatchJob, BatchStep, Error, Next, StepBudget, SubjectAction};

/// Members of one deleted chunk at most: their counts travel in the cursor (by member id)
/// from before the submission until its task has finished.
const ERASE_CHUNK: usize = 100;

/// One running member: its place in the job and its filled-in terms.
type Running = (usize, BTreeMap<String, Term>);

impl ElasticsearchBackend {
    /// Each member's documents among `members`' (one search).
    async fn member_counts(
        &self,
        pattern: &str,
        members: &[&BTreeMap<String, Term>],
    ) -> Result<Vec<u64>, Error> {
        let answer = self
            .call(
                Method::POST,
                &[pattern, "_search"],
                &LENIENT,
                Some(&query::member_counts_search(members)),
                "_search",
                Quote::TypeOnly,
            )
            .await?;
        query::read_member_counts(&answer, members.len())
            .ok_or_else(|| Error::Store("_search: the answer has no count per subject".into()))
    }

    pub(super) async fn subjects(
        &self,
        job: &BatchJob,
        cursor: Option<Cursor>,
        budget: &StepBudget,
    ) -> Result<BatchStep<Cursor>, Error> {
        let (pattern, locator) = pattern_and_locator(&job.target)?;
        let name = &job.target.name;
        let mut step = BatchStep::empty(job.members.len(), Next::Done);
        let mut running: Vec<Running> = Vec::new();
        for (i, member) in job.members.iter().enumerate() {
            match query::expand_terms(name, &locator.term, &member.identifiers)? {
                Ok(terms) => {
                    step.members[i].ran = true;
                    running.push((i, terms));
                }
                Err(skipped) => step.members[i].skipped = skipped,
            }
        }
        let id = |i: usize| job.members[i].id.as_str();
        running.sort_by(|a, b| id(a.0).cmp(id(b.0)));
        let Some((_, first)) = running.first() else {
            return Ok(step);
        };
        if cursor.is_none() {
            let fields: Vec<&String> = first.keys().collect();
            self.check_term_fields(pattern, &fields).await?;
        }
        let mut position = cursor.unwrap_or_default();
        let batch = position.batch.take().unwrap_or_default();
        if job.action != SubjectAction::Erase {
            self.count_batch(pattern, &running, batch, &mut step, budget, job)
                .await?;
            return Ok(step);
        }
        position.batch = Some(batch);
        // Even polling counts what a task erased: a stale instance neither acts nor counts.
        budget.may_act()?;
        let deadline = Instant::now() + budget.max_time;
        if let Err(e) = self
            .erase_batch(
                pattern,
                &running,
                &mut position,
                &mut step,
                budget,
                job,
                deadline,
            )
            .await
        {
            // Nothing is lost: the marker names a submission that may have been made, the
            // task id a task to poll again, and the counts wait for that task.
            step.failure = Some(e);
            step.next = Next::Continue(position);
        }
        Ok(step)
    }

    /// Find and Verify: each chunk's members counted by one search, chunk after chunk
    /// within the step's time (one at least).
    async fn count_batch(
        &self,
        pattern: &str,
        running: &[Running],
        mut batch: BatchPosition,
        step: &mut BatchStep<Cursor>,
        budget: &StepBudget,
        job: &BatchJob,
    ) -> Result<(), Error> {
        let id = |i: usize| job.members[i].id.as_str();
        self.refresh(pattern).await?;
        let deadline = Instant::now() + budget.max_time;
        let mut first = true;
        loop {
            let rest: Vec<&Running> = running
                .iter()
                .filter(|(i, _)| batch.after.as_deref().is_none_or(|a| id(*i) > a))
                .collect();
            if rest.is_empty() {
                step.next = Next::Done;
                return Ok(());
            }
            if !first && (Instant::now() >= deadline || budget.cancel.is_cancelled()) {
                step.next = Next::Continue(Cursor {
                    batch: Some(batch),
                    ..Cursor::default()
                });
                return Ok(());
            }
            first = false;
            let terms: Vec<&BTreeMap<String, Term>> = rest.iter().map(|(_, t)| t).collect();
            let chunk = &terms[..query::chunk_limit(&terms).min(terms.len())];
            let counts = self.member_counts(pattern, chunk).await?;
            for ((i, _), n) in rest.iter().zip(counts) {
                step.members[*i].count = step.members[*i].count.saturating_add(n);
            }
            batch.after = rest
                .get(chunk.len().saturating_sub(1))
                .map(|(i, _)| id(*i).to_string());
        }
    }

    /// Erase: one chunk's deletion at a time, in steps of its own: name the chunk (its last
    /// member, a marker, the counts so far) and checkpoint; ask the gate, count each
    /// member's documents and submit (or adopt the task a lost step submitted); poll;
    /// report the counts once the task has finished; clean up its result, next chunk.
    #[allow(clippy::too_many_arguments)]
    async fn erase_batch(
        &self,
        pattern: &str,
        running: &[Running],
        position: &mut Cursor,
        step: &mut BatchStep<Cursor>,
        budget: &StepBudget,
        job: &BatchJob,
        deadline: Instant,
    ) -> Result<(), Error> {
        let id = |i: usize| job.members[i].id.as_str();
        let mut excluded: BTreeSet<usize> = BTreeSet::new();
        if let Some(done) = position.clean.take() {
            // The counts of that task are checkpointed already (the step before reported them).
            if let Err(e) = self.forget_task(&done).await {
                position.clean = Some(done);
                return Err(e);
            }
        }
        let batch = position.batch.clone().unwrap_or_default();
        let after = batch.after.clone();
        let later = |i: usize| after.as_deref().is_none_or(|a| id(i) > a);
        let Some(upto) = batch.upto.clone() else {
            // No chunk under way: name the next one.
            let rest: Vec<&Running> = running.iter().filter(|(i, _)| later(*i)).collect();
            if rest.is_empty() {
                step.next = Next::Done;
                return Ok(());
            }
            if budget.cancel.is_cancelled() {
                step.next = Next::Continue(position.clone());
                return Ok(());
            }
            let terms: Vec<&BTreeMap<String, Term>> = rest.iter().map(|(_, t)| t).collect();
            let size = query::chunk_limit(&terms).min(ERASE_CHUNK).min(rest.len());
            let chunk = &rest[..size];
            let counts = self
                .counts_by_id(pattern, chunk.iter().map(|(i, t)| (id(*i), t)))
                .await?;
            position.batch = Some(BatchPosition {
                after,
                upto: chunk.last().map(|(i, _)| id(*i).to_string()),
                counts,
            });
            self.name_submission(position)?;
            // The submission is named, and checkpointed before it is made.
            step.next = Next::Continue(position.clone());
            return Ok(());
        };
        let in_chunk = |i: usize| later(i) && id(i) <= upto.as_str();
        if position.settled {
            // The chunk's task finished and the step that saw it failed after: report.
            self.finish_chunk(position, running, step, job, &in_chunk);
            return Ok(());
        }
        if position.task.is_none() {
            let Some(marker) = position.marker.clone() else {
                // A task of this chunk ended badly: the next submission is named afresh.
                self.name_submission(position)?;
                step.next = Next::Continue(position.clone());
                return Ok(());
            };
            if budget.cancel.is_cancelled() {
                step.next = Next::Continue(position.clone());
                return Ok(());
            }
            budget.may_act()?;
            let submitted = self.find_submitted(&marker).await?;
            match job.gate.held().await {
                Ok(held) => excluded.extend(held),
                Err(e) => {
                    step.next = Next::Continue(position.clone());
                    step.failure = Some(e);
                    return Ok(());
                }
            }
            step.held.clone_from(&excluded);
            match submitted {
                Some(task) => {
                    tracing::info!(
                        task,
                        "adopting the delete-by-query task an interrupted step submitted"
                    );
                    // That step left the members held then out, and holds stay: the
                    // members held now had nothing deleted (the counts are the naming
                    // step's, the documents being gone from a new count).
                    if let Some(b) = position.batch.as_mut() {
                        for i in &excluded {
                            if let Some(member) = job.members.get(*i) {
                                b.counts.remove(&member.id);
                            }
                        }
                    }
                    position.task = Some(task);
                }
                None => {
                    let chunk: Vec<&Running> = running
                        .iter()
                        .filter(|(i, _)| in_chunk(*i) && !excluded.contains(i))
                        .collect();
                    if chunk.is_empty() {
                        // Every member of the chunk is held: nothing to delete.
                        position.marker = None;
                        self.finish_chunk(position, running, step, job, &|_| false);
                        return Ok(());
                    }
                    let terms: Vec<&BTreeMap<String, Term>> =
                        chunk.iter().map(|(_, t)| t).collect();
                    // A document indexed a moment ago would otherwise escape the deletion.
                    self.refresh(pattern).await?;
                    if position.deleted == 0 {
                        // Nothing of this chunk is deleted yet: what is there now is what
                        // the task deletes. (After a task that ended badly, the first
                        // counts stand: its documents are gone from a new count.)
                        let counts = self
                            .counts_by_id(pattern, chunk.iter().map(|(i, t)| (id(*i), t)))
                            .await?;
                        if let Some(b) = position.batch.as_mut() {
                            b.counts = counts;
                        }
                    }
                    budget.may_act()?;
                    let task = self
                        .submit(
                            pattern,
                            query::chunk_query(&terms),
                            Quote::TypeOnly,
                            &marker,
                        )
                        .await?;
                    position.task = Some(task);
                }
            }
            position.polls = 0;
        }
        match self.poll(position, deadline, &budget.cancel).await? {
            Polled::Wait => step.next = task::wait(position),
            Polled::Done {
                deleted,
                version_conflicts,
                problem,
            } => {
                let settled = task::settle(position, deleted, version_conflicts, problem);
                step.failure = settled.retrying.or(settled.failed);
                if position.settled {
                    if settled.version_conflicts > 0 {
                        // Documents changed while the task ran stay (Verify finds them, and
                        // they are erased again): not counted as erased now.
                        self.refresh(pattern).await?;
                        let chunk = running.iter().filter(|(i, _)| in_chunk(*i));
                        let left = self
                            .counts_by_id(pattern, chunk.map(|(i, t)| (id(*i), t)))
                            .await?;
                        if let Some(b) = position.batch.as_mut() {
                            for (member, n) in left {
                                if let Some(count) = b.counts.get_mut(&member) {
                                    *count = count.saturating_sub(n);
                                }
                            }
                        }
                    }
                    // Reported with the cursor that cleans the task's result up next.
                    self.finish_chunk(position, running, step, job, &in_chunk);
                } else {
                    step.next = Next::Continue(position.clone());
                }
            }
        }
        Ok(())
    }

    /// Each member's documents by member id (zero counts left out).
    async fn counts_by_id<'a>(
        &self,
        pattern: &str,
        members: impl Iterator<Item = (&'a str, &'a BTreeMap<String, Term>)>,
    ) -> Result<BTreeMap<String, u64>, Error> {
        let (ids, terms): (Vec<&str>, Vec<&BTreeMap<String, Term>>) = members.unzip();
        if ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let counts = self.member_counts(pattern, &terms).await?;
        Ok(ids
            .into_iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|(id, n)| (id.to_string(), n))
            .collect())
    }

    /// Names the chunk's next submission in the cursor.
    fn name_submission(&self, position: &mut Cursor) -> Result<(), Error> {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random)
            .map_err(|e| Error::Store(format!("no randomness for a submission marker: {e}")))?;
        position.marker = Some(task::new_marker(
            chrono::Utc::now().timestamp_millis(),
            random,
        ));
        Ok(())
    }

    /// The chunk is done: its counts go to the members of the job in it, and the next
    /// chunk starts after its last member.
    fn finish_chunk(
        &self,
        position: &mut Cursor,
        running: &[Running],
        step: &mut BatchStep<Cursor>,
        job: &BatchJob,
        in_chunk: &dyn Fn(usize) -> bool,
    ) {
        let batch = position.batch.take().unwrap_or_default();
        for (i, _) in running.iter().filter(|(i, _)| in_chunk(*i)) {
            if let Some(n) = batch.counts.get(&job.members[*i].id) {
                step.members[*i].count = step.members[*i].count.saturating_add(*n);
            }
        }
        position.batch = Some(BatchPosition {
            after: batch.upto.or(batch.after),
            upto: None,
            counts: BTreeMap::new(),
        });
        position.settled = false;
        position.deleted = 0;
        position.attempts = 0;
        // Even the last chunk: one more step deletes the task's stored result.
        step.next = Next::Continue(position.clone());
    }
}
