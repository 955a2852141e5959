"""The package as a user installs it: a wheel, in a fresh venv, outside the checkout."""

from __future__ import annotations

import asyncio
import os
import site
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.demo.fake import FakeOpencode

from ..support import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the venv's bin, a directory with no checkout in it)."""
    where = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(where), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = where.glob("*.whl")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps"]
    done = subprocess.run([*pip, "--no-index", str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # Its dependencies come from the test environment's site-packages, as
    # a plain path: that directory's own .pth files (this checkout's
    # editable install among them) are not read, so `sidecar` is the wheel's.
    purelib = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_path('purelib'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    elsewhere = where / "elsewhere"
    elsewhere.mkdir()
    yield venv / "bin", elsewhere


def run(installed: tuple[Path, Path], *args: str) -> subprocess.CompletedProcess[str]:
    bin_dir, cwd = installed
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "PYTHON"))}
    return subprocess.run(
        [str(bin_dir / "sidecar"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean,
        timeout=60,
    )


def test_the_installed_command_runs_from_anywhere(installed: tuple[Path, Path]) -> None:
    bin_dir, _ = installed
    located = subprocess.run(
        [str(bin_dir / "python"), "-c", "import sidecar; print(sidecar.__file__)"],
        capture_output=True,
        text=True,
        cwd=installed[1],
    ).stdout
    assert str(ROOT) not in located  # the wheel's copy, not this checkout
    version = run(installed, "--version")
    assert version.returncode == 0 and version.stdout.startswith("sidecar ")
    example = run(installed, "config", "--example")
    assert example.returncode == 0 and "admin_port = 9901" in example.stdout
    demo = run(installed, "demo")
    assert demo.returncode == 0, demo.stderr
    assert "status=failed" in demo.stdout


async def test_the_installed_command_serves_the_opencode_profile(
    installed: tuple[Path, Path], serve
) -> None:
    fake = FakeOpencode()
    upstream = str((await serve(fake.app)).make_url("")).rstrip("/")
    port = free_port()
    bin_dir, cwd = installed
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "PYTHON"))}
    proc = await asyncio.create_subprocess_exec(
        str(bin_dir / "sidecar"), "--profile", "opencode", "--upstream", upstream,
        "--port", str(port), cwd=cwd, env=clean,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.post(f"http://127.0.0.1:{port}/session", json={}) as resp:
                        sid = (await resp.json())["id"]
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            async with http.get(f"http://127.0.0.1:{port}/session/{sid}") as resp:
                assert (await resp.json())["sidecar"]["id"] == sid
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    assert b"Traceback" not in err


def test_the_wheel_lists_the_license(installed: tuple[Path, Path]) -> None:
    bin_dir, _ = installed
    (wheel,) = bin_dir.parent.parent.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {
        "sidecar/profiles/gptme.toml",
        "sidecar/profiles/opencode.toml",
        "sidecar/examples/sidecar.example.toml",
    } <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(metadata).decode()
    assert "Name: stream-state-sidecar" in text and "License-Expression: MIT" in text
