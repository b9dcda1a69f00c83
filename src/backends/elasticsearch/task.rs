//! Deletions the store runs by itself (`_delete_by_query` tasks), read and settled (pure):
//! what `GET _tasks/<id>` says, what a task deleted, and when one that ended badly is
//! submitted again.

use serde_json::Value;

use super::cursor::Cursor;
use crate::backends::Error;

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
    // The next submission (if any) gets a marker of its own.
    cursor.marker = None;
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

/// The action of a delete-by-query task, as `_tasks` and `.tasks` name it.
pub const DELETE_BY_QUERY_ACTION: &str = "indices:data/write/delete/byquery";

/// How far before its marker was made a task named by it is looked for in `.tasks`: the
/// marker's time is the operator's clock, the task's start time the node's.
pub const MARKER_CLOCK_SKEW_MS: i64 = 10 * 60 * 1000;

/// A submission's marker: `tombstone-<unix ms>-<16 hex>`, random, made before the
/// submission and sent as its `X-Opaque-Id`. The time bounds the search of `.tasks`.
pub fn new_marker(now_ms: i64, random: [u8; 8]) -> String {
    format!("tombstone-{}-{}", now_ms.max(0), hex::encode(random))
}

/// Whether `marker` is one [`new_marker`] makes (a cursor is read back from status, and a
/// marker goes into a header).
pub fn valid_marker(marker: &str) -> bool {
    marker_time_ms(marker).is_some()
}

/// When the marker was made (unix ms), if it is a marker.
pub fn marker_time_ms(marker: &str) -> Option<i64> {
    let rest = marker.strip_prefix("tombstone-")?;
    let (ms, random) = rest.split_once('-')?;
    let valid = !ms.is_empty()
        && ms.len() <= 15
        && ms.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 16
        && random
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    valid.then(|| ms.parse().ok()).flatten()
}

fn opaque_id(task: &Value) -> Option<&str> {
    task.pointer("/headers/X-Opaque-Id").and_then(Value::as_str)
}

/// The running delete-by-query task submitted with `marker`, from a
/// `GET _tasks?actions=*/delete/byquery&detailed=true&group_by=parents` answer (top-level
/// tasks only: the slices of a task are its children, and carry the header too).
pub fn running_with_marker(answer: &Value, marker: &str) -> Option<String> {
    answer
        .get("tasks")?
        .as_object()?
        .iter()
        .find(|(id, t)| {
            valid_task_id(id) && t.get("parent_task_id").is_none() && opaque_id(t) == Some(marker)
        })
        .map(|(id, _)| id.clone())
}

/// The body of one page of the search of `.tasks` for delete-by-query tasks started since
/// `since_ms` (the marker's time less [`MARKER_CLOCK_SKEW_MS`]), after `after` (the sort
/// values of the last hit of the page before). The headers are not indexed
/// (`enabled: false`), so they are matched by [`stored_with_marker`] in the answer.
pub fn stored_tasks_search(since_ms: i64, page: usize, after: Option<&Value>) -> Value {
    let mut body = serde_json::json!({
        "size": page,
        "query": {"bool": {"filter": [
            {"term": {"task.action": DELETE_BY_QUERY_ACTION}},
            {"range": {"task.start_time_in_millis": {"gte": since_ms}}}
        ]}},
        "_source": ["task.node", "task.id", "task.headers", "task.parent_task_id"],
        "sort": [
            {"task.start_time_in_millis": "asc"},
            {"task.node": "asc"},
            {"task.id": "asc"}
        ]
    });
    if let Some(after) = after {
        body["search_after"] = after.clone();
    }
    body
}

/// In one page of [`stored_tasks_search`]: the id of the finished task submitted with
/// `marker`, if there, and the sort values to ask the next page after (`None`: this page
/// was the last, it held fewer hits than `page`).
pub fn stored_with_marker(
    answer: &Value,
    marker: &str,
    page: usize,
) -> (Option<String>, Option<Value>) {
    let hits = answer
        .pointer("/hits/hits")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let found = hits.iter().find_map(|hit| {
        let task = hit.pointer("/_source/task")?;
        if task.get("parent_task_id").is_some() || opaque_id(task) != Some(marker) {
            return None;
        }
        let node = task.get("node").and_then(Value::as_str)?;
        let id = task.get("id").and_then(Value::as_u64)?;
        Some(format!("{node}:{id}")).filter(|t| valid_task_id(t))
    });
    let next = (hits.len() >= page)
        .then(|| hits.last().and_then(|h| h.get("sort")).cloned())
        .flatten();
    (found, next)
}

