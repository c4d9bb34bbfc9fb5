"""``segray serve``: the model behind HTTP on Ray Serve, one deployment with dynamic batching.

    POST /segment[?format=json]   image body (or multipart) -> mask PNG of class ids, or JSON fractions
    GET  /healthz                 {"status": "ok", "model_id": ...}
    GET  /model                   the model card

Each replica loads the model once, pinned by the weights' hash the driver
resolved (and, with ONNX Runtime, the hash of the conversion the driver made),
and runs it through ``segray.inference.predictor.Predictor``, the class the
batch job uses, so a served mask equals ``segray predict``'s. Requests are
decoded and checked one by one in the replica's event loop (a body over
``max_body_bytes`` is refused from its Content-Length, or counted as it
arrives, never read whole); only good images
reach ``@serve.batch``, which groups up to ``max_batch`` of them (one model
call per image size) within ``batch_wait_ms``. The model runs in a thread, so
the loop keeps taking requests meanwhile.

Scaling: ``replicas="auto"`` gives Serve's autoscaler ``min_replicas`` ..
``max_replicas`` and ``target_ongoing_requests`` per replica; a number fixes
the count. Each replica reserves ``replica_cpus`` (0.5 by default, so the
controller, the proxy and a replica fit on two cores).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segray.config import BODY_BYTES_PER_PIXEL, ServeConfig
from segray.serving.requests import FORMATS, RequestError, answer_format, decode_request, error_body, json_body, mask_response, read_body

APP_NAME = "segray"
READY_TIMEOUT_S = 180.0


class SegmentModel:
    """The replica's state: the predictor, how images reach it, and the answers that never change."""

    def __init__(self, settings: dict[str, Any], onnx_model: bytes | None):
        from segray.inference import Predictor

        self.settings = settings
        self.geometry = settings["geometry"]
        # The predictor normalises (in the graph, or before ONNX Runtime), as in segray predict.
        self.predictor = Predictor(
            settings["model_uri"], self.geometry, settings["max_batch"], settings["model_id"], onnx_model, settings["onnx_id"],
            mean=tuple(settings["mean"]), std=tuple(settings["std"]),
        )

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Decoded RGB -> the predictor's input, as ``ReadDecode`` makes it: the image's own dtype, fitted to the trained size."""
        from segray.inference import fit_image

        return fit_image(image, self.geometry.size, self.geometry.fit) if self.geometry.mode == "fit" else image

    def masks(self, items: list[tuple[np.ndarray, int, int]]) -> list[np.ndarray | str]:
        """Class-id masks (or the reason a model call failed) of (prepared image, height, width) items."""
        n = len(items)
        empty = np.zeros((0, 0), np.uint8)
        batch = {
            "image_id": np.asarray([str(k) for k in range(n)], dtype=object),
            "uri": np.asarray([f"request {k}" for k in range(n)], dtype=object),
            "error": np.asarray([""] * n, dtype=object),
            "height": np.asarray([h for _, h, _ in items], np.int64),
            "width": np.asarray([w for _, _, w in items], np.int64),
            "image": [x for x, _, _ in items],
            "truth": [empty] * n,
            "original": [np.zeros((0, 0, 3), np.uint8)] * n,
        }
        out = self.predictor(batch)
        return [str(e) if e else p for e, p in zip(out["error"], out["pred"])]


def _deployment_class():
    """The Serve deployment (built on first use, so ``import segray.serving`` needs no Ray Serve)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    class SegmentDeployment:
        def __init__(self, settings: dict[str, Any], onnx_model: bytes | None):
            self.model = SegmentModel(settings, onnx_model)
            self.card = settings["card"]
            self.model_id = settings["model_id"]
            self.class_names = [c["name"] for c in self.card["classes"]]
            self.max_pixels = settings["max_pixels"]
            self.max_body_bytes = settings["max_body_bytes"]
            self.segment.set_max_batch_size(settings["max_batch"])
            self.segment.set_batch_wait_timeout_s(settings["batch_wait_ms"] / 1000.0)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def segment(self, items: list[tuple[np.ndarray, int, int]]) -> list[np.ndarray | str]:
            return await asyncio.to_thread(self.model.masks, items)

        def _json(self, status: int, value: Any) -> Response:
            return Response(json_body(value), status_code=status, media_type="application/json")

        async def __call__(self, request: Request) -> Response:
            path, method = request.url.path.rstrip("/") or "/", request.method
            if path == "/healthz" and method == "GET":
                return self._json(200, {"status": "ok", "model_id": self.model_id})
            if path == "/model" and method == "GET":
                return self._json(200, self.card)
            if path != "/segment":
                return self._json(404, {"error": f"no route {method} {path}; try POST /segment, GET /healthz, GET /model", "status": 404})
            if method != "POST":
                return self._json(405, {"error": f"{method} /segment: send the image with POST", "status": 405})
            try:
                as_json = answer_format(request.query_params.get("format")) == "json"
                # Never request.body(): it reads any body whole, however large.
                body = await read_body(request.stream(), request.headers.get("content-length"), self.max_body_bytes)
                image = decode_request(body, request.headers.get("content-type", ""), self.max_pixels)
                del body
                height, width = image.shape[:2]
                result = await self.segment((self.model.prepare(image), height, width))
            except RequestError as e:
                return Response(error_body(e), status_code=e.status, media_type="application/json")
            if isinstance(result, str):
                return self._json(500, {"error": result, "status": 500})
            status, body, media = mask_response(result, as_json, self.class_names, self.model_id)
            return Response(body, status_code=status, media_type=media, headers={"X-Model-Id": self.model_id})

    return SegmentDeployment


