//! What the scale test and the scale benchmark count as handled, how the benchmarks create
//! thousands of objects, and the generator their data comes from.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use tombstone::api::erasurerequest::ErasurePhase;
use tombstone::api::{ErasureRequest, RetentionPolicy};

/// What has been handled of the namespace's policies and requests, kept current by two
/// watches: a policy once its status observed its generation, a request once it is
/// Completed. Watching, rather than listing every object again and again, keeps the counting
/// from loading the API server the operator is measured against (a paged list of thousands
/// of objects is read from etcd each time). The watches stop when this is dropped.
pub struct Handled {
    policies: Arc<Mutex<HashSet<String>>>,
    requests: Arc<Mutex<HashSet<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Handled {
    /// Starts both watches and returns once each has listed what is there.
    pub async fn watch(client: &kube::Client, ns: &str) -> Self {
        let policies = Arc::new(Mutex::new(HashSet::new()));
        let requests = Arc::new(Mutex::new(HashSet::new()));
        let (policies_listed, policies_ready) = tokio::sync::oneshot::channel();
        let (requests_listed, requests_ready) = tokio::sync::oneshot::channel();
        let tasks = vec![
            tokio::spawn(track(
                Api::<RetentionPolicy>::namespaced(client.clone(), ns),
                policies.clone(),
                policies_listed,
                |p| {
                    p.status.as_ref().is_some_and(|s| {
                        s.observed_generation.is_some()
                            && s.observed_generation == p.metadata.generation
                    })
                },
            )),
            tokio::spawn(track(
                Api::<ErasureRequest>::namespaced(client.clone(), ns),
                requests.clone(),
                requests_listed,
                |r| {
                    r.status
                        .as_ref()
                        .is_some_and(|s| s.phase == ErasurePhase::Completed)
                },
            )),
        ];
        let handled = Handled {
            policies,
            requests,
            tasks,
        };
        let _ = policies_ready.await;
        let _ = requests_ready.await;
        handled
    }

    /// How many policies and requests are handled now.
    pub fn counts(&self) -> (usize, usize) {
        let len = |set: &Mutex<HashSet<String>>| set.lock().map_or(0, |s| s.len());
        (len(&self.policies), len(&self.requests))
    }
}

impl Drop for Handled {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Keeps in `handled` the names of the objects of `api` that pass `passes`, and says on
/// `listed` when the first list is in. A watch that starts over lists again, and the set is
/// replaced by what that list passes.
async fn track<K>(
    api: Api<K>,
    handled: Arc<Mutex<HashSet<String>>>,
    listed: tokio::sync::oneshot::Sender<()>,
    passes: fn(&K) -> bool,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut listing = HashSet::new();
    let mut listed = Some(listed);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let Ok(event) = event else { continue };
        let Ok(mut set) = handled.lock() else { return };
        match event {
            watcher::Event::Init => listing.clear(),
            watcher::Event::InitApply(o) => {
                if passes(&o) {
                    listing.insert(o.name_any());
                }
            }
            watcher::Event::InitDone => {
                *set = std::mem::take(&mut listing);
                if let Some(listed) = listed.take() {
                    let _ = listed.send(());
                }
            }
            watcher::Event::Apply(o) => {
                if passes(&o) {
                    set.insert(o.name_any());
                } else {
                    set.remove(&o.name_any());
                }
            }
            watcher::Event::Delete(o) => {
                set.remove(&o.name_any());
            }
        }
    }
}

/// Creates `value` with `api`, retried: thousands of creates at once meet the odd 429 or
/// timeout. One that exists already counts as created.
pub async fn create_retrying<K>(api: &Api<K>, value: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).expect("valid object");
    for attempt in 0.. {
        match api.create(&kube::api::PostParams::default(), &object).await {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 => return,
            Err(e) if attempt < 5 => {
                eprintln!("retrying a create: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("create failed: {e}"),
        }
    }
}

/// The API server's write ceiling on this machine, now: `n` ConfigMaps created, `in_flight`
/// at a time (each one write, as a status patch is), then deleted. Returns writes per
/// second.
pub async fn write_ceiling(client: &kube::Client, ns: &str, n: usize, in_flight: usize) -> f64 {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let started = std::time::Instant::now();
    create_ceiling_objects(&maps, n, in_flight, |name| {
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"ceiling": "true"}},
        "data": {"phase": "Completed"}})
    })
    .await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    remove_ceiling_objects(&maps).await;
    rate
}

