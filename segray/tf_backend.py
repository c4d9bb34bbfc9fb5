"""The Ray Train backend of a run: ``TF_CONFIG`` on every worker, without TensorFlow in Train's controller.

``ray.train.tensorflow.TensorflowTrainer`` is ``DataParallelTrainer`` with
``TensorflowConfig``. Ray Train V2 unpickles that config in its controller
actor, and the config's module lies inside ``ray.train.tensorflow``, whose
``__init__`` imports TensorFlow: every run's controller (a process of its own)
spent a whole TensorFlow import (seconds on 2 cores, tens of seconds on a busy
machine) before its workers could start, for an object with no TensorFlow in
it. The config here lives in a module that imports no TensorFlow (nor
anything of segray that does) and sets the ``TF_CONFIG`` Ray's backend sets.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    """On one Train worker: the cluster and this worker's index, as MultiWorkerMirroredStrategy reads them."""
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": worker_addresses}, "task": {"type": "worker", "index": index}})
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # as Ray's TensorflowConfig sets it


def _worker_address() -> str:
    """This worker's node IP and a free port on it, as Ray's TensorFlow backend gives each worker."""
    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class _TensorflowBackend(Backend):
    def on_start(self, worker_group, backend_config: BackendConfig) -> None:
        urls = worker_group.execute(_worker_address)
        ray.get([worker_group.execute_single_async(i, _set_tf_config, worker_addresses=urls, index=i) for i in range(len(worker_group))])


@dataclass
class TensorflowBackendConfig(BackendConfig):
    """What ``ray.train.tensorflow.TensorflowConfig`` does, from a module that imports no TensorFlow."""

    @property
    def backend_cls(self):
        return _TensorflowBackend

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TENSORFLOW


def tensorflow_trainer(train_loop_per_worker, **kwargs):
    """A Ray Train trainer that runs ``train_loop_per_worker`` as ``TensorflowTrainer`` does.

    ``kwargs`` are ``DataParallelTrainer``'s: ``train_loop_config``, ``scaling_config``,
    ``run_config``, ``datasets``, ``dataset_config``.
    """
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    return DataParallelTrainer(train_loop_per_worker, backend_config=TensorflowBackendConfig(), **kwargs)
