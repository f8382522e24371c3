"""The playground page (``GET /``) in a real headless Chromium: it lists the models, streams one answer per
checked model side by side, and each column's text equals the official ``openai`` client's (non-streamed)
answer for the same model and settings. Needs the system's Chromium (Debian: ``apt-get install chromium``) and
Playwright for Python (the ``test`` extra); never a browser download of Playwright's own."""
from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

PROMPT = "Write a short poem about the sea."
CHROMIUM = shutil.which("chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: apt-get install chromium (Debian) to run the playground test")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[test]' (no `playwright install` needed)")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    """The playground with the server's API key entered (kept in localStorage, so it survives a reload)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/")
    page.fill("#api-key", server.api_key)
    page.press("#api-key", "Tab")  # the change event stores it and reloads the models
    page.wait_for_selector(".model-choice input[value='a']")
    page.reload()
    assert page.input_value("#api-key") == server.api_key
    page.wait_for_selector(".model-choice input[value='a']")
    yield page
    context.close()


def choice(page, model: str):
    return page.locator(f".model-choice input[value='{model}']")


def wait_until_settled(page, models: list[str]) -> None:
    """Every model's column finished or failed."""
    page.wait_for_function(
        """models => models.every(m => {
             const col = document.querySelector(`.answer[data-model="${m}"]`);
             return col && (col.classList.contains("finished") || col.classList.contains("failed"));
           })""", arg=models, timeout=TIMEOUT_MS)


def test_playground_streams_each_model_side_by_side_as_the_openai_client_answers(page, client, base_name,
                                                                                  tmp_path):
    models = [base_name, "a", "b"]
    assert choice(page, base_name).is_checked() and choice(page, "a").is_checked()  # the defaults
    assert not choice(page, "b").is_checked()
    max_tokens, temperature = int(page.input_value("#max-tokens")), float(page.input_value("#temperature"))
    assert (max_tokens, temperature) == (64, 0.0)
    for model in models:
        choice(page, model).check()
    page.fill("#prompt", PROMPT)
    page.click("#generate")
    wait_until_settled(page, models)

    texts = {}
    for model in models:
        column = page.locator(f".answer[data-model='{model}']")
        status = column.locator(".status").text_content()
        errors = column.locator(".error").all_text_contents()
        assert "done" in status, (model, status, errors)
        texts[model] = column.locator(".text").text_content()
        expected = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                  temperature=temperature, max_tokens=max_tokens)
        answer = expected.choices[0]
        assert texts[model] == answer.message.content, model
        assert f"{expected.usage.completion_tokens} token" in status and answer.finish_reason in status, status
    assert texts["a"] != texts[base_name]
    assert page.locator(f".answer[data-model='{base_name}'] .badge").text_content() == "base"
    assert page.locator(".answer[data-model='a'] .badge").text_content() == f"adapter of {base_name}"

    shot = Path(os.environ.get("LORAQ_TEST_ARTIFACTS", tmp_path)) / "playground.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 1000 and height >= 400


def test_playground_shows_the_servers_error_in_the_column(page, base_name):
    choice(page, "a").uncheck()
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "0")  # the server refuses it: 400 in OpenAI's error shape
    page.click("#generate")
    wait_until_settled(page, [base_name])
    column = page.locator(f".answer[data-model='{base_name}']")
    assert "max_tokens must be at least 1" in column.locator(".error").text_content()
    assert "failed" in column.locator(".status").text_content()
    assert column.locator(".text").text_content() == ""
