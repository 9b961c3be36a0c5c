//! The task policy (`--task-policy`): what a request may ask for beyond the identity and
//! places the operator configured. A request can only lower privilege, never raise it; a
//! request that asks for nothing runs as before (the configured task identity, else the
//! agent's own). Levels after Kubernetes' Pod Security Standards:
//!
//! - `privileged`: nothing is checked (upstream's behaviour).
//! - `baseline` (the default): with a task identity configured (`--task-run-as-user`,
//!   `--task-uid-range`) a task may not ask for another uid or gid, nor for privilege
//!   escalation; a `Remote` command keeps the main container's identity (no
//!   `runAsUser`/`runAsGroup`) when it runs as the main container's user; container tasks
//!   mount host paths only under `--task-host-path-allow`, run only images matching
//!   `--task-image-allow` (when set) and target only the main container.
//! - `restricted`: `baseline`, and never uid 0, never privilege escalation, never
//!   `seccompProfile: Unconfined` (`RuntimeDefault` is its default).
//!
//! Every refusal is a message for a 400 that names the field and the policy. Checks
//! needing the Pod (which of its volumes a container task may mount) live with the
//! container runtime.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use super::identity::{RunAs, UidRange};
use super::model::{ExecMode, HookName, TaskSpec};
use super::template::VolumeSource;

/// The level of the task policy (Kubernetes' Pod Security Standards' names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyLevel {
    Privileged,
    #[default]
    Baseline,
    Restricted,
}

impl PolicyLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyLevel::Privileged => "privileged",
            PolicyLevel::Baseline => "baseline",
            PolicyLevel::Restricted => "restricted",
        }
    }

    /// `--task-policy`: one of the three names.
    pub fn parse_flag(s: &str) -> Result<PolicyLevel, String> {
        match s {
            "privileged" => Ok(PolicyLevel::Privileged),
            "baseline" => Ok(PolicyLevel::Baseline),
            "restricted" => Ok(PolicyLevel::Restricted),
            _ => Err(format!(
                "{s:?}: expected privileged, baseline or restricted"
            )),
        }
    }
}

impl fmt::Display for PolicyLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The operator's policy and what it checks requests against.
#[derive(Clone, Debug, Default)]
pub struct TaskPolicy {
    pub level: PolicyLevel,
    /// `--task-run-as-user`.
    pub run_as: Option<RunAs>,
    /// `--task-uid-range`.
    pub uid_range: Option<UidRange>,
    /// `--sidecar-run-as-target-user`: `Remote` commands run as the main container's user.
    pub remote_runs_as_target: bool,
    /// `--main-container-name`: the only `targetContainer` allowed.
    pub main_container: String,
    /// `--task-host-path-allow`: host directories container tasks may mount (at or below).
    pub host_paths: Vec<PathBuf>,
    /// `--task-image-allow`: images container tasks may run; empty: any.
    pub images: Vec<String>,
}

