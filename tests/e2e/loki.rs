//! The Loki backend against the Loki test double (`support::loki`): retention sweeps and
//! subject erasure through delete requests and their lifecycle, exact matching of
//! identifiers, escaping, tenants and faults; then the operator flows (DataStore probe,
//! RetentionPolicy, ErasureRequest, LegalHold) with a Loki store. `loki_real_server_*` run the
//! same scenarios against the real Loki that `LOKI_URL` names (and optionally `LOKI_TENANT`;
//! compactor with retention and deletion enabled; a short `delete_request_cancel_period` keeps
//! them quick). Loki cannot be installed from the registries, so they are `#[ignore]`d: run
//! them with `--ignored`; without `LOKI_URL` they fail, they never pass without a server.
//! A real Loki keeps just-pushed lines in its ingesters, out of reach of delete requests, for
//! up to hours: the erasure there waits at most `LOKI_WAIT_MINUTES` (default 45) and then
//! fails saying so.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::http::HttpAuth;
use tombstone::backends::loki::{LokiBackend, LokiConfig};
use tombstone::backends::{
    Backend, Error, Limits, Next, StepBudget, SubjectAction, SubjectJob, SubjectStep, SweepJob,
};

use crate::support::loki::{now_ns, Auth, LokiDouble, SINGLE_TENANT};

const DAY_NS: i64 = 86_400_000_000_000;
const EMAIL: &str = "loki-subject-9c2e@example.org";

fn backend_for(url: &str, tenant: Option<&str>, auth: HttpAuth) -> LokiBackend {
    LokiBackend::new(
        LokiConfig {
            url: url.into(),
            tenant: tenant.map(str::to_string),
            auth,
            resubmit_after: Duration::from_secs(1),
        },
        Limits::default(),
    )
}

fn backend(double: &LokiDouble) -> LokiBackend {
    backend_for(&double.url(), None, HttpAuth::None)
}

fn target(selector: &str, line_filter: Option<&str>) -> Target {
    let mut t = json!({"name": "logs", "store": "logs", "loki": {"selector": selector}});
    if let Some(f) = line_filter {
        t["subject"] = json!({"loki": {"lineFilter": f}});
    }
    serde_json::from_value(t).expect("a valid target")
}

