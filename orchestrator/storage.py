"""Where a run's files live: a local directory or an object-store URI (`s3://bucket/prefix`, `gs://...`).

One place decides how a storage location becomes a pyarrow filesystem, what Ray Train is given
(`RunConfig(storage_path=..., storage_filesystem=...)`), whether the location can be written
before Ray starts, and how directories travel between it and the local disk (compaction, the
final outputs, wandb's files).

S3 settings come from the standard AWS environment: AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY
(+ AWS_SESSION_TOKEN), or AWS_PROFILE / the shared credentials files, or a web-identity or
container role; AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-compatible server (MinIO, Ceph,
moto); AWS_REGION or AWS_DEFAULT_REGION. An EC2 instance role is used only when
AWS_EC2_METADATA_DISABLED=false says it is there. Ray Train workers inherit the same variables
(`env.worker_env`); credentials are never put into the filesystem object Ray pickles.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlparse

from . import env

PROBE_PREFIX = ".softprune-probe-"
_CHUNK = 8 * 1024 * 1024


class StorageError(ValueError):
    """A storage location that cannot be used; one line naming it (and never a credential)."""


# -- locations --------------------------------------------------------------------------------
def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a local path or a URI."""
    if not is_uri(base):
        return str(Path(base, *parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"storage {uri!r}: no bucket in the URI (expected s3://bucket/prefix)")
    return parsed.netloc, parsed.path.strip("/")


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_filesystem(bucket: str):
    """An S3 filesystem from the AWS environment; credentials stay in the environment (the
    default chain of whichever process uses it), so the object Ray pickles carries none."""
    import pyarrow.fs as pafs

    kwargs: dict = {}
    endpoint, region = _endpoint(), os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        kwargs["endpoint_override"] = endpoint  # "http://host:port" keeps its scheme
        kwargs["region"] = region or "us-east-1"  # S3-compatible servers ignore it, signing needs one
    elif region:
        kwargs["region"] = region
    else:  # AWS itself: the bucket's own region, as pyarrow's from_uri would find it
        try:
            kwargs["region"] = pafs.resolve_s3_region(bucket)
        except OSError:
            pass  # the checks below report what is wrong with the bucket
    return pafs.S3FileSystem(**kwargs)


def resolve(location: str | Path):
    """(pyarrow filesystem, path on it) of a local path or URI."""
    import pyarrow.fs as pafs

    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    if location.startswith("s3://"):
        bucket, key = _split_s3(location)
        return _s3_filesystem(bucket), f"{bucket}/{key}".rstrip("/")
    with _errors(location):
        return pafs.FileSystem.from_uri(location)


def ray_storage(location: str) -> dict:
    """The storage arguments of Ray Train's RunConfig for `location`."""
    if location.startswith("s3://"):  # our filesystem: the same endpoint and region as the checks
        fs, path = resolve(location)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": location if is_uri(location) else str(Path(location).expanduser().resolve())}


def location_of(storage: str, fs_path: str | None) -> str | None:
    """A path Ray reports on the storage filesystem (prefix-stripped for URIs) as a location."""
    if fs_path is None or not is_uri(storage) or is_uri(fs_path):
        return fs_path
    return f"{urlparse(storage).scheme}://{fs_path.lstrip('/')}"


# -- errors -----------------------------------------------------------------------------------
_REJECTED = ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId", "SignatureDoesNotMatch",
             "INVALID_CLIENT_TOKEN_ID", "EXPIRED_TOKEN", "ExpiredToken", "InvalidToken")


def _reason(exc: BaseException, location: str) -> str:
    """What went wrong, in a few words, from pyarrow's (AWS SDK's) error text."""
    text = str(exc)
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not connect" in text:
        return f"endpoint {_endpoint() or 'of ' + location} is unreachable"
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return f"bucket {urlparse(location).netloc!r} does not exist"
    if any(code in text for code in _REJECTED):
        return "the credentials were rejected (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "Forbidden" in text:
        return "access denied"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return text.splitlines()[0][:300] if text else type(exc).__name__


class _errors:
    """Turns a storage library error into a one-line StorageError naming the location."""

    def __init__(self, location: str):
        self.location = location

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise StorageError(f"storage {self.location!r}: {_reason(exc, self.location)}") from None
        return False


# -- the check before Ray starts ------------------------------------------------------------
def check_storage(location: str) -> None:
    """Raise StorageError (one line) unless `location` can hold a run: a local directory is
    created if missing and must take a file; an s3:// location needs credentials, an existing
    bucket, and a probe object that can be written and deleted."""
    location = str(location)
    if not is_uri(location):
        _check_local(Path(location).expanduser())
    elif location.startswith("s3://"):
        _check_s3(location)
    else:
        _check_writable_uri(location)


def _check_local(path: Path) -> None:
    try:
        if path.exists() and not path.is_dir():
            raise StorageError(f"storage {str(path)!r} is not writable: it is a file, not a directory")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StorageError(f"storage {str(path)!r} is not writable: {exc.strerror or exc}") from None


