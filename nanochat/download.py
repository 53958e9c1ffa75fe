"""
The one fetcher for every remote file nanochat uses (data shards, eval bundles, task parquets,
reference tokenizers). It is built to survive flaky networks and concurrent ranks:

- NANOCHAT_MIRROR redirects https://HOST/PATH to $NANOCHAT_MIRROR/HOST/PATH, where the mirror
  is a local directory or an http(s) base URL (for offline machines and tests).
- The body streams into a hidden `.NAME.partial` file beside the destination. Connection errors,
  timeouts, 5xx, 429 (honouring Retry-After) and truncated bodies are retried with exponential
  backoff and jitter, resuming with an HTTP Range request when the server allows it and starting
  over cleanly when it does not.
- The length is checked, an optional validator runs (e.g. the parquet footer must read), and only
  then is the file renamed into place, atomically. Nobody ever sees a half-written file.
- A lock file serialises processes asking for the same file: 8 ranks, one transfer.
"""

import email.utils
import fcntl
import logging
import os
import random
import shutil
import time
from contextlib import contextmanager
from urllib.parse import urlparse

import requests
from tqdm import tqdm

logger = logging.getLogger(__name__)

MIRROR_ENV = "NANOCHAT_MIRROR"
MIRROR_HINT = f"check your network, or set {MIRROR_ENV} to a local mirror directory or http(s) base URL"
CHUNK_BYTES = 1 << 16  # also the most a dropped connection can cost us


class DownloadError(RuntimeError):
    """A download that cannot succeed; the message is one line that says what to do."""


class _Retry(Exception):
    """A transient failure: try again after `wait` seconds (None = the usual backoff)."""

    def __init__(self, message, wait=None):
        super().__init__(message)
        self.wait = wait


# ---------------------------------------------------------------------------------------------
# Public API


def resolve_url(url):
    """Where `url` is really fetched from: the URL itself, or its place in NANOCHAT_MIRROR."""
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror:
        return url
    scheme, sep, host_and_path = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise DownloadError(f"cannot mirror {url!r}: only http(s) URLs can be mirrored")
    if mirror.startswith(("http://", "https://")):
        return mirror.rstrip("/") + "/" + host_and_path
    root = mirror.removeprefix("file://")
    return os.path.join(os.path.expanduser(root), *host_and_path.split("/"))


def is_valid_parquet(path):
    """A parquet file is whole if it starts and ends with the magic bytes and its footer parses."""
    import pyarrow.parquet as pq

    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(-4, os.SEEK_END)
            if head != b"PAR1" or f.read(4) != b"PAR1":
                return False
        pq.ParquetFile(path).metadata
        return True
    except Exception:
        return False


