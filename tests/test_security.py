"""Bearer-token auth and TLS through a real 1P1D server, and the clients that speak to it.

One Ray instance and one server for the module, started with ``--tls-cert/--tls-key`` (a
self-signed certificate for 127.0.0.1 the test generates with ``cryptography``) and an auth token.
Everything binds 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json

import grpc
import pytest

from pop_disagg import cli
from pop_disagg._proto import generation_pb2 as pb
from pop_disagg._proto import generation_pb2_grpc as pb_grpc
from pop_disagg.bench.backends import GrpcBackend
from pop_disagg.bench.runner import RunSettings, ServerUnreachable, check_server, run_requests
from pop_disagg.bench.workloads import BenchRequest
from pop_disagg.config import EngineConfig, ServeConfig
from pop_disagg.server.app import BackgroundServer
from pop_disagg.server.frontend.auth import TOKEN_ENV, is_authorized, token_from_env

TOKEN = "s3cret-token-0123456789"
MSG = pb.GenerateRequest(prompt_token_ids=[5, 6, 7, 8], max_new_tokens=4, ignore_eos=True)


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pop-disagg test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_file), str(key_file)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return _self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(ray_instance, tiny_ckpt, tls_files):
    engine = EngineConfig(model=tiny_ckpt("qwen2"), kv_cache_memory_mb=2, block_size=4, max_model_len=256)
    cert, key = tls_files
    srv = BackgroundServer(
        ServeConfig(engine=engine, transfer_timeout_s=20), auth_token=TOKEN, tls_cert=cert, tls_key=key
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server, tls_files):
    with open(tls_files[0], "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    with grpc.secure_channel(server.address, creds) as ch:
        yield ch


def _bearer(token):
    return (("authorization", f"Bearer {token}"),)


def test_token_checks_and_env():
    assert is_authorized(f"Bearer {TOKEN}", TOKEN)
    for header in (None, "", TOKEN, f"bearer {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer "):
        assert not is_authorized(header, TOKEN), header


def test_token_must_be_printable_ascii():
    from pop_disagg.server.frontend.auth import BearerAuthInterceptor

    for bad in ("", "caf\u00e9", "two words", "tab\t"):
        with pytest.raises(ValueError, match="auth token"):
            BearerAuthInterceptor(bad)


def test_token_from_env(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert token_from_env(None) == "from-env" and token_from_env("flag") == "flag"
    monkeypatch.setenv(TOKEN_ENV, "")
    assert token_from_env(None) is None


@pytest.mark.parametrize(
    "metadata,why",
    [(None, "missing"), (_bearer("wrong"), "wrong"), ((("authorization", TOKEN),), "wrong")],
    ids=["none", "wrong", "no-scheme"],
)
def test_missing_or_wrong_token_is_unauthenticated_and_costs_no_work(server, channel, metadata, why):
    stub = pb_grpc.GenerationStub(channel)
    before = server.server.router.stats.num_prompt_tokens, server.server.router.stats.num_finished
    denied = server.server.metrics.failure.labels("UNAUTHENTICATED")._value.get()
    calls = [
        lambda: stub.Generate(MSG, timeout=30, metadata=metadata),
        lambda: list(stub.GenerateStream(MSG, timeout=30, metadata=metadata)),
        lambda: stub.Health(pb.HealthRequest(), timeout=30, metadata=metadata),
        lambda: stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30, metadata=metadata),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in err.value.details()
    assert (server.server.router.stats.num_prompt_tokens, server.server.router.stats.num_finished) == before
    assert server.server.metrics.failure.labels("UNAUTHENTICATED")._value.get() == denied + len(calls)


def test_standard_health_check_needs_no_token(channel):
    """Probes (Kubernetes, grpc_health_probe, the images' HEALTHCHECK) carry no credentials:
    grpc.health.v1 answers without a token while our own RPCs stay locked."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.GenerationStub(channel).Health(pb.HealthRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_auth_comes_before_parsing(channel):
    """Bytes that are no GenerateRequest: a wrong token is refused without reading them; with the
    right token the server does try to parse them (and fails)."""
    raw = channel.unary_unary("/pop_disagg.v1.Generation/Generate", request_serializer=None, response_deserializer=None)
    garbage = b"\xff\xff\xff\xff\x0f\x12"
    with pytest.raises(grpc.RpcError) as err:
        raw(garbage, timeout=30, metadata=_bearer("wrong"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        raw(garbage, timeout=30, metadata=_bearer(TOKEN))
    assert err.value.code() != grpc.StatusCode.UNAUTHENTICATED


def test_right_token_over_tls_round_trip(server, channel):
    stub = pb_grpc.GenerationStub(channel)
    out = stub.Generate(MSG, timeout=60, metadata=_bearer(TOKEN))
    chunks = list(stub.GenerateStream(MSG, timeout=60, metadata=_bearer(TOKEN)))
    assert len(out.token_ids) == 4 and [t for c in chunks for t in c.token_ids] == list(out.token_ids)
    assert stub.Health(pb.HealthRequest(), timeout=30, metadata=_bearer(TOKEN)).is_serving


def test_plaintext_client_cannot_talk_to_the_tls_server(server):
    with grpc.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GenerationStub(ch).Generate(MSG, timeout=10, metadata=_bearer(TOKEN))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_command_with_token_and_ca(server, tls_files, capsys, monkeypatch):
    base = [
        "client",
        "--server",
        server.address,
        "--prompt-ids",
        "5,6,7,8",
        "--max-new-tokens",
        "4",
        "--ignore-eos",
        "--json",
        "--tls-ca",
        tls_files[0],
    ]
    assert cli.main(base + ["--auth-token", TOKEN]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokenIds"]) == 4
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert cli.main(base + ["--stream"]) == 0  # the token from the environment
    assert json.loads(capsys.readouterr().out)["finishReason"] == "FINISH_REASON_LENGTH"
    monkeypatch.delenv(TOKEN_ENV)
    assert cli.main(base) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_bench_client_with_token_and_ca(server, tls_files):
    ca = tls_files[0]
    health, info = asyncio.run(check_server(server.address, 10, auth_token=TOKEN, tls_ca=ca))
    assert health["is_serving"] and info["topology"] == "disaggregated"
    with pytest.raises(ServerUnreachable, match="UNAUTHENTICATED"):
        asyncio.run(check_server(server.address, 10, auth_token="wrong", tls_ca=ca))
    reqs = [BenchRequest(None, (5, 6, 7), 3, 3)] * 2
    backend = GrpcBackend(server.address, auth_token=TOKEN, tls_ca=ca)
    run = asyncio.run(
        run_requests(
            server.address,
            RunSettings(num_requests=2, num_warmup=0, ignore_eos=True),
            reqs,
            show_progress=False,
            backend=backend,
        )
    )
    assert [r.error for r in run.records] == [None, None] and all(r.usage_completion_tokens == 3 for r in run.records)


def test_bench_serve_command_with_token_and_ca(server, tls_files, capsys):
    args = [
        "bench",
        "serve",
        "--server",
        server.address,
        "--input-len",
        "4",
        "--output-len",
        "2",
        "--ignore-eos",
        "--num-requests",
        "2",
        "--num-warmup",
        "0",
        "--no-progress",
        "--tls-ca",
        tls_files[0],
    ]
    assert cli.main(args + ["--auth-token", TOKEN]) == 0
    capsys.readouterr()
    assert cli.main(args + ["--auth-token", "wrong"]) == 2  # the server check fails with one line
    assert "UNAUTHENTICATED" in capsys.readouterr().err
