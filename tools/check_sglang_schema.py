"""Re-extract the SGLang API facts the rollout bridge relies on from the wheels, and compare.

SGLang is not importable here (it needs CUDA), so everything is read statically with ``ast``
from the wheel's sources: the request classes of ``sglang/srt/managers/io_struct.py`` (fields of
inherited bases included), the ``/generate`` JSON contract of ``sglang/api/v1/api_types.py``,
the routes and body classes of ``sglang/srt/entrypoints/http_server.py``, the
``launch_server`` CLI flags, the pickle globals SGLang's ``SafeUnpickler`` allows, and from the
sglang-router wheel its CLI flags and which of our routes its binary serves.

    # compare the checked-in fixture with freshly downloaded wheels (needs network)
    .venv/bin/python tools/check_sglang_schema.py --download
    # or with wheels already on disk; --write regenerates the fixture instead of comparing
    .venv/bin/python tools/check_sglang_schema.py --wheel sglang-*.whl --router-wheel sglang_router-*.whl [--write]

Exit status 1 when the wheel disagrees with the fixture or no longer has a field we send.
CI never runs this: the unit tests read the fixture only.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "sglang_io_struct_fields.json"
sys.path.insert(0, str(ROOT))

IO_STRUCT = "sglang/srt/managers/io_struct.py"
API_TYPES = "sglang/api/v1/api_types.py"
HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
SERVER_ARGS = "sglang/srt/server_args.py"
ARG_FIELDS_DIR = "sglang/srt/arg_groups/fields/"
COMMON = "sglang/srt/utils/common.py"
ROUTER_ARGS = "sglang_router/router_args.py"

# Extra io_struct classes worth tracking beyond the route bodies.
EXTRA_CLASSES = ("FlushCacheReqInput",)
API_CONTRACT_CLASSES = ("GenerateRequest", "SamplingParams")
ROUTER_ROUTES = ("/generate", "/health", "/health_generate", "/flush_cache", "/workers")
ROUTER_ROUTES_MAYBE_ABSENT = (
    "/abort_request",
    "/pause_generation",
    "/continue_generation",
    "/update_weights_from_tensor",
    "/update_weights_from_distributed",
    "/update_weights_from_disk",
    "/init_weights_update_group",
)


def _version(zf: zipfile.ZipFile) -> str:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    for line in zf.read(meta).decode().splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"{meta}: no Version")


def class_fields(source: str) -> dict[str, list[str]]:
    """Field names of every class in a module, inherited fields first (bases in the same module)."""
    tree = ast.parse(source)
    own: dict[str, list[str]] = {}
    bases: dict[str, list[str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        names = []
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                if "ClassVar" in ast.unparse(stmt.annotation):
                    continue
                names.append(stmt.target.id)
        own[node.name] = names
        bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]

    def resolve(name: str, seen: tuple = ()) -> list[str]:
        out: list[str] = []
        for b in bases.get(name, []):
            if b in own and b not in seen:
                out += [f for f in resolve(b, seen + (name,)) if f not in out]
        return out + [f for f in own[name] if f not in out]

    return {name: resolve(name) for name in own}


def http_routes(source: str) -> dict[str, dict]:
    """route -> {methods, body class, query params} from the FastAPI decorators."""
    routes: dict[str, dict] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        body_cls = None
        query = []
        args = node.args.args
        defaults = [None] * (len(args) - len(node.args.defaults)) + list(node.args.defaults)
        for a, d in zip(args, defaults):
            if a.arg == "obj" and a.annotation is not None:
                ann = a.annotation
                if isinstance(ann, ast.Subscript) and isinstance(ann.slice, ast.Tuple):
                    ann = ann.slice.elts[0]
                if isinstance(ann, ast.Subscript):  # Optional[X]
                    ann = ann.slice
                if isinstance(ann, ast.Name):
                    body_cls = ann.id
            if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "Query":
                query.append(a.arg)
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)):
                continue
            if getattr(dec.func.value, "id", None) != "app" or not dec.args:
                continue
            if not isinstance(dec.args[0], ast.Constant) or not isinstance(dec.args[0].value, str):
                continue
            verb = dec.func.attr
            if verb == "api_route":
                methods = [e.value for kw in dec.keywords if kw.arg == "methods" for e in kw.value.elts]
            elif verb in ("get", "post", "put", "delete"):
                methods = [verb.upper()]
            else:
                continue
            r = routes.setdefault(dec.args[0].value, {"methods": [], "body": body_cls, "query": query})
            r["methods"] = sorted(set(r["methods"]) | set(methods))
    return routes


def _str_of(node: ast.AST) -> str | None:
    """A constant string, or an f-string rendered with its placeholders empty ({prefix} = '')."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant))
    return None


