"""The names of the files and folders that more than one stage reads or writes in a model folder.

One place for them, below the stages, so that the stage that writes a file and the ones that read it (the
model card, push, bench, the exporters) agree on its name without importing each other. The plan's name,
``plan.PLAN_FILE``, stands beside its type, which every stage already imports.
"""

from __future__ import annotations

CONFIG_FILE: str = "config.json"
GENERATION_CONFIG_FILE: str = "generation_config.json"
SIMILARITY_JSON: str = "similarity.json"
SIMILARITY_PNG: str = "similarity.png"
EVAL_FILE: str = "eval.json"
BENCH_FILE: str = "bench.json"
ZEROSHOT_FILE: str = "zeroshot.json"
CARD_FILE: str = "README.md"
ONNX_FOLDER: str = "onnx"
