"""The demo's simulated operator: answers the review page as a truthful person would.

Nobody watches a first demo's review page, so without this the demo shows only
false alarms and never the loop closing. The operator is an ordinary client of
the review API (signs in, claims the next item, labels it): it holds no
privileges the page does not give a person, and its verdicts go through the
same signed ``.labels`` path. It answers from the synthetic feed's ground truth,
after ``delay_s`` (people take a moment), and stops with the demo.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)



def verdict_body(verdict: str, kind: str | None) -> dict[str, str]:
    """The label request for a frame of the synthetic feed: a defect kind the review page
    does not list (the feed's "stain", "pit", "burn") is sent as the page's "other"."""
    from linewatch.review.store import DEFECT_TYPES

    if verdict != "defect":
        return {"verdict": "normal"}
    return {"verdict": "defect", "defect_type": kind if kind in DEFECT_TYPES else "other"}


@dataclass
class Answered:
    normal: int = 0
    defect: int = 0
    errors: int = 0


class SimulatedOperator(threading.Thread):
    """Claims and labels review items until ``stop`` is set.

    ``truth(seq) -> (verdict, defect kind or None)`` is the feed's ground truth for a
    frame's sequence number.
    """

    def __init__(self, url: str, name: str, password: str, truth: Callable[[int], tuple[str, str | None]],
                 stop: threading.Event, delay_s: float = 2.0) -> None:
        super().__init__(name="simulated-operator", daemon=True)
        self.url, self.name_, self.password, self.truth = url.rstrip("/"), name, password, truth
        self.stop, self.delay_s = stop, delay_s
        self.answered = Answered()
        self._token: str | None = None

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(self.url + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    def run(self) -> None:
        failures = 0
        while not self.stop.is_set():
            try:
                if self._token is None:
                    self._token = self._call("POST", "/api/session", {
                        "operator": self.name_, "password": self.password})["token"]
                item = self._call("POST", "/api/claim")["item"]
                if item is None:
                    self.stop.wait(0.5)
                    continue
                if self.stop.wait(self.delay_s):
                    return
                verdict, kind = self.truth(int(item["seq"]))
                path = f"/api/items/{urllib.request.quote(item['item_id'], safe='')}"
                try:
                    self._call("POST", path + "/label", verdict_body(verdict, kind))
                except urllib.error.HTTPError as exc:
                    if exc.code == 401 or exc.code >= 500:
                        raise
                    # refused (a verdict the page does not take): skip it, or the next claim
                    # hands the same held item back and the operator is stuck on it
                    log.warning("simulated operator: item %s refused (%s); skipped",
                                item["item_id"], exc.code)
                    self.answered.errors += 1
                    self._call("POST", path + "/skip")
                    continue
                if verdict == "defect":
                    self.answered.defect += 1
                else:
                    self.answered.normal += 1
                failures = 0
            except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
                # the page restarting, a lease lost to a race: say so, wait, go on
                self.answered.errors += 1
                failures += 1
                if isinstance(exc, urllib.error.HTTPError) and exc.code == 401:
                    self._token = None
                if failures in (1, 10, 100):
                    log.warning("simulated operator: %s: %s (retrying)", type(exc).__name__, exc)
                self.stop.wait(min(5.0, 0.5 * failures))
