"""The Connect edge over TLS: with CREDITS_TLS_CERT and CREDITS_TLS_KEY it speaks HTTPS with the
gRPC port's certificate and refuses plaintext; with CREDITS_TLS_CLIENT_CA it wants a client
certificate that CA signed, as the gRPC port does (tests/integration/test_tls.py)."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import httpx
import pytest

from server import app as application
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.server import new_user, settings_for
from tests.integration.test_tls import Authority


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority.make()


async def _balance(client: httpx.AsyncClient, port: int) -> httpx.Response:
    token = dict(new_user().metadata)["authorization"]
    return await client.post(
        f"https://localhost:{port}/credits.v1.CreditService/GetBalance",
        content=b"{}",
        headers={"authorization": token, "content-type": "application/json"},
    )


async def test_the_connect_edge_speaks_tls_and_asks_for_client_certificates(
    database_url: str, supabase: FakeSupabase, authority: Authority, tmp_path: Path
) -> None:
    paths = authority.write(tmp_path)
    (tmp_path / "client.pem").write_bytes(authority.client.cert)
    (tmp_path / "client-key.pem").write_bytes(authority.client.key)
    trust = ssl.create_default_context(cafile=str(paths["ca"]))
    for client_ca in (None, paths["ca"]):
        settings = dataclasses.replace(
            settings_for("postgres", database_url, supabase),
            tls_cert=paths["cert"],
            tls_key=paths["key"],
            tls_client_ca=client_ca,
        )
        app = await application.start(settings)
        try:
            assert app.http_port is not None
            async with httpx.AsyncClient(verify=trust, timeout=10) as client:
                if client_ca is None:
                    assert (await _balance(client, app.http_port)).status_code == 200
                else:
                    with pytest.raises(httpx.TransportError):
                        await _balance(client, app.http_port)  # no client certificate
            async with httpx.AsyncClient(timeout=10) as plain:
                with pytest.raises(httpx.TransportError):
                    await plain.get(f"http://localhost:{app.http_port}/healthz")
            identified = ssl.create_default_context(cafile=str(paths["ca"]))
            identified.load_cert_chain(tmp_path / "client.pem", tmp_path / "client-key.pem")
            async with httpx.AsyncClient(verify=identified, timeout=10) as client:
                assert (await _balance(client, app.http_port)).json()["balance"] == "0"
        finally:
            await app.stop(grace=1)
