"""The released upstream servers, pinned, installed once and run on loopback.

``python -m tests.real.servers install`` (run by ``make test``) installs each
pinned release into ``.cache/upstreams/`` in the checkout, once: gptme-server
0.31.0 and 0.35.1 from PyPI into venvs of their own, opencode-ai 1.18.33 from
npm, and its client library ``@opencode-ai/sdk`` of the same release (with
the TypeScript compiler, to check events against its types). A failed
install exits non-zero naming the server; the conformance tests then fail
with the same words, never skip.

Each server runs as a real process with its own temporary HOME and working
directory, talking to the fake model (:mod:`tests.real.model`) and nothing
else:

* gptme counts tokens with tiktoken, which downloads its encoding on first
  use: ``offline/sitecustomize.py`` hands it a byte-level one instead;
* gptme is given ``local/fake`` as its model (``OPENAI_BASE_URL`` = the fake);
  0.35.1 is given a bearer token, which every request then needs;
* opencode reads an ``opencode.json`` that defines the fake as a provider and
  asks before running ``bash`` (so permission requests can be tested).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SIDECAR_UPSTREAMS", ROOT / ".cache" / "upstreams"))
OFFLINE = Path(__file__).resolve().parent / "offline"
GPTME_VERSIONS = ("0.31.0", "0.35.1")
OPENCODE_VERSION = "1.18.33"
#: The compiler that checks events against ``@opencode-ai/sdk``'s types.
TYPESCRIPT_VERSION = "5.9.3"
GPTME_TOKEN = "sidecar-test-token"
#: gptme 0.31.0 sometimes fails a step itself when requests come at once (a
#: race on the conversation's workspace symlink): "[Errno 2] No such file or
#: directory: '.../workspace'". The sidecar reports it, rightly; a scenario
#: that needed the step to run is then run again (pytest-rerunfailures).
WORKSPACE_RACE = r"No such file or directory: .*/workspace"
#: What a scenario is rerun on: that race, and gptme 0.31.0 answering a
#: conversation's GET with its HTML 500 for longer than a poller waits
#: ("ChatConfig has no logdir set" in its log). The sidecar's own errors are
#: JSON, so an HTML 500 is always the upstream's.
#: gptme 0.35.1's own JSON 500 (Flask's text for an exception in a handler):
#: seen when its process's working directory vanished under concurrent
#: first steps (each step ``os.chdir``s the whole process into its
#: workspace), after which every ``Path.cwd()`` raises; ``Process.running``
#: then starts it again for the rerun.
GPTME_CRASHED = r': 500 \{"error": "The server encountered an internal error'
UPSTREAM_FAULTS = [WORKSPACE_RACE, r": 500 <!doctype html>", GPTME_CRASHED]


def upstream_error(status: int, body: bytes) -> bool:
    """A 5xx the sidecar relayed from the upstream, not one of its own (those
    are JSON with ``"source":"sidecar"``)."""
    return status >= 500 and b'"source":"sidecar"' not in body


def gptme_conversation(cid: str, scenario: str) -> dict[str, object]:
    """The body of a PUT that creates a gptme conversation asking the fake
    model for ``scenario`` (the id keeps each conversation's model calls apart)."""
    return {
        "prompt": "p",
        # 0.31.0 needs the model here for the step that resumes after a tool.
        "config": {"chat": {"model": "local/fake"}},
        "messages": [{"role": "user", "content": f"please scenario:{scenario} ({cid})"}],
    }


class NotInstalled(RuntimeError):
    pass


# ------------------------------------------------------------------ install


def gptme_dir(version: str) -> Path:
    return CACHE / f"gptme-{version}"


def opencode_dir() -> Path:
    return CACHE / f"opencode-{OPENCODE_VERSION}"


def _stamp(where: Path) -> Path:
    return where / ".installed"


def _install_gptme(version: str) -> None:
    where = gptme_dir(version)
    if _stamp(where).exists():
        return
    shutil.rmtree(where, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(where)])
    _run([str(where / "bin" / "python"), "-m", "pip", "install", f"gptme[server]=={version}"])
    _stamp(where).write_text(version)


