//! List, then watch from the list's resource version; re-list whenever the watch ends,
//! fails, or the API server answers 410 Gone. Every list delivers the complete set, so a
//! consumer reconciles missed events (deletions included) from it.

use std::fmt::Debug;
use std::time::Duration;

use ::kube::api::{ListParams, WatchEvent, WatchParams};
use ::kube::{Api, Resource, ResourceExt};
use futures::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

/// What a list-watch loop reports.
#[derive(Debug)]
pub enum Event<K> {
    /// Every object that matches, as of a fresh list.
    Listed(Vec<K>),
    /// Added or modified.
    Applied(K),
    Deleted(K),
}

/// Selector and timing of a list-watch loop.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub labels: Option<String>,
    pub fields: Option<String>,
}

/// Longest a single watch request stays open before the loop re-lists.
const WATCH_TIMEOUT_SECS: u32 = 290;
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs the loop until the receiver is dropped.
pub fn spawn<K>(api: Api<K>, selector: Selector, what: &'static str) -> mpsc::Receiver<Event<K>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run(api, selector, what, tx));
    rx
}

async fn run<K>(api: Api<K>, selector: Selector, what: &'static str, tx: mpsc::Sender<Event<K>>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut lp = ListParams::default();
    let mut wp = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
    if let Some(l) = &selector.labels {
        lp = lp.labels(l);
        wp = wp.labels(l);
    }
    if let Some(f) = &selector.fields {
        lp = lp.fields(f);
        wp = wp.fields(f);
    }
    let mut backoff = MIN_BACKOFF;
    let mut failures = 0u32;
    loop {
        if failures > 0 {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        let list = match api.list(&lp).await {
            Ok(l) => l,
            Err(e) => {
                failures += 1;
                // First failure at warn, repeats at debug: a down API server must not flood.
                if failures == 1 {
                    tracing::warn!(resource = what, error = %e, "list failed; retrying");
                } else {
                    tracing::debug!(resource = what, error = %e, failures, "list failed again");
                }
                continue;
            }
        };
        if failures > 0 {
            tracing::info!(resource = what, "list succeeded again");
        }
        failures = 0;
        backoff = MIN_BACKOFF;
        let mut rv = list.metadata.resource_version.clone().unwrap_or_default();
        if tx.send(Event::Listed(list.items)).await.is_err() {
            return;
        }
        let stream = match api.watch(&wp, &rv).await {
            Ok(s) => s,
            Err(::kube::Error::Api(s)) if s.code == 410 => {
                tracing::info!(resource = what, "watch: resource version gone; re-listing");
                continue;
            }
            Err(e) => {
                tracing::warn!(resource = what, error = %e, "watch failed; re-listing");
                failures = 1;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream.into_stream());
        let ended = loop {
            match stream.next().await {
                None => break "watch ended",
                Some(Err(e)) => {
                    tracing::warn!(resource = what, error = %e, "watch stream failed; re-listing");
                    break "watch failed";
                }
                Some(Ok(WatchEvent::Added(o) | WatchEvent::Modified(o))) => {
                    if let Some(v) = o.resource_version() {
                        rv = v;
                    }
                    if tx.send(Event::Applied(o)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(WatchEvent::Deleted(o))) => {
                    if let Some(v) = o.resource_version() {
                        rv = v;
                    }
                    if tx.send(Event::Deleted(o)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(WatchEvent::Bookmark(b))) => rv = b.metadata.resource_version,
                Some(Ok(WatchEvent::Error(s))) if s.code == 410 => break "resource version gone",
                Some(Ok(WatchEvent::Error(s))) => {
                    tracing::warn!(resource = what, code = s.code, message = %s.message, "watch error");
                    break "watch error";
                }
            }
        };
        tracing::debug!(resource = what, why = ended, resource_version = %rv, "re-listing");
    }
}
