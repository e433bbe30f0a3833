"""Run directories on object stores: `train.out` may be a URI (s3://bucket/run, gs://..., any scheme
`pyarrow.fs` knows) instead of a path.

The trainer still works on files: in a local staging directory ($FLM_HOME/cache/runs/<the URI as a name>) that
`RunStorage` mirrors to the URI:

- `pull()` at start: when the URI holds a newer complete checkpoint than the staging directory (a fresh node, a
  wiped disk), it downloads that checkpoint with plan.json and metrics.jsonl, and the trainer resumes from it;
- `push_checkpoint()` after each save: every file of the checkpoint, its manifest (checkpoint.json) last, so a
  partial upload is never taken for a checkpoint (a download reads only the files the manifest lists and
  verifies their hashes);
- `push_file()` for metrics.jsonl and plan.json; `prune()` drops what pruning dropped from the staging directory.

S3 endpoints other than AWS (MinIO, moto) come from the standard `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`
environment variables, credentials from the usual AWS ones. Readers of checkpoints (`flm eval`, serving, export)
take local paths: copy a checkpoint down first (`aws s3 cp --recursive`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from urllib.parse import urlencode

from flm.checkpoint import MANIFEST, STEP_PREFIX, CheckpointError, list_checkpoints, verify_checkpoint

CHUNK = 8 << 20


def is_uri(text: str | os.PathLike | None) -> bool:
    return bool(text) and "://" in str(text)


def staging_dir(uri: str, home: Path) -> Path:
    """Where a run on `uri` is staged locally: one directory per URI, named after it."""
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in uri.replace("://", "-")).strip("-.")
    return home / "cache" / "runs" / name


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) of a URI; S3 honours AWS_ENDPOINT_URL(_S3) (pyarrow's own reading of
    it depends on its AWS SDK version, so it is passed explicitly)."""
    from pyarrow import fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if uri.startswith("s3://") and endpoint and "endpoint_override" not in uri:
        uri += ("&" if "?" in uri else "?") + urlencode({"endpoint_override": endpoint})
    filesys, path = fs.FileSystem.from_uri(uri)
    return filesys, path.rstrip("/")


def join(root: str | os.PathLike, name: str) -> str | Path:
    """`root/name` for a directory path or a URI (a URI stays a string: Path would fold its '//')."""
    return f"{str(root).rstrip('/')}/{name}" if is_uri(root) else Path(root) / name


def check_writable(uri: str) -> str:
    """`uri` without a trailing '/', after creating it and writing and deleting a probe object there; OSError if
    that fails (no such bucket, no credentials, no endpoint)."""
    uri = uri.rstrip("/")
    filesys, root = filesystem(uri)
    probe = f"{root}/.flm-write-test-{os.getpid()}"
    filesys.create_dir(root, recursive=True)
    with filesys.open_output_stream(probe) as out:
        out.write(b"")
    filesys.delete_file(probe)
    return uri


