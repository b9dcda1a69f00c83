//! Pure parts of the Elasticsearch backend: query DSL built as JSON values (never by string
//! concatenation, so an identifier holding `"`, `\`, `|` or `}` stays one string value),
//! index-pattern checks and matching, the fast-path decision, and the cursor.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::backends::Error;
use crate::backends::{identifier, template};

/// Documents older than this are deleted: `range` with `lt` on the timestamp field, with the
/// absolute cutoff (not `now-30d`), so a resumed step and a dry run judge the same instant.
/// The cutoff is cut to milliseconds downwards: never later than the sweep's cutoff.
pub fn older_than(timestamp_field: &str, cutoff: DateTime<Utc>) -> Value {
    json!({"range": {timestamp_field: {
        "lt": cutoff.to_rfc3339_opts(SecondsFormat::Millis, true),
        // How to read `lt` whatever format the field is mapped with.
        "format": "strict_date_optional_time",
    }}})
}

/// One `term` of a subject locator, filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    /// The template filled with canonical identifier values.
    pub value: String,
    /// Compared without case (`case_insensitive`, Elasticsearch 7.10+ and OpenSearch): the
    /// template's identifiers are all e-mail addresses.
    pub case_insensitive: bool,
}

/// Expired documents except those of the subjects a LegalHold holds (`held`: one
/// [`subject_query`] each). Without held subjects, exactly [`older_than`].
pub fn older_than_except(timestamp_field: &str, cutoff: DateTime<Utc>, held: &[Value]) -> Value {
    if held.is_empty() {
        return older_than(timestamp_field, cutoff);
    }
    json!({"bool": {
        "filter": [older_than(timestamp_field, cutoff)],
        "must_not": held,
    }})
}

/// The search for the oldest timestamp among the documents a sweep keeps (those `expired`
/// does not match): what remains after the sweep, in a dry run too.
pub fn oldest_kept_search(timestamp_field: &str, expired: &Value) -> Value {
    json!({
        "size": 0,
        "query": {"bool": {"must_not": [expired]}},
        "aggs": {"oldest": {"min": {"field": timestamp_field}}},
    })
}

/// Reads an [`oldest_kept_search`] answer (None: no kept document has the field).
pub fn read_oldest(answer: &Value) -> Option<DateTime<Utc>> {
    let ms = answer.pointer("/aggregations/oldest/value")?.as_f64()?;
    if !ms.is_finite() {
        return None;
    }
    DateTime::from_timestamp_millis(ms as i64)
}

/// Expired documents of the held subjects: what [`older_than_except`] keeps.
pub fn older_than_held(timestamp_field: &str, cutoff: DateTime<Utc>, held: &[Value]) -> Value {
    json!({"bool": {
        "filter": [older_than(timestamp_field, cutoff), {"bool": {"should": held}}],
    }})
}

/// The subject's documents: every `term` of the locator, all of them required. `terms` are
/// field → filled-in value. Find, erase and verify all send this query.
pub fn subject_query(terms: &BTreeMap<String, Term>) -> Value {
    let filters: Vec<Value> = terms
        .iter()
        .map(|(field, term)| {
            if term.case_insensitive {
                json!({"term": {field: {"value": term.value, "case_insensitive": true}}})
            } else {
                json!({"term": {field: {"value": term.value}}})
            }
        })
        .collect();
    json!({"bool": {"filter": filters}})
}

/// Fills in the locator's value templates with canonical identifier values
/// ([`identifier::fill`]). `Ok(Err(skipped))`: the subject lacks an identifier one of them
/// needs, so the whole locator is skipped (terms are combined with AND: running the others
/// alone would select more than the subject's documents).
pub fn expand_terms(
    terms: &BTreeMap<String, String>,
    identifiers: &BTreeMap<String, String>,
) -> Result<Result<BTreeMap<String, Term>, Vec<String>>, Error> {
    let mut out = BTreeMap::new();
    let mut skipped = Vec::new();
    for (field, t) in terms {
        match identifier::fill(t, identifiers) {
            Ok(filled) => {
                out.insert(
                    field.clone(),
                    Term {
                        value: filled.text(),
                        case_insensitive: filled.folds_whole_value(),
                    },
                );
            }
            Err(template::Error::MissingIdentifier(name)) => {
                skipped.push(format!("term[{field}] needs {{{name}}}"));
            }
            Err(template::Error::Malformed) => {
                return Err(Error::InvalidSpec(format!(
                    "subject.elasticsearch.term[{field}] is not a valid template"
                )))
            }
        }
    }
    Ok(if skipped.is_empty() {
        Ok(out)
    } else {
        Err(skipped)
    })
}

