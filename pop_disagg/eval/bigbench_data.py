"""``pop-disagg data prepare bigbench``: BIG-bench's task JSONs, without installing BIG-bench.

The ``bigbench`` 1.0.0 sdist on PyPI (358 MB packed, 1.8 GB unpacked) is the only packaged copy of
the tasks, and pip will neither install nor even ``pip download`` it: its metadata declares a
``file://`` dependency (bleurt) that pip refuses after the download, leaving nothing behind. So we
fetch the exact file the package index lists (the PEP 691 JSON / PEP 503 HTML simple API pip itself
reads), check its sha256 against the index, and stream through the archive once, extracting only
``benchmark_tasks/<task>/**/task.json`` for the tasks asked for.

Life cycle of ``$POP_DISAGG_CACHE/data/bigbench``:
* absent -> download to ``.downloads/<file>.part``, verify the hash, rename;
* extract into ``.bigbench.tmp-<pid>``, verify (every asked task found, every JSON parses and has
  examples or subtasks), write ``manifest.json`` (source file, its sha256, each JSON's sha256);
* rename into place (a previous folder is moved aside first and removed after), so a crash leaves
  either the old folder or the new one, never half of one; the downloaded sdist is deleted.
Run again with tasks already present and verified: nothing is fetched (idempotent). Asking for more
tasks extracts the union.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from html.parser import HTMLParser
from pathlib import Path

from tqdm.auto import tqdm

PACKAGE, VERSION = "bigbench", "1.0.0"
DEFAULT_INDEX = "https://pypi.org/simple"
MANIFEST = "manifest.json"


class DataPrepareError(RuntimeError):
    """Preparing evaluation data failed (unreachable index, bad archive, missing task)."""


def target_dir() -> Path:
    from ..models.registry import cache_dir

    return cache_dir() / "data" / "bigbench"


def prepared_dir() -> Path | None:
    """The prepared task folder if there is one (a manifest is only written by a finished prepare)."""
    d = target_dir()
    return d if (d / MANIFEST).is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified_tasks(folder: Path) -> set[str]:
    """Tasks of a prepared folder whose every JSON still has the hash its manifest recorded."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    tasks = set()
    for task, files in manifest.get("tasks", {}).items():
        if files and all((folder / rel).is_file() and _sha256(folder / rel) == sha for rel, sha in files.items()):
            tasks.add(task)
    return tasks


# ---- the index ---------------------------------------------------------------------------------------
class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)


def find_sdist(index_url: str, timeout: float = 30.0) -> tuple[str, str, str]:
    """(file name, URL, sha256) of the bigbench sdist in a simple index (``https://`` or ``file://``)."""
    page = index_url.rstrip("/") + f"/{PACKAGE}/"
    req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    parsed = urllib.parse.urlparse(page)
    try:
        if parsed.scheme == "file":
            # A local index is a folder per project holding an index.html (PEP 503 layout).
            body, ctype = Path(urllib.request.url2pathname(parsed.path), "index.html").read_bytes(), "text/html"
        else:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body, ctype = r.read(), r.headers.get("Content-Type", "")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DataPrepareError(
            f"cannot reach the package index at {page} ({exc}); check the network or pass --index-url / --sdist FILE"
        ) from None
    want = f"{PACKAGE}-{VERSION}"
    if "json" in ctype:
        files = [
            (f["filename"], urllib.parse.urljoin(page, f["url"]), f.get("hashes", {}).get("sha256", ""))
            for f in json.loads(body)["files"]
        ]
    else:
        parser = _Links()
        parser.feed(body.decode("utf-8", errors="replace"))
        files = []
        for href in parser.links:
            url, _, frag = href.partition("#")
            name = urllib.parse.unquote(url.rsplit("/", 1)[-1])
            files.append(
                (name, urllib.parse.urljoin(page, url), frag[len("sha256=") :] if frag.startswith("sha256=") else "")
            )
    for name, url, sha in files:
        if name in (f"{want}.tar.gz", f"{want}.zip"):
            if not sha:
                raise DataPrepareError(f"{page} lists {name} without a sha256; refusing an unverifiable download")
            return name, url, sha
    raise DataPrepareError(f"{page} has no {want} sdist (found: {', '.join(n for n, _, _ in files) or 'nothing'})")


