"""What each Ray Train checkpoint of a run holds: the weights, the optimizer state and the loop's state."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from segray.runs.layout import OPTIMIZER_FILE, STATE_FILE, WEIGHTS_FILE


def save_state(directory: str, model, optimizer, state: dict[str, Any]) -> None:
    np.savez(os.path.join(directory, WEIGHTS_FILE), *[np.asarray(w) for w in model.get_weights()])
    np.savez(os.path.join(directory, OPTIMIZER_FILE), *[np.asarray(v.numpy()) for v in optimizer.variables])
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f)


def load_state(directory: str, model, optimizer) -> dict[str, Any]:
    with np.load(os.path.join(directory, WEIGHTS_FILE)) as w:
        model.set_weights([w[f"arr_{i}"] for i in range(len(w.files))])
    optimizer.build(model.trainable_variables)
    with np.load(os.path.join(directory, OPTIMIZER_FILE)) as o:
        values = [o[f"arr_{i}"] for i in range(len(o.files))]
    if len(values) != len(optimizer.variables):
        raise RuntimeError(f"checkpoint holds {len(values)} optimizer variables, the optimizer has {len(optimizer.variables)}")
    for var, value in zip(optimizer.variables, values):
        var.assign(value)
    with open(os.path.join(directory, STATE_FILE)) as f:
        return json.load(f)
