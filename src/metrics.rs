//! Prometheus metrics. Labels are stable reasons and kinds, never names of people or keys.

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreKindLabels {
    pub store_kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CompliantLabels {
    pub compliant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StallLabels {
    /// `NoProgress`, `HoldUnverifiable` or `TargetFailing`.
    pub why: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: String,
}

pub struct Metrics {
    registry: Registry,
    pub erasure_batches: Family<ActionLabels, Counter>,
    pub erasure_batch_members: Family<ActionLabels, Counter>,
    pub sweeps: Family<OutcomeLabels, Counter>,
    pub items_deleted: Family<StoreKindLabels, Counter>,
    pub items_erased: Family<StoreKindLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconciliations: Family<ControllerLabels, Counter>,
    pub sweep_duration: Histogram,
    pub erasure_requests: Family<PhaseLabels, Gauge>,
    pub erasure_requests_overdue: Gauge,
    pub erasure_requests_due_soon: Gauge,
    pub retention_policies: Family<CompliantLabels, Gauge>,
    pub erasure_requests_longest_in_phase: Family<PhaseLabels, Gauge>,
    pub erasure_requests_stalled: Family<StallLabels, Gauge>,
    pub retention_policies_sweep_late: Gauge,
    pub receipt_upload_failures: Family<ReasonLabels, Counter>,
    pub receipts_pending_upload: Gauge,
}

/// The state of all erasure requests, for the gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErasureCounts {
    /// Requests per phase; every phase is listed, with 0 where none is in it.
    pub by_phase: Vec<(&'static str, i64)>,
    /// Not completed and past their deadline.
    pub overdue: i64,
    /// Not completed, not yet overdue, due within 7 days.
    pub due_soon: i64,
    /// Per unfinished phase, the longest time a request has been in it (seconds); every
    /// unfinished phase is listed, with 0 where none is in it.
    pub longest_in_phase: Vec<(&'static str, i64)>,
    /// Requests not progressing, per why (every why listed).
    pub stalled: Vec<(&'static str, i64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tombstone");
        let sweeps = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "sweeps",
            "Retention sweeps completed, by outcome",
            sweeps.clone(),
        );
        let items_deleted = Family::<StoreKindLabels, Counter>::default();
        registry.register(
            "items_deleted",
            "Items deleted (or given a bounded TTL) by retention sweeps, by store kind",
            items_deleted.clone(),
        );
        let items_erased = Family::<StoreKindLabels, Counter>::default();
        registry.register(
            "items_erased",
            "Records of data subjects erased by erasure requests, by store kind",
            items_erased.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconcile failures, by controller and stable reason",
            reconcile_errors.clone(),
        );
        let reconciliations = Family::<ControllerLabels, Counter>::default();
        registry.register(
            "reconciliations",
            "Reconciliations run, by controller",
            reconciliations.clone(),
        );
        let sweep_duration = Histogram::new(exponential_buckets(0.1, 2.0, 16));
        registry.register(
            "sweep_duration_seconds",
            "Wall-clock time from the start of a sweep to its completion",
            sweep_duration.clone(),
        );
        let erasure_requests = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "erasure_requests",
            "Erasure requests by phase",
            erasure_requests.clone(),
        );
        let erasure_requests_overdue = Gauge::default();
        registry.register(
            "erasure_requests_overdue",
            "Erasure requests not completed by their Art. 12(3) deadline",
            erasure_requests_overdue.clone(),
        );
        let erasure_requests_due_soon = Gauge::default();
        registry.register(
            "erasure_requests_due_soon",
            "Erasure requests not completed whose deadline is within 7 days",
            erasure_requests_due_soon.clone(),
        );
        let retention_policies = Family::<CompliantLabels, Gauge>::default();
        registry.register(
            "retention_policies",
            "RetentionPolicies by their Compliant condition (True, False, Unknown)",
            retention_policies.clone(),
        );
        let erasure_requests_longest_in_phase = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "erasure_requests_longest_in_phase_seconds",
            "Per unfinished phase, the longest any erasure request has been in it",
            erasure_requests_longest_in_phase.clone(),
        );
        let erasure_requests_stalled = Family::<StallLabels, Gauge>::default();
        registry.register(
            "erasure_requests_stalled",
            "Erasure requests not progressing: in one unfinished phase too long (NoProgress), \
             blocked by a LegalHold that cannot be evaluated (HoldUnverifiable) or with a target \
             failing (TargetFailing) for too long",
            erasure_requests_stalled.clone(),
        );
        let retention_policies_sweep_late = Gauge::default();
        registry.register(
            "retention_policies_sweep_late",
            "RetentionPolicies whose last sweep completed longer ago than twice their schedule",
            retention_policies_sweep_late.clone(),
        );
        let receipt_upload_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "receipt_upload_failures",
            "Failed attempts to write receipts to the receipt sink, by stable reason",
            receipt_upload_failures.clone(),
        );
        let receipts_pending_upload = Gauge::default();
        registry.register(
            "receipts_pending_upload",
            "Receipts logged and kept in status but not yet written to the receipt sink",
            receipts_pending_upload.clone(),
        );
        let erasure_batches = Family::<ActionLabels, Counter>::default();
        registry.register(
            "erasure_batches",
            "Batches of erasure targets worked in one pass (a request alone counts as one), by action",
            erasure_batches.clone(),
        );
        let erasure_batch_members = Family::<ActionLabels, Counter>::default();
        registry.register(
            "erasure_batch_members",
            "Erasure targets worked in batches, by action: divided by erasure_batches, the mean batch size",
            erasure_batch_members.clone(),
        );
        Self {
            erasure_batches,
            erasure_batch_members,
            receipt_upload_failures,
            receipts_pending_upload,
            erasure_requests_longest_in_phase,
            erasure_requests_stalled,
            retention_policies_sweep_late,
            retention_policies,
            erasure_requests,
            erasure_requests_overdue,
            erasure_requests_due_soon,
            registry,
            sweeps,
            items_deleted,
            items_erased,
            reconcile_errors,
            reconciliations,
            sweep_duration,
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn reconcile_error(&self, controller: &str, reason: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                controller: controller.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// A batch of `members` erasure targets starts `action` (`find`, `erase`, `verify`).
    pub fn batch_started(&self, action: &str, members: usize) {
        let labels = ActionLabels {
            action: action.to_string(),
        };
        self.erasure_batches.get_or_create(&labels).inc();
        self.erasure_batch_members
            .get_or_create(&labels)
            .inc_by(members as u64);
    }

    pub fn reconciled(&self, controller: &str) {
        self.reconciliations
            .get_or_create(&ControllerLabels {
                controller: controller.into(),
            })
            .inc();
    }

    pub fn deleted(&self, store_kind: &str, n: u64) {
        self.items_deleted
            .get_or_create(&StoreKindLabels {
                store_kind: store_kind.into(),
            })
            .inc_by(n);
    }

    pub fn erased(&self, store_kind: &str, n: u64) {
        self.items_erased
            .get_or_create(&StoreKindLabels {
                store_kind: store_kind.into(),
            })
            .inc_by(n);
    }

    pub fn set_erasure_counts(&self, counts: &ErasureCounts) {
        for (phase, n) in &counts.by_phase {
            self.erasure_requests
                .get_or_create(&PhaseLabels {
                    phase: (*phase).into(),
                })
                .set(*n);
        }
        self.erasure_requests_overdue.set(counts.overdue);
        self.erasure_requests_due_soon.set(counts.due_soon);
        for (phase, seconds) in &counts.longest_in_phase {
            self.erasure_requests_longest_in_phase
                .get_or_create(&PhaseLabels {
                    phase: (*phase).into(),
                })
                .set(*seconds);
        }
        for (why, n) in &counts.stalled {
            self.erasure_requests_stalled
                .get_or_create(&StallLabels { why: (*why).into() })
                .set(*n);
        }
    }

    /// Policies whose sweeps are late (see `retention_policies_sweep_late`).
    pub fn receipt_upload_failed(&self, reason: &str) {
        self.receipt_upload_failures
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn set_late_sweeps(&self, late: i64) {
        self.retention_policies_sweep_late.set(late);
    }

    /// Policies per status of their `Compliant` condition; every status is listed.
    pub fn set_policy_compliance(&self, counts: &[(&'static str, i64)]) {
        for (compliant, n) in counts {
            self.retention_policies
                .get_or_create(&CompliantLabels {
                    compliant: (*compliant).into(),
                })
                .set(*n);
        }
    }

    pub fn sweep_completed(&self, outcome: &str, seconds: f64) {
        self.sweeps
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
        self.sweep_duration.observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_its_labels() {
        let m = Metrics::default();
        m.sweep_completed("Succeeded", 1.5);
        m.deleted("redis", 42);
        m.reconcile_error("retentionpolicy", "StoreNotFound");
        let text = m.render();
        assert!(
            text.contains(r#"tombstone_sweeps_total{outcome="Succeeded"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tombstone_items_deleted_total{store_kind="redis"} 42"#),
            "{text}"
        );
        assert!(text.contains(r#"tombstone_reconcile_errors_total{controller="retentionpolicy",reason="StoreNotFound"} 1"#));
        assert!(text.contains("tombstone_sweep_duration_seconds_count 1"));
    }
}
