"""TLS and mutual TLS on the real server, with certificates the test makes."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from credits_client import TLS, AsyncCreditsClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc
from server import app as application
from server.config import Settings
from server.tls import TlsConfigurationError, server_credentials
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.server import new_user, settings_for

Key = ec.EllipticCurvePrivateKey


@dataclasses.dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, key: Key, issuer: tuple[x509.Name, Key] | None, *, ca: bool) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclasses.dataclass(frozen=True)
class Authority:
    """A test CA and what it signed: the server's certificate and a client's."""

    ca: bytes
    server: Pem
    client: Pem

    @classmethod
    def make(cls) -> Authority:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _issue("credits test CA", ca_key, None, ca=True)
        signer = (_name("credits test CA"), ca_key)
        server_key, client_key = (
            ec.generate_private_key(ec.SECP256R1()),
            ec.generate_private_key(ec.SECP256R1()),
        )
        return cls(
            ca,
            Pem(_issue("localhost", server_key, signer, ca=False), _key_pem(server_key)),
            Pem(_issue("a client", client_key, signer, ca=False), _key_pem(client_key)),
        )

    def write(self, folder: Path) -> dict[str, Path]:
        files = {
            "ca": self.ca,
            "cert": self.server.cert,
            "key": self.server.key,
        }
        paths = {name: folder / f"{name}.pem" for name in files}
        for name, data in files.items():
            paths[name].write_bytes(data)
        return paths


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority.make()


async def _serve(database_url: str, supabase: FakeSupabase, **tls: Path) -> application.Application:
    settings = dataclasses.replace(settings_for("postgres", database_url, supabase), **tls)
    return await application.start(settings)


@pytest.fixture
async def tls_server(
    database_url: str, supabase: FakeSupabase, authority: Authority, tmp_path: Path
) -> AsyncIterator[application.Application]:
    paths = authority.write(tmp_path)
    app = await _serve(database_url, supabase, tls_cert=paths["cert"], tls_key=paths["key"])
    yield app
    await app.stop(grace=1)


@pytest.fixture
async def mtls_server(
    database_url: str, supabase: FakeSupabase, authority: Authority, tmp_path: Path
) -> AsyncIterator[application.Application]:
    paths = authority.write(tmp_path)
    app = await _serve(
        database_url,
        supabase,
        tls_cert=paths["cert"],
        tls_key=paths["key"],
        tls_client_ca=paths["ca"],
    )
    yield app
    await app.stop(grace=1)


async def _balance(channel: grpc.aio.Channel) -> int:
    user = new_user()
    stub = credit_service_pb2_grpc.CreditServiceStub(channel)
    reply = await stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata, timeout=5)
    return reply.balance


async def test_tls_serves_clients_that_trust_its_ca(
    tls_server: application.Application, authority: Authority
) -> None:
    trusted = grpc.ssl_channel_credentials(root_certificates=authority.ca)
    async with grpc.aio.secure_channel(f"localhost:{tls_server.port}", trusted) as channel:
        assert await _balance(channel) == 0


async def test_tls_refuses_plaintext(tls_server: application.Application) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _balance(channel)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_wants_a_client_certificate_its_ca_signed(
    mtls_server: application.Application, authority: Authority
) -> None:
    address = f"localhost:{mtls_server.port}"
    anonymous = grpc.ssl_channel_credentials(root_certificates=authority.ca)
    async with grpc.aio.secure_channel(address, anonymous) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _balance(channel)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    identified = grpc.ssl_channel_credentials(
        root_certificates=authority.ca,
        private_key=authority.client.key,
        certificate_chain=authority.client.cert,
    )
    async with grpc.aio.secure_channel(address, identified) as channel:
        assert await _balance(channel) == 0


def test_plaintext_is_the_default() -> None:
    assert server_credentials(Settings()) is None


@pytest.mark.parametrize(
    ("cert", "key", "ca", "complaint"),
    [
        ("cert.pem", None, None, "both"),
        (None, "key.pem", None, "both"),
        (None, None, "ca.pem", "CREDITS_TLS_CLIENT_CA needs"),
        ("missing.pem", "key.pem", None, "CREDITS_TLS_CERT: cannot read"),
    ],
)
def test_incomplete_tls_settings_say_what_is_missing(
    tmp_path: Path, cert: str | None, key: str | None, ca: str | None, complaint: str
) -> None:
    (tmp_path / "key.pem").write_bytes(b"not used")

    def at(name: str | None) -> Path | None:
        return tmp_path / name if name else None

    settings = Settings(tls_cert=at(cert), tls_key=at(key), tls_client_ca=at(ca))
    with pytest.raises(TlsConfigurationError, match=complaint):
        server_credentials(settings)


async def test_the_client_package_presents_its_certificate(
    mtls_server: application.Application, authority: Authority
) -> None:
    tls = TLS(
        root_certificates=authority.ca,
        private_key=authority.client.key,
        certificate_chain=authority.client.cert,
    )
    token = new_user().metadata[0][1].removeprefix("Bearer ")
    address = f"localhost:{mtls_server.port}"
    async with AsyncCreditsClient(address, credentials=token, tls=tls) as client:
        assert (await client.get_balance()).balance == 0
