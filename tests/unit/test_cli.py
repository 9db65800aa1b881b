"""The `credits` command's help and version, and the probe that refuses a port in use."""

from __future__ import annotations

import argparse
import importlib.metadata
import socket

import pytest

from server import cli, serving

COMMANDS = ("serve", "token", "worker", "check-config", "webhooks", "export")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    found: dict[str, argparse.ArgumentParser] = actions[0].choices
    return found


def test_every_command_is_described_in_its_help() -> None:
    commands = subcommands()
    assert set(commands) == set(COMMANDS)
    for name, command in commands.items():
        assert command.description, f"`credits {name} --help` has no description"
        assert "docs/configuration.md" in command.format_help(), name


def test_serve_help_says_configuration_comes_from_the_environment() -> None:
    text = " ".join(subcommands()["serve"].format_help().split())
    assert "Configuration comes from environment variables, not options" in text
    assert "docs/configuration.md" in text


def test_token_help_offers_init() -> None:
    assert "--init" in subcommands()["token"].format_help()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.parser().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"credits {importlib.metadata.version('credits')}\n"


def test_a_bound_port_is_refused_by_name() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        with pytest.raises(serving.AddressUnavailable) as refused:
            serving.ensure_free(address)
    assert str(refused.value) == (
        f"cannot listen on {address}: the address is already in use (another server?)"
    )


def test_a_free_port_and_port_0_pass() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serving.ensure_free(f"127.0.0.1:{port}")
    serving.ensure_free("127.0.0.1:0")


def test_connections_left_in_time_wait_do_not_hold_the_port() -> None:
    """A server restarted at once must not be refused for its own closed connections."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc's servers do
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        accepted.close()  # the server's side closes first: its end goes to TIME_WAIT
        client.recv(1)
        client.close()
    serving.ensure_free(address)
