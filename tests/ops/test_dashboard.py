"""The Grafana dashboard queries only series a real sidecar exports, with their labels."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from sidecar.demo.fake import Outcome

from ..conftest import eventually
from ..state.test_fleet import redis_server
from ..webhooks.conftest import hook, secret_file

__all__ = ["hook", "redis_server", "secret_file"]  # fixtures

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana-dashboard.json"
#: Labels Prometheus itself adds to every scraped series.
TARGET_LABELS = {"job", "instance"}


def queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def test_the_dashboard_is_well_formed() -> None:
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'job=~"$job"' in target["expr"], target["expr"]
    assert len(queries()) >= 20


async def test_every_series_the_dashboard_queries_is_exported(
    gptme, hook, secret_file: Path, redis_server: Any
) -> None:
    h = await hook()
    receiver = h.receiver(secret_file, "ops", statuses=["failed"])
    options = {
        "store": redis_server.url,
        "cache": "events",
        "webhooks": (receiver,),
        "admin_token": "t0k",
    }
    g = await gptme(outcome=Outcome(kind="error"), sidecar_options=options)
    sid = await g.create("c1")
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "live", timeout=10)
    for _ in range(3):
        await g.get("c1")  # misses and hits of the cache
    async with g.http.get(g.url("/api/v2/conversations")) as resp:
        assert resp.status == 200
    await g.step("c1", sid)
    await g.wait_status("c1", "failed")
    await eventually(lambda: h.got, timeout=10)
    async with g.http.get(
        g.url("/_sidecar/metrics"), headers={"Authorization": "Bearer t0k"}
    ) as resp:
        text = await resp.text()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    for expr in queries():
        names = set(re.findall(r"\b(sidecar_[a-z_]+)\{", expr))
        assert names, expr
        for name in names:
            assert name in labels, f"the dashboard queries {name}, which is not exported"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                if label in TARGET_LABELS:
                    continue
                assert any(label in labels[n] for n in names), f"{label} is on none of {names}"
