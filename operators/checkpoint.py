"""Where a model is loaded from, checked without loading anything: the driver calls this before it
starts Ray, so a mistyped model path fails in a second instead of after Ray's start-up. Imports no
torch or transformers."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies

from operators.errors import ModelLoadError
from operators.settings import BUNDLED_MODELS

#: Seconds to wait for the Hugging Face hub's host to answer before a model only it holds is refused.
HUB_CONNECT_TIMEOUT_S = 5.0
#: ``model_type`` of a TrOCR checkpoint's config.json (transformers' VisionEncoderDecoderConfig).
TROCR_MODEL_TYPE = "vision-encoder-decoder"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "sentencepiece.bpe.model")


def resolve_checkpoint(name_or_path: str) -> str:
    """Where to load ``name_or_path`` from: a bundled model's short name (``printed``,
    ``handwritten``), a local folder (checked complete first), else a hub id.

    A name that looks like a path (starts with / . ~, or has more than one /) and is no folder is an
    error here, rather than a confusing hub lookup.
    """
    if name_or_path in BUNDLED_MODELS and not BUNDLED_MODELS[name_or_path].is_dir():
        # a job submitted with --working-dir runs a copy of the code without models/ (docker/runtime-env.yaml)
        raise ModelLoadError(f"the bundled model {name_or_path!r} is missing: {BUNDLED_MODELS[name_or_path]}; where the "
                             "code is a copy without models/ (ray job submit --working-dir), set recognize.model to "
                             "the model's folder on storage every node reaches (docker/README.md)")
    local = _local(name_or_path)
    if local.exists():
        _check_local_folder(local)
        return str(local)
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model folder {name_or_path} does not exist (and it is no hub id)")
    if name_or_path.lower() in BUNDLED_MODELS:
        raise ModelLoadError(f"no model {name_or_path!r}: the bundled models are {', '.join(sorted(BUNDLED_MODELS))} "
                             f"(names are in lower case)")
    _check_hub_reachable(name_or_path)
    return name_or_path


def _check_hub_reachable(model_id: str) -> None:
    """Refuse at once a hub id whose files are not in the local Hugging Face cache when the hub's host cannot be
    reached (no network, as in many archives): transformers had retried for about 100 s, printing each retry, and
    then blamed the image processor. With HF_HUB_OFFLINE set, the cache is all there is."""
    from huggingface_hub import constants, try_to_load_from_cache

    endpoint = urlsplit(constants.ENDPOINT)
    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:  # transformers had blamed the image processor ("Can't load image processor for ...")
        raise ModelLoadError(f"model {model_id!r} is no bundled model ({', '.join(sorted(BUNDLED_MODELS))}) nor a local "
                             f"folder, and it is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), where "
                             f"HF_HUB_OFFLINE=1 looks for it alone: give the folder of a downloaded checkpoint")
    # behind a proxy (HTTPS_PROXY) the hub is reached through it, not directly: left to transformers
    if endpoint.scheme in getproxies():
        return
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                 timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ModelLoadError(
            f"model {model_id!r} is no bundled model ({', '.join(sorted(BUNDLED_MODELS))}) nor a local folder, it is "
            f"not in the local Hugging Face cache, and the hub ({constants.ENDPOINT}) cannot be reached to fetch it "
            f"({exc.strerror or exc}): give the folder of a downloaded checkpoint") from exc


def _local(name_or_path: str) -> Path:
    """Where the model would be on this machine: a bundled model's folder, else the name taken as a path."""
    return BUNDLED_MODELS.get(name_or_path, Path(name_or_path).expanduser())


def recorded_model(name_or_path: str) -> str:
    """How a documents row names the model that read it (checked by :func:`resolve_checkpoint` first): a bundled
    model by its short name (however it was given), a local folder by its absolute path, a hub id as it is."""
    source = _local(name_or_path)
    if not source.is_dir():
        return name_or_path
    for short_name, folder in BUNDLED_MODELS.items():
        if folder.is_dir() and source.samefile(folder):
            return short_name
    return str(source.resolve())


def model_named(model: str, model_sha256: str | None) -> str:
    """A recorded model as a person reads it: its name, and the start of its weights' hash where known."""
    return f"{model} (weights SHA-256 {model_sha256[:16]})" if model_sha256 else model


def weights_sha256(name_or_path: str) -> str | None:
    """The SHA-256 of a local model's weights (of its shards one after another, in name order, when it is sharded),
    which tells two versions of a model apart whatever their names; None for a hub id, whose weights each node
    fetches for itself. The model is checked by :func:`resolve_checkpoint` first."""
    source = _local(name_or_path)
    if not source.is_dir():
        return None
    weights = next(source / name for name in WEIGHT_FILES if (source / name).is_file())
    files = [weights]
    if weights.suffix == ".json":  # an index of shards
        try:
            shards = json.loads(weights.read_text(encoding="utf-8"))["weight_map"].values()
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"model folder {source}: its {weights.name} cannot be read ({exc})") from exc
        files = [source / shard for shard in sorted(set(shards))]
    digest = hashlib.sha256()
    for file in files:
        try:
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        except OSError as exc:
            raise ModelLoadError(f"model folder {source}: cannot read {file.name} ({exc.strerror})") from exc
    return digest.hexdigest()


def _check_local_folder(folder: Path) -> None:
    """Name every missing piece of a local checkpoint before transformers gives a vaguer error."""
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is a file, expected a checkpoint folder")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        missing.append("image processor (preprocessor_config.json or processor_config.json)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json, vocab.json or sentencepiece.bpe.model)")
    if missing:
        raise ModelLoadError(f"model folder {folder} is incomplete, missing: {', '.join(missing)}")
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"model folder {folder}: its config.json cannot be read ({exc})") from exc
    if model_type != TROCR_MODEL_TYPE:
        raise ModelLoadError(f"model folder {folder} holds a {model_type!r} model, not a TrOCR one "
                             f"(model_type {TROCR_MODEL_TYPE!r} in config.json)")
