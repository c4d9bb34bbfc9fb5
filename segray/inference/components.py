"""Removing connected components below a size from predicted masks (``--min-component``).

Per foreground class (ids 1 and up; class 0 is the background), each
8-connected component of fewer than ``min_component`` pixels is set to the
background class 0, as nnU-Net's postprocessing does. The mask is labelled
whole (a component can span windows), which costs an int32 label image of
the mask's size per class present.
"""

from __future__ import annotations

import cv2
import numpy as np


def remove_small_components(mask: np.ndarray, min_component: int) -> np.ndarray:
    """``mask`` (H, W) uint8 class ids with the small foreground components set to 0.

    Args:
        min_component: components of fewer pixels go; 0 or 1 keeps everything.

    Returns:
        A new array when anything changes, else ``mask`` itself.
    """
    if min_component <= 1 or mask.size == 0:
        return mask
    out = mask
    for k in np.unique(mask):
        if k == 0:
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats((mask == k).astype(np.uint8), connectivity=8)
        small = stats[:, cv2.CC_STAT_AREA] < min_component
        small[0] = False  # label 0: the pixels not of class k
        if small.any():
            if out is mask:
                out = mask.copy()
            out[small[labels]] = 0
    return out
