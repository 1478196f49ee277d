"""A Snowflake for tests: fakesnow's Snowflake-compatible HTTP server (DuckDB behind
it) on 127.0.0.1, which the real ``snowflake-connector-python`` talks to.

fakesnow accepts every login and returns every result in one response. The front
here adds what real Snowflake does and the tests need:

- logins are checked: a wrong user or password is answered as Snowflake answers it
  (code 390100), and a key-pair login's JWT must verify against the registered
  public key with Snowflake's claims (``iss`` ACCOUNT.USER.SHA256:fingerprint,
  ``sub`` ACCOUNT.USER), else 390144;
- what each login asked for (database, schema, warehouse, role) is recorded;
- a result larger than ``chunk_rows`` is handed out as Snowflake does: the first
  rows inline, the rest as result chunks the connector downloads by URL (counted).

Only one server runs per process at a time: fakesnow keeps its sessions and its
in-memory database in module globals.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import fakesnow.server as fake
import jwt
import pyarrow as pa
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.net import free_port

ACCOUNT = "heapco"
USER = "syncd_reader"
CHUNK_ROWS = 25_000  # rows per result chunk (Snowflake's first chunks are of this order)


@dataclass(frozen=True)
class Login:
    """One login request as the server received it."""

    user: str
    authenticator: str
    database: str | None
    schema: str | None
    warehouse: str | None
    role: str | None
    accepted: bool


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pkcs8_pem(key: rsa.RSAPrivateKey, passphrase: str | None = None) -> bytes:
    """The key as Snowflake's key-pair guide has it written (PKCS#8 PEM)."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if passphrase is None
        else serialization.BestAvailableEncryption(passphrase.encode())
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _fingerprint(public_key: rsa.RSAPublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode()


@dataclass
class FakeSnowflake:
    """The server; ``password`` and ``public_key`` are the registered user's."""

    password: str
    public_key: rsa.RSAPublicKey | None = None
    chunk_rows: int = CHUNK_ROWS
    port: int = field(default_factory=free_port)
    logins: list[Login] = field(default_factory=list)
    chunks_served: int = 0
    _chunks: dict[str, bytes] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, database: str, schema: str, password: str | None = None, **params: str) -> str:
        """A SYNCD_WAREHOUSE_URL for this server; ``password=None`` gives the right one,
        ``params`` (warehouse, role, private_key_file...) go in the query."""
        userinfo = USER
        if "private_key_file" not in params:
            userinfo += ":" + quote(self.password if password is None else password, safe="")
        query = {"host": "127.0.0.1", "port": str(self.port), "protocol": "http", **params}
        pairs = "&".join(f"{key}={quote(value, safe='/')}" for key, value in query.items())
        return f"snowflake://{userinfo}@{ACCOUNT}/{database}/{schema}?{pairs}"

    def load(self, database: str, schema: str, tables: Mapping[str, pa.Table]) -> None:
        """Create ``database.schema`` and fill each table from its Arrow table."""
        connection = fake.shared_fs.connect(database, schema)
        cursor = connection.cursor()
        for name, rows in tables.items():
            columns = ", ".join(
                f"{column.name} {'NUMBER' if pa.types.is_integer(column.type) else 'VARCHAR'}"
                for column in rows.schema
            )
            cursor.execute(f"CREATE TABLE {name} ({columns})")
            fake.shared_fs.duck_conn.register("syncd_rows", rows)
            try:
                fake.shared_fs.duck_conn.execute(
                    f"INSERT INTO {database}.{schema}.{name} SELECT * FROM syncd_rows"  # noqa: S608
                )
            finally:
                fake.shared_fs.duck_conn.unregister("syncd_rows")

    # ------------------------------------------------------------ the HTTP front

    def app(self) -> Starlette:
        front = [
            Route("/session/v1/login-request", self._login, methods=["POST"]),
            Route("/queries/v1/query-request", self._query, methods=["POST"]),
            Route("/_chunks/{chunk}", self._chunk, methods=["GET"]),
        ]
        taken = {route.path for route in front}
        rest = [route for route in fake.routes if route.path not in taken]
        return Starlette(routes=front + rest)

    async def _login(self, request: Request) -> Response:
        body = await request.body()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        data = json.loads(body)["data"]
        refusal = self._refusal(data)
        params = request.query_params
        with self._lock:
            self.logins.append(
                Login(
                    user=str(data.get("LOGIN_NAME")),
                    authenticator=str(data.get("AUTHENTICATOR", "SNOWFLAKE")),
                    database=params.get("databaseName"),
                    schema=params.get("schemaName"),
                    warehouse=params.get("warehouse"),
                    role=params.get("roleName"),
                    accepted=refusal is None,
                )
            )
        if refusal is not None:
            code, message = refusal
            return JSONResponse(
                {"data": {"errorCode": code}, "code": code, "message": message, "success": False}
            )
        return await fake.login_request(request)

    def _refusal(self, data: dict[str, Any]) -> tuple[str, str] | None:
        """Snowflake's code and message for a login it refuses, or None."""
        if data.get("AUTHENTICATOR") == "SNOWFLAKE_JWT":
            if self.public_key is None or not self._jwt_valid(str(data.get("TOKEN"))):
                return "390144", "JWT token is invalid."
            return None
        if data.get("LOGIN_NAME") != USER or data.get("PASSWORD") != self.password:
            return "390100", "Incorrect username or password was specified."
        return None

    def _jwt_valid(self, token: str) -> bool:
        assert self.public_key is not None
        subject = f"{ACCOUNT.upper()}.{USER.upper()}"
        try:
            claims = jwt.decode(token, self.public_key, algorithms=["RS256"])
        except jwt.InvalidTokenError:
            return False
        issuer = f"{subject}.{_fingerprint(self.public_key)}"
        return bool(claims.get("sub") == subject and claims.get("iss") == issuer)

    async def _query(self, request: Request) -> Response:
        answer = await fake.query_request(request)
        document = json.loads(bytes(answer.body))
        data = document.get("data") or {}
        if not (document.get("success") and data.get("rowsetBase64")):
            return answer
        table = pa.ipc.open_stream(base64.b64decode(data["rowsetBase64"])).read_all()
        if table.num_rows <= self.chunk_rows:
            return answer
        data["rowsetBase64"] = base64.b64encode(_ipc(table.slice(0, self.chunk_rows))).decode()
        data["chunks"] = []
        base = f"{request.url.scheme}://{request.url.netloc}/_chunks"
        for start in range(self.chunk_rows, table.num_rows, self.chunk_rows):
            part = table.slice(start, self.chunk_rows)
            encoded = _ipc(part)
            name = secrets.token_urlsafe(12)
            with self._lock:
                self._chunks[name] = encoded
            size = len(encoded)
            data["chunks"].append(
                {
                    "url": f"{base}/{name}",
                    "rowCount": part.num_rows,
                    "uncompressedSize": size,
                    "compressedSize": size,
                }
            )
        return JSONResponse(document)

    async def _chunk(self, request: Request) -> Response:
        with self._lock:
            encoded = self._chunks.pop(request.path_params["chunk"], None)
            if encoded is not None:
                self.chunks_served += 1
        if encoded is None:
            return Response(status_code=404)
        return Response(encoded, media_type="application/octet-stream")

    # ------------------------------------------------------------ running

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeSnowflake]:
        """Serve on 127.0.0.1:``port`` from a daemon thread until the block ends."""
        logging.getLogger("fakesnow.server").setLevel(logging.WARNING)  # a line per login
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="fake-snowflake", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while thread.is_alive() and not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError(f"the fake Snowflake did not start on 127.0.0.1:{self.port}")
        try:
            yield self
        finally:
            server.should_exit = True
            thread.join(30)


def _ipc(table: pa.Table) -> bytes:
    """One Arrow IPC stream, the format of Snowflake's result chunks."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())
