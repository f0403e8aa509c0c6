//! The Kubernetes objects of an etcd StatefulSet, shaped like the Bitnami chart's (as the
//! APISIX chart renders it) or like a plain hand-written StatefulSet.

use serde_json::{Value, json};

use crate::etcd::{ClusterState, MemberSpec};
use crate::kubelet::VolumeSource;

/// How pods of the set start etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartProfile {
    /// The Bitnami image's setup script (chart 9.7.3): `member_id`, `member_removal.log`,
    /// `member update` / `member add`, preStop `member remove`.
    Bitnami { initial_state: ClusterState, remove_member_on_termination: bool },
    /// The Bitnami image's setup script of charts 11 and 12: no preStop hook, no
    /// `member_id`, no `ETCD_INITIAL_CLUSTER_STATE`; the image finds its entry by peer URL,
    /// and wipes and re-adds a member that etcd says was removed (FIELD-NOTES.md).
    Bitnami11,
    /// `etcd` with fixed flags, no script.
    Plain { state: ClusterState },
}

impl StartProfile {
    pub fn bitnami() -> Self {
        StartProfile::Bitnami { initial_state: ClusterState::New, remove_member_on_termination: true }
    }
    /// Where the PVC is mounted in the container, and the data dir under it.
    pub fn mount_path(&self) -> &'static str {
        match self {
            StartProfile::Bitnami { .. } | StartProfile::Bitnami11 => "/bitnami/etcd",
            StartProfile::Plain { .. } => "/var/run/etcd",
        }
    }
    pub fn data_dir(&self) -> &'static str {
        match self {
            StartProfile::Bitnami { .. } | StartProfile::Bitnami11 => "/bitnami/etcd/data",
            StartProfile::Plain { .. } => "/var/run/etcd/default.etcd",
        }
    }
    /// The data dir relative to the volume root.
    pub fn data_subdir(&self) -> &'static str {
        self.data_dir().strip_prefix(self.mount_path()).unwrap().trim_start_matches('/')
    }
}

/// Everything that names the set's objects.
#[derive(Clone, Debug)]
pub struct SetShape {
    pub namespace: String,
    /// Helm release (`apisix`); the set is `<release>-etcd`.
    pub release: String,
    pub replicas: usize,
    pub node_name: String,
    pub profile: StartProfile,
    pub storage: StorageKind,
    pub cluster_token: String,
    /// The members' `ETCD_SNAPSHOT_COUNT` (`--snapshot-count`), when not etcd's default.
    pub snapshot_count: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageKind {
    Csi,
    Local,
    HostPath,
}

impl SetShape {
    pub fn apisix(replicas: usize, node_name: &str) -> Self {
        SetShape {
            namespace: "apisix".into(),
            release: "apisix".into(),
            replicas,
            node_name: node_name.into(),
            profile: StartProfile::bitnami(),
            storage: StorageKind::Csi,
            cluster_token: "etcd-cluster-k8s".into(),
            snapshot_count: None,
        }
    }
    pub fn set_name(&self) -> String {
        format!("{}-etcd", self.release)
    }
    pub fn pod_name(&self, ordinal: usize) -> String {
        format!("{}-{ordinal}", self.set_name())
    }
    pub fn pvc_name(&self, ordinal: usize) -> String {
        format!("data-{}", self.pod_name(ordinal))
    }
    pub fn pv_name(&self, ordinal: usize) -> String {
        // Provisioners name PVs after the claim's uid; a stable fake of that shape.
        format!("pvc-{:08x}-{ordinal:04x}-4000-8000-{:012x}", fnv(&self.namespace) as u32, fnv(&self.pvc_name(ordinal)) & 0xffff_ffff_ffff)
    }
    pub fn labels(&self) -> Value {
        let mut l = json!({
            "app.kubernetes.io/name": "etcd",
            "app.kubernetes.io/instance": self.release,
            "app.kubernetes.io/component": "etcd",
            "app.kubernetes.io/managed-by": "Helm",
        });
        match self.profile {
            StartProfile::Bitnami { .. } => l["helm.sh/chart"] = json!("etcd-9.7.3"),
            StartProfile::Bitnami11 => l["helm.sh/chart"] = json!("etcd-11.0.2"),
            StartProfile::Plain { .. } => {}
        }
        l
    }
    pub fn selector(&self) -> String {
        format!("app.kubernetes.io/name=etcd,app.kubernetes.io/instance={}", self.release)
    }
    pub fn volume_source(&self, ordinal: usize) -> VolumeSource {
        match self.storage {
            StorageKind::Csi => VolumeSource::Csi {
                driver: "disk.csi.azure.com".into(),
                volume_handle: format!("/subscriptions/lab/resourceGroups/lab/providers/Microsoft.Compute/disks/{}", self.pv_name(ordinal)),
            },
            StorageKind::Local => VolumeSource::Local { path: format!("/mnt/disks/{}", self.pv_name(ordinal)) },
            StorageKind::HostPath => VolumeSource::HostPath {
                path: format!("/var/local-path-provisioner/{}_{}_{}", self.pv_name(ordinal), self.namespace, self.pvc_name(ordinal)),
            },
        }
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

pub fn statefulset(shape: &SetShape) -> Value {
    json!({
        "metadata": {"name": shape.set_name(), "namespace": shape.namespace, "labels": shape.labels()},
        "spec": {
            "replicas": shape.replicas,
            "serviceName": format!("{}-headless", shape.set_name()),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app.kubernetes.io/name": "etcd", "app.kubernetes.io/instance": shape.release, "app.kubernetes.io/component": "etcd"}},
            "template": {"metadata": {"labels": shape.labels()}, "spec": {"containers": [{"name": "etcd", "image": image(&shape.profile)}]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "8Gi"}}}}],
        },
        "status": {"replicas": shape.replicas, "readyReplicas": 0},
    })
}

