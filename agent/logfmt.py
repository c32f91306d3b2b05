"""`--log-format json`: one JSON object per line, for log shippers.

Every record has time (UTC, ISO 8601), level, logger and msg; state-change lines (joined,
left, eligibility, panic) also carry `service`, `endpoint`, `reason` and `event` as fields,
passed by the caller as `extra=`, so a query can select on them without parsing the text.
"""

from __future__ import annotations

import datetime
import json
import logging

FIELDS = ("service", "endpoint", "reason", "event")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k in FIELDS:
            v = record.__dict__.get(k)
            if v is not None:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)
