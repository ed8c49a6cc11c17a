#!/usr/bin/env python3
"""Checks of the Helm chart with the real Helm library (helm-python-sdk), kubernetes-validate
and yamllint. Run by tests/it/deploy.rs with .tools/venv/bin/python:

    check_chart.py OUT_DIR            render, lint, validate, assert; write each rendered
                                      config.toml under OUT_DIR/<values>/ for check-config
    check_chart.py --write-manifests  regenerate deploy/manifests/ from the chart

Exits non-zero with every failed check listed. Negative controls (bad values files) must
fail with the schema's or `required`'s message.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "openai-key-rotator"
VALUES = ROOT / "tests" / "chart"
MANIFESTS = ROOT / "deploy" / "manifests" / "openai-key-rotator.yaml"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
YAMLLINT_CONFIG = VALUES / "yamllint.yaml"
BIN = Path(sys.executable).parent
# Kubernetes versions the chart supports (kubeVersion >=1.29; k8s-openapi feature v1_33).
KUBE_VERSIONS = ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]
RELEASE, NAMESPACE = "okr", "okr"

helm.disable_logging()
failures: list[str] = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
    return cond


def load_values(name):
    return yaml.safe_load((VALUES / f"{name}.yaml").read_text()) or {}


def render(values, name=RELEASE, namespace=NAMESPACE):
    """Rendered templates (NOTES.txt apart) as (template, text) in name order."""
    out = helm.Chart.load(str(CHART)).render(values, name=name, namespace=namespace)
    return [(k, v) for k, v in sorted(out.items()) if not k.endswith("NOTES.txt")]


def docs_of(rendered):
    docs = []
    for _, text in rendered:
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def manifest_text(rendered):
    parts = ["# Generated from charts/openai-key-rotator with tests/chart/values-required.yaml\n"
             "# (release openai-key-rotator, namespace openai-key-rotator) by\n"
             "# `tests/chart/check_chart.py --write-manifests`. Do not edit: a test keeps it equal\n"
             "# to the chart's output.\n"]
    for name, text in rendered:
        text = text.strip()
        if text:
            parts.append(f"---\n# Source: {name}\n{text}\n")
    return "".join(parts)


def render_manifests():
    return manifest_text(render(load_values("values-required"), "openai-key-rotator", "openai-key-rotator"))


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def lint(values, label):
    res = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    msgs = [m for m in res.get("messages", []) if m.get("severity", 0) >= 2]
    check(not res.get("errors") and not msgs, f"{label}: helm lint --strict: {res}")


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def rules_of(role):
    return [
        (tuple(r.get("apiGroups", [])), tuple(r.get("resources", [])), tuple(sorted(r.get("verbs", []))),
         tuple(r.get("resourceNames", [])))
        for r in role.get("rules", [])
    ]


WORKLOAD_RULES = lambda resources, rollouts=False: (
    ([(("apps",), tuple(resources), ("get", "list", "patch", "watch"), ())] if resources else [])
    + ([(("argoproj.io",), ("rollouts",), ("get", "list", "patch", "watch"), ())] if rollouts else [])
    + [
        (("",), ("pods",), ("list", "watch"), ()),
        (("events.k8s.io",), ("events",), ("create", "patch"), ()),
    ])


# discovery.enabled: read-only, cluster-wide, for unlisted consumers (never Secrets, never a write).
DISCOVERY_RULES = [
    (("",), ("pods",), ("get", "list"), ()),
    (("apps",), ("replicasets", "deployments", "statefulsets", "daemonsets"), ("get", "list"), ()),
    (("argoproj.io",), ("rollouts",), ("get", "list"), ()),
    (("secrets.hashicorp.com",), ("vaultstaticsecrets",), ("get", "list"), ()),
    (("external-secrets.io",), ("externalsecrets",), ("get", "list"), ()),
]


def check_cluster_rbac(docs, label, expected):
    """`expected`: the one ClusterRole's rules, or None when none may be rendered."""
    croles = by_kind(docs, "ClusterRole")
    cbindings = by_kind(docs, "ClusterRoleBinding")
    if expected is None:
        check(not croles and not cbindings, f"{label}: cluster-wide RBAC rendered")
        return
    check(len(croles) == 1 and len(cbindings) == 1,
          f"{label}: {len(croles)} ClusterRoles, {len(cbindings)} ClusterRoleBindings, want 1 each")
    if not croles or not cbindings:
        return
    got = sorted(rules_of(croles[0]))
    check(got == sorted(expected), f"{label}: ClusterRole rules\n  got  {got}\n  want {sorted(expected)}")
    for rule in croles[0].get("rules", []):
        check(set(rule.get("verbs", [])) <= {"get", "list"}, f"{label}: ClusterRole grants more than reads: {rule}")
        check("secrets" not in rule.get("resources", []), f"{label}: ClusterRole reads Secrets: {rule}")
    b = cbindings[0]
    check(b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": croles[0]["metadata"]["name"]}, f"{label}: ClusterRoleBinding roleRef {b['roleRef']}")
    sa = by_kind(docs, "ServiceAccount")[0]["metadata"]["name"]
    check(b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}],
          f"{label}: ClusterRoleBinding subjects {b['subjects']}")


