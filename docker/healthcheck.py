"""Container health probe: exit 0 when the pop-disagg server on this container answers "serving".

It asks the standard ``grpc.health.v1`` service first and falls back to the server's own
``Generation/Health`` RPC (every worker answers a ping) when the server does not implement the
standard one (UNIMPLEMENTED), so the image's HEALTHCHECK works before and after the standard
service lands. Address: ``$POP_DISAGG_HEALTH_ADDR`` or the first argument, default 127.0.0.1:50051.
"""

from __future__ import annotations

import os
import sys


def check(address: str, timeout_s: float = 8.0) -> tuple[bool, str]:
    import grpc

    with grpc.insecure_channel(address) as channel:
        try:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
            is_serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            return is_serving, f"grpc.health.v1: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        except ImportError:
            pass  # grpcio-health-checking not installed: only the server's own RPC
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                return False, f"grpc.health.v1: {exc.code().name}: {exc.details()}"
        from pop_disagg._proto import generation_pb2 as pb
        from pop_disagg._proto import generation_pb2_grpc as pb_grpc

        try:
            reply = pb_grpc.GenerationStub(channel).Health(pb.HealthRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"Generation/Health: {exc.code().name}: {exc.details()}"
        return reply.is_serving, f"Generation/Health: {reply.message}"


def main(argv: list[str]) -> int:
    address = argv[0] if argv else os.environ.get("POP_DISAGG_HEALTH_ADDR", "127.0.0.1:50051")
    is_serving, why = check(address)
    print(f"{address}: {why}")
    return 0 if is_serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
