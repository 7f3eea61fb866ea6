"""deploy/docker/*.Dockerfile and .dockerignore, checked as text (no container engine here):
pinned official bases, multi-stage with no build tools in the final stage, a non-root user, OCI
labels, a curl-free HEALTHCHECK, and a default command that is a real `psgpo` subcommand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.support import (
    DOCKER,
    ROOT,
    dockerfile_env,
    dockerfile_stages,
    exec_form,
    image_dockerfiles,
    image_user,
    project_version,
    psgpo_invocations,
    resolve_psgpo,
)

DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
PINNED_BASES = [
    re.compile(r"^python:3\.11\.\d+-slim-bookworm$"),
    re.compile(r"^nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-(ubi9|ubuntu\d\d\.\d\d)$"),
]
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|make|cmake|build-essential|python3(\.\d+)?-devel?|libc6?-dev)\b"
)
# The one allowed exception: vLLM's Triton needs a C compiler at run time (cuda.Dockerfile).
BUILD_TOOLS_EXCEPTION = "site-packages/vllm"
OCI_LABELS = {"title", "description", "version", "licenses", "source"}


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_the_three_images_exist():
    assert set(image_dockerfiles()) == {"psgpo/sandbox", "psgpo/cpu", "psgpo/cuda"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids(DOCKERFILES))
def test_bases_are_official_and_pinned(path):
    stages = dockerfile_stages(path)
    assert len(stages) >= 2, "multi-stage: build, then a runtime stage"
    for stage in stages:
        assert any(p.match(stage.base) for p in PINNED_BASES), f"{stage.base}: not a pinned official base"
    assert stages[0].name, "the build stage is named"
    final = stages[-1]
    assert final.name is None and final.base == stages[0].base, "runtime on the same base as the build"
    copies = final.all("COPY")
    assert copies and all(c.startswith(f"--from={stages[0].name} ") for c in copies), copies


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids(DOCKERFILES))
def test_final_stage_runs_as_non_root_without_build_tools(path):
    final = dockerfile_stages(path)[-1]
    uid, gid = image_user(path)
    assert uid >= 1000 and gid >= 1000
    assert final.instructions[-1][0] in {"CMD", "ENTRYPOINT"}
    user_at = [i for i, (kw, _) in enumerate(final.instructions) if kw == "USER"][-1]
    assert all(kw != "RUN" for kw, _ in final.instructions[user_at:]), "nothing runs as root after USER"
    for run in final.all("RUN"):
        if BUILD_TOOLS.search(run):
            assert BUILD_TOOLS_EXCEPTION in run, f"build tool in the final stage: {run}"
    assert "pip install" not in " ".join(final.all("RUN")), "the runtime stage copies the built venv"


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids(DOCKERFILES))
def test_labels_healthcheck_and_command(path):
    final = dockerfile_stages(path)[-1]
    labels = " ".join(final.all("LABEL"))
    found = set(re.findall(r"org\.opencontainers\.image\.(\w+)=", labels))
    assert OCI_LABELS <= found
    (version,) = [a for a in final.all("ARG") if a.startswith("VERSION=")]
    assert version == f"VERSION={project_version()}"
    (health,) = final.all("HEALTHCHECK")
    cmd = exec_form(health.split(" CMD ", 1)[1])
    assert cmd[:2] == ["python", "-c"] and "/healthz" in cmd[2] and "curl" not in health
    entrypoint = [exec_form(a) for a in final.all("ENTRYPOINT")]
    (command,) = [exec_form(a) for a in final.all("CMD")]
    argv = (entrypoint[-1] if entrypoint else []) + command
    if argv[:2] == ["/usr/bin/tini", "--"]:
        argv = argv[2:]
    (invocation,) = psgpo_invocations(argv)
    resolved = resolve_psgpo(invocation)
    assert resolved.command is not None and resolved.path[0] == "serve"
    # the port the health check defaults to is the one the service listens on
    service = resolved.path[1].upper()
    env = dockerfile_env(final)
    assert f"get('{service}_HTTP_PORT', '{env[f'{service}_HTTP_PORT']}')" in cmd[2]
    assert env[f"{service}_HOST"] == "0.0.0.0"
    exposed = {int(p) for a in final.all("EXPOSE") for p in a.split()}
    assert exposed == {int(env[f"{service}_HTTP_PORT"]), int(env[f"{service}_GRPC_PORT"])}


def test_sandbox_image_has_no_model_libraries():
    text = (DOCKER / "sandbox.Dockerfile").read_text()
    runs = " ".join(s for stage in dockerfile_stages(DOCKER / "sandbox.Dockerfile") for s in stage.all("RUN"))
    assert "pip install ." in runs and "[ml" not in runs and "torch" not in runs
    assert "libseccomp2" in text, "the sandbox compiles its seccomp filters with libseccomp"


def test_model_images_install_the_ml_extra():
    cpu = " ".join(dockerfile_stages(DOCKER / "cpu.Dockerfile")[0].all("RUN"))
    cuda = " ".join(dockerfile_stages(DOCKER / "cuda.Dockerfile")[0].all("RUN"))
    assert '".[ml]"' in cpu and '".[ml,vllm]"' in cuda
    makefile = (ROOT / "Makefile").read_text()
    (torch,) = re.findall(r"TORCH_SPEC \?= (\S+)", makefile)
    for path in (DOCKER / "cpu.Dockerfile", DOCKER / "cuda.Dockerfile"):
        args = dockerfile_stages(path)[0].all("ARG")
        assert f'TORCH_SPEC="{torch}"' in args, f"{path.name}: torch pin differs from the Makefile's {torch}"


def test_uids_differ_between_sandbox_and_model_images():
    """RLIMIT_NPROC counts per uid: the sandbox must not share its uid with torch's threads."""
    users = {name: image_user(path) for name, path in image_dockerfiles().items()}
    assert users["psgpo/cpu"] == users["psgpo/cuda"]
    assert users["psgpo/sandbox"][0] != users["psgpo/cpu"][0]


def test_dockerignore_keeps_the_context_small():
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "**/__pycache__", ".pytest_cache", ".ruff_cache"} <= lines
    for needed in ("pyproject.toml", "README.md", "services", "trainer", "protos"):
        assert needed not in lines, f"{needed} is needed by `pip install .`"
