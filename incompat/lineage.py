"""Where a cleaned dataset came from: file references with digests, step manifests, the lineage record, and its
verification.

A *reference* names a file (or a source folder) by path and content digest:
  {"role": "...", "path": "<relative to the record's folder>", "abs": "<absolute>", "kind": "dataset"|"file"|"dir",
   "digest": "..."}
- dataset: the canonical dataset digest (sample ids + per-sample digests); verifying re-decodes every row.
- file:    sha256 of the bytes (raw sources, scores, models, manifests).
- dir:     sha256 over (relative path, sha256) of every regular file below it (an image-folder source).

Every step writes a manifest (`<step>.json`) beside its outputs: its inputs, outputs, parameters and the engine's
source hash. A manifest holds nothing that changes between two runs giving the same output (no time, no git commit):
it lies inside a DVC output, and a manifest that changed on every run would make every later stage rerun. The time,
the git commit and the run ids are in the lineage record only.

The filter step gathers the manifests upstream of the cleaned dataset into `lineage.json` and seals it:
- `content_digest`: sha256 over the record's canonical JSON without the per-run keys (`RUN_KEYS`), the manifest
  files' digests and each step's code version and summary; it is also written into the cleaned datasets' schema
  metadata (`lineage_content_digest`), which binds data and record: editing the record's params, counts, paths or
  digests, or swapping a dataset and updating its digest in the record, breaks the binding. What it leaves out
  changes between runs that give the same data (time, run ids, git commit, wall seconds, an engine edit that
  changes no result): with it in, an identical rerun would rewrite clean.parquet (a DVC output) and retrain again.
- `record_digest`: sha256 over the whole record (content digest included) without itself and the signature.
- `signature`: HMAC-SHA256 of the record digest under the key in $INCOMPAT_LINEAGE_KEY, when set.
Without a key this is integrity and internal consistency, not authenticity: whoever can rewrite the data, the record
and the metadata consistently is not caught by any checksum. With the key, only its holders can write a record that
verifies.

`verify` reads only what a record may name: regular files (or folders, for an image-folder source), checked with
`os.stat` after symlinks are resolved, never a FIFO or a device, and only inside the folders it may read: the
record's own folder (where its outputs must be: no fallback elsewhere), the project holding it (the nearest folder
above with `dvc.yaml`, `params.yaml` or `.git`) and any folder the caller adds. Other references are reported as
`outside` without being opened; references it cannot find are reported as `missing`, not failed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import subprocess
import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

from incompat import files
from incompat.data import METADATA_KEY, DataError, read_dataset, read_metadata
from incompat.files import atomic_output, write_text_atomic

LINEAGE_VERSION = 2
ENGINE_DIR = Path(__file__).resolve().parent
KEY_ENV = "INCOMPAT_LINEAGE_KEY"
BINDING_KEY = "lineage_content_digest"  # in a cleaned dataset's schema metadata
# Keys that differ between two runs producing the same data: outside the content digest (see the module docstring).
RUN_KEYS = ("created", "code", "mlflow_run_id", "prefect_flow_run_id", "dvc_stage")
SEAL_KEYS = ("content_digest", "record_digest", "signature")
PROJECT_MARKERS = ("dvc.yaml", "params.yaml", ".git")
REF_KINDS = ("dataset", "file", "dir")


# --- reading files safely -------------------------------------------------------------------------------------

def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | os.PathLike, allow_dir: bool = False) -> os.stat_result:
    """os.stat (symlinks followed) of a regular file, or of a folder when allow_dir; anything else is a DataError.
    A FIFO would block its reader forever and a device such as /dev/zero never ends: neither is ever opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (or a broken link)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror})") from None
    if stat.S_ISREG(st.st_mode) or (allow_dir and stat.S_ISDIR(st.st_mode)):
        return st
    raise DataError(f"{path}: {_file_type(st.st_mode)}, not a regular file; refusing to read it")


