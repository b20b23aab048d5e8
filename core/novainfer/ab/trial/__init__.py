"""The trial side of nova-ab: what runs in a trial's own process (`python -m novainfer.ab.trial`) and in the
output check's (`python -m novainfer.ab.trial.output_check`). This package's own import loads nothing heavy,
so the sweep side may read its peer registry (novainfer.ab.trial.peers) without torch."""
