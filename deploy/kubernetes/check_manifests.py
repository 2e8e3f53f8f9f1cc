#!/usr/bin/env python3
"""Offline checks of deploy/kubernetes/ that a schema validator cannot do.

kubernetes-validate checks the core kinds against the Kubernetes OpenAPI
schemas (run by .ci/validate-deploy). This script adds:
  * structural JSON-schema checks of the custom resources (ServiceMonitor,
    PrometheusRule, RabbitmqCluster), whose CRD schemas are not available
    offline;
  * the references between objects: selectors that must match pod labels,
    named ports, the ConfigMap/Secret the pods use, the spool and secret
    mount paths, the HPA target;
  * kustomization.yaml lists every manifest (except *.example.yaml);
  * prometheusrule.yaml carries exactly the rules of
    deploy/prometheus/alerts.yml.

    check_manifests.py                      # check; quiet on success, exit 1 on failure
    check_manifests.py --sync               # rewrite prometheusrule.yaml from alerts.yml
    check_manifests.py --print-config FILE  # write the ConfigMap's hookrelay.toml to FILE

Needs PyYAML and jsonschema (both come with kubernetes-validate).
"""

from __future__ import annotations

import glob
import os
import sys
import tomllib

import jsonschema
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
# Set by the Dockerfile's ENV (environment variables beat the config file).
IMAGE_ADMIN_LISTEN = "0.0.0.0:9090"
IMAGE_SPOOL_DIR = "/var/lib/hookrelay/spool"
ALERTS = os.path.join(HERE, "..", "prometheus", "alerts.yml")
PROMETHEUSRULE = os.path.join(HERE, "prometheusrule.yaml")

# --- minimal schemas of the custom resources we use ------------------------
# Written from the CRDs' documented fields; additionalProperties: false where
# a typo would otherwise be silently ignored by the API server's pruning.

METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
    "additionalProperties": False,
}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)(ms|s|m|h|d|w|y))+)$"}
RESOURCES = {
    "type": "object",
    "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}},
    "additionalProperties": False,
}

SERVICEMONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer"},
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "params": {"type": "object",
                                       "additionalProperties": {"type": "array", "items": {"type": "string"}}},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                            "tlsConfig": {"type": "object"},
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

PROMETHEUSRULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string"},
                            "interval": DURATION,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": DURATION,
                                        "keep_firing_for": DURATION,
                                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "annotations": {"type": "object",
                                                        "additionalProperties": {"type": "string"}},
                                    },
                                    "additionalProperties": False,
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                },
                            },
                        },
                        "additionalProperties": False,
                    },
                }
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

RABBITMQCLUSTER = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "rabbitmq.com/v1beta1"},
        "kind": {"const": "RabbitmqCluster"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "image": {"type": "string"},
                "imagePullSecrets": {"type": "array"},
                "service": {"type": "object",
                            "properties": {"type": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]},
                                           "annotations": {"type": "object"},
                                           "ipFamilyPolicy": {"type": "string"}},
                            "additionalProperties": False},
                "persistence": {"type": "object",
                                "properties": {"storageClassName": {"type": "string"},
                                               "storage": {"type": ["string", "integer"]}},
                                "additionalProperties": False},
                "resources": RESOURCES,
                "affinity": {"type": "object"},
                "tolerations": {"type": "array"},
                "rabbitmq": {"type": "object",
                             "properties": {"additionalPlugins": {"type": "array", "items": {"type": "string"}},
                                            "additionalConfig": {"type": "string"},
                                            "advancedConfig": {"type": "string"},
                                            "envConfig": {"type": "string"},
                                            "erlangInetConfig": {"type": "string"}},
                             "additionalProperties": False},
                "tls": {"type": "object"},
                "override": {"type": "object"},
                "skipPostDeploySteps": {"type": "boolean"},
                "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
                "delayStartSeconds": {"type": "integer", "minimum": 0},
                "secretBackend": {"type": "object"},
                "autoEnableAllFeatureFlags": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICEMONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUSRULE_SCHEMA,
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): RABBITMQCLUSTER,
}


