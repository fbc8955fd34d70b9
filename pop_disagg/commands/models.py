"""``pop-disagg models``: list the named models and prepare (convert) them ahead of first use."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("models", help="list named models, or convert one into the local cache")
    actions = p.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("list", help="name, source package, installed?, prepared folder")
    ls.set_defaults(func=run_list)
    prep = actions.add_parser("prepare", help="convert a named model's GGUF into a checkpoint folder (done once)")
    prep.add_argument("name", help="registered model name (see `pop-disagg models list`)")
    prep.add_argument("--force", action="store_true", help="convert again even if already prepared")
    prep.set_defaults(func=run_prepare)


def run_list(args: argparse.Namespace) -> int:
    from ..models.registry import DEFAULT_MODEL, REGISTRY, cache_dir, is_prepared, model_dir, package_dir

    rows = [("name", "source package", "installed", "prepared")]
    for name, entry in REGISTRY.items():
        folder = model_dir(name)
        installed = package_dir(entry) is not None
        label = f"{name} (default)" if name == DEFAULT_MODEL else name
        rows.append((label, entry.package, "yes" if installed else "no", str(folder) if is_prepared(folder) else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    print(f"\ncache: {cache_dir() / 'models'} (set POP_DISAGG_CACHE to move it)")
    missing = [e for e in REGISTRY.values() if package_dir(e) is None]
    for e in missing:
        print(f"to install {e.name}: {e.pip_command}")
    print("any other --model value is a Hugging Face checkpoint folder")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from ..models.registry import prepare

    print(prepare(args.name, force=args.force))
    return 0