@dataclass
class Served:
    """A running application.

    Attributes:
        url: ``http://HOST:PORT``.
        model_id: the weights' hash every replica pinned.
        card: what ``GET /model`` answers.
    """

    url: str
    model_id: str
    card: dict[str, Any] = field(default_factory=dict)

    def shutdown(self) -> None:
        """Deletes the application and stops Serve (the controller and proxies) on this Ray."""
        from ray import serve

        serve.shutdown()


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve options of the deployment: replicas or autoscaling, CPUs, how many requests a replica takes at once."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.replica_cpus},
        # A replica must accept at least a full batch; twice that keeps the next batch queued.
        "max_ongoing_requests": max(2 * cfg.max_batch, 8),
        "health_check_period_s": 10,
    }
    if cfg.replicas == "auto":
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = cfg.replicas
    return options


def _wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.5)
    raise RuntimeError(f"segray serve: {url}/healthz did not answer within {timeout:.0f} s ({last})")


def serve(cfg: ServeConfig) -> Served:
    """Deploys the model of ``cfg.run`` and waits until ``/healthz`` answers (Ray must be up).

    With ``cfg.blocking`` it then serves until interrupted (Ctrl-C) and shuts
    Serve down; otherwise it returns the running ``Served``.

    Raises:
        FileNotFoundError: no model at ``cfg.run``.
    """
    from ray import serve as ray_serve

    from segray.export import ONNX_OPSET, model_card, run_records
    from segray.inference import converted as convert_pinned
    from segray.inference import geometry_of
    from segray.runs import resolve_model
    from segray.runtime import is_verbose

    spec = resolve_model(cfg.run)
    # As segray predict without --tile: the model's window if it has one, fitted to the trained size, else whole images.
    geometry = geometry_of(spec)
    converted = convert_pinned(spec, geometry) if cfg.backend == "onnxruntime" else None
    config, best = run_records(spec.uri)
    multiple = converted.multiple if converted else spec.multiple
    card = model_card(spec, "onnx" if converted else "keras", multiple, config, best, {})
    card.update({"format": "serve", "backend": cfg.backend, "opset": ONNX_OPSET if converted else None, "onnx_id": converted.onnx_id if converted else None})
    card["input_size"]["rule"] = "any H and W up to max_pixels; " + (
        f"resized to the trained size {spec.size[0]}x{spec.size[1]} and the mask resized back, as segray predict does"
        if geometry.mode == "fit" else "padded as segray predict does"
    ) + (
        f"; a {geometry.tile[0]}x{geometry.tile[1]} window slides over it (overlap {geometry.overlap[0]}x{geometry.overlap[1]} pixels, "
        f"{geometry.weighting} weights), as segray predict does" if geometry.tile else ""
    )
    card["input"] = {
        "body": "PNG, JPEG, TIFF or BMP file, or multipart/form-data with a file part",
        "max_pixels": cfg.max_pixels,
        "max_body_bytes": cfg.max_body_bytes,
        "max_body_rule": (
            f"max_body_mb {cfg.max_body_mb:g} (MiB)" if cfg.max_body_mb is not None
            else f"{BODY_BYTES_PER_PIXEL} bytes per pixel of max_pixels + 1 MiB (an uncompressed 8-bit RGBA image and multipart framing)"
        ),
        "formats": list(FORMATS),
    }
    settings = {
        "model_uri": spec.uri,
        "model_id": spec.model_id,
        "onnx_id": converted.onnx_id if converted else None,
        "geometry": geometry,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "max_batch": cfg.max_batch,
        "batch_wait_ms": cfg.batch_wait_ms,
        "max_pixels": cfg.max_pixels,
        "max_body_bytes": cfg.max_body_bytes,
        "card": json.loads(json.dumps(card)),
    }
    logging = {"log_level": "INFO" if is_verbose() else "WARNING", "enable_access_log": is_verbose()}
    if not is_verbose():
        import logging as std_logging

        std_logging.getLogger("ray.serve").setLevel(std_logging.WARNING)  # 'Started Serve', 'Application ... is ready'

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if cfg.blocking:
        # `ray job stop` sends SIGTERM: Serve's actors outlive the driver, so they
        # are shut down here too. Set before Serve starts, so that a SIGTERM at
        # any moment (even while the replicas come up) ends in that shutdown.
        signal.signal(signal.SIGTERM, stop)
    started, served = False, None
    try:
        ray_serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=logging)
        started = True
        deployment = ray_serve.deployment(_deployment_class(), name="SegmentDeployment", **deployment_options(cfg))
        app = deployment.bind(settings, converted.data if converted else None)
        ray_serve.run(app, name=APP_NAME, route_prefix="/", logging_config=logging)
        url = f"http://{cfg.host}:{cfg.port}"
        _wait_ready(url, READY_TIMEOUT_S)
        served = Served(url, spec.model_id, settings["card"])
        if not cfg.blocking:
            return served
        print(f"serving {spec.name} ({spec.model_id}, {cfg.backend}) at {url}: POST /segment, GET /healthz, GET /model; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if cfg.blocking and started:
            ray_serve.shutdown()
    return served