def open_regular(path: str | os.PathLike):
    """(binary file object, its fstat) of a regular file, opened without ever blocking. O_NONBLOCK: a FIFO swapped
    in after any earlier check opens at once instead of waiting for a writer, and fstat on the open descriptor then
    refuses it (DataError); on a regular file the flag changes nothing. os.open's own errors propagate."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path}: {_file_type(st.st_mode)}, not a regular file; refusing to read it")
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    fh, _ = open_regular(path)
    h = hashlib.sha256()
    with fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_sha256(path: str | os.PathLike) -> str:
    root = Path(path)
    h = hashlib.sha256()
    # is_file() is true for regular files only, and links are skipped: nothing below can block or leave the folder
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
    check_regular(path, allow_dir=True)
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
    mode = check_regular(path, allow_dir=ref["kind"] == "dir").st_mode
    if ref["kind"] == "dir":
        return dir_sha256(path)
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: a folder, but the record names a {ref['kind']}")
    if ref["kind"] == "dataset":
        # verify=True recomputes each sample digest from the pixels, so an edited image is caught too
        return read_dataset(path, verify=True).dataset_digest()
    return file_sha256(path)


# --- code version and manifests ---------------------------------------------------------------------------------

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


def engine_version() -> dict:
    """The part of code_version() that depends on the engine's sources only: a commit of an unrelated file or a
    dirty tree leaves it alone, so it may go into files that DVC hashes."""
    code = code_version()
    return {"package": code["package"], "engine_sha256": code["engine_sha256"]}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_manifest(path: str | os.PathLike, step: str, *, inputs: list[dict], outputs: list[dict],
                   params: dict | None = None, summary: dict | None = None) -> dict:
    """A step's manifest: written last, after its outputs, so its presence means the step finished. No time and
    no git state: the same inputs, parameters and engine give a byte-identical manifest."""
    manifest = {"step": step, "code": engine_version(), "params": params or {},
                "inputs": inputs, "outputs": outputs, "summary": summary or {}}
    write_text_atomic(path, json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def read_json(path: str | os.PathLike) -> dict:
    return files.read_json(path, DataError)


MAX_RECORD_BYTES = 256 << 20  # a record lists files and steps: far below this, unless it is something else


def read_record(path: str | os.PathLike) -> dict:
    """A lineage record as JSON, opened like file_sha256 opens a file: a FIFO or device put in its place between
    find_record's check and this read is refused, not waited on or read forever."""
    try:
        fh, st = open_regular(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror})") from None
    with fh:
        if st.st_size > MAX_RECORD_BYTES:
            raise DataError(f"{path}: {st.st_size} bytes, too large for a lineage record")
        raw = fh.read(MAX_RECORD_BYTES + 1)
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None


def digest(path: str | os.PathLike | None) -> str | None:
    """The content digest a reference to `path` would record (None for no path)."""
    return reference("source", path)["digest"] if path else None


# --- sealing a record and binding the data to it ---------------------------------------------------------------

def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def content_digest(record: dict) -> str:
    """Over what the data depends on: the record without its per-run keys, without the manifest files' digests and
    without each step's code version and summary (a step rerun by new code with the same result, or a new wall
    time in its summary, leaves the cleaned datasets' bytes alone). The record digest covers all of these."""
    content = {k: v for k, v in record.items() if k not in RUN_KEYS + SEAL_KEYS + ("manifests",)}
    content["chain"] = [{k: v for k, v in step.items() if k not in ("code", "summary")} if isinstance(step, dict)
                        else step for step in record.get("chain", [])]
    return hashlib.sha256(_canonical(content)).hexdigest()


def record_digest(record: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items()
                                      if k not in ("record_digest", "signature")})).hexdigest()


def signing_key() -> bytes | None:
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def signature(digest_hex: str, key: bytes) -> str:
    return hmac.new(key, digest_hex.encode(), hashlib.sha256).hexdigest()


