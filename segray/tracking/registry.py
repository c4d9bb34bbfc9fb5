"""The MLflow model registry: ``segray export RUN --register NAME`` in, ``models:/NAME/VERSION`` (or ``@alias``) out.

A registered version is an MLflow pyfunc (``pyfunc_model.py``: uint8 images
in, class ids out) around the ONNX export, with ``model_card.json``, the
run's ``model.keras`` and ``preprocessing.json`` as its artifacts, and tags
naming the training run (``segray.run_uri``) and the weights' hash
(``segray.weights_hash``).

``resolve_registered`` turns ``models:/...`` back into a model segray
predicts with: the original run's model when it is still there, else the
registered copy of it (downloaded once to a cache folder); the weights' hash
is checked against the version's either way (``segray.runs``).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

from segray import storage
from segray.tracking.client import client_for, experiment_id, read_run_record, tracking_uri
from segray.tracking.training import TAG, base_tags

SCHEME = "models:/"
ONNX_ARTIFACT = "model.onnx"
CARD_ARTIFACT = "model_card.json"
MODEL_NAME = "model"  # the logged model's name inside its MLflow run
CACHE_ENV = "SEGRAY_MLFLOW_CACHE"
_REFERENCE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def is_registered(model: str) -> bool:
    return model.startswith(SCHEME)


@dataclass(frozen=True)
class Registered:
    """A registered version segray resolved.

    Attributes:
        reference: ``models:/NAME/VERSION`` or ``models:/NAME@alias`` as given.
        name, version: the registered model and its version.
        model: where segray loads it from: the training run, or the downloaded ``model.keras``.
        weights_hash: the version's ``segray.weights_hash`` tag: the model loaded must have these weights.
    """

    reference: str
    name: str
    version: str
    model: str
    weights_hash: str


def register(output: str, run: str, card: dict[str, Any], name: str, uri: str | None, experiment: str, *,
             keras_file: str, preprocessing_file: str) -> dict[str, Any]:
    """Logs the ONNX export in ``output`` as an MLflow pyfunc and registers a new version of ``name``.

    Args:
        output: the export's folder (``model.onnx``, ``model_card.json``).
        run: what was exported (a run, its model/ folder or a .keras file).
        card: the model card.
        uri: the ``mlflow`` field; None: ``$MLFLOW_TRACKING_URI``.
        keras_file, preprocessing_file: the saved-run file names (``segray.runs``'s,
            passed in so that this package stays above nothing but storage).

    Returns:
        ``{"name", "version", "run_id", "model_uri"}``.

    Raises:
        ValueError: no tracking URI.
    """
    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    import numpy as np

    KERAS_ARTIFACT, PREPROCESSING_ARTIFACT = keras_file, preprocessing_file  # noqa: N806
    uri = tracking_uri(uri)
    if uri is None:
        raise ValueError("register: needs an MLflow tracking URI; give `mlflow` or set MLFLOW_TRACKING_URI")
    client = client_for(uri)
    keras_uri = card.get("source") or ""
    parent = keras_uri.rsplit("/", 1)[0]
    pre_uri = f"{parent}/{PREPROCESSING_ARTIFACT}"
    run_folder = parent.rsplit("/", 1)[0] if parent.endswith("/model") else None  # STORAGE/RUN/model/model.keras
    tags = base_tags({"run_uri": run_folder or run, "weights_hash": card.get("model_id"), "model": card.get("model"),
                      "export_output": output})
    trained = read_run_record(run_folder) if run_folder else None
    if trained and trained.get("tracking_uri") == uri and trained.get("run_id"):
        tags[f"{TAG}training_run_id"] = trained["run_id"]
    with tempfile.TemporaryDirectory(prefix="segray-register-") as tmp:
        artifacts = {}
        for artifact, source in ((ONNX_ARTIFACT, storage.join(output, ONNX_ARTIFACT)), (CARD_ARTIFACT, storage.join(output, CARD_ARTIFACT)),
                                 (KERAS_ARTIFACT, keras_uri), (PREPROCESSING_ARTIFACT, pre_uri)):
            if source and storage.exists(source):
                local = os.path.join(tmp, artifact)
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(source))
                artifacts[artifact] = local
        if ONNX_ARTIFACT not in artifacts:
            raise FileNotFoundError(f"register: {storage.join(output, ONNX_ARTIFACT)} is missing; register an ONNX export (`format` onnx)")
        signature = ModelSignature(
            # Unnamed: predict() takes the array itself (a named spec makes MLflow pass {"images": array}).
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
            outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        )
        code = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyfunc_model.py")
        run = client.create_run(experiment_id(client, experiment), run_name=f"register {name}", tags=tags)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        with mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=code, artifacts=artifacts, signature=signature,
                pip_requirements=["mlflow", "numpy", "onnxruntime"], registered_model_name=name,
            )
            mlflow.log_dict(card, CARD_ARTIFACT)
        version = str(info.registered_model_version)
        for key, value in tags.items():
            if key.startswith(TAG):
                client.set_model_version_tag(name, version, key, value)
    return {"name": name, "version": version, "run_id": run.info.run_id, "model_uri": f"{SCHEME}{name}/{version}"}


def cache_folder() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "segray", "mlflow")


def resolve_registered(reference: str, uri: str | None = None, *, model_dir: str, model_file: str) -> Registered:
    """``models:/NAME/VERSION`` or ``models:/NAME@alias`` -> the model segray loads, and the weights hash it must have.

    Raises:
        ValueError: not such a reference, or the version was not registered by segray (no weights hash).
        LookupError: the registry has no such model, version or alias.
    """
    MODEL_DIR, MODEL_FILE = model_dir, model_file  # noqa: N806 - segray.runs' names, passed in by the caller
    match = _REFERENCE.match(reference)
    if not match:
        raise ValueError(f"model {reference}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    uri = tracking_uri(uri)
    if uri is None:
        raise ValueError(f"model {reference}: a registered model needs an MLflow tracking URI; set MLFLOW_TRACKING_URI")
    client = client_for(uri)
    name = match["name"]
    try:
        mv = client.get_model_version_by_alias(name, match["alias"]) if match["alias"] else client.get_model_version(name, match["version"])
    except Exception as e:  # noqa: BLE001 - MLflow raises RestException / MlflowException for a missing one
        raise LookupError(f"model {reference}: the registry at {uri} has no such version ({str(e).splitlines()[0][:200]})") from None
    weights = mv.tags.get(f"{TAG}weights_hash")
    if not weights:
        raise ValueError(f"model {reference}: version {mv.version} has no {TAG}weights_hash tag; register it with `segray export --register`")
    run_uri = mv.tags.get(f"{TAG}run_uri")
    if run_uri and storage.exists(storage.join(run_uri, MODEL_DIR, MODEL_FILE)):
        return Registered(reference, name, str(mv.version), run_uri, weights)
    # The run is gone (or elsewhere): the registered copy of its Keras model.
    folder = os.path.join(cache_folder(), hashlib.sha256(f"{uri}|{name}|{mv.version}".encode()).hexdigest()[:16])
    keras_file = os.path.join(folder, "artifacts", MODEL_FILE)
    if not os.path.exists(keras_file):
        import mlflow

        os.makedirs(folder, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        mlflow.artifacts.download_artifacts(artifact_uri=f"{SCHEME}{name}/{mv.version}", dst_path=folder, tracking_uri=uri)
    if not os.path.exists(keras_file):
        raise FileNotFoundError(f"model {reference}: neither the run {run_uri} nor the registered artifacts hold {MODEL_FILE}")
    return Registered(reference, name, str(mv.version), keras_file, weights)
