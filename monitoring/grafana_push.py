"""``linewatch grafana push``: upload the dashboards to a running Grafana.

For a Grafana that linewatch does not provision itself (a plant's existing
one), through its HTTP API with ``grafana-client``. Dashboards land in one
folder (created when missing) and overwrite their previous version, keyed by
their fixed uids, so pushing again after an upgrade updates rather than
duplicates them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitoring.dashboards import DASHBOARD_DIR

log = logging.getLogger(__name__)


class GrafanaPushError(RuntimeError):
    """Grafana could not be reached or refused the upload; the message says what to check."""


@dataclass
class PushResult:
    folder_uid: str
    dashboards: list[dict[str, Any]]  # Grafana's answer per dashboard (uid, url, version, status)


def load_dashboards(folder: Path = DASHBOARD_DIR) -> list[dict[str, Any]]:
    files = sorted(folder.glob("*.json"))
    if not files:
        raise GrafanaPushError(f"no dashboard JSON files under {folder}; run "
                               "`python -m monitoring.dashboards` to generate them")
    return [json.loads(f.read_text()) for f in files]


def push(url: str, token: str | None, folder_title: str = "linewatch",
         folder_uid: str = "linewatch", dashboards: list[dict[str, Any]] | None = None,
         timeout_s: float = 10.0) -> PushResult:
    """Create the folder when missing, then upload every dashboard with overwrite."""
    try:
        from grafana_client import GrafanaApi
        from grafana_client.client import GrafanaClientError, GrafanaException
        from niquests.exceptions import RequestException
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise GrafanaPushError("grafana-client is not installed: pip install grafana-client") from exc

    docs = dashboards if dashboards is not None else load_dashboards()
    api = GrafanaApi.from_url(url, credential=token, timeout=timeout_s)
    try:
        try:
            api.folder.get_folder(folder_uid)
        except GrafanaClientError as exc:
            if getattr(exc, "status_code", None) != 404:
                raise
            log.info("creating Grafana folder %r (uid %s)", folder_title, folder_uid)
            api.folder.create_folder(folder_title, uid=folder_uid)
        answers = []
        for doc in docs:
            body = {"dashboard": {**doc, "id": None}, "folderUid": folder_uid, "overwrite": True,
                    "message": "linewatch grafana push"}
            answers.append(api.dashboard.update_dashboard(body))
            log.info("pushed %s", doc.get("title"))
    except RequestException as exc:  # refused, DNS, TLS: say where we tried to go
        raise GrafanaPushError(f"could not reach Grafana at {url}: {exc}. Check the URL (scheme, "
                               "host, port) and that Grafana is up.") from exc
    except GrafanaException as exc:
        status = getattr(exc, "status_code", None)
        if not status:  # the client reports connection failures and timeouts as status 0
            raise GrafanaPushError(f"could not reach Grafana at {url}: {exc}. Check the URL (scheme, "
                                   "host, port) and that Grafana is up.") from exc
        hint = {401: "the token was refused: create a service-account token with the Editor role "
                     "and pass it with --token or GRAFANA_TOKEN",
                403: "the token may not write dashboards: give its service account the Editor role"}
        raise GrafanaPushError(f"Grafana at {url} answered {status}: {exc}. "
                               f"{hint.get(status or 0, '')}".strip()) from exc
    return PushResult(folder_uid, answers)
