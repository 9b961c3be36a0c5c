//! Who a process task runs as: its `securityContext` (Kubernetes' field names and
//! semantics for `runAsUser`, `runAsGroup`, `allowPrivilegeEscalation`) over the agent's
//! default (`--task-run-as-user`, host tasks only; a sidecar task starts from the main
//! container's identity).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Kubernetes' bound for `runAsUser` / `runAsGroup` (its API validation: 0..=2^31-1).
pub const MAX_ID: i64 = i32::MAX as i64;

/// The identity of a task's processes (a subset of Kubernetes' `SecurityContext`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    /// The uid the task runs as. Unset: a uid of its own from the agent's
    /// `--task-uid-range`, else its `--task-run-as-user` (host tasks), the main container's
    /// uid (sidecar tasks), else the agent's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub run_as_user: Option<i64>,
    /// The gid the task runs as. Unset: `runAsUser`'s number when that is set (never the
    /// root group by accident), else the default's gid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub run_as_group: Option<i64>,
    /// Whether the task may gain privileges (setuid binaries, file capabilities). Unset or
    /// false: the task runs with `no_new_privs` (unlike Kubernetes, whose default is true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_privilege_escalation: Option<bool>,
    /// The task's seccomp filter, in Kubernetes' shape: `RuntimeDefault` (the refusals of
    /// containerd's default profile) or `Unconfined`. Unset: `RuntimeDefault` under
    /// `--task-policy restricted`, else none. `Localhost` is not supported (a 400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp_profile: Option<SeccompProfile>,
}

/// Kubernetes' `SeccompProfile`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SeccompProfile {
    /// `RuntimeDefault`, `Unconfined` (or `Localhost`, refused).
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub localhost_profile: Option<String>,
}

impl SeccompProfile {
    pub fn is_unconfined(&self) -> bool {
        self.type_ == "Unconfined"
    }

    pub fn is_runtime_default(&self) -> bool {
        self.type_ == "RuntimeDefault"
    }
}

/// Identity overrides for a task's processes, as the shim applies them over its base
/// identity (its own on the host, the main container's inside it). An unset gid with a
/// set uid is the uid's number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunAs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

impl RunAs {
    /// `UID[:GID]` (`--task-run-as-user`); GID defaults to UID.
    pub fn parse_flag(s: &str) -> Result<RunAs, String> {
        let id = |v: &str| -> Result<u32, String> {
            v.parse::<u32>()
                .ok()
                .filter(|n| i64::from(*n) <= MAX_ID)
                .ok_or_else(|| format!("{v:?} is not a numeric id between 0 and {MAX_ID}"))
        };
        let (uid, gid) = match s.split_once(':') {
            Some((u, g)) => (id(u)?, id(g)?),
            None => (id(s)?, id(s)?),
        };
        Ok(RunAs {
            uid: Some(uid),
            gid: Some(gid),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.uid.is_none() && self.gid.is_none()
    }

    /// `overrides` over `self`: a uid set there brings its own gid (its `runAsGroup`, else
    /// its number), so a default's group never pairs with another user.
    pub fn overlaid(self, overrides: RunAs) -> RunAs {
        match overrides.uid {
            Some(_) => overrides,
            None => RunAs {
                uid: self.uid,
                gid: overrides.gid.or(self.gid),
            },
        }
    }

    /// The uid and gid over a base identity.
    pub fn apply(&self, base_uid: u32, base_gid: u32) -> (u32, u32) {
        let uid = self.uid.unwrap_or(base_uid);
        let gid = self
            .gid
            .unwrap_or(if self.uid.is_some() { uid } else { base_gid });
        (uid, gid)
    }
}

/// The uids of `--task-uid-range FIRST-LAST`: each host task gets one of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    /// `FIRST-LAST`, both within 1..=2^31-1 (0 is root; Kubernetes' bound above), FIRST
    /// not above LAST.
    pub fn parse_flag(s: &str) -> Result<UidRange, String> {
        let id = |v: &str| -> Result<u32, String> {
            v.parse::<u32>()
                .ok()
                .filter(|n| *n >= 1 && i64::from(*n) <= MAX_ID)
                .ok_or_else(|| format!("{v:?} is not a numeric uid between 1 and {MAX_ID}"))
        };
        let (first, last) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?}: expected FIRST-LAST, e.g. 100000-165535"))?;
        let (first, last) = (id(first)?, id(last)?);
        if first > last {
            return Err(format!("{s:?}: {first} is above {last}"));
        }
        Ok(UidRange { first, last })
    }

