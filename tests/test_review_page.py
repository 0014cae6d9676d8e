"""The review page (serving/review.py, serving/static/) served by a real server process on 127.0.0.1 with the
tiny bundle and its API key, over plain HTTP and in a real browser.

The browser is Debian's headless Chromium (`apt-get install chromium chromium-driver`: /usr/bin/chromium and
/usr/bin/chromedriver) driven by selenium with exactly those paths, so nothing is downloaded; those tests are
skipped, saying why, where either file or selenium is missing (.ci/run installs them). The browser tests check
what a reviewer sees against the server's own answer for the same text: verdict, probability, language,
threshold, and the highlighted spans at the offsets the API gave (code points, here with emoji and an astral
ideograph before them: a JavaScript string counts those as two units each); that markup in a message stays
text and runs nothing; the API key flow (401 shown without it, kept in sessionStorage); file upload; and that
"verdict is wrong" stores the opposite label in the server's feedback store (and a server without a store
answers it 503); a response without explanations (an older server) still shows the verdict; and both explain
methods (occlusion: tiny_bundle; decomposition: tiny_mean_bundle, what the default config exports) highlight.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import httpx
import pytest

from serving.feedback import FeedbackStore
from test_server import KEY, start_server

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "serving" / "static"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Without the background-networking flags, Chromium's own connections (updates, sync, QUIC probes) are
# refused by a closed network and slow it down; a fresh profile per session.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900")
AUTH = {"Authorization": f"Bearer {KEY}"}
WAIT = 60  # seconds: the tiny model explains a text in well under one, the CPUs are shared

# An emoji (2 UTF-16 units), a ZWJ sequence and an astral ideograph (U+20BB7) before and inside the words
# that get highlighted: a code point / UTF-16 mix-up would shift every span after them.
SPAM = "🎉🎉 WIN a FREE iphone now! 𠮷 Click http://win.example.com to claim your prize 👨‍👩‍👧"
PAYLOAD = '<script>window.__pwned=1</script> <img src=x onerror="window.__pwned=1"> free prize'


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def review_server(tiny_bundle, tmp_path_factory):
    """A real server with --api-key; its feedback store is `log_dir / feedback.db` (start_server's default)."""
    log_dir = tmp_path_factory.mktemp("review")
    s = start_server(tiny_bundle, log_dir, env={"SPAMLINGO_API_KEY": KEY})
    s.db = log_dir / "feedback.db"
    yield s
    s.stop()


def _browser_missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} is missing (apt-get install -y {package}; .ci/run installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra: make setup)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    why = _browser_missing()
    if why:
        pytest.skip(f"no browser for the review page test: {why}")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


# ------------------------------------------------------------------------------------------ helpers


def _api(server, texts: list[str]) -> list[dict]:
    r = httpx.post(server.url + "/v1/classify", json={"texts": texts, "explain": True}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def _open(driver, server, key: str | None = KEY):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server.url + "/")
    WebDriverWait(driver, WAIT).until(lambda d: d.execute_script("return document.documentElement.dataset.ready"))
    field = driver.find_element("id", "api-key")
    field.clear()
    if key:
        field.send_keys(key)


