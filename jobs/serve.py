"""`ray job submit ... -- python jobs/serve.py RUN ARGS`: the same arguments as `segray serve`.

Runs on the cluster the job was submitted to (Ray sets RAY_ADDRESS) and keeps
serving until the job is stopped (`ray job stop`); exits non-zero with a
one-line reason when an argument or the model is wrong.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.cli import job  # noqa: E402

if __name__ == "__main__":
    job("serve")
