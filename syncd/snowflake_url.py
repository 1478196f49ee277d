"""Snowflake warehouse URLs, read once at start and turned into the connector's arguments.

``snowflake://user:password@account/database/schema?warehouse=W&role=R``, or with
key-pair authentication (Snowflake's recommendation for services) instead of a
password: ``snowflake://user@account/database/schema?private_key_file=/path/key.p8``
(plus ``private_key_passphrase_file=/path`` for an encrypted key). Every message
here names what to fix and never quotes the password, the passphrase or key bytes.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

SCHEME = "snowflake"
SHAPE = "snowflake://user:password@account/database/schema?warehouse=W&role=R"
PARAMS = (
    "warehouse",
    "role",
    "private_key_file",
    "private_key_passphrase_file",
    "host",
    "port",
    "protocol",
)
# Plain HTTP carries the password unencrypted: only to a server on this machine
# (a local test server such as fakesnow).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_KEY_FILE = 1 << 16  # bytes; an RSA 4096 PEM key is about 3.3 KB
DRIVER_HINT = "snowflake:// needs the Snowflake driver: pip install 'syncd[snowflake]'"
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


@dataclass(frozen=True)
class SnowflakeURL:
    """What a snowflake:// URL says, checked; the secrets stay out of ``repr``."""

    account: str
    user: str
    password: str | None = field(default=None, repr=False)
    database: str | None = None
    schema: str | None = None
    warehouse: str | None = None
    role: str | None = None
    private_key_file: Path | None = None
    private_key_passphrase_file: Path | None = None
    host: str | None = None
    port: int | None = None
    protocol: str | None = None

    def passphrase(self) -> str | None:
        """The private key's passphrase, read from its file now (None: no passphrase)."""
        if self.private_key_passphrase_file is None:
            return None
        return _read_passphrase(self.private_key_passphrase_file)

    def connect_args(self, login_timeout: float) -> dict[str, Any]:
        """Keyword arguments of ``snowflake.connector.connect``."""
        args: dict[str, Any] = {
            "account": self.account,
            "user": self.user,
            "login_timeout": login_timeout,
        }
        if self.password is not None:
            args["password"] = self.password
        if self.private_key_file is not None:
            # The connector picks key-pair (JWT) authentication when given a key file.
            args["private_key_file"] = str(self.private_key_file)
            passphrase = self.passphrase()
            if passphrase is not None:
                args["private_key_file_pwd"] = passphrase
        optional = {
            "database": self.database,
            "schema": self.schema,
            "warehouse": self.warehouse,
            "role": self.role,
            "host": self.host,
            "port": self.port,
            "protocol": self.protocol,
        }
        args.update({key: value for key, value in optional.items() if value is not None})
        return args

    def secrets(self) -> list[str]:
        """Values no output may show: the password and the key's passphrase."""
        found = [self.password] if self.password else []
        try:
            passphrase = self.passphrase()
        except ValueError:
            passphrase = None  # unreadable now: the connection attempt says so
        if passphrase:
            found.append(passphrase)
        return found


def parse_snowflake_url(url: str) -> SnowflakeURL:
    """The URL's parts, or ValueError naming the part to fix (never quoting a secret).

    The caller has checked that the URL reads unambiguously (urls.unambiguous_url).
    """
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise ValueError(f"not a snowflake:// URL; expected {SHAPE}")
    if not parts.hostname:
        raise ValueError(f"names no account; expected {SHAPE}")
    if parts.port is not None:
        raise ValueError("the account takes no port: give a non-default one as ?port=N")
    if not parts.username:
        raise ValueError(f"names no user; expected {SHAPE}")
    path = [unquote(piece) for piece in parts.path.split("/") if piece]
    if len(path) > 2 or parts.fragment:
        raise ValueError(f"the path is /database/schema, nothing more; expected {SHAPE}")
    params = _params(parts.query)
    password = unquote(parts.password) if parts.password else None
    key_file = _path(params, "private_key_file")
    passphrase_file = _path(params, "private_key_passphrase_file")
    if passphrase_file is not None and key_file is None:
        raise ValueError("private_key_passphrase_file is for an encrypted private_key_file")
    if password is not None and key_file is not None:
        raise ValueError("give a password or private_key_file=, not both")
    if password is None and key_file is None:
        raise ValueError(
            "needs a password (snowflake://user:password@account/...) or key-pair"
            " authentication (?private_key_file=/path/to/rsa_key.p8)"
        )
    host = params.get("host")
    if host is not None and not _HOST.fullmatch(host) and host != "::1":
        raise ValueError("host= is not a host name or IP address")
    protocol = params.get("protocol")
    if protocol not in (None, "https", "http"):
        raise ValueError("protocol= is https (the default) or http")
    if protocol == "http" and host not in LOOPBACK_HOSTS:
        raise ValueError(
            "protocol=http only with host=127.0.0.1, localhost or ::1 (a server on this"
            " machine): elsewhere the credentials would cross the network unencrypted"
        )
    parsed = SnowflakeURL(
        account=parts.hostname,
        user=unquote(parts.username),
        password=password,
        database=path[0] if path else None,
        schema=path[1] if len(path) > 1 else None,
        warehouse=params.get("warehouse"),
        role=params.get("role"),
        private_key_file=key_file,
        private_key_passphrase_file=passphrase_file,
        host=host,
        port=_port(params.get("port")),
        protocol=protocol,
    )
    if key_file is not None:
        check_private_key(key_file, passphrase_file)
    return parsed


