"""What the deployment tests share: paths, loaders (compose, Dockerfiles, rendered Kubernetes
variants), the settings classes behind each env prefix, and `psgpo` command resolution against the
real typer app."""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import io
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings

from tests.deploy import kustomize

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_OVERRIDES = sorted((DEPLOY / "compose").glob("*.yml"))
ENV_DIR = DEPLOY / "env"
DOCS = ROOT / "docs" / "deploy.md"

OVERLAYS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
COMPONENTS = sorted(p for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").is_file())
# Secrets the manifests reference but never ship (created with kubectl, documented in docs/deploy.md).
OUT_OF_BAND_SECRETS = {"psgpo-auth", "psgpo-redis"}
# Commands the deployment files use that another issue is still building: checked once they exist.
PENDING_COMMANDS = {("train", "ppo"): "issue 5: trainer/cli_train.py's train_app, not yet in services.cli"}
# Commands that hand their arguments to a parser built from a dataclass: (module, dataclass).
PASS_THROUGH = {("train", "ppo"): ("trainer.ppo", "PPOArgs")}
OFFICIAL_IMAGES = {"redis": re.compile(r"^redis:\d+\.\d+\.\d+-(alpine|bookworm)$")}


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# ------------------------------------------------------------------------------------------- settings


@functools.cache
def settings_classes() -> dict[str, type[BaseSettings]]:
    """Env prefix -> settings class, with the prefix read from each class's own config."""
    from services.prm.config import PrmSettings
    from services.rollout.config import RolloutSettings
    from services.sandbox.config import SandboxSettings

    return {cls.model_config["env_prefix"]: cls for cls in (PrmSettings, SandboxSettings, RolloutSettings)}


def settings_class_for(name: str) -> tuple[str, type[BaseSettings]] | None:
    for prefix, cls in settings_classes().items():
        if name.startswith(prefix):
            return prefix, cls
    return None


def field_name(name: str, prefix: str) -> str:
    return name[len(prefix) :].lower()


def default_of(cls: type[BaseSettings], name: str) -> Any:
    return cls.model_fields[name].get_default(call_default_factory=True)


# -------------------------------------------------------------------------------------------- compose


@functools.cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@functools.cache
def compose_override(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose variable interpolation with the defaults written in the file ($$ is a literal $)."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"{path}: not NAME=value: {line!r}"
        values[name.strip()] = value.strip()
    return values


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's env: env_file entries, then `environment` (which wins), interpolated."""
    env: dict[str, str] = {}
    files = service.get("env_file", [])
    for entry in [files] if isinstance(files, str) else files:
        path = entry if isinstance(entry, str) else entry["path"]
        env.update(read_env_file(ROOT / path))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({k: "" if v is None else str(v) for k, v in environment.items()})
    return {k: interpolate(v) for k, v in env.items()}


def command_argv(command: Any) -> list[str]:
    if command is None:
        return []
    return [interpolate(str(part)) for part in command] if isinstance(command, list) else shlex.split(command)


# ------------------------------------------------------------------------------------------ Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@functools.cache
def dockerfile_stages(path: Path) -> tuple[Stage, ...]:
    """FROM-separated stages of a Dockerfile as (KEYWORD, arguments) with continuations joined."""
    logical: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        logical.append(current.strip())
        current = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif keyword == "ARG" and not stages:
            continue  # global ARGs before the first FROM
        else:
            assert stages, f"{path}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, args.strip()))
    return tuple(stages)


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def dockerfile_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for token in shlex.split(args):
            name, sep, value = token.partition("=")
            assert sep, f"ENV in the legacy `ENV name value` form: {args}"
            env[name] = value
    return env


def image_dockerfiles() -> dict[str, Path]:
    """psgpo/<stem> -> deploy/docker/<stem>.Dockerfile: the only psgpo images there are."""
    return {f"psgpo/{p.name.removesuffix('.Dockerfile')}": p for p in sorted(DOCKER.glob("*.Dockerfile"))}


def image_user(dockerfile: Path) -> tuple[int, int]:
    (user,) = dockerfile_stages(dockerfile)[-1].all("USER")
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


# ------------------------------------------------------------------------------------- psgpo commands


@functools.cache
def cli_root() -> Any:
    """The click-style command tree of services.cli (typer ships its own copy of click, so nodes are
    told apart by having `commands`, not by class)."""
    import typer

    from services.cli import app

    return typer.main.get_command(app)


def psgpo_invocations(argv: list[str]) -> Iterator[list[str]]:
    """The `psgpo ...` argument lists inside a command: argv itself, or inside `sh -c SCRIPT`."""
    if argv[:2] in (["sh", "-c"], ["bash", "-c"], ["/bin/sh", "-c"]):
        tokens = shlex.split(argv[2])
        for i, token in enumerate(tokens):
            if token == "psgpo":
                rest = []
                for t in tokens[i + 1 :]:
                    if t in {"&&", "||", ";", "|"} or t.endswith(";"):
                        break
                    rest.append(t)
                yield ["psgpo", *rest]
        return
    if argv and Path(argv[0]).name == "psgpo":
        yield argv


@dataclass
class Resolved:
    path: tuple[str, ...]
    command: Any  # the click-style command; None while services.cli lacks it (PENDING_COMMANDS)
    args: list[str]
    flags_checked: bool  # the flags were checked against the command's real parser


def pass_through_parser(path: tuple[str, ...]) -> argparse.ArgumentParser | None:
    """The argparse parser behind a pass-through command (`psgpo train ppo` forwards its arguments to
    a parser built from a dataclass), or None when that code is not there yet."""
    spec = PASS_THROUGH.get(path)
    if spec is None:
        return None
    module_name, class_name = spec
    try:
        cli_train = importlib.import_module("trainer.cli_train")
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return cli_train.dataclass_parser(getattr(module, class_name), "psgpo " + " ".join(path))


def _check_argparse(parser: argparse.ArgumentParser, args: list[str], argv: list[str]) -> None:
    options = {opt for action in parser._actions for opt in action.option_strings}
    for token in args:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in options, f"`{' '.join(argv)}`: {flag} is not a flag (abbreviations not allowed)"
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parser.parse_args(args)
    except SystemExit:
        message = errors.getvalue().strip().splitlines()[-1:] or ["invalid arguments"]
        raise AssertionError(f"`{' '.join(argv)}`: {message[0]}") from None


def resolve_psgpo(argv: list[str]) -> Resolved:
    """Walk `psgpo a b --flag ...` down the typer app; fail on an unknown subcommand or flag. A
    command listed in PENDING_COMMANDS may be missing from services.cli (command None); its flags
    are still checked when the code behind it exists."""
    assert Path(argv[0]).name == "psgpo", argv
    node = cli_root()
    path: list[str] = []
    rest = list(argv[1:])
    while hasattr(node, "commands"):
        assert rest, f"`{' '.join(argv)}` stops at a command group"
        path.append(rest.pop(0))
        child = node.commands.get(path[-1])
        if child is None:
            pending = next((p for p in PENDING_COMMANDS if tuple(path) == p[: len(path)]), None)
            assert pending, f"`{' '.join(argv)}`: no subcommand {' '.join(path)!r} in services.cli"
            rest = rest[len(pending) - len(path) :]
            path, node = list(pending), None
            break
        node = child
    parser = pass_through_parser(tuple(path))
    if parser is not None:
        _check_argparse(parser, rest, argv)
    elif node is not None:
        options = {opt for param in node.params for opt in (*param.opts, *param.secondary_opts)}
        for token in rest:
            if token.startswith("--"):
                flag = token.split("=", 1)[0]
                assert flag in options, f"`{' '.join(argv)}`: no option {flag} in psgpo {' '.join(path)}"
    return Resolved(tuple(path), node, rest, parser is not None or node is not None)


# ----------------------------------------------------------------------------------------- Kubernetes


@functools.cache
def _rendered(name: str) -> tuple[dict[str, Any], ...]:
    if name in OVERLAYS:
        return tuple(kustomize.render(OVERLAYS[name]))
    overlay, _, components = name.partition("+")
    paths = [K8S / "components" / c for c in components.split(",")]
    return tuple(kustomize.apply_components(list(_rendered(overlay)), paths))


def rendered(name: str) -> list[dict[str, Any]]:
    """Manifests of a variant: base, cpu, gpu, or OVERLAY+comp1,comp2 (components applied)."""
    return copy.deepcopy(list(_rendered(name)))


VARIANTS = ["base", "cpu", "gpu", "cpu+gvisor", "gpu+gvisor,external-redis"]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def workloads(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in manifests if kustomize.pod_spec(m) is not None]


def component_of(manifest: dict[str, Any]) -> str:
    return manifest["metadata"]["labels"]["app.kubernetes.io/component"]


def container_env(manifests: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str | None]:
    """A container's env as the kubelet builds it: envFrom sources in order (later wins), then env;
    values from Secrets and fieldRefs are None. $(VAR) references are expanded where defined."""
    configmaps = by_kind(manifests, "ConfigMap")
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            ref = source["configMapRef"]
            cm = configmaps.get(ref["name"])
            assert cm is not None or ref.get("optional"), f"ConfigMap {ref['name']} is not in the render"
            env.update({k: str(v) for k, v in (cm or {}).get("data", {}).items()})
        elif "secretRef" in source:
            pass  # an optional override (psgpo-redis); its keys are documented, not shipped
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = str(configmaps[ref["name"]]["data"][ref["key"]])
        else:
            env[var["name"]] = None
    return env


_K8S_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def k8s_refs(value: str) -> list[str]:
    return _K8S_REF.findall(value)


def expand(value: str, env: dict[str, str | None]) -> str:
    return _K8S_REF.sub(lambda m: env.get(m.group(1)) or m.group(0), value)
