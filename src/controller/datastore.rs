//! DataStore: resolve credentials → probe the store → write the `Ready` condition.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tracing::{debug, info, instrument, warn};

use super::{failure_key, object_key, stores, Context, Error};
use crate::api::common::{find_condition, merge_conditions, DesiredCondition};
#[cfg(test)]
use crate::api::datastore::StoreSection;
use crate::api::datastore::{DataStore, DataStoreStatus};
use crate::api::Timestamp;
use crate::backends::Category;

pub const CONTROLLER: &str = "datastore";
/// A probe that takes longer than this counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

#[instrument(skip_all, fields(datastore = %object_key(store.as_ref())))]
pub async fn reconcile(store: Arc<DataStore>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciled(CONTROLLER);
    let key = object_key(store.as_ref());
    let probe = probe(&store, &ctx, &key).await;
    let status = desired_status(&store, &probe, Timestamp::now());
    // Events and logs on a change of readiness or of the reason for it, not on every probe.
    let ready_reason = |conditions: &[crate::api::Condition]| {
        find_condition(conditions, "Ready").map(|c| (c.status, c.reason.clone()))
    };
    let before = store
        .status
        .as_ref()
        .and_then(|s| ready_reason(&s.conditions));
    let after = ready_reason(&status.conditions);

    if store.status.as_ref() != Some(&status) {
        let api: Api<DataStore> =
            Api::namespaced(ctx.client.clone(), &store.namespace().unwrap_or_default());
        ctx.apply_status(&api, &store.name_any(), &status).await?;
    }
    if before != after {
        match &probe {
            Ok(version) => {
                info!(%version, "store ready");
                ctx.publish(
                    store.as_ref(),
                    EventType::Normal,
                    "Connected",
                    "Probe",
                    format!("Connected to {version}"),
                )
                .await;
            }
            Err(e) => {
                warn!(reason = e.reason(), error = %e, "store not ready");
                ctx.publish(
                    store.as_ref(),
                    EventType::Warning,
                    e.reason(),
                    "Probe",
                    e.to_string(),
                )
                .await;
            }
        }
    }
    Ok(match probe {
        Ok(_) => {
            ctx.reset_failures(&failure_key(store.as_ref()));
            Action::requeue(ctx.settings.probe_interval)
        }
        Err(e) => {
            debug!(reason = e.reason(), error = %e, "probe failed");
            ctx.metrics.reconcile_error(CONTROLLER, e.reason());
            let failing_since =
                find_condition(&status.conditions, "Ready").map(|c| c.last_transition_time);
            let failing_for = failing_since.map_or(Duration::ZERO, |t| {
                (Timestamp::now().0 - t.0)
                    .to_std()
                    .unwrap_or(Duration::ZERO)
            });
            next_probe(e.category(), failing_for).map_or(Action::await_change(), Action::requeue)
        }
    })
}

/// When to probe a store whose probe failed with an error of `category` again (pure): an
/// invalid spec waits for an edit of the DataStore (None); anything else is probed again
/// after [`retry_delay`], as it may clear by itself or be fixed where the operator cannot see
/// (a Secret, the store).
pub fn next_probe(category: Category, failing_for: Duration) -> Option<Duration> {
    match category {
        Category::InvalidSpec => None,
        Category::Transient | Category::Refused | Category::NeedsAttention => {
            Some(retry_delay(failing_for))
        }
    }
}

async fn probe(store: &DataStore, ctx: &Context, key: &str) -> Result<String, Error> {
    let spec = stores::connection_spec(&ctx.client, store, &ctx.settings).await?;
    let backend = ctx.engine.backend(key, spec, store.spec.limits.clone());
    match tokio::time::timeout(PROBE_TIMEOUT, backend.probe()).await {
        Ok(Ok(version)) => Ok(version),
        Ok(Err(e)) => {
            // A broken connection is not reused: the next probe reconnects.
            ctx.engine.forget(key);
            Err(e.into())
        }
        Err(_) => {
            ctx.engine.forget(key);
            Err(crate::backends::Error::Unreachable(format!(
                "no answer within {}s",
                PROBE_TIMEOUT.as_secs()
            ))
            .into())
        }
    }
}

/// How soon to probe a failing store again: half the time it has been failing, between 5s
/// and a minute. Derived from the condition's transition time rather than a counter, so the
/// reconciles our own status writes trigger do not speed up the backoff, and a restart keeps
/// it. Secrets are not watched (that would need list/watch on every Secret), so a fixed
/// Secret is noticed within a minute.
pub fn retry_delay(failing_for: Duration) -> Duration {
    (failing_for / 2).clamp(Duration::from_secs(5), Duration::from_secs(60))
}