def seal(record: dict) -> dict:
    """The record as it will be read back (JSON round trip), with its content digest, record digest and, when
    $INCOMPAT_LINEAGE_KEY is set, its signature."""
    sealed = json.loads(json.dumps({k: v for k, v in record.items() if k not in SEAL_KEYS}, default=str))
    sealed["content_digest"] = content_digest(sealed)
    sealed["record_digest"] = record_digest(sealed)
    key = signing_key()
    if key:
        sealed["signature"] = {"alg": "hmac-sha256", "key_env": KEY_ENV,
                               "value": signature(sealed["record_digest"], key)}
    return sealed


def bind_dataset(path: str | os.PathLike, content_digest_hex: str) -> None:
    """Write the record's content digest into a canonical dataset's schema metadata (rows untouched, so its dataset
    digest stays), one row group at a time, atomically."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as source:
        schema = source.schema_arrow
        meta = json.loads((schema.metadata or {})[METADATA_KEY])
        meta[BINDING_KEY] = content_digest_hex
        schema = schema.with_metadata({METADATA_KEY: json.dumps(meta).encode()})
        small = [name for name in schema.names if name != "image"]  # write_dataset's settings
        with atomic_output(path) as tmp:
            with pq.ParquetWriter(tmp, schema, compression="zstd", use_dictionary=small,
                                  write_statistics=small) as writer:
                for group in range(source.num_row_groups):
                    writer.write_table(source.read_row_group(group).replace_schema_metadata(schema.metadata))


def write_record(path: str | os.PathLike, record: dict, datasets: list[str | os.PathLike]) -> dict:
    """Seal `record`, bind each of `datasets` (the record's dataset outputs) to it, then write it to `path`."""
    sealed = seal(record)
    for dataset in datasets:
        bind_dataset(dataset, sealed["content_digest"])
    write_text_atomic(path, json.dumps(sealed, indent=2) + "\n")
    return sealed


# --- the shape of a record ---------------------------------------------------------------------------------------

_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object", type(None): "null"}


def _need(record_path: Path, obj: dict, key: str, types: tuple, where: str):
    name = f"{where}.{key}" if where else key
    if key not in obj:
        raise DataError(f"{record_path}: key '{name}' is missing; not a complete lineage record")
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool):
        wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise DataError(f"{record_path}: key '{name}' is {type(value).__name__} {str(value)[:40]!r}, "
                        f"expected {wanted}")
    return value


def _check_ref(record_path: Path, ref, where: str) -> None:
    if not isinstance(ref, dict):
        raise DataError(f"{record_path}: key '{where}' is {type(ref).__name__}, expected a file reference object")
    for key in ("role", "path", "abs", "kind", "digest"):
        _need(record_path, ref, key, (str,), where)
    if ref["kind"] not in REF_KINDS:
        raise DataError(f"{record_path}: key '{where}.kind' is {ref['kind']!r}, expected one of {REF_KINDS}")


def check_record(record_path: Path, record) -> None:
    """Every key that verify, describe and the command line read, with its type: one clear line for the first
    one missing or wrong (never a KeyError)."""
    if not isinstance(record, dict):
        raise DataError(f"{record_path}: a lineage record is a JSON object, not {type(record).__name__}")
    for key, types in (("content_digest", (str,)), ("record_digest", (str,)), ("outputs", (list,)),
                       ("chain", (list,)), ("manifests", (list,)), ("params", (dict,)), ("counts", (dict,)),
                       ("created", (str,)), ("code", (dict,)), ("removed_per_class", (dict,)),
                       ("scenario", (dict, type(None))), ("signature", (dict,))):
        if key in ("signature",) and key not in record:
            continue
        _need(record_path, record, key, types, "")
    for i, ref in enumerate(record["outputs"]):
        _check_ref(record_path, ref, f"outputs[{i}]")
    for i, ref in enumerate(record["manifests"]):
        _check_ref(record_path, ref, f"manifests[{i}]")
    for i, manifest in enumerate(record["chain"]):
        where = f"chain[{i}]"
        if not isinstance(manifest, dict):
            raise DataError(f"{record_path}: key '{where}' is {type(manifest).__name__}, expected a step manifest")
        _need(record_path, manifest, "step", (str,), where)
        _need(record_path, manifest, "summary", (dict,), where)
        for side in ("inputs", "outputs"):
            for j, ref in enumerate(_need(record_path, manifest, side, (list,), where)):
                _check_ref(record_path, ref, f"{where}.{side}[{j}]")
    if "signature" in record:
        _need(record_path, record["signature"], "value", (str,), "signature")


