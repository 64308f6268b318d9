"""The web console against a real fleet server process: plain HTTP (sign-in, redirects, 404s, headers) on SQLite and
PostgreSQL, and a real headless Chromium (Debian's, driven by Playwright) that signs in, reads every page, checks that
user input is shown as text, watches the auto-refresh and signs out, taking screenshots on the way.

The rollout engine and the device report endpoint fill the rollout and status tables; here they are filled
directly through SQLAlchemy on the server's database (what those writers produce), while devices, groups, bases and
bundles go through the API. Screenshots go to pytest's temporary folder, or to ``$EDGEPEFT_SCREENSHOTS`` when set
(``EDGEPEFT_SCREENSHOTS=docs/console`` regenerates the ones in the docs).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgepeft.fleet.console import REFRESH_SECONDS
from edgepeft.fleet.db import Database
from edgepeft.fleet.models import (
    AuditEntry,
    DeviceAssignment,
    DeviceEvent,
    DeviceHealth,
    DeviceStatus,
    DeviceTag,
    Rollout,
    RolloutDevice,
    RolloutWave,
)
from tests.unit.fleet.conftest import ASSET, FleetServer

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT_TAG = "<script>alert('tag')</script>"
SCRIPT_REASON = '<script>alert("reason")</script> new pump'
EVIL_DETAIL = "<img src=x onerror=alert('detail')> install failed"
VERSIONS = {"1.0.0": 1, "1.1.0": 2, "1.2.0": 3, "1.3.0": 4}  # version -> release; 1.1.0 is the bad one
GATES = {"min_rows": 200, "max_alert_ratio": 3.0, "alert_margin": 0.01, "max_alert_rate": 0.2, "max_errors": 0,
         "max_failures": 0}
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


# ---------------------------------------------------------------------------------------------- a seeded fleet
def seed(fleet: FleetServer, make_bundle: Callable[..., bytes], base_sha256: str) -> dict[str, Any]:
    """Bundles, groups and eight devices through the API; rollouts, assignments, reports, health and events as the
    rollout engine and the report endpoint write them. Returns the bundles' sha256 by version and the rollout ids."""
    with fleet.client() as http:
        assert http.post("/v1/bases", json={"name": "tiny", "sha256": base_sha256, "reason": "base"}).status_code == 201
        sha = {}
        for version, release in VERSIONS.items():
            answer = http.post("/v1/bundles", params={"reason": f"release {version}"},
                               content=make_bundle(version=version, release=release))
            assert answer.status_code == 201, answer.text
            sha[version] = answer.json()["sha256"]
        for group in ("line-1", "line-2"):
            assert http.post("/v1/groups", json={"name": group, "reason": "new line"}).status_code == 201
        for n in range(1, 9):
            group = "line-1" if n <= 5 else "line-2"
            body = {"device_id": f"dev-0{n}", "tags": ["site=berlin", f"hw:rev{n % 2 + 1}"], "groups": [group],
                    "assets": [ASSET], "reason": SCRIPT_REASON if n == 3 else "installed"}
            assert http.post("/v1/devices", json=body).status_code == 201, body

    moment = datetime.now(UTC)
    ago = lambda **kw: moment - timedelta(**kw)  # noqa: E731
    db = Database.open(fleet.db, migrate=False)
    try:
        with db.write() as s:
            # The API refuses such a tag; the console must still show whatever the database holds as text.
            s.add(DeviceTag(device_id="dev-03", tag=SCRIPT_TAG))
            bad = Rollout(name="pump-1 1.1.0", asset_id=ASSET, group_name="line-1", bundle_sha256=sha["1.1.0"],
                          strategy={"canary": 1, "waves": [50.0, 100.0]}, gates=GATES,
                          state="halted", current_wave=0, waves=3, created_at=ago(hours=3), created_by="operator:ops#1",
                          updated_at=ago(hours=2, minutes=50),
                          outcome="halted: canary dev-01 alert rate 35.00 % against 1.00 % on 1.0.0; 1 device "
                                  "rolled back")
            good = Rollout(name="pump-1 1.2.0", asset_id=ASSET, group_name="line-1", bundle_sha256=sha["1.2.0"],
                           strategy={"canary": 1, "waves": [100.0], "soak_seconds": 600}, gates=GATES,
                           state="running", current_wave=1, waves=2, created_at=ago(hours=1),
                           created_by="operator:ops#1", updated_at=ago(minutes=1))
            ab = Rollout(name="pump-1 A/B 1.2.0 vs 1.3.0", asset_id=ASSET, group_name="line-2",
                         bundle_sha256=sha["1.2.0"], bundle_b_sha256=sha["1.3.0"],
                         strategy={"canary": 2, "waves": [100.0], "ab_split": 0.5},
                         gates=GATES, state="running", current_wave=0, waves=1,
                         created_at=ago(minutes=30), created_by="operator:ops#1", updated_at=ago(minutes=2))
            s.add_all([bad, good, ab])
            s.flush()
            base = {"version": "1.0.0", "rows": 1000, "alerts": 10}
            s.add_all([
                RolloutWave(rollout_id=bad.id, wave=0, size=1, opened_at=ago(hours=3)),
                RolloutWave(rollout_id=bad.id, wave=1, size=2), RolloutWave(rollout_id=bad.id, wave=2, size=2),
                RolloutDevice(rollout_id=bad.id, device_id="dev-01", wave=0, bundle_sha256=sha["1.1.0"],
                              previous_sha256=sha["1.0.0"], previous_version="1.0.0", status="rolled_back",
                              detail="alert rate 35.00 % > 2 x baseline 1.00 %", baseline=base,
                              updated_at=ago(hours=2, minutes=50)),
                *[RolloutDevice(rollout_id=bad.id, device_id=f"dev-0{n}", wave=1 if n < 4 else 2,
                                bundle_sha256=sha["1.1.0"], previous_sha256=sha["1.0.0"], previous_version="1.0.0",
                                status="cancelled", updated_at=ago(hours=2, minutes=50)) for n in (2, 3, 4, 5)],
                RolloutWave(rollout_id=good.id, wave=0, size=1, opened_at=ago(hours=1), healthy_at=ago(minutes=40)),
                RolloutWave(rollout_id=good.id, wave=1, size=4, opened_at=ago(minutes=40)),
                *[RolloutDevice(rollout_id=good.id, device_id=f"dev-0{n}", wave=0 if n == 1 else 1,
                                bundle_sha256=sha["1.2.0"], previous_sha256=sha["1.0.0"], previous_version="1.0.0",
                                status=status, baseline=base, updated_at=ago(minutes=n))
                  for n, status in ((1, "healthy"), (2, "healthy"), (3, "installed"), (4, "assigned"),
                                    (5, "assigned"))],
                RolloutWave(rollout_id=ab.id, wave=0, size=2, opened_at=ago(minutes=30)),
                RolloutDevice(rollout_id=ab.id, device_id="dev-06", wave=0, arm="a", bundle_sha256=sha["1.2.0"],
                              previous_sha256=sha["1.0.0"], previous_version="1.0.0", status="installed",
                              baseline=base, updated_at=ago(minutes=2)),
                RolloutDevice(rollout_id=ab.id, device_id="dev-07", wave=0, arm="b", bundle_sha256=sha["1.3.0"],
                              previous_sha256=sha["1.0.0"], previous_version="1.0.0", status="installed",
                              baseline=base, updated_at=ago(minutes=2)),
            ])
            assigned = {1: ("1.2.0", good.id), 2: ("1.2.0", good.id), 3: ("1.2.0", good.id), 4: ("1.2.0", good.id),
                        5: ("1.2.0", good.id), 6: ("1.2.0", ab.id), 7: ("1.3.0", ab.id), 8: ("1.0.0", None)}
            s.add_all(DeviceAssignment(device_id=f"dev-0{n}", asset_id=ASSET, bundle_sha256=sha[v], rollout_id=r,
                                       assigned_at=ago(minutes=30)) for n, (v, r) in assigned.items())
            # What the agents report: dev-05 went quiet two hours ago, dev-08 never reported.
            active = {1: "1.2.0", 2: "1.2.0", 3: "1.2.0", 4: "1.0.0", 5: "1.0.0", 6: "1.2.0", 7: "1.3.0"}
            for n, version in active.items():
                installed = {ASSET: {"active_version": version, "active_release": VERSIONS[version],
                                     "versions": sorted({"1.0.0", version})}}
                s.add(DeviceStatus(device_id=f"dev-0{n}", last_seen_at=ago(hours=2) if n == 5 else ago(seconds=20),
                                   installed=installed, reports=100 + n,
                                   last_error=EVIL_DETAIL if n == 4 else ""))
                s.add(DeviceHealth(device_id=f"dev-0{n}", asset_id=ASSET, version=version, rows=1000, alerts=12,
                                   score_q50=0.4, score_q95=0.8, score_q99=0.95 + n / 100, errors=0, crashes=0,
                                   since=ago(minutes=30), reported_at=ago(seconds=20)))
            s.add(DeviceHealth(device_id="dev-01", asset_id=ASSET, version="1.1.0", rows=400, alerts=140,
                               score_q50=0.9, score_q95=1.6, score_q99=2.4, errors=1, crashes=0, since=ago(hours=3),
                               reported_at=ago(hours=2, minutes=50)))
            s.add_all([
                DeviceEvent(device_id="dev-01", at=ago(hours=3), kind="installed", asset_id=ASSET, version="1.1.0",
                            rollout_id=bad.id, detail="bundle verified and installed"),
                DeviceEvent(device_id="dev-01", at=ago(hours=2, minutes=50), kind="rolled_back", asset_id=ASSET,
                            version="1.0.0", rollout_id=bad.id, detail="alert storm on 1.1.0"),
                DeviceEvent(device_id="dev-01", at=ago(minutes=50), kind="activated", asset_id=ASSET,
                            version="1.2.0", rollout_id=good.id, detail="active"),
                DeviceEvent(device_id="dev-04", at=ago(minutes=5), kind="error", asset_id=ASSET, version="1.2.0",
                            rollout_id=good.id, detail=EVIL_DETAIL),
                AuditEntry(at=ago(hours=3), actor="operator:ops#1", action="rollout.create",
                           target=f"rollout:{bad.id}", reason="ship 1.1.0", details={"waves": 3}),
                AuditEntry(at=ago(hours=2, minutes=50), actor="fleet:rollouts", action="rollout.halt",
                           target=f"rollout:{bad.id}", reason="health gate failed on the canary",
                           details={"rolled_back": ["dev-01"]}),
            ])
        return {"sha": sha, "bad": bad.id, "good": good.id, "ab": ab.id}
    finally:
        db.close()


