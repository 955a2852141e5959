"""Receivers come from the operator's configuration: tables, flags, variables, checked at start."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from sidecar.config import ConfigError, load_settings

from ..support import run

UP = "http://127.0.0.1:1"


def secret(tmp_path: Path, name: str = "secret") -> Path:
    path = tmp_path / name
    path.write_text("whsec_" + base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


def test_webhooks_tables_flags_and_variables_make_one_list_of_receivers(tmp_path: Path) -> None:
    key = secret(tmp_path)
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f'upstream = "{UP}"\n\n'
        f'[[webhooks]]\nurl = "https://ops.example/hooks?token=abc"\nsecret_file = "{key}"\n'
        'statuses = ["failed", "awaiting_tool", "completed"]\n\n'
        f'[[webhooks]]\nname = "pager"\nurl = "http://pager.internal:9000/in"\n'
        f'secret_file = "{key}"\nstatuses = ["failed"]\n'
    )
    env = {
        "SIDECAR_WEBHOOK_URL": "http://127.0.0.1:7000/hook",
        "SIDECAR_WEBHOOK_SECRET_FILE": str(key),
        "SIDECAR_WEBHOOK_STATUSES": "failed,completed",
    }
    settings = load_settings(config_file=str(config), env=env)
    ops, pager, flagged = settings.receivers
    assert (ops.name, ops.statuses) == (
        "ops.example-hooks",
        frozenset({"failed", "awaiting_tool", "completed"}),
    )
    assert ops.shown_url == "https://ops.example/hooks"  # never the token
    assert (pager.name, pager.statuses) == ("pager", frozenset({"failed"}))
    assert (flagged.name, flagged.url) == ("127.0.0.1-7000-hook", env["SIDECAR_WEBHOOK_URL"])
    assert flagged.statuses == frozenset({"failed", "completed"})
    unnamed = {k: v for k, v in env.items() if k != "SIDECAR_WEBHOOK_STATUSES"}
    defaulted = load_settings(env={"SIDECAR_UPSTREAM": UP, **unnamed})
    assert defaulted.receivers[0].statuses == frozenset(
        {"completed", "failed", "interrupted", "awaiting_tool", "awaiting_input"}
    )


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ('url = "http://h/x"', "secret_file: missing"),
        ('url = "ftp://h/x"\nsecret_file = "f"', "url: must be an http:// or https:// URL"),
        ('url = "http://h/x"\nsecret_file = "f"\nstatuses = ["done"]', "unknown status 'done'"),
        ('url = "http://h/x"\nsecret_file = "f"\nstatuses = []', "non-empty list"),
        ('url = "http://h/x"\nsecret_file = "f"\nheaders = {}', "headers: unknown key"),
        ('url = "http://h/x"\nsecret_file = "f"\nname = "a b"', "name: 'a b'"),
    ],
)
def test_a_bad_table_stops_start_up_with_one_line(tmp_path: Path, table: str, says: str) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text(f'upstream = "{UP}"\n[[webhooks]]\n{table}\n')
    with pytest.raises(ConfigError, match=says):
        load_settings(config_file=str(config), env={})


def test_two_receivers_of_one_name_and_half_a_flag_receiver_are_refused(tmp_path: Path) -> None:
    key = secret(tmp_path)
    config = tmp_path / "sidecar.toml"
    table = f'[[webhooks]]\nurl = "http://h:1/x"\nsecret_file = "{key}"\n'
    config.write_text(f'upstream = "{UP}"\n{table}{table}')
    with pytest.raises(ConfigError, match="two receivers are named 'h-1-x'"):
        load_settings(config_file=str(config), env={})
    with pytest.raises(ConfigError, match="webhook_secret_file: missing"):
        load_settings(env={"SIDECAR_UPSTREAM": UP, "SIDECAR_WEBHOOK_URL": "http://h/x"})
    with pytest.raises(ConfigError, match="webhook_url: missing"):
        load_settings(env={"SIDECAR_UPSTREAM": UP, "SIDECAR_WEBHOOK_STATUSES": "failed"})
    with pytest.raises(ConfigError, match="webhook_retry_min"):
        load_settings(
            env={
                "SIDECAR_UPSTREAM": UP,
                "SIDECAR_WEBHOOK_RETRY_MIN": "10",
                "SIDECAR_WEBHOOK_RETRY_MAX": "1",
            }
        )


def test_an_unusable_secret_file_stops_the_sidecar_before_it_serves(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("whsec_c2hvcnQ=\n")  # 5 bytes: too short to be a key
    result = run(
        "--upstream", UP, "--port", "0", "--webhook-url", "http://127.0.0.1:9/x",
        "--webhook-secret-file", str(bad),
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "5 bytes" in lines[0] and "c2hvcnQ" not in lines[0], result.stderr
    missing = run(
        "--upstream", UP, "--port", "0", "--webhook-url", "http://127.0.0.1:9/x",
        "--webhook-secret-file", str(tmp_path / "nope"),
    )  # fmt: skip
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_config_prints_the_tables_and_loads_them_back_unchanged(tmp_path: Path) -> None:
    key = secret(tmp_path)
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f'upstream = "{UP}"\n[[webhooks]]\nname = "ops"\nurl = "http://h:1/x"\n'
        f'secret_file = "{key}"\nstatuses = ["completed", "failed"]\n'
    )
    first = run("config", "--config", str(config), "--webhook-url", "http://h:2/y",
                "--webhook-secret-file", str(key))  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "[[webhooks]]" in first.stdout and 'statuses = ["completed", "failed"]' in first.stdout
    assert "whsec_" not in first.stdout  # the file's name, never its content
    saved = tmp_path / "effective.toml"
    saved.write_text(first.stdout)
    again = run("config", "--config", str(saved))
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert [r.name for r in load_settings(config_file=str(saved), env={}).receivers] == [
        "ops",
        "h-2-y",
    ]
