//! The stand-in's object store: resourceVersions, uids, preconditions, graceful pod
//! deletion and a watch history, following the API server's documented semantics.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::selector::{FieldSelector, LabelSelector};

/// A resource the stand-in serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceDef {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Field selectors beyond metadata.name and metadata.namespace.
    pub fields: &'static [&'static str],
    /// A custom resource with the status subresource: the main resource's writes leave
    /// `status` alone and bump `metadata.generation` when the spec changes; `/status`
    /// writes change only `status`.
    pub status_subresource: bool,
    /// A custom resource's `openAPIV3Schema`: its `x-kubernetes-validations` (CEL, the
    /// transition rules included) are enforced on create and update as the API server does.
    pub schema: Option<CrdSchema>,
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_string() } else { format!("{}/{}", self.group, self.version) }
    }
    /// `pods`, `leases.coordination.k8s.io`: how the API server names a resource in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.to_string() } else { format!("{}.{}", self.plural, self.group) }
    }
}

pub const RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
        fields: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        status_subresource: false,
        schema: None,
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "persistentvolumeclaims",
        kind: "PersistentVolumeClaim",
        namespaced: true,
        fields: &[],
        status_subresource: false,
        schema: None,
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "persistentvolumes",
        kind: "PersistentVolume",
        namespaced: false,
        fields: &[],
        status_subresource: false,
        schema: None,
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        fields: &["status.phase"],
        status_subresource: false,
        schema: None,
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        fields: &["spec.unschedulable"],
        status_subresource: false,
        schema: None,
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        fields: &[
            "involvedObject.kind",
            "involvedObject.name",
            "involvedObject.namespace",
            "involvedObject.uid",
            "reason",
            "type",
            "source",
        ],
        status_subresource: false,
        schema: None,
    },
    ResourceDef {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        fields: &["regarding.kind", "regarding.name", "regarding.namespace", "regarding.uid", "reason", "type", "reportingController"],
        status_subresource: false,
        schema: None,
    },
    ResourceDef {
        group: "apps",
        version: "v1",
        plural: "statefulsets",
        kind: "StatefulSet",
        namespaced: true,
        fields: &[],
        status_subresource: false,
        schema: None,
    },
    ResourceDef {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        fields: &[],
        status_subresource: false,
        schema: None,
    },
    ResourceDef {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        fields: &[],
        status_subresource: false,
        schema: None,
    },
    ResourceDef {
        group: "etcd-medic.io",
        version: "v1alpha1",
        plural: "etcdremediations",
        kind: "EtcdRemediation",
        namespaced: true,
        fields: &[],
        status_subresource: true,
        schema: Some(CrdSchema::EtcdRemediation),
    },
    ResourceDef {
        group: "etcd-medic.io",
        version: "v1alpha1",
        plural: "etcdrecoveries",
        kind: "EtcdRecovery",
        namespaced: true,
        fields: &[],
        status_subresource: true,
        schema: Some(CrdSchema::EtcdRecovery),
    },
];

/// The custom resources the stand-in serves with their CRD's schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrdSchema {
    EtcdRemediation,
    EtcdRecovery,
}

