"""python -m solarjax.evaluate: the evaluation command (solarjax.cli.evaluate); scoring is solarjax.eval.scoring."""

from solarjax.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
