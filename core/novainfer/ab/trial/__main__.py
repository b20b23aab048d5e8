"""`python -m novainfer.ab.trial`: one trial, its request on stdin (novainfer.ab.trial.procedure)."""

import sys

from novainfer.ab.trial.procedure import main

sys.exit(main())
