"""``pop-disagg client``: send one request to a running server and print the answer."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_sampling_args, sampling_fields


def register(sub) -> None:
    p = sub.add_parser("client", help="send a request to a pop-disagg server over gRPC")
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument(
        "--prompt-ids", type=lambda s: [int(x) for x in s.split(",") if x], help="comma-separated token ids"
    )
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    add_sampling_args(p)
    p.add_argument("--info", action="store_true", help="print the server's model info and health instead")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds")
    p.add_argument("--auth-token", default=None, help="bearer token (default: $POP_DISAGG_AUTH_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="PEM CA certificate to verify a TLS server with (default: plaintext)")
    p.set_defaults(func=run)


def build_request(args: argparse.Namespace):
    from .._proto import generation_pb2 as pb

    fields = sampling_fields(args)
    seed = fields.pop("seed")
    msg = pb.GenerateRequest(**fields)
    if args.prompt is not None:
        msg.prompt = args.prompt
    if args.prompt_ids:
        msg.prompt_token_ids.extend(args.prompt_ids)
    if seed is not None:
        msg.seed = seed
    return msg


def run(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from .._proto import generation_pb2 as pb
    from .._proto import generation_pb2_grpc as pb_grpc
    from ..server.frontend.auth import bearer_metadata, channel_credentials, token_from_env

    creds = channel_credentials(args.tls_ca)
    md = bearer_metadata(token_from_env(args.auth_token))
    with grpc.secure_channel(args.server, creds) if creds else grpc.insecure_channel(args.server) as channel:
        stub = pb_grpc.GenerationStub(channel)
        try:
            if args.info:
                info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=args.timeout, metadata=md)
                health = stub.Health(pb.HealthRequest(), timeout=args.timeout, metadata=md)
                print(json.dumps({"model": MessageToDict(info), "health": MessageToDict(health)}, indent=2))
                return 0
            msg = build_request(args)
            if args.stream:
                last = None
                for chunk in stub.GenerateStream(msg, timeout=args.timeout, metadata=md):
                    if not args.json:
                        print(chunk.text, end="", flush=True)
                    last = chunk
                if args.json:
                    print(json.dumps(MessageToDict(last)))
                else:
                    print()
                    _summary(last)
            else:
                resp = stub.Generate(msg, timeout=args.timeout, metadata=md)
                if args.json:
                    print(json.dumps(MessageToDict(resp)))
                else:
                    print(resp.text)
                    _summary(resp)
        except grpc.RpcError as exc:
            print(f"pop-disagg client: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def _summary(resp) -> None:
    from .._proto import generation_pb2 as pb

    t = resp.timings
    print(
        f"[pop-disagg] {resp.usage.prompt_tokens} prompt + {resp.usage.completion_tokens} generated tokens"
        f" ({pb.FinishReason.Name(resp.finish_reason).removeprefix('FINISH_REASON_').lower()});"
        f" ttft {t.ttft_s * 1000:.1f} ms (queue {t.queue_s * 1000:.1f}, prefill {t.prefill_s * 1000:.1f}, transfer {t.transfer_s * 1000:.1f}), decode {t.decode_s * 1000:.1f} ms",
        file=sys.stderr,
    )