impl CrdSchema {
    fn value(self) -> Value {
        use kube::CustomResourceExt;
        let crd = match self {
            CrdSchema::EtcdRemediation => serde_json::to_value(etcd_medic_client::crd::EtcdRemediation::crd()),
            CrdSchema::EtcdRecovery => serde_json::to_value(etcd_medic_client::recovery::EtcdRecovery::crd()),
        };
        crd.expect("a CRD serializes")["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }
}

/// The CEL rules of `res`'s schema on `obj` (`old`: the stored object, for an update): a
/// failure is a 422 `Invalid` naming the rule's message, as the API server answers.
fn check_rules(res: &ResourceDef, obj: &Value, old: Option<&Value>) -> Result<(), ApiError> {
    let Some(schema) = res.schema else { return Ok(()) };
    kube_cel::validate(&schema.value(), obj, old).map_err(|errors| {
        let name = meta_str(obj, "name").unwrap_or_default().to_string();
        let said: Vec<String> = errors.into_iter().map(|e| format!("{}: Invalid value: {}", e.field_path, e.message)).collect();
        ApiError::invalid(res, &name, said.join(", "))
    })
}

pub fn find_resource(group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// A failure as the API server reports it: a `Status` object with `code` and `reason`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into(), details: Value::Null }
    }
    fn with_details(mut self, res: &ResourceDef, name: &str) -> Self {
        let mut d = json!({"name": name, "kind": res.plural});
        if !res.group.is_empty() {
            d["group"] = json!(res.group);
        }
        self.details = d;
        self
    }
    pub fn not_found(res: &ResourceDef, name: &str) -> Self {
        ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", res.qualified())).with_details(res, name)
    }
    pub fn already_exists(res: &ResourceDef, name: &str) -> Self {
        ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", res.qualified())).with_details(res, name)
    }
    pub fn conflict(res: &ResourceDef, name: &str, why: &str) -> Self {
        ApiError::new(409, "Conflict", format!("Operation cannot be fulfilled on {} \"{name}\": {why}", res.qualified()))
            .with_details(res, name)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }
    pub fn invalid(res: &ResourceDef, name: &str, message: impl Into<String>) -> Self {
        ApiError::new(422, "Invalid", format!("{} \"{name}\" is invalid: {}", res.kind, message.into())).with_details(res, name)
    }
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        });
        if !self.details.is_null() {
            s["details"] = self.details.clone();
        }
        s
    }
}

/// A change, as a watch delivers it.
#[derive(Clone, Debug)]
pub struct Change {
    pub resource: &'static ResourceDef,
    pub kind: ChangeKind,
    pub object: Value,
    pub rv: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "ADDED",
            ChangeKind::Modified => "MODIFIED",
            ChangeKind::Deleted => "DELETED",
        }
    }
}

type Key = (String, String, String); // (qualified resource, namespace, name)

struct Inner {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Change>,
}

/// How far back a watch can resume; older resourceVersions get `410 Gone` as on a real server.
const HISTORY: usize = 20_000;

pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Change>,
}

/// What DELETE did: pods on a node are only marked (the kubelet finishes the delete).
#[derive(Debug)]
pub enum Deleted {
    Gone(Value),
    Marked(Value),
}

pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata").and_then(|m| m.get(field)).and_then(Value::as_str)
}

