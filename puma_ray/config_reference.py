"""The configuration reference generated from the schema: `puma-ray config --schema`, committed
as docs/config.md (tests/test_cli_polish.py keeps the two equal), one table per section with
every key's type, constraint, default and description."""

from __future__ import annotations

from fractions import Fraction
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel

from puma_ray.config import (
    SETTING_KEYS,
    SWEEP_DISCRETE,
    SWEEPABLE,
    WHOLE_MAPPINGS,
    BuiltinSource,
    NpzSource,
    PipelineConfig,
    SearchDim,
    TorchvisionSource,
)

# equal), generated from the models above so it cannot drift from them.

SCHEMA_INTRO = """\
# Configuration reference

Every key of the pipeline YAML: its dotted path, type, default and meaning. Generated from the
schema in `puma_ray/config.py` by `puma-ray config --schema` (a test keeps this file equal to
that output: edit the descriptions in the schema, then regenerate).

How a config resolves: the defaults below, then the YAML file (`puma-ray COMMAND CONFIG`),
then each `--set KEY=VALUE` (repeatable; values are YAML). Without a CONFIG a command uses the
embedded demo (`tune_configs/demo.yaml`: these defaults shrunk for 2 CPUs).
`puma-ray config [CONFIG] [--set ...]` prints the result; a bad key or value is refused with
one line that names it, before anything runs.

- Sections merge key by key. A list, or one of these mappings written in a file, replaces the
  default as a whole (a file whose `sweep.space` names only `pruning.ratio` sweeps only that
  key): {whole}.
- `--set` edits one key: `--set training.epochs=3`, `--set data.sources.0.noise=0.2` (list
  items by index), `--set 'sweep.space.pruning.ratio={{grid: [0.2, 0.5]}}'` (search keys keep
  their dots), `--set sweep.space.pruning.eps_scale=null` (drops a search key),
  `--set 'sweep.space.method.settings=[{{pruning.strategy: random}}]'
  --set sweep.space.pruning.eps_scale=null` (a settings dimension, given whole; random ignores
  eps_scale, so that grid is dropped).
- Numbers may be written as fractions: `epsilon: 8/255`.
- `null` defaults that name an environment variable (`tracking.tracking_uri`:
  `MLFLOW_TRACKING_URI`, `tracking.experiment`: `MLFLOW_EXPERIMENT_NAME`, `ray.address`:
  `RAY_ADDRESS`) use it when set; a value in the file or in `--set` wins over the variable.
"""

_BASIC_TYPES = {float: "float", int: "integer", str: "string", bool: "bool", Any: "any"}


def _hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls, include_extras=True)


def _section_type(hint: Any) -> type[BaseModel] | None:
    return hint if isinstance(hint, type) and issubclass(hint, BaseModel) else None


