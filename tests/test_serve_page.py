"""The playground page in a real headless browser (Debian's chromium): the streamed text is the golden
model's, the page loads nothing from elsewhere, Stop aborts the generation on the server, errors show
as one line. (The page on the Verilator SoC, with the chip's cycles: tests/test_serve_soc.py.)"""

from __future__ import annotations

import pytest
from bakedllama.golden import Golden, generate
from bakedllama.model import DEFAULT_BAKED, DEFAULT_TOKENIZER, load_baked
from bakedllama.serve.browser import browser, run_page
from bakedllama.serve.process import ServeProcess, outcome
from bakedllama.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def golden_text():
    m = load_baked(DEFAULT_BAKED)
    tok = Tokenizer.load(DEFAULT_TOKENIZER, m.meta["tokenizer_sha256"])
    g = Golden(m)
    return lambda prompt, n, t=0.0, seed=0: tok.decode(list(generate(g, tok.encode(prompt), n, t, seed)))


@pytest.fixture(scope="module")
def server():
    with ServeProcess(["--device", "golden"]) as s:
        yield s
    assert "Traceback" not in s.stderr(), s.stderr()


@pytest.fixture(scope="module")
def page():
    try:
        with browser() as d:
            yield d
    except RuntimeError as e:  # not installed: say how to get it (`make setup` does)
        pytest.fail(str(e))


def _same_origin(res, url):
    assert res["resources"] and all(r.startswith(url + "/") for r in res["resources"]), res["resources"]
    assert not [e for e in res["console"] if e["level"] == "SEVERE"], res["console"]


def test_page_streams_the_golden_text(server, page, golden_text, tmp_path):
    res = run_page(page, server.url, "It was", max_tokens=24)
    assert res["state"] == "done" and res["finish"] == "length", res
    assert res["prompt"] == "It was" and res["text"] == golden_text("It was", 24)
    assert res["figures"]["tokens"] == "24" and float(res["figures"]["tps"]) > 0
    assert res["figures"]["cycles"] == "n/a"  # the golden model has no hardware counter
    assert "bakedllama-tiny" in res["device"]
    _same_origin(res, server.url)
    shot = tmp_path / "page.png"
    page.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_sampled_with_seed(server, page, golden_text):
    res = run_page(page, server.url, "Elizabeth", max_tokens=16, temperature=0.8, seed=9)
    assert res["state"] == "done" and res["text"] == golden_text("Elizabeth", 16, 0.8, 9)


def test_stop_button_aborts_on_the_server(server, page):
    m0 = server.metrics()
    res = run_page(page, server.url, "It was", max_tokens=250, stop_after_tokens=3)
    assert res["state"] == "stopped" and "stopped after" in res["status"], res
    m = server.wait_for(lambda m: outcome(m, "aborted") == outcome(m0, "aborted") + 1, 10, "the abort")
    assert m["bakedllama_device_aborts_total"] == m0["bakedllama_device_aborts_total"] + 1
    assert m["bakedllama_device_aborted_generated_tokens_total"] - \
        m0["bakedllama_device_aborted_generated_tokens_total"] < 100  # of 250


def test_page_shows_errors(server, page):
    res = run_page(page, server.url, "Emma " * 200, max_tokens=40, timeout=60)
    assert res["state"] == "error" and "maximum context length is 256 tokens" in res["status"], res