def prometheusrule_text() -> str:
    """prometheusrule.yaml: alerts.yml's groups, verbatim, under spec:."""
    with open(ALERTS, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "\n".join(("  " + line) if line else "" for line in lines[start:])
    return (
        "# GENERATED from deploy/prometheus/alerts.yml by\n"
        "#   python3 deploy/kubernetes/check_manifests.py --sync\n"
        "# Do not edit by hand: .ci/validate-deploy fails when the two differ.\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: hookrelay\n"
        "  labels:\n"
        "    app.kubernetes.io/name: hookrelay\n"
        "spec:\n" + body + "\n"
    )


class Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def fail(self, message: str) -> None:
        self.errors.append(message)

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            self.fail(message)


def load(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def matches(selector: dict, labels: dict) -> bool:
    wanted = (selector or {}).get("matchLabels", selector or {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--print-config":
        # For `hookrelay check-config`: the ConfigMap's TOML, written to a file.
        (config,) = [d for d in load(os.path.join(HERE, "configmap.yaml")) if d["kind"] == "ConfigMap"]
        with open(sys.argv[2], "w", encoding="utf-8") as f:
            f.write(config["data"]["hookrelay.toml"])
        return 0
    if sys.argv[1:] == ["--sync"]:
        with open(PROMETHEUSRULE, "w", encoding="utf-8") as f:
            f.write(prometheusrule_text())
        return 0
    if sys.argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2

    c = Checker()
    files = sorted(glob.glob(os.path.join(HERE, "*.yaml")))
    docs: dict[str, list[dict]] = {}
    for path in files:
        try:
            docs[os.path.basename(path)] = load(path)
        except yaml.YAMLError as e:
            c.fail(f"{os.path.basename(path)}: not valid YAML: {e}")

    # kustomization lists every manifest except the example ones.
    kust = docs.get("kustomization.yaml", [{}])[0]
    listed = set(kust.get("resources", []))
    for name in docs:
        if name == "kustomization.yaml":
            continue
        if name.endswith(".example.yaml"):
            c.expect(name not in listed, f"kustomization.yaml must not install the example {name}")
        else:
            c.expect(name in listed, f"kustomization.yaml does not list {name}")
    for name in listed:
        c.expect(name in docs, f"kustomization.yaml lists {name}, which does not exist")

    objects = [(name, d) for name, ds in docs.items() if name != "kustomization.yaml" for d in ds]
    by_kind: dict[str, list[dict]] = {}
    for name, d in objects:
        by_kind.setdefault(d.get("kind", "?"), []).append(d)
        schema = CRD_SCHEMAS.get((d.get("apiVersion"), d.get("kind")))
        if schema:
            for err in jsonschema.Draft7Validator(schema).iter_errors(d):
                path = ".".join(str(p) for p in err.absolute_path)
                c.fail(f"{name}: {d['kind']}/{d['metadata'].get('name')}: {path}: {err.message}")

    def one(kind: str, name: str) -> dict | None:
        found = [d for d in by_kind.get(kind, []) if d["metadata"]["name"] == name]
        c.expect(len(found) == 1, f"expected exactly one {kind} named {name}, found {len(found)}")
        return found[0] if found else None

    sts = one("StatefulSet", "hookrelay")
    secret = one("Secret", "hookrelay-secrets")
    config = one("ConfigMap", "hookrelay-config")
    if not (sts and secret and config):
        return report(c)

    pod = sts["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    c.expect(matches(sts["spec"]["selector"], pod_labels), "StatefulSet selector does not match its pod labels")

    for probe in ("readinessProbe", "livenessProbe"):
        port = container.get(probe, {}).get("httpGet", {}).get("port")
        c.expect(port in port_names, f"{probe} uses port {port!r}, not a container port name")
    c.expect(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readinessProbe must use /readyz")
    c.expect(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "livenessProbe must use /healthz")

    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for sname, svc in services.items():
        c.expect(matches({"matchLabels": svc["spec"].get("selector", {})}, pod_labels),
                 f"Service {sname} selector does not match the relay's pod labels")
        for p in svc["spec"]["ports"]:
            c.expect(p.get("targetPort") in port_names, f"Service {sname} port {p['name']} targets an unknown port")
    governing = services.get(sts["spec"]["serviceName"])
    c.expect(governing is not None and governing["spec"].get("clusterIP") == "None",
             "StatefulSet serviceName must name a headless Service")

    for pdb in by_kind.get("PodDisruptionBudget", []):
        c.expect(matches(pdb["spec"]["selector"], pod_labels), "PodDisruptionBudget selector matches no relay pod")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        c.expect((ref["kind"], ref["name"]) == ("StatefulSet", sts["metadata"]["name"]),
                 "HPA does not target the hookrelay StatefulSet")
        c.expect(hpa["spec"]["minReplicas"] <= sts["spec"]["replicas"] <= hpa["spec"]["maxReplicas"],
                 "StatefulSet replicas outside the HPA's range")

    for sm in by_kind.get("ServiceMonitor", []):
        if sm["metadata"]["name"] != "hookrelay":
            continue  # the RabbitMQ one selects the operator-made Service
        targets = [s for s in services.values() if matches(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        c.expect(len(targets) == 1, f"ServiceMonitor hookrelay selects {len(targets)} Services, expected 1")
        for t in targets:
            names = {p["name"] for p in t["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                c.expect(ep.get("port") in names, f"ServiceMonitor endpoint port {ep.get('port')} not on {t['metadata']['name']}")

    # Configuration: the TOML file from the ConfigMap, the Secret, and the
    # paths and ports named in them.
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    env = {e["name"]: e for e in container.get("env", [])}
    config_path = env.get("HOOKRELAY_CONFIG", {}).get("value", "")
    config_mounts = [mounts[n] for n, v in volumes.items()
                     if v.get("configMap", {}).get("name") == config["metadata"]["name"] and n in mounts]
    c.expect(len(config_mounts) == 1 and config_path == os.path.join(config_mounts[0], "hookrelay.toml"),
             "HOOKRELAY_CONFIG must name hookrelay.toml in the mounted hookrelay-config ConfigMap")
    try:
        settings = tomllib.loads(config["data"]["hookrelay.toml"])
    except (KeyError, tomllib.TOMLDecodeError) as e:
        c.fail(f"hookrelay-config: hookrelay.toml missing or not valid TOML: {e}")
        return report(c)

    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            c.expect(ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys,
                     f"env {e['name']} refers to a missing secret key {ref}")
    for v in secret.get("stringData", {}).values():
        c.expect("NOT-FOR-PRODUCTION" in v, "values in the example Secret must say NOT-FOR-PRODUCTION")

    projected = set()
    for vname, vol in volumes.items():
        if "secret" in vol and vname in mounts:
            c.expect(vol["secret"]["secretName"] == secret["metadata"]["name"], f"volume {vname} mounts another Secret")
            for item in vol["secret"].get("items", []):
                c.expect(item["key"] in secret_keys, f"volume {vname} projects missing key {item['key']}")
                projected.add(os.path.join(mounts[vname], item["path"]))
    sources = settings.get("sources", {})
    c.expect(bool(sources), "hookrelay.toml configures no source")
    for name, source in sources.items():
        c.expect("secrets" not in source, f"sources.{name}: put secrets in the Secret, not in the ConfigMap")
        files = source.get("secret_files", [])
        c.expect(bool(files), f"sources.{name} has no secret_files")
        for f in files:
            c.expect(f in projected, f"sources.{name}.secret_files: {f} is not projected from hookrelay-secrets")

    # The image's environment sets admin.listen and spool.dir; a value in the
    # file would be overridden by it, so the file must not disagree.
    spool_dir = settings.get("spool", {}).get("dir", IMAGE_SPOOL_DIR)
    admin_listen = settings.get("admin", {}).get("listen", IMAGE_ADMIN_LISTEN)
    http_listen = settings.get("http", {}).get("listen", "0.0.0.0:8080")
    c.expect((spool_dir, admin_listen) == (IMAGE_SPOOL_DIR, IMAGE_ADMIN_LISTEN),
             "spool.dir / admin.listen in hookrelay.toml differ from the image's environment, which wins")
    templates = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
    spool_mounts = [mounts[n] for n in templates if n in mounts]
    c.expect(spool_mounts == [spool_dir], "the spool volumeClaimTemplate must be mounted at the spool directory")
    c.expect(admin_listen.endswith(f":{port_names.get('admin')}"), "admin.listen must use the admin container port")
    c.expect(http_listen.endswith(f":{port_names.get('http')}"), "http.listen must use the http container port")

    res = container.get("resources", {})
    c.expect(res.get("requests") == {"cpu": "50m", "memory": "32Mi"}, "unexpected resource requests")
    c.expect(res.get("limits") == {"cpu": "1", "memory": "128Mi"}, "unexpected resource limits")

    rmq = by_kind.get("RabbitmqCluster", [])
    c.expect(len(rmq) == 1 and rmq[0]["spec"].get("replicas") == 3, "expected one RabbitmqCluster with 3 replicas")

    # PrometheusRule == alerts.yml, both structurally and as generated text.
    rules = [d for d in by_kind.get("PrometheusRule", []) if d["metadata"]["name"] == "hookrelay"]
    with open(ALERTS, encoding="utf-8") as f:
        alerts = yaml.safe_load(f)
    c.expect(len(rules) == 1 and rules[0]["spec"] == alerts,
             "prometheusrule.yaml differs from deploy/prometheus/alerts.yml; run: "
             "python3 deploy/kubernetes/check_manifests.py --sync")
    with open(PROMETHEUSRULE, encoding="utf-8") as f:
        c.expect(f.read() == prometheusrule_text(),
                 "prometheusrule.yaml is not the generated text; run: python3 deploy/kubernetes/check_manifests.py --sync")

    return report(c)


def report(c: Checker) -> int:
    for e in c.errors:
        print(f"check_manifests: {e}", file=sys.stderr)
    return 1 if c.errors else 0


if __name__ == "__main__":
    sys.exit(main())
