"""``pop-disagg data prepare bigbench`` against fake sdists built here (never the real 358 MB one):
only the asked tasks' JSONs are extracted, the result is verified, atomic and idempotent, and the
index path (hash check, unreachable index) fails with one clear line."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from pop_disagg.cli import main
from pop_disagg.eval import bigbench_data
from pop_disagg.eval.data import bigbench_dir, bigbench_task

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"


def _task(n: int) -> dict:
    return {
        "examples": [
            {"input": f"question {i}", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2)}} for i in range(n)
        ]
    }


FILES = {
    f"{ROOT}/alpha/task.json": json.dumps(_task(3)),
    f"{ROOT}/alpha/README.md": "not a task file",
    f"{ROOT}/alpha/results/scores.json": "{}",  # a JSON that is not a task
    f"{ROOT}/beta/task.json": json.dumps(_task(5)),
    f"{ROOT}/gamma/task.json": json.dumps({"subtasks": ["one"]}),
    f"{ROOT}/gamma/one/task.json": json.dumps(_task(2)),
    f"{ROOT}/unwanted/task.json": json.dumps(_task(1)),
    "bigbench-1.0.0/setup.py": "raise SystemExit('never run')",
    "bigbench-1.0.0/bigbench/api/task.py": "x = 1",
}


def _sdist(tmp: Path, files=FILES, kind: str = "tar.gz") -> Path:
    path = tmp / f"bigbench-1.0.0.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            for name, text in files.items():
                z.writestr(name, text)
    else:
        with tarfile.open(path, "w:gz") as tar:
            for name, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("POP_DISAGG_CACHE", str(d))
    return d / "data" / "bigbench"


def _tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_prepare_extracts_only_the_asked_tasks_and_is_idempotent(tmp_path, cache, kind, capsys):
    sdist = _sdist(tmp_path, kind=kind)
    rc = main(["data", "prepare", "bigbench", "--sdist", str(sdist), "--tasks", "alpha,gamma", "--no-progress"])
    assert rc == 0 and Path(capsys.readouterr().out.strip()) == cache
    assert _tree(cache) == {"alpha/task.json", "gamma/task.json", "gamma/one/task.json", "manifest.json"}
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(sdist.read_bytes()).hexdigest()
    assert (
        manifest["tasks"]["alpha"]["alpha/task.json"]
        == hashlib.sha256(FILES[f"{ROOT}/alpha/task.json"].encode()).hexdigest()
    )
    # The eval reads the prepared folder.
    assert bigbench_dir() == cache
    assert len(bigbench_task("alpha", 10)) == 3 and len(bigbench_task("gamma/one", 10)) == 2
    assert not list(cache.parent.glob(".bigbench.*"))  # no scratch left

    # Idempotent: prepared tasks are not read again, not even from the archive.
    before = {p: (cache / p).stat().st_mtime_ns for p in _tree(cache)}
    sdist.unlink()
    folder, changed = bigbench_data.prepare_bigbench(("alpha",), sdist=sdist, progress=False)
    assert folder == cache and not changed
    assert {p: (cache / p).stat().st_mtime_ns for p in _tree(cache)} == before

    # More tasks: the union, from a new archive.
    _sdist(tmp_path, kind=kind)
    _, changed = bigbench_data.prepare_bigbench(("beta",), sdist=sdist, progress=False)
    assert changed and _tree(cache) == {
        "alpha/task.json",
        "beta/task.json",
        "gamma/task.json",
        "gamma/one/task.json",
        "manifest.json",
    }

    # A file changed behind our back is not trusted: prepare extracts again.
    (cache / "beta" / "task.json").write_text("{}")
    _, changed = bigbench_data.prepare_bigbench(("beta",), sdist=sdist, progress=False)
    assert changed and json.loads((cache / "beta" / "task.json").read_text()) == _task(5)


def test_missing_task_or_bad_json_leaves_the_old_folder(tmp_path, cache):
    sdist = _sdist(tmp_path)
    bigbench_data.prepare_bigbench(("alpha",), sdist=sdist, progress=False)
    before = _tree(cache)
    with pytest.raises(bigbench_data.DataPrepareError, match="no BIG-bench task nope"):
        bigbench_data.prepare_bigbench(("alpha", "nope"), sdist=sdist, progress=False)
    (tmp_path / "broken").mkdir()
    broken = _sdist(tmp_path / "broken", {**FILES, f"{ROOT}/beta/task.json": "{not json"})
    with pytest.raises(bigbench_data.DataPrepareError, match="not JSON"):
        bigbench_data.prepare_bigbench(("beta",), sdist=broken, progress=False)
    assert _tree(cache) == before and not list(cache.parent.glob(".bigbench.*"))


def _index(tmp_path: Path, sdist: Path, sha: str) -> str:
    page = tmp_path / "simple" / "bigbench"
    page.mkdir(parents=True)
    (page / "index.html").write_text(
        f'<html><body><a href="{sdist.as_uri()}#sha256={sha}">{sdist.name}</a></body></html>'
    )
    return (tmp_path / "simple").as_uri()


def test_prepare_from_an_index_checks_the_hash(tmp_path, cache):
    sdist = _sdist(tmp_path)
    good = _index(tmp_path / "good", sdist, hashlib.sha256(sdist.read_bytes()).hexdigest())
    folder, changed = bigbench_data.prepare_bigbench(("beta",), index_url=good, progress=False)
    assert changed and _tree(folder) == {"beta/task.json", "manifest.json"}
    assert json.loads((folder / "manifest.json").read_text())["source"] == sdist.as_uri()
    assert not (cache.parent / ".downloads").exists()  # the sdist is not kept

    bad = _index(tmp_path / "bad", sdist, "0" * 64)
    with pytest.raises(bigbench_data.DataPrepareError, match="does not match"):
        bigbench_data.prepare_bigbench(("alpha",), index_url=bad, progress=False)
    assert _tree(folder) == {"beta/task.json", "manifest.json"}


def test_unreachable_index_is_one_clear_line(tmp_path, cache, capsys):
    # Port 9 (discard) on localhost: nothing listens, the connection is refused at once.
    rc = main(["data", "prepare", "bigbench", "--index-url", "http://127.0.0.1:9/simple", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "cannot reach the package index at http://127.0.0.1:9/simple/bigbench/" in err and "--sdist" in err
    assert not cache.exists()
