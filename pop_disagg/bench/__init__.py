"""The load-testing harness: open-loop gRPC client, workloads, serving metrics, results and plots.

``pop-disagg bench serve`` (``commands/bench.py``) wires these together: ``workloads`` builds the
requests, ``arrivals`` the send schedule, ``runner`` drives a running server over ``grpc.aio`` and
keeps one ``RequestRecord`` per request, ``metrics`` turns records into vLLM-style numbers and
goodput, ``report`` writes the JSON and prints the table, ``plot`` draws sweeps.
"""
