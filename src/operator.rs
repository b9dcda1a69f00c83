//! `tombstone run`: leader election, the controllers and the HTTP endpoints, stopped
//! together by one cancellation token (SIGTERM in `main`, or a test).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use futures::channel::mpsc;
use futures::StreamExt;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer, ObjectRef, Store};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::datastore::DataStore;
use crate::api::erasurerequest::{ErasurePhase, ErasureRequest};
use crate::api::legalhold::LegalHold;
use crate::api::retentionpolicy::RetentionPolicy;
use crate::controller::{
    datastore, erasurerequest, failure_key, legalhold, object_key, retentionpolicy, Context,
    Settings,
};
use crate::engine::Engine;
use crate::http::{self, HttpState};
use crate::leader::{self, Fence, LeaderElection};
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct Options {
    /// Watch only this namespace; None: every namespace.
    pub namespace: Option<String>,
    /// None: act at once without a Lease (single instance, or tests).
    pub leader_election: Option<LeaderElection>,
    /// Where to serve /healthz, /readyz and /metrics; None: not at all.
    pub http_addr: Option<SocketAddr>,
    /// The name events are reported under.
    pub reporter: String,
    pub settings: Settings,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Leader(#[from] leader::Error),
    #[error("cannot serve HTTP: {0}")]
    Http(#[source] std::io::Error),
}

/// A started operator: where it serves HTTP, and the task that runs it.
pub struct Running {
    pub http_addr: Option<SocketAddr>,
    pub task: tokio::task::JoinHandle<Result<(), Error>>,
    pub metrics: Arc<Metrics>,
    /// The engine, once the controllers run (after leader election).
    engine: Arc<OnceLock<Arc<Engine>>>,
}

impl Running {
    /// How many stores have a cached backend (0 before the controllers run).
    pub fn cached_backends(&self) -> usize {
        self.engine.get().map_or(0, |e| e.cached_backends())
    }
}

/// Starts the operator; it runs until `shutdown` is cancelled (graceful: running steps
/// checkpoint, the Lease is released) or leadership is lost (an error).
pub async fn start(
    client: Client,
    options: Options,
    shutdown: CancellationToken,
) -> Result<Running, Error> {
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let http_addr = match options.http_addr {
        Some(addr) => {
            let state = HttpState {
                metrics: metrics.clone(),
                ready: ready.clone(),
            };
            let (bound, _) = http::serve(addr, state, shutdown.clone())
                .await
                .map_err(Error::Http)?;
            info!(addr = %bound, "serving /healthz, /readyz and /metrics");
            Some(bound)
        }
        None => None,
    };
    let engine = Arc::new(OnceLock::new());
    let task = tokio::spawn(run(
        client,
        options,
        shutdown,
        metrics.clone(),
        ready,
        engine.clone(),
    ));
    Ok(Running {
        http_addr,
        task,
        metrics,
        engine,
    })
}

async fn run(
    client: Client,
    options: Options,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    engine: Arc<OnceLock<Arc<Engine>>>,
) -> Result<(), Error> {
    let Some(election) = options.leader_election.clone() else {
        run_controllers(
            client,
            &options,
            shutdown,
            metrics,
            ready,
            Fence::default(),
            engine,
        )
        .await;
        return Ok(());
    };
    election.validate()?;
    // A standby instance is healthy and ready: it is doing its job, which is to wait.
    ready.store(true, Ordering::Relaxed);
    let fence = election.fence();
    if !election.acquire(&client, &shutdown, &fence).await? {
        return Ok(());
    }
    ready.store(false, Ordering::Relaxed);
    // Losing the Lease stops the controllers at once (below): running steps are cancelled,
    // and the fence refuses their deletions and status writes meanwhile.
    let controllers_stop = shutdown.child_token();
    let controllers = run_controllers(
        client.clone(),
        &options,
        controllers_stop.clone(),
        metrics,
        ready,
        fence.clone(),
        engine,
    );
    // The Lease is renewed until the controllers have stopped, so that a graceful stop can
    // still checkpoint; only then is it released.
    let keep_stop = CancellationToken::new();
    let keep = election.keep(&client, &keep_stop, &fence);
    tokio::pin!(controllers);
    tokio::pin!(keep);
    let result = tokio::select! {
        _ = &mut controllers => {
            keep_stop.cancel();
            (&mut keep).await
        }
        kept = &mut keep => {
            controllers_stop.cancel();
            controllers.await;
            kept
        }
    };
    if let Err(e) = &result {
        warn!(error = %e, reason = e.reason(), "leadership lost; stopping");
        return result.map_err(Error::from);
    }
    fence.lose();
    if let Err(e) = election.release(&client).await {
        warn!(error = %e, "could not release the Lease; the next leader waits for it to expire");
    }
    Ok(())
}

fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs both controllers until `stop` is cancelled, then lets running reconciles finish.
async fn run_controllers(
    client: Client,
    options: &Options,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    fence: Fence,
    engine: Arc<OnceLock<Arc<Engine>>>,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: options.reporter.clone(),
            instance: None,
        },
    );
    let config = ControllerConfig::default().concurrency(options.settings.reconcile_concurrency);

    // One watch per kind, shared by the controllers that need it.
    let mut stores = Source::new(api::<DataStore>(&client, &options.namespace));
    let mut holds = Source::new(api::<LegalHold>(&client, &options.namespace));
    let mut policies = Source::new(api::<RetentionPolicy>(&client, &options.namespace));
    let mut requests = Source::new(api::<ErasureRequest>(&client, &options.namespace));
    let store_cache = stores.cache.clone();
    let policy_cache = policies.cache.clone();
    let hold_cache = holds.cache.clone();
    let request_cache = requests.cache.clone();

    let ctx = Arc::new(Context::new(
        client.clone(),
        (recorder, options.reporter.clone()),
        metrics,
        crate::controller::Settings {
            watch_namespace: options.namespace.clone(),
            ..options.settings.clone()
        },
        stop.clone(),
        fence,
        crate::controller::Caches {
            stores: store_cache.clone(),
            policies: policy_cache.clone(),
        },
    ));
    let _ = engine.set(ctx.engine.clone());
    // Each kind's own controller decided what follows its writes (a requeue, or nothing
    // until a change): the echoes of those writes trigger it no more.
    stores.without_echoes_of(ctx.own_writes.clone());
    holds.without_echoes_of(ctx.own_writes.clone());
    policies.without_echoes_of(ctx.own_writes.clone());
    requests.without_echoes_of(ctx.own_writes.clone());
    let store_controller = Controller::for_shared_stream(stores.applied(), store_cache.clone())
        .with_config(config.clone())
        .graceful_shutdown_on(shutdown_trigger(stop.clone(), store_cache.clone()));
    let policy_controller = Controller::for_shared_stream(policies.applied(), policy_cache.clone())
        .with_config(config.clone())
        .graceful_shutdown_on(shutdown_trigger(stop.clone(), policy_cache.clone()));
    let policy_index = policy_cache.clone();
    let held_policy_index = policy_cache.clone();
    // A store that changes (becomes ready, changes limits) re-plans the policies that use it.
    let policy_controller =
        policy_controller.watches_shared_stream(stores.touched(), move |store: Arc<DataStore>| {
            let namespace = store.namespace();
            let name = store.name_any();
            policy_index
                .state()
                .into_iter()
                .filter(|p| {
                    p.namespace() == namespace && p.spec.targets.iter().any(|t| t.store == name)
                })
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        });

    // A hold placed, lifted or changed re-plans the policies it names; a hold on subjects
    // re-plans every policy of its namespace (sweeps leave held subjects' data alone).
    let policy_controller =
        policy_controller.watches_shared_stream(holds.touched(), move |hold: Arc<LegalHold>| {
            let namespace = hold.namespace().unwrap_or_default();
            let mut refs: Vec<ObjectRef<RetentionPolicy>> = hold
                .spec
                .policies
                .iter()
                .flatten()
                .map(|p| ObjectRef::<RetentionPolicy>::new(p).within(&namespace))
                .collect();
            if hold.spec.subjects.as_ref().is_some_and(|s| !s.is_empty()) {
                refs.extend(
                    held_policy_index
                        .state()
                        .into_iter()
                        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
                        .map(|p| ObjectRef::from_obj(p.as_ref())),
                );
            }
            refs
        });
    let hold_controller = Controller::for_shared_stream(holds.applied(), hold_cache.clone())
        .with_config(config.clone())
        .graceful_shutdown_on(shutdown_trigger(stop.clone(), hold_cache.clone()));
    let hold_loop = hold_controller
        .run(legalhold::reconcile, legalhold::error_policy, ctx.clone())
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "legalhold controller event");
            }
            futures::future::ready(())
        });
    let request_controller =
        Controller::for_shared_stream(requests.applied(), request_cache.clone())
            // Unbounded here: the requests of one batch wait in it together; the reconciles
            // take `request_permits` (as many as `reconcile_concurrency`) while they talk to
            // the API server.
            .with_config(config.clone().concurrency(0));
    // The unfinished requests of a namespace that `concerns` (given a request's status); a
    // cluster-wide request counts in every namespace it searches (or may search, before its
    // targets are known).
    let unfinished = {
        let index = request_cache.clone();
        move |namespace: Option<String>, concerns: &dyn Fn(&ErasureRequest) -> bool| {
            let searches = |r: &ErasureRequest| {
                erasurerequest::plan::cluster_wide(r)
                    && r.status.as_ref().is_none_or(|s| {
                        s.targets.is_empty() || s.targets.iter().any(|t| t.namespace == namespace)
                    })
            };
            index
                .state()
                .into_iter()
                .filter(|r| r.metadata.namespace == namespace || searches(r))
                .filter(|r| {
                    r.status
                        .as_ref()
                        .is_none_or(|s| s.phase != ErasurePhase::Completed)
                })
                .filter(|r| concerns(r))
                .map(|r| ObjectRef::from_obj(r.as_ref()))
                .collect::<Vec<_>>()
        }
    };
    let unfinished_by_hold = unfinished.clone();
    let unfinished_by_policy = unfinished.clone();
    let policy_generations = Generations::default();
    let request_controller = request_controller
        .graceful_shutdown_on(shutdown_trigger(stop.clone(), request_cache.clone()))
        // A hold placed or lifted may block or release any unfinished request in its namespace.
        .watches_shared_stream(holds.touched(), move |hold: Arc<LegalHold>| {
            unfinished_by_hold(hold.namespace(), &|_| true)
        })
        // A policy edited (a locator fixed, an archive's lines declared) lets the requests
        // waiting on its targets go on at once. Only spec changes count: a sweep's status
        // writes would otherwise wake them at every checkpoint.
        .watches_shared_stream(policies.touched(), move |policy: Arc<RetentionPolicy>| {
            if !policy_generations.changed(policy.as_ref()) {
                return Vec::new();
            }
            let name = policy.name_any();
            let namespace = policy.namespace().unwrap_or_default();
            unfinished_by_policy(policy.namespace(), &|r| {
                erasurerequest::plan::may_concern_policy(r, &namespace, &name)
            })
        })
        // A store that becomes ready (or changes) lets the requests waiting on it go on at
        // once, rather than after their back-off: those with a target on it, and those whose
        // targets are not known yet.
        .watches_shared_stream(stores.touched(), move |store: Arc<DataStore>| {
            let name = store.name_any();
            unfinished(store.namespace(), &|r| {
                r.status.as_ref().is_none_or(|s| {
                    s.targets.is_empty() || s.targets.iter().any(|t| t.store == name)
                })
            })
        });
    // The watches run until the controllers have stopped (below).
    let watches = async move {
        tokio::join!(stores.run(), holds.run(), policies.run(), requests.run());
    };
    let request_loop = request_controller
        .run(
            erasurerequest::reconcile,
            erasurerequest::error_policy,
            ctx.clone(),
        )
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "erasurerequest controller event");
            }
            futures::future::ready(())
        });
    // The erasure and compliance gauges are a view over all requests and policies:
    // recomputed from the caches.
    let gauges = {
        let requests = request_cache.clone();
        let policies = policy_cache.clone();
        let metrics = ctx.metrics.clone();
        let stop = stop.clone();
        let stall_after = ctx.settings.stall_after;
        async move {
            loop {
                let state = requests.state();
                let all: Vec<&ErasureRequest> = state.iter().map(|r| r.as_ref()).collect();
                let now = crate::api::Timestamp::now();
                metrics.set_erasure_counts(&erasurerequest::plan::counts(&all, now, &stall_after));
                let waiting = |h: Option<&crate::api::receipts::ReceiptChainStatus>| {
                    h.map_or(0, |h| h.pending_upload.len())
                };
                let mut pending: usize = all
                    .iter()
                    .map(|r| waiting(r.status.as_ref().and_then(|s| s.receipts.as_ref())))
                    .sum();
                let state = policies.state();
                let all: Vec<&RetentionPolicy> = state.iter().map(|p| p.as_ref()).collect();
                pending = pending.saturating_add(
                    all.iter()
                        .map(|p| waiting(p.status.as_ref().and_then(|s| s.receipts.as_ref())))
                        .sum(),
                );
                metrics
                    .receipts_pending_upload
                    .set(i64::try_from(pending).unwrap_or(i64::MAX));
                metrics.set_policy_compliance(&retentionpolicy::plan::compliance_counts(&all));
                metrics.set_late_sweeps(retentionpolicy::plan::late_sweeps(&all, now));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(GAUGE_INTERVAL) => {}
                }
            }
        }
    };
    // What is kept in memory per object goes when the object does: cached backends of
    // deleted DataStores, failure counts of any deleted object. Read from the caches once
    // they are synced, so that an object is never taken for deleted before it was listed.
    let forget = {
        let caches = (
            store_cache.clone(),
            policy_cache.clone(),
            request_cache.clone(),
            hold_cache,
        );
        let ctx = ctx.clone();
        let stop = stop.clone();
        async move {
            let (stores, policies, requests, holds) = caches;
            let synced = async {
                let _ = stores.wait_until_ready().await;
                let _ = policies.wait_until_ready().await;
                let _ = requests.wait_until_ready().await;
                let _ = holds.wait_until_ready().await;
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = synced => {}
            }
            loop {
                let live_stores = stores.state();
                let store_keys: HashSet<String> =
                    live_stores.iter().map(|s| object_key(s.as_ref())).collect();
                let mut keys: HashSet<String> = live_stores
                    .iter()
                    .map(|s| failure_key(s.as_ref()))
                    .collect();
                keys.extend(policies.state().iter().map(|p| failure_key(p.as_ref())));
                keys.extend(requests.state().iter().map(|r| failure_key(r.as_ref())));
                keys.extend(holds.state().iter().map(|h| failure_key(h.as_ref())));
                ctx.forget_deleted(|k| store_keys.contains(k), |k| keys.contains(k));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(GAUGE_INTERVAL) => {}
                }
            }
        }
    };
    let stores_ready = store_cache;
    let policies_ready = policy_cache;
    let readiness = {
        let ready = ready.clone();
        async move {
            let _ = stores_ready.wait_until_ready().await;
            let _ = policies_ready.wait_until_ready().await;
            ready.store(true, Ordering::Relaxed);
            info!("caches synced; ready");
        }
    };
    let store_loop = store_controller
        .run(datastore::reconcile, datastore::error_policy, ctx.clone())
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "datastore controller event");
            }
            futures::future::ready(())
        });
    let policy_loop = policy_controller
        .run(
            retentionpolicy::reconcile,
            retentionpolicy::error_policy,
            ctx.clone(),
        )
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "retentionpolicy controller event");
            }
            futures::future::ready(())
        });
    info!(
        namespace = options.namespace.as_deref().unwrap_or("<all>"),
        "controllers started"
    );
    let controllers = async {
        tokio::join!(
            store_loop,
            policy_loop,
            hold_loop,
            request_loop,
            gauges,
            forget,
            readiness_until(readiness, stop.clone())
        )
    };
    tokio::select! {
        _ = controllers => {}
        _ = watches => {}
        _ = async { stop.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            warn!("controllers did not stop within {}s; abandoning running reconciles", SHUTDOWN_GRACE.as_secs());
        }
    }
    ready.store(false, Ordering::Relaxed);
    info!("controllers stopped");
}

