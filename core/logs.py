"""Logging for every process: one handler on standard error, at REFERRALS_LOG_LEVEL (INFO),
as text or as one JSON object a line (REFERRALS_LOG_FORMAT=json, for a log collector).

Activity and workflow logs (`temporalio.activity`, `temporalio.workflow`) come through at
INFO, with the referral's workflow id in their message. Nothing logged carries a token: the web
app's access log names the route template (`/status/{token}`), never the path.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from core.settings import Settings

# uvicorn's access log prints paths (tokens included): the web app logs route templates
# instead. Alembic's INFO lines are for `db upgrade`, not for every start's schema check.
QUIET = {"uvicorn.access": logging.WARNING, "alembic": logging.WARNING}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("route", "method", "status", "duration_ms"):  # the access log's fields
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)
