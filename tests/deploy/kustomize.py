"""A small kustomize renderer for the subset deploy/k8s uses, so the manifests can be checked with no
kustomize binary: `resources` (files and directories), `components`, `namespace`, `images` and
`patches` given by `path` (strategic-merge patches, `$patch: delete` included). Any other field in a
kustomization is refused, so the subset cannot drift silently from what this renderer understands;
where `kubectl` is on PATH a test compares its output with `kubectl kustomize`.

Strategic merge, as Kubernetes defines it for the fields used here: maps merge key by key (null
deletes), lists of containers, env vars, volumes, ports and mounts merge by their merge key, and
every other list is replaced. Items a patch adds to a merged list come first, as kustomize
writes them (order matters for env: a $(VAR) reference sees only the variables above it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "components", "patches", "images"}
# Merge keys of the lists that strategic merge patches merge instead of replacing (k8s API types).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
}
CLUSTER_SCOPED = {
    "Namespace",
    "RuntimeClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "CustomResourceDefinition",
}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class KustomizeError(ValueError):
    pass


def load_documents(path: Path) -> list[Manifest]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def render(directory: Path) -> list[Manifest]:
    """The manifests a `kustomize build DIRECTORY` would print (order aside)."""
    return _build(Path(directory), expect="Kustomization")


def apply_components(resources: list[Manifest], components: list[Path]) -> list[Manifest]:
    """Resources with components applied, as an overlay listing them under `components` would."""
    out = copy.deepcopy(resources)
    for component in components:
        out = _apply_kustomization(Path(component), out, expect="Component")
    return out


def _read_kustomization(directory: Path) -> Manifest:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    (doc,) = load_documents(path)
    unknown = set(doc) - KUSTOMIZATION_FIELDS
    if unknown:
        raise KustomizeError(f"{path}: fields outside the supported subset: {sorted(unknown)}")
    return doc


def _build(directory: Path, expect: str) -> list[Manifest]:
    return _apply_kustomization(directory, [], expect)


def _apply_kustomization(directory: Path, accumulated: list[Manifest], expect: str) -> list[Manifest]:
    doc = _read_kustomization(directory)
    kind = doc.get("kind", "Kustomization")
    if kind != expect:
        raise KustomizeError(f"{directory}: kind {kind}, expected {expect}")
    resources = copy.deepcopy(accumulated)
    for entry in doc.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            resources += _build(target, expect="Kustomization")
        elif target.is_file():
            resources += load_documents(target)
        else:
            raise KustomizeError(f"{directory}: resource {entry} does not exist")
        _check_unique(resources, directory)
    for entry in doc.get("components", []):
        resources = _apply_kustomization((directory / entry).resolve(), resources, expect="Component")
    for entry in doc.get("patches", []):
        if set(entry) != {"path"}:
            raise KustomizeError(f"{directory}: only `path` patches are supported, got {entry}")
        for patch in load_documents(directory / entry["path"]):
            resources = _apply_patch(resources, patch, directory / entry["path"])
    for image in doc.get("images", []):
        _set_image(resources, image)
    if "namespace" in doc:
        for manifest in resources:
            if manifest["kind"] not in CLUSTER_SCOPED:
                manifest.setdefault("metadata", {})["namespace"] = doc["namespace"]
    return resources


def _check_unique(resources: list[Manifest], where: Path) -> None:
    seen: set[tuple[str, str]] = set()
    for manifest in resources:
        key = (manifest["kind"], manifest["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{where}: duplicate resource {key}")
        seen.add(key)


def _apply_patch(resources: list[Manifest], patch: Manifest, source: Path) -> list[Manifest]:
    kind, name = patch.get("kind"), patch.get("metadata", {}).get("name")
    matches = [i for i, m in enumerate(resources) if m["kind"] == kind and m["metadata"]["name"] == name]
    if len(matches) != 1:
        raise KustomizeError(f"{source}: patch target {kind}/{name} matches {len(matches)} resources")
    (index,) = matches
    body = {k: v for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return resources[:index] + resources[index + 1 :]
    if "$patch" in patch:
        raise KustomizeError(f"{source}: unsupported $patch {patch['$patch']!r}")
    out = list(resources)
    out[index] = strategic_merge(resources[index], body)
    return out


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and _merge_key(field, base + patch):
        key = _merge_key(field, base + patch)
        merged_list = copy.deepcopy(base)
        added = []
        for item in patch:
            for i, existing in enumerate(merged_list):
                if existing.get(key) == item.get(key):
                    merged_list[i] = strategic_merge(existing, item)
                    break
            else:
                added.append(copy.deepcopy(item))
        return added + merged_list  # kustomize puts items the patch adds first, in patch order
    return copy.deepcopy(patch)


def _merge_key(field: str | None, items: list[Any]) -> str | None:
    if field == "ports":  # container ports merge by containerPort, Service ports by port
        key = "containerPort" if all("containerPort" in i for i in items) else "port"
    else:
        key = MERGE_KEYS.get(field or "")
    if key and all(isinstance(i, dict) and key in i for i in items):
        return key
    return None


def pod_spec(manifest: Manifest) -> Manifest | None:
    if manifest["kind"] in POD_TEMPLATE_KINDS:
        return manifest["spec"]["template"]["spec"]
    if manifest["kind"] == "CronJob":
        return manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if manifest["kind"] == "Pod":
        return manifest["spec"]
    return None


def containers(spec: Manifest) -> list[Manifest]:
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def _set_image(resources: list[Manifest], image: Manifest) -> None:
    for manifest in resources:
        spec = pod_spec(manifest)
        if spec is None:
            continue
        for container in containers(spec):
            name, sep, tag = _split_image(container["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            if "newTag" in image:
                tag, sep = image["newTag"], ":"
            if "digest" in image:
                tag, sep = image["digest"], "@"
            container["image"] = f"{name}{sep}{tag}" if tag else name


def _split_image(image: str) -> tuple[str, str, str]:
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@", digest
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = image.rsplit(":", 1)
        return name, ":", tag
    return image, "", ""
