"""``rnnmath serve``: the HTTP server answers with predict's numbers, joins concurrent requests, answers bad
requests with a 4xx JSON error and keeps serving, and finishes in-flight requests on SIGTERM (exit 0).
Also the dynamic batcher alone, and ``--device``.

The server runs in a subprocess on a free loopback port (``--port 0``: the port it announces).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from rnnmath.serve import Batcher  # noqa: E402  (after the skips)

TEXTS = ["the food was good but slow", "the food was slow but good", "", "not bad", "zzz qqq unknown words",
         "the service was not very good " * 4, "Fresh!!! coffee, really.", "slow"]


def rnnmath_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "rnnmath", *args], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rnnmath.data import make_order_task, stratified_split
    from rnnmath.model import Config
    from rnnmath.train import train

    examples = make_order_task(160, 0)
    train_idx, val_idx = stratified_split(examples.labels, [0.8, 0.2], 0)
    out = tmp_path_factory.mktemp("serve") / "model"
    train(Config(hidden=8, epochs=1, max_len=20), examples.subset(train_idx), examples.subset(val_idx), out)
    return out


class Server:
    """``rnnmath serve`` in a subprocess; ``port`` from its announcement line."""

    def __init__(self, model_dir, *flags: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "rnnmath", "serve", str(model_dir), "--port", "0",
                                         *flags], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if "serving" in line:
                self.port = int(line.split("http://127.0.0.1:")[1].split()[0])
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.process.kill()
        raise AssertionError(f"the server did not start: {''.join(self.lines)}")

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def predict(self, texts) -> tuple[int, dict]:
        return self.request("POST", "/predict", json.dumps({"texts": texts}).encode(),
                            {"Content-Type": "application/json"})

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--max-delay-ms", "200", "--max-batch", "64", "--max-texts", "20",
               "--max-body-bytes", "4500")
    yield s
    if s.process.poll() is None:
        s.stop()


def test_health_and_info(server, model_dir):
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    status, info = server.request("GET", "/info")
    assert status == 200
    labels = json.loads((model_dir / "labels.json").read_text())["labels"]
    assert info["task"] == "classifier" and info["labels"] == labels and info["cell"] == "gru"
    assert info["config"]["hidden"] == 8 and info["test"] is None  # trained without a test set
    assert info["limits"] == {"max_body_bytes": 4500, "max_texts": 20}
    assert info["batching"][0]["max_batch"] == 64


def test_predictions_are_predicts_numbers(server, model_dir):
    """One request alone is one forward pass over the same texts as predict's: the same JSON numbers (at the
    same thread count: the server's default 1)."""
    done = rnnmath_cli("predict", "--threads", "1", "--json", str(model_dir), *TEXTS)
    assert done.returncode == 0, done.stderr
    expected = [json.loads(line) for line in done.stdout.splitlines()]
    status, answer = server.predict(TEXTS)
    assert status == 200
    assert [{"label": e["label"], "probabilities": e["probabilities"]} for e in expected] == answer["predictions"]