@pytest.fixture
def seeded(server: FleetServer, make_bundle: Callable[..., bytes], base_sha256: str) -> dict[str, Any]:
    return seed(server, make_bundle, base_sha256)


def read_token(fleet: FleetServer, name: str = "viewer") -> str:
    with fleet.client() as http:
        answer = http.post("/v1/tokens", json={"name": name, "scopes": ["read"], "reason": "console"})
        assert answer.status_code == 201, answer.text
        return answer.json()["token"]


@contextmanager
def signed_in(fleet: FleetServer, token: str) -> Iterator[httpx.Client]:
    """A plain HTTP client holding the console's cookie, as a browser would after signing in."""
    with httpx.Client(base_url=fleet.url, timeout=30.0, follow_redirects=False) as http:
        answer = http.post("/console/login", data={"token": token, "next": "/console"})
        assert answer.status_code == 303 and answer.headers["location"] == "/console", answer.text
        yield http


def text_of(page_html: str) -> str:
    """The visible text of a page, roughly: tags dropped, whitespace collapsed (entities kept as they are)."""
    return " ".join(re.sub(r"<[^>]+>", " ", page_html).split())


# ---------------------------------------------------------------------------------------------- plain HTTP
def test_pages_redirect_to_sign_in_and_stay_out_of_the_api_schema(server: FleetServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30.0, follow_redirects=False) as http:
        for path in ("/console", "/console/devices", "/console/devices/dev-01", "/console/rollouts",
                     "/console/rollouts/1", "/console/audit?before=9", "/console/nowhere"):
            answer = http.get(path)
            assert answer.status_code == 303, (path, answer.status_code)
            assert answer.headers["location"].startswith("/console/login?next="), answer.headers["location"]
        assert http.get(http.get("/console/audit?before=9").headers["location"]).status_code == 200
        login = http.get("/console/login")
        assert "Content-Security-Policy" in login.headers and "script-src 'self'" in login.headers[
            "Content-Security-Policy"]
        assert not [path for path in http.get("/openapi.json").json()["paths"] if path.startswith("/console")]
        assert http.get("/console/static/console.js").headers["content-type"].startswith("text/javascript")


