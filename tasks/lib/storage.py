"""Where Ray Train keeps a run's state and checkpoints: ``ray.storage``.

Two setups (docs/scaling.md): a local or shared POSIX path (one machine, or NFS mounted at the same path on every
node), or a URI of object storage that pyarrow's file systems open (``s3://bucket/prefix``, ``gs://…``,
``abfs://…``, ``hdfs://…``). Ray Train resolves a URI with ``pyarrow.fs.FileSystem.from_uri`` itself, so an
S3-compatible store is configured the way pyarrow 25 reads it: ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``),
the ``AWS_*`` credentials and ``AWS_REGION``/``AWS_DEFAULT_REGION``, or options in the URI's query
(``?endpoint_override=…&scheme=http``).

The config checks the value's form (tasks/lib/config.py, no I/O). :func:`check` reaches the storage once
before any compute, with bounded timeouts, and turns what can go wrong (an endpoint that does not answer, no
credentials, a bucket that does not exist, no write permission) into one :class:`StorageError` line.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any
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
