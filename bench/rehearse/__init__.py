"""Rehearse: the paper scale's path in miniature, through the launcher (`bench rehearse`).

- `assets`: generated ImageNet-layout images and random-weight networks of the paper's
  architectures (SD-VAE, DINOv2-B/14-reg, Inception), an ADM-layout reference batch
- `run`:    the rehearsal folder (site.yaml, a miniature table1 grid) and every stage's command

Beside the pipeline, like perf and demo: it may import any wing, and no wing imports it.
"""
