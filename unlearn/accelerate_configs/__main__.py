"""``python -m unlearn.accelerate_configs NAME``: print the path of a shipped configuration
(for ``accelerate launch --config_file $(python -m unlearn.accelerate_configs ddp) ...``)."""

import sys

from unlearn.accelerate_configs import NAMES, config_path

if len(sys.argv) != 2 or sys.argv[1] not in NAMES:
    sys.exit(f"usage: python -m unlearn.accelerate_configs {{{','.join(NAMES)}}}")
print(config_path(sys.argv[1]))