/// Whether an index pattern selects every index (`*`, `_all`, `**`, or a list with such an
/// element).
pub fn matches_everything(pattern: &str) -> bool {
    pattern.trim().is_empty()
        || pattern.split(',').any(|p| {
            let p = p.trim();
            p == "_all" || (!p.starts_with('-') && p.chars().all(|c| c == '*'))
        })
}

/// The first inclusion of `pattern` that names no index by a literal prefix: the text before
/// its first `*` must hold a letter or digit. `*`, `*-x`, `.*`, `-*` select every (hidden)
/// index whatever they are spelt like; `logs-*` and `.kibana*` are anchored.
pub fn unanchored_inclusion(pattern: &str) -> Option<&str> {
    pattern.split(',').map(str::trim).find(|p| {
        !p.starts_with('-')
            && (*p == "_all"
                || !p
                    .split('*')
                    .next()
                    .is_some_and(|prefix| prefix.chars().any(|c| c.is_alphanumeric())))
    })
}

/// Checks an index pattern: a comma-separated list of index names with `*` wildcards and
/// `-` exclusions. Date math (`<…>`), remote clusters (`a:b`) and characters Elasticsearch
/// forbids in index names are refused, so the pattern means the same to the store as to
/// [`index_matches`].
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.trim().is_empty() {
        return Err("the index pattern is empty".into());
    }
    for (i, part) in pattern.split(',').enumerate() {
        let name = part.strip_prefix('-').unwrap_or(part);
        if name.is_empty() {
            return Err(format!("{pattern:?} has an empty element"));
        }
        if i == 0 && part.starts_with('-') {
            return Err(format!(
                "{pattern:?} starts with an exclusion; name the indices first"
            ));
        }
        if let Some(c) = name.chars().find(|c| {
            matches!(
                c,
                ' ' | '"' | '\\' | '/' | '?' | '<' | '>' | '|' | '#' | ':' | '{' | '}'
            ) || c.is_uppercase()
                || c.is_control()
        }) {
            return Err(format!(
                "{pattern:?} contains {c:?}, which is not allowed in an index pattern (lower-case names, `*` wildcards and `-` exclusions only; no date math or remote clusters)"
            ));
        }
    }
    Ok(())
}

/// Whether `index` is selected by `pattern`: named by an inclusion and by no exclusion. Used
/// to keep the fast path (whole-index deletion) to indices the pattern names itself; an
/// alias or data stream resolves to indices of other names, which are never deleted whole.
pub fn index_matches(pattern: &str, index: &str) -> bool {
    let mut included = false;
    for part in pattern.split(',') {
        match part.strip_prefix('-') {
            Some(excluded) => {
                if glob(excluded, index) {
                    return false;
                }
            }
            None => included |= glob(part, index),
        }
    }
    included
}

/// `*`-only glob matching.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            pi += 1;
            mark = ti;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A margin below the cutoff for the fast path: the `max` aggregation answers in (possibly
/// rounded) milliseconds, and an index that close to the cutoff is cheap to handle by query.
pub const FAST_PATH_MARGIN_MS: i64 = 1000;

/// What the fast-path probe of one index found.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexAges {
    /// Documents in the index.
    pub total: u64,
    /// Documents without the timestamp field.
    pub missing: u64,
    /// The newest timestamp, epoch milliseconds (None: no document has the field).
    pub max_ms: Option<f64>,
}

/// Whether the whole index may be deleted: it holds documents, every one has the timestamp
/// field, and the newest is older than the cutoff. A document without the field, or an
/// unknown maximum, keeps the index (delete-by-query would keep such documents too).
pub fn whole_index_expired(ages: &IndexAges, cutoff: DateTime<Utc>) -> bool {
    let limit = (cutoff.timestamp_millis() - FAST_PATH_MARGIN_MS) as f64;
    ages.total > 0 && ages.missing == 0 && ages.max_ms.is_some_and(|m| m.is_finite() && m < limit)
}

/// The search that judges one index for the fast path.
pub fn ages_search(timestamp_field: &str) -> Value {
    json!({
        "size": 0,
        "track_total_hits": true,
        "aggs": {
            "newest": {"max": {"field": timestamp_field}},
            "undated": {"missing": {"field": timestamp_field}},
        }
    })
}

/// Reads an [`ages_search`] answer.
pub fn read_ages(answer: &Value) -> Option<IndexAges> {
    let total = answer.pointer("/hits/total/value")?.as_u64()?;
    if answer
        .pointer("/hits/total/relation")
        .and_then(Value::as_str)
        != Some("eq")
    {
        return None;
    }
    let missing = answer
        .pointer("/aggregations/undated/doc_count")?
        .as_u64()?;
    let max_ms = answer
        .pointer("/aggregations/newest/value")
        .and_then(Value::as_f64);
    Some(IndexAges {
        total,
        missing,
        max_ms,
    })
}

