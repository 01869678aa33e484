"""The soft-versus-hard attention study behind ``captioning compare``.

    run.py      ``captioning compare``: the command (arguments, plan, run, report)
    runs.py     which runs the study has, which are finished (resume), training and evaluating them
    collect.py  reading every run's metrics files and logs into one summary (summary.json)
    examples.py decoding the same test images with both mechanisms: attention maps, entropy per word
    report.py   figures (PNG, matplotlib Agg) and report.md, written from summary.json alone
    stats.py    Welch's t-test for the report's comparisons of arms
"""
