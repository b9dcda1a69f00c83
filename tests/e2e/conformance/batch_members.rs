//! Batch steps (`Backend::batch_step`) of a driver against its real server, over the same
//! [`Fixture`]s as the rest of the suite: five members with different record counts (one a
//! second request for the same subject, so its records are two members'), the neighbours
//! of the first (`Probe`) seeded alongside; exact per-member counts for Find and Erase, a
//! member held by the gate keeps its records and is reported held, Verify finds 0 for the
//! others afterwards, and steps without time, or whose outcome is lost, still count exactly.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::{
    BatchJob, BatchMember, BatchStep, Error, HoldGate, Next, NoHolds, SubjectAction,
};

use super::{budget, Fixture, Owner, Probe};

/// Holds a fixed set of members.
struct Holding(BTreeSet<usize>);

#[async_trait]
impl HoldGate for Holding {
    async fn held(&self) -> Result<BTreeSet<usize>, Error> {
        Ok(self.0.clone())
    }
}

/// The members of a test and the records seeded for each.
struct Members {
    probe: Probe,
    owners: Vec<Owner>,
    seeded: Vec<u64>,
}

/// Five members: the probe's subject (3 records), three more subjects (1, 4 and 6), and a
/// second member for the probe's subject (the same identifiers, another id). Member ids are
/// not in the members' order, so a driver that sorts by them is tested on a shuffle.
async fn seed<F: Fixture>(f: &F, dataset: &str) -> Members {
    let probe = Probe::new();
    let tag = probe
        .subject
        .email
        .trim_end_matches("@example.org")
        .to_string();
    let mut owners = vec![probe.subject.clone()];
    for k in 1..4 {
        owners.push(Owner {
            user_id: format!("Bm{k}x{}", tag.len()),
            email: format!("{tag}-m{k}@example.org"),
        });
    }
    owners.push(probe.subject.clone());
    let mut seeded = Vec::new();
    for (owner, n) in owners.iter().take(4).zip([3usize, 1, 4, 6]) {
        seeded.push(f.seed_owner(dataset, owner, n).await);
    }
    seeded.push(seeded[0]);
    for neighbour in &probe.neighbours {
        f.seed_owner(dataset, neighbour, 2).await;
    }
    Members {
        probe,
        owners,
        seeded,
    }
}

fn job(target: &Target, m: &Members, action: SubjectAction, gate: Arc<dyn HoldGate>) -> BatchJob {
    BatchJob {
        target: target.clone(),
        action,
        members: m
            .owners
            .iter()
            .enumerate()
            .map(|(k, o)| BatchMember {
                id: format!("hmac-sha256:{:064x}", (k * 7 + 3) % 5),
                identifiers: o.identifiers(),
            })
            .collect(),
        gate,
    }
}

/// No identifier value of the members (or the probe's neighbours) in a step's messages.
fn witness(m: &Members, step: &BatchStep) {
    let mut text = format!("{step:?}");
    if let Some(e) = &step.failure {
        text.push_str(&e.to_string());
    }
    let text = text.to_lowercase();
    for o in m.owners.iter().chain(&m.probe.neighbours) {
        for v in [&o.user_id, &o.email] {
            assert!(
                !text.contains(&v.to_lowercase()),
                "an identifier in a batch step: {text}"
            );
        }
    }
}

/// How a batch is run to its end.
#[derive(Clone, Copy)]
pub struct Run {
    /// The time of each step.
    step_time: Duration,
    /// Each step is run twice from the same cursor by fresh backends, and only the second
    /// outcome kept: the first is lost (as when the operator is killed after the store
    /// acted and before the checkpoint).
    lose_each: bool,
}

/// Runs `job` to its end, one fresh backend per step; each member's counts added up, and
/// the members the steps reported held.
async fn run<F: Fixture>(
    f: &F,
    m: &Members,
    job: &BatchJob,
    how: Run,
) -> (Vec<u64>, BTreeSet<usize>) {
    let mut totals = vec![0u64; job.members.len()];
    let mut held = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let started = Instant::now();
    let mut steps = 0;
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(240) && steps < 2000,
            "the batch did not finish ({steps} steps)"
        );
        steps += 1;
        let mut step = f
            .backend()
            .batch_step(job, cursor.as_deref(), &budget(how.step_time))
            .await
            .expect("a batch step");
        witness(m, &step);
        if how.lose_each {
            step = f
                .backend()
                .batch_step(job, cursor.as_deref(), &budget(how.step_time))
                .await
                .expect("the batch step again");
            witness(m, &step);
        }
        assert!(step.failure.is_none(), "{:?}", step.failure);
        assert_eq!(step.members.len(), job.members.len());
        for (total, member) in totals.iter_mut().zip(&step.members) {
            assert!(member.ran, "every member has the locator's identifiers");
            *total += member.count;
        }
        held.extend(step.held.iter().copied());
        match follow(f, step.next).await {
            None => return (totals, held),
            next => cursor = next,
        }
    }
}

/// The cursor to go on from (after the wait a store asks for); None when the batch is done.
async fn follow<F: Fixture>(f: &F, next: Next) -> Option<String> {
    match next {
        Next::Done => None,
        Next::Continue(c) => Some(c),
        Next::Wait { cursor, poll_after } => {
            tokio::time::sleep(poll_after.min(f.poll_interval())).await;
            Some(cursor)
        }
    }
}

async fn counts_left<F: Fixture>(f: &F, dataset: &str, owners: &[Owner]) -> Vec<u64> {
    let mut left = Vec::new();
    for o in owners {
        left.push(f.count_owner(dataset, o).await);
    }
    left
}

