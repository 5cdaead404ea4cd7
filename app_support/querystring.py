"""The Config Builder's config in the URL: `?method=<quant_method>&cfg=<urlsafe base64 JSON>`.

`cfg` holds `to_diff_dict()` without `quant_method` (compact JSON, urlsafe base64, no padding),
so a link stays short and reproduces the config exactly. Plain JSON in `cfg` is accepted too.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Mapping

from quantlib.configs import QuantConfig
from quantlib.registry import CONFIG_MAPPING, parse_config


class QueryStringError(ValueError):
    """The query string does not describe a config; the message says what is wrong."""


def encode_config(config: QuantConfig) -> dict[str, str]:
    diff = {k: v for k, v in config.to_diff_dict().items() if k != "quant_method"}
    params = {"method": config.quant_method}
    if diff:
        raw = json.dumps(diff, separators=(",", ":")).encode()
        params["cfg"] = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return params


def decode_params(params: Mapping[str, Any]) -> QuantConfig | None:
    """The config a query string describes, None when it names none; `QueryStringError` or
    `quantlib.errors.ConfigError` when it is malformed."""
    method = params.get("method")
    cfg = params.get("cfg")
    if method is None and cfg is None:
        return None
    if method is not None and method not in CONFIG_MAPPING:
        raise QueryStringError(f"method={method!r} in the link is not a registered method "
                               f"(known: {', '.join(CONFIG_MAPPING)})")
    data: Any = {}
    if cfg:
        text = str(cfg).strip()
        if not text.startswith("{"):
            try:
                padded = text + "=" * (-len(text) % 4)
                text = base64.b64decode(padded, altchars=b"-_", validate=True).decode("utf-8")
            except (binascii.Error, ValueError) as exc:
                raise QueryStringError(f"cfg in the link is neither JSON nor urlsafe base64 JSON ({exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QueryStringError(f"cfg in the link is not valid JSON: {exc.msg}") from None
        if not isinstance(data, dict):
            raise QueryStringError("cfg in the link must be a JSON object")
    if method is not None:
        data = {**data, "quant_method": method}
    return parse_config(data)
