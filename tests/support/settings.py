"""syncd's settings for a test: as environment variables of a subprocess, or as a
``Settings`` for an engine in the test process. Both point syncd at a sandbox."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from syncd.sandbox import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, SANDBOX_SYSTEM_GUID
from syncd.settings import Settings, load_settings
from tests.support.processes import base_env


def _env_value(value: object) -> str:
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def syncd_env(
    api_url: str,
    settings: Mapping[str, object],
    *,
    client_id: str = DEFAULT_CLIENT_ID,
    client_secret: str = DEFAULT_CLIENT_SECRET,
) -> dict[str, str]:
    """The test process's environment without its SYNCD_* variables, plus WalkMe at
    ``api_url`` and each setting as SYNCD_<NAME> (lists and dicts as JSON; a value
    of None leaves the variable out)."""
    env = base_env()
    env.update(
        {
            "SYNCD_WALKME_CLIENT_ID": client_id,
            "SYNCD_WALKME_CLIENT_SECRET": client_secret,
            "SYNCD_WALKME_SYSTEM_GUID": SANDBOX_SYSTEM_GUID,
            "SYNCD_WALKME_API_URL": api_url,
        }
    )
    for name, value in settings.items():
        variable = f"SYNCD_{name.upper()}"
        if value is None:
            env.pop(variable, None)
        else:
            env[variable] = _env_value(value)
    return env


def sandbox_settings(
    api_url: str,
    *,
    client_id: str = DEFAULT_CLIENT_ID,
    client_secret: str = DEFAULT_CLIENT_SECRET,
    **values: Any,
) -> Settings:
    """``Settings`` for an engine in the test process talking to a sandbox; ``values``
    may override the WalkMe ones too. Lists and dicts (``segments``) are given as the
    JSON the variables would hold."""
    given = {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in values.items()}
    sandbox = {
        "walkme_client_id": client_id,
        "walkme_client_secret": client_secret,
        "walkme_system_guid": SANDBOX_SYSTEM_GUID,
        "walkme_api_url": api_url,
    }
    return load_settings(**(sandbox | given))
