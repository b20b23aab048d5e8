"""nova-ab, in two halves that run in different processes.

    novainfer.ab.sweep   the sweep process: experiment files, the runner, executors, ledger, MLflow tracking,
                         statistics, report and the CLI. Plain data only: it never imports torch.
    novainfer.ab.trial   a trial process (and the output-check process): the trial procedure, the engines it
                         drives (ours and the peers'), the schedule plan, the step gate, the phase breakdown,
                         the output check.
    novainfer.ab.wire    what crosses between them (requests, records, settings, reports), with
    novainfer.ab.workload   the workload recipe: both below both halves.
"""
