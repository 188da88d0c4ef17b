"""The dashboard in a real browser: Debian's chromium, driven by Selenium through Debian's
chromedriver (so Selenium never downloads a browser or a driver).

`intu serve` routes a small study from DCMTK storescu to a PACS that is down: with one attempt
allowed, what was tried becomes a dead letter and the rest waits for the destination's probe. The
page shows the study in its message browser (searched by accession), a dead message's journey and
tags, the destination down, the channel listening, the dead letters with their reason. The PACS
(DCMTK storescp) comes up on the destination's port; Retry is refused without the token and with
a wrong one, then retries every dead letter; the page shows the study delivered and the PACS's own
folder holds every SOP Instance UID with its pixel data. With ``INTU_SCREENSHOT=1`` the test saves
the screenshot the README shows (``docs/images/dashboard.png``).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pydicom
import pytest
from intu_dicom_destination.testing.peers import (
    INTEROP_ENV,
    PeerMissing,
    find_tool,
    free_port,
    require_tool,
    start_storescp,
)
from intu_dicom_destination.testing.samples import write_ct_series
from intu_dicom_destination.testing.serve import IntuProcess, write_router_project
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.interop
T = TypeVar("T")

TOKEN = "dashboard-test-token"
ACCESSION = "ACC-DASH-42"
SCREENSHOT = Path(__file__).resolve().parents[3] / "docs" / "images" / "dashboard.png"
# A laptop screen: the overview must fit it.
WINDOW = (1366, 900)


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Headless chromium; a missing chromium or chromedriver skips (fails under INTU_REQUIRE_INTEROP=1)."""
    chromium, chromedriver = find_tool("chromium"), find_tool("chromedriver")
    if chromium is None or chromedriver is None:
        raise PeerMissing("chromium or chromedriver not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"):
        options.add_argument(arg)
    options.add_argument("--disable-dev-shm-usage")  # a container's small /dev/shm crashes its tabs
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    # The driver's path given: Selenium Manager (which would download one) is never run.
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _study(folder: Path, count: int) -> list[Path]:
    """A small CT study under its own accession number (the search key of the test)."""
    files = write_ct_series(folder, count, size_kib=16)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = ACCESSION
        ds.save_as(path, enforce_file_format=True)
    return files


def _until(
    driver: WebDriver, what: str, predicate: Callable[[WebDriver], object], timeout: float = 90
) -> None:
    """Wait until ``predicate(driver)`` is true; the page re-renders what changed every 2 s, so
    an element found a moment ago may be gone: that counts as "not yet"."""

    def check(d: WebDriver) -> object:
        try:
            return predicate(d)
        except StaleElementReferenceException:
            return False

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.25).until(check)
    except TimeoutException:
        # What the page said instead: its banner, notice, and the tables' text.
        shown = {
            name: driver.find_element(By.ID, name).text
            for name in ("readiness", "banner", "notice", "destinations", "dead-table", "message-table")
        }
        raise AssertionError(f"the page never showed {what}; it showed {shown}") from None


def _now(driver: WebDriver, read: Callable[[WebDriver], T]) -> T:
    """``read(driver)``, read again when the page re-rendered what it was reading meanwhile."""
    for _ in range(20):
        try:
            return read(driver)
        except StaleElementReferenceException:
            time.sleep(0.1)
    return read(driver)


def _click(driver: WebDriver, selector: str) -> None:
    _now(driver, lambda d: d.find_element(By.CSS_SELECTOR, selector).click())


def _click_until(
    driver: WebDriver, selector: str, what: str, predicate: Callable[[WebDriver], object]
) -> None:
    """Click ``selector`` and wait for ``predicate``, clicking again (at most every 3 s) while it
    is false: the table re-renders every 2 s, and a click can land on the row it just replaced
    (one CI run never opened the journey)."""
    clicked = [0.0]

    def check(d: WebDriver) -> object:
        if predicate(d):
            return True
        if time.monotonic() - clicked[0] > 3.0:
            clicked[0] = time.monotonic()
            d.find_element(By.CSS_SELECTOR, selector).click()
        return False

    _until(driver, what, check)


def _tags(driver: WebDriver) -> dict[str, str]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#journey-tags tbody tr[data-keyword]")
    return {row.get_attribute("data-keyword") or "": row.find_element(By.TAG_NAME, "td").text for row in rows}