def check_rbac(docs, label, expected, cluster=None):
    """`expected`: {namespace: [rule tuples]} for every Role the release creates;
    `cluster`: the discovery ClusterRole's rules (None: no cluster-wide RBAC)."""
    check_cluster_rbac(docs, label, cluster)
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in by_kind(docs, "Role")}
    got = {}
    for (ns, _), role in roles.items():
        got.setdefault(ns, []).extend(rules_of(role))
        for rule in role.get("rules", []):
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                check("*" not in rule.get(field, []), f"{label}: wildcard in {ns} {rule}")
    got = {ns: sorted(r) for ns, r in got.items()}
    want = {ns: sorted(r) for ns, r in expected.items()}
    check(got == want, f"{label}: RBAC rules\n  got  {got}\n  want {want}")
    sa = by_kind(docs, "ServiceAccount")[0]["metadata"]["name"]
    bindings = by_kind(docs, "RoleBinding")
    check(len(bindings) == len(roles), f"{label}: {len(bindings)} RoleBindings for {len(roles)} Roles")
    for b in bindings:
        key = (b["metadata"]["namespace"], b["roleRef"]["name"])
        check(key in roles and b["roleRef"]["kind"] == "Role", f"{label}: binding {key} to a missing Role")
        check(b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}],
              f"{label}: binding subjects {b['subjects']}")


