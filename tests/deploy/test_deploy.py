"""deploy/: every YAML parses; Kubernetes objects validate against the Kubernetes schemas kubernetes-validate
ships (core objects whole; the pod templates inside KubeRay's custom resources as PodTemplates); KubeRay and
Prometheus Operator resources use only fields their CRDs define; and the values that must agree do agree
(image, entrypoints = real CLI commands with valid flags, Secret/ConfigMap names, ports, metric names)."""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer.main
import yaml

import perfusion
from pipeline import metrics
from pipeline.cli import app
from pipeline.manifest import parse_manifest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = "1.33.0"
IMAGE = f"registry.example.com/perfusion-batch:{perfusion.__version__}"

# Spec fields of KubeRay's ray.io/v1 resources (ray-operator/apis/ray/v1/*_types.go, KubeRay 1.6): a typo
# here would be dropped silently by the API server's pruning, so it is caught here instead.
RAYCLUSTER_SPEC = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "upgradeStrategy", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP = {"rayStartParams", "serviceType", "template", "headService", "enableIngress", "resources", "labels"}
WORKER_GROUP = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "idleTimeoutSeconds",
    "numOfHosts", "scaleStrategy", "resources", "labels", "suspend",
}  # fmt: skip
AUTOSCALER = {"idleTimeoutSeconds", "upscalingMode", "resources", "image", "imagePullPolicy", "env", "envFrom",
              "securityContext", "version", "volumeMounts", "command", "args"}  # fmt: skip
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
RAYCRONJOB_SPEC = {"schedule", "jobTemplate", "suspend"}
PODMONITOR_SPEC = {"jobLabel", "namespaceSelector", "selector", "podMetricsEndpoints", "podTargetLabels"}


def documents(relative: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / relative).read_text()) if doc is not None]


def all_documents() -> dict[str, list[dict[str, Any]]]:
    return {str(path.relative_to(DEPLOY)): documents(str(path.relative_to(DEPLOY))) for path in yaml_files()}


def yaml_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml"))


def cluster_specs() -> dict[str, dict[str, Any]]:
    """Every RayCluster spec in deploy/kuberay: the cluster's own, the RayJob's and the RayCronJob's."""
    return {
        "raycluster": documents("kuberay/raycluster.yaml")[0]["spec"],
        "rayjob": documents("kuberay/rayjob-train.yaml")[0]["spec"]["rayClusterSpec"],
        "raycronjob": documents("kuberay/raycronjob-render.yaml")[0]["spec"]["jobTemplate"]["rayClusterSpec"],
    }


def pod_templates() -> dict[str, dict[str, Any]]:
    """Every pod template under deploy/kuberay, by where it is."""
    templates = {}
    for where, spec in cluster_specs().items():
        templates[f"{where}.head"] = spec["headGroupSpec"]["template"]
        for group in spec["workerGroupSpecs"]:
            templates[f"{where}.{group['groupName']}"] = group["template"]
    templates["cronjob"] = documents("kuberay/cronjob-render.yaml")[0]["spec"]["jobTemplate"]["spec"]["template"]
    return templates


def containers() -> dict[str, dict[str, Any]]:
    return {f"{where}/{c['name']}": c for where, t in pod_templates().items() for c in t["spec"]["containers"]}


# -- parsing and schemas ----------------------------------------------------------------------------------


def test_every_yaml_parses_and_names_its_kind():
    files = yaml_files()
    assert len(files) >= 9
    for path in files:
        docs = documents(str(path.relative_to(DEPLOY)))
        assert docs, path
        if path.name not in ("prometheus-scrape.yaml", "alerts.test.yaml"):  # Prometheus's own formats
            assert all(doc.get("apiVersion") and doc.get("kind") for doc in docs), path


@pytest.mark.parametrize(
    "relative",
    [
        "kuberay/config.yaml",
        "kuberay/storage-secret.example.yaml",
        "kuberay/cronjob-render.yaml",
        "monitoring/pushgateway.yaml",
    ],
)
def test_core_kubernetes_objects_validate_against_the_kubernetes_schema(relative):
    checked = 0
    for doc in documents(relative):
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD: checked below
        assert kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        checked += 1
    assert checked >= 1


def test_the_schema_check_catches_a_misspelled_field():
    cronjob = documents("kuberay/cronjob-render.yaml")[0]
    cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolcy"):
        kubernetes_validate.validate(cronjob, KUBERNETES, strict=True)


def test_pod_templates_inside_kuberay_resources_validate_as_kubernetes_pod_templates():
    templates = pod_templates()
    assert len(templates) == 7  # head + gpu group in 3 cluster specs, and the CronJob's pod
    for where, template in templates.items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        assert kubernetes_validate.validate(wrapped, KUBERNETES, strict=True), where


