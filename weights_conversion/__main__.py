import sys

from weights_conversion.cli import main

sys.exit(main())
