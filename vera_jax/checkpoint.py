"""Adapter checkpoints with Orbax: the trainable tree, the projection key and its recipe; never the base.

A checkpoint directory holds ``trainable/`` (an Orbax checkpoint of the trainable tree, plus A and B
when ``config.save_projection`` asks or when they cannot be drawn again from the key, as those of a
PEFT file) and ``vera_adapter.json`` (the config, the key's two words, the
recipe r / in_max / out_max / dtype / generator, and a sha256 fingerprint of A and B). Restoring
rebuilds A and B from the key and refuses when the fingerprint differs. The directory is written
beside its place and swapped in (`vera_jax.atomic`), so a crash never leaves half an adapter or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vera_jax.adapter import STORED, Adapter
from vera_jax.atomic import publish, recover, stage, staging_path
from vera_jax.config import VeraConfig
from vera_jax.projections import GENERATOR, Projections, init_projections
from vera_jax.vectors import init_trainable

__all__ = ["fingerprint", "projection_recipe", "projections_from_recipe", "save", "restore", "METADATA_FILE"]

METADATA_FILE = "vera_adapter.json"
TREE_DIR = "trainable"


def fingerprint(projections: Projections) -> str:
    """sha256 of A's then B's bytes (row-major, as stored)."""
    digest = hashlib.sha256()
    for matrix in (projections.A, projections.B):
        digest.update(np.ascontiguousarray(jax.device_get(matrix)).tobytes())
    return digest.hexdigest()


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


def projections_from_recipe(params: Mapping, recipe: Mapping, config: VeraConfig) -> Projections:
    """Rebuild A and B from a recipe and check them against its fingerprint.

    Raises:
      ValueError: the recipe names another generator, or the rebuilt shapes or bytes differ (the params
        or config are not the ones the adapter was trained with).
    """
    if recipe.get("generator") != GENERATOR:
        raise ValueError(f"Projections were drawn by generator {recipe.get('generator')!r}; this version "
                         f"rebuilds {GENERATOR!r} only. Save the adapter with save_projection=True to carry A and B.")
    projections = init_projections(params, np.asarray(recipe["key"], np.uint32), config)
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


def _stores_projections(adapter: Adapter) -> bool:
    """A and B go into the checkpoint when asked, and always when they cannot be drawn again from the key."""
    return adapter.config.save_projection or not adapter.redrawable


def save(directory: str | os.PathLike, adapter: Adapter) -> Path:
    """Write ``adapter`` as a checkpoint in ``directory``, replacing an older adapter only once the new one is whole.

    In a multi-process run every process calls it (Orbax writes collectively); process 0 does the renames.

    Raises:
      FileExistsError: ``directory`` holds files that are not a vera_jax adapter (nothing is written).
    """
    directory = Path(directory).absolute()
    tree = {"trainable": adapter.trainable}
    if _stores_projections(adapter):
        tree["projections"] = {"A": adapter.projections.A, "B": adapter.projections.B}
    metadata = {"config": adapter.config.to_dict(), "projection": projection_recipe(adapter)}
    primary = jax.process_index() == 0
    staging = stage(directory, METADATA_FILE) if primary else staging_path(directory)
    multihost_utils.sync_global_devices(f"vera_jax.checkpoint.save:{staging}")
    try:
        with ocp.StandardCheckpointer() as checkpointer:  # waits for the asynchronous write to finish
            checkpointer.save(staging / TREE_DIR, tree)
        if primary:
            (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
            publish(staging, directory)
    finally:
        if primary:
            shutil.rmtree(staging, ignore_errors=True)
    multihost_utils.sync_global_devices(f"vera_jax.checkpoint.saved:{directory}")
    return directory


def _metadata(directory: Path) -> dict:
    path = directory / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a vera_jax adapter checkpoint.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the adapter is damaged.") from None


def restore(directory: str | os.PathLike, params: Mapping, *,
            sharding: jax.sharding.Sharding | None = None) -> Adapter:
    """Read the adapter checkpoint in ``directory`` for ``params``, A and B checked against their fingerprint.

    ``sharding`` places the restored leaves (default: the first device), whatever mesh wrote them.
    """
    directory = Path(directory).absolute()  # Orbax reads relative paths as missing
    recover(directory)  # an old copy a crash left beside its place
    metadata = _metadata(directory)
    config = VeraConfig.from_dict(metadata["config"])
    generator = metadata["projection"].get("generator", GENERATOR)
    stored_projections = config.save_projection or generator != GENERATOR
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"trainable": jax.eval_shape(lambda: init_trainable(params, config))}
    if stored_projections:
        key = np.asarray(metadata["projection"]["key"], np.uint32)
        shapes = jax.eval_shape(lambda: init_projections(params, key, config))
        target["projections"] = {"A": shapes.A, "B": shapes.B}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(directory / TREE_DIR)
    stored_tree = getattr(stored, "item_metadata", stored)
    stored_shapes = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(stored_tree)}
    wanted = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(target)}
    if stored_shapes != wanted:
        diff = sorted(set(stored_shapes.items()) ^ set(wanted.items()))[:6]
        raise ValueError(f"The adapter in {directory} does not fit these params (differing leaves: {diff}); "
                         "load it onto the model it was trained with.")
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory / TREE_DIR, target)
    if stored_projections:
        projections = Projections(A=restored["projections"]["A"], B=restored["projections"]["B"],
                                  layers=shapes.layers)
        if fingerprint(projections) != metadata["projection"]["fingerprint"]:
            raise ValueError(f"A and B stored in {directory} do not match their fingerprint; the adapter is damaged.")
    else:
        projections = projections_from_recipe(params, metadata["projection"], config)
    return Adapter(trainable=restored["trainable"], projections=projections, config=config,
                   generator=generator if generator == GENERATOR else STORED)
