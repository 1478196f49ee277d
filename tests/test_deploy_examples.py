"""The deployment examples in config/ are valid and say what the README promises.

Docker Compose (config/docker-compose.yml), Kubernetes (config/kubernetes/*.yaml) and
the Prometheus rules are parsed with PyYAML and checked against syncd itself: every
SYNCD_* variable they name is a real setting, every metric an alert uses is one syncd
exports. Where `docker compose`/`docker-compose` or `promtool` is installed they
validate the files too; where not, those two tests skip, saying so (CI installs both).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncd.metrics import REGISTRY
from syncd.settings import ENV_PREFIX, Settings, load_settings, parse_mappings
from syncd.state.base import RunResult
from tests.support.processes import run_cli

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"
COMPOSE = CONFIG / "docker-compose.yml"
KUBERNETES = CONFIG / "kubernetes"

SETTINGS_VARIABLES = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
VARIABLE = re.compile(r"(?<![A-Za-z0-9_])SYNCD_[A-Z0-9_]+")
METRIC = re.compile(r"(?<![A-Za-z0-9_])syncd_[a-z0-9_]+")
UID = 10001


# --------------------------------------------------------------------------- helpers


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def manifests() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is not None:
                assert isinstance(document, dict), f"{path.name}: not a mapping"
                documents.append(document)
    return documents


def manifest(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in manifests()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in config/kubernetes, got {found}"
    return found[0]


def compose_service(name: str = "syncd") -> dict[str, Any]:
    service: dict[str, Any] = load(COMPOSE)["services"][name]
    return service


def env_file_values() -> dict[str, str]:
    """The compose service's env_file, as Compose reads it (KEY=value, # comments)."""
    values: dict[str, str] = {}
    text = (COMPOSE.parent / compose_service()["env_file"]).read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def statefulset_pod() -> dict[str, Any]:
    pod: dict[str, Any] = manifest("StatefulSet")["spec"]["template"]["spec"]
    return pod


def syncd_container() -> dict[str, Any]:
    containers = statefulset_pod()["containers"]
    found = [c for c in containers if c["name"] == "syncd"]
    assert len(found) == 1
    container: dict[str, Any] = found[0]
    return container


def container_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for item in syncd_container()["env"]:
        assert "value" in item, f"{item['name']}: expected a plain value (secrets come as files)"
        env[item["name"]] = str(item["value"])
    return env


def named_port(name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in syncd_container()["ports"]}
    port: int = ports[name]
    return port


def mount_for(path: str) -> dict[str, Any]:
    """The container's volume mount holding `path`, and the pod volume behind it."""
    for mount in syncd_container()["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path == mount["mountPath"] or path.startswith(prefix):
            volumes = {v["name"]: v for v in statefulset_pod().get("volumes", [])}
            claims = {
                t["metadata"]["name"]
                for t in manifest("StatefulSet")["spec"]["volumeClaimTemplates"]
            }
            volume = volumes.get(mount["name"])
            assert volume is not None or mount["name"] in claims, f"no volume {mount['name']}"
            return {"mount": mount, "volume": volume, "relative": path[len(prefix) :]}
    raise AssertionError(f"nothing is mounted at {path}")


def deploy_files() -> Iterator[Path]:
    yield COMPOSE
    yield CONFIG / "syncd.env"  # the compose service's env_file
    yield from sorted(KUBERNETES.glob("*.yaml"))


def rule_groups() -> list[dict[str, Any]]:
    rules = manifest("PrometheusRule")
    groups: list[dict[str, Any]] = rules["spec"]["groups"]
    return groups


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rule_groups() for rule in group["rules"]}


