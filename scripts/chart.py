"""The Helm chart (charts/etcd-medic) as the source of deploy/: renders it with Helm's own
engine (helm-python-sdk, no helm binary), writes or checks deploy/, renders a few
non-default value sets for validation, tests that the schema refuses bad values, and lints.

    python scripts/chart.py write            # regenerate deploy/ from the chart
    python scripts/chart.py check OUT_DIR    # deploy/ is the chart's rendering; more renders in OUT_DIR
"""

import difflib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import helm_python as helm

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "etcd-medic"
NAMESPACE = "etcd-medic"

# Where each preset's rendering lives under deploy/ (kustomize users apply these).
PRESETS = {
    "kubeadm": "deploy/base",
    "local-path": "deploy/overlays/local-path",
    "microk8s": "deploy/overlays/microk8s",
    "k0s": "deploy/overlays/k0s",
}
# What deploy/ holds: the Namespace with its Pod Security labels (kubectl has no
# --create-namespace), no Helm-only labels, and HTTPS from the Secret etcd-medic-tls that the
# person makes (deploy/README.md): a rendering that made its own would change at every render.
DEPLOY_VALUES = {"createNamespace": True, "helmLabels": False, "agent": {"tls": {"secretName": "etcd-medic-tls"}}}
# The order objects are applied in (the CRD and RBAC before the workloads).
ORDER = ["namespace", "crd", "rbac", "controller-rbac", "priorityclass", "daemonset", "controller", "service", "networkpolicy"]

# Non-default value sets rendered for validation: what differs between clusters.
VARIANTS = {
    "tls-digest-scoped": {
        "image": {"repository": "registry.example/etcd-medic", "digest": "sha256:" + "a" * 64, "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "registry"}],
        "agent": {
            "tls": {"enabled": True, "secretName": "etcd-medic-tls", "caSecretName": "etcd-medic-ca"},
            "nodeSelector": {"node-role/etcd": "true"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "etcd", "effect": "NoSchedule"}],
            "tolerateControlPlane": True,
            "port": 9443,
            "etcdClientTLS": [
                {"namespace": "apisix", "statefulSet": "apisix-etcd", "secretName": "apisix-etcd-client"},
                {"namespace": "payments", "statefulSet": "etcd", "secretName": "payments-etcd-client"},
            ],
        },
        "controller": {"namespaces": ["apisix", "etcd"], "dryRun": True, "maxFailingPercent": 34, "cooldown": "10m", "replicas": 3},
        "networkPolicy": {"labelledCallers": True, "etcdClientPorts": [2379, 12379]},
        "audience": "etcd-medic.example",
    },
    "monitoring": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "interval": "15s"},
            "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "dashboard": {"enabled": True, "annotations": {"grafana_folder": "etcd"}},
        },
    },
    "agents-only-custom-root": {
        "kubeletRoot": "/data/kubelet",
        # The kubelet root again is not mounted twice.
        "extraHostPaths": ["/mnt/local-disks", "/data/kubelet"],
        "controller": {"enabled": False},
        "networkPolicy": {"enabled": False},
        "agent": {"priorityClass": {"create": False, "name": "system-node-critical"}},
        "logFormat": "plain",
    },
}
# Values the schema must refuse, with what is wrong.
REFUSED = {
    "an unknown preset": ({"preset": "openshift"}, "/preset"),
    "a typo'd key": ({"contoller": {"enabled": False}}, "contoller"),
    "a percentage over 100": ({"controller": {"maxFailingPercent": 150}}, "/controller/maxFailingPercent"),
    "a duration the binaries do not read": ({"controller": {"cooldown": "5 minutes"}}, "/controller/cooldown"),
    "a digest that is a tag": ({"image": {"digest": "latest"}}, "/image/digest"),
    "a relative kubelet root": ({"kubeletRoot": "var/lib/kubelet"}, "/kubeletRoot"),
    "a kubelet root climbing out": ({"kubeletRoot": "/var/lib/../../etc"}, "/kubeletRoot"),
    "a TLS Secret name that is no string": ({"agent": {"tls": {"secretName": 7}}}, "/agent/tls/secretName"),
    "etcd client TLS for no set": ({"agent": {"etcdClientTLS": [{"namespace": "apisix", "secretName": "x"}]}}, "/agent/etcdClientTLS/0"),
    "etcd client TLS for a path": ({"agent": {"etcdClientTLS": [{"namespace": "../x", "statefulSet": "e", "secretName": "x"}]}}, "/agent/etcdClientTLS/0/namespace"),
    "a namespace that is no DNS label": ({"controller": {"namespaces": ["Apisix_Prod"]}}, "/controller/namespaces/0"),
    "the host's whole filesystem": ({"extraHostPaths": ["/"]}, "/extraHostPaths/0"),
    "a path the agent mounts itself": ({"extraHostPaths": ["/var/log/pods"]}, "/extraHostPaths/0"),
    "a trailing slash (a second mount of one path)": ({"kubeletRoot": "/var/lib/kubelet/"}, "/kubeletRoot"),
    "a zero duration": ({"agent": {"verifyTimeout": "0s"}}, "/agent/verifyTimeout"),
    "a PriorityClass to create without a name": ({"agent": {"priorityClass": {"create": True, "name": ""}}}, "/agent/priorityClass/name"),
    "a reserved PriorityClass to create": ({"agent": {"priorityClass": {"create": True, "name": "system-node-critical"}}}, "/agent/priorityClass/name"),
    "a scrape interval Prometheus does not read": ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "/metrics/serviceMonitor/interval"),
    "a rule label that is no string": ({"metrics": {"prometheusRule": {"labels": {"release": 1}}}}, "/metrics/prometheusRule/labels/release"),
}

