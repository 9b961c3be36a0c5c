//! Configuration: every flag also reads its environment variable (flags win), with the
//! upstream names and defaults. Flags take Go's spellings as well (`go_flags`), as
//! upstream's deployments write them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};

pub mod go_flags;

use crate::task::identity::{RunAs, UidRange};
use crate::task::policy::PolicyLevel;
use go_flags::parse_go_bool;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Who may call the API (`--auth-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// No credential (upstream's behaviour; the BatchSandbox controller sends none).
    None,
    /// A bearer token listed in `--auth-token-file`.
    Token,
    /// A bearer token checked by TokenReview, the route by SubjectAccessReview.
    Kubernetes,
}

#[derive(Clone, Debug, Parser)]
#[command(
    name = "task-executor",
    version,
    about = "Runs short-lived tasks for a sandbox pod over a JSON HTTP API"
)]
pub struct Config {
    /// Directory for task state and logs.
    #[arg(long, env = "DATA_DIR", default_value = "/var/lib/sandbox/tasks")]
    pub data_dir: PathBuf,

    /// Address and port of the HTTP API.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:5758")]
    pub listen_addr: SocketAddr,

    /// Run process tasks inside the main container's namespaces.
    #[arg(long, env = "ENABLE_SIDECAR_MODE", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool)]
    pub enable_sidecar_mode: bool,

    /// The main container (Kubernetes container name, and the value of
    /// SANDBOX_MAIN_CONTAINER that upstream's env scan looks for).
    #[arg(long, env = "MAIN_CONTAINER_NAME", default_value = "main")]
    pub main_container_name: String,

    /// Run `spec.container` tasks as containers through CRI.
    #[arg(long, env = "ENABLE_CONTAINER_MODE", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool)]
    pub enable_container_mode: bool,

    /// CRI socket of the node's container runtime.
    #[arg(
        long,
        env = "CRI_SOCKET",
        default_value = "/var/run/containerd/containerd.sock"
    )]
    pub cri_socket: PathBuf,

    /// Fallback poll interval where no event source exists (container status without CRI
    /// events). Process tasks are event-driven and never polled.
    #[arg(long, env = "RECONCILE_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub reconcile_interval: Duration,

    /// Time between SIGTERM and SIGKILL when a task is deleted or times out.
    #[arg(long, env = "STOP_GRACE_PERIOD", default_value = "10s", value_parser = humantime::parse_duration)]
    pub stop_grace_period: Duration,

    /// Limit for a lifecycle hook that sets no positive `timeoutSeconds` (0: none, as
    /// upstream: such a hook runs until it ends).
    #[arg(long, env = "HOOK_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub hook_timeout: Duration,

    /// Time allowed to receive a request body (408 after it), like upstream's ReadTimeout.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Most tasks running at once (0: unlimited); more answer 429.
    #[arg(long, env = "MAX_CONCURRENT_TASKS", default_value_t = 0)]
    pub max_concurrent_tasks: usize,

    /// How long a task whose start failed for lack of processes, file descriptors, memory
    /// or disk is retried (it waits with reason ResourcesExhausted) before it fails.
    #[arg(long, env = "START_RETRY_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub start_retry_timeout: Duration,

    /// Log budget per task and stream (stdout, stderr), in bytes; older output rotates out.
    #[arg(long, env = "MAX_LOG_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_log_bytes: u64,

    /// Sidecar mode: also join the main container's cgroups (its limits and accounting).
    #[arg(long, env = "SIDECAR_JOIN_CGROUP", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool)]
    pub sidecar_join_cgroup: bool,

    /// Sidecar tasks run as the main container's uid, gid, groups and capabilities
    /// (false: as the agent, upstream's behaviour).
    #[arg(long, env = "SIDECAR_RUN_AS_TARGET_USER", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool)]
    pub sidecar_run_as_target_user: bool,

    /// Each process task gets a cgroup of its own (cgroup v2 with cgroup.kill, else the v1
    /// freezer) where the agent can make one, so everything of it ends with it, even after
    /// its supervisor died. false: no cgroups (tasks are ended by their process trees).
    #[arg(long, env = "TASK_CGROUPS", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool)]
    pub task_cgroups: bool,

    /// The most processes (threads) a process task may have at once, unless its
    /// `resources.limits["task-executor.io/pids"]` says (0: no limit). Held by the task's
    /// pids cgroup, else, for a task with a uid of its own, by RLIMIT_NPROC.
    #[arg(long, env = "TASK_PIDS_LIMIT", default_value_t = 4096)]
    pub task_pids_limit: u64,

    /// When a process task's main command exits, SIGKILL whatever it left running (its
    /// daemons), as runc ends a container when its init exits; its deadline
    /// (timeoutSeconds) then bounds all of it. false: what main left runs on until the
    /// task is deleted (upstream's behaviour).
    #[arg(long, env = "END_TASK_WITH_MAIN", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool)]
    pub end_task_with_main: bool,

    /// Answers show the values of tasks' environment variables (upstream's behaviour).
    /// false: only their names, so no caller of /getTasks reads another's secrets.
    #[arg(long, env = "SHOW_TASK_ENV", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool)]
    pub show_task_env: bool,

    /// Host tasks run as UID[:GID] (GID defaults to UID) unless their securityContext
    /// says otherwise. Unset: as the agent. Needs CAP_SETUID and CAP_SETGID.
    #[arg(long, env = "TASK_RUN_AS_USER", value_name = "UID[:GID]",
          value_parser = RunAs::parse_flag)]
    pub task_run_as_user: Option<RunAs>,

    /// Each host task runs as a uid of its own from FIRST-LAST (1..=2147483647), held
    /// until the task is deleted, unless its securityContext says otherwise; the gid is
    /// --task-run-as-user's, else the uid's number. At least --max-concurrent-tasks uids.
    /// Needs CAP_SETUID and CAP_SETGID.
    #[arg(long, env = "TASK_UID_RANGE", value_name = "FIRST-LAST",
          value_parser = UidRange::parse_flag)]
    pub task_uid_range: Option<UidRange>,

    /// What a request may ask for beyond the configured task identity and places:
    /// privileged (anything, upstream's behaviour), baseline (no other uid or gid than
    /// the configured task identity, no privilege escalation with one, container tasks
    /// confined to the allowlists and the main container), restricted (baseline, never
    /// root, never privilege escalation). See docs/security.md, "Task policy".
    #[arg(long, env = "TASK_POLICY", value_name = "LEVEL", default_value = "baseline",
          value_parser = PolicyLevel::parse_flag)]
    pub task_policy: PolicyLevel,

    /// Container mode: host directories a `podTemplateSpec` `hostPath` volume may name
    /// (at or below one of them). Empty (the default): none.
    #[arg(
        long,
        env = "TASK_HOST_PATH_ALLOW",
        value_name = "DIR",
        value_delimiter = ','
    )]
    pub task_host_path_allow: Vec<PathBuf>,

    /// Container mode: images a task may run: exact (`busybox`, any of its tags and
    /// digests), or a prefix ending in `/` (`registry.example/team/`). Empty: any.
    #[arg(
        long,
        env = "TASK_IMAGE_ALLOW",
        value_name = "IMAGE",
        value_delimiter = ','
    )]
    pub task_image_allow: Vec<String>,

    /// Container mode: map a volume name to a host path (NAME=HOSTPATH). In a pod
    /// (POD_NAME/POD_NAMESPACE set) the own Pod's volumes are known too; these entries win.
    #[arg(long = "volume", env = "VOLUMES", value_delimiter = ',')]
    pub volumes: Vec<String>,

    /// Watch Task custom resources addressed to this pod and run them.
    #[arg(long, env = "WATCH_TASKS", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool)]
    pub watch_tasks: bool,

    /// Each Kubernetes watch is renewed after this long (whole seconds); a watch connection
    /// silent for this plus 5 s is taken for dead and re-opened, and any other API request
    /// gives up after this plus 10 s without an answer.
    #[arg(long, env = "KUBE_WATCH_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub kube_watch_timeout: Duration,

    /// This pod's name (downward API); enables the Kubernetes integrations.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// This pod's namespace (downward API).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// Log filter (RUST_LOG syntax), e.g. "info" or "task_executor=debug".
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Who may call the API besides /health and /readyz: anyone (none), holders of a
    /// token from --auth-token-file (token), or callers the Kubernetes API authenticates
    /// and authorizes for the route (kubernetes).
    #[arg(long, env = "AUTH_MODE", value_enum, default_value_t = AuthMode::None)]
    pub auth_mode: AuthMode,

    /// Token mode: file of accepted bearer tokens, one a line (`#` comments); re-read
    /// when it changes.
    #[arg(long, env = "AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Serve HTTPS with this PEM certificate chain (with --tls-key-file); re-read when
    /// it changes.
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// The PEM private key of --tls-cert-file.
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// Connections open at once (each holds ~15 KiB); more are refused at once.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 8192)]
    pub max_connections: usize,

    /// Time a client has to send a request's header (from its first byte, or from the
    /// connection's opening); the connection is closed after it.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// A kept-alive connection with no request for this long is closed.
    #[arg(long, env = "IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
}