/// Field types on which `term` compares with analysed tokens rather than the whole value:
/// a subject's `Alice@Example.org` would match nothing there, and the erasure would report
/// nothing found while the documents stay.
const ANALYSED: [&str; 4] = [
    "text",
    "match_only_text",
    "search_as_you_type",
    "annotated_text",
];

/// The (index, field, type) of every analysed field in a `GET <index>/_mapping/field/<fields>`
/// answer.
pub fn analysed_fields(answer: &Value) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for (index, body) in answer.as_object().into_iter().flatten() {
        for (field, m) in body
            .get("mappings")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let types = m
                .get("mapping")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(_, leaf)| leaf.get("type").and_then(Value::as_str));
            for t in types {
                if ANALYSED.contains(&t) {
                    found.push((index.clone(), field.clone(), t.to_string()));
                }
            }
        }
    }
    found.sort();
    found
}

/// What `GET _tasks/<id>` says of a delete-by-query task.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskState {
    Running,
    /// Completed: with what it deleted, and what went wrong, if anything.
    Finished {
        deleted: u64,
        version_conflicts: u64,
        problem: Option<TaskProblem>,
    },
}

/// Why a finished task did not do all of its work.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskProblem {
    /// Bulk or search failures, each as `index: type (status)`: never a reason text, which
    /// may quote document content.
    Failures(Vec<String>),
    /// Cancelled (`_tasks/<id>/_cancel`), with the store's words (`by user request`).
    Cancelled(String),
    /// Ended with an error (its type).
    Error(String),
    /// Unknown to the store (404): a node restarted, and what it did is not known.
    Lost,
}

impl TaskProblem {
    /// The error this problem is reported as, `attempt` of `of` submissions.
    pub fn error(&self, attempt: u32, of: u32) -> Error {
        let tail = if attempt < of {
            format!("submitted again (attempt {} of {of})", attempt + 1)
        } else {
            format!("gave up after {of} attempts; the next run submits it again")
        };
        match self {
            TaskProblem::Failures(f) => Error::StoreTaskFailed(format!(
                "delete-by-query finished with {} failures, first: {}; {tail}",
                f.len(),
                f.first().map_or("?", String::as_str)
            )),
            TaskProblem::Error(kind) => {
                Error::StoreTaskFailed(format!("delete-by-query failed: {kind}; {tail}"))
            }
            TaskProblem::Cancelled(why) => Error::StoreTaskCancelled(format!(
                "delete-by-query was cancelled outside the operator ({why}); {tail}"
            )),
            TaskProblem::Lost => Error::StoreTaskLost(format!(
                "the store no longer knows the delete-by-query task (a node restarted?); {tail}"
            )),
        }
    }
}

