//! The retention sweep: the whole-index path first, then a `_delete_by_query` task,
//! submitted, polled (its id in the cursor), settled and submitted again while documents
//! changed under it, and its stored result deleted.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cursor::Cursor;
use super::index_path::FirstLook;
use super::task::{self, TaskProblem, TaskState};
use super::transport::{answer_error, Quote, LENIENT};
use super::{indices, query};
use super::{validate_target, ElasticsearchBackend};
use crate::api::StoreKind;
use crate::backends::driver::StoreDriver;
use crate::backends::{held_subject_locator, Error, Next, Step, StepBudget, SweepJob};

/// Consecutive transient failures (429, 5xx, no answer) of a task poll before the step
/// fails: the task goes on in the store meanwhile, so a short outage only delays the poll.
const POLL_ERRORS: u32 = 5;
/// Wait between task polls within one step (doubling).
const FIRST_INLINE_POLL: Duration = Duration::from_millis(100);
/// Pages of delete-by-query results in `.tasks` read to find a submission's task.
const STORED_PAGES: usize = 20;
const STORED_PAGE: usize = 500;

impl ElasticsearchBackend {
    /// Gives the cursor's deletion a task: with no marker in the cursor, only makes one
    /// (false: the step returns the cursor to be checkpointed before anything is
    /// submitted); with one, adopts the task submitted with that marker if the store has
    /// it (a step whose outcome was lost submitted it) or else submits one with it (after
    /// a refresh if `refresh`). True: `position.task` is set.
    pub(super) async fn adopt_or_submit(
        &self,
        position: &mut Cursor,
        pattern: &str,
        query: Value,
        quote: Quote,
        refresh: bool,
    ) -> Result<bool, Error> {
        let Some(marker) = position.marker.clone() else {
            let mut random = [0u8; 8];
            getrandom::fill(&mut random)
                .map_err(|e| Error::Store(format!("no randomness for a submission marker: {e}")))?;
            position.marker = Some(task::new_marker(
                chrono::Utc::now().timestamp_millis(),
                random,
            ));
            return Ok(false);
        };
        let task = match self.find_submitted(&marker).await? {
            Some(task) => {
                tracing::info!(
                    task,
                    "adopting the delete-by-query task an interrupted step submitted"
                );
                task
            }
            None => {
                if refresh {
                    self.refresh(pattern).await?;
                }
                self.submit(pattern, query, quote, &marker).await?
            }
        };
        position.task = Some(task);
        position.polls = 0;
        Ok(true)
    }

    /// The delete-by-query task submitted with `marker`, if the store has it: running (the
    /// task list, which shows each task's `X-Opaque-Id`) or finished (its stored result in
    /// `.tasks`, which keeps the header in its source but does not index it, so the
    /// delete-by-query results stored since the marker was made are read page by page).
    /// Not allowed to read `.tasks`: only running tasks are found (with a warning).
    pub(super) async fn find_submitted(&self, marker: &str) -> Result<Option<String>, Error> {
        let running = self
            .call(
                Method::GET,
                &["_tasks"],
                &[
                    ("actions", "*/delete/byquery"),
                    ("detailed", "true"),
                    ("group_by", "parents"),
                ],
                None,
                "_tasks",
                Quote::Reason,
            )
            .await?;
        if let Some(found) = task::running_with_marker(&running, marker) {
            return Ok(Some(found));
        }
        // A result is stored without a refresh: searchable only after one.
        let (status, answer) = self
            .send(
                Method::POST,
                &[".tasks", "_refresh"],
                &[],
                None,
                "POST .tasks/_refresh",
            )
            .await?;
        match status {
            200..=299 | 404 | 401 | 403 => {}
            _ => {
                return Err(answer_error(
                    "POST .tasks/_refresh",
                    status,
                    &answer,
                    Quote::Reason,
                ))
            }
        }
        let since = task::marker_time_ms(marker)
            .unwrap_or(0)
            .saturating_sub(task::MARKER_CLOCK_SKEW_MS);
        let mut after = None;
        for _ in 0..STORED_PAGES {
            let body = task::stored_tasks_search(since, STORED_PAGE, after.as_ref());
            let (status, answer) = self
                .send(
                    Method::POST,
                    &[".tasks", "_search"],
                    &[],
                    Some(&body),
                    "POST .tasks/_search",
                )
                .await?;
            match status {
                200..=299 => {}
                // No task result was ever stored.
                404 => return Ok(None),
                401 | 403 => {
                    tracing::warn!(
                        "not allowed to search .tasks: a finished task of an interrupted step is not found, and what it deleted is not counted"
                    );
                    return Ok(None);
                }
                _ => {
                    return Err(answer_error(
                        "POST .tasks/_search",
                        status,
                        &answer,
                        Quote::Reason,
                    ))
                }
            }
            let (found, next) = task::stored_with_marker(&answer, marker, STORED_PAGE);
            if found.is_some() {
                return Ok(found);
            }
            match next {
                Some(next) => after = Some(next),
                None => return Ok(None),
            }
        }
        Err(Error::Store(format!(
            "more than {} delete-by-query results stored in .tasks since the submission was named: cannot tell whether it was made",
            STORED_PAGES * STORED_PAGE
        )))
    }

