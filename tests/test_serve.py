"""`bakedllama serve` on the golden model, driven by the official `openai` client: the same tokens as
the golden model for the same seed, OpenAI-style 400s, a really full queue's 503, aborts on client
disconnect, fair queueing, /health and /metrics, and a bounded load test of 32 streaming clients."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import openai
import pytest
from bakedllama.serve.loadtest import alone_rate, run_load
from bakedllama.serve.process import ServeProcess, outcome, parse_metrics
from bakedllama.serve.text import TextAssembler

MODEL_ID = "bakedllama-tiny"


@pytest.fixture(scope="module")
def ref(golden_ref):
    return golden_ref


@pytest.fixture(scope="module")
def server():
    with ServeProcess(["--device", "golden", "--max-queue", "4"]) as s:
        yield s
        assert s.proc.poll() is None, s.stderr()
    assert "Traceback" not in s.stderr(), s.stderr()


@pytest.fixture
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0, timeout=60)
    yield c
    c.close()


def post(server, body, raw: bytes | None = None, path="/v1/completions"):
    """(status, parsed JSON) of a POST with the stdlib (any body, however wrong)."""
    import urllib.error
    import urllib.request

    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def idle(server, timeout=30):
    return server.wait_for(lambda m: m["bakedllama_queue_depth"] == 0
                           and m["bakedllama_requests_running"] == 0, timeout, "an idle server")


def _addr(server):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


class Holder:
    """A long streaming request that keeps the device busy until release() (a disconnect)."""

    def __init__(self, server, user="holder", max_tokens=200):
        self.sock = socket.create_connection(_addr(server), timeout=60)  # bounded reads
        body = json.dumps(dict(model=MODEL_ID, prompt="It was", max_tokens=max_tokens, temperature=0,
                               stream=True, user=user)).encode()
        self.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        buf = b""
        while b"token_ids\": [" not in buf:  # its first token: it is on the device
            chunk = self.sock.recv(65536)
            assert chunk, buf
            buf += chunk

    def release(self):
        self.sock.close()


# Completions --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,temperature,seed", [("It was", 0.0, 0), ("Elizabeth", 0.8, 42),
                                                      ("Mr. Darcy said that", 1.3, 7)])
def test_completion_matches_golden(client, ref, prompt, temperature, seed):
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=20, temperature=temperature,
                                  seed=seed)
    want = ref(prompt, 20, temperature, seed)
    ch = r.choices[0]
    assert ch.model_extra["token_ids"] == want
    assert ch.text == ref.tok.decode(want) and ch.finish_reason == "length"
    assert r.model == MODEL_ID and r.object == "text_completion" and r.id.startswith("cmpl-")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.tok.encode(prompt)), 20)
    assert r.model_extra["bakedllama"]["seed"] == seed


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (0.9, 1234)])
def test_streaming_matches_golden(client, ref, temperature, seed):
    want = ref("It was", 24, temperature, seed)
    text, ids, reasons, usage = "", [], [], None
    stream = client.completions.create(model=MODEL_ID, prompt="It was", max_tokens=24,
                                       temperature=temperature, seed=seed, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        ch = chunk.choices[0]
        text += ch.text
        ids += ch.model_extra["token_ids"]
        reasons.append(ch.finish_reason)
    assert ids == want and text == ref.tok.decode(want)
    assert reasons[-1] == "length" and not any(reasons[:-1])
    assert usage.completion_tokens == 24


def test_token_prompt_top_k_and_echo(client, ref):
    ids = ref.tok.encode("Elizabeth")
    r = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=10, temperature=0.7, seed=3,
                                  extra_body={"top_k": 5}, echo=True)
    want = ref(ids, 10, 0.7, 3, top_k=5)
    assert r.choices[0].model_extra["token_ids"] == want
    assert r.choices[0].text == ref.tok.decode(ids) + ref.tok.decode(want)


def test_stop_strings_cut_the_text_and_the_generation(client, ref, server):
    want = ref("It was", 40)
    full = ref.tok.decode(want)
    stop = " to be"  # appears in the greedy continuation
    assert stop in full
    cut = full[:full.index(stop)]
    before = server.metrics()
    r = client.completions.create(model=MODEL_ID, prompt="It was", max_tokens=40, temperature=0,
                                  stop=[stop, "zzz"])
    ch = r.choices[0]
    assert ch.text == cut and ch.finish_reason == "stop"
    n = len(ch.model_extra["token_ids"])
    assert ch.model_extra["token_ids"] == want[:n] and n < 40
    assert ref.tok.decode(want[:n - 1]).find(stop) < 0 <= ref.tok.decode(want[:n]).find(stop)
    # streamed: the same text, nothing of the stop string sent before it was known not to be one
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_ID, prompt="It was", max_tokens=40, temperature=0, stop=stop, stream=True))
    assert text == cut
    after = idle(server)
    assert after["bakedllama_device_aborts_total"] == before["bakedllama_device_aborts_total"] + 2


def test_text_assembler_holds_back_stop_prefixes(ref):
    tok = ref.tok
    ids = ref("It was", 30)
    for stops in [(), (" to be",), ("e",), ("great deal", "zz"), (tok.decode(ids)[5:9],)]:
        a = TextAssembler(tok, stops, tok.eos_id)
        out = ""
        for t in ids:
            out += a.push(t)
            full = tok.decode(a.ids)
            assert full.startswith(out)
            assert not any(s in out for s in stops)
            if a.finished:
                break
        out += a.finish()
        full = tok.decode(ids)
        cuts = [full.find(s) for s in stops if full.find(s) >= 0]
        assert out == (full[:min(cuts)] if cuts else full), stops


# Errors -------------------------------------------------------------------------------------------

M = MODEL_ID
OK = {"model": M, "prompt": "It was"}
BAD = [
    ({**OK, "max_tokens": "12"}, "max_tokens", "invalid_type"),
    ({**OK, "max_tokens": 0}, "max_tokens", "out_of_range"),
    ({**OK, "max_tokens": 1000}, "max_tokens", "out_of_range"),
    ({**OK, "max_tokens": True}, "max_tokens", "invalid_type"),
    ({"model": M, "prompt": "word " * 300, "max_tokens": 8}, "prompt", "context_length_exceeded"),
    ({"model": M, "prompt": "It was " * 40, "max_tokens": 200}, "max_tokens", "context_length_exceeded"),
    ({"model": M, "prompt": "x" * 100000}, "prompt", "context_length_exceeded"),
    ({"model": M, "prompt": ""}, "prompt", None),
    ({"model": M, "prompt": 12}, "prompt", None),
    ({"model": M, "prompt": ["a", "b"]}, "prompt", None),
    ({"model": M, "prompt": [5, 99999]}, "prompt", None),
    ({"model": "gpt-4", "prompt": "It was"}, "model", "model_not_found"),
    ({"prompt": "It was"}, "model", None),
    ({**OK, "temperature": "hot"}, "temperature", "invalid_type"),
    ({**OK, "temperature": 5}, "temperature", "out_of_range"),
    ({**OK, "seed": -1}, "seed", "out_of_range"),
    ({**OK, "seed": 2 ** 40}, "seed", "out_of_range"),
    ({**OK, "stop": [1]}, "stop", "invalid_type"),
    ({**OK, "stop": ["a"] * 5}, "stop", "out_of_range"),
    ({**OK, "stream": "yes"}, "stream", "invalid_type"),
    ({**OK, "n": 2}, "n", "unsupported_parameter"),
    ({**OK, "top_p": 0.5}, "top_p", "unsupported_parameter"),
    ({**OK, "logprobs": 2}, "logprobs", "unsupported_parameter"),
    ({**OK, "frobnicate": 1}, "frobnicate", None),
    ({**OK, "stream_options": {"include_usage": True}}, "stream_options", None),
    ([1, 2, 3], None, None),
]


@pytest.mark.parametrize("body,param,code", BAD)
def test_bad_requests_get_openai_400s(server, body, param, code):
    st, d = post(server, body)
    assert st == 400, d
    e = d["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["type"] == "invalid_request_error"
    assert e["param"] == param and e["code"] == code and e["message"] and "Traceback" not in e["message"]


def test_unparsable_and_huge_bodies(server):
    st, d = post(server, None, raw=b"{not json")
    assert st == 400 and "JSON" in d["error"]["message"]
    st, d = post(server, None, raw=b"\xff\xfe")
    assert st == 400
    with socket.create_connection(_addr(server), timeout=30) as sock:  # refused before it is sent
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 << 20))
        head = b""
        while b"}}" not in head:
            part = sock.recv(65536)
            assert part, head
            head += part
    head = head.decode()
    assert head.startswith("HTTP/1.1 413") and "exceeds" in head, head


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="nope", prompt="It was")
    assert e.value.code == "model_not_found" and "bakedllama-tiny" in e.value.message


def test_routes_models_health_metrics(server, client):
    ms = client.models.list()
    assert [m.id for m in ms.data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    st, body = server.get("/v1/models/other")
    assert st == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    st, body = server.get("/nothing/here")
    assert st == 404 and json.loads(body)["error"]["code"] == "unknown_url"
    st, d = post(server, {"model": MODEL_ID, "messages": []}, path="/v1/chat/completions")
    assert st == 404 and "base model" in d["error"]["message"]
    st, h = server.health()
    assert st == 200 and h["status"] == "ok" and h["device"] == "golden" and h["max_queue"] == 4
    st, text = server.get("/metrics")
    assert st == 200
    m = parse_metrics(text)  # every line parses
    for k in ("bakedllama_queue_depth", "bakedllama_tokens_per_second", "bakedllama_generated_tokens_total",
              "bakedllama_device_cycles_per_token", "bakedllama_time_to_first_token_seconds_count"):
        assert k in m
    assert "# TYPE bakedllama_requests_total counter" in text
    st, page = server.get("/")
    assert st == 200 and "playground.js" in page


# One device, many clients ---------------------------------------------------------------------

def _request_in_thread(server, results, key, **kw):
    def run():
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0, timeout=60)
        try:
            r = c.completions.create(model=MODEL_ID, prompt="It was", temperature=0, **kw)
            results[key] = r
        except Exception as e:  # the test asserts on it
            results[key] = e
        finally:
            c.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_full_queue_answers_503(server, ref):
    idle(server)
    m0 = server.metrics()
    h = Holder(server)
    results, threads = {}, []
    try:
        for i in range(4):  # fills the queue (max 4)
            threads.append(_request_in_thread(server, results, i, max_tokens=6, user=f"q{i}"))
            server.wait_for(lambda m, i=i: m["bakedllama_queue_depth"] == i + 1, 20, f"{i + 1} queued")
        st, d = post(server, {"model": MODEL_ID, "prompt": "It was", "max_tokens": 4})
        assert st == 503 and d["error"]["code"] == "queue_full"
        assert "queue is full (4 requests waiting" in d["error"]["message"]
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=MODEL_ID, prompt="It was", max_tokens=4, stream=True)
        assert e.value.status_code == 503
    finally:
        h.release()
    for t in threads:
        t.join(60)
    want = ref("It was", 6)
    assert all(results[i].choices[0].model_extra["token_ids"] == want for i in range(4)), results
    m = idle(server)
    assert outcome(m, "refused_queue_full") == outcome(m0, "refused_queue_full") + 2
    assert outcome(m, "aborted") == outcome(m0, "aborted") + 1  # the holder


def test_disconnect_aborts_the_generation_at_once(server, ref):
    idle(server)
    m0 = server.metrics()
    h = Holder(server, max_tokens=250)
    h.release()  # after its first token
    m = server.wait_for(lambda m: outcome(m, "aborted") == outcome(m0, "aborted") + 1, 10, "the abort")
    assert m["bakedllama_device_aborts_total"] == m0["bakedllama_device_aborts_total"] + 1
    generated = m["bakedllama_device_aborted_generated_tokens_total"] - \
        m0["bakedllama_device_aborted_generated_tokens_total"]
    assert 1 <= generated < 30, generated  # of 250: the golden model stopped, it did not run on
    assert m["bakedllama_requests_running"] == 0
    # the next request does not wait for the 250 tokens the first asked for
    r = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).completions.create(
        model=MODEL_ID, prompt="It was", max_tokens=5, temperature=0)
    assert r.choices[0].model_extra["token_ids"] == ref("It was", 5)
    assert r.model_extra["bakedllama"]["queued_s"] < 1.0  # 250 tokens of the golden model take ~3 s


def test_disconnect_while_queued_and_non_streaming(server):
    idle(server)
    m0 = server.metrics()
    h = Holder(server)
    body = json.dumps(dict(model=MODEL_ID, prompt="It was", max_tokens=200)).encode()
    s = socket.create_connection(_addr(server), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    server.wait_for(lambda m: m["bakedllama_queue_depth"] == 1, 20, "one queued")
    s.close()  # leaves the queue before it ever reaches the device
    server.wait_for(lambda m: m["bakedllama_queue_depth"] == 0, 20, "queue emptied")
    h.release()
    m = idle(server)
    assert outcome(m, "aborted") == outcome(m0, "aborted") + 2
    assert m["bakedllama_device_aborts_total"] == m0["bakedllama_device_aborts_total"] + 1  # the holder only


def test_fair_queueing_round_robin(server):
    """User a queues three requests, then user b one: b runs second, not fourth."""
    idle(server)
    h = Holder(server)
    results, threads = {}, []
    order = [("a", 1), ("a", 2), ("a", 3), ("b", 1)]
    try:
        for n, (user, i) in enumerate(order):
            threads.append(_request_in_thread(server, results, (user, i), max_tokens=3, user=user))
            server.wait_for(lambda m, n=n: m["bakedllama_queue_depth"] == n + 1, 20, f"{n + 1} queued")
    finally:
        h.release()
    for t in threads:
        t.join(60)
    runs = {k: r.model_extra["bakedllama"]["run_index"] for k, r in results.items()}
    ran = sorted(runs, key=runs.get)
    assert ran == [("a", 1), ("b", 1), ("a", 2), ("a", 3)], runs


@pytest.fixture(scope="module")
def load_server():
    with ServeProcess(["--device", "golden", "--max-queue", "20"]) as s:
        yield s
    assert "Traceback" not in s.stderr(), s.stderr()


def test_load_32_streaming_clients(load_server, ref):
    """The issue's load test: 32 clients at once, every 4th leaving after 3 tokens; a queue of 20."""
    server = load_server
    m0 = server.metrics()
    golden = lambda p, t, s, n: ref(p, n, t, s)  # noqa: E731
    rep = run_load(server.url, MODEL_ID, golden, clients=32, max_tokens=12, disconnect_every=4,
                   disconnect_after=3, timeout=120, decode=ref.tok.decode,
                   alone=lambda: alone_rate(golden, 32, 12))  # the golden model alone (printed)
    s = rep.summary()
    print("\nload test (golden):", rep.format())
    print(json.dumps(s))
    assert s["errors"] == 0, [(c.i, c.error) for c in rep.clients if c.outcome == "error"]
    assert s["wrong_texts"] == 0
    assert s["requests"] == s["completed"] + s["refused"] + s["aborted"] == 32
    assert s["refused"] >= 1 and s["completed"] >= 1 and s["aborted"] >= 1
    m = idle(server)  # nothing left running or queued
    d = {k: outcome(m, k) - outcome(m0, k) for k in ("completed", "refused_queue_full", "aborted")}
    assert d["refused_queue_full"] == s["refused"], d
    # a client that hangs up after 3 tokens may do so after the server already sent all 12 (the
    # server then counted it completed): every request is one or the other, each counted once
    assert d["completed"] + d["aborted"] == s["completed"] + s["aborted"], (d, s)
    assert d["completed"] >= s["completed"] and 1 <= d["aborted"] <= s["aborted"], (d, s)
    assert outcome(m, "failed") == outcome(m0, "failed")


# The command line -----------------------------------------------------------------------------

def _serve_cli(*args, timeout=60):
    p = subprocess.run([sys.executable, "-m", "bakedllama.cli", "serve", *args], capture_output=True,
                       text=True, timeout=timeout, env=ServeProcess().env)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("args", [
    ["--device", "socket://127.0.0.1:1"],
    ["--device", "golden", "--max-queue", "0"],
    ["--device", "golden", "--host", "256.1.1.1"],
    ["--device", "golden", "--model", "/nonexistent.bkl"],
])
def test_serve_user_errors_are_one_line(args):
    rc, out, err = _serve_cli(*args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err


def test_port_in_use_and_loopback_default(server):
    port = int(server.url.rsplit(":", 1)[1])
    assert server.url.startswith("http://127.0.0.1:")
    rc, out, err = _serve_cli("--device", "golden", "--port", str(port))
    assert rc == 2 and "cannot listen" in err and "Traceback" not in err, err