def add_argument_flags(source: str) -> set[str]:
    flags = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            for a in node.args:
                s = _str_of(a)
                if s and s.startswith("--"):
                    flags.add(s)
    return flags


def dataclass_cli_flags(source: str) -> set[str]:
    """Flags of ``name: A[T, "help"]`` / ``A[T, Arg(...)]`` fields (SGLang's add_cli_args_from_dataclass)."""
    flags = set()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        ann = node.annotation
        if not (isinstance(ann, ast.Subscript) and getattr(ann.value, "id", None) == "A"):
            continue
        if not isinstance(ann.slice, ast.Tuple) or len(ann.slice.elts) < 2:
            continue
        meta = ann.slice.elts[1]
        cli = "--" + node.target.id.replace("_", "-")
        aliases: list[str] = []
        if isinstance(meta, ast.Call):
            kws = {kw.arg: kw.value for kw in meta.keywords}
            if isinstance(kws.get("no_cli"), ast.Constant) and kws["no_cli"].value is True:
                continue
            if isinstance(kws.get("cli_name"), ast.Constant):
                cli = kws["cli_name"].value
            if isinstance(kws.get("aliases"), ast.List):
                aliases = [e.value for e in kws["aliases"].elts if isinstance(e, ast.Constant)]
        elif not (isinstance(meta, ast.Constant) and isinstance(meta.value, str)):
            continue
        flags.add(cli)
        flags.update(aliases)
    return flags


def safe_unpickler_globals(source: str) -> list[list[str]]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "SafeUnpickler":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", None) == "ALLOWED_GLOBALS":
                    return sorted([e.elts[0].value, e.elts[1].value] for e in stmt.value.elts)
    raise SystemExit("SafeUnpickler.ALLOWED_GLOBALS not found")


def extract(wheel: str, router_wheel: str) -> dict:
    """The fixture's content, from the two wheels."""
    from megatron_mtp_rl.rollout import sglang_schema as S

    with zipfile.ZipFile(wheel) as zf:
        version = _version(zf)
        read = lambda p: zf.read(p).decode()  # noqa: E731
        io_fields = class_fields(read(IO_STRUCT))
        api_fields = class_fields(read(API_TYPES))
        routes = http_routes(read(HTTP_SERVER))
        flags = add_argument_flags(read(SERVER_ARGS)) | dataclass_cli_flags(read(SERVER_ARGS))
        for name in zf.namelist():
            if name.startswith(ARG_FIELDS_DIR) and name.endswith(".py"):
                flags |= dataclass_cli_flags(read(name))
        allowed = safe_unpickler_globals(read(COMMON))
    with zipfile.ZipFile(router_wheel) as zf:
        router_version = _version(zf)
        router_flags = add_argument_flags(zf.read(ROUTER_ARGS).decode())
        so = next(n for n in zf.namelist() if n.endswith(".so"))
        blob = zf.read(so)
    our_routes = sorted({getattr(S, k) for k in dir(S) if k.isupper() and isinstance(getattr(S, k), str)} & set(routes))
    classes = sorted({routes[r]["body"] for r in our_routes if routes[r]["body"]} | set(EXTRA_CLASSES))
    return {
        "sglang_version": version,
        "sglang_router_version": router_version,
        "generated_by": "tools/check_sglang_schema.py",
        "request_classes": {c: io_fields[c] for c in classes},
        "api_contract": {c: api_fields[c] for c in API_CONTRACT_CLASSES},
        "http_routes": {r: routes[r] for r in our_routes},
        "launch_server_flags": sorted(flags),
        "router_flags": sorted(router_flags),
        "router_routes_present": [r for r in ROUTER_ROUTES if r.encode() in blob],
        "router_routes_absent": [r for r in ROUTER_ROUTES_MAYBE_ABSENT if r.encode() not in blob],
        "safe_unpickler_allowed_globals": allowed,
    }


