"""Weight conversion between Hugging Face and solarjax; see solarjax/cli/convert.py or --help."""
import sys

from solarjax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