/// What a write to a resource with the status subresource keeps, as the API server does for
/// custom resources: a write of the object keeps the stored status and bumps
/// `metadata.generation` when the spec changed; a write of `/status` keeps everything but
/// the status (labels and annotations included).
fn split_status(current: &Value, obj: &mut Value, status: bool) {
    if status {
        let new_status = obj.get("status").cloned();
        let rv = obj["metadata"].get("resourceVersion").cloned();
        *obj = current.clone();
        match new_status {
            Some(s) => obj["status"] = s,
            None => {
                if let Some(o) = obj.as_object_mut() {
                    o.remove("status");
                }
            }
        }
        if let Some(rv) = rv {
            obj["metadata"]["resourceVersion"] = rv;
        }
        return;
    }
    match current.get("status") {
        Some(s) => obj["status"] = s.clone(),
        None => {
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
        }
    }
    let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
    let changed = current.get("spec") != obj.get("spec");
    obj["metadata"]["generation"] = json!(if changed { generation + 1 } else { generation });
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl Default for Store {
    fn default() -> Self {
        Store { inner: Mutex::new(Inner { objects: BTreeMap::new(), rv: 1, history: VecDeque::new() }), tx: broadcast::channel(4096).0 }
    }
}

impl Store {
    fn key(res: &ResourceDef, ns: &str, name: &str) -> Key {
        (res.qualified(), if res.namespaced { ns.to_string() } else { String::new() }, name.to_string())
    }

    fn record(&self, inner: &mut Inner, resource: &'static ResourceDef, kind: ChangeKind, object: Value) {
        let change = Change { resource, kind, object, rv: inner.rv };
        inner.history.push_back(change.clone());
        if inner.history.len() > HISTORY {
            inner.history.pop_front();
        }
        let _ = self.tx.send(change);
    }

    fn bump(inner: &mut Inner, obj: &mut Value) {
        inner.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    }

    pub fn current_rv(&self) -> u64 {
        self.inner.lock().unwrap().rv
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }

    /// Changes after `rv`, or `410 Gone` when history no longer reaches back that far.
    pub fn changes_since(&self, rv: u64) -> Result<Vec<Change>, ApiError> {
        let inner = self.inner.lock().unwrap();
        if let Some(oldest) = inner.history.front()
            && rv + 1 < oldest.rv
            && inner.history.len() >= HISTORY
        {
            return Err(ApiError::new(410, "Expired", format!("too old resource version: {rv} ({})", oldest.rv)));
        }
        Ok(inner.history.iter().filter(|c| c.rv > rv).cloned().collect())
    }

    pub fn create(&self, res: &'static ResourceDef, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        let mut name = meta_str(&obj, "name").unwrap_or_default().to_string();
        if name.is_empty() {
            match meta_str(&obj, "generateName") {
                Some(prefix) => name = format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..5]),
                None => return Err(ApiError::invalid(res, "", "metadata.name: Required value: name or generateName is required")),
            }
        }
        if res.namespaced && ns.is_empty() {
            return Err(ApiError::bad_request("the namespace of the provided object does not match the namespace sent on the request"));
        }
        if let Some(body_ns) = meta_str(&obj, "namespace")
            && res.namespaced
            && !body_ns.is_empty()
            && body_ns != ns
        {
            return Err(ApiError::bad_request("the namespace of the provided object does not match the namespace sent on the request"));
        }
        let mut inner = self.inner.lock().unwrap();
        let key = Self::key(res, ns, &name);
        if inner.objects.contains_key(&key) {
            return Err(ApiError::already_exists(res, &name));
        }
        obj["apiVersion"] = json!(res.api_version());
        obj["kind"] = json!(res.kind);
        let meta = &mut obj["metadata"];
        meta["name"] = json!(name);
        if res.namespaced {
            meta["namespace"] = json!(ns);
        }
        meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
        meta["creationTimestamp"] = json!(now_rfc3339());
        if res.status_subresource {
            // A custom resource with a status subresource: the status of a create is dropped.
            meta["generation"] = json!(1);
        }
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
        }
        if res.status_subresource
            && let Some(o) = obj.as_object_mut()
        {
            o.remove("status");
        }
        check_rules(res, &obj, None)?;
        Self::bump(&mut inner, &mut obj);
        inner.objects.insert(key, obj.clone());
        self.record(&mut inner, res, ChangeKind::Added, obj.clone());
        Ok(obj)
    }

    pub fn get(&self, res: &ResourceDef, ns: &str, name: &str) -> Result<Value, ApiError> {
        let inner = self.inner.lock().unwrap();
        inner.objects.get(&Self::key(res, ns, name)).cloned().ok_or_else(|| ApiError::not_found(res, name))
    }

    /// Objects of `res` in `ns` (all namespaces when `None`), and the list's resourceVersion.
    pub fn list(&self, res: &ResourceDef, ns: Option<&str>, labels: &LabelSelector, fields: &FieldSelector) -> (Vec<Value>, u64) {
        let inner = self.inner.lock().unwrap();
        let q = res.qualified();
        let items = inner
            .objects
            .iter()
            .filter(|((r, n, _), _)| *r == q && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
            .filter(|v| labels.matches(v) && fields.matches(v))
            .cloned()
            .collect();
        (items, inner.rv)
    }

    /// PUT: the body's resourceVersion must be the stored one (optimistic concurrency).
    pub fn update(&self, res: &'static ResourceDef, ns: &str, name: &str, obj: Value) -> Result<Value, ApiError> {
        self.update_part(res, ns, name, obj, false)
    }

    /// PUT of the object (`status: false`) or of its `/status` subresource.
    pub fn update_part(&self, res: &'static ResourceDef, ns: &str, name: &str, mut obj: Value, status: bool) -> Result<Value, ApiError> {
        if meta_str(&obj, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request("the name of the object does not match the name on the URL"));
        }
        let mut inner = self.inner.lock().unwrap();
        let key = Self::key(res, ns, name);
        let Some(current) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(res, name));
        };
        match meta_str(&obj, "resourceVersion") {
            None | Some("") => {
                return Err(ApiError::invalid(res, name, "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"));
            }
            Some(rv) if Some(rv) != meta_str(&current, "resourceVersion") => {
                return Err(ApiError::conflict(
                    res,
                    name,
                    "the object has been modified; please apply your changes to the latest version and try again",
                ));
            }
            _ => {}
        }
        if let Some(uid) = meta_str(&obj, "uid")
            && Some(uid) != meta_str(&current, "uid")
        {
            return Err(ApiError::conflict(res, name, "Precondition failed: UID in precondition does not match the object"));
        }
        self.replace_locked(&mut inner, res, key, &current, &mut obj, Some(status))?;
        Ok(obj)
    }

    /// Stores `obj` in place of `current`; `part` is the API's write (`Some(true)`: of
    /// `/status`), `None` the lab's own.
    fn replace_locked(
        &self,
        inner: &mut Inner,
        res: &'static ResourceDef,
        key: Key,
        current: &Value,
        obj: &mut Value,
        part: Option<bool>,
    ) -> Result<(), ApiError> {
        if let Some(status) = part
            && res.status_subresource
        {
            split_status(current, obj, status);
        }
        if part.is_some() {
            check_rules(res, obj, Some(current))?;
        }
        obj["apiVersion"] = json!(res.api_version());
        obj["kind"] = json!(res.kind);
        for f in ["uid", "creationTimestamp", "namespace", "name", "deletionTimestamp"] {
            if let Some(v) = current["metadata"].get(f) {
                obj["metadata"][f] = v.clone();
            }
        }
        Self::bump(inner, obj);
        inner.objects.insert(key, obj.clone());
        self.record(inner, res, ChangeKind::Modified, obj.clone());
        Ok(())
    }

    /// PATCH with merge semantics (JSON merge and, for the maps and scalars the agent
    /// sends, strategic merge). A resourceVersion in the patch is a precondition.
    pub fn patch(&self, res: &'static ResourceDef, ns: &str, name: &str, patch: &Value) -> Result<Value, ApiError> {
        self.patch_part(res, ns, name, patch, false)
    }

    /// PATCH of the object (`status: false`) or of its `/status` subresource.
    pub fn patch_part(&self, res: &'static ResourceDef, ns: &str, name: &str, patch: &Value, status: bool) -> Result<Value, ApiError> {
        let mut inner = self.inner.lock().unwrap();
        let key = Self::key(res, ns, name);
        let Some(current) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(res, name));
        };
        if let Some(rv) = meta_str(patch, "resourceVersion")
            && Some(rv) != meta_str(&current, "resourceVersion")
        {
            return Err(ApiError::conflict(
                res,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        // A UID in the patch is a precondition, as the API server takes it.
        if let Some(uid) = meta_str(patch, "uid")
            && Some(uid) != meta_str(&current, "uid")
        {
            let why =
                format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {}", meta_str(&current, "uid").unwrap_or(""));
            return Err(ApiError::conflict(res, name, &why));
        }
        let mut obj = current.clone();
        merge_patch(&mut obj, patch);
        self.replace_locked(&mut inner, res, key, &current, &mut obj, Some(status))?;
        Ok(obj)
    }

    /// In-process change by the lab (the kubelet and controllers of the simulator): no
    /// resourceVersion check, like a controller that retries on conflict.
    pub fn modify(&self, res: &'static ResourceDef, ns: &str, name: &str, f: impl FnOnce(&mut Value)) -> Result<Value, ApiError> {
        let mut inner = self.inner.lock().unwrap();
        let key = Self::key(res, ns, name);
        let Some(current) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(res, name));
        };
        let mut obj = current.clone();
        f(&mut obj);
        if obj == current {
            return Ok(obj);
        }
        // The lab's own changes write the whole object, status included.
        self.replace_locked(&mut inner, res, key, &current, &mut obj, None).expect("the lab's own writes are not judged");
        Ok(obj)
    }

    /// DELETE with `preconditions.uid` / `preconditions.resourceVersion` (409 on mismatch).
    /// A pod bound to a node with a grace period is only marked with a deletionTimestamp:
    /// its kubelet stops the containers and then calls [`Store::finalize`].
    pub fn delete(&self, res: &'static ResourceDef, ns: &str, name: &str, opts: &Value) -> Result<Deleted, ApiError> {
        let mut inner = self.inner.lock().unwrap();
        let key = Self::key(res, ns, name);
        let Some(current) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(res, name));
        };
        if let Some(uid) = opts.pointer("/preconditions/uid").and_then(Value::as_str) {
            let actual = meta_str(&current, "uid").unwrap_or_default();
            if uid != actual {
                return Err(ApiError::conflict(
                    res,
                    name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}"),
                ));
            }
        }
        if let Some(rv) = opts.pointer("/preconditions/resourceVersion").and_then(Value::as_str) {
            let actual = meta_str(&current, "resourceVersion").unwrap_or_default();
            if rv != actual {
                return Err(ApiError::conflict(
                    res,
                    name,
                    &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {actual}"),
                ));
            }
        }
        let grace = opts.get("gracePeriodSeconds").and_then(Value::as_i64);
        let on_node = current.pointer("/spec/nodeName").and_then(Value::as_str).is_some_and(|n| !n.is_empty());
        if res.plural == "pods" && on_node && grace != Some(0) {
            if current["metadata"].get("deletionTimestamp").is_some() {
                return Ok(Deleted::Marked(current));
            }
            let mut obj = current.clone();
            obj["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
            obj["metadata"]["deletionGracePeriodSeconds"] = json!(grace.unwrap_or(30));
            Self::bump(&mut inner, &mut obj);
            inner.objects.insert(key, obj.clone());
            self.record(&mut inner, res, ChangeKind::Modified, obj.clone());
            return Ok(Deleted::Marked(obj));
        }
        inner.objects.remove(&key);
        let mut obj = current;
        Self::bump(&mut inner, &mut obj);
        self.record(&mut inner, res, ChangeKind::Deleted, obj.clone());
        Ok(Deleted::Gone(obj))
    }

    /// The kubelet's last word on a terminating pod: the object goes away.
    pub fn finalize(&self, res: &'static ResourceDef, ns: &str, name: &str, uid: &str) -> Result<(), ApiError> {
        let mut inner = self.inner.lock().unwrap();
        let key = Self::key(res, ns, name);
        match inner.objects.get(&key) {
            Some(o) if meta_str(o, "uid") == Some(uid) => {
                let mut obj = inner.objects.remove(&key).unwrap();
                Self::bump(&mut inner, &mut obj);
                self.record(&mut inner, res, ChangeKind::Deleted, obj);
                Ok(())
            }
            _ => Err(ApiError::not_found(res, name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> &'static ResourceDef {
        find_resource("", "v1", "pods").unwrap()
    }
    fn leases() -> &'static ResourceDef {
        find_resource("coordination.k8s.io", "v1", "leases").unwrap()
    }

    #[test]
    fn create_assigns_identity_and_rejects_duplicates() {
        let s = Store::default();
        let p = s.create(pods(), "ns", json!({"metadata": {"name": "a"}})).unwrap();
        assert_eq!(p["kind"], "Pod");
        assert!(p["metadata"]["uid"].as_str().unwrap().len() > 10);
        let err = s.create(pods(), "ns", json!({"metadata": {"name": "a"}})).unwrap_err();
        assert_eq!((err.code, err.reason), (409, "AlreadyExists"));
        assert_eq!(err.message, "pods \"a\" already exists");
    }

    #[test]
    fn update_is_optimistic() {
        let s = Store::default();
        let l = s.create(leases(), "ns", json!({"metadata": {"name": "lock"}, "spec": {"holderIdentity": "a"}})).unwrap();
        let mut stale = l.clone();
        let mut fresh = l.clone();
        fresh["spec"]["holderIdentity"] = json!("b");
        s.update(leases(), "ns", "lock", fresh).unwrap();
        stale["spec"]["holderIdentity"] = json!("c");
        let err = s.update(leases(), "ns", "lock", stale).unwrap_err();
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        assert!(err.message.starts_with("Operation cannot be fulfilled on leases.coordination.k8s.io \"lock\""));
        let mut no_rv = l;
        no_rv["metadata"].as_object_mut().unwrap().remove("resourceVersion");
        assert_eq!(s.update(leases(), "ns", "lock", no_rv).unwrap_err().code, 422);
    }

    #[test]
    fn delete_honours_uid_precondition_and_grace() {
        let s = Store::default();
        let p = s.create(pods(), "ns", json!({"metadata": {"name": "a"}, "spec": {"nodeName": "n"}})).unwrap();
        let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
        let err = s.delete(pods(), "ns", "a", &json!({"preconditions": {"uid": "other"}})).unwrap_err();
        assert_eq!(err.code, 409);
        assert!(err.message.contains("Precondition failed: UID in precondition: other"));
        assert!(matches!(s.delete(pods(), "ns", "a", &json!({"preconditions": {"uid": uid}})).unwrap(), Deleted::Marked(_)));
        assert!(s.get(pods(), "ns", "a").unwrap()["metadata"]["deletionTimestamp"].is_string());
        s.finalize(pods(), "ns", "a", &uid).unwrap();
        assert_eq!(s.get(pods(), "ns", "a").unwrap_err().code, 404);
    }

    #[test]
    fn watch_history_replays_after_a_version() {
        let s = Store::default();
        let rv = s.current_rv();
        s.create(pods(), "ns", json!({"metadata": {"name": "a"}})).unwrap();
        s.modify(pods(), "ns", "a", |p| p["status"] = json!({"phase": "Running"})).unwrap();
        let kinds: Vec<_> = s.changes_since(rv).unwrap().iter().map(|c| c.kind).collect();
        assert_eq!(kinds, [ChangeKind::Added, ChangeKind::Modified]);
    }

    #[test]
    fn a_custom_resources_status_is_written_only_through_its_subresource() {
        let s = Store::default();
        let res = find_resource("etcd-medic.io", "v1alpha1", "etcdremediations").unwrap();
        let created =
            s.create(res, "ns", json!({"metadata": {"name": "r"}, "spec": {"pod": "p"}, "status": {"phase": "Succeeded"}})).unwrap();
        assert!(created.get("status").is_none(), "a create's status is dropped");
        assert_eq!(created["metadata"]["generation"], 1);
        let st = s
            .patch_part(
                res,
                "ns",
                "r",
                &json!({"status": {"phase": "Running"}, "spec": {"pod": "q"}, "metadata": {"labels": {"a": "b"}}}),
                true,
            )
            .unwrap();
        assert_eq!(
            (st["status"]["phase"].as_str(), st["spec"]["pod"].as_str()),
            (Some("Running"), Some("p")),
            "/status changes only the status"
        );
        assert!(st["metadata"].get("labels").is_none());
        assert_eq!(st["metadata"]["generation"], 1, "a status write is no new generation");
        let mut main = st.clone();
        main["status"]["phase"] = json!("Failed");
        let same_spec = s.update(res, "ns", "r", main.clone()).unwrap();
        assert_eq!((same_spec["status"]["phase"].as_str(), same_spec["metadata"]["generation"].as_i64()), (Some("Running"), Some(1)));
        let mut main = same_spec.clone();
        main["spec"]["restore"] = json!(true);
        let new_spec = s.update(res, "ns", "r", main).unwrap();
        assert_eq!(new_spec["metadata"]["generation"], 2, "a spec change is a new generation");
        assert_eq!(new_spec["status"]["phase"], "Running");
        // The CRD's transition rule, run as the API server runs it: what was asked stays.
        let e = s.patch(res, "ns", "r", &json!({"spec": {"force": true}})).unwrap_err();
        assert_eq!((e.code, e.reason), (422, "Invalid"), "{e:?}");
        assert!(e.message.contains("cannot change"), "{}", e.message);
        assert_eq!(s.get(res, "ns", "r").unwrap()["spec"]["force"], json!(null), "nothing was stored");
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut t, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(t, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }
}