def _message_rows(driver: WebDriver) -> list[dict[str, str]]:
    return [
        {
            "id": row.get_attribute("data-message-id") or "",
            "accession": row.find_elements(By.TAG_NAME, "td")[2].text,
            "status": row.find_element(By.CSS_SELECTOR, "td .badge").get_attribute("data-status") or "",
        }
        for row in driver.find_elements(By.CSS_SELECTOR, "#message-table tbody tr[data-message-id]")
    ]


def _dead_letters(driver: WebDriver) -> list[str]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#dead-table tbody tr[data-entry-id]")
    return [row.get_attribute("data-entry-id") or "" for row in rows]


def _destination_up(driver: WebDriver) -> str:
    row = driver.find_element(By.CSS_SELECTOR, "#destinations tbody tr[data-destination]")
    return row.get_attribute("data-up") or ""


def _depth(driver: WebDriver) -> int:
    cell = driver.find_element(
        By.CSS_SELECTOR, '#destinations tbody tr[data-destination] td[data-field="depth"]'
    )
    return int(cell.text)


def _journey_kinds(driver: WebDriver) -> list[str]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#journey-events tbody tr[data-kind]")
    return [row.get_attribute("data-kind") or "" for row in rows]


def test_dashboard_shows_the_routed_study_and_retries_its_dead_letters(
    tmp_path: Path, browser: WebDriver
) -> None:
    storescu = require_tool("storescu")
    pacs_port, router_port, http_port = free_port(), free_port(), free_port()
    # One attempt allowed, and the PACS down: an instance that is tried becomes a dead letter.
    project = write_router_project(
        tmp_path / "project",
        router_port=router_port,
        pacs_port=pacs_port,
        retry="{max_attempts: 1}",
        dicom={"timeout_ms": 5000},
    )
    with (project / "intu.yaml").open("a") as f:
        f.write(f'http: {{listen: "127.0.0.1:{http_port}", token: "${{INTU_HTTP_TOKEN}}"}}\n')
    files = _study(tmp_path / "study", 4)
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}

    with IntuProcess(project, tmp_path / "logs", env={"INTU_HTTP_TOKEN": TOKEN}) as intu:
        intu.start(router_port, http_port)
        send = [storescu, "-aet", "MODALITY", "-aec", "INTU_SCP", "127.0.0.1", str(router_port)]
        subprocess.run(
            [*send, *map(str, files)], env=INTEROP_ENV, check=True, capture_output=True, timeout=120
        )

        browser.get(f"http://127.0.0.1:{http_port}/")
        assert browser.title == "intu dashboard"
        browser.find_element(By.ID, "q-accession").send_keys(ACCESSION)
        browser.find_element(By.ID, "search-button").click()

        # The routed study in the message browser (the search refreshes itself). With the PACS
        # down, what was tried is a dead letter (one attempt allowed) and the rest waits in the
        # queue for the destination's probe: every instance is one or the other.
        _until(
            browser,
            f"the {len(files)} instances of accession {ACCESSION}, dead or queued",
            lambda d: (
                len(rows := _message_rows(d)) == len(files)
                and all(r["accession"] == ACCESSION and r["status"] in ("dead", "queued") for r in rows)
                and len(_dead_letters(d)) == sum(r["status"] == "dead" for r in rows) > 0
            ),
        )
        reasons = _now(
            browser, lambda d: [r.text for r in d.find_elements(By.CSS_SELECTOR, "#dead-table td.reason")]
        )
        assert all(f"127.0.0.1:{pacs_port}" in r for r in reasons), (
            f"a dead letter without its reason: {reasons}"
        )
        assert _now(browser, _destination_up) == "down"
        # The overview: the channel's listener bound; the destination's queue holds what waits.
        listener = '#channels tr[data-channel="dicom-router"] .badge[data-status="listening"]'
        assert _now(browser, lambda d: d.find_element(By.CSS_SELECTOR, listener).text) == "listening"
        _until(
            browser,
            "the queue depth of the instances waiting",
            lambda d: _depth(d) == sum(r["status"] == "queued" for r in _message_rows(d)),
        )

        # A dead message's journey and its DICOM tags by keyword.
        dead = next(r["id"] for r in _now(browser, _message_rows) if r["status"] == "dead")
        _click_until(
            browser,
            f'#message-table tr[data-message-id="{dead}"] button.link',
            "the journey up to the dead letter",
            lambda d: "dead" in _journey_kinds(d),
        )
        kinds = _now(browser, _journey_kinds)
        assert kinds[0] == "received" and "queued" in kinds, kinds
        tags = _now(browser, _tags)
        assert tags.get("AccessionNumber") == ACCESSION
        assert tags.get("PatientName") == "Doe^Jane"

        # The PACS comes up where the destination points: what waited is delivered on its own,
        # and each dead letter once Retry is clicked in the page.
        pacs = start_storescp(tmp_path / "pacs", "PACS", port=pacs_port, log=tmp_path / "storescp.log")
        try:
            _until(browser, "the destination up", lambda d: _destination_up(d) == "up")
            _until(
                browser,
                "no instance waiting",
                lambda d: "queued" not in {r["status"] for r in _message_rows(d)},
            )
            # Retry asks for the operator token first, and says so when it is wrong.
            first_retry = f'#dead-table tr[data-entry-id="{_now(browser, _dead_letters)[0]}"] button.retry'
            _click(browser, first_retry)
            _until(browser, "the request for a token", lambda d: "operator token" in _notice(d))
            _keep_token(browser, "not-the-right-token")
            _click(browser, first_retry)
            _until(browser, "the wrong token refused", lambda d: "wrong operator token" in _notice(d))
            _keep_token(browser, TOKEN)
            kept = browser.execute_script("return sessionStorage.getItem('intu.operator-token')")
            assert kept == TOKEN and TOKEN not in browser.current_url
            for entry_id in _now(browser, _dead_letters):
                _click(browser, f'#dead-table tr[data-entry-id="{entry_id}"] button.retry')
                _until(
                    browser,
                    f"{entry_id} leaving the dead letters",
                    lambda d, e=entry_id: e not in _dead_letters(d),
                )
            _until(
                browser,
                "every instance delivered",
                lambda d: (
                    len(rows := _message_rows(d)) == len(files)
                    and all(r["status"] == "delivered" for r in rows)
                ),
            )
            _until(
                browser, "the delivery in the open journey", lambda d: _journey_kinds(d)[-1:] == ["delivered"]
            )
            assert "retried" in _now(browser, _journey_kinds)
            assert _now(browser, _dead_letters) == []
            # Nothing came from anywhere but intu serve (no CDN, no fonts from the internet).
            origin = f"http://127.0.0.1:{http_port}/"
            fetched = browser.execute_script(
                "return performance.getEntriesByType('resource').map(e => e.name)"
            )
            assert fetched and all(url.startswith(origin) for url in fetched), fetched

            # ... and on the PACS's side: every SOP Instance UID arrived, pixel data unchanged.
            received = {}
            for path in pacs.folder.iterdir():
                ds = pydicom.dcmread(path)
                received[str(ds.SOPInstanceUID)] = ds
            assert set(received) == set(sent)
            for uid, path in sent.items():
                original = pydicom.dcmread(path)
                assert received[uid].PixelData == original.PixelData
                assert received[uid].AccessionNumber == ACCESSION
                assert received[uid].StudyInstanceUID == original.StudyInstanceUID
        finally:
            pacs.stop()

        if os.environ.get("INTU_SCREENSHOT") == "1":
            _save_screenshot(browser)


def _notice(driver: WebDriver) -> str:
    return driver.find_element(By.ID, "notice").text


def _keep_token(driver: WebDriver, token: str) -> None:
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "token-save").click()
    _until(driver, "the token kept", lambda d: "kept for this tab" in _notice(d))


def _save_screenshot(driver: WebDriver) -> None:
    """The whole page (overview, chart, a search with one message's journey open) as the README's
    picture: the window made as tall as the page, so that nothing is cut or scrolled."""
    driver.execute_script("document.getElementById('notice').textContent = ''")  # the last click's note
    for _ in range(3):  # the window's height includes what is not page: converge on the page's
        inner, page = driver.execute_script(
            "return [window.innerHeight, document.documentElement.scrollHeight]"
        )
        if inner >= page:
            break
        driver.set_window_size(WINDOW[0], driver.get_window_size()["height"] + page - inner)
    driver.execute_script("window.scrollTo(0, 0)")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(SCREENSHOT))
