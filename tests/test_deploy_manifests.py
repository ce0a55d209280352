"""deploy/: the Kubernetes, KServe and Azure ML manifests, checked offline.

- Kubernetes objects are validated against the API's schemas that ``kubernetes-validate`` ships (strict:
  an unknown or misspelt field fails), for the oldest and the newest Kubernetes checked here.
- KServe's ServingRuntime and InferenceService are CRDs that kubernetes-validate does not know: the
  fields used here are checked against a schema written here from KServe's CRD (v1alpha1 and v1beta1),
  whose containers, probes, resources and env are Kubernetes' own core schemas.
- Azure ML's endpoint and deployment are loaded with the ``azure-ai-ml`` SDK (its schema refuses an
  unknown field or a wrong type), as ``az ml ... create -f`` loads them.
- Every manifest agrees with the server: its arguments parse with ``flaxsst.serve.server.parser()``,
  its probes name routes of ``flaxsst.serve.app.ROUTES`` on the port given, the grace period covers
  the drain, the memory covers the measured peak.
"""

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from flaxsst.serve import azureml_score
from flaxsst.serve.app import ROUTES
from flaxsst.serve.server import parser

pytestmark = pytest.mark.filterwarnings("ignore:The `context` parameter is deprecated")  # azure-ai-ml on marshmallow

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES, KSERVE, AZUREML = DEPLOY / "kubernetes", DEPLOY / "kserve", DEPLOY / "azureml"
OLDEST_KUBERNETES = "1.30"
# bench/RESULTS.md (cold start, DistilBERT-base on a 2-core CPU): the most resident memory of the server,
# sampled every 10 s through 10 minutes at 64 concurrent clients.
MEASURED_MAX_RSS_MIB = 1223
LIMIT_HEADROOM = 1.5  # the memory limit: an unprepared start's compiler on top of the measured peak
# bench/RESULTS.md: an empty FLAXSST_HOME is ready in 40.7 s on 2 cores; planned for ~2 min on one.
UNPREPARED_START_S = 120
UVICORN_MARGIN_S = 5  # flaxsst/serve/server.py: uvicorn's timeout_graceful_shutdown is --timeout-ms + 5 s
KSERVE_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri
# azmlinfsrv's own settings (azureml-inference-server-http) that deployment.yml may set.
AZMLINFSRV_SETTINGS = {"WORKER_COUNT", "WORKER_TIMEOUT", "GUNICORN_CMD_ARGS", "SCORING_TIMEOUT_MS", "AZUREML_LOG_LEVEL"}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests(folder: Path) -> list[dict]:
    return [doc for path in sorted(folder.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in documents(path)]


def one(docs: list[dict], kind: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([KMGT]i?)?", str(quantity)).groups()
    scale = {None: 2**-20, "Ki": 2**-10, "Mi": 1, "Gi": 2**10, "Ti": 2**20,
             "K": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20, "T": 1e12 / 2**20}[unit]
    return float(number) * scale


def render(arg: str, meta: dict) -> str:
    """KServe's placeholders (Go templates over the InferenceService's metadata): only ``{{.Name}}`` here."""
    for placeholder in re.findall(r"\{\{.*?\}\}", arg):
        assert placeholder.replace(" ", "") == "{{.Name}}", f"unexpected KServe placeholder {placeholder}"
    return re.sub(r"\{\{\s*\.Name\s*\}\}", meta["name"], arg)


def server_args(container: dict, meta: dict | None = None):
    """The container's command line, parsed by flaxsst.serve's own parser (an unknown flag fails)."""
    assert container["command"] == ["flaxsst-serve"], container["command"]
    args = [render(arg, meta) if meta else arg for arg in container["args"]]
    server = parser()
    flags = [arg.split("=", 1)[0] for arg in args if arg.startswith("--")]
    assert set(flags) <= set(server._option_string_actions), (  # argparse would take an abbreviation
        f"not flags of flaxsst-serve (spelt out): {sorted(set(flags) - set(server._option_string_actions))}")
    try:
        return server.parse_intermixed_args(args)
    except SystemExit:
        pytest.fail(f"container {container['name']}: flaxsst-serve does not accept {args} (its error is above)")


def check_container_agrees(container: dict, pod: dict, resources: dict | None = None, meta: dict | None = None):
    """Flags, port, probes, drain and memory of one flaxsst-serve container in its pod spec."""
    args = server_args(container, meta)
    assert args.host == "0.0.0.0", "in a container the server must listen on every interface"
    ports = {port.get("name"): port["containerPort"] for port in container["ports"]}
    assert args.port in ports.values(), f"--port {args.port} is not a containerPort: {ports}"

    def probe_port(probe):
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else port

    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert probe["httpGet"]["path"] in ROUTES, f"{kind} {probe['httpGet']['path']} is not a route: {ROUTES}"
        assert probe_port(probe) == args.port, f"{kind} probes another port than --port {args.port}"
    assert probes["startupProbe"]["httpGet"]["path"] == probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health", "liveness must not restart a warming replica"
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= UNPREPARED_START_S, "too short for a compile"
    assert probes["readinessProbe"]["timeoutSeconds"] >= 1, "a sub-second timeout failed under load"
    assert probes["livenessProbe"]["timeoutSeconds"] >= 2 and probes["livenessProbe"]["failureThreshold"] >= 3

    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep", sleep
    pre_stop = float(sleep[1])
    needed = pre_stop + args.drain_grace_s + args.timeout_ms / 1000 + UVICORN_MARGIN_S
    assert pod["terminationGracePeriodSeconds"] >= needed, (
        f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} < preStop {pre_stop} + drain "
        f"{args.drain_grace_s} + timeout {args.timeout_ms / 1000} + {UVICORN_MARGIN_S}: SIGKILL mid-drain")
    readiness = probes["readinessProbe"]
    assert args.drain_grace_s >= readiness["periodSeconds"] * readiness["failureThreshold"], (
        "the listener closes before the readiness probe can see the drain's 503")

    resources = resources or container["resources"]
    assert mebibytes(resources["requests"]["memory"]) >= MEASURED_MAX_RSS_MIB
    assert mebibytes(resources["limits"]["memory"]) >= LIMIT_HEADROOM * MEASURED_MAX_RSS_MIB
    assert "cpu" in resources["requests"], "CPU autoscaling needs a CPU request"
    env = {item["name"]: item.get("value") for item in container.get("env", [])}
    assert env.get("FLAXSST_HOME") == "/opt/flaxsst/home", "the image's prepared programs (deploy/docker)"
    return args


# Kubernetes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubernetes_validate():
    return pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")


@pytest.fixture(scope="module")
def kubernetes_versions(kubernetes_validate):
    from kubernetes_validate.utils import latest_version

    return sorted({OLDEST_KUBERNETES, latest_version()})


def test_kubernetes_manifests_are_valid_objects(kubernetes_validate, kubernetes_versions):
    docs = manifests(KUBERNETES)
    assert {doc["kind"] for doc in docs} == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for doc in docs:
        for version in kubernetes_versions:
            kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest():
    listed = documents(KUBERNETES / "kustomization.yaml")[0]["resources"]
    assert sorted(listed) == sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("breakage", ["misspelt field", "wrong type"])
def test_a_broken_deployment_is_rejected(kubernetes_validate, breakage, tmp_path):
    deployment = one(manifests(KUBERNETES), "Deployment")
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    if breakage == "misspelt field":
        container["readinesProbe"] = container.pop("readinessProbe")
    else:
        container["ports"][0]["containerPort"] = "eighty"
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(documents(path)[0], OLDEST_KUBERNETES, strict=True)


def test_deployment_agrees_with_the_server():
    docs = manifests(KUBERNETES)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    check_container_agrees(container, pod)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    # Replicas are the autoscaler's: a count here would be reset by every `kubectl apply`.
    assert "replicas" not in deployment["spec"]

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p.get("name") for p in container["ports"]}
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()


