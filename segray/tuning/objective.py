"""What a search maximises, chosen by the dataset's task.

A semantic dataset's trials are compared by validation mIoU (with mean Dice
beside it); an instance dataset's (``segray ingest --task instance``, models
such as ``maskrcnn``) by validation mask AP50 (with PQ beside it), the score
an instance run picks its best epoch by. ASHA, the trials table, ``best.json``
and the search plot all use the one ``Objective``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    """The metric a search maximises and the one shown beside it.

    Attributes:
        task: the dataset's task (``semantic`` or ``instance``).
        metric: the history / Tune report key maximised (``val_miou``, ``val_ap50``).
        second: the key shown beside it (``val_mean_dice``, ``val_pq``).
        label, second_label: how people read them.
    """

    task: str
    metric: str
    second: str
    label: str
    second_label: str

    @property
    def column(self) -> str:
        """The trials table's column of each trial's saved model's ``metric``."""
        return f"best_{self.metric}"

    @property
    def second_column(self) -> str:
        return "best_val_dice" if self.second == "val_mean_dice" else f"best_{self.second}"


SEMANTIC = Objective("semantic", "val_miou", "val_mean_dice", "mIoU", "Dice")
INSTANCE = Objective("instance", "val_ap50", "val_pq", "mask AP50", "PQ")
MODE = "max"


def objective_for(task: str) -> Objective:
    """The objective of a dataset task."""
    return INSTANCE if task == "instance" else SEMANTIC


def dataset_objective(data: str) -> Objective:
    """The objective of the ingested dataset at ``data`` (its ``dataset.json``'s task)."""
    from segray.data import load_dataset_info

    return objective_for(load_dataset_info(data).task)
