"""``python -m train export``: turn an adapter into a PEFT adapter, a LoRA adapter, or a merged model.

The adapter may be a vera_jax checkpoint (``vera_adapter.json``, e.g. a run's ``adapter/``) or a PEFT
directory (``adapter_config.json``). Formats: ``peft`` (VeRA; loads with ``peft.PeftModel.from_pretrained``),
``lora`` (the same deltas as a standard PEFT LoRA adapter, for engines that serve LoRA; ``--rank k`` writes
each delta's best rank-k approximation and prints its relative error), and plain Hugging Face model
directories with the deltas merged in, loadable with transformers alone: ``hf`` (an NNX classifier's, by
transformers' PyTorch names: ``AutoModelForSequenceClassification.from_pretrained``, transformers 4 or 5)
and, for linen models, ``flax`` (``flax_model.msgpack``) or ``safetensors`` (Flax names; transformers<5). The
output directory is written whole beside its place and swapped in; a directory that holds anything
but an earlier export of the same kind is refused, or with ``--overwrite`` moved aside, never deleted.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from train.options import BACKENDS, positive_int
from vera_jax import atomic, checkpoint
from vera_jax import export as merged_export
from vera_jax import lora as vera_lora
from vera_jax import peft as vera_peft

__all__ = ["add_arguments", "command", "export", "FORMATS", "ExportError"]

FORMATS = ("peft", "lora", "hf", "flax", "safetensors")
KINDS = {"peft": vera_peft.KIND, "lora": vera_lora.KIND, "hf": merged_export.KIND, "flax": merged_export.KIND,
         "safetensors": merged_export.KIND}
# The merged formats each backend writes.
MERGED = {"linen": ("flax", "safetensors"), "nnx": ("hf",), "nnx-listed": ("hf",)}
TASKS = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


class ExportError(ValueError):
    """The export cannot run as asked."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="a vera_jax adapter directory or a PEFT adapter directory")
    parser.add_argument("--output", required=True, help="directory to write (new, empty, or an earlier export)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write --output even when it holds other files: they are moved aside to "
                             "a new OUTPUT.replaced-TIME-PID-RANDOM once the export is complete, never deleted")
    parser.add_argument("--format", choices=FORMATS, default="peft")
    parser.add_argument("--model", default="default",
                        help="the base: 'default' (MiniLM), 'smollm2', a hub id or a local directory")
    parser.add_argument("--task", choices=sorted(TASKS), default="sequence-classification")
    parser.add_argument("--num-labels", type=positive_int, default=2, help="outputs of the classification head")
    parser.add_argument("--rank", type=positive_int, default=None,
                        help="--format lora: the LoRA rank k (default: the adapter's r, exact)")
    parser.add_argument("--backend", choices=BACKENDS, default="nnx",
                        help="the implementation the adapter was trained on (as the training command's flag)")


def command(args: argparse.Namespace) -> None:
    print(f"wrote {export(args)}")


def _load_model(name: str, task: str, num_labels: int, backend: str):
    from train.models.load import load_causal_lm, load_classifier

    if task == "sequence-classification":
        return load_classifier(name, num_labels, backend=backend)
    return load_causal_lm(name, backend=backend)


def export(args: argparse.Namespace) -> Path:
    """Write the export ``args`` describe; returns its directory.

    Raises:
      ExportError: no adapter at --adapter, an --output that holds other files, or an adapter that does
        not fit the model or the format.
    """
    adapter_dir = Path(args.adapter)
    if (adapter_dir / checkpoint.METADATA_FILE).is_file():
        read = checkpoint.restore
    elif (adapter_dir / vera_peft.CONFIG_FILE).is_file():
        read = vera_peft.load_adapter
    else:
        raise ExportError(f"{adapter_dir} holds neither {checkpoint.METADATA_FILE} (vera_jax) nor "
                          f"{vera_peft.CONFIG_FILE} (PEFT); point --adapter to an adapter directory.")
    if args.rank is not None and args.format != "lora":
        raise ExportError(f"--rank {args.rank} applies to --format lora only.")
    if args.format not in ("peft", "lora", *MERGED[args.backend]):
        raise ExportError(f"--format {args.format} is not a merged format of --backend {args.backend}: "
                          f"{' or '.join(MERGED[args.backend])} (hf: a PyTorch model of an NNX classifier; flax, "
                          "safetensors: a transformers Flax model of a linen one).")
    _check_output(args)
    try:
        atomic.check_replaceable(args.output, KINDS[args.format], args.overwrite)  # before the model loads
        model, tokenizer = _load_model(args.model, args.task, args.num_labels, args.backend)
        stacks = model.stacks
        if read is vera_peft.load_adapter:
            read = functools.partial(vera_peft.load_adapter, stacks=stacks, kernel_axes=model.kernel_axes)
        try:
            adapter = read(adapter_dir, model.params)
        except ValueError as err:
            raise ExportError(f"Cannot load the adapter in {adapter_dir} onto --model {args.model!r}: {err}") from None
        if args.format == "peft":
            try:
                return vera_peft.save_adapter(args.output, adapter, model.params, task_type=TASKS[args.task],
                                              base_model_name_or_path=model.base_model_name, stacks=stacks,
                                              overwrite=args.overwrite)
            except ValueError as err:
                raise ExportError(f"--format peft cannot hold this adapter: {err}") from None
        if args.format == "lora":
            return _lora(args, adapter, model)
        try:
            return model.save_merged(args.output, adapter, format=args.format, tokenizer=tokenizer,
                                     overwrite=args.overwrite)
        except ValueError as err:
            raise ExportError(f"--format {args.format}: {err}") from None
    except FileExistsError as err:
        raise ExportError(f"--output {args.output}: {err}") from None
    except atomic.WriteError as err:  # no space, a read-only target: nothing was replaced
        raise ExportError(f"--output {args.output}: {err.strerror}") from None


def _check_output(args: argparse.Namespace) -> None:
    """Refuse an --output that is --adapter's or --model's own directory, which the export would replace."""
    output = Path(args.output).resolve()
    for flag, source in (("--adapter", args.adapter), ("--model", args.model)):
        if Path(source).exists() and Path(source).resolve() == output:
            raise ExportError(f"--output {args.output} is the directory of {flag} {source}; the export would replace "
                              "what it reads. Choose another --output.")


def _lora(args: argparse.Namespace, adapter, model) -> Path:
    """The LoRA export, with each layer's relative error printed when --rank truncates."""
    try:
        out, factors = vera_lora.save_lora(args.output, adapter, model.params, rank=args.rank, stacks=model.stacks,
                                           task_type=TASKS[args.task], base_model_name_or_path=model.base_model_name,
                                           overwrite=args.overwrite)
    except ValueError as err:
        raise ExportError(f"--format lora cannot hold this adapter: {err}") from None
    if args.rank is not None:
        for factor in factors:
            print(f"{factor.name}  rank {factor.lora_a.shape[0]}  relative error {factor.relative_error:.4f}")
    return out