def check_pod(docs, label, replicas):
    dep = by_kind(docs, "Deployment")[0]
    check(dep["spec"]["replicas"] == replicas, f"{label}: replicas {dep['spec']['replicas']} != {replicas}")
    pod = dep["spec"]["template"]["spec"]
    check(pod.get("automountServiceAccountToken") is False, f"{label}: token automount not off")
    psc = pod.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, f"{label}: pod runAsNonRoot")
    check(psc.get("seccompProfile") == {"type": "RuntimeDefault"}, f"{label}: seccomp {psc}")
    [c] = pod["containers"]
    sc = c.get("securityContext", {})
    check(sc.get("readOnlyRootFilesystem") is True, f"{label}: readOnlyRootFilesystem")
    check(sc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation")
    check(sc.get("capabilities") == {"drop": ["ALL"]}, f"{label}: capabilities {sc.get('capabilities')}")
    check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", f"{label}: liveness")
    check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{label}: readiness")
    res = c.get("resources", {})
    check(res.get("requests") and res.get("limits", {}).get("memory"), f"{label}: resources {res}")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    sa_vol = vols.get(mounts.get("/var/run/secrets/kubernetes.io/serviceaccount"), {})
    sources = sa_vol.get("projected", {}).get("sources", [])
    paths = set()
    for s in sources:
        if "serviceAccountToken" in s:
            paths.add(s["serviceAccountToken"]["path"])
        for kind in ("configMap", "downwardAPI"):
            paths.update(i["path"] for i in s.get(kind, {}).get("items", []))
    check(paths == {"token", "ca.crt", "namespace"}, f"{label}: projected SA volume has {paths}")
    audit = vols.get(mounts.get("/var/lib/openai-key-rotator"), {})
    check("emptyDir" in audit, f"{label}: no writable emptyDir for the audit file")
    env = {e["name"]: e for e in c.get("env", [])}
    check(env.get("POD_NAME", {}).get("valueFrom") and env.get("POD_NAMESPACE", {}).get("valueFrom"),
          f"{label}: POD_NAME/POD_NAMESPACE from the downward API")
    # With HA the leader advertises http://POD_IP:port on the Lease for followers to forward to.
    pod_ip = env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    check(pod_ip == ("status.podIP" if replicas > 1 else None),
          f"{label}: POD_IP from status.podIP only with HA (got {pod_ip!r}, {replicas} replicas)")
    check(c["args"][:1] == ["run"], f"{label}: args {c['args']}")
    check("checksum/config" in dep["spec"]["template"]["metadata"].get("annotations", {}),
          f"{label}: no config checksum annotation")
    pdbs = by_kind(docs, "PodDisruptionBudget")
    check(bool(pdbs) == (replicas > 1), f"{label}: {len(pdbs)} PDBs with {replicas} replicas")


def peer_rules(docs):
    """(ingress, egress): does the NetworkPolicy let the daemon's own pods reach each other's
    API port (a follower forwarding to the leader)? The peer selector must be the policy's
    own pod selector, which must select the Deployment's pods."""
    [np] = by_kind(docs, "NetworkPolicy")
    sel = np["spec"]["podSelector"]
    pod_labels = by_kind(docs, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    if not sel.get("matchLabels") or not sel["matchLabels"].items() <= pod_labels.items():
        return (False, False)
    peer = lambda rule, key: (rule.get("ports") == [{"port": "http", "protocol": "TCP"}]
                              and rule.get(key) == [{"podSelector": sel}])
    return (any(peer(r, "from") for r in np["spec"].get("ingress", [])),
            any(peer(r, "to") for r in np["spec"].get("egress", [])))


def check_peer_controls():
    """Negative controls of the HA forwarding checks: without leader election there is no
    POD_IP and no peer rule, and the peer check notices a missing rule."""
    values = load_values("values-all")
    values["leaderElection"]["enabled"] = False
    docs = docs_of(render(values))
    check(peer_rules(docs) == (False, False), f"values-all without HA: peer rules {peer_rules(docs)}")
    [c] = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    check("POD_IP" not in {e["name"] for e in c.get("env", [])}, "values-all without HA: POD_IP set")
    docs = docs_of(render(load_values("values-all")))
    [np] = by_kind(docs, "NetworkPolicy")
    np["spec"]["egress"] = [r for r in np["spec"]["egress"] if "to" not in r or "podSelector" not in r["to"][0]]
    check(peer_rules(docs) == (True, False), f"the peer check missed a removed egress rule: {peer_rules(docs)}")


def admin_key_volumes(docs):
    [dep] = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    return ({v["name"] for v in pod.get("volumes", [])} | mounts) & {"openai-admin-key"}


def check_admin_key_source():
    """With openai.adminKeyVaultPath the admin key comes from Vault: no Secret is needed or
    mounted, and the config names the path (values-ha); without it (values-required, the
    control) the Secret is mounted and the config names its file."""
    docs = docs_of(render(load_values("values-ha")))
    toml = config_toml(docs)
    check(not admin_key_volumes(docs), "values-ha: the admin-key Secret is still mounted")
    check('admin_key_vault_path = "ops/openai-admin"' in toml and "admin_key_file" not in toml,
          f"values-ha: config has no admin_key_vault_path:\n{toml}")
    check('admin_key_max_age = "30d"' in toml and 'admin_key_expiry = "45d"' in toml,
          "values-ha: admin-key age and expiry not rendered")
    docs = docs_of(render(load_values("values-required")))
    toml = config_toml(docs)
    check(admin_key_volumes(docs) == {"openai-admin-key"}, "values-required: no admin-key Secret mounted")
    check("admin_key_file" in toml and "admin_key_vault_path" not in toml,
          "values-required: config does not name the admin key file")


def check_no_inline_secrets(docs, rendered, label):
    check(not by_kind(docs, "Secret"), f"{label}: the chart must reference Secrets, not create them")
    for name, text in rendered:
        check("sk-" not in text and "hvs." not in text, f"{label}: key-like value in {name}")
    for d in by_kind(docs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                check(e["name"] not in ("OPENAI_ADMIN_KEY", "VAULT_TOKEN", "OKR_TOKEN"),
                      f"{label}: secret passed as env {e['name']}")


def config_toml(docs):
    [cm] = [d for d in by_kind(docs, "ConfigMap") if "config.toml" in d.get("data", {})]
    return cm["data"]["config.toml"]


def check_variant(name, out_dir, expect):
    values = load_values(name)
    label = name
    try:
        rendered = render(values)
    except helm.HelmError as e:
        failures.append(f"{label}: render failed: {e}")
        return
    lint(values, label)
    docs = docs_of(rendered)
    d = out_dir / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.toml").write_text(config_toml(docs))
    manifest = d / "manifest.yaml"
    manifest.write_text(manifest_text(rendered))
    for v in KUBE_VERSIONS:
        r = run([str(BIN / "kubernetes-validate"), "--strict", "-k", v, str(manifest)])
        check(r.returncode == 0, f"{label}: kubernetes-validate --strict -k {v}:\n{r.stdout}{r.stderr}")
        # The two prometheus-operator kinds have no schema; everything else must be checked.
        unchecked = [l for l in (r.stdout + r.stderr).splitlines() if "find schema" in l]
        check(all("ServiceMonitor" in l or "PrometheusRule" in l for l in unchecked),
              f"{label}: unvalidated kinds: {unchecked}")
    r = run([str(BIN / "yamllint"), "--strict", "-c", str(YAMLLINT_CONFIG), str(manifest)])
    check(r.returncode == 0, f"{label}: yamllint:\n{r.stdout}{r.stderr}")
    check_pod(docs, label, expect["replicas"])
    check_rbac(docs, label, expect["rbac"], expect.get("cluster_rbac"))
    check_no_inline_secrets(docs, rendered, label)
    toml = config_toml(docs)
    check(f"enabled = {'true' if expect['replicas'] > 1 else 'false'}" in toml,
          f"{label}: leader election in the config does not match the replicas")
    kinds = {d["kind"] for d in docs}
    for kind in ("ServiceMonitor", "PrometheusRule", "NetworkPolicy"):
        check((kind in kinds) == expect["all"], f"{label}: {kind} rendered={kind in kinds}")
    if "NetworkPolicy" in kinds:
        ha = expect["replicas"] > 1
        check(peer_rules(docs) == (ha, ha),
              f"{label}: NetworkPolicy rules between the replicas (ingress, egress) = {peer_rules(docs)}, want HA={ha}")
    if expect["all"]:
        check_prometheus_rule(docs, label)
        dash = [x for x in by_kind(docs, "ConfigMap") if x["metadata"]["name"].endswith("-dashboard")]
        check(len(dash) == 1 and json.loads(dash[0]["data"]["openai-key-rotator.json"]) == json.loads(DASHBOARD.read_text()),
              f"{label}: dashboard ConfigMap differs from deploy/grafana/dashboard.json")
        sm = by_kind(docs, "ServiceMonitor")[0]
        check(sm["spec"]["endpoints"][0]["relabelings"] == [{"targetLabel": "job", "replacement": "openai-key-rotator"}],
              f"{label}: ServiceMonitor job relabeling")


def check_prometheus_rule(docs, label):
    [pr] = by_kind(docs, "PrometheusRule")
    groups = pr["spec"]["groups"]
    plain = yaml.safe_load(RULES.read_text())["groups"]
    check(groups[: len(plain)] == plain, f"{label}: PrometheusRule groups differ from deploy/prometheus/rules.yaml")
    extra = groups[len(plain):]
    want = [{"name": "openai-key-rotator-thresholds", "rules": [
        {"record": "openai_key_rotator:max_key_age_seconds", "expr": "vector(604800)", "labels": {"target": "chatbot"}},
        {"record": "openai_key_rotator:max_key_age_seconds", "expr": "vector(43200)", "labels": {"target": "batch"}},
    ]}]
    check(extra == want, f"{label}: threshold group {extra}")


def check_negative(name, needles, lint_fails=True):
    values = load_values(name)
    try:
        render(values)
        failures.append(f"{name}: rendered, but must be refused")
        return
    except helm.HelmError as e:
        msg = str(e)
    check(all(n in msg for n in needles), f"{name}: refusal does not say {needles}: {msg}")
    if not lint_fails:
        # Helm lints in "lint mode", where `required` and `fail` only log: nothing to check.
        return
    res = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    text = json.dumps(res)
    check(res.get("errors") or any(m.get("severity", 0) >= 3 for m in res.get("messages", [])),
          f"{name}: helm lint passed")
    check(all(n in text for n in needles), f"{name}: lint does not say {needles}: {text}")


def main():
    if sys.argv[1:] == ["--write-manifests"]:
        MANIFESTS.parent.mkdir(parents=True, exist_ok=True)
        MANIFESTS.write_text(render_manifests())
        print(f"wrote {MANIFESTS}")
        return 0
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(sys.argv[1])
    workload = WORKLOAD_RULES
    secret_read = lambda names: (("",), ("secrets",), ("get", "list", "watch"), tuple(names))
    secret_patch = lambda names: (("",), ("secrets",), ("patch",), tuple(names))
    leases = [
        (("coordination.k8s.io",), ("leases",), ("create",), ()),
        (("coordination.k8s.io",), ("leases",), ("get", "update"), ("okr-openai-key-rotator",)),
    ]
    check_variant("values-required", out_dir, {
        "replicas": 1, "all": False, "rbac": {"prod": workload(["deployments"])}})
    check_variant("values-ha", out_dir, {
        "replicas": 2, "all": False,
        "rbac": {"prod": workload(["deployments", "statefulsets"]), NAMESPACE: leases}})
    check_variant("values-all", out_dir, {
        "replicas": 3, "all": True, "cluster_rbac": DISCOVERY_RULES,
        "rbac": {
            "prod": workload(["deployments", "statefulsets"], rollouts=True)
            + [secret_read(["chatbot-openai"]), secret_patch(["chatbot-openai"])],
            # The batch target's waves: every wave's workloads get their rules.
            "search": workload(["daemonsets", "deployments", "statefulsets"]),
            "staging": workload(["deployments"]),
            # A namespace with only a Rollout: Argo's resource, pods and Events, no apps group.
            "edge": workload([], rollouts=True),
            "shared": [secret_read(["search-openai"])],
            NAMESPACE: leases,
        }})
    check_peer_controls()
    check_admin_key_source()
    # Negative control: values-all with discovery off renders no cluster-wide RBAC.
    values = load_values("values-all")
    values["discovery"]["enabled"] = False
    check_cluster_rbac(docs_of(render(values)), "values-all with discovery off", None)
    check_negative("bad-wrong-type", ["leaderElection", "replicas", "integer"])
    check_negative("bad-unknown-key", ["replicaCount", "not allowed"])
    check_negative("bad-missing-admin-key", ["openai.adminKeySecret.name is required"], lint_fails=False)
    check_negative("bad-no-targets", ["at least one target is required"], lint_fails=False)
    check_negative("bad-waves-and-workloads", ["oneOf"])
    # Drift: deploy/manifests is the chart's output with the committed minimal values.
    check(MANIFESTS.is_file() and MANIFESTS.read_text() == render_manifests(),
          "deploy/manifests/openai-key-rotator.yaml is out of date: run tests/chart/check_chart.py --write-manifests")
    # The chart's own files lint too.
    r = run([str(BIN / "yamllint"), "--strict", "-c", str(YAMLLINT_CONFIG), str(CHART / "values.yaml"),
             str(CHART / "Chart.yaml"), str(RULES), str(RULES.with_name("rules.test.yaml"))]
            + [str(p) for p in sorted(VALUES.glob("*.yaml"))])
    check(r.returncode == 0, f"yamllint of chart/values/rules files:\n{r.stdout}{r.stderr}")
    if failures:
        print("\n".join(f"FAIL: {f}" for f in failures))
        return 1
    print(json.dumps({"ok": True, "configs": sorted(str(p) for p in out_dir.glob("*/config.toml"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
