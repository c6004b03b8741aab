"""Orbax checkpoints of a training run: ``WORKDIR/checkpoints/<step>/{state, data, config}``.

* ``state``  — the train state pytree ``{"params", "buffers", "opt_state", "step", "rng"}`` (``params``
  is the pure dict of the model's nnx.Params, names as in the released checkpoints, gate biases
  included; ``buffers`` its untrained state, the hash layers' ``tid2eid``);
* ``data``   — the grain iterator state (one file per process);
* ``config`` — the run's full config (JSON).

Saves are atomic (orbax writes a temporary directory and renames it when complete), optionally
asynchronous, and only the newest ``keep`` are kept.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from v4jax import data as data_lib
from v4jax.config import RUNTIME_KEYS, CheckpointConfig, ConfigError, ModelConfig, build
from v4jax.hf.safetensors import CheckpointError


class TrainCheckpointer:
    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                            create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter, config: dict, *, wait: bool = False):
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=data_lib.save_args(data_iter),
                                  config=ocp.args.JsonSave(config))
        self.manager.save(step, args=args, force=True)
        if wait:
            self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state, data_iter):
        """Restore ``state`` onto the shapes / dtypes / shardings of ``abstract_state``; the data
        iterator is restored in place, also when the checkpoint was written by another number of
        processes (every process's saved position is the same global batch index)."""
        state = ocp.args.StandardRestore(abstract_state)
        data_dir = self.directory / str(step) / "data"
        if (data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json").is_file():
            args = ocp.args.Composite(state=state, data=data_lib.restore_args(data_iter))
        else:
            saved = {f.name: json.loads(f.read_text()) for f in sorted(data_dir.glob("process_*-of-*.json"))}
            if not saved or any(v != next(iter(saved.values())) for v in saved.values()):
                raise ConfigError(f"{data_dir}: no data-iterator position to restore, or the processes' "
                                  f"differ: {saved}")
            data_iter.set_state(next(iter(saved.values())))
            args = ocp.args.Composite(state=state)
        try:
            return self.manager.restore(step, args=args)["state"]
        except Exception as e:  # orbax / tensorstore, e.g. a damaged or truncated file of this step
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            older = [s for s in self.manager.all_steps() if s < step]
            hint = (f"move {self.directory / str(step)} away to resume from step {max(older)}" if older else
                    "no older checkpoint is kept")
            raise CheckpointError(f"cannot restore the checkpoint of step {step} ({self.directory / str(step)}): "
                                  f"{cause} ({hint})") from e

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


class _Without(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


@dataclasses.dataclass
class TrainRunParams:
    """The model state (parameters and ``tid2eid`` tables, not the optimizer's) of one ``train.py``
    checkpoint step, its leaves read on demand (``open_train_run``); the interface of
    ``hf.convert.OrbaxParams``, so export and ``train.init_from`` stream it leaf by leaf."""
    path: Path                                # the step directory
    step: int
    run: dict                                 # the run's config (JSON)
    cfg: ModelConfig
    leaves: dict[str, jax.ShapeDtypeStruct]   # "layers.0.ffn.gate.tid2eid" -> shape / dtype
    section: dict[str, str]                   # leaf -> "params" | "buffers" (its subtree of the state)

    def read(self, names) -> dict[str, np.ndarray]:
        """The named leaves only (one orbax partial restore)."""
        from v4jax.hf.convert import _flatten, _nest, restore_leaves
        item = _nest({f"{self.section[n]}.{n}": self.leaves[n] for n in names}, int_keys=False)
        got = restore_leaves(self.path / "state", item)
        return {n.split(".", 1)[1]: np.asarray(a) for n, a in _flatten(got).items()}

    def leaf(self, name: str) -> np.ndarray:
        return self.read([name])[name]

    def all(self) -> dict[str, np.ndarray]:
        return self.read(self.leaves)

    # float32 master weights; not a model layout: a model is loaded from them as from their export
    # (``load_orbax_params`` quantises them to the release's tensors), so eval.py on a run computes
    # what the exported checkpoint computes, with the weight QAT training applied
    layout = "trained"

    def tokenizer(self) -> Path:
        """The run's ``tokenizer.json`` (``data.tokenizer``, a relative path taken from the current
        directory; the shipped tiny tokenizer by default)."""
        from v4jax.tokenizer import TINY_TOKENIZER
        tok = Path((self.run.get("data") or {}).get("tokenizer") or TINY_TOKENIZER)
        return tok / "tokenizer.json" if tok.is_dir() else tok


def open_train_run(path: str | os.PathLike, step: int | None = None) -> TrainRunParams:
    """A ``train.py`` checkpoint: the run's workdir, its ``checkpoints`` directory or one step's directory
    (``step``: default the newest). Reads the config and the leaves' metadata, no array."""
    from v4jax.hf.convert import _flatten, _nest, metadata_tree
    p = Path(path).absolute()
    if not p.exists():
        raise FileNotFoundError(f"training checkpoint path does not exist: {p}")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / "state").is_dir():
        if not p.name.isdigit():
            raise FileNotFoundError(f"{p} is not a step of a train.py run (its name is not a step number; "
                                    f"an unfinished save is named N.orbax-checkpoint-tmp-*)")
        root, step = p.parent, int(p.name)
    else:
        root = p
    manager = ocp.CheckpointManager(root)
    step = manager.latest_step() if step is None else step
    if step is None:
        manager.close()
        raise FileNotFoundError(f"no training checkpoint under {root}")
    run = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    manager.close()
    try:
        model_cfg = build(ModelConfig, run["model"], prefix="model.")
    except (KeyError, ConfigError) as e:
        raise ConfigError(f"{root}/{step}/config: not a v4jax training config ({e})") from None
    # the step's state item has no metadata file of its own (the manager keeps it per step): orbax says so
    quiet = _Without("Metadata file does not exist")
    logging.getLogger("absl").addFilter(quiet)
    try:
        tree = metadata_tree(root / str(step) / "state")
    finally:
        logging.getLogger("absl").removeFilter(quiet)
    leaves, section = {}, {}
    for top in ("params", "buffers"):
        for name, m in _flatten(tree.get(top) or {}).items():
            leaves[name] = jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype))
            section[name] = top
    order = _flatten(_nest(dict.fromkeys(leaves)))  # params and buffers interleaved, as the model's state
    return TrainRunParams(root / str(step), step, run, model_cfg, {n: leaves[n] for n in order}, section)


