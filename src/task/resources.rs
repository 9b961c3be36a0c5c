//! A task's compute resources in Kubernetes' `ResourceRequirements` shape: `limits` and
//! `requests` of `cpu` and `memory` as Kubernetes quantities (`"500m"`, `1`, `"64Mi"`,
//! `"1G"`), and the number of processes (threads) as `task-executor.io/pids`, a limit of
//! this agent's own (Kubernetes has no per-container pids resource; an extended resource
//! name carries its owner's domain).
//!
//! What each means is kubelet's: `limits.memory` is the most memory the task's cgroup
//! may hold (beyond it the kernel's OOM killer ends a process of the task, which then
//! reads `OOMKilled`, exit code 137), `limits.cpu` a CFS quota per 100 ms period,
//! `requests.cpu` a relative weight (`cpu.shares` / `cpu.weight`), `requests.memory`
//! reserves nothing (as kubelet without its MemoryQoS feature). A request without a limit
//! is its own; a limit without a request makes the request (as the API server defaults
//! it). Anything else is refused with a 400 naming the field: nothing a task asks for is
//! silently ignored.

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The agent's per-task pids resource (processes and threads, as the pids controller and
/// `RLIMIT_NPROC` count them).
pub const PIDS: &str = "task-executor.io/pids";
pub const CPU: &str = "cpu";
pub const MEMORY: &str = "memory";

/// The smallest memory limit: the task's supervisor runs in its cgroup too, and a few
/// pages of a shell are more than a smaller limit holds (Docker refuses below 6 MB).
pub const MIN_MEMORY_BYTES: u64 = 4 * 1024 * 1024;

/// Kubernetes' `ResourceRequirements` (without `claims`, which name pod resource claims a
/// task has none of).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRequirements {
    /// The most the task may use: `cpu`, `memory`, `task-executor.io/pids`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, Quantity>,
    /// What the task asks for: `cpu` (its CPU weight), `memory` (accepted; reserves
    /// nothing, as kubelet). Defaults to the limits.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, Quantity>,
}

/// A Kubernetes quantity as sent: a string (`"500m"`, `"64Mi"`) or a number (`1`, `0.5`),
/// kept as its text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quantity(pub String);

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a quantity: a string such as \"500m\" or \"64Mi\", or a number")
            }
            fn visit_str<E>(self, v: &str) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Quantity {
    fn schema_name() -> Cow<'static, str> {
        "Quantity".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A Kubernetes quantity: a number with an optional suffix (m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei, or an exponent e3), e.g. \"500m\", \"64Mi\", 1.",
            "x-kubernetes-int-or-string": true,
        })
    }
}

/// A quantity's value in thousandths, rounded up (as Kubernetes rounds a quantity more
/// precise than a thousandth), or why it is not one.
pub fn parse_milli(text: &str) -> Result<u128, String> {
    let bad = |why: &str| {
        format!("{text:?} is not a valid quantity ({why}); e.g. \"500m\", \"1\", \"64Mi\", \"1G\"")
    };
    let (neg, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        Some(_) => (false, text),
        None => return Err(bad("empty")),
    };
    let num_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(num_end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(bad("no number"));
    }
    // The number as an integer and a power of ten: 1.5 = 15e-1.
    let digits: String = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return Err(bad("too many digits"));
    }
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| bad("not a number"))?
    };
    let mut exp10: i32 = -(frac.len() as i32);
    let mut mult: u128 = 1;
    match suffix {
        "" => {}
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        "Ki" => mult = 1 << 10,
        "Mi" => mult = 1 << 20,
        "Gi" => mult = 1 << 30,
        "Ti" => mult = 1 << 40,
        "Pi" => mult = 1 << 50,
        "Ei" => mult = 1 << 60,
        s if s.starts_with(['e', 'E']) => {
            let e: i32 = s[1..]
                .parse()
                .map_err(|_| bad(&format!("unknown suffix {s:?}")))?;
            if !(-40..=40).contains(&e) {
                return Err(bad("exponent out of range"));
            }
            exp10 += e;
        }
        s => return Err(bad(&format!("unknown suffix {s:?}"))),
    }
    if neg && mantissa != 0 {
        return Err(format!("{text:?} is negative"));
    }
    // value * 1000 = mantissa * mult * 10^(exp10 + 3), rounded up.
    let too_large = || format!("{text:?} is too large");
    let exp = exp10 + 3;
    let scaled = mantissa.checked_mul(mult).ok_or_else(too_large)?;
    let milli = if exp >= 0 {
        let p = 10u128.checked_pow(exp as u32).ok_or_else(too_large)?;
        scaled.checked_mul(p).ok_or_else(too_large)?
    } else {
        match 10u128.checked_pow((-exp) as u32) {
            Some(p) => scaled.div_ceil(p),
            None => u128::from(scaled > 0),
        }
    };
    if milli > i64::MAX as u128 * 1000 {
        return Err(too_large());
    }
    Ok(milli)
}