def problems_with_our_usage(data: dict) -> list[str]:
    """Fields, routes and classes the bridge uses that the extracted schema lacks."""
    from megatron_mtp_rl.rollout import sglang_schema as S

    out = []
    for route, cls in S.ROUTE_REQUEST_CLASS.items():
        info = data["http_routes"].get(route)
        if info is None:
            out.append(f"route {route} is gone")
        elif info["body"] != cls:
            out.append(f"route {route} now parses {info['body']}, we assume {cls}")
    for cls, used in S.FIELDS_USED.items():
        known = data["api_contract"][cls] if cls == "SamplingParams" else data["request_classes"].get(cls)
        if known is None:
            out.append(f"class {cls} is gone")
            continue
        out += [f"{cls}.{f} is gone" for f in used if f not in known]
    for route in (S.GENERATE, S.HEALTH, S.FLUSH_CACHE, S.ROUTER_WORKERS):
        if route not in data["router_routes_present"]:
            out.append(f"the router no longer serves {route}")
    return out


def diff(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "generated_by" or old.get(key) == new.get(key):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    out.append(f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif isinstance(a, list) and isinstance(b, list):
            added = [x for x in b if x not in a]
            removed = [x for x in a if x not in b]
            out.append(f"{key}: added {added[:20]} removed {removed[:20]}")
        else:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def download(dest: str, version: str | None, router_version: str | None) -> tuple[str, str]:
    for pkg, ver in (("sglang", version), ("sglang-router", router_version)):
        spec = f"{pkg}=={ver}" if ver else pkg
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", dest], check=True)
    return glob.glob(f"{dest}/sglang-*.whl")[0], glob.glob(f"{dest}/sglang_router-*.whl")[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheel", help="sglang wheel")
    p.add_argument("--router-wheel", help="sglang-router wheel")
    p.add_argument("--download", action="store_true", help="pip download the wheels into a temporary directory")
    p.add_argument("--version", help="with --download: the sglang version (default: latest)")
    p.add_argument("--router-version", help="with --download: the sglang-router version (default: latest)")
    p.add_argument("--fixture", default=str(FIXTURE))
    p.add_argument("--write", action="store_true", help="regenerate the fixture instead of comparing")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if a.download:
            wheel, router_wheel = download(tmp, a.version, a.router_version)
        elif a.wheel and a.router_wheel:
            wheel, router_wheel = a.wheel, a.router_wheel
        else:
            p.error("give --wheel and --router-wheel, or --download")
        new = extract(wheel, router_wheel)
    bad = problems_with_our_usage(new)
    for line in bad:
        print(f"USAGE: {line}")
    if a.write:
        Path(a.fixture).parent.mkdir(parents=True, exist_ok=True)
        Path(a.fixture).write_text(json.dumps(new, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {a.fixture} (sglang {new['sglang_version']}, sglang-router {new['sglang_router_version']})")
        return 1 if bad else 0
    old = json.loads(Path(a.fixture).read_text(encoding="utf-8"))
    changes = diff(old, new)
    for line in changes:
        print(f"DIFF: {line}")
    if not changes and not bad:
        print(f"fixture matches sglang {new['sglang_version']} / sglang-router {new['sglang_router_version']}")
    return 1 if (changes or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