    /// How many uids it holds.
    pub fn size(&self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl SecurityContext {
    /// The identity overrides it asks for (checked by `validate` before).
    pub fn run_as(&self) -> RunAs {
        let id = |v: Option<i64>| v.and_then(|n| u32::try_from(n).ok());
        RunAs {
            uid: id(self.run_as_user),
            gid: id(self.run_as_group),
        }
    }

    /// `no_new_privs` unless the task asked for privilege escalation.
    pub fn no_new_privs(sc: Option<&SecurityContext>) -> bool {
        !sc.and_then(|s| s.allow_privilege_escalation)
            .unwrap_or(false)
    }

    /// Checks the ids as Kubernetes does; a message for a 400.
    pub fn validate(&self, what: &str) -> Result<(), String> {
        for (field, v) in [
            ("runAsUser", self.run_as_user),
            ("runAsGroup", self.run_as_group),
        ] {
            if let Some(n) = v
                && !(0..=MAX_ID).contains(&n)
            {
                return Err(format!(
                    "{what}.{field}: Invalid value: {n}: must be between 0 and {MAX_ID}, inclusive"
                ));
            }
        }
        if let Some(p) = &self.seccomp_profile {
            let at = format!("{what}.seccompProfile");
            match p.type_.as_str() {
                "RuntimeDefault" | "Unconfined" => {}
                "Localhost" => {
                    return Err(format!(
                        "{at}.type: Unsupported value: \"Localhost\": supported values: \"RuntimeDefault\", \"Unconfined\""
                    ));
                }
                other => {
                    return Err(format!(
                        "{at}.type: Unsupported value: {other:?}: supported values: \"RuntimeDefault\", \"Unconfined\""
                    ));
                }
            }
            if p.localhost_profile.is_some() {
                return Err(format!(
                    "{at}.localhostProfile: Forbidden: only with type Localhost"
                ));
            }
            // A filter without no_new_privs needs CAP_SYS_ADMIN, which tasks never get.
            if p.is_runtime_default() && self.allow_privilege_escalation == Some(true) {
                return Err(format!(
                    "{at}: Forbidden: RuntimeDefault needs allowPrivilegeEscalation unset or false (a seccomp filter implies no_new_privs)"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_takes_uid_and_optional_gid() {
        let both = RunAs {
            uid: Some(65534),
            gid: Some(65534),
        };
        assert_eq!(RunAs::parse_flag("65534"), Ok(both));
        let split = RunAs::parse_flag("1000:2000").unwrap();
        assert_eq!((split.uid, split.gid), (Some(1000), Some(2000)));
        for bad in ["", "nobody", "1000:", ":1", "-1", "4294967295", "1:2:3"] {
            assert!(RunAs::parse_flag(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_users_group_goes_with_the_user() {
        let default = RunAs::parse_flag("65534:65534").unwrap();
        let user = RunAs {
            uid: Some(1000),
            gid: None,
        };
        assert_eq!(default.overlaid(user).apply(0, 0), (1000, 1000));
        let group = RunAs {
            uid: None,
            gid: Some(7),
        };
        assert_eq!(default.overlaid(group).apply(0, 0), (65534, 7));
        assert_eq!(RunAs::default().overlaid(group).apply(5, 6), (5, 7));
        assert_eq!(RunAs::default().apply(5, 6), (5, 6));
    }

    #[test]
    fn the_uid_range_is_well_formed_and_never_root() {
        let r = UidRange::parse_flag("100000-165535").unwrap();
        assert_eq!((r.first, r.last, r.size()), (100000, 165535, 65536));
        assert!(r.contains(100000) && r.contains(165535) && !r.contains(99999));
        assert_eq!(UidRange::parse_flag("7-7").unwrap().size(), 1);
        assert_eq!(r.to_string(), "100000-165535");
        for bad in [
            "",
            "5",
            "0-10",
            "10-5",
            "1-2147483648",
            "a-b",
            "-1-5",
            "1-",
            "1-2-3",
        ] {
            assert!(UidRange::parse_flag(bad).is_err(), "{bad:?}");
        }
        assert!(UidRange::parse_flag("1-2147483647").is_ok());
    }

    #[test]
    fn ids_out_of_range_are_refused() {
        let sc = |u: i64| SecurityContext {
            run_as_user: Some(u),
            ..Default::default()
        };
        assert!(sc(0).validate("p").is_ok());
        assert!(sc(MAX_ID).validate("p").is_ok());
        let e = sc(-1).validate("process.securityContext").unwrap_err();
        assert_eq!(
            e,
            "process.securityContext.runAsUser: Invalid value: -1: must be between 0 and 2147483647, inclusive"
        );
        assert!(sc(MAX_ID + 1).validate("p").is_err());
        assert!(SecurityContext::no_new_privs(None));
        let allow = SecurityContext {
            allow_privilege_escalation: Some(true),
            ..Default::default()
        };
        assert!(!SecurityContext::no_new_privs(Some(&allow)));
    }
}
