"""Nothing read back from a store is trusted: SQLite rows, checked records, state files.

The record checks themselves (sidecar/records.py), then real SQLite files read
by a real `sidecar` process: a bad row costs that row only (one warning line,
a metric), the file and its directory are private, a symbolic link and another
upstream's file are refused in one line. Both HTTP clients refuse CR, LF and
NUL in a header value.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from sidecar.demo.fake import FakeGptme
from sidecar.http import client as http1
from sidecar.state import records
from sidecar.state.records import Rejected
from sidecar.state.store import Record, SqliteStore, StoreRefused

from ..conftest import Start
from ..support import free_port, run

LIMIT = 1024


def good(**more: Any) -> dict[str, Any]:
    return {"status": "failed", "last_error": "boom", "updated_at": time.time(), **more}


@pytest.mark.parametrize(
    ("kept", "reason"),
    [
        ("x", "shape"),
        (good(status="pwned"), "status"),
        (good(last_error={"an": "object"}), "shape"),
        (good(last_error="x" * (LIMIT + 1)), "size"),
        (good(updated_at="yesterday"), "number"),
        (good(updated_at=1e20), "number"),
        (good(updated_at=float("nan")), "number"),
        (good(version=-1), "number"),
        (good(state_seq=True), "number"),
        (good(pending_tools=[["t1", "x" * (LIMIT + 1)]]), "size"),
        (good(pending_tools=["not a pair"]), "shape"),
        (good(retry={"attempt": 1, "other": 2}), "shape"),
        (good(state_at="now"), "number"),
        (good(forwarded_at=1e20), "number"),
        (good(forwarded_at="soon"), "number"),
        # A state dated after the record's last change would win every merge.
        (good(updated_at=1_700_000_000.0, state_at=1_700_000_001.0), "number"),
    ],
)
def test_a_snapshot_read_back_is_checked(kept: Any, reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        records.snapshot(kept, LIMIT)
    assert caught.value.reason == reason
    assert caught.value.reason in records.REASONS  # the metric's label set is bounded


def test_a_valid_snapshot_reads_back_as_it_was_written() -> None:
    snap = records.snapshot(good(pending_tools=[["t1", {"tool": "shell"}]], version=3), LIMIT)
    assert (snap.status, snap.last_error, snap.version) == ("failed", "boom", 3)
    assert snap.pending_tools == (("t1", {"tool": "shell"}),)


def test_a_record_of_an_older_version_dates_its_state_by_its_last_change() -> None:
    """Records written before ``state_at`` existed: their state is dated by
    ``updated_at`` as read, once, so that learning it again or a stream
    moving ``updated_at`` later does not make it look newer in a merge."""
    snap = records.snapshot(good(updated_at=1_700_000_000.0), LIMIT)
    assert snap.state_at == 1_700_000_000.0
    assert records.snapshot({"status": "unknown"}, LIMIT).state_at is None
    dated = records.snapshot(good(updated_at=1_700_000_002.0, state_at=1_700_000_001.0), LIMIT)
    assert (dated.state_at, dated.updated_at) == (1_700_000_001.0, 1_700_000_002.0)


@pytest.mark.parametrize("event_id", ["1\r\nX-Evil: 1", "1\nDELETE /", "a\x00b", "x" * 2000])
def test_a_last_event_id_must_be_header_safe(event_id: str) -> None:
    data = orjson.dumps({"snapshot": good(), "last_event_id": event_id})
    with pytest.raises(Rejected) as caught:
        records.shared_record(b"3", data, LIMIT)
    assert caught.value.reason in ("header", "size")


@pytest.mark.parametrize(
    ("rev", "data", "reason"),
    [
        (b"abc", b"{}", "number"),
        (b"0", b"{}", "number"),
        (b"3", b"not json", "unreadable"),
        (b"3", b"[1]", "shape"),
        (b"3", b'{"snapshot": {"status": "idle"}, "holder": "a\\nb"}', "shape"),
        (b"3", b'{"snapshot": {"status": "idle", "stream": "sideways"}}', "status"),
        (b"3", b"x" * (records.record_limit(LIMIT) + 1), "size"),
    ],
)
def test_a_shared_record_is_checked(rev: bytes, data: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        records.shared_record(rev, data, LIMIT)
    assert caught.value.reason == reason


def test_rejections_say_one_line_per_reason_not_per_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen = records.Rejections()
    for _ in range(50):
        seen.reject("redis channel", Rejected("shape", "garbage"))
    assert seen.counts["shape"] == 50
    lines = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 1


# ------------------------------------------------------------ SQLite files


def _store_with_rows(path: Path, *rows: bytes) -> None:
    store = SqliteStore(path, 0.01, 3600, upstream="http://127.0.0.1:9")
    store.open()
    store.save(Record("kept", good()))
    store.close()
    db = sqlite3.connect(path)
    for i, blob in enumerate(rows):
        db.execute("INSERT INTO snapshots VALUES (?, ?, ?, ?)", (f"bad{i}", time.time(), 0, blob))
    db.commit()
    db.close()


def test_bad_rows_cost_those_rows_only_and_are_deleted(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    crlf = {"resource_id": "victim", "snapshot": good(), "last_event_id": "1\r\nDELETE /x"}
    _store_with_rows(
        path,
        b'{"resource_id": "x", "snapshot": "x"}',
        orjson.dumps(crlf),
        orjson.dumps({"resource_id": "y", "snapshot": good(updated_at=1e20)}),
        b"\xff not json",
    )
    store = SqliteStore(path, 0.01, 3600, upstream="http://127.0.0.1:9")
    store.open()
    (only,) = store.load()
    assert only.resource_id == "kept"
    assert sum(store.rejections.counts.values()) == 4
    store.close()
    rows = sqlite3.connect(path).execute("SELECT id FROM snapshots").fetchall()
    assert rows == [("kept",)]  # said once: the next start reads them no more


@contextlib.asynccontextmanager
async def sidecar(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[Any]:
    """A real `sidecar` process; killed however the test ends."""
    admin = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "--port", "0", "--admin-port", str(admin), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
             **(env or {})},
    )  # fmt: skip
    proc.admin = admin  # type: ignore[attr-defined]
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{admin}/healthz") as resp:
                        if resp.status == 200:
                            break
                if proc.returncode is not None:
                    break
                await asyncio.sleep(0.03)
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 10)


async def _metrics(admin: int) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{admin}/metrics") as resp:
            return await resp.text()


async def test_a_bad_row_never_stops_a_start(tmp_path: Path, serve: Start) -> None:
    server = await serve(FakeGptme("0.31.0").app)
    upstream = str(server.make_url("")).rstrip("/")
    path = tmp_path / "state.db"
    store = SqliteStore(path, 0.01, 3600, upstream=upstream)
    store.open()
    store.close()
    db = sqlite3.connect(path)
    db.execute(
        "INSERT INTO snapshots VALUES ('x', ?, 0, ?)",
        (time.time(), b'{"resource_id": "x", "snapshot": "x"}'),
    )
    db.commit()
    db.close()
    async with sidecar("--upstream", upstream, "--store", f"sqlite:{path}") as proc:
        assert proc.returncode is None, "the sidecar did not start"
        metrics = await _metrics(proc.admin)
        assert 'sidecar_store_rejected_total{reason="shape"} 1.0' in metrics
    out = (await proc.stdout.read()).decode()
    assert out.count("record from the store rejected") == 1, out
    assert "Traceback" not in out


def test_the_state_file_and_its_directory_are_private(tmp_path: Path) -> None:
    loose = tmp_path / "state"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    old_umask = os.umask(0o022)
    try:
        store = SqliteStore(loose / "state.db", 0.01, 3600)
        store.open()
        store.save(Record("a", good()))
        store.close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700  # an existing looser one, tightened
    for name in ("state.db", "state.db.lock", "state.db-wal", "state.db-shm"):
        found = loose / name
        if found.exists():
            assert stat.S_IMODE(found.stat().st_mode) == 0o600, name
    fresh = tmp_path / "new" / "deeper"
    SqliteStore(fresh / "state.db", 0.01, 3600).open()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


def test_a_symlink_at_the_database_path_is_refused_in_one_line(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"")
    link = tmp_path / "state.db"
    link.symlink_to(target)
    with pytest.raises(StoreRefused, match="symbolic link"):
        SqliteStore(link, 0.01, 3600).open()
    done = run("--upstream", "http://127.0.0.1:9", "--port", "0", "--store", f"sqlite:{link}")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "symbolic link" in lines[0], done.stderr


def test_a_store_made_for_another_upstream_is_refused_unless_adopted(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteStore(path, 0.01, 3600, upstream="http://user:pw@a.example:8080")
    first.open()
    first.save(Record("c1", good(last_error="a's error")))
    first.close()
    assert b"pw" not in path.read_bytes()  # credentials never written
    done = run("--upstream", "http://b.example", "--port", "0", "--store", f"sqlite:{path}")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "made for the upstream http://a.example:8080" in lines[0], lines
    assert "store_adopt" in lines[0]
    adopted = SqliteStore(path, 0.01, 3600, upstream="http://b.example", adopt=True)
    adopted.open()
    assert [r.resource_id for r in adopted.load()] == ["c1"]  # kept, now b's
    adopted.close()
    again = SqliteStore(path, 0.01, 3600, upstream="http://b.example")
    again.open()  # the file is b's now
    again.close()


# ----------------------------------------------------------- HTTP clients


async def test_both_http_clients_refuse_cr_lf_and_nul_in_a_header(serve: Start) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await serve(app)
    port = server.port
    assert port is not None
    for bad in ("1\r\nX-Evil: 1", "1\nX-Evil: 1", "1\x00"):
        with pytest.raises(ValueError):
            await http1.open_stream("127.0.0.1", port, "/events", {"Last-Event-ID": bad}, 2.0, 2.0)
        pool = http1.Pool("127.0.0.1", port, 2.0)
        from multidict import CIMultiDict

        with pytest.raises(ValueError):
            await pool.get("/x", CIMultiDict({"X-Id": bad}), 2.0)
        pool.close()
        async with aiohttp.ClientSession() as http:
            with pytest.raises(ValueError):
                async with http.get(server.make_url("/y"), headers={"X-Id": bad}):
                    pass
    assert seen == []  # nothing reached the upstream