def test_sign_in_sets_a_strict_http_only_cookie_and_refuses_bad_tokens(server: FleetServer) -> None:
    token = read_token(server)
    with httpx.Client(base_url=server.url, timeout=30.0, follow_redirects=False) as http:
        wrong = http.post("/console/login", data={"token": "efo_" + "x" * 43})
        assert wrong.status_code == 401 and "not accepted" in wrong.text and "set-cookie" not in wrong.headers
        empty = http.post("/console/login", data={"token": ""})
        assert empty.status_code == 401 and "enter an operator token" in empty.text
        device = http.post("/console/login", data={"token": "efd_" + "x" * 43})
        assert device.status_code == 401
        forged = http.post("/console/login", data={"token": token}, headers={"Origin": "http://evil.example"})
        assert forged.status_code == 403 and "set-cookie" not in forged.headers
        json_body = http.post("/console/login", json={"token": token})
        assert json_body.status_code == 400
        # next= never leads off the console (an open redirect would make a phishing link look like ours).
        for evil in ("//evil.example/console", "https://evil.example/console", "/\\evil.example", "/v1/tokens",
                     "/console\r\nSet-Cookie: x=1"):
            answer = http.post("/console/login", data={"token": token, "next": evil})
            assert answer.status_code == 303 and answer.headers["location"] == "/console", evil
        cookie = answer.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
        assert http.get("/console").status_code == 200
        assert http.get("/console/").headers["location"] == "/console"
        assert http.get("/console/login").headers["location"] == "/console"  # already signed in
        # The cookie goes nowhere but the console: the API still wants its bearer token.
        assert http.get("/v1/devices").status_code == 401
        out = http.post("/console/logout")
        assert out.status_code == 303 and out.headers["location"] == "/console/login"
        assert http.get("/console").status_code == 303


