"""Run a Ray Tune sweep over config keys (loss.gamma by default) as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --preset mnist32 train.eval_every=250 --trials 8 \
        --workers-per-trial 2 --max-concurrent 1 --name mnist32-gamma

Inside the job RAY_ADDRESS points at the cluster; the same arguments as `vaegan tune`.
Submitting again with the same --name resumes the sweep; the best completed trial is
registered as tracking.model_name@challenger.
"""

import sys

from vaegan.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
