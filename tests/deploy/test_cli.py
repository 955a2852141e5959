"""The `sidecar` command as other tools use it: a real process on a real port."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp

from sidecar.config import OPTIONS, load_settings
from sidecar.demo.fake import FakeGptme, Outcome

from ..support import SIDECAR, free_port, run


async def test_upstream_host_port_serves_with_the_gptme_profile(serve) -> None:
    fake = FakeGptme("0.31.0", outcome=Outcome(kind="error", start_delay=0.1))
    upstream = str((await serve(fake.app)).make_url("")).rstrip("/")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *SIDECAR,
        "--upstream",
        upstream,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--access-log",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(base + "/api/v2") as resp:
                        assert (await resp.json())["message"] == "gptme v2 API"
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the sidecar never started listening")
            async with http.put(base + "/api/v2/conversations/c1", json={"messages": []}) as resp:
                sid = (await resp.json())["session_id"]
            async with http.post(
                base + "/api/v2/conversations/c1/step", json={"session_id": sid}
            ) as resp:
                assert resp.status == 200
            for _ in range(100):
                async with http.get(base + "/api/v2/conversations/c1") as resp:
                    session = (await resp.json())["session"]
                if session["status"] == "failed":
                    break
                await asyncio.sleep(0.05)
            assert session["last_error"].startswith("Error code: 401")
    finally:
        proc.terminate()
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    (listening,) = [line for line in lines if line["event"] == "listening"]
    assert listening["port"] == port
    steps = [
        line for line in lines if line["event"] == "request" and line["path"].endswith("/step")
    ]
    assert steps, lines
    assert steps[0]["method"] == "POST" and steps[0]["status"] == 200
    assert steps[0]["duration_ms"] >= 0
    # The polls, served by the front door, are logged the same way.
    polls = [
        line
        for line in lines
        if line["event"] == "request"
        and line["path"] == "/api/v2/conversations/c1"
        and line["method"] == "GET"
    ]
    assert polls and all(p["status"] == 200 for p in polls)
    assert polls[0]["bytes"] > 0 and polls[0]["remote"] == "127.0.0.1"


def test_config_merges_file_env_and_flags_and_masks_secrets(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text('upstream = "http://127.0.0.1:1"\nport = 9000\ntrigger_wait = 1\n')
    result = run(
        "config",
        "--json",
        "--config",
        str(config),
        "--port",
        "9100",
        env={
            "SIDECAR_PORT": "9050",
            "SIDECAR_TRIGGER_WAIT": "3.5",
            "SIDECAR_UPSTREAM_AUTHORIZATION": "Bearer x",
        },
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["port"] == 9100  # flag over environment over file
    assert shown["trigger_wait"] == 3.5  # environment over file
    assert shown["upstream"] == "http://127.0.0.1:1"
    assert shown["upstream_authorization"] == "***"


def test_a_bad_setting_stops_with_one_line_naming_it(tmp_path: Path) -> None:
    cases = [
        (["--upstream", "ftp://x"], "upstream"),
        (["--upstream", "http://x", "--port", "99999"], "port"),
        (["--upstream", "http://x", "--profile", str(tmp_path / "missing.toml")], "missing.toml"),
        ([], "upstream: missing"),
    ]
    for args, named in cases:
        result = run(*args)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('upstream = "http://x"\nportt = 1\n')
    result = run("--config", str(bad))
    assert result.returncode == 2 and "portt: unknown key" in result.stderr
    result = run("--upstream", "http://x", env={"SIDECAR_TIMEOUTT": "1"})
    assert result.returncode == 2 and "SIDECAR_TIMEOUTT" in result.stderr


def test_the_demo_shows_the_silent_failure_and_the_fix() -> None:
    result = run("demo")
    assert result.returncode == 0, result.stderr
    assert "still working?" in result.stdout
    assert "status=failed" in result.stdout
    assert "listens on http://127.0.0.1:" in result.stdout


def test_a_profile_rule_naming_an_unknown_field_stops_start_up(tmp_path: Path) -> None:
    good = (Path(__file__).resolve().parents[2] / "config" / "gptme.toml").read_text()
    cases = {
        "clear": (
            good.replace('clear = ["pending_tools"]', 'clear = ["pending_toolz"]'),
            "events.interrupted.clear: unknown field 'pending_toolz'",
        ),
        "status": (
            good.replace('status = "failed"', 'status = "broken"'),
            "events.error.status: unknown status 'broken'",
        ),
        "key": (
            good.replace('type_field = "type"', 'type_feild = "type"'),
            "stream.type_feild: unknown key",
        ),
        "condition": (
            good.replace('unless_status = ["interrupted"]', 'unless_state = ["interrupted"]'),
            "events.generation_progress.unless_state: unknown key",
        ),
        "match": (
            good.replace("match = { auto_confirm = true }", "match = { auto_confirm = {} }"),
            "events.tool_pending[0].match.auto_confirm: expected a value or a list of values",
        ),
    }
    for name, (text, message) in cases.items():
        profile = tmp_path / f"{name}.toml"
        profile.write_text(text)
        result = run("--upstream", "http://127.0.0.1:1", "--profile", str(profile))
        assert result.returncode == 2, name
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr


def test_an_unknown_profile_name_lists_the_built_in_ones(tmp_path: Path) -> None:
    result = run("--upstream", "http://127.0.0.1:1", "--profile", "opencod")
    assert result.returncode == 2
    assert "built-in: gptme, opencode" in result.stderr


def test_help_states_each_default_once_with_its_environment_name() -> None:
    result = run("serve", "--help", env={"COLUMNS": "400"})
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for option in OPTIONS:
        flag = "--" + option.name.replace("_", "-")
        options = text.index("options:")
        found = re.search(re.escape(flag) + "[ ,]", text[options:])
        assert found is not None, flag
        start = options + found.start()
        described = text[start : text.index(option.env, start)]
        assert described.count("default:") + described.count("required") == 1, described
        assert option.env in text
    assert "(default: false; env SIDECAR_ACCESS_LOG)" in text
    assert "(default: 3 heartbeats of the profile; env SIDECAR_STALE_AFTER)" in text


def test_version_and_check_options() -> None:
    assert run("-V").stdout.strip() == run("--version").stdout.strip() != ""
    check = run("check", "--help").stdout
    assert "--upstream" in check and "--id" in check
    assert "--admin-port" not in check and "--max-held" not in check


def test_config_prints_toml_that_loads_back_unchanged(tmp_path: Path) -> None:
    result = run(
        "config", "--upstream", "http://127.0.0.1:1", "--profile", "opencode", "--port", "9100"
    )
    assert result.returncode == 0, result.stderr
    saved = tmp_path / "effective.toml"
    saved.write_text(result.stdout)
    assert "stale_after = 30.0" in result.stdout  # the computed default, shown as such
    again = run("config", "--config", str(saved))
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout
    loaded = load_settings(config_file=str(saved), env={})
    assert (loaded.port, loaded.profile, loaded.stale_after) == (9100, "opencode", 30.0)


def test_config_example_prints_the_example_file() -> None:
    result = run("config", "--example")
    assert result.returncode == 0
    assert "admin_port = 9901" in result.stdout
    assert (
        result.stdout
        == (Path(__file__).resolve().parents[2] / "config" / "sidecar.example.toml").read_text()
    )


def test_conflicting_options_are_refused_with_one_line() -> None:
    for args, words in (
        (["--port", "9000", "--admin-port", "9000"], "admin_port: must differ from port"),
        (["--reconnect-min", "5", "--reconnect-max", "1"], "reconnect_min"),
    ):
        result = run("--upstream", "http://127.0.0.1:1", *args)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], result.stderr