def test_a_revoked_token_signs_the_console_out(server: FleetServer) -> None:
    token = read_token(server)
    with signed_in(server, token) as http, server.client() as admin:
        assert http.get("/console").status_code == 200
        token_id = [t["id"] for t in admin.get("/v1/tokens").json() if t["name"] == "viewer"][0]
        assert admin.post(f"/v1/tokens/{token_id}/revoke", json={"reason": "left"}).status_code == 200
        answer = http.get("/console/devices")
        assert answer.status_code == 303 and answer.headers["location"].startswith("/console/login")


def test_unknown_things_and_bad_input_are_one_line_html_errors(server: FleetServer) -> None:
    with signed_in(server, read_token(server)) as http:
        cases = [("/console/devices/nope", 404, "no device &#x27;nope&#x27; in the registry"),
                 ("/console/devices/%3Cb%3Ex", 404, "no device &#x27;&lt;b&gt;x&#x27;"),
                 ("/console/rollouts/999", 404, "no rollout 999 in the registry"),
                 ("/console/rollouts/abc", 404, "rollout ids are whole numbers"),
                 ("/console/audit?before=abc", 400, "before must be a whole number"),
                 ("/console/rollouts?before=-1", 400, "before must be a whole number"),
                 ("/console/devices?tag=" + "x" * 300, 400, "tag must be at most 128"),
                 ("/console/elsewhere", 404, "no console page")]
        for path, status, words in cases:
            answer = http.get(path)
            assert answer.status_code == status, (path, answer.status_code)
            assert answer.headers["content-type"].startswith("text/html")
            errors = re.findall(r'<p class="error">(.*?)</p>', answer.text)
            assert len(errors) == 1 and words in errors[0] and "\n" not in errors[0], (path, errors)
            assert "<b>x" not in answer.text


