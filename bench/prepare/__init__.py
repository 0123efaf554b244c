"""Prepare: images -> VAE latent moments + PCA-reduced semantic features, as resumable shards.

- `sources`:   image datasets (Fashion-MNIST, scikit-learn digits, image folders): `open_split`, `ImageSource`
- `fetch`:     Fashion-MNIST from --data-root, Debian's package or a checked download into a cache
- `encoders`:  frozen VAE and semantic encoders from local files: `load_vae`, `build_semantic_encoder`
- `pca`:       streaming float64 PCA of encoder tokens: `PCAModel`, `PCAStats`, `import_official_pca`
- `embedded`:  the embedded default's own VAE and evaluation classifier, trained on CPU
- `options`:   what a prepare is asked to do: `PrepareOptions`, `PrepareError`, its command line, the content hash
- `shards`:    the folder shard by shard: the plan, the encode/fit/project passes, `prepare_state`
- `pipeline`:  `bench prepare` itself: `run_prepare`, `prepare_embedded` (task, lanes, the passes in order)
- `dataset`:   the prepared folder's format and the loader training reads: `read_manifest`, `load_prepared`
"""
