"""Loaded by every Python process of a CPU SGLang engine (this folder leads its ``PYTHONPATH``).

SGLang 0.5.23 takes its Intel AMX kernel paths whenever the CPU has AMX tiles and ``sgl_kernel``
registers ``convert_weight_packed`` (``sglang.srt.utils.common.cpu_has_amx_support``), with no switch
of its own. Those kernels support bf16/fp16 only (fp32 stops the scheduler: ``"rmsnorm_kernel" not
implemented for 'Float'``), and the CPU kernel source we build lacks ops 0.5.23 calls on that path
(``fused_qk_norm_cpu``, ...). So unless ``MTP_RL_SGLANG_CPU_AMX=1``, ``torch.cpu._is_amx_tile_supported``
answers False in these processes and SGLang runs its plain-torch layers, as on a CPU without AMX.
The patch is applied when ``torch.cpu`` is first imported; nothing else is touched.
"""

import os
import sys

if os.environ.get("MTP_RL_SGLANG_CPU_AMX") != "1":
    import importlib.abc
    import importlib.util

    class _NoAmx(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "torch.cpu":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module, _run=run):
                _run(module)
                module._is_amx_tile_supported = lambda: False

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _NoAmx())