/// What a task's `resources` ask for, in the units the kernel takes. `None`: not asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskLimits {
    pub memory_bytes: Option<u64>,
    /// `limits.cpu` in thousandths of a CPU.
    pub cpu_millis: Option<u64>,
    /// `requests.cpu` (else `limits.cpu`) in thousandths of a CPU: the task's CPU weight.
    pub cpu_request_millis: Option<u64>,
    /// `requests.memory` (else `limits.memory`): accepted, reserves nothing.
    pub memory_request_bytes: Option<u64>,
    pub pids: Option<u64>,
}

impl TaskLimits {
    /// Whether anything is asked for.
    pub fn is_empty(&self) -> bool {
        *self == TaskLimits::default()
    }

    /// Whether a CPU limit or weight is asked for.
    pub fn wants_cpu(&self) -> bool {
        self.cpu_millis.is_some() || self.cpu_request_millis.is_some()
    }
}

/// The path of entry `name` of a resource list at `at` (`process.resources.limits.cpu`,
/// `...limits[task-executor.io/pids]`), as Kubernetes writes such paths.
fn entry_path(at: &str, list: &str, name: &str) -> String {
    if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        format!("{at}.{list}.{name}")
    } else {
        format!("{at}.{list}[{name}]")
    }
}

impl ResourceRequirements {
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty() && self.requests.is_empty()
    }

    /// Checks the requirements (`at`: their path, for the 400's message) and returns what
    /// they ask for.
    pub fn resolve(&self, at: &str) -> Result<TaskLimits, String> {
        let mut out = TaskLimits::default();
        for (name, q) in &self.limits {
            let path = entry_path(at, "limits", name);
            let milli = parse_milli(&q.0).map_err(|e| format!("{path}: {e}"))?;
            if milli == 0 {
                return Err(format!("{path}: {:?} must be positive", q.0));
            }
            match name.as_str() {
                CPU => out.cpu_millis = Some(clamp(milli)),
                MEMORY => {
                    let bytes = clamp(milli.div_ceil(1000));
                    if bytes < MIN_MEMORY_BYTES {
                        return Err(format!(
                            "{path}: {:?} is below the smallest memory limit, 4Mi (the task's \
                             supervisor counts against it too)",
                            q.0
                        ));
                    }
                    out.memory_bytes = Some(bytes);
                }
                PIDS => {
                    if milli % 1000 != 0 {
                        return Err(format!("{path}: {:?} must be a whole number", q.0));
                    }
                    out.pids = Some(clamp(milli / 1000));
                }
                other => return Err(unsupported(&path, other, true)),
            }
        }
        for (name, q) in &self.requests {
            let path = entry_path(at, "requests", name);
            let milli = parse_milli(&q.0).map_err(|e| format!("{path}: {e}"))?;
            match name.as_str() {
                CPU => {
                    if let Some(limit) = out.cpu_millis
                        && clamp(milli) > limit
                    {
                        return Err(format!(
                            "{path}: {:?} must be less than or equal to the cpu limit ({:?})",
                            q.0, self.limits[CPU].0
                        ));
                    }
                    out.cpu_request_millis = Some(clamp(milli));
                }
                MEMORY => {
                    let bytes = clamp(milli.div_ceil(1000));
                    if let Some(limit) = out.memory_bytes
                        && bytes > limit
                    {
                        return Err(format!(
                            "{path}: {:?} must be less than or equal to the memory limit ({:?})",
                            q.0, self.limits[MEMORY].0
                        ));
                    }
                    out.memory_request_bytes = Some(bytes);
                }
                PIDS => {
                    return Err(format!("{path}: {PIDS} is a limit only; set it in limits"));
                }
                other => return Err(unsupported(&path, other, false)),
            }
        }
        // As the API server defaults a container's requests to its limits.
        out.cpu_request_millis = out.cpu_request_millis.or(out.cpu_millis);
        out.memory_request_bytes = out.memory_request_bytes.or(out.memory_bytes);
        Ok(out)
    }
}

