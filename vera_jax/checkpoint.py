"""Adapter checkpoints with Orbax: the trainable tree, the projection key and its recipe; never the base.

A checkpoint directory holds ``trainable/`` (an Orbax checkpoint of the trainable tree, plus A and B
when ``config.save_projection`` asks or when they cannot be drawn again from the key, as those of a
PEFT file) and ``vera_adapter.json`` (the config, the key's two words, the
recipe r / in_max / out_max / dtype / generator, a sha256 fingerprint of A and B, the shape, dtype and
sha256 of every stored tensor, and the base's adapted kernel shapes with a fingerprint of a sample of
their values). Restoring rebuilds A and B from the key and refuses when the fingerprint differs, checks
every tensor against its checksum (a damaged file is an `AdapterFileError` naming it), refuses a base
whose adapted kernels have other shapes and warns when their values differ. The directory is written
beside its place and swapped in (`vera_jax.atomic`), so a crash never leaves half an adapter or none.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from vera_jax.adapter import STORED, Adapter, layer_vectors
from vera_jax.atomic import discard, publish, read_stable, recover, stage, target_path, write_error
from vera_jax.checksums import canonical_json, canonical_json_sha256, tensor_records, tensor_sha256
from vera_jax.config import VeraConfig
from vera_jax.errors import AdapterFileError
from vera_jax.host import to_host
from vera_jax.layers import AdaptedLayer, find_layers
from vera_jax.paths import flatten
from vera_jax.projections import GENERATOR, Projections, init_projections
from vera_jax.vectors import init_trainable

__all__ = ["fingerprint", "projection_recipe", "projections_from_recipe", "base_record", "save", "restore",
           "METADATA_FILE", "KIND", "closed_loop_errors_dropped"]

METADATA_FILE = "vera_adapter.json"
KIND = "checkpoint"  # the kind in the vera_jax manifest of a checkpoint directory
TREE_DIR = "trainable"
METADATA_CHECKSUM = "sha256"  # of the rest of vera_adapter.json, as `canonical_json_sha256` writes it
BASE_SAMPLE = 64  # values per adapted kernel in the base's fingerprint, evenly spaced over its flat index
SETTLE_SECONDS = 0.05  # how long a failed read lets tensorstore's threads end the reads Orbax left running


def fingerprint(projections: Projections) -> str:
    """sha256 of A's then B's bytes (row-major, as stored)."""
    return tensor_sha256(*to_host((projections.A, projections.B)))


def projection_recipe(adapter: Adapter) -> dict:
    """What rebuilds A and B exactly: the generator, the key's words, shapes, dtype and a fingerprint."""
    projections = adapter.projections
    r, in_max = projections.A.shape[-2:]
    return {
        "generator": adapter.generator,
        "key": [int(w) for w in np.asarray(jax.random.key_data(adapter.key)).reshape(-1)],
        "r": int(r),
        "in_max": int(in_max),
        "out_max": int(projections.B.shape[-2]),
        "dtype": str(projections.A.dtype),
        "fingerprint": fingerprint(projections),
    }


def projections_from_recipe(params: Mapping, recipe: Mapping, config: VeraConfig, *,
                            layers: tuple[AdaptedLayer, ...] | None = None) -> Projections:
    """Rebuild A and B from a recipe and check them against its fingerprint; ``layers``:
    ``find_layers(params, config)``, where the caller has it already.

    Raises:
      ValueError: the recipe names another generator, or the rebuilt shapes or bytes differ (the params
        or config are not the ones the adapter was trained with).
    """
    if recipe.get("generator") != GENERATOR:
        raise ValueError(f"Projections were drawn by generator {recipe.get('generator')!r}; this version "
                         f"rebuilds {GENERATOR!r} only. Save the adapter with save_projection=True to carry A and B.")
    projections = init_projections(params, np.asarray(recipe["key"], np.uint32), config, layers=layers)
    (r, in_max), out_max = projections.A.shape[-2:], projections.B.shape[-2]
    got = {"r": r, "in_max": in_max, "out_max": out_max, "dtype": str(projections.A.dtype)}
    expected = {name: recipe[name] for name in got}
    if got != expected:
        raise ValueError(f"The adapter was trained with projections {expected}, but these params and config give "
                         f"{got}: load it onto the model and config it was trained with.")
    if fingerprint(projections) != recipe["fingerprint"]:
        raise ValueError("The rebuilt A and B differ from the ones the adapter was trained with (fingerprint "
                         "mismatch). Use the same key and config, or an adapter saved with save_projection=True.")
    return projections


