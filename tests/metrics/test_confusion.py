"""Confusion matrix and per-class counts (numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from segray.metrics import class_counts, confusion_matrix, decode_cells, encode_cells, image_counts, per_image_counts, sparse_confusion

IGNORE = 255


def oracle(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
    """Plain Python loop over pixels: the slow, obviously right count."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t, p in zip(np.ravel(y_true).tolist(), np.ravel(y_pred).tolist()):
        if t != ignore_index:
            cm[t, p] += 1
    return cm


@st.composite
def label_pairs(draw, max_classes: int = 6, max_side: int = 8):
    """(truth, prediction, C): truth holds some 255s; some classes may be absent."""
    num_classes = draw(st.integers(1, max_classes))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=max_side))
    truth_values = st.one_of(st.integers(0, num_classes - 1), st.just(IGNORE))
    y_true = draw(hnp.arrays(np.uint8, shape, elements=truth_values))
    y_pred = draw(hnp.arrays(np.int32, shape, elements=st.integers(0, num_classes - 1)))
    return y_true, y_pred, num_classes


def test_hand_computed_case():
    y_true = np.array([[0, 0, 1], [2, IGNORE, 1]])
    y_pred = np.array([[0, 1, 1], [2, 0, 0]])
    # Pairs (truth, pred), the 255 pixel dropped: (0,0) (0,1) (1,1) (2,2) (1,0)
    #            pred 0  1  2
    #   truth 0     [1, 1, 0]
    #   truth 1     [1, 1, 0]
    #   truth 2     [0, 0, 1]
    expected = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, expected)

    tp, fp, fn, support = class_counts(cm)
    np.testing.assert_array_equal(tp, [1, 1, 1])
    np.testing.assert_array_equal(fp, [1, 1, 0])  # column sums minus diagonal
    np.testing.assert_array_equal(fn, [1, 1, 0])  # row sums minus diagonal
    np.testing.assert_array_equal(support, [2, 2, 1])


def test_rows_are_truth_columns_prediction():
    # Three truth-1 pixels all predicted 0: the count sits at row 1, column 0.
    #            pred 0  1
    #   truth 0     [0, 0]
    #   truth 1     [3, 0]
    cm = confusion_matrix(np.array([1, 1, 1]), np.array([0, 0, 0]), 2)
    np.testing.assert_array_equal(cm, [[0, 0], [3, 0]])


def test_matches_loop_oracle_on_random_masks():
    rng = np.random.default_rng(0)
    num_classes = 7
    y_true = rng.integers(0, num_classes, size=(3, 17, 13)).astype(np.uint8)
    y_true[rng.random(y_true.shape) < 0.2] = IGNORE
    y_true[y_true == 4] = 1  # class 4 absent from truth
    y_pred = rng.integers(0, num_classes, size=y_true.shape)
    y_pred[y_pred == 5] = 2  # class 5 absent from prediction
    y_pred[y_true == 6] = 6  # class 6 perfectly predicted where present

    cm = confusion_matrix(y_true, y_pred, num_classes)

    np.testing.assert_array_equal(cm, oracle(y_true, y_pred, num_classes))
    # np.add.at is a second, independent oracle.
    keep = y_true != IGNORE
    other = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(other, (y_true[keep].astype(int), y_pred[keep]), 1)
    np.testing.assert_array_equal(cm, other)
    assert cm.sum() == keep.sum()
    assert cm[4].sum() == 0 and cm[:, 5].sum() == 0


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [
        ([0, 3, 3, 1], [0, 0, 0, 0], r"truth labels must lie in \[0, 3\).*2 pixels.*3 \(2 px\)"),
        ([0, -1, 1, 1], [0, 0, 0, 0], r"truth .*1 pixels.*-1 \(1 px\)"),
        ([0, 1, 1, 1], [0, 9, 7, 9], r"prediction labels must lie in \[0, 3\).*3 pixels.*7 \(1 px\), 9 \(2 px\)"),
        # A prediction of 255 under a counted pixel is a wrong prediction, not an abstention.
        ([0, 1, 1, 1], [0, 1, 255, 1], r"prediction .*255 \(1 px\)"),
    ],
)
def test_out_of_range_values_raise_naming_value_and_count(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix(np.array(y_true), np.array(y_pred), 3)


def test_out_of_range_prediction_under_ignored_truth_is_not_counted_or_checked():
    cm = confusion_matrix(np.array([IGNORE, 0]), np.array([99, 0]), 2)
    np.testing.assert_array_equal(cm, [[1, 0], [0, 0]])


def test_ignore_index_none_counts_every_pixel():
    with pytest.raises(ValueError, match="255"):
        confusion_matrix(np.array([255, 0]), np.array([0, 0]), 2, ignore_index=None)
    cm = confusion_matrix(np.array([1, 0]), np.array([0, 0]), 2, ignore_index=None)
    np.testing.assert_array_equal(cm, [[1, 0], [1, 0]])


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match=r"shape \(2,\).*shape \(3,\)"):
        confusion_matrix(np.zeros(2, int), np.zeros(3, int), 2)
    with pytest.raises(TypeError, match="float"):
        confusion_matrix(np.zeros(2, float), np.zeros(2, int), 2)


