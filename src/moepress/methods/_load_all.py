"""Import every method package so each registers itself. Add one line per new method."""

import importlib

_PACKAGES = (
    "frequency", "reap", "naee",                              # pruning
    "average", "msmoe", "hcsmoe", "zipit", "mergemoe",        # merging
    "d2moe",                                                  # delta decomposition
    "compressed_experts",                                     # fewer active experts
    "moe_pruner",                                             # unstructured weight pruning
    "moe_i2",                                                 # expert pruning + low rank
)

for _name in _PACKAGES:
    importlib.import_module(f"{__package__}.{_name}")
