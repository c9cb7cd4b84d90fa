"""The bundled "shapes" model's own world, outside the engine: the procedural scenes and their
caption grammar (:mod:`gnr_shapes.world`), the training of the model and its judge
(:mod:`gnr_shapes.training`), and the edit-quality evaluation (:mod:`gnr_shapes.evaluation`).

The engine (:mod:`gnr_fast`) never imports this package at module level: it reaches the caption
grammar through the ``gnr_fast.caption_grammars`` entry point group and ``gnr-fast eval`` through a
lazy import (docs/architecture.md, "Package layout").
"""
