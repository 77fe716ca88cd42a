"""Sample a trained model.

python sample.py path=runs/quickstart/final n=4 length=256 sampler.steps=128 out=samples.jsonl
"""

import sys

from cdlm.cli import main

if __name__ == "__main__":
    main(["sample", *sys.argv[1:]])
