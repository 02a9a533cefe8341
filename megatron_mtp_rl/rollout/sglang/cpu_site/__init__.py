"""``sitecustomize`` for CPU SGLang engines (this folder is put on their PYTHONPATH; see defaults.py)."""
