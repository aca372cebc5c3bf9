"""The training checkpointer: the train loop's state in workdir/checkpoints/<step>/ (Orbax).

Each step folder holds the items
  params     the full model parameter dict (trainable + frozen; a LoRA run: adapters + projector),
             StandardSave: the same format as a model folder's params/, so load_pretrained reads a
             step like a model folder (llava_jax/checkpoint.py, which reads it without this module)
  opt_state  the optax state over the trainable parameters, StandardSave
  data       each process's data-iterator state, process_<i>-of-<n>.json
  meta       JSON: step, stage, the training config, counters
Saves are asynchronous; restoring reads every array straight into the shardings of the target
(so a run can resume on a different mesh).
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from llava_jax.checkpoint import CHECKPOINTS_DIR, PARAMS_ITEM

DATA_ITEM = "data"
OPT_ITEM = "opt_state"
META_ITEM = "meta"


def _encode_data_state(value) -> dict:
    """Iterator states are JSON-able dicts (Grain datasets) or bytes (Grain DataLoader)."""
    if isinstance(value, (bytes, bytearray)):
        return {"kind": "bytes", "value": base64.b64encode(bytes(value)).decode("ascii")}
    return {"kind": "json", "value": value}


def _decode_data_state(record: dict, file: str):
    if record.get("kind") == "bytes":
        return base64.b64decode(record["value"])
    if record.get("kind") == "json":
        return record["value"]
    raise ValueError(f"{file}: not a data-iterator state record (expected key 'kind' = 'bytes' or 'json')")


class DataStateHandler(ocp.CheckpointHandler):
    """One JSON file per process: each host restores the position of its own data shard."""

    @staticmethod
    def _file(directory) -> str:
        return os.path.join(str(directory), f"process_{jax.process_index()}-of-{jax.process_count()}.json")

    def save(self, directory, args: "DataStateSave"):
        with open(self._file(directory), "w") as f:
            json.dump(_encode_data_state(args.value), f)

    def restore(self, directory, args: "DataStateRestore" = None):
        file = self._file(directory)
        if not os.path.exists(file):
            found = sorted(os.listdir(str(directory))) if os.path.isdir(str(directory)) else []
            raise FileNotFoundError(f"no data-iterator state for process {jax.process_index()} of "
                                    f"{jax.process_count()}: {file} is missing (found {found}); the checkpoint "
                                    "was written by a run with a different number of processes")
        with open(file) as f:
            return _decode_data_state(json.load(f), file)

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    value: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


class TrainCheckpointer:
    """Async save every N steps keeping the last K; restore the latest onto target shardings."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(PARAMS_ITEM, OPT_ITEM, DATA_ITEM, META_ITEM))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, params: dict, opt_state, data_state, meta: dict) -> bool:
        """Start an asynchronous save (arrays are copied off-device before this returns)."""
        args = ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardSave(params),
            OPT_ITEM: ocp.args.StandardSave(opt_state),
            DATA_ITEM: DataStateSave(data_state),
            META_ITEM: ocp.args.JsonSave(dict(meta, step=int(step))),
        })
        return self.manager.save(int(step), args=args, force=True)

    def restore(self, step: int, params_target: dict, opt_target) -> tuple:
        """-> (params, opt_state, data_state, meta); targets are ShapeDtypeStructs with shardings.

        data_state is None when the checkpoint holds no state for this process (it was written by a
        run with another number of processes: the data positions cannot be mapped)."""
        items = {
            PARAMS_ITEM: ocp.args.StandardRestore(params_target),
            OPT_ITEM: ocp.args.StandardRestore(opt_target),
            META_ITEM: ocp.args.JsonRestore(),
        }
        if os.path.exists(DataStateHandler._file(os.path.join(self.directory, str(int(step)), DATA_ITEM))):
            items[DATA_ITEM] = DataStateRestore()
        out = self.manager.restore(int(step), args=ocp.args.Composite(**items))
        data = out[DATA_ITEM] if DATA_ITEM in items else None
        return out[PARAMS_ITEM], out[OPT_ITEM], data, out[META_ITEM]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
