"""Settings read once from the environment (names from the public contract)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MIB = 1024 * 1024
# The Connect edge's address when CREDITS_HTTP_LISTEN is unset (`make run`).
HTTP_LISTEN = "127.0.0.1:8080"
# The most credits a limit may name: PostgreSQL's bigint.
_MAX_CREDITS = 2**63 - 1
# The units of a duration setting (CREDITS_SIGNUP_CREDITS_TTL), in seconds.
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_DURATION_SECONDS = 100 * 366 * 86400
# The longest expiry notice (CREDITS_EXPIRY_NOTICE): what credit_configure_events takes.
MAX_NOTICE = 366 * 86400
COMPRESSIONS = ("none", "gzip", "deflate")


@dataclass(frozen=True, slots=True)
class SupabaseProject:
    """A Supabase project reached through its REST API."""

    url: str
    anon_key: str = field(repr=False)
    service_key: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service is configured with. Secrets are never printed (repr=False)."""

    listen: str = "127.0.0.1:50051"
    database_url: str | None = None
    supabase_url: str | None = None
    supabase_anon_key: str | None = None
    supabase_service_role_key: str | None = None
    jwt_secret: str | None = None
    jwks_url: str | None = None
    jwt_audience: str = "authenticated"
    # The `iss` users' tokens must carry; None: not checked.
    jwt_issuer: str | None = None
    data_dir: Path = Path(".data")
    signup_credits: int = 0
    # How long signup credits last, in seconds (CREDITS_SIGNUP_CREDITS_TTL); None: forever.
    signup_credits_ttl_seconds: int | None = None
    metrics_listen: str | None = None
    # The spending limits every user has unless they have their own (CREDITS_DEFAULT_DAILY_LIMIT,
    # CREDITS_DEFAULT_MONTHLY_LIMIT); None: none.
    default_daily_limit: int | None = None
    default_monthly_limit: int | None = None
    # The most generations one user may have queued or running (CREDITS_MAX_ACTIVE_GENERATIONS).
    max_active_generations: int = 8
    # The secret API key a trusted service may send as its bearer instead of a JWT.
    service_api_key: str | None = None
    # The key that signs page tokens; None: kept or derived as server/auth/page_key.py says.
    page_token_key: str | None = None
    # How long a rejected service credential keeps calls on the user layer before a retry.
    breaker_seconds: float = 30.0
    # The model catalogue file; None for the one shipped with the service.
    models_path: Path | None = None
    # Generation workers inside `credits serve` (0: run them with `credits worker`).
    workers: int = 8
    # How long a worker's claim on a job lasts unless renewed (a dead worker's job waits this).
    worker_lease_seconds: int = 30
    # The default low-balance thresholds (CREDITS_LOW_BALANCE_THRESHOLDS), ascending.
    low_balance_thresholds: tuple[int, ...] = ()
    # grant.expiring goes out this long before a grant expires (CREDITS_EXPIRY_NOTICE).
    expiry_notice_seconds: int = 3 * 86400
    # Webhook deliverers inside `credits serve` (CREDITS_WEBHOOK_DELIVERERS; 0: none) and how
    # long one POST may take (CREDITS_WEBHOOK_TIMEOUT_SECONDS).
    webhook_deliverers: int = 4
    webhook_timeout_seconds: float = 10.0
    # PEM files: the server's certificate chain and key (TLS), and the CA that signs the
    # certificates clients must present (mutual TLS). Unset: plaintext.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # The Connect edge's address (CREDITS_HTTP_LISTEN, which defaults to HTTP_LISTEN); None: no
    # HTTP edge (the default here, so that servers built in code bind no fixed port).
    http_listen: str | None = None
    # Origins whose browser apps may call the Connect edge (CORS); "*" for any. Empty: none.
    http_cors_origins: tuple[str, ...] = ()
    # Serving options of the gRPC server (server/serving.py turns them into channel options).
    max_receive_message_bytes: int = 4 * MIB
    # Generation outputs are bytes: answers may be larger than requests.
    max_send_message_bytes: int = 16 * MIB
    # What one generation request may carry, in bytes of UTF-8: its prompt, and its
    # parameters' keys and values together.
    max_prompt_bytes: int = 16 * 1024
    max_parameters_bytes: int = 32 * 1024
    # How often the server pings an idle connection, and how long it waits for the answer.
    keepalive_seconds: int = 60
    keepalive_timeout_seconds: int = 20
    # Concurrent calls per client connection.
    max_concurrent_streams: int = 100
    # How the server compresses its responses: none, gzip or deflate.
    compression: str = "none"
    # Server processes `credits serve` runs on the one port (SO_REUSEPORT).
    processes: int = 1
    # Connections each process keeps to PostgreSQL (DATABASE_URL or embedded).
    db_pool_size: int = 10
    # How long a database call may take (a connection and the answer) before the caller gets
    # UNAVAILABLE / BACKEND_UNAVAILABLE: well under callers' deadlines, and cut shorter to fit
    # within a call's own deadline.
    db_timeout_seconds: float = 3.0

    def __repr__(self) -> str:
        mode = "embedded" if self.embedded else "supabase" if self.uses_supabase_api else "postgres"
        return f"Settings(listen={self.listen!r}, database={mode}, data_dir={self.data_dir!s})"

    @property
    def embedded(self) -> bool:
        """True when the service runs its own PostgreSQL (no database configured)."""
        return not self.database_url and not self.supabase_url

    @property
    def uses_supabase_api(self) -> bool:
        """True when data goes through the Supabase REST API (DATABASE_URL, if also set, wins:
        it is the shorter path; SUPABASE_URL then still names the JWKS)."""
        return bool(self.supabase_url) and not self.database_url

    @property
    def supabase_project(self) -> SupabaseProject | None:
        """The project data goes through, when that is the REST API and all its keys are set."""
        url, anon, service = (
            self.supabase_url,
            self.supabase_anon_key,
            self.supabase_service_role_key,
        )
        if not self.uses_supabase_api or not url or not anon or not service:
            return None
        return SupabaseProject(url, anon, service)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from the environment; ValueError naming the variable for a bad value (a
        variable set to a blank value included: it is a mistake, not a way to unset it)."""
        read = _Reader(os.environ if env is None else env)
        supabase_url = read.http_url("SUPABASE_URL")
        # Supabase Auth signs as the project's auth endpoint and publishes its keys there.
        auth_url = supabase_url.rstrip("/") + "/auth/v1" if supabase_url else None
        return cls(
            listen=read.address("CREDITS_LISTEN") or "127.0.0.1:50051",
            database_url=read.postgres_url("DATABASE_URL"),
            supabase_url=supabase_url,
            supabase_anon_key=read.text("SUPABASE_ANON_KEY"),
            supabase_service_role_key=read.text("SUPABASE_SERVICE_ROLE_KEY"),
            jwt_secret=read.text("SUPABASE_JWT_SECRET"),
            jwks_url=read.http_url("CREDITS_JWKS_URL")
            or (auth_url and auth_url + "/.well-known/jwks.json"),
            jwt_audience=read.text("CREDITS_JWT_AUDIENCE") or "authenticated",
            jwt_issuer=read.text("CREDITS_JWT_ISSUER") or auth_url,
            data_dir=read.path("CREDITS_DATA_DIR") or Path(".data"),
            signup_credits=read.whole("CREDITS_SIGNUP_CREDITS", 0, minimum=0),
            signup_credits_ttl_seconds=read.duration("CREDITS_SIGNUP_CREDITS_TTL"),
            metrics_listen=read.address("CREDITS_METRICS_LISTEN"),
            default_daily_limit=read.credits("CREDITS_DEFAULT_DAILY_LIMIT"),
            default_monthly_limit=read.credits("CREDITS_DEFAULT_MONTHLY_LIMIT"),
            max_active_generations=read.whole("CREDITS_MAX_ACTIVE_GENERATIONS", 8),
            service_api_key=read.text("CREDITS_SERVICE_API_KEY"),
            page_token_key=read.text("CREDITS_PAGE_TOKEN_KEY"),
            breaker_seconds=read.seconds("CREDITS_BREAKER_SECONDS", 30.0),
            models_path=read.path("CREDITS_MODELS"),
            workers=read.whole("CREDITS_WORKERS", 8, minimum=0),
            worker_lease_seconds=read.whole("CREDITS_WORKER_LEASE_SECONDS", 30),
            low_balance_thresholds=read.thresholds("CREDITS_LOW_BALANCE_THRESHOLDS"),
            expiry_notice_seconds=read.duration("CREDITS_EXPIRY_NOTICE", maximum=MAX_NOTICE)
            or 3 * 86400,
            webhook_deliverers=read.whole("CREDITS_WEBHOOK_DELIVERERS", 4, minimum=0),
            webhook_timeout_seconds=read.seconds(
                "CREDITS_WEBHOOK_TIMEOUT_SECONDS", 10.0, positive=True
            ),
            tls_cert=read.path("CREDITS_TLS_CERT"),
            tls_key=read.path("CREDITS_TLS_KEY"),
            tls_client_ca=read.path("CREDITS_TLS_CLIENT_CA"),
            http_listen=read.address_or_off("CREDITS_HTTP_LISTEN", HTTP_LISTEN),
            http_cors_origins=read.origins("CREDITS_HTTP_CORS_ORIGINS"),
            max_receive_message_bytes=read.whole("CREDITS_MAX_RECEIVE_MESSAGE_BYTES", 4 * MIB),
            max_send_message_bytes=read.whole("CREDITS_MAX_SEND_MESSAGE_BYTES", 16 * MIB),
            max_prompt_bytes=read.whole("CREDITS_MAX_PROMPT_BYTES", 16 * 1024),
            max_parameters_bytes=read.whole("CREDITS_MAX_PARAMETERS_BYTES", 32 * 1024),
            keepalive_seconds=read.whole("CREDITS_KEEPALIVE_SECONDS", 60),
            keepalive_timeout_seconds=read.whole("CREDITS_KEEPALIVE_TIMEOUT_SECONDS", 20),
            max_concurrent_streams=read.whole("CREDITS_MAX_CONCURRENT_STREAMS", 100),
            compression=read.choice("CREDITS_COMPRESSION", COMPRESSIONS),
            processes=read.whole("CREDITS_PROCESSES", 1),
            db_pool_size=read.whole("CREDITS_DB_POOL_SIZE", 10),
            db_timeout_seconds=read.seconds("CREDITS_DB_TIMEOUT_SECONDS", 3.0, positive=True),
        )


class _Reader:
    """Typed reads of environment variables; each bad value is a ValueError naming it."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str | None:
        """The variable, stripped; None when unset. Set but blank is an error: an empty
        SUPABASE_URL silently meaning "embedded mode" hides a broken deployment."""
        value = self._env.get(name)
        if value is None:
            return None
        if not value.strip():
            raise ValueError(f"{name} is set but empty; unset it or give it a value")
        return value.strip()

    def http_url(self, name: str) -> str | None:
        """An http:// or https:// URL with a host; None when unset."""
        url = self.text(name)
        if url is not None:
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - raises ValueError for a port that is not one
            except ValueError:
                parts = None
            if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"{name} must be an http:// or https:// URL with a host (got {url!r})"
                )
        return url

    def postgres_url(self, name: str) -> str | None:
        """A postgresql:// (or postgres://) URL; None when unset. The value is never echoed:
        it may hold a password."""
        url = self.text(name)
        if url is not None:
            try:
                scheme = urlsplit(url).scheme
            except ValueError:
                scheme = ""
            if scheme.lower() not in ("postgresql", "postgres"):
                raise ValueError(f"{name} must be a postgresql:// (or postgres://) URL")
        return url

    def path(self, name: str) -> Path | None:
        text = self.text(name)
        return Path(text) if text else None

    def address(self, name: str) -> str | None:
        """A host:port address; None when unset."""
        address = self.text(name)
        if address is not None:
            try:
                host_port(address)
            except ValueError:
                raise ValueError(f"{name} must be host:port (got {address!r})") from None
        return address

    def address_or_off(self, name: str, default: str) -> str | None:
        """A host:port address, `default` when unset, None (off) when set to the empty string
        (the one variable where empty means something: blank, with spaces, is still an
        error)."""
        if self._env.get(name) == "":
            return None
        return self.address(name) or default

    def origins(self, name: str) -> tuple[str, ...]:
        """Comma-separated web origins (`scheme://host[:port]`, http or https, no path) or `*`;
        none when unset."""
        text = self.text(name)
        if text is None:
            return ()
        origins = tuple(part.strip() for part in text.split(","))
        for origin in origins:
            if origin != "*" and not _is_origin(origin):
                raise ValueError(
                    f"{name} must be comma-separated origins such as https://app.example.com "
                    f"(scheme://host[:port], no path) or * (got {origin!r})"
                )
        return origins

    def whole(self, name: str, default: int, *, minimum: int = 1) -> int:
        """A whole number >= `minimum`, or `default` when unset."""
        text = self.text(name)
        if text is None:
            return default
        if not (text.isascii() and text.isdigit()) or int(text) < minimum:
            raise ValueError(f"{name} must be a whole number >= {minimum} (got {text!r})")
        return int(text)

    def credits(self, name: str) -> int | None:
        """A number of credits from 1 to 2^63 - 1 (the ledger's largest), or None when unset."""
        text = self.text(name)
        if text is None:
            return None
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= _MAX_CREDITS:
            raise ValueError(f"{name} must be a whole number of credits >= 1 (got {text!r})")
        return int(text)

    def seconds(self, name: str, default: float, *, positive: bool = False) -> float:
        """A number of seconds (with `positive`, a finite one above 0), or `default`."""
        text = self.text(name)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number of seconds (got {text!r})") from None
        if positive and not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a number of seconds above 0 (got {text!r})")
        return value

    def thresholds(self, name: str) -> tuple[int, ...]:
        """Comma-separated whole numbers above 0, at most 10, kept ascending without
        repeats; none when unset."""
        text = self.text(name)
        if text is None:
            return ()
        parts = [part.strip() for part in text.split(",")]
        if (
            not all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts)
            or len(set(parts)) > 10
        ):
            raise ValueError(
                f"{name} must be at most 10 comma-separated whole numbers above 0 (got {text!r})"
            )
        return tuple(sorted({int(p) for p in parts}))

    def duration(self, name: str, maximum: int | None = None) -> int | None:
        """A duration in whole seconds, above 0: a number with a unit, `s`, `m`, `h` or `d`
        (`30d`, `12h`, `90m`), or a number of seconds alone; None when unset."""
        text = self.text(name)
        if text is None:
            return None
        number, unit = (text[:-1], text[-1].lower()) if text[-1:].isalpha() else (text, "s")
        if not (number.isascii() and number.isdigit()) or unit not in _DURATION_UNITS:
            raise ValueError(
                f"{name} must be a duration such as 30d, 12h, 90m or 3600 (seconds) (got {text!r})"
            )
        seconds = int(number) * _DURATION_UNITS[unit]
        if not 0 < seconds <= _MAX_DURATION_SECONDS:
            raise ValueError(f"{name} must be more than 0 and at most 100 years (got {text!r})")
        if maximum is not None and seconds > maximum:
            raise ValueError(f"{name} must be at most {maximum // 86400} days (got {text!r})")
        return seconds

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        """One of `choices` (any case); the first when unset."""
        text = (self.text(name) or choices[0]).lower()
        if text not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}")
        return text


def _is_origin(text: str) -> bool:
    """True for a web origin as browsers send it: http(s)://host[:port], nothing after."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and not (parts.path or parts.query or parts.fragment or parts.username or parts.password)
        and text == f"{parts.scheme}://{parts.netloc}"
    )


def host_port(address: str) -> tuple[str, int]:
    """("host", port) of a "host:port" address: "[::1]:50051" gives "::1", ":50051" an empty
    host (every interface); ValueError if it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"not a host:port address: {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)
