"""redi-bench's harness: everything around the joint-diffusion core in `models/`.

The wings follow the pipeline, and a wing imports only wings before it plus the shared modules
(tests/test_layering.py checks the arrows):

    prepare -> train -> evaluate (sample + metrics) -> launch -> report;  perf and demo beside them

Shared modules, importable by every wing: `config` (typed settings), `compose` (Hydra composition),
`identity` (run hash and folder), `atomic` (write-then-rename, content hashes). `cli` is the front
door and imports the wings lazily, one per subcommand, so `bench --help` starts fast.
"""
