"""A snowflake:// URL as the connector's arguments, and the secrets it holds kept out
of every message (the start-up refusals are in test_config_errors.py)."""

from __future__ import annotations

from pathlib import Path

from syncd.snowflake_url import parse_snowflake_url
from syncd.sources.warehouse import _reason
from tests.support.snowflake import new_rsa_key, pkcs8_pem

PASSWORD = "pw/with?odd#chars"  # percent-encoded in the URL below
ENCODED = "pw%2Fwith%3Fodd%23chars"
PASSPHRASE = "phrase-8c7b6a5f"


def test_a_password_url_becomes_the_connector_arguments() -> None:
    url = parse_snowflake_url(
        f"snowflake://syncd%40heap:{ENCODED}@myorg-acct1/HEAP/MAIN_PRODUCTION"
        "?warehouse=REPORTING_WH&role=SYNCD_READER"
    )
    assert url.connect_args(30.0) == {
        "account": "myorg-acct1",
        "user": "syncd@heap",
        "password": PASSWORD,
        "database": "HEAP",
        "schema": "MAIN_PRODUCTION",
        "warehouse": "REPORTING_WH",
        "role": "SYNCD_READER",
        "login_timeout": 30.0,
    }
    assert PASSWORD not in repr(url)
    assert url.secrets() == [PASSWORD]


def test_a_key_pair_url_names_the_key_and_reads_the_passphrase(tmp_path: Path) -> None:
    key = tmp_path / "rsa_key.p8"
    key.write_bytes(pkcs8_pem(new_rsa_key(), PASSPHRASE))
    phrase = tmp_path / "phrase"
    phrase.write_text(PASSPHRASE + "\n", encoding="utf-8")
    url = parse_snowflake_url(
        f"snowflake://syncd@acct/HEAP?private_key_file={key}&private_key_passphrase_file={phrase}"
        "&host=127.0.0.1&port=8443&protocol=http"
    )
    assert url.connect_args(5.0) == {
        "account": "acct",
        "user": "syncd",
        "private_key_file": str(key),
        "private_key_file_pwd": PASSPHRASE,
        "database": "HEAP",
        "host": "127.0.0.1",
        "port": 8443,
        "protocol": "http",
        "login_timeout": 5.0,
    }
    assert url.secrets() == [PASSPHRASE]


def test_a_driver_message_never_shows_the_password_or_the_passphrase() -> None:
    url = f"snowflake://syncd:{ENCODED}@acct/HEAP"
    message = f"login for {PASSWORD} ({ENCODED}) with key phrase {PASSPHRASE} refused"
    text = _reason(Exception(message), url, [PASSPHRASE])
    assert text == "login for *** (***) with key phrase *** refused"
