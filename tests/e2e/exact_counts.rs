//! Counts stay exact when a step's outcome is lost: the operator killed (or fenced out) after
//! the store deleted and before the checkpoint. Each test drives `Backend` steps directly,
//! throws away the outcome of the first step after which the store has lost records, resumes
//! from the previous cursor with a fresh backend (as after a restart), and checks that the
//! counts of the job equal what the store lost. (The conformance suite checks the same for the
//! sweep and key paths of every driver.)

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::{Backend, Next, StepBudget, SubjectAction, SubjectJob};

use crate::support::s3::S3Server;

const EMAIL: &str = "exact-3f9a@example.org";
const ARCHIVES: usize = 8;
const SUBJECT_LINES: usize = 2;

fn record(to: &str, n: usize) -> String {
    format!("{{\"msg\":{{\"recipient\":\"{to}\",\"id\":{n}}}}}\n")
}

fn budget() -> StepBudget {
    StepBudget {
        max_time: Duration::from_millis(1),
        cancel: CancellationToken::new(),
        fence: Default::default(),
    }
}

/// The subject's records left in the archives.
async fn subject_lines(server: &S3Server) -> usize {
    let mut n = 0;
    for a in 0..ARCHIVES {
        let body = server
            .get("lost", &format!("mail/logs/day{a:02}.jsonl"))
            .await;
        n += String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| l.contains(EMAIL))
            .count();
    }
    n
}

/// An archive rewritten by a step whose outcome is lost records in its metadata that the
/// run dropped its records; the step that repeats it counts them instead of 0.
#[tokio::test]
async fn an_archive_rewrite_whose_step_is_lost_is_counted_by_the_step_that_repeats_it() {
    let server = S3Server::start();
    server.create_bucket("lost", false, false).await;
    for a in 0..ARCHIVES {
        let body: String = (0..SUBJECT_LINES)
            .map(|i| record(EMAIL, a * 10 + i))
            .chain(std::iter::once(record("other@example.org", a * 10 + 9)))
            .collect();
        server
            .put("lost", &format!("mail/logs/day{a:02}.jsonl"), body)
            .await;
    }
    let target: Target = serde_json::from_value(json!({
        "name": "archive", "store": "archive", "s3": {"prefix": "mail/"},
        "subject": {"s3": {"records": {
            "prefix": "mail/logs/", "field": "msg.recipient", "equals": "{email}"
        }}}
    }))
    .unwrap();
    let job = SubjectJob {
        target,
        identifiers: BTreeMap::from([("email".to_string(), EMAIL.to_string())]),
        action: SubjectAction::Erase,
    };
    let seeded = ARCHIVES * SUBJECT_LINES;
    let (mut cursor, mut erased, mut lost) = (None::<String>, 0u64, None);
    for steps in 0.. {
        assert!(steps < 1000, "the erasure did not finish");
        // A fresh backend per step, as after a restart.
        let backend = crate::s3::backend(&server, "lost");
        let step = backend
            .subject_step(&job, cursor.as_deref(), &budget())
            .await
            .expect("a subject step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        if lost.is_none() {
            let left = subject_lines(&server).await;
            if left < seeded {
                // Killed before the checkpoint: nothing of this step is kept.
                lost = Some(seeded - left);
                continue;
            }
        }
        erased += step.count;
        match step.next {
            Next::Done => break,
            Next::Continue(c) => {
                assert!(!c.contains(EMAIL), "{c}");
                cursor = Some(c);
            }
            Next::Wait { .. } => panic!("S3 steps never wait"),
        }
    }
    let lost = lost.expect("no step erased anything");
    assert_eq!(subject_lines(&server).await, 0);
    assert_eq!(
        erased, seeded as u64,
        "the {lost} records dropped by the lost step are counted once by the step after it"
    );
}
