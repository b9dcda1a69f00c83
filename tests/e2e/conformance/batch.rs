//! The batch clauses of the conformance suite: a driver that works many subjects in one
//! pass ([`Backend::batch_step`]) must give each member exactly what its own erasure would.
//! - [`batch_counts_each_member`]: find, erase and verify over several members with
//!   different record counts count each member's records exactly, and the subjects' close
//!   neighbours that are not members keep theirs.
//! - [`batch_leaves_a_held_member`]: a member the hold gate names keeps its records and is
//!   reported held; the others are erased. The batch then goes on without it, from the same
//!   cursor (a cursor is valid for any subset of its members).
//! - [`batch_resumes_exactly`]: steps with no time, each on a fresh backend (as after a
//!   restart), end with exact counts for every member.
//!
//! A driver that does not batch (`Fixture::BATCHES` false) must say so: `batches()` false and
//! a batch step refused as `InvalidSpec` (the batcher then works its subjects one at a time).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use tombstone::backends::{
    BatchJob, BatchMember, BatchStep, Error, HoldGate, Next, NoHolds, SubjectAction,
};

use super::{budget, Fixture, Owner, Probe, Witness, ENOUGH};

/// A gate that holds the members at these indices, and counts how often it was asked.
struct Holding {
    held: BTreeSet<usize>,
    asked: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl HoldGate for Holding {
    async fn held(&self) -> Result<BTreeSet<usize>, Error> {
        self.asked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.held.clone())
    }
}

fn member(owner: &Owner, n: usize) -> BatchMember {
    BatchMember {
        id: format!("member-{n}"),
        identifiers: owner.identifiers(),
    }
}

fn job<F: Fixture>(
    f: &F,
    members: &[BatchMember],
    action: SubjectAction,
    gate: Arc<dyn HoldGate>,
) -> BatchJob {
    BatchJob {
        target: f.target("people"),
        action,
        members: members.to_vec(),
        gate,
    }
}

fn witness_batch(w: &Witness, step: &BatchStep) {
    for m in &step.members {
        for s in &m.skipped {
            w.note(s.clone());
        }
    }
    if let Some(e) = &step.failure {
        w.note(format!("{} [{}]", e, e.reason()));
        w.note(format!("{e:?}"));
    }
    match &step.next {
        Next::Continue(c) | Next::Wait { cursor: c, .. } => w.note(c.clone()),
        Next::Done => {}
    }
    w.note(format!("{step:?}"));
}

/// Runs a batch to its end from `cursor`, each step on a fresh backend with `max_time`;
/// returns each member's total (by member id) and the members held on the way. Held
/// members leave the batch after the step that held them, as the batcher takes them out.
async fn batch_to_end<F: Fixture>(
    f: &F,
    w: &Witness,
    mut job: BatchJob,
    max_time: Duration,
) -> (std::collections::BTreeMap<String, u64>, BTreeSet<String>) {
    let mut totals: std::collections::BTreeMap<String, u64> =
        job.members.iter().map(|m| (m.id.clone(), 0)).collect();
    let mut held = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the batch did not finish"
        );
        let backend = f.backend();
        assert!(backend.batches(), "the driver says it batches");
        let step = backend
            .batch_step(&job, cursor.as_deref(), &budget(max_time))
            .await
            .unwrap_or_else(|e| panic!("a batch step failed: {} [{}]", e, e.reason()));
        witness_batch(w, &step);
        assert!(step.failure.is_none(), "{:?}", step.failure);
        assert_eq!(
            step.members.len(),
            job.members.len(),
            "one answer per member"
        );
        for (m, s) in job.members.iter().zip(&step.members) {
            *totals.entry(m.id.clone()).or_default() += s.count;
        }
        let mut left_out = Vec::new();
        for i in step.held.iter().rev() {
            let m = job.members.remove(*i);
            held.insert(m.id.clone());
            left_out.push(m.id);
        }
        if !left_out.is_empty() {
            // The rest of the batch must not hold anyone again.
            job.gate = Arc::new(NoHolds);
        }
        match step.next {
            Next::Done => break,
            Next::Continue(c) => cursor = Some(c),
            Next::Wait { cursor: c, .. } => {
                cursor = Some(c);
                tokio::time::sleep(f.poll_interval()).await;
            }
        }
        if job.members.is_empty() {
            break;
        }
    }
    (totals, held)
}

/// A driver that does not batch says so, and refuses a batch step.
async fn refuses_batches<F: Fixture>(f: &F) {
    let backend = f.backend();
    assert!(!backend.batches());
    let probe = Probe::new();
    let members = [member(&probe.subject, 0)];
    let job = job(f, &members, SubjectAction::Find, Arc::new(NoHolds));
    let refused = backend
        .batch_step(&job, None, &budget(ENOUGH))
        .await
        .expect_err("a batch step of a driver that does not batch");
    assert!(matches!(refused, Error::InvalidSpec(_)), "{refused:?}");
}

