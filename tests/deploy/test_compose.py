"""docker-compose.yml and its override files: they parse, use only images built from deploy/docker
or pinned official ones, wire health checks and start order, keep the sandbox on an internal
network with no egress, and run commands the `psgpo` CLI really has."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.support import (
    COMPOSE_FILE,
    COMPOSE_OVERRIDES,
    OFFICIAL_IMAGES,
    ROOT,
    command_argv,
    compose,
    compose_override,
    image_dockerfiles,
    image_user,
    interpolate,
    project_version,
    psgpo_invocations,
    resolve_psgpo,
    service_environment,
)

LONG_RUNNING = {"redis", "prm", "sandbox", "rollout"}
ONE_SHOT = {"token", "models", "trainer"}


def services() -> dict:
    return compose()["services"]


def all_files() -> list[tuple[str, dict]]:
    return [(COMPOSE_FILE.name, compose())] + [(p.name, compose_override(p)) for p in COMPOSE_OVERRIDES]


def test_compose_parses_and_has_the_pieces():
    assert set(services()) == LONG_RUNNING | ONE_SHOT
    assert {p.name for p in COMPOSE_OVERRIDES} == {"gpu.yml", "gvisor.yml"}
    for name, doc in all_files():
        assert isinstance(doc.get("services"), dict), name
        assert "version" not in doc, f"{name}: the top-level `version` key is obsolete"
        for service in doc["services"]:
            assert service in services(), f"{name} overrides an unknown service {service}"


# The Compose Specification's JSON schema, as docker compose v2 validates with it: schema/
# compose-spec.json of compose-spec/compose-go (Apache-2.0) at e70e961c3a3acebf0800b882f1afb3dbf1fb74a2.
COMPOSE_SCHEMA = Path(__file__).with_name("compose-spec.json")


@pytest.mark.parametrize("file", [p.name for p in [COMPOSE_FILE, *COMPOSE_OVERRIDES]])
def test_files_validate_against_the_compose_specification(file):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (dev extra)")
    validator = jsonschema.Draft202012Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    errors = [
        f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(dict(all_files())[file])
    ]
    assert not errors, errors


@pytest.mark.parametrize("file", [p.name for p in [COMPOSE_FILE, *COMPOSE_OVERRIDES]])
def test_images_are_built_here_or_pinned_official(file):
    doc = dict(all_files())[file]
    dockerfiles = image_dockerfiles()
    for name, service in doc["services"].items():
        if "image" not in service:
            assert "build" not in service, f"{file}:{name} builds without naming its image"
            continue
        image = interpolate(service["image"])
        repo, _, tag = image.rpartition(":")
        if repo in dockerfiles:
            assert tag == project_version(), f"{file}:{name}: {image}"
            build = service.get("build")
            assert build, f"{file}:{name}: {image} must be built from deploy/docker"
            assert build["context"] == "."
            assert (ROOT / build["dockerfile"]).resolve() == dockerfiles[repo].resolve(), f"{file}:{name}"
            pull = service.get("pull_policy", services().get(name, {}).get("pull_policy"))
            assert pull == "build", f"{file}:{name}: {image} must never be pulled from a registry"
        else:
            official = OFFICIAL_IMAGES.get(repo)
            assert official and official.match(image), f"{file}:{name}: {image} is not built here nor pinned"
            assert "build" not in service


def test_long_running_services_have_health_checks_and_one_shots_do_not_restart():
    for name, service in services().items():
        if name in LONG_RUNNING:
            check = service.get("healthcheck", {})
            assert check.get("test") and not check.get("disable"), f"{name}: no health check"
            assert service.get("restart") == "unless-stopped", name
        else:
            assert service.get("restart") == "no", f"{name} is a one-shot"


def test_start_order_uses_health_and_completion():
    for name, service in services().items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions (long syntax)"
        for target, spec in depends.items():
            condition = spec["condition"]
            if condition == "service_healthy":
                assert target in LONG_RUNNING, f"{name} -> {target}"
            else:
                assert condition == "service_completed_successfully" and target in ONE_SHOT - {"trainer"}
    deps = {name: set(service.get("depends_on", {})) for name, service in services().items()}
    assert {"redis", "prm", "sandbox", "models"} <= deps["rollout"]
    assert {"models", "token"} <= deps["prm"] and "token" in deps["sandbox"]
    assert {"redis", "models"} <= deps["trainer"]


def test_healthchecks_need_no_curl_and_hit_the_configured_ports():
    ports = {"prm": "PRM_HTTP_PORT", "sandbox": "SANDBOX_HTTP_PORT", "rollout": "ROLLOUT_METRICS_PORT"}
    for name, var in ports.items():
        service = services()[name]
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], f"{name}: python one-liner, no curl in the images"
        env = service_environment(service)
        assert f"http://127.0.0.1:{env[var]}/" in test[3], name


def test_sandbox_is_isolated():
    doc = compose()
    sandbox = services()["sandbox"]
    networks = sandbox["networks"]
    assert networks and all(doc["networks"][n].get("internal") is True for n in networks)
    assert "ports" not in sandbox and "network_mode" not in sandbox
    assert sandbox["read_only"] is True
    assert sandbox["cap_drop"] == ["ALL"] and "cap_add" not in sandbox
    assert "no-new-privileges:true" in sandbox["security_opt"]
    assert not sandbox.get("privileged")
    assert sandbox.get("pids_limit", 0) > 0
    assert "user" not in sandbox or sandbox["user"].split(":")[0] != "0"
    uid, _ = image_user(image_dockerfiles()["psgpo/sandbox"])
    assert uid != 0
    # only the token: no models, runs or host paths in reach of untrusted code
    assert [v.split(":")[0] for v in sandbox["volumes"]] == ["secrets"]
    assert any(t.startswith("/tmp:size=") for t in sandbox["tmpfs"])
    # the rollout workers reach it; nothing else joins its network
    members = {n for n, s in services().items() if set(s.get("networks", [])) & set(networks)}
    assert members == {"sandbox", "rollout"}
    # the override files may only add isolation
    for _, doc in all_files()[1:]:
        override = doc["services"].get("sandbox", {})
        assert set(override) <= {"runtime"}, override


def test_every_container_is_hardened():
    for name, service in services().items():
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert not service.get("privileged") and not service.get("cap_add"), name


def test_redis_keeps_its_data():
    redis = services()["redis"]
    argv = command_argv(redis["command"])
    assert argv[0] == "redis-server" and argv[argv.index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in compose()["volumes"]


def test_models_are_built_offline_into_a_shared_volume():
    models = services()["models"]
    assert models["network_mode"] == "none"
    (invocation,) = psgpo_invocations(command_argv(models["command"]))
    assert invocation[:3] == ["psgpo", "models", "tiny"]
    assert invocation[invocation.index("--out") + 1] == "/models"
    for name in ("prm", "rollout", "trainer"):
        assert "models:/models:ro" in services()[name]["volumes"], name
    env = {n: service_environment(services()[n]) for n in ("prm", "rollout")}
    assert env["prm"]["PRM_MODEL"] == "/models/prm" and env["rollout"]["ROLLOUT_POLICY"] == "/models/policy"


def test_tokens_wire_up():
    token = services()["token"]
    assert token["network_mode"] == "none"
    path = "/run/psgpo/token"
    assert path in " ".join(command_argv(token["command"]))
    assert service_environment(services()["prm"])["PRM_AUTH_TOKEN_FILE"] == path
    assert service_environment(services()["sandbox"])["SANDBOX_AUTH_TOKEN_FILE"] == path
    rollout = " ".join(command_argv(services()["rollout"]["command"]))
    assert "ROLLOUT_PRM_TOKEN=" in rollout and "ROLLOUT_SANDBOX_TOKEN=" in rollout


def test_rollout_reaches_the_services_and_the_trainer_is_a_profiled_one_shot():
    env = service_environment(services()["rollout"])
    assert env["ROLLOUT_PRM"] == f"prm:{service_environment(services()['prm'])['PRM_GRPC_PORT']}"
    sandbox_port = service_environment(services()["sandbox"])["SANDBOX_GRPC_PORT"]
    assert env["ROLLOUT_SANDBOX"] == f"sandbox:{sandbox_port}"
    assert env["ROLLOUT_REDIS_URL"] == "redis://redis:6379/0"
    trainer = services()["trainer"]
    assert trainer["profiles"] == ["train"]
    (invocation,) = psgpo_invocations(command_argv(trainer["command"]))
    assert invocation[invocation.index("--run") + 1] == env["ROLLOUT_RUN"]
    assert invocation[invocation.index("--redis-url") + 1] == env["ROLLOUT_REDIS_URL"]
    assert invocation[invocation.index("--out-dir") + 1] == f"/runs/{env['ROLLOUT_RUN']}"
    assert "runs:/runs" in trainer["volumes"] and "runs:/runs:ro" in services()["rollout"]["volumes"]


def test_gpu_override_reserves_gpus_for_the_model_side():
    gpu = compose_override(ROOT / "deploy" / "compose" / "gpu.yml")["services"]
    assert set(gpu) == {"prm", "rollout", "trainer"}
    for name, service in gpu.items():
        assert interpolate(service["image"]).startswith("psgpo/cuda:"), name
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert service.get("init") is True, f"{name}: the CUDA image has no tini"


def _commands() -> list[tuple[str, list[str]]]:
    out = []
    for file, doc in all_files():
        for name, service in doc["services"].items():
            for invocation in psgpo_invocations(command_argv(service.get("command"))):
                out.append((f"{file}:{name}", invocation))
    return out


@pytest.mark.parametrize(("where", "argv"), _commands(), ids=[w for w, _ in _commands()])
def test_commands_are_real_psgpo_subcommands(where, argv):
    resolved = resolve_psgpo(argv)
    if not resolved.flags_checked:
        pytest.skip(f"{where}: `psgpo {' '.join(resolved.path)}` is not built yet")


def test_every_psgpo_service_runs_a_psgpo_command():
    for name, service in services().items():
        if name in {"redis", "token"}:
            continue
        assert list(psgpo_invocations(command_argv(service["command"]))), name


def _compose_v2() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        proc = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@pytest.mark.skipif(not _compose_v2(), reason="no `docker compose` (v2 plugin) here: checked by the schema")
@pytest.mark.parametrize("extra", [[], ["deploy/compose/gpu.yml"], ["deploy/compose/gvisor.yml"]])
def test_docker_compose_config_accepts_the_files(extra):
    """`docker compose config` needs no daemon: where the plugin exists, it gets the last word."""
    files = [arg for f in ["docker-compose.yml", *extra] for arg in ("-f", f)]
    proc = subprocess.run(
        ["docker", "compose", *files, "--profile", "train", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
