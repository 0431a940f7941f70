"""The load benchmark: fanline side by side with a naive baseline, on real processes.

    python -m fanline.bench --quick          # < 2 minutes
    python -m fanline.bench --smoke          # a few seconds, for CI
    python -m fanline.bench --scenarios fanout --viewers 100,1000 --rates 50

Modules, in the order a run uses them:

    run.py        the command line, mode presets, the run from start to report
    stack.py      the processes under test: Valkey, fanline API pods and workers, baseline pods
    baseline.py   the naive server (one blocking XREAD loop per viewer, same SSE wire format)
    scenarios.py  what each scenario does, the measured phase and its figures
    loadgen.py    a load-generator process: many raw-socket SSE clients
    report.py     the table, the JSON file and the chart
"""
