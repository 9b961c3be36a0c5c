//! Where a process task runs (`execMode`) and its lifecycle hooks (`lifecycle.preStart`,
//! `lifecycle.postStop`), in upstream's wire shape (OpenSandbox's `Process`, field for
//! field, so its JSON round-trips byte for byte).
//!
//! Defaults are upstream's (its pull request #420): a hook without `execMode` runs
//! `Local`; `execMode: ""` is unset (Go's zero value); a hook's `timeoutSeconds` unset,
//! zero or negative sets no limit (the agent's `--hook-timeout`, when given, applies
//! then).

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ExecMode {
    /// In the agent's own container (host mode).
    Local,
    /// Inside the pod's main container, as `--enable-sidecar-mode` runs every task.
    Remote,
}

impl ExecMode {
    /// Reads an optional `execMode` as upstream's Go agent does: absent, `null` and `""`
    /// (Go's zero value, which its `omitempty` never sends but a hand-written request
    /// may) are all unset; any other value must be `Local` or `Remote`.
    pub fn deserialize_optional<'de, D>(d: D) -> Result<Option<ExecMode>, D::Error>
    where
        D: serde::Deserializer<'de>,
    {
        match Option::<String>::deserialize(d)?.as_deref() {
            None | Some("") => Ok(None),
            Some("Local") => Ok(Some(ExecMode::Local)),
            Some("Remote") => Ok(Some(ExecMode::Remote)),
            Some(other) => Err(serde::de::Error::unknown_variant(
                other,
                &["Local", "Remote"],
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExecMode::Local => "Local",
            ExecMode::Remote => "Remote",
        }
    }
}

/// One of a task's two hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum HookName {
    #[serde(rename = "preStart")]
    PreStart,
    #[serde(rename = "postStop")]
    PostStop,
}

impl HookName {
    pub const ALL: [HookName; 2] = [HookName::PreStart, HookName::PostStop];

    /// As the spec spells it: `preStart`, `postStop`.
    pub fn as_str(self) -> &'static str {
        match self {
            HookName::PreStart => "preStart",
            HookName::PostStop => "postStop",
        }
    }

    /// The reason a task (and the hook's status) shows when this hook failed.
    pub fn failed_reason(self) -> &'static str {
        match self {
            HookName::PreStart => super::model::reason::PRE_START_HOOK_FAILED,
            HookName::PostStop => super::model::reason::POST_STOP_HOOK_FAILED,
        }
    }
}

/// Commands run around the task's main process.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    /// Runs to completion before the main command starts; if it fails, the main command
    /// never runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_start: Option<LifecycleHandler>,
    /// Runs after the main process has been stopped (exited, timed out or deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_stop: Option<LifecycleHandler>,
}

/// One hook.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleHandler {
    /// The command (required; optional on the wire only so that its absence gets a clear
    /// answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
    /// Where the hook runs; unset (or `""`): `Local`, as upstream's CRD defaults it,
    /// wherever the task's main command runs.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "ExecMode::deserialize_optional"
    )]
    pub exec_mode: Option<ExecMode>,
    /// The hook's whole tree is killed after this many seconds; unset, zero or negative:
    /// no limit (as upstream), unless the agent's `--hook-timeout` sets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
}

/// A command, exec'ed directly (no shell unless it names one).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExecAction {
    #[serde(default)]
    pub command: Vec<String>,
}

impl LifecycleHandler {
    /// How long the hook may run: its own positive `timeoutSeconds`, else `default` (the
    /// agent's `--hook-timeout`; `None`: no limit, as upstream has none).
    pub fn timeout(&self, default: Option<Duration>) -> Option<Duration> {
        match self.timeout_seconds {
            Some(secs) if secs > 0 => Some(Duration::from_secs(secs as u64)),
            _ => default,
        }
    }

    /// Where the hook runs: its own `execMode`, else `Local` (upstream's default, what
    /// its CRD declares), whatever the task's mode.
    pub fn exec_mode(&self) -> ExecMode {
        self.exec_mode.unwrap_or(ExecMode::Local)
    }

    /// The hook's argv (empty only for a hook that failed validation).
    pub fn command(&self) -> &[String] {
        self.exec.as_ref().map_or(&[], |e| e.command.as_slice())
    }

    fn validate(&self, what: &str) -> Result<(), String> {
        let Some(exec) = &self.exec else {
            return Err(format!(
                "{what}.exec is required (exec.command: the argv to run)"
            ));
        };
        match exec.command.first() {
            None => return Err(format!("{what}.exec.command must not be empty")),
            Some(c) if c.is_empty() => {
                return Err(format!("{what}.exec.command[0] must not be empty"));
            }
            Some(_) => {}
        }
        if exec.command.iter().any(|a| a.contains('\0')) {
            return Err(format!("{what}.exec.command must not contain NUL bytes"));
        }
        Ok(())
    }
}

impl Lifecycle {
    /// The hook of that name, if set.
    pub fn hook(&self, name: HookName) -> Option<&LifecycleHandler> {
        match name {
            HookName::PreStart => self.pre_start.as_ref(),
            HookName::PostStop => self.post_stop.as_ref(),
        }
    }

    /// True when at least one hook is set.
    pub fn has_hooks(&self) -> bool {
        self.pre_start.is_some() || self.post_stop.is_some()
    }

    /// Checks each hook; `what` is the lifecycle's path (`process.lifecycle`).
    pub fn validate(&self, what: &str) -> Result<(), String> {
        if let Some(h) = &self.pre_start {
            h.validate(&format!("{what}.preStart"))?;
        }
        if let Some(h) = &self.post_stop {
            h.validate(&format!("{what}.postStop"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(v: serde_json::Value) -> LifecycleHandler {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_and_checks() {
        let h = hook(serde_json::json!({"exec": {"command": ["true"]}}));
        assert_eq!(h.timeout(None), None, "no limit");
        let cap = Some(Duration::from_secs(7));
        assert_eq!(h.timeout(cap), cap, "the agent's --hook-timeout");
        assert_eq!(h.exec_mode(), ExecMode::Local, "upstream's default");
        assert_eq!(h.command(), ["true"]);
        assert!(h.validate("p").is_ok());
        for (t, want) in [(0, cap), (-3, cap), (5, Some(Duration::from_secs(5)))] {
            let h = hook(serde_json::json!({"exec": {"command": ["x"]}, "timeoutSeconds": t}));
            assert!(h.validate("p").is_ok(), "{t}");
            assert_eq!(h.timeout(cap), want, "{t}");
        }
        for (v, want) in [
            (serde_json::json!(""), None),
            (serde_json::json!(null), None),
            (serde_json::json!("Remote"), Some(ExecMode::Remote)),
        ] {
            let h = hook(serde_json::json!({"exec": {"command": ["x"]}, "execMode": v}));
            assert_eq!(h.exec_mode, want, "{v}");
        }
        let bad = [
            (serde_json::json!({}), "p.exec is required"),
            (
                serde_json::json!({"exec": {"command": []}}),
                "p.exec.command must not be empty",
            ),
            (
                serde_json::json!({"exec": {"command": [""]}}),
                "p.exec.command[0] must not be empty",
            ),
        ];
        for (v, want) in bad {
            let e = hook(v).validate("p").unwrap_err();
            assert!(e.starts_with(want), "{e}");
        }
        assert!(
            serde_json::from_value::<LifecycleHandler>(serde_json::json!({"execMode": "remote"}))
                .is_err()
        );
    }
}