/// Find counts each member's records; Erase with member 2 held erases the others' (the
/// duplicate member's records counted for both) and reports 2 held; its records and the
/// neighbours' stay; Verify finds 0 for the others.
pub async fn exact_counts_and_holds<F: Fixture>(how: Run) {
    exact_counts_and_holds_in::<F>(how, F::target).await;
}

/// [`exact_counts_and_holds`] with the fixture's target as `target` makes it.
pub async fn exact_counts_and_holds_in<F: Fixture>(how: Run, target: impl Fn(&F, &str) -> Target) {
    let f = F::start().await;
    let m = seed(&f, "batch").await;
    let target = target(&f, "batch");
    let none: Arc<dyn HoldGate> = Arc::new(NoHolds);
    let (found, _) = run(
        &f,
        &m,
        &job(&target, &m, SubjectAction::Find, none.clone()),
        how,
    )
    .await;
    assert_eq!(found, m.seeded, "Find counts each member's records");
    let gate: Arc<dyn HoldGate> = Arc::new(Holding([2].into()));
    let erase = job(&target, &m, SubjectAction::Erase, gate);
    let (erased, held) = run(&f, &m, &erase, how).await;
    let mut expected = m.seeded.clone();
    expected[2] = 0;
    assert_eq!(erased, expected, "Erase counts each member's records once");
    assert_eq!(held, BTreeSet::from([2]), "the held member is reported");
    let left = counts_left(&f, "batch", &m.owners).await;
    assert_eq!(
        left,
        vec![0, 0, m.seeded[2], 0, 0],
        "only the held member's records stay"
    );
    for neighbour in &m.probe.neighbours {
        assert_eq!(
            f.count_owner("batch", neighbour).await,
            2,
            "a neighbour keeps its records"
        );
    }
    let (verified, _) = run(&f, &m, &job(&target, &m, SubjectAction::Verify, none), how).await;
    assert_eq!(verified[0..2], [0, 0]);
    assert_eq!(verified[3..], [0, 0]);
    if F::EXACT_VERIFY_COUNT {
        assert_eq!(verified[2], m.seeded[2]);
    } else {
        assert!(verified[2] >= 1, "Verify finds what the held member keeps");
    }
}

/// Fails the first time it is asked (the holds cannot be read), then holds no one.
struct FailingOnce(std::sync::atomic::AtomicBool);

#[async_trait]
impl HoldGate for FailingOnce {
    async fn held(&self) -> Result<BTreeSet<usize>, Error> {
        if self.0.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Unreachable("the holds cannot be listed".into()));
        }
        Ok(BTreeSet::new())
    }
}

/// A gate that cannot be read stops the step before it submits anything: the step says
/// why, erases nothing and hands back a cursor from which the batch ends with exact counts.
pub async fn a_gate_failure_commits_nothing_and_resumes<F: Fixture>() {
    let f = F::start().await;
    let m = seed(&f, "batch").await;
    let gate = Arc::new(FailingOnce(true.into()));
    let erase = job(&f.target("batch"), &m, SubjectAction::Erase, gate.clone());
    let mut totals = vec![0u64; erase.members.len()];
    let mut cursor: Option<String> = None;
    let started = Instant::now();
    let mut failed = false;
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the batch did not finish"
        );
        let step = f
            .backend()
            .batch_step(&erase, cursor.as_deref(), &budget(Duration::from_secs(5)))
            .await
            .expect("a batch step");
        witness(&m, &step);
        if let Some(e) = &step.failure {
            assert!(!failed, "the gate fails once: {e}");
            failed = true;
            assert_eq!(e.reason(), "Unreachable");
            assert!(step.members.iter().all(|s| s.count == 0), "nothing counted");
            assert_eq!(
                counts_left(&f, "batch", &m.owners).await,
                m.seeded,
                "nothing erased"
            );
            assert!(
                matches!(step.next, Next::Continue(_)),
                "a cursor to resume from"
            );
        }
        for (total, member) in totals.iter_mut().zip(&step.members) {
            *total += member.count;
        }
        match follow(&f, step.next).await {
            None => break,
            next => cursor = next,
        }
    }
    assert!(failed, "the gate was asked before the submission");
    assert_eq!(totals, m.seeded);
    assert_eq!(counts_left(&f, "batch", &m.owners).await, vec![0; 5]);
}

/// The ordinary run: steps of a few seconds.
pub const ORDINARY: Run = Run {
    step_time: Duration::from_secs(5),
    lose_each: false,
};

/// Steps without time, each resumed by a fresh backend.
pub const ZERO_BUDGET: Run = Run {
    step_time: Duration::ZERO,
    lose_each: false,
};

/// Steps without time whose every outcome is lost once.
pub const LOSING: Run = Run {
    step_time: Duration::ZERO,
    lose_each: true,
};

/// Instantiates the batch checks for a fixture.
#[macro_export]
macro_rules! batch_checks {
    ($name:ident, $fixture:ty) => {
        mod $name {
            use $crate::conformance::batch_members::{
                a_gate_failure_commits_nothing_and_resumes, exact_counts_and_holds, LOSING,
                ORDINARY, ZERO_BUDGET,
            };

            #[tokio::test]
            async fn batch_gate_failure_commits_nothing_and_resumes() {
                a_gate_failure_commits_nothing_and_resumes::<$fixture>().await;
            }

            #[tokio::test]
            async fn batch_counts_each_member_and_leaves_the_held_one() {
                exact_counts_and_holds::<$fixture>(ORDINARY).await;
            }

            #[tokio::test]
            async fn batch_steps_without_time_resume_with_exact_counts() {
                exact_counts_and_holds::<$fixture>(ZERO_BUDGET).await;
            }

            #[tokio::test]
            async fn batch_steps_whose_outcome_is_lost_count_once() {
                exact_counts_and_holds::<$fixture>(LOSING).await;
            }
        }
    };
}
