"""Continued pretraining (and depth up-scaling at init) from a YAML config; see solarjax/train_cli.py.

  python train.py --config configs/demo.yaml [dotted.key=value ...]
"""
import sys

from solarjax.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