def credential_source() -> str | None:
    """Where the AWS SDK will find credentials, without asking any server; None if nowhere."""
    e = os.environ
    if e.get("AWS_ACCESS_KEY_ID") and e.get("AWS_SECRET_ACCESS_KEY"):
        return "environment"
    if e.get("AWS_PROFILE") or e.get("AWS_DEFAULT_PROFILE"):
        return "profile"
    if e.get("AWS_WEB_IDENTITY_TOKEN_FILE") or e.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") \
            or e.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return "role"
    for var, default in (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), ("AWS_CONFIG_FILE", "~/.aws/config")):
        if Path(e.get(var, default)).expanduser().is_file():
            return "file"
    if e.get("AWS_EC2_METADATA_DISABLED", "").lower() == "false":  # said explicitly: an instance role
        return "instance"
    return None


def _check_s3(uri: str) -> None:
    bucket, _ = _split_s3(uri)
    if credential_source() is None:
        raise StorageError(f"storage {uri!r}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                           f"or AWS_PROFILE)")
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"storage {uri!r}: bucket {bucket!r} does not exist")
    except OSError as exc:
        reason = _reason(exc, uri)
        if reason != "access denied":  # a HEAD answers only "403": the probe below tells which
            raise StorageError(f"storage {uri!r}: {reason}") from None
    _probe(fs, path, uri)


def _check_writable_uri(uri: str) -> None:
    fs, path = resolve(uri)
    with _errors(uri):
        fs.create_dir(path, recursive=True)
    _probe(fs, path, uri)


def _probe(fs, path: str, location: str) -> None:
    probe = f"{path.rstrip('/')}/{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"softprune storage probe\n")
        fs.delete_file(probe)
    except OSError as exc:
        raise StorageError(f"storage {location!r} is not writable: {_reason(exc, location)}") from None


# -- reading and writing ------------------------------------------------------------------------
def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    with _errors(location):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str) -> str:
    """A file's text; FileNotFoundError if it is not there."""
    fs, path = resolve(location)
    with _errors(location), fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(location: str, text: str) -> None:
    fs, path = resolve(location)
    with _errors(location):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(text.encode())


def list_dirs(location: str) -> list[str]:
    """Names of the directories directly under `location` (none if it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    with _errors(location):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def _files(fs, path: str, location: str) -> list[str]:
    import pyarrow.fs as pafs

    with _errors(location):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


def download_dir(location: str, local: str | Path) -> Path:
    """Copy every file under `location` into `local` (created), keeping the layout."""
    fs, path = resolve(location)
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    for remote in _files(fs, path, location):
        dest = local / remote[len(path):].lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _errors(location), fs.open_input_stream(remote) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
    return local


def upload_dir(local: str | Path, location: str, last: Iterable[str] = (),
               skip: Callable[[Path], bool] | None = None) -> list[str]:
    """Copy every regular file under `local` to `location` (symlinks are not followed: wandb's
    `latest-run` would upload a run twice). Files named in `last` (relative paths) go after all
    others, so their presence says the rest is there. Returns the relative paths uploaded."""
    local = Path(local)
    rels = []
    for root, _, names in os.walk(local):  # followlinks=False: linked directories are left out
        for name in names:
            file = Path(root, name)
            if not file.is_symlink() and file.is_file() and not (skip and skip(file)):
                rels.append(file.relative_to(local).as_posix())
    last = [r for r in last if r in rels]
    ordered = sorted(r for r in rels if r not in last) + last
    fs, path = resolve(location)
    done = []
    with _errors(location):
        fs.create_dir(path, recursive=True)
        for rel in ordered:
            target = f"{path}/{rel}"
            if "/" in rel:
                fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            try:
                src = open(local / rel, "rb")
            except FileNotFoundError:  # removed since the listing (a writer's temp file)
                continue
            with src, fs.open_output_stream(target) as out:
                shutil.copyfileobj(src, out, _CHUNK)
            done.append(rel)
    return done


def publish_dir(staging: Path, target: str, last: str = "report.json") -> None:
    """Make `target` hold exactly `staging`'s files, so that a reader sees the old outputs or the
    new ones: a local directory is swapped in by rename; in object storage `last` is removed
    first and uploaded after every other file, and files the new outputs lack are deleted."""
    if not is_uri(target):
        dest = Path(target).expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        new, old = (dest.with_name(f".{dest.name}-{kind}-{os.getpid()}") for kind in ("new", "old"))
        shutil.rmtree(new, ignore_errors=True)
        shutil.copytree(staging, new)
        if dest.exists():
            os.replace(dest, old)
        os.replace(new, dest)  # one rename: the directory appears whole
        shutil.rmtree(old, ignore_errors=True)
        return
    fs, path = resolve(target)
    before = {p[len(path):].lstrip("/") for p in _files(fs, path, target)} if exists(target) else set()
    with _errors(target):
        if last in before:
            fs.delete_file(f"{path}/{last}")
    uploaded = upload_dir(staging, target, last=[last])
    with _errors(target):
        for stale in sorted(before - set(uploaded)):
            fs.delete_file(f"{path}/{stale}")


def scratch_dir(prefix: str) -> Path:
    """A fresh local temp directory (TMPDIR, which env.set_defaults points into .cache)."""
    root = Path(os.environ.get("TMPDIR") or env.CACHE / "tmp")
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))
