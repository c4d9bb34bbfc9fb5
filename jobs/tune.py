"""Ray job entrypoint: search hyperparameters on Ray Tune (every trial a Ray Train run).

    ray job submit --working-dir . -- python jobs/tune.py --data s3://bucket/data/shapes \
        --storage s3://bucket/searches --name s1 --trials 16 --time-budget 2h
"""

from segray.cli import job

if __name__ == "__main__":
    job("tune")
