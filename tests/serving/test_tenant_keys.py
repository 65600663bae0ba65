"""The keys file (`--api_keys`, SPEC section 12): what it accepts, what it refuses (naming the line, never
quoting a token), rereading it when it changes, and refusing a bad file at start through `python -m app`.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.serving.core.tenants import ApiKeys, KeysFileError, parse_keys
from tests.support import ROOT

A = "alpha-token-0123456789"
B = "bravo-token-9876543210"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_plain_and_hashed_keys_name_their_tenant_with_weights(tmp_path: Path) -> None:
    keys = ApiKeys.load(write(tmp_path / "keys", f"# teams\n\nA {A}\nB sha256:{sha(B)} weight=2.5\n"
                                                 f"B {B[::-1]}\n"))
    assert keys.authenticate(f"Bearer {A}").name == "A"  # type: ignore[union-attr]
    assert keys.authenticate(f"bearer {B}").name == "B"  # type: ignore[union-attr]
    assert keys.authenticate(f"Bearer {B[::-1]}").name == "B"  # type: ignore[union-attr]
    assert keys.weight("B") == 2.5 and keys.weight("A") == 1.0 and keys.names == ["A", "B"]
    for wrong in (None, "", A, f"Basic {A}", f"Bearer {A}x", f"Bearer {sha(B)}", "Bearer ", f"Bearer  {A} x"):
        assert keys.authenticate(wrong) is None, wrong


@pytest.mark.parametrize(("text", "line", "words"), [
    (f"A {A}\nB\n", 2, "expected `TENANT TOKEN`"),
    (f"A {A}\nB short\n", 2, "16 to 512"),
    (f"A {A}\n-x {B}\n", 2, "tenant name"),
    (f"A sha256:{sha(A)[:-1]}\n", 1, "64 hexadecimal"),
    (f"A {A}\nB {A}\n", 2, "same key as line 1"),
    (f"A {A} weight=0\n", 1, "weight=N"),
    (f"A {A} weight=lots\n", 1, "weight=N"),
    (f"A {A} weight=2\nA {B} weight=3\n", 2, "weight=2 on line 1"),
])
def test_a_bad_line_is_named_and_no_token_is_quoted(text: str, line: int, words: str) -> None:
    with pytest.raises(KeysFileError) as bad:
        parse_keys(text, "keys")
    message = str(bad.value)
    assert f"keys line {line}:" in message and words in message, message
    assert A not in message and B not in message and sha(A)[:20] not in message


def test_a_file_without_keys_is_refused() -> None:
    with pytest.raises(KeysFileError, match="no keys"):
        parse_keys("# nobody yet\n\n", "keys")


def test_a_good_edit_takes_effect_and_a_bad_one_keeps_the_keys_in_force(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "keys", f"A {A}\n")
    keys = ApiKeys.load(path)
    assert not keys.reload()  # unchanged
    write(path, f"A {A}\nB {B}\n")
    assert keys.reload() and keys.authenticate(f"Bearer {B}") is not None
    caplog.set_level(logging.ERROR, logger="app.serving.core.tenants")
    write(path, f"B {B}\nA\n")
    assert keys.file_ok and not keys.reload() and not keys.file_ok
    assert keys.authenticate(f"Bearer {A}") is not None  # the old keys stay
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 1 and "line 2" in errors[0] and A not in errors[0] and B not in errors[0]
    assert not keys.reload() and len(caplog.records) == 1  # one error per bad content, not per look
    path.unlink()
    assert not keys.reload() and keys.authenticate(f"Bearer {B}") is not None
    write(path, f"B {B}\n")
    assert keys.reload() and keys.authenticate(f"Bearer {A}") is None  # the removed key is refused
    assert keys.file_ok


def test_the_watcher_thread_picks_up_a_secret_swapped_in_place(tmp_path: Path) -> None:
    # A Kubernetes Secret volume: the file is a symlink into a directory that is replaced as a whole.
    first, second = tmp_path / "..2026_1", tmp_path / "..2026_2"
    first.mkdir()
    second.mkdir()
    write(first / "keys", f"A {A}\n")
    write(second / "keys", f"A {A}\nB {B}\n")
    data = tmp_path / "..data"
    data.symlink_to(first.name)
    (tmp_path / "keys").symlink_to("..data/keys")
    keys = ApiKeys.load(tmp_path / "keys")
    keys.start(poll_s=0.05)
    try:
        assert keys.authenticate(f"Bearer {B}") is None
        tmp = tmp_path / "..data_tmp"
        tmp.symlink_to(second.name)
        tmp.replace(data)  # the kubelet's atomic swap
        deadline = time.monotonic() + 5
        while keys.authenticate(f"Bearer {B}") is None:
            assert time.monotonic() < deadline, "the swapped keys were not picked up within 5 s"
            time.sleep(0.05)
    finally:
        keys.stop()


def test_a_bad_keys_file_stops_start_up_naming_the_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write(tmp_path / "keys", f"A {A}\nB {B} extra stuff\n")
    done = subprocess.run([sys.executable, "-m", "app", "--model_dir", str(tiny_model_dir), "--device", "cpu",
                           "--api_keys", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"--api_keys: {path} line 2:" in done.stderr and A not in done.stderr and B not in done.stderr
