//! Elasticsearch and OpenSearch, through the REST API both share.
//!
//! Retention: documents of the target's index pattern whose `timestampField` is older than
//! the sweep's cutoff are deleted with `_delete_by_query` (a `range` `lt` the absolute
//! cutoff), submitted with `wait_for_completion=false&conflicts=proceed&slices=auto` and then
//! polled through `_tasks/<id>`: the task id travels in the cursor, so a restarted operator
//! polls the same task instead of submitting another. Before that, each index the pattern
//! names whose every document is older than the cutoff (a `max` aggregation, no document
//! without the field) is deleted whole — the fast path for daily indices — but only after
//! its writes are blocked and it is refreshed and judged again, so a document written in the
//! meantime keeps the index. Documents changed while the task ran (version conflicts) are
//! left in place and reported as blocked; the next sweep takes them.
//!
//! Erasure: the locator's `term`s, all required (`bool`/`filter`), counted with `_count`
//! (Find, Verify, after a `_refresh`) or deleted with `_delete_by_query` (Erase, polled like
//! a sweep). `term` is exact on `keyword` fields; on an analysed `text` field it compares
//! with the field's tokens and would miss the subject, so a locator whose field is mapped
//! `text` in any index of the pattern is refused (`_mapping/field`), pointing at the
//! `keyword` sub-field (`user.email.keyword`). Values are canonical identifiers; a term whose
//! identifiers are all e-mail addresses is sent with `case_insensitive: true` (Elasticsearch
//! 7.10+, OpenSearch).
//!
//! Queries are JSON values built with `serde_json`, so no identifier can change their shape;
//! identifiers never appear in cursors, errors or logs (bodies of errors that answer a
//! request carrying an identifier are reduced to the error type).

pub mod query;

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::http::{self, HttpAuth};
use super::{
    held_subject_locator, subject_locator, Backend, Cancel, Error, Limits, Next, Step, StepBudget,
    SubjectAction, SubjectJob, SubjectStep, SweepJob,
};
use crate::api::retentionpolicy::Target;
use crate::api::StoreKind;
use query::{Cursor, TaskProblem, TaskState};

/// Consecutive transient failures (429, 5xx, no answer) of a task poll before the step
/// fails: the task goes on in the store meanwhile, so a short outage only delays the poll.
const POLL_ERRORS: u32 = 5;
/// Wait between task polls within one step (doubling).
const FIRST_INLINE_POLL: Duration = Duration::from_millis(100);
/// Multi-index parameters: a concrete index deleted by the fast path (or a pattern matching
/// nothing) is not an error.
const LENIENT: [(&str, &str); 2] = [("ignore_unavailable", "true"), ("allow_no_indices", "true")];

/// How to reach one Elasticsearch, resolved from a DataStore and its Secret.
#[derive(Clone, Debug, PartialEq)]
pub struct ElasticsearchConfig {
    /// Base URL, e.g. `https://es.logging.svc:9200`.
    pub url: String,
    pub auth: HttpAuth,
    /// `requests_per_second` of every `_delete_by_query` submitted; None: unthrottled.
    pub delete_requests_per_second: Option<u32>,
}

pub struct ElasticsearchBackend {
    config: ElasticsearchConfig,
    limits: Limits,
    client: OnceCell<reqwest::Client>,
}

/// Whether an error answer may be quoted: not when the request carried an identifier (the
/// store may echo the query back).
#[derive(Clone, Copy, PartialEq)]
enum Quote {
    Reason,
    TypeOnly,
}

impl ElasticsearchBackend {
    pub fn new(config: ElasticsearchConfig, limits: Limits) -> Self {
        Self {
            config,
            limits,
            client: OnceCell::new(),
        }
    }

    fn url(&self, segments: &[&str], params: &[(&str, &str)]) -> Result<url::Url, Error> {
        let mut url = url::Url::parse(&self.config.url).map_err(|e| {
            Error::InvalidSpec(format!(
                "invalid Elasticsearch URL {:?}: {e}",
                self.config.url
            ))
        })?;
        {
            let mut path = url.path_segments_mut().map_err(|_| {
                Error::InvalidSpec(format!("invalid Elasticsearch URL {:?}", self.config.url))
            })?;
            path.pop_if_empty();
            // Each segment is percent-encoded on its own: an index pattern or task id
            // cannot add path segments.
            path.extend(segments);
        }
        if !params.is_empty() {
            url.query_pairs_mut().extend_pairs(params);
        }
        Ok(url)
    }

