"""Cluster manifests: render KubeRay RayJobs and the RayService from one RayCluster template, and validate.

``infra/kuberay/raycluster.yaml`` is the one hand-written pod layout (head, CPU and GPU worker groups,
token authentication, IRSA service account). Every job spec in ``jobs/configs/`` becomes a RayJob that
runs that spec on a cluster of the same layout, and ``serve/config.yaml`` becomes the ``serveConfigV2`` of
the RayService. The generated files are committed so that ``kubectl apply -f`` works without Python; a
test re-renders them and fails when they drift::

    python -m visuray.infra render            # (re)write infra/kuberay/rayjobs/*.yaml and rayservice.yaml
    python -m visuray.infra check             # exit 1 if a committed manifest differs from its rendering
    python -m visuray.infra validate          # KubeRay CRD schemas + the Ray cluster-launcher schema

Validation uses each CRD's ``openAPIV3Schema`` with ``jsonschema``, made strict the way the API server's
strict field validation is: an unknown field (a typo such as ``enableInTreeAutoScaling``) is an error.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from visuray.cluster import SERVE_ENV_DEFAULTS
from visuray.config import read_yaml
from visuray.jobspec import job_kind

REPO_ROOT = Path(__file__).resolve().parents[2]
RAYCLUSTER = Path("infra/kuberay/raycluster.yaml")
RAYJOBS_DIR = Path("infra/kuberay/rayjobs")
RAYSERVICE = Path("infra/kuberay/rayservice.yaml")
SERVE_CONFIG = Path("serve/config.yaml")
JOB_CONFIGS = Path("jobs/configs")
LAUNCHER_CONFIG = Path("infra/cluster-launcher/aws.yaml")
# Where the images put the repository (infra/docker/Dockerfile.*): the RayJob submitter runs the head's
# image, so this path exists where `ray job submit` packs the working_dir.
IMAGE_APP_DIR = "/home/ray/visuray"
# Seconds a finished RayJob (and so its logs) is kept before the operator deletes it with its cluster.
RAYJOB_TTL_SECONDS = 3600
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}

try:  # the C loader reads the megabyte-sized CRDs several times faster
    _YamlLoader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _YamlLoader = yaml.SafeLoader


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a (multi-document) manifest file."""
    with open(path) as fh:
        return [doc for doc in yaml.load_all(fh, Loader=_YamlLoader) if doc is not None]


# ------------------------------------------------------------------------------------------ rendering
class _ManifestDumper(yaml.SafeDumper):
    """Block style, keys in insertion order, multi-line strings (entrypoints, embedded YAML) as ``|``."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def dump_manifest(manifest: dict[str, Any], header: Sequence[str]) -> str:
    body = yaml.dump(manifest, Dumper=_ManifestDumper, sort_keys=False, default_flow_style=False, width=110)
    return "".join(f"# {line}\n" if line else "#\n" for line in header) + body


def cluster_template(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """The ``spec`` of the RayCluster in ``infra/kuberay/raycluster.yaml``: the pods every manifest runs."""
    clusters = [doc for doc in load_documents(repo / RAYCLUSTER) if doc.get("kind") == "RayCluster"]
    if len(clusters) != 1:
        raise ValueError(f"{RAYCLUSTER} must hold exactly one RayCluster, found {len(clusters)}")
    return clusters[0]["spec"]


def job_specs(repo: Path = REPO_ROOT) -> list[Path]:
    """Job specs (top-level ``jobs/configs/*.yaml`` with a ``job:`` key), relative to ``repo``."""
    specs = []
    for path in sorted((repo / JOB_CONFIGS).glob("*.yaml")):
        if "job" in read_yaml(path):
            specs.append(path.relative_to(repo))
    return specs


def resource_name(stem: str) -> str:
    """A Kubernetes object name (RFC 1123 label) from a file stem: ``build_index_vit_tiny`` -> ``build-index-vit-tiny``."""
    name = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")
    if not name:
        raise ValueError(f"cannot make a Kubernetes name from {stem!r}")
    return name[:50].rstrip("-")  # KubeRay derives longer names (cluster, pods, services) from it


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "visuray", "app.kubernetes.io/component": component}


def render_rayjob(spec: Path, cluster_spec: dict[str, Any], repo: Path = REPO_ROOT) -> dict[str, Any]:
    """The RayJob that runs ``spec`` (relative to the repository) on a cluster of ``cluster_spec``'s layout."""
    job = read_yaml(repo / spec)["job"]
    kind = job_kind(str(job), str(spec))
    runtime_env = {
        # jobs/ and serve/ from the image; the library itself is installed there, so it is left out.
        "working_dir": IMAGE_APP_DIR,
        "excludes": ["platform", "**/__pycache__"],
        "env_vars": {"RAY_TRAIN_V2_ENABLED": "1"},
    }
    name = resource_name(spec.stem)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": {**_labels("rayjob"), "visuray/job": kind.name}},
        "spec": {
            "entrypoint": f"python {kind.script} {spec.as_posix()}",
            "runtimeEnvYAML": yaml.dump(runtime_env, Dumper=_ManifestDumper, sort_keys=False),
            "metadata": {"visuray_job": kind.name, "visuray_name": name},
            "shutdownAfterJobFinishes": True,  # the cluster exists for this job only
            "ttlSecondsAfterFinished": RAYJOB_TTL_SECONDS,
            "backoffLimit": 0,  # a failed job is looked at, not retried blindly
            "rayClusterSpec": copy.deepcopy(cluster_spec),
        },
    }


