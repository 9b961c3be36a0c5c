//! What every watch of the agent shares: kube's `watcher` with its default backoff, one
//! timeout, and the one place a watch restart is observed.
//!
//! Half-open connections: the API server ends each watch after `timeoutSeconds` (the
//! `--kube-watch-timeout`), and kube's watcher treats a stream silent for that plus 5 s as
//! dead, drops it and watches again from its last resource version. So a connection that
//! stops delivering without closing (an API server restarted behind a load balancer, a
//! network blip) costs at most the watch timeout plus 5 s.

use std::fmt::Debug;

use ::kube::runtime::WatchStreamExt;
use ::kube::runtime::watcher::{self, Event, watcher};
use ::kube::{Api, Resource};
use futures::{Stream, StreamExt, future};
use serde::de::DeserializeOwned;

use super::client::KubeTimeouts;

/// Why a watch started over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// A fresh list (first start, or a resource version too old: 410 Gone).
    Relist,
    /// A list or watch request failed; kube retries with its default backoff.
    Failed,
}

impl Restart {
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::Relist => "relist",
            Restart::Failed => "failed",
        }
    }
}

/// The one place a watch restart is observed: logged and counted (`watch_restarts_total`).
pub fn watch_restarted(resource: &'static str, why: Restart) {
    tracing::debug!(resource, why = why.as_str(), "watch restarted");
    crate::metrics::watch_restarted(resource, why.as_str());
}

/// The watcher configuration of every watch: server-side timeout, bookmarks on.
pub fn config(timeouts: KubeTimeouts) -> watcher::Config {
    watcher::Config::default().timeout(timeouts.watch_secs())
}

/// kube's `watcher` with its default backoff (client-go's: 0.8 s doubling to 30 s, with
/// jitter), reporting restarts and logging failures (the first at warn, repeats at debug).
pub fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    resource: &'static str,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut failures = 0u32;
    watcher(api, config)
        .default_backoff()
        .inspect(move |ev| match ev {
            Ok(ev) => {
                if matches!(ev, Event::Init) {
                    watch_restarted(resource, Restart::Relist);
                }
                if failures > 0 && !matches!(ev, Event::Init | Event::InitApply(_)) {
                    tracing::info!(resource, "watch works again");
                    failures = 0;
                }
            }
            // Expired resource version (history compacted): kube lists again, as it should.
            Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                tracing::debug!(resource, message = %s.message, "resource version expired; listing again");
            }
            Err(e) => {
                failures += 1;
                watch_restarted(resource, Restart::Failed);
                if failures == 1 {
                    tracing::warn!(resource, error = %e, "watch failed; retrying with backoff");
                } else {
                    tracing::debug!(resource, error = %e, failures, "watch failed again");
                }
            }
        })
}

/// One named object: `Some` when it is listed, added or modified, `None` when it is deleted
/// or missing from a list. This is kube's `watch_object`, which fixes its watcher
/// configuration; here the watch gets the agent's timeout, so the half-open bound holds for
/// it too. Errors are logged by [`watch`] and left out.
pub fn watch_one<K>(
    api: Api<K>,
    name: &str,
    timeouts: KubeTimeouts,
    resource: &'static str,
) -> impl Stream<Item = Option<K>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let config = config(timeouts).fields(&format!("metadata.name={name}"));
    watch(api, config, resource)
        .scan(false, |seen, ev| {
            // Whether the object was in the current list, as watch_object tracks it.
            match &ev {
                Ok(Event::Init) => *seen = false,
                Ok(Event::InitApply(_)) => *seen = true,
                _ => {}
            }
            future::ready(Some((*seen, ev)))
        })
        .filter_map(|(seen, ev)| {
            future::ready(match ev {
                Ok(Event::Apply(o) | Event::InitApply(o)) => Some(Some(o)),
                Ok(Event::Delete(_)) => Some(None),
                Ok(Event::InitDone) if !seen => Some(None),
                Ok(Event::Init | Event::InitDone) | Err(_) => None,
            })
        })
}
