"""Sample and evaluate: images from a run's checkpoints, then metrics with their provenance.

- `sampling`:   `bench sample`: sharded, resumable sampling from a run folder (`sample_run`)
- `features`:   feature networks (Inception, DINOv2, the embedded classifier): `build_feature_network`
- `quality`:    sample-quality numbers: uint8 quantisation, feature statistics, Frechet distance, KID,
                conditional accuracy, and the interchangeable backends (`get_backend`)
- `adm`:        ADM's evaluator written out: its reference batch, sFID features, IS, precision/recall
- `reference`:  eval.reference / eval.expected_reference: statistics, images, the facts rows record
- `score_run`: `bench eval`: the (step, metric, setting) rows of eval.jsonl
- `export`:     `bench export`: evaluated samples as the .npz ADM's evaluator reads
- `sweep`:      `bench sample-sweep`: the same samples under several values of a setting (Fig. 8)

Definitions, and where the harness differs from ADM's evaluator: README.md in this folder.
"""
