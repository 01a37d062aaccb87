"""Weight conversion between Hugging Face and solarjax; see solarjax/convert.py or --help."""
import sys

from solarjax.convert import main

if __name__ == "__main__":
    sys.exit(main())