/// Four members of different sizes, and the subject's other close neighbours as
/// non-members: each member's find, erase and verify counts are its own.
pub async fn batch_counts_each_member<F: Fixture>(f: &F) {
    if !F::BATCHES {
        return refuses_batches(f).await;
    }
    let probe = Probe::new();
    let w = Witness::new(&probe);
    let owners: Vec<&Owner> = std::iter::once(&probe.subject)
        .chain(&probe.neighbours)
        .collect();
    let (members_of, outsiders) = owners.split_at(3);
    let mut seeded = std::collections::BTreeMap::new();
    let mut members = Vec::new();
    for (n, owner) in members_of.iter().enumerate() {
        let count = f.seed_owner("people", owner, 2 + 3 * n).await;
        let m = member(owner, n);
        seeded.insert(m.id.clone(), count);
        members.push(m);
    }
    let mut kept = Vec::new();
    for owner in outsiders {
        kept.push((*owner, f.seed_owner("people", owner, 3).await));
    }
    let zero: std::collections::BTreeMap<String, u64> =
        members.iter().map(|m| (m.id.clone(), 0)).collect();

    let found = batch_to_end(
        f,
        &w,
        job(f, &members, SubjectAction::Find, Arc::new(NoHolds)),
        ENOUGH,
    )
    .await;
    assert_eq!(found.0, seeded, "find counts each member's records");
    let verify = job(f, &members, SubjectAction::Verify, Arc::new(NoHolds));
    let before = batch_to_end(f, &w, verify.clone(), ENOUGH).await.0;
    if F::EXACT_VERIFY_COUNT {
        assert_eq!(before, seeded, "verify counts what is still there");
    } else {
        assert!(
            before.values().all(|n| *n > 0),
            "verify finds each member's records"
        );
    }
    let gate = Arc::new(Holding {
        held: BTreeSet::new(),
        asked: Default::default(),
    });
    let erased = batch_to_end(
        f,
        &w,
        job(f, &members, SubjectAction::Erase, gate.clone()),
        ENOUGH,
    )
    .await;
    assert_eq!(erased.0, seeded, "erase counts each member's records");
    assert!(erased.1.is_empty());
    assert!(
        gate.asked.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the gate is asked before the batch commits"
    );
    for (owner, n) in &kept {
        assert_eq!(
            f.count_owner("people", owner).await,
            *n,
            "a non-member keeps its records"
        );
    }
    for owner in members_of {
        assert_eq!(f.count_owner("people", owner).await, 0);
    }
    assert_eq!(batch_to_end(f, &w, verify, ENOUGH).await.0, zero);
    let again = batch_to_end(
        f,
        &w,
        job(f, &members, SubjectAction::Erase, Arc::new(NoHolds)),
        ENOUGH,
    )
    .await;
    assert_eq!(again.0, zero, "erasing again erases nothing");
    assert!(w.checked() > 0);
}

/// The gate holds one member of three: it keeps everything, the others are erased.
pub async fn batch_leaves_a_held_member<F: Fixture>(f: &F) {
    if !F::BATCHES {
        return refuses_batches(f).await;
    }
    let probe = Probe::new();
    let w = Witness::new(&probe);
    let owners = [&probe.subject, &probe.neighbours[0], &probe.neighbours[1]];
    let mut members = Vec::new();
    let mut seeded = Vec::new();
    for (n, owner) in owners.iter().enumerate() {
        seeded.push(f.seed_owner("people", owner, 3 + n).await);
        members.push(member(owner, n));
    }
    let gate = Arc::new(Holding {
        held: BTreeSet::from([1]),
        asked: Default::default(),
    });
    let (totals, held) =
        batch_to_end(f, &w, job(f, &members, SubjectAction::Erase, gate), ENOUGH).await;
    assert_eq!(
        held,
        BTreeSet::from(["member-1".to_string()]),
        "the held member is reported"
    );
    assert_eq!(totals["member-0"], seeded[0]);
    assert_eq!(
        totals["member-1"], 0,
        "nothing of the held member is erased"
    );
    assert_eq!(totals["member-2"], seeded[2]);
    assert_eq!(f.count_owner("people", owners[0]).await, 0);
    assert_eq!(f.count_owner("people", owners[1]).await, seeded[1]);
    assert_eq!(f.count_owner("people", owners[2]).await, 0);
}

/// Steps without time, each on a fresh backend: every member's count is exact.
pub async fn batch_resumes_exactly<F: Fixture>(f: &F) {
    if !F::BATCHES {
        return refuses_batches(f).await;
    }
    let probe = Probe::new();
    let w = Witness::new(&probe);
    let many = f.many();
    let owners = [&probe.subject, &probe.neighbours[1]];
    let mut members = Vec::new();
    let mut seeded = std::collections::BTreeMap::new();
    for (n, owner) in owners.iter().enumerate() {
        let count = f.seed_owner("people", owner, many / (n + 1)).await;
        let m = member(owner, n);
        seeded.insert(m.id.clone(), count);
        members.push(m);
    }
    let erase = job(f, &members, SubjectAction::Erase, Arc::new(NoHolds));
    let (totals, _) = batch_to_end(f, &w, erase, Duration::ZERO).await;
    assert_eq!(
        totals, seeded,
        "resumed step after step, each member counted once"
    );
    for owner in owners {
        assert_eq!(f.count_owner("people", owner).await, 0);
    }
}