def exported_metrics() -> set[str]:
    """Series names syncd's /metrics can show, as Prometheus sees them."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        else:
            names.add(family.name)
    return names


# --------------------------------------------------------------------------- settings


def test_every_syncd_variable_named_in_the_examples_is_a_real_setting() -> None:
    used: dict[str, set[str]] = {}
    for path in deploy_files():
        for name in VARIABLE.findall(path.read_text(encoding="utf-8")):
            used.setdefault(name, set()).add(path.relative_to(ROOT).as_posix())
    # Guard the scan itself: the examples do name these.
    assert {"SYNCD_WALKME_CLIENT_SECRET_FILE", "SYNCD_STATE_URL", "SYNCD_ADMIN_PORT"} <= set(used)
    unknown = {
        name: sorted(files) for name, files in used.items() if name not in SETTINGS_VARIABLES
    }
    assert not unknown, f"not syncd settings (see syncd/settings.py): {unknown}"


def test_structured_env_names_are_real_settings() -> None:
    names = set(compose_service()["environment"]) | set(container_env())
    assert names, "no environment found"
    assert names <= SETTINGS_VARIABLES, sorted(names - SETTINGS_VARIABLES)


# --------------------------------------------------------------------------- compose


def test_compose_builds_the_repository_image() -> None:
    build = compose_service()["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build.get("dockerfile", "Dockerfile")).is_file()
    assert compose_service()["image"] == "syncd:local"
    assert (COMPOSE.parent / compose_service()["env_file"]).is_file()


def test_compose_keeps_state_in_a_named_volume() -> None:
    document = load(COMPOSE)
    service = compose_service()
    assert "syncd-data:/data" in service["volumes"]
    assert "syncd-data" in document["volumes"]
    # The state file must land in the volume: the image's default, or syncd.env's.
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "SYNCD_STATE_URL=sqlite:////data/syncd.db" in dockerfile
    for source in (service["environment"], env_file_values()):
        url = source.get("SYNCD_STATE_URL", "sqlite:////data/syncd.db")
        assert url.startswith(("sqlite:////data/", "postgresql://")), url
    config = [v for v in service["volumes"] if v.split(":")[1:] == ["/config", "ro"]]
    assert len(config) == 1, "the config folder is mounted read-only at /config"


def test_compose_runs_read_only_and_non_root() -> None:
    service = compose_service()
    assert service["read_only"] is True
    assert "/tmp" in service["tmpfs"]
    assert str(service["user"]).split(":")[0] == str(UID)
    assert service["restart"] == "unless-stopped"


def test_compose_healthcheck_probes_healthz_on_the_admin_port() -> None:
    service = compose_service()
    test = service["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    command = " ".join(test[1:])
    port = service["environment"]["SYNCD_ADMIN_PORT"]
    assert f"127.0.0.1:{port}/healthz" in command
    published = [str(p).rsplit(":", 1)[-1] for p in service["ports"]]
    assert sorted(published) == ["8080", "9090"]
    assert service["environment"]["SYNCD_WEBHOOK_PORT"] == "8080"


def test_compose_postgres_is_optional() -> None:
    services = load(COMPOSE)["services"]
    assert services["postgres"]["profiles"] == ["postgres"]
    assert "profiles" not in services["syncd"]
    assert "depends_on" not in services["syncd"], "syncd must start without the profile"


def compose_command() -> list[str] | None:
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]) is None:
            continue
        try:
            probe = subprocess.run(
                [*candidate, "version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return candidate
    return None


def test_compose_file_validates_with_the_compose_cli() -> None:
    command = compose_command()
    if command is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed (Debian package"
            " docker-compose; .ci/run installs it): the compose file is NOT validated"
        )
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"],
        cwd=CONFIG,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{' '.join(command)} config -q: {result.stderr}"


# --------------------------------------------------------------------------- kubernetes


def test_every_manifest_names_its_kind() -> None:
    kinds = set()
    for document in manifests():
        assert document.get("apiVersion"), document
        assert document.get("kind"), document
        assert document["metadata"]["name"]
        assert document["metadata"]["labels"]["app.kubernetes.io/name"] == "syncd"
        kinds.add(document["kind"])
    assert {"Secret", "ConfigMap", "StatefulSet", "Service", "PrometheusRule"} <= kinds


def test_statefulset_is_one_replica_with_a_data_claim() -> None:
    statefulset = manifest("StatefulSet")
    spec = statefulset["spec"]
    assert spec["replicas"] == 1
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    mounted = mount_for("/data/syncd.db")
    assert mounted["mount"]["mountPath"] == "/data"
    assert mounted["volume"] is None, "/data comes from the volumeClaimTemplate"
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == mounted["mount"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert container_env()["SYNCD_STATE_URL"] == "sqlite:////data/syncd.db"
    service = manifest("Service", spec["serviceName"])
    assert service["spec"]["selector"].items() <= labels.items()


def test_statefulset_runs_non_root_with_a_read_only_root() -> None:
    pod = statefulset_pod()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["fsGroup"] == UID
    context = syncd_container()["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == UID
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    tmp = mount_for("/tmp")
    assert tmp["mount"]["mountPath"] == "/tmp"
    assert "emptyDir" in tmp["volume"]


def test_statefulset_probes_healthz_and_readyz_on_the_admin_port() -> None:
    container = syncd_container()
    admin = int(container_env()["SYNCD_ADMIN_PORT"])
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        port = get["port"]
        assert (named_port(port) if isinstance(port, str) else port) == admin, probe
    assert named_port("admin") == admin


def test_statefulset_sets_resources() -> None:
    resources = syncd_container()["resources"]
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}

    def memory(text: str) -> int:
        match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", text)
        assert match, f"memory {text!r}: expected a number with Ki, Mi or Gi"
        return int(match[1]) * units[match[2]]

    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    # The daemon peaked at 125 MiB syncing four 100,000-id segments at once.
    assert memory(resources["requests"]["memory"]) >= 160 * 2**20
    assert memory(resources["requests"]["memory"]) <= memory(resources["limits"]["memory"])


def test_secrets_come_from_the_secret_as_files() -> None:
    env = container_env()
    secret = manifest("Secret")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for variable in ("SYNCD_WALKME_CLIENT_SECRET", "SYNCD_HEAP_WEBHOOK_SECRET"):
        assert variable not in env, f"{variable} inline: use {variable}_FILE"
        mounted = mount_for(env[f"{variable}_FILE"])
        assert mounted["mount"].get("readOnly") is True
        assert mounted["volume"]["secret"]["secretName"] == secret["metadata"]["name"]
        assert mounted["relative"] in keys, f"{variable}_FILE names no key of the Secret"


def test_segments_come_from_the_configmap_and_are_valid() -> None:
    mounted = mount_for(container_env()["SYNCD_SEGMENTS_FILE"])
    configmap = manifest("ConfigMap")
    assert mounted["mount"].get("readOnly") is True
    assert mounted["volume"]["configMap"]["name"] == configmap["metadata"]["name"]
    text = configmap["data"][mounted["relative"]]
    mappings = parse_mappings(yaml.safe_load(text), "configmap.yaml")
    assert mappings
    # Heap webhook sources need the receiver, which needs the webhook secret.
    if any(m.source.type == "heap_webhook" for m in mappings):
        assert "SYNCD_HEAP_WEBHOOK_SECRET_FILE" in container_env()


def test_webhook_service_targets_the_receiver_port() -> None:
    webhook_port = int(container_env()["SYNCD_WEBHOOK_PORT"])
    labels = manifest("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    targets = []
    for service in (d for d in manifests() if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            targets.append(named_port(target) if isinstance(target, str) else target)
    assert webhook_port in targets
    assert named_port("webhook") == webhook_port


def test_service_links_cannot_clash_with_settings() -> None:
    # Kubernetes injects <SERVICE>_PORT, <SERVICE>_SERVICE_HOST, ... for every Service in
    # the namespace: a Service named syncd-webhook would set SYNCD_WEBHOOK_PORT=tcp://...
    assert statefulset_pod()["enableServiceLinks"] is False
    for service in (d for d in manifests() if d["kind"] == "Service"):
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        injected = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
        for port in service["spec"]["ports"]:
            protocol = port.get("protocol", "TCP")
            base = f"{prefix}_PORT_{port['port']}_{protocol}"
            injected |= {base, f"{base}_PROTO", f"{base}_PORT", f"{base}_ADDR"}
            if "name" in port:
                injected.add(f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
        clash = injected & SETTINGS_VARIABLES
        assert not clash, f"Service {service['metadata']['name']} would set {sorted(clash)}"


# --------------------------------------------------------------------------- prometheus


def test_alert_rules_use_metrics_syncd_exports() -> None:
    exported = exported_metrics()
    assert "syncd_last_success_timestamp_seconds" in exported
    used = set()
    for rule in alerts().values():
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"]
        used |= set(METRIC.findall(rule["expr"]))
    assert used, "no syncd metric in the rules"
    assert used <= exported, f"not exported by syncd/metrics.py: {sorted(used - exported)}"


def test_alert_rules_cover_staleness_and_failures() -> None:
    expressions = {name: rule["expr"] for name, rule in alerts().items()}
    assert any("syncd_last_success_timestamp_seconds" in e for e in expressions.values())
    assert any('syncd_segment_runs_total{result="failed"}' in e for e in expressions.values())
    results = set(typing.get_args(RunResult))
    for expr in expressions.values():
        for value in re.findall(r'result="([^"]+)"', expr):
            assert value in results, f"syncd never records result={value!r}"


def test_alert_rules_select_the_scraped_job() -> None:
    monitor = manifest("PodMonitor")
    labels = manifest("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    job = labels[monitor["spec"]["jobLabel"]]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["admin"]
    for expr in (rule["expr"] for rule in alerts().values()):
        for selected in re.findall(r'job="([^"]+)"', expr):
            assert selected == job


def test_alert_rules_validate_with_promtool(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip(
            "promtool is not installed (Debian package prometheus; .ci/run installs it):"
            " the alert rules are NOT validated"
        )
    rules = tmp_path / "syncd-rules.yml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups()}), encoding="utf-8")
    result = subprocess.run(
        ["promtool", "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- as shipped


def env_file(path: Path) -> dict[str, str]:
    """KEY=value lines as `docker run --env-file` reads them (no quotes, # comments)."""
    pairs = (line.split("=", 1) for line in path.read_text(encoding="utf-8").splitlines())
    return {key: value for key, value in (p for p in pairs if len(p) == 2) if key[:1] != "#"}


def commented_settings(path: Path) -> dict[str, str]:
    """The ``# SYNCD_X=value`` examples of an env file, as the lines would read uncommented."""
    lines = path.read_text(encoding="utf-8").splitlines()
    examples = (line.removeprefix("#").strip() for line in lines if line.startswith("# SYNCD_"))
    return dict(example.split("=", 1) for example in examples if "=" in example)


def test_the_notify_examples_are_valid_as_uncommented(monkeypatch: pytest.MonkeyPatch) -> None:
    examples = commented_settings(CONFIG / "syncd.env")
    url = examples["SYNCD_NOTIFY_URL"]
    assert url.startswith("https://hooks.slack.com/services/")
    for name in [name for name in os.environ if name.startswith("SYNCD_")]:
        monkeypatch.delenv(name)
    for name, value in env_file(CONFIG / "syncd.env").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SYNCD_NOTIFY_URL", url)
    monkeypatch.setenv("SYNCD_NOTIFY_AFTER_FAILURES", examples["SYNCD_NOTIFY_AFTER_FAILURES"])
    settings = load_settings()
    assert settings.notification_url() is not None
    assert settings.notify_after_failures == int(examples["SYNCD_NOTIFY_AFTER_FAILURES"])


@pytest.mark.parametrize("mappings", ["segments.json", "segments.toml"])
def test_the_shipped_env_and_mappings_start_as_they_are(tmp_path: Path, mappings: str) -> None:
    """config/syncd.env with the shipped mappings, /config mounted as in compose: the
    configuration is valid and the plan is made (a dry run contacts nothing)."""
    mounted = tmp_path / "config"
    shutil.copytree(CONFIG, mounted)
    for name in ("segments.json", "segments.toml"):
        text = (mounted / name).read_text(encoding="utf-8")
        (mounted / name).write_text(text.replace("/config/", f"{mounted}/"), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    env |= env_file(CONFIG / "syncd.env")
    assert env["SYNCD_SEGMENTS_FILE"] == "/config/segments.json"
    env["SYNCD_SEGMENTS_FILE"] = str(mounted / mappings)
    env["SYNCD_STATE_URL"] = f"sqlite:///{tmp_path / 'syncd.db'}"  # the image's /data volume

    result = run_cli("sync", "--dry-run", env=env, cwd=tmp_path, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Trial users: create the WalkMe segment; source has 3 ids" in result.stdout


def test_the_commented_mapping_examples_are_valid_once_uncommented() -> None:
    """Each commented `[[segments]]` block of segments.toml (up to the next line that
    is no comment), uncommented, is a mapping syncd accepts, with the fields it shows."""
    blocks: list[list[str]] = []
    inside = False
    for line in (CONFIG / "segments.toml").read_text(encoding="utf-8").splitlines():
        if line == "# [[segments]]":
            blocks.append([])
            inside = True
        inside = inside and line.startswith("#")
        if inside:
            blocks[-1].append(line.removeprefix("#").removeprefix(" "))
    text = "\n".join("\n".join(block) for block in blocks)
    mappings = parse_mappings(tomllib.loads(text)["segments"], "segments.toml")
    by_name = {mapping.name: mapping for mapping in mappings}
    assert list(by_name) == ["Customers", "Free Customers", "Paying users"]
    assert by_name["Customers"].transform.steps == ("lower",)
    assert by_name["Paying users"].transform.steps == ("strip_prefix:heap|",)
    assert by_name["Paying users"].schedule == "0 2 * * *"