/// The API server's ceiling for the operator's commonest write, now: `n` ErasureRequests
/// made for it (with no operator running), then each one's `status` written twice (a
/// server-side apply of the whole status, as the operator writes it, with one message
/// changed each time so that every write is one), `in_flight` at a time; the requests are
/// deleted after. Returns status writes per second.
pub async fn status_write_ceiling(
    client: &kube::Client,
    ns: &str,
    status: &tombstone::api::ErasureRequestStatus,
    n: usize,
    in_flight: usize,
) -> f64 {
    let requests: Api<ErasureRequest> = Api::namespaced(client.clone(), ns);
    create_ceiling_objects(&requests, n, in_flight, |name| {
        serde_json::json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest",
        "metadata": {"name": name, "labels": {"ceiling": "true"}},
        "spec": {"subject": {"secretRef": {"name": "ceiling"}}, "reason": "consentWithdrawn"}})
    })
    .await;
    let started = std::time::Instant::now();
    for round in 0..2 {
        futures::stream::iter(0..n)
            .for_each_concurrent(in_flight, |i| {
                let requests = requests.clone();
                let mut status = status.clone();
                async move {
                    if let Some(target) = status.targets.first_mut() {
                        target.message = format!("ceiling round {round}");
                    }
                    tombstone::controller::apply_status(
                        &requests,
                        &format!("ceiling-{i}"),
                        &status,
                    )
                    .await
                    .expect("a status write");
                }
            })
            .await;
    }
    let rate = (2 * n) as f64 / started.elapsed().as_secs_f64();
    remove_ceiling_objects(&requests).await;
    rate
}

/// Deletes what [`create_ceiling_objects`] made; best effort (the namespace goes after).
async fn remove_ceiling_objects<K>(api: &Api<K>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let _ = api
        .delete_collection(
            &Default::default(),
            &ListParams::default().labels("ceiling=true"),
        )
        .await;
}

/// Creates `ceiling-0` … `ceiling-{n-1}` (labelled `ceiling=true`) from `object(name)`,
/// `in_flight` at a time.
async fn create_ceiling_objects<K>(
    api: &Api<K>,
    n: usize,
    in_flight: usize,
    object: impl Fn(String) -> serde_json::Value,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    futures::stream::iter(0..n)
        .for_each_concurrent(in_flight, |i| {
            create_retrying(api, object(format!("ceiling-{i}")))
        })
        .await;
}

/// Writes: every request that is not a read.
pub fn writes(requests: &BTreeMap<String, usize>) -> usize {
    requests
        .iter()
        .filter(|(kind, _)| {
            !["get ", "list ", "watch "]
                .iter()
                .any(|v| kind.starts_with(v))
        })
        .map(|(_, n)| n)
        .sum()
}

/// What a run's writes alone take on the API server, at its ceilings measured now.
pub struct WriteFloor {
    /// Status writes like the operator's (of a finished request's status) per second.
    pub status_rate: f64,
    /// Plain creates per second, for every other write.
    pub create_rate: f64,
    pub status_writes: usize,
    pub other_writes: usize,
}

impl WriteFloor {
    /// The time those writes alone take at those rates.
    pub fn seconds(&self) -> f64 {
        self.status_writes as f64 / self.status_rate + self.other_writes as f64 / self.create_rate
    }
}

/// Measures the API server's ceilings now, with `n` objects written `in_flight` at a time
/// (the status of a finished request among those `labels` select), and weighs the run's
/// `requests` (and `extra_writes` of its own, counted as creates) by them.
pub async fn write_floor(
    client: &kube::Client,
    ns: &str,
    labels: Option<&str>,
    requests: &BTreeMap<String, usize>,
    extra_writes: usize,
    n: usize,
    in_flight: usize,
) -> WriteFloor {
    let mut select = ListParams::default().limit(1);
    if let Some(labels) = labels {
        select = select.labels(labels);
    }
    let status = Api::<ErasureRequest>::namespaced(client.clone(), ns)
        .list(&select)
        .await
        .expect("list requests")
        .items
        .into_iter()
        .find_map(|r| r.status)
        .expect("a finished request's status");
    let status_rate = status_write_ceiling(client, ns, &status, n, in_flight).await;
    let create_rate = write_ceiling(client, ns, n, in_flight).await;
    let status_writes = status_writes(requests);
    WriteFloor {
        status_rate,
        create_rate,
        status_writes,
        other_writes: writes(requests).saturating_sub(status_writes) + extra_writes,
    }
}

/// Status writes: the `status` subresource patched, of any kind.
pub fn status_writes(requests: &BTreeMap<String, usize>) -> usize {
    requests
        .iter()
        .filter(|(kind, _)| kind.starts_with("patch ") && kind.ends_with("/status"))
        .map(|(_, n)| n)
        .sum()
}

/// A small deterministic generator (xorshift64*), so every run writes the same data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
