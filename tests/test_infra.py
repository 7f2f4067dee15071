"""Container images and cluster manifests, checked statically (no Docker, no Kubernetes here).

KubeRay manifests are validated against the CRDs' OpenAPI schemas (strict: unknown fields are errors), the
cluster-launcher YAML against the schema the installed Ray ships, the generated manifests against a fresh
rendering, and every file under infra/ against the security rules: token authentication on every Ray
container, nothing exposed outside the cluster, no credentials in the repository.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.requirements_in_ci import require
from visuray import infra
from visuray.cluster import SERVE_ENV_DEFAULTS
from visuray.config import read_yaml
from visuray.jobspec import JOBS

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
INFRA_FILES = sorted(p for p in (REPO / "infra").rglob("*") if p.is_file())
KUBERAY_FILES = infra.kuberay_manifest_paths(REPO)
DOCKERFILES = {"cpu": REPO / "infra/docker/Dockerfile.cpu", "gpu": REPO / "infra/docker/Dockerfile.gpu"}


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict[str, Any]]:
    require(SCHEMAS.is_dir(), f"KubeRay CRD schemas not found at {SCHEMAS}")
    return {kind: infra.crd_schema(SCHEMAS / name) for kind, name in infra.CRD_FILES.items()}


def kuberay_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in KUBERAY_FILES for doc in infra.load_documents(path)]


def ray_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path, doc in kuberay_docs() if doc["kind"] in infra.CRD_FILES]


def cluster_spec_of(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[doc["kind"]]


def pod_templates(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [group["template"] for group in groups]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


# ------------------------------------------------------------------------------------------- parsing
def test_infra_has_the_expected_files():
    names = {p.relative_to(REPO).as_posix() for p in INFRA_FILES}
    for required in [
        "infra/README.md",
        "infra/docker/Dockerfile.cpu",
        "infra/docker/Dockerfile.gpu",
        "infra/kuberay/raycluster.yaml",
        "infra/kuberay/rayservice.yaml",
        "infra/kuberay/serviceaccount.yaml",
        "infra/cluster-launcher/aws.yaml",
    ]:
        assert required in names


@pytest.mark.parametrize("path", KUBERAY_FILES + [REPO / infra.LAUNCHER_CONFIG], ids=lambda p: p.name)
def test_every_manifest_parses(path):
    docs = infra.load_documents(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict)
        if path.is_relative_to(REPO / "infra/kuberay"):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]


# ------------------------------------------------------------------------------------ schema checks
@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_manifests_match_their_crd(path, crd_schemas):
    docs = [doc for doc in infra.load_documents(path) if doc["kind"] in crd_schemas]
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        assert infra.manifest_errors(doc, crd_schemas[doc["kind"]]) == []


def test_crd_validation_rejects_unknown_fields_and_wrong_types(crd_schemas):
    (cluster,) = [d for d in infra.load_documents(REPO / infra.RAYCLUSTER) if d["kind"] == "RayCluster"]
    bad = copy.deepcopy(cluster)
    bad["spec"]["enableInTreeAutoScaling"] = True  # a typo the API server's strict validation rejects
    bad["spec"]["workerGroupSpecs"][1]["minReplicas"] = "zero"
    bad["spec"]["authOptions"]["mode"] = "password"
    errors = infra.manifest_errors(bad, crd_schemas["RayCluster"])
    assert any("enableInTreeAutoScaling" in e for e in errors)
    assert any("spec.workerGroupSpecs.1.minReplicas" in e for e in errors)
    assert any("spec.authOptions.mode" in e for e in errors)
    assert len(errors) == 3


def test_strict_schema_drops_kubernetes_extensions_and_keeps_preserved_objects():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"x": {"type": "string"}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}},
            "n": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
        },
    }
    strict = infra._strict(schema)
    assert "x-kubernetes-int-or-string" not in strict["properties"]["n"]
    assert strict["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in strict["properties"]["free"]
    assert infra._errors({"a": {"x": "1"}, "free": {"any": 1}, "n": "50%"}, strict, "t") == []
    assert infra._errors({"a": {"y": "1"}}, strict, "t")


def test_cluster_launcher_config_matches_rays_schema():
    (config,) = infra.load_documents(REPO / infra.LAUNCHER_CONFIG)
    schema = infra.launcher_schema()
    assert infra._errors(config, schema, "aws.yaml") == []
    bad = copy.deepcopy(config)
    bad["idle_timeout_minute"] = 5
    bad["available_node_types"]["ray.worker.gpu"].pop("resources")
    errors = infra._errors(bad, schema, "aws.yaml")
    assert any("idle_timeout_minute" in e for e in errors) and any("resources" in e for e in errors)


# --------------------------------------------------------------------------------- rendered manifests
def test_committed_manifests_equal_their_rendering():
    assert infra.drifted(REPO) == [], "run `python -m visuray.infra render` and commit the result"


def test_every_job_spec_has_a_rayjob_that_runs_it():
    specs = infra.job_specs(REPO)
    assert specs, "no job specs found"
    template = infra.cluster_template(REPO)
    for spec in specs:
        (job,) = infra.load_documents(REPO / infra.RAYJOBS_DIR / f"{spec.stem}.yaml")
        kind = JOBS[read_yaml(REPO / spec)["job"]]
        assert job["spec"]["entrypoint"] == f"python {kind.script} {spec.as_posix()}"
        python, script, config = job["spec"]["entrypoint"].split()
        assert (REPO / script).is_file(), f"{script} named by the RayJob for {spec} does not exist"
        assert (REPO / config).is_file()
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == infra.IMAGE_APP_DIR
        assert job["spec"]["rayClusterSpec"] == template


def test_rayservice_embeds_the_serve_config(tmp_path):
    (service,) = infra.load_documents(REPO / infra.RAYSERVICE)
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((REPO / infra.SERVE_CONFIG).read_text())
    for app in embedded["applications"]:
        module = app["import_path"].split(":")[0]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
    # The template's pods, each Ray container also running Serve's throughput-optimised request path.
    served_on = service["spec"]["rayClusterConfig"]
    template = infra.cluster_template(REPO)
    containers = [c for t in pod_templates(served_on) for c in t["spec"]["containers"]]
    assert len(containers) == 3  # head, CPU workers, GPU workers
    for container in containers:
        assert env_of(container)["RAY_SERVE_THROUGHPUT_OPTIMIZED"]["value"] == "1"
    assert infra.with_container_env(template, SERVE_ENV_DEFAULTS) == served_on
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in str(template)


def test_container_env_keeps_the_templates_own_values():
    template = infra.cluster_template(REPO)
    spec = infra.with_container_env(template, {"RAY_AUTH_MODE": "none", "EXTRA": "x"})
    for container in (c for t in pod_templates(spec) for c in t["spec"]["containers"]):
        env = env_of(container)
        assert env["EXTRA"]["value"] == "x"
        assert env["RAY_AUTH_MODE"]["value"] == "token"  # the template's, not overridden
    assert "EXTRA" not in str(template)  # the template itself is not modified


def test_render_detects_drift_and_removes_stale_jobs(tmp_path):
    for rel in [infra.RAYCLUSTER, infra.SERVE_CONFIG, *infra.job_specs(REPO)]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    assert infra.drifted(tmp_path)  # nothing rendered yet: everything is missing
    infra.write_rendered(tmp_path)
    assert infra.drifted(tmp_path) == []
    # the same text as the committed files: rendering depends on the sources only
    for rel, text in infra.rendered_manifests(tmp_path).items():
        assert text == (REPO / rel).read_text()
    serve = tmp_path / infra.SERVE_CONFIG
    serve.write_text(serve.read_text().replace("max_k: 100", "max_k: 50"))
    stale = tmp_path / infra.RAYJOBS_DIR / "removed_spec.yaml"
    stale.write_text("kind: RayJob\n")
    problems = infra.drifted(tmp_path)
    assert any("rayservice.yaml" in p for p in problems) and any("removed_spec" in p for p in problems)
    changed = infra.write_rendered(tmp_path)
    assert infra.RAYSERVICE in changed and not stale.exists()
    (service,) = infra.load_documents(tmp_path / infra.RAYSERVICE)
    assert yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["max_k"] == 50


def test_resource_names_are_valid_kubernetes_names():
    assert infra.resource_name("build_index_vit_tiny") == "build-index-vit-tiny"
    assert infra.resource_name("Finetune.ViT_Tiny--x") == "finetune-vit-tiny--x"
    with pytest.raises(ValueError):
        infra.resource_name("___")


# ------------------------------------------------------------------------------------ cluster layout
def test_raycluster_autoscales_a_cpu_and_a_gpu_group():
    spec = infra.cluster_template(REPO)
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert container["image"].endswith("-gpu")
    for name, group in groups.items():
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
    assert "nvidia.com/gpu" not in str(groups["cpu"]["template"])


def test_pods_get_s3_access_from_an_irsa_service_account():
    (account,) = infra.load_documents(REPO / "infra/kuberay/serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount"
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for path, doc in ray_objects():
        for template in pod_templates(cluster_spec_of(doc)):
            assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], path


# ------------------------------------------------------------------------------------------ security
def test_token_authentication_is_on_for_every_ray_container():
    objects = ray_objects()
    assert {doc["kind"] for _, doc in objects} == {"RayCluster", "RayJob", "RayService"}
    for path, doc in objects:
        spec = cluster_spec_of(doc)
        assert spec["authOptions"]["mode"] == "token", path
        secret = spec["authOptions"]["secretName"]
        autoscaler_env = {e["name"]: e for e in spec["autoscalerOptions"]["env"]}
        containers = [c for t in pod_templates(spec) for c in t["spec"]["containers"]]
        for env in [autoscaler_env, *map(env_of, containers)]:
            assert env["RAY_AUTH_MODE"]["value"] == "token", path
            token = env["RAY_AUTH_TOKEN"]
            assert "value" not in token, f"{path}: the token must come from a Secret"
            assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_nothing_is_exposed_outside_the_cluster():
    for path, doc in kuberay_docs():
        assert doc["kind"] not in {"Ingress", "Route", "Gateway", "HTTPRoute"}, path
        for node in _walk(doc):
            assert node.get("type") not in {"LoadBalancer", "NodePort"}, path
            assert node.get("serviceType", "ClusterIP") == "ClusterIP", path
            assert node.get("enableIngress") is not True, path
            for port in node.get("ports", []) if isinstance(node.get("ports"), list) else []:
                assert "hostPort" not in port, path
        if doc["kind"] in infra.CRD_FILES:
            head = cluster_spec_of(doc)["headGroupSpec"]
            assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
            assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"


def test_cluster_launcher_keeps_auth_on_and_the_dashboard_private():
    (config,) = infra.load_documents(REPO / infra.LAUNCHER_CONFIG)
    options = " ".join(config["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in options and "RAY_AUTH_TOKEN_PATH=" in options
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    assert "RAY_AUTH_MODE=disabled" not in (REPO / infra.LAUNCHER_CONFIG).read_text()


@pytest.mark.parametrize("path", INFRA_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_plaintext_secrets_in_infra(path):
    text = path.read_text()
    assert infra.find_plaintext_secrets(text) == []
    assert "RAY_AUTH_MODE=disabled" not in text and "mode: disabled" not in text


def test_secret_scanner_finds_credentials():
    fake_id = "AKIA" + "ABCDEFGHIJKLMNOP"  # split so that this file does not trip scanners itself
    assert infra.find_plaintext_secrets(f"key: {fake_id}") == ["AWS access key id"]
    assert infra.find_plaintext_secrets("aws_secret_access_key = " + "a1B2" * 10) == ["AWS secret key"]
    assert infra.find_plaintext_secrets("- name: RAY_AUTH_TOKEN\n  value: " + "f" * 32) == []  # YAML shape
    assert infra.find_plaintext_secrets("RAY_AUTH_TOKEN=" + "f" * 32) == ["inline Ray token"]
    assert infra.find_plaintext_secrets("apiVersion: v1\nkind: Secret\n") == ["Kubernetes Secret with data"]


# --------------------------------------------------------------------------------------- Dockerfiles
@pytest.mark.parametrize(
    "flavour", sorted(DOCKERFILES), ids=lambda f: f"Dockerfile.{f}"
)  # not "gpu": that id marks GPU tests
def test_dockerfile_builds_the_pinned_project_as_non_root(flavour):
    text = DOCKERFILES[flavour].read_text()
    instructions = infra.parse_dockerfile(text)
    names = [name for name, _ in instructions]
    assert set(names[: names.index("FROM")]) <= {"ARG"}  # only build arguments may precede FROM
    args = dict(a.split("=", 1) for n, a in instructions if n == "ARG" and "=" in a)
    (base,) = [a for n, a in instructions if n == "FROM"]
    base = args.get(base.strip("${}"), base)
    allowed = ("rayproject/ray:2.60.0-py311", "python:3.11-slim", "nvidia/cuda:")
    assert base.startswith(allowed), base
    copied = set()
    for name, arg in instructions:
        if name in {"COPY", "ADD"}:
            for source in infra.copy_sources(arg):
                assert (REPO / source).exists(), f"{flavour}: COPY source {source} does not exist"
                copied.add(source.rstrip("/"))
    assert {"jobs", "serve", "platform", "pyproject.toml", "constraints.txt"} <= copied
    installs = [a for n, a in instructions if n == "RUN" for a in a.split("&&") if "pip install" in a]
    assert installs
    for command in installs:
        assert "-c constraints.txt" in command, command
    users = [a for n, a in instructions if n == "USER"]
    assert users and users[-1] not in {"root", "0"}
    envs = " ".join(a for n, a in instructions if n in {"ENV", "ARG"})
    assert "RAY_AUTH_MODE=token" in envs
    for word in ("AWS_SECRET", "AWS_ACCESS_KEY", "RAY_AUTH_TOKEN", "PASSWORD"):
        assert word not in envs, f"{flavour}: {word} baked into the image"
    assert infra.find_plaintext_secrets(text) == []


def test_gpu_image_swaps_faiss_cpu_for_faiss_gpu():
    gpu = " ".join(a for n, a in infra.parse_dockerfile(DOCKERFILES["gpu"].read_text()) if n == "RUN")
    cpu = " ".join(a for n, a in infra.parse_dockerfile(DOCKERFILES["cpu"].read_text()) if n == "RUN")
    assert '".[gpu]"' in gpu and "pip uninstall -y faiss-cpu" in gpu
    assert gpu.index("pip uninstall -y faiss-cpu") < gpu.rindex("faiss-gpu")
    assert "faiss-gpu" not in cpu and "[gpu]" not in cpu


def test_dockerfile_parser_joins_continuations_and_rejects_garbage():
    parsed = infra.parse_dockerfile("# c\nFROM x\nRUN a \\\n  # note\n  && b\nCOPY --chown=u:g a b/ c/\n")
    assert parsed == [("FROM", "x"), ("RUN", "a && b"), ("COPY", "--chown=u:g a b/ c/")]
    assert infra.copy_sources(parsed[2][1]) == ["a", "b/"]
    with pytest.raises(ValueError):
        infra.parse_dockerfile("FROM x\nRUNN y\n")
    with pytest.raises(ValueError):
        infra.parse_dockerfile("FROM x\nRUN y \\\n")


def test_readme_explains_the_token_and_the_port_forward():
    text = (REPO / "infra/README.md").read_text()
    for needle in (
        "kubectl port-forward",
        "visuray submit",
        "visuray-ray-auth",
        "python -m visuray.infra render",
    ):
        assert needle in text