def test_pages_show_the_seeded_fleet(server: FleetServer, seeded: dict[str, Any]) -> None:
    """Every page on both databases: the numbers the SQL aggregates produce, and user input only as text."""
    with signed_in(server, read_token(server)) as http:
        overview = http.get("/console")
        assert overview.status_code == 200
        text = text_of(overview.text)
        assert "8 devices enrolled, 6 online." in text
        # asset, version, release, assigned, active, devices with health, rows, alerts, alert rate
        assert f"{ASSET} 1.2.0 3 6 4 4 4000 48 1.20 %" in text
        assert f"{ASSET} 1.1.0 2 0 0 1 400 140 35.00 %" in text
        assert "pump-1 A/B 1.2.0 vs 1.3.0" in text and "A 1.2.0 / B 1.3.0" in text

        rollout = text_of(http.get(f"/console/rollouts/{seeded['good']}").text)
        assert "Canary (wave 0) healthy" in rollout and "Wave 1 open" in rollout
        assert "2 of 4 healthy" not in rollout and "1 of 4 healthy" in rollout
        halted = text_of(http.get(f"/console/rollouts/{seeded['bad']}").text)
        assert "halted: canary dev-01 alert rate 35.00 %" in halted and "rollout.halt" in halted
        assert "35.00 %" in halted and "1.00 %" in halted  # the arm's rate against its baseline
        ab = text_of(http.get(f"/console/rollouts/{seeded['ab']}").text)
        assert "A 1.2.0 1 1 1000 12 1.20 % 1.00 %" in ab and "B 1.3.0 1 1 1000 12 1.20 % 1.00 %" in ab

        device = http.get("/console/devices/dev-03").text
        assert "&lt;script&gt;alert(&#x27;tag&#x27;)&lt;/script&gt;" in device
        assert "&lt;script&gt;alert(&quot;reason&quot;)&lt;/script&gt;" in device
        assert "<script>alert" not in device
        bad_device = http.get("/console/devices/dev-04").text
        assert "<img" not in bad_device and "&lt;img src=x onerror=alert(&#x27;detail&#x27;)&gt;" in bad_device
        history = text_of(http.get("/console/devices/dev-01").text)
        assert "rolled_back" in history and "alert storm on 1.1.0" in history and "device.enrol" in history

        listing = text_of(http.get("/console/devices", params={"group": "line-2"}).text)
        assert "dev-06" in listing and "dev-01" not in listing and "never seen" in listing
        audit = http.get("/console/audit", params={"action": "device.enrol"}).text
        assert audit.count('class="badge audit">device.enrol<') == 8 and "<script>alert" not in audit


def test_the_audit_log_pages_newest_first(server: FleetServer) -> None:
    with server.client() as admin:
        for n in range(60):
            assert admin.post("/v1/groups", json={"name": f"g{n:02d}", "reason": f"group {n}"}).status_code == 201
    with signed_in(server, read_token(server)) as http:
        first = http.get("/console/audit").text
        ids = [int(i) for i in re.findall(r"<tr><td>(\d+)</td>", first)]
        assert len(ids) == 50 and ids == sorted(ids, reverse=True)
        older = re.search(r'href="(/console/audit\?before=\d+)">Older', first)
        assert older is not None
        second = [int(i) for i in re.findall(r"<tr><td>(\d+)</td>", http.get(older.group(1).replace("&amp;", "&"))
                                                                             .text)]
        assert second and max(second) < min(ids) and len(ids) + len(second) == 62  # + 2 token entries