# --- verification ------------------------------------------------------------------------------------------------

@dataclass
class Check:
    role: str
    path: str
    status: str  # ok | changed | missing | outside | error | unchecked
    detail: str = ""
    required: bool = False  # a record's own output: missing is a failure, not a note

    @property
    def failed(self) -> bool:
        return self.status in ("changed", "error") or (self.required and self.status != "ok")


@dataclass
class Verification:
    record: Path
    checks: list[Check] = field(default_factory=list)
    roots: list[Path] = field(default_factory=list)
    authenticated: bool = False  # the signature was checked against $INCOMPAT_LINEAGE_KEY
    contents: dict = field(default_factory=dict)  # the record as verified (checked keys and types)

    @property
    def ok(self) -> bool:
        return not any(c.failed for c in self.checks)

    @property
    def changed(self) -> list[Check]:
        return [c for c in self.checks if c.failed]


def find_record(path: str | os.PathLike) -> Path:
    """lineage.json itself, the folder holding it, or a cleaned dataset with lineage.json beside it."""
    path = Path(path)
    candidates = [path] if path.suffix == ".json" else [path / "lineage.json", path.with_name("lineage.json")]
    for candidate in candidates:
        if candidate.is_file():  # regular files only: a FIFO named lineage.json is not a record
            return candidate
    raise DataError(f"{path}: no lineage record (looked for {', '.join(str(c) for c in candidates)})")


def project_root(folder: Path) -> Path | None:
    """The nearest folder at or above `folder` (resolved) holding dvc.yaml, params.yaml or .git."""
    for candidate in [folder, *folder.parents]:
        if any(os.path.lexists(candidate / marker) for marker in PROJECT_MARKERS):
            return candidate
    return None


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _digest_check(role: str, ref: dict, found: Path, required: bool = False) -> Check:
    try:
        actual = actual_digest(ref, found)
    except (DataError, OSError) as exc:
        return Check(role, str(found), "error", str(exc), required)
    if actual == ref["digest"]:
        return Check(role, str(found), "ok", required=required)
    return Check(role, str(found), "changed", f"digest {actual[:12]}... != recorded {ref['digest'][:12]}...", required)


def _output_check(ref: dict, base: Path, record: dict) -> Check:
    """A record's own output: beside the record (no fallback to where it once was), with the recorded digest, and,
    for a dataset, bound to this record's content digest."""
    candidate = base / ref["path"]
    role = f"output: {ref['role']}"
    if not os.path.lexists(candidate):
        return Check(role, str(candidate), "missing", "the record's own output is not beside it", True)
    resolved = candidate.resolve()
    if not resolved.is_relative_to(base):
        return Check(role, str(candidate), "error", f"resolves to {resolved}, outside the record's folder {base}",
                     True)
    check = _digest_check(role, ref, resolved, required=True)
    if check.status == "ok" and ref["kind"] == "dataset":
        bound = read_metadata(resolved).get(BINDING_KEY)
        if bound != record["content_digest"]:
            return Check(role, str(resolved), "changed", "not the data this record was written with: its metadata "
                         f"carries content digest {str(bound)[:12]}..., the record {record['content_digest'][:12]}...",
                         True)
    return check


def _reference_check(ref: dict, base: Path, roots: list[Path]) -> Check:
    """An upstream reference: relative to the record first (a copied run folder still verifies), then where it
    was; read only when it lies inside `roots`."""
    role = f"{ref['step'] + ': ' if ref.get('step') else ''}{ref['role']}"
    outside = None
    for candidate in (base / ref["path"], Path(ref["abs"])):
        if not os.path.lexists(candidate):
            continue
        resolved = candidate.resolve()
        if not _inside(resolved, roots):
            outside = outside or resolved
            continue
        return _digest_check(role, ref, resolved)
    if outside is not None:
        return Check(role, str(outside), "outside", "not read: outside the folders lineage may read "
                     f"({', '.join(map(str, roots))}); add its folder with --root to check it")
    return Check(role, ref["abs"], "missing", "not reachable from here")


