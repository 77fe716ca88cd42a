"""Train a diffusion LM.

python train.py experiment=quickstart
python train.py objective=masked data=shakespeare_char model=tiny trainer.max_steps=200
python train.py experiment=quickstart resume=auto        # continue a killed run
"""

import sys

from cdlm.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
