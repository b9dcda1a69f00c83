//! Job slots: how many store steps run at once (`--max-concurrent-jobs`), and whose step goes
//! next when they are all taken. An erasure due within [`URGENT_WITHIN`] goes first, nearest
//! deadline first (Art. 12(3) gives one month); everything else shares the slots fairly: the
//! owner (a policy's sweep, a request) with the fewest steps running goes next, then the one
//! that has waited longest. So one policy with a huge target, whose steps queue again one
//! after another, cannot starve the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::api::Timestamp;

/// An erasure due this soon is served before anything else.
pub const URGENT_WITHIN: chrono::Duration = chrono::Duration::days(7);

/// Who asks for a slot, and by when their work is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The object the step works for: `policy/<namespace>/<name>` or `request/<ns>/<name>`.
    pub owner: String,
    /// An erasure request's deadline.
    pub deadline: Option<Timestamp>,
}

impl Claim {
    pub fn sweep(namespace: &str, policy: &str) -> Self {
        Self {
            owner: format!("policy/{namespace}/{policy}"),
            deadline: None,
        }
    }

    pub fn erasure(namespace: &str, request: &str, deadline: Option<Timestamp>) -> Self {
        Self {
            owner: format!("request/{namespace}/{request}"),
            deadline,
        }
    }
}

/// The waiter to serve next (pure): urgent erasures first, nearest deadline first; then the
/// owner with the fewest steps running; then the one that came first (lowest `arrival`).
pub fn next_waiter(
    waiting: &[(u64, &Claim)],
    running: &HashMap<String, usize>,
    now: Timestamp,
) -> Option<usize> {
    let urgent_until = now.0.checked_add_signed(URGENT_WITHIN).unwrap_or(now.0);
    waiting
        .iter()
        .enumerate()
        .min_by_key(|(_, (arrival, claim))| {
            let urgent = claim.deadline.filter(|d| d.0 <= urgent_until).map(|d| d.0);
            (
                // `None` sorts first: make urgency a leading `false`.
                urgent.is_none(),
                urgent,
                running.get(&claim.owner).copied().unwrap_or(0),
                *arrival,
            )
        })
        .map(|(index, _)| index)
}

struct Waiter {
    arrival: u64,
    claim: Claim,
    grant: oneshot::Sender<SlotPermit>,
}

struct State {
    free: usize,
    arrivals: u64,
    waiting: Vec<Waiter>,
    running: HashMap<String, usize>,
}

/// The shared slots.
#[derive(Clone)]
pub struct JobSlots {
    state: Arc<Mutex<State>>,
}

/// A slot, held for one step; given back (to the next waiter) when dropped.
pub struct SlotPermit {
    slots: Option<JobSlots>,
    owner: String,
}

impl JobSlots {
    pub fn new(slots: usize) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                free: slots.max(1),
                arrivals: 0,
                waiting: Vec::new(),
                running: HashMap::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Slots free now (for tests and diagnostics).
    pub fn available(&self) -> usize {
        self.lock().free
    }

    /// Waits for a slot. Cancel-safe: a waiter dropped before it is served leaves the queue,
    /// and a slot granted to it meanwhile goes to the next.
    pub async fn acquire(&self, claim: Claim) -> SlotPermit {
        let (arrival, receiver) = {
            let mut state = self.lock();
            if state.free > 0 && state.waiting.is_empty() {
                state.free -= 1;
                *state.running.entry(claim.owner.clone()).or_insert(0) += 1;
                return SlotPermit {
                    slots: Some(self.clone()),
                    owner: claim.owner,
                };
            }
            state.arrivals = state.arrivals.wrapping_add(1);
            let arrival = state.arrivals;
            let (grant, receiver) = oneshot::channel();
            state.waiting.push(Waiter {
                arrival,
                claim,
                grant,
            });
            (arrival, receiver)
        };
        let leave = LeaveQueue {
            slots: self,
            arrival,
        };
        let permit = receiver.await;
        drop(leave);
        match permit {
            Ok(permit) => permit,
            // The sender is dropped unsent only when the waiter left the queue, which only
            // `LeaveQueue` does, after this point.
            Err(_) => unreachable!("a queued waiter is always served"),
        }
    }

