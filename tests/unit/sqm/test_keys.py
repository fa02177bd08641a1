"""Key files: what keygen writes, what loading accepts, and one-line errors naming the file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq
import zmq.auth

from sqm.errors import KeyFileError, SQMError
from sqm.security.keys import (
    KeyPair,
    client_keys,
    generate_keypair,
    load_key_dir,
    load_keypair,
    load_public_key,
)


def test_generated_pair_is_readable_by_pyzmq_and_secret_is_0600(tmp_path: Path) -> None:
    public, secret = generate_keypair("alice", tmp_path)
    assert (public, secret) == (tmp_path / "alice.key", tmp_path / "alice.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub_only, none = zmq.auth.load_certificate(public)
    pub2, sec = zmq.auth.load_certificate(secret)
    assert none is None and pub_only == pub2 and sec is not None
    assert zmq.curve_public(sec) == pub2
    pair = load_keypair(secret)
    assert pair == KeyPair(pub2, sec)
    assert load_public_key(public) == load_public_key(secret) == pub2


def test_secret_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        _, secret = generate_keypair("bob", tmp_path / "new")
    finally:
        os.umask(old)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def test_pyzmq_made_certificates_load(tmp_path: Path) -> None:
    public, secret = zmq.auth.create_certificates(tmp_path, "made-by-pyzmq")
    os.chmod(secret, 0o600)
    assert load_keypair(secret).public == load_public_key(public)


def test_keygen_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    first = load_public_key(generate_keypair("a", tmp_path)[0])
    with pytest.raises(KeyFileError, match=r"a\.key.*already exists"):
        generate_keypair("a", tmp_path)
    assert load_public_key(tmp_path / "a.key") == first
    generate_keypair("a", tmp_path, overwrite=True)
    assert load_public_key(tmp_path / "a.key") != first
    assert stat.S_IMODE((tmp_path / "a.key_secret").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key", "a.key_secret"]


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden"])
def test_bad_key_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(KeyFileError, match="plain file name"):
        generate_keypair(name, tmp_path)


def _one_line(exc: pytest.ExceptionInfo[KeyFileError], path: Path, problem: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert problem in msg
    assert isinstance(exc.value, SQMError)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.key_secret"
    with pytest.raises(KeyFileError) as exc:
        load_keypair(path)
    _one_line(exc, path, "not found")
    with pytest.raises(KeyFileError) as exc:
        load_public_key(path)
    _one_line(exc, path, "not found")


def test_unreadable_file(tmp_path: Path) -> None:
    # Tests run as root, who reads any mode: a directory in the file's place
    # and a path through a regular file stand in for unreadable files.
    path = tmp_path / "dir.key"
    path.mkdir()
    with pytest.raises(KeyFileError) as exc:
        load_public_key(path)
    _one_line(exc, path, "not a regular file")
    (tmp_path / "plain").write_text("x")
    path = tmp_path / "plain" / "under.key_secret"
    with pytest.raises(KeyFileError) as exc:
        load_keypair(path)
    _one_line(exc, path, "cannot read it (Not a directory)")


def test_wrong_format(tmp_path: Path) -> None:
    path = tmp_path / "junk.key"
    path.write_text("this is not a certificate\n")
    with pytest.raises(KeyFileError) as exc:
        load_public_key(path)
    _one_line(exc, path, "no public-key")
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(KeyFileError) as exc:
        load_public_key(path)
    _one_line(exc, path, "no public-key")


def test_bad_key_text(tmp_path: Path) -> None:
    path = tmp_path / "short.key"
    path.write_text('curve\n    public-key = "tooshort"\n')
    with pytest.raises(KeyFileError) as exc:
        load_public_key(path)
    _one_line(exc, path, "40-character")
    path.write_text('curve\n    public-key = "' + "~" * 40 + '"\n')
    with pytest.raises(KeyFileError) as exc:
        load_public_key(path)
    _one_line(exc, path, "not valid z85")


def test_mismatched_pair(tmp_path: Path) -> None:
    pub, _ = zmq.curve_keypair()
    _, sec = zmq.curve_keypair()
    path = tmp_path / "mixed.key_secret"
    path.write_text(f'curve\n    public-key = "{pub.decode()}"\n    secret-key = "{sec.decode()}"\n')
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as exc:
        load_keypair(path)
    _one_line(exc, path, "do not belong together")


def test_public_file_given_as_secret(tmp_path: Path) -> None:
    public, _ = generate_keypair("p", tmp_path)
    with pytest.raises(KeyFileError) as exc:
        load_keypair(public)
    _one_line(exc, public, "no secret-key")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_secret_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    _, secret = generate_keypair("s", tmp_path)
    secret.chmod(mode)
    with pytest.raises(KeyFileError) as exc:
        load_keypair(secret)
    _one_line(exc, secret, f"mode {mode:04o}")
    assert "chmod 600" in str(exc.value)
    # the public half may still be taken from it (server_key may name either file)
    assert load_public_key(secret) == load_public_key(tmp_path / "s.key")


def test_key_dir(tmp_path: Path) -> None:
    assert load_key_dir(tmp_path / "missing") == {}
    a, _ = generate_keypair("a", tmp_path)
    b, _ = generate_keypair("b", tmp_path)
    (tmp_path / "notes.txt").write_text("ignored")
    keys = load_key_dir(tmp_path)
    assert keys == {load_public_key(a): str(a), load_public_key(b): str(b)}
    (tmp_path / "bad.key").write_text("garbage")
    with pytest.raises(KeyFileError, match="bad.key"):
        load_key_dir(tmp_path)


def test_client_keys(tmp_path: Path) -> None:
    assert client_keys(None, None) is None
    srv_pub, srv_sec = generate_keypair("srv", tmp_path)
    _, me_sec = generate_keypair("me", tmp_path)
    me = load_keypair(me_sec)
    assert client_keys(me_sec, srv_pub) == (me, load_public_key(srv_pub))
    assert client_keys(str(me_sec), str(srv_sec)) == (me, load_public_key(srv_pub))
    with pytest.raises(KeyFileError, match="--server-key given without --secret-key"):
        client_keys(None, srv_pub)
    with pytest.raises(KeyFileError, match="--secret-key given without --server-key"):
        client_keys(me_sec, None)
