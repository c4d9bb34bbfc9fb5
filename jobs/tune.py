"""`ray job submit ... -- python jobs/tune.py ARGS`: the same arguments as `segray tune`.

Runs on the cluster the job was submitted to (Ray sets RAY_ADDRESS): trials
run as many at once as the cluster's CPUs (GPUs) hold, or `--max-concurrent`.
Exits non-zero with a one-line reason when an argument or the space is wrong.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.cli import job  # noqa: E402

if __name__ == "__main__":
    job("tune")