def test_concurrent_requests_are_batched_and_equal_one_at_a_time(server, model_dir):
    from rnnmath.model import load_model

    trained = load_model(model_dir)
    alone = {t: trained.predict([t])[0].tolist() for t in TEXTS}  # each text in a batch of its own
    _, before = server.request("GET", "/info")
    requests = [[TEXTS[(i + j) % len(TEXTS)] for j in range(1 + i % 4)] for i in range(12)]
    answers: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def client(i: int) -> None:
        start.wait()
        answers[i] = server.predict(requests[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, after = server.request("GET", "/info")
    passes = after["batching"][0]["forward_passes"] - before["batching"][0]["forward_passes"]
    assert 1 <= passes < len(requests)  # 200 ms of patience joined at least two of the 12
    labels = trained.labels
    for texts, (status, answer) in zip(requests, answers):
        assert status == 200 and len(answer["predictions"]) == len(texts)
        for text, prediction in zip(texts, answer["predictions"]):
            probabilities = [prediction["probabilities"][y] for y in labels]
            # other batch sizes may round the matrix products differently: at most a few float32 ulps
            assert max(abs(a - b) for a, b in zip(probabilities, alone[text])) <= 1e-6
            assert sorted(prediction["probabilities"]) == sorted(labels)


BAD_REQUESTS = [
    # (body, extra headers, status, words of the error)
    (b"{", {}, 400, "not valid JSON"),
    (b"", {}, 400, "not valid JSON"),
    (b"\xff\xfe{}", {}, 400, "not UTF-8"),
    (b"[" * 3000, {}, 400, "nested too deeply"),
    (b"[]", {}, 422, "JSON object"),
    (b"null", {}, 422, "JSON object"),
    (b'{"text": ["a"]}', {}, 422, "no \"texts\""),
    (b'{"texts": "a sentence"}', {}, 422, "list of strings"),
    (b'{"texts": null}', {}, 422, "list of strings"),
    (b'{"texts": ["ok", 3]}', {}, 422, "texts[1] must be a string"),
    (b'{"texts": [["nested"]]}', {}, 422, "texts[0] must be a string"),
    (b'{"texts": ["\\ud800"]}', {}, 422, "lone surrogate"),
    (json.dumps({"texts": ["a"] * 21}).encode(), {}, 413, "more than the 20 allowed"),
    (json.dumps({"texts": ["a" * 5000]}).encode(), {}, 413, "more than the 4500 allowed"),
    # any failure to parse is the body's: Python refuses an integer of more than 4300 digits (ValueError)
    (b'{"texts": ["a"], "n": ' + b"9" * 4400 + b"}", {}, 400, "not valid JSON"),
    (b"[-" + b"1" * 4301 + b"]", {}, 400, "not valid JSON"),
]


@pytest.mark.parametrize(("body", "headers", "status", "words"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_json_error(server, body, headers, status, words):
    got, answer = server.request("POST", "/predict", body, headers)
    assert got == status and words in answer["error"]
    assert server.predict(["still serving"])[0] == 200


def test_wrong_paths_methods_and_chunked_oversized_bodies(server):
    assert server.request("GET", "/nope")[0] == 404
    assert server.request("GET", "/predict")[0] == 405
    assert server.request("POST", "/health", b"{}")[0] == 405
    # a trailing slash is another path: 404, never a redirect built from the client's Host header
    for method, path in (("POST", "/predict/"), ("GET", "/health/"), ("GET", "/info/")):
        status, answer = server.request(method, path, b"{}" if method == "POST" else None, {"Host": "evil.example"})
        assert status == 404 and path in answer["error"]
    # a chunked body declares no length: the server counts as it reads
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/predict", body=iter([b'{"texts": ["', b"a" * 3000, b"a" * 3000, b'"]}']),
                       encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and "more than the 4500 bytes" in json.loads(response.read())["error"]
    connection.close()
    assert server.predict(["still serving"])[0] == 200
    assert not any("Traceback" in line for line in server.lines)


def test_sigterm_finishes_in_flight_requests_and_exits_0(model_dir):
    server = Server(model_dir, "--max-delay-ms", "3000")
    answer: list = []
    client = threading.Thread(target=lambda: answer.append(server.predict(TEXTS[:3])))
    client.start()
    deadline = time.monotonic() + 60
    while server.request("GET", "/info")[1]["batching"][0]["queued"] == 0:  # until it waits for company
        assert time.monotonic() < deadline and client.is_alive()
        time.sleep(0.05)
    server.process.send_signal(signal.SIGTERM)
    client.join(timeout=60)
    assert server.process.wait(timeout=60) == 0
    assert answer and answer[0][0] == 200 and len(answer[0][1]["predictions"]) == 3
    assert not any("Traceback" in line for line in server.lines)
    with pytest.raises(OSError):  # nothing listens any more
        server.request("GET", "/health", timeout=5)


def raw_connection(port: int, data: bytes):
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(data)
    return sock


def read_all(sock) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


HALF_BODY = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
             b'{"texts": ["half')
HALF_HEAD = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n"  # no blank line: the head never ends


def test_a_half_sent_request_gets_408_after_the_request_timeout(model_dir):
    server = Server(model_dir, "--request-timeout", "1.5")
    try:
        for data, words in ((HALF_BODY, b"body did not arrive within 1.5 s"),
                            (HALF_HEAD, b"headers did not arrive within 1.5 s")):
            sock = raw_connection(server.port, data)
            started = time.monotonic()
            answer = read_all(sock)  # the server answers, then closes the connection
            sock.close()
            assert 1.0 < time.monotonic() - started < 30
            assert answer.startswith(b"HTTP/1.1 408 ") and words in answer, answer
        assert server.predict(["still serving"])[0] == 200  # and a whole request in time is answered
    finally:
        assert server.stop() == 0
    assert not any("Traceback" in line for line in server.lines)


def test_sigterm_with_a_stuck_client_exits_0_within_the_shutdown_timeout(model_dir):
    # the request timeout (600 s) would not free the stuck request: the shutdown bound (2 s) must
    server = Server(model_dir, "--request-timeout", "600", "--shutdown-timeout", "2", "--max-delay-ms", "1500")
    stuck = [raw_connection(server.port, HALF_BODY), raw_connection(server.port, HALF_HEAD)]
    answer: list = []
    client = threading.Thread(target=lambda: answer.append(server.predict(TEXTS[:2])))
    client.start()
    deadline = time.monotonic() + 60
    while server.request("GET", "/info")[1]["batching"][0]["queued"] == 0:  # a request that can complete
        assert time.monotonic() < deadline and client.is_alive()
        time.sleep(0.05)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    assert time.monotonic() - started < 30
    client.join(timeout=60)
    assert answer and answer[0][0] == 200 and len(answer[0][1]["predictions"]) == 2  # in flight: answered
    for sock in stuck:
        sock.close()


def test_serve_usage_errors_are_one_line(model_dir, tmp_path, capsys):
    from rnnmath.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith("rnnmath: error:")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        assert main(["serve", str(model_dir), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen there" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(model_dir), "--max-batch", "0"])
    assert exit_.value.code == 2


# -- the batcher alone -------------------------------------------------------------------------------------
def run_batcher(max_batch: int, max_delay: float, requests: list[list[int]], fail: bool = False):
    calls: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        calls.append(list(items))
        if fail:
            raise RuntimeError("model broke")
        return [x * x for x in items]

    async def main():
        batcher = Batcher(square, max_batch, max_delay)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(main()), calls


def test_batcher_joins_up_to_max_batch_in_arrival_order():
    requests = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]
    results, calls = run_batcher(4, 0.5, requests)
    assert results == [[x * x for x in r] for r in requests]
    assert calls == [[1, 2, 3], [4, 5, 6, 7], [8, 9]]  # never more than 4, never reordered


def test_batcher_without_batching_and_with_oversized_requests():
    results, calls = run_batcher(1, 0.5, [[1], [2, 3], [4]])
    assert results == [[1], [4, 9], [16]] and calls == [[1], [2, 3], [4]]  # a larger request goes alone
    results, calls = run_batcher(3, 0.0, [[1], [], [2]])
    assert results == [[1], [], [4]] and calls == [[1, 2]]  # no waiting, but what is queued goes together


def test_batcher_reports_a_failure_to_every_waiting_request():
    results, _ = run_batcher(8, 0.1, [[1], [2]], fail=True)
    assert all(isinstance(r, RuntimeError) for r in results)


def test_a_bug_answers_500_json_without_traceback():
    """A fault of the server itself: status 500 and {"error": ...}, no traceback in the answer."""
    from starlette.routing import Route

    from rnnmath.serve import Service, build_app

    class Broken(Service):
        def routes(self, limits):
            async def predict(request):
                raise RuntimeError("secret internals")

            return [Route("/predict", predict, methods=["POST"])]

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    with pytest.raises(RuntimeError):  # Starlette re-raises after answering, for the server to log
        asyncio.run(build_app(Broken())(scope, receive, send))
    assert sent[0]["status"] == 500
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert json.loads(body) == {"error": "internal error: RuntimeError"}


# -- --device ----------------------------------------------------------------------------------------------
def test_device_choice():
    from rnnmath.errors import UserError
    from rnnmath.model import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="--device tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_device_flag_on_every_command(model_dir, tmp_path, capsys):
    from rnnmath.cli import main

    data = tmp_path / "d.tsv"
    data.write_text("good food\tpositive\nbad food\tnegative\n")
    assert main(["predict", "--threads", "1", "--device", "auto", "--json", str(model_dir), "good"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "good"
    assert main(["evaluate", str(model_dir), "--data", str(data), "--device", "cpu", "--json", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2
    if not torch.cuda.is_available():
        for command in (["predict", str(model_dir), "good"], ["evaluate", str(model_dir), "--data", str(data)],
                        ["serve", str(model_dir), "--port", "0"],
                        ["train", "--data", str(data), "--out", str(tmp_path / "m")]):
            assert main([*command, "--device", "cuda", "--threads", "1"]) == 2, command
            assert "no CUDA GPU" in capsys.readouterr().err, command


# -- a language model: POST /generate ----------------------------------------------------------------------
LM_TEXT = "".join(f"the cat sat on the mat {i % 5} times.\n" for i in range(80))


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from rnnmath.language_model import train_lm
    from rnnmath.lm_config import LMConfig

    out = tmp_path_factory.mktemp("serve_lm") / "lm"
    config = LMConfig(level="char", cell="lstm", hidden=16, layers=1, embedding=8, bptt=16, batch_size=4, epochs=1,
                      optimizer="adam", lr=0.01, lr_decay=1.0, decay_after=0, eval_every=0, seed=0)
    train_lm(config, LM_TEXT, LM_TEXT[:300], out)
    return out


@pytest.fixture(scope="module")
def lm_server(lm_dir):
    s = Server(lm_dir, "--max-length", "600", "--max-prompt-tokens", "50", "--max-body-bytes", "4000")
    yield s
    if s.process.poll() is None:
        s.stop()


def generate_request(server, document) -> tuple[int, dict]:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return server.request("POST", "/generate", body, {"Content-Type": "application/json"})


def test_lm_health_and_info(lm_server, lm_dir):
    assert lm_server.request("GET", "/health") == (200, {"status": "ok"})
    status, info = lm_server.request("GET", "/info")
    assert status == 200
    assert info["task"] == "lm" and info["level"] == "char" and info["cell"] == "lstm"
    assert info["config"]["hidden"] == 16 and info["best_val_loss"] > 0
    assert info["limits"] == {"max_body_bytes": 4000, "max_length": 600, "max_prompt_tokens": 50}


@pytest.mark.parametrize("arguments", [
    {"prompt": "the cat", "length": 60, "seed": 3},
    {"prompt": "", "length": 40, "temperature": 0.5, "top_k": 4, "seed": 7},
    {"prompt": "mat Q", "length": 25, "temperature": 0, "seed": 1},  # Q: not in the vocabulary; 0: argmax
    {},  # every default: rnnmath generate's (500 tokens, temperature 1, all tokens, seed 0)
])
def test_generate_is_the_clis_text(lm_server, lm_dir, arguments):
    """The same arguments give exactly the text and the object of `rnnmath generate --json`."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in arguments.items()]
    done = rnnmath_cli("generate", str(lm_dir), "--json", "--threads", "1", *flags)
    assert done.returncode == 0, done.stderr
    expected = json.loads(done.stdout)
    status, answer = generate_request(lm_server, arguments)
    assert status == 200, answer
    assert answer == expected and len(answer["text"]) == arguments.get("length", 500)  # characters
    assert generate_request(lm_server, arguments) == (200, expected)  # the same seed, the same text
    if "seed" in arguments and arguments.get("temperature", 1) != 0:
        other = generate_request(lm_server, {**arguments, "seed": arguments["seed"] + 1})[1]
        assert other["text"] != answer["text"]


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 422, "JSON object"),
    ({"prompt": 5}, 422, "\"prompt\" must be a string"),
    ({"prompt": "\ud800"}, 422, "lone surrogate"),
    ({"length": "10"}, 422, "\"length\" must be a whole number"),
    ({"length": 2.5}, 422, "\"length\" must be a whole number"),
    ({"length": True}, 422, "\"length\" must be a whole number"),
    ({"length": -1}, 422, "0 or more"),
    ({"length": 601}, 413, "more than the 600 allowed"),
    ({"length": 10**30}, 413, "more than the 600 allowed"),
    ({"temperature": -0.5}, 422, "\"temperature\" must be between 0"),
    ({"temperature": "hot"}, 422, "\"temperature\" must be a number"),
    (b'{"temperature": NaN}', 422, "\"temperature\" must be between 0"),
    (b'{"temperature": Infinity}', 422, "\"temperature\" must be between 0"),
    ({"top_k": 1.0}, 422, "\"top_k\" must be a whole number"),
    ({"seed": 2**63}, 422, "\"seed\" is"),
    ({"seed": None}, 422, "\"seed\" must be a whole number"),
    ({"temp": 0.5}, 422, "unknown field 'temp'"),
    ({"prompt": "the cat " * 10}, 413, "more than the 50 allowed"),
    (b"x" * 5000, 413, "more than the 4000"),
])
def test_bad_generate_requests_get_a_4xx_json_error(lm_server, body, status, words):
    got, answer = generate_request(lm_server, body)
    assert (got, set(answer)) == (status, {"error"}) and words in answer["error"], answer
    assert generate_request(lm_server, {"length": 5})[0] == 200  # and it keeps serving


def test_predict_on_an_lm_and_generate_on_a_classifier_name_the_right_endpoint(lm_server, server):
    status, answer = lm_server.predict(["the cat"])
    assert status == 404 and "POST /generate" in answer["error"]
    status, answer = generate_request(server, {"prompt": "the"})
    assert status == 404 and "POST /predict" in answer["error"]
    assert server.predict(["good"])[0] == 200


def test_lm_server_sigterm_finishes_a_generation_and_exits_0(lm_dir):
    server = Server(lm_dir, "--max-length", "100000")
    answer: list = []
    client = threading.Thread(target=lambda: answer.append(generate_request(server, {"length": 5000, "seed": 2})))
    client.start()
    deadline = time.monotonic() + 60
    while server.request("GET", "/info")[1]["batching"][0]["running"] == 0:  # until the generation runs
        assert time.monotonic() < deadline and client.is_alive()
        time.sleep(0.02)
    server.process.send_signal(signal.SIGTERM)
    client.join(timeout=120)
    assert server.process.wait(timeout=120) == 0
    assert answer and answer[0][0] == 200 and answer[0][1]["tokens"] == 5000
    assert not any("Traceback" in line for line in server.lines)


def test_serve_refuses_the_other_tasks_flags(lm_dir, model_dir, capsys):
    from rnnmath.cli import main

    assert main(["serve", str(lm_dir), "--port", "0", "--max-batch", "8"]) == 2
    assert "--max-batch applies to a classifier" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--port", "0", "--max-length", "8"]) == 2
    assert "--max-length applies to a language model" in capsys.readouterr().err


def test_device_flag_on_the_language_model_commands(lm_dir, tmp_path, capsys):
    """train --task lm, evaluate and generate on a language model honour --device (here: the CPU, and
    --device cuda is refused where torch sees no GPU, not ignored)."""
    from rnnmath.cli import main

    data = tmp_path / "t.txt"
    data.write_text(LM_TEXT)
    assert main(["generate", str(lm_dir), "--length", "20", "--seed", "4", "--json", "--device", "auto",
                 "--threads", "1"]) == 0
    on_auto = json.loads(capsys.readouterr().out)["text"]
    assert main(["generate", str(lm_dir), "--length", "20", "--seed", "4", "--json", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == on_auto or torch.cuda.is_available()
    assert main(["evaluate", str(lm_dir), "--data", str(data), "--device", "cpu", "--json", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == len(LM_TEXT) - 1
    train = ["train", "--task", "lm", "--data", str(data), "--out", str(tmp_path / "m"), "--hidden", "8",
             "--layers", "1", "--bptt", "8", "--batch-size", "4", "--epochs", "1", "--quiet", "--threads", "1"]
    assert main([*train, "--device", "cpu"]) == 0
    capsys.readouterr()
    if not torch.cuda.is_available():
        for command in (train, ["evaluate", str(lm_dir), "--data", str(data)], ["generate", str(lm_dir)],
                        ["serve", str(lm_dir), "--port", "0"]):
            assert main([*command, "--device", "cuda", "--threads", "1"]) == 2, command
            assert "no CUDA GPU" in capsys.readouterr().err, command
