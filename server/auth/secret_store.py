"""The legacy HS256 JWT secret of embedded mode: made once, kept in `<data_dir>/jwt_secret`.

Tokens signed with it stay valid across restarts. The secret is never logged or printed. The
key that signs page tokens is kept the same way, in `<data_dir>/page_token_key`.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

_logger = logging.getLogger(__name__)

SECRET_FILE_NAME = "jwt_secret"  # noqa: S105 - a file name, not a secret
PAGE_TOKEN_KEY_FILE_NAME = "page_token_key"  # noqa: S105 - a file name, not a key
# token_urlsafe(48) carries 48 random bytes (384 bits) in 64 characters.
_SECRET_BYTES = 48
_MIN_LENGTH = 32


def secret_path(data_dir: Path) -> Path:
    """Where the secret of `data_dir` is kept."""
    return Path(data_dir) / SECRET_FILE_NAME


def load_or_create_jwt_secret(data_dir: Path) -> str:
    """Return the secret stored in `data_dir`, creating it (mode 0600) if there is none yet."""
    return _load_or_create(secret_path(data_dir))


def load_or_create_page_token_key(data_dir: Path) -> str:
    """The page token key stored in `data_dir`, created (mode 0600) as the JWT secret is."""
    return _load_or_create(Path(data_dir) / PAGE_TOKEN_KEY_FILE_NAME)


def _load_or_create(path: Path) -> str:
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    _create(path, secrets.token_urlsafe(_SECRET_BYTES))
    # Read back rather than return ours: if another process won the race, its secret is the one.
    return _read(path)


def _create(path: Path, secret: str) -> None:
    """Publish `secret` at `path` unless a file is already there, never half-written.

    The secret goes to a private temporary file first (O_CREAT|O_EXCL, mode 0600), which is then
    hard-linked to its final name: link() fails if the name exists, so exactly one of several
    concurrent creators wins, and readers only ever see a complete file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secret + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            _logger.info("generated a new secret in %s", path)
        except FileExistsError:
            pass  # another process created it first; its secret wins
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> str:
    """Read the secret, tightening a too-open file mode and refusing an unusable secret."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        _logger.warning("%s was readable by others (mode %04o); setting it to 0600", path, mode)
        path.chmod(0o600)
    secret = path.read_text(encoding="ascii").strip()
    if len(secret) < _MIN_LENGTH:
        raise ValueError(
            f"{path} holds no usable secret (fewer than {_MIN_LENGTH} characters); "
            "delete it to have a new one generated, or set SUPABASE_JWT_SECRET (jwt_secret) or "
            "CREDITS_PAGE_TOKEN_KEY (page_token_key)"
        )
    return secret


__all__ = ["SECRET_FILE_NAME", "load_or_create_jwt_secret", "secret_path"]
