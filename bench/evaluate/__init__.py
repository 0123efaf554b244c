"""Sample and evaluate: images from a run's checkpoints, then metrics with their provenance.

- `sampling`:   `bench sample`: sharded, resumable sampling from a run folder (`sample_run`)
- `features`:   feature networks (Inception, DINOv2, the embedded classifier): `build_feature_network`
- `quality`:    sample-quality numbers: uint8 quantisation, feature statistics, Frechet distance, KID,
                conditional accuracy, and the interchangeable backends (`get_backend`)
- `evaluation`: `bench eval`: the (step, metric, setting) rows of eval.jsonl
- `sweep`:      `bench sample-sweep`: the same samples under several values of a setting (Fig. 8)
"""
