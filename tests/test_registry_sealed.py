"""The registry is sealed: no module of ``tricoclr/`` outside ``tricoclr/data/modalities.py``
branches on a modality's name, a tensor's rank or a channel count.

The rule, checked on the AST of every module of the package:

- a comparison (``==``, ``!=``, ``in``, ``not in``, ``match``) against a built-in modality's name, or
  a collection holding one, is a branch on a modality's name;
- a lookup in a dict literal keyed by modality names (``{"rgb": ...}[name]`` or ``.get(name)``)
  is a branch on a modality's name too;
- an ``if``, ``elif``, conditional expression or ``while`` whose test compares a rank
  (``x.dim()``, ``x.ndim``, ``len(x.shape)``), a size (``x.shape[i]``, ``x.size(i)``, i != 0: axis 0 counts items) or a channel
  count (``in_channels``) with a number is a branch on rank or channels, unless its body only
  raises (checking an input's shape is validation, not dispatch).

``data_tools/`` (the preparation tools, which extract the stored modalities) is not scanned. The few
justified exceptions inside ``tricoclr/`` are listed below with their reason; the list may not go
stale.
"""

from __future__ import annotations

import ast

from conftest import REPO

from tricoclr.data import modalities as registry

REGISTRY = "tricoclr/data/modalities.py"
# (path, kind) -> why the module may branch so. kind: "name" or "rank".
JUSTIFIED = {
    # The stores decode the stored parts that `tricoclr-data prepare` writes (schema.md): a part
    # name picks its codec (flow's two fields are stacked in one grey image). Part formats, not
    # modalities: a derived modality reads through its source's parts.
    ("tricoclr/data/store.py", "name"): "decodes stored part formats",
    # The demo runs a published experiment whose recipe names the modalities it compares.
    ("tricoclr/demo.py", "name"): "the demo's recipe names its variants' modalities",
    # TV-L1 is the preparation's flow operator (frames in, flow out), not a modality dispatch.
    ("tricoclr/ops/tvl1.py", "rank"): "accepts (H,W) or (N,H,W) frames; flow's own field layout",
    # A backbone builds its first convolution for whatever in_channels the modality declares;
    # 3 is torchvision's stem, not a modality.
    ("tricoclr/models/backbones.py", "rank"): "adapts torchvision's 3-channel stem to any channel count",
    # Statistics over (runs, items) accept one run as a 1-d vector.
    ("tricoclr/eval/stats.py", "rank"): "accepts 1-d (one run) or 2-d (runs x items) values",
    # Figures accept CHW or HWC, grey or colour images.
    ("tricoclr/eval/report.py", "rank"): "image layout of figure thumbnails (CHW/HWC, grey/colour)",
}


def _modality_names() -> set[str]:
    return set(registry.BUILT_IN)


def _is_name_literal(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value in names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_name_literal(element, names) for element in node.elts)
    return False


def _is_name_keyed_dict(node: ast.AST, names: set[str]) -> bool:
    return isinstance(node, ast.Dict) and any(key is not None and _is_name_literal(key, names) for key in node.keys)


def _name_branches(tree: ast.AST, names: set[str]) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(_is_name_literal(o, names) for o in [node.left, *node.comparators]):
            lines.append(node.lineno)
        elif isinstance(node, ast.match_case) and _is_name_literal(getattr(node.pattern, "value", None), names):
            lines.append(node.pattern.lineno)
        elif isinstance(node, ast.Subscript) and _is_name_keyed_dict(node.value, names):
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and _is_name_keyed_dict(node.func.value, names)
        ):
            lines.append(node.lineno)
    return lines


def _is_shape_query(node: ast.AST) -> bool:
    """x.dim(), x.ndim, len(x.shape), x.shape[i], x.size(i) (i != 0: axis 0 counts items),
    in_channels / x.in_channels."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dim":
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "size":
        return bool(node.args) and not _is_zero(node.args[0])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len":
        return any(
            _is_shape_query(arg) or (isinstance(arg, ast.Attribute) and arg.attr == "shape") for arg in node.args
        )
    if isinstance(node, ast.Attribute) and node.attr in ("ndim", "in_channels"):
        return True
    if isinstance(node, ast.Name) and node.id == "in_channels":
        return True
    return (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "shape"
        and not _is_zero(node.slice)
    )


def _is_zero(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value == 0


def _is_number(node: ast.AST) -> bool:
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_number(element) for element in node.elts)
    return isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool)


def _compares_shape_with_number(test: ast.AST) -> bool:
    for node in ast.walk(test):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_shape_query(o) for o in operands) and any(_is_number(o) for o in operands):
                return True
    return False


def _only_raises(body) -> bool:
    return all(isinstance(statement, ast.Raise) for statement in body)


def _rank_branches(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.While)) and _compares_shape_with_number(node.test):
            if not _only_raises(node.body):
                lines.append(node.lineno)
        elif isinstance(node, ast.IfExp) and _compares_shape_with_number(node.test):
            lines.append(node.lineno)
    return lines


def _branches() -> dict[tuple[str, str], list[int]]:
    names = _modality_names()
    found = {}
    for path in sorted((REPO / "tricoclr").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative == REGISTRY:
            continue
        tree = ast.parse(path.read_text(), filename=relative)
        for kind, lines in (("name", _name_branches(tree, names)), ("rank", _rank_branches(tree))):
            if lines:
                found[relative, kind] = sorted(set(lines))
    return found


def test_no_module_outside_the_registry_branches_on_a_modality_name_rank_or_channels():
    offending = {key: lines for key, lines in _branches().items() if key not in JUSTIFIED}
    assert not offending, (
        "branches on a modality's name, rank or channels outside tricoclr/data/modalities.py "
        f"(declare it in the registry entry instead): {offending}"
    )


def test_the_justified_exceptions_are_still_needed():
    found = _branches()
    stale = [key for key in JUSTIFIED if key not in found]
    assert not stale, f"exceptions no longer needed, remove them from JUSTIFIED: {stale}"


def test_the_rule_catches_the_branches_it_forbids():
    names = {"rgb", "flow"}
    caught = [
        'if modality == "flow": pass',
        'x = 2 if name in ("rgb", "audio") else 3',
        'y = {"rgb": "RGB"}.get(modality, modality)',
        'match modality:\n    case "rgb":\n        pass',
    ]
    for source in caught:
        assert _name_branches(ast.parse(source), names), source
    for source in (
        "image = t[:, :, 0] if t.dim() == 5 else t",
        "if x.shape[1] == 2:\n    x = x[:, :1]",
        'if spec.in_channels == 2 and b == "s3d": pass',
    ):
        assert _rank_branches(ast.parse(source)), source
    allowed = [
        'if x.dim() != 2:\n    raise ValueError("2-d")',
        "name = registry.get(modality).display_name",
        "if conv.in_channels != in_channels: pass",
    ]
    for source in allowed:
        tree = ast.parse(source)
        assert not _name_branches(tree, names) and not _rank_branches(tree), source
