"""Shared fixtures: tiny random checkpoints of every family, written once per test session."""

from __future__ import annotations

import pytest
import torch

from pop_disagg.models.tiny import ARCHS, make_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(arch) -> folder of a tiny random checkpoint of that family (cached per session)."""
    cache: dict[str, str] = {}

    def get(arch: str = "llama") -> str:
        if arch not in cache:
            cache[arch] = str(make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch))
        return cache[arch]

    return get


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
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
def stub(server):
    """A gRPC stub on the requesting module's own ``server`` fixture (plaintext)."""
    import grpc

    from pop_disagg._proto import generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GenerationStub(channel)