def test_all_ignored_gives_zero_matrix():
    cm = confusion_matrix(np.full((4, 4), IGNORE, np.uint8), np.zeros((4, 4), int), 3)
    assert cm.shape == (3, 3) and cm.sum() == 0


def test_image_counts_and_per_image_counts_agree():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 4, size=(5, 6, 7)).astype(np.uint8)
    y_true[rng.random(y_true.shape) < 0.3] = IGNORE
    y_true[2] = IGNORE  # an image with nothing counted
    y_pred = rng.integers(0, 4, size=y_true.shape)

    batch = per_image_counts(y_true, y_pred, 4)

    for key in ("tp", "fp", "fn", "support"):
        assert batch[key].shape == (5, 4) and batch[key].dtype == np.int64
    for i in range(5):
        one = image_counts(y_true[i], y_pred[i], 4)
        for key in ("tp", "fp", "fn", "support"):
            np.testing.assert_array_equal(batch[key][i], one[key])
    assert batch["support"][2].sum() == 0
    # Per-image rows sum back to the batch matrix's counts.
    tp, fp, fn, support = class_counts(confusion_matrix(y_true, y_pred, 4))
    np.testing.assert_array_equal(batch["tp"].sum(0), tp)
    np.testing.assert_array_equal(batch["fp"].sum(0), fp)
    np.testing.assert_array_equal(batch["fn"].sum(0), fn)
    np.testing.assert_array_equal(batch["support"].sum(0), support)


def test_per_image_counts_of_empty_batch():
    out = per_image_counts(np.zeros((0, 4, 4), np.uint8), np.zeros((0, 4, 4), np.uint8), 3)
    assert out["tp"].shape == (0, 3)


def test_counts_stay_exact_past_float32_precision():
    # float32 has 24 bits of mantissa: 2**24 + 1 rounds to 2**24. Summing
    # matrices (as workers do) must keep the odd pixel.
    big = np.zeros((2, 2), np.int64)
    big[0, 0] = 2**24
    one = confusion_matrix(np.array([0]), np.array([0]), 2)
    total = big + one
    assert total.dtype == np.int64
    assert total[0, 0] == 2**24 + 1
    assert np.float32(total[0, 0]) == 2**24  # the loss an int matrix avoids
    tp, _, _, support = class_counts(total * 1000)
    assert tp[0] == (2**24 + 1) * 1000 and support[0] == (2**24 + 1) * 1000