# The Prometheus operator's CRDs are not in kubernetes-validate: the fields of its
# ServiceMonitor (monitoring.coreos.com/v1, its API reference) that the chart uses, each with
# its type; anything else in a rendered ServiceMonitor is a mistake.
SERVICE_MONITOR = {
    "spec": {
        "selector": {"matchLabels": {"*": str}},
        "namespaceSelector": {"matchNames": [str]},
        "endpoints": [{
            "port": str, "scheme": str, "path": str, "interval": str, "scrapeTimeout": str,
            "tlsConfig": dict,
            "relabelings": [{"sourceLabels": [str], "targetLabel": str, "replacement": str}],
        }],
    },
}
DURATION = re.compile(r"^[0-9]+(ms|s|m|h)$")


def workspace_version():
    text = (ROOT / "Cargo.toml").read_text()
    m = re.search(r'\[workspace\.package\][^\[]*?\nversion = "([^"]+)"', text)
    return m.group(1)


def render(values, namespace=NAMESPACE):
    """{file name: text} for one install, the CRD included (Helm applies crds/ first)."""
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="etcd-medic", namespace=namespace, is_install=True)
        files = {"crd.yaml": "---\n".join(crd["data"] for crd in chart.crds)} if chart.crds else {}
    for path, text in out.items():
        name = path.split("/templates/", 1)[1]
        if name.endswith(".txt") or not text.strip():
            continue
        files[name] = text
    return files


def deploy_dir(preset, values):
    """The files of one deploy/ directory: each object file with a header, a kustomization."""
    files = render({**DEPLOY_VALUES, "preset": preset, **values})
    header = f"# Generated by scripts/render-deploy from charts/etcd-medic (preset {preset}); do not edit.\n"
    out = {}
    for name, text in files.items():
        body = text.lstrip("\n")
        if body.startswith("---\n"):
            body = body[4:]
        out[name] = header + body.rstrip("\n") + "\n"
    names = sorted(out, key=lambda n: ORDER.index(n[:-5]) if n[:-5] in ORDER else len(ORDER))
    out["kustomization.yaml"] = header + (
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n"
        + "".join(f"  - {n}\n" for n in names)
    )
    return out


def check_versions():
    with helm.Chart.load(str(CHART)) as chart:
        meta = chart.metadata
    want = workspace_version()
    got = (meta.get("version"), meta.get("appVersion") or meta.get("app_version"))
    if got != (want, want):
        sys.exit(f"charts/etcd-medic/Chart.yaml has version/appVersion {got}, the workspace is {want}")


def lint():
    for values in [{}] + list(VARIANTS.values()):
        report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
        if bad:
            sys.exit(f"helm lint (strict) of charts/etcd-medic: {bad}")
    print("helm lint (strict): no warnings or errors, defaults and every variant")