fn clamp(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

fn unsupported(path: &str, name: &str, limit: bool) -> String {
    let supported = if limit {
        format!("{CPU}, {MEMORY}, {PIDS}")
    } else {
        format!("{CPU}, {MEMORY}")
    };
    format!(
        "{path}: resource {name:?} is not supported by the agent (it would not be enforced); \
         supported: {supported}"
    )
}

/// CPU shares for a CPU request, as kubelet computes them (`MilliCPUToShares`).
pub fn cpu_shares(request_millis: u64) -> u64 {
    (request_millis.saturating_mul(1024) / 1000).clamp(2, 262_144)
}

/// cgroup v2's `cpu.weight` for `shares`, as runc and kubelet convert them.
pub fn cpu_weight(shares: u64) -> u64 {
    1 + (shares.saturating_sub(2) * 9999) / 262_142
}

/// The CFS period a CPU limit is a quota of (kubelet's).
pub const CPU_PERIOD_US: u64 = 100_000;

/// The CFS quota for a CPU limit, per `CPU_PERIOD_US` (at least 1 ms, the kernel's least).
pub fn cpu_quota_us(limit_millis: u64) -> u64 {
    (limit_millis.saturating_mul(CPU_PERIOD_US) / 1000).max(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_as_kubernetes_reads_them() {
        let cases = [
            ("1", 1000),
            ("500m", 500),
            ("0.5", 500),
            (".5", 500),
            ("1.", 1000),
            ("2k", 2_000_000),
            ("64Mi", 64 * 1024 * 1024 * 1000),
            ("1G", 1_000_000_000_000),
            ("1Gi", (1u128 << 30) * 1000),
            ("1.5Gi", (3u128 << 29) * 1000),
            ("1e3", 1_000_000),
            ("1E-3", 1),
            ("0.1m", 1), // rounded up to a thousandth
            ("+3", 3000),
            ("0", 0),
            ("-0", 0),
            ("100Ki", 102_400_000),
        ];
        for (text, want) in cases {
            assert_eq!(parse_milli(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "m",
            "1x",
            "1 Gi",
            "abc",
            "1..2",
            "-1",
            "1mi",
            "1e",
            "1e99",
            "99999999999E",
        ] {
            assert!(parse_milli(bad).is_err(), "{bad:?}");
        }
    }

    fn req(limits: &[(&str, &str)], requests: &[(&str, &str)]) -> ResourceRequirements {
        let m = |l: &[(&str, &str)]| {
            l.iter()
                .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                .collect()
        };
        ResourceRequirements {
            limits: m(limits),
            requests: m(requests),
        }
    }

    #[test]
    fn requirements_resolve_to_kernel_units() {
        let r = req(&[("cpu", "250m"), ("memory", "64Mi"), (PIDS, "32")], &[]);
        assert_eq!(
            r.resolve("process.resources").unwrap(),
            TaskLimits {
                memory_bytes: Some(64 << 20),
                cpu_millis: Some(250),
                cpu_request_millis: Some(250),
                memory_request_bytes: Some(64 << 20),
                pids: Some(32),
            }
        );
        let r = req(&[("cpu", "2")], &[("cpu", "100m"), ("memory", "1Gi")]);
        let l = r.resolve("p").unwrap();
        assert_eq!(
            (l.cpu_millis, l.cpu_request_millis),
            (Some(2000), Some(100))
        );
        assert_eq!(
            (l.memory_bytes, l.memory_request_bytes),
            (None, Some(1 << 30))
        );
        assert!(req(&[], &[]).resolve("p").unwrap().is_empty());
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (
                req(&[("memory", "64Mx")], &[]),
                "process.resources.limits.memory: \"64Mx\" is not a valid quantity",
            ),
            (
                req(&[("cpu", "0")], &[]),
                "process.resources.limits.cpu: \"0\" must be positive",
            ),
            (
                req(&[(PIDS, "1.5")], &[]),
                "process.resources.limits[task-executor.io/pids]: \"1.5\" must be a whole number",
            ),
            (
                req(&[("memory", "1Mi")], &[]),
                "below the smallest memory limit",
            ),
            (
                req(&[("nvidia.com/gpu", "1")], &[]),
                "process.resources.limits[nvidia.com/gpu]: resource \"nvidia.com/gpu\" is not supported",
            ),
            (
                req(&[("ephemeral-storage", "1Gi")], &[]),
                "limits.ephemeral-storage: resource",
            ),
            (
                req(&[("cpu", "1")], &[("cpu", "2")]),
                "process.resources.requests.cpu: \"2\" must be less than or equal to the cpu limit (\"1\")",
            ),
            (req(&[], &[(PIDS, "3")]), "is a limit only"),
            (
                req(&[], &[("cpu", "-1")]),
                "requests.cpu: \"-1\" is negative",
            ),
        ];
        for (r, want) in cases {
            let e = r.resolve("process.resources").unwrap_err();
            assert!(e.contains(want), "{want}\n  got: {e}");
        }
    }

    #[test]
    fn numbers_and_strings_both_decode() {
        let r: ResourceRequirements =
            serde_json::from_str(r#"{"limits":{"cpu":1,"memory":"64Mi"},"requests":{"cpu":0.5}}"#)
                .unwrap();
        assert_eq!(r.limits["cpu"].0, "1");
        assert_eq!(r.requests["cpu"].0, "0.5");
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"limits":{"cpu":"1","memory":"64Mi"},"requests":{"cpu":"0.5"}}"#
        );
        assert!(serde_json::from_str::<ResourceRequirements>(r#"{"limits":{"cpu":[1]}}"#).is_err());
    }

    #[test]
    fn cpu_conversions_are_kubelets() {
        assert_eq!(cpu_shares(1000), 1024);
        assert_eq!(cpu_shares(1), 2);
        assert_eq!(cpu_weight(1024), 39);
        assert_eq!(cpu_weight(2), 1);
        assert_eq!(cpu_weight(262_144), 10_000);
        assert_eq!(cpu_quota_us(500), 50_000);
        assert_eq!(cpu_quota_us(1), 1000);
    }
}
