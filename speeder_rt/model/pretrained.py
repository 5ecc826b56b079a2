"""Model directories: how a trained model is stored, in the shape transformers users know (``save_pretrained`` /
``from_pretrained``). No file in one is a pickle: the package never unpickles anything it loads.

    DIR/config.json          format_version, model_kind, package_version, model_config (SpeederConfig or
                             TextBaselineConfig), lora ("kept" | "merged" | null), item_table_recipe and the
                             run_config it was trained with (data recipe with absolute paths), or null
    DIR/model.safetensors    the state dict, less what is restored from the item table (Speeder's
                             ``features_<m>`` / ``available`` buffers) and less tied aliases (a tied LM head)
    DIR/items/               the ItemTable the model was trained with (``ItemTable.save``)
    DIR/backbone/            the LM's transformers config.json and, when it has one, its tokenizer's files
    DIR/resume.json          (a trainer's last/ only; ``speeder_rt.train.resume``) progress, scheduler state,
                             optimizer param groups and non-tensor optimizer state, facts (last validation
                             metrics, intra-op threads)
    DIR/resume.safetensors   (last/ only) optimizer state tensors ``optimizer/<param>/<key>``, RNG ``rng/<device>``

Loading reads only DIR: the backbone is built from backbone/config.json (no base weights, no network), its
weights come from model.safetensors, the features from items/. Every file is checked (``utils.readers``):
a wrong dtype, a missing or extra tensor, a truncated body or a header that lies about sizes is an error
naming the file and the tensor.

A trainer's last/ adds its resume state (``speeder_rt.train.resume``) through ``save_model_dir``'s ``extra_files``.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from speeder_rt.data.item_table import ItemTable
from speeder_rt.utils.io import atomic_dir, read_json_fields, write_json
from speeder_rt.utils.readers import check_finite, read_safetensors

FORMAT_VERSION = 1
CONFIG, WEIGHTS, ITEMS, BACKBONE = "config.json", "model.safetensors", "items", "backbone"
LAYOUT = "a model directory (config.json, model.safetensors, items/)"


class PretrainedModel:
    """``save_pretrained`` / ``from_pretrained`` for a model class with ``model_kind``, ``config_class``, and on
    its instances ``cfg``, ``item_table``, ``tokenizer`` (None, a WordTokenizer or a transformers tokenizer) and
    ``lm_config`` (the backbone's transformers config); its constructor takes ``(cfg, table, backbone=(lm,
    tokenizer))``."""

    model_kind: str
    config_class: type

    def save_pretrained(self, path: str | Path, run_config: dict[str, Any] | None = None,
                        merge_lora: bool = False) -> Path:
        """Write this model as a model directory (see the module docstring), atomically."""
        return save_model_dir(path, self, run_config=run_config, merge_lora=merge_lora)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Any:
        """The model of a directory written by ``save_pretrained`` (or a trainer's best/ or last/), on the CPU in
        eval mode; reads only that directory."""
        return load_model_dir(path, cls)


# -- errors a caller sees before anything is read -------------------------------------------------------------
def check_model_dir(path: str | Path) -> Path:
    """``path`` as a model directory, or a ValueError: not found, a (pickled) file, no config.json."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: not found (expected {LAYOUT})")
    if path.is_file():
        raise ValueError(file_refusal(path))
    if not (path / CONFIG).is_file():
        raise ValueError(f"{path}: not a model directory (no {CONFIG}; expected {LAYOUT})")
    return path