/// What a task (running or not) has deleted so far, by a `GET _tasks/<id>` answer: its
/// response once it has one, else its status; 0 when the answer says nothing.
pub fn deleted_so_far(answer: &Value) -> u64 {
    answer
        .pointer("/response/deleted")
        .or_else(|| answer.pointer("/task/status/deleted"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Reads a `GET _tasks/<id>` answer.
pub fn read_task(answer: &Value) -> Option<TaskState> {
    if !answer.get("completed")?.as_bool()? {
        return Some(TaskState::Running);
    }
    let response = answer.get("response");
    // A task that ended with an error has no response: its counts so far are in its status
    // (Elasticsearch 7.17 answers a cancel of a throttled task so).
    let counts = response.or_else(|| answer.pointer("/task/status"));
    let number = |key: &str| {
        counts
            .and_then(|r| r.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let (deleted, version_conflicts) = (number("deleted"), number("version_conflicts"));
    if let Some(error) = answer.get("error") {
        let kind = error.get("type").and_then(Value::as_str).unwrap_or("error");
        let cancelled = counts
            .and_then(|c| c.get("canceled"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .or_else(|| {
                [
                    kind,
                    error
                        .pointer("/caused_by/type")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                ]
                .contains(&"task_cancelled_exception")
                .then(|| "task_cancelled_exception".to_string())
            });
        let problem = match cancelled {
            Some(why) => TaskProblem::Cancelled(why),
            None => TaskProblem::Error(kind.to_string()),
        };
        return Some(TaskState::Finished {
            deleted,
            version_conflicts,
            problem: Some(problem),
        });
    }
    let response = response?;
    // A completed answer without a count is not one this code understands.
    response.get("deleted")?.as_u64()?;
    if let Some(why) = response
        .get("canceled")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        return Some(TaskState::Finished {
            deleted,
            version_conflicts,
            problem: Some(TaskProblem::Cancelled(why.to_string())),
        });
    }
    let failures: Vec<String> = response
        .get("failures")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|f| {
                    let index = f.get("index").and_then(Value::as_str).unwrap_or("?");
                    let kind = f
                        .pointer("/cause/type")
                        .or_else(|| f.pointer("/reason/type"))
                        .and_then(Value::as_str)
                        .unwrap_or("failure");
                    let status = f.get("status").and_then(Value::as_u64).unwrap_or(0);
                    format!("{index}: {kind} ({status})")
                })
                .collect()
        })
        .unwrap_or_default();
    Some(TaskState::Finished {
        deleted,
        version_conflicts,
        problem: (!failures.is_empty()).then_some(TaskProblem::Failures(failures)),
    })
}

/// Submissions of one deletion (the first and the resubmissions after a task that ended
/// badly) before the step fails.
pub const TASK_ATTEMPTS: u32 = 3;

/// What a finished task comes to, once [`settle`]d into the cursor.
#[derive(Debug)]
pub struct Settled {
    /// Deleted by this task (the cursor's `deleted` has it added for erasures).
    pub deleted: u64,
    pub version_conflicts: u64,
    /// The task ended badly and is submitted again: why.
    pub retrying: Option<Error>,
    /// The task ended badly once too often: the step fails with this.
    pub failed: Option<Error>,
}

/// Folds a finished task into the cursor (pure): the task is forgotten, its stored result
/// named for deletion (`clean`, except a lost task, which has none), and what it deleted is
/// added to `deleted`. A problem is retried up to [`TASK_ATTEMPTS`] submissions (`attempts`
/// counts them); after the last the series starts over, so a later run submits afresh.
/// `settled` tells whether the deletion is over (nothing more to submit).
pub fn settle(
    cursor: &mut Cursor,
    deleted: u64,
    version_conflicts: u64,
    problem: Option<TaskProblem>,
) -> Settled {
    let task = cursor.task.take();
    if problem != Some(TaskProblem::Lost) {
        cursor.clean = task;
    }
    cursor.polls = 0;
    cursor.errors = 0;
    cursor.deleted = cursor.deleted.saturating_add(deleted);
    let attempt = cursor.attempts.saturating_add(1);
    let mut settled = Settled {
        deleted,
        version_conflicts,
        retrying: None,
        failed: None,
    };
    match problem {
        None => {
            cursor.attempts = 0;
            cursor.settled = true;
        }
        Some(p) if attempt < TASK_ATTEMPTS => {
            cursor.attempts = attempt;
            settled.retrying = Some(p.error(attempt, TASK_ATTEMPTS));
        }
        Some(p) => {
            cursor.attempts = 0;
            settled.failed = Some(p.error(attempt, TASK_ATTEMPTS));
        }
    }
    settled
}

/// Where a sweep or an erasure resumes. Holds index names, task ids and counts, never a
/// query: queries of erasures carry identifiers, and the cursor is stored in status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    /// Sweep, fast path: the last index judged (indices are taken in name order).
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Sweep: the fast path is over.
    #[serde(rename = "q", default, skip_serializing_if = "std::ops::Not::not")]
    pub by_query: bool,
    /// Sweep, fast path: the index whose writes the operator blocks (named here, and
    /// checkpointed, before the block is set) to judge it again. The next step lifts the
    /// block unless it deletes the index, also when it resumes after a crash.
    #[serde(rename = "b", default, skip_serializing_if = "Option::is_none")]
    pub blocking: Option<String>,
    /// The delete-by-query task being polled.
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Polls of the task so far (for the back-off).
    #[serde(rename = "p", default, skip_serializing_if = "is_zero")]
    pub polls: u32,
    /// Consecutive polls that failed for a transient reason.
    #[serde(rename = "e", default, skip_serializing_if = "is_zero")]
    pub errors: u32,
    /// Tasks of this deletion that ended badly and were submitted again (see [`settle`]).
    #[serde(rename = "n", default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Erasure: documents deleted by the finished tasks of this erasure, reported when it
    /// is done. (A sweep reports each task's count in the step that reads it.)
    #[serde(rename = "d", default, skip_serializing_if = "is_zero_u64")]
    pub deleted: u64,
    /// A finished task whose stored result (`.tasks/_doc/<id>`) is deleted by the next step:
    /// only after its count is checkpointed, so a crash in between cannot lose the count.
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    pub clean: Option<String>,
    /// The deletion is over: the next step only cleans up and finishes.
    #[serde(rename = "s", default, skip_serializing_if = "std::ops::Not::not")]
    pub settled: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

const CURSOR_PREFIX: &str = "es:";

impl Cursor {
    pub fn encode(&self) -> String {
        // Plain strings and numbers: serialising cannot fail.
        format!(
            "{CURSOR_PREFIX}{}",
            serde_json::to_string(self).unwrap_or_default()
        )
    }

    pub fn decode(text: &str) -> Result<Self, Error> {
        let cursor: Cursor = text
            .strip_prefix(CURSOR_PREFIX)
            .and_then(|json| serde_json::from_str(json).ok())
            .ok_or_else(|| {
                Error::InvalidSpec(format!("unreadable Elasticsearch cursor {text:?}"))
            })?;
        if let Some(index) = &cursor.blocking {
            if !valid_index_name(index) {
                return Err(Error::InvalidSpec(format!(
                    "unreadable Elasticsearch index name {index:?} in cursor"
                )));
            }
        }
        for task in [&cursor.task, &cursor.clean].into_iter().flatten() {
            if !valid_task_id(task) {
                return Err(Error::InvalidSpec(format!(
                    "unreadable Elasticsearch task id {task:?} in cursor"
                )));
            }
        }
        Ok(cursor)
    }
}

/// One concrete index name: no wildcard, list, path or expression that could name others.
pub fn valid_index_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.starts_with(['-', '_', '+'])
        && !name.contains([
            '*', ',', '/', '\\', '?', '"', '<', '>', '|', ' ', '#', ':', '(', ')', '{', '}',
        ])
}

/// The indices that take writes for an alias or a data stream: of `_cat/aliases` rows
/// (`alias`, `index`, `is_write_index`), the index marked `true`, or the only index of an
/// alias none of whose indices is marked (Elasticsearch writes there); of `_data_stream`,
/// each stream's last backing index. Unreadable answers name none.
pub fn write_indices(aliases: &Value, data_streams: &Value) -> BTreeSet<String> {
    let mut by_alias: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for row in aliases.as_array().into_iter().flatten() {
        let (Some(alias), Some(index)) = (
            row.get("alias").and_then(Value::as_str),
            row.get("index").and_then(Value::as_str),
        ) else {
            continue;
        };
        let flag = row
            .get("is_write_index")
            .and_then(Value::as_str)
            .unwrap_or("-");
        by_alias.entry(alias).or_default().push((index, flag));
    }
    let mut out = BTreeSet::new();
    for rows in by_alias.values() {
        let marked: Vec<&str> = rows
            .iter()
            .filter(|(_, flag)| *flag == "true")
            .map(|(index, _)| *index)
            .collect();
        if !marked.is_empty() {
            out.extend(marked.into_iter().map(str::to_string));
        } else if let [(index, flag)] = rows.as_slice() {
            if *flag != "false" {
                out.insert((*index).to_string());
            }
        }
    }
    let streams = data_streams
        .get("data_streams")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for stream in streams {
        let last = stream
            .get("indices")
            .and_then(Value::as_array)
            .and_then(|indices| indices.last())
            .and_then(|i| i.get("index_name"))
            .and_then(Value::as_str);
        if let Some(index) = last {
            out.insert(index.to_string());
        }
    }
    out
}

/// A task id as Elasticsearch gives them: `<node id>:<number>`.
pub fn valid_task_id(id: &str) -> bool {
    match id.split_once(':') {
        Some((node, n)) => {
            !node.is_empty()
                && node
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !n.is_empty()
                && n.chars().all(|c| c.is_ascii_digit())
        }
        None => false,
    }
}

/// How long to wait before the next poll of a task: 1 s, doubling, at most 30 s.
pub fn poll_delay(polls: u32) -> std::time::Duration {
    std::time::Duration::from_secs(1u64 << polls.min(5)).min(std::time::Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn what_a_cancelled_task_deleted_is_read_from_its_response_or_its_status() {
        let finished = json!({"completed": true, "response": {"deleted": 7}});
        let stopping = json!({"completed": false, "task": {"status": {"deleted": 1000}}});
        assert_eq!(deleted_so_far(&finished), 7);
        assert_eq!(deleted_so_far(&stopping), 1000);
        assert_eq!(deleted_so_far(&json!({"completed": true})), 0);
        assert_eq!(
            deleted_so_far(&json!({"task": {"status": {"deleted": -1}}})),
            0
        );
    }

    #[test]
    fn hostile_identifiers_stay_one_exact_term_value() {
        for hostile in [
            r#"a" } }, {"match_all": {"#,
            r#"x\"y"#,
            "47 | user-4711",
            "}}]}",
            "\\",
            "*",
        ] {
            let terms = expand_terms(
                &ids(&[("user.id", "{userId}")]),
                &ids(&[("userId", hostile)]),
            )
            .unwrap()
            .unwrap();
            let query = subject_query(&terms);
            // Whatever the identifier holds, the query is one bool with one term whose value
            // is exactly the identifier, and it survives a round trip through JSON text.
            let text = serde_json::to_string(&query).unwrap();
            let back: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back, query);
            let filters = back.pointer("/bool/filter").unwrap().as_array().unwrap();
            assert_eq!(filters.len(), 1);
            assert_eq!(
                filters[0].pointer("/term/user.id/value"),
                Some(&Value::String(hostile.into()))
            );
            assert_eq!(back.as_object().unwrap().len(), 1);
            assert_eq!(back["bool"].as_object().unwrap().len(), 1);
        }
    }

    #[test]
    fn terms_are_all_required_and_a_missing_identifier_skips_the_locator() {
        let locator = ids(&[("user.email", "{email}"), ("tenant", "shop")]);
        let terms = expand_terms(&locator, &ids(&[("email", "a@b.c")]))
            .unwrap()
            .unwrap();
        assert_eq!(
            subject_query(&terms),
            json!({"bool": {"filter": [
                {"term": {"tenant": {"value": "shop"}}},
                {"term": {"user.email": {"value": "a@b.c", "case_insensitive": true}}},
            ]}})
        );
        let skipped = expand_terms(&locator, &ids(&[("userId", "47")]))
            .unwrap()
            .unwrap_err();
        assert_eq!(skipped, vec!["term[user.email] needs {email}"]);
        assert!(expand_terms(&ids(&[("f", "{a")]), &ids(&[])).is_err());
    }

    #[test]
    fn terms_use_the_canonical_value_and_fold_only_email_terms() {
        let locator = ids(&[
            ("user.email", "{email}"),
            ("user.id", "{userId}"),
            ("pair", "{userId}:{email}"),
        ]);
        let terms = expand_terms(
            &locator,
            &ids(&[("email", " Bob@Example.COM\n"), ("userId", "AbC-47\n")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            subject_query(&terms),
            json!({"bool": {"filter": [
                {"term": {"pair": {"value": "AbC-47:bob@example.com"}}},
                {"term": {"user.email": {"value": "bob@example.com", "case_insensitive": true}}},
                {"term": {"user.id": {"value": "AbC-47"}}},
            ]}})
        );
    }

    #[test]
    fn the_range_uses_the_absolute_cutoff_cut_to_milliseconds() {
        let cutoff = DateTime::parse_from_rfc3339("2026-11-20T09:00:00.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            older_than("@timestamp", cutoff),
            json!({"range": {"@timestamp": {
                "lt": "2026-11-20T09:00:00.123Z", "format": "strict_date_optional_time"
            }}})
        );
    }

    #[test]
    fn patterns_that_select_everything_or_something_else_are_recognised() {
        for all in ["*", "_all", "**", "logs-*,*", " "] {
            assert!(matches_everything(all), "{all}");
        }
        for some in ["logs-*", "a,b", "logs-*,-logs-keep"] {
            assert!(!matches_everything(some), "{some}");
        }
        assert!(check_pattern("logs-*,-logs-keep,.audit-*").is_ok());
        for bad in [
            "<logs-{now/d}>",
            "remote:logs-*",
            "Logs",
            "a b",
            "-logs",
            "a,,b",
            "a/b",
        ] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn index_matching_follows_inclusions_and_exclusions() {
        assert!(index_matches("logs-*", "logs-2026.01.01"));
        assert!(!index_matches("logs-*", "logsx"));
        assert!(!index_matches("logs-*", ".ds-logs-app-000001"));
        assert!(index_matches("logs", "logs"));
        assert!(!index_matches("logs", "logs-000001"));
        assert!(index_matches("a-*,b-*", "b-1"));
        assert!(!index_matches("logs-*,-logs-keep*", "logs-keep-1"));
        assert!(index_matches("l*s-*-x", "logs-1-x"));
        assert!(!index_matches("l*s-*-x", "logs-1-y"));
    }

    #[test]
    fn write_indices_of_aliases_and_data_streams_are_recognised() {
        let aliases = json!([
            // Marked write index among several.
            {"alias": "logs", "index": "logs-1", "is_write_index": "false"},
            {"alias": "logs", "index": "logs-2", "is_write_index": "true"},
            // The only index of an alias, unmarked: Elasticsearch writes there.
            {"alias": "single", "index": "single-1", "is_write_index": "-"},
            // Several unmarked: the alias takes no writes.
            {"alias": "read", "index": "r-1", "is_write_index": "-"},
            {"alias": "read", "index": "r-2", "is_write_index": "-"},
            // The only index, marked false: no write index.
            {"alias": "off", "index": "off-1", "is_write_index": "false"},
            {"alias": "broken"}
        ]);
        let streams = json!({"data_streams": [
            {"name": "metrics", "indices": [
                {"index_name": ".ds-metrics-000001"}, {"index_name": ".ds-metrics-000002"}
            ]}
        ]});
        let write: Vec<String> = write_indices(&aliases, &streams).into_iter().collect();
        assert_eq!(write, vec![".ds-metrics-000002", "logs-2", "single-1"]);
        assert!(write_indices(&Value::Null, &Value::Null).is_empty());
    }

    #[test]
    fn a_cursor_names_one_concrete_index_to_unblock() {
        let cursor = Cursor {
            blocking: Some("events-2020.01.01".into()),
            ..Cursor::default()
        };
        assert_eq!(Cursor::decode(&cursor.encode()).unwrap(), cursor);
        for bad in ["", "events-*", "a,b", "_all", "-x", "..", "a/b", "a b"] {
            assert!(!valid_index_name(bad), "{bad:?}");
            let encoded = format!("es:{}", json!({"b": bad}));
            assert!(Cursor::decode(&encoded).is_err(), "{bad:?}");
        }
        assert!(valid_index_name(".ds-metrics-000001"));
    }

    #[test]
    fn only_an_index_whose_every_document_is_old_is_deleted_whole() {
        let cutoff = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let ms = cutoff.timestamp_millis() as f64;
        let ages = |total, missing, max_ms| IndexAges {
            total,
            missing,
            max_ms,
        };
        assert!(whole_index_expired(
            &ages(3, 0, Some(ms - 86_400_000.0)),
            cutoff
        ));
        // One young document, or one right at the cutoff.
        assert!(!whole_index_expired(&ages(3, 0, Some(ms + 1.0)), cutoff));
        assert!(!whole_index_expired(&ages(3, 0, Some(ms - 1.0)), cutoff));
        // A document without the field, no maximum, an empty index.
        assert!(!whole_index_expired(&ages(3, 1, Some(0.0)), cutoff));
        assert!(!whole_index_expired(&ages(3, 0, None), cutoff));
        assert!(!whole_index_expired(&ages(0, 0, None), cutoff));
    }

    #[test]
    fn answers_are_read_or_refused() {
        let answer = json!({"hits": {"total": {"value": 4, "relation": "eq"}, "hits": []},
            "aggregations": {"newest": {"value": 1.5e12, "value_as_string": "x"}, "undated": {"doc_count": 0}}});
        assert_eq!(
            read_ages(&answer),
            Some(IndexAges {
                total: 4,
                missing: 0,
                max_ms: Some(1.5e12)
            })
        );
        let capped = json!({"hits": {"total": {"value": 10000, "relation": "gte"}},
            "aggregations": {"newest": {"value": null}, "undated": {"doc_count": 0}}});
        assert_eq!(read_ages(&capped), None);

        assert_eq!(
            read_task(&json!({"completed": false, "task": {}})),
            Some(TaskState::Running)
        );
        let done = json!({"completed": true, "response": {"deleted": 5, "version_conflicts": 2,
            "failures": [{"index": "logs-1", "id": "user-47@example.org", "cause":
                {"type": "es_rejected_execution_exception", "reason": "doc user-47@example.org"}, "status": 429}]}});
        let state = read_task(&done).unwrap();
        assert_eq!(
            state,
            TaskState::Finished {
                deleted: 5,
                version_conflicts: 2,
                problem: Some(TaskProblem::Failures(vec![
                    "logs-1: es_rejected_execution_exception (429)".into()
                ]))
            }
        );
        assert!(!format!("{state:?}").contains("user-47"));
        assert_eq!(
            read_task(&json!({"completed": true, "error": {"type": "x", "reason": "y"}})),
            Some(TaskState::Finished {
                deleted: 0,
                version_conflicts: 0,
                problem: Some(TaskProblem::Error("x".into()))
            })
        );
        assert_eq!(
            read_task(&json!({"completed": true, "error": {"type": "task_cancelled_exception"}})),
            Some(TaskState::Finished {
                deleted: 0,
                version_conflicts: 0,
                problem: Some(TaskProblem::Cancelled("task_cancelled_exception".into()))
            })
        );
        // Elasticsearch 7.17, a throttled task cancelled after its first batch.
        let es7 = json!({"completed": true, "error": {"type": "search_phase_execution_exception",
            "caused_by": {"type": "task_cancelled_exception", "reason": "cancelled"}},
            "task": {"status": {"deleted": 1000, "version_conflicts": 2, "canceled": "by user request"}}});
        assert_eq!(
            read_task(&es7),
            Some(TaskState::Finished {
                deleted: 1000,
                version_conflicts: 2,
                problem: Some(TaskProblem::Cancelled("by user request".into()))
            })
        );
        // What a cancelled task deleted before it stopped is counted.
        assert_eq!(
            read_task(
                &json!({"completed": true, "response": {"deleted": 4, "canceled": "by user request"}})
            ),
            Some(TaskState::Finished {
                deleted: 4,
                version_conflicts: 0,
                problem: Some(TaskProblem::Cancelled("by user request".into()))
            })
        );
        assert_eq!(
            read_task(&json!({"completed": true, "response": {"deleted": 7, "failures": []}})),
            Some(TaskState::Finished {
                deleted: 7,
                version_conflicts: 0,
                problem: None
            })
        );
        assert_eq!(read_task(&json!({"completed": true, "response": {}})), None);
    }

    #[test]
    fn a_task_that_ends_badly_is_resubmitted_a_bounded_number_of_times_counting_once() {
        let task = |n: u32| Some(format!("node:{n}"));
        let failures = || Some(TaskProblem::Failures(vec!["logs-1: x (429)".into()]));
        let mut c = Cursor {
            by_query: true,
            task: task(1),
            polls: 4,
            errors: 1,
            ..Default::default()
        };
        let first = settle(&mut c, 3, 1, failures());
        assert_eq!((first.deleted, first.version_conflicts), (3, 1));
        assert_eq!(
            first.retrying.as_ref().map(Error::reason),
            Some("StoreTaskFailed")
        );
        assert!(first.failed.is_none());
        assert!(first
            .retrying
            .unwrap()
            .to_string()
            .contains("attempt 2 of 3"));
        assert_eq!(
            (
                c.task.as_deref(),
                c.clean.as_deref(),
                c.attempts,
                c.deleted,
                c.polls,
                c.errors
            ),
            (None, Some("node:1"), 1, 3, 0, 0),
            "the finished task's result is cleaned next, its count kept once"
        );
        assert!(!c.settled, "submitted again");
        // A lost task has no stored result to clean and no count.
        c.clean = None;
        c.task = task(2);
        let second = settle(&mut c, 0, 0, Some(TaskProblem::Lost));
        assert_eq!(
            second.retrying.as_ref().map(Error::reason),
            Some("StoreTaskLost")
        );
        assert_eq!((c.clean.as_deref(), c.attempts, c.deleted), (None, 2, 3));
        // The third attempt ends badly too: the step fails, and a later run starts afresh.
        c.task = task(3);
        let third = settle(
            &mut c,
            2,
            0,
            Some(TaskProblem::Cancelled("by user request".into())),
        );
        assert!(third.retrying.is_none());
        assert_eq!(
            third.failed.as_ref().map(Error::reason),
            Some("StoreTaskCancelled")
        );
        assert!(third
            .failed
            .unwrap()
            .to_string()
            .contains("gave up after 3 attempts"));
        assert_eq!(
            (c.clean.as_deref(), c.attempts, c.deleted, c.settled),
            (Some("node:3"), 0, 5, false)
        );
        // A task that completes cleanly settles the deletion.
        c.clean = None;
        c.task = task(4);
        let fine = settle(&mut c, 1, 0, None);
        assert!(fine.retrying.is_none() && fine.failed.is_none());
        assert_eq!(
            (c.clean.as_deref(), c.attempts, c.deleted, c.settled),
            (Some("node:4"), 0, 6, true)
        );
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn analysed_fields_are_found_in_a_field_mapping_answer() {
        let answer = json!({
            "mail-a": {"mappings": {
                "user.email": {"full_name": "user.email", "mapping": {"email": {"type": "text",
                    "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}}}},
                "user.email.keyword": {"full_name": "user.email.keyword", "mapping": {"keyword": {"type": "keyword"}}}
            }},
            "mail-b": {"mappings": {}}
        });
        assert_eq!(
            analysed_fields(&answer),
            vec![(
                "mail-a".to_string(),
                "user.email".to_string(),
                "text".to_string()
            )]
        );
        assert!(analysed_fields(
            &json!({"x": {"mappings": {"id": {"mapping": {"id": {"type": "keyword"}}}}}})
        )
        .is_empty());
    }

    #[test]
    fn cursors_round_trip_and_refuse_what_they_never_hold() {
        let c = Cursor {
            after: Some("logs-2026.01.01".into()),
            by_query: true,
            blocking: None,
            task: Some("oTUltX4IQMOUUVeiohTt8A:12345".into()),
            polls: 3,
            errors: 1,
            attempts: 2,
            deleted: 7,
            clean: Some("oTUltX4IQMOUUVeiohTt8A:12344".into()),
            settled: true,
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        assert!(Cursor::decode(r#"es:{"x":"_all"}"#).is_err());
        assert_eq!(Cursor::default().encode(), "es:{}");
        assert!(Cursor::decode("s3:{}").is_err());
        assert!(Cursor::decode(r#"es:{"t":"../../_all"}"#).is_err());
        assert!(valid_task_id("node_1-x:7"));
        assert!(!valid_task_id("node:"));
        assert!(!valid_task_id("node/x:1"));
        assert_eq!(poll_delay(0).as_secs(), 1);
        assert_eq!(poll_delay(10).as_secs(), 30);
    }
}
