"""The fetcher against a real local HTTP server with injected faults."""

import os
import time

import pytest

from fault_server import FaultServer
from conftest import make_parquet
from nanochat.download import DownloadError, _retry_after_seconds, download, is_valid_parquet, resolve_url

SHARD = make_parquet(num_docs=600)  # ~0.5 MB: big enough that a half body is many chunks
PATH = "/data/shard_00000.parquet"
FAST = dict(backoff=0.01, progress=False)  # tiny backoff so fault tests are quick


def fetch(srv, dest, **kwargs):
    return download(srv.url + PATH, str(dest), validate=is_valid_parquet, **{**FAST, **kwargs})


def assert_only(folder, names):
    """The folder holds exactly these files: no partial, lock or temp file left behind."""
    assert sorted(os.listdir(folder)) == sorted(names)


def test_plain_download_then_skip(tmp_path):
    dest = tmp_path / "out" / "shard.parquet"
    with FaultServer({PATH: SHARD}) as srv:
        assert fetch(srv, dest) is True
        assert dest.read_bytes() == SHARD
        assert fetch(srv, dest) is False  # already complete: no second transfer
        assert len(srv.requests_for(PATH)) == 1
    assert_only(dest.parent, ["shard.parquet"])


@pytest.mark.parametrize("fault", ["drop", "short"])
def test_interrupted_body_resumes_with_range(tmp_path, fault):
    dest = tmp_path / "shard.parquet"
    with FaultServer({PATH: SHARD}) as srv:
        srv.faults[PATH] = [fault, fault]
        fetch(srv, dest)
        log = srv.requests_for(PATH)
    assert dest.read_bytes() == SHARD
    assert len(log) == 3
    assert log[0]["range"] is None
    # each retry continues where the bytes on disk end, not from zero
    assert log[1]["range"] is not None and log[1]["range"] != "bytes=0-"
    assert int(log[2]["range"].split("=")[1].rstrip("-")) > int(log[1]["range"].split("=")[1].rstrip("-"))
    assert_only(tmp_path, ["shard.parquet"])


def test_server_ignoring_range_restarts_cleanly(tmp_path):
    dest = tmp_path / "shard.parquet"
    with FaultServer({PATH: SHARD}) as srv:
        srv.ignore_range = True
        srv.faults[PATH] = ["drop"]
        fetch(srv, dest)
        assert srv.requests_for(PATH)[1]["range"] is not None  # we asked to resume, got the whole body
    assert dest.read_bytes() == SHARD  # not the first half twice
    assert_only(tmp_path, ["shard.parquet"])


def test_503_a_few_times_then_200(tmp_path):
    dest = tmp_path / "shard.parquet"
    with FaultServer({PATH: SHARD}) as srv:
        srv.faults[PATH] = ["503", "503", "503"]
        fetch(srv, dest)
        assert len(srv.requests_for(PATH)) == 4
    assert dest.read_bytes() == SHARD
    assert_only(tmp_path, ["shard.parquet"])


def test_429_honours_retry_after(tmp_path):
    dest = tmp_path / "shard.parquet"
    with FaultServer({PATH: SHARD}) as srv:
        srv.faults[PATH] = [("429", 1)]
        fetch(srv, dest)
        first, second = srv.requests_for(PATH)
    assert second["time"] - first["time"] >= 1.0  # the backoff alone would be ~0.01 s
    assert dest.read_bytes() == SHARD


def test_retry_after_http_date():
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 20))
    assert 15 <= _retry_after_seconds(future) <= 21
    assert _retry_after_seconds("7") == 7.0
    assert _retry_after_seconds("soon") is None


def test_404_fails_at_once_with_a_clear_message(tmp_path):
    dest = tmp_path / "shard.parquet"
    with FaultServer({}) as srv:
        with pytest.raises(DownloadError) as e:
            fetch(srv, dest)
        assert len(srv.log) == 1  # a missing file is not retried
    msg = str(e.value)
    assert "404" in msg and PATH in msg and "NANOCHAT_MIRROR" in msg and "\n" not in msg
    assert_only(tmp_path, [])


