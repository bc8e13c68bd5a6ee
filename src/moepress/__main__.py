"""`python -m moepress ...` (e.g. under `torchrun --nproc_per_node=8 -m moepress compress ...`)."""

from .cli import app

app(prog_name="moepress")
