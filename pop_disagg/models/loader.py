"""Checkpoint loading: build the model on the ``meta`` device, then stream only the tensors it
declares out of the folder's safetensors files (one file, or many with an index).

Tensors load under their Hugging Face names (a vision-language checkpoint's language model under
its prefix, ``TEXT_LAYOUTS``; its vision tower loads in ``vision.py``); ``CausalLM.fuse_weights`` then packs q/k/v and
gate/up into one GEMM each, keeping those names as views. Because a prefill-only instance never declares the skipped layers' attention/MLP weights or the
LM head, those tensors are never read from disk: ``safe_open`` reads tensors lazily by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..pop.plan import PrunePlan
from .arch import ModelArch, ModelConfigError
from .decoder import CausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _weight_index(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file that holds it."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelConfigError(f"{index_file}: malformed index ({exc})") from exc
        files = {name: path / f for name, f in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise ModelConfigError(f"{index_file}: shard files missing: {missing}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelConfigError(f"{path}: no *.safetensors weights found")
    files = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                files[name] = shard
    return files


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    prefill_only_plan: PrunePlan | None = None,
) -> CausalLM:
    """Load a checkpoint folder. ``prefill_only_plan``: build the pruned prefill instance."""
    path = Path(path)
    arch = ModelArch.from_pretrained(path)
    dtype, device = resolve_dtype(dtype), torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if prefill_only_plan is not None and prefill_only_plan.num_layers != arch.num_layers:
        raise ValueError(f"plan is for {prefill_only_plan.num_layers} layers, model has {arch.num_layers}")
    with torch.device("meta"):
        model = CausalLM(arch, prefill_only_plan)
    index = _weight_index(path)
    wanted = {checkpoint_name(index, n, TEXT_LAYOUTS): n for n, _ in model.named_parameters()}
    missing = [n for n in wanted if n not in index]
    if missing:
        raise ModelConfigError(
            f"{path}: checkpoint lacks {len(missing)} tensors the {arch.family} model needs, e.g. {missing[:5]}"
        )
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(index[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:
                tensor = f.get_tensor(name)
                _assign(model, wanted[name], tensor, dtype, device)
    model.eval().requires_grad_(False)
    model.fuse_weights()  # q/k/v and gate/up as one GEMM each; the HF names stay as views
    model.init_rope()
    return model


# Where a checkpoint keeps a tensor we name ``model.X`` / ``lm_head.X``: a text checkpoint as it is;
# a vision-language one under ``model.language_model.`` (Transformers 5's layout) or
# ``language_model.model.`` (the layout Gemma-3 and older checkpoints ship).
TEXT_LAYOUTS = (
    ("model.", "model."),
    ("model.", "model.language_model."),
    ("model.", "language_model.model."),
    ("lm_head.", "lm_head."),
    ("lm_head.", "language_model.lm_head."),
)


def checkpoint_name(index: dict[str, Path], name: str, layouts: tuple[tuple[str, str], ...]) -> str:
    """The checkpoint's name for our parameter ``name``: the first layout (our prefix -> theirs)
    whose name the checkpoint holds (else the first candidate, which the caller reports missing)."""
    candidates = [theirs + name[len(ours) :] for ours, theirs in layouts if name.startswith(ours)] or [name]
    return next((c for c in candidates if c in index), candidates[0])


def _assign(model: CausalLM, name: str, tensor: torch.Tensor, dtype, device) -> None:
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = getattr(module, param_name)
    if tuple(current.shape) != tuple(tensor.shape):
        raise ModelConfigError(
            f"tensor {name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(current.shape)}"
        )
    setattr(module, param_name, torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