def driver_installed() -> bool:
    """Whether the official connector can be imported (the ``snowflake`` extra)."""
    try:
        return importlib.util.find_spec("snowflake.connector") is not None
    except ModuleNotFoundError:  # no ``snowflake`` package at all
        return False


def check_private_key(path: Path, passphrase_file: Path | None) -> None:
    """Refuse a key file the connector could not use: missing, unreadable, not a
    private key, encrypted without its passphrase or with the wrong one."""
    where = f"private_key_file {path}"
    data = _read_bytes(path, where, MAX_KEY_FILE)
    passphrase = None if passphrase_file is None else _read_passphrase(passphrase_file)
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError:  # cryptography comes with the connector
        raise ValueError(DRIVER_HINT) from None
    password = None if passphrase is None else passphrase.encode()
    load = (
        serialization.load_pem_private_key
        if data.lstrip().startswith(b"-----")
        else serialization.load_der_private_key
    )
    try:
        load(data, password=password)
    except TypeError:
        # cryptography's two TypeErrors: encrypted without a password, or the reverse.
        if password is None:
            raise ValueError(
                f"{where} is encrypted: name a file holding its passphrase with"
                " private_key_passphrase_file=/path"
            ) from None
        raise ValueError(
            f"{where} is not encrypted: drop private_key_passphrase_file"
        ) from None
    except ValueError:
        if password is not None and b"ENCRYPTED" in data[:64]:
            raise ValueError(
                f"{where} cannot be decrypted with the passphrase in {passphrase_file}"
            ) from None
        raise ValueError(
            f"{where} holds no private key (expected PEM, as `openssl genrsa 2048 |"
            " openssl pkcs8 -topk8` writes it, or DER)"
        ) from None
    except Exception:  # an unsupported key type or a malformed structure
        raise ValueError(f"{where} holds no private key the Snowflake driver can use") from None


def _params(query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError("the query part is not name=value pairs joined by '&'") from None
    for name, value in pairs:
        if name not in PARAMS:
            raise ValueError(f"unknown parameter {name[:40]!r}; accepted: {', '.join(PARAMS)}")
        if name in params:
            raise ValueError(f"parameter {name} is given twice")
        if not value.strip():
            raise ValueError(f"parameter {name} is empty")
        params[name] = value
    return params


def _path(params: dict[str, str], name: str) -> Path | None:
    return Path(params[name]) if name in params else None


def _port(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError("port= is a number from 1 to 65535")
    return int(value)


def _read_bytes(path: Path, where: str, limit: int) -> bytes:
    if path.is_dir():
        raise ValueError(f"{where} is a directory; expected a file")
    try:
        with path.open("rb") as file:
            data = file.read(limit + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {where}: {exc.strerror}") from None
    if len(data) > limit:
        raise ValueError(f"{where} is larger than {limit // 1024} KiB: not a key file")
    if not data.strip():
        raise ValueError(f"{where} is empty")
    return data


def _read_passphrase(path: Path) -> str:
    where = f"private_key_passphrase_file {path}"
    try:
        text = _read_bytes(path, where, MAX_KEY_FILE).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text") from None
    # A trailing newline (echo, editors, Kubernetes secrets) is not part of it.
    return text.rstrip("\r\n")
