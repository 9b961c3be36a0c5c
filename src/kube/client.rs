//! The agent's one Kubernetes client, shared by every integration (own Pod, sidecar
//! lookup, Pod watch, Task watch, events, and any other component handed a clone).
//!
//! It is made on first use, so an agent outside a cluster, or one whose service account
//! token is not mounted yet, starts and serves; a failed attempt is retried on the next use.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;

use super::KubeError;

/// How long the agent waits on the API server (`--kube-watch-timeout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KubeTimeouts {
    /// The server ends each watch request after this long and the watch is resumed from its
    /// last resource version. A watch silent for this plus kube's 5 s margin is taken for a
    /// dead (half-open) connection, dropped and re-opened.
    pub watch: Duration,
}

/// Added to the watch timeout for the client's read timeout: a healthy watch is never
/// silent for longer than the watch timeout (the server ends it then), so the read timeout
/// only ever fires on a dead connection, after kube's own idle check had its turn.
const READ_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

impl KubeTimeouts {
    /// The watch timeout in whole seconds, as the API's `timeoutSeconds` takes it (at least 1).
    pub fn watch_secs(&self) -> u32 {
        let secs = self.watch.as_secs() + u64::from(self.watch.subsec_nanos() > 0);
        u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
    }

    /// Longest any response may stay silent: bounds every request, not only watches.
    pub fn read(&self) -> Duration {
        Duration::from_secs(u64::from(self.watch_secs())) + READ_TIMEOUT_MARGIN
    }
}

impl Default for KubeTimeouts {
    fn default() -> Self {
        KubeTimeouts {
            watch: Duration::from_secs(60),
        }
    }
}

/// A cheap-to-clone handle on the one client. `get` infers the configuration (in-cluster
/// service account, else `KUBECONFIG` / `~/.kube/config`) once and returns clones of it.
#[derive(Clone)]
pub struct KubeClient {
    cell: Arc<OnceCell<::kube::Client>>,
    timeouts: KubeTimeouts,
}

impl KubeClient {
    pub fn new(timeouts: KubeTimeouts) -> Self {
        KubeClient {
            cell: Arc::new(OnceCell::new()),
            timeouts,
        }
    }

    /// A client made from `client` (tests: a mock service or a fixed URL).
    pub fn from_client(client: ::kube::Client, timeouts: KubeTimeouts) -> Self {
        KubeClient {
            cell: Arc::new(OnceCell::new_with(Some(client))),
            timeouts,
        }
    }

    pub fn timeouts(&self) -> KubeTimeouts {
        self.timeouts
    }

    /// The client; the first successful call builds it, later calls clone it.
    pub async fn get(&self) -> Result<::kube::Client, KubeError> {
        let timeouts = self.timeouts;
        self.cell
            .get_or_try_init(|| async move {
                let mut config = ::kube::Config::infer()
                    .await
                    .map_err(|e| KubeError::Config(e.to_string()))?;
                config.read_timeout = Some(timeouts.read());
                // The timeout counts from the request, not from when a pooled connection
                // went idle.
                config.reset_reader_on_write = true;
                let client = ::kube::Client::try_from(config)?;
                tracing::info!("kubernetes client ready");
                Ok(client)
            })
            .await
            .cloned()
    }

    /// The client, retrying every 5 s until it can be made (for background loops).
    pub async fn wait(&self, what: &'static str) -> ::kube::Client {
        let mut attempts = 0u32;
        loop {
            match self.get().await {
                Ok(c) => return c,
                Err(e) => {
                    attempts += 1;
                    if attempts == 1 {
                        tracing::warn!(integration = what, error = %e, "no kubernetes client yet; retrying every 5s");
                    } else {
                        tracing::debug!(integration = what, error = %e, attempts, "still no kubernetes client");
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_in_whole_seconds_and_a_read_bound_beyond_the_watch() {
        let t = |ms| KubeTimeouts {
            watch: Duration::from_millis(ms),
        };
        assert_eq!(t(60_000).watch_secs(), 60);
        assert_eq!(t(1_500).watch_secs(), 2);
        assert_eq!(t(0).watch_secs(), 1);
        assert_eq!(t(60_000).read(), Duration::from_secs(70));
        assert_eq!(KubeTimeouts::default().watch, Duration::from_secs(60));
    }
}
