"""The chat page (pipeline/serving/static/index.html) in real headless chromium against a real server process:
the model picker, streamed multi-turn answers, the history each turn sends, new chat, and the API key.

Chromium is Debian's (/usr/bin/chromium; .ci/run installs it), driven by Playwright's sync API. The model
is tests/stages/test_generate.py's tiny random one: its answers are gibberish, which the page shows as text.
Answers are greedy (temperature 0) and short (its context is 64 tokens: a second turn must still fit).
"""

from __future__ import annotations

import json
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from playwright.sync_api import sync_playwright

from helpers import LiveServer
from stages.test_generate import save_run

pytestmark = pytest.mark.timeout(120)

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags chromium's own connections are refused in a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "page-test-key"
MAX_TOKENS = 6
IDLE = "() => !document.querySelector('#send').disabled"  # no answer streaming


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers of the same tiny model, started side by side: one open, one behind serve.api_key."""
    root = tmp_path_factory.mktemp("page")
    save_run(root, "ppo", "default")
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(LiveServer, root, *overrides) for name, overrides in (("open", ()), ("keyed", (f"serve.api_key={KEY}",)))}
    live, errors = {}, []
    for name, future in futures.items():
        try:
            live[name] = future.result()
        except Exception as e:  # the other one still gets stopped below
            errors.append(e)
    try:
        if errors:
            raise errors[0]
        yield live
    finally:
        for server in live.values():  # both told at once, then each waited for (killed if it hangs)
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        for server in live.values():
            try:
                server.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.process.kill()
            server.stop()  # exited (or killed): no second signal; reads its output
    for server in live.values():
        assert server.returncode == 0, server.stderr[-3000:]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 900, "height": 700})  # fresh localStorage for each test
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.crashes = []
    page.on("pageerror", lambda error: page.crashes.append(str(error)))
    page.chat_bodies = []  # the JSON bodies the page POSTs to /v1/chat/completions, in order
    page.on("request", lambda r: page.chat_bodies.append(json.loads(r.post_data)) if r.method == "POST" and r.url.endswith("/v1/chat/completions") else None)
    yield page
    context.close()
    assert not page.crashes, page.crashes


def answered(page, assistants: int) -> str:
    """Waits until the page shows `assistants` answers and none is streaming; the last answer's text."""
    page.wait_for_function(f"() => document.querySelectorAll('.message.assistant').length === {assistants} && ({IDLE})()")
    return page.locator(".message.assistant").last.text_content()


def test_two_turns_stream_and_send_the_whole_conversation(servers, page):
    page.goto(servers["open"].url + "/")
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    assert page.locator("#model option").all_text_contents() == ["ppo/default"]
    assert page.input_value("#model") == "ppo/default"
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(MAX_TOKENS))

    first = "<b>hi</b>"  # markup typed by the user is text, never HTML
    page.fill("#input", first)
    page.click("#send")
    answer = answered(page, 1)
    assert answer.strip(), "the first answer is empty"
    assert int(page.locator(".message.assistant").last.get_attribute("data-chunks")) > 1  # streamed in pieces
    assert page.locator(".message.user").last.text_content() == first
    assert page.locator(".message b").count() == 0

    # Shift+Enter is a new line, Enter sends.
    page.click("#input")
    page.keyboard.type("ok")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("go")
    assert page.input_value("#input") == "ok\ngo" and len(page.chat_bodies) == 1
    page.keyboard.press("Enter")
    second_answer = answered(page, 2)
    assert page.locator(".message.error").count() == 0, page.locator(".message.error").all_text_contents()
    assert page.locator(".message.user").count() == 2 and page.locator(".message.assistant").count() == 2
    assert second_answer.strip() and int(page.locator(".message.assistant").last.get_attribute("data-chunks")) > 1
    assert page.input_value("#input") == ""

    assert len(page.chat_bodies) == 2
    body = page.chat_bodies[1]
    assert body["messages"] == [
        {"role": "user", "content": first},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "ok\ngo"},
    ]
    assert body["stream"] is True and body["model"] == "ppo/default"
    assert body["temperature"] == 0 and body["max_tokens"] == MAX_TOKENS

    # New chat: the bubbles go, and the next turn sends only itself.
    page.click("#new-chat")
    assert page.locator("#messages .message").count() == 0
    page.fill("#input", "again")
    page.click("#send")
    answered(page, 1)
    assert page.chat_bodies[2]["messages"] == [{"role": "user", "content": "again"}]


