"""segray serve: a real Ray Serve application on a free port, real HTTP requests, bad inputs, shutdown."""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from benchmarks.serve_body_memory import server_processes
from segray import storage
from segray.config import MIB, ConfigError, PredictConfig, ServeConfig
from segray.data.imageio import decode_mask, encode_png
from tests.conftest import _free_port
from tests.inference.helpers import CLASS_NAMES, random_pair, write_run

MAX_PIXELS = 100_000


def post(url: str, body: bytes, content_type: str = "application/octet-stream") -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def tiff_with_channels(height: int, width: int, channels: int) -> bytes:
    """An uncompressed 8-bit TIFF with ``channels`` samples per pixel (OpenCV writes no such file)."""
    data = bytes(height * width * channels)
    entries = [(256, 3, width), (257, 3, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, channels), (278, 3, height), (279, 4, len(data))]
    start = 8 + 2 + 12 * len(entries) + 4
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = start if tag == 273 else value
        out += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    return out + struct.pack("<I", 0) + data


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    import segray

    root = tmp_path_factory.mktemp("serve")
    run = write_run(str(root / "run"), [32, 32])
    port = _free_port()
    app = segray.serve(ServeConfig(run=run, port=port, max_batch=8, batch_wait_ms=20, max_pixels=MAX_PIXELS, blocking=False))
    yield app, run, root, port
    app.shutdown()


def test_a_served_mask_equals_segray_predicts(served):
    from segray.inference import predict

    app, run, root, _ = served
    images = {f"img_{k}": random_pair(np.random.default_rng(k), h, w)[0] for k, (h, w) in enumerate([(32, 32), (40, 24), (17, 23)])}
    raw = root / "raw"
    for image_id, image in images.items():
        storage.write_bytes(str(raw / "images" / f"{image_id}.png"), encode_png(image))
    predict(PredictConfig(model=run, input=str(raw), output=str(root / "pred"), batch_size=4, overlays=0))
    for image_id, image in images.items():
        status, body, headers = post(f"{app.url}/segment", encode_png(image), "image/png")
        assert status == 200 and headers["content-type"] == "image/png", body[:300]
        expected = decode_mask(storage.read_bytes(str(root / "pred" / "masks" / f"{image_id}.png")))
        np.testing.assert_array_equal(decode_mask(body), expected, err_msg=image_id)
        assert headers["x-model-id"] == app.model_id

    # multipart/form-data, as `curl -F file=@img.png` sends it
    boundary = uuid.uuid4().hex
    image = images["img_1"]
    form = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"img_1.png\"\r\nContent-Type: image/png\r\n\r\n".encode()
        + encode_png(image) + f"\r\n--{boundary}--\r\n".encode()
    )
    status, body, _ = post(f"{app.url}/segment?format=json", form, f"multipart/form-data; boundary={boundary}")
    assert status == 200, body[:300]
    answer = json.loads(body)
    expected = decode_mask(storage.read_bytes(str(root / "pred" / "masks" / "img_1.png")))
    assert answer["model_id"] == app.model_id and (answer["height"], answer["width"]) == (40, 24)
    assert list(answer["class_fractions"]) == CLASS_NAMES
    for k, name in enumerate(CLASS_NAMES):
        assert answer["class_fractions"][name] == pytest.approx(float((expected == k).mean()))


def test_concurrent_requests_are_batched_without_changing_any_mask(served):
    app, *_ = served
    rng = np.random.default_rng(11)
    images = [random_pair(rng, 32, 32)[0] for _ in range(12)]
    alone = [post(f"{app.url}/segment", encode_png(image))[1] for image in images[:3]]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda image: post(f"{app.url}/segment", encode_png(image)), images))
    assert all(status == 200 for status, _, _ in together)
    for a, (_, b, _) in zip(alone, together[:3]):
        np.testing.assert_array_equal(decode_mask(a), decode_mask(b))


