"""Signing per Standard Webhooks, checked against its reference library."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from sidecar.webhooks.signing import SecretError, Secrets, parse_secret, read_secrets, signature


def new_secret(size: int = 32) -> str:
    return "whsec_" + base64.b64encode(os.urandom(size)).decode()


@settings(max_examples=200, deadline=None)
@given(
    body=st.dictionaries(st.text(max_size=10), st.text(max_size=200), max_size=5).map(orjson.dumps),
    size=st.integers(24, 64),
    msg=st.from_regex(r"msg_[0-9a-f]{32}", fullmatch=True),
)
def test_the_reference_library_verifies_every_signature(body: bytes, size: int, msg: str) -> None:
    secret = new_secret(size)
    now = int(time.time())
    headers = {
        "webhook-id": msg,
        "webhook-timestamp": str(now),
        "webhook-signature": signature(msg, now, body, (parse_secret(secret, "t"),)),
    }
    Webhook(secret).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)  # another secret
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)  # another body


def test_during_a_rotation_either_secret_verifies(tmp_path: Path) -> None:
    new, old = new_secret(), new_secret()
    path = tmp_path / "secret"
    path.write_text(f"{new}\n{old}\n")
    keys = read_secrets(str(path))
    now = int(time.time())
    body = b'{"type":"conversation.failed"}'
    headers = {
        "webhook-id": "msg_" + "0" * 32,
        "webhook-timestamp": str(now),
        "webhook-signature": signature("msg_" + "0" * 32, now, body, keys),
    }
    assert headers["webhook-signature"].count("v1,") == 2
    for secret in (new, old):
        Webhook(secret).verify(body, headers)


def test_a_secret_file_that_changes_is_read_again_and_a_broken_one_keeps_the_last(
    tmp_path: Path,
) -> None:
    path = tmp_path / "secret"
    first, second = new_secret(), new_secret()
    path.write_text(first)
    secrets = Secrets(str(path))
    assert secrets.current() == (parse_secret(first, "t"),)
    path.write_text(second + "\n")
    assert secrets.current() == (parse_secret(second, "t"),)
    path.write_text("not a secret at all, and longer\n")
    assert secrets.current() == (parse_secret(second, "t"),)  # the last good one


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("whsec_!!!", "not a base64 secret"),
        ("whsec_" + base64.b64encode(b"short").decode(), "5 bytes"),
        ("whsec_" + base64.b64encode(os.urandom(65)).decode(), "65 bytes"),
    ],
)
def test_a_bad_secret_file_says_why_without_showing_the_secret(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "secret"
    path.write_text(text)
    with pytest.raises(SecretError, match=says) as caught:
        read_secrets(str(path))
    assert text.removeprefix("whsec_") not in str(caught.value) or not text
    with pytest.raises(SecretError, match="cannot read"):
        read_secrets(str(tmp_path / "missing"))
