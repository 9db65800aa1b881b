"""Server credentials for TLS and mutual TLS, read from the configured PEM files."""

from __future__ import annotations

from pathlib import Path

import grpc

from server.config import Settings


class TlsConfigurationError(ValueError):
    """The TLS settings are incomplete or a file cannot be read; the message says which."""


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for the listening port, or None for plaintext (nothing configured).

    With CREDITS_TLS_CLIENT_CA set, clients must present a certificate that CA signed.
    """
    cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsConfigurationError(
                "CREDITS_TLS_CLIENT_CA needs CREDITS_TLS_CERT and CREDITS_TLS_KEY"
            )
        return None
    if cert is None or key is None:
        raise TlsConfigurationError("set both CREDITS_TLS_CERT and CREDITS_TLS_KEY")
    return grpc.ssl_server_credentials(
        [(_read(key, "CREDITS_TLS_KEY"), _read(cert, "CREDITS_TLS_CERT"))],
        root_certificates=_read(client_ca, "CREDITS_TLS_CLIENT_CA") if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsConfigurationError(f"{name}: cannot read {path} ({error.strerror})") from None