def refusals():
    """Each bad value is refused, and for its own key: an install would fail on it."""
    with helm.Chart.load(str(CHART)) as chart:
        for what, (values, key) in REFUSED.items():
            try:
                chart.validate_schema(chart.merge_values(values))
            except helm.HelmError as e:
                if key not in str(e):
                    sys.exit(f"values.schema.json refuses {what}, but not for {key}: {e}")
                print(f"refused as it must be: {what} ({key})")
                continue
            sys.exit(f"values.schema.json accepts {what}: {values}")
        chart.validate_schema(chart.merge_values({}))
        for values in VARIANTS.values():
            chart.validate_schema(chart.merge_values(values))


def write():
    check_versions()
    for preset, where in PRESETS.items():
        d = ROOT / where
        d.mkdir(parents=True, exist_ok=True)
        want = deploy_dir(preset, {})
        for stale in d.glob("*.yaml"):
            if stale.name not in want:
                stale.unlink()
        for name, text in want.items():
            (d / name).write_text(text)
        print(f"wrote {where} (preset {preset})")


def conforms(value, schema, at):
    """The places where `value` leaves `schema` (nested dicts of field: type or list)."""
    if schema is dict:
        return [] if isinstance(value, dict) else [f"{at}: not a mapping"]
    if isinstance(schema, type):
        return [] if isinstance(value, schema) else [f"{at}: not a {schema.__name__}"]
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{at}: not a list"]
        return [e for i, v in enumerate(value) for e in conforms(v, schema[0], f"{at}[{i}]")]
    if not isinstance(value, dict):
        return [f"{at}: not a mapping"]
    out = []
    for k, v in value.items():
        sub = schema.get(k, schema.get("*"))
        if sub is None:
            out.append(f"{at}.{k}: no such field")
        else:
            out += conforms(v, sub, f"{at}.{k}")
    return out


