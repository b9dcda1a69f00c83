//! The install manifests (`config/default`) are accepted by a real API server.

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use serde::Deserialize;

use crate::support::ControlPlane;

#[tokio::test]
async fn config_default_applies_server_side() {
    let plane = ControlPlane::get();
    let rendered = plane
        .kubectl()
        .args([
            "kustomize",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/default"),
        ])
        .output()
        .expect("cannot run kubectl");
    assert!(
        rendered.status.success(),
        "kubectl kustomize config/default failed: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let manifests = String::from_utf8(rendered.stdout).unwrap();

    // A dry run creates nothing, so the namespaced objects need the namespace for real.
    let namespaces: Api<Namespace> = Api::all(plane.client());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some("tombstone-system".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("cannot create namespace tombstone-system: {e}"),
    }

    let applied = plane.kubectl_with_input(
        &[
            "apply",
            "--server-side",
            // Other tests may have installed the CRDs with their own field manager.
            "--force-conflicts",
            "--dry-run=server",
            "-f",
            "-",
        ],
        &manifests,
    );
    let report = String::from_utf8_lossy(&applied.stdout);
    assert!(
        applied.status.success(),
        "kubectl apply --dry-run=server refused config/default:\n{report}{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // Every rendered object was applied.
    let mut count = 0;
    for document in serde_yaml::Deserializer::from_str(&manifests) {
        let object = serde_yaml::Value::deserialize(document).unwrap();
        let kind = object["kind"].as_str().unwrap().to_lowercase();
        let name = object["metadata"]["name"].as_str().unwrap();
        assert!(
            report.lines().any(|l| l.starts_with(&kind)
                && l.contains(&format!("/{name} "))
                && l.ends_with("(server dry run)")),
            "{kind} {name} missing from kubectl's report:\n{report}"
        );
        count += 1;
    }
    assert!(count >= 8, "config/default renders only {count} objects");
}