def with_container_env(cluster_spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """A copy of ``cluster_spec`` whose every Ray container (head and workers) also has ``env``; a
    variable the template already sets keeps the template's value."""
    spec = copy.deepcopy(cluster_spec)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for container in (c for group in groups for c in group["template"]["spec"]["containers"]):
        present = {entry["name"] for entry in container.setdefault("env", [])}
        container["env"] += [{"name": k, "value": v} for k, v in env.items() if k not in present]
    return spec


def render_rayservice(serve_config_text: str, cluster_spec: dict[str, Any]) -> dict[str, Any]:
    """The RayService whose ``serveConfigV2`` is the Serve config file's text, verbatim, on pods that run
    Ray Serve's throughput-optimised request path (:data:`visuray.cluster.SERVE_ENV_DEFAULTS`)."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "visuray", "labels": _labels("rayservice")},
        "spec": {
            "serveConfigV2": serve_config_text,
            "rayClusterConfig": with_container_env(cluster_spec, SERVE_ENV_DEFAULTS),
        },
    }


def rendered_manifests(repo: Path = REPO_ROOT) -> dict[Path, str]:
    """Every generated manifest: path relative to ``repo`` -> file text."""
    cluster_spec = cluster_template(repo)
    out: dict[Path, str] = {}
    for spec in job_specs(repo):
        header = [
            f"RayJob for {spec.as_posix()}. Generated by `python -m visuray.infra render` from that spec",
            f"and {RAYCLUSTER.as_posix()}: edit those and re-render, never this file.",
            f"  kubectl apply -f {(RAYJOBS_DIR / (spec.stem + '.yaml')).as_posix()}",
        ]
        out[RAYJOBS_DIR / f"{spec.stem}.yaml"] = dump_manifest(
            render_rayjob(spec, cluster_spec, repo), header
        )
    header = [
        f"RayService for {SERVE_CONFIG.as_posix()} (embedded verbatim as serveConfigV2). Generated by",
        f"`python -m visuray.infra render` from that file and {RAYCLUSTER.as_posix()}: edit those, re-render.",
        f"  kubectl apply -f {RAYSERVICE.as_posix()}",
    ]
    serve_text = (repo / SERVE_CONFIG).read_text()
    out[RAYSERVICE] = dump_manifest(render_rayservice(serve_text, cluster_spec), header)
    return out


def stale_rayjobs(repo: Path = REPO_ROOT) -> list[Path]:
    """Committed RayJob files whose job spec no longer exists."""
    expected = {RAYJOBS_DIR / f"{spec.stem}.yaml" for spec in job_specs(repo)}
    return [
        p.relative_to(repo)
        for p in sorted((repo / RAYJOBS_DIR).glob("*.yaml"))
        if p.relative_to(repo) not in expected
    ]


def drifted(repo: Path = REPO_ROOT) -> list[str]:
    """Generated manifests that are missing, differ from their rendering, or belong to no spec."""
    problems = []
    for rel, text in rendered_manifests(repo).items():
        path = repo / rel
        if not path.exists():
            problems.append(f"{rel}: missing")
        elif path.read_text() != text:
            problems.append(f"{rel}: differs from its rendering")
    problems += [f"{rel}: no job spec renders it" for rel in stale_rayjobs(repo)]
    return problems


def write_rendered(repo: Path = REPO_ROOT) -> list[Path]:
    """Write every generated manifest and delete RayJobs of removed specs; return what changed."""
    changed = []
    for rel, text in rendered_manifests(repo).items():
        path = repo / rel
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(rel)
    for rel in stale_rayjobs(repo):
        (repo / rel).unlink()
        changed.append(rel)
    return changed


# ----------------------------------------------------------------------------------------- validation
def _strict(node: Any) -> Any:
    """A JSON Schema from an OpenAPI v3 structural schema: ``x-kubernetes-*`` keys dropped, unknown
    fields rejected wherever the schema lists the properties and does not preserve unknown fields."""
    if not isinstance(node, dict):
        return node
    out = {key: value for key, value in node.items() if not key.startswith("x-kubernetes-")}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: _strict(schema) for name, schema in out["properties"].items()}
        if "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [_strict(schema) for schema in out[key]]
    return out


def crd_schema(crd_path: str | Path, version: str = "v1") -> dict[str, Any]:
    """The strict JSON Schema of one version of a CustomResourceDefinition."""
    (crd,) = load_documents(crd_path)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return _strict(entry["schema"]["openAPIV3Schema"])
    raise ValueError(f"{crd_path} has no version {version!r}")


def _errors(instance: Any, schema: dict[str, Any], label: str) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    found = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    messages = []
    for err in found:
        where = ".".join(str(p) for p in err.absolute_path) or "<root>"
        message = err.message if len(err.message) < 300 else err.message[:300] + "..."
        messages.append(f"{label}: {where}: {message}")
    return messages


def manifest_errors(manifest: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Schema violations of one manifest, each naming the object and the dotted path of the field."""
    label = f"{manifest.get('kind')} {manifest.get('metadata', {}).get('name')}"
    return _errors(manifest, schema, label)


def kuberay_manifest_paths(repo: Path = REPO_ROOT) -> list[Path]:
    return sorted((repo / "infra/kuberay").rglob("*.yaml"))


def launcher_schema() -> dict[str, Any]:
    """The cluster-launcher schema that the installed Ray validates ``ray up`` configs with."""
    spec = importlib.util.find_spec("ray")  # found without importing Ray
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ray is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def validate_infra(repo: Path = REPO_ROOT, schemas_dir: Path | None = None) -> list[str]:
    """Every KubeRay manifest against its CRD, and the launcher YAML against Ray's schema."""
    schemas_dir = schemas_dir or repo.parent / "shared" / "schemas" / "kuberay"
    schemas = {kind: crd_schema(schemas_dir / name) for kind, name in CRD_FILES.items()}
    problems = []
    for path in kuberay_manifest_paths(repo):
        for doc in load_documents(path):
            if doc.get("kind") in schemas:
                problems += [
                    f"{path.relative_to(repo)}: {e}" for e in manifest_errors(doc, schemas[doc["kind"]])
                ]
    (launcher,) = load_documents(repo / LAUNCHER_CONFIG)
    problems += _errors(launcher, launcher_schema(), str(LAUNCHER_CONFIG))
    return problems


# Credentials that must never be committed: AWS key ids, secret keys given a value, private keys, Ray
# tokens given inline instead of through a Secret or a token file.
_SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"(?i)aws_?secret_?access_?key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{20,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "inline Ray token": re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[A-Za-z0-9]{16,}"),
    "Kubernetes Secret with data": re.compile(r"(?m)^kind:\s*Secret\s*$"),
}


