//! Elasticsearch and OpenSearch, through the REST API both share.
//!
//! Retention: documents of the target's index pattern whose `timestampField` is older than
//! the sweep's cutoff are deleted with `_delete_by_query` (a `range` `lt` the absolute
//! cutoff), submitted with `wait_for_completion=false&conflicts=proceed&slices=auto` and then
//! polled through `_tasks/<id>`: the task id travels in the cursor, so a restarted operator
//! polls the same task instead of submitting another; and each submission is named first (a
//! random marker, checkpointed by a step of its own, sent as the `X-Opaque-Id`), so a step
//! resuming after a lost submitting step finds that task (the task list, or `.tasks`) and
//! adopts it rather than submitting another. Before that, each index the pattern
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
//!
//! `transport` sends the requests and maps the answers to errors, `index_path` is the
//! whole-index deletion, `sweep` the delete-by-query sweep and its task, `erasure` a
//! subject's documents, `batch` many subjects' in one pass (a chunk of members counted by one
//! search and deleted by one task). Pure: `query` builds the queries (ranges, subject terms) and reads
//! mappings, `indices` checks and matches index patterns and makes the fast-path decision,
//! `task` reads and settles delete-by-query tasks, `cursor` is where a step resumes;
//! `driver` registers the kind.

mod batch;
mod cursor;
pub mod driver;
mod erasure;
mod index_path;
pub mod indices;
pub mod query;
mod sweep;
pub mod task;
mod transport;

use async_trait::async_trait;
use reqwest::Method;
use serde_json::Value;

use super::driver::StoreBackend;
use super::http::{HttpAuth, HttpStore};
use super::{
    BatchJob, BatchStep, Cancel, Error, Limits, Step, StepBudget, SubjectJob, SubjectStep, SweepJob,
};
use crate::api::retentionpolicy::Target;
use crate::api::StoreKind;
pub use cursor::Cursor;
use transport::{answer_error, Quote};

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
    http: HttpStore,
}

impl ElasticsearchBackend {
    pub fn new(config: ElasticsearchConfig, limits: Limits) -> Self {
        Self {
            http: HttpStore::new(config.auth.clone(), limits),
            config,
        }
    }
}

#[async_trait]
impl StoreBackend for ElasticsearchBackend {
    const KIND: StoreKind = StoreKind::Elasticsearch;
    type Cursor = Cursor;

    fn legacy_cursor(text: &str) -> Option<Cursor> {
        Cursor::legacy(text)
    }

    /// Cancels a running delete-by-query task; what it deleted before stays deleted.
    /// Lifts the operator's own write block named in the cursor, if any, too.
    async fn cancel_deletion(&self, cursor: Cursor) -> Result<Cancel, Error> {
        if cursor.validate().is_err() {
            return Ok(Cancel::Nothing);
        }
        if let Some(index) = cursor.blocking.as_deref() {
            self.lift_own_block(index).await?;
        }
        if let Some(done) = cursor.clean.as_deref() {
            self.forget_task(done).await?;
        }
        // A submission whose step was lost is found by its marker.
        let task = match (cursor.task, cursor.marker.as_deref()) {
            (Some(task), _) => task,
            (None, Some(marker)) => match self.find_submitted(marker).await? {
                Some(task) => task,
                None => return Ok(Cancel::Nothing),
            },
            (None, None) => return Ok(Cancel::Nothing),
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

    async fn probe_store(&self) -> Result<String, Error> {
        let answer = self
            .call(Method::GET, &[], &[], None, "GET /", Quote::Reason)
            .await?;
        describe(&answer).ok_or_else(|| {
            Error::Store(
                "GET /: not an Elasticsearch or OpenSearch answer (no version.number)".into(),
            )
        })
    }

    async fn sweep(
        &self,
        job: &SweepJob,
        cursor: Option<Cursor>,
        budget: &StepBudget,
    ) -> Result<Step<Cursor>, Error> {
        if let Some(c) = &cursor {
            c.validate()?;
        }
        ElasticsearchBackend::sweep(self, job, cursor, budget).await
    }

    async fn subject(
        &self,
        job: &SubjectJob,
        cursor: Option<Cursor>,
        budget: &StepBudget,
    ) -> Result<SubjectStep<Cursor>, Error> {
        if let Some(c) = &cursor {
            c.validate()?;
        }
        ElasticsearchBackend::subject(self, job, cursor, budget).await
    }

    const BATCHES: bool = true;

    async fn subjects(
        &self,
        job: &BatchJob,
        cursor: Option<Cursor>,
        budget: &StepBudget,
    ) -> Result<BatchStep<Cursor>, Error> {
        if let Some(c) = &cursor {
            c.validate()?;
        }
        ElasticsearchBackend::subjects(self, job, cursor, budget).await
    }
}

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

/// `elasticsearch 8.13.0` or `opensearch 2.11.0`, from the answer of `GET /`.
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
    let Some(es) = <driver::ElasticsearchDriver as super::driver::StoreDriver>::selector(target)
    else {
        return invalid("needs an elasticsearch selector for an elasticsearch store".into());
    };
    if indices::matches_everything(&es.index) || indices::unanchored_inclusion(&es.index).is_some()
    {
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
    if let Err(m) = indices::check_pattern(&es.index) {
        return invalid(m);
    }
    if es.timestamp_field.trim().is_empty() {
        return invalid("timestampField is empty".into());
    }
    let Some(subject) = target.subject.as_ref().and_then(|s| s.elasticsearch()) else {
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
    use serde_json::json;

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
            selector: Some(crate::api::retentionpolicy::Selector::Elasticsearch(
                ElasticsearchTarget {
                    index: index.into(),
                    timestamp_field: "@timestamp".into(),
                },
            )),
            subject: (!terms.is_empty()).then(|| {
                SubjectLocator::Elasticsearch(ElasticsearchSubject {
                    term: terms
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                })
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
        no_es.selector = None;
        assert!(validate_target(&no_es).is_err());
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
}
