//! The Loki driver against the stateful Loki double (one per test; a real Loki takes far
//! longer to delete than a test may wait, see tests/e2e/loki.rs): every line is pushed as
//! flushed (old data in the store, where delete requests reach it); the double processes a
//! delete request once its cancel period is over, and the driver counts when it is
//! processed. Lines `old-<n>` are 10 days old, `new-<n>` an hour, in the stream
//! `{ds="<dataset>"}`; a subject's lines read `user=<userId> mail=<email> n=<i>`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::json;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::http::HttpAuth;
use tombstone::backends::loki::{LokiBackend, LokiConfig};
use tombstone::backends::{Backend, Limits};

use super::{Fixture, Owner};
use crate::support::loki::{now_ns, LokiDouble, SINGLE_TENANT};

const DAY_NS: i64 = 86_400_000_000_000;

pub struct LokiFixture {
    double: LokiDouble,
}

impl LokiFixture {
    fn lines(&self, dataset: &str) -> Vec<String> {
        self.double
            .lines(SINGLE_TENANT)
            .into_iter()
            .filter(|(labels, _)| labels.get("ds").map(String::as_str) == Some(dataset))
            .map(|(_, line)| line)
            .collect()
    }

    fn push(&self, dataset: &str, lines: Vec<(i64, String)>) {
        let lines: Vec<(i64, &str)> = lines.iter().map(|(t, l)| (*t, l.as_str())).collect();
        self.double
            .push_flushed(SINGLE_TENANT, &[("ds", dataset), ("app", "conf")], &lines);
    }
}

#[async_trait]
impl Fixture for LokiFixture {
    // Verify looks for one line (`limit=1`): it tells whether any remain, not how many.
    const EXACT_VERIFY_COUNT: bool = false;

    async fn start() -> Self {
        let double = LokiDouble::start().await;
        double.set_cancel_period(Duration::from_millis(300));
        Self { double }
    }

    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(LokiBackend::new(
            LokiConfig {
                url: self.double.url(),
                tenant: None,
                auth: HttpAuth::None,
                resubmit_after: Duration::from_secs(1),
            },
            Limits::default(),
        ))
    }

    fn target(&self, dataset: &str) -> Target {
        serde_json::from_value(json!({"name": dataset, "store": "logs",
            "loki": {"selector": format!("{{ds=\"{dataset}\"}}")},
            "subject": {"loki": {"lineFilter": "user={userId} mail={email} "}}}))
        .expect("a valid target")
    }

    fn target_without_identifier(&self, dataset: &str) -> Target {
        let mut t = self.target(dataset);
        if let Some(tombstone::api::retentionpolicy::SubjectLocator::Loki(l)) = t.subject.as_mut() {
            l.line_filter = "user=everyone ".into();
        }
        t
    }

    async fn seed(&self, dataset: &str, expired: usize, young: usize) -> DateTime<Utc> {
        let now = now_ns();
        let mut lines: Vec<(i64, String)> = (0..expired)
            .map(|n| (now - 10 * DAY_NS + n as i64, format!("event old-{n}")))
            .collect();
        lines.extend(
            (0..young).map(|n| (now - 3_600_000_000_000 + n as i64, format!("event new-{n}"))),
        );
        self.push(dataset, lines);
        Utc::now() - chrono::Duration::days(1)
    }

    async fn seed_owner(&self, dataset: &str, owner: &Owner, n: usize) -> u64 {
        let now = now_ns();
        self.push(
            dataset,
            (0..n)
                .map(|i| {
                    (
                        now - 2 * DAY_NS + i as i64,
                        format!("user={} mail={} n={i}", owner.user_id, owner.email),
                    )
                })
                .collect(),
        );
        n as u64
    }

    async fn count(&self, dataset: &str, _cutoff: DateTime<Utc>) -> (u64, u64) {
        let lines = self.lines(dataset);
        let count = |p: &str| lines.iter().filter(|l| l.starts_with(p)).count() as u64;
        (count("event old-"), count("event new-"))
    }

    async fn count_owner(&self, dataset: &str, owner: &Owner) -> u64 {
        let prefix = format!("user={} mail={} ", owner.user_id, owner.email);
        self.lines(dataset)
            .iter()
            .filter(|l| l.starts_with(&prefix))
            .count() as u64
    }

    fn defers_deletion(&self) -> bool {
        true
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(200)
    }
}

crate::conformance!(tests, LokiFixture);

crate::batch_checks!(tests_batch, super::LokiFixture);

/// Loki's parser refuses queries of 5,120 bytes or more, and the double does too; a batch
/// of 150 members, far more than one query can name, is cut into chunks that stay under it.
#[tokio::test]
async fn a_batch_too_long_for_one_query_is_chunked_under_lokis_limit() {
    use std::collections::BTreeSet;
    use tombstone::backends::{BatchJob, BatchMember, Next, NoHolds, SubjectAction};

    let f = LokiFixture::start().await;
    let long = format!("{{ds=\"big\"}} |= \"{}\"", "x".repeat(5120));
    let refused = reqwest::Client::new()
        .get(format!("{}/loki/api/v1/query_range", f.double.url()))
        .query(&[("query", long.as_str())])
        .send()
        .await
        .expect("a query");
    assert_eq!(refused.status().as_u16(), 400);
    assert!(refused
        .text()
        .await
        .expect("a body")
        .contains("input size too long"));

    let owners: Vec<Owner> = (0..150)
        .map(|n| Owner {
            user_id: format!("Big{n}u"),
            email: format!("big-{n}@example.org"),
        })
        .collect();
    for owner in &owners {
        f.seed_owner("big", owner, 1).await;
    }
    let job = |action| BatchJob {
        target: f.target("big"),
        action,
        members: owners
            .iter()
            .enumerate()
            .map(|(n, o)| BatchMember {
                id: format!("hmac-sha256:{n:064x}"),
                identifiers: o.identifiers(),
            })
            .collect(),
        gate: Arc::new(NoHolds),
    };
    let run = |action| {
        let job = job(action);
        let backend = f.backend();
        async move {
            let mut totals = vec![0u64; 150];
            let mut cursor: Option<String> = None;
            for _ in 0..500 {
                let step = backend
                    .batch_step(
                        &job,
                        cursor.as_deref(),
                        &super::budget(Duration::from_secs(5)),
                    )
                    .await
                    .expect("a batch step");
                assert!(step.failure.is_none(), "{:?}", step.failure);
                for (t, m) in totals.iter_mut().zip(&step.members) {
                    *t += m.count;
                }
                match step.next {
                    Next::Done => return totals,
                    Next::Continue(c) => cursor = Some(c),
                    Next::Wait { cursor: c, .. } => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        cursor = Some(c);
                    }
                }
            }
            panic!("the batch did not finish");
        }
    };
    assert_eq!(run(SubjectAction::Find).await, vec![1; 150]);
    assert_eq!(run(SubjectAction::Erase).await, vec![1; 150]);
    assert_eq!(run(SubjectAction::Verify).await, vec![0; 150]);
    assert!(f.lines("big").is_empty());
    let queries: BTreeSet<String> = f
        .double
        .delete_requests(SINGLE_TENANT)
        .into_iter()
        .map(|r| r.query)
        .collect();
    assert!(
        queries.len() >= 2,
        "one delete request per chunk: {}",
        queries.len()
    );
}
