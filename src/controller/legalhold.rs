//! LegalHold: an Art. 17(3) exception. The hold itself only reports whether it is in force;
//! the controllers of what it holds (sweeps now, erasures next) honour it.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use tracing::{instrument, warn};

use super::{failure_key, object_key, Context, Error};
use crate::api::common::{merge_conditions, DesiredCondition};
use crate::api::legalhold::{LegalHold, LegalHoldStatus};
use crate::api::Timestamp;

pub const CONTROLLER: &str = "legalhold";

/// Whether the hold is in force at `now`: it has not expired.
pub fn is_active(hold: &LegalHold, now: Timestamp) -> bool {
    hold.spec.expires_at.is_none_or(|e| e > now)
}

/// The status a hold calls for at `now` (pure).
pub fn desired_status(hold: &LegalHold, now: Timestamp) -> LegalHoldStatus {
    let generation = hold.metadata.generation;
    let policies = hold.spec.policies.as_deref().unwrap_or_default();
    let subjects = hold.spec.subjects.as_ref().map_or(0, Vec::len);
    let mut covers = Vec::new();
    if !policies.is_empty() {
        covers.push(format!("policies {}", policies.join(", ")));
    }
    if subjects > 0 {
        covers.push(format!("{subjects} subject(s)"));
    }
    let active = match hold.spec.expires_at {
        Some(expiry) if expiry <= now => DesiredCondition::new(
            "Active",
            false,
            "Expired",
            format!("expired at {expiry}; held data may be deleted again"),
        ),
        Some(expiry) => DesiredCondition::new(
            "Active",
            true,
            "Held",
            format!("holds {} until {expiry}", covers.join(" and ")),
        ),
        None => DesiredCondition::new(
            "Active",
            true,
            "Held",
            format!("holds {} until released", covers.join(" and ")),
        ),
    };
    let existing = hold
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    LegalHoldStatus {
        observed_generation: generation,
        conditions: merge_conditions(existing, vec![active], generation, now),
    }
}

#[instrument(skip_all, fields(hold = %object_key(hold.as_ref())))]
pub async fn reconcile(hold: Arc<LegalHold>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciled(CONTROLLER);
    let now = Timestamp::now();
    let status = desired_status(&hold, now);
    if hold.status.as_ref() != Some(&status) {
        let api: Api<LegalHold> =
            Api::namespaced(ctx.client.clone(), &hold.namespace().unwrap_or_default());
        ctx.apply_status(&api, &hold.name_any(), &status).await?;
    }
    ctx.reset_failures(&failure_key(hold.as_ref()));
    // Wake up when the hold expires, to report it.
    Ok(match hold.spec.expires_at {
        Some(expiry) if expiry > now => Action::requeue(
            (expiry.0 - now.0).to_std().unwrap_or(Duration::ZERO) + Duration::from_secs(1),
        ),
        _ => Action::await_change(),
    })
}

pub fn error_policy(hold: Arc<LegalHold>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(CONTROLLER, error.reason());
    warn!(hold = %object_key(hold.as_ref()), reason = error.reason(), error = %error, "reconcile failed");
    Action::requeue(ctx.backoff(&failure_key(hold.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::ConditionStatus;
    use crate::api::legalhold::LegalHoldSpec;
    use chrono::{DateTime, Utc};

    fn ts(s: &str) -> Timestamp {
        Timestamp(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
    }

    fn hold(expires: Option<&str>) -> LegalHold {
        let mut h = LegalHold::new(
            "litigation",
            LegalHoldSpec {
                reason: "Pending litigation".into(),
                policies: Some(vec!["billing".into()]),
                subjects: None,
                expires_at: expires.map(ts),
            },
        );
        h.metadata.generation = Some(1);
        h
    }

    #[test]
    fn a_hold_is_active_until_it_expires() {
        let now = ts("2026-11-20T09:00:00Z");
        let st = desired_status(&hold(None), now);
        assert_eq!(st.conditions[0].status, ConditionStatus::True);
        assert_eq!(
            st.conditions[0].message,
            "holds policies billing until released"
        );
        assert!(is_active(&hold(Some("2026-11-20T09:00:01Z")), now));
        assert!(!is_active(&hold(Some("2026-11-20T09:00:00Z")), now));
        let expired = desired_status(&hold(Some("2026-11-20T08:00:00Z")), now);
        assert_eq!(
            (
                expired.conditions[0].status,
                expired.conditions[0].reason.as_str()
            ),
            (ConditionStatus::False, "Expired")
        );
        assert_eq!(expired.observed_generation, Some(1));
    }
}
