"""No secret in an answer, a log line or ``ps``: credentials in the upstream's
URL are refused at start (without repeating them), and every secret option
also comes from a file (``--admin-token-file``, ``SIDECAR_*_FILE``: the
convention of container secrets)."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sidecar.config import ConfigError, load_settings

from ..support import SIDECAR, free_port, run

PASSWORD = "pw-4f9a"


@pytest.mark.parametrize("command", [[], ["config"], ["check"]])
@pytest.mark.parametrize("where", ["flag", "env", "file"])
def test_credentials_in_the_upstream_url_are_refused_in_one_line_that_omits_them(
    command: list[str], where: str, tmp_path: Path
) -> None:
    url = f"http://svc:{PASSWORD}@127.0.0.1:9"
    args, env = [*command], {}
    if where == "flag":
        args += ["--upstream", url]
    elif where == "env":
        env["SIDECAR_UPSTREAM"] = url
    else:
        (tmp_path / "s.toml").write_text(f'upstream = "{url}"\n')
        args += ["--config", str(tmp_path / "s.toml")]
    done = run(*args, env=env, timeout=30)
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and "must not carry credentials" in done.stderr
    assert PASSWORD not in done.stderr + done.stdout
    assert "upstream_authorization_file" in done.stderr


def test_every_secret_option_comes_from_a_file_too(tmp_path: Path) -> None:
    for name, value in (
        ("admin_token", "adm-1"),
        ("upstream_authorization", "Basic b3BlbmNvZGU6cHc="),
        ("store_password", PASSWORD),
    ):
        secret = tmp_path / name
        secret.write_text(value + "\n")  # as `echo` and kubectl write them
        env = {f"SIDECAR_{name.upper()}_FILE": str(secret)}
        settings = load_settings(env=env, flags={"upstream": "http://127.0.0.1:1"})
        assert getattr(settings, name) == value
        flag = load_settings(env={}, flags={"upstream": "http://h:1", f"{name}_file": str(secret)})
        assert getattr(flag, name) == value
        assert value not in repr(flag.masked())


def test_a_later_source_wins_and_one_source_gives_a_secret_one_way(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-file")
    config = tmp_path / "s.toml"
    config.write_text(f'upstream = "http://h:1"\nadmin_token_file = "{secret}"\n')
    assert load_settings(str(config), env={}).admin_token == "from-file"
    over = load_settings(str(config), env={"SIDECAR_ADMIN_TOKEN": "from-env"})
    assert (over.admin_token, over.admin_token_file) == ("from-env", None)
    with pytest.raises(ConfigError, match="admin_token and admin_token_file: give one"):
        load_settings(env={"SIDECAR_ADMIN_TOKEN": "a", "SIDECAR_ADMIN_TOKEN_FILE": str(secret)})


@pytest.mark.parametrize("content", [None, "two\nlines\n", b"\xff\xfe"])
def test_an_unusable_secret_file_stops_the_start_in_one_line(
    content: str | bytes | None, tmp_path: Path
) -> None:
    secret = tmp_path / "token"
    if isinstance(content, bytes):
        secret.write_bytes(content)
    elif content is not None:
        secret.write_text(content)
    done = run("--upstream", "http://127.0.0.1:9", "--admin-token-file", str(secret), timeout=30)
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and str(secret) in done.stderr
    assert "lines" not in done.stderr  # never the content


def _get(url: str, **headers: str) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_token_from_a_file_is_not_in_ps_nor_in_the_config_printed(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("adm-secret-77\n")
    port, admin = free_port(), free_port()
    options = [
        *("--upstream", "http://127.0.0.1:9", "--port", str(port), "--store", "memory"),
        *("--admin-port", str(admin), "--admin-host", "0.0.0.0"),
        *("--admin-token-file", str(secret)),
    ]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen([*SIDECAR, *options], stdout=log, stderr=subprocess.STDOUT, env=clean)
    try:
        url = f"http://127.0.0.1:{admin}/metrics"
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _ = _get(url)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        assert status == 401
        assert _get(url, Authorization="Bearer adm-secret-77")[0] == 200
        # Nothing the sidecar answers names the secret.
        status, body = _get(f"http://127.0.0.1:{port}/api/v2")
        assert status == 502 and "adm-secret-77" not in body
        assert "adm-secret-77" not in _get(f"http://127.0.0.1:{admin}/readyz")[1]
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"adm-secret-77" not in cmdline and str(secret).encode() in cmdline
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    assert "adm-secret-77" not in (tmp_path / "log").read_text()
    printed = run("config", *options, timeout=30)
    assert printed.returncode == 0
    assert "adm-secret-77" not in printed.stdout
    assert f'admin_token_file = "{secret}"' in printed.stdout
    # ... and it loads back to the same settings, the token read again.
    again = tmp_path / "again.toml"
    again.write_text(printed.stdout)
    assert load_settings(str(again), env={}).admin_token == "adm-secret-77"