fn ids(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn budget() -> StepBudget {
    StepBudget {
        max_time: Duration::from_secs(10),
        cancel: CancellationToken::new(),
        fence: Default::default(),
    }
}

/// Runs a sweep to the end, polling as the controller would (but sooner). Returns
/// (scanned, deleted, steps that waited, the cursors seen).
async fn sweep(
    backend: &LokiBackend,
    target: &Target,
    cutoff: DateTime<Utc>,
    dry_run: bool,
) -> Result<(u64, u64, usize, Vec<String>), Error> {
    let job = SweepJob {
        target: target.clone(),
        retention: "1d".parse().unwrap(),
        dry_run,
        cutoff,
        held: Default::default(),
    };
    let (mut scanned, mut deleted, mut waits, mut cursors) = (0, 0, 0, Vec::new());
    let mut cursor: Option<String> = None;
    for _ in 0..6000 {
        let step = backend
            .sweep_step(&job, cursor.as_deref(), &budget())
            .await?;
        if let Some(e) = step.failure {
            return Err(e);
        }
        scanned += step.scanned;
        deleted += step.deleted;
        match step.next {
            Next::Done => return Ok((scanned, deleted, waits, cursors)),
            Next::Continue(c) => cursor = Some(c),
            Next::Wait { cursor: c, .. } => {
                waits += 1;
                cursors.push(c.clone());
                cursor = Some(c);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    panic!("sweep did not finish");
}

/// One subject action to its end, polling while Loki works. Returns the last step and the
/// cursors seen on the way.
async fn subject(
    backend: &LokiBackend,
    target: &Target,
    identifiers: &BTreeMap<String, String>,
    action: SubjectAction,
) -> Result<(SubjectStep, Vec<String>), Error> {
    let job = SubjectJob {
        target: target.clone(),
        identifiers: identifiers.clone(),
        action,
    };
    let mut cursor: Option<String> = None;
    let mut cursors = Vec::new();
    for _ in 0..6000 {
        let step = backend
            .subject_step(&job, cursor.as_deref(), &budget())
            .await?;
        if let Some(e) = step.failure {
            return Err(e);
        }
        match &step.next {
            Next::Wait { cursor: c, .. } => {
                cursors.push(c.clone());
                cursor = Some(c.clone());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Next::Done => return Ok((step, cursors)),
            Next::Continue(c) => cursor = Some(c.clone()),
        }
    }
    panic!("subject action did not finish");
}

/// A mailer stream in the store: a line to [`EMAIL`] 3 days old, another line 40 days old.
fn seed_mail_to_the_subject_and_an_old_line(double: &LokiDouble, now: i64) {
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[
            (now - 3 * DAY_NS, format!("mail to {EMAIL}").leak()),
            (now - 40 * DAY_NS, "old"),
        ],
    );
}

fn lines_of(double: &LokiDouble, tenant: &str) -> Vec<String> {
    let mut lines: Vec<String> = double
        .lines(tenant)
        .into_iter()
        .map(|(labels, line)| format!("{}:{line}", labels.get("app").cloned().unwrap_or_default()))
        .collect();
    lines.sort();
    lines
}

fn posts(double: &LokiDouble) -> usize {
    double
        .seen()
        .iter()
        .filter(|s| s.method == "POST" && s.path == "/loki/api/v1/delete")
        .count()
}

#[tokio::test]
async fn loki_probe_names_the_version_and_what_is_wrong() {
    let double = LokiDouble::start().await;
    assert_eq!(backend(&double).probe().await.unwrap(), "loki 2.8.0");

    let guarded = LokiDouble::start_with(true, Some(Auth::Bearer("tok-1".into()))).await;
    let good = backend_for(
        &guarded.url(),
        Some("shop"),
        HttpAuth::Bearer("tok-1".into()),
    );
    assert_eq!(good.probe().await.unwrap(), "loki 2.8.0");
    let wrong = backend_for(
        &guarded.url(),
        Some("shop"),
        HttpAuth::Bearer("nope".into()),
    );
    assert_eq!(
        wrong.probe().await.unwrap_err().reason(),
        "AuthenticationFailed"
    );
    let no_tenant = backend_for(&guarded.url(), None, HttpAuth::Bearer("tok-1".into()));
    let e = no_tenant.probe().await.unwrap_err();
    assert_eq!(e.reason(), "AuthenticationFailed");
    assert!(e.to_string().contains("spec.loki.tenant"), "{e}");

    double.disable_deletion(SINGLE_TENANT);
    let note = backend(&double).probe().await.unwrap();
    assert!(
        note.contains("deletion is not available for this tenant"),
        "{note}"
    );

    let closed = backend_for("http://127.0.0.1:9", None, HttpAuth::None);
    assert_eq!(closed.probe().await.unwrap_err().reason(), "Unreachable");
}

#[tokio::test]
async fn loki_sweep_deletes_old_lines_of_the_selected_streams_once_loki_has_processed() {
    let double = LokiDouble::start().await;
    let now = now_ns();
    let old = now - 10 * DAY_NS;
    double.push(
        SINGLE_TENANT,
        &[("app", "mailer"), ("env", "prod")],
        &[
            (old, "old-1"),
            (old + 1, "old-2"),
            (old + 2, "old-3"),
            (now - 3_600_000_000_000, "new-1"),
        ],
    );
    // Neighbours: another stream with old lines, and a stream whose label only starts alike.
    double.push(SINGLE_TENANT, &[("app", "billing")], &[(old, "old-b")]);
    double.push(SINGLE_TENANT, &[("app", "mailer-2")], &[(old, "old-m2")]);
    let b = backend(&double);
    let t = target(r#"{app="mailer"}"#, None);
    let cutoff = Utc::now() - chrono::Duration::days(1);

    let dry = sweep(&b, &t, cutoff, true).await.unwrap();
    assert_eq!(
        (dry.0, dry.1, dry.2),
        (3, 3, 0),
        "a dry run counts and submits nothing"
    );
    assert_eq!(posts(&double), 0);

    // Slow compactor: while the request is `received`, the lines are still there.
    double.set_cancel_period(Duration::from_secs(3));
    let job = SweepJob {
        target: t.clone(),
        retention: "1d".parse().unwrap(),
        dry_run: false,
        cutoff,
        held: Default::default(),
    };
    let first = b.sweep_step(&job, None, &budget()).await.unwrap();
    assert_eq!(
        (first.scanned, first.deleted),
        (0, 0),
        "counted once processed"
    );
    let Next::Wait { cursor, poll_after } = first.next else {
        panic!("expected to wait on Loki, got {:?}", first.next)
    };
    assert!(cursor.starts_with("v1:loki:{\"id\":"), "{cursor}");
    assert!(
        !cursor.contains("mailer"),
        "no query in the cursor: {cursor}"
    );
    assert!(poll_after >= Duration::from_secs(1));
    assert_eq!(lines_of(&double, SINGLE_TENANT).len(), 6);
    let requests = double.delete_requests(SINGLE_TENANT);
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].query, r#"{app="mailer"}"#);
    assert_eq!(requests[0].end_ms, cutoff.timestamp() * 1000);
    assert_eq!(requests[0].start_ms, 1_000_000_000_000);

    // Resumed from the cursor in status (as after an operator restart) until processed.
    let mut cursor = Some(cursor);
    let (mut scanned, mut deleted) = (0, 0);
    for _ in 0..100 {
        let step = b
            .sweep_step(&job, cursor.as_deref(), &budget())
            .await
            .unwrap();
        scanned += step.scanned;
        deleted += step.deleted;
        match step.next {
            Next::Done => break,
            Next::Wait { cursor: c, .. } => cursor = Some(c),
            Next::Continue(_) => panic!("Loki sweeps never continue"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!((scanned, deleted), (3, 3), "what the dry run reported");
    assert_eq!(
        lines_of(&double, SINGLE_TENANT),
        vec!["billing:old-b", "mailer-2:old-m2", "mailer:new-1"]
    );
    assert_eq!(posts(&double), 1);
}

/// A real Loki 3.8 splits a delete request with a line filter into one per day and
/// processes 70 of them a compaction cycle, oldest first, listing it `N% Complete`
/// meanwhile. An erasure's request covers the range its count searched (400 days without a
/// record, from the sweeps' record with one), not all time since 2001: some 9,000 shards,
/// hours of compaction before the newest days, where the lines are, were reached.
#[tokio::test]
async fn loki_an_erasure_deletes_over_what_it_searched_so_a_loki_that_shards_by_day_gets_to_it() {
    let double = LokiDouble::start().await;
    let now = now_ns();
    let now_ms = now / 1_000_000;
    let day_ms = DAY_NS / 1_000_000;
    seed_mail_to_the_subject_and_an_old_line(&double, now);
    let b = backend(&double);
    let t = target(r#"{app="mailer"}"#, Some("{email}"));
    let (erased, _) = subject(&b, &t, &ids(&[("email", EMAIL)]), SubjectAction::Erase)
        .await
        .unwrap();
    assert_eq!(erased.count, 1);
    let first = double.delete_requests(SINGLE_TENANT)[0].clone();
    assert!(
        first.start_ms >= now_ms - 401 * day_ms && first.shards.len() <= 401,
        "no record: the 400 days searched, {} shards",
        first.shards.len()
    );
    assert_eq!(first.status, "processed");

    // A 30-day retention, swept (a request without a line filter: one piece): another
    // subject's erasure deletes from the sweeps' record, less the late-lines week.
    let cutoff = Utc::now() - chrono::Duration::days(30);
    sweep(&b, &target(r#"{app="mailer"}"#, None), cutoff, false)
        .await
        .unwrap();
    let other = "loki-other-77c1@example.org";
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now - 2 * DAY_NS, format!("mail to {other}").leak())],
    );
    let (erased, _) = subject(&b, &t, &ids(&[("email", other)]), SubjectAction::Erase)
        .await
        .unwrap();
    assert_eq!(erased.count, 1);
    let requests = double.delete_requests(SINGLE_TENANT);
    let sweep_request = &requests[1];
    assert_eq!(sweep_request.shards.len(), 1, "no line filter: not split");
    let second = &requests[2];
    assert!(
        second.shards.len() <= 38,
        "from the sweeps' record: {} shards",
        second.shards.len()
    );
    assert!(lines_of(&double, SINGLE_TENANT)
        .iter()
        .all(|l| !l.contains('@')));

    // The double splits and lists as the real server does: 10 days, 3 shards a cycle (of
    // 2 s, so that polling sees the steps between).
    double.set_delete_batch_size(3);
    double.set_compaction_interval(Duration::from_secs(2));
    let r = reqwest::Client::new()
        .post(format!("{}/loki/api/v1/delete", double.url()))
        .query(&[
            ("query", r#"{app="other"} |= "x""#.to_string()),
            ("start", ((now_ms - 10 * day_ms) / 1000).to_string()),
            ("end", (now_ms / 1000).to_string()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let mut seen = Vec::new();
    crate::support::wait_for("the request processed", Duration::from_secs(30), || {
        let r = double.delete_requests(SINGLE_TENANT)[3].clone();
        if seen.last() != Some(&r.status) {
            seen.push(r.status.clone());
        }
        let done = r.status == "processed";
        async move { done.then_some(()) }
    })
    .await;
    // As it went (a poll that came late may have missed a step, never all of them).
    let percents: Vec<u32> = seen
        .iter()
        .filter_map(|s| s.strip_suffix("% Complete")?.parse().ok())
        .collect();
    assert_eq!(
        (
            seen.first().map(String::as_str),
            seen.last().map(String::as_str)
        ),
        (Some("received"), Some("processed")),
        "{seen:?}"
    );
    assert_eq!(percents.len() + 2, seen.len(), "{seen:?}");
    assert!(!percents.is_empty(), "{seen:?}");
    assert!(percents.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(
        percents.iter().all(|p| [30, 60, 90].contains(p)),
        "{seen:?}"
    );
}

#[tokio::test]
async fn loki_resweeps_reuse_the_pending_request_instead_of_piling_up_duplicates() {
    let double = LokiDouble::start().await;
    double.set_cancel_period(Duration::from_secs(2));
    let old = now_ns() - 10 * DAY_NS;
    double.push(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(old, "a"), (old + 1, "b")],
    );
    let b = backend(&double);
    let t = target(r#"{app="mailer"}"#, None);
    let cutoff = Utc::now() - chrono::Duration::days(1);
    let job = SweepJob {
        target: t.clone(),
        retention: "1d".parse().unwrap(),
        dry_run: false,
        cutoff,
        held: Default::default(),
    };
    // The cursor of the first step is lost (say, the status write failed): the sweep starts
    // over and finds its own pending request.
    let first = b.sweep_step(&job, None, &budget()).await.unwrap();
    let again = b.sweep_step(&job, None, &budget()).await.unwrap();
    let (Next::Wait { cursor: c1, .. }, Next::Wait { cursor: c2, .. }) = (first.next, again.next)
    else {
        panic!("both steps wait on Loki")
    };
    assert_eq!(c1, c2, "the same request");
    assert_eq!(double.delete_requests(SINGLE_TENANT).len(), 1);
    let done = sweep(&b, &t, cutoff, false).await.unwrap();
    assert_eq!(done.1, 2);
    assert_eq!(double.delete_requests(SINGLE_TENANT).len(), 1);
    // Swept again with the same cutoff once processed: nothing left, nothing submitted.
    let redo = sweep(&b, &t, cutoff, false).await.unwrap();
    assert_eq!((redo.1, redo.2), (0, 0));
    assert_eq!(posts(&double), 1);
}

#[tokio::test]
async fn loki_erasure_takes_the_subjects_lines_only_and_verifies() {
    let double = LokiDouble::start().await;
    let now = now_ns();
    let lines = [
        (now - 5 * DAY_NS, "login user=user-47 ok"),
        (now - 4 * DAY_NS, "{\"user\":\"user-47\",\"msg\":\"sent\"}"),
        (now - DAY_NS, "login user=user-4711 ok"),
        (now - DAY_NS + 1, "login user=xuser-47 ok"),
        (now - 3_600_000_000_000, format!("mail to {EMAIL}.").leak()),
        (now - 3_600_000_000_001, "mail to bob@example.org"),
    ];
    double.push(SINGLE_TENANT, &[("app", "mailer")], &lines);
    double.push(
        SINGLE_TENANT,
        &[("app", "billing")],
        &[(now - DAY_NS, "invoice user-47")],
    );
    let b = backend(&double);
    let subject_ids = ids(&[("userId", "user-47"), ("email", EMAIL)]);

    let by_user = target(r#"{app="mailer"}"#, Some("{userId}"));
    let (found, _) = subject(&b, &by_user, &subject_ids, SubjectAction::Find)
        .await
        .unwrap();
    assert_eq!(
        (found.count, found.ran),
        (2, true),
        "user-4711 and xuser-47 are not user-47"
    );
    let (erased, cursors) = subject(&b, &by_user, &subject_ids, SubjectAction::Erase)
        .await
        .unwrap();
    assert_eq!(erased.count, 2);
    assert!(!cursors.is_empty(), "erase waits for Loki to process");
    for c in &cursors {
        assert!(!c.contains("user-47") && !c.contains("mailer"), "{c}");
    }
    let (verified, _) = subject(&b, &by_user, &subject_ids, SubjectAction::Verify)
        .await
        .unwrap();
    assert_eq!(verified.count, 0);

    let by_email = target(r#"{app="mailer"}"#, Some("{email}"));
    let (erased, _) = subject(&b, &by_email, &subject_ids, SubjectAction::Erase)
        .await
        .unwrap();
    assert_eq!(erased.count, 1);
    assert_eq!(
        lines_of(&double, SINGLE_TENANT),
        vec![
            "billing:invoice user-47",
            "mailer:login user=user-4711 ok",
            "mailer:login user=xuser-47 ok",
            "mailer:mail to bob@example.org",
        ]
    );
    // The filter sent is the exact regex form, not a substring `|=`.
    let queries: Vec<String> = double
        .delete_requests(SINGLE_TENANT)
        .into_iter()
        .map(|r| r.query)
        .collect();
    assert_eq!(
        queries[0],
        r#"{app="mailer"} |~ "(?:^|[^0-9A-Za-z_])user-47(?:$|[^0-9A-Za-z_])""#
    );
}

#[tokio::test]
async fn loki_identifiers_with_quotes_backslashes_pipes_and_braces_cannot_widen_the_query() {
    let double = LokiDouble::start().await;
    let now = now_ns();
    let hostile = [r#"a"b"#, r"c\d", "e|f", "g}h", r#"x" |= ""#, ".*"];
    let mut lines: Vec<(i64, String)> = Vec::new();
    for (i, id) in hostile.iter().enumerate() {
        lines.push((now - DAY_NS + i as i64, format!("id={id} end")));
    }
    // Lines each hostile id would select if it were not escaped.
    for (i, line) in [
        "id=ab end",
        "id=e end",
        "id=f end",
        "id=c1 end",
        "id=anything end",
        "id=x end",
    ]
    .iter()
    .enumerate()
    {
        lines.push((now - 2 * DAY_NS + i as i64, line.to_string()));
    }
    let refs: Vec<(i64, &str)> = lines.iter().map(|(t, l)| (*t, l.as_str())).collect();
    double.push(SINGLE_TENANT, &[("app", "mailer")], &refs);
    let b = backend(&double);
    let t = target(r#"{app="mailer"}"#, Some("id={userId} "));
    for id in hostile {
        let identifiers = ids(&[("userId", id)]);
        let (found, _) = subject(&b, &t, &identifiers, SubjectAction::Find)
            .await
            .unwrap();
        assert_eq!(found.count, 1, "{id}");
        let (erased, _) = subject(&b, &t, &identifiers, SubjectAction::Erase)
            .await
            .unwrap();
        assert_eq!(erased.count, 1, "{id}");
    }
    assert_eq!(
        double.lines(SINGLE_TENANT).len(),
        6,
        "only the neighbours are left"
    );
}

#[tokio::test]
async fn loki_a_locator_whose_identifier_is_missing_is_skipped() {
    let double = LokiDouble::start().await;
    let b = backend(&double);
    let t = target(r#"{app="mailer"}"#, Some("{email}"));
    let (step, _) = subject(&b, &t, &ids(&[("userId", "47")]), SubjectAction::Erase)
        .await
        .unwrap();
    assert!(!step.ran);
    assert_eq!(step.skipped, vec!["lineFilter needs {email}"]);
    assert!(double.seen().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn loki_deletion_disabled_is_a_clear_failure_not_a_silent_success() {
    let double = LokiDouble::start().await;
    double.push(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now_ns() - 10 * DAY_NS, "old")],
    );
    double.disable_deletion(SINGLE_TENANT);
    let b = backend(&double);
    let cutoff = Utc::now() - chrono::Duration::days(1);
    let e = sweep(&b, &target(r#"{app="mailer"}"#, None), cutoff, false)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "StoreError");
    assert!(
        e.to_string()
            .contains("deletion is not available for this tenant"),
        "{e}"
    );
    assert!(e.to_string().contains("deletion_mode"), "{e}");
    let t = target(r#"{app="mailer"}"#, Some("{email}"));
    let e = subject(&b, &t, &ids(&[("email", EMAIL)]), SubjectAction::Erase)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("refuses deletion"), "{e}");
    assert_eq!(double.lines(SINGLE_TENANT).len(), 1);
}

#[tokio::test]
async fn loki_faults_map_to_retryable_and_auth_errors_and_retries_do_not_duplicate() {
    let double = LokiDouble::start().await;
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now_ns() - 10 * DAY_NS, "old")],
    );
    let b = backend(&double);
    let t = target(r#"{app="mailer"}"#, None);
    let cutoff = Utc::now() - chrono::Duration::days(1);
    for (status, reason) in [
        (429, "Unreachable"),
        (503, "Unreachable"),
        (500, "Unreachable"),
        (401, "AuthenticationFailed"),
    ] {
        double.fail_next(None, "/loki/api/v1/query", status, "boom", 1);
        let e = sweep(&b, &t, cutoff, false).await.unwrap_err();
        assert_eq!(e.reason(), reason, "{status}");
    }
    // Loki accepted the POST but the listing after it fails: the retry finds the request.
    double.fail_later(
        Some(http::Method::GET),
        "/loki/api/v1/delete",
        1,
        502,
        "bad gateway",
        1,
    );
    assert_eq!(
        sweep(&b, &t, cutoff, false).await.unwrap_err().reason(),
        "Unreachable"
    );
    assert_eq!(sweep(&b, &t, cutoff, false).await.unwrap().1, 1);
    assert_eq!(double.delete_requests(SINGLE_TENANT).len(), 1);

    // A store error on a request that carried an identifier never copies the body.
    double.fail_next(
        None,
        "/loki/api/v1/query",
        400,
        &format!("parse error near {EMAIL}"),
        1,
    );
    let st = target(r#"{app="mailer"}"#, Some("{email}"));
    let e = subject(&b, &st, &ids(&[("email", EMAIL)]), SubjectAction::Find)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "StoreError");
    assert!(!e.to_string().contains(EMAIL), "{e}");
}

#[tokio::test]
async fn loki_multi_tenant_requests_carry_the_tenant_and_touch_no_other_tenant() {
    let double = LokiDouble::start_with(true, Some(Auth::Basic("ops".into(), "pw".into()))).await;
    let old = now_ns() - 10 * DAY_NS;
    double.push_flushed("shop", &[("app", "mailer")], &[(old, "shop-old")]);
    double.push_flushed("other", &[("app", "mailer")], &[(old, "other-old")]);
    let b = backend_for(
        &double.url(),
        Some("shop"),
        HttpAuth::Basic {
            username: "ops".into(),
            password: "pw".into(),
        },
    );
    let cutoff = Utc::now() - chrono::Duration::days(1);
    let done = sweep(&b, &target(r#"{app="mailer"}"#, None), cutoff, false)
        .await
        .unwrap();
    assert_eq!(done.1, 1);
    assert!(double.lines("shop").is_empty());
    assert_eq!(double.lines("other").len(), 1);
    assert!(double
        .seen()
        .iter()
        .all(|s| s.tenant.as_deref() == Some("shop")));
    let unauthenticated = backend_for(&double.url(), Some("shop"), HttpAuth::None);
    let e = sweep(
        &unauthenticated,
        &target(r#"{app="mailer"}"#, None),
        cutoff,
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(e.reason(), "AuthenticationFailed");
}

#[tokio::test]
async fn loki_match_all_selectors_are_refused_before_anything_is_sent() {
    let double = LokiDouble::start().await;
    let b = backend(&double);
    let cutoff = Utc::now() - chrono::Duration::days(1);
    for selector in ["{}", r#"{app=~".*"}"#, r#"{app!="x"}"#] {
        let e = sweep(&b, &target(selector, None), cutoff, false)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "InvalidSpec", "{selector}");
    }
    assert!(double.seen().is_empty());
}

// ---- The double's own LogQL and regex evaluation ----

use crate::support::loki::{parse_log_query, parse_metric_query, Labels, Regex};

#[test]
fn loki_double_regex_subset_behaves_like_re2() {
    let r = |p: &str| Regex::new(p).unwrap();
    assert!(r(r"(?:^|[^0-9A-Za-z_])user-47(?:$|[^0-9A-Za-z_])").find("id=user-47 ok"));
    assert!(!r(r"(?:^|[^0-9A-Za-z_])user-47(?:$|[^0-9A-Za-z_])").find("id=user-4711 ok"));
    assert!(r(r"\buser-47\b").find("user-47"));
    assert!(!r(r"\buser-47\b").find("user-47x"));
    assert!(r("mailer|billing").full_match("billing"));
    assert!(!r("mailer|billing").full_match("billing2"));
    assert!(r(".+").full_match("x") && !r(".+").full_match(""));
    assert!(r(r"a\.b\*c\|d\}e\\").find(r"xa.b*c|d}e\y"));
    assert!(r("a{2,3}b").find("aab") && !r("^a{2,3}b").find("ab"));
    assert!(r("(?i)user-x").find("USER-X") && !r("user-x").find("USER-X"));
    assert!(r("to=(?i:bob@x)!").find("to=Bob@X!") && !r("to=(?i:bob@x)!").find("TO=bob@x!"));
    assert!(Regex::new("(?s)x").is_err());
}

#[test]
fn loki_double_parses_log_and_metric_queries() {
    let q = parse_log_query(r#"{app="m", env!~"dev|test"} |= "a\"b" |~ `x\d`"#).unwrap();
    let labels: Labels = [("app".to_string(), "m".to_string())].into();
    assert!(q.selects(&labels));
    assert!(q.keeps(r#"a"b x1"#) && !q.keeps("ab x1"));
    let (sum, _, range) =
        parse_metric_query(r#"sum(count_over_time({a="b"} |~ "x" [60s]))"#).unwrap();
    assert!(sum && range == 60_000_000_000);
    assert!(parse_log_query(r#"{app="mailer""#).is_err());
    assert!(parse_log_query("{}").is_ok());
}

/// The double answers as a real Loki 2.8 did (recorded when the double was written).
#[tokio::test]
async fn loki_double_answers_the_delete_api_as_the_recorded_facts_say() {
    let double = LokiDouble::start().await;
    double.set_cancel_period(Duration::from_secs(30));
    let base = double.url();
    let http = reqwest::Client::new();
    let now = now_ns();
    push_http(
        &base,
        None,
        json!({"app": "mailer"}),
        &[
            (now - 5_000_000_000, "to bob@example.com".into()),
            (now - 4_000_000_000, "to amy@example.com".into()),
        ],
    )
    .await;
    let delete = |params: Vec<(&'static str, String)>| {
        http.post(format!("{base}/loki/api/v1/delete"))
            .query(&params)
            .send()
    };
    let end = (now / 1_000_000_000 - 1).to_string();
    let start = (now / 1_000_000_000 - 600).to_string();
    let q = r#"{app="mailer"} |= "bob@example.com""#.to_string();
    let answer = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        (status, r.text().await.unwrap().trim().to_string())
    };
    let accepted = delete(vec![
        ("query", q.clone()),
        ("start", start.clone()),
        ("end", end.clone()),
    ])
    .await
    .unwrap();
    assert_eq!(
        answer(accepted).await,
        (204, String::new()),
        "no body, no id"
    );
    for (params, expected) in [
        (
            vec![
                ("query", r#"{app="mailer""#.to_string()),
                ("start", start.clone()),
            ],
            "invalid query expression",
        ),
        (
            vec![
                ("query", q.clone()),
                ("start", end.clone()),
                ("end", start.clone()),
            ],
            "start time can't be greater than end time",
        ),
        (vec![("query", q.clone())], "start time not set"),
        (
            vec![("query", q.clone()), ("start", "0".into())],
            "invalid start time: require unix seconds or RFC3339 format",
        ),
        (
            vec![
                ("query", q.clone()),
                ("start", start.clone()),
                ("end", "9999999999".into()),
            ],
            "deletes in the future are not allowed",
        ),
    ] {
        let r = delete(params).await.unwrap();
        assert_eq!(answer(r).await, (400, expected.to_string()));
    }
    let everything = delete(vec![
        ("query", r#"{} |= "x""#.into()),
        ("start", start.clone()),
    ])
    .await
    .unwrap();
    assert_eq!(
        everything.status().as_u16(),
        204,
        "Loki accepts {{}}: the operator must never send it"
    );

    let list: serde_json::Value = http
        .get(format!("{base}/loki/api/v1/delete"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let first = &list[0];
    assert_eq!(first["query"], q);
    assert_eq!(first["status"], "received");
    assert_eq!(first["start_time"].to_string(), start);
    assert!(first["created_at"].is_f64());
    // While received, the lines are still returned.
    let range: serde_json::Value = http
        .get(format!("{base}/loki/api/v1/query_range"))
        .query(&[
            ("query", r#"{app="mailer"}"#),
            ("start", &(now - 60_000_000_000).to_string()),
            ("limit", "10"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        range["data"]["result"][0]["values"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let id = first["request_id"].as_str().unwrap().to_string();
    let cancel = http
        .delete(format!("{base}/loki/api/v1/delete"))
        .query(&[("request_id", &id)])
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status().as_u16(), 204);
    let again = http
        .delete(format!("{base}/loki/api/v1/delete"))
        .query(&[("request_id", &id)])
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer(again).await,
        (
            404,
            "could not find delete request with given id".to_string()
        )
    );
    let build: serde_json::Value = http
        .get(format!("{base}/loki/api/v1/status/buildinfo"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(build["version"], "2.8.0");

    let tenants = LokiDouble::start_with(true, None).await;
    let r = http
        .get(format!("{}/loki/api/v1/delete", tenants.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(answer(r).await, (401, "no org id".to_string()));
    tenants.disable_deletion("shop");
    let r = http
        .get(format!("{}/loki/api/v1/delete", tenants.url()))
        .header("X-Scope-OrgID", "shop")
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer(r).await,
        (403, "deletion is not available for this tenant".to_string())
    );
}

// ---- The operator with a Loki store ----

use kube::api::DeleteParams;
use kube::Api;

use tombstone::api::erasurerequest::{ErasurePhase, ErasureTargetPhase};
use tombstone::api::{ConditionStatus, DataStore, ErasureRequest, LegalHold, RetentionPolicy};

use crate::erasure::wait_phase;
use crate::fixtures::*;

async fn loki_store(
    client: &kube::Client,
    ns: &str,
    name: &str,
    url: &str,
    extra: serde_json::Value,
) {
    // The double keeps just-pushed lines "in its ingesters" for 2 s: submit again soon.
    let mut loki = json!({"url": url, "resubmitAfter": "1s"});
    if let (Some(l), Some(e)) = (loki.as_object_mut(), extra.as_object()) {
        l.extend(e.clone());
    }
    let mut spec = json!({"loki": loki});
    // The double speaks plain HTTP: credentials may go there only with insecure.
    if extra.get("credentialsSecretRef").is_some() {
        spec["insecure"] = json!(true);
    }
    create::<DataStore>(
        client,
        ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore", "metadata": {"name": name}, "spec": spec}),
    )
    .await;
}

#[tokio::test]
async fn a_loki_store_is_ready_with_its_version_or_says_the_credentials_are_wrong() {
    let (client, ns) = setup("loki-ready").await;
    let double = LokiDouble::start_with(true, Some(Auth::Bearer("tok-9".into()))).await;
    let operator = TestOperator::start(&ns).await;
    create_credentials_secret(&client, &ns, "loki-auth", json!({"token": "tok-9"})).await;
    loki_store(
        &client,
        &ns,
        "logs",
        &double.url(),
        json!({"tenant": "shop", "credentialsSecretRef": {"name": "loki-auth"}}),
    )
    .await;
    let store = wait_store_ready(&client, &ns, "logs", true).await;
    let status = store.status.unwrap();
    assert_eq!(status.store_type.as_deref(), Some("loki"));
    let (_, _, message) = condition(&status.conditions, "Ready");
    assert_eq!(message, "loki 2.8.0");
    loki_store(
        &client,
        &ns,
        "anonymous",
        &double.url(),
        json!({"tenant": "shop"}),
    )
    .await;
    let store = wait_store_ready(&client, &ns, "anonymous", false).await;
    let (_, reason, _) = condition(&store.status.unwrap().conditions, "Ready");
    assert_eq!(reason, "AuthenticationFailed");
    operator.stop().await;
}

#[tokio::test]
async fn a_loki_policy_sweeps_through_the_operator_and_a_refusing_loki_fails_the_target() {
    let (client, ns) = setup("loki-sweep").await;
    let double = LokiDouble::start().await;
    let old = now_ns() - 2 * 3_600_000_000_000;
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(old, "old-1"), (old + 1, "old-2"), (now_ns(), "new")],
    );
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "billing")],
        &[(old, "billing-old")],
    );
    let refusing = LokiDouble::start().await;
    refusing.disable_deletion(SINGLE_TENANT);
    let operator = TestOperator::start(&ns).await;
    loki_store(&client, &ns, "logs", &double.url(), json!({})).await;
    loki_store(&client, &ns, "refusing", &refusing.url(), json!({})).await;
    wait_store_ready(&client, &ns, "logs", true).await;
    wait_store_ready(&client, &ns, "refusing", true).await;
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json(
            "mailer",
            "1h",
            json!([
                {"name": "logs", "store": "logs", "loki": {"selector": "{app=\"mailer\"}"}},
                {"name": "refused", "store": "refusing", "loki": {"selector": "{app=\"mailer\"}"}}
            ]),
        ),
    )
    .await;
    let mut preview = policy_json(
        "preview",
        "1h",
        json!([{"name": "billing", "store": "logs", "loki": {"selector": "{app=\"billing\"}"}}]),
    );
    preview["spec"]["dryRun"] = json!(true);
    create::<RetentionPolicy>(&client, &ns, preview).await;
    let policy = wait_sweep_completed(&client, &ns, "mailer", None).await;
    let status = policy.status.unwrap();
    let logs = &status.targets[0];
    assert_eq!(
        (logs.scanned, logs.deleted, logs.cursor.as_deref()),
        (2, 2, None)
    );
    let refused = &status.targets[1];
    assert_eq!(
        refused.phase,
        tombstone::api::retentionpolicy::TargetPhase::Failed
    );
    assert!(
        refused
            .message
            .contains("deletion is not available for this tenant"),
        "{}",
        refused.message
    );
    assert_eq!(
        lines_of(&double, SINGLE_TENANT),
        vec!["billing:billing-old", "mailer:new"]
    );
    let preview = wait_sweep_completed(&client, &ns, "preview", None)
        .await
        .status
        .unwrap();
    let last = preview.last_sweep.unwrap();
    assert_eq!(
        last.outcome,
        tombstone::api::retentionpolicy::SweepOutcome::DryRun
    );
    assert_eq!(
        (preview.targets[0].deleted, preview.targets[0].deleted_total),
        (1, 0)
    );
    let (degraded, _, _) = condition(&status.conditions, "Degraded");
    assert_eq!(degraded, ConditionStatus::True);
    operator.stop().await;
}

#[tokio::test]
async fn a_loki_erasure_completes_after_processing_and_a_hold_blocks_it_until_released() {
    let (client, ns) = setup("loki-erasure").await;
    let double = LokiDouble::start().await;
    let now = now_ns();
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[
            (now - DAY_NS, format!("sent to {EMAIL}").leak()),
            (now - DAY_NS + 1, format!("bounce from {EMAIL}").leak()),
            (now - DAY_NS + 2, format!("sent to x{EMAIL}").leak()),
        ],
    );
    let operator = TestOperator::start(&ns).await;
    loki_store(&client, &ns, "logs", &double.url(), json!({})).await;
    let mut mailer = policy_json(
        "mailer",
        "30d",
        json!([{"name": "logs", "store": "logs", "loki": {"selector": "{app=\"mailer\"}"},
                "subject": {"loki": {"lineFilter": "{email}"}}}]),
    );
    mailer["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(&client, &ns, mailer).await;
    hold_policies(&client, &ns, "audit", &["mailer"]).await;
    create_subject_secret(&client, &ns, "dsr-loki", json!({"email": EMAIL})).await;
    request_erasure(&client, &ns, "dsr-loki", "dsr-loki").await;
    wait_phase(&client, &ns, "dsr-loki", ErasurePhase::Blocked).await;
    assert!(
        double.delete_requests(SINGLE_TENANT).is_empty(),
        "held: nothing submitted"
    );
    Api::<LegalHold>::namespaced(client.clone(), &ns)
        .delete("audit", &DeleteParams::default())
        .await
        .unwrap();
    let done = wait_phase(&client, &ns, "dsr-loki", ErasurePhase::Completed).await;
    let status = done.status.unwrap();
    let t = &status.targets[0];
    assert_eq!(
        (t.phase, t.found, t.erased, t.remaining),
        (ErasureTargetPhase::Verified, 2, 2, 0)
    );
    assert_eq!(
        lines_of(&double, SINGLE_TENANT),
        vec![format!("mailer:sent to x{EMAIL}")]
    );
    assert_eq!(double.delete_requests(SINGLE_TENANT).len(), 1);
    let trail = format!(
        "{}\n{:?}\n{:?}",
        serde_json::to_string(&status).unwrap(),
        events_for(&client, &ns, "dsr-loki").await,
        captured_logs()
    );
    assert!(
        !trail.contains(EMAIL),
        "the identifier leaked into the operator's trail"
    );
    // Loki keeps each delete request with its query text: the receipt says so.
    let record = logged_audit_record(status.receipt.as_deref().unwrap());
    assert_eq!(record["queryTextRetainedBy"], json!(["loki"]));
    operator.stop().await;
}

#[tokio::test]
async fn a_loki_sweep_waiting_on_loki_survives_an_operator_restart_without_a_second_request() {
    let (client, ns) = setup("loki-resume").await;
    let double = LokiDouble::start().await;
    // A long cancel period: the sweep is still waiting when the operator stops.
    double.set_cancel_period(Duration::from_secs(8));
    let old = now_ns() - 2 * 3_600_000_000_000;
    double.push(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(old, "a"), (old + 1, "b"), (old + 2, "c")],
    );
    let operator = TestOperator::start(&ns).await;
    loki_store(&client, &ns, "logs", &double.url(), json!({})).await;
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json(
            "mailer",
            "1h",
            json!([{"name": "logs", "store": "logs", "loki": {"selector": "{app=\"mailer\"}"}}]),
        ),
    )
    .await;
    let waiting = wait_policy(
        &client,
        &ns,
        "mailer",
        "a cursor holding the delete request",
        Duration::from_secs(60),
        |p| {
            p.status.as_ref().is_some_and(|s| {
                s.targets.first().is_some_and(|t| {
                    t.cursor
                        .as_deref()
                        .is_some_and(|c| c.starts_with("v1:loki:"))
                })
            })
        },
    )
    .await;
    operator.stop().await;
    let cursor = waiting.status.unwrap().targets[0].cursor.clone().unwrap();
    let id = &double.delete_requests(SINGLE_TENANT)[0].request_id;
    assert!(cursor.contains(id.as_str()), "{cursor}");
    assert_eq!(
        double.lines(SINGLE_TENANT).len(),
        3,
        "Loki has not processed yet"
    );

    let operator = TestOperator::start(&ns).await;
    let done = wait_sweep_completed(&client, &ns, "mailer", None)
        .await
        .status
        .unwrap();
    assert_eq!(done.last_sweep.unwrap().deleted, 3);
    assert_eq!(done.targets[0].deleted_total, 3, "counted once");
    assert!(double.lines(SINGLE_TENANT).is_empty());
    assert_eq!(double.delete_requests(SINGLE_TENANT).len(), 1);
    operator.stop().await;
}

// ---- Opt-in: a real Loki (LOKI_URL, optional LOKI_TENANT) ----

/// `LOKI_URL` and `LOKI_TENANT`; panics when `LOKI_URL` is unset (the tests that call this are
/// ignored unless asked for, and then must not pass without a server).
fn real_loki() -> (String, Option<String>) {
    let url = std::env::var("LOKI_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .expect("LOKI_URL is not set: this test needs a real Loki (see the module's doc)");
    (
        url,
        std::env::var("LOKI_TENANT").ok().filter(|t| !t.is_empty()),
    )
}

async fn push_http(
    url: &str,
    tenant: Option<&str>,
    labels: serde_json::Value,
    lines: &[(i64, String)],
) {
    let values: Vec<serde_json::Value> = lines
        .iter()
        .map(|(t, l)| json!([t.to_string(), l]))
        .collect();
    let mut request = reqwest::Client::new()
        .post(format!("{}/loki/api/v1/push", url.trim_end_matches('/')))
        .json(&json!({"streams": [{"stream": labels, "values": values}]}));
    if let Some(t) = tenant {
        request = request.header("X-Scope-OrgID", t);
    }
    let response = request.send().await.expect("push to Loki");
    assert!(
        response.status().is_success(),
        "push: {}",
        response.status()
    );
}

/// How long the real-server test waits for Loki to flush a just-pushed line to the store its
/// compactor works on (`LOKI_WAIT_MINUTES`, default 45: with Loki's defaults lines stay in
/// the ingesters up to `max_chunk_age`, 2h, and the index is shipped after that; a Loki
/// with a short `chunk_idle_period` takes a few minutes).
fn real_wait() -> Duration {
    let minutes = std::env::var("LOKI_WAIT_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(45u64);
    Duration::from_secs(minutes * 60)
}

/// How many lines `query` returns over the last three days, straight from Loki.
async fn real_count(url: &str, tenant: Option<&str>, query: &str) -> usize {
    let now = now_ns();
    let mut request = reqwest::Client::new()
        .get(format!(
            "{}/loki/api/v1/query_range",
            url.trim_end_matches('/')
        ))
        .query(&[
            ("query", query.to_string()),
            ("start", (now - 3 * DAY_NS).to_string()),
            ("end", (now + 1_000_000_000).to_string()),
            ("limit", "1000".to_string()),
        ]);
    if let Some(t) = tenant {
        request = request.header("X-Scope-OrgID", t);
    }
    let body: serde_json::Value = request.send().await.unwrap().json().await.unwrap();
    body["data"]["result"]
        .as_array()
        .map(|streams| {
            streams
                .iter()
                .map(|s| s["values"].as_array().map_or(0, Vec::len))
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
#[ignore = "needs a real Loki: set LOKI_URL (and LOKI_TENANT if it is multi-tenant), run with --ignored"]
async fn loki_real_server_sweep_and_erasure() {
    let (url, tenant) = real_loki();
    let tenant = tenant.as_deref();
    let b = LokiBackend::new(
        LokiConfig {
            url: url.clone(),
            tenant: tenant.map(str::to_string),
            auth: HttpAuth::None,
            // A real Loki leaves recent lines in its ingesters: look again every minute.
            resubmit_after: Duration::from_secs(60),
        },
        Limits::default(),
    );
    assert!(b.probe().await.unwrap().starts_with("loki "));
    let run = format!("tombstone-test-{}", now_ns());
    let now = now_ns();
    // Loki refuses lines far older than its reject_old_samples_max_age (default 1w).
    let old = now - 2 * DAY_NS;
    push_http(
        &url,
        tenant,
        json!({"app": run}),
        &[
            (old, "old line".into()),
            (now - 60_000_000_000, "login user=user-47 ok".into()),
            (now - 60_000_000_000 + 1, "login user=user-4711 ok".into()),
        ],
    )
    .await;
    let selector = format!("{{app=\"{run}\"}}");
    crate::support::wait_for(
        "Loki returning the pushed lines",
        Duration::from_secs(120),
        || {
            let (url, selector) = (url.clone(), selector.clone());
            async move { (real_count(&url, tenant, &selector).await == 3).then_some(()) }
        },
    )
    .await;
    let t = target(&selector, Some("{userId}"));
    let identifiers = ids(&[("userId", "user-47")]);
    let subject_query = format!("{selector} |= \"user=user-47 \"");
    let (found, _) = subject(&b, &t, &identifiers, SubjectAction::Find)
        .await
        .unwrap();
    assert_eq!(found.count, 1, "the line pushed a minute ago is found");

    // Erase: Loki processes the request but leaves the line while it is in the ingesters;
    // the erasure waits and submits again, and is done only once Loki no longer returns it.
    let job = SubjectJob {
        target: t.clone(),
        identifiers: identifiers.clone(),
        action: SubjectAction::Erase,
    };
    let deadline = std::time::Instant::now() + real_wait();
    let mut cursor: Option<String> = None;
    let erased = loop {
        let step = b
            .subject_step(&job, cursor.as_deref(), &budget())
            .await
            .unwrap();
        assert!(step.failure.is_none());
        match step.next {
            Next::Done => break step.count,
            Next::Continue(c) => cursor = Some(c),
            Next::Wait { cursor: c, .. } => {
                let note = tombstone::backends::describe_wait(&c).unwrap_or_default();
                if note.starts_with("LinesInIngesters") {
                    assert!(
                        real_count(&url, tenant, &subject_query).await > 0,
                        "waiting for lines that are gone"
                    );
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "after {:?} Loki still returns the subject's line after processed delete requests: its ingesters have not flushed it to the store the compactor works on (see the README's Loki section); the backend keeps waiting, as it should. Raise LOKI_WAIT_MINUTES, or run Loki with a short chunk_idle_period. Last state: {note}",
                    real_wait()
                );
                cursor = Some(c);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    assert_eq!(erased, 1);
    assert_eq!(real_count(&url, tenant, &subject_query).await, 0);
    let (verified, _) = subject(&b, &t, &identifiers, SubjectAction::Verify)
        .await
        .unwrap();
    assert_eq!(verified.count, 0);
    let neighbour = ids(&[("userId", "user-4711")]);
    let (left, _) = subject(&b, &t, &neighbour, SubjectAction::Find)
        .await
        .unwrap();
    assert_eq!(left.count, 1, "user-4711's line survives");

    // Sweep: the count is what went; what a processed request left is still there and is
    // counted by a dry run afterwards, never reported deleted.
    let cutoff = Utc::now() - chrono::Duration::days(1);
    let dry = sweep(&b, &t, cutoff, true).await.unwrap();
    assert_eq!(dry.1, 1, "the old line");
    let real = sweep(&b, &t, cutoff, false).await.unwrap();
    let after = sweep(&b, &t, cutoff, true).await.unwrap();
    assert_eq!(
        real.1 + after.1,
        dry.1,
        "deleted ({}) and left ({}) make up what was there",
        real.1,
        after.1
    );
}

#[tokio::test]
async fn a_hold_landing_while_loki_waits_cancels_the_delete_request_and_holds_win() {
    let (client, ns) = setup("loki-hold-wait").await;
    let double = LokiDouble::start().await;
    // A long cancel period: the erasure is still waiting on Loki when the hold lands.
    double.set_cancel_period(Duration::from_secs(600));
    let now = now_ns();
    double.push(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now - DAY_NS, format!("sent to {EMAIL}").leak())],
    );
    let operator = TestOperator::start(&ns).await;
    loki_store(&client, &ns, "logs", &double.url(), json!({})).await;
    let mut mailer = policy_json(
        "mailer",
        "30d",
        json!([{"name": "logs", "store": "logs", "loki": {"selector": "{app=\"mailer\"}"},
                "subject": {"loki": {"lineFilter": "{email}"}}}]),
    );
    mailer["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(&client, &ns, mailer).await;
    create_subject_secret(&client, &ns, "dsr-wait", json!({"email": EMAIL})).await;
    request_erasure(&client, &ns, "dsr-wait", "dsr-wait").await;
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    crate::support::wait_for(
        "the erasure waiting on Loki",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let r = api.get("dsr-wait").await.ok()?;
                r.status?
                    .targets
                    .first()
                    .filter(|t| t.cursor.is_some())
                    .map(|_| ())
            }
        },
    )
    .await;
    assert_eq!(double.delete_requests(SINGLE_TENANT).len(), 1);

    hold_policies(&client, &ns, "audit", &["mailer"]).await;
    let held = wait_phase(&client, &ns, "dsr-wait", ErasurePhase::Blocked).await;
    let t = &held.status.unwrap().targets[0];
    assert_eq!(
        (t.phase, t.cursor.as_deref()),
        (ErasureTargetPhase::Blocked, None)
    );
    assert!(
        double.delete_requests(SINGLE_TENANT).is_empty(),
        "the request in its cancel period was cancelled: the hold wins"
    );
    assert_eq!(lines_of(&double, SINGLE_TENANT).len(), 1, "nothing deleted");

    // Released: the erasure starts over with a new request and completes.
    double.set_cancel_period(Duration::from_secs(1));
    Api::<LegalHold>::namespaced(client.clone(), &ns)
        .delete("audit", &DeleteParams::default())
        .await
        .unwrap();
    let done = wait_phase(&client, &ns, "dsr-wait", ErasurePhase::Completed).await;
    assert_eq!(done.status.unwrap().targets[0].erased, 1);
    assert!(lines_of(&double, SINGLE_TENANT).is_empty());
    operator.stop().await;
}

// ---- What a real Loki does (README, Loki): recent lines, costs, lost requests ----

fn budget_of(max_time: Duration) -> StepBudget {
    StepBudget {
        max_time,
        ..budget()
    }
}

async fn get_json(url: String, params: &[(&str, String)]) -> (u16, serde_json::Value, String) {
    let r = reqwest::Client::new()
        .get(url)
        .query(params)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_default(),
        text,
    )
}

#[tokio::test]
async fn loki_double_runs_a_compactor_schedule_keeps_ingester_lines_and_counts_sub_queries() {
    let double = LokiDouble::start().await;
    double.set_ingester_window(Duration::from_secs(600));
    let now = now_ns();
    double.push(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now - DAY_NS, "recent")],
    );
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now - DAY_NS, "stored")],
    );
    let base = double.url();
    let end = (now / 1_000_000_000 - 1).to_string();
    let r = reqwest::Client::new()
        .post(format!("{base}/loki/api/v1/delete"))
        .query(&[
            ("query", r#"{app="mailer"}"#),
            ("start", "1000000000"),
            ("end", end.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    crate::support::wait_for("the request processed", Duration::from_secs(20), || {
        let requests = double.delete_requests(SINGLE_TENANT);
        async move { (requests[0].status == "processed").then_some(()) }
    })
    .await;
    assert_eq!(
        lines_of(&double, SINGLE_TENANT),
        vec!["mailer:recent"],
        "processed, and the line still in the ingesters is still there"
    );

    // The frontend's split: 30 days of metric query are 1,440 sub-queries of 30 minutes.
    let before = double.sub_queries();
    let (status, _, _) = get_json(
        format!("{base}/loki/api/v1/query"),
        &[(
            "query",
            r#"sum(count_over_time({app="mailer"}[30d]))"#.into(),
        )],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(double.sub_queries() - before, 1440);
    // A log query with limit=1 stops at the piece holding its line (newest first)...
    let range = |days: i64| {
        vec![
            ("query", r#"{app="mailer"}"#.to_string()),
            ("start", ((now - days * DAY_NS) / 1_000_000_000).to_string()),
            ("end", (now / 1_000_000_000 + 1).to_string()),
            ("limit", "1".to_string()),
        ]
    };
    let before = double.sub_queries();
    let (_, found, _) = get_json(format!("{base}/loki/api/v1/query_range"), &range(30)).await;
    assert_eq!(found["data"]["result"][0]["values"][0][1], "recent");
    assert_eq!(
        double.sub_queries() - before,
        49,
        "one day back: 48 pieces and the one holding the line"
    );
    // ...and runs every piece when nothing matches.
    let mut empty = range(30);
    empty[0].1 = r#"{app="nobody"}"#.into();
    let before = double.sub_queries();
    get_json(format!("{base}/loki/api/v1/query_range"), &empty).await;
    assert_eq!(double.sub_queries() - before, 1441, "30 days and a second");
    // Longer than max_query_length (721h): refused, as Loki does.
    for (path, params) in [
        (
            "query",
            vec![(
                "query",
                r#"sum(count_over_time({app="mailer"}[31d]))"#.to_string(),
            )],
        ),
        ("query_range", range(31)),
    ] {
        let (status, _, text) = get_json(format!("{base}/loki/api/v1/{path}"), &params).await;
        assert_eq!(status, 400, "{path}");
        assert!(
            text.contains("the query time range exceeds the limit"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn loki_an_erasure_of_lines_still_in_the_ingesters_submits_again_and_is_never_done_early() {
    let double = LokiDouble::start().await;
    double.set_ingester_window(Duration::from_secs(4));
    // Every shard of a request in one compaction cycle: the first one runs while the recent
    // line is still in the ingesters.
    double.set_delete_batch_size(100_000);
    let now = now_ns();
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now - 3 * DAY_NS, format!("old mail to {EMAIL}").leak())],
    );
    // Pushed just now with an older timestamp: in the ingesters, where deletes do not reach.
    double.push(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now - DAY_NS, format!("mail to {EMAIL}").leak())],
    );
    let b = backend(&double);
    let t = target(r#"{app="mailer"}"#, Some("{email}"));
    let job = SubjectJob {
        target: t.clone(),
        identifiers: ids(&[("email", EMAIL)]),
        action: SubjectAction::Erase,
    };
    let subject_lines = |d: &LokiDouble| {
        lines_of(d, SINGLE_TENANT)
            .into_iter()
            .filter(|l| l.contains(EMAIL))
            .count()
    };
    let (mut cursor, mut rested) = (None::<String>, false);
    let erased = loop {
        let step = b
            .subject_step(&job, cursor.as_deref(), &budget())
            .await
            .unwrap();
        assert!(step.failure.is_none());
        match step.next {
            Next::Done => break step.count,
            Next::Continue(c) => cursor = Some(c),
            Next::Wait { cursor: c, .. } => {
                let note = tombstone::backends::describe_wait(&c).unwrap();
                if note.starts_with("LinesInIngesters") {
                    rested = true;
                    assert!(note.contains("a new request is submitted at 20"), "{note}");
                    assert!(!note.contains(EMAIL) && !c.contains(EMAIL));
                    assert_eq!(subject_lines(&double), 1, "waiting because a line is left");
                }
                cursor = Some(c);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(rested, "the first processed request left the recent line");
    assert_eq!(erased, 2);
    assert_eq!(subject_lines(&double), 0, "done only once nothing is left");
    assert!(double.delete_requests(SINGLE_TENANT).len() >= 2);
    let (verified, _) = subject(&b, &t, &ids(&[("email", EMAIL)]), SubjectAction::Verify)
        .await
        .unwrap();
    assert_eq!(verified.count, 0);
}

#[tokio::test]
async fn loki_verify_never_reports_zero_while_a_query_returns_the_subjects_lines() {
    let double = LokiDouble::start().await;
    let now = now_ns();
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(
            now - 200 * DAY_NS,
            format!("ancient mail to {EMAIL}").leak(),
        )],
    );
    double.push(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now, format!("just now to {EMAIL}").leak())],
    );
    let b = backend(&double);
    let t = target(r#"{app="mailer"}"#, Some("{email}"));
    let (verified, _) = subject(&b, &t, &ids(&[("email", EMAIL)]), SubjectAction::Verify)
        .await
        .unwrap();
    assert_eq!(verified.count, 1, "the line pushed this second counts");
    let (found, _) = subject(&b, &t, &ids(&[("email", EMAIL)]), SubjectAction::Find)
        .await
        .unwrap();
    assert_eq!(
        found.count, 2,
        "no record of sweeps: the whole lookback is searched"
    );
}

#[tokio::test]
async fn loki_sweeps_count_what_went_start_where_the_last_ended_and_reuse_only_their_own_request() {
    let double = LokiDouble::start().await;
    double.set_ingester_window(Duration::from_secs(600));
    let now = now_ns();
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[
            (now - 10 * DAY_NS, "old-1"),
            (now - 10 * DAY_NS + 1, "old-2"),
        ],
    );
    double.push(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now - 5 * DAY_NS, "late")],
    );
    let b = backend(&double);
    let t = target(r#"{app="mailer"}"#, None);
    let first_cutoff = Utc::now() - chrono::Duration::days(2);
    let (scanned, deleted, _, _) = sweep(&b, &t, first_cutoff, false).await.unwrap();
    assert_eq!(
        (scanned, deleted),
        (3, 2),
        "the line still in the ingesters did not go and is not counted"
    );
    assert_eq!(lines_of(&double, SINGLE_TENANT), vec!["mailer:late"]);

    // The next sweep starts where the processed one ended (less the late-lines margin),
    // not in 2001.
    double.set_cancel_period(Duration::from_secs(600));
    let cutoff = Utc::now() - chrono::Duration::days(1);
    let job = |cutoff: DateTime<Utc>| SweepJob {
        target: t.clone(),
        retention: "1d".parse().unwrap(),
        dry_run: false,
        cutoff,
        held: Default::default(),
    };
    let step = b.sweep_step(&job(cutoff), None, &budget()).await.unwrap();
    assert!(matches!(step.next, Next::Wait { .. }), "{:?}", step.next);
    let requests = double.delete_requests(SINGLE_TENANT);
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[1].start_ms,
        (first_cutoff.timestamp() - 7 * 86_400) * 1000
    );
    // The same sweep again reuses its pending request; one for another cutoff (the
    // retention changed) is not what the spec would submit now: a new one.
    b.sweep_step(&job(cutoff), None, &budget()).await.unwrap();
    assert_eq!(double.delete_requests(SINGLE_TENANT).len(), 2);
    let longer = cutoff - chrono::Duration::hours(12);
    b.sweep_step(&job(longer), None, &budget()).await.unwrap();
    let requests = double.delete_requests(SINGLE_TENANT);
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[2].end_ms, longer.timestamp() * 1000);
}

#[tokio::test]
async fn loki_a_request_no_longer_listed_is_submitted_again_a_bounded_number_of_times() {
    let double = LokiDouble::start().await;
    double.set_cancel_period(Duration::from_secs(600));
    let now = now_ns();
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[
            (now - DAY_NS, format!("mail to {EMAIL}").leak()),
            (now - 9 * DAY_NS, "old"),
        ],
    );
    let b = backend(&double);
    let cancel_all = || async {
        for r in double.delete_requests(SINGLE_TENANT) {
            let status = reqwest::Client::new()
                .delete(format!("{}/loki/api/v1/delete", double.url()))
                .query(&[("request_id", r.request_id.as_str())])
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status.as_u16(), 204);
        }
    };
    // An erasure: each loss is followed by a fresh submission, counted in the cursor.
    let job = SubjectJob {
        target: target(r#"{app="mailer"}"#, Some("{email}")),
        identifiers: ids(&[("email", EMAIL)]),
        action: SubjectAction::Erase,
    };
    let first = b.subject_step(&job, None, &budget()).await.unwrap();
    let Next::Wait { mut cursor, .. } = first.next else {
        panic!("waits on Loki")
    };
    for lost in 1..=3 {
        cancel_all().await;
        let step = b
            .subject_step(&job, Some(&cursor), &budget())
            .await
            .unwrap();
        let Next::Wait { cursor: c, .. } = step.next else {
            panic!("submitted again and waits")
        };
        assert!(c.contains(&format!("\"lost\":{lost}")), "{c}");
        assert!(tombstone::backends::describe_wait(&c)
            .unwrap()
            .contains(&format!("{lost} of 3")));
        assert_eq!(double.delete_requests(SINGLE_TENANT).len(), 1);
        cursor = c;
    }
    cancel_all().await;
    let Err(e) = b.subject_step(&job, Some(&cursor), &budget()).await else {
        panic!("gives up after 3 resubmissions")
    };
    assert_eq!(e.reason(), "DeleteRequestLost");
    assert!(!e.to_string().contains(EMAIL));
    assert_eq!(posts(&double), 4);

    // A sweep: submitted again over exactly the same range.
    let cutoff = Utc::now() - chrono::Duration::days(2);
    let job = SweepJob {
        target: target(r#"{app="mailer"}"#, None),
        retention: "2d".parse().unwrap(),
        dry_run: false,
        cutoff,
        held: Default::default(),
    };
    let Next::Wait { cursor, .. } = b.sweep_step(&job, None, &budget()).await.unwrap().next else {
        panic!("waits on Loki")
    };
    let submitted = double.delete_requests(SINGLE_TENANT);
    cancel_all().await;
    let step = b.sweep_step(&job, Some(&cursor), &budget()).await.unwrap();
    assert!(matches!(step.next, Next::Wait { .. }));
    let again = double.delete_requests(SINGLE_TENANT);
    assert_eq!(
        (again[0].start_ms, again[0].end_ms),
        (submitted[0].start_ms, submitted[0].end_ms)
    );
}

#[tokio::test]
async fn loki_find_and_verify_search_what_the_sweeps_record_allows_and_resume_within_budget() {
    let double = LokiDouble::start().await;
    let now = now_ns();
    seed_mail_to_the_subject_and_an_old_line(&double, now);
    let b = backend(&double);
    let t = target(r#"{app="mailer"}"#, Some("{email}"));
    let subject_ids = ids(&[("email", EMAIL)]);
    let cost = |action| {
        let (b, t, subject_ids, double) = (&b, &t, &subject_ids, &double);
        async move {
            let before = double.sub_queries();
            let (step, _) = subject(b, t, subject_ids, action).await.unwrap();
            (step.count, double.sub_queries() - before)
        }
    };
    // No record of the policy's sweeps: the whole lookback (400 days) is searched.
    let (found, find_cost) = cost(SubjectAction::Find).await;
    let (left, verify_cost) = cost(SubjectAction::Verify).await;
    assert_eq!((found, left), (1, 1));
    // A 30-day retention, swept: Loki's record says everything older than the cutoff went.
    let cutoff = Utc::now() - chrono::Duration::days(30);
    let swept = sweep(&b, &target(r#"{app="mailer"}"#, None), cutoff, false)
        .await
        .unwrap();
    assert_eq!(swept.1, 1);
    let (found_after, find_after) = cost(SubjectAction::Find).await;
    assert_eq!(found_after, 1);
    subject(&b, &t, &subject_ids, SubjectAction::Erase)
        .await
        .unwrap();
    let (left_after, verify_after) = cost(SubjectAction::Verify).await;
    assert_eq!(left_after, 0);
    eprintln!(
        "sub-queries (30 min each): find {find_cost} -> {find_after}; verify (line found 3 days back) {verify_cost}; verify of an erased subject {verify_after}"
    );
    // 400 days of metric queries before; retention + margin (37 days) after.
    assert!(find_cost >= 400 * 48, "{find_cost}");
    assert!(find_after <= 38 * 48, "{find_after}");
    assert!(
        verify_cost <= 4 * 48,
        "stops at the first line: {verify_cost}"
    );
    assert!(
        verify_after <= 8 * 48,
        "the subject's own processed erasure bounds it: {verify_after}"
    );

    // A step budget of nothing: one window per step, resumed from the cursor (another
    // subject, never erased: only the sweeps' record bounds the search).
    let other = "loki-other-5d1f@example.org";
    let job = SubjectJob {
        target: t.clone(),
        identifiers: ids(&[("email", other)]),
        action: SubjectAction::Find,
    };
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now - 20 * DAY_NS, format!("mail to {other}").leak())],
    );
    let (mut cursor, mut steps) = (None::<String>, 0);
    let count = loop {
        steps += 1;
        let step = b
            .subject_step(&job, cursor.as_deref(), &budget_of(Duration::ZERO))
            .await
            .unwrap();
        match step.next {
            Next::Done => break step.count,
            Next::Continue(c) => cursor = Some(c),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!((count, steps), (1, 2), "37 days: two windows, one per step");
}

#[tokio::test]
async fn a_loki_erasure_of_recent_lines_says_what_it_waits_for_and_completes_once_they_go() {
    let (client, ns) = setup("loki-recent").await;
    let double = LokiDouble::start().await;
    double.set_ingester_window(Duration::from_secs(8));
    double.push(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now_ns() - DAY_NS, format!("sent to {EMAIL}").leak())],
    );
    let operator = TestOperator::start(&ns).await;
    loki_store(
        &client,
        &ns,
        "logs",
        &double.url(),
        json!({"resubmitAfter": "4s"}),
    )
    .await;
    let mut mailer = policy_json(
        "mailer",
        "30d",
        json!([{"name": "logs", "store": "logs", "loki": {"selector": "{app=\"mailer\"}"},
                "subject": {"loki": {"lineFilter": "{email}"}}}]),
    );
    mailer["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(&client, &ns, mailer).await;
    create_subject_secret(&client, &ns, "dsr-recent", json!({"email": EMAIL})).await;
    request_erasure(&client, &ns, "dsr-recent", "dsr-recent").await;
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    let waiting = crate::support::wait_for(
        "the erasure waiting for lines still in Loki's ingesters",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let r = api.get("dsr-recent").await.ok()?;
                let status = r.status?;
                let t = status.targets.first()?;
                t.message
                    .starts_with("LinesInIngesters")
                    .then(|| (status.phase, t.message.clone()))
            }
        },
    )
    .await;
    assert_eq!(waiting.0, ErasurePhase::Erasing, "{}", waiting.1);
    assert!(
        waiting.1.contains("a new request is submitted at 20"),
        "{}",
        waiting.1
    );
    assert_eq!(
        lines_of(&double, SINGLE_TENANT).len(),
        1,
        "the line is still there"
    );
    let done = wait_phase(&client, &ns, "dsr-recent", ErasurePhase::Completed).await;
    let t = &done.status.unwrap().targets[0];
    assert_eq!(
        (t.phase, t.found, t.erased),
        (ErasureTargetPhase::Verified, 1, 1)
    );
    assert!(lines_of(&double, SINGLE_TENANT).is_empty());
    assert!(double.delete_requests(SINGLE_TENANT).len() >= 2);
    operator.stop().await;
}

#[tokio::test]
async fn loki_erase_cursors_of_the_previous_version_resume_or_restart_cleanly() {
    let double = LokiDouble::start().await;
    // The previous version's requests ran from 2001: some 9,000 shards of a day, which a
    // real Loki 3 processes over hours. This test is about the cursors: all in one cycle.
    double.set_delete_batch_size(100_000);
    let now = now_ns();
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now - DAY_NS, format!("mail to {EMAIL}").leak())],
    );
    let b = backend(&double);
    let t = target(r#"{app="mailer"}"#, Some("{email}"));
    let job = SubjectJob {
        target: t.clone(),
        identifiers: ids(&[("email", EMAIL)]),
        action: SubjectAction::Erase,
    };
    let run = |cursor: String| {
        let (b, job) = (&b, &job);
        async move {
            let mut cursor = Some(cursor);
            for _ in 0..200 {
                let step = b.subject_step(job, cursor.as_deref(), &budget()).await?;
                match step.next {
                    Next::Done => return Ok::<_, Error>(step.count),
                    Next::Continue(c) | Next::Wait { cursor: c, .. } => cursor = Some(c),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            panic!("did not finish")
        }
    };
    // Written before the query became `(?i:…)`, before Loki listed the request: Loki has
    // no request with the new query and that range, so a fresh one is submitted.
    let end = now / 1_000_000_000 - 10;
    let old = format!(r#"loki:{{"start":1000000000,"end":{end},"count":1}}"#);
    assert_eq!(run(old).await.unwrap(), 1);
    assert!(lines_of(&double, SINGLE_TENANT).is_empty());
    assert_eq!(posts(&double), 1);
    // With the id of a request submitted with the old query text: polled by id to its end.
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(now - DAY_NS, format!("mail to {EMAIL}").leak())],
    );
    let old_query = format!(
        "{{app=\"mailer\"}} |~ \"(?:^|[^0-9A-Za-z_.+-]){}(?:$|[^0-9A-Za-z_.+-])\"",
        EMAIL.replace('.', "\\\\.")
    );
    let r = reqwest::Client::new()
        .post(format!("{}/loki/api/v1/delete", double.url()))
        .query(&[
            ("query", old_query.as_str()),
            ("start", "1000000000"),
            ("end", (now_ns() / 1_000_000_000 - 2).to_string().as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204, "{}", r.text().await.unwrap());
    let id = double.delete_requests(SINGLE_TENANT)[1].request_id.clone();
    let old = format!(r#"loki:{{"id":"{id}","start":1000000000,"end":{end},"count":1}}"#);
    assert_eq!(run(old).await.unwrap(), 1);
    assert_eq!(posts(&double), 2, "no new request: the old one was polled");
    assert!(lines_of(&double, SINGLE_TENANT).is_empty());
}