def _run(argv: list[str]) -> str:
    """Run an install step; its output is shown only if it fails."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise NotInstalled(f"`{' '.join(argv[-3:])}` failed:\n{tail}")
    return done.stdout


def _install_opencode() -> None:
    where = opencode_dir()
    if _stamp(where).exists():
        return
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    npm = shutil.which("npm")
    if npm is None:
        raise NotInstalled("npm is not installed (Debian's nodejs and npm packages provide it)")
    flags = ["--no-audit", "--no-fund", "--no-save", "--loglevel=error"]
    _run([npm, "install", "--prefix", str(where), *flags, f"opencode-ai@{OPENCODE_VERSION}"])
    version = _run([str(opencode_binary()), "--version"]).strip()
    if version != OPENCODE_VERSION:
        raise NotInstalled(f"opencode --version printed {version!r}")
    _stamp(where).write_text(OPENCODE_VERSION)


def sdk_dir() -> Path:
    return CACHE / f"opencode-sdk-{OPENCODE_VERSION}"


def _install_sdk() -> None:
    """opencode's own client library, of the same release, and the TypeScript
    compiler that checks events against its types."""
    where = sdk_dir()
    if _stamp(where).exists():
        return
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    npm = shutil.which("npm")
    if npm is None:
        raise NotInstalled("npm is not installed (Debian's nodejs and npm packages provide it)")
    flags = ["--no-audit", "--no-fund", "--no-save", "--loglevel=error"]
    packages = [f"@opencode-ai/sdk@{OPENCODE_VERSION}", f"typescript@{TYPESCRIPT_VERSION}"]
    _run([npm, "install", "--prefix", str(where), *flags, *packages])
    _stamp(where).write_text(OPENCODE_VERSION)


def opencode_binary() -> Path:
    return opencode_dir() / "node_modules" / ".bin" / "opencode"


def install() -> int:
    """Install every pinned server that is not installed yet; 1 if any failed."""
    failed = []
    jobs = [(f"gptme-server {v}", lambda v=v: _install_gptme(v)) for v in GPTME_VERSIONS]
    jobs.append((f"opencode-ai {OPENCODE_VERSION}", _install_opencode))
    jobs.append((f"@opencode-ai/sdk {OPENCODE_VERSION}", _install_sdk))
    for name, job in jobs:
        try:
            job()
        except (OSError, NotInstalled) as exc:
            failed.append(f"{name}: {exc}")
    for line in failed:
        print(f"could not install the real upstream {line}", file=sys.stderr)
    if not failed:
        print(f"real upstreams installed in {CACHE}")
    return 1 if failed else 0


def require(where: Path, name: str) -> None:
    if not _stamp(where).exists():
        raise NotInstalled(
            f"{name} is not installed in {where}: `make test` installs it "
            "(python -m tests.real.servers install); see its output for why it failed"
        )


# ------------------------------------------------------------------ running


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    """A server process on loopback: started, stopped, killed, restarted."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    port: int
    ready_path: str
    headers: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.log_path = self.cwd / f"{self.name}.log"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up:\n{self.log_tail()}")
            request = urllib.request.Request(self.url + self.ready_path, headers=self.headers)
            try:
                with urllib.request.urlopen(request, timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # it answers: that is all readiness means here
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer within {timeout:g} s:\n{self.log_tail()}")

    def running(self) -> Process:
        """This process, started again if a scenario before stopped or killed
        it, or if its working directory is gone (see GPTME_CRASHED)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        elif self.cwd_gone():
            print(f"{self.name}: its working directory vanished; started again", file=sys.stderr)
            self.restart()
        return self

    def cwd_gone(self) -> bool:
        """The process's working directory was removed under it (Linux)."""
        if self.proc is None:
            return False
        try:
            return os.readlink(f"/proc/{self.proc.pid}/cwd").endswith(" (deleted)")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def seed_gptme_conversation(self, cid: str, messages: list[dict[str, str]]) -> None:
        """A gptme conversation already on disk, as an earlier server process
        left it. (0.31.0 keeps the lock a PUT or an append takes: a conversation
        it created itself accepts no append; one on disk accepts one.)"""
        home = Path(self.env["HOME"])
        where = home / ".local" / "share" / "gptme" / "logs" / cid
        where.mkdir(parents=True)
        lines = [json.dumps({**m, "timestamp": "2026-01-01T00:00:00"}) for m in messages]
        (where / "conversation.jsonl").write_text("\n".join(lines) + "\n")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def start_model() -> Process:
    """The fake model, in a process of its own (the servers call it from threads)."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-model-"))
    process = Process(
        name="model",
        argv=[sys.executable, "-m", "tests.real.model", "--port", str(port)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=workdir,
        port=port,
        ready_path="/v1/models",
    )
    process.start()
    return process


def start_gptme(version: str, model_url: str, nice: int = 0) -> Process:
    """gptme-server ``version`` on loopback; ``nice``: at that CPU priority
    (a benchmark's upstream, whose CPU is not the sidecar's in a pod)."""
    where = gptme_dir(version)
    require(where, f"gptme-server {version}")
    workdir = Path(tempfile.mkdtemp(prefix=f"sidecar-gptme-{version}-"))
    home = workdir / "home"
    home.mkdir()
    port = free_port()
    env = {
        "PATH": f"{where / 'bin'}:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(OFFLINE),
        "MODEL": "local/fake",
        "OPENAI_BASE_URL": model_url + "/v1",
        "OPENAI_API_KEY": "sk-fake",
    }
    headers = {}
    if version != "0.31.0":
        env["GPTME_SERVER_TOKEN"] = GPTME_TOKEN
        headers["Authorization"] = f"Bearer {GPTME_TOKEN}"
    process = Process(
        name=f"gptme-{version}",
        argv=[
            *(["nice", "-n", str(nice)] if nice else []),
            *(str(where / "bin" / "gptme-server"), "serve", "--host", "127.0.0.1"),
            *("--port", str(port), "--model", "local/fake"),
        ],
        env=env,
        cwd=workdir,
        port=port,
        ready_path="/api/v2",
        headers=headers,
    )
    process.start()
    return process


def start_opencode(model_url: str, password: str | None = None) -> Process:
    """opencode serving on loopback; with ``password``, behind its own
    OPENCODE_SERVER_PASSWORD (user ``opencode``)."""
    require(opencode_dir(), f"opencode-ai {OPENCODE_VERSION}")
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-opencode-"))
    home = workdir / "home"
    config = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "fake": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Fake",
                "options": {"baseURL": model_url + "/v1", "apiKey": "sk-fake"},
                "models": {"fake": {"name": "Fake"}},
            }
        },
        "model": "fake/fake",
        "small_model": "fake/fake",
        "permission": {"bash": "ask"},
        "autoupdate": False,
        "share": "disabled",
    }
    (workdir / "opencode.json").write_text(json.dumps(config))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "LANG": "C.UTF-8",
    }
    headers = {}
    if password is not None:
        env["OPENCODE_SERVER_PASSWORD"] = password
        basic = base64.b64encode(f"opencode:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {basic}"
    port = free_port()
    process = Process(
        name="opencode",
        argv=[str(opencode_binary()), "serve", "--hostname", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=workdir,
        port=port,
        ready_path="/session",
        headers=headers,
    )
    process.start()
    return process


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m tests.real.servers install")
    sys.exit(install())
