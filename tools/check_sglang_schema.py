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
    # the model-family fixture (parameter names, config keys, MTP draft mappings per architecture)
    .venv/bin/python tools/check_sglang_schema.py --models --wheel /tmp/sglang_wheel/sglang-0.5.23-*.whl --write

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
    from megatron_mtp_rl.rollout.sglang import schema as S

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
    from megatron_mtp_rl.rollout.sglang import schema as S

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


# ---------------------------------------------------------------------------------------------
# Model families: what SGLang's model code accepts (tests/fixtures/sglang_models.json)

MODELS_FIXTURE = ROOT / "tests" / "fixtures" / "sglang_models.json"
_M = "sglang/srt/models/"
#: architecture → (files whose classes build it, class-name prefixes scanned in them)
ARCHITECTURES = {
    "MiMoForCausalLM": ([_M + "mimo.py", _M + "qwen2.py"], ("MiMo", "Qwen2")),
    "Qwen3ForCausalLM": ([_M + "qwen3.py", _M + "qwen2.py"], ("Qwen3", "Qwen2")),
    "Qwen3MoeForCausalLM": ([_M + "qwen3_moe.py", _M + "qwen2_moe.py"], ("Qwen3Moe", "Qwen2MoeModel", "Qwen2MoeMLP")),
    "Glm4MoeForCausalLM": ([_M + "glm4_moe.py"], ("Glm4Moe",)),
    "DeepseekV3ForCausalLM": (
        [_M + "deepseek_v2.py", _M + "deepseek_common/deepseek_weight_loader.py"],
        ("DeepseekV2", "DeepseekV3", "MoEGate"),
    ),
}
#: architecture → its MTP draft class (srt/configs/model_config.py rewrites the draft's architecture)
DRAFTS = {
    "MiMoForCausalLM": ("MiMoMTP", [_M + "mimo_mtp.py"]),
    "Qwen3MoeForCausalLM": ("Qwen3MoeForCausalLMMTP", [_M + "qwen3_moe_mtp.py", _M + "qwen3_moe.py"]),
    "Glm4MoeForCausalLM": ("Glm4MoeForCausalLMNextN", [_M + "glm4_moe_nextn.py", _M + "glm4_moe.py"]),
    "DeepseekV3ForCausalLM": (
        "DeepseekV3ForCausalLMNextN",
        [_M + "deepseek_nextn.py", _M + "deepseek_common/deepseek_weight_loader.py"],
    ),
}
MODEL_CONFIG = "sglang/srt/configs/model_config.py"


def _classes(tree: ast.Module, prefixes: tuple[str, ...]) -> list[ast.ClassDef]:
    return [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.startswith(prefixes)]


def module_attributes(nodes: list[ast.AST]) -> set[str]:
    """Names assigned as ``self.X = ...`` / ``self.a.X = ...`` (the parameter path pieces)."""
    out = set()
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, ast.Assign | ast.AnnAssign):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                targets = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
                for t in targets:
                    if isinstance(t, ast.Attribute) and "self" in ast.unparse(t).split(".")[:1]:
                        out.add(t.attr)
    return out


def checkpoint_shard_names(nodes: list[ast.AST]) -> set[str]:
    """Checkpoint names a loader folds into fused parameters: ``(param, shard_name, id)`` tuples and
    ``make_expert_params_mapping(ckpt_*_name=...)`` keywords."""
    out = set()
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, ast.Tuple) and len(n.elts) == 3:
                a, b = n.elts[0], n.elts[1]
                if all(isinstance(x, ast.Constant) and isinstance(x.value, str) for x in (a, b)):
                    out.add(b.value)
            if (  # '"q_a_proj" in name': a checkpoint name the loader recognises and fuses itself
                isinstance(n, ast.Compare)
                and isinstance(n.left, ast.Constant)
                and isinstance(n.left.value, str)
                and isinstance(n.ops[0], ast.In)
                and ast.unparse(n.comparators[0]) == "name"
                and n.left.value.replace("_", "").isalnum()
            ):
                out.add(n.left.value)
            if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "make_expert_params_mapping":
                out |= {kw.value.value for kw in n.keywords if isinstance(kw.value, ast.Constant)}
    return out


def config_keys(nodes: list[ast.AST]) -> tuple[set[str], set[str]]:
    """(read directly as ``config.X``, read with a default via ``getattr``/``hasattr``)."""
    direct, optional = set(), set()
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "config":
                direct.add(n.attr)
            if isinstance(n, ast.Attribute) and ast.unparse(n.value) == "self.config":
                direct.add(n.attr)
            if isinstance(n, ast.Call) and getattr(n.func, "id", "") in ("getattr", "hasattr") and len(n.args) >= 2:
                if ast.unparse(n.args[0]) in ("config", "self.config") and isinstance(n.args[1], ast.Constant):
                    optional.add(n.args[1].value)
    dunder = {k for k in direct | optional if k.startswith("__")}
    return direct - optional - dunder, optional - dunder