impl TaskPolicy {
    /// Checks a new task against the policy; `exec_mode` is where its process runs
    /// (`None` for a container task). A message for a 400.
    pub fn check(&self, spec: &TaskSpec, exec_mode: Option<ExecMode>) -> Result<(), String> {
        if self.level == PolicyLevel::Privileged {
            return Ok(());
        }
        if let (Some(p), Some(mode)) = (&spec.process, exec_mode) {
            let mut modes = vec![mode];
            if let Some(l) = spec.lifecycle_hooks() {
                modes.extend(
                    HookName::ALL
                        .iter()
                        .filter_map(|h| l.hook(*h))
                        .map(|h| h.exec_mode()),
                );
            }
            if let Some(sc) = &p.security_context {
                self.check_identity(sc, &modes)?;
            }
        }
        if let Some(c) = &spec.container {
            self.check_image(&c.image, "spec.container.image")?;
            if let Some(t) = &c.target_container
                && *t != self.main_container
            {
                return Err(self.refusal(
                    "spec.container.targetContainer",
                    t,
                    &format!(
                        "only the main container {:?} may be targeted",
                        self.main_container
                    ),
                ));
            }
        }
        if let Some(t) = &spec.pod_template_spec
            && let Ok(task) = t.task()
        {
            self.check_image(
                &task.container.image,
                "spec.podTemplateSpec.spec.containers[0].image",
            )?;
            for v in &task.volumes {
                if let VolumeSource::HostPath { path, .. } = &v.source
                    && !self.host_path_allowed(Path::new(path))
                {
                    let allowed = if self.host_paths.is_empty() {
                        "no host path is allowed (--task-host-path-allow is empty)".to_string()
                    } else {
                        format!(
                            "host paths must be under --task-host-path-allow ({})",
                            self.host_paths
                                .iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    };
                    return Err(self.refusal(
                        &format!(
                            "spec.podTemplateSpec.spec.volumes[{:?}].hostPath.path",
                            v.name
                        ),
                        path,
                        &allowed,
                    ));
                }
            }
        }
        Ok(())
    }

    /// The identity rules of a process task's `securityContext`, for commands that run in
    /// `modes` (the main command's and its hooks').
    fn check_identity(
        &self,
        sc: &super::identity::SecurityContext,
        modes: &[ExecMode],
    ) -> Result<(), String> {
        const AT: &str = "spec.process.securityContext";
        let restricted = self.level == PolicyLevel::Restricted;
        let configured = self.run_as.is_some() || self.uid_range.is_some();
        if restricted {
            for (field, v) in [
                ("runAsUser", sc.run_as_user),
                ("runAsGroup", sc.run_as_group),
            ] {
                if v == Some(0) {
                    return Err(self.refusal(
                        &format!("{AT}.{field}"),
                        &0,
                        "tasks never run as root",
                    ));
                }
            }
        }
        if sc.allow_privilege_escalation == Some(true) && (restricted || configured) {
            let why = if restricted {
                "no task may gain privileges (setuid binaries, file capabilities)"
            } else {
                "a task may not gain privileges beyond the configured task identity"
            };
            return Err(self.refusal(&format!("{AT}.allowPrivilegeEscalation"), &true, why));
        }
        if restricted
            && sc
                .seccomp_profile
                .as_ref()
                .is_some_and(|p| p.is_unconfined())
        {
            return Err(self.refusal(
                &format!("{AT}.seccompProfile.type"),
                &"Unconfined",
                "every task has a seccomp filter",
            ));
        }
        if modes.contains(&ExecMode::Local) && configured {
            self.check_local_ids(sc)?;
        }
        if modes.contains(&ExecMode::Remote) && self.remote_runs_as_target {
            for (field, v) in [
                ("runAsUser", sc.run_as_user),
                ("runAsGroup", sc.run_as_group),
            ] {
                if let Some(v) = v {
                    return Err(self.refusal(
                        &format!("{AT}.{field}"),
                        &v,
                        "a command in the main container runs as the main container's user (--sidecar-run-as-target-user)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// With a configured task identity, a `Local` command may only ask for it.
    fn check_local_ids(&self, sc: &super::identity::SecurityContext) -> Result<(), String> {
        const AT: &str = "spec.process.securityContext";
        let configured_uid = self.run_as.and_then(|r| r.uid);
        let configured_gid = self.run_as.and_then(|r| r.gid);
        if let Some(uid) = sc.run_as_user {
            let why = match (self.uid_range, configured_uid) {
                (Some(r), _) => format!(
                    "each task runs as a uid of its own from --task-uid-range {r}; a task may not choose one"
                ),
                (None, Some(c)) if i64::from(c) != uid => format!(
                    "tasks run as --task-run-as-user's uid {c}; a task may ask only for that one"
                ),
                _ => String::new(),
            };
            if !why.is_empty() {
                return Err(self.refusal(&format!("{AT}.runAsUser"), &uid, &why));
            }
        }
        if let Some(gid) = sc.run_as_group
            && configured_gid.map(i64::from) != Some(gid)
        {
            let why = match configured_gid {
                Some(c) => format!(
                    "tasks run with --task-run-as-user's gid {c}; a task may ask only for that one"
                ),
                None => {
                    "each task runs with its uid's number as gid; a task may not choose one".into()
                }
            };
            return Err(self.refusal(&format!("{AT}.runAsGroup"), &gid, &why));
        }
        Ok(())
    }

    fn check_image(&self, image: &str, field: &str) -> Result<(), String> {
        if self.images.is_empty() || self.images.iter().any(|a| image_matches(a, image)) {
            return Ok(());
        }
        Err(self.refusal(
            field,
            &image,
            &format!(
                "images must match --task-image-allow ({})",
                self.images.join(", ")
            ),
        ))
    }

    /// At or below an allowed directory, spelt without `.`/`..` (the kernel would resolve
    /// those; the allowlist compares names).
    pub fn host_path_allowed(&self, path: &Path) -> bool {
        let plain = path.is_absolute()
            && path
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        plain && self.host_paths.iter().any(|a| path.starts_with(a))
    }

    fn refusal(&self, field: &str, value: &dyn fmt::Debug, why: &str) -> String {
        format!(
            "{field}: Forbidden: {value:?}: refused by the task policy {:?} (--task-policy): {why}",
            self.level.as_str()
        )
    }
}

/// An allowlist entry matches the image exactly, any tag or digest of it (`repo` matches
/// `repo:tag`, `repo@sha256:...`), or, ending in `/`, every image under that prefix.
pub fn image_matches(allowed: &str, image: &str) -> bool {
    if allowed.ends_with('/') {
        return image.starts_with(allowed) && image.len() > allowed.len();
    }
    image == allowed
        || image
            .strip_prefix(allowed)
            .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('@'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::identity::SecurityContext;
    use crate::task::model::ProcessSpec;

    fn task(sc: SecurityContext) -> TaskSpec {
        TaskSpec {
            process: Some(ProcessSpec {
                command: vec!["id".into()],
                security_context: Some(sc),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn uid(u: i64) -> SecurityContext {
        SecurityContext {
            run_as_user: Some(u),
            ..Default::default()
        }
    }

    fn ranged(level: PolicyLevel) -> TaskPolicy {
        TaskPolicy {
            level,
            run_as: RunAs::parse_flag("65534").ok(),
            uid_range: UidRange::parse_flag("300000-300100").ok(),
            main_container: "main".into(),
            ..Default::default()
        }
    }

    #[test]
    fn with_a_task_identity_a_task_cannot_choose_another() {
        let p = ranged(PolicyLevel::Baseline);
        let local = Some(ExecMode::Local);
        for u in [0, 1000, 300005, 65534] {
            let e = p.check(&task(uid(u)), local).unwrap_err();
            assert!(
                e.starts_with("spec.process.securityContext.runAsUser: Forbidden"),
                "{e}"
            );
            assert!(
                e.contains("\"baseline\"") && e.contains("--task-uid-range"),
                "{e}"
            );
        }
        assert!(p.check(&task(SecurityContext::default()), local).is_ok());
        let only_user = TaskPolicy {
            uid_range: None,
            ..p.clone()
        };
        assert!(only_user.check(&task(uid(65534)), local).is_ok());
        let e = only_user.check(&task(uid(0)), local).unwrap_err();
        assert!(e.contains("--task-run-as-user's uid 65534"), "{e}");
        let root_group = SecurityContext {
            run_as_group: Some(0),
            ..Default::default()
        };
        assert!(
            only_user
                .check(&task(root_group), local)
                .unwrap_err()
                .contains("runAsGroup")
        );
        let escalate = SecurityContext {
            allow_privilege_escalation: Some(true),
            ..Default::default()
        };
        let e = p.check(&task(escalate.clone()), local).unwrap_err();
        assert!(e.contains("allowPrivilegeEscalation"), "{e}");
        // Privileged: the operator allowed everything.
        assert!(
            ranged(PolicyLevel::Privileged)
                .check(&task(uid(0)), local)
                .is_ok()
        );
        // No identity configured, baseline: the agent's own identity is the limit.
        let open = TaskPolicy::default();
        assert!(open.check(&task(uid(0)), local).is_ok());
        assert!(open.check(&task(escalate.clone()), local).is_ok());
        let strict = TaskPolicy {
            level: PolicyLevel::Restricted,
            ..Default::default()
        };
        assert!(
            strict
                .check(&task(uid(0)), local)
                .unwrap_err()
                .contains("\"restricted\"")
        );
        assert!(strict.check(&task(escalate), local).is_err());
        assert!(strict.check(&task(uid(1000)), local).is_ok());
    }

    #[test]
    fn a_remote_command_keeps_the_main_containers_user() {
        let p = TaskPolicy {
            remote_runs_as_target: true,
            ..Default::default()
        };
        let e = p.check(&task(uid(0)), Some(ExecMode::Remote)).unwrap_err();
        assert!(e.contains("--sidecar-run-as-target-user"), "{e}");
        assert!(p.check(&task(uid(0)), Some(ExecMode::Local)).is_ok());
    }

    #[test]
    fn images_and_host_paths_match_as_documented() {
        assert!(image_matches("busybox", "busybox"));
        assert!(image_matches("busybox", "busybox:1.36"));
        assert!(image_matches("busybox", "busybox@sha256:ab"));
        assert!(!image_matches("busybox", "busyboxx"));
        assert!(image_matches("registry.local/", "registry.local/x:1"));
        assert!(!image_matches("registry.local/", "registry.localhost/x"));
        let p = TaskPolicy {
            host_paths: vec!["/srv/data".into()],
            ..Default::default()
        };
        assert!(p.host_path_allowed(Path::new("/srv/data")));
        assert!(p.host_path_allowed(Path::new("/srv/data/a")));
        assert!(!p.host_path_allowed(Path::new("/srv/database")));
        assert!(!p.host_path_allowed(Path::new("/srv/data/../../etc")));
        assert!(!TaskPolicy::default().host_path_allowed(Path::new("/")));
    }
}
