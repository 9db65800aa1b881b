"""`credits serve` with its Connect edge, as a process: SIGTERM stops both edges together (an
open WatchGeneration over Connect ends at once with SERVER_STOPPING, the HTTP port closes, the
process exits 0), and CREDITS_PROCESSES runs the edge in every process on one shared port."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fixtures.connect import envelope, envelopes, failure_of
from tests.fixtures.process import ServeProcess, free_port, scratch_dir, serving

WATCH = "/credits.v1.GenerationService/WatchGeneration"
CREATE = "/credits.v1.GenerationService/CreateGeneration"
GET_BALANCE = "/credits.v1.CreditService/GetBalance"
USER = "6c0d4b9e-2f1a-4e3b-8c7d-5a9e1f2b3c4d"


def http_env(**extra: str) -> dict[str, str]:
    return {"CREDITS_HTTP_LISTEN": f"127.0.0.1:{free_port()}", **extra}


def base(proc: ServeProcess) -> str:
    assert proc.http_address is not None
    return f"http://{proc.http_address}"


def log_messages(proc: ServeProcess) -> list[str]:
    messages = []
    for line in proc.log().splitlines():
        try:
            messages.append(str(json.loads(line)["message"]))
        except (ValueError, KeyError):
            continue
    return messages


def refuses_connections(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.fixture
def single() -> Iterator[ServeProcess]:
    with (
        scratch_dir("credits-e2e-connect-") as workdir,
        serving(workdir, extra_env=http_env()) as proc,
    ):
        yield proc


def test_sigterm_ends_a_connect_watch_and_stops_both_edges(single: ServeProcess) -> None:
    token = single.token("--user", USER)
    headers = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base(single), timeout=30) as http:
        assert http.get("/healthz").status_code == 200
        json_headers = {**headers, "content-type": "application/json"}
        assert http.post(GET_BALANCE, content=b"{}", headers=json_headers).status_code == 200
        grant = {"userId": USER, "amount": "50", "idempotencyKey": "e2e-connect"}
        service = {"authorization": f"Bearer {single.token('--service')}"}
        granted = http.post("/credits.v1.CreditService/GrantCredits", json=grant, headers=service)
        assert granted.status_code == 200, granted.text
        slow = {"delay_ms": "60000"}
        created = http.post(
            CREATE,
            json={"model": "demo-image", "prompt": "slow", "parameters": slow, "requestId": "w"},
            headers=headers,
        )
        assert created.status_code == 200, created.text
        generation_id = created.json()["generation"]["generationId"]
        request = envelope(json.dumps({"generationId": generation_id}).encode())
        stream_headers = {**headers, "content-type": "application/connect+json"}
        with http.stream("POST", WATCH, content=request, headers=stream_headers) as watch:
            assert watch.status_code == 200
            chunks = watch.iter_bytes()
            first = next(chunks)  # the generation as it is: the watch is open
            assert json.loads(envelopes(first)[0][1])["generation"]["generationId"] == generation_id
            stopping = time.monotonic()
            single.send_signal(signal.SIGTERM)
            rest = b"".join(chunks)
    ended_in = time.monotonic() - stopping
    [*_, (flags, end)] = envelopes(first + rest)
    stopped = failure_of(json.loads(end)["error"], 200, httpx.Headers())
    assert (flags, stopped.code, stopped.reason) == (2, "unavailable", "SERVER_STOPPING")
    assert stopped.retry_delay_seconds == 1
    assert ended_in < 5, f"the watch held the stop for {ended_in:.1f} s"
    # The 60 s generation keeps its worker for the whole 10 s grace before it is cut short, so
    # the process ends after that and its cleanup: about 13 s, more on a loaded machine.
    assert single.wait(30) == 0, single.describe()
    assert refuses_connections(single.http_address or ""), single.describe()
    assert refuses_connections(single.address), single.describe()


def test_processes_serve_the_connect_edge_on_one_port() -> None:
    extra = http_env(CREDITS_PROCESSES="2")
    with (
        scratch_dir("credits-e2e-connect-processes-") as workdir,
        serving(workdir, extra_env=extra) as proc,
    ):
        port = (proc.http_address or "").rsplit(":", 1)[1]
        deadline = time.monotonic() + 15
        while True:
            children = [m for m in log_messages(proc) if m.startswith("credits process ")]
            if len(children) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(children) == 2, proc.describe()
        assert all(f", Connect on port {port}" in message for message in children), children
        serving_line = [m for m in log_messages(proc) if m.startswith("credits serving on")]
        assert serving_line, proc.describe()
        assert f"Connect on {proc.http_address}" in serving_line[0]
        token = proc.token("--user", USER)
        for _ in range(6):  # fresh connections, spread over both processes
            with httpx.Client(base_url=base(proc), timeout=10) as http:
                answer = http.post(
                    GET_BALANCE,
                    content=b"{}",
                    headers={
                        "authorization": f"Bearer {token}",
                        "content-type": "application/json",
                    },
                )
                assert answer.status_code == 200, answer.text
                assert http.get("/healthz").status_code == 200