def _kernel_sample(kernel: jax.Array) -> np.ndarray:
    """``BASE_SAMPLE`` values of ``kernel`` evenly spaced over its flat index, as float32."""
    indices = np.linspace(0, kernel.size - 1, BASE_SAMPLE).astype(np.int64)
    take = lambda k: jnp.ravel(k)[indices].astype(jnp.float32)  # noqa: E731
    if isinstance(kernel, jax.Array) and not kernel.is_fully_addressable:
        replicated = NamedSharding(kernel.sharding.mesh, PartitionSpec())
        return np.asarray(jax.jit(take, out_shardings=replicated)(kernel))
    return np.asarray(take(kernel))


def base_record(params: Mapping, layers: tuple[AdaptedLayer, ...]) -> dict:
    """The adapted kernels' shapes and a sha256 of a sample of their values: what tells this base from another.

    Args:
      layers: the adapted layers of ``params``, ``find_layers(params, config)``.
    """
    flat = flatten(params)
    samples = [_kernel_sample(flat[layer.kernel_path]) for layer in layers]
    return {"kernels": {layer.path: list(layer.kernel_shape) for layer in layers},
            "sample_sha256": tensor_sha256(*samples)}


def _stores_projections(adapter: Adapter) -> bool:
    """A and B go into the checkpoint when asked, and always when they cannot be drawn again from the key."""
    return adapter.config.save_projection or not adapter.redrawable


def save(directory: str | os.PathLike, adapter: Adapter, params: Mapping | None = None, *,
         overwrite: bool = False) -> Path:
    """Write ``adapter`` as a checkpoint in ``directory``, replacing an older adapter only once the new one is whole.

    ``params``, the base the adapter was trained on, is not saved: its adapted kernels' shapes and a fingerprint
    of their values are, so that `restore` can tell another base (pass it; without it that check is skipped).
    In a multi-process run every process calls it (Orbax writes collectively); process 0 does the renames.

    Raises:
      ValueError: the adapter does not fit ``params`` (another model's params: nothing is written).
      FileExistsError: ``directory`` holds files that are not a vera_jax adapter (nothing is written); with
        ``overwrite`` they are moved aside to a new ``NAME.replaced-TIME-PID-RANDOM`` once the new copy is in place.
      WriteError: the file system refused the write (no space, read-only); the old copy is whole.
    """
    directory = target_path(directory)
    layers = None if params is None else _check_fits(adapter, params)
    tree = _stored_tree(adapter)
    metadata = {"config": adapter.config.to_dict(), "projection": projection_recipe(adapter),
                "tensors": tensor_records(tree)}
    if layers is not None:
        metadata["base"] = base_record(params, layers)
    metadata[METADATA_CHECKSUM] = canonical_json_sha256(metadata)
    primary = jax.process_index() == 0
    staging = _shared_staging(directory, overwrite)
    try:
        try:
            with _tree_writer() as checkpointer:
                checkpointer.save(staging / TREE_DIR, args=ocp.args.StandardSave(tree))
            if primary:
                (staging / METADATA_FILE).write_text(canonical_json(metadata))
        except OSError as err:  # no space, no permission: nothing was swapped yet
            raise write_error(directory, err) from None
        if primary:
            publish(staging, directory, KIND)
    finally:
        if primary:
            discard(staging, KIND)
    multihost_utils.sync_global_devices(f"vera_jax.checkpoint.saved:{directory}")
    return directory


def _shared_staging(directory: Path, overwrite: bool) -> Path:
    """Process 0's new staging directory for ``directory``, its path told to every process."""
    staging = stage(directory, KIND, overwrite, format="orbax") if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        name = np.zeros(1024, np.uint8)
        if staging is not None:
            encoded = np.frombuffer(os.fsencode(staging.name), np.uint8)
            name[: encoded.size] = encoded
        name = np.asarray(multihost_utils.broadcast_one_to_all(name), np.uint8)
        staging = directory.parent / os.fsdecode(name.tobytes().rstrip(b"\0"))
    return staging


def _check_fits(adapter: Adapter, params: Mapping) -> tuple[AdaptedLayer, ...]:
    """``adapter``'s layers, or a ValueError unless they are kernels of ``params`` its vectors and projections fit."""
    try:
        return tuple(item.layer for item in layer_vectors(params, adapter))
    except ValueError as err:
        raise ValueError(f"Cannot save this adapter with these params: it does not fit them ({str(err).rstrip('.')}). "
                         "Pass the params of the model the adapter was trained on.") from None


def _tree_writer() -> ocp.Checkpointer:
    """Orbax's synchronous standard checkpointer writing one file per tensor (no OCDBT), so the same adapter gives
    the same file names and sizes (OCDBT names its data files at random and packs them differently each time)."""
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False))


