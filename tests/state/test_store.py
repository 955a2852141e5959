"""Snapshots outlive the process: the SQLite store, its failures, and restarts."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from sidecar.app import open_store
from sidecar.config import Settings
from sidecar.demo.fake import Outcome
from sidecar.state.store import Record, SqliteStore, StoreInUse, StoreTooNew

from ..conftest import eventually
from ..support import run


def record(resource_id: str, status: str = "failed", **more: object) -> Record:
    return Record(
        resource_id,
        {"status": status, "last_error": "boom", "updated_at": time.time(), **more},
        [{"at": "t", "status": status, "stream": "live", "last_error": "boom"}],
    )


def test_records_survive_a_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path, 0.01, 3600)
    store.open()
    store.save(record("a"))
    store.save(record("b", status="completed"))
    store.forget("b")
    store.close()
    again = SqliteStore(path, 0.01, 3600)
    again.open()
    (loaded,) = again.load()
    assert (loaded.resource_id, loaded.snapshot["status"]) == ("a", "failed")
    assert loaded.transitions[0]["last_error"] == "boom"
    assert again.degraded is None
    again.close()


def test_a_second_process_cannot_open_the_same_file(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "state.db", 0.01, 3600)
    first.open()
    with pytest.raises(StoreInUse, match="in use by another sidecar"):
        SqliteStore(tmp_path / "state.db", 0.01, 3600).open()
    first.close()
    # And the command says so in one line.
    with _held(tmp_path):
        store = f"sqlite:{tmp_path / 'state.db'}"
        result = run("--upstream", "http://127.0.0.1:1", "--store", store)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another sidecar" in lines[0], result.stderr


class _held:
    def __init__(self, tmp_path: Path) -> None:
        self.store = SqliteStore(tmp_path / "state.db", 0.01, 3600)

    def __enter__(self) -> SqliteStore:
        self.store.open()
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def test_a_corrupt_file_is_moved_aside_and_the_store_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    store = SqliteStore(path, 0.01, 3600)
    store.open()
    assert store.load() == []
    assert list(tmp_path.glob("state.db.corrupt-*"))
    store.save(record("a"))
    store.close()
    assert SqliteStore(path, 0.01, 3600).load() == []  # (not opened: nothing read)


def test_a_file_from_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema', '99')")
    db.commit()
    db.close()
    with pytest.raises(StoreTooNew, match="newer sidecar"):
        SqliteStore(path, 0.01, 3600).open()


def test_an_unusable_place_degrades_to_memory(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("x")  # even root cannot make a directory under a file
    store = open_store(
        Settings(upstream="http://x", store=f"sqlite:{not_a_dir / 'state.db'}", store_flush=0.01)
    )
    assert store.degraded is not None and "cannot create" in store.degraded
    assert store.load() == []
    store.save(record("a"))  # accepted, kept nowhere: the proxy goes on
    store.close()


async def test_a_degraded_store_is_reported_but_the_sidecar_stays_ready(
    gptme, http, tmp_path
) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("x")
    g = await gptme(
        sidecar_options={"store": f"sqlite:{not_a_dir / 'state.db'}", "admin_token": "t"}
    )
    await g.create("c1")
    async with http.get(g.sidecar.url + "/_sidecar/readyz") as resp:
        body = await resp.json()
    assert resp.status == 200 and "cannot create" in body["store"]["degraded"]
    headers = {"Authorization": "Bearer t"}
    async with http.get(g.sidecar.url + "/_sidecar/metrics", headers=headers) as resp:
        assert "sidecar_store_degraded 1.0" in await resp.text()
    assert (await g.session("c1"))["status"] == "unknown"  # the proxy goes on


def test_finished_snapshots_older_than_the_retention_are_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path, 0.01, 3600)
    store.open()
    old = record("old")
    old.snapshot["updated_at"] = time.time() - 7200
    busy = record("busy", status="generating")
    busy.snapshot["updated_at"] = time.time() - 7200
    store.save(old)
    store.save(busy)
    store.save(record("new"))
    store.close()
    again = SqliteStore(path, 0.01, 3600)
    again.open()
    assert sorted(r.resource_id for r in again.load()) == ["busy", "new"]
    again.close()


# ----------------------------------------------------- restarts, in process


async def restart(g, start_sidecar, path: Path, **options: object):
    await g.sidecar.server.stop(grace=1)
    return await start_sidecar(g.upstream, store=f"sqlite:{path}", **options)


async def test_a_failure_reads_the_same_after_a_restart(gptme, start_sidecar, tmp_path) -> None:
    path = tmp_path / "state.db"
    g = await gptme(
        "0.31.0", sidecar_options={"store": f"sqlite:{path}"}, outcome=Outcome(kind="error")
    )
    sid = await g.create("c1")
    await g.step("c1", sid)
    before = await g.wait_status("c1", "failed")
    g.sidecar = await restart(g, start_sidecar, path)
    after = await g.session("c1")
    assert (after["status"], after["last_error"]) == ("failed", before["last_error"])
    assert after["stream"] in ("connecting", "live")
    detail = g.sidecar.registry.get("c1")
    assert [t["status"] for t in detail.transitions][-1] == "failed"


async def test_only_changes_are_written(gptme, tmp_path) -> None:
    path = tmp_path / "state.db"
    g = await gptme(
        "0.31.0",
        sidecar_options={"store": f"sqlite:{path}", "store_flush": 0.01},
        outcome=Outcome(tokens=500, pace=0.002),
    )
    sid = await g.create("c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "completed", timeout=10)
    await asyncio.sleep(0.1)
    store = g.sidecar.registry.store
    assert isinstance(store, SqliteStore)
    assert store.writes < 20  # 500 tokens, a handful of state changes


async def test_work_in_flight_resumes_after_a_restart_when_its_events_go_on(
    gptme, start_sidecar, tmp_path
) -> None:
    path = tmp_path / "state.db"
    g = await gptme(
        "0.31.0", sidecar_options={"store": f"sqlite:{path}"}, outcome=Outcome(tokens=60, pace=0.05)
    )
    sid = await g.create("c1")
    await g.get("c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "generating")
    await asyncio.sleep(0.2)  # the change is written (store_flush: 0.1 s)
    g.sidecar = await restart(g, start_sidecar, path, confirm_timeout=1.0)
    # Watched again at start, before anyone reads it.
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "live")
    assert g.sidecar.snapshot("c1").status == "generating"
    state = await g.wait_status("c1", "completed", timeout=10)
    assert state["last_error"] is None


async def test_work_in_flight_with_no_sign_after_a_restart_ends_failed(
    gptme, start_sidecar, tmp_path
) -> None:
    path = tmp_path / "state.db"
    g = await gptme(
        "0.31.0",
        sidecar_options={"store": f"sqlite:{path}"},
        outcome=Outcome(tokens=600, pace=0.05),
    )
    sid = await g.create("c1")
    await g.get("c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "generating")
    await asyncio.sleep(0.2)
    await g.sidecar.server.stop(grace=1)
    g.fake.restart()  # the upstream lost the step meanwhile
    g.sidecar = await start_sidecar(g.upstream, store=f"sqlite:{path}", confirm_timeout=0.5)
    state = await g.wait_status("c1", "failed", timeout=10)
    assert "sidecar restarted mid-step" in state["last_error"]
    assert state["generating"] is False