fn image(profile: &StartProfile) -> &'static str {
    match profile {
        StartProfile::Bitnami { .. } => "bitnami/etcd:3.5.10-debian-11-r2",
        StartProfile::Bitnami11 => "bitnami/etcd:3.5.17-debian-12-r3",
        StartProfile::Plain { .. } => "etcd:3.5.10-0",
    }
}

pub fn pvc(shape: &SetShape, ordinal: usize) -> Value {
    json!({
        "metadata": {"name": shape.pvc_name(ordinal), "namespace": shape.namespace, "labels": shape.labels()},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "8Gi"}},
                 "volumeName": shape.pv_name(ordinal), "storageClassName": "lab"},
        "status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "8Gi"}},
    })
}

pub fn pv(shape: &SetShape, ordinal: usize) -> Value {
    let mut spec = json!({
        "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "8Gi"},
        "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "lab",
        "claimRef": {"kind": "PersistentVolumeClaim", "namespace": shape.namespace, "name": shape.pvc_name(ordinal), "apiVersion": "v1"},
    });
    match shape.volume_source(ordinal) {
        VolumeSource::Csi { driver, volume_handle } => {
            spec["csi"] = json!({"driver": driver, "volumeHandle": volume_handle, "fsType": "ext4"});
        }
        VolumeSource::Local { path } => {
            spec["local"] = json!({"path": path});
            spec["nodeAffinity"] = json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [shape.node_name]}]}]}});
        }
        VolumeSource::HostPath { path } => {
            spec["hostPath"] = json!({"path": path, "type": "DirectoryOrCreate"});
        }
    }
    json!({"metadata": {"name": shape.pv_name(ordinal)}, "spec": spec, "status": {"phase": "Bound"}})
}

/// `pod` as the kubelet reports it running and Ready since long ago (an object only: no
/// process runs it).
pub fn running(mut pod: Value) -> Value {
    let t = "2026-12-01T00:00:00Z";
    pod["status"]["phase"] = json!("Running");
    pod["status"]["conditions"] = json!([
        {"type": "Initialized", "status": "True", "lastTransitionTime": t},
        {"type": "Ready", "status": "True", "lastTransitionTime": t},
        {"type": "ContainersReady", "status": "True", "lastTransitionTime": t},
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
    ]);
    pod["status"]["containerStatuses"] = json!([{"name": "etcd", "image": pod.pointer("/spec/containers/0/image"), "imageID": "",
        "ready": true, "started": true, "restartCount": 0, "state": {"running": {"startedAt": t}}}]);
    pod
}