def _type_text(hint: Any) -> str:
    """A reader's name for a field's type, with the checks its validators make."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        checks = [getattr(getattr(m, "func", None), "constraint", None) for m in args[1:]]
        inner = typing.get_origin(args[0]) in (typing.Union, types.UnionType)
        base = _type_text(args[0])
        if inner and all(_section_type(a) for a in typing.get_args(args[0])):
            return base  # the sources: a discriminated union
        return " ".join([base, *(c for c in checks if c)])
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        if all(_section_type(a) for a in kinds):
            tags = [a.model_fields["type"].default for a in kinds]
            text = f"source ({', '.join(tags)})"
        else:
            text = " or ".join(_type_text(a) for a in kinds)
        return text + (" or null" if len(kinds) < len(args) else "")
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args) if len(args) > 1 else f"`{args[0]}`"
    if origin is list:
        return "list" if args[0] is Any else f"list of {_type_text(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    if origin is dict:
        if _section_type(args[1]) is SearchDim:
            return "mapping of search key to dimension"
        return "mapping"
    return _BASIC_TYPES.get(hint, getattr(hint, "__name__", str(hint)))


def _plain(value: Any) -> Any:
    """A default as the YAML a user would write: models without their default keys."""
    if isinstance(value, BaseModel):
        out = value.model_dump(mode="json", exclude_defaults=True)
        if "type" in type(value).model_fields:  # a source: its kind first
            out = {"type": value.type, **out}
        return out
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _default_text(info: Any) -> str:
    from pydantic_core import PydanticUndefined

    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, float) and not value.is_integer():
        frac = Fraction(value).limit_denominator(255)
        if frac.denominator == 255 and float(frac) == value:
            return f"`{frac.numerator}/255`"
    text = yaml.safe_dump(
        _plain(value), default_flow_style=True, width=10**6, sort_keys=False
    ).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _summary(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def _canonical_paths() -> dict[type, str]:
    """Where each section model is documented: its shallowest path (`training`, not
    `margin_model.train`); other places refer to it."""
    found: dict[type, tuple[int, str]] = {}

    def walk(cls: type[BaseModel], path: str) -> None:
        for name, hint in _hints(cls).items():
            sub = _section_type(hint)
            if sub is not None:
                where = f"{path}.{name}" if path else name
                if sub not in found or where.count(".") < found[sub][0]:
                    found[sub] = (where.count("."), where)
                walk(sub, where)

    walk(PipelineConfig, "")
    return {cls: path for cls, (_, path) in found.items()}


def schema_markdown() -> str:
    """The configuration reference in Markdown: every key with its type, default and meaning."""
    canonical = _canonical_paths()
    out = [SCHEMA_INTRO.format(whole=", ".join(f"`{k}`" for k in WHOLE_MAPPINGS))]

    def table(cls: type[BaseModel], prefix: str) -> list[tuple[str, type, str]]:
        """Rows of `cls`'s plain keys; returns its section keys for the caller."""
        rows, sections = [], []
        hints = _hints(cls)
        for name, info in cls.model_fields.items():
            hint = hints[name]
            if _section_type(hint) is not None:
                sections.append((name, _section_type(hint), info.description or ""))
                continue
            rows.append(
                f"| `{prefix}{name}` | {_cell(_type_text(hint))} | {_cell(_default_text(info))} "
                f"| {_cell(info.description or '')} |"
            )
        if rows:
            out.extend(["| key | type | default | description |", "|---|---|---|---|", *rows, ""])
        return sections

    def section(cls: type[BaseModel], path: str, description: str, level: int) -> None:
        out.append(f"{'#' * level} `{path}`\n")
        description = description[:1].upper() + description[1:]
        home = canonical.get(cls, path)
        if home != path:
            same = "keys and defaults" if _same_defaults(path, home) else "keys"
            anchor = home.replace(".", "")
            out.append(f"{description}. The same {same} as [`{home}`](#{anchor}).\n")
            return
        out.append(f"{description}.\n")
        for name, sub, text in table(cls, path + "."):
            section(sub, f"{path}.{name}", text, level + 1)
        extra = _EXTRA_SECTIONS.get(path)
        if extra:
            extra(out, path, level + 1, table)

    out.append("## Top level\n")
    for name, sub, text in table(PipelineConfig, ""):
        section(sub, name, text, 2)
    return "\n".join(out).rstrip() + "\n"


def _same_defaults(path: str, home: str) -> bool:
    default = PipelineConfig(name="x")
    return _at(default, path) == _at(default, home)


def _at(cfg: BaseModel, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _sources_section(out: list[str], path: str, level: int, table) -> None:
    for cls in (BuiltinSource, NpzSource, TorchvisionSource):
        tag = cls.model_fields["type"].default
        out.append(f"{'#' * level} `{path}.sources[]` with `type: {tag}`\n")
        out.append(f"{_summary(cls)}\n")
        table(cls, f"{path}.sources[].")


def _space_section(out: list[str], path: str, level: int, table) -> None:
    out.append(f"{'#' * level} `{path}.space.<key>`\n")
    out.append(
        f"{_summary(SearchDim)} Keys: {', '.join(f'`{k}`' for k in SWEEPABLE)}; "
        f"{', '.join(f'`{k}`' for k in SWEEP_DISCRETE)} take grid or choice only. Every value "
        "is checked against the field it sets before Ray starts, a setting's too.\n"
    )
    out.append(
        "A `settings` dimension, e.g. `method: {settings: [{name: rand, pruning.strategy: "
        "random}, {pruning.strategy: puma, pruning.eps_rule: margin_cap}]}`: its settings may "
        f"set {', '.join(f'`{k}`' for k in SETTING_KEYS)} (not the seeds), a key no other "
        "dimension sweeps; the settings must differ, and so must their names.\n"
    )
    table(SearchDim, f"{path}.space.<key>.")


_EXTRA_SECTIONS = {"data": _sources_section, "sweep": _space_section}
