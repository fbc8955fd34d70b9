"""``pop-disagg demo``: start an embedded server, answer one prompt through gRPC, shut down.

The one-command check that the whole serving path works on a fresh machine: local Ray, the
workers, the KV links, the gRPC server on 127.0.0.1, a real gRPC client call, clean shutdown.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .serve import add_serve_args


def register(sub) -> None:
    p = sub.add_parser("demo", help="serve in the background, answer one prompt through gRPC, exit")
    add_serve_args(p)
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="render the prompt with the chat template (default on when the tokenizer has one)",
    )
    p.add_argument("--stream", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="[pop-disagg] %(message)s", stream=sys.stderr)
    import grpc
    import ray

    from .._proto import generation_pb2 as pb
    from .._proto import generation_pb2_grpc as pb_grpc
    from ..server.app import BackgroundServer
    from .client import _summary
    from .serve import init_ray, serve_config

    config = serve_config(args)
    init_ray(args.address)
    server = None
    try:
        server = BackgroundServer(config, "127.0.0.1", 0)
        tok = server.deployment.tokenizer
        msg = pb.GenerateRequest(max_new_tokens=args.max_new_tokens)
        if args.chat and getattr(tok, "chat_template", None):
            msg.prompt_token_ids.extend(
                tok.apply_chat_template(
                    [{"role": "user", "content": args.prompt}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
            )
        else:
            msg.prompt = args.prompt
        print(f"[pop-disagg] > {args.prompt}", file=sys.stderr)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            if args.stream:
                for chunk in stub.GenerateStream(msg, timeout=600):
                    print(chunk.text, end="", flush=True)
                print()
                _summary(chunk)
            else:
                resp = stub.Generate(msg, timeout=600)
                print(resp.text)
                _summary(resp)
    finally:
        if server is not None:
            server.stop()
        ray.shutdown()
    return 0