/// `pod` as the kubelet reports a container crash-looping for long (5 restarts, not Ready
/// since long ago): past the controller's thresholds whatever its log says.
pub fn crash_looping(pod: Value) -> Value {
    let mut pod = running(pod);
    let t = "2026-12-01T00:00:00Z";
    pod["status"]["conditions"][1] = json!({"type": "Ready", "status": "False", "lastTransitionTime": t});
    pod["status"]["containerStatuses"] = json!([{"name": "etcd", "image": pod.pointer("/spec/containers/0/image"), "imageID": "",
        "ready": false, "started": false, "restartCount": 5,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting failed container"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "startedAt": t, "finishedAt": t}}}]);
    pod
}

/// The target of a lone etcd at `127.0.0.1` (`scheme` for clients): a StatefulSet
/// `<namespace>/lone` of one pod, asked at its own client endpoint, as `etcd` reaches it.
pub fn lone_target(
    etcd: &etcd_medic::etcd::Etcd,
    namespace: &str,
    scheme: &str,
    client_port: u16,
    peer_port: u16,
) -> etcd_medic::Result<etcd_medic::etcd::Target> {
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "lone-0", "namespace": namespace, "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "lone", "uid": "lone-uid", "controller": true}]},
        "spec": {"containers": [{"name": "etcd", "env": [{"name": "ETCD_ADVERTISE_CLIENT_URLS", "value": format!("{scheme}://127.0.0.1:{client_port}")}],
            "ports": [{"name": "client", "containerPort": client_port}, {"name": "peer", "containerPort": peer_port}]}]},
        "status": {"podIP": "127.0.0.1"}
    }))
    .expect("a pod");
    let scope = etcd_medic::scope::SetScope::of(&pod, std::slice::from_ref(&pod), "etcd").expect("a set's pod");
    etcd.target(scope, vec![format!("{scheme}://127.0.0.1:{client_port}")], None)
}

