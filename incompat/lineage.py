"""Where a cleaned dataset came from: file references with digests, step manifests, the lineage record, and its
verification.

A *reference* names a file (or a source folder) by path and content digest:
  {"role": "...", "path": "<relative to the record's folder>", "abs": "<absolute>", "kind": "dataset"|"file"|"dir",
   "digest": "..."}
- dataset: the canonical dataset digest (sample ids + per-sample digests); verifying re-decodes every row.
- file:    sha256 of the bytes (raw sources, scores, models, manifests).
- dir:     sha256 over (relative path, sha256) of every regular file below it (an image-folder source).

Every step writes a manifest (`<step>.json`) beside its outputs: its inputs, outputs, parameters and code version.
The filter step gathers the manifests upstream of the cleaned dataset into `lineage.json`. `verify` recomputes every
digest it can reach; files it cannot reach (moved, or on another machine) are reported, not failed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from incompat.data import DataError, read_dataset, read_metadata
from incompat import files
from incompat.files import write_text_atomic

LINEAGE_VERSION = 1
ENGINE_DIR = Path(__file__).resolve().parent


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_sha256(path: str | os.PathLike) -> str:
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        h.update(f"{file.relative_to(root).as_posix()}\t{file_sha256(file)}\n".encode())
    return h.hexdigest()


def _kind_of(path: Path) -> str:
    if path.is_dir():
        return "dir"
    if path.suffix == ".parquet":
        try:
            read_metadata(path)
            return "dataset"
        except DataError:
            return "file"
    return "file"


def reference(role: str, path: str | os.PathLike, base: str | os.PathLike | None = None,
              digest: str | None = None, kind: str | None = None) -> dict:
    """A reference to `path`; `digest` may be passed when the writer already knows it (saves a re-hash)."""
    path = Path(path)
    kind = kind or _kind_of(path)
    if digest is None:
        if kind == "dataset":
            digest = read_metadata(path)["dataset_digest"]
        elif kind == "dir":
            digest = dir_sha256(path)
        else:
            digest = file_sha256(path)
    absolute = path.resolve()
    ref = {"role": role, "path": str(path), "abs": str(absolute), "kind": kind, "digest": digest}
    if base is not None:
        ref["path"] = os.path.relpath(absolute, Path(base).resolve())
    return ref


def actual_digest(ref: dict, path: Path) -> str:
    if ref["kind"] == "dataset":
        # verify=True recomputes each sample digest from the pixels, so an edited image is caught too
        return read_dataset(path, verify=True).dataset_digest()
    if ref["kind"] == "dir":
        return dir_sha256(path)
    return file_sha256(path)


_CODE_VERSION: dict | None = None


def code_version() -> dict:
    """The package version, the git commit (when in a checkout) and a hash of the engine's sources: the hash is
    what matters (a dirty tree or an installed copy still has one)."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        from incompat import __version__

        h = hashlib.sha256()
        for file in sorted(ENGINE_DIR.glob("*.py")):
            h.update(file.name.encode() + b"\0" + file.read_bytes())
        version = {"package": __version__, "engine_sha256": h.hexdigest(), "git_commit": None, "git_dirty": None}
        try:
            root = ENGINE_DIR.parent
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                    timeout=10)
            if commit.returncode == 0:
                version["git_commit"] = commit.stdout.strip()
                dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                       capture_output=True, text=True, timeout=10)
                version["git_dirty"] = bool(dirty.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
        _CODE_VERSION = version
    return dict(_CODE_VERSION)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_manifest(path: str | os.PathLike, step: str, *, inputs: list[dict], outputs: list[dict],
                   params: dict | None = None, summary: dict | None = None) -> dict:
    """A step's manifest: written last, after its outputs, so its presence means the step finished."""
    manifest = {"step": step, "created": now(), "code": code_version(), "params": params or {},
                "inputs": inputs, "outputs": outputs, "summary": summary or {}}
    write_text_atomic(path, json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def read_json(path: str | os.PathLike) -> dict:
    return files.read_json(path, DataError)


def digest(path: str | os.PathLike | None) -> str | None:
    """The content digest a reference to `path` would record (None for no path)."""
    return reference("source", path)["digest"] if path else None


@dataclass
class Check:
    role: str
    path: str
    status: str  # ok | changed | missing | error
    detail: str = ""


@dataclass
class Verification:
    record: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.status in ("changed", "error") for c in self.checks)

    @property
    def changed(self) -> list[Check]:
        return [c for c in self.checks if c.status in ("changed", "error")]


def find_record(path: str | os.PathLike) -> Path:
    """lineage.json itself, the folder holding it, or a cleaned dataset with lineage.json beside it."""
    path = Path(path)
    candidates = [path] if path.suffix == ".json" else [path / "lineage.json", path.with_name("lineage.json")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"{path}: no lineage record (looked for {', '.join(str(c) for c in candidates)})")


def references(record: dict):
    """Every reference in a lineage record: the outputs first, then each step's inputs and outputs."""
    seen = set()
    for ref in record.get("outputs", []):
        seen.add((ref["abs"], ref["digest"]))
        yield ref
    for manifest in record.get("chain", []):
        for ref in manifest.get("outputs", []) + manifest.get("inputs", []):
            if (ref["abs"], ref["digest"]) not in seen:
                seen.add((ref["abs"], ref["digest"]))
                yield {**ref, "step": manifest.get("step")}


def verify(path: str | os.PathLike) -> Verification:
    record_path = find_record(path)
    record = read_json(record_path)
    if record.get("lineage_version") != LINEAGE_VERSION:
        raise DataError(f"{record_path}: not an incompat lineage record (lineage_version "
                        f"{record.get('lineage_version')!r})")
    result = Verification(record_path)
    base = record_path.parent
    for ref in references(record):
        role = f"{ref.get('step') + ': ' if ref.get('step') else ''}{ref['role']}"
        # Relative to the record first, so a moved or copied run folder still verifies; then where it was.
        candidates = [base / ref["path"], Path(ref["abs"])]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            result.checks.append(Check(role, ref["abs"], "missing", "not reachable from here"))
            continue
        try:
            digest = actual_digest(ref, found)
        except (DataError, OSError) as exc:
            result.checks.append(Check(role, str(found), "error", str(exc)))
            continue
        if digest == ref["digest"]:
            result.checks.append(Check(role, str(found), "ok"))
        else:
            result.checks.append(Check(role, str(found), "changed",
                                       f"digest {digest[:12]}... != recorded {ref['digest'][:12]}..."))
    return result


def describe(record: dict) -> list[str]:
    """The chain from the raw data to the cleaned dataset, one line per step, for people."""
    lines = []
    for manifest in record.get("chain", []):
        ins = ", ".join(f"{r['role']}={r['path']}" for r in manifest.get("inputs", []))
        outs = ", ".join(f"{r['role']}={r['path']}" for r in manifest.get("outputs", []))
        summary = manifest.get("summary", {})
        extra = "; ".join(f"{k} {v}" for k, v in summary.items() if isinstance(v, (int, float, str)))
        lines.append(f"{manifest['step']:>8}: {ins or '-'} -> {outs or '-'}" + (f"  ({extra})" if extra else ""))
    return lines