def string_lists(nodes: list[ast.AST]) -> dict[str, list[str]]:
    """Every list of string constants, by the variable (or keyword) it is assigned to; ``in [...]`` as ``in``."""
    out: dict[str, list[str]] = {}
    for node in nodes:
        for n in ast.walk(node):
            pairs = []
            if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name):
                pairs.append((n.targets[0].id, n.value))
            if isinstance(n, ast.keyword) and n.arg:
                pairs.append((n.arg, n.value))
            if isinstance(n, ast.Compare) and isinstance(n.ops[0], ast.In) and isinstance(n.comparators[0], ast.List):
                pairs.append(("in", n.comparators[0]))
            for name, value in pairs:
                if (
                    isinstance(value, ast.List)
                    and value.elts
                    and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts)
                ):
                    out.setdefault(name, [])
                    out[name] += [e.value for e in value.elts if e.value not in out[name]]
    return out


def extract_models(wheel: str) -> dict:
    """Per architecture: accepted parameter-path pieces, checkpoint shard names, config keys; per draft:
    its module pieces, the MTP-only names its loader remaps, and the MTP depth it takes."""
    with zipfile.ZipFile(wheel) as zf:
        version = _version(zf)
        read = lambda p: zf.read(p).decode()  # noqa: E731
        model_config = read(MODEL_CONFIG)
        archs = {}
        for arch, (files, prefixes) in ARCHITECTURES.items():
            nodes = [c for f in files for c in _classes(ast.parse(read(f)), prefixes)]
            direct, optional = config_keys(nodes)
            archs[arch] = {
                "files": files,
                "module_attributes": sorted(module_attributes(nodes)),
                "checkpoint_shard_names": sorted(checkpoint_shard_names(nodes)),
                "config_keys_direct": sorted(direct),
                "config_keys_optional": sorted(optional),
            }
        drafts = {}
        for arch, (cls, files) in DRAFTS.items():
            trees = [ast.parse(read(f)) for f in files]
            nodes = [c for t in trees for c in t.body if isinstance(c, ast.ClassDef | ast.FunctionDef)]
            lists = string_lists(nodes)
            text = "".join(read(f) for f in files)
            every_onto_one = "model.mtp_layers.(\\d+)." in text  # MiMoMTP: each k lands on one module
            one = (
                every_onto_one
                or "Only 1 nextn layer is supported" in text
                or (
                    f'architectures[0] = "{cls}"' in model_config
                    and f'"{cls}"\n            self.hf_config.num_nextn_predict_layers = 1' in model_config
                )
            )
            drafts[arch] = {
                "class": cls,
                "files": files,
                "registered": f'"{cls}"' in model_config,
                "module_attributes": sorted(module_attributes(nodes)),
                "mtp_only_names": lists.get("name_without_prefix")
                or lists.get("nextn_spec_weight_names")
                or [x for x in lists.get("in", []) if x.startswith("mtp.")],
                "max_depth": 1 if one else None,
                "maps_every_layer_onto_one": every_onto_one,
            }
    return {"sglang_version": version, "generated_by": "tools/check_sglang_schema.py --models",
            "architectures": archs, "drafts": drafts}  # fmt: skip


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
    p.add_argument("--models", action="store_true", help="the model-family fixture (sglang_models.json) instead")
    a = p.parse_args(argv)
    if a.models:
        return models_main(a)
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


def models_main(a) -> int:
    """``--models``: regenerate (``--write``) or compare tests/fixtures/sglang_models.json."""
    fixture = Path(a.fixture) if a.fixture != str(FIXTURE) else MODELS_FIXTURE
    with tempfile.TemporaryDirectory() as tmp:
        if a.download:
            spec = f"sglang=={a.version}" if a.version else "sglang"
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", tmp], check=True)
            wheel = glob.glob(f"{tmp}/sglang-*.whl")[0]
        elif a.wheel:
            wheel = a.wheel
        else:
            raise SystemExit("give --wheel or --download")
        new = extract_models(wheel)
    if a.write:
        fixture.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {fixture} (sglang {new['sglang_version']})")
        return 0
    changes = diff(json.loads(fixture.read_text(encoding="utf-8")), new)
    for line in changes:
        print(f"DIFF: {line}")
    if not changes:
        print(f"fixture matches sglang {new['sglang_version']}")
    return 1 if changes else 0


if __name__ == "__main__":
    sys.exit(main())
