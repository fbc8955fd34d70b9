"""Shared fixtures: tiny random checkpoints of every family, written once per test session."""

from __future__ import annotations

import pytest
import torch

from pop_disagg.models.tiny import ARCHS, VLM_ARCHS, make_tiny_model, make_tiny_vlm

torch.set_num_threads(2)


def _folders_per_arch(tmp_path_factory, make, default: str):
    """get(arch) -> folder made by ``make(folder, arch)`` once per session and arch."""
    cache: dict[str, str] = {}

    def get(arch: str = default) -> str:
        if arch not in cache:
            cache[arch] = str(make(tmp_path_factory.mktemp(f"tiny-{arch}"), arch))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(arch) -> folder of a tiny random checkpoint of that family (cached per session)."""
    return _folders_per_arch(tmp_path_factory, make_tiny_model, "llama")


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """tiny_vlm(arch) -> folder of a tiny random vision-language checkpoint (cached per session)."""
    return _folders_per_arch(tmp_path_factory, make_tiny_vlm, "qwen3_vl")


@pytest.fixture(params=VLM_ARCHS)
def vlm_arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once per session: the user's prepared copy when there is one,
    otherwise (CI) a conversion into a session temp cache, shared by every test that needs it."""
    from pop_disagg.models.registry import is_prepared, model_dir, prepare

    name = "smollm2-135m-instruct"
    if is_prepared(model_dir(name)):
        return model_dir(name)
    return prepare(name, cache=tmp_path_factory.mktemp("pop-disagg-cache"))


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray on 2 CPUs for one test module's servers, shut down after the module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def smollm2_http_server(smollm2_dir, ray_instance):
    """One 1P1D POP server on real SmolLM2 with the HTTP API (served as ``smollm2``), for a module."""
    from pop_disagg.config import EngineConfig, ServeConfig
    from pop_disagg.server.app import BackgroundServer

    engine = EngineConfig(model=str(smollm2_dir), kv_cache_memory_mb=48, max_model_len=512)
    config = ServeConfig(engine=engine, topology="disaggregated", prefill="pop", transfer_timeout_s=30)
    srv = BackgroundServer(config, http_port=0, served_model_name="smollm2")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def oa(server):
    """The official ``openai`` client on the requesting module's ``server``'s HTTP API."""
    import openai

    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def http(server):
    """An httpx client on the requesting module's ``server``'s HTTP API."""
    import httpx

    with httpx.Client(base_url=server.http_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server):
    """A gRPC stub on the requesting module's own ``server`` fixture (plaintext)."""
    import grpc

    from pop_disagg._proto import generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GenerationStub(channel)