# ---------------------------------------------------------------------------------------------- a real browser
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium); Playwright's own "
                    "browser download does not work offline")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    # Chromium's sandbox needs user namespaces, which a root process in a container does not get.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        yield chromium
        chromium.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("EDGEPEFT_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def eventually(condition: Callable[[], bool], seconds: float) -> None:
    """Poll ``condition`` from Python: Playwright's wait_for_function evaluates its predicate with eval, which the
    console's Content Security Policy (rightly) refuses."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not true within {seconds} s"
        time.sleep(0.2)


def shoot(page: Any, path: Path, *, full_page: bool = False) -> None:
    """A screenshot, palette-quantised when Pillow is there: a page of text needs no 24-bit colour, and the docs
    keep these files in git (a third of the size)."""
    page.screenshot(path=str(path), full_page=full_page)
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=128)
    small.save(path, optimize=True)


@SQLITE_ONLY
def test_a_browser_signs_in_reads_every_page_and_signs_out(browser: Any, server: FleetServer,
                                                           seeded: dict[str, Any], shots: Path) -> None:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    console_errors: list[str] = []
    page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
    try:
        page.goto(f"{server.url}/console/rollouts/{seeded['good']}")
        assert page.url.startswith(f"{server.url}/console/login?next=")
        page.fill("input[name=token]", "efo_wrong")
        page.click("button[type=submit]")
        assert "not accepted" in page.inner_text("p.error")
        shoot(page, shots / "login.png")
        page.fill("input[name=token]", read_token(server))
        page.click("button[type=submit]")
        # Back where the browser was going before it had to sign in.
        page.wait_for_url(f"{server.url}/console/rollouts/{seeded['good']}")
        cookie = [c for c in context.cookies() if c["name"] == "edgepeft_console"][0]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # HttpOnly: no script on the page can read the token

        page.click("header nav >> text=Overview")
        page.wait_for_url(f"{server.url}/console")
        assert page.inner_text("p.lead") == "8 devices enrolled, 6 online."
        row = page.locator("table.versions tr", has_text="1.1.0")
        assert "35.00 %" in row.inner_text()
        shoot(page, shots / "overview.png")

        # Auto-refresh swaps in a fresh <main>: a ninth device appears without a reload.
        with server.client() as admin:
            assert admin.post("/v1/devices", json={"device_id": "dev-09", "reason": "late"}).status_code == 201
        page.evaluate("consoleRefresh()")
        eventually(lambda: page.inner_text("p.lead").startswith("9 devices"), 10)
        assert page.inner_text("#refreshed").startswith("updated")

        page.click("table.rollouts >> text=#" + str(seeded["good"]))
        page.wait_for_url(f"{server.url}/console/rollouts/{seeded['good']}")
        assert page.locator("section.wave").count() == 2
        assert "healthy" in page.inner_text("section.wave[data-wave='0'] h3")
        assert page.locator("section.wave[data-wave='1'] table tr", has_text="assigned").count() == 2
        shoot(page, shots / "rollout.png")
        page.goto(f"{server.url}/console/rollouts/{seeded['ab']}")
        assert page.locator("table.arms tbody tr").count() == 2
        shoot(page, shots / "rollout-ab.png")
        page.goto(f"{server.url}/console/rollouts/{seeded['bad']}")
        assert "halted" in page.inner_text("dl.facts") and "alert rate 35.00 %" in page.inner_text("p.outcome")
        shoot(page, shots / "rollout-halted.png")

        page.goto(f"{server.url}/console/rollouts/{seeded['good']}")
        page.click("section.wave[data-wave='1'] >> text=dev-03")
        page.wait_for_url(f"{server.url}/console/devices/dev-03")
        # The tag and the reason are shown as the text they are, and nothing ran.
        assert page.locator("span.tag", has_text=SCRIPT_TAG).count() == 1
        assert SCRIPT_REASON in page.inner_text("table.history")
        shoot(page, shots / "device.png")
        page.goto(f"{server.url}/console/devices/dev-01")
        assert "alert storm on 1.1.0" in page.inner_text("table.history")
        shoot(page, shots / "device-history.png", full_page=True)
        page.goto(f"{server.url}/console/devices/dev-04")
        assert EVIL_DETAIL in page.inner_text("main")

        page.click("header nav >> text=Audit log")
        page.wait_for_url(f"{server.url}/console/audit")
        assert page.locator("table.audit tbody tr").count() >= 15
        top = "table.audit tbody tr:first-child td:first-child"
        newest = page.inner_text(top)
        # The timer refreshes on its own, but not under someone typing a filter (that would wipe the field).
        with server.client() as admin:
            answer = admin.patch("/v1/devices/dev-02", json={"tags": ["site=paris"], "reason": "moved"})
            assert answer.status_code == 200
        page.fill("input[name=target]", "device:dev-03")
        page.wait_for_timeout((REFRESH_SECONDS + 2) * 1000)
        assert page.inner_text(top) == newest and page.input_value("input[name=target]") == "device:dev-03"
        page.click("form.filters button")
        page.wait_for_url(re.compile(r".*/console/audit\?.*target=device%3Adev-03.*"))
        assert page.locator("table.audit tbody tr").count() == 1
        page.goto(f"{server.url}/console/audit")
        with server.client() as admin:
            answer = admin.patch("/v1/devices/dev-05", json={"tags": ["site=paris"], "reason": "moved too"})
            assert answer.status_code == 200
        eventually(lambda: page.inner_text(top) != str(int(newest) + 1), REFRESH_SECONDS * 2 + 5)
        assert "moved too" in page.inner_text("table.audit tbody tr:first-child")
        shoot(page, shots / "audit.png")

        page.goto(f"{server.url}/console/devices/ghost")
        assert "no device 'ghost' in the registry" in page.inner_text("p.error")

        page.click("text=Sign out")
        page.wait_for_url(f"{server.url}/console/login")
        page.goto(f"{server.url}/console")
        assert page.url.startswith(f"{server.url}/console/login")
        assert not dialogs, dialogs
        # Chromium logs the refused sign-in (401) and the unknown device (404) as failed loads; anything else (a CSP
        # violation, a script error) is a bug.
        assert all(re.search(r"status of (401|404)", text) for text in console_errors), console_errors
    finally:
        context.close()
    ours = {"login", "overview", "rollout", "rollout-ab", "rollout-halted", "device", "device-history", "audit"}
    sizes = {p.stem: p.stat().st_size for p in shots.glob("*.png") if p.stem in ours}
    assert set(sizes) == ours and all(1_000 < size < 600_000 for size in sizes.values()), sizes


# ---------------------------------------------------------------------------------------------- the real engine
def test_a_rollout_halted_by_the_real_engine_reads_right(server: FleetServer, make_bundle: Callable[..., bytes],
                                                         base_sha256: str) -> None:
    """Devices report through the API, the lead's rollout engine halts a bad canary: the console shows what the
    engine wrote (its statuses, outcome, events and audit entries), not only what this file's seed looks like."""
    with server.client() as http:
        assert http.post("/v1/bases", json={"name": "tiny", "sha256": base_sha256, "reason": "b"}).status_code == 201
        sha = {}
        for version, release in (("1.0.0", 1), ("1.1.0", 2)):
            answer = http.post("/v1/bundles", params={"reason": "r"}, content=make_bundle(version=version,
                                                                                          release=release))
            sha[version] = answer.json()["sha256"]
        assert http.post("/v1/groups", json={"name": "line-9", "reason": "g"}).status_code == 201
        credentials = {}
        for n in range(3):
            answer = http.post("/v1/devices", json={"device_id": f"pump-{n}", "groups": ["line-9"], "assets": [ASSET],
                                                    "bases": [base_sha256],
                                                    "reason": "installed"})
            credentials[f"pump-{n}"] = answer.json()["credential"]

        def report(device: str, version: str, rows: int, alerts: int, events: list[dict[str, Any]]) -> None:
            body = {"agent": "test", "assets": [{"asset_id": ASSET, "active_version": version,
                                                 "active_release": VERSIONS[version], "versions": ["1.0.0", version],
                                                 "health": {"version": version, "rows": rows, "alerts": alerts,
                                                            "score_q95": 0.5}}], "events": events}
            answer = http.post("/v1/device/self/report", json=body,
                               headers={"Authorization": f"Bearer {credentials[device]}"})
            assert answer.status_code == 200, answer.text

        for device in credentials:
            report(device, "1.0.0", 1000, 10, [])
        created = http.post("/v1/rollouts", json={"name": "bad-1.1.0", "group": "line-9", "bundle": sha["1.1.0"],
                                                  "strategy": {"canary": 1, "waves": [100.0]}, "reason": "ship"})
        assert created.status_code == 201, created.text
        rollout_id = created.json()["id"]
        canary = [d for d in credentials
                  if any(a["version"] == "1.1.0" for a in http.get(f"/v1/devices/{d}/history").json()["assignments"])]
        assert len(canary) == 1
        now_iso = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        report(canary[0], "1.1.0", 400, 200, [{"at": now_iso, "kind": "installed", "asset_id": ASSET,
                                               "version": "1.1.0", "detail": "verified and installed"}])
        assert http.get(f"/v1/rollouts/{rollout_id}").json()["state"] == "halted"

    with signed_in(server, read_token(server)) as console:
        page = text_of(console.get(f"/console/rollouts/{rollout_id}").text)
        assert "Canary (wave 0) halted" in page and "halted:" in page and "rollout.halt" in page
        assert "A 1.1.0 3 1 400 200 50.00 % 1.00 %" in page  # the canary's rate against its own baseline
        device = text_of(console.get(f"/console/devices/{canary[0]}").text)
        assert "rolled_back" in device and "verified and installed" in device and "1.1.0 400 200 50.00 %" in device
        overview = text_of(console.get("/console").text)
        assert "3 devices enrolled, 3 online." in overview and f"{ASSET} 1.1.0 2 0 1 1 400 200 50.00 %" in overview