def find_plaintext_secrets(text: str) -> list[str]:
    """Names of the credential patterns that occur in ``text``."""
    return [name for name, pattern in _SECRET_PATTERNS.items() if pattern.search(text)]


# ---------------------------------------------------------------------------------------- Dockerfiles
DOCKERFILE_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with ``\\`` continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if not full:
            continue
        word, _, args = full.partition(" ")
        if word.upper() not in DOCKERFILE_INSTRUCTIONS:
            raise ValueError(f"unknown Dockerfile instruction {word!r} in: {full[:80]}")
        instructions.append((word.upper(), args.strip()))
    if pending:
        raise ValueError("Dockerfile ends inside a line continuation")
    return instructions


def copy_sources(args: str) -> list[str]:
    """The build-context sources of a ``COPY``/``ADD`` (flags and the destination dropped)."""
    parts = [p for p in shlex.split(args) if not p.startswith("--")]
    return parts[:-1]


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visuray.infra", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["render", "check", "validate"])
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="repository root")
    parser.add_argument("--schemas", type=Path, default=None, help="folder of the KubeRay CRD YAML files")
    args = parser.parse_args(argv)
    if args.command == "render":
        for rel in write_rendered(args.repo):
            print(f"wrote {rel}")
        return 0
    problems = drifted(args.repo) if args.command == "check" else validate_infra(args.repo, args.schemas)
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print("ok")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
