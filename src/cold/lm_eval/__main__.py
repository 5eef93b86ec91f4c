"""`python -m cold.lm_eval ...`: lm-eval's command line with the model `cold` registered."""

import sys

from cold.errors import ColdError

try:
    from cold.lm_eval import main
except ColdError as exc:  # the [lm-eval] extra is missing
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)

main()
