//! `kubectl tombstone status`: the DPO's view of all erasure requests: how many are in each
//! phase, which are overdue, which are due soon, and which have stalled.

use std::fmt;

use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use super::{api_error, Error};
use crate::api::common::Timestamp;
use crate::api::erasurerequest::ErasurePhase;
use crate::api::ErasureRequest;
use crate::controller::erasurerequest::plan::{stalled, StallAfter};

/// One request in a list: where it is and where it stands.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub namespace: String,
    pub name: String,
    pub phase: ErasurePhase,
    pub deadline: Option<Timestamp>,
    /// Why it counts as stalled (`NoProgress`, `HoldUnverifiable`, `TargetFailing`).
    pub stalled: Option<&'static str>,
}

/// All requests at one moment (pure: built from a list and a time).
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub now: Timestamp,
    pub due_within: std::time::Duration,
    /// Requests per phase, in the phases' order, zero counts included.
    pub by_phase: Vec<(ErasurePhase, usize)>,
    /// Not completed and past the deadline, most overdue first.
    pub overdue: Vec<Row>,
    /// Not completed, deadline within `due_within`, soonest first.
    pub due_soon: Vec<Row>,
    pub stalled: Vec<Row>,
}

fn answered(phase: ErasurePhase) -> bool {
    matches!(
        phase,
        ErasurePhase::Completed | ErasurePhase::CompletedWithExceptions
    )
}

/// Sorts the requests into the summary's lists.
pub fn summarize(
    requests: &[ErasureRequest],
    now: Timestamp,
    due_within: std::time::Duration,
    stall_after: &StallAfter,
) -> Summary {
    let soon = chrono::Duration::from_std(due_within)
        .ok()
        .and_then(|d| now.0.checked_add_signed(d))
        .unwrap_or(now.0);
    let rows: Vec<Row> = requests
        .iter()
        .map(|r| Row {
            namespace: r.namespace().unwrap_or_default(),
            name: r.name_any(),
            phase: r.status.as_ref().map_or(ErasurePhase::Pending, |s| s.phase),
            deadline: r.status.as_ref().and_then(|s| s.deadline),
            stalled: stalled(r, now, stall_after),
        })
        .collect();
    let by_phase = ErasurePhase::ALL
        .iter()
        .map(|p| (*p, rows.iter().filter(|r| r.phase == *p).count()))
        .collect();
    let open = |r: &&Row| !answered(r.phase);
    let mut overdue: Vec<Row> = rows
        .iter()
        .filter(open)
        .filter(|r| r.deadline.is_some_and(|d| d.0 < now.0))
        .cloned()
        .collect();
    overdue.sort_by_key(|r| (r.deadline.map(|d| d.0), r.namespace.clone(), r.name.clone()));
    let mut due_soon: Vec<Row> = rows
        .iter()
        .filter(open)
        .filter(|r| r.deadline.is_some_and(|d| d.0 >= now.0 && d.0 <= soon))
        .cloned()
        .collect();
    due_soon.sort_by_key(|r| (r.deadline.map(|d| d.0), r.namespace.clone(), r.name.clone()));
    let mut stalled: Vec<Row> = rows
        .iter()
        .filter(|r| r.stalled.is_some())
        .cloned()
        .collect();
    stalled.sort_by_key(|r| (r.namespace.clone(), r.name.clone()));
    Summary {
        now,
        due_within,
        by_phase,
        overdue,
        due_soon,
        stalled,
    }
}

/// Lists the requests of one namespace, or of all, and summarizes them.
pub async fn status(
    client: &Client,
    namespace: Option<&str>,
    due_within: std::time::Duration,
    stall_after: &StallAfter,
) -> Result<Summary, Error> {
    let api: Api<ErasureRequest> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(api_error("list erasure requests"))?;
    Ok(summarize(
        &list.items,
        Timestamp(chrono::Utc::now()),
        due_within,
        stall_after,
    ))
}

/// Whole days and hours between two times, for people (`3d 4h`, `5h`).
fn span(from: Timestamp, to: Timestamp) -> String {
    let hours = (to.0 - from.0).num_hours().abs();
    match (hours / 24, hours % 24) {
        (0, h) => format!("{h}h"),
        (d, 0) => format!("{d}d"),
        (d, h) => format!("{d}d {h}h"),
    }
}