def download(url, dest, validate=None, retries=8, backoff=1.0, max_backoff=60.0, timeout=30.0, progress=True):
    """
    Fetch `url` to the file `dest`, unless a valid copy is already there.
    Returns True if bytes were transferred, False if `dest` was already complete.
    `validate(path) -> bool` checks the finished file; `progress` is True (a bar of its own),
    False, or a shared tqdm bar to update with the bytes received.
    Raises DownloadError, with `dest` untouched, when the file cannot be had.
    """
    if _is_complete(dest, validate):
        return False
    folder, name = os.path.split(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    with _exclusive_lock(os.path.join(folder, f".{name}.lock")):
        # Another process may have finished (or broken) the file while we waited for the lock.
        if _is_complete(dest, validate):
            return False
        if os.path.exists(dest):
            logger.warning("%s is corrupt, fetching it again", dest)
            os.remove(dest)
        partial = os.path.join(folder, f".{name}.partial")
        source = resolve_url(url)
        try:
            if source.startswith(("http://", "https://")):
                _fetch_http(source, partial, validate, retries, backoff, max_backoff, timeout, progress)
            else:
                _copy_local(url, source, partial, validate)
        except DownloadError:
            _remove(partial)
            raise
        os.replace(partial, dest)
    return True


# ---------------------------------------------------------------------------------------------
# Internals


def _is_complete(path, validate):
    return os.path.exists(path) and (validate is None or validate(path))


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


@contextmanager
def _exclusive_lock(lock_path):
    """
    An flock on `lock_path`, held across processes; the lock file is removed on release.
    Removing it is safe because a waiter that wakes up holding a lock on an inode that is no
    longer at `lock_path` (it was unlinked meanwhile) lets go and tries again.
    """
    while True:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        _remove(lock_path)
        os.close(fd)


def _copy_local(url, source, partial, validate):
    if not os.path.isfile(source):
        raise DownloadError(f"{url} is not in the mirror (looked for {source}); fix or unset {MIRROR_ENV}")
    shutil.copyfile(source, partial)
    if validate and not validate(partial):
        raise DownloadError(f"mirror copy of {url} at {source} is corrupt; replace it or unset {MIRROR_ENV}")


def _fetch_http(url, partial, validate, retries, backoff, max_backoff, timeout, progress):
    """Try until the file is whole; give up after `retries` attempts in a row that made no progress."""
    failures = 0
    with requests.Session() as session:
        while True:
            before = os.path.getsize(partial) if os.path.exists(partial) else 0
            try:
                _fetch_once(session, url, partial, timeout, progress)
                if validate and not validate(partial):
                    _remove(partial)
                    raise _Retry("downloaded file failed validation")
                return
            except _Retry as e:
                error, wait = str(e), e.wait
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                error, wait = _describe(e, url), None
                if error.startswith("cannot resolve host"):  # no network: retrying will not help
                    raise DownloadError(f"{url}: {error}; {MIRROR_HINT}") from None
            after = os.path.getsize(partial) if os.path.exists(partial) else 0
            failures = 0 if after > before else failures + 1  # progress earns a fresh set of retries
            if failures > retries:
                raise DownloadError(f"giving up on {url} after {retries} retries: {error}; {MIRROR_HINT}")
            if wait is None:
                wait = min(max_backoff, backoff * 2 ** max(failures - 1, 0)) * random.uniform(0.5, 1.5)
            logger.warning("%s: %s; retrying in %.1fs (%d/%d)", url, error, wait, failures, retries)
            time.sleep(wait)


def _fetch_once(session, url, partial, timeout, progress):
    """One HTTP request: resume from the partial file if there is one, stream the body to it."""
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    # identity encoding: we count raw bytes against Content-Length and resume by byte offset.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # our partial file does not fit the remote one (it changed?)
            _remove(partial)
            raise _Retry("server refused to resume (416); starting over", wait=0)
        _raise_for_status(url, r)
        if r.status_code == 206:
            start, total = _parse_content_range(r.headers.get("Content-Range", ""))
            if start != have:
                _remove(partial)
                raise _Retry(f"server resumed at byte {start}, not {have}; starting over", wait=0)
            mode = "ab"
        else:  # 200: a fresh start, or a server that ignores Range
            have, mode = 0, "wb"
            total = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
        bar = _progress_bar(progress, url, have, total)
        try:
            with open(partial, mode) as f:
                for chunk in r.iter_content(CHUNK_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
        finally:
            if bar is not progress:
                bar.close()
    size = os.path.getsize(partial)
    if total is not None and size != total:
        if size > total:
            _remove(partial)
        raise _Retry(f"body ended at byte {size} of {total}")


def _describe(error, url):
    """A short reason for a requests exception (urllib3's own messages run to many lines)."""
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "connection broken mid-body"
    if isinstance(error, requests.Timeout):
        return "timed out"
    if any(s in repr(error) for s in ("NameResolutionError", "Name or service not known", "nodename nor servname")):
        return f"cannot resolve host {urlparse(url).hostname}"
    return "connection failed" + (" (refused)" if "refused" in repr(error) else "")


def _raise_for_status(url, r):
    code = r.status_code
    if code in (408, 429) or code >= 500:
        raise _Retry(f"HTTP {code}", wait=_retry_after_seconds(r.headers.get("Retry-After")))
    if code >= 400:
        raise DownloadError(f"HTTP {code} for {url}; {MIRROR_HINT}" if code == 404 else f"HTTP {code} for {url}")


def _retry_after_seconds(value, cap=300.0):
    """Retry-After is either seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    try:
        return min(cap, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        return min(cap, max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time()))
    except (TypeError, ValueError):
        return None


def _parse_content_range(value):
    """'bytes START-END/TOTAL' -> (START, TOTAL or None)."""
    try:
        unit, _, spec = value.partition(" ")
        span, _, total = spec.partition("/")
        start = int(span.split("-")[0])
        return start, (None if total in ("", "*") else int(total))
    except ValueError:
        raise _Retry(f"unreadable Content-Range {value!r}")


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(progress, url, initial, total):
    if progress is True:
        name = url.rsplit("/", 1)[-1]
        return tqdm(total=total, initial=initial, desc=name, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
    return _NoBar() if progress is False or progress is None else progress
