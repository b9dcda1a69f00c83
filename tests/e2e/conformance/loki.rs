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
