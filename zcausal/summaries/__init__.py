"""One module per experiment (exp_a ... exp_e), each rebuilding that experiment's tables,
summary sentences (summary_lines, headline: what the script prints and report.py quotes) and
figures from the CSVs and config.json of a run folder, without a model."""
