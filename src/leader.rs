//! Leader election on a `coordination.k8s.io/v1` Lease: one instance acts, the others wait and
//! take over when the holder stops renewing (or releases the Lease on graceful shutdown).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Lease request failed: {0}")]
    Kube(#[source] kube::Error),
    #[error("lost the Lease to {0:?}")]
    Lost(Option<String>),
    /// The Lease was not renewed within the renew deadline (API server unreachable, or this
    /// process was frozen): another instance may lead by now, so this one stops acting.
    #[error("the Lease was not renewed within the renew deadline of {0}s")]
    Expired(u64),
    #[error("invalid leader election timings: {0}")]
    InvalidTimings(String),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::Lost(_) | Error::Expired(_) => "LeadershipLost",
            Error::InvalidTimings(_) => "InvalidLeaderElection",
        }
    }
}

/// Whether this instance may still act as the leader, judged by its own monotonic clock: true
/// while the Lease was renewed less than the renew deadline ago and leadership was not given
/// up. Checked before every destructive batch and every status write, so a process that was
/// frozen (SIGSTOP, a VM pause, a long GC-like stall) and thaws after another instance took
/// over neither deletes nor writes: it cannot know it was frozen except by looking at the clock.
///
/// The renewal instant recorded is the one taken *before* the renew request was sent, so the
/// validity window never extends past what the API server granted. An instance without leader
/// election (`Fence::default()`) is always valid.
#[derive(Clone, Debug, Default)]
pub struct Fence(Option<Arc<FenceState>>);

#[derive(Debug)]
struct FenceState {
    renew_deadline: Duration,
    renewed_at: Mutex<Option<Instant>>,
    lost: CancellationToken,
}

impl Fence {
    /// A fence that holds nothing until [`Fence::renewed`] is called.
    pub fn new(renew_deadline: Duration) -> Self {
        Fence(Some(Arc::new(FenceState {
            renew_deadline,
            renewed_at: Mutex::new(None),
            lost: CancellationToken::new(),
        })))
    }

    /// The Lease was written as ours by a request sent at `sent_at`.
    pub fn renewed(&self, sent_at: Instant) {
        if let Some(state) = &self.0 {
            let mut renewed = state.renewed_at.lock().unwrap_or_else(|p| p.into_inner());
            if renewed.is_none_or(|r| r < sent_at) {
                *renewed = Some(sent_at);
            }
        }
    }

    /// Leadership is gone for good: every later check fails, and [`Fence::lost`] fires.
    pub fn lose(&self) {
        if let Some(state) = &self.0 {
            state.lost.cancel();
        }
    }

    /// Cancelled the moment leadership is known lost (never, without leader election).
    pub fn lost(&self) -> CancellationToken {
        self.0
            .as_ref()
            .map_or_else(CancellationToken::new, |s| s.lost.clone())
    }

    /// Whether this instance may act now.
    pub fn is_valid(&self) -> bool {
        let Some(state) = &self.0 else {
            return true;
        };
        if state.lost.is_cancelled() {
            return false;
        }
        let renewed = *state.renewed_at.lock().unwrap_or_else(|p| p.into_inner());
        renewed.is_some_and(|r| r.elapsed() < state.renew_deadline)
    }

    /// How long from `now` until the fence expires unless renewed (zero once lost).
    fn remaining(&self, now: Instant) -> Duration {
        let Some(state) = &self.0 else {
            return Duration::MAX;
        };
        if state.lost.is_cancelled() {
            return Duration::ZERO;
        }
        let renewed = *state.renewed_at.lock().unwrap_or_else(|p| p.into_inner());
        renewed.map_or(Duration::ZERO, |r| {
            state
                .renew_deadline
                .saturating_sub(now.saturating_duration_since(r))
        })
    }

    /// Ok while this instance may act; the error says why not.
    pub fn check(&self) -> Result<(), Error> {
        match &self.0 {
            Some(state) if !self.is_valid() => Err(Error::Expired(state.renew_deadline.as_secs())),
            _ => Ok(()),
        }
    }
}

/// What a standby last saw of someone else's Lease, and when by its own monotonic clock.
#[derive(Clone, Debug, PartialEq)]
struct Observed {
    record: LeaseRecord,
    at: Instant,
}

/// The parts of a Lease whose change shows that its holder is alive.
#[derive(Clone, Debug, PartialEq)]
struct LeaseRecord {
    resource_version: Option<String>,
    holder: Option<String>,
    renew_time: Option<jiff::Timestamp>,
}

