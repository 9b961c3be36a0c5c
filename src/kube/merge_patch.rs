//! JSON merge patches (RFC 7386) computed as a diff, for status writes.

use serde_json::{Map, Value};

/// The JSON merge patch (RFC 7386) that turns `old` into `new`: changed members, and `null`
/// for members `new` lacks (a merge patch would otherwise keep them, e.g. `state.running`
/// next to a new `state.terminated`).
pub fn merge_diff(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = Map::new();
            for (k, nv) in n {
                match o.get(k) {
                    Some(ov) if ov == nv => {}
                    Some(ov @ Value::Object(_)) if nv.is_object() => {
                        out.insert(k.clone(), merge_diff(ov, nv));
                    }
                    _ => {
                        out.insert(k.clone(), nv.clone());
                    }
                }
            }
            for k in o.keys() {
                if !n.contains_key(k) {
                    out.insert(k.clone(), Value::Null);
                }
            }
            Value::Object(out)
        }
        _ => new.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// RFC 7386 apply, to check that the diff round-trips.
    fn merge_apply(target: &Value, patch: &Value) -> Value {
        match patch {
            Value::Object(p) => {
                let mut t = match target {
                    Value::Object(t) => t.clone(),
                    _ => Map::new(),
                };
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        let cur = t.get(k).cloned().unwrap_or(Value::Null);
                        t.insert(k.clone(), merge_apply(&cur, v));
                    }
                }
                Value::Object(t)
            }
            _ => patch.clone(),
        }
    }

    #[test]
    fn merge_diff_replaces_the_state_member() {
        let old = json!({"phase": "Running", "state": {"running": {"startedAt": "x"}}, "observedGeneration": 1});
        let new = json!({"phase": "Failed", "exitCode": 3, "observedGeneration": 1,
                         "state": {"terminated": {"exitCode": 3, "reason": "Failed"}}});
        let d = merge_diff(&old, &new);
        assert_eq!(
            d,
            json!({"phase": "Failed", "exitCode": 3,
                   "state": {"terminated": {"exitCode": 3, "reason": "Failed"}, "running": null}})
        );
        assert_eq!(merge_apply(&old, &d), new);
        assert_eq!(merge_diff(&Value::Null, &new), new);
        assert_eq!(merge_diff(&new, &new), json!({}));
    }
}