    /// Sends one request and returns the status and the JSON answer (Null when the body is
    /// not JSON). Only a request that got no answer is an error here.
    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        params: &[(&str, &str)],
        body: Option<&Value>,
        what: &str,
    ) -> Result<(u16, Value), Error> {
        let client = self
            .client
            .get_or_try_init(|| async { http::client() })
            .await?;
        let url = self.url(segments, params)?;
        let mut request = client.request(method, url);
        if let Some(body) = body {
            request = request.json(body);
        }
        request = self.config.auth.apply(request);
        self.limits.acquire(1).await;
        let response = request
            .send()
            .await
            .map_err(|e| http::transport_error(what, &e))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .map_err(|e| http::transport_error(what, &e))?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// [`send`](Self::send), with anything but a 2xx answer as an error.
    async fn call(
        &self,
        method: Method,
        segments: &[&str],
        params: &[(&str, &str)],
        body: Option<&Value>,
        what: &str,
        quote: Quote,
    ) -> Result<Value, Error> {
        let (status, answer) = self.send(method, segments, params, body, what).await?;
        if (200..300).contains(&status) {
            Ok(answer)
        } else {
            Err(answer_error(what, status, &answer, quote))
        }
    }

    async fn refresh(&self, pattern: &str) -> Result<(), Error> {
        self.call(
            Method::POST,
            &[pattern, "_refresh"],
            &LENIENT,
            None,
            "_refresh",
            Quote::Reason,
        )
        .await
        .map(drop)
    }

    async fn count(&self, pattern: &str, query: Value, quote: Quote) -> Result<u64, Error> {
        let answer = self
            .call(
                Method::POST,
                &[pattern, "_count"],
                &LENIENT,
                Some(&json!({"query": query})),
                "_count",
                quote,
            )
            .await?;
        answer
            .get("count")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::Store("_count: the answer has no count".into()))
    }

    /// Submits a delete-by-query task and returns its id.
    async fn submit(&self, pattern: &str, query: Value, quote: Quote) -> Result<String, Error> {
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
        let answer = self
            .call(
                Method::POST,
                &[pattern, "_delete_by_query"],
                &params,
                Some(&json!({"query": query})),
                "_delete_by_query",
                quote,
            )
            .await?;
        answer
            .get("task")
            .and_then(Value::as_str)
            .filter(|t| query::valid_task_id(t))
            .map(str::to_string)
            .ok_or_else(|| Error::Store("_delete_by_query: the answer has no task id".into()))
    }

    /// Polls the cursor's task until it completes or the step's time is up. Transient
    /// failures of the poll are counted in the cursor and retried later. A task the store
    /// no longer knows (404) is finished, lost.
    async fn poll(&self, cursor: &mut Cursor, deadline: Instant) -> Result<Polled, Error> {
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
            match query::read_task(&answer) {
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
            if Instant::now() + pause >= deadline {
                return Ok(Polled::Wait);
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }

    /// Deletes the stored result of a finished task (`.tasks/_doc/<id>`), which
    /// `wait_for_completion=false` leaves behind. Already gone is fine; a store that refuses
    /// (no privilege on the `.tasks` system index) keeps it, with a warning.
    async fn forget_task(&self, task: &str) -> Result<(), Error> {
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

    /// After a cancel: waits a little for the task to stop, then deletes its stored result.
    /// Best effort: what is left stays in `.tasks` and does no harm.
    /// Waits (briefly) for a cancelled task to stop, deletes its stored result, and returns
    /// what it deleted before it stopped (as last seen, if it did not stop in time).
    async fn forget_cancelled(&self, task: &str) -> u64 {
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
                deleted = query::deleted_so_far(&answer);
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

    /// The open indices the pattern names itself, in name order.
    async fn indices(&self, pattern: &str) -> Result<Vec<String>, Error> {
        let (status, answer) = self
            .send(
                Method::GET,
                &["_cat", "indices", pattern],
                &[("format", "json"), ("h", "index,status")],
                None,
                "_cat/indices",
            )
            .await?;
        if status == 404 {
            return Ok(Vec::new());
        }
        if status == 403 {
            // Listing indices needs the `monitor` index privilege; without it there is no
            // fast path, and delete-by-query does all the work.
            tracing::warn!(
                pattern,
                "not allowed to list indices (_cat/indices): no whole-index deletion"
            );
            return Ok(Vec::new());
        }
        if !(200..300).contains(&status) {
            return Err(answer_error("_cat/indices", status, &answer, Quote::Reason));
        }
        let mut names: Vec<String> = answer
            .as_array()
            .ok_or_else(|| Error::Store("_cat/indices: the answer is not a list".into()))?
            .iter()
            .filter(|row| row.get("status").and_then(Value::as_str) == Some("open"))
            .filter_map(|row| row.get("index").and_then(Value::as_str))
            .filter(|name| query::index_matches(pattern, name))
            .map(str::to_string)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Refuses a locator whose `term` field is analysed (`text`) in some index of the
    /// pattern: the term would silently miss the subject's documents.
    async fn check_term_fields(&self, pattern: &str, fields: &[&String]) -> Result<(), Error> {
        let joined = fields
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let (status, answer) = self
            .send(
                Method::GET,
                &[pattern, "_mapping", "field", &joined],
                &LENIENT,
                None,
                "_mapping",
            )
            .await?;
        match status {
            200..=299 => {}
            // Reading mappings needs `view_index_metadata`; without it the check is skipped.
            403 => {
                tracing::warn!(
                    pattern,
                    "not allowed to read field mappings: term fields are not checked"
                );
                return Ok(());
            }
            404 => return Ok(()),
            _ => return Err(answer_error("_mapping", status, &answer, Quote::Reason)),
        }
        match query::analysed_fields(&answer).first() {
            Some((index, field, kind)) => Err(Error::InvalidSpec(format!(
                "subject.elasticsearch.term[{field}]: the field is mapped as {kind} in index {index}, so a term query compares with its analysed tokens and would miss the subject's documents; use a keyword field (often {field}.keyword)"
            ))),
            None => Ok(()),
        }
    }

    async fn ages(&self, index: &str, field: &str) -> Result<Option<query::IndexAges>, Error> {
        let answer = self
            .call(
                Method::POST,
                &[index, "_search"],
                &[],
                Some(&query::ages_search(field)),
                "_search",
                Quote::Reason,
            )
            .await?;
        Ok(query::read_ages(&answer))
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

    /// Whether `index.blocks.write` is set on the index.
    async fn write_blocked(&self, index: &str) -> Result<bool, Error> {
        let answer = self
            .call(
                Method::GET,
                &[index, "_settings"],
                &[],
                None,
                "_settings",
                Quote::Reason,
            )
            .await?;
        let value = answer.pointer(&format!(
            "/{}/settings/index/blocks/write",
            index.replace('~', "~0").replace('/', "~1")
        ));
        Ok(matches!(value, Some(Value::Bool(true)))
            || value.and_then(Value::as_str) == Some("true"))
    }

    /// Sets `index.blocks.write`, or (`on` false) removes the setting, so that lifting the
    /// operator's own block leaves the index's settings as they were. Returns false when the
    /// index does not exist (any more).
    async fn set_write_block(&self, index: &str, on: bool) -> Result<bool, Error> {
        let value = if on { Value::Bool(true) } else { Value::Null };
        let (status, answer) = self
            .send(
                Method::PUT,
                &[index, "_settings"],
                &[],
                Some(&json!({"index": {"blocks": {"write": value}}})),
                "_settings",
            )
            .await?;
        match status {
            200..=299 => Ok(true),
            404 => Ok(false),
            _ => Err(answer_error("_settings", status, &answer, Quote::Reason)),
        }
    }

    /// The indices that take writes for an alias or a data stream, which are never deleted
    /// whole; None when they cannot be listed (no permission), and then nothing is.
    async fn write_indices(&self) -> Result<Option<BTreeSet<String>>, Error> {
        let (status, aliases) = self
            .send(
                Method::GET,
                &["_cat", "aliases"],
                &[("format", "json"), ("h", "alias,index,is_write_index")],
                None,
                "_cat/aliases",
            )
            .await?;
        match status {
            200..=299 => {}
            401 | 403 => return Ok(None),
            _ => {
                return Err(answer_error(
                    "_cat/aliases",
                    status,
                    &aliases,
                    Quote::Reason,
                ))
            }
        }
        let (status, streams) = self
            .send(Method::GET, &["_data_stream"], &[], None, "_data_stream")
            .await?;
        let streams = match status {
            200..=299 => streams,
            // A server without data streams (before Elasticsearch 7.9) has none.
            400 | 404 | 405 => Value::Null,
            401 | 403 => return Ok(None),
            _ => {
                return Err(answer_error(
                    "_data_stream",
                    status,
                    &streams,
                    Quote::Reason,
                ))
            }
        };
        Ok(Some(query::write_indices(&aliases, &streams)))
    }

    /// First look at one index for the fast path (no change made).
    async fn first_look(
        &self,
        index: &str,
        field: &str,
        cutoff: chrono::DateTime<chrono::Utc>,
        write_indices: &BTreeSet<String>,
    ) -> Result<FirstLook, Error> {
        if !all_expired(&self.ages(index, field).await?, cutoff) {
            return Ok(FirstLook::Keep);
        }
        if write_indices.contains(index) {
            tracing::info!(index = %index, "every document expired, but the index takes writes for an alias or a data stream: not deleted whole");
            return Ok(FirstLook::Keep);
        }
        match self.write_blocked(index).await {
            Ok(true) => Ok(FirstLook::BlockedByOthers),
            Ok(false) => Ok(FirstLook::NeedsBlock),
            // Not allowed to read or change settings: no fast path, delete-by-query does it.
            Err(Error::AuthenticationFailed(_)) => Ok(FirstLook::Keep),
            Err(e) => Err(e),
        }
    }

    /// With writes blocked: refreshes the index, judges it again and deletes it if every
    /// document is still expired and it still takes no writes for an alias or data stream.
    /// Returns the documents deleted, or None when the index stays.
    async fn judge_again(
        &self,
        index: &str,
        field: &str,
        cutoff: chrono::DateTime<chrono::Utc>,
        budget: &StepBudget,
    ) -> Result<Option<u64>, Error> {
        self.refresh(index).await?;
        let Some(ages) = self.ages(index, field).await? else {
            return Ok(None);
        };
        if !query::whole_index_expired(&ages, cutoff) {
            return Ok(None);
        }
        if self
            .write_indices()
            .await?
            .is_none_or(|w| w.contains(index))
        {
            return Ok(None);
        }
        budget.may_act()?;
        self.call(
            Method::DELETE,
            &[index],
            &[],
            None,
            "DELETE index",
            Quote::Reason,
        )
        .await?;
        Ok(Some(ages.total))
    }

    /// The second half of the fast path for an index the operator blocks itself (named in
    /// the checkpointed cursor before the block is set): blocks writes, judges again, and
    /// deletes the index or lifts its block. Run again on resume after a crash, it lifts a
    /// block left behind. With `delete` false (the fast path is over, a dry run, a hold) the
    /// block is only lifted. Errors leave the cursor naming the index, so the next step
    /// lifts the block; a fenced-out instance leaves it to the leader.
    async fn own_block(
        &self,
        index: &str,
        field: &str,
        cutoff: chrono::DateTime<chrono::Utc>,
        budget: &StepBudget,
        delete: bool,
    ) -> Result<Option<u64>, Error> {
        budget.may_act()?;
        if delete {
            if !self.set_write_block(index, true).await? {
                return Ok(None);
            }
            let judged = self.judge_again(index, field, cutoff, budget).await;
            if matches!(judged, Ok(Some(_)) | Err(Error::LeadershipLost)) {
                return judged;
            }
            budget.may_act()?;
            self.lift_own_block(index).await?;
            return judged;
        }
        self.lift_own_block(index).await?;
        Ok(None)
    }

    async fn lift_own_block(&self, index: &str) -> Result<(), Error> {
        self.set_write_block(index, false)
            .await
            .map(drop)
            .map_err(|e| {
                Error::Store(format!(
                    "index {index} is still write-blocked (index.blocks.write) by the fast-path check; lifting it again on the next step: {e}"
                ))
            })
    }

    async fn sweep(
        &self,
        job: &SweepJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<Step, Error> {
        validate_target(&job.target)?;
        let es = job
            .target
            .elasticsearch
            .as_ref()
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
            Some(c) => Cursor::decode(c)?,
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
                if query::index_matches(pattern, index) {
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
                    || position.blocking.is_some()
                    || position.clean.is_some()
                    || position.attempts > 0 =>
            {
                step.failure = Some(e);
                step.next = Next::Continue(position.encode());
                Ok(step)
            }
            Err(e) => Err(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn sweep_from(
        &self,
        position: &mut Cursor,
        step: &mut Step,
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
            if !query::index_matches(pattern, &index) {
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
                    step.next = Next::Continue(position.encode());
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
                        step.next = Next::Continue(position.encode());
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
            if position.attempts > 0 {
                // What the task before deleted stays searchable until a refresh, and a new
                // task would count it again as version conflicts.
                self.refresh(pattern).await?;
            }
            let task = self.submit(pattern, expired, quote).await?;
            position.task = Some(task);
            position.polls = 0;
        }
        match self.poll(position, deadline).await? {
            Polled::Wait => {
                step.next = Next::Wait {
                    cursor: position.encode(),
                    poll_after: query::poll_delay(position.polls),
                };
            }
            Polled::Done {
                deleted,
                version_conflicts,
                problem,
            } => {
                let settled = query::settle(position, deleted, version_conflicts, problem);
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
                step.next = Next::Continue(position.encode());
            }
        }
        Ok(())
    }

    async fn subject(
        &self,
        job: &SubjectJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<SubjectStep, Error> {
        validate_target(&job.target)?;
        let name = &job.target.name;
        let pattern = job
            .target
            .elasticsearch
            .as_ref()
            .map(|e| e.index.as_str())
            .ok_or_else(|| {
                Error::InvalidSpec(format!("target {name} has no elasticsearch selector"))
            })?;
        let locator = subject_locator(&job.target, StoreKind::Elasticsearch, |s| {
            s.elasticsearch.as_ref()
        })?;
        let mut result = SubjectStep {
            count: 0,
            blocked: 0,
            malformed: 0,
            ran: false,
            skipped: Vec::new(),
            next: Next::Done,
            failure: None,
        };
        let terms = match query::expand_terms(&locator.term, &job.identifiers)? {
            Ok(terms) => terms,
            Err(skipped) => {
                result.skipped = skipped;
                return Ok(result);
            }
        };
        result.ran = true;
        if cursor.is_none() {
            let fields: Vec<&String> = terms.keys().collect();
            self.check_term_fields(pattern, &fields).await?;
        }
        let subject = query::subject_query(&terms);
        if job.action != SubjectAction::Erase {
            self.refresh(pattern).await?;
            result.count = self.count(pattern, subject, Quote::TypeOnly).await?;
            return Ok(result);
        }
        let deadline = Instant::now() + budget.max_time;
        let mut position = match cursor {
            Some(c) => Cursor::decode(c)?,
            None => Cursor::default(),
        };
        if let Some(done) = position.clean.clone() {
            // The count of that task is in the checkpointed cursor already.
            self.forget_task(&done).await?;
            position.clean = None;
        }
        if position.settled {
            // Documents changed while a task ran stay, and Verify counts them.
            result.count = position.deleted;
            return Ok(result);
        }
        if position.task.is_none() {
            // A document indexed a moment ago would otherwise escape the deletion.
            self.refresh(pattern).await?;
            position.task = Some(self.submit(pattern, subject, Quote::TypeOnly).await?);
            position.polls = 0;
        }
        match self.poll(&mut position, deadline).await {
            Ok(Polled::Wait) => {
                result.next = Next::Wait {
                    cursor: position.encode(),
                    poll_after: query::poll_delay(position.polls),
                }
            }
            Ok(Polled::Done {
                deleted,
                version_conflicts,
                problem,
            }) => {
                // The count travels in the cursor until the step that reports it (Done).
                let settled = query::settle(&mut position, deleted, version_conflicts, problem);
                result.failure = settled.retrying.or(settled.failed);
                result.next = Next::Continue(position.encode());
            }
            Err(e) => {
                // The task id is kept so a retry polls it rather than submitting again.
                result.failure = Some(e);
                result.next = Next::Continue(position.encode());
            }
        }
        Ok(result)
    }
}

enum Polled {
    Wait,
    Done {
        deleted: u64,
        version_conflicts: u64,
        problem: Option<TaskProblem>,
    },
}

/// The query of each held subject's documents in the target (from its subject locator).
/// What the first look at an index says about the fast path.
enum FirstLook {
    /// Not deleted whole: something is young or undated, or it takes writes.
    Keep,
    /// All expired, and writes are blocked already by someone else: judged again as it is.
    BlockedByOthers,
    /// All expired: to be judged again under the operator's own write block.
    NeedsBlock,
}

fn all_expired(ages: &Option<query::IndexAges>, cutoff: chrono::DateTime<chrono::Utc>) -> bool {
    ages.as_ref()
        .is_some_and(|a| query::whole_index_expired(a, cutoff))
}

fn held_queries(job: &SweepJob) -> Result<Vec<Value>, Error> {
    if job.held.is_empty() {
        return Ok(Vec::new());
    }
    let locator = held_subject_locator(&job.target, StoreKind::Elasticsearch, |s| {
        s.elasticsearch.as_ref()
    })?;
    job.held
        .0
        .iter()
        .map(|ids| match query::expand_terms(&locator.term, ids)? {
            Ok(terms) if !terms.is_empty() => Ok(query::subject_query(&terms)),
            _ => Err(Error::InvalidSpec(format!(
                "target {}: a subject held by a LegalHold cannot be excluded (the locator needs an identifier they lack); the target must be held",
                job.target.name
            ))),
        })
        .collect()
}

/// An error answer as an error of the backend's categories. Elasticsearch answers
/// `{"error": {"type": …, "reason": …}, "status": …}`; the reason is quoted only if the
/// request carried no identifier.
fn answer_error(what: &str, status: u16, answer: &Value, quote: Quote) -> Error {
    let kind = answer
        .pointer("/error/type")
        .and_then(Value::as_str)
        .or_else(|| answer.get("error").and_then(Value::as_str));
    let reason = answer.pointer("/error/reason").and_then(Value::as_str);
    let detail = match (kind, reason, quote) {
        (Some(k), Some(r), Quote::Reason) => format!("{k}: {r}"),
        (Some(k), _, _) => k.to_string(),
        (None, _, _) => String::new(),
    };
    let status = reqwest::StatusCode::from_u16(status).unwrap_or(reqwest::StatusCode::BAD_GATEWAY);
    http::status_error(what, status, &detail)
}

#[async_trait]
impl Backend for ElasticsearchBackend {
    fn kind(&self) -> StoreKind {
        StoreKind::Elasticsearch
    }

    /// Cancels a running delete-by-query task; what it deleted before stays deleted.
    /// Lifts the operator's own write block named in the cursor, if any, too.
    async fn cancel(&self, cursor: &str) -> Result<Cancel, Error> {
        let Ok(cursor) = Cursor::decode(cursor) else {
            return Ok(Cancel::Nothing);
        };
        if let Some(index) = cursor.blocking.as_deref() {
            self.lift_own_block(index).await?;
        }
        if let Some(done) = cursor.clean.as_deref() {
            self.forget_task(done).await?;
        }
        let Some(task) = cursor.task else {
            return Ok(Cancel::Nothing);
        };
        let (status, answer) = self
            .send(
                Method::POST,
                &["_tasks", &task, "_cancel"],
                &[],
                None,
                "_tasks/_cancel",
            )
            .await?;
        match status {
            // A task that finished is no longer running: the answer lists no task and says
            // why in `node_failures` (or, on some versions, is a 404). Not cancelled: a held
            // target keeps polling it for its count.
            200..=299 if cancel_found_no_task(&answer) => Ok(Cancel::TooLate),
            200..=299 => {
                let by_task = self.forget_cancelled(&task).await;
                Ok(Cancel::Cancelled {
                    deleted: cursor.deleted.saturating_add(by_task),
                })
            }
            404 => Ok(Cancel::TooLate),
            _ => Err(answer_error(
                "_tasks/_cancel",
                status,
                &answer,
                Quote::Reason,
            )),
        }
    }

    async fn probe(&self) -> Result<String, Error> {
        let answer = self
            .call(Method::GET, &[], &[], None, "GET /", Quote::Reason)
            .await?;
        describe(&answer).ok_or_else(|| {
            Error::Store(
                "GET /: not an Elasticsearch or OpenSearch answer (no version.number)".into(),
            )
        })
    }

    async fn sweep_step(
        &self,
        job: &SweepJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<Step, Error> {
        self.sweep(job, cursor, budget).await
    }

    async fn subject_step(
        &self,
        job: &SubjectJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<SubjectStep, Error> {
        self.subject(job, cursor, budget).await
    }
}

/// `elasticsearch 8.13.0` or `opensearch 2.11.0`, from the answer of `GET /`.
/// Whether a `_tasks/<id>/_cancel` answer names no cancelled task, only failures: the task
/// was no longer running (finished, or gone with its node).
fn cancel_found_no_task(answer: &Value) -> bool {
    let listed = |key: &str| {
        answer
            .get(key)
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    };
    let cancelled = answer
        .get("nodes")
        .and_then(Value::as_object)
        .is_some_and(|nodes| {
            nodes.values().any(|n| {
                n.get("tasks")
                    .and_then(Value::as_object)
                    .is_some_and(|t| !t.is_empty())
            })
        })
        || answer
            .get("tasks")
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty());
    !cancelled && (listed("node_failures") || listed("task_failures"))
}

fn describe(root: &Value) -> Option<String> {
    let number = root.pointer("/version/number")?.as_str()?;
    let flavour = match root
        .pointer("/version/distribution")
        .and_then(Value::as_str)
    {
        Some("opensearch") => "opensearch",
        _ => "elasticsearch",
    };
    Some(format!("{flavour} {number}"))
}

/// Checks an Elasticsearch target before anything runs (invariant 1: never outside the
/// selector).
pub fn validate_target(target: &Target) -> Result<(), Error> {
    let invalid = |m: String| Err(Error::InvalidSpec(format!("target {}: {m}", target.name)));
    let Some(es) = &target.elasticsearch else {
        return invalid("needs an elasticsearch selector for an elasticsearch store".into());
    };
    if query::matches_everything(&es.index) || query::unanchored_inclusion(&es.index).is_some() {
        if !target.allow_match_all {
            return invalid(format!(
                "index {:?} selects every index in the cluster (or every hidden one): each index it names needs a literal prefix with a letter or digit, such as \"logs-*\"; set allowMatchAll: true if that is really meant",
                es.index
            ));
        }
        if es.index.trim().is_empty() {
            return invalid("the index pattern is empty".into());
        }
    }
    if let Err(m) = query::check_pattern(&es.index) {
        return invalid(m);
    }
    if es.timestamp_field.trim().is_empty() {
        return invalid("timestampField is empty".into());
    }
    let Some(subject) = target
        .subject
        .as_ref()
        .and_then(|s| s.elasticsearch.as_ref())
    else {
        return Ok(());
    };
    if subject.term.is_empty() {
        return invalid("subject.elasticsearch.term names no field".into());
    }
    let mut names_identifier = false;
    for (field, value) in &subject.term {
        if field.trim().is_empty() {
            return invalid("subject.elasticsearch.term has an empty field name".into());
        }
        match super::template::check_bounded(value, super::template::Syntax::Exact) {
            Ok(names) => names_identifier |= !names.is_empty(),
            Err(m) => return invalid(format!("subject.elasticsearch.term[{field}] {value:?} {m}")),
        }
    }
    if !names_identifier {
        return invalid(
            "subject.elasticsearch.term names no identifier ({email}, {userId}, …): it would select the same documents for every subject"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::retentionpolicy::{ElasticsearchSubject, ElasticsearchTarget, SubjectLocator};

    #[test]
    fn a_cancel_answer_without_a_task_but_with_failures_is_too_late() {
        let finished = serde_json::json!({"nodes": {}, "node_failures": [{
            "type": "failed_node_exception",
            "caused_by": {"type": "resource_not_found_exception", "reason": "task [n:1] is not found"}}]});
        assert!(cancel_found_no_task(&finished));
        let cancelled =
            serde_json::json!({"nodes": {"n": {"tasks": {"n:1": {"cancelled": true}}}}});
        assert!(!cancel_found_no_task(&cancelled));
        let grouped = serde_json::json!({"tasks": [{"id": 1}]});
        assert!(!cancel_found_no_task(&grouped));
        assert!(!cancel_found_no_task(&serde_json::json!({})));
    }

    fn target(index: &str, terms: &[(&str, &str)]) -> Target {
        Target {
            name: "events".into(),
            store: "search".into(),
            redis: None,
            s3: None,
            loki: None,
            elasticsearch: Some(ElasticsearchTarget {
                index: index.into(),
                timestamp_field: "@timestamp".into(),
            }),
            subject: (!terms.is_empty()).then(|| SubjectLocator {
                elasticsearch: Some(ElasticsearchSubject {
                    term: terms
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                }),
                ..Default::default()
            }),
            allow_match_all: false,
        }
    }

    #[test]
    fn targets_that_could_widen_are_refused() {
        assert!(validate_target(&target("mailer-events-*", &[])).is_ok());
        for anchored in ["logs-*,-logs-old", ".kibana*", "a*", "logs,events-*"] {
            assert!(
                validate_target(&target(anchored, &[])).is_ok(),
                "{anchored}"
            );
        }
        for all in [
            "*",
            "_all",
            "logs-*,*",
            "*,-x",
            "*-*",
            ".*",
            "**",
            "logs-*,_all",
            "*logs",
        ] {
            let err = validate_target(&target(all, &[])).unwrap_err();
            assert!(err.to_string().contains("allowMatchAll"), "{err}");
            let mut allowed = target(all, &[]);
            allowed.allow_match_all = true;
            assert!(validate_target(&allowed).is_ok(), "{all}");
        }
        assert!(validate_target(&target("<logs-{now/d}>", &[])).is_err());
        assert!(validate_target(&target("remote:logs", &[])).is_err());
        let ok = [("user.email", "{email}"), ("tenant", "shop")];
        assert!(validate_target(&target("logs-*", &ok)).is_ok());
        for bad in [
            &[("user.email", "alice@example.org")][..],
            &[("user.email", "{email")][..],
            &[("", "{email}")][..],
            &[("user.id", "u{userId}")][..],
            &[("user.id", "{userId}{email}")][..],
        ] {
            assert!(validate_target(&target("logs-*", bad)).is_err(), "{bad:?}");
        }
        let mut no_es = target("logs-*", &[]);
        no_es.elasticsearch = None;
        assert!(validate_target(&no_es).is_err());
    }

    #[test]
    fn error_answers_are_quoted_only_when_no_identifier_was_sent() {
        let answer = json!({"error": {"type": "query_shard_exception",
            "reason": "failed to create query: user-47@example.org"}, "status": 400});
        let quoted = answer_error("_count", 400, &answer, Quote::Reason).to_string();
        assert!(quoted.contains("user-47@example.org"), "{quoted}");
        let reduced = answer_error("_count", 400, &answer, Quote::TypeOnly);
        assert_eq!(reduced.reason(), "StoreError");
        assert!(!reduced.to_string().contains("user-47"), "{reduced}");
        assert_eq!(
            answer_error(
                "GET /",
                401,
                &json!({"error": {"type": "security_exception"}}),
                Quote::Reason
            )
            .reason(),
            "AuthenticationFailed"
        );
        assert_eq!(
            answer_error("x", 429, &Value::Null, Quote::Reason).reason(),
            "Unreachable"
        );
        assert_eq!(
            answer_error("x", 503, &Value::Null, Quote::Reason).reason(),
            "Unreachable"
        );
    }

    #[test]
    fn the_probe_names_the_distribution_and_version() {
        assert_eq!(
            describe(&json!({"version": {"number": "8.13.0", "build_flavor": "default"}})),
            Some("elasticsearch 8.13.0".into())
        );
        assert_eq!(
            describe(&json!({"version": {"number": "2.11.0", "distribution": "opensearch"}})),
            Some("opensearch 2.11.0".into())
        );
        assert_eq!(describe(&json!({"ok": true})), None);
    }

    #[test]
    fn urls_keep_patterns_and_task_ids_inside_their_segment() {
        let backend = ElasticsearchBackend::new(
            ElasticsearchConfig {
                url: "http://es:9200/prefix/".into(),
                auth: HttpAuth::None,
                delete_requests_per_second: None,
            },
            Limits::default(),
        );
        let url = backend
            .url(&["logs-*,-logs-keep", "_count"], &LENIENT)
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://es:9200/prefix/logs-*,-logs-keep/_count?ignore_unavailable=true&allow_no_indices=true"
        );
        let url = backend.url(&["_tasks", "../_all"], &[]).unwrap();
        assert_eq!(url.path(), "/prefix/_tasks/..%2F_all");
    }
}
