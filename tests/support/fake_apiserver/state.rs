//! The fake's store: objects under opaque resource versions, their history for watches,
//! and the writes the API server takes (create, merge patch, JSON patch, apply, delete).

use serde_json::{Value, json};
use warp::http::StatusCode;

use super::{
    Key, Kind, State, failure, group, invalid, matches, not_found, now, patches, rv, watch_line,
};

/// The metadata fields the API server drops when empty (`omitempty`).
fn normalize(obj: &mut Value) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in ["finalizers", "labels", "annotations", "managedFields"] {
            let empty = match m.get(field) {
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::Object(o)) => o.is_empty(),
                Some(Value::Null) => true,
                _ => false,
            };
            if empty {
                m.remove(field);
            }
        }
    }
}

impl State {
    /// Stores `obj` under a new resource version and tells the watchers.
    pub(super) fn store(&mut self, key: Key, mut obj: Value, event: &'static str) {
        self.seq += 1;
        let seq = self.seq;
        obj["metadata"]["resourceVersion"] = json!(rv(seq));
        if obj["metadata"]["uid"].is_null() {
            self.uid_seq += 1;
            obj["metadata"]["uid"] =
                json!(format!("00000000-0000-4000-8000-{:012x}", self.uid_seq));
        }
        if obj["metadata"]["creationTimestamp"].is_null() {
            obj["metadata"]["creationTimestamp"] = json!(now());
        }
        normalize(&mut obj);
        if event == "DELETED" {
            self.objects.remove(&key);
            self.applied.retain(|(k, _, _), _| *k != key);
        } else {
            self.objects.insert(key.clone(), obj.clone());
        }
        self.history
            .push((seq, key.0, key.1.clone(), event, obj.clone()));
        let line = watch_line(event, &obj);
        self.watchers.retain(|w| {
            if w.stalled {
                return true;
            }
            if w.kind != key.0 || w.ns != key.1 || !matches(&obj, &w.labels, w.name.as_deref()) {
                return !w.tx.is_closed();
            }
            w.tx.send(line.clone()).is_ok()
        });
    }

