"""How a sweep ended, for scripts: its exit code and its MLflow parent run's status, from the comparison.

`nova-ab sweep` exits with
- EXIT_OK (0): every trial ran to a result: measured ("ok", "unverified") or judged ("incorrect",
  "caliber_mismatch": an arm found wrong is an answer), and the baseline can carry a verdict;
- EXIT_TRIALS_FAILED (3): the verdict stands on what was measured, but some trials gave no result: they
  "failed", hit their "timeout", or were "skipped" (an arm that cannot run here: its backend is not installed,
  no GPU); the table says why beside each such arm;
- EXIT_NO_VERDICT (4): no verdict is possible: the baseline has no ok trial, is unverified, failed its checks or
  is off its caliber (statistics.baseline_problem), or there were no trials at all. This wins over 3;
- 2 for bad input and 130 for Ctrl-C (novainfer.ab.sweep.cli).
The parent run ends FINISHED with 0 and FAILED with 3 or 4 (KILLED on Ctrl-C), so MLflow's runs table and a
shell script read the same answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from novainfer.ab.sweep.statistics import ArmSummary, baseline_problem

EXIT_OK = 0
EXIT_TRIALS_FAILED = 3
EXIT_NO_VERDICT = 4
# Trial statuses that are no result at all (the others are measurements or judgements).
NO_RESULT = ("failed", "timeout", "skipped")


@dataclass(frozen=True)
class Outcome:
    """exit_code: one of the EXIT_* codes; run_status: the parent run's MLflow status; words: one line, or "" when
    all is well."""

    exit_code: int
    run_status: str
    words: str


def outcome(summaries: Sequence[ArmSummary]) -> Outcome:
    baseline = next((s for s in summaries if s.is_baseline), None)
    problem = baseline_problem(baseline) if summaries else "no trials"
    missing = {status: sum(s.counts.get(status, 0) for s in summaries) for status in NO_RESULT}
    missing_words = ", ".join(f"{n} {status}" for status, n in missing.items() if n)
    if problem is not None:
        words = f"no verdict possible: {problem}" + (f" ({missing_words})" if missing_words else "")
        return Outcome(EXIT_NO_VERDICT, "FAILED", words)
    if missing_words:
        return Outcome(EXIT_TRIALS_FAILED, "FAILED", f"some trials gave no result: {missing_words}")
    return Outcome(EXIT_OK, "FINISHED", "")
