"""Train a VAE/GAN as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --preset mnist32 train.num_workers=2 train.name=mnist32-a

Inside the job RAY_ADDRESS points at the cluster; the same arguments as `vaegan train`.
Submitting again with the same train.name resumes from the latest checkpoint.
"""

import sys

from vaegan.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
