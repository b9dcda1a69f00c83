//! Resolves a target's DataStore into the backend its steps run on, for sweeps and
//! erasures alike.

use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;
use kube::Api;

use super::retentionpolicy::plan::Problem;
use super::{stores, Context, Error};
use crate::api::common::{find_condition, ConditionStatus, ErrorCategory as Category};
use crate::api::datastore::DataStore;
use crate::api::retentionpolicy::Target;
use crate::api::StoreKind;
use crate::backends::{self, Backend};

/// A target with its store resolved, or the reason it cannot run.
pub(crate) enum ResolvedTarget {
    /// The store is ready: its backend (shared by every job on the DataStore), its kind and
    /// its key (`namespace/name`).
    Ready {
        backend: Arc<dyn Backend>,
        kind: StoreKind,
        store_key: String,
    },
    /// Why the target cannot run now.
    Problem(Problem),
}

impl ResolvedTarget {
    pub(crate) fn backend(&self) -> Option<&Arc<dyn Backend>> {
        match self {
            ResolvedTarget::Ready { backend, .. } => Some(backend),
            ResolvedTarget::Problem(_) => None,
        }
    }

    pub(crate) fn problem(&self) -> Option<&Problem> {
        match self {
            ResolvedTarget::Ready { .. } => None,
            ResolvedTarget::Problem(p) => Some(p),
        }
    }
}

/// The target's store, resolved through the DataStore watch cache (a GET only when the cache
/// has not seen it yet), or why the target cannot run now.
pub(crate) async fn resolve_target(
    ctx: &Context,
    namespace: &str,
    target: &Target,
) -> ResolvedTarget {
    resolve(ctx, namespace, target).await.unwrap_or_else(|e| {
        ResolvedTarget::Problem(Problem {
            reason: e.reason(),
            message: e.to_string(),
            category: e.category(),
        })
    })
}

async fn resolve(ctx: &Context, namespace: &str, target: &Target) -> Result<ResolvedTarget, Error> {
    let cached = ctx
        .caches
        .stores
        .get(&ObjectRef::<DataStore>::new(&target.store).within(namespace));
    let store = match cached {
        Some(store) => store,
        // Not in the cache yet (created a moment ago, or the watch is still listing): read it.
        None => Api::<DataStore>::namespaced(ctx.client.clone(), namespace)
            .get_opt(&target.store)
            .await
            .map_err(Error::Kube)?
            .map(Arc::new)
            .ok_or_else(|| Error::StoreNotFound(target.store.clone()))?,
    };
    let kind = store.spec.kind().ok_or_else(|| {
        Error::InvalidSpec(format!("DataStore {} names no store kind", target.store))
    })?;
    backends::validate_target(kind, target)?;
    let ready = store
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, "Ready"));
    // Not probed yet: Transient. Probed and not ready: the store said no (the DataStore's
    // condition says why); its next probe re-plans the policy.
    let problem = |reason: &'static str, message: String, transient: bool| {
        Ok(ResolvedTarget::Problem(Problem {
            reason,
            message,
            category: if transient {
                Category::Transient
            } else {
                Category::Refused
            },
        }))
    };
    match ready {
        None => {
            return problem(
                "StoreNotReady",
                format!("DataStore {} has not been probed yet", target.store),
                true,
            )
        }
        Some(c) if c.status == ConditionStatus::Unknown => {
            return problem(
                "StoreNotReady",
                format!("DataStore {} has not been probed yet", target.store),
                true,
            )
        }
        Some(c) if c.status == ConditionStatus::False => {
            return problem(
                "StoreNotReady",
                format!(
                    "DataStore {} is not ready: {}: {}",
                    target.store, c.reason, c.message
                ),
                false,
            )
        }
        Some(_) => {}
    }
    let spec = stores::connection_spec(&ctx.client, &store, &ctx.settings).await?;
    let store_key = format!("{namespace}/{}", target.store);
    let backend = ctx
        .engine
        .backend(&store_key, spec, store.spec.limits.clone());
    Ok(ResolvedTarget::Ready {
        backend,
        kind,
        store_key,
    })
}
