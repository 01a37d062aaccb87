"""python -m solarjax.sample: the sampling command (solarjax.cli.sample); the sampler is solarjax.eval.sample."""

from solarjax.cli.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
