"""CURVE key files: make them, read them, and refuse bad ones in one line.

Files are in pyzmq's certificate format (``zmq.auth.load_certificate`` reads
what we write and we read with it), so keys made by other ZeroMQ tools work
too. Every problem is a :class:`~sqm.errors.KeyFileError` whose message names
the file: a traceback about a key file helps nobody at 3 a.m.
"""

from __future__ import annotations

import datetime
import os
import stat
import struct
from pathlib import Path
from typing import NamedTuple

import zmq
import zmq.auth
from zmq.utils import z85

from ..errors import KeyFileError

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
SECRET_MODE = 0o600
Z85_KEY_LEN = 40  # a 32-byte CURVE key in z85


class KeyPair(NamedTuple):
    """A CURVE key pair as z85 bytes, the form ZeroMQ socket options take."""

    public: bytes
    secret: bytes


def _fail(path: str | os.PathLike[str], problem: str) -> KeyFileError:
    return KeyFileError(f"key file {os.fspath(path)}: {problem}")


def _check_z85(path: str | os.PathLike[str], what: str, key: bytes) -> bytes:
    if len(key) != Z85_KEY_LEN:
        raise _fail(path, f"{what} is not a 40-character z85 CURVE key")
    try:
        z85.decode(key)
    except (ValueError, KeyError, struct.error):  # what z85.decode raises on bad input
        raise _fail(path, f"{what} is not valid z85") from None
    return key


def _read(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    """Public and (if present) secret key of a certificate file, validated."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise _fail(p, "not found") from None
    except OSError as exc:
        raise _fail(p, f"cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _fail(p, "not a regular file")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except OSError as exc:
        raise _fail(p, f"cannot read it ({exc.strerror or exc})") from None
    except ValueError:
        raise _fail(p, "no public-key in it (not a ZeroMQ certificate; make one with 'sqm keygen')") from None
    _check_z85(p, "public-key", public)
    if secret is not None:
        _check_z85(p, "secret-key", secret)
        if zmq.curve_public(secret) != public:
            raise _fail(p, "public-key and secret-key do not belong together")
    return public, secret


def load_keypair(path: str | os.PathLike[str]) -> KeyPair:
    """Read a ``.key_secret`` file: our own identity.

    Refuses a file that group or others may read, as ssh does: a secret
    anyone on the host can read is no secret.
    """
    public, secret = _read(path)
    if secret is None:
        raise _fail(path, "no secret-key in it (give the .key_secret file, not the public .key)")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise _fail(path, f"readable by group or others (mode {mode:04o}); run: chmod 600 {os.fspath(path)}")
    return KeyPair(public, secret)


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The public key (z85) of a ``.key`` or ``.key_secret`` file.

    ``server_key`` may name either file; only the public half is used, so
    the secret file's mode is not checked here.
    """
    return _read(path)[0]


def load_key_dir(directory: str | os.PathLike[str]) -> dict[bytes, str]:
    """Public keys (z85) of every ``*.key`` file in ``directory`` -> file path.

    A missing directory holds no keys (a deployment may have no admins). A
    bad file in it is an error naming that file, not a silently ignored key.
    """
    d = os.fspath(directory)
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise KeyFileError(f"key directory {d}: cannot list it ({exc.strerror})") from None
    keys: dict[bytes, str] = {}
    for name in names:
        if name.endswith(PUBLIC_SUFFIX) and not name.startswith("."):
            path = os.path.join(d, name)
            keys[load_public_key(path)] = path
    return keys


def _cert_text(kind: str, public: bytes, secret: bytes | None) -> str:
    """A certificate in the zcert/pyzmq layout (metadata and curve sections)."""
    lines = [
        f"#   ****  Generated on {datetime.datetime.now():%Y-%m-%d %H:%M:%S} by sqm keygen  ****",
        f"#   ZeroMQ CURVE {kind} Certificate",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write(path: str, text: str, mode: int, overwrite: bool) -> None:
    """Write ``text`` with ``mode`` from the first byte (never briefly world-readable)."""
    if not overwrite:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(path, flags, mode)
        except FileExistsError:
            raise _fail(path, "already exists (use --force to replace it)") from None
        except OSError as exc:
            raise _fail(path, f"cannot create it ({exc.strerror})") from None
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
        os.chmod(path, mode)  # the umask may have narrowed it; never widened
        return
    tmp = f"{path}.tmp{os.getpid()}"
    _write(tmp, text, mode, overwrite=False)
    os.replace(tmp, path)


def valid_key_name(name: str) -> bool:
    """A key NAME is a plain file name: no path separators, not hidden, not empty."""
    return bool(name) and "/" not in name and "\x00" not in name and not name.startswith(".")


def generate_keypair(
    name: str, directory: str | os.PathLike[str] = ".", *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Make a new pair: ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (0600).

    Returns the two paths. The directory is created (owner-only) if missing.
    """
    if not valid_key_name(name):
        raise KeyFileError(f"key name {name!r}: must be a plain file name (no '/', not starting with '.')")
    d = os.fspath(directory)
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"key directory {d}: cannot create it ({exc.strerror})") from None
    public, secret = zmq.curve_keypair()
    public_path = os.path.join(d, name + PUBLIC_SUFFIX)
    secret_path = os.path.join(d, name + SECRET_SUFFIX)
    if not overwrite:
        for p in (public_path, secret_path):
            if os.path.lexists(p):
                raise _fail(p, "already exists (use --force to replace it)")
    _write(secret_path, _cert_text("**Secret**", public, secret), SECRET_MODE, overwrite)
    _write(public_path, _cert_text("Public", public, None), 0o644, overwrite)
    return Path(public_path), Path(secret_path)


def client_keys(
    secret_key: str | os.PathLike[str] | None, server_key: str | os.PathLike[str] | None
) -> tuple[KeyPair, bytes] | None:
    """A client's CURVE settings from its two options: (own pair, server public key).

    None when neither is given (a plain client). One without the other is a
    one-line KeyFileError: half a configuration must not silently mean
    "insecure".
    """
    if secret_key is None and server_key is None:
        return None
    if secret_key is None:
        raise KeyFileError("--server-key given without --secret-key: a secured client needs both")
    if server_key is None:
        raise KeyFileError("--secret-key given without --server-key: a secured client needs both")
    return load_keypair(secret_key), load_public_key(server_key)