def download(url: str, sha256: str, out: Path, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``out`` through a ``.part`` file; the hash is checked before the rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {out.name}", disable=not progress) as bar:
                for block in iter(lambda: r.read(1 << 20), b""):
                    f.write(block)
                    h.update(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        part.unlink(missing_ok=True)
        raise DataPrepareError(f"download of {url} failed ({exc}); check the network or pass --sdist FILE") from None
    if h.hexdigest() != sha256:
        part.unlink()
        raise DataPrepareError(f"{url}: sha256 {h.hexdigest()} does not match the index's {sha256}")
    os.replace(part, out)
    return out


# ---- the archive ---------------------------------------------------------------------------------------
def _task_of(member: str, tasks: set[str]) -> tuple[str, str] | None:
    """(task, path relative to the task folder) for ``.../benchmark_tasks/<task>/**/task.json``."""
    m = re.search(r"(?:^|/)benchmark_tasks/([^/]+)/(.*)$", member)
    if m is None or m.group(1) not in tasks or not (m.group(2) == "task.json" or m.group(2).endswith("/task.json")):
        return None
    if ".." in m.group(2).split("/"):
        return None
    return m.group(1), m.group(2)


def extract_tasks(archive: Path, tasks: set[str], out: Path, progress: bool = True) -> dict[str, dict[str, str]]:
    """Stream ``archive`` (tar.gz or zip) once, writing the task JSONs of ``tasks`` under ``out``.
    Returns {task: {relative file: sha256}}."""
    found: dict[str, dict[str, str]] = {}

    def write(task: str, rel: str, data: bytes) -> None:
        dest = out / task / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        found.setdefault(task, {})[f"{task}/{rel}"] = hashlib.sha256(data).hexdigest()

    size = archive.stat().st_size
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"extract {archive.name}", disable=not progress) as bar:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    hit = _task_of(info.filename, tasks)
                    if hit:
                        write(*hit, z.read(info))
                    bar.update(info.compress_size)
        else:
            try:
                with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                    for member in tar:  # streaming: one pass over the compressed bytes
                        hit = _task_of(member.name, tasks) if member.isfile() else None
                        if hit:
                            write(*hit, tar.extractfile(member).read())
                        bar.update(raw.tell() - bar.n)
            except tarfile.TarError as exc:
                raise DataPrepareError(f"{archive} is not a readable sdist ({exc})") from None
    return found


def _verify(out: Path, found: dict[str, dict[str, str]], tasks: set[str], source: str) -> None:
    missing = sorted(tasks - set(found))
    if missing:
        raise DataPrepareError(
            f"{source} has no BIG-bench task {', '.join(missing)} (names are folder names under bigbench/benchmark_tasks)"
        )
    for task, files in found.items():
        if f"{task}/task.json" not in files:
            raise DataPrepareError(f"{source}: task {task} has no top-level task.json")
        try:
            top = json.loads((out / task / "task.json").read_text())
        except ValueError as exc:
            raise DataPrepareError(f"{source}: {task}/task.json is not JSON ({exc})") from None
        if "examples" not in top and "subtasks" not in top and len(files) == 1:
            raise DataPrepareError(f"{source}: {task}/task.json has neither examples nor subtasks")


def prepare_bigbench(
    tasks: tuple[str, ...],
    index_url: str | None = None,
    sdist: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> tuple[Path, bool]:
    """Make ``tasks`` available in the cache. Returns (folder, whether anything was done)."""
    target = target_dir()
    wanted = set(tasks)
    if not wanted:
        raise DataPrepareError("no tasks to prepare")
    have = set() if force else _verified_tasks(target)
    if wanted <= have:
        return target, False
    wanted |= have  # keep what is already prepared
    downloaded = None
    if sdist is not None:
        archive, source, sha = Path(sdist), str(sdist), None
        if not archive.is_file():
            raise DataPrepareError(f"{archive}: no such file")
    else:
        index = index_url or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
        name, url, sha = find_sdist(index)
        archive = downloaded = download(url, sha, target.parent / ".downloads" / name, progress)
        source = url
    scratch = target.parent / f".bigbench.tmp-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        found = extract_tasks(archive, wanted, scratch, progress)
        _verify(scratch, found, wanted, source)
        manifest = {
            "package": f"{PACKAGE}-{VERSION}",
            "source": source,
            "sha256": sha or _sha256(archive),
            "tasks": found,
        }
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        old = target.parent / f".bigbench.old-{os.getpid()}"
        if target.exists():
            os.replace(target, old)
        os.replace(scratch, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)
            try:
                downloaded.parent.rmdir()  # only if nothing else is in it
            except OSError:
                pass
    return target, True
