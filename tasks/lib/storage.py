"""Where Ray Train keeps a run's state and checkpoints: ``ray.storage``.

Two setups (docs/scaling.md): a local or shared POSIX path (one machine, or NFS mounted at the same path on every
node), or a URI of object storage that pyarrow's file systems open (``s3://bucket/prefix``, ``gs://…``,
``abfs://…``, ``hdfs://…``). Ray Train resolves a URI with ``pyarrow.fs.FileSystem.from_uri`` itself, so an
S3-compatible store is configured the way pyarrow 25 reads it: ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``),
the ``AWS_*`` credentials and ``AWS_REGION``/``AWS_DEFAULT_REGION``, or options in the URI's query
(``?endpoint_override=…&scheme=http``).

The config checks the value's form (tasks/lib/config.py, no I/O). :func:`check` reaches the storage once
before any compute, with bounded timeouts, and turns what can go wrong (an endpoint that does not answer, no
credentials, a bucket that does not exist, no write permission) into one :class:`StorageError` line;
:func:`check_shared` refuses a local folder that the cluster's other nodes do not see.

The train stage's checkpoints live there (rank 0 reports them, Ray Train copies and prunes them):
:func:`run_checkpoints` reads which ones Ray Train keeps for a run, and :class:`RunCheckpoint` copies their files out,
through pyarrow's file systems, for a local path and a bucket alike.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from tasks.lib.config import STORAGE_ACCEPTED as ACCEPTED, STORAGE_BUCKETED as BUCKETED, ConfigError

KEY = "ray.storage"

# The check before compute fails in seconds, not minutes: CHECK_ATTEMPTS tries (the AWS SDK's default is 3, with
# back-off), each connecting within CONNECT_TIMEOUT_S and abandoned when a response stalls for REQUEST_TIMEOUT_S.
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 10.0
CHECK_ATTEMPTS = 2
PROBE = ".ddpm-storage-check"


class StorageError(ConfigError):
    """``ray.storage`` cannot be used; ``str(e)`` is one line naming the key, the value and what is accepted."""

    def __init__(self, value: str, problem: str):
        super().__init__(KEY, f"{value}: {problem}")
        self.value, self.problem = value, problem

    def __reduce__(self):  # raised in Ray Train's workers too: rebuilt from its own arguments
        return type(self), (self.value, self.problem)


def is_uri(value: os.PathLike | str) -> bool:
    """A URI (``scheme://…``) rather than a path: the rule of tasks/lib/shards.py's ``is_url``."""
    return "://" in str(value)


def storage_path(value: str) -> str:
    """What ``RunConfig(storage_path=…)`` gets: a URI as it is (Ray opens it with pyarrow, as :func:`check` did),
    a path made absolute (Ray workers change their working directory)."""
    return value if is_uri(value) else str(Path(value).expanduser().resolve())


def check(value: str) -> str:
    """Reach ``ray.storage`` once before any compute: a path must be creatable and writable; a URI's bucket must
    exist and take a small object (written and deleted again). Returns a short description of where the storage
    is. Raises :class:`StorageError` (one line) otherwise."""
    if not is_uri(value):
        return _check_path(Path(storage_path(value)), value)
    from pyarrow import fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(value)
    except Exception as e:  # ArrowInvalid (a bad query option), OSError (a client that cannot start)
        raise StorageError(value, f"pyarrow cannot open it ({_first_line(e)}); accepted: {ACCEPTED}") from None
    if isinstance(filesystem, pafs.LocalFileSystem):  # file:///…
        return _check_path(Path(path), value)
    where = value
    if isinstance(filesystem, pafs.S3FileSystem):
        filesystem, where = _bounded_s3(filesystem, value)
    _probe(filesystem, path.rstrip("/"), value, where)
    return where


def _check_path(folder: Path, value: str) -> str:
    """A local or NFS folder: no file in the way, and its nearest existing folder writable (nothing is created)."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise StorageError(value, f"{existing} is a file, not a folder; accepted: {ACCEPTED}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(value, f"{existing} is not writable; choose a folder you can write to, or {ACCEPTED}")
    return str(folder)


def _bounded_s3(filesystem: Any, value: str) -> tuple[Any, str]:
    """The S3 file system pyarrow's ``from_uri`` resolved (endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or
    the URI's query, region, credentials), rebuilt with bounded timeouts and retries; and where it points."""
    from pyarrow import fs as pafs

    _require_aws_credentials(value)
    _, (options,) = filesystem.__reduce__()  # the constructor's keyword arguments (how pyarrow pickles it)
    options.update(connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S)
    bounded = pafs.S3FileSystem(**options,
                                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=CHECK_ATTEMPTS))
    endpoint = options.get("endpoint_override") or f"AWS S3 ({options.get('region') or 'default region'})"
    return bounded, endpoint


def _require_aws_credentials(value: str) -> None:
    """Fail early when the AWS credential chain (environment, shared files, SSO/web identity, container or instance
    metadata) finds nothing: pyarrow would then send anonymous requests, refused only much later, or never by a
    permissive S3-compatible store. botocore (installed with dvc-s3) walks the same chain as the AWS C++ SDK."""
    import botocore.session

    try:
        found = botocore.session.Session().get_credentials()
    except Exception as e:  # a broken profile or config file
        raise StorageError(value, f"AWS credentials unreadable ({_first_line(e)})") from None
    if found is None:
        raise StorageError(value, "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                                  "AWS_PROFILE, or a role of the node), or use " + ACCEPTED)


