"""`ray job submit ... -- python jobs/plan.py DATA ARGS`: the same arguments as `segray plan` (fitted to the cluster it runs on).

Runs on the cluster the job was submitted to (Ray sets RAY_ADDRESS) and
exits non-zero with a one-line reason when an argument or input is wrong.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.cli import job  # noqa: E402

if __name__ == "__main__":
    job("plan")
