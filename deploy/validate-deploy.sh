#!/usr/bin/env bash
# Checks the deployment files that no cluster or Docker engine runs here, offline:
#   - deploy/k8s/*.yaml against the bundled Kubernetes schemas (kubernetes-validate --strict:
#     unknown fields are errors, and so is a kind it has no schema for), for each version in
#     $MAILPUMP_KUBE_VERSIONS; kustomization.yaml (no Kubernetes kind) lists files that exist
#     and every manifest but secret.yaml; the ConfigMap's mailpump.toml parses, has [cluster]
#     enabled and listens on the port the Deployment's probes use;
#   - deploy/compose.replicas.yaml parses and its mailpump service can be scaled: no
#     container_name, no fixed host port, and its config has [cluster] enabled.
# kubernetes-validate (pinned) goes into the project's venv (deploy/services.sh: $MAILPUMP_VENV,
# default ~/.cache/mailpump/venv), created if missing. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=deploy/services.sh
source deploy/services.sh

KV_VERSION=1.37.0
KUBE_VERSIONS=${MAILPUMP_KUBE_VERSIONS:-1.30.0 1.37.0}
COMPOSE=deploy/compose.replicas.yaml

if [ "$("$MP_VENV/bin/kubernetes-validate" --version 2>/dev/null || true)" != "$KV_VERSION" ]; then
  mp_log "installing kubernetes-validate $KV_VERSION into $MP_VENV"
  [ -x "$MP_VENV/bin/pip" ] || python3 -m venv "$MP_VENV"
  "$MP_VENV/bin/pip" install -q "kubernetes-validate==$KV_VERSION"
fi

manifests=()
for f in deploy/k8s/*.yaml; do
  [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
[ ${#manifests[@]} -gt 0 ] || { echo "validate-deploy: no manifests in deploy/k8s" >&2; exit 1; }

fail=0
for v in $KUBE_VERSIONS; do
  echo "== kubernetes-validate --strict -k $v (${#manifests[@]} files)"
  result=$("$MP_VENV/bin/kubernetes-validate" --strict -k "$v" "${manifests[@]}" 2>&1) || fail=1
  printf '%s\n' "$result"
  # a kind or apiVersion without a schema is only a WARN (exit 0) to the validator
  if grep -q "Couldn't find schema" <<<"$result"; then fail=1; fi
done
[ $fail -eq 0 ] || { echo "validate-deploy: Kubernetes manifests FAILED" >&2; exit 1; }

echo "== deploy/k8s consistency, $COMPOSE"
"$MP_VENV/bin/python" - "$COMPOSE" <<'PY'
import os, sys, tomllib, yaml

errors = []
def check(ok, msg):
    if not ok:
        errors.append(msg)

def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]

k8s = "deploy/k8s"
objs = {}
for name in sorted(os.listdir(k8s)):
    if name.endswith(".yaml") and name != "kustomization.yaml":
        for d in docs(os.path.join(k8s, name)):
            objs[d["kind"]] = d

kust_path = os.path.join(k8s, "kustomization.yaml")
if os.path.exists(kust_path):
    listed = docs(kust_path)[0].get("resources", [])
    for r in listed:
        check(os.path.exists(os.path.join(k8s, r)), f"kustomization.yaml: {r} does not exist")
    for name in os.listdir(k8s):
        if name.endswith(".yaml") and name not in ("kustomization.yaml", "secret.yaml"):
            check(name in listed, f"kustomization.yaml does not list {name}")
    check("secret.yaml" not in listed,
          "kustomization.yaml lists secret.yaml: apply -k would overwrite the real Secret")

def config_of(text, where):
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        errors.append(f"{where}: mailpump.toml does not parse: {e}")
        return {}

cm, dep = objs.get("ConfigMap"), objs.get("Deployment")
check(cm is not None and dep is not None, "deploy/k8s needs a ConfigMap and a Deployment")
if cm and dep:
    conf = config_of(cm["data"]["mailpump.toml"], "configmap.yaml")
    check(conf.get("cluster", {}).get("enabled") is True, "configmap.yaml: [cluster] enabled = true missing")
    listen = conf.get("metrics", {}).get("listen", "")
    check(listen.startswith("0.0.0.0:"), f"configmap.yaml: [metrics] listen {listen!r} is not 0.0.0.0:PORT")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    check(str(ports.get("metrics")) == listen.rpartition(":")[2],
          f"deployment.yaml: containerPort 'metrics' {ports.get('metrics')} is not the port of {listen!r}")
    env = {e["name"]: e for e in c.get("env", [])}
    check("MAILPUMP_STORE__URI" in env or "uri" in conf.get("store", {}), "no [store] uri and no MAILPUMP_STORE__URI")
    check(env.get("MAILPUMP_CLUSTER__INSTANCE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
          == "metadata.name", "deployment.yaml: MAILPUMP_CLUSTER__INSTANCE is not the pod name")
    for probe in ("startupProbe", "readinessProbe"):
        check(c.get(probe, {}).get("httpGet", {}).get("path") == "/healthz", f"deployment.yaml: {probe} is not httpGet /healthz")
    check(c.get("livenessProbe", {}).get("tcpSocket", {}).get("port") == "metrics", "deployment.yaml: livenessProbe is not tcpSocket on port metrics")

compose_path = sys.argv[1]
compose = docs(compose_path)[0]
mp = (compose.get("services") or {}).get("mailpump")
check(isinstance(mp, dict), f"{compose_path}: no mailpump service")
if isinstance(mp, dict):
    check("container_name" not in mp, f"{compose_path}: mailpump has container_name (breaks --scale)")
    for p in mp.get("ports", []):
        if isinstance(p, dict):
            host = str(p.get("published", ""))
        else:
            s = str(p).split("/")[0]
            if s.startswith("["):                      # [::1]:HOST:CONTAINER
                s = s.split("]", 1)[1].lstrip(":")
                parts = ["", *s.split(":")]
            else:
                parts = s.split(":")
            host = parts[-2] if len(parts) >= 2 else ""
        # a range (8000-8010) gives each replica its own port; one fixed port cannot be shared
        check(host == "" or "-" in host, f"{compose_path}: mailpump publishes fixed host port {p!r} (breaks --scale)")
    for c in mp.get("configs", []):
        source = c["source"] if isinstance(c, dict) else c
        text = (compose.get("configs") or {}).get(source, {}).get("content")
        if text is not None:
            conf = config_of(text, f"{compose_path} configs.{source}")
            check(conf.get("cluster", {}).get("enabled") is True, f"{compose_path}: [cluster] enabled = true missing")

for e in errors:
    print("FAIL", e)
if errors:
    sys.exit(1)
print(f"ok: {len(objs)} Kubernetes objects consistent; {compose_path}: mailpump scalable")
PY
echo "validate-deploy: ok"