def check_monitoring(files):
    """The monitoring objects of one rendering: each ServiceMonitor against the operator's
    fields, the PrometheusRule's groups through promtool (as Prometheus loads them), the
    dashboard's JSON with a query in every panel."""
    import yaml

    docs = [d for text in files.values() for d in yaml.safe_load_all(text) if d]
    kinds = {d["kind"] for d in docs}
    if not {"ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds:
        sys.exit(f"the monitoring variant renders {sorted(kinds)}")
    for d in docs:
        if d["kind"] == "ServiceMonitor":
            bad = conforms({"spec": d["spec"]}, SERVICE_MONITOR, d["metadata"]["name"])
            for e in d["spec"]["endpoints"]:
                bad += [f"{k}={e[k]}" for k in ("interval", "scrapeTimeout") if not DURATION.match(e[k])]
            if bad or d["metadata"]["labels"].get("release") != "kube-prometheus-stack":
                sys.exit(f"ServiceMonitor {d['metadata']['name']}: {bad or 'the extra labels are missing'}")
        elif d["kind"] == "PrometheusRule":
            promtool = shutil.which("promtool")
            if not promtool:
                if os.environ.get("CI"):
                    sys.exit("promtool is missing")
                print("SKIPPED: promtool is missing; the PrometheusRule's groups are not checked")
                continue
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
                yaml.safe_dump(d["spec"], f)
                f.flush()
                subprocess.run([promtool, "check", "rules", f.name], check=True)
        elif d["kind"] == "ConfigMap" and d["metadata"]["name"] == "etcd-medic-dashboard":
            dash = json.loads(d["data"]["etcd-medic.json"])
            empty = [p["title"] for p in dash["panels"] if not all(t.get("expr") for t in p.get("targets", [])) or not p.get("targets")]
            if empty or d["metadata"]["labels"].get("grafana_dashboard") != "1":
                sys.exit(f"the dashboard's ConfigMap: panels without a query {empty}, or no sidecar label")
    print("monitoring: ServiceMonitors of the operator's fields, the PrometheusRule as promtool loads it, the dashboard's queries")


def check_tls(namespace="ops"):
    """The chart's defaults serve HTTPS with a certificate it makes: one the CA it ships
    verifies, for the Service's name that the controller checks, mounted by the agents, its
    CA by the controller."""
    import base64
    import yaml

    files = render({}, namespace=namespace)
    docs = [d for text in files.values() for d in yaml.safe_load_all(text) if d]
    secrets = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "etcd-medic-tls"]
    if len(secrets) != 1 or secrets[0]["type"] != "kubernetes.io/tls":
        sys.exit(f"the defaults render no kubernetes.io/tls Secret etcd-medic-tls: {[d['kind'] for d in docs]}")
    svc = f"etcd-medic.{namespace}.svc"
    with tempfile.TemporaryDirectory() as t:
        for k, v in secrets[0]["data"].items():
            pathlib.Path(t, k).write_bytes(base64.b64decode(v))
        subprocess.run(["openssl", "verify", "-CAfile", f"{t}/ca.crt", "-verify_hostname", svc, f"{t}/tls.crt"], check=True)
        key = subprocess.run(["openssl", "pkey", "-in", f"{t}/tls.key", "-pubout"], check=True, capture_output=True).stdout
        crt = subprocess.run(["openssl", "x509", "-in", f"{t}/tls.crt", "-pubkey", "-noout"], check=True, capture_output=True).stdout
        if key != crt:
            sys.exit("the generated tls.key is not the certificate's key")
    mounted = {v["secret"]["secretName"] for d in docs if d["kind"] in ("DaemonSet", "Deployment")
               for v in d["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    if mounted != {"etcd-medic-tls"}:
        sys.exit(f"agents and controller mount {mounted}, not the generated Secret")
    print(f"TLS by default: a certificate for {svc} that the chart's CA verifies, mounted by agents and controller")


def admitted(policy, binding, request, namespace_labels):
    """Whether the API server admits `request` under one ValidatingAdmissionPolicy and its
    binding, as it decides: the policy's resource rules and the binding's namespace selector
    match, every match condition holds, then every validation must (CEL, by cel-python)."""
    import celpy

    env = celpy.Environment()
    res = request["resource"]
    # A rule for `etcdrecoveries` does not match its `status` subresource.
    resource = res["resource"] + (f"/{request['subResource']}" if request.get("subResource") else "")
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    hit = lambda want, got: "*" in want or got in want
    if not any(hit(r["apiGroups"], res["group"]) and hit(r["resources"], resource) and hit(r["operations"], request["operation"]) for r in rules):
        return True
    sel = binding["spec"].get("matchResources", {}).get("namespaceSelector", {}).get("matchLabels", {})
    if any(namespace_labels.get(k) != v for k, v in sel.items()):
        return True
    act = {"request": celpy.json_to_cel(request), "object": celpy.json_to_cel(request.get("object")),
           "oldObject": celpy.json_to_cel(request.get("oldObject"))}
    run = lambda expr: bool(env.program(env.compile(expr)).evaluate(act))
    if not all(run(c["expression"]) for c in policy["spec"].get("matchConditions", [])):
        return True
    return all(run(v["expression"]) for v in policy["spec"]["validations"])


def policy_of(name, namespace):
    """The rendered ValidatingAdmissionPolicy `name` and its binding, which must deny by it."""
    import yaml

    docs = [d for text in render({}, namespace=namespace).values() for d in yaml.safe_load_all(text) if d]
    named = lambda kind: next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)
    policy, binding = named("ValidatingAdmissionPolicy"), named("ValidatingAdmissionPolicyBinding")
    if binding["spec"]["policyName"] != name or binding["spec"]["validationActions"] != ["Deny"]:
        sys.exit(f"{name}'s binding does not deny by it: {binding['spec']}")
    return policy, binding


def check_approval_policy(namespace="ops"):
    """Quorum recoveries: the shipped admission policy admits an approval only under the
    requesting user's own name, in every namespace, and leaves an approval made alone."""
    policy, binding = policy_of(f"etcd-medic-recovery-approval.{namespace}", namespace)
    approval = lambda by: {"approval": {"by": by, "facts": "ab92b1ea0ff43f8f"}} if by else {}
    controller = f"system:serviceaccount:{namespace}:etcd-medic-controller"

    def ask(user, op, old_by, new_by, sub=None, where="apisix"):
        record = lambda by: {"apiVersion": "etcd-medic.io/v1alpha1", "kind": "EtcdRecovery",
                             "metadata": {"name": "apisix-etcd", "namespace": where}, "spec": {"statefulSet": "apisix-etcd", **approval(by)}}
        req = {"operation": op, "userInfo": {"username": user}, "namespace": where, "name": "apisix-etcd", "subResource": sub,
               "resource": {"group": "etcd-medic.io", "version": "v1alpha1", "resource": "etcdrecoveries"},
               "object": record(new_by), "oldObject": None if op == "CREATE" else record(old_by)}
        return admitted(policy, binding, req, {"kubernetes.io/metadata.name": where})

    want = [
        ("alice", "UPDATE", None, "alice", None, True), ("alice", "CREATE", None, "alice", None, True),
        ("mallory", "UPDATE", None, "alice", None, False), ("mallory", "CREATE", None, "alice", None, False),
        ("mallory", "UPDATE", "bob", "alice", None, False), ("alice", "UPDATE", None, "alice ", None, False),
        (controller, "UPDATE", "alice", "alice", None, True), (controller, "UPDATE", "alice", "alice", "status", True),
        ("mallory", "UPDATE", None, None, None, True), ("bob", "CREATE", None, None, None, True),
    ]
    wrong = [(u, op, old, new, sub, ok) for u, op, old, new, sub, ok in want if ask(u, op, old, new, sub) != ok]
    if ask("mallory", "UPDATE", None, "alice", where="tenant-b") is not False:
        wrong.append("an approval in another namespace is not held to its user")
    if wrong:
        sys.exit(f"the recovery approval policy decides wrongly (who, op, approved before, approved after, subresource, should admit): {wrong}")
    print(f"the recovery approval policy (CEL, as the API server runs it): {len(want) + 1} requests decided as they must be")


def check_status_policy(namespace="ops"):
    """Quorum recoveries' status: the shipped admission policy leaves the fence and what
    follows an approval to the controller; a person's plugin writes only plans."""
    policy, binding = policy_of(f"etcd-medic-recovery-status.{namespace}", namespace)
    controller = f"system:serviceaccount:{namespace}:etcd-medic-controller"

    def ask(user, old, new, approved=True, sub="status"):
        spec = {"statefulSet": "apisix-etcd", **({"approval": {"by": "alice", "facts": "ab92b1ea0ff43f8f"}} if approved else {})}
        record = lambda status: {"apiVersion": "etcd-medic.io/v1alpha1", "kind": "EtcdRecovery",
                                 "metadata": {"name": "apisix-etcd", "namespace": "apisix"}, "spec": spec,
                                 **({"status": status} if status is not None else {})}
        req = {"operation": "UPDATE", "userInfo": {"username": user}, "namespace": "apisix", "name": "apisix-etcd", "subResource": sub,
               "resource": {"group": "etcd-medic.io", "version": "v1alpha1", "resource": "etcdrecoveries"},
               "object": record(new), "oldObject": record(old)}
        return admitted(policy, binding, req, {"kubernetes.io/metadata.name": "apisix"})

    awaiting, approved = {"phase": "AwaitingApproval"}, {"phase": "Approved"}
    fencing, fenced = {"phase": "Fencing", "fence": {"replicas": 3, "at": "t"}}, {"phase": "Fenced", "fence": {"replicas": 3, "at": "t"}}
    refused = {"phase": "Refused", "code": "PlanChanged"}
    want = [
        ("alice", None, awaiting, False, True), ("alice", awaiting, approved, True, True), ("alice", awaiting, awaiting, False, True),
        ("mallory", approved, fencing, True, False), ("mallory", approved, {"phase": "Approved", "fence": {"replicas": 1000000}}, True, False),
        ("mallory", fenced, {**fenced, "message": "rebuild from the other one"}, True, False), ("mallory", fenced, approved, True, False),
        ("mallory", refused, approved, True, False), ("mallory", {"phase": "Refused", "code": "NoSurvivor"}, awaiting, False, True),
        (controller, approved, fencing, True, True), (controller, fencing, fenced, True, True), (controller, approved, refused, True, True),
        ("mallory", approved, {"phase": "Approved", "rebuilt": {"revision": 1}}, True, False),
        ("mallory", {"phase": "Rebuilding"}, approved, True, False), ("mallory", {"phase": "Rebuilt"}, approved, True, False),
        (controller, fenced, {"phase": "Rebuilding"}, True, True), (controller, {"phase": "Rebuilding"}, {"phase": "Rebuilt"}, True, True),
    ]
    wrong = [(u, old, new, ok) for u, old, new, appr, ok in want if ask(u, old, new, appr) != ok]
    if ask("mallory", approved, fencing, sub=None) is not True:
        wrong.append("the main resource is not this policy's (its status is not written there)")
    if wrong:
        sys.exit(f"the recovery status policy decides wrongly (who, status before, after, should admit): {wrong}")
    print(f"the recovery status policy (CEL, as the API server runs it): {len(want) + 1} requests decided as they must be")


def check_holder_policy(namespace="ops"):
    """Quorum recoveries' holder pods: the controller may create pods only of the holder's
    shape (the agent's image running `hold`, claims only, unprivileged, no token); anyone
    else's pods are not this policy's."""
    import copy

    import yaml

    policy, binding = policy_of(f"etcd-medic-holder-pods.{namespace}", namespace)
    docs = [d for text in render({}, namespace=namespace).values() for d in yaml.safe_load_all(text) if d]
    image = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"]
    controller = f"system:serviceaccount:{namespace}:etcd-medic-controller"
    holder = {"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "apisix-etcd-0-hold", "namespace": "apisix", "labels": {"etcd-medic.io/holds": "apisix-etcd-0"}},
              "spec": {"nodeName": "node-a", "automountServiceAccountToken": False,
                       "containers": [{"name": "etcd", "image": image, "command": ["/etcd-medic", "hold"], "args": [],
                                       "env": [{"name": "ETCD_DATA_DIR", "value": "/bitnami/etcd/data"}],
                                       "volumeMounts": [{"name": "data", "mountPath": "/bitnami/etcd"}],
                                       "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                           "capabilities": {"drop": ["ALL"]}}}],
                       "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data-apisix-etcd-0"}}]}}

    def changed(path, value):
        pod = copy.deepcopy(holder)
        at = pod
        for k in path[:-1]:
            at = at[k]
        if value is None:
            del at[path[-1]]
        else:
            at[path[-1]] = value
        return pod

    def ask(user, pod, old=None):
        req = {"operation": "UPDATE" if old else "CREATE", "userInfo": {"username": user}, "namespace": "apisix",
               "name": pod["metadata"]["name"], "resource": {"group": "", "version": "v1", "resource": "pods"}, "object": pod, "oldObject": old}
        return admitted(policy, binding, req, {"kubernetes.io/metadata.name": "apisix"})

    c = ("spec", "containers", 0)
    want = [
        (controller, holder, True), ("system:serviceaccount:apisix:tenant", changed(("metadata", "labels"), {"app": "x"}), True),
        (controller, changed(c + ("image",), "mallory/anything"), False), (controller, changed(c + ("command",), ["/bin/sh", "-c", "id"]), False),
        (controller, changed(c + ("securityContext",), {"privileged": True, "allowPrivilegeEscalation": False}), False),
        (controller, changed(c + ("securityContext",), None), False),
        (controller, changed(("spec", "automountServiceAccountToken"), None), False), (controller, changed(("spec", "hostPID"), True), False),
        (controller, changed(("spec", "hostNetwork"), True), False), (controller, changed(("metadata", "labels"), {"app": "x"}), False),
        (controller, changed(("spec", "volumes"), [{"name": "data", "hostPath": {"path": "/"}}]), False),
        (controller, changed(("spec", "initContainers"), [{"name": "x", "image": image}]), False),
        (controller, changed(("spec", "containers"), holder["spec"]["containers"] * 2), False),
        ("system:serviceaccount:apisix:tenant", holder, False),
    ]
    wrong = [(u.rsplit(":", 1)[1], i, ok) for i, (u, pod, ok) in enumerate(want) if ask(u, pod) != ok]
    gc, tenant = "system:serviceaccount:kube-system:generic-garbage-collector", "system:serviceaccount:apisix:tenant"
    if ask(tenant, changed(c + ("image",), "mallory/anything"), old=holder) is not False:
        wrong.append("a holder's image changed after it was made")
    if ask(gc, changed(("metadata", "ownerReferences"), []), old=holder) is not True:
        wrong.append("a holder's metadata (the garbage collector's) is not left alone")
    if ask(tenant, changed(("metadata", "labels"), {"app": "x"}), old=changed(("metadata", "labels"), {"app": "y"})) is not True:
        wrong.append("a tenant's own pod is not left alone")
    if wrong:
        sys.exit(f"the holder pods policy decides wrongly (who, case, should admit): {wrong}")
    print(f"the holder pods policy (CEL, as the API server runs it): {len(want) + 3} requests decided as they must be")


