"""The chat page at / in headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
it loads, lists the model, streams a reply with tokens/s, logs no console error, and asks for a
key when the server requires one. Skipped, with the reason, where no Chromium is installed
(`.ci/run` installs it)."""

from __future__ import annotations

import shutil

import pytest

from tests.serve.conftest import MODEL

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                "(apt-get install chromium chromium-driver); .ci/run installs them")


@pytest.fixture()
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def chat(browser, text: str) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: [o.text for o in d.find_elements(By.CSS_SELECTOR, "#model option")] == [MODEL])
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()
    reply = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".assistant[data-done='1']")))
    assert browser.find_element(By.CSS_SELECTOR, ".user").text == text
    return reply.get_attribute("textContent")


def severe(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_page_streams_a_reply(server, browser):
    import openai
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    assert browser.title == "exaflop chat"
    browser.execute_script("document.getElementById('max_tokens').value = 24;"
                           "document.getElementById('temperature').value = 0;")
    reply = chat(browser, "What does json.dumps do?")
    # Greedy: the page shows exactly what the API answers to the same conversation.
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What does json.dumps do?"}], max_tokens=24,
        temperature=0.0)
    assert reply == api.choices[0].message.content and reply
    assert "tokens/s" in browser.find_element(By.ID, "stats").text
    assert severe(browser) == []


def test_page_asks_for_a_key(run_dir, start_server, browser):
    import openai
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = start_server([run_dir], env={"EXAFLOP_API_KEYS": "sk-page"})
    browser.get(s.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "keybox").is_displayed())
    browser.find_element(By.ID, "key").send_keys("sk-page")
    browser.find_element(By.ID, "savekey").click()
    # Greedy, as in the test above: at the page's default temperature a 5-step model can sample
    # its end-of-text token first and answer nothing (stop 37's CI saw exactly that).
    browser.execute_script("document.getElementById('max_tokens').value = 8;"
                           "document.getElementById('temperature').value = 0;")
    reply = chat(browser, "What does json.dumps do?")
    api = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-page").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What does json.dumps do?"}], max_tokens=8,
        temperature=0.0)
    assert reply == api.choices[0].message.content and reply
    # The 401 from /v1/models before the key was given is the only console error.
    assert all("401" in m for m in severe(browser))
