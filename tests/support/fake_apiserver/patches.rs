//! The three patch kinds the API server takes for custom resources, as it applies them:
//! JSON merge patch (RFC 7386), JSON patch (RFC 6902, with the apiserver's json-patch
//! library's reading of `test` against a missing member), and server-side apply for one
//! field manager (fields it applied before and leaves out now are removed; conflicts
//! between managers are not modelled: the agent is the only writer of a Task's status).

use serde_json::{Map, Value, json};

/// RFC 7386.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// RFC 6902 `add`, `remove`, `replace`, `test`. An error names what failed.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch is an array of operations")?;
    for op in ops {
        let kind = op["op"].as_str().ok_or("operation without \"op\"")?;
        let path = op["path"].as_str().ok_or("operation without \"path\"")?;
        let tokens = pointer_tokens(path)?;
        match kind {
            "test" => {
                // The apiserver's library: a missing member equals null.
                let have = resolve(doc, &tokens).cloned().unwrap_or(Value::Null);
                if have != op["value"] {
                    return Err(format!("testing value {path} failed"));
                }
            }
            "add" | "replace" => {
                let value = op
                    .get("value")
                    .ok_or("add/replace without \"value\"")?
                    .clone();
                let (parent, last) = parent_mut(doc, &tokens)?;
                match parent {
                    Value::Object(m) => {
                        if kind == "replace" && !m.contains_key(&last) {
                            return Err(format!(
                                "replace operation does not apply: doc is missing key: {path}"
                            ));
                        }
                        m.insert(last, value);
                    }
                    Value::Array(a) => {
                        let at = if last == "-" {
                            a.len()
                        } else {
                            last.parse::<usize>()
                                .map_err(|_| format!("bad index in {path}"))?
                        };
                        if kind == "replace" {
                            *a.get_mut(at).ok_or(format!("no element {path}"))? = value;
                        } else if at <= a.len() {
                            a.insert(at, value);
                        } else {
                            return Err(format!("index out of range: {path}"));
                        }
                    }
                    _ => return Err(format!("add operation does not apply: {path}")),
                }
            }
            "remove" => {
                let (parent, last) = parent_mut(doc, &tokens)?;
                let removed = match parent {
                    Value::Object(m) => m.remove(&last).is_some(),
                    Value::Array(a) => match last.parse::<usize>() {
                        Ok(i) if i < a.len() => {
                            a.remove(i);
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                };
                if !removed {
                    return Err(format!(
                        "remove operation does not apply: doc is missing path: {path}"
                    ));
                }
            }
            other => return Err(format!("unsupported operation {other:?}")),
        }
    }
    Ok(())
}

fn pointer_tokens(path: &str) -> Result<Vec<String>, String> {
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("bad JSON pointer {path:?}"))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn resolve<'a>(doc: &'a Value, tokens: &[String]) -> Option<&'a Value> {
    tokens.iter().try_fold(doc, |v, t| match v {
        Value::Object(m) => m.get(t),
        Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

fn parent_mut<'a>(
    doc: &'a mut Value,
    tokens: &[String],
) -> Result<(&'a mut Value, String), String> {
    let (last, init) = tokens.split_last().ok_or("empty path")?;
    let mut cur = doc;
    for t in init {
        cur = match cur {
            Value::Object(m) => m.get_mut(t),
            Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("doc is missing path: /{}", tokens.join("/")))?;
    }
    Ok((cur, last.clone()))
}

/// Server-side apply of `config` onto `target` for a manager that last applied `previous`.
pub fn apply(target: &mut Value, previous: Option<&Value>, config: &Value) {
    if let Some(prev) = previous {
        remove_dropped(target, prev, config);
    }
    merge_config(target, config);
}

/// Removes what `previous` set and `config` no longer sets.
fn remove_dropped(target: &mut Value, previous: &Value, config: &Value) {
    let (Value::Object(t), Value::Object(p)) = (target, previous) else {
        return;
    };
    for (k, pv) in p {
        match config.get(k) {
            None => {
                t.remove(k);
            }
            Some(cv) if pv.is_object() && cv.is_object() => {
                if let Some(tv) = t.get_mut(k) {
                    remove_dropped(tv, pv, cv);
                }
            }
            Some(_) => {}
        }
    }
}

/// Objects merge member by member; anything else (lists too: atomic here) is replaced.
fn merge_config(target: &mut Value, config: &Value) {
    match config {
        Value::Object(c) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in c {
                merge_config(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        _ => *target = config.clone(),
    }
}

/// The `fieldsV1` of a managedFields entry for `config` (`f:` per member, `{}` at leaves).
pub fn fields_v1(config: &Value) -> Value {
    match config {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (format!("f:{k}"), fields_v1(v)))
                .collect(),
        ),
        _ => json!({}),
    }
}