def _submit(driver, text: str, whole: bool = False, expect: int | None = 1) -> list:
    """Type `text`, submit, wait until the status line reports the run; returns the result elements."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element("css selector", f'input[name="split"][value="{"whole" if whole else "lines"}"]').click()
    area = driver.find_element("id", "messages")
    area.clear()
    # send_keys cannot type characters outside the BMP (chromedriver): set the value as a script would
    driver.execute_script("arguments[0].value = arguments[1];", area, text)
    driver.find_element("id", "submit").click()
    WebDriverWait(driver, WAIT).until(
        lambda d: d.find_element("id", "submit").is_enabled()
        and re.search(r"classified|Error", d.find_element("id", "status").text))
    rows = driver.find_elements("css selector", "#results > li.result")
    if expect is not None:
        assert len(rows) == expect, driver.find_element("id", "status").text
    return rows


def _fact(row, cls: str) -> str:
    return row.find_element("css selector", f"dd.{cls}").get_attribute("textContent")  # not CSS-uppercased


def _message_text(driver, row) -> str:
    # textContent, not .text (which is the rendered text: whitespace collapsed, newlines changed)
    return driver.execute_script("return arguments[0].querySelector('.message').textContent;", row)


# ------------------------------------------------------------------------------------------ plain HTTP


def test_page_and_assets_are_served_with_the_csp_and_nothing_from_elsewhere(review_server):
    url = review_server.url
    r = httpx.get(url + "/", timeout=10)  # open without the key, like /docs: the API calls carry it
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    html = r.text
    assert '<script src="static/review.js"' in html and 'href="static/review.css"' in html
    # no inline script, no inline handlers, no absolute URL (no CDN: the server may run offline)
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html) and not re.search(r"\son[a-z]+=", html)
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(":" not in ref and not ref.startswith("//") for ref in refs), refs
    for name, kind in (("review.js", "text/javascript"), ("review.css", "text/css")):
        a = httpx.get(f"{url}/static/{name}", timeout=10)
        assert a.status_code == 200 and a.headers["content-type"].startswith(kind)
        assert a.content == (STATIC / name).read_bytes() and "content-security-policy" in a.headers
        assert not re.search(r"https?://", a.text), f"{name} refers to another host"
    js = (STATIC / "review.js").read_text(encoding="utf-8")
    assert not re.search(r"\.(inner|outer)HTML\s*\+?=|insertAdjacentHTML|document\.write|\beval\(", js)
    for bad in ("/static/nope.js", "/static/review.html", "/static/..%2Fserver.py", "/static/../server.py"):
        miss = httpx.get(url + bad, timeout=10)
        assert miss.status_code == 404 and miss.json()["error"]["kind"] == "not_found", bad
    # not part of the API: the schema (and schemathesis) does not see it
    assert "/" not in httpx.get(url + "/openapi.json", timeout=10).json()["paths"]


def test_the_package_ships_the_static_files():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"]["serving"]
    shipped = {p.name for pattern in patterns for p in (ROOT / "serving").glob(pattern)}
    assert {p.name for p in STATIC.iterdir() if p.is_file()} <= shipped == {"review.html", "review.js", "review.css"}


# ------------------------------------------------------------------------------------------ in the browser


def test_verdict_probability_and_highlighted_spans_with_the_api_key(browser, review_server):
    from selenium.webdriver.support.ui import WebDriverWait

    # without the key: the 401 is shown, nothing classified
    _open(browser, review_server, key=None)
    _submit(browser, SPAM, expect=0)
    status = browser.find_element("id", "status")
    assert "401" in status.text and "API key" in status.text and "error" in status.get_attribute("class")

    _open(browser, review_server)
    (row,) = _submit(browser, SPAM)
    (want,) = _api(review_server, [SPAM])
    assert _fact(row, "verdict") == want["label"] and row.get_attribute("data-label") == want["label"]
    assert float(_fact(row, "probability")) == pytest.approx(want["spam_probability"], abs=2e-3)  # int8 batches
    assert _fact(row, "lang") == want["lang"]
    assert _fact(row, "threshold").startswith(f"{want['threshold']:.3f} (")
    assert _message_text(browser, row) == SPAM
    assert "classified by" in browser.find_element("id", "status").text

    # the spans, at the offsets the API gave (the explain field is in this server: the assertion is unconditional)
    assert "explanation" in want, "the server answers explain: true without an explanation"
    spans = want["explanation"]["spans"]
    assert spans, "the tiny model's explanation of a spam message has no span"
    marks = row.find_elements("css selector", ".message mark.span")
    got = sorted((m.get_attribute("textContent"), float(m.get_attribute("data-effect"))) for m in marks)
    expected = sorted((s["text"], s["effect"]) for s in spans)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [e for _, e in got] == pytest.approx([e for _, e in expected], abs=2e-3)  # int8: batch-dependent
    assert browser.execute_script(
        "return [...arguments[0].querySelectorAll('mark.span')].every(m => m.title.includes('p(spam)'))", row)
    for m in marks:  # red raises, green lowers
        rgb = m.value_of_css_property("background-color")
        effect = float(m.get_attribute("data-effect"))
        if effect > 0:
            assert rgb.startswith("rgba(220, 38, 38"), rgb
        elif effect < 0:
            assert rgb.startswith("rgba(22, 163, 74"), rgb
    assert row.find_elements("css selector", "details.why table.spans tbody tr")
    assert browser.find_element("id", "legend").is_displayed()

    # the key survives a reload (sessionStorage), and a phone-width window has no horizontal scroll
    browser.set_window_size(360, 800)
    try:
        browser.refresh()
        WebDriverWait(browser, WAIT).until(lambda d: d.execute_script("return document.documentElement.dataset.ready"))
        assert browser.find_element("id", "api-key").get_attribute("value") == KEY
        _submit(browser, SPAM)
        assert browser.execute_script(
            "return document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    finally:
        browser.set_window_size(1200, 900)


def test_markup_in_a_message_is_shown_as_text_and_runs_nothing(browser, review_server):
    _open(browser, review_server)
    rows = _submit(browser, PAYLOAD + "\n<b>bold?</b> call now", expect=2)
    assert [_message_text(browser, r) for r in rows] == [PAYLOAD, "<b>bold?</b> call now"]
    assert "<script>window.__pwned=1</script>" in rows[0].find_element("css selector", ".message").text
    # one multi-line message: the newline kept
    (row,) = _submit(browser, PAYLOAD + "\nsecond line", whole=True)
    assert _message_text(browser, row) == PAYLOAD + "\nsecond line"
    assert browser.execute_script("return typeof window.__pwned") == "undefined"
    assert not browser.find_elements("css selector", "#results img, #results script, #results b")


def test_verdict_is_wrong_posts_the_opposite_label_to_the_feedback_store(browser, review_server):
    from selenium.webdriver.support.ui import WebDriverWait

    text = "Are we still meeting for lunch tomorrow at noon? review-page report"
    _open(browser, review_server)
    (row,) = _submit(browser, text)
    label = row.get_attribute("data-label")
    opposite = "ham" if label == "spam" else "spam"
    button = row.find_element("css selector", "button.report")
    assert button.text == f"Verdict is wrong: report as {opposite}"
    button.click()
    outcome = row.find_element("css selector", ".outcome")
    WebDriverWait(browser, WAIT).until(lambda d: outcome.get_attribute("data-status"))
    assert outcome.get_attribute("data-status") == "201" and f"Reported as {opposite}" in outcome.text
    assert not button.is_enabled()
    store = FeedbackStore(f"sqlite:///{review_server.db}", create=False)
    try:
        mine = [r for r in store.rows() if r["text"] == text]
    finally:
        store.close()
    assert len(mine) == 1 and mine[0]["label"] == opposite
    report_id = re.search(r"#(\d+)", outcome.text).group(1)
    assert int(report_id) == mine[0]["id"]

    # classified again, reported without the key: the 401 is shown beside the button, which stays usable;
    # with the key again, the same report is answered 200 with the first report's id
    (row,) = _submit(browser, text)
    key = browser.find_element("id", "api-key")
    key.clear()
    button = row.find_element("css selector", "button.report")
    button.click()
    outcome = row.find_element("css selector", ".outcome")
    WebDriverWait(browser, WAIT).until(lambda d: outcome.get_attribute("data-status") and button.is_enabled())
    assert outcome.get_attribute("data-status") == "401" and "401" in outcome.text and "error" in outcome.get_attribute("class")
    key.send_keys(KEY)
    button.click()
    WebDriverWait(browser, WAIT).until(lambda d: outcome.get_attribute("data-status") == "200")
    assert f"Already reported as {opposite} (report #{report_id})" in outcome.text


def test_files_are_parsed_in_the_browser(browser, review_server, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    csv = tmp_path / "messages.csv"
    csv.write_text('label,text\nspam,"WIN a FREE prize, click now"\nham,"two\nlines, ""quoted"""\nham,\n',
                   encoding="utf-8")
    jsonl = tmp_path / "messages.jsonl"
    jsonl.write_text("\n".join([json.dumps({"text": "会議は3時からです"}, ensure_ascii=False), "not json",
                                json.dumps({"id": 3}), json.dumps({"text": "무료 쿠폰을 받으세요"}, ensure_ascii=False)]),
                     encoding="utf-8")
    for path, want, skipped in ((csv, ["WIN a FREE prize, click now", 'two\nlines, "quoted"'], 1),
                                (jsonl, ["会議は3時からです", "무료 쿠폰을 받으세요"], 2)):
        _open(browser, review_server)
        browser.find_element("id", "file").send_keys(str(path))
        summary = browser.find_element("id", "file-summary")
        WebDriverWait(browser, WAIT).until(lambda d: summary.text)
        assert f"{len(want)} messages" in summary.text and f"{skipped} rows without text skipped" in summary.text
        browser.find_element("id", "submit").click()
        WebDriverWait(browser, WAIT).until(lambda d: "classified" in d.find_element("id", "status").text)
        rows = browser.find_elements("css selector", "#results > li.result")
        assert [_message_text(browser, r) for r in rows] == want
        assert [_fact(r, "lang") for r in rows] == [x["lang"] for x in _api(review_server, want)]


