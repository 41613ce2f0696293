"""``python -m neuroexapt.cli``."""

import sys

from neuroexapt.cli import main

sys.exit(main())