# KServe -------------------------------------------------------------------------------------------

CORE = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.api.core.v1."
META = {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PROTOCOL = {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}  # KServe's constants.InferenceServiceProtocol


def closed(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


# The fields these manifests use, from KServe's CRDs (config/crd/full): an unknown one fails.
SERVING_RUNTIME = closed({
    "apiVersion": {"const": "serving.kserve.io/v1alpha1"},
    "kind": {"enum": ["ServingRuntime", "ClusterServingRuntime"]}, "metadata": META,
    "spec": closed({
        "annotations": STRING_MAP, "labels": STRING_MAP, "disabled": {"type": "boolean"},
        "multiModel": {"type": "boolean"}, "protocolVersions": {"type": "array", "items": PROTOCOL},
        "supportedModelFormats": {"type": "array", "items": closed({
            "name": {"type": "string"}, "version": {"type": "string"}, "autoSelect": {"type": "boolean"},
            "priority": {"type": "integer", "minimum": 1}}, ("name",))},
        "containers": {"type": "array", "minItems": 1, "items": {"$ref": CORE + "Container"}},
        "volumes": {"type": "array", "items": {"$ref": CORE + "Volume"}},
        "nodeSelector": STRING_MAP, "tolerations": {"type": "array", "items": {"$ref": CORE + "Toleration"}},
    }, ("containers",)),
}, ("apiVersion", "kind", "metadata", "spec"))
INFERENCE_SERVICE = closed({
    "apiVersion": {"const": "serving.kserve.io/v1beta1"}, "kind": {"const": "InferenceService"}, "metadata": META,
    "spec": closed({"predictor": closed({
        "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]}, "scaleTarget": {"type": "integer"},
        "terminationGracePeriodSeconds": {"type": "integer"}, "timeout": {"type": "integer"},
        "model": closed({
            "modelFormat": closed({"name": {"type": "string"}, "version": {"type": "string"}}, ("name",)),
            "runtime": {"type": "string"}, "protocolVersion": PROTOCOL, "storageUri": {"type": "string"},
            "args": {"type": "array", "items": {"type": "string"}},
            "env": {"type": "array", "items": {"$ref": CORE + "EnvVar"}},
            "resources": {"$ref": CORE + "ResourceRequirements"},
        }, ("modelFormat",)),
    }, ("model",))}, ("predictor",)),
}, ("apiVersion", "kind", "metadata", "spec"))


@pytest.fixture(scope="module")
def kserve_validator(kubernetes_validate):
    """``validate(doc)`` against the schema above, with Kubernetes' core definitions (strict) for its
    containers, probes and resources."""
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    core = schema_contents(f"kubernetes-json-schema/v{OLDEST_KUBERNETES}.0-local-strict/_definitions.json",
                           OLDEST_KUBERNETES)
    registry = Registry().with_resource(core["$id"], Resource.from_contents(core))

    def validate(doc: dict):
        schema = {"ServingRuntime": SERVING_RUNTIME, "InferenceService": INFERENCE_SERVICE}[doc["kind"]]
        jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)
    return validate


def test_kserve_manifests_are_valid(kserve_validator):
    docs = manifests(KSERVE)
    assert sorted(doc["kind"] for doc in docs) == ["InferenceService", "ServingRuntime"]
    for doc in docs:
        kserve_validator(doc)


@pytest.mark.parametrize("breakage", ["unknown protocol", "misspelt field", "misspelt container field"])
def test_a_broken_kserve_manifest_is_rejected(kserve_validator, breakage):
    import jsonschema

    broken = copy.deepcopy(one(manifests(KSERVE), "ServingRuntime"))
    if breakage == "unknown protocol":
        broken["spec"]["protocolVersions"] = ["v3"]
    elif breakage == "misspelt field":
        broken["spec"]["supportedModelFormat"] = broken["spec"].pop("supportedModelFormats")
    else:
        broken["spec"]["containers"][0]["startupProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(jsonschema.ValidationError):
        kserve_validator(broken)


def test_kserve_agrees_with_the_server():
    docs = manifests(KSERVE)
    runtime, service = one(docs, "ServingRuntime"), one(docs, "InferenceService")
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"  # the container KServe merges the model's fields into
    args = check_container_agrees(container, predictor, model["resources"], service["metadata"])
    assert args.model == KSERVE_MODEL_DIR
    assert args.model_name == service["metadata"]["name"], "/v2/models/NAME must be the InferenceService's name"
    annotations = runtime["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/path"] in ROUTES
    assert int(annotations["prometheus.kserve.io/port"]) == args.port


# Azure ML -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def azure_ml():
    return pytest.importorskip("azure.ai.ml", reason="pip install azure-ai-ml (the test extra)")


def test_azureml_endpoint_and_deployment_load(azure_ml):
    endpoint = azure_ml.load_online_endpoint(AZUREML / "endpoint.yml")
    deployment = azure_ml.load_online_deployment(AZUREML / "deployment.yml")
    assert deployment.endpoint_name == endpoint.name
    assert deployment.instance_count >= 2


@pytest.mark.parametrize("breakage", ["misspelt field", "wrong type"])
def test_a_broken_azureml_deployment_is_rejected(azure_ml, breakage, tmp_path):
    from marshmallow import ValidationError

    text = (AZUREML / "deployment.yml").read_text()
    text = text.replace("\ninstance_type:", "\ninstance_typ:") if breakage == "misspelt field" else \
        text.replace("request_timeout_ms: ", "request_timeout_ms: soon", 1)
    (tmp_path / "deployment.yml").write_text(text)
    (tmp_path / "conda.yml").write_text((AZUREML / "conda.yml").read_text())
    with pytest.raises(ValidationError):
        azure_ml.load_online_deployment(tmp_path / "deployment.yml")


def test_azureml_deployment_agrees_with_the_scoring_script(azure_ml):
    deployment = azure_ml.load_online_deployment(AZUREML / "deployment.yml")
    code = (AZUREML / deployment.code_configuration.code).resolve()
    script = code / deployment.code_configuration.scoring_script
    assert script.is_file(), f"{script}: the scoring script is not in the code folder"
    spec = importlib.util.spec_from_file_location("flaxsst_azureml_score_shim", script)
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    assert (shim.init, shim.run) == (azureml_score.init, azureml_score.run)

    env = deployment.environment_variables
    read_by_flaxsst = set(re.findall(r"\bFLAXSST_[A-Z_]+", Path(azureml_score.__file__).read_text())) | {"FLAXSST_HOME"}
    assert set(azureml_score.ENV_SETTINGS) <= read_by_flaxsst
    unknown = set(env) - read_by_flaxsst - AZMLINFSRV_SETTINGS
    assert not unknown, f"settings nothing reads: {sorted(unknown)}"
    for name, (_, kind) in azureml_score.ENV_SETTINGS.items():
        if name in env:
            kind(env[name])
    assert env["WORKER_COUNT"] == "1", "each worker process would hold its own model"
    threads = int(re.fullmatch(r"--threads (\d+)", env["GUNICORN_CMD_ARGS"]).group(1))
    settings = deployment.request_settings
    assert settings.max_concurrent_requests_per_instance == threads
    timeout_ms = float(env.get("FLAXSST_TIMEOUT_MS", parser().get_default("timeout_ms")))
    assert settings.request_timeout_ms > timeout_ms, "Azure would cut a request before flaxsst's own 504"
    probe = deployment.liveness_probe
    assert probe.initial_delay + probe.period * probe.failure_threshold >= UNPREPARED_START_S


def test_azureml_environment_has_flaxsst_dependencies(azure_ml):
    deployment = azure_ml.load_online_deployment(AZUREML / "deployment.yml")
    conda = deployment.environment.conda_file
    (pip,) = [item["pip"] for item in conda["dependencies"] if isinstance(item, dict)]
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11's tomllib reads pyproject.toml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    missing = set(project["dependencies"]) - set(pip)
    assert not missing, f"deploy/azureml/conda.yml lacks pyproject.toml's {sorted(missing)}"
    assert "azureml-inference-server-http" in pip
    (python,) = [item for item in conda["dependencies"] if isinstance(item, str) and item.startswith("python=")]
    minimum = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", project["requires-python"]).group(1).split("."))
    assert tuple(int(x) for x in python.split("=")[1].split(".")) >= minimum


# The image ----------------------------------------------------------------------------------------


def test_manifests_agree_with_the_image():
    """deploy/docker/Dockerfile: the user the pods run as, FLAXSST_HOME, the entry point, the port, and the
    CMD's flags (the manifests add --timeout-ms to them and may move --model)."""
    import json

    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()

    def last(pattern: str) -> str:
        return re.findall(pattern, dockerfile, re.MULTILINE)[-1]

    user = last(r"^USER (\d+):\d+$")
    entrypoint = json.loads(last(r"^ENTRYPOINT (\[.*\])$"))
    cmd = parser().parse_intermixed_args(json.loads(last(r"^CMD (\[.*\])$")))
    assert last(r"^EXPOSE (\d+)$") == "8080" and last(r"FLAXSST_HOME=(\S+)") == "/opt/flaxsst/home"
    deployment = one(manifests(KUBERNETES), "Deployment")
    runtime = one(manifests(KSERVE), "ServingRuntime")
    pod = deployment["spec"]["template"]["spec"]
    containers = [(pod["containers"][0], pod["securityContext"]), (runtime["spec"]["containers"][0], None)]
    for container, pod_security in containers:
        security = {**(pod_security or {}), **container.get("securityContext", {})}
        assert str(security["runAsUser"]) == user, "the image's files are readable by its own user"
        assert container["command"] == entrypoint
        args = server_args(container, {"name": "x"})
        for flag in ("host", "port", "drain_grace_s", "max_length", "batch_size", "length_step", "dtype"):
            assert getattr(args, flag) == getattr(cmd, flag), f"--{flag}: the image prepared programs for the CMD's"
    assert server_args(pod["containers"][0]).model == cmd.model