class RunStorage:
    """A run directory at `uri`, staged in the local directory `staging` (None: only `read_text` and
    `remote_checkpoints` are used, e.g. by a driver that watches a run its workers write)."""

    def __init__(self, uri: str, staging: Path | None = None):
        self.uri, self.staging = uri, Path(staging) if staging is not None else None
        self.fs, self.root = filesystem(uri)
        self._dirs: set[str] = set()

    # --- reading ------------------------------------------------------------------------------------------------
    def remote_checkpoints(self) -> list[str]:
        """Names of the checkpoints at the URI whose manifest is there (complete uploads), oldest first."""
        from pyarrow import fs

        selector = fs.FileSelector(f"{self.root}/checkpoints", allow_not_found=True)
        names = sorted(i.base_name for i in self.fs.get_file_info(selector)
                       if i.type == fs.FileType.Directory and i.base_name.startswith(STEP_PREFIX))
        infos = self.fs.get_file_info([f"{self.root}/checkpoints/{n}/{MANIFEST}" for n in names])
        return [n for n, i in zip(names, infos, strict=True) if i.type == fs.FileType.File]

    def read_text(self, rel: str) -> str | None:
        """The text of uri/rel, or None if there is no such file."""
        try:
            with self.fs.open_input_stream(f"{self.root}/{rel}") as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    def pull_file(self, rel: str) -> None:
        """Replace staging/rel with uri/rel when the URI has it."""
        self._download_file(rel, self.staging / rel)

    def pull(self) -> Path | None:
        """Download the newest complete checkpoint (with plan.json and metrics.jsonl) when it is newer than the
        staging directory's; returns it, or None when the staging directory is up to date. A checkpoint that fails
        verification after download is dropped for the previous one."""
        local = [p.name for p in list_checkpoints(self.staging) if (p / MANIFEST).is_file()]
        newest_local = local[-1] if local else ""
        for name in reversed(self.remote_checkpoints()):
            if name <= newest_local:
                break
            path = self._download_checkpoint(name)
            if path is not None:
                for extra in ("plan.json", "metrics.jsonl"):
                    self._download_file(extra, self.staging / extra)
                return path
        if not (self.staging / "plan.json").exists():  # a run that has not checkpointed yet
            self._download_file("plan.json", self.staging / "plan.json")
        return None

    def _download_checkpoint(self, name: str) -> Path | None:
        rel = f"checkpoints/{name}"
        target = self.staging / rel
        tmp = target.parent / f".tmp-pull-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._download_file(f"{rel}/{MANIFEST}", tmp / MANIFEST)
            for file in json.loads((tmp / MANIFEST).read_text()):
                self._download_file(f"{rel}/{file}", tmp / file)
            verify_checkpoint(tmp)
        except (CheckpointError, OSError, ValueError) as e:
            warnings.warn(f"skipping checkpoint {self.uri}/{rel}: {e}", stacklevel=3)
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        try:
            os.rename(tmp, target)
        except OSError:  # another rank on this node got it first
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _download_file(self, rel: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            src = self.fs.open_input_stream(f"{self.root}/{rel}")
        except FileNotFoundError:
            if rel.startswith("checkpoints/"):
                raise
            return  # plan.json / metrics.jsonl not written yet
        with src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)

    # --- writing ------------------------------------------------------------------------------------------------
    def push_file(self, rel: str) -> None:
        """Upload staging/rel to uri/rel (replacing it)."""
        self._upload(self.staging / rel, f"{self.root}/{rel}")

    def push_checkpoint(self, path: Path) -> None:
        """Upload a saved checkpoint directory, its manifest last (and any older manifest of the same name
        removed first, so a re-upload is never read half old, half new)."""
        rel = f"checkpoints/{path.name}"
        manifest = json.loads((path / MANIFEST).read_text())
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(f"{self.root}/{rel}/{MANIFEST}")
        for file in manifest:
            self._upload(path / file, f"{self.root}/{rel}/{file}")
        self._upload(path / MANIFEST, f"{self.root}/{rel}/{MANIFEST}")

    def prune(self) -> None:
        """Make the URI's checkpoints those of the staging directory (after its pruning), keeping every stage-end
        checkpoint: the staging directory of a resumed run holds only what it downloaded and saved since."""
        from pyarrow import fs

        local = {p.name for p in list_checkpoints(self.staging)}
        selector = fs.FileSelector(f"{self.root}/checkpoints", allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type != fs.FileType.Directory or info.base_name in local:
                continue
            try:
                with self.fs.open_input_stream(f"{info.path}/trainer_state.json") as f:
                    if json.loads(f.read()).get("stage_end"):
                        continue
            except (FileNotFoundError, ValueError):
                pass  # a torn upload
            self._dirs.discard(info.path)
            self.fs.delete_dir(info.path)

    def _upload(self, src: Path, dest: str) -> None:
        parent = dest.rsplit("/", 1)[0]
        if parent not in self._dirs:  # a no-op on S3 but for a marker; needed on file:// and other filesystems
            self.fs.create_dir(parent, recursive=True)
            self._dirs.add(parent)
        with open(src, "rb") as f, self.fs.open_output_stream(dest) as out:
            shutil.copyfileobj(f, out, CHUNK)
