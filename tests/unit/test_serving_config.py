"""Serving options: read from the environment with their defaults, refused with a message that
names the variable, and turned into the gRPC server's channel options."""

from __future__ import annotations

import grpc
import pytest

from server import processes, serving
from server.config import MIB, Settings, host_port


def _serving(settings: Settings) -> tuple[object, ...]:
    return (
        settings.max_receive_message_bytes,
        settings.max_send_message_bytes,
        settings.keepalive_seconds,
        settings.keepalive_timeout_seconds,
        settings.max_concurrent_streams,
        settings.compression,
        settings.processes,
        settings.db_pool_size,
    )


def test_defaults_when_nothing_is_set() -> None:
    settings = Settings.from_env({})
    assert _serving(settings) == (4 * MIB, 16 * MIB, 60, 20, 100, "none", 1, 10)


def test_values_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "CREDITS_MAX_RECEIVE_MESSAGE_BYTES": "1024",
            "CREDITS_MAX_SEND_MESSAGE_BYTES": "2048",
            "CREDITS_KEEPALIVE_SECONDS": "30",
            "CREDITS_KEEPALIVE_TIMEOUT_SECONDS": "5",
            "CREDITS_MAX_CONCURRENT_STREAMS": "7",
            "CREDITS_COMPRESSION": "GZIP",
            "CREDITS_PROCESSES": "3",
            "CREDITS_DB_POOL_SIZE": "4",
        }
    )
    assert _serving(settings) == (1024, 2048, 30, 5, 7, "gzip", 3, 4)


@pytest.mark.parametrize(
    "name",
    [
        "CREDITS_MAX_RECEIVE_MESSAGE_BYTES",
        "CREDITS_MAX_SEND_MESSAGE_BYTES",
        "CREDITS_KEEPALIVE_SECONDS",
        "CREDITS_KEEPALIVE_TIMEOUT_SECONDS",
        "CREDITS_MAX_CONCURRENT_STREAMS",
        "CREDITS_PROCESSES",
        "CREDITS_DB_POOL_SIZE",
    ],
)
@pytest.mark.parametrize("value", ["0", "-1", "4MiB", "1.5", "²"])
def test_a_bad_number_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be a whole number >= 1 \(got '{value}'\)"):
        Settings.from_env({name: value})


@pytest.mark.parametrize("name", ["CREDITS_LISTEN", "CREDITS_METRICS_LISTEN"])
@pytest.mark.parametrize("value", ["50051", "localhost", "host:port", "host:70000", "host:5 0"])
def test_a_bad_address_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be host:port"):
        Settings.from_env({name: value})


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("[::1]:0", ("::1", 0)),
        (":9090", ("", 9090)),
        ("credits.internal:443", ("credits.internal", 443)),
    ],
)
def test_addresses_split_into_host_and_port(address: str, parts: tuple[str, int]) -> None:
    settings = Settings.from_env({"CREDITS_LISTEN": address, "CREDITS_METRICS_LISTEN": address})
    assert host_port(settings.listen) == parts
    assert settings.metrics_listen == address


def test_an_unknown_compression_lists_the_choices() -> None:
    choices = r"^CREDITS_COMPRESSION must be one of none, gzip, deflate$"
    with pytest.raises(ValueError, match=choices):
        Settings.from_env({"CREDITS_COMPRESSION": "brotli"})


def test_channel_options_carry_the_settings() -> None:
    settings = Settings.from_env(
        {
            "CREDITS_MAX_RECEIVE_MESSAGE_BYTES": "1000",
            "CREDITS_MAX_SEND_MESSAGE_BYTES": "2000",
            "CREDITS_KEEPALIVE_SECONDS": "45",
            "CREDITS_KEEPALIVE_TIMEOUT_SECONDS": "9",
            "CREDITS_MAX_CONCURRENT_STREAMS": "12",
        }
    )
    options = serving.channel_options(settings)
    assert len(options) == len(dict(options)), "an option is given twice"
    assert dict(options) == {
        "grpc.max_receive_message_length": 1000,
        "grpc.max_send_message_length": 2000,
        "grpc.keepalive_time_ms": 45_000,
        "grpc.keepalive_timeout_ms": 9_000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.min_ping_interval_without_data_ms": serving.MIN_CLIENT_PING_INTERVAL_MS,
        "grpc.max_concurrent_streams": 12,
        "grpc.http.overload_protection": 0,
        "grpc.max_metadata_size": serving.MAX_METADATA_BYTES,
        "grpc.absolute_max_metadata_size": serving.MAX_METADATA_BYTES,
        # One process shares its port with nobody: grpc's default (1) would let a second
        # server bind beside it.
        "grpc.so_reuseport": 0,
    }


def test_only_a_process_group_shares_its_port() -> None:
    group = Settings.from_env({"CREDITS_PROCESSES": "2"})
    assert dict(serving.channel_options(group))["grpc.so_reuseport"] == 1


@pytest.mark.parametrize(
    ("name", "algorithm"),
    [
        ("none", grpc.Compression.NoCompression),
        ("gzip", grpc.Compression.Gzip),
        ("deflate", grpc.Compression.Deflate),
    ],
)
def test_compression_names_map_to_grpc(name: str, algorithm: grpc.Compression) -> None:
    settings = Settings.from_env({"CREDITS_COMPRESSION": name})
    assert serving.compression(settings) is algorithm


def test_check_config_describes_the_serving_options() -> None:
    settings = Settings.from_env(
        {"CREDITS_PROCESSES": "2", "CREDITS_MAX_RECEIVE_MESSAGE_BYTES": "1000"}
    )
    assert serving.describe(settings) == (
        "2 processes; messages up to 1000 bytes in, 16 MiB out; keepalive "
        "every 60 s (timeout 20 s); 100 streams per connection; compression none"
    )


@pytest.mark.parametrize(
    ("listen", "index", "expected"),
    [
        (None, 1, None),
        ("127.0.0.1:9100", 0, "127.0.0.1:9100"),
        ("127.0.0.1:9100", 2, "127.0.0.1:9102"),
        ("0.0.0.0:0", 3, "0.0.0.0:0"),
    ],
)
def test_child_i_serves_metrics_on_port_plus_i(
    listen: str | None, index: int, expected: str | None
) -> None:
    settings = Settings(metrics_listen=listen, processes=4)
    assert processes.child_settings(settings, index).metrics_listen == expected