/// The status a probe result calls for (pure).
pub fn desired_status(
    store: &DataStore,
    probe: &Result<String, Error>,
    now: Timestamp,
) -> DataStoreStatus {
    let generation = store.metadata.generation;
    let ready = match probe {
        Ok(version) => DesiredCondition::new("Ready", true, "Connected", version.clone()),
        Err(e) => DesiredCondition::new("Ready", false, e.reason(), e.to_string()),
    };
    let existing = store
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    DataStoreStatus {
        observed_generation: generation,
        store_type: store.spec.kind().map(|k| k.as_str().to_string()),
        insecure: probe.is_ok() && stores::sends_plaintext_credentials(&store.spec),
        conditions: merge_conditions(existing, vec![ready], generation, now),
    }
}

pub fn error_policy(store: Arc<DataStore>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(CONTROLLER, error.reason());
    warn!(datastore = %object_key(store.as_ref()), reason = error.reason(), error = %error, "reconcile failed");
    Action::requeue(ctx.backoff(&failure_key(store.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_invalid_spec_stops_the_probes() {
        let after = Duration::from_secs(30);
        assert_eq!(next_probe(Category::InvalidSpec, after), None);
        for c in [
            Category::Transient,
            Category::Refused,
            Category::NeedsAttention,
        ] {
            assert_eq!(next_probe(c, after), Some(Duration::from_secs(15)), "{c:?}");
        }
    }

    use crate::api::common::ConditionStatus;
    use crate::api::datastore::{DataStoreSpec, RedisStore};
    use crate::backends;

    fn store() -> DataStore {
        let mut s = DataStore::new(
            "cache",
            DataStoreSpec {
                store: Some(StoreSection::Redis(RedisStore {
                    url: "redis://r:6379".into(),
                    password_secret_ref: None,
                    cluster: None,
                })),
                limits: None,
                insecure: None,
            },
        );
        s.metadata.generation = Some(3);
        s
    }

    #[test]
    fn ready_with_the_version_when_the_probe_succeeds() {
        let st = desired_status(&store(), &Ok("redis 7.0.15".into()), Timestamp::now());
        assert_eq!(st.observed_generation, Some(3));
        assert_eq!(st.store_type.as_deref(), Some("redis"));
        let c = &st.conditions[0];
        assert_eq!(
            (c.status, c.reason.as_str(), c.message.as_str()),
            (ConditionStatus::True, "Connected", "redis 7.0.15")
        );
        assert_eq!(c.observed_generation, Some(3));
    }

    #[test]
    fn not_ready_with_the_api_reason() {
        for (err, reason) in [
            (Error::SecretNotFound("auth".into()), "SecretNotFound"),
            (
                Error::Backend(backends::Error::Unreachable("x".into())),
                "Unreachable",
            ),
            (
                Error::Backend(backends::Error::AuthenticationFailed("x".into())),
                "AuthenticationFailed",
            ),
            (Error::InvalidSpec("x".into()), "InvalidSpec"),
            (
                Error::CredentialsNotPermitted("x".into()),
                "CredentialsNotPermitted",
            ),
            (Error::InsecureTransport("x".into()), "InsecureTransport"),
            (
                Error::AmbientCredentialsNotAllowed("x".into()),
                "AmbientCredentialsNotAllowed",
            ),
        ] {
            let st = desired_status(&store(), &Err(err), Timestamp::now());
            assert_eq!(st.conditions[0].status, ConditionStatus::False);
            assert_eq!(st.conditions[0].reason, reason);
        }
    }

    #[test]
    fn status_says_when_credentials_travel_in_plain_text() {
        let mut s = store();
        let ok: Result<String, Error> = Ok("redis 7.0.15".into());
        assert!(!desired_status(&s, &ok, Timestamp::now()).insecure);
        if let Some(StoreSection::Redis(r)) = s.spec.store.as_mut() {
            r.password_secret_ref = Some(crate::api::common::SecretKeyRef {
                name: "auth".into(),
                key: "password".into(),
            });
        }
        s.spec.insecure = Some(true);
        assert!(desired_status(&s, &ok, Timestamp::now()).insecure);
        // Nothing is sent while the store is not ready.
        let down = Err(Error::SecretNotFound("auth".into()));
        assert!(!desired_status(&s, &down, Timestamp::now()).insecure);
        // TLS: nothing in plain text, whatever the flag says.
        if let Some(StoreSection::Redis(r)) = s.spec.store.as_mut() {
            r.url = "rediss://r:6380".into();
        }
        assert!(!desired_status(&s, &ok, Timestamp::now()).insecure);
    }

    #[test]
    fn retries_back_off_with_the_time_spent_failing() {
        assert_eq!(retry_delay(Duration::ZERO), Duration::from_secs(5));
        assert_eq!(
            retry_delay(Duration::from_secs(40)),
            Duration::from_secs(20)
        );
        assert_eq!(
            retry_delay(Duration::from_secs(3600)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn an_unchanged_probe_yields_an_identical_status() {
        let mut s = store();
        let first = desired_status(&s, &Ok("redis 7.0.15".into()), Timestamp::now());
        s.status = Some(first.clone());
        let later = Timestamp(Timestamp::now().0 + chrono::Duration::seconds(600));
        assert_eq!(desired_status(&s, &Ok("redis 7.0.15".into()), later), first);
    }
}
