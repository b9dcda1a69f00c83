//! The S3 driver's batch step against moto: several subjects with different record counts
//! in the same gzip JSON-lines archives and under their own key prefixes, beside their
//! neighbours (near-miss identifiers): exact per-member counts, neighbours untouched, a
//! member the gate holds keeps its records, steps resumed by fresh backends (and with a
//! shrinking member set) count exactly, and a lost erase step is still counted per member.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::{
    Backend, BatchJob, BatchMember, Error, HoldGate, Next, StepBudget, SubjectAction,
};

use crate::conformance::{leading, Owner, Probe};
use crate::support::s3::S3Server;

const BUCKET: &str = "batch";
const ARCHIVES: usize = 3;

fn target() -> Target {
    serde_json::from_value(json!({"name": "mail", "store": "archive",
    "s3": {"prefix": "app/"},
    "subject": {"s3": {
        "keyPrefixes": ["app/u/{userId}/"],
        "records": {"prefix": "app/logs/", "field": "msg.to", "equals": "{email}"}
    }}}))
    .expect("a valid target")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

fn gunzip(data: &[u8]) -> String {
    let mut out = String::new();
    std::io::Read::read_to_string(&mut flate2::read::MultiGzDecoder::new(data), &mut out)
        .expect("gunzip");
    out
}

fn record(to: &str, n: usize) -> String {
    format!("{{\"msg\":{{\"to\":\"{to}\",\"n\":{n}}},\"status\":\"sent\"}}\n")
}

/// The members of a test and their neighbours; member 4 is member 0 again (another request
/// for the same address, written in capitals, another user id): member 0's records are
/// its records too.
struct World {
    members: Vec<Owner>,
    ids: Vec<String>,
    neighbours: Vec<Owner>,
    /// Per member: records in all archives, and key-prefix objects.
    records: Vec<u64>,
    objects: Vec<u64>,
}

impl World {
    fn new() -> World {
        let probes: Vec<Probe> = (0..4).map(|_| Probe::new()).collect();
        let mut members: Vec<Owner> = probes.iter().map(|p| p.subject.clone()).collect();
        for (k, m) in members.iter_mut().enumerate() {
            m.user_id = format!("{}-{k}", m.user_id);
        }
        members.push(Owner {
            user_id: format!("{}-again", members[0].user_id),
            email: members[0].email.to_uppercase(),
        });
        let neighbours = probes
            .iter()
            .take(2)
            .flat_map(|p| p.neighbours.clone())
            .collect();
        // Record counts differ per member; member 4's are member 0's.
        let per_archive = [1u64, 2, 3, 5];
        let mut records: Vec<u64> = per_archive.iter().map(|n| n * ARCHIVES as u64).collect();
        records.push(records[0]);
        let objects = (0..members.len() as u64).map(|k| k + 1).collect();
        let ids = (0..members.len())
            .map(|k| format!("{:016x}", 0x5eed_0000_u64 + (k as u64 * 7) % 5))
            .collect();
        World {
            members,
            ids,
            neighbours,
            records,
            objects,
        }
    }

    /// The archive lines, in order: the members' records (member k: `per_archive[k]`),
    /// the neighbours' (two each) and a line that is not JSON, interleaved.
    fn archive(&self, day: usize) -> String {
        let mut lines = Vec::new();
        let per_archive = [1usize, 2, 3, 5];
        for round in 0..5 {
            for (k, m) in self.members.iter().take(4).enumerate() {
                if round < per_archive[k] {
                    // Case differs from line to line: addresses match without case.
                    let to = if round % 2 == 1 {
                        m.email.to_uppercase()
                    } else {
                        m.email.clone()
                    };
                    lines.push(record(&to, day * 100 + round * 10 + k));
                }
            }
            if round < 2 {
                for (j, n) in self.neighbours.iter().enumerate() {
                    lines.push(record(&n.email, 9000 + day * 100 + round * 10 + j));
                }
            }
        }
        lines.insert(3, "not json at all\n".into());
        lines.concat()
    }

    async fn seed(&self, server: &S3Server, versioned: bool) {
        if versioned {
            // An older version of the first archive: one more record of member 3.
            let older = [
                record(&self.members[3].email, 1),
                record(&self.neighbours[0].email, 2),
            ];
            server
                .put(
                    BUCKET,
                    "app/logs/day0.jsonl.gz",
                    gzip(older.concat().as_bytes()),
                )
                .await;
        }
        for day in 0..ARCHIVES {
            server
                .put(
                    BUCKET,
                    &format!("app/logs/day{day}.jsonl.gz"),
                    gzip(self.archive(day).as_bytes()),
                )
                .await;
        }
        for (k, m) in self.members.iter().enumerate() {
            for i in 0..self.objects[k] {
                server
                    .put(
                        BUCKET,
                        &format!("app/u/{}/export-{i}.json", m.user_id),
                        "{}",
                    )
                    .await;
            }
        }
        for n in &self.neighbours {
            server
                .put(BUCKET, &format!("app/u/{}/export.json", n.user_id), "{}")
                .await;
        }
    }

    fn job(&self, action: SubjectAction, members: &[usize], gate: Arc<dyn HoldGate>) -> BatchJob {
        BatchJob {
            target: target(),
            action,
            members: members
                .iter()
                .map(|k| BatchMember {
                    id: self.ids[*k].clone(),
                    identifiers: self.members[*k].identifiers(),
                })
                .collect(),
            gate,
        }
    }

    /// Every neighbour's line and object, as seeded.
    async fn neighbours_untouched(&self, server: &S3Server) {
        for day in 0..ARCHIVES {
            let now = gunzip(
                &server
                    .get(BUCKET, &format!("app/logs/day{day}.jsonl.gz"))
                    .await,
            );
            let seeded = self.archive(day);
            let neighbours: Vec<&str> = seeded
                .lines()
                .filter(|l| {
                    self.neighbours.iter().any(|n| l.contains(&n.email)) || !l.starts_with('{')
                })
                .collect();
            let kept: Vec<&str> = now
                .lines()
                .filter(|l| {
                    self.neighbours.iter().any(|n| l.contains(&n.email)) || !l.starts_with('{')
                })
                .collect();
            assert_eq!(
                kept, neighbours,
                "day {day}: neighbours' lines kept, in order"
            );
        }
        for n in &self.neighbours {
            assert_eq!(
                server
                    .keys(BUCKET, &format!("app/u/{}/", n.user_id))
                    .await
                    .len(),
                1,
                "a neighbour's object stays"
            );
        }
    }
}

/// A gate that holds whom the test says: `held` from the start, `later` from that step on.
#[derive(Default)]
struct Gate {
    held: Mutex<BTreeSet<String>>,
    later: Mutex<Option<(usize, String)>>,
    step: std::sync::atomic::AtomicUsize,
    ids: Mutex<Vec<String>>,
    /// The question (counted from 1) the gate cannot answer.
    fails_at: Mutex<Option<usize>>,
    asked: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl HoldGate for Gate {
    async fn held(&self) -> Result<BTreeSet<usize>, Error> {
        let mut held = self.held.lock().expect("gate").clone();
        let step = self.step.load(std::sync::atomic::Ordering::Relaxed);
        let asked = self
            .asked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if *self.fails_at.lock().expect("gate") == Some(asked) {
            return Err(Error::Unreachable("the holds cannot be read".into()));
        }
        if let Some((from, id)) = self.later.lock().expect("gate").clone() {
            if step >= from {
                held.insert(id);
            }
        }
        let ids = self.ids.lock().expect("gate").clone();
        Ok(ids
            .iter()
            .enumerate()
            .filter(|(_, id)| held.contains(*id))
            .map(|(i, _)| i)
            .collect())
    }
}

fn budget(max_time: Duration) -> StepBudget {
    StepBudget {
        max_time,
        cancel: CancellationToken::new(),
        fence: leading(),
    }
}

/// What a batch run counted, per member index of the world.
#[derive(Debug, Default)]
struct Tally {
    counts: BTreeMap<usize, u64>,
    held: BTreeSet<usize>,
    steps: usize,
    /// What the lost step had counted (for each member) when it was lost.
    lost: u64,
    /// Steps that failed.
    failed: usize,
}

/// Runs a batch of `members` to its end, each step by a fresh backend with `max_time`;
/// members the gate holds leave the batch as the batcher takes them out. `lose` names a
/// step (by number) whose outcome is lost: its counts and cursor are thrown away.
async fn run(
    server: &S3Server,
    world: &World,
    action: SubjectAction,
    members: &[usize],
    gate: Arc<Gate>,
    max_time: Duration,
    lose: Option<usize>,
) -> Tally {
    let mut present: Vec<usize> = members.to_vec();
    let mut cursor: Option<String> = None;
    let mut tally = Tally::default();
    for _ in 0..5000 {
        *gate.ids.lock().expect("gate") = present.iter().map(|k| world.ids[*k].clone()).collect();
        gate.step
            .store(tally.steps + 1, std::sync::atomic::Ordering::Relaxed);
        let job = world.job(action, &present, gate.clone());
        let backend = crate::s3::backend(server, BUCKET);
        let step = backend
            .batch_step(&job, cursor.as_deref(), &budget(max_time))
            .await
            .expect("a batch step");
        assert_eq!(step.members.len(), present.len());
        tally.steps += 1;
        if let Some(failure) = &step.failure {
            // Only the gate fails here: nothing more is committed, nothing counted, and the
            // batch resumes from the cursor the step hands back.
            assert_eq!(failure.reason(), "Unreachable", "{failure}");
            assert!(step.members.iter().all(|m| m.count == 0), "{step:?}");
            tally.failed += 1;
        }
        if lose == Some(tally.steps) {
            tally.lost = step.members.iter().map(|m| m.count).sum();
            continue;
        }
        for (i, m) in step.members.iter().enumerate() {
            assert!(m.ran, "member {i} ran");
            *tally.counts.entry(present[i]).or_default() += m.count;
        }
        let held: BTreeSet<usize> = step.held.iter().map(|i| present[*i]).collect();
        tally.held.extend(&held);
        present.retain(|k| !held.contains(k));
        match step.next {
            Next::Done => return tally,
            Next::Continue(c) => {
                assert!(c.starts_with("v1:s3:{\"batch\""), "{c}");
                for m in &world.members {
                    assert!(!c.to_lowercase().contains(&m.email.to_lowercase()), "{c}");
                }
                cursor = Some(c)
            }
            Next::Wait { .. } => panic!("S3 batches never wait"),
        }
    }
    panic!("the batch did not finish");
}

fn expected(world: &World, members: &[usize]) -> BTreeMap<usize, u64> {
    members
        .iter()
        .map(|k| (*k, world.records[*k] + world.objects[*k]))
        .collect()
}

async fn world(versioned: bool) -> (S3Server, World) {
    let server = S3Server::start();
    server.create_bucket(BUCKET, versioned, false).await;
    let mut world = World::new();
    world.seed(&server, versioned).await;
    if versioned {
        world.records[3] += 1;
    }
    (server, world)
}

const ALL: [usize; 5] = [0, 1, 2, 3, 4];

#[tokio::test]
async fn s3_batch_counts_each_member_exactly_keeps_a_held_members_records_and_resumes() {
    let (server, world) = world(false).await;
    let open = Arc::new(Gate::default());
    let found = run(
        &server,
        &world,
        SubjectAction::Find,
        &ALL,
        open.clone(),
        Duration::from_secs(30),
        None,
    )
    .await;
    assert_eq!(found.counts, expected(&world, &ALL), "one step");
    // No time at all: a step per page or archive, each by a fresh backend.
    let slow = run(
        &server,
        &world,
        SubjectAction::Find,
        &ALL,
        open.clone(),
        Duration::ZERO,
        None,
    )
    .await;
    assert_eq!(slow.counts, expected(&world, &ALL));
    assert!(slow.steps > ARCHIVES + 2, "{} steps", slow.steps);

    // Member 2 is held from the first commit on.
    let gate = Arc::new(Gate::default());
    gate.held.lock().unwrap().insert(world.ids[2].clone());
    let erased = run(
        &server,
        &world,
        SubjectAction::Erase,
        &ALL,
        gate,
        Duration::ZERO,
        None,
    )
    .await;
    assert_eq!(erased.held, BTreeSet::from([2]));
    let mut want = expected(&world, &[0, 1, 3, 4]);
    want.insert(2, 0);
    assert_eq!(erased.counts, want, "{erased:?}");
    world.neighbours_untouched(&server).await;
    let verified = run(
        &server,
        &world,
        SubjectAction::Verify,
        &ALL,
        open,
        Duration::ZERO,
        None,
    )
    .await;
    let mut left = BTreeMap::from([(0, 0), (1, 0), (3, 0), (4, 0)]);
    left.insert(2, world.records[2] + world.objects[2]);
    assert_eq!(
        verified.counts, left,
        "the held member's records and objects stay"
    );
}

#[tokio::test]
async fn s3_batch_on_a_versioned_bucket_leaves_no_older_copy_and_counts_a_lost_step() {
    // Step 8 rewrites an archive, step 10 deletes an older version (versions pass).
    for lost in [8, 10] {
        let (server, world) = world(true).await;
        let open = Arc::new(Gate::default());
        let found = run(
            &server,
            &world,
            SubjectAction::Find,
            &ALL,
            open.clone(),
            Duration::ZERO,
            None,
        )
        .await;
        assert_eq!(found.counts, expected(&world, &ALL));
        // A step's outcome is lost: the next step, from the older cursor, counts what it
        // removed, per member.
        let erased = run(
            &server,
            &world,
            SubjectAction::Erase,
            &ALL,
            open.clone(),
            Duration::ZERO,
            Some(lost),
        )
        .await;
        assert_eq!(
            erased.counts,
            expected(&world, &ALL),
            "step {lost} lost: {erased:?}"
        );
        assert!(erased.lost > 0, "step {lost} removed something");
        world.neighbours_untouched(&server).await;
        let verified = run(
            &server,
            &world,
            SubjectAction::Verify,
            &ALL,
            open,
            Duration::ZERO,
            None,
        )
        .await;
        assert_eq!(verified.counts, ALL.iter().map(|k| (*k, 0)).collect());
        let versions = server.versions(BUCKET, "app/logs/").await;
        assert_eq!(
            versions.len(),
            ARCHIVES,
            "one clean version of each archive: {versions:?}"
        );
    }
}

#[tokio::test]
async fn s3_batch_lost_erase_steps_are_counted_per_member_whichever_step_is_lost() {
    // Step 1 names the journal; with no time each step then deletes one member's page of
    // objects (steps 2 to 6) or rewrites one archive (7 to 9).
    for lost in [3, 7, 9] {
        let (server, world) = world(false).await;
        let erased = run(
            &server,
            &world,
            SubjectAction::Erase,
            &ALL,
            Arc::new(Gate::default()),
            Duration::ZERO,
            Some(lost),
        )
        .await;
        assert_eq!(
            erased.counts,
            expected(&world, &ALL),
            "step {lost} lost: {erased:?}"
        );
        assert!(erased.lost > 0, "step {lost} removed something");
        world.neighbours_untouched(&server).await;
    }
}

#[tokio::test]
async fn s3_batch_a_member_held_midway_keeps_what_was_not_erased_yet() {
    let (server, world) = world(false).await;
    // From step 8 on (the second archive's rewrite) member 1 is held: its objects and its
    // records in the first archive are gone, those in the other two archives stay.
    let gate = Arc::new(Gate::default());
    *gate.later.lock().unwrap() = Some((8, world.ids[1].clone()));
    let erased = run(
        &server,
        &world,
        SubjectAction::Erase,
        &ALL,
        gate,
        Duration::ZERO,
        None,
    )
    .await;
    assert_eq!(erased.held, BTreeSet::from([1]));
    let per_archive = world.records[1] / ARCHIVES as u64;
    let mut want = expected(&world, &[0, 2, 3, 4]);
    want.insert(1, world.objects[1] + per_archive);
    assert_eq!(erased.counts, want, "{erased:?}");
    world.neighbours_untouched(&server).await;
    let verified = run(
        &server,
        &world,
        SubjectAction::Verify,
        &ALL,
        Arc::new(Gate::default()),
        Duration::ZERO,
        None,
    )
    .await;
    let mut left: BTreeMap<usize, u64> = ALL.iter().map(|k| (*k, 0)).collect();
    left.insert(1, world.records[1] - per_archive);
    assert_eq!(verified.counts, left);
}

#[tokio::test]
async fn s3_batch_step_whose_gate_fails_commits_nothing_more_and_is_counted_by_the_next() {
    // Given time, the step deletes the members' objects (the gate's first question) and
    // rewrites the first archive (the second), then the gate fails before the second
    // archive's rewrite: what the step did is counted by the next one, from its intents.
    // With no time, the question fails in a step of its own.
    for (fails_at, max_time) in [(3, Duration::from_secs(30)), (4, Duration::ZERO)] {
        let (server, world) = world(false).await;
        let gate = Arc::new(Gate::default());
        *gate.fails_at.lock().unwrap() = Some(fails_at);
        let erased = run(
            &server,
            &world,
            SubjectAction::Erase,
            &ALL,
            gate,
            max_time,
            None,
        )
        .await;
        assert_eq!(erased.failed, 1, "{erased:?}");
        assert_eq!(erased.counts, expected(&world, &ALL), "{erased:?}");
        world.neighbours_untouched(&server).await;
    }
}

/// A Verify batch of every member to its end, a fresh backend per step: the members' steps
/// of the last one, with the counts of all.
async fn verify_to_the_end(
    server: &S3Server,
    world: &World,
    max_time: Duration,
) -> Vec<tombstone::backends::MemberStep> {
    let job = world.job(SubjectAction::Verify, &ALL, Arc::new(Gate::default()));
    let mut cursor: Option<String> = None;
    let mut counts = vec![0u64; ALL.len()];
    for _ in 0..5000 {
        let mut step = crate::s3::backend(server, BUCKET)
            .batch_step(&job, cursor.as_deref(), &budget(max_time))
            .await
            .expect("a batch step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        for (total, m) in counts.iter_mut().zip(&mut step.members) {
            *total += m.count;
            m.count = *total;
        }
        match step.next {
            Next::Done => return step.members,
            Next::Continue(c) => {
                for m in &world.members {
                    assert!(!c.to_lowercase().contains(&m.email.to_lowercase()), "{c}");
                }
                cursor = Some(c)
            }
            Next::Wait { .. } => panic!("S3 batches never wait"),
        }
    }
    panic!("the batch did not finish");
}

#[tokio::test]
async fn s3_batch_unparsed_copies_of_one_member_fail_that_member_alone_and_name_the_objects() {
    let (server, world) = world(false).await;
    // Lines that are not JSON holding member 1's address (in capitals), and a neighbour's.
    let loud = world.members[1].email.to_uppercase();
    let neighbour = &world.neighbours[0].email;
    server
        .put(
            BUCKET,
            "app/logs/day7.jsonl.gz",
            gzip(format!("bounce for {loud}\nbounce for {neighbour}\n").as_bytes()),
        )
        .await;
    server
        .put(
            BUCKET,
            "app/logs/day8.jsonl.gz",
            gzip(format!("retry {loud}\nretry {loud} again\n").as_bytes()),
        )
        .await;
    // One step, then a step per page or archive: copies found by earlier steps are counted,
    // those of the last one named.
    for max_time in [Duration::from_secs(30), Duration::ZERO] {
        let members = verify_to_the_end(&server, &world, max_time).await;
        for (k, m) in members.iter().enumerate() {
            if k == 1 {
                continue;
            }
            assert!(m.failure.is_none(), "member {k}: {:?}", m.failure);
            assert_eq!(m.count, world.records[k] + world.objects[k], "member {k}");
        }
        let failure = members[1].failure.as_ref().expect("member 1 fails");
        assert_eq!(failure.reason, "UnparsedCopiesRemain", "{failure:?}");
        let message = &failure.message;
        assert!(
            message.contains("3 archive lines") && message.contains("unparsedLines: DropMatching"),
            "{message}"
        );
        assert!(
            !message.to_lowercase().contains(&loud.to_lowercase()),
            "{message}"
        );
        if max_time > Duration::ZERO {
            assert!(
                message.contains("app/logs/day7.jsonl.gz: 1 line,")
                    && message.contains("app/logs/day8.jsonl.gz: 2 lines"),
                "{message}"
            );
        } else {
            assert!(message.contains("more objects"), "{message}");
        }
    }
}
