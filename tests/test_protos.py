"""The committed gRPC stubs are what ``python -m pop_disagg.protos_build`` makes from protos/."""

from __future__ import annotations

import pytest

import grpc_tools  # noqa: F401  (the dev extra; regenerating stubs needs it)

from pop_disagg import protos_build  # noqa: E402


def test_committed_stubs_are_current(tmp_path):
    written = protos_build.build(tmp_path)
    assert {p.name for p in written} >= {"generation_pb2.py", "generation_pb2_grpc.py", "__init__.py"}
    for fresh in written:
        committed = protos_build.OUT / fresh.name
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run python -m pop_disagg.protos_build"


def test_stubs_import_with_relative_package_path():
    from pop_disagg._proto import generation_pb2, generation_pb2_grpc

    assert generation_pb2.DESCRIPTOR.package == "pop_disagg.v1"
    assert hasattr(generation_pb2_grpc, "GenerationServicer")
