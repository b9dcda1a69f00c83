//! What the scale test and the scale benchmark count as handled.

use kube::api::{Api, ListParams};
use tombstone::api::erasurerequest::ErasurePhase;
use tombstone::api::{ErasureRequest, RetentionPolicy};

/// How many of the namespace's policies and requests have been handled: a policy once its
/// status observed its generation, a request once it is Completed.
pub async fn handled(client: &kube::Client, ns: &str) -> (usize, usize) {
    let policies = Api::<RetentionPolicy>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|p| {
                    p.status.as_ref().is_some_and(|s| {
                        s.observed_generation.is_some()
                            && s.observed_generation == p.metadata.generation
                    })
                })
                .count()
        })
        .unwrap_or(0);
    let requests = Api::<ErasureRequest>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|r| {
                    r.status
                        .as_ref()
                        .is_some_and(|s| s.phase == ErasurePhase::Completed)
                })
                .count()
        })
        .unwrap_or(0);
    (policies, requests)
}
