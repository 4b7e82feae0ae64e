"""The HTTP service: each limit's error, batching that keeps answers with their questions, timeouts that never hang
the server, a real uvicorn server under concurrent clients, and the page in a real (headless) browser."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from fastapi.testclient import TestClient

from bertqa.deploy.service import Batcher, RequestError, ServiceLimits, create_app, parse_questions
from bertqa.deploy.serving import Answer
from bertqa.postprocess import NO_CALIBRATION
from tests.test_scripts import ENV, ROOT

LIMITS = ServiceLimits(
    max_body_bytes=2000, max_questions=3, max_context_chars=300, max_question_chars=50, max_request_chars=800
)
OK = {"question": "Who?", "context": "Ann wrote it."}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"", 400, "empty body"),
        (b'{"question": "Who', 400, "malformed JSON: Unterminated string"),
        (b'{"question": NaN, "context": "x"}', 400, "NaN is not valid JSON"),
        (b"\xff\xfe", 400, "malformed JSON"),
        (b"[" * 1999, 400, "nested too deeply"),
        (b'{"question": "a", "question": "b", "context": "c"}', 400, "the field 'question' is given twice"),
        (json.dumps([{**OK, "context": "z" * 300}] * 3).encode(), 422, "have 912 characters; .* at most 800 a"),
        (json.dumps({**OK, "question": "\ud800?"}).encode(), 422, "'question' is not valid Unicode text"),
        (b'"just text"', 422, "got a string"),
        (b"[]", 422, "an empty list"),
        (json.dumps([OK] * 4).encode(), 422, "4 questions; this service takes at most 3"),
        (b"x" * 2001, 413, "2,001 bytes; this service takes at most 2,000"),
        (json.dumps([OK, 5]).encode(), 422, "item 1: expected an object"),
        (json.dumps({"question": "Who?"}).encode(), 422, "the request: 'context' is missing"),
        (json.dumps({**OK, "contxt": "x"}).encode(), 422, "unknown field 'contxt' \\(did you mean 'context'\\?\\)"),
        (json.dumps([OK, {**OK, "question": "  "}]).encode(), 422, "item 1: 'question' is empty"),
        (json.dumps({**OK, "context": 7}).encode(), 422, "'context' must be text, got a number"),
        (json.dumps({**OK, "id": [1]}).encode(), 422, "'id' must be a string or a whole number"),
        (json.dumps({**OK, "id": True}).encode(), 422, "'id' must be a string or a whole number"),
        (json.dumps([OK, {**OK, "id": "q7", "context": "y" * 301}]).encode(), 422, r"\(id 'q7'\): 'context' has 301"),
        (json.dumps({**OK, "question": "w" * 51}).encode(), 422, "'question' has 51 characters; .* at most 50"),
    ],
)
def test_each_limit_and_malformed_body_is_refused_with_its_reason(body, status, message):
    import re

    with pytest.raises(RequestError) as caught:
        parse_questions(body, LIMITS)
    assert caught.value.status == status and re.search(message, caught.value.message), caught.value.message


def test_records_keep_their_ids_else_get_their_position():
    records, many = parse_questions(json.dumps([OK, {**OK, "id": "a"}, {**OK, "id": 7}]).encode(), LIMITS)
    assert many and [r["id"] for r in records] == [0, "a", 7]
    records, many = parse_questions(json.dumps(OK).encode(), LIMITS)
    assert not many and records == [{"id": 0, **OK}]


def fake_answer(records, top_k, calls=None, delay=0.0):
    """Answers that can only belong to their own question: the question reversed, with top_k candidates."""
    if calls is not None:
        calls.append([r["id"] for r in records])
    time.sleep(delay)
    for r in records:
        if r["question"] == "bad":
            raise ValueError(f"question {r['id']!r}: 'question' yields no tokens")
    candidates = tuple({"answer": str(i)} for i in range(top_k))
    return [Answer(r["id"], r["question"][::-1], 0, 1, 1.0, 0.5, None, candidates) for r in records]


def run_batcher(coroutine_fn, **kwargs):
    async def main():
        batcher = Batcher(**kwargs)
        task = asyncio.create_task(batcher.run())
        await asyncio.sleep(0)
        try:
            return await coroutine_fn(batcher)
        finally:
            task.cancel()
            batcher.close()

    return asyncio.run(main())


def test_concurrent_requests_share_batches_and_each_gets_its_own_answers():
    calls: list = []

    async def clients(batcher):
        async def one(n):  # request n: n % 3 + 1 questions, ids unique to it
            records = [{"id": f"r{n}-{i}", "question": f"q{n}.{i}", "context": "c"} for i in range(n % 3 + 1)]
            answers = await batcher.answer(records, top_k=n % 4)
            return records, answers

        return await asyncio.gather(*(one(n) for n in range(40)))

    results = run_batcher(
        clients, answer_fn=lambda r, k: fake_answer(r, k, calls), max_batch=8, max_wait_s=0.05, max_pending=1000
    )
    for n, (records, answers) in enumerate(results):
        assert [a.id for a in answers] == [r["id"] for r in records]
        assert [a.answer for a in answers] == [r["question"][::-1] for r in records]
        assert all(len(a.top_k) == n % 4 for a in answers)  # each request's own top_k, though batched
    assert len(calls) < 40 and max(len(c) for c in calls) <= 8  # merged, and never above max_batch
    assert sorted(i for c in calls for i in c) == sorted(r["id"] for rs, _ in results for r in rs)


def test_a_bad_record_fails_only_its_own_request():
    async def clients(batcher):
        good = [{"id": i, "question": f"q{i}", "context": "c"} for i in range(2)]
        bad = [{"id": "x", "question": "bad", "context": "c"}]
        return await asyncio.gather(
            batcher.answer(good, 0), batcher.answer(bad, 0), batcher.answer(good, 0), return_exceptions=True
        )

    first, error, last = run_batcher(clients, answer_fn=fake_answer, max_batch=8, max_wait_s=0.05, max_pending=100)
    assert [a.answer for a in first] == [a.answer for a in last] == ["0q", "1q"]
    assert isinstance(error, RequestError) and error.status == 422 and "'x'" in error.message


def test_too_many_waiting_questions_are_refused_as_busy():
    async def clients(batcher):
        records = [{"id": i, "question": "q", "context": "c"} for i in range(3)]
        return await asyncio.gather(*(batcher.answer(records, 0) for _ in range(3)), return_exceptions=True)

    slow = lambda r, k: fake_answer(r, k, delay=0.2)  # noqa: E731
    results = run_batcher(clients, answer_fn=slow, max_batch=3, max_wait_s=0.0, max_pending=6)
    busy = [r for r in results if isinstance(r, RequestError)]
    assert len(busy) == 1 and busy[0].status == 503 and "busy" in busy[0].message


class StubAnswerer:
    """What create_app needs of an Answerer, answering like `fake_answer` after `delay` seconds."""

    model_dir, backend, v2, threshold, calibration = "stub", "stub-backend", False, None, NO_CALIBRATION
    settings_from, untrained_head = "bertqa.json", None

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def __call__(self, records, top_k=0):
        return fake_answer(records, top_k, delay=self.delay)


def test_the_app_answers_objects_and_lists_and_names_errors():
    with TestClient(create_app(StubAnswerer(), LIMITS)) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["backend"] == "stub-backend" and health["version"]
        one = client.post("/answer?top_k=2", json={**OK, "id": "z"})
        assert one.status_code == 200 and one.json()["id"] == "z" and one.json()["answer"] == "?ohW"
        assert one.json()["question"] == "Who?" and len(one.json()["top_k"]) == 2
        many = client.post("/answer", json=[OK, {**OK, "question": "Why?"}]).json()
        assert [a["answer"] for a in many] == ["?ohW", "?yhW"] and [a["id"] for a in many] == [0, 1]
        refused = client.post("/answer", content=b"{oops")
        assert refused.status_code == 400 and refused.json()["error"].startswith("malformed JSON")
        assert client.post("/answer?top_k=99", json=OK).status_code == 422
        assert client.post("/answer?top_k=-1", json=OK).json()["error"].startswith("top_k must be")
        assert client.post("/answer?top_k=\u00b2", json=OK).status_code == 422  # a digit to isdigit, not to int
        for method, path, status in (("GET", "/answer", 405), ("POST", "/health", 405), ("GET", "/nowhere", 404)):
            reply = client.request(method, path)
            assert reply.status_code == status and path in reply.json()["error"]
        assert client.head("/health").status_code == 200
        assert client.get("/docs").status_code == 404 and client.get("/openapi.json").json()["info"]["title"]
        big = client.post("/answer", content=b"[" + b" " * 3000 + b"]")  # refused from its Content-Length
        assert big.status_code == 413 and big.json()["error"].startswith("the body has 3,002 bytes; ")
        assert big.headers["connection"] == "close"  # the rest of a body is never left to read on the connection
        chunks = (b" " * 500 for _ in range(6))  # no Content-Length: refused once the stream passes the limit
        big = client.post("/answer", content=chunks)  # the rest read and dropped, even from a stream that has ended
        assert big.status_code == 413 and big.json()["error"].startswith("the body has 3,000 bytes; ")
        page = client.get("/")
        assert page.status_code == 200 and 'id="ask"' in page.text and "http" not in page.text.split("<script>")[1]


def test_a_slow_request_is_cut_off_and_the_server_goes_on():
    limits = ServiceLimits(timeout_s=0.3, max_wait_ms=0)
    with TestClient(create_app(StubAnswerer(delay=1.0), limits)) as client:
        t0 = time.monotonic()
        slow = client.post("/answer", json=OK)
        assert slow.status_code == 504 and "longer than 0.3 s" in slow.json()["error"]
        assert time.monotonic() - t0 < 0.9  # answered at the timeout, not when the work ended
        assert client.get("/health").status_code == 200  # while the worker is still busy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body) -> tuple[int, object]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextlib.contextmanager
def running(app):
    """`app` served by uvicorn on a free loopback port, in a thread of this process: its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def read_while_sending(url: str, head: str, body: bytes = b"") -> tuple[bytes, float]:
    """Send `head` (the request line and headers, one a line) and `body` from a thread while reading the reply until
    the server closes, as curl and browsers do: what the client reads, and after how many seconds."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as conn:

        def send() -> None:
            with contextlib.suppress(OSError):  # a server that stops reading may reset the connection
                conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)

        sender = threading.Thread(target=send, daemon=True)
        t0 = time.monotonic()
        sender.start()
        reply = b""
        with contextlib.suppress(ConnectionResetError):  # after the reply, when the body was left unread
            while chunk := conn.recv(1 << 16):
                reply += chunk
        sender.join(timeout=10)
        return reply, time.monotonic() - t0


FIVE_MB = b"x" * 5_000_000
LIMIT_NAMED = "this service takes at most 1,048,576"  # the default max_body_bytes


def test_a_body_over_the_limit_is_read_and_refused_not_reset():
    """urllib sends its whole body before it reads the reply: had the server closed with the body unread, the kernel
    would reset the connection and urllib would raise "connection reset" instead of reading the 413."""
    with running(create_app(StubAnswerer())) as url:
        chunked = (FIVE_MB[i : i + 65536] for i in range(0, len(FIVE_MB), 65536))  # no Content-Length
        for body in (FIVE_MB, chunked):
            request = urllib.request.Request(f"{url}/answer", data=body, headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:  # before the fix: URLError, connection reset
                urllib.request.urlopen(request, timeout=30)
            error = json.loads(refused.value.read())["error"]
            assert refused.value.code == 413 and error == f"the body has 5,000,000 bytes; {LIMIT_NAMED}", error
            assert refused.value.headers["Connection"] == "close"
        # A client that waits for a go-ahead is refused from its Content-Length before it sends the body.
        head = "POST /answer HTTP/1.1\nHost: x\nContent-Length: 5000000\nExpect: 100-continue\n"
        reply, seconds = read_while_sending(url, head)
        assert reply.startswith(b"HTTP/1.1 413") and b"100 Continue" not in reply and LIMIT_NAMED.encode() in reply
        assert b"connection: close" in reply.lower() and seconds < 5
        status, answer = post(f"{url}/answer", OK)  # and the server goes on
        assert status == 200 and answer["answer"] == "?ohW"


def test_a_body_past_the_drained_bound_or_short_of_its_length_still_gets_its_413():
    limits = ServiceLimits(timeout_s=1.0, max_discard_bytes=1 << 20)  # bodies up to 2 MiB are read to their end
    with running(create_app(StubAnswerer(), limits)) as url:
        declared = "POST /answer HTTP/1.1\nHost: x\nContent-Length: 5000000\n"
        reply, seconds = read_while_sending(url, declared, FIVE_MB)  # refused from its length, nothing read
        assert reply.startswith(b"HTTP/1.1 413") and b"5,000,000 bytes; " + LIMIT_NAMED.encode() in reply
        assert b"connection: close" in reply.lower() and seconds < 5
        chunks = b"".join(b"10000\r\n" + b"x" * 65536 + b"\r\n" for _ in range(80)) + b"0\r\n\r\n"
        chunked = "POST /answer HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n"
        reply, seconds = read_while_sending(url, chunked, chunks)  # refused once 2 MiB are in
        assert reply.startswith(b"HTTP/1.1 413") and b"the body has more than 2," in reply and seconds < 5
        # A body that stops short of its Content-Length: refused at the request's timeout.
        short = "POST /answer HTTP/1.1\nHost: x\nContent-Length: 1500000\n"
        reply, seconds = read_while_sending(url, short, FIVE_MB[:1_200_000])
        assert reply.startswith(b"HTTP/1.1 413") and b"1,500,000 bytes; " + LIMIT_NAMED.encode() in reply
        assert b"connection: close" in reply.lower() and 0.9 < seconds < 5
        assert post(f"{url}/answer", OK)[0] == 200  # and the server goes on


@pytest.fixture(scope="module")
def server(tiny_dir):
    """scripts/serve.py on the tiny model, on a free loopback port."""
    port = free_port()
    serve = str(ROOT / "scripts" / "serve.py")
    cmd = [sys.executable, serve, str(tiny_dir), "--port", str(port), "--max-wait-ms", "30", "--timeout", "4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"serve.py ended: {proc.stdout.read()}")
            time.sleep(0.3)
    yield url
    proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn finishes what it has and shuts down
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in out, out


@pytest.mark.e2e
def test_a_real_server_keeps_answers_with_their_questions_under_concurrent_clients(server):
    from tests.test_export import load_examples

    examples, _ = load_examples("dev-v1.1", max_examples=24, seed=5)
    pool = [{"id": ex.id, "question": ex.question, "context": ex.context} for ex in examples]
    errors: list = []

    def client(n: int) -> None:
        for i in range(4):
            chosen = [pool[(n * 7 + i * 3 + j) % len(pool)] for j in range(1 + (n + i) % 3)]
            status, body = post(f"{server}/answer", chosen if len(chosen) > 1 else chosen[0])
            got = body if isinstance(body, list) else [body]
            if status != 200 or [a["id"] for a in got] != [q["id"] for q in chosen]:
                errors.append((status, body))
                continue
            for q, a in zip(chosen, got):
                if a["question"] != q["question"] or q["context"][a["start"] : a["end"]] != a["answer"]:
                    errors.append((q, a))
        status, body = post(f"{server}/answer", {"question": "Who?"})  # invalid ones in between
        if status != 422:
            errors.append((status, body))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    health = json.loads(urllib.request.urlopen(f"{server}/health").read())
    assert health["batches"] < 32  # 32 valid requests shared batches
    status, body = post(f"{server}/answer", {"question": "Who?", "context": "\u200b"})  # no tokens at all
    assert status == 422 and "yields no tokens" in body["error"]


@pytest.mark.e2e
def test_the_load_test_reports_no_errors_and_every_answer_matched(tiny_dir):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "load_test.py"),
            str(tiny_dir),
            "--clients",
            "3",
            "--seconds",
            "3",
            "--pool",
            "12",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["valid_requests"] > 0 and summary["invalid_requests"] > 0
    assert summary["errors_on_valid"] == summary["invalid_not_refused"] == summary["mismatched_answers"] == 0
    assert summary["p95_ms"] >= summary["p50_ms"] > 0 and summary["rss_mib_max"] >= summary["rss_mib_start"] > 0


@pytest.mark.e2e
def test_a_body_that_never_arrives_is_cut_off(server):
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b'POST /answer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"question"')
        t0 = time.monotonic()
        reply = b""
        while not reply.endswith(b"}"):  # headers and body may come in separate packets
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408") and "did not arrive within 4 s" in reply, reply
    assert 3.5 < time.monotonic() - t0 < 20


@pytest.mark.e2e
def test_serve_refuses_a_bad_port_and_one_in_use(tiny_dir, server):
    from tests.test_scripts import script

    result = script("serve.py", tiny_dir, "--port", "70000", check=False)
    assert result.returncode == 2 and "must be a port number" in result.stderr
    port = server.rsplit(":", 1)[1]
    result = script("serve.py", tiny_dir, "--port", port, check=False)
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "serving" not in result.stderr and "Traceback" not in result.stderr
    result = script("serve.py", tiny_dir, "--host", "no such host", check=False)
    assert result.returncode == 2 and "(is --host an address here?)" in result.stderr, result.stderr


BROWSER_FLAGS = (
    "--headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --disable-quic --no-first-run "
    "--disable-background-networking --disable-component-update --disable-sync --window-size=1100,900"
)


@pytest.fixture
def browser():
    """Headless Chromium driven by selenium (Debian's chromium and chromium-driver)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("BERTQA_BROWSER_TESTS") == "required":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in BROWSER_FLAGS.split():
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    yield browser
    browser.quit()


def ask_in_page(browser, url: str, context: str, question: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda b: "bertqa" in b.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "context").clear()
    browser.find_element(By.ID, "context").send_keys(context)
    browser.find_element(By.ID, "question").clear()
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-answered"))


@pytest.mark.e2e
def test_the_page_answers_in_a_real_browser(server, browser):
    from selenium.webdriver.common.by import By

    # Emoji are one character to the service and two UTF-16 units to JavaScript: the highlight must not shift.
    context = "The book \U0001f4da\U0001f389 was written by Ann Lee in 1990, in a small house \U0001f3e0 in Paris."
    ask_in_page(browser, server, context, "Who wrote the book?")
    _, expected = post(f"{server}/answer?top_k=5", {"question": "Who wrote the book?", "context": context})
    highlighted = browser.find_element(By.ID, "highlight").text
    assert highlighted == expected["answer"].strip() and highlighted in context
    assert browser.find_element(By.ID, "passage").text == context  # the whole passage, the answer marked in it
    assert f"{100 * expected['probability']:.1f}%" in browser.find_element(By.ID, "probability").text
    rows = browser.find_elements(By.CSS_SELECTOR, "#candidates tbody tr")
    shown = [r.find_element(By.TAG_NAME, "td").text for r in rows]
    assert shown == [c["answer"].strip() for c in expected["top_k"]]
    shot = ROOT / "build" / "test-artifacts" / "page.png"  # kept to look at after the run
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:4] == b"\x89PNG"


class NoAnswerStub(StubAnswerer):
    """A v2 model that finds no answer above its threshold, with one candidate below it."""

    v2, threshold, backend = True, 0.5, "stub-v2"

    def __call__(self, records, top_k=0):
        candidate = ({"answer": "Paris", "start": 0, "end": 5, "score": -1.0, "probability": 0.1},)
        return [Answer(r["id"], "", None, None, 2.0, 0.9, 0.9, candidate[:top_k]) for r in records]


@pytest.mark.e2e
def test_the_page_says_no_answer_for_a_v2_model_in_a_real_browser(browser):
    import uvicorn
    from selenium.webdriver.common.by import By

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(NoAnswerStub()), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        ask_in_page(browser, f"http://127.0.0.1:{port}", "Paris is big.", "Who wrote it?")
        assert browser.find_element(By.ID, "answer").text == "no answer"
        assert "no-answer probability 90.0%" in browser.find_element(By.ID, "probability").text
        assert (
            not browser.find_elements(By.ID, "highlight")
            and "threshold 0.5" in browser.find_element(By.ID, "model").text
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