def test_no_network_fails_fast_with_one_line(tmp_path):
    with pytest.raises(DownloadError) as e:
        download("https://no-such-host.invalid/file.bin", str(tmp_path / "f"), **FAST)
    assert str(e.value) == (
        "https://no-such-host.invalid/file.bin: cannot resolve host no-such-host.invalid; check your network, "
        "or set NANOCHAT_MIRROR to a local mirror directory or http(s) base URL"
    )
    assert_only(tmp_path, [])


def test_connection_refused_is_retried_then_reported(tmp_path):
    with FaultServer({}) as srv:
        url = srv.url  # the port is free once the server is gone
    with pytest.raises(DownloadError, match=r"after 2 retries: connection failed \(refused\)"):
        download(url + "/f", str(tmp_path / "f"), retries=2, **FAST)
    assert_only(tmp_path, [])


def test_gives_up_after_retries_and_leaves_nothing(tmp_path):
    dest = tmp_path / "shard.parquet"
    with FaultServer({PATH: SHARD}) as srv:
        srv.faults[PATH] = ["short"] + ["503"] * 10
        with pytest.raises(DownloadError) as e:
            fetch(srv, dest, retries=3)
        assert len(srv.requests_for(PATH)) == 5  # the short body made progress, then 4 failures
    assert "HTTP 503" in str(e.value) and "giving up" in str(e.value)
    assert_only(tmp_path, [])


def test_body_failing_validation_is_refetched(tmp_path):
    dest = tmp_path / "shard.parquet"
    corrupt = SHARD[:-100] + bytes(100)  # right length, broken footer
    with FaultServer({PATH: corrupt}) as srv:
        with pytest.raises(DownloadError, match="validation"):
            fetch(srv, dest, retries=2)
        assert len(srv.requests_for(PATH)) == 3
    assert_only(tmp_path, [])


def test_corrupt_file_on_disk_is_replaced(tmp_path):
    dest = tmp_path / "shard.parquet"
    dest.write_bytes(SHARD[: len(SHARD) // 2])
    with FaultServer({PATH: SHARD}) as srv:
        assert fetch(srv, dest) is True
    assert dest.read_bytes() == SHARD
    assert_only(tmp_path, ["shard.parquet"])


def test_stale_partial_files_are_recovered(tmp_path):
    dest = tmp_path / "shard.parquet"
    partial = tmp_path / ".shard.parquet.partial"
    with FaultServer({PATH: SHARD}) as srv:
        partial.write_bytes(bytes(len(SHARD) + 10))  # longer than the remote file: 416, start over
        fetch(srv, dest)
        assert dest.read_bytes() == SHARD
        dest.unlink()
        partial.write_bytes(b"garbage!" * 1000)  # wrong bytes: resumed, fails validation, refetched
        fetch(srv, dest)
        ranges = [entry["range"] for entry in srv.requests_for(PATH)]
    assert ranges == [f"bytes={len(SHARD) + 10}-", None, "bytes=8000-", None]
    assert dest.read_bytes() == SHARD
    assert_only(tmp_path, ["shard.parquet"])


def test_mirror_as_http_base_url(tmp_path, monkeypatch):
    url = "https://example.org/some/dir/file.parquet"
    with FaultServer({"/example.org/some/dir/file.parquet": SHARD}) as srv:
        monkeypatch.setenv("NANOCHAT_MIRROR", srv.url + "/")
        assert resolve_url(url) == srv.url + "/example.org/some/dir/file.parquet"
        download(url, str(tmp_path / "f.parquet"), validate=is_valid_parquet, **FAST)
    assert (tmp_path / "f.parquet").read_bytes() == SHARD


def test_mirror_as_directory(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "example.org" / "dir").mkdir(parents=True)
    (mirror / "example.org" / "dir" / "file.parquet").write_bytes(SHARD)
    monkeypatch.setenv("NANOCHAT_MIRROR", str(mirror))
    out = tmp_path / "out"
    download("https://example.org/dir/file.parquet", str(out / "f.parquet"), validate=is_valid_parquet, **FAST)
    assert (out / "f.parquet").read_bytes() == SHARD
    with pytest.raises(DownloadError, match="not in the mirror"):
        download("https://example.org/dir/missing.parquet", str(out / "m.parquet"), **FAST)
    assert_only(out, ["f.parquet"])


def test_non_http_url_cannot_be_mirrored(monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", "/somewhere")
    with pytest.raises(DownloadError, match="only http"):
        resolve_url("ftp://example.org/file")