    /// Gives free slots to waiters, in [`next_waiter`] order.
    fn dispatch(&self, state: &mut State) {
        while state.free > 0 && !state.waiting.is_empty() {
            let queue: Vec<(u64, &Claim)> = state
                .waiting
                .iter()
                .map(|w| (w.arrival, &w.claim))
                .collect();
            let Some(index) = next_waiter(&queue, &state.running, Timestamp::now()) else {
                break;
            };
            let waiter = state.waiting.swap_remove(index);
            state.free -= 1;
            *state.running.entry(waiter.claim.owner.clone()).or_insert(0) += 1;
            let permit = SlotPermit {
                slots: Some(self.clone()),
                owner: waiter.claim.owner,
            };
            if let Err(mut unsent) = waiter.grant.send(permit) {
                // The waiter is gone: take the slot back here (dropping the permit would
                // lock the state again).
                unsent.slots = None;
                release(state, &unsent.owner);
            }
        }
    }
}

fn release(state: &mut State, owner: &str) {
    if let Some(count) = state.running.get_mut(owner) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            state.running.remove(owner);
        }
    }
    state.free += 1;
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            let mut state = slots.lock();
            release(&mut state, &self.owner);
            slots.dispatch(&mut state);
        }
    }
}

/// Removes a waiter that stops waiting (its future dropped) from the queue.
struct LeaveQueue<'a> {
    slots: &'a JobSlots,
    arrival: u64,
}

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        state.waiting.retain(|w| w.arrival != self.arrival);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(day: u32) -> Timestamp {
        Timestamp(
            chrono::Utc
                .with_ymd_and_hms(2026, 12, day, 0, 0, 0)
                .unwrap(),
        )
    }

    #[test]
    fn urgent_erasures_go_first_then_the_owner_running_least_then_the_first_come() {
        let now = at(1);
        let sweep_a = Claim::sweep("ns", "a");
        let sweep_b = Claim::sweep("ns", "b");
        let far = Claim::erasure("ns", "far", Some(at(28)));
        let soon = Claim::erasure("ns", "soon", Some(at(6)));
        let sooner = Claim::erasure("ns", "sooner", Some(at(3)));
        let running = HashMap::from([("policy/ns/a".to_string(), 3)]);

        let queue = [
            (1, &sweep_a),
            (2, &far),
            (3, &soon),
            (4, &sooner),
            (5, &sweep_b),
        ];
        assert_eq!(
            next_waiter(&queue, &running, now),
            Some(3),
            "the nearest deadline"
        );
        let queue = [(1, &sweep_a), (2, &far), (3, &soon), (5, &sweep_b)];
        assert_eq!(next_waiter(&queue, &running, now), Some(2));
        // Not urgent: the far erasure and the sweeps share fairly; a, already running three
        // steps, waits for those running none, in arrival order.
        let queue = [(1, &sweep_a), (2, &far), (5, &sweep_b)];
        assert_eq!(next_waiter(&queue, &running, now), Some(1));
        let queue = [(1, &sweep_a), (5, &sweep_b)];
        assert_eq!(next_waiter(&queue, &running, now), Some(1));
        assert_eq!(next_waiter(&queue, &HashMap::new(), now), Some(0));
        assert_eq!(next_waiter(&[], &running, now), None);
    }

    #[tokio::test]
    async fn a_released_slot_goes_to_the_waiter_picked_and_a_dropped_waiter_leaves_the_queue() {
        let slots = JobSlots::new(2);
        // The huge policy runs a step; another owner holds the second slot.
        let busy = slots.acquire(Claim::sweep("ns", "huge")).await;
        let other = slots.acquire(Claim::sweep("ns", "other")).await;
        assert_eq!(slots.available(), 0);

        let (served, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for claim in [
            Claim::sweep("ns", "huge"),
            Claim::sweep("ns", "small"),
            Claim::erasure("ns", "due", Some(Timestamp::now())),
        ] {
            let (shared, served) = (slots.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                let permit = shared.acquire(claim.clone()).await;
                served.send(claim.owner).unwrap();
                drop(permit);
            }));
            // Queued in this order before the slot is released.
            while slots.lock().waiting.len() < tasks.len() {
                tokio::task::yield_now().await;
            }
        }
        // One more waiter gives up before it is served.
        let impatient = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(Claim::sweep("ns", "gone")).await }
        });
        while slots.lock().waiting.len() < 4 {
            tokio::task::yield_now().await;
        }
        impatient.abort();
        let _ = impatient.await;
        assert_eq!(slots.lock().waiting.len(), 3);

        drop(other);
        for task in tasks {
            task.await.unwrap();
        }
        let mut served = Vec::new();
        while let Ok(owner) = order.try_recv() {
            served.push(owner);
        }
        // The erasure due now first; then the small policy before the huge one's next step,
        // though that queued first, since the huge one still runs a step.
        assert_eq!(
            served,
            ["request/ns/due", "policy/ns/small", "policy/ns/huge"]
        );
        assert_eq!(slots.available(), 1);
        drop(busy);
        assert_eq!(slots.available(), 2);
    }
}