/// One watch of a kind, shared by every controller that needs it: one cache (without what
/// no reconcile reads) and one stream of the objects seen, handed to each subscriber.
struct Source<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    api: Api<K>,
    cache: Store<K>,
    writer: Writer<K>,
    /// Each subscriber, and whether it is told of deletions too.
    subscribers: Vec<(bool, mpsc::UnboundedSender<Arc<K>>)>,
    /// This process's own writes of the kind: their echoes do not reach the subscribers of
    /// [`Source::applied`] (the kind's own controller).
    own_writes: Option<Arc<crate::controller::echoes::OwnWrites>>,
}

impl<K> Source<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    fn new(api: Api<K>) -> Self {
        let (cache, writer) = reflector::store();
        Self {
            api,
            cache,
            writer,
            subscribers: Vec::new(),
            own_writes: None,
        }
    }

    /// Leaves out of [`Source::applied`] the versions `own_writes` recorded.
    fn without_echoes_of(&mut self, own_writes: Arc<crate::controller::echoes::OwnWrites>) {
        self.own_writes = Some(own_writes);
    }

    /// The objects created or changed (the trigger of the kind's own controller).
    fn applied(&mut self) -> mpsc::UnboundedReceiver<Arc<K>> {
        self.subscribe(false)
    }

    /// The objects created, changed or deleted (a trigger of another kind's controller).
    fn touched(&mut self) -> mpsc::UnboundedReceiver<Arc<K>> {
        self.subscribe(true)
    }

    fn subscribe(&mut self, deletions: bool) -> mpsc::UnboundedReceiver<Arc<K>> {
        let (tx, rx) = mpsc::unbounded();
        self.subscribers.push((deletions, tx));
        rx
    }

    /// Runs the watch: fills the cache and tells the subscribers, until dropped.
    fn run(self) -> impl std::future::Future<Output = ()> + Send {
        let Self {
            api,
            writer,
            subscribers,
            own_writes,
            ..
        } = self;
        watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(crate::controller::strip_unread::<K>)
            .reflect(writer)
            .for_each(move |event| {
                let (object, deleted) = match event {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => (o, false),
                    Ok(watcher::Event::Delete(o)) => (o, true),
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => {
                        return futures::future::ready(())
                    }
                    Err(e) => {
                        tracing::debug!(kind = %K::kind(&()), error = %e, "watch error; retried with back-off");
                        return futures::future::ready(());
                    }
                };
                let echo = !deleted && own_writes.as_ref().is_some_and(|w| w.is_echo(&object));
                let object = Arc::new(object);
                for (deletions, tx) in &subscribers {
                    if *deletions || (!deleted && !echo) {
                        // A subscriber gone (its controller stopped) needs nothing more.
                        let _ = tx.unbounded_send(object.clone());
                    }
                }
                futures::future::ready(())
            })
    }
}