/// The pod of `ordinal`. `members` are every member's lab identity: their loopback ports
/// take the place of the headless service's DNS names.
pub fn pod(shape: &SetShape, set_uid: &str, ordinal: usize, members: &[MemberSpec]) -> Value {
    let me = &members[ordinal];
    let initial_cluster = crate::etcd::initial_cluster(members);
    let (env, command, args) = match &shape.profile {
        StartProfile::Bitnami { .. } | StartProfile::Bitnami11 => (
            json!([
                {"name": "BITNAMI_DEBUG", "value": "false"},
                {"name": "MY_POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
                {"name": "MY_POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                {"name": "MY_STS_NAME", "value": shape.set_name()},
                {"name": "ETCDCTL_API", "value": "3"},
                {"name": "ETCD_ON_K8S", "value": "yes"},
                {"name": "ETCD_START_FROM_SNAPSHOT", "value": "no"},
                {"name": "ETCD_DISASTER_RECOVERY", "value": "no"},
                {"name": "ETCD_NAME", "value": "$(MY_POD_NAME)"},
                {"name": "ETCD_DATA_DIR", "value": "/bitnami/etcd/data"},
                {"name": "ETCD_LOG_LEVEL", "value": "info"},
                {"name": "ALLOW_NONE_AUTHENTICATION", "value": "yes"},
                {"name": "ETCD_ADVERTISE_CLIENT_URLS", "value": me.client_url()},
                {"name": "ETCD_LISTEN_CLIENT_URLS", "value": me.client_url()},
                {"name": "ETCD_INITIAL_ADVERTISE_PEER_URLS", "value": me.peer_url()},
                {"name": "ETCD_LISTEN_PEER_URLS", "value": me.peer_url()},
                {"name": "ETCD_INITIAL_CLUSTER_TOKEN", "value": shape.cluster_token},
                {"name": "ETCD_INITIAL_CLUSTER", "value": initial_cluster},
                {"name": "ETCD_CLUSTER_DOMAIN", "value": format!("{}-headless.{}.svc.cluster.local", shape.set_name(), shape.namespace)},
            ]),
            Value::Null,
            Value::Null,
        ),
        StartProfile::Plain { state } => (
            json!([{"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}]),
            json!(["etcd"]),
            json!([
                "--name=$(POD_NAME)",
                format!("--data-dir={}", shape.profile.data_dir()),
                format!("--listen-client-urls={}", me.client_url()),
                format!("--advertise-client-urls={}", me.client_url()),
                format!("--listen-peer-urls={}", me.peer_url()),
                format!("--initial-advertise-peer-urls={}", me.peer_url()),
                format!("--initial-cluster={initial_cluster}"),
                format!("--initial-cluster-state={}", state.as_str()),
                format!("--initial-cluster-token={}", shape.cluster_token),
            ]),
        ),
    };
    let mut container = json!({
        "name": "etcd",
        "image": image(&shape.profile),
        "env": env,
        "ports": [{"name": "client", "containerPort": me.client_port, "protocol": "TCP"},
                  {"name": "peer", "containerPort": me.peer_port, "protocol": "TCP"}],
        "volumeMounts": [{"name": "data", "mountPath": shape.profile.mount_path()}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    if !command.is_null() {
        container["command"] = command;
        container["args"] = args;
    }
    if let (Some(n), StartProfile::Bitnami { .. } | StartProfile::Bitnami11) = (shape.snapshot_count, &shape.profile) {
        container["env"].as_array_mut().expect("a list").push(json!({"name": "ETCD_SNAPSHOT_COUNT", "value": n.to_string()}));
    }
    // Charts ≤ 10 only: the initial state in the pod, and the preStop hook.
    if let StartProfile::Bitnami { initial_state, .. } = shape.profile {
        let env = container["env"].as_array_mut().expect("a list");
        env.push(json!({"name": "ETCD_INITIAL_CLUSTER_STATE", "value": initial_state.as_str()}));
        container["lifecycle"] = json!({"preStop": {"exec": {"command": ["/opt/bitnami/scripts/etcd/prestop.sh"]}}});
    }
    json!({
        "metadata": {
            "name": shape.pod_name(ordinal), "namespace": shape.namespace,
            "labels": merge(shape.labels(), json!({"statefulset.kubernetes.io/pod-name": shape.pod_name(ordinal)})),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": shape.set_name(),
                                 "uid": set_uid, "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "nodeName": shape.node_name,
            "hostname": shape.pod_name(ordinal),
            "subdomain": format!("{}-headless", shape.set_name()),
            "containers": [container],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": shape.pvc_name(ordinal)}}],
        },
        "status": {"phase": "Pending", "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "qosClass": "BestEffort"},
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    crate::apiserver::store::merge_patch(&mut a, &b);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_chart() {
        let s = SetShape::apisix(3, "node-a");
        assert_eq!(s.set_name(), "apisix-etcd");
        assert_eq!(s.pod_name(1), "apisix-etcd-1");
        assert_eq!(s.pvc_name(1), "data-apisix-etcd-1");
        assert_ne!(s.pv_name(0), s.pv_name(1));
        assert_eq!(s.profile.data_subdir(), "data");
        assert_eq!(StartProfile::Plain { state: ClusterState::New }.data_subdir(), "default.etcd");
    }

    #[test]
    fn objects_parse_as_kubernetes_types() {
        let s = SetShape::apisix(3, "node-a");
        let members: Vec<MemberSpec> = (0..3).map(|i| MemberSpec::new(s.pod_name(i))).collect();
        let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(pod(&s, "set-uid", 1, &members)).unwrap();
        assert_eq!(p.spec.unwrap().containers[0].name, "etcd");
        let _: k8s_openapi::api::core::v1::PersistentVolume = serde_json::from_value(pv(&s, 1)).unwrap();
        let _: k8s_openapi::api::core::v1::PersistentVolumeClaim = serde_json::from_value(pvc(&s, 1)).unwrap();
        let _: k8s_openapi::api::apps::v1::StatefulSet = serde_json::from_value(statefulset(&s)).unwrap();
    }
}