@settings(max_examples=60, deadline=None)
@given(label_pairs(), st.data())
def test_matrix_of_concatenation_is_sum_of_matrices(pair, data):
    y_true, y_pred, num_classes = pair
    flat_t, flat_p = y_true.ravel(), y_pred.ravel()
    cut = data.draw(st.integers(0, flat_t.size))
    whole = confusion_matrix(flat_t, flat_p, num_classes)
    parts = confusion_matrix(flat_t[:cut], flat_p[:cut], num_classes) + confusion_matrix(
        flat_t[cut:], flat_p[cut:], num_classes
    )
    np.testing.assert_array_equal(whole, parts)
    np.testing.assert_array_equal(whole, oracle(y_true, y_pred, num_classes))


@settings(max_examples=60, deadline=None)
@given(label_pairs(), st.data())
def test_ignored_pixels_never_count(pair, data):
    y_true, y_pred, num_classes = pair
    before = confusion_matrix(y_true, y_pred, num_classes)
    # Whatever is predicted under ignored truth (even nonsense) changes nothing.
    other_pred = y_pred.copy()
    junk = data.draw(st.integers(-1000, 1000))
    other_pred[y_true == IGNORE] = junk
    np.testing.assert_array_equal(confusion_matrix(y_true, other_pred, num_classes), before)
    assert before.sum() == int((y_true != IGNORE).sum())
    # Turning counted pixels into ignored ones removes exactly their pairs.
    hidden = y_true.copy()
    hidden.ravel()[:1] = IGNORE
    assert confusion_matrix(hidden, y_pred, num_classes).sum() == int((hidden != IGNORE).sum())


@settings(max_examples=60, deadline=None)
@given(label_pairs(), st.randoms(use_true_random=False))
def test_permuting_class_ids_permutes_the_matrix(pair, random):
    y_true, y_pred, num_classes = pair
    perm = list(range(num_classes))
    random.shuffle(perm)
    lut = np.array(perm + [0] * (256 - num_classes))
    lut[IGNORE] = IGNORE
    cm = confusion_matrix(y_true, y_pred, num_classes)
    permuted = confusion_matrix(lut[y_true], lut[y_pred], num_classes)
    # Class c is now perm[c]: cell (t, p) moved to (perm[t], perm[p]).
    np.testing.assert_array_equal(permuted[np.ix_(perm, perm)], cm)


@pytest.mark.parametrize("num_classes", [1, 2, 3, 17, 256])
def test_cells_round_trip_for_every_pair_of_classes(num_classes):
    truth, pred = (a.ravel() for a in np.meshgrid(np.arange(num_classes), np.arange(num_classes), indexing="ij"))
    cells = encode_cells(truth, pred)
    assert cells.dtype == np.int32 and len(np.unique(cells)) == num_classes**2
    back_truth, back_pred = decode_cells(cells)
    np.testing.assert_array_equal(back_truth, truth)
    np.testing.assert_array_equal(back_pred, pred)
    # An image holding every pair once (and pair (t, p) t + p + 1 times more): its sparse cells decode to its matrix.
    repeats = truth + pred + 2
    image_truth, image_pred = np.repeat(truth, repeats).astype(np.uint8), np.repeat(pred, repeats).astype(np.uint8)
    sparse, counts = sparse_confusion(image_truth, image_pred, None)
    rows, cols = decode_cells(sparse)
    dense = np.zeros((num_classes, num_classes), np.int64)
    dense[rows, cols] = counts
    np.testing.assert_array_equal(dense, confusion_matrix(image_truth, image_pred, num_classes, ignore_index=None))
    np.testing.assert_array_equal(dense, repeats.reshape(num_classes, num_classes))


def test_only_the_confusion_module_reads_the_cell_base():
    """Every other module decodes cells with ``decode_cells``, so no second decoder can drift from the encoder."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "segray"
    owner = package / "metrics" / "confusion.py"
    readers = []
    for path in package.rglob("*.py"):
        if path == owner:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name) and node.id == "CELL_BASE" or isinstance(node, ast.Attribute) and node.attr == "CELL_BASE":
                readers.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert not readers, f"CELL_BASE used outside segray/metrics/confusion.py (decode with segray.metrics.decode_cells): {readers}"