def load_train_params(path: str | os.PathLike, step: int | None = None) -> tuple[ModelConfig, dict, int]:
    """Model config, model state (numpy pure dict: params and ``tid2eid`` tables) and step of a
    checkpoint written by ``train.py`` (``open_train_run`` reads them leaf by leaf)."""
    from v4jax.hf.convert import _nest
    r = open_train_run(path, step)
    return r.cfg, _nest(r.all()), r.step


def init_weights(model, path: str | os.PathLike, *, mesh=None, progress: bool = True) -> str:
    """Fill ``model`` (a float-layout ``Transformer``, possibly abstract) in place with the weights at
    ``path`` (``train.init_from``) and say what they were. ``path`` is a released HF checkpoint
    (FP8 / FP4 dequantised), an orbax-form directory (``python -m v4jax.convert hf-to-orbax``) or a
    ``train.py`` run (its workdir, ``checkpoints`` directory or one step directory: parameters and
    hash-routing tables only, not its optimizer state or data position). The source's model config must
    equal ``model.cfg`` (``attention_impl`` / ``moe_impl`` aside); the differences are named if not.
    With ``mesh``, each tensor goes straight to its shards."""
    from v4jax.config import from_hf_config
    from v4jax.hf.checkpoint import load_params
    from v4jax.hf.convert import fill_model, is_orbax_dir, is_train_checkpoint, load_orbax_params, open_orbax

    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"train.init_from: {p} is not a directory")
    if is_orbax_dir(p):
        op = open_orbax(p)
        src_cfg, what = op.cfg, f"orbax-form checkpoint ({op.layout} layout)"
    elif is_train_checkpoint(p):
        run = open_train_run(p)
        src_cfg, what = run.cfg, f"train.py checkpoint at step {run.step}"
    elif (p / "config.json").is_file():
        src_cfg, what = from_hf_config(p), "released-format checkpoint"
    else:
        raise ConfigError(f"train.init_from: {p} is neither a released checkpoint (config.json + safetensors), "
                          f"an orbax-form directory (v4jax.json) nor a train.py run")
    runtime = {k: getattr(model.cfg, k) for k in RUNTIME_KEYS}
    src_cfg = dataclasses.replace(src_cfg, **runtime)
    if src_cfg != model.cfg:
        diff = [f"{f.name}: checkpoint {getattr(src_cfg, f.name)!r}, run {getattr(model.cfg, f.name)!r}"
                for f in dataclasses.fields(ModelConfig) if getattr(src_cfg, f.name) != getattr(model.cfg, f.name)]
        raise ConfigError(f"train.init_from: {p} holds a different model; set the run's model section to the "
                          f"checkpoint's config. Differences:\n  " + "\n  ".join(diff))
    if is_orbax_dir(p):
        load_orbax_params(model, op, "float", progress=progress, mesh=mesh)
    elif is_train_checkpoint(p):
        fill_model(model, run.leaves, run.read, mesh=mesh, progress=progress)
    else:
        load_params(model, p, progress=progress, mesh=mesh)
    return f"{what} {p}"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
