"""``python -m train export``: turn an adapter into a PEFT adapter, or into a merged Flax model.

The adapter may be a vera_jax checkpoint (``vera_adapter.json``, e.g. a run's ``adapter/``) or a PEFT
directory (``adapter_config.json``). Formats: ``peft`` (loads with ``peft.PeftModel.from_pretrained``),
``flax`` (``flax_model.msgpack``) or ``safetensors`` (``model.safetensors``): the last two are plain
Hugging Face model directories with the deltas merged in, loadable with transformers alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train.model import hub_id
from vera_jax import checkpoint
from vera_jax import peft as vera_peft
from vera_jax.export import save_merged

__all__ = ["export", "parse_args", "FORMATS", "ExportError"]

FORMATS = ("peft", "flax", "safetensors")
TASKS = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


class ExportError(ValueError):
    """The export cannot run as asked."""


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a vera_jax adapter directory or a PEFT adapter directory")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--format", choices=FORMATS, default="peft")
    parser.add_argument("--model", default="default", help="the base: 'default' (MiniLM), 'smollm2', a hub id or a local directory")
    parser.add_argument("--task", choices=sorted(TASKS), default="sequence-classification")
    parser.add_argument("--num-labels", type=int, default=2, help="outputs of the classification head")
    return parser.parse_args(argv)


def _load_model(name: str, task: str, num_labels: int):
    from train.model import load_causal_lm, load_classifier

    return load_classifier(name, num_labels) if task == "sequence-classification" else load_causal_lm(name)


def export(args: argparse.Namespace) -> Path:
    adapter = Path(args.adapter)
    if (adapter / checkpoint.METADATA_FILE).is_file():
        read = checkpoint.restore
    elif (adapter / vera_peft.CONFIG_FILE).is_file():
        read = vera_peft.load_adapter
    else:
        raise ExportError(f"{adapter} holds neither {checkpoint.METADATA_FILE} (vera_jax) nor "
                          f"{vera_peft.CONFIG_FILE} (PEFT); point --adapter to an adapter directory.")
    model, tokenizer = _load_model(args.model, args.task, args.num_labels)
    trainable, projections = read(adapter, model.params)
    if args.format == "peft":
        return vera_peft.save_adapter(args.output, projections.config, trainable, projections, params=model.params,
                                      task_type=TASKS[args.task],
                                      base_model_name_or_path=hub_id(args.model))
    out = save_merged(model, model.params, trainable, projections, args.output, safetensors=args.format == "safetensors")
    tokenizer.save_pretrained(out)
    return out
