"""Regenerate the gRPC stubs in ``pop_disagg/_proto/`` from ``protos/``: ``python -m pop_disagg.protos_build``.

The stubs are committed so that installing the package needs no protoc. ``grpc_tools.protoc``
writes ``pop_disagg/v1/generation_pb2_grpc.py`` with an absolute import of its message module
(``from pop_disagg.v1 import generation_pb2``), which would clash with this package's own name;
the build rewrites it to a relative import and flattens the files into ``_proto/``. The
descriptor keeps its proto path ``pop_disagg/v1/generation.proto``, so reflection sees the real
package ``pop_disagg.v1``. ``tests/test_protos.py`` regenerates into a temp dir and checks that the
committed files are current.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PROTOS = ("pop_disagg/v1/generation.proto",)
OUT = Path(__file__).resolve().parent / "_proto"
INIT = '"""Generated gRPC stubs (``python -m pop_disagg.protos_build``); do not edit."""\n'


def build(out: Path = OUT) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTOS,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS}")
        for proto in PROTOS:
            stem = Path(proto).with_suffix("")
            module = ".".join(stem.parent.parts)  # pop_disagg.v1
            for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
                src = Path(tmp) / f"{stem}{suffix}"
                text = src.read_text()
                # Absolute import of the sibling message module -> relative (see module docstring).
                text = re.sub(rf"^from {re.escape(module)} import ", "from . import ", text, flags=re.M)
                dst = out / src.name
                dst.write_text(text)
                written.append(dst)
    init = out / "__init__.py"
    init.write_text(INIT)
    written.append(init)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    for path in build(args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
