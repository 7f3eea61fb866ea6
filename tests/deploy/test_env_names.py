"""Every PRM_/SANDBOX_/ROLLOUT_ variable the deployment files set is a field of that service's
settings class (a misspelt name would be silently ignored: the classes use extra="ignore"), and its
value passes the class's validation. Sources: docker-compose.yml with its env files and override
files, the env files in deploy/env, the Dockerfiles' ENV, and every rendered Kubernetes variant."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.deploy import kustomize
from tests.deploy.support import (
    COMPOSE_OVERRIDES,
    DOCKER,
    ENV_DIR,
    VARIANTS,
    compose,
    compose_override,
    container_env,
    dockerfile_env,
    dockerfile_stages,
    field_name,
    read_env_file,
    rendered,
    service_environment,
    settings_class_for,
    settings_classes,
    workloads,
)

PREFIXES = ("PRM_", "SANDBOX_", "ROLLOUT_")
# Names that look like settings but are not read by a settings class: none today.
NOT_SETTINGS: set[str] = set()


def env_sources() -> list[tuple[str, dict[str, str | None]]]:
    sources: list[tuple[str, dict[str, str | None]]] = []
    for name, service in compose()["services"].items():
        sources.append((f"docker-compose.yml:{name}", dict(service_environment(service))))
    for path in COMPOSE_OVERRIDES:
        for name, service in compose_override(path)["services"].items():
            if "environment" in service:
                sources.append((f"{path.name}:{name}", dict(service_environment(service))))
    for path in sorted(ENV_DIR.glob("*.env")):
        sources.append((f"deploy/env/{path.name}", dict(read_env_file(path))))
    for path in sorted(DOCKER.glob("*.Dockerfile")):
        sources.append((path.name, dict(dockerfile_env(dockerfile_stages(path)[-1]))))
    for variant in VARIANTS:
        manifests = rendered(variant)
        for workload in workloads(manifests):
            for container in kustomize.containers(kustomize.pod_spec(workload)):
                where = f"k8s {variant}:{workload['metadata']['name']}/{container['name']}"
                sources.append((where, container_env(manifests, container)))
    return sources


SOURCES = env_sources()


def test_prefixes_are_the_settings_classes_own():
    assert set(settings_classes()) == set(PREFIXES)


def test_sources_cover_every_service():
    names = {name for _, env in SOURCES for name in env}
    for prefix in PREFIXES:
        assert any(n.startswith(prefix) for n in names), f"no {prefix} variable set anywhere"


@pytest.mark.parametrize(("where", "env"), SOURCES, ids=[w for w, _ in SOURCES])
def test_every_variable_is_a_settings_field_with_a_valid_value(where, env):
    by_class: dict[type, dict[str, str]] = {}
    for name, value in env.items():
        found = settings_class_for(name)
        if found is None or name in NOT_SETTINGS:
            continue
        prefix, cls = found
        field = field_name(name, prefix)
        assert field in cls.model_fields, f"{where}: {name} is not a field of {cls.__name__}"
        if value is not None:  # None: from a Secret
            by_class.setdefault(cls, {})[field] = value
    for cls, values in by_class.items():
        try:
            cls(**values)
        except ValidationError as exc:
            pytest.fail(f"{where}: {cls.__name__} refuses {values}: {exc}")


def test_files_the_settings_point_to_are_mounted():
    """PRM_MODEL, ROLLOUT_POLICY and *_AUTH_TOKEN_FILE name paths inside a mounted volume."""
    for name, service in compose()["services"].items():
        env = service_environment(service)
        mounts = [v.split(":")[1] for v in service.get("volumes", []) if ":" in v]
        for var in ("PRM_MODEL", "ROLLOUT_POLICY", "PRM_AUTH_TOKEN_FILE", "SANDBOX_AUTH_TOKEN_FILE"):
            if var in env:
                assert any(Path(env[var]).is_relative_to(m) for m in mounts), f"{name}: {var}={env[var]}"
    for variant in VARIANTS:
        manifests = rendered(variant)
        for workload in workloads(manifests):
            for container in kustomize.pod_spec(workload)["containers"]:
                env = container_env(manifests, container)
                mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
                for var in ("PRM_MODEL", "ROLLOUT_POLICY", "PRM_AUTH_TOKEN_FILE", "SANDBOX_AUTH_TOKEN_FILE"):
                    if env.get(var):
                        assert any(Path(env[var]).is_relative_to(m) for m in mounts), f"{variant}: {var}"


def _k8s_mib(value: str) -> float:
    units = {
        "Ki": 1 / 1024,
        "Mi": 1,
        "Gi": 1024,
        "Ti": 2**20,
        "k": 1e3 / 2**20,
        "M": 1e6 / 2**20,
        "G": 1e9 / 2**20,
    }
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value) / 2**20


def _compose_mib(value: str) -> float:
    """Docker's byte values: b, k, m, g are bytes, KiB, MiB, GiB."""
    units = {"b": 1 / 2**20, "k": 1 / 1024, "m": 1, "g": 1024}
    return float(value[:-1]) * units[value[-1].lower()] if value[-1].isalpha() else float(value) / 2**20


def test_sandbox_workers_fit_their_cpu_and_memory_limits():
    """SANDBOX_WORKERS defaults to every core the container sees; the files pin it to the CPU limit,
    and workers x (max run memory + ~50 MiB) (+ a tmpfs /tmp, which is memory) fit the memory limit."""
    cls = settings_classes()["SANDBOX_"]
    service = compose()["services"]["sandbox"]
    env = service_environment(service)
    limits = service["deploy"]["resources"]["limits"]
    workers = int(env["SANDBOX_WORKERS"])
    max_mb = int(env.get("SANDBOX_MAX_MEMORY_MB", cls.model_fields["max_memory_mb"].default))
    tmpfs = next(t for t in service["tmpfs"] if t.startswith("/tmp:"))
    tmp_mb = _compose_mib(tmpfs.split("size=")[1].split(",")[0])
    assert workers <= float(limits["cpus"])
    assert workers * (max_mb + 50) + tmp_mb <= _compose_mib(limits["memory"])
    for variant in VARIANTS:
        manifests = rendered(variant)
        (deployment,) = [w for w in workloads(manifests) if w["metadata"]["name"] == "sandbox"]
        (container,) = kustomize.pod_spec(deployment)["containers"]
        env = container_env(manifests, container)
        workers, max_mb = int(env["SANDBOX_WORKERS"]), int(env["SANDBOX_MAX_MEMORY_MB"])
        limits = container["resources"]["limits"]
        assert workers <= float(limits["cpu"]), variant
        assert workers * (max_mb + 50) <= _k8s_mib(limits["memory"]), variant
