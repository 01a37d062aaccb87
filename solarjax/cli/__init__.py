"""The command-line tools, thin: parse, call, print one-line errors. train.py, convert_weights.py,
`python -m solarjax.sample` / `solarjax.evaluate` and the solarjax-* scripts start here."""