def check_lease_policy(namespace="ops"):
    """The agents' Leases: the shipped admission policy, evaluated as the API server would,
    refuses the agents the controller's leader Lease and anything not a cluster's lock, and
    leaves the controller's own Lease to it."""
    policy, binding = policy_of(f"etcd-medic-agent-leases.{namespace}", namespace)
    agent, controller = f"system:serviceaccount:{namespace}:etcd-medic", f"system:serviceaccount:{namespace}:etcd-medic-controller"
    labels = {"kubernetes.io/metadata.name": namespace}

    def ask(user, op, name, ns_labels=labels):
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name, "namespace": namespace}}
        req = {"operation": op, "userInfo": {"username": user}, "namespace": namespace, "name": name,
               "resource": {"group": "coordination.k8s.io", "version": "v1", "resource": "leases"},
               "object": None if op == "DELETE" else lease, "oldObject": None if op == "CREATE" else lease}
        return admitted(policy, binding, req, ns_labels)

    lock = "etcd-medic-apisix-0b8c5f2e-4d1a-4c3b-9e7f-6a5d4c3b2a19"
    want = [
        (agent, "CREATE", lock, True), (agent, "UPDATE", lock, True),
        (agent, "UPDATE", "etcd-medic-controller", False), (agent, "CREATE", "etcd-medic-controller", False),
        (agent, "UPDATE", "kube-controller-manager", False), (agent, "DELETE", lock, False),
        (agent, "UPDATE", lock + "-x", False), (agent, "UPDATE", "etcd-medic--" + lock[11:], False),
        (controller, "UPDATE", "etcd-medic-controller", True), (controller, "CREATE", "etcd-medic-controller", True),
    ]
    wrong = [(u.rsplit(":", 1)[1], op, n, ok) for u, op, n, ok in want if ask(u, op, n) != ok]
    if not ask(agent, "UPDATE", "etcd-medic-controller", {"kubernetes.io/metadata.name": "elsewhere"}) is True:
        wrong.append("a namespace not the release's is bound")
    if wrong:
        sys.exit(f"the agents' lease policy decides wrongly (who, op, name, should admit): {wrong}")
    print(f"the agents' lease policy (CEL, as the API server runs it): {len(want)} requests decided as they must be")


