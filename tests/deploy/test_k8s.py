"""deploy/k8s: every variant (base, overlays, components) renders, validates against the Kubernetes
JSON schemas, and follows the deployment's rules: probes and limits everywhere, a locked-down
sandbox with no egress, gRPC readiness on the standard health check, headless Services for gRPC,
references that resolve, the project's images and the right GPUs."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy import kustomize
from tests.deploy.support import (
    COMPONENTS,
    DOCS,
    K8S,
    OUT_OF_BAND_SECRETS,
    OVERLAYS,
    VARIANTS,
    by_kind,
    component_of,
    container_env,
    default_of,
    expand,
    image_dockerfiles,
    image_user,
    k8s_refs,
    project_version,
    psgpo_invocations,
    rendered,
    resolve_psgpo,
    settings_classes,
    workloads,
)

# Oldest Kubernetes the manifests target (gRPC probes GA in 1.27, PSA labels, autoscaling/v2), and
# the newest schema set kubernetes-validate ships.
K8S_VERSIONS = ["1.28.0", "latest"]
PSGPO_PORTS = {"prm": ("PRM_", "http_port", "grpc_port"), "sandbox": ("SANDBOX_", "http_port", "grpc_port")}


def pod_spec(manifest):
    return kustomize.pod_spec(manifest)


def all_containers(manifest):
    return kustomize.containers(pod_spec(manifest))


def template_labels(manifest) -> dict[str, str]:
    if manifest["kind"] == "Pod":
        return manifest["metadata"].get("labels", {})
    return manifest["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ------------------------------------------------------------------------------------------ rendering


def test_every_kustomization_is_in_a_tested_variant():
    dirs = {p.parent for p in K8S.rglob("kustomization.yaml")}
    assert dirs == set(OVERLAYS.values()) | set(COMPONENTS)
    used = {c for v in VARIANTS if "+" in v for c in v.split("+")[1].split(",")}
    assert used == {c.name for c in COMPONENTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_renders_with_unique_names_in_one_namespace(variant):
    manifests = rendered(variant)
    keys = [(m["kind"], m["metadata"]["name"]) for m in manifests]
    assert len(keys) == len(set(keys))
    for m in manifests:
        if m["kind"] not in kustomize.CLUSTER_SCOPED:
            assert m["metadata"].get("namespace") == "psgpo", m["metadata"]["name"]


def test_components_do_what_they_say():
    gvisor = by_kind(rendered("cpu+gvisor"), "Deployment")
    assert gvisor["sandbox"]["spec"]["template"]["spec"]["runtimeClassName"] == "gvisor"
    assert all("runtimeClassName" not in pod_spec(d) for n, d in gvisor.items() if n != "sandbox")
    external = rendered("gpu+gvisor,external-redis")
    assert "redis" not in by_kind(external, "StatefulSet")
    assert not {"redis", "redis-headless"} & set(by_kind(external, "Service"))
    for name in ("rollout", "trainer"):
        workload = by_kind(external, "Deployment").get(name) or by_kind(external, "Job")[name]
        (container,) = pod_spec(workload)["containers"]
        refs = [s["secretRef"] for s in container["envFrom"] if "secretRef" in s]
        assert {"name": "psgpo-redis", "optional": True} in refs, f"{name} cannot take an external Redis URL"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not on PATH: renderer not cross-checked")
@pytest.mark.parametrize("variant", ["base", "cpu", "gpu"])
def test_renderer_matches_kubectl_kustomize(variant):
    try:
        proc = subprocess.run(
            ["kubectl", "kustomize", str(OVERLAYS[variant])], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"kubectl kustomize did not run: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"kubectl kustomize failed here: {proc.stderr.strip()[:200]}")
    theirs = {(m["kind"], m["metadata"]["name"]): m for m in yaml.safe_load_all(proc.stdout) if m}
    ours = {(m["kind"], m["metadata"]["name"]): m for m in rendered(variant)}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == theirs[key], key


# -------------------------------------------------------------------------------------------- schemas


@functools.cache
def _validator(kind: str, api_version: str, version: str):
    """A strict Draft 2020-12 validator for one kind, built once: kubernetes_validate.validate does
    the same lookup but re-reads the 1.2 MB definitions file on every call."""
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (dev extra: kubernetes-validate)"
    )
    import jsonschema
    from referencing import Registry, Resource

    utils = kv.utils
    target = utils.latest_version() if version == "latest" else version
    chosen = [v for v in utils.all_versions() if utils.major_minor(v) <= utils.major_minor(target)][-1]
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    folder = f"kubernetes-json-schema/v{chosen}-local-strict"
    try:
        schema = utils.schema_contents(f"{folder}/{kind.lower()}-{group}.json", target)
    except FileNotFoundError:
        pytest.fail(f"no schema for {kind} {api_version} in Kubernetes {chosen}")
    definitions = utils.schema_contents(f"{folder}/_definitions.json", target)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return chosen, jsonschema.Draft202012Validator(schema, registry=registry)


def _validate(manifest: dict, version: str) -> None:
    chosen, validator = _validator(manifest["kind"], manifest["apiVersion"], version)
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))
    messages = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]
    assert not messages, (
        f"{manifest['kind']}/{manifest['metadata']['name']} (Kubernetes {chosen}): {messages}"
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate_against_kubernetes_schemas(variant, version):
    for manifest in rendered(variant):
        _validate(manifest, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_standalone_manifests_validate(version):
    """Manifests applied by hand (not through a kustomization), e.g. the gVisor RuntimeClass."""
    referenced = set()
    for kfile in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(kfile.read_text())
        referenced |= {(kfile.parent / r).resolve() for r in doc.get("resources", [])}
        referenced |= {(kfile.parent / p["path"]).resolve() for p in doc.get("patches", [])}
    standalone = [
        p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and p.resolve() not in referenced
    ]
    assert standalone, "expected the gVisor RuntimeClass at least"
    for path in standalone:
        for manifest in kustomize.load_documents(path):
            _validate(manifest, version)


# --------------------------------------------------------------------------------------------- policy


@pytest.mark.parametrize("variant", VARIANTS)
def test_long_running_workloads_have_probes_and_every_container_limits(variant):
    for workload in workloads(rendered(variant)):
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        for container in kustomize.containers(spec):
            limits = container.get("resources", {}).get("limits", {})
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= limits.keys(), f"{name}/{container['name']}: cpu and memory limits"
            assert {"cpu", "memory"} <= requests.keys(), f"{name}/{container['name']}: requests"
        if workload["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}:
            for container in spec["containers"]:
                for probe in ("readinessProbe", "livenessProbe"):
                    assert probe in container, f"{name}/{container['name']}: no {probe}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_is_restricted(variant):
    """Pod Security 'restricted' (the namespace enforces it), plus no API token and no service links
    (a Service named prm-grpc would inject PRM_GRPC_PORT=tcp://... into the PRM's settings)."""
    manifests = rendered(variant)
    (namespace,) = by_kind(manifests, "Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in workloads(manifests):
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        pod_sc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, name
        assert spec.get("enableServiceLinks") is False, name
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert not any("hostPath" in v for v in spec.get("volumes", [])), name
        for container in kustomize.containers(spec):
            sc = container.get("securityContext", {})
            where = f"{name}/{container['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert (sc.get("runAsUser", pod_sc.get("runAsUser")) or 0) > 0, where
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert not sc.get("privileged"), where


@pytest.mark.parametrize("variant", VARIANTS)
def test_sandbox_is_locked_down(variant):
    manifests = rendered(variant)
    sandbox = by_kind(manifests, "Deployment")["sandbox"]
    spec = pod_spec(sandbox)
    (container,) = spec["containers"]
    assert not spec.get("initContainers")
    sc, pod_sc = container["securityContext"], spec["securityContext"]
    assert sc["runAsNonRoot"] is True and pod_sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"} == pod_sc["seccompProfile"]
    assert spec["automountServiceAccountToken"] is False
    # only the token Secret and an emptyDir: no model, run or host data in reach of untrusted code
    assert {next(k for k in v if k != "name") for v in spec["volumes"]} <= {"secret", "emptyDir"}
    assert all(v["emptyDir"].get("sizeLimit") for v in spec["volumes"] if "emptyDir" in v)
    assert "limits" in container["resources"] and "nvidia.com/gpu" not in container["resources"]["limits"]
    assert container["image"].split(":")[0].endswith("psgpo/sandbox")

    policies = [
        p
        for p in by_kind(manifests, "NetworkPolicy").values()
        if selects(p["spec"]["podSelector"].get("matchLabels", {}), template_labels(sandbox))
    ]
    assert policies, "no NetworkPolicy selects the sandbox pods"
    for policy in policies:
        assert "Egress" in policy["spec"]["policyTypes"]
        assert not policy["spec"].get("egress"), "the sandbox must have no egress rule at all"
    # ingress only from labelled clients, and the rollout workers carry that label
    (policy,) = policies
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}
    rollout = by_kind(manifests, "Deployment")["rollout"]
    assert selects(peer["podSelector"]["matchLabels"], template_labels(rollout))
    ports = {p["containerPort"] for p in container["ports"]}
    assert {p["port"] for p in rule["ports"]} == ports


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_ports_match_the_code_defaults_and_grpc_readiness(variant):
    manifests = rendered(variant)
    deployments = by_kind(manifests, "Deployment")
    for component, (prefix, http_field, grpc_field) in PSGPO_PORTS.items():
        cls = settings_classes()[prefix]
        (container,) = pod_spec(deployments[component])["containers"]
        env = container_env(manifests, container)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": default_of(cls, http_field), "grpc": default_of(cls, grpc_field)}
        assert int(env[f"{prefix}HTTP_PORT"]) == ports["http"]
        assert int(env[f"{prefix}GRPC_PORT"]) == ports["grpc"]
        assert env[f"{prefix}HOST"] == "0.0.0.0"
        assert container["readinessProbe"] == container["readinessProbe"] | {"grpc": {"port": ports["grpc"]}}
        for probe in ("livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_resolve_to_pods_and_grpc_has_headless_services(variant):
    manifests = rendered(variant)
    pods = [w for w in workloads(manifests)]
    for service in by_kind(manifests, "Service").values():
        targets = [w for w in pods if selects(service["spec"]["selector"], template_labels(w))]
        assert targets, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            for workload in targets:
                (container,) = pod_spec(workload)["containers"]
                names = {p.get("name") for p in container["ports"]}
                names |= {p["containerPort"] for p in container["ports"]}
                assert port["targetPort"] in names, f"{service['metadata']['name']}: {port}"
    rollout = by_kind(manifests, "Deployment")["rollout"]
    env = container_env(manifests, pod_spec(rollout)["containers"][0])
    services = by_kind(manifests, "Service")
    for var, component in (("ROLLOUT_PRM", "prm"), ("ROLLOUT_SANDBOX", "sandbox")):
        host, _, port = env[var].removeprefix("dns:///").rpartition(":")
        service = services[host]
        assert service["spec"].get("clusterIP") == "None", f"{var} should name a headless Service"
        assert component_of(service) == component
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_links_could_not_clash_with_settings(variant):
    """Even with service links on, no Service name may inject a variable a settings class reads."""
    fields = {
        prefix + name.upper() for prefix, cls in settings_classes().items() for name in cls.model_fields
    }
    for service in by_kind(rendered(variant), "Service").values():
        stem = service["metadata"]["name"].upper().replace("-", "_")
        injected = {f"{stem}_SERVICE_HOST", f"{stem}_SERVICE_PORT", f"{stem}_PORT"}
        for port in service["spec"]["ports"]:
            injected.add(f"{stem}_SERVICE_PORT_{port.get('name', '').upper().replace('-', '_')}")
            base = f"{stem}_PORT_{port['port']}_TCP"
            injected |= {base, f"{base}_PROTO", f"{base}_PORT", f"{base}_ADDR"}
        assert not injected & fields, service["metadata"]["name"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_references_resolve(variant):
    manifests = rendered(variant)
    configmaps, claims = by_kind(manifests, "ConfigMap"), by_kind(manifests, "PersistentVolumeClaim")
    for workload in workloads(manifests):
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"] for v in spec.get("volumes", [])} | templates
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
            if "secret" in volume:
                assert volume["secret"]["secretName"] in OUT_OF_BAND_SECRETS, name
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, name
        for container in kustomize.containers(spec):
            where = f"{name}/{container['name']}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: mount {mount['name']}"
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, where
                if "secretRef" in source:
                    ref = source["secretRef"]
                    assert ref["name"] in OUT_OF_BAND_SECRETS and ref.get("optional") is True, where
            for var in container.get("env", []):
                secret = var.get("valueFrom", {}).get("secretKeyRef")
                if secret:
                    assert secret["name"] in OUT_OF_BAND_SECRETS, where
            # every $(VAR) is defined: in env values by an envFrom source or an earlier env entry,
            # in command and args by any of the container's variables
            defined = set(container_env(manifests, {"envFrom": container.get("envFrom", [])}))
            for var in container.get("env", []):
                for ref in k8s_refs(var.get("value", "")):
                    assert ref in defined, f"{where}: {var['name']} uses $({ref}), undefined"
                defined.add(var["name"])
            for text in [*container.get("command", []), *container.get("args", [])]:
                for ref in k8s_refs(text):
                    assert ref in defined, f"{where}: $({ref}) is not defined"


def test_out_of_band_secrets_are_documented():
    text = DOCS.read_text()
    assert "create secret generic psgpo-auth" in text
    assert "psgpo-redis" in text and "PSGPO_REDIS_URL" in text


@pytest.mark.parametrize("variant", VARIANTS)
def test_autoscalers_and_disruption_budgets_target_real_workloads(variant):
    manifests = rendered(variant)
    deployments = by_kind(manifests, "Deployment")
    for hpa in by_kind(manifests, "HorizontalPodAutoscaler").values():
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deployments
        assert "replicas" not in deployments[ref["name"]]["spec"], "the HPA owns the replica count"
    assert {"prm"} <= set(by_kind(manifests, "HorizontalPodAutoscaler"))
    budgets = by_kind(manifests, "PodDisruptionBudget")
    for name in ("prm", "sandbox", "rollout"):
        matched = [
            b
            for b in budgets.values()
            if selects(b["spec"]["selector"]["matchLabels"], template_labels(deployments[name]))
        ]
        assert len(matched) == 1, f"{name}: {len(matched)} PodDisruptionBudgets"


@pytest.mark.parametrize("variant", VARIANTS)
def test_images_are_the_projects_or_pinned_official(variant):
    version = project_version()
    ours = image_dockerfiles()
    for workload in workloads(rendered(variant)):
        spec = pod_spec(workload)
        for container in kustomize.containers(spec):
            image = container["image"]
            name, _, tag = image.rpartition(":")
            if name in ours:
                assert tag == version, image
                uid, gid = image_user(ours[name])
                sc = spec["securityContext"]
                assert (sc["runAsUser"], sc["runAsGroup"]) == (uid, gid), f"{image}: the image's USER"
            else:
                assert name == "redis" and tag and tag != "latest", f"{image}: not built here nor pinned"
    images = {c["image"].rpartition(":")[0] for w in workloads(rendered(variant)) for c in all_containers(w)}
    if variant.startswith("gpu"):
        assert "psgpo/cpu" not in images and "psgpo/cuda" in images
    else:
        assert "psgpo/cuda" not in images


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpus_only_where_the_models_run(variant):
    gpu = variant.startswith("gpu")
    for workload in workloads(rendered(variant)):
        for container in pod_spec(workload)["containers"]:
            limits = container["resources"]["limits"]
            wants = gpu and component_of(workload) in {"prm", "rollout", "trainer"}
            assert ("nvidia.com/gpu" in limits) == wants, f"{workload['metadata']['name']}"
            if wants:
                tolerations = pod_spec(workload).get("tolerations", [])
                assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)


@pytest.mark.parametrize("variant", VARIANTS)
def test_redis_is_a_stateful_set_with_aof_on_a_volume(variant):
    statefulsets = by_kind(rendered(variant), "StatefulSet")
    if "external-redis" in variant:
        assert "redis" not in statefulsets
        return
    redis = statefulsets["redis"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    assert redis["spec"]["serviceName"] in by_kind(rendered(variant), "Service")


def _k8s_commands() -> list[tuple[str, list[str]]]:
    out = []
    for variant in ("cpu", "gpu"):
        manifests = rendered(variant)
        for workload in workloads(manifests):
            for container in kustomize.containers(pod_spec(workload)):
                env = {k: v for k, v in container_env(manifests, container).items() if v is not None}
                argv = [expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]
                for invocation in psgpo_invocations(argv):
                    out.append((f"{variant}:{workload['metadata']['name']}/{container['name']}", invocation))
    return out


@pytest.mark.parametrize(("where", "argv"), _k8s_commands(), ids=[w for w, _ in _k8s_commands()])
def test_commands_are_real_psgpo_subcommands(where, argv):
    resolved = resolve_psgpo(argv)
    if not resolved.flags_checked:
        pytest.skip(f"{where}: `psgpo {' '.join(resolved.path)}` is not built yet")


def test_every_psgpo_workload_runs_a_psgpo_command():
    names = {where.split(":")[1].split("/")[0] for where, _ in _k8s_commands()}
    assert names == {"prm", "sandbox", "rollout", "trainer", "psgpo-models"}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_metrics_annotations_point_at_a_container_port(variant):
    annotated = 0
    for workload in workloads(rendered(variant)):
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            annotated += 1
            ports = {p["containerPort"] for c in pod_spec(workload)["containers"] for p in c.get("ports", [])}
            assert int(annotations["prometheus.io/port"]) in ports, workload["metadata"]["name"]
    assert annotated == 3