    /// Submits a delete-by-query task named by `marker` and returns its id.
    pub(super) async fn submit(
        &self,
        pattern: &str,
        query: Value,
        quote: Quote,
        marker: &str,
    ) -> Result<String, Error> {
        let mut params = vec![
            ("wait_for_completion", "false"),
            ("conflicts", "proceed"),
            ("slices", "auto"),
        ];
        let throttle = self
            .config
            .delete_requests_per_second
            .map(|rate| rate.to_string());
        if let Some(rate) = &throttle {
            params.push(("requests_per_second", rate));
        }
        params.extend(LENIENT);
        let (status, answer) = self
            .send_named(
                Method::POST,
                &[pattern, "_delete_by_query"],
                &params,
                Some(&json!({"query": query})),
                "_delete_by_query",
                Some(marker),
            )
            .await?;
        if !(200..300).contains(&status) {
            return Err(answer_error("_delete_by_query", status, &answer, quote));
        }
        answer
            .get("task")
            .and_then(Value::as_str)
            .filter(|t| task::valid_task_id(t))
            .map(str::to_string)
            .ok_or_else(|| Error::Store("_delete_by_query: the answer has no task id".into()))
    }

    /// Polls the cursor's task until it completes or the step's time is up. Transient
    /// failures of the poll are counted in the cursor and retried later. A task the store
    /// no longer knows (404) is finished, lost.
    pub(super) async fn poll(
        &self,
        cursor: &mut Cursor,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<Polled, Error> {
        let task = cursor.task.clone().unwrap_or_default();
        let mut pause = FIRST_INLINE_POLL;
        loop {
            cursor.polls = cursor.polls.saturating_add(1);
            let answer = self
                .send(Method::GET, &["_tasks", &task], &[], None, "_tasks")
                .await
                .and_then(|(status, answer)| match status {
                    200..=299 => Ok(Some(answer)),
                    404 => Ok(None),
                    // Task answers name indices and actions, never the query.
                    _ => Err(answer_error("_tasks", status, &answer, Quote::Reason)),
                });
            let answer = match answer {
                Ok(Some(a)) => a,
                Ok(None) => {
                    return Ok(Polled::Done {
                        deleted: 0,
                        version_conflicts: 0,
                        problem: Some(TaskProblem::Lost),
                    })
                }
                Err(e @ Error::Unreachable(_)) => {
                    cursor.errors = cursor.errors.saturating_add(1);
                    if cursor.errors >= POLL_ERRORS {
                        return Err(e);
                    }
                    return Ok(Polled::Wait);
                }
                Err(e) => return Err(e),
            };
            cursor.errors = 0;
            match task::read_task(&answer) {
                Some(TaskState::Running) => {}
                Some(TaskState::Finished {
                    deleted,
                    version_conflicts,
                    problem,
                }) => {
                    return Ok(Polled::Done {
                        deleted,
                        version_conflicts,
                        problem,
                    })
                }
                None => {
                    return Err(Error::Store(format!(
                        "_tasks: unexpected answer for task {task}"
                    )))
                }
            }
            if Instant::now() + pause >= deadline || cancel.is_cancelled() {
                return Ok(Polled::Wait);
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                // Shutdown: the task runs on in the store; the cursor names it for the next
                // step to poll.
                _ = cancel.cancelled() => return Ok(Polled::Wait),
            }
            pause *= 2;
        }
    }

    /// Deletes the stored result of a finished task (`.tasks/_doc/<id>`), which
    /// `wait_for_completion=false` leaves behind. Already gone is fine; a store that refuses
    /// (no privilege on the `.tasks` system index) keeps it, with a warning.
    pub(super) async fn forget_task(&self, task: &str) -> Result<(), Error> {
        let (status, answer) = self
            .send(
                Method::DELETE,
                &[".tasks", "_doc", task],
                &[],
                None,
                "DELETE .tasks",
            )
            .await?;
        match status {
            200..=299 | 404 => Ok(()),
            401 | 403 => {
                tracing::warn!(
                    task,
                    "not allowed to delete the stored result of a finished task from .tasks: it stays"
                );
                Ok(())
            }
            _ => Err(answer_error(
                "DELETE .tasks",
                status,
                &answer,
                Quote::Reason,
            )),
        }
    }

    /// Waits (briefly) for a cancelled task to stop, deletes its stored result, and returns
    /// what it deleted before it stopped (as last seen, if it did not stop in time). Best
    /// effort: what is left stays in `.tasks` and does no harm.
    pub(super) async fn forget_cancelled(&self, task: &str) -> u64 {
        let stopped = self
            .send(
                Method::GET,
                &["_tasks", task],
                &[("wait_for_completion", "true"), ("timeout", "10s")],
                None,
                "_tasks",
            )
            .await;
        let mut deleted = 0;
        let forgotten = match stopped {
            Ok((200..=299, answer)) => {
                deleted = task::deleted_so_far(&answer);
                if answer.get("completed").and_then(Value::as_bool) == Some(true) {
                    self.forget_task(task).await
                } else {
                    Ok(())
                }
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = forgotten {
            tracing::warn!(task, reason = e.reason(), error = %e, "could not delete the stored result of a cancelled task");
        }
        deleted
    }

    /// The oldest timestamp among the documents a sweep keeps.
    async fn oldest_kept(
        &self,
        pattern: &str,
        field: &str,
        expired: &Value,
        quote: Quote,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, Error> {
        let answer = self
            .call(
                Method::POST,
                &[pattern, "_search"],
                &LENIENT,
                Some(&query::oldest_kept_search(field, expired)),
                "_search",
                quote,
            )
            .await?;
        Ok(query::read_oldest(&answer))
    }

    pub(super) async fn sweep(
        &self,
        job: &SweepJob,
        cursor: Option<Cursor>,
        budget: &StepBudget,
    ) -> Result<Step<Cursor>, Error> {
        validate_target(&job.target)?;
        // Even polling counts what a task deleted: a stale instance neither acts nor counts.
        budget.may_act()?;
        let es = <super::driver::ElasticsearchDriver as StoreDriver>::selector(&job.target)
            .ok_or_else(|| Error::InvalidSpec("target has no elasticsearch selector".into()))?;
        let (pattern, field) = (es.index.as_str(), es.timestamp_field.as_str());
        let deadline = Instant::now() + budget.max_time;
        let mut step = Step::default();
        let held = held_queries(job)?;
        // With held subjects the query carries identifiers: answers are reduced to their type.
        let quote = if held.is_empty() {
            Quote::Reason
        } else {
            Quote::TypeOnly
        };
        let expired = query::older_than_except(field, job.cutoff, &held);
        let mut position = match cursor {
            Some(c) => c,
            None => {
                // What is indexed but not yet searchable counts too, in both runs alike.
                self.refresh(pattern).await?;
                step.scanned = self
                    .count(pattern, json!({"match_all": {}}), Quote::Reason)
                    .await?;
                // Documents without the timestamp field are never deleted: counted, reported.
                step.unjudged = self.ages(pattern, field).await?.map_or(0, |a| a.missing);
                if !held.is_empty() {
                    step.held = self
                        .count(
                            pattern,
                            query::older_than_held(field, job.cutoff, &held),
                            Quote::TypeOnly,
                        )
                        .await?;
                }
                if job.dry_run {
                    // The fast path deletes only documents this range also counts.
                    step.deleted = self.count(pattern, expired.clone(), quote).await?;
                    step.oldest_remaining =
                        self.oldest_kept(pattern, field, &expired, quote).await?;
                    return Ok(step);
                }
                Cursor {
                    // No whole-index deletion while a subject is held: it would take theirs.
                    by_query: !held.is_empty(),
                    ..Cursor::default()
                }
            }
        };
        if job.dry_run {
            if let Some(done) = position.clean.as_deref() {
                self.forget_task(done).await?;
            }
            // Switched to a dry run mid-sweep: a block of the operator's own is lifted all
            // the same (that restores the index; it deletes nothing).
            if let Some(index) = position.blocking.as_deref() {
                if indices::index_matches(pattern, index) {
                    self.own_block(index, field, job.cutoff, budget, false)
                        .await?;
                }
            }
            return Ok(step);
        }
        if !held.is_empty() && !position.by_query {
            // A hold placed during a sweep: no whole-index deletion from here on.
            position.by_query = true;
            position.after = None;
        }
        match self
            .sweep_from(
                &mut position,
                &mut step,
                pattern,
                field,
                job,
                budget,
                deadline,
                (expired.clone(), quote),
            )
            .await
        {
            Ok(()) => {
                if step.next == Next::Done && step.failure.is_none() {
                    step.oldest_remaining =
                        self.oldest_kept(pattern, field, &expired, quote).await?;
                }
                Ok(step)
            }
            // Progress already made is kept: the counts and the position move together.
            Err(e)
                if step.deleted > 0
                    || position.task.is_some()
                    || position.marker.is_some()
                    || position.blocking.is_some()
                    || position.clean.is_some()
                    || position.attempts > 0 =>
            {
                step.failure = Some(e);
                step.next = Next::Continue(position.clone());
                Ok(step)
            }
            Err(e) => Err(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn sweep_from(
        &self,
        position: &mut Cursor,
        step: &mut Step<Cursor>,
        pattern: &str,
        field: &str,
        job: &SweepJob,
        budget: &StepBudget,
        deadline: Instant,
        (expired, quote): (Value, Quote),
    ) -> Result<(), Error> {
        if let Some(index) = position.blocking.clone() {
            // The operator's own block, named in the checkpoint before it was set: judge the
            // index again (or, the fast path being over, only lift the block).
            if !indices::index_matches(pattern, &index) {
                return Err(Error::InvalidSpec(format!(
                    "the cursor names index {index}, which the pattern does not"
                )));
            }
            if let Some(n) = self
                .own_block(&index, field, job.cutoff, budget, !position.by_query)
                .await?
            {
                tracing::info!(index = %index, documents = n, "deleted an index whose every document had expired");
                step.deleted += n;
            }
            position.blocking = None;
            if !position.by_query {
                position.after = Some(index);
            }
        }
        if !position.by_query {
            let mut judged = false;
            let write_indices = self.write_indices().await?;
            // Without the list of write indices no index is deleted whole.
            let indices = match write_indices {
                Some(_) => self.indices(pattern).await?,
                None => Vec::new(),
            };
            let write_indices = write_indices.unwrap_or_default();
            for index in indices {
                if position.after.as_ref().is_some_and(|a| &index <= a) {
                    continue;
                }
                // One index per step at least, so that even a tiny budget makes progress.
                if judged && (Instant::now() >= deadline || budget.cancel.is_cancelled()) {
                    step.next = Next::Continue(position.clone());
                    return Ok(());
                }
                match self
                    .first_look(&index, field, job.cutoff, &write_indices)
                    .await?
                {
                    FirstLook::Keep => {}
                    FirstLook::BlockedByOthers => {
                        // Writes are blocked already (not by us): judged again as they are.
                        if let Some(n) = self.judge_again(&index, field, job.cutoff, budget).await?
                        {
                            tracing::info!(index = %index, documents = n, "deleted an index whose every document had expired");
                            step.deleted += n;
                        }
                    }
                    FirstLook::NeedsBlock => {
                        // The index is named in the checkpoint before its writes are blocked,
                        // so a crash after the block leaves a cursor that lifts it.
                        position.blocking = Some(index);
                        step.next = Next::Continue(position.clone());
                        return Ok(());
                    }
                }
                position.after = Some(index);
                judged = true;
            }
            position.by_query = true;
            position.after = None;
        }
        if let Some(done) = position.clean.clone() {
            // The finished task's count is checkpointed (the previous step returned it with
            // this cursor): its stored result can go.
            self.forget_task(&done).await?;
            position.clean = None;
        }
        if position.settled {
            step.next = Next::Done;
            return Ok(());
        }
        if position.task.is_none() {
            if budget.cancel.is_cancelled() {
                // Stopped before the store was asked for anything: the next step submits.
                step.next = Next::Continue(position.clone());
                return Ok(());
            }
            budget.may_act()?;
            // What the task before deleted stays searchable until a refresh, and a new
            // task would count it again as version conflicts.
            let refresh = position.attempts > 0;
            if !self
                .adopt_or_submit(position, pattern, expired, quote, refresh)
                .await?
            {
                // The submission is named, and checkpointed before it is made.
                step.next = Next::Continue(position.clone());
                return Ok(());
            }
        }
        match self.poll(position, deadline, &budget.cancel).await? {
            Polled::Wait => step.next = task::wait(position),
            Polled::Done {
                deleted,
                version_conflicts,
                problem,
            } => {
                let settled = task::settle(position, deleted, version_conflicts, problem);
                // A sweep reports each task's count in the step that reads it, checkpointed
                // together with this cursor; the cursor need not carry it.
                position.deleted = 0;
                step.deleted += settled.deleted;
                // Conflicts of a task that is submitted again are not reported: the next
                // task meets those documents again.
                if settled.retrying.is_none() && settled.version_conflicts > 0 {
                    let n = settled.version_conflicts;
                    step.blocked += n;
                    step.blocked_items.push(format!(
                        "{n} documents in {pattern} (changed while delete-by-query ran: version conflicts; the next sweep takes them)"
                    ));
                }
                step.retrying = settled.retrying;
                step.failure = settled.failed;
                // Even when done, one more step deletes the task's stored result.
                step.next = Next::Continue(position.clone());
            }
        }
        Ok(())
    }
}

pub(super) enum Polled {
    Wait,
    Done {
        deleted: u64,
        version_conflicts: u64,
        problem: Option<TaskProblem>,
    },
}

/// The query of each held subject's documents in the target (from its subject locator).
fn held_queries(job: &SweepJob) -> Result<Vec<Value>, Error> {
    if job.held.is_empty() {
        return Ok(Vec::new());
    }
    let locator =
        held_subject_locator(&job.target, StoreKind::Elasticsearch, |s| s.elasticsearch())?;
    job.held
        .0
        .iter()
        .map(|ids| match query::expand_terms(&job.target.name, &locator.term, ids)? {
            Ok(terms) if !terms.is_empty() => Ok(query::subject_query(&terms)),
            _ => Err(Error::InvalidSpec(format!(
                "target {}: a subject held by a LegalHold cannot be excluded (the locator needs an identifier they lack); the target must be held",
                job.target.name
            ))),
        })
        .collect()
}