impl Config {
    /// Parses `--volume` entries.
    pub fn volume_map(&self) -> Result<Vec<(String, PathBuf)>, String> {
        self.volumes
            .iter()
            .filter(|v| !v.is_empty())
            .map(|v| match v.split_once('=') {
                Some((n, p)) if !n.is_empty() && p.starts_with('/') => {
                    Ok((n.to_string(), PathBuf::from(p)))
                }
                _ => Err(format!("--volume {v:?}: expected NAME=/absolute/host/path")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("task-executor").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn defaults_match_upstream() {
        let c = parse(&[]);
        assert_eq!(c.listen_addr.to_string(), "0.0.0.0:5758");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/sandbox/tasks"));
        assert_eq!(c.reconcile_interval, Duration::from_millis(500));
        assert_eq!(c.kube_watch_timeout, Duration::from_secs(60));
        assert!(!c.enable_sidecar_mode && !c.enable_container_mode);
        // No credential by default: the upstream controller sends none.
        assert_eq!(c.auth_mode, AuthMode::None);
        assert!(c.tls_cert_file.is_none());
        // Tasks run as the agent unless told otherwise; sidecar tasks as the container.
        assert_eq!(c.task_run_as_user, None);
        assert!(c.sidecar_run_as_target_user);
        assert_eq!(c.task_policy, PolicyLevel::Baseline);
        assert!(c.task_host_path_allow.is_empty() && c.task_image_allow.is_empty());
        assert_eq!(c.task_pids_limit, 4096);
    }

    #[test]
    fn task_policy_takes_the_three_levels() {
        let c = parse(&["--task-policy", "restricted", "--task-image-allow", "a,b/"]);
        assert_eq!(c.task_policy, PolicyLevel::Restricted);
        assert_eq!(c.task_image_allow, ["a", "b/"]);
        let e = Config::try_parse_from(["task-executor", "--task-policy", "none"]).unwrap_err();
        assert!(e.to_string().contains("--task-policy"), "{e}");
    }

    #[test]
    fn task_run_as_user_takes_uid_and_gid() {
        let c = parse(&["--task-run-as-user", "65534"]);
        assert_eq!(c.task_run_as_user, RunAs::parse_flag("65534:65534").ok());
        assert!(Config::try_parse_from(["task-executor", "--task-run-as-user", "nobody"]).is_err());
    }

    #[test]
    fn task_uid_range_takes_first_and_last() {
        assert_eq!(parse(&[]).task_uid_range, None);
        let c = parse(&["--task-uid-range", "100000-165535"]);
        assert_eq!(c.task_uid_range, UidRange::parse_flag("100000-165535").ok());
        for bad in ["165535-100000", "0-10", "100000"] {
            let e = Config::try_parse_from(["task-executor", "--task-uid-range", bad]).unwrap_err();
            assert!(e.to_string().contains("--task-uid-range"), "{e}");
        }
    }

    #[test]
    fn tls_needs_both_files() {
        let args = ["task-executor", "--tls-cert-file", "/c.pem"];
        assert!(Config::try_parse_from(args).is_err());
        let c = parse(&["--tls-cert-file", "/c.pem", "--tls-key-file", "/k.pem"]);
        assert_eq!(c.tls_key_file, Some(PathBuf::from("/k.pem")));
    }

    /// Every boolean flag, present and future, reads Go's spellings (`-name`, `-name=T`,
    /// `--name=0`): a flag declared with clap's own bool parser fails here.
    #[test]
    fn every_boolean_flag_reads_go_spellings() {
        use clap::CommandFactory;
        let cmd = Config::command();
        let bools: Vec<String> = cmd
            .get_arguments()
            .filter(|a| a.get_value_parser().type_id() == std::any::TypeId::of::<bool>())
            .filter_map(|a| a.get_long().map(String::from))
            .collect();
        assert!(bools.len() >= 5, "{bools:?}");
        for name in &bools {
            for (word, want) in [
                ("", true),
                ("=T", true),
                ("=1", true),
                ("=False", false),
                ("=0", false),
            ] {
                let argv = ["task-executor".to_string(), format!("-{name}{word}")];
                let m = cmd
                    .clone()
                    .try_get_matches_from(go_flags::normalise(&cmd, argv))
                    .unwrap_or_else(|e| panic!("-{name}{word}: {e}"));
                let id = cmd
                    .get_arguments()
                    .find(|a| a.get_long() == Some(name))
                    .unwrap()
                    .get_id();
                assert_eq!(m.get_one::<bool>(id.as_str()), Some(&want), "-{name}{word}");
            }
        }
    }

    /// Upstream's Pool sample and e2e command lines, word for word.
    #[test]
    fn upstream_command_lines_parse() {
        use clap::CommandFactory;
        let go = |args: &[&str]| {
            let argv = std::iter::once("task-executor").chain(args.iter().copied());
            Config::try_parse_from(go_flags::normalise(&Config::command(), argv)).unwrap()
        };
        let c = go(&["-listen-addr=0.0.0.0:5758"]);
        assert_eq!(c.listen_addr.to_string(), "0.0.0.0:5758");
        let c = go(&[
            "-enable-sidecar-mode=true",
            "-main-container-name=main",
            "-data-dir=/tmp/tasks",
        ]);
        assert!(c.enable_sidecar_mode);
        assert_eq!(c.main_container_name, "main");
        assert_eq!(c.data_dir, PathBuf::from("/tmp/tasks"));
        let c = go(&[
            "-data-dir",
            "/x",
            "-enable-container-mode",
            "-cri-socket",
            "/c.sock",
        ]);
        assert!(c.enable_container_mode);
        assert_eq!(c.cri_socket, PathBuf::from("/c.sock"));
    }

    #[test]
    fn booleans_take_bare_and_explicit_forms() {
        assert!(parse(&["--enable-sidecar-mode"]).enable_sidecar_mode);
        assert!(parse(&["--enable-sidecar-mode=true"]).enable_sidecar_mode);
        assert!(!parse(&["--enable-sidecar-mode=false"]).enable_sidecar_mode);
    }
}
