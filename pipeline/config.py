"""Typed, frozen job configuration: YAML file, then ``--set key=value`` overrides.

Unknown keys are rejected with the dotted key named, so a typo in a cluster config fails at
submission time instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from operators.errors import ConfigError
from operators.pages import parse_pages
from operators.settings import (
    DATA_ROOT,
    DetectConfig,
    OutputConfig,
    RasterizeConfig,
    RecognizeConfig,
    Frozen,
)

DEFAULT_CONFIG = DATA_ROOT / "configs" / "local.yaml"


def config_file(path: str | Path) -> Path:
    """A config file as given, else a bundled one by its name or its path in the repository: ``cluster-v100.yaml``
    and ``configs/cluster-v100.yaml`` work from any folder, an installed wheel's too."""
    given = Path(path)
    if not given.exists():
        for bundled in (DATA_ROOT / given, DATA_ROOT / "configs" / given):
            if bundled.is_file():
                return bundled
    return given


class RayConfig(Frozen):
    """Where the job runs. ``address: null`` starts a private local Ray instance."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1, description="local instance only")
    object_store_memory_mb: int | None = Field(default=None, ge=75, description="local instance only (Ray's least: 75)")


class JobConfig(Frozen):
    ray: RayConfig = RayConfig()
    rasterize: RasterizeConfig = RasterizeConfig()
    detect: DetectConfig = DetectConfig()
    recognize: RecognizeConfig = RecognizeConfig()
    output: OutputConfig = OutputConfig()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def describe_errors(error: ValidationError, overridden: Collection[str] = ()) -> str:
    """Each error on one line with its key, marked ``(--set)`` where the value came from an override."""
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        # the override set this key, a section above it, or a key below it (recognize.model.x=3; not a section's
        # own check, which one override below it need not have failed)
        # an unknown key is the override's own however high it is (--set recognise.model: 'recognise')
        below = "." in key or item["type"] == "extra_forbidden"
        given = " (--set)" if any(key == name or key.startswith(f"{name}.") or (below and name.startswith(f"{key}."))
                                  for name in overridden) else ""
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}{given}")
        elif item["type"] in ("tuple_type", "list_type"):
            lines.append(f"{key}{given}: {item['msg']} (write a list: [a, b])")
        else:  # pydantic says "Value error, " before a validator's own message
            lines.append(f"{key}{given}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _refuse_repeated_keys(loader: yaml.SafeLoader, node: yaml.Node, checked: set[int]) -> None:
    """Refuse a scalar key given twice in one mapping of the composed ``node`` tree, compared as built (``1`` and
    ``0x1``, ``yes`` and ``true`` are one key), before the document is built: a merge's keys (``<<: *defaults``)
    may be given again, which PyYAML's merging writes into the merged mappings. An anchored node is checked once."""
    if id(node) in checked:
        return
    checked.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, yaml.Node] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                built = loader.construct_object(key)
                if built in seen:
                    first = seen[built].start_mark.line + 1
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key.value!r} is given twice, first on line {first}", key.start_mark)
                seen[built] = key
            _refuse_repeated_keys(loader, key, checked)
            _refuse_repeated_keys(loader, value, checked)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(loader, item, checked)


def read_yaml(text: str, name: str) -> Any:
    """``text`` as YAML, safely (``yaml.safe_load``'s loader), refusing a key given twice in one mapping: PyYAML keeps
    the last one without a word, and a config that set ``recognize.model`` twice (one line meant to be taken out) had
    run with whichever came last. ``name`` is where the text is from, as errors give it (they had said "<unicode
    string>")."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:  # a character YAML does not take, found as the text is first read
        exc.name = name
        raise
    loader.name = name
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_repeated_keys(loader, node, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def add_config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """``--config``, ``--set`` and ``--pages``, as every command that runs the job's stages takes them
    (:func:`config_from_arguments`)."""
    parser.add_argument("--config", "-c", type=Path, help="YAML config (default: configs/local.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")
    parser.add_argument("--pages", metavar="RANGES",
                        help="1-based pages of every input, e.g. 1-3,7 or 5- (same as rasterize.pages)")


def config_from_arguments(args: argparse.Namespace, overrides: Sequence[str] = ()) -> JobConfig:
    """The config of :func:`add_config_arguments`' options, with the command's own ``overrides`` after ``--set``'s."""
    if args.pages is not None:
        try:
            parse_pages(args.pages)
        except ValueError as exc:  # named by the option given (it had been "rasterize.pages (--set)")
            raise ConfigError(f"--pages: {exc}") from None
    pages = [] if args.pages is None else [f"rasterize.pages={json.dumps(args.pages)}"]  # a YAML string, whatever it holds
    return load_config(args.config, [*args.overrides, *overrides, *pages])


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Load ``path`` (default: configs/local.yaml when present) and apply ``key=value`` overrides.

    Override values are parsed as YAML, so ``--set recognize.concurrency=[1,4]`` gives a tuple and
    ``--set ray.address=null`` gives None.
    """
    tree: dict[str, Any] = {}
    source = config_file(path) if path is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if source is not None:
        try:
            loaded = read_yaml(source.read_text(), str(source))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config {source}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {source} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {source} must be a mapping at the top level")
        # a section whose keys are all commented out reads as null: it holds nothing
        tree = {name: {} if section is None else section for name, section in (loaded or {}).items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = read_yaml(raw, f"--set {key.strip()}")
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {getattr(exc, 'problem', None) or exc}") from exc
        _set_dotted(tree, key.strip(), value)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as exc:
        # the file as given; the default by its name (its path had been that of Ray's copy of the working dir)
        where = f" in {path}" if path is not None else f" in the default configs/{source.name}" if source else ""
        overridden = {item.partition("=")[0].strip() for item in overrides}
        raise ConfigError(f"invalid configuration{where}{' and the command line' if overrides else ''}: "
                          f"{describe_errors(exc, overridden)}") from exc