/// How often the erasure and compliance gauges are recomputed.
const GAUGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// How long running reconciles may take to finish after a stop.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Fires once `stop` is cancelled *and* the controller's cache has synced (or 10s passed): a
/// kube-runtime controller whose watch is stopped before its first list completes waits for
/// its cache forever, so shutdown must not cut the watch that early.
async fn shutdown_trigger<K>(stop: CancellationToken, cache: kube::runtime::reflector::Store<K>)
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
{
    stop.cancelled().await;
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(10), cache.wait_until_ready()).await;
}

async fn readiness_until(
    readiness: impl std::future::Future<Output = ()>,
    stop: CancellationToken,
) {
    tokio::select! {
        _ = readiness => {}
        _ = stop.cancelled() => {}
    }
}

/// The generation last seen of each object (by uid), to tell spec changes from status writes
/// in a watch. Entries go with their objects.
#[derive(Default)]
struct Generations(std::sync::Mutex<std::collections::HashMap<String, Option<i64>>>);

impl Generations {
    /// Whether `obj` is new, changed its spec, or is going away since last seen.
    fn changed<K: kube::Resource>(&self, obj: &K) -> bool {
        let uid = obj.meta().uid.clone().unwrap_or_default();
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if obj.meta().deletion_timestamp.is_some() {
            seen.remove(&uid);
            return true;
        }
        seen.insert(uid, obj.meta().generation) != Some(obj.meta().generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{strip_unread, LAST_APPLIED};

    #[test]
    fn cached_objects_lose_managed_fields_and_kubectls_copy_and_keep_the_rest() {
        let mut cm: k8s_openapi::api::core::v1::ConfigMap =
            serde_json::from_value(serde_json::json!({
                "metadata": {
                    "name": "x",
                    "annotations": {LAST_APPLIED: "{\"big\": true}", "team": "mail"},
                    "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
                },
                "data": {"k": "v"}
            }))
            .expect("a ConfigMap");
        strip_unread(&mut cm);
        assert_eq!(cm.metadata.managed_fields, None);
        let annotations = cm.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations.len(), 1);
        assert_eq!(annotations.get("team").map(String::as_str), Some("mail"));
        assert_eq!(
            cm.data.unwrap_or_default().get("k").map(String::as_str),
            Some("v")
        );
        let mut only_kubectl: k8s_openapi::api::core::v1::ConfigMap =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "y", "annotations": {LAST_APPLIED: "{}"}}
            }))
            .expect("a ConfigMap");
        strip_unread(&mut only_kubectl);
        assert_eq!(only_kubectl.metadata.annotations, None);
    }

    #[test]
    fn generations_tell_spec_changes_from_status_writes() {
        let seen = Generations::default();
        // Any kind will do: a ConfigMap stands for a policy.
        let mut policy = k8s_openapi::api::core::v1::ConfigMap::default();
        policy.metadata.uid = Some("u-1".into());
        policy.metadata.generation = Some(1);
        assert!(seen.changed(&policy), "first sight");
        assert!(!seen.changed(&policy), "a status write");
        policy.metadata.generation = Some(2);
        assert!(seen.changed(&policy), "a spec change");
        policy.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-11-30T00:00:00Z".parse().unwrap(),
            ));
        assert!(seen.changed(&policy), "going away");
        assert!(seen.0.lock().unwrap().is_empty(), "its entry goes with it");
    }
}
