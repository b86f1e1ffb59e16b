"""The predictions page in a real headless Chromium (driven by selenium): it loads without a console
error, shows every row and decodes every thumbnail, sorts by a clicked column both ways, filters, and
shows injected markup as text without running any of it (and its Content-Security-Policy stops script
even when escaping is broken on purpose).

Without Chromium and chromedriver these tests skip, saying so; with ``LLAVA_LOOP_REQUIRE_BROWSER=1``
(set by ``.ci/run``) they fail instead.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest

from helpers import small_config, solid_image
from llava_loop import Loop, report
from llava_loop.report import Thumbnails, predictions_page
from llava_loop.testing import synthetic_vqa, tiny_llava

REQUIRE_BROWSER = "LLAVA_LOOP_REQUIRE_BROWSER"
# Headless, as root in a container, and never touching the network (without the background-networking
# switches Chromium phones home).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)
TITLE = "Predictions at step 7"
INJECTED = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned too'\">"

# Scores of the page's rows: ties (1.0, 0.0), a NaN and a missing one, which sort last either way.
SCORES = [0.5, 1.0, 0.0, 0.25, math.nan, None, 0.75, 1.0, 0.0]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium session (module-wide) that records the browser console."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", chromedriver)) if p is None)
        reason = f"{missing} not found: the browser tests need Chromium and its driver (Debian: apt-get install "
        reason += "chromium chromium-driver)"
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_BROWSER}=1 requires them")
        pytest.skip(reason)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:  # declared in the test extra: a missing selenium is an installation error
        pytest.fail(f"selenium is not installed ({err}): pip install -e '.[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))  # a driver path: no downloads
    yield driver
    driver.quit()


def page_samples() -> tuple[list[dict], list[dict]]:
    """Nine evaluated samples and their records: one image each, two for sample 2, none for sample 5, the
    same picture for 0 and 8; sample 4 predicts injected markup."""
    images = [record["image"] for record in synthetic_vqa(9, seed=3, image_size=64)]
    records = [{"id": f"s{i}", "image": image, "conversations": []} for i, image in enumerate(images)]
    records[2]["image"] = [images[2], solid_image((200, 100, 0), (200, 120))]
    records[5]["image"] = None
    records[8]["image"] = images[0].copy()
    samples = []
    for i, score in enumerate(SCORES):
        scores = {} if score is None else {"exact_match": score}
        prediction = INJECTED if i == 4 else f"answer {i}"
        samples.append({"index": i, "id": f"sample-{i}", "prompt": f"USER: <image>\nquestion {i} ASSISTANT:",
                        "prediction": prediction, "references": [f"ref {i}"], "scores": scores})  # fmt: skip
    return samples, records


def open_page(browser, path):
    """Load ``path``; wait until every image has loaded or failed; return the console's severe messages."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(path.as_uri())
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.readyState") == "complete")
    WebDriverWait(browser, 10).until(
        lambda d: d.execute_script("return Array.from(document.images).every(i => !i.src || i.complete)")
    )
    return severe(browser)


def severe(browser) -> list[str]:
    """The console's error messages since the last call (JS errors, CSP violations, failed loads)."""
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def column(browser, name: str, what: str = "text") -> list:
    """The cells of column ``name`` in the order shown: their text, or their ``data-v``."""
    return browser.execute_script(
        """
        const names = Array.from(document.querySelectorAll("#predictions thead th"), th => th.textContent);
        const at = names.indexOf(arguments[0]);
        return Array.from(document.querySelector("#predictions").tBodies[0].rows,
                          row => arguments[1] === "text" ? row.cells[at].textContent : row.cells[at].dataset.v);
        """,
        name,
        what,
    )


def click_header(browser, name: str) -> None:
    from selenium.webdriver.common.by import By

    (header,) = [th for th in browser.find_elements(By.CSS_SELECTOR, "#predictions thead th") if th.text == name]
    header.click()


@pytest.fixture(scope="module")
def page_file(tmp_path_factory):
    samples, records = page_samples()
    path = tmp_path_factory.mktemp("page") / "step_000007.html"
    path.write_text(predictions_page(samples, {"eval/exact_match": 0.5}, step=7, thumbnails=Thumbnails(records)))
    return path


