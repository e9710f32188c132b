"""The one settings model: TOML file, then ``DROPCUT_*`` environment variables on top.

Built once at start (and again on SIGHUP); everything else receives it as a value.
Loading never touches the folders; :func:`startup_problems` checks them for ``run``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import sys
import tomllib
import zoneinfo
from collections.abc import Mapping
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from dropcut.recipes import DEFAULT_OUTPUTS, Folders, Recipe
from dropcut.settle import DEFAULT_IGNORE_DIRS, DEFAULT_IGNORE_PATTERNS

CREDENTIAL_NAME = "dropcut-api-key"
HTTP_TOKEN_CREDENTIAL = "dropcut-http-token"
MIN_HTTP_TOKEN = 16
SHARED_QUEUE_READY = True  # the daemon runs on queue_url (issue 13)
"""File name of the API key below ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``)."""

Positive = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]

# Keys whose change needs a restart (a reload that changes them is refused). Every other
# key is put in force by a reload (``Daemon._reload``): tests/test_service.py checks that
# each field of :class:`Settings` is one or the other.
RESTART_KEYS = (
    "inbox",
    "outbox",
    "quarantine",
    "archive",
    "state_dir",
    "watch_mode",
    # the HTTP client is built once: its base URL, timeouts and connection pool (a larger
    # max_in_flight than the pool would leave requests waiting for a connection, holding
    # a rate-limit slot, until they time out)
    "api_url",
    "request_timeout_seconds",
    "max_in_flight",
    # what is asked of the API, and what its answers are cached under
    "api_mode",
    "proxy_max_side",
    # the log renderer is chosen once
    "log_format",
    # the queue is opened once
    "queue_url",
    "queue_password_file",
    "site",
    "lease_seconds",
    # the listener is bound once (before the privileges it would need are gone), and its
    # token read with it
    "http_listen",
    "http_token",
    "http_token_file",
)


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line for the admin."""


_ASCII_SPACE = " \t\r\n\v\f"