def check(out_dir):
    check_versions()
    stale = []
    for preset, where in PRESETS.items():
        d = ROOT / where
        want = deploy_dir(preset, {})
        have = {p.name: p.read_text() for p in d.glob("*.yaml")}
        for name in sorted(set(want) | set(have)):
            if want.get(name) != have.get(name):
                diff = difflib.unified_diff(
                    (have.get(name) or "").splitlines(True), (want.get(name) or "").splitlines(True), f"{where}/{name}", "chart"
                )
                stale.append("".join(diff) or f"{where}/{name}")
    if stale:
        sys.exit("deploy/ is not the chart's rendering; run scripts/render-deploy:\n" + "\n".join(stale))
    print("deploy/ is the chart's rendering for every preset")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, values in VARIANTS.items():
        files = render(values, namespace="ops")
        (out / f"chart-{name}.yaml").write_text("".join(f"---\n{t.strip()}\n" for t in files.values()))
        print(f"rendered the chart with {name} values")
        if name == "monitoring":
            check_monitoring(files)
    check_tls()
    check_lease_policy()
    check_approval_policy()
    check_status_policy()
    check_holder_policy()
    refusals()
    lint()


if __name__ == "__main__":
    if sys.argv[1:2] == ["write"]:
        write()
    elif sys.argv[1:2] == ["check"] and len(sys.argv) == 3:
        check(sys.argv[2])
    else:
        sys.exit(__doc__)
