"""The committed gRPC stubs are what ``python -m pop_disagg.protos_build`` makes from protos/."""

from __future__ import annotations

import re

import grpc_tools  # noqa: F401  (the dev extra; regenerating stubs needs it)

from pop_disagg import protos_build  # noqa: E402


def _unstamped(text: str) -> str:
    """The stub without the generator's version stamps: a fresh venv may hold a newer grpcio-tools
    (CI's did: 1.85.4 against the committed 1.85.1) that writes the same code under its own number.
    The committed stamps are the minimum runtimes the stubs check at import, so they stay as built."""
    text = re.sub(r"^GRPC_GENERATED_VERSION = '[^']*'$", "GRPC_GENERATED_VERSION = ''", text, flags=re.M)
    text = re.sub(r"^# Protobuf Python Version: .*$", "# Protobuf Python Version:", text, flags=re.M)
    return re.sub(
        r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,", r"\1", text
    )


def test_committed_stubs_are_current(tmp_path):
    written = protos_build.build(tmp_path)
    assert {p.name for p in written} >= {"generation_pb2.py", "generation_pb2_grpc.py", "__init__.py"}
    for fresh in written:
        committed = protos_build.OUT / fresh.name
        assert _unstamped(committed.read_text()) == _unstamped(fresh.read_text()), (
            f"{committed} is stale: run python -m pop_disagg.protos_build"
        )


def test_stamp_normalisation_keeps_real_changes():
    stub = (protos_build.OUT / "generation_pb2.py").read_text()
    restamped = re.sub(r"Domain\.PUBLIC,\s*7,\s*35,\s*1,", "Domain.PUBLIC,\n    7,\n    36,\n    0,", stub)
    assert restamped != stub and _unstamped(restamped) == _unstamped(stub)
    assert _unstamped(stub.replace("GenerateRequest", "GenerateRequestX")) != _unstamped(stub)


def test_stubs_import_with_relative_package_path():
    from pop_disagg._proto import generation_pb2, generation_pb2_grpc

    assert generation_pb2.DESCRIPTOR.package == "pop_disagg.v1"
    assert hasattr(generation_pb2_grpc, "GenerationServicer")
