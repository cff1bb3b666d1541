"""The machinery behind the experiment scripts at the top of the repository (exp_a ... exp_e,
report.py, bench.py, study.py). Nothing here runs at import time.

Layers, each importing only those above it in this list:
  runs, problems, bank, stats, transport, ard_mmd   no model: run bookkeeping and I/O, the problems
                                                    (prompts.json, MGSM, the generated bank) and
                                                    their parsing, statistics, optimal transport,
                                                    the ARD-MMD objectives
  ../common.py                                      the model: loading, accessors, the Z basis,
                                                    hooks, subspace patches, activation extraction
  decoding, fast_decode, interchange, das           engines that run the model under a patch
  summaries/                                        each experiment's tables, sentences and figures
                                                    from its CSVs alone (no model; imports only the
                                                    first group)
"""