def references(record: dict):
    """The upstream references of a lineage record: the step manifests, then each step's inputs and outputs,
    each once; the record's own outputs are not among them."""
    seen = {(ref["abs"], ref["digest"]) for ref in record.get("outputs", [])}
    for ref in record.get("manifests", []):
        seen.add((ref["abs"], ref["digest"]))
        yield {**ref, "step": "manifest"}
    for manifest in record.get("chain", []):
        for ref in manifest.get("outputs", []) + manifest.get("inputs", []):
            if (ref["abs"], ref["digest"]) not in seen:
                seen.add((ref["abs"], ref["digest"]))
                yield {**ref, "step": manifest.get("step")}


def _seal_checks(record: dict, record_path: Path) -> tuple[list[Check], bool]:
    checks = []
    content = content_digest(record)
    if content != record["content_digest"]:
        checks.append(Check("record", str(record_path), "changed", "edited after it was written: content digest "
                            f"{content[:12]}... != recorded {record['content_digest'][:12]}..."))
    whole = record_digest(record)
    if whole != record["record_digest"]:
        checks.append(Check("record", str(record_path), "changed", "edited after it was written: record digest "
                            f"{whole[:12]}... != recorded {record['record_digest'][:12]}..."))
    if not checks:
        checks.append(Check("record", str(record_path), "ok"))
    key, signed = signing_key(), record.get("signature")
    if key and signed:
        good = hmac.compare_digest(signature(record["record_digest"], key), signed["value"])
        checks.append(Check("signature", KEY_ENV, "ok" if good else "changed",
                            "" if good else f"HMAC does not match under ${KEY_ENV}: not written by a key holder"))
        return checks, good
    if key:
        checks.append(Check("signature", KEY_ENV, "error", f"the record is not signed, but ${KEY_ENV} is set"))
    elif signed:
        checks.append(Check("signature", KEY_ENV, "unchecked", f"signed; set ${KEY_ENV} to check the signature"))
    return checks, False


def verify(path: str | os.PathLike, roots: list[str | os.PathLike] = ()) -> Verification:
    """Check a record against itself and the files it names. `path`: lineage.json, its folder, or one of the
    record's outputs (a dataset named must be that output itself). `roots`: more folders references may lie in."""
    named = Path(path)
    record_path = find_record(named)
    record = read_record(record_path)
    version = record.get("lineage_version") if isinstance(record, dict) else None
    if version != LINEAGE_VERSION:
        hint = "; records before version 2 carry no digests of their own: run the filter step again" \
            if version == 1 else ""
        raise DataError(f"{record_path}: not an incompat lineage record (lineage_version {version!r}, expected "
                        f"{LINEAGE_VERSION}){hint}")
    check_record(record_path, record)
    base = record_path.parent.resolve()
    if named.resolve() not in (record_path.resolve(), base):
        outputs = {(base / ref["path"]).resolve(): ref for ref in record["outputs"]}
        if named.resolve() not in outputs:
            names = ", ".join(ref["path"] for ref in record["outputs"])
            raise DataError(f"{named}: not an output of {record_path} (its outputs: {names}); its lineage is "
                            "not recorded there")
    allowed = [base] + [p for p in (project_root(base),) if p is not None] + [Path(r).resolve() for r in roots]
    result = Verification(record_path, roots=list(dict.fromkeys(allowed)), contents=record)
    result.checks, result.authenticated = _seal_checks(record, record_path)
    result.checks += [_output_check(ref, base, record) for ref in record["outputs"]]
    result.checks += [_reference_check(ref, base, result.roots) for ref in references(record)]
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
