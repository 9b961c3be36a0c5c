//! Running the agent: what `main` calls once the configuration is read. It checks the
//! configuration against what the agent may grant (`checks`), builds the runtimes, the
//! credential check and the Kubernetes integrations (`build`), and serves the API until
//! shutdown.

mod build;
mod checks;

use build::{Built, build_auth, build_runtimes, start_kube_integrations};
pub use checks::agent_only_env;
use checks::{check_task_identity, check_task_policy, task_policy};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{api, limits, manager, runtime};

use crate::api::handlers::AppState;
use crate::api::server::{ServerOptions, TlsFiles};
use crate::config::{AuthMode, Config};
use crate::manager::{Manager, ManagerConfig};
use crate::task::store::Store;

/// Errors that stop the agent from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Manager(#[from] manager::ManagerError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How long in-flight requests may take to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Runs the agent until `shutdown` resolves. Tasks keep running after it returns; the next
/// start re-adopts them.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    match limits::raise_nofile() {
        Ok((before, after)) if before < after => {
            tracing::info!(before, after, "raised the open-file limit")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    runtime::reaper::start()?;
    // The one Kubernetes client (made on first use): every integration shares it; hand a
    // clone to any other component that talks to the API server.
    let kube = crate::kube::KubeClient::new(crate::kube::KubeTimeouts {
        watch: config.kube_watch_timeout,
    });
    // Credentials and certificates first: a misconfigured agent must not start at all.
    let auth = build_auth(&config, &kube).await?;
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(Arc::new(
            TlsFiles::load(cert, key).map_err(AppError::Config)?,
        )),
        _ => None,
    };
    check_task_identity(&config)?;
    check_task_policy(&config)?;
    let store = Store::open(&config.data_dir).map_err(|source| AppError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let Built {
        runtimes,
        container,
        sidecar,
    } = build_runtimes(&config, &kube).await?;
    let manager = Manager::new(
        store,
        runtimes,
        ManagerConfig {
            stop_grace: config.stop_grace_period,
            max_concurrent: (config.max_concurrent_tasks > 0)
                .then_some(config.max_concurrent_tasks),
            start_retry: config.start_retry_timeout,
            task_uids: config.task_uid_range,
            policy: task_policy(&config),
        },
    );
    manager.recover().await?;
    start_kube_integrations(&config, &kube, &manager, sidecar)?;

    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .map_err(|source| AppError::Bind {
            addr: config.listen_addr.to_string(),
            source,
        })?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        data_dir = %config.data_dir.display(),
        sidecar = config.enable_sidecar_mode,
        container = config.enable_container_mode,
        auth = ?config.auth_mode,
        tls = tls.is_some(),
        "task-executor listening"
    );
    if config.auth_mode == AuthMode::None && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "no authentication (--auth-mode=none): whoever reaches this address, the pod's own containers included, can run commands as the agent"
        );
    }
    let state = Arc::new(AppState {
        manager,
        auth,
        max_body: config.max_body_bytes,
        body_timeout: config.request_timeout,
        show_task_env: config.show_task_env,
    });
    let stop = CancellationToken::new();
    let stopping = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopping.cancel();
    });
    let options = ServerOptions {
        max_connections: config.max_connections.max(1),
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
        shutdown_grace: SHUTDOWN_GRACE,
        guarded: state.auth.required(),
    };
    api::server::serve(listener, api::routes(state), tls, options, stop).await;
    if let Some(c) = container {
        c.shutdown().await;
    }
    Ok(())
}
