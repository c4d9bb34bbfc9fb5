"""Looking at a predict output: a self-contained HTML report, and SQL over its tables.

``OutputTables`` opens an output (local or a storage URI) and registers its tables as
DuckDB views; ``worst``, ``below`` and ``confused`` are the named questions
(the report's worst-image sections use ``worst``); ``write_report`` writes the
HTML page. Most users call them as ``segray.report`` and ``segray.query``.
"""

from segray.reporting.query import (
    VIEWS,
    OutputTables,
    below,
    check_output_file,
    confused,
    format_text,
    iou_histogram,
    open_output,
    to_json,
    worst,
    write_result,
)
from segray.reporting.report import ReportResult, write_report

__all__ = [
    "VIEWS",
    "OutputTables",
    "ReportResult",
    "below",
    "check_output_file",
    "confused",
    "format_text",
    "iou_histogram",
    "open_output",
    "to_json",
    "worst",
    "write_report",
    "write_result",
]
