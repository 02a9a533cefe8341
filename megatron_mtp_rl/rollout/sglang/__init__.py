"""SGLang as a rollout engine: request schema (``schema``), HTTP client (``client``), server supervisor
(``server``, with the start-up checks of ``preflight``), the engine (``engine``) and servers someone else
started (``external``). SGLang is a process we start, never a library we import (DESIGN §11)."""