def test_a_response_without_explanations_shows_the_verdict_unhighlighted(browser, review_server):
    # what a server from before the explain field answers: the same results without "explanation"
    _open(browser, review_server)
    browser.execute_script("""
        const real = window.fetch;
        window.fetch = async (...args) => {
            const r = await real(...args);
            const body = await r.json();
            for (const x of body.results || []) delete x.explanation;
            return new Response(JSON.stringify(body), {status: r.status, headers: r.headers});
        };""")
    (row,) = _submit(browser, SPAM)
    (want,) = _api(review_server, [SPAM])
    assert _fact(row, "verdict") == want["label"] and _message_text(browser, row) == SPAM
    assert not row.find_elements("css selector", "mark") and not row.find_elements("css selector", "details.why")
    assert "No explanation" in row.find_element("css selector", ".explain-missing").text


def test_a_server_without_a_feedback_store_answers_the_button_with_503(browser, tiny_bundle, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    server = start_server(tiny_bundle, tmp_path, "--feedback-db", "none")  # and no API key
    try:
        _open(browser, server, key=None)
        (row,) = _submit(browser, "see you at lunch?")
        row.find_element("css selector", "button.report").click()
        outcome = row.find_element("css selector", ".outcome")
        WebDriverWait(browser, WAIT).until(lambda d: outcome.get_attribute("data-status"))
        assert outcome.get_attribute("data-status") == "503" and "stores no feedback" in outcome.text
    finally:
        server.stop()


def test_a_decomposition_bundle_is_highlighted_the_same_way(browser, tiny_mean_bundle, tmp_path):
    # the default config's bundles (mean pooling): explained by decomposition, the method named under "Why"
    server = start_server(tiny_mean_bundle, tmp_path, env={"SPAMLINGO_API_KEY": KEY})
    try:
        _open(browser, server)
        (row,) = _submit(browser, SPAM)
        (want,) = _api(server, [SPAM])
        assert want["explanation"]["method"] == "decomposition" and want["explanation"]["spans"]
        marks = row.find_elements("css selector", ".message mark.span")
        assert sorted(m.get_attribute("textContent") for m in marks) == sorted(
            s["text"] for s in want["explanation"]["spans"])
        assert "(decomposition)" in row.find_element("css selector", "details.why summary").get_attribute("textContent")
    finally:
        server.stop()