class ApiKeyError(ConfigError):
    """The API key cannot be sent as an HTTP header value.

    The message names where the key came from and what is wrong, never the key or any part
    of it. ``fragments`` holds the key's runs of visible characters (the pieces that an
    HTTP library would quote back in its error text) so that a caller can still scrub
    them from what it shows (``dropcut status`` does); it is never part of ``str()`` or
    ``repr()``.
    """

    def __init__(self, message: str, fragments: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fragments = fragments


def _env_has(env: Mapping[str, str], name: str) -> bool:
    # pydantic-settings matches DROPCUT_* names case-insensitively
    return any(key.upper() == name and value.strip() for key, value in env.items())


def check_api_key(text: str, source: str) -> SecretStr:
    """``text`` (already stripped of surrounding whitespace) as the API key, if every
    character may appear in the ``X-API-Key`` header.

    Rule: visible US-ASCII only (``!`` to ``~``, 0x21-0x7E), i.e. RFC 9110 section 5.5
    ``field-vchar`` without ``obs-text`` (bytes 0x80-0xFF, which RFC 9110 leaves to be
    treated as opaque and httpx refuses to encode from ``str``) and without the spaces and
    tabs RFC 9110 would allow inside a value (no key has them: they come from a comment or
    a second word pasted into the file). Control characters, line breaks in particular,
    are what h11 refuses ("Illegal header value"), quoting the whole value.

    Raises:
        ApiKeyError: with ``source`` (``api_key``, ``DROPCUT_API_KEY``, ``api_key_file
            PATH``, ``systemd credential …``) and the kind of character found, never the
            key; its ``fragments`` are the key's runs of visible characters.
    """
    if all("!" <= ch <= "~" for ch in text):
        return SecretStr(text)
    if any(ch in "\r\n" for ch in text):
        problem = "more than one line (the key must be alone on one line, without comments)"
    elif any(ch in " \t" for ch in text):
        problem = "a space or tab inside it"
    elif any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        problem = "a control character"
    else:
        problem = "a character that is not ASCII"
    fragments = tuple(part for part in re.split(r"[^!-~]+", text) if part)
    raise ApiKeyError(
        f"the API key from {source} has {problem}: an HTTP header value may hold only "
        "visible ASCII characters (RFC 9110)",
        fragments,
    )


def _default_state_dir() -> Path:
    return Path(os.environ.get("STATE_DIRECTORY", "/var/lib/dropcut").split(":")[0])


class Settings(BaseSettings):
    """Every knob of the daemon. Field names are a public contract (TOML keys, env names)."""

    model_config = SettingsConfigDict(
        env_prefix="DROPCUT_",
        extra="forbid",
        validate_default=True,
        frozen=True,
    )

    # folders
    inbox: Path = Path("/srv/dropcut/inbox")
    outbox: Path = Path("/srv/dropcut/outbox")
    quarantine: Path = Path("/srv/dropcut/quarantine")
    archive: Path = Path("/srv/dropcut/archive")
    state_dir: Path = Field(default_factory=_default_state_dir)

    # the API
    api_url: str = "https://api.withoutbg.com"
    # "matte": a proxy of at most proxy_max_side px goes to /v1.0/alpha-channel and the
    # cut-out is rendered here at full resolution; "cutout": the file as it is goes to
    # /v1.0/image-without-background and its answer is the output.
    api_mode: Literal["matte", "cutout"] = "matte"
    api_max_upload_bytes: PositiveInt = 10 * 1024 * 1024  # the API's own limit (413 above it)
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    request_timeout_seconds: Positive = 60.0
    rate_limit_requests: PositiveInt = 7
    rate_limit_period_seconds: Positive = 60.0
    rate_limit_margin_seconds: Annotated[float, Field(ge=0)] | None = None
    max_in_flight: PositiveInt = 4
    credit_check_interval_seconds: Positive = 300.0
    credit_warn_below: int = 50

    # retries
    max_attempts: Annotated[int, Field(ge=8)] = 12
    retry_base_delay_seconds: Positive = 2.0
    retry_max_delay_seconds: Positive = 300.0

    # watching and settling
    watch_mode: Literal["auto", "native", "poll"] = "auto"
    poll_interval_seconds: Positive = 10.0
    rescan_interval_seconds: Positive = 300.0
    debounce_seconds: Annotated[float, Field(ge=0)] = 5.0
    max_settle_seconds: Positive = 1800.0
    corrupt_grace_seconds: Annotated[float, Field(ge=0)] = 30.0
    ignore_patterns: tuple[str, ...] = DEFAULT_IGNORE_PATTERNS
    ignore_dirs: tuple[str, ...] = DEFAULT_IGNORE_DIRS

    # files
    max_file_bytes: PositiveInt = 256 * 1024 * 1024  # the largest input dropcut reads
    proxy_max_side: Annotated[int, Field(ge=64, le=4096)] = 1024  # the model's inference size
    multi_frame: Literal["first", "quarantine"] = "first"  # multi-page TIFF, animated GIF/WebP
    strip_gps: bool = True  # outputs carry the original's EXIF, without its GPS position

    # outputs: what each input becomes (dropcut.recipes), for the whole inbox and per folder
    outputs: Recipe = DEFAULT_OUTPUTS
    folders: Folders = Field(default_factory=dict)
    max_pixels: PositiveInt = 100_000_000
    decode_timeout_seconds: Positive = 10.0  # = inspect.DEFAULT_DECODE_TIMEOUT_SECONDS
    max_decode_bytes: PositiveInt = 32 * 1024 * 1024  # = inspect.DEFAULT_MAX_DECODE_BYTES
    on_success: Literal["archive", "delete", "keep"] = "archive"
    result_cache_bytes: Annotated[int, Field(ge=0)] = 1024**3

    # the queue: unset = SQLite under state_dir; "postgresql://user@host/db" = a queue shared
    # by several daemons (password from queue_password_file or the systemd credential
    # dropcut-queue-password, never from the URL); site: which daemons may process a file
    queue_url: str | None = None
    queue_password_file: Path | None = None
    site: str = Field(default_factory=lambda: socket.gethostname() or "localhost")
    lease_seconds: Annotated[float, Field(ge=5)] = 60.0

    # the spend guard (dropcut.budget): requests per calendar day / month, None = no cap
    budget_per_day: PositiveInt | None = None
    budget_per_month: PositiveInt | None = None
    budget_timezone: str | None = None  # an IANA name ("Europe/Berlin"); None = the machine's
    # the large-batch hold: beyond this many files admitted within batch_window_seconds,
    # newcomers wait for `dropcut approve` (0 = off)
    hold_batches_over: Annotated[int, Field(ge=0)] = 200
    batch_window_seconds: Positive = 600.0

    # notifications (dropcut.notify): a command run with the JSON on stdin, and/or a URL
    # POSTed to; quarantined files batched at most once per notify_batch_seconds
    notify_command: str = ""
    notify_url: str = ""
    notify_batch_seconds: Annotated[float, Field(ge=0)] = 60.0
    notify_timeout_seconds: Positive = 10.0
    notify_retries: Annotated[int, Field(ge=0)] = 3

    # what the admin sees: the conditions' reports, the status page and metrics
    condition_report_seconds: Positive = 300.0  # a lasting condition is logged again this often
    # "host:port" of the status page and /metrics; "" turns the HTTP side off. Any address
    # but loopback needs http_token (or http_token_file, or the systemd credential).
    http_listen: str = "127.0.0.1:9840"
    http_token: SecretStr | None = None
    http_token_file: Path | None = None

    # process
    shutdown_grace_seconds: Positive = 6.0
    log_format: Literal["console", "json", "journal"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("api_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("queue_url")
    @classmethod
    def _queue_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (or unset for the SQLite queue in state_dir)")
        if urlsplit(value).password is not None:
            raise ValueError(
                "must not hold the password: put it in queue_password_file or the systemd "
                "credential dropcut-queue-password"
            )
        return value

    @field_validator("site")
    @classmethod
    def _site(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
            raise ValueError("a site name is 1-63 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("budget_timezone")
    @classmethod
    def _time_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                zoneinfo.ZoneInfo(value)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{value!r} is not a time zone name (e.g. Europe/Berlin)") from None
        return value

    @field_validator("http_listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        value = value.strip()
        if value:
            parse_listen(value)  # raises ValueError with the reason
        return value

    @field_validator("inbox", "outbox", "quarantine", "archive", "state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return Path(os.path.abspath(value.expanduser()))

    @model_validator(mode="after")
    def _recipes_need_the_matte(self) -> Settings:
        if self.api_mode == "cutout":
            recipes = [self.outputs, *(f.outputs for f in self.folders.values())]
            if any(not (len(r) == 1 and r[0].resolve() == DEFAULT_OUTPUTS[0].resolve()) for r in recipes):
                raise ValueError(
                    "outputs other than the transparent PNG are rendered from the matte: they need "
                    'api_mode = "matte"'
                )
        return self

    @model_validator(mode="after")
    def _notify(self) -> Settings:
        from dropcut.notify import NotifyOptions  # (imports settings' neighbours only)

        NotifyOptions.of(self)  # raises ValueError naming the setting
        return self

    @model_validator(mode="after")
    def _formats(self) -> Settings:
        if self.log_format is None:
            object.__setattr__(self, "log_format", "console" if sys.stderr.isatty() else "json")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the TOML file; explicit keyword arguments win over both.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    # --- derived values -------------------------------------------------------------

    def resolve_api_key(self, environ: Mapping[str, str] | None = None) -> SecretStr | None:
        """The key from ``api_key`` (TOML or ``DROPCUT_API_KEY``), else ``api_key_file``,
        else the systemd credential ``$CREDENTIALS_DIRECTORY/dropcut-api-key``; ``None``
        when none of them holds one.

        Surrounding whitespace (a file's trailing newline, a Windows ``\\r\\n``) and a leading
        UTF-8 byte order mark in a file are dropped; what is left must be usable as an HTTP
        header value (see :func:`check_api_key`).

        Raises:
            ApiKeyError: the key that would be used holds a line break, a space, a control
                character or a non-ASCII character; the message names the source and the
                problem, never the key.
            ConfigError: a key file exists but cannot be read.
        """
        env = os.environ if environ is None else environ
        if self.api_key is not None:
            text = self.api_key.get_secret_value().strip(_ASCII_SPACE)
            if text:
                source = "DROPCUT_API_KEY" if _env_has(env, "DROPCUT_API_KEY") else "api_key"
                return check_api_key(text, source)
        candidates: list[tuple[Path, str]] = []
        if self.api_key_file is not None:
            candidates.append((self.api_key_file, f"api_key_file {self.api_key_file}"))
        if env.get("CREDENTIALS_DIRECTORY"):
            path = Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
            candidates.append((path, f"systemd credential {CREDENTIAL_NAME} ({path})"))
        for path, source in candidates:
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ConfigError(f"cannot read API key file {path}: {exc.strerror}") from None
            raw = raw.removeprefix(b"\xef\xbb\xbf").strip(_ASCII_SPACE.encode())
            if raw:
                # latin-1 maps each byte to one character: a non-ASCII byte stays non-ASCII
                # (and is refused) instead of failing to decode
                return check_api_key(raw.decode("latin-1"), source)
        return None

    def resolve_http_token(self, environ: Mapping[str, str] | None = None) -> SecretStr | None:
        """The status page's token from ``http_token`` (TOML or ``DROPCUT_HTTP_TOKEN``), else
        ``http_token_file``, else the systemd credential ``dropcut-http-token``; None when
        none holds one. Surrounding whitespace is dropped.

        Raises:
            ConfigError: a token file exists but cannot be read, or the token has
                characters other than visible ASCII, or is shorter than 16 characters.
        """
        env = os.environ if environ is None else environ
        text = self.http_token.get_secret_value().strip(_ASCII_SPACE) if self.http_token else ""
        source = "http_token"
        if not text:
            candidates: list[tuple[Path, str]] = []
            if self.http_token_file is not None:
                candidates.append((self.http_token_file, f"http_token_file {self.http_token_file}"))
            if env.get("CREDENTIALS_DIRECTORY"):
                path = Path(env["CREDENTIALS_DIRECTORY"]) / HTTP_TOKEN_CREDENTIAL
                candidates.append((path, f"systemd credential {HTTP_TOKEN_CREDENTIAL}"))
            for path, where in candidates:
                try:
                    text = path.read_bytes().decode("latin-1").strip(_ASCII_SPACE)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise ConfigError(f"cannot read {where}: {exc.strerror}") from None
                if text:
                    source = where
                    break
        if not text:
            return None
        if not all("!" <= ch <= "~" for ch in text):
            raise ConfigError(f"the token from {source} may hold only visible ASCII characters")
        if len(text) < MIN_HTTP_TOKEN:
            raise ConfigError(f"the token from {source} is shorter than {MIN_HTTP_TOKEN} characters")
        return SecretStr(text)

    def budget_tz(self) -> tzinfo:
        """The time zone whose days and months the budgets count (the machine's local
        one unless ``budget_timezone`` names one)."""
        if self.budget_timezone is not None:
            return zoneinfo.ZoneInfo(self.budget_timezone)
        return local_time_zone()

    def http_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the HTTP side, or None when it is off (``http_listen = ""``)."""
        return parse_listen(self.http_listen) if self.http_listen else None

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, with the secrets replaced."""
        data = self.model_dump(mode="json")
        for key in ("api_key", "http_token"):  # (queue_url cannot hold a password)
            if data.get(key):
                data[key] = "**********"
        return data

    def rate_margin(self) -> float:
        """Safety margin added to the rate-limit window: how much later than our "upload
        finished" the server may have counted a request. Default 1/240 of the period
        (0.25 s of 60 s): costs 0.4 % of the allowance."""
        if self.rate_limit_margin_seconds is not None:
            return self.rate_limit_margin_seconds
        return self.rate_limit_period_seconds / 240

    def restart_changes(self, other: Settings) -> list[str]:
        """Keys that differ between two configurations and need a restart."""
        return [key for key in RESTART_KEYS if getattr(self, key) != getattr(other, key)]


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from ``config`` (or ``$DROPCUT_CONFIG``) and the environment."""
    path = config or (Path(os.environ["DROPCUT_CONFIG"]) if os.environ.get("DROPCUT_CONFIG") else None)
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")

    class FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    if path is not None:
        try:
            with path.open("rb") as fh:
                tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            hint = ""
            if "Cannot overwrite a value" in str(exc) or "Cannot declare" in str(exc):
                hint = " (a key is set twice: look for an earlier line that sets the same key)"
            raise ConfigError(f"config file {path}: {exc}{hint}") from None
    try:
        return FromFile(**overrides) if path is not None else Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
    except SettingsError as exc:  # e.g. a DROPCUT_* list value that is not JSON
        raise ConfigError(f"invalid environment: {exc}") from None


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']}")
    return "invalid configuration: " + "; ".join(parts)


def local_time_zone() -> tzinfo:
    """The machine's time zone with its daylight saving rules: ``$TZ`` if it names one,
    else ``/etc/localtime``, else the current UTC offset (fixed)."""
    name = os.environ.get("TZ", "").removeprefix(":")
    if name:
        with contextlib.suppress(zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            return zoneinfo.ZoneInfo(name)
    with contextlib.suppress(OSError, ValueError), open("/etc/localtime", "rb") as fh:
        return zoneinfo.ZoneInfo.from_file(fh, key="localtime")
    local = datetime.now().astimezone().tzinfo
    assert local is not None
    return local


def parse_listen(value: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:9840"`` for IPv6) as ``(host, port)``; port 0 = any free
    port. Raises ``ValueError`` naming what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r}: expected host:port, e.g. 127.0.0.1:9840")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{value!r}: the port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r}: the port must be 0-65535")
    return host, port


def is_loopback(host: str) -> bool:
    """Is ``host`` a loopback address (127.0.0.0/8, ::1) or ``localhost``?"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def folder_problems(settings: Settings) -> list[str]:
    """Ways the folders overlap so that the daemon would feed on its own output."""
    inbox = Path(os.path.realpath(settings.inbox))
    others = {
        "outbox": settings.outbox,
        "quarantine": settings.quarantine,
        "archive": settings.archive,
        "state_dir": settings.state_dir,
    }
    problems = []
    resolved = {name: Path(os.path.realpath(p)) for name, p in others.items()}
    for name, path in resolved.items():
        if path == inbox:
            problems.append(f"{name} {path} is the inbox")
        elif path.is_relative_to(inbox):
            problems.append(f"{name} {path} is inside the inbox {inbox}")
        elif inbox.is_relative_to(path):
            problems.append(f"the inbox {inbox} is inside {name} {path}")
    names = list(resolved)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if resolved[a] == resolved[b]:
                problems.append(f"{a} and {b} are the same folder {resolved[a]}")
    return problems


def startup_problems(settings: Settings) -> list[str]:
    """Everything that stops ``dropcut run`` from starting, each as one line."""
    problems = []
    if not settings.inbox.is_dir():
        problems.append(f"inbox {settings.inbox} does not exist or is not a folder")
    try:
        key = settings.resolve_api_key()
    except ConfigError as exc:
        problems.append(str(exc))
    else:
        if key is None and settings.api_key_file is not None and not settings.api_key_file.exists():
            problems.append(
                f"no API key: api_key_file {settings.api_key_file} does not exist (write the key "
                "there, alone on one line) and DROPCUT_API_KEY is not set"
            )
        elif key is None:
            problems.append(
                "no API key: set api_key, api_key_file, DROPCUT_API_KEY or the "
                f"systemd credential {CREDENTIAL_NAME}"
            )
    address = settings.http_address()
    if address is not None:
        try:
            token = settings.resolve_http_token()
        except ConfigError as exc:
            problems.append(str(exc))
        else:
            if token is None and not is_loopback(address[0]):
                problems.append(
                    f"http_listen {settings.http_listen} is not a loopback address: set http_token, "
                    f"http_token_file or the systemd credential {HTTP_TOKEN_CREDENTIAL} "
                    '(or http_listen = "127.0.0.1:9840", or "" for no status page)'
                )
    if settings.queue_url is not None and not SHARED_QUEUE_READY:
        problems.append("queue_url: the shared PostgreSQL queue is not wired into the daemon yet (issue 13)")
    if settings.queue_url is not None:
        if settings.queue_password_file is not None and not settings.queue_password_file.is_file():
            problems.append(f"queue_password_file {settings.queue_password_file} does not exist")
        if settings.request_timeout_seconds > settings.lease_seconds:
            # a dead daemon's request counts in the shared window until its lease is over
            problems.append(
                f"lease_seconds {settings.lease_seconds:g} is shorter than request_timeout_seconds "
                f"{settings.request_timeout_seconds:g}: with queue_url it must be at least as long"
            )
    problems.extend(folder_problems(settings))
    for name in ("outbox", "quarantine", "archive", "state_dir"):
        problem = _unwritable(getattr(settings, name))
        if problem:
            problems.append(f"{name} {getattr(settings, name)}: {problem}")
    return problems


def _unwritable(path: Path) -> str | None:
    """Why dropcut could not create or write ``path``, or None (nothing is created here)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return "no existing parent folder"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None