def _probe(filesystem: Any, path: str, value: str, where: str) -> None:
    """The bucket exists and a small object can be written and deleted under ``path``."""
    from pyarrow import fs as pafs

    bucket = path.split("/", 1)[0] if urlsplit(value).scheme.lower() in BUCKETED else None
    try:
        if bucket and filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(value, f"bucket '{bucket}' does not exist at {where}; create it, or set {KEY} to "
                                      f"{ACCEPTED}")
        probe = f"{path}/{PROBE}-{uuid.uuid4().hex}"
        with filesystem.open_output_stream(probe) as f:
            f.write(b"ok")
        filesystem.delete_file(probe)
    except OSError as e:
        raise StorageError(value, f"{_reason(e)} at {where} ({_first_line(e)}); {KEY} accepts {ACCEPTED}") from None


def _reason(e: BaseException) -> str:
    text = str(e)
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "Couldn't connect" in text:
        return "storage unreachable"
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "403" in text:
        return "access denied"
    return "cannot write there"


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# -- a training run in Ray Train's storage ----------------------------------------------------------------------------
# Each checkpoint a training reports is a folder ``<storage>/<run name>/checkpoint_<step>/`` holding the checkpoint
# file (ckpt_<step>.pt, the project's format) and the loss log up to that step (tasks/train.py), and Ray Train's
# record of the run (its checkpoint manager's snapshot) says which of them are kept.
CHECKPOINT_DIR = "checkpoint_{step:08d}"


@dataclass(frozen=True)
class RunCheckpoint:
    """One checkpoint Ray Train keeps for a run: its step, where it is (a pyarrow file system and a folder there) and
    the metrics reported with it (``step``, ``loss``, ``sha256`` of the checkpoint file)."""

    step: int
    filesystem: Any
    folder: str
    metrics: dict[str, Any]

    def file(self, name: str) -> str:
        return f"{self.folder.rstrip('/')}/{name}"

    def copy_to(self, name: str, dest: Path) -> Path:
        """Copy the file ``name`` of this checkpoint folder to ``dest`` (atomically: a temporary file, then a
        rename), streamed a MiB at a time."""
        import shutil

        from ddpm.checkpoint import atomic_write_bytes

        with self.filesystem.open_input_stream(self.file(name)) as src:
            atomic_write_bytes(dest, lambda out: shutil.copyfileobj(src, out, 1 << 20))
        return dest

    def read_text(self, name: str) -> str:
        with self.filesystem.open_input_stream(self.file(name)) as src:
            return src.read().decode()


@contextlib.contextmanager
def checkpoint_folder(checkpoint: Any) -> Iterator[Path]:
    """A Ray Train checkpoint (``ray.train.Checkpoint``) as a local folder that only this process reads: the folder
    itself on a local (or shared) file system, otherwise a private download, removed on exit.

    Not ``Checkpoint.as_directory()``: it downloads into one folder per checkpoint and node, shared by the node's
    processes, and a process that arrives after another's download has finished downloads it again over the files
    the other is reading (rewritten in place). The ranks of a restarted worker group on one node all resume from the
    same checkpoint, so one of them read a checkpoint torn that way (tests/test_isolated_stages.py, on a loaded CPU).
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="ddpm-resume-") as tmp:
        yield Path(checkpoint.to_directory(tmp))


def run_checkpoints(value: str, name: str) -> list[RunCheckpoint]:
    """The checkpoints Ray Train keeps for the run ``name`` in ``ray.storage`` ``value``, oldest first; none for a
    run that does not exist yet or kept none. Read from Ray Train's own record of the run
    (``ray.train.Result.from_path``), so an upload that a killed process left unregistered is not among them."""
    from ray.train import Result
    from ray.train.v2._internal.exceptions import RayTrainError

    run = f"{storage_path(value).rstrip('/')}/{name}"
    try:
        result = Result.from_path(run)
    except RayTrainError as e:  # its record (rewritten in place at every checkpoint) cut short by a kill mid-write
        raise StorageError(value, f"Ray Train's record of the run {name} cannot be read ({_first_line(e)}); a process "
                                  "killed while Ray wrote it leaves it so, and Ray Train cannot continue the run "
                                  f"either: remove {run} to resume from the newest checkpoint in --checkpoints instead "
                                  "(or to train from scratch)") from None
    except RuntimeError:  # "Experiment folder … doesn't exist" / no checkpoint manager snapshot yet
        return []
    except OSError as e:
        raise StorageError(value, f"cannot read the run {name} ({_first_line(e)})") from None
    kept = [RunCheckpoint(int(m["step"]), c.filesystem, c.path, dict(m))
            for c, m in (result.best_checkpoints or []) if m and "step" in m]
    return sorted(kept, key=lambda k: k.step)


def check_shared(value: str, nodes: list[dict]) -> None:
    """With workers on other nodes (``nodes``: :func:`tasks.lib.cluster.worker_nodes_elsewhere`), a local
    ``ray.storage`` folder must be one they see too (a shared file system at the same path): Ray Train's workers
    write the checkpoints there, and this driver reads them. A marker file written here must read back the same on
    every node. Raises :class:`StorageError` naming the nodes that do not see it."""
    from .cluster import nodes_missing

    if not nodes or (is_uri(value) and urlsplit(value).scheme.lower() != "file"):
        return
    folder = Path(storage_path(value).removeprefix("file://"))
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{PROBE}-{uuid.uuid4().hex}"
    from ddpm.checkpoint import atomic_write_bytes

    atomic_write_bytes(marker, lambda f: f.write(marker.name.encode()))  # a unique name: its bytes identify the folder
    try:
        missing = nodes_missing(marker, nodes)
    finally:
        marker.unlink(missing_ok=True)
    if missing:
        raise StorageError(value, f"a folder the Ray node(s) {', '.join(missing)} do not see (no shared file system "
                                  f"there); set {KEY} to object storage (s3://bucket/prefix, gs://…) or "
                                  "to a folder every node mounts at the same path")
