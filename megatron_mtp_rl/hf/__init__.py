"""HF checkpoints: read, map, load, export (DESIGN §10). Layered bottom to top, no import back down-up:

* ``directory``, ``fp8``, ``reader`` — an HF directory, its config.json, lazy slices of its tensors;
* ``mapping``, ``families/`` — megatron ⇄ HF names and layouts, one module per model family;
* ``load`` (HF → this rank's shard), ``export`` (this stage → HF tensors, one at a time), ``shards``
  (safetensors shards of ``--max-shard-size`` with their index).
"""
