"""Launch: ablation grids expanded into cells and submitted with submitit (SLURM, local, debug).

- `grids`:    grid files (`ablations/grids/*.yaml`) -> cells: `load_grid`, `expand`, `settings_for`
- `profiles`: cluster profiles (`slurm/profiles/*.yaml`) and per-job resources: `load_profile`
- `jobs`:     what runs on the nodes (`TrainJob`, `EvalJob`) and the run-folder records they write
- `plan`:     what a submission would run and its GPU-hours (`--dry-run`)
- `executors`: the submitit executor of a profile (`make_executor`) and a failed sbatch as one line
- `status`:   `bench status`: each cell's state from its run folder and the scheduler
- `submit`:   `bench grid` / `bench status` command lines: `submit_grid`, `main_grid`, `main_status`
- `prepare_jobs`: `bench prepare --cluster/--local/--debug`: an encoding array and the PCA job after
  it; `bench status --prepare`
- `import_official`: `bench import-official`: a released checkpoint as a grid's (or its own) run folder
"""