def test_kuberay_resources_use_only_fields_their_crds_define():
    for where, spec in cluster_specs().items():
        assert set(spec) <= RAYCLUSTER_SPEC, where
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP, where
        assert set(spec["autoscalerOptions"]) <= AUTOSCALER, where
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_GROUP, where
    rayjob = documents("kuberay/rayjob-train.yaml")[0]
    cron = documents("kuberay/raycronjob-render.yaml")[0]
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert set(rayjob["spec"]) <= RAYJOB_SPEC
    assert set(cron["spec"]) <= RAYCRONJOB_SPEC
    assert set(cron["spec"]["jobTemplate"]) <= RAYJOB_SPEC


# -- what the issue asks of the cluster and jobs ----------------------------------------------------------


def test_the_cluster_has_a_cpu_head_and_a_gpu_group_that_autoscales_from_zero():
    for where, spec in cluster_specs().items():
        assert spec["enableInTreeAutoscaling"] is True, where
        assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0, where
        assert spec["authOptions"] == {"mode": "token"}, where
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"]["limits"], where
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", where
        (gpu,) = spec["workerGroupSpecs"]
        assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0 and gpu["maxReplicas"] >= 1, where
        worker = gpu["template"]["spec"]["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1", where
    # The RayJob and RayCronJob start the very cluster raycluster.yaml describes.
    specs = cluster_specs()
    assert specs["rayjob"] == specs["raycluster"] == specs["raycronjob"]


def test_jobs_clean_up_after_themselves_and_have_deadlines():
    rayjob = documents("kuberay/rayjob-train.yaml")[0]["spec"]
    render = documents("kuberay/raycronjob-render.yaml")[0]["spec"]
    cronjob = documents("kuberay/cronjob-render.yaml")[0]["spec"]
    for spec in (rayjob, render["jobTemplate"]):
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0
        assert spec["activeDeadlineSeconds"] > 0
    assert cronjob["concurrencyPolicy"] == "Forbid"
    # A scheduled render must end before the next one is due (RayCronJob has no concurrencyPolicy).
    assert render["schedule"] == cronjob["schedule"] == "0 2 * * *"
    assert render["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600
    assert cronjob["jobTemplate"]["spec"]["activeDeadlineSeconds"] < 24 * 3600


def test_every_container_runs_the_project_image_as_a_non_root_user():
    found = containers()
    assert len(found) == 7
    for where, container in found.items():
        assert container["image"] == IMAGE, where
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "USER 1000" in dockerfile and "useradd --create-home --uid 1000" in dockerfile
    cron_pod = pod_templates()["cronjob"]["spec"]
    assert cron_pod["securityContext"]["runAsNonRoot"] is True


def entrypoints() -> dict[str, list[str]]:
    cron = documents("kuberay/cronjob-render.yaml")[0]
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    return {
        "rayjob": shlex.split(documents("kuberay/rayjob-train.yaml")[0]["spec"]["entrypoint"]),
        "raycronjob": shlex.split(documents("kuberay/raycronjob-render.yaml")[0]["spec"]["jobTemplate"]["entrypoint"]),
        "cronjob": container["command"],
    }


def test_entrypoints_are_real_cli_commands_with_valid_flags(monkeypatch):
    group = typer.main.get_command(app)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    for where, argv in entrypoints().items():
        assert argv[0] == "perfusion-batch", where
        command = group.commands[argv[1]]
        # Parses the flags exactly as the CLI would (unknown flags and bad values raise), without running.
        context = command.make_context(argv[1], list(argv[2:]))
        assert context.params["manifest"] == "/config/catalog.yaml", where
    assert entrypoints()["rayjob"][1] == "train"
    assert entrypoints()["raycronjob"][1] == entrypoints()["cronjob"][1] == "render"
    # Scheduled renders label their summaries with the schedule the alert rules watch.
    for where in ("raycronjob", "cronjob"):
        argv = entrypoints()[where]
        assert argv[argv.index("--schedule") + 1] == "nightly", where
    with pytest.raises(Exception, match="No such option: --actor"):
        group.commands["render"].make_context("render", ["/config/catalog.yaml", "--actor", "4"])


def test_the_manifest_mount_and_the_example_catalog_agree_with_the_entrypoints():
    config, catalog = documents("kuberay/config.yaml")
    manifest = parse_manifest(catalog["data"]["catalog.yaml"], "/config/catalog.yaml")
    assert manifest.renders and manifest.concepts
    for where in ("raycluster.head", "rayjob.head", "raycronjob.head", "cronjob"):
        spec = pod_templates()[where]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert volumes[mounts["/config"]]["configMap"]["name"] == catalog["metadata"]["name"], where
    # The environment the CLI reads (pipeline/cli/ envvars) comes from this ConfigMap.
    assert {"PERFUSION_BATCH_ROOT", "PERFUSION_BATCH_PUSHGATEWAY", "PERFUSION_BATCH_DEVICE"} <= set(config["data"])
    assert config["data"]["PERFUSION_BATCH_DEVICE"] in {"auto", "gpu", "cpu"}


def test_secret_and_config_names_agree():
    config_names = {doc["metadata"]["name"] for doc in documents("kuberay/config.yaml")}
    (secret,) = documents("kuberay/storage-secret.example.yaml")
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}  # an example: no credentials shipped
    cluster_name = documents("kuberay/raycluster.yaml")[0]["metadata"]["name"]
    for where, container in containers().items():
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_names, where
            if "secretRef" in source:
                assert source["secretRef"]["name"] == secret["metadata"]["name"], where
    # The CronJob's token is the Secret KubeRay creates for the cluster: named after it, key auth_token.
    cron = containers()["cronjob/render"]
    token = next(e for e in cron["env"] if e["name"] == "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"]
    assert token == {"name": cluster_name, "key": "auth_token"}


def test_ports_agree():
    cluster = documents("kuberay/raycluster.yaml")[0]
    head = cluster["spec"]["headGroupSpec"]
    head_ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    cron = containers()["cronjob/render"]
    address = next(e for e in cron["env"] if e["name"] == "RAY_API_SERVER_ADDRESS")["value"]
    assert address == f"http://{cluster['metadata']['name']}-head-svc:{head_ports['dashboard']}"
    # Ray exports metrics on metrics-export-port; the PodMonitor scrapes the port named "metrics".
    (monitor,) = documents("monitoring/podmonitor.yaml")
    assert set(monitor["spec"]) <= PODMONITOR_SPEC
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    for where, spec in cluster_specs().items():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
            assert str(ports["metrics"]) == group["rayStartParams"]["metrics-export-port"], where
            name = group["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == name, where
    # The Pushgateway address the CLI gets is the Service deploy/monitoring/pushgateway.yaml creates.
    gateway = documents("kuberay/config.yaml")[0]["data"]["PERFUSION_BATCH_PUSHGATEWAY"]
    _deployment, service, service_monitor = documents("monitoring/pushgateway.yaml")
    port = service["spec"]["ports"][0]["port"]
    assert gateway == f"http://{service['metadata']['name']}.monitoring.svc:{port}"
    assert service_monitor["spec"]["endpoints"][0]["honorLabels"] is True
    scrape = documents("monitoring/prometheus-scrape.yaml")[0]
    targets = [t for job in scrape["scrape_configs"] for c in job.get("static_configs", []) for t in c["targets"]]
    assert targets == [gateway.removeprefix("http://")]


def test_alert_rules_use_the_metric_names_the_code_exports():
    (rule,) = documents("monitoring/alerts.yaml")
    rules = rule["spec"]["groups"][0]["rules"]
    names = {r["alert"] for r in rules if "alert" in r}
    assert {"PerfusionScheduledRenderLate", "PerfusionConceptFailureRatioHigh"} <= names
    source = Path(metrics.__file__).read_text()
    cli_source = "".join(path.read_text() for path in sorted((REPO / "pipeline" / "cli").glob("*.py")))
    for r in rules:
        for metric in re.findall(r"\b((?:ray_)?perfusion_[a-z_]+)\b", r["expr"]):
            exported = metric.removeprefix("ray_")
            if exported.startswith("perfusion_batch_job_") and exported.endswith(("_concepts", "_images")):
                assert f'"{exported.rsplit("_", 1)[1]}"' in cli_source, metric  # push_summary(unit=...)
            else:
                assert f'"{exported}"' in source, metric
        for job in re.findall(r'job="([^"]+)"', r["expr"]):
            # the job name the CLI pushes under: perfusion-batch-<command> (tests/pipeline check the pushes)
            assert 'f"perfusion-batch-{command}"' in cli_source
            assert job.removeprefix("perfusion-batch-") in typer.main.get_command(app).commands, job  # type: ignore[attr-defined]
        if 'job="perfusion-batch-render"' in r["expr"]:
            assert 'schedule!=""' in r["expr"], r["alert"]  # only scheduled runs (render --schedule)
        if "alert" in r:
            assert r["for"] and r["labels"]["severity"] and r["annotations"]["summary"]
        else:
            assert re.fullmatch(r"perfusion:[a-z_]+:[0-9a-z]+", r["record"]), r  # level:metric:operation


def test_every_alert_fires_when_it_should_and_only_then(tmp_path):
    """deploy/monitoring/alerts.test.yaml through `promtool test rules` (Debian's prometheus package; CI
    installs it, see .ci/run): each alert on the series that must fire it and on ones that must not."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("PERFUSION_BATCH_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is not on PATH: apt-get install prometheus (Debian) or put promtool on PATH")
        pytest.skip("promtool is not installed (apt-get install prometheus); CI runs this test")
    (rule,) = documents("monitoring/alerts.yaml")
    (tmp_path / "alerts.rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    unit_tests = yaml.safe_load((DEPLOY / "monitoring" / "alerts.test.yaml").read_text())
    assert unit_tests["rule_files"] == ["alerts.rules.yaml"]
    tested = {t["alertname"] for case in unit_tests["tests"] for t in case.get("alert_rule_test", [])}
    assert tested == {r["alert"] for r in rule["spec"]["groups"][0]["rules"] if "alert" in r}  # every alert
    shutil.copy(DEPLOY / "monitoring" / "alerts.test.yaml", tmp_path)
    run = functools.partial(subprocess.run, cwd=tmp_path, capture_output=True, text=True)
    checked = run([promtool, "check", "rules", "alerts.rules.yaml"])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    result = run([promtool, "test", "rules", "alerts.test.yaml"])
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


# -- the image ---------------------------------------------------------------------------------------------


def test_the_dockerfile_copies_files_that_exist_and_the_context_sends_them():
    text = (DEPLOY / "Dockerfile").read_text()
    sources = [line.split()[1] for line in text.splitlines() if line.startswith("COPY ")]
    sources += [s for line in text.splitlines() if line.startswith("COPY ") for s in line.split()[2:-1]]
    assert {"pyproject.toml", "README.md", "perfusion", "pipeline", "manifests", "tests"} <= set(sources)
    assert {"benchmarks", "deploy", ".dockerignore"} <= set(sources)  # what the test suite in the cpu image reads
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"}
    for source in sources:
        assert (REPO / source).exists(), source
        assert source not in ignored, source
    stages = re.findall(r"^FROM \S+ AS (\S+)", text, flags=re.M)
    assert stages[-1] == "gpu" and "cpu" in stages  # `docker build` without --target builds the GPU image
    assert re.search(r"^ARG TORCH_VERSION=", text, flags=re.M) and re.search(r"^ARG PYTHON_VERSION=", text, flags=re.M)
    assert "download.pytorch.org/whl/cu" in text and "download.pytorch.org/whl/cpu" in text
    assert not re.search(r"(AWS_SECRET|AWS_ACCESS|TOKEN)\S*=", text)  # no credentials baked in
    # The Ray in the image is the Ray the KubeRay specs announce (head, workers and clients must agree).
    (ray_version,) = set(re.findall(r"^ARG RAY_VERSION=(\S+)", text, flags=re.M))
    assert {spec["rayVersion"] for spec in cluster_specs().values()} == {ray_version}
    assert text.count('"ray[default,data]==${RAY_VERSION}"') == 2


@pytest.mark.slow
def test_a_regular_install_carries_the_toy_model(tmp_path):
    """The image runs `pip install .` (not editable): the shipped toy model must be package data. Built from
    a copy of what the Dockerfile copies, so the build leaves nothing in the working tree."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("perfusion", "pipeline"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    (source / "perfusion/assets/toy/checkpoint.safetensors").write_bytes(b"a pretraining leftover")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*build, str(source)], check=True)
    (wheel,) = tmp_path.glob("perfusion_batch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("toy.safetensors", "oracle.safetensors", "pretrain.json"):
        assert f"perfusion/assets/toy/{asset}" in names
    assert "perfusion/assets/tokenizer/vocab.json" in names
    assert "perfusion/assets/toy-clip/model.safetensors" in names
    for asset in ("toy-mmdit.safetensors", "dynaip-adapter.safetensors", "pretrain.json", "train_dynaip.json"):
        assert f"perfusion/assets/toy-mmdit/{asset}" in names  # the zero-shot base and its adapter
    assert "perfusion/assets/toy/checkpoint.safetensors" not in names
    assert not [n for n in names if n.startswith("perfusion/assets/toy/words/")]  # a candidate, not shipped
    assert "pipeline/cli/__init__.py" in names


def test_the_operator_guide_refers_to_files_that_exist():
    guide = (DEPLOY / "README.md").read_text()
    referenced = set(re.findall(r"\b(deploy/[\w./-]+\.(?:yaml|md)|deploy/Dockerfile)\b", guide))
    assert len(referenced) >= 8
    for path in referenced:
        assert (REPO / path).exists(), path
    for command in re.findall(r"(?:^|`)perfusion-batch (\w+)", guide, flags=re.M):
        assert command in typer.main.get_command(app).commands, command  # type: ignore[attr-defined]
