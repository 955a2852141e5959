"""Signing per the Standard Webhooks specification (https://www.standardwebhooks.com/).

The spec, as implemented here (``tests/webhooks/test_signing.py`` checks it
against the ``standardwebhooks`` reference library):

* the signed content is ``{webhook-id}.{webhook-timestamp}.{body}``, the
  body being the exact bytes sent;
* the signature is HMAC-SHA256 of it, base64, prefixed by the version:
  ``v1,<base64>``; ``webhook-signature`` holds one per secret, separated by
  spaces (while a secret is rotated, the receiver accepts either);
* a secret is ``whsec_`` followed by base64 of 24 to 64 random bytes;
* ``webhook-timestamp`` is the attempt's time in whole seconds since the
  epoch (receivers refuse one more than five minutes off), so each retry is
  signed anew; ``webhook-id`` stays the same.

A secret file holds one secret a line (two during a rotation: the new one
first). It is read again when it changes, so a Kubernetes Secret mounted as
a file rotates without a restart; a file that becomes unreadable or invalid
keeps the last good secrets, and says so once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
from pathlib import Path

__all__ = ["SecretError", "Secrets", "parse_secret", "read_secrets", "signature"]

log = logging.getLogger("sidecar.webhooks")

PREFIX = "whsec_"
MIN_BYTES, MAX_BYTES = 24, 64
MAX_FILE = 64 * 1024


class SecretError(ValueError):
    """A secret file that cannot be used; the message names the file, never the secret."""


def parse_secret(text: str, where: str) -> bytes:
    """The key of one ``whsec_...`` secret (the prefix may be left out)."""
    value = text.strip().removeprefix(PREFIX)
    try:
        key = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"{where}: not a base64 secret (whsec_ then base64)") from None
    if not MIN_BYTES <= len(key) <= MAX_BYTES:
        raise SecretError(
            f"{where}: the secret is {len(key)} bytes; Standard Webhooks wants "
            f"{MIN_BYTES} to {MAX_BYTES} (e.g. whsec_ + base64 of 32 random bytes)"
        )
    return key


def read_secrets(path: str) -> tuple[bytes, ...]:
    """Every secret of a secret file, in order; at least one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise SecretError(f"secret file {path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_FILE:
        raise SecretError(f"secret file {path}: larger than {MAX_FILE} bytes: not a secret file")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise SecretError(f"secret file {path}: not ASCII text") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise SecretError(f"secret file {path}: empty")
    return tuple(
        parse_secret(line, f"secret file {path}, line {i + 1}") for i, line in enumerate(lines)
    )


def signature(msg_id: str, timestamp: int, body: bytes, keys: tuple[bytes, ...]) -> str:
    """The ``webhook-signature`` header's value: ``v1,<base64>`` per key."""
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


class Secrets:
    """A receiver's secret file, read again when it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.keys = read_secrets(path)  # at start, a bad file is an error
        self._stamp = self._stat()
        self._said: str | None = None

    def _stat(self) -> tuple[float, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime, st.st_size, st.st_ino)

    def current(self) -> tuple[bytes, ...]:
        """The secrets to sign with now (the file is looked at, not read, unless it changed)."""
        stamp = self._stat()
        if stamp == self._stamp:
            return self.keys
        try:
            keys = read_secrets(self.path)
        except SecretError as exc:
            if self._said != str(exc):
                self._said = str(exc)
                log.warning(
                    "webhook secret file unusable: signing with the last good secrets",
                    extra={"reason": str(exc)},
                )
            return self.keys
        self.keys, self._stamp, self._said = keys, stamp, None
        log.info(
            "webhook secrets read again", extra={"path": str(Path(self.path)), "count": len(keys)}
        )
        return keys