def _stored_tree(adapter: Adapter) -> dict:
    """What goes into the Orbax checkpoint: the trainable tree, and A and B when `_stores_projections`."""
    tree = {"trainable": adapter.trainable}
    if _stores_projections(adapter):
        tree["projections"] = {"A": adapter.projections.A, "B": adapter.projections.B}
    return tree


def _metadata(directory: Path) -> dict:
    """``vera_adapter.json``, its fields checked for type (a damaged file is an `AdapterFileError`)."""
    path = directory / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a vera_jax adapter checkpoint.")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
        checksum = metadata.pop(METADATA_CHECKSUM, None)  # files written before vera_jax checked them lack it
        if checksum is not None and checksum != canonical_json_sha256(metadata):
            raise AdapterFileError(f"{path} does not match its own checksum: it was edited or damaged. Re-save the "
                                   "adapter or use a backup.")
        config = VeraConfig.from_dict(metadata["config"])
        recipe = metadata["projection"]
        valid = (isinstance(recipe.get("generator", GENERATOR), str) and isinstance(recipe["fingerprint"], str)
                 and recipe["key"] and all(isinstance(w, int) and 0 <= w < 2**32 for w in recipe["key"])
                 and all(isinstance(recipe[n], int) for n in ("r", "in_max", "out_max"))
                 and isinstance(recipe["dtype"], str) and isinstance(metadata.get("tensors", {}), dict))
    except AdapterFileError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise AdapterFileError(f"{path} is damaged ({type(err).__name__}: {err}); re-save the adapter.") from None
    if not valid:
        raise AdapterFileError(f"{path} is damaged (its projection recipe has fields of the wrong type); "
                               "re-save the adapter.")
    return metadata | {"config": config}


def _check_base(directory: Path, recorded: dict, params: Mapping, layers: tuple[AdaptedLayer, ...]) -> None:
    """Refuse a base whose adapted kernels differ in shape from the recorded ones; warn when their values differ."""
    record = base_record(params, layers)
    if record["kernels"] != recorded.get("kernels"):
        recorded_kernels = recorded.get("kernels") or {}
        differing = sorted(p for p in set(record["kernels"]) | set(recorded_kernels)
                           if record["kernels"].get(p) != recorded_kernels.get(p))
        raise AdapterFileError(f"The adapter in {directory} was trained on a base whose adapted kernels differ from "
                               f"these params' at {differing[:4]}; load it onto the model it was trained with.")
    if record["sample_sha256"] != recorded.get("sample_sha256"):
        warnings.warn(f"The base's adapted kernels hold other values than those the adapter in {directory} was "
                      "trained on (another model of the same shapes, or a copy in another dtype); its results "
                      "may differ.", stacklevel=5)  # restore's caller, through _restore and read_stable


def restore(directory: str | os.PathLike, params: Mapping, *,
            sharding: jax.sharding.Sharding | None = None) -> Adapter:
    """Read the adapter checkpoint in ``directory`` for ``params``, every tensor checked against its checksum
    and A and B against their fingerprint.

    ``sharding`` places the restored leaves (default: the first device), whatever mesh wrote them.

    Raises:
      AdapterFileError: the directory is damaged (naming the file or tensor), or the adapter does not fit
        ``params``. Warns when the base's adapted kernels hold other values than the recorded base's.
    """
    directory = target_path(directory)  # Orbax reads relative paths as missing
    return read_stable(directory, functools.partial(_restore, directory, params, sharding))


