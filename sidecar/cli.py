"""The ``sidecar`` command.

    sidecar --upstream URL [--host H] [--port P] [options]   serve (the default)
    sidecar demo [--serve]                                   the built-in demo
    sidecar config [options] [--example]                     the effective settings (TOML)
    sidecar check --upstream URL [--id ID]                   check an upstream
    sidecar schema [--webhook | --openapi [--profile P]]     the published JSON Schemas
    sidecar watch ID [--until failed,completed]              follow one conversation

Every option of :data:`sidecar.config.OPTIONS` is a flag here, a ``SIDECAR_*``
environment variable and a key of the ``--config`` TOML file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import MISSING, fields
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from . import __version__
from .config import (
    CHECK_OPTIONS,
    OPTIONS,
    WATCH_OPTIONS,
    ConfigError,
    Option,
    Settings,
    load_settings,
    masked_url,
)
from .core.profile import Profile, ProfileError, load_profile
from .state.store import StoreInUse, StoreRefused, StoreTooNew
from .webhooks.signing import SecretError, read_secrets

#: The defaults the help shows: the ones Settings has, the only ones.
_DEFAULTS = {f.name: f.default for f in fields(Settings)}

__all__ = ["main"]

_COMMANDS = ("serve", "demo", "config", "check", "schema", "watch")
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {
    "message",
    "asctime",
}


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, message and extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(client_faults_as_warnings)


def client_faults_as_warnings(record: logging.LogRecord) -> bool:
    """A malformed request is the client's fault, answered with a 400: one
    warning line, not an error with the parser's traceback."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = f"malformed request refused: {exc.message.strip() or exc}"
        record.args = ()
        record.exc_info = record.exc_text = None
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="A reverse proxy that makes a stream-first server's events readable as state.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"sidecar {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the proxy (the default command)")
    config = sub.add_parser(
        "config", help="print the effective configuration as TOML (secrets left out)"
    )
    config.add_argument(
        "--example", action="store_true", help="print the commented example configuration file"
    )
    config.add_argument("--json", action="store_true", help="JSON instead, secrets masked")
    check = sub.add_parser(
        "check", help="check an upstream against the profile: endpoints, events, what is merged"
    )
    check.add_argument("--id", dest="resource_id", help="an existing resource to look at")
    check.add_argument(
        "--seconds", type=float, default=5.0, help="how long to listen to the stream"
    )
    watch = sub.add_parser(
        "watch", help="follow one conversation's state in a terminal (reads the state API)"
    )
    watch.add_argument("resource_id", metavar="ID", help="the conversation (opencode: session)")
    watch.add_argument(
        "--url", help="the sidecar's base URL (default: from admin_port/port and their hosts)"
    )
    watch.add_argument("--token-file", help="a file holding the admin token")
    watch.add_argument(
        "--interval", type=float, default=0.5, help="seconds between two reads (default 0.5)"
    )
    watch.add_argument("--until", default="", help="end when one of these statuses is reached")
    watch.add_argument("--timeout", type=float, help="end after this many seconds (exit 1)")
    for p, names in (
        (serve, None),
        (config, None),
        (check, CHECK_OPTIONS),
        (watch, WATCH_OPTIONS),
    ):
        p.add_argument(
            "--config", metavar="FILE", help="a TOML file of options (env SIDECAR_CONFIG)"
        )
        for option in OPTIONS:
            if names is not None and option.name not in names:
                continue
            flag = "--" + option.name.replace("_", "-")
            text = f"{option.help} ({_default_text(option)}; env {option.env})"
            if option.kind is bool:
                p.add_argument(
                    flag, dest=option.name, action=argparse.BooleanOptionalAction, help=text
                )
            else:
                p.add_argument(
                    flag, dest=option.name, metavar=option.kind.__name__.upper(), help=text
                )
    schema = sub.add_parser(
        "schema",
        help="print the snapshot's JSON Schema (draft 2020-12), the webhook's, or an "
        "OpenAPI 3.1 document of what the sidecar adds to a profile's upstream",
    )
    which = schema.add_mutually_exclusive_group()
    which.add_argument("--webhook", action="store_true", help="a webhook body's schema")
    which.add_argument(
        "--openapi", action="store_true", help="the OpenAPI 3.1 document of --profile"
    )
    schema.add_argument(
        "--profile", default="gptme", help="built-in profile name or profile file (--openapi)"
    )
    demo = sub.add_parser(
        "demo", help="run the built-in demo: a fake gptme with the sidecar in front"
    )
    demo.add_argument("--serve", action="store_true", help="keep both servers up after the script")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=0, help="the sidecar's port (default: any free)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    flags = {o.name: getattr(args, o.name, None) for o in OPTIONS}
    return load_settings(
        config_file=args.config, flags=flags, require_upstream=args.command != "watch"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (
        argv[0] not in _COMMANDS and argv[0] not in ("-h", "--help", "-V", "--version")
    ):
        argv.insert(0, "serve")
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo.run import run_demo

            try:
                return asyncio.run(run_demo(host=args.host, port=args.port, serve=args.serve))
            except KeyboardInterrupt:
                return 0  # Ctrl-C ends `demo --serve`: that is how it is meant to stop
        if args.command == "schema":
            print(schema_text(args.webhook, args.profile if args.openapi else None), end="")
            return 0
        if args.command == "config" and args.example:
            print(example_config(), end="")
            return 0
        settings = _settings(args)
        if args.command == "watch":
            return _watch(args, settings)
        profile = load_profile(settings.profile)
        if args.command == "config":
            if args.json:
                print(json.dumps({**settings.masked(), "profile_source": profile.source}, indent=2))
            else:
                print(settings_toml(settings, profile), end="")
            return 0
        if args.command == "check":
            from .ops.check import run_check

            return asyncio.run(
                run_check(settings, profile, sys.stdout, args.resource_id, args.seconds)
            )
    except (ConfigError, ProfileError) as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    try:
        for receiver in settings.receivers:
            read_secrets(receiver.secret_file)  # a bad secret stops start-up, not a delivery
    except SecretError as exc:
        print(f"sidecar: webhook {receiver.name}: {exc}", file=sys.stderr)
        return 2
    return serve(settings, profile)


def _watch(args: argparse.Namespace, settings: Settings) -> int:
    from .ops.watch import run_watch

    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"sidecar: token file {args.token_file}: {exc.strerror}", file=sys.stderr)
            return 2
    until = {s.strip() for s in args.until.split(",") if s.strip()}
    try:
        return asyncio.run(
            run_watch(
                settings,
                args.resource_id,
                sys.stdout,
                url=args.url,
                token=token,
                interval=args.interval,
                until=until,
                timeout=args.timeout,
            )
        )
    except KeyboardInterrupt:
        return 0  # how `watch` is meant to end


def schema_text(webhook: bool = False, openapi_profile: str | None = None) -> str:
    """What ``sidecar schema`` prints (and ``docs/schema/`` holds): JSON, two-space indents."""
    from .core import schema

    if openapi_profile is not None:
        profile = load_profile(openapi_profile)
        doc = schema.openapi(profile.name, profile.key, __version__)
    else:
        doc = schema.webhook_schema() if webhook else schema.snapshot_schema()
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _default_text(option: Option) -> str:
    if option.computed is not None:
        return f"default: {option.computed}"
    default = _DEFAULTS.get(option.name, MISSING)
    if default is MISSING:
        return "required"
    if default is None:
        return "default: not set"
    if isinstance(default, bool):
        return f"default: {str(default).lower()}"
    return f"default: {default}"


def settings_toml(settings: Settings, profile: Profile) -> str:
    """The effective settings as a TOML file that loads back to the same.

    Computed defaults are written as computed; secrets and unset options are
    comments.
    """
    lines = [
        "# The effective settings (`sidecar config`); `sidecar --config FILE` loads them.",
        f"# profile source: {profile.source}",
        "",
    ]
    for option in OPTIONS:
        value = getattr(settings, option.name)
        if option.name == "stale_after" and value is None:
            value = 3 * profile.heartbeat_seconds
        if option.secret and value and getattr(settings, option.name + "_file", None):
            lines.append(f"# {option.name} = ... (read from {option.name}_file)")
        elif (option.secret and value) or (
            option.name == "store" and masked_url(str(value)) != value
        ):
            lines.append(f"# {option.name} = ... (set, not shown: it holds a password)")
        elif value is None:
            lines.append(f"# {option.name}: not set")
        else:
            lines.append(f"{option.name} = {_toml_value(value)}")
    for receiver in settings.webhooks:
        lines += ["", "[[webhooks]]"]
        for key, value in receiver.as_table().items():
            shown = (
                "[" + ", ".join(map(_toml_value, value)) + "]"
                if isinstance(value, list)
                else _toml_value(value)
            )
            lines.append(f"{key} = {shown}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def example_config() -> str:
    """The commented example configuration, as installed with the package."""
    packaged = resources.files("sidecar") / "examples" / "sidecar.example.toml"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parent.parent / "config" / "sidecar.example.toml"
    return checkout.read_text(encoding="utf-8")


def serve(settings: Settings, profile: Profile) -> int:
    setup_logging(settings.log_level)
    if settings.workers > 1:
        from .workers import supervise

        return supervise(settings, lambda: _serve_one(settings, profile))
    return _serve_one(settings, profile)


def _serve_one(settings: Settings, profile: Profile) -> int:
    from .server import disarm_watchdog, run

    runner: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    try:
        import uvloop
    except ImportError:
        pass  # the standard loop, and nothing chained to this import's failure
    else:
        runner = uvloop.run
    try:
        return int(runner(run(settings, profile)))
    except (StoreInUse, StoreTooNew, StoreRefused) as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Start-up failures (port in use, an address not on this host, no
        # permission): one line, no traceback.
        print(f"sidecar: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        disarm_watchdog()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