fn table(
    f: &mut fmt::Formatter<'_>,
    rows: &[Row],
    last: &str,
    cell: impl Fn(&Row) -> String,
) -> fmt::Result {
    writeln!(
        f,
        "  {:<24} {:<32} {:<24} {:<22} {last}",
        "NAMESPACE", "NAME", "PHASE", "DEADLINE"
    )?;
    for row in rows {
        let deadline = row
            .deadline
            .map_or_else(|| "-".to_string(), |d| d.to_string());
        writeln!(
            f,
            "  {:<24} {:<32} {:<24} {:<22} {}",
            row.namespace,
            row.name,
            row.phase.as_str(),
            deadline,
            cell(row)
        )?;
    }
    Ok(())
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: usize = self.by_phase.iter().map(|(_, n)| n).sum();
        writeln!(f, "Erasure requests: {total}")?;
        for (phase, count) in self.by_phase.iter().filter(|(_, n)| *n > 0) {
            writeln!(f, "  {:<24} {count}", phase.as_str())?;
        }
        let now = self.now;
        writeln!(f, "\nOverdue: {}", self.overdue.len())?;
        if !self.overdue.is_empty() {
            table(f, &self.overdue, "OVERDUE BY", |r| {
                r.deadline.map_or_else(String::new, |d| span(d, now))
            })?;
        }
        let days = self.due_within.as_secs() / 86_400;
        writeln!(f, "\nDue within {days}d: {}", self.due_soon.len())?;
        if !self.due_soon.is_empty() {
            table(f, &self.due_soon, "DUE IN", |r| {
                r.deadline.map_or_else(String::new, |d| span(now, d))
            })?;
        }
        writeln!(f, "\nStalled: {}", self.stalled.len())?;
        if !self.stalled.is_empty() {
            table(f, &self.stalled, "WHY", |r| {
                r.stalled.unwrap_or("").to_string()
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::erasurerequest::{ErasureRequestSpec, ErasureRequestStatus, Subject};
    use chrono::{TimeZone, Utc};

    fn at(day: u32, hour: u32) -> Timestamp {
        Timestamp(Utc.with_ymd_and_hms(2026, 12, day, hour, 0, 0).unwrap())
    }

    fn request(
        name: &str,
        phase: ErasurePhase,
        deadline: Timestamp,
        since: Timestamp,
    ) -> ErasureRequest {
        let mut r = ErasureRequest::new(
            name,
            ErasureRequestSpec {
                subject: Subject {
                    secret_ref: None,
                    identifiers: None,
                },
                reason: crate::api::erasurerequest::ErasureGround::ConsentWithdrawn,
                received_at: None,
                policies: None,
                dry_run: false,
                reference: None,
                retain_subject_secret: false,
                scope: None,
            },
        );
        r.metadata.namespace = Some("shop".into());
        r.status = Some(ErasureRequestStatus {
            phase,
            phase_since: Some(since),
            deadline: Some(deadline),
            ..Default::default()
        });
        r
    }

    #[test]
    fn requests_are_sorted_into_overdue_due_soon_and_stalled() {
        let now = at(20, 12);
        let requests = [
            request("late", ErasurePhase::Erasing, at(19, 12), at(20, 11)),
            request("later", ErasurePhase::Failed, at(10, 0), at(10, 0)),
            request("done-late", ErasurePhase::Completed, at(1, 0), at(1, 0)),
            request("soon", ErasurePhase::Pending, at(22, 12), at(20, 11)),
            request("stuck", ErasurePhase::Discovering, at(30, 12), at(17, 12)),
            request("far", ErasurePhase::Discovering, at(31, 0), at(20, 11)),
        ];
        let summary = summarize(
            &requests,
            now,
            std::time::Duration::from_secs(7 * 86_400),
            &StallAfter::default(),
        );
        let names = |rows: &[Row]| rows.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&summary.overdue), ["later", "late"]);
        assert_eq!(names(&summary.due_soon), ["soon"]);
        assert_eq!(names(&summary.stalled), ["stuck"]);
        assert_eq!(summary.stalled[0].stalled, Some("NoProgress"));
        let count = |p| {
            summary
                .by_phase
                .iter()
                .find(|(q, _)| *q == p)
                .map(|(_, n)| *n)
        };
        assert_eq!(count(ErasurePhase::Discovering), Some(2));
        assert_eq!(count(ErasurePhase::Verifying), Some(0));

        let text = summary.to_string();
        assert!(text.contains("Erasure requests: 6"), "{text}");
        assert!(text.contains("Overdue: 2"), "{text}");
        assert!(
            text.contains("10d 12h"),
            "the most overdue is late by 10d 12h: {text}"
        );
        assert!(text.contains("Due within 7d: 1"), "{text}");
        assert!(text.contains("NoProgress"), "{text}");
        assert!(
            !text.contains("Verifying"),
            "phases without requests are left out: {text}"
        );
    }
}