def _restore(directory: Path, params: Mapping, sharding: jax.sharding.Sharding | None) -> Adapter:
    """`restore`'s one read of ``directory``."""
    recover(directory)  # an old copy a crash left beside its place
    metadata = _metadata(directory)
    config = metadata["config"]
    try:
        layers = find_layers(params, config)
    except ValueError as err:
        raise AdapterFileError(f"The adapter in {directory} does not fit these params ({err}); load it onto the "
                               "model it was trained with.") from None
    if "base" in metadata:  # adapters written before vera_jax recorded the base lack it
        _check_base(directory, metadata["base"], params, layers)
    generator = metadata["projection"].get("generator", GENERATOR)
    stored_projections = config.save_projection or generator != GENERATOR
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
        target = {"trainable": jax.eval_shape(lambda: init_trainable(params, config, layers=layers))}
        if stored_projections:
            key = np.asarray(metadata["projection"]["key"], np.uint32)
            shapes = jax.eval_shape(lambda: init_projections(params, key, config, layers=layers))
            target["projections"] = {"A": shapes.A, "B": shapes.B}
    except ValueError as err:
        raise AdapterFileError(f"The adapter in {directory} does not fit these params ({err}); load it onto the "
                               "model it was trained with.") from None
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target)
    wanted = {jax.tree_util.keystr(k): list(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(target)}
    records = metadata.get("tensors")
    if records is not None:
        recorded = {name: record.get("shape") if isinstance(record, dict) else None for name, record in records.items()}
        if recorded != wanted:
            diff = sorted(n for n in set(recorded) | set(wanted) if recorded.get(n) != wanted.get(n))[:6]
            raise AdapterFileError(f"The adapter in {directory} does not fit these params (differing leaves: {diff}); "
                                   "load it onto the model it was trained with.")
        target = _as_recorded(directory, target, records)
    restored = _read_tree(directory, target, wanted, recorded=records is not None)
    if records is not None:
        for name, record in tensor_records(restored).items():
            if record != records[name]:
                raise AdapterFileError(f"{directory / TREE_DIR}: tensor {name} does not match its checksum in "
                                       f"{METADATA_FILE}; the adapter is damaged. Re-save it or use a backup.")
    if stored_projections:
        projections = Projections(A=restored["projections"]["A"], B=restored["projections"]["B"],
                                  layers=shapes.layers)
        if fingerprint(projections) != metadata["projection"]["fingerprint"]:
            raise AdapterFileError(f"A and B stored in {directory} do not match their fingerprint; the adapter is "
                                   "damaged.")
    else:
        try:
            projections = projections_from_recipe(params, metadata["projection"], config, layers=layers)
        except ValueError as err:
            raise AdapterFileError(f"{directory / METADATA_FILE}: {err}") from None
    return Adapter(trainable=restored["trainable"], projections=projections, config=config,
                   generator=generator if generator == GENERATOR else STORED)


def _as_recorded(directory: Path, target: dict, records: dict) -> dict:
    """``target`` with every leaf in the dtype its record names: the adapter as saved, also onto a base in another
    dtype (a bfloat16 copy), whose own dtype would otherwise recast a head trained in full."""

    def leaf(path, value: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        name = jax.tree_util.keystr(path)
        try:
            dtype = jnp.dtype(records[name]["dtype"])
        except (TypeError, KeyError) as err:
            raise AdapterFileError(f"{directory / METADATA_FILE} is damaged (the dtype of {name}: "
                                   f"{type(err).__name__}); re-save the adapter.") from None
        return jax.ShapeDtypeStruct(value.shape, dtype, sharding=value.sharding)

    return jax.tree_util.tree_map_with_path(leaf, target)


def _read_tree(directory: Path, target: dict, wanted: dict, recorded: bool) -> dict:
    """The Orbax tree in ``directory``, read as ``target``; a damaged or unreadable tree is an `AdapterFileError`.

    ``recorded``: ``wanted`` matched the shapes ``vera_adapter.json`` records, so a tree of other shapes is damaged.
    """
    try:
        # a damaged tree's reads can end after Orbax closed its loop
        with closed_loop_errors_dropped(), ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(directory / TREE_DIR)
            stored_tree = getattr(stored, "item_metadata", stored)
            stored_shapes = {jax.tree_util.keystr(k): list(v.shape)
                             for k, v in jax.tree_util.tree_leaves_with_path(stored_tree)}
            if stored_shapes != wanted:
                diff = sorted(n for n in set(stored_shapes) | set(wanted) if stored_shapes.get(n) != wanted.get(n))
                if recorded:
                    raise AdapterFileError(f"{directory / TREE_DIR} holds leaves of other shapes than {METADATA_FILE} "
                                           f"records ({diff[:6]}); the adapter is damaged. Re-save it or use a backup.")
                raise AdapterFileError(f"The adapter in {directory} does not fit these params (differing leaves: "
                                       f"{diff[:6]}); load it onto the model it was trained with.")
            return checkpointer.restore(directory / TREE_DIR, target)
    except AdapterFileError:
        raise
    except Exception as err:  # Orbax and TensorStore raise many types for damaged files
        raise AdapterFileError(f"{directory / TREE_DIR} cannot be read ({type(err).__name__}: "
                               f"{str(err)[:300]}); the adapter is damaged. Re-save it or use a backup.") from None


@contextlib.contextmanager
def closed_loop_errors_dropped() -> Iterator[None]:
    """Within, drop the "Event loop is closed" errors that Python would print, one traceback each, when tensorstore's
    reads of a damaged checkpoint end after Orbax gave up on it and closed its event loop. Those reads end on
    tensorstore's threads once they get the GIL, also after the error: an error out of the scope first waits
    `SETTLE_SECONDS` for them, then the previous hook is back."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        time.sleep(SETTLE_SECONDS)
        raise
    finally:
        sys.unraisablehook = previous
