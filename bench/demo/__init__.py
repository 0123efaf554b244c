"""Demo: `bench demo`, Table 1 in miniature on the embedded default, end to end on CPU.

- `run`:    the stages (prepare, train, evaluate, report) through the local executor (`main`)
- `calibrate`: the first half-minute: this machine's units of work timed, every stage estimated
- `output`: the summary, table, convergence plot and sample figures it leaves behind
- `timings`: the measured first runs, read from the records in results/readme/ (docs/demo.md's table)
"""