    pub(super) fn create(&mut self, kind: Kind, mut obj: Value) -> (StatusCode, Value) {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
            return invalid("metadata.name: Required value: name or generateName is required");
        };
        let key = (kind, ns.clone(), name.clone());
        if self.objects.contains_key(&key) {
            return failure(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!(
                    "{}.{} \"{name}\" already exists",
                    kind.resource(),
                    group(kind)
                ),
            );
        }
        obj["metadata"]["namespace"] = json!(ns);
        if kind == Kind::Tasks {
            obj["metadata"]["generation"] = json!(1);
            if let Some(m) = obj.as_object_mut() {
                m.remove("status"); // the status subresource: ignored on create
            }
        }
        self.store(key.clone(), obj, "ADDED");
        (StatusCode::CREATED, self.objects[&key].clone())
    }

    /// Stores a patched object: bumps the generation on a spec change, and removes an
    /// object that is being deleted and has no finalizers left.
    pub(super) fn commit(
        &mut self,
        key: Key,
        before: &Value,
        mut obj: Value,
    ) -> (StatusCode, Value) {
        normalize(&mut obj);
        if obj == *before {
            return (StatusCode::OK, obj); // no change: no new resource version
        }
        if obj["spec"] != before["spec"] {
            let g = before["metadata"]["generation"].as_i64().unwrap_or(1);
            obj["metadata"]["generation"] = json!(g + 1);
        }
        let finalizers_empty = obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        if !obj["metadata"]["deletionTimestamp"].is_null() && finalizers_empty {
            self.store(key.clone(), obj, "DELETED");
            let gone = self.history.last().map(|h| h.4.clone()).unwrap_or_default();
            return (StatusCode::OK, gone);
        }
        self.store(key.clone(), obj, "MODIFIED");
        (StatusCode::OK, self.objects[&key].clone())
    }

    pub(super) fn merge_patch(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        status_sub: bool,
        patch: &Value,
    ) -> (StatusCode, Value) {
        let key = (kind, ns.to_string(), name.to_string());
        let Some(before) = self.objects.get(&key).cloned() else {
            return not_found(kind, name);
        };
        let mut patch = patch.clone();
        if let Some(want) = patch["metadata"]["resourceVersion"].as_str()
            && before["metadata"]["resourceVersion"].as_str() != Some(want)
        {
            return conflict(kind, name);
        }
        // (`get_mut`, not `patch["metadata"]`: indexing would insert a `null` that deletes
        // the whole metadata.)
        if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        let mut obj = before.clone();
        if status_sub {
            // The status subresource changes only .status.
            let s = patch.get("status").cloned().unwrap_or(Value::Null);
            let mut cur = obj.get("status").cloned().unwrap_or(Value::Null);
            patches::merge(&mut cur, &s);
            obj["status"] = cur;
        } else {
            if kind == Kind::Tasks
                && let Some(m) = patch.as_object_mut()
            {
                m.remove("status"); // the main resource ignores status changes
            }
            patches::merge(&mut obj, &patch);
        }
        self.commit(key, &before, obj)
    }

    pub(super) fn json_patch(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        status_sub: bool,
        ops: &Value,
    ) -> (StatusCode, Value) {
        let key = (kind, ns.to_string(), name.to_string());
        let Some(before) = self.objects.get(&key).cloned() else {
            return not_found(kind, name);
        };
        let mut obj = before.clone();
        if let Err(why) = patches::json_patch(&mut obj, ops) {
            return invalid(&format!(
                "the server rejected our request due to an error in our request: {why}"
            ));
        }
        // A subresource keeps only its part of the change; the main resource not the status.
        if status_sub {
            let status = obj["status"].clone();
            obj = before.clone();
            obj["status"] = status;
        } else if kind == Kind::Tasks {
            obj["status"] = before["status"].clone();
            if before.get("status").is_none()
                && let Some(m) = obj.as_object_mut()
            {
                m.remove("status");
            }
        }
        self.commit(key, &before, obj)
    }

    /// Server-side apply of `config` by `manager`.
    pub(super) fn apply(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        status_sub: bool,
        manager: &str,
        config: &Value,
    ) -> (StatusCode, Value) {
        if config["apiVersion"].as_str() != Some(kind.api_version())
            || config["kind"].as_str() != Some(kind.kind())
        {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!(
                    "apply: apiVersion and kind must be {} {}",
                    kind.api_version(),
                    kind.kind()
                ),
            );
        }
        if let Some(n) = config["metadata"]["name"].as_str()
            && n != name
        {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the name of the object does not match the name on the URL",
            );
        }
        let key = (kind, ns.to_string(), name.to_string());
        // A subresource is never created by apply.
        let Some(before) = self.objects.get(&key).cloned() else {
            return not_found(kind, name);
        };
        let part = if status_sub { "status" } else { "spec" };
        let applied_key = (key.clone(), manager.to_string(), status_sub);
        let previous = self.applied.get(&applied_key).cloned();
        let mut obj = before.clone();
        let mut target = obj.get(part).cloned().unwrap_or(Value::Null);
        let new_part = config.get(part).cloned().unwrap_or(json!({}));
        patches::apply(
            &mut target,
            previous.as_ref().and_then(|p| p.get(part)),
            &new_part,
        );
        obj[part] = target;
        // One managedFields entry per manager and subresource.
        let mut managed: Vec<Value> = obj["metadata"]["managedFields"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let subresource = if status_sub { "status" } else { "" };
        let fields = patches::fields_v1(&json!({ part: new_part }));
        let mine = |m: &Value| {
            m["manager"] == manager
                && m["operation"] == "Apply"
                && m["subresource"].as_str().unwrap_or("") == subresource
        };
        if obj[part] == before[part] && managed.iter().any(|m| mine(m) && m["fieldsV1"] == fields) {
            // A no-op apply changes nothing, not even the resource version.
            self.applied.insert(applied_key, config.clone());
            return (StatusCode::OK, before);
        }
        managed.retain(|m| !mine(m));
        let mut entry = json!({
            "manager": manager, "operation": "Apply", "apiVersion": kind.api_version(),
            "time": now(), "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        });
        if status_sub {
            entry["subresource"] = json!("status");
        }
        managed.push(entry);
        obj["metadata"]["managedFields"] = Value::Array(managed);
        self.applied.insert(applied_key, config.clone());
        self.commit(key, &before, obj)
    }

    pub(super) fn delete(&mut self, kind: Kind, ns: &str, name: &str) -> (StatusCode, Value) {
        let key = (kind, ns.to_string(), name.to_string());
        let Some(mut obj) = self.objects.get(&key).cloned() else {
            return not_found(kind, name);
        };
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                self.store(key.clone(), obj, "MODIFIED");
            }
            return (StatusCode::OK, self.objects[&key].clone());
        }
        self.store(key, obj.clone(), "DELETED");
        (StatusCode::OK, obj)
    }
}

pub(super) fn conflict(kind: Kind, name: &str) -> (StatusCode, Value) {
    failure(
        StatusCode::CONFLICT,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            kind.resource(),
            group(kind)
        ),
    )
}