/// The answer of a step whose task is still running: poll it again after a while.
pub fn wait(position: &Cursor) -> crate::backends::Next<Cursor> {
    crate::backends::Next::Wait {
        cursor: position.clone(),
        poll_after: poll_delay(position.polls),
    }
}

/// How long to wait before the next poll of a task: 1 s, doubling, at most 30 s.
pub fn poll_delay(polls: u32) -> std::time::Duration {
    std::time::Duration::from_secs(1u64 << polls.min(5)).min(std::time::Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::elasticsearch::indices::{read_ages, IndexAges};
    use serde_json::json;

    #[test]
    fn markers_name_submissions_and_find_their_tasks_running_or_stored() {
        let marker = new_marker(1_767_225_600_000, [0xab; 8]);
        assert_eq!(marker, "tombstone-1767225600000-abababababababab");
        assert!(valid_marker(&marker));
        assert_eq!(marker_time_ms(&marker), Some(1_767_225_600_000));
        for bad in [
            "",
            "tombstone-",
            "tombstone-1-abc",
            "tombstone-x-abababababababab",
            "tombstone-1-ABABABABABABABAB",
            "tombstone-1-abababababababab\r\nX: y",
            "other-1-abababababababab",
        ] {
            assert!(!valid_marker(bad), "{bad:?}");
        }
        // `GET _tasks?…&group_by=parents` of OpenSearch 2.19 / Elasticsearch 7.17.
        let running = json!({"tasks": {
            "n:7": {"node": "n", "id": 7, "action": DELETE_BY_QUERY_ACTION,
                    "headers": {"X-Opaque-Id": "tombstone-1-0000000000000000"}},
            "n:24": {"node": "n", "id": 24, "action": DELETE_BY_QUERY_ACTION,
                     "description": "delete-by-query [logs]", "headers": {"X-Opaque-Id": marker}},
            "n:25": {"node": "n", "id": 25, "parent_task_id": "n:24",
                     "headers": {"X-Opaque-Id": marker}}
        }});
        assert_eq!(
            running_with_marker(&running, &marker).as_deref(),
            Some("n:24")
        );
        assert_eq!(running_with_marker(&json!({"tasks": {}}), &marker), None);
        assert_eq!(running_with_marker(&json!({}), &marker), None);
        // A `.tasks` search answer (the headers are in `_source`, not indexed).
        let hit = |id: u64, opaque: &str| {
            json!({"_id": format!("n:{id}"), "sort": [id, "n", id],
                   "_source": {"task": {"node": "n", "id": id, "headers": {"X-Opaque-Id": opaque}}}})
        };
        let page = json!({"hits": {"hits": [hit(3, "x"), hit(4, &marker)]}});
        assert_eq!(
            stored_with_marker(&page, &marker, 2),
            (Some("n:4".into()), Some(json!([4, "n", 4])))
        );
        assert_eq!(
            stored_with_marker(&page, &marker, 3),
            (Some("n:4".into()), None)
        );
        let other = json!({"hits": {"hits": [hit(3, "x")]}});
        assert_eq!(
            stored_with_marker(&other, &marker, 1),
            (None, Some(json!([3, "n", 3])))
        );
        assert_eq!(stored_with_marker(&json!({}), &marker, 1), (None, None));
        let body = stored_tasks_search(5, 500, Some(&json!([3, "n", 3])));
        assert_eq!(body["search_after"], json!([3, "n", 3]));
        assert_eq!(body["size"], 500);
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
            marker: Some(new_marker(1, [1; 8])),
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
        assert_eq!(c.marker, None, "the next submission is named afresh");
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
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Cursor>(&json).unwrap(), c);
        assert!(c.validate().is_ok());
    }
}
