"""Continued pretraining (and depth up-scaling at init) from a YAML config; see solarjax/cli/train.py.

  python train.py --config configs/demo.yaml [dotted.key=value ...]
"""
import sys

from solarjax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