def test_a_keyed_server_asks_for_the_key_then_answers_with_it(servers, page):
    page.goto(servers["keyed"].url + "/")
    error = page.locator(".message.error").first
    error.wait_for()  # the model list is refused (401)
    assert "API key" in error.text_content()
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#input", "hi")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as refused:
        page.click("#send")
    assert "authorization" not in refused.value.headers
    page.wait_for_function(f"() => document.querySelectorAll('.message.error').length === 2 && ({IDLE})()")
    assert "API key" in page.locator(".message.error").last.text_content()
    assert page.locator(".message.assistant").count() == 0
    assert page.input_value("#input") == "hi"  # the refused turn's text comes back to send again

    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.fill("#api-key", KEY)
        page.click("#send")  # leaving the key field reloads the model list with the key
    assert sent.value.headers["authorization"] == f"Bearer {KEY}"
    assert answered(page, 1).strip()
    assert page.locator(".message.error").count() == 2  # no new error
    assert page.chat_bodies[-1]["messages"] == [{"role": "user", "content": "hi"}]  # the refused turn is not history
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    assert page.input_value("#model") == "ppo/default"
    assert page.evaluate("localStorage.getItem('pipeline-chat-api-key')") == KEY


# A fetch() that answers chat with one piece of text, then holds the stream open until the page aborts it.
HANGING_FETCH = """() => {
  const real = window.fetch;
  window.sentBodies = [];
  window.fetch = (url, options) => {
    if (!String(url).endsWith("/v1/chat/completions")) return real(url, options);
    window.sentBodies.push(JSON.parse(options.body));
    const body = new ReadableStream({ start(c) {
      c.enqueue(new TextEncoder().encode('data: {"choices": [{"index": 0, "delta": {"content": "partial"}}]}\\n\\n'));
      options.signal.addEventListener("abort", () => c.error(new DOMException("stopped", "AbortError")));
    } });
    return Promise.resolve(new Response(body, { headers: { "Content-Type": "text/event-stream" } }));
  };
}"""


def test_stop_keeps_the_partial_answer_and_an_error_chunk_fails_the_turn(servers, page):
    page.goto(servers["open"].url + "/")
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    page.evaluate(HANGING_FETCH)
    page.fill("#input", "tell me")
    page.click("#send")
    page.wait_for_function("() => document.querySelector('.message.assistant').textContent === 'partial'")
    assert page.is_disabled("#send") and page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_function(IDLE)
    assert page.locator(".message.assistant").text_content() == "partial(stopped)" and page.is_disabled("#stop")
    page.fill("#input", "more")
    page.click("#send")
    page.wait_for_function("() => window.sentBodies.length === 2")
    assert [m["content"] for m in page.evaluate("window.sentBodies[1].messages")] == ["tell me", "partial", "more"]
    page.click("#stop")
    page.click("#new-chat")

    # A stream that fails midway ends with an error chunk: the error is shown, the turn leaves the history.
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, {"choices": [{"index": 0, "delta": {"content": "Hal"}}]},
              {"error": {"message": "decode step failed <oops>", "type": "server_error"}}]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=sse))
    page.reload()  # the real fetch() again, answered by the route
    page.fill("#input", "hi")
    page.click("#send")
    error = page.locator(".message.error")
    error.wait_for()
    page.wait_for_function(IDLE)
    assert error.text_content() == "decode step failed <oops>"
    assert page.locator(".message.assistant.failed").text_content() == "Hal"
    assert page.locator(".message.user.failed").count() == 1 and page.input_value("#input") == "hi"