def file_refusal(path: Path) -> str:
    """The message for a file given where a model directory belongs; a pickle is named as one (its first bytes
    are the only thing read) and the conversion command is given."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return (f"{path}: a pickled checkpoint (torch.save / pickle). speeder_rt never unpickles a file: unpickling "
                f"runs whatever code the file carries. Trained models are {LAYOUT}, e.g. runs/NAME/speeder/best. To "
                f"convert a checkpoint of an earlier speeder_rt that you trust: python -m speeder_rt.convert {path} "
                "NEW_DIR --trust-pickle")
    return f"{path}: a file, not {LAYOUT}"


# -- config.json ----------------------------------------------------------------------------------------------
def read_model_config(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """config.json of a model directory, checked (format version, fields; ``kind``: the model kind expected, e.g. a
    class's ``model_kind``; which kinds exist is ``speeder_rt.train.kinds``' registry)."""
    path = check_model_dir(path)
    file = path / CONFIG
    config = read_json_fields(file, ("model_kind", "model_config"), FORMAT_VERSION)
    if kind is not None and config["model_kind"] != kind:
        raise ValueError(f"{path}: a {config['model_kind']!r} model, expected {kind!r}")
    if not isinstance(config["model_config"], dict):
        raise ValueError(f"{file}: field 'model_config' must be an object")
    return config


def model_config(cls: Any, config: dict[str, Any], path: Path) -> Any:
    """The config dataclass of the model class ``cls`` from config.json's model_config."""
    try:
        return cls.config_class(**config["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / CONFIG}: model_config: {e}") from None


# -- save -----------------------------------------------------------------------------------------------------
def save_model_dir(path: str | Path, model: Any, *, state_dict: dict[str, torch.Tensor] | None = None,
                   run_config: dict[str, Any] | None = None, extra_files: Callable[[Path], None] | None = None,
                   merge_lora: bool = False) -> Path:
    """Write ``model`` as a model directory at ``path`` atomically (temp dir + rename; an existing one is replaced).

    ``state_dict``: the weights to write instead of ``model.state_dict()`` (e.g. a distributed run's gathered
    full state, on rank 0). ``run_config``: the run's config as JSON (the data recipe eval rebuilds the split
    from). ``extra_files``: writes more files into the directory before it is committed (a trainer's resume state,
    ``speeder_rt.train.resume``). ``merge_lora``: fold LoRA adapters into the base weights;
    the directory then holds a plain model (``model_config.backbone.lora`` null, ``lora`` "merged").
    """
    lora = getattr(model.cfg.backbone, "lora", None)
    if merge_lora and lora is not None:
        if state_dict is not None:
            raise ValueError("merge_lora folds the model's own adapters; it cannot be combined with state_dict")
        model = _merged_copy(model)
    state = model.state_dict() if state_dict is None else state_dict
    _check_table_buffers(model, state)
    skip = skipped_keys(model)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in state.items() if n not in skip}
    table = model.item_table
    config = {
        "format_version": FORMAT_VERSION,
        "model_kind": model.model_kind,
        "package_version": metadata.version("speeder_rt"),
        "model_config": model.cfg.to_dict(),
        "lora": None if lora is None else ("merged" if merge_lora else "kept"),
        "item_table_recipe": table.meta.get("recipe"),
        "run_config": run_config,
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        table.save(tmp / ITEMS)
        model.lm_config.save_pretrained(tmp / BACKBONE)
        if hasattr(model.tokenizer, "save_pretrained"):  # a transformers tokenizer (a WordTokenizer is rebuilt)
            model.tokenizer.save_pretrained(tmp / BACKBONE)
        if extra_files is not None:
            extra_files(tmp)
        write_json(tmp / CONFIG, config)
    return Path(path)


def _merged_copy(model: Any) -> Any:
    """A copy of ``model`` with its peft-wrapped child's adapters folded in (peft's merge_and_unload)."""
    from peft import PeftModel

    clone = copy.deepcopy(model)
    for name, child in list(clone.named_children()):
        if isinstance(child, PeftModel):
            setattr(clone, name, child.merge_and_unload())
    clone.cfg = dataclasses.replace(clone.cfg, backbone=dataclasses.replace(clone.cfg.backbone, lora=None))
    return clone


def _check_table_buffers(model: Any, state: dict[str, torch.Tensor]) -> None:
    """The buffers restored from the item table on load must equal it now, or the saved model would differ."""
    for name, want in getattr(model, "item_table_buffers", dict)().items():
        have = state[name].detach().cpu()
        if not torch.equal(have, want.to(have.dtype)):
            raise ValueError(f"buffer {name!r} differs from the model's item table: a model directory restores it "
                             "from the table, so it would not load as it is now")


def skipped_keys(model: nn.Module) -> set[str]:
    """State-dict keys model.safetensors leaves out: buffers restored from the item table, and every name of a
    tied parameter but its first."""
    skip = set(getattr(model, "item_table_buffers", dict)())
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            skip.add(name)
        seen.add(id(param))
    return skip


# -- load -----------------------------------------------------------------------------------------------------
def load_model_dir(path: str | Path, cls: Any) -> Any:
    """The model of a model directory written for the model class ``cls``, on the CPU in eval mode (the caller's RNG
    state is left as it was)."""
    config = read_model_config(path, cls.model_kind)
    path = Path(path)
    cfg = model_config(cls, config, path)
    table = ItemTable.load(path / ITEMS)
    with torch.random.fork_rng(devices=[]):
        model = cls(cfg, table, backbone=_backbone_from_files(path / BACKBONE, cfg.backbone.torch_dtype))
    load_weights(model, path)
    return model.eval()


def _backbone_from_files(directory: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(causal LM with the architecture of directory/config.json, randomly initialised; its tokenizer or None)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    file = directory / "config.json"
    if not file.is_file():
        raise ValueError(f"{file}: missing (the backbone's transformers config)")
    try:
        hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{file}: not a transformers model config ({e})") from None
    lm = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return lm, tokenizer


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load DIR/model.safetensors into ``model`` (built from the same config): every tensor it should hold,
    with the model's dtypes and shapes, every value finite, and nothing else."""
    file = Path(path) / WEIGHTS
    skip = skipped_keys(model)
    expected = {n: (t.dtype, tuple(t.shape)) for n, t in model.state_dict().items() if n not in skip}
    tensors = read_safetensors(file, expected)
    check_finite(file, tensors)  # a diverged run's NaN weights would serve NaN scores
    model.load_state_dict(tensors, strict=False)  # the check above leaves exactly ``skip`` missing