/// Whether the holder of a Lease may be presumed gone: it released it, or the Lease has not
/// *changed* for its whole duration as measured by this instance's monotonic clock since it
/// last saw a change. Wall clocks of different nodes are never compared: a holder whose clock
/// runs behind (so that its renewTime looks old) is not deposed while it keeps renewing.
fn holder_gone(
    observed: &mut Option<Observed>,
    record: LeaseRecord,
    lease_duration: Duration,
    now: Instant,
) -> bool {
    let held = record.holder.as_deref().is_some_and(|h| !h.is_empty());
    let changed = observed.as_ref().is_none_or(|o| o.record != record);
    if changed {
        *observed = Some(Observed { record, at: now });
    }
    if !held {
        return true;
    }
    observed
        .as_ref()
        .is_some_and(|o| now.saturating_duration_since(o.at) >= lease_duration)
}

#[derive(Clone, Debug)]
pub struct LeaderElection {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    /// How long a standby waits, after it last saw the Lease change, before taking it over.
    pub lease_duration: Duration,
    /// How long the leader keeps acting without a successful renewal; shorter than the lease
    /// duration, so it stops before any standby may take over.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby looks at the Lease (client-go: retry period).
    pub renew_interval: Duration,
}

impl LeaderElection {
    /// The timings of controller-runtime: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(namespace: &str, lease_name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            lease_name: lease_name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_interval: Duration::from_secs(2),
        }
    }

    /// The renew deadline must leave the leader time to stop before a standby takes over,
    /// and the leader must get a few renewal attempts within it.
    pub fn validate(&self) -> Result<(), Error> {
        if self.renew_interval.is_zero() || self.renew_deadline <= self.renew_interval {
            return Err(Error::InvalidTimings(format!(
                "the renew interval ({:?}) must be non-zero and shorter than the renew deadline ({:?})",
                self.renew_interval, self.renew_deadline
            )));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(Error::InvalidTimings(format!(
                "the renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.lease_duration
            )));
        }
        Ok(())
    }

    /// A fence for one term of leadership.
    pub fn fence(&self) -> Fence {
        Fence::new(self.renew_deadline)
    }

    fn api(&self, client: &Client) -> Api<Lease> {
        Api::namespaced(client.clone(), &self.namespace)
    }

    /// Waits until this instance holds the Lease; false if cancelled first. `fence` is
    /// renewed with the instant the winning request was sent.
    pub async fn acquire(
        &self,
        client: &Client,
        cancel: &CancellationToken,
        fence: &Fence,
    ) -> Result<bool, Error> {
        let mut observed = None;
        loop {
            let sent_at = Instant::now();
            match self.try_acquire_or_renew(client, &mut observed).await {
                Ok(true) => {
                    fence.renewed(sent_at);
                    info!(lease = %self.lease_name, identity = %self.identity, "became leader");
                    return Ok(true);
                }
                Ok(false) => debug!(lease = %self.lease_name, "another instance leads; waiting"),
                Err(e) => debug!(error = %e, "leader election attempt failed; retrying"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                _ = tokio::time::sleep(self.renew_interval) => {}
            }
        }
    }

    /// Renews the Lease until cancelled (Ok) or until leadership is lost (Err): another
    /// instance holds the Lease, or no renewal succeeded within the renew deadline. On loss the
    /// fence is lost first, so nothing acts any more by the time the caller hears of it.
    pub async fn keep(
        &self,
        client: &Client,
        cancel: &CancellationToken,
        fence: &Fence,
    ) -> Result<(), Error> {
        let result = self.keep_renewing(client, cancel, fence).await;
        if result.is_err() {
            fence.lose();
        }
        result
    }

    async fn keep_renewing(
        &self,
        client: &Client,
        cancel: &CancellationToken,
        fence: &Fence,
    ) -> Result<(), Error> {
        let mut observed = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.renew_interval) => {}
            }
            // Woken late (a frozen process, a starved runtime): the deadline may be past.
            fence.check()?;
            let sent_at = Instant::now();
            let remaining = fence.remaining(sent_at);
            let attempt =
                tokio::time::timeout(remaining, self.try_acquire_or_renew(client, &mut observed));
            match attempt.await {
                Ok(Ok(true)) => fence.renewed(sent_at),
                Ok(Ok(false)) => return Err(Error::Lost(self.holder(client).await)),
                Ok(Err(e)) => debug!(error = %e, "renewing the Lease failed; retrying"),
                Err(_) => debug!("renewing the Lease timed out; retrying"),
            }
            fence.check()?;
        }
    }

    async fn holder(&self, client: &Client) -> Option<String> {
        let lease = self
            .api(client)
            .get_opt(&self.lease_name)
            .await
            .ok()
            .flatten()?;
        lease.spec?.holder_identity
    }

    /// Gives the Lease up so another instance takes over at once.
    pub async fn release(&self, client: &Client) -> Result<(), Error> {
        let api = self.api(client);
        let Some(mut lease) = api.get_opt(&self.lease_name).await.map_err(Error::Kube)? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        api.replace(&self.lease_name, &PostParams::default(), &lease)
            .await
            .map_err(Error::Kube)?;
        info!(lease = %self.lease_name, "released leadership");
        Ok(())
    }

    /// One round of the protocol: create the Lease, renew it if ours, or take it over if its
    /// holder released it or has not changed it for a whole lease duration (as `observed` by
    /// this instance's monotonic clock). Writes carry the resourceVersion read, so two
    /// candidates never both win, and a thawed holder cannot renew over a new holder.
    async fn try_acquire_or_renew(
        &self,
        client: &Client,
        observed: &mut Option<Observed>,
    ) -> Result<bool, Error> {
        let api = self.api(client);
        let now = jiff::Timestamp::now();
        let duration_secs = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = api.get_opt(&self.lease_name).await.map_err(Error::Kube)? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.lease_name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(Error::Kube(e)),
            };
        };
        let resource_version = lease.metadata.resource_version.clone();
        let spec = lease.spec.get_or_insert_with(Default::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !ours {
            // The holder's own lease duration, not ours: it decides how long it may be silent.
            let holder_duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.lease_duration, Duration::from_secs);
            let record = LeaseRecord {
                resource_version,
                holder: spec.holder_identity.clone(),
                renew_time: spec.renew_time.as_ref().map(|t| t.0),
            };
            if !holder_gone(observed, record, holder_duration, Instant::now()) {
                return Ok(false);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.lease_duration_seconds = Some(duration_secs);
        spec.renew_time = Some(MicroTime(now));
        match api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(Error::Kube(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(rv: &str, holder: Option<&str>) -> LeaseRecord {
        LeaseRecord {
            resource_version: Some(rv.into()),
            holder: holder.map(Into::into),
            // A renewTime far in the past or future must not matter: only changes count.
            renew_time: Some(jiff::Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn a_holder_is_gone_only_after_its_lease_went_unchanged_for_its_duration() {
        let lease = Duration::from_secs(15);
        let t0 = Instant::now();
        let mut seen = None;
        // First sight: whatever renewTime says, wait a whole duration from now.
        assert!(!holder_gone(&mut seen, record("1", Some("a")), lease, t0));
        assert!(!holder_gone(
            &mut seen,
            record("1", Some("a")),
            lease,
            t0 + Duration::from_secs(14)
        ));
        // It changed: the clock starts again.
        assert!(!holder_gone(
            &mut seen,
            record("2", Some("a")),
            lease,
            t0 + Duration::from_secs(14)
        ));
        assert!(!holder_gone(
            &mut seen,
            record("2", Some("a")),
            lease,
            t0 + Duration::from_secs(28)
        ));
        assert!(holder_gone(
            &mut seen,
            record("2", Some("a")),
            lease,
            t0 + Duration::from_secs(29)
        ));
    }

    #[test]
    fn a_released_lease_is_free_at_once() {
        let mut seen = None;
        let t0 = Instant::now();
        assert!(holder_gone(
            &mut seen,
            record("1", None),
            Duration::from_secs(15),
            t0
        ));
        assert!(holder_gone(
            &mut seen,
            record("1", Some("")),
            Duration::from_secs(15),
            t0
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_fence_holds_for_the_renew_deadline_by_the_monotonic_clock() {
        let fence = Fence::new(Duration::from_secs(10));
        assert!(!fence.is_valid(), "nothing held before the first renewal");
        fence.renewed(Instant::now());
        assert!(fence.check().is_ok());
        tokio::time::sleep(Duration::from_millis(9_900)).await;
        assert!(fence.is_valid());
        // A renewal sent earlier than the one recorded does not extend it.
        fence.renewed(Instant::now() - Duration::from_secs(12));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!fence.is_valid(), "expired: renewed 10.1s ago");
        assert_eq!(fence.check().unwrap_err().reason(), "LeadershipLost");
        fence.renewed(Instant::now());
        assert!(fence.is_valid());
        fence.lose();
        assert!(!fence.is_valid(), "lost is final");
        assert!(fence.lost().is_cancelled());
        fence.renewed(Instant::now());
        assert!(!fence.is_valid(), "lost is final");
    }

    #[test]
    fn without_leader_election_the_fence_always_holds() {
        let fence = Fence::default();
        assert!(fence.is_valid());
        assert!(fence.check().is_ok());
        assert!(!fence.lost().is_cancelled());
    }

    #[test]
    fn timings_leave_the_leader_time_to_stop() {
        let mut e = LeaderElection::new("ns", "lease", "me");
        assert!(e.validate().is_ok());
        e.renew_deadline = e.lease_duration;
        assert_eq!(e.validate().unwrap_err().reason(), "InvalidLeaderElection");
        e.renew_deadline = Duration::from_secs(1);
        e.renew_interval = Duration::from_secs(1);
        assert!(e.validate().is_err());
    }
}