def test_bad_inputs_get_their_status_and_the_server_keeps_serving(served):
    app, *_ = served
    good = encode_png(random_pair(np.random.default_rng(5), 32, 32)[0])
    cases = {
        "garbage": (b"this is not an image", 400, "not an image"),
        "empty": (b"", 400, "empty request body"),
        "truncated": (good[: len(good) // 2], 400, "truncated PNG"),
        "too large": (encode_png(np.zeros((400, 400, 3), np.uint8)), 413, "over the limit of 100,000"),
        "five channels": (tiff_with_channels(8, 8, 5), 422, "5 channels"),
    }
    for name, (body, code, reason) in cases.items():
        status, answer, _ = post(f"{app.url}/segment", body)
        assert status == code, (name, status, answer[:300])
        assert reason in json.loads(answer)["error"], (name, answer)
        status, _, _ = post(f"{app.url}/segment", good)
        assert status == 200, name
    with urllib.request.urlopen(f"{app.url}/healthz", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok", "model_id": app.model_id}
    with urllib.request.urlopen(f"{app.url}/model", timeout=30) as r:
        card = json.loads(r.read())
    assert card["model_id"] == app.model_id and card["backend"] == "onnxruntime" and [c["name"] for c in card["classes"]] == CLASS_NAMES
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{app.url}/nowhere", timeout=30)
    assert error.value.code == 404


def test_an_unknown_format_is_refused_naming_the_allowed_values(served):
    app, *_ = served
    good = encode_png(random_pair(np.random.default_rng(6), 32, 32)[0])
    for value in ("xml", "PNG", ""):
        status, answer, _ = post(f"{app.url}/segment?format={value}", good)
        assert status == 400, (value, status, answer[:200])
        assert f"format {value!r} is not one of png, json" in json.loads(answer)["error"]
    for value, media in (("png", "image/png"), ("json", "application/json")):
        status, _, headers = post(f"{app.url}/segment?format={value}", good)
        assert status == 200 and headers["content-type"] == media


def post_streamed(port: int, total: int, chunked: bool, body: bytes | None = None) -> tuple[int, dict]:
    """POSTs ``total`` bytes streamed from a generator of 1 MiB pieces (or ``body``), with Content-Length or chunked."""
    piece = os.urandom(MIB)

    def pieces():
        if body is not None:
            yield from (body[k:k + 4096] for k in range(0, len(body), 4096))
            return
        for k in range(0, total, MIB):
            yield piece[: min(MIB, total - k)]

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.putrequest("POST", "/segment")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Transfer-Encoding" if chunked else "Content-Length", "chunked" if chunked else str(total))
    conn.endheaders()
    try:
        for part in pieces():
            conn.send(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
        if chunked:
            conn.send(b"0\r\n\r\n")
    except OSError:
        pass  # the server may stop reading once it has answered; the answer is still there
    response = conn.getresponse()
    status, data = response.status, response.read()
    conn.close()
    return status, json.loads(data) if response.getheader("content-type") == "application/json" else {"bytes": len(data)}


def test_bodies_over_the_limit_get_413_before_they_are_read_and_memory_stays_flat(served):
    """Rounds of six 64 MiB bodies at once, three with Content-Length and three chunked: each 413, RSS grows far less than sent.

    What still grows is read-ahead, not the bodies: Ray Serve's proxy (and the
    replica's receive loop) queue what arrives until the replica's 413 comes
    back, so it depends on the machine's load, not on the body's size.
    """
    import psutil

    app, _, _, port = served
    limit = ServeConfig(run="x", max_pixels=MAX_PIXELS).max_body_bytes
    assert limit == MAX_PIXELS * 4 + MIB and ServeConfig(run="x", max_body_mb=0.5).max_body_bytes == MIB // 2
    with pytest.raises(ConfigError, match="max_body_mb must be positive"):
        ServeConfig(run="x", max_body_mb=0)
    with urllib.request.urlopen(f"{app.url}/model", timeout=30) as r:
        assert json.loads(r.read())["input"]["max_body_bytes"] == limit
    size, kinds = 64 * MIB, [False, True] * 3

    def burst() -> None:
        with ThreadPoolExecutor(len(kinds)) as pool:
            answers = list(pool.map(lambda chunked: post_streamed(port, size, chunked), kinds))
        for (status, answer), chunked in zip(answers, kinds):
            assert status == 413, (chunked, status, answer)
            assert f"over the limit of {limit:,} bytes" in answer["error"]
            assert ("as it arrived" if chunked else f"of {size:,} bytes (Content-Length)") in answer["error"]

    burst()  # the first large messages warm up the proxy's and the replica's allocators (a few tens of MiB once)
    processes = {name: psutil.Process(pid) for name, pid in server_processes().items()}
    before = {name: p.memory_info().rss for name, p in processes.items()}
    peak = dict(before)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for name, p in processes.items():
                peak[name] = max(peak[name], p.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    rounds = 2
    try:
        for _ in range(rounds):
            burst()
    finally:
        done.set()
        sampler.join()
    sent = rounds * len(kinds) * size
    growth = {name: (peak[name] - before[name]) / MIB for name in processes}
    # Reading each body whole (as before) grows the replica alone by the 384 MiB of a round.
    assert sum(growth.values()) < sent / MIB / 4, f"proxy and replica grew by {growth} MiB for {sent / MIB:.0f} MiB sent"
    # A good image sent chunked is read and answered; the server keeps serving.
    image = random_pair(np.random.default_rng(8), 40, 24)[0]
    status, answer = post_streamed(port, 0, True, encode_png(image))
    assert status == 200 and answer["bytes"] > 0


def test_it_binds_loopback_and_shuts_down_cleanly(served):
    """Runs last in the module: after shutdown nothing listens on the port."""
    app, _, _, port = served
    assert app.url == f"http://127.0.0.1:{port}"
    app.shutdown()
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.1", port)) != 0
    import ray

    app.shutdown()  # a second call (the fixture's) finds nothing to stop
    actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [name for name in actors if name.startswith("SERVE_")], actors


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def test_the_cli_serves_until_sigterm_then_leaves_nothing_listening(tmp_path):
    """`segray serve RUN` in its own process (its own local Ray), stopped as `ray job stop` stops a job."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = write_run(str(tmp_path / "run"), [32, 32])
    port = _free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "segray.cli", "serve", run, "--port", str(port), "--replicas", "1", "--backend", "tensorflow"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        # Ready: it answers /healthz and has said where it serves.
        while time.monotonic() < deadline and not (any(f"at http://127.0.0.1:{port}" in line for line in lines) and _healthy(port)):
            if process.poll() is not None:
                break
            time.sleep(0.5)
        if not any(f"at http://127.0.0.1:{port}" in line for line in lines):
            raise AssertionError("segray serve was not ready within 240 s:\n" + "".join(lines)[-3000:])
        image = random_pair(np.random.default_rng(1), 32, 32)[0]
        status, body, _ = post(f"http://127.0.0.1:{port}/segment", encode_png(image))
        assert status == 200 and decode_mask(body).shape == (32, 32)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        reader.join(timeout=30)
        output = "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    assert f"at http://127.0.0.1:{port}" in output
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.1", port)) != 0
