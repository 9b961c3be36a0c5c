//! Sidecar mode: a watch on the own Pod that reports when the main container is replaced
//! (new container ID or a higher restart count), so tasks in the old one end
//! `TargetRestarted`.

use ::kube::Api;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;

use super::KubeClient;
use super::pod::{MainContainer, main_container};
use super::watch_stream::watch_one;

/// Watches Pod `namespace/pod` and calls `on_replaced` each time its container `container`
/// is replaced. Runs in the background until the process ends; a dead connection is
/// noticed within the watch timeout plus 5 s (see `watch_stream`).
pub fn start<F>(
    client: KubeClient,
    namespace: String,
    pod: String,
    container: String,
    on_replaced: F,
) where
    F: Fn(&MainContainer) + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let api: Api<Pod> = Api::namespaced(client.wait("pod watch").await, &namespace);
        tracing::info!(namespace = %namespace, pod = %pod, "watching the own Pod");
        let mut pods = std::pin::pin!(watch_one(api, &pod, client.timeouts(), "pod"));
        let mut last: Option<MainContainer> = None;
        while let Some(seen) = pods.next().await {
            let Some(now) = seen.and_then(|p| main_container(&p, &container).ok()) else {
                continue;
            };
            if let Some(before) = &last
                && now.replaced(before)
            {
                tracing::info!(
                    container = %container,
                    from = %before.id.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                    to = %now.id.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                    restart_count = now.restart_count,
                    "main container replaced"
                );
                on_replaced(&now);
            }
            // An ID that vanished (status briefly without it) keeps the last known one.
            if now.id.is_some() || last.is_none() {
                last = Some(now);
            }
        }
    });
}
