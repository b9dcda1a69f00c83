//! Leader election on a `coordination.k8s.io/v1` Lease: one instance acts, the others wait and
//! take over when the holder stops renewing (or releases the Lease on graceful shutdown).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Lease request failed: {0}")]
    Kube(#[source] kube::Error),
    #[error("lost the Lease to {0:?}")]
    Lost(Option<String>),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::Lost(_) => "LeadershipLost",
        }
    }
}

#[derive(Clone, Debug)]
pub struct LeaderElection {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_interval: Duration,
}

impl LeaderElection {
    pub fn new(namespace: &str, lease_name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            lease_name: lease_name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(5),
        }
    }

    fn api(&self, client: &Client) -> Api<Lease> {
        Api::namespaced(client.clone(), &self.namespace)
    }

    /// Waits until this instance holds the Lease; false if cancelled first.
    pub async fn acquire(
        &self,
        client: &Client,
        cancel: &CancellationToken,
    ) -> Result<bool, Error> {
        loop {
            match self.try_acquire_or_renew(client).await {
                Ok(true) => {
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

    /// Renews the Lease until cancelled (Ok) or until it cannot be renewed in time (Err).
    pub async fn keep(&self, client: &Client, cancel: &CancellationToken) -> Result<(), Error> {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.renew_interval) => {}
            }
            match self.try_acquire_or_renew(client).await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => return Err(Error::Lost(self.holder(client).await)),
                Err(e) if last_renewed.elapsed() >= self.lease_duration => return Err(e),
                Err(e) => debug!(error = %e, "renewing the Lease failed; retrying"),
            }
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

    /// One round of the protocol: create the Lease, renew it if ours, or take it over if it
    /// expired. Writes carry the resourceVersion read, so two candidates never both win.
    async fn try_acquire_or_renew(&self, client: &Client) -> Result<bool, Error> {
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
        let spec = lease.spec.get_or_insert_with(Default::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !ours {
            let held = spec
                .holder_identity
                .as_deref()
                .is_some_and(|h| !h.is_empty());
            let expires = spec.renew_time.as_ref().map(|t| {
                t.0.checked_add(jiff::SignedDuration::from_secs(i64::from(
                    spec.lease_duration_seconds.unwrap_or(0),
                )))
                .unwrap_or(t.0)
            });
            if held && expires.is_some_and(|e| e > now) {
                return Ok(false);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
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
