"""``python -m unlearn ...``: the command line (``accelerate launch ... -m unlearn run RECIPE``)."""

import sys

from unlearn.cli import main

sys.exit(main())