def test_page_loads_without_errors_with_every_row_and_every_thumbnail_decoded(browser, page_file):
    errors = open_page(browser, page_file)
    assert errors == [], f"the page logged errors: {errors}"
    assert browser.title == TITLE, f"title {browser.title!r}"
    assert column(browser, "id") == [f"sample-{i}" for i in range(9)], "rows missing or out of dataset order"
    widths = browser.execute_script(
        "return Array.from(document.querySelectorAll('#predictions tbody tr'),"
        " row => Array.from(row.querySelectorAll('img'), img => img.naturalWidth))"
    )
    assert [len(row) for row in widths] == [1, 1, 2, 1, 1, 0, 1, 1, 1], f"images per row: {widths}"
    assert all(w > 0 for row in widths for w in row), f"an image did not decode (naturalWidth 0): {widths}"
    assert widths[2] == [64, 160], f"images are not shown at their thumbnail size: {widths[2]}"


def test_clicking_a_score_header_sorts_by_score_both_ways_and_missing_scores_go_last(browser, page_file):
    open_page(browser, page_file)
    numbers = [s for s in SCORES if s is not None and not math.isnan(s)]
    ids = column(browser, "id")
    click_header(browser, "exact_match")
    shown = column(browser, "exact_match", "v")
    assert [float(v) for v in shown[:7]] == sorted(numbers) and shown[7:] == ["", ""], f"ascending: {shown}"
    assert column(browser, "id")[:2] == ["sample-2", "sample-8"], "equal scores should keep dataset order"
    click_header(browser, "exact_match")
    shown = column(browser, "exact_match", "v")
    assert [float(v) for v in shown[:7]] == sorted(numbers, reverse=True) and shown[7:] == ["", ""], (
        f"descending: {shown}"
    )
    click_header(browser, "#")
    assert column(browser, "id") == ids, "sorting by # should restore dataset order"
    click_header(browser, "id")
    click_header(browser, "id")
    assert column(browser, "id") == ids[::-1], "a text column should sort (and reverse) too"
    assert severe(browser) == [], "sorting logged errors"


def test_injected_markup_is_shown_as_text_and_nothing_of_it_runs(browser, page_file):
    errors = open_page(browser, page_file)
    assert browser.title == TITLE, f"an injected script ran: the title is {browser.title!r}"
    assert column(browser, "prediction")[4] == INJECTED, "the injected markup is not shown as the text it is"
    counts = browser.execute_script(
        "return [document.scripts.length, document.images.length,"
        " document.querySelectorAll('img[src=\"x\"], [onerror]').length]"
    )
    assert counts == [2, 9, 0], f"[scripts, images, injected elements] are {counts}: markup was injected"
    assert errors == [], f"something tried to run or load: {errors}"


def test_the_security_policy_stops_script_even_if_escaping_were_broken(browser, tmp_path, monkeypatch):
    samples, records = page_samples()
    monkeypatch.setattr(report, "_escape", str)  # simulate an escaping bug
    path = tmp_path / "broken.html"
    path.write_text(predictions_page(samples, {}, step=7, thumbnails=Thumbnails(records)))
    errors = open_page(browser, path)
    assert browser.execute_script("return document.scripts.length") == 3, "the simulated bug injected no script"
    assert browser.title == TITLE, f"the injected script ran despite the policy: title {browser.title!r}"
    assert any("Content Security Policy" in e for e in errors), f"no CSP violation reported: {errors}"


def test_the_filter_box_hides_rows_without_the_text(browser, page_file):
    from selenium.webdriver.common.by import By

    open_page(browser, page_file)
    browser.find_element(By.ID, "filter").send_keys("PWNED")
    visible = browser.execute_script(
        "return Array.from(document.querySelectorAll('#predictions tbody tr'), r => r.hidden ? null : r.cells[2]"
        ".textContent).filter(Boolean)"
    )
    assert visible == ["sample-4"], f"the filter should leave the one row that mentions it: {visible}"
    assert browser.find_element(By.ID, "shown").text == "1 shown"


def test_a_page_written_by_fit_shows_every_sample_with_its_image(browser, tmp_path):
    model, processor = tiny_llava(seed=0)
    config = small_config(tmp_path, max_steps=1, max_new_tokens=2, log_steps=0)
    Loop(model, processor, config).fit(synthetic_vqa(4, seed=0), synthetic_vqa(6, seed=1))
    errors = open_page(browser, tmp_path / "predictions" / "step_000001.html")
    assert errors == [], f"the page logged errors: {errors}"
    assert column(browser, "id") == [f"synthetic-1-{i}" for i in range(6)], "rows missing or out of order"
    widths = browser.execute_script("return Array.from(document.images, i => i.naturalWidth)")
    assert len(widths) == 6 and all(w == 32 for w in widths), f"thumbnails not decoded at 32 px: {widths}"
