"""Demo: `bench demo`, Table 1 in miniature on the embedded default, end to end on CPU.

- `run`:    the stages (prepare, train, evaluate, report) through the local executor (`main`)
- `plan`:   what runs and how long it takes: `DemoPlan`, `make_plan`, `Work` and the time-left estimates, `Printer`
- `local_jobs`: the demo's local jobs end with it (`owned_local_jobs`), their controllers' stderr to a log
- `idle_lane`: finished cells evaluated in the lane training has left idle while the last cells train
- `calibrate`: the first half-minute: this machine's units of work timed, every stage estimated
- `output`: the summary, table, convergence plot and sample figures it leaves behind
- `timings`: the measured first runs, read from the records in results/readme/ (docs/demo.md's table)
"""
