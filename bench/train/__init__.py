"""Train: one run, resumable bit for bit, on one process or many (DDP).

- `build`:       config + prepared manifest -> network (`build_model`) and objective (`build_transport`)
- `loop`:        `bench train`: the run state, the training loop, resume and logging (`train`, `main`)
- `data`:        the prepared train split checked against the config, the batch order (`TrainingData`)
- `step`:        the training step `bench train` and `bench perf` both run (`TrainStep`, `make_train_step`)
- `checkpoint`:  atomic safetensors + JSON checkpoints: `save_checkpoint`, `load_checkpoint`, `list_checkpoints`
- `released_checkpoints`: released SiT-ReDi checkpoint files -> a JointDiT (`load_official_checkpoint`)
- `distributed`: process groups from torchrun, submitit or a single process: `init_distributed`
"""
