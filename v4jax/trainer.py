"""The training loop behind ``train.py``: build, resume, step, log, checkpoint.

``WORKDIR`` holds ``config.json`` (the run's config), ``metrics.jsonl`` (one JSON object per logged
step), ``tb/`` (TensorBoard event files) and ``checkpoints/`` (orbax, see ``v4jax.checkpoint``).
Re-running with the same workdir resumes from the newest checkpoint and continues exactly as an
uninterrupted run would (same batches, same optimizer state, same gate biases).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from flax import nnx
from tqdm.auto import tqdm

import pallas_kernels
from v4jax import sharding
from v4jax.checkpoint import TrainCheckpointer, init_weights, write_json_atomic
from v4jax.config import RUNTIME_KEYS, Config, ConfigError
from v4jax.data import make_iterator
from v4jax.hf.safetensors import CheckpointError
from v4jax.model.transformer import Transformer
from v4jax.optim import build_optimizer, learning_rate_schedule
from v4jax.train_step import make_train_step, train_flops_per_token

# dense bf16 peak per device (vendor datasheets), used for MFU when train.peak_tflops is not given
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6": 918.0}


def maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when this process is one of several: under SLURM, Open MPI or a
    TPU pod (JAX detects the rest), or with ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set by hand."""
    env = os.environ
    multi = ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
             or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or int(env.get("JAX_NUM_PROCESSES", "1")) > 1
             or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)
    if multi and not jax.distributed.is_initialized():
        kw = {k: int(env[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
              if v in env}
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts need it; others ignore it
        jax.distributed.initialize(**kw)


def _peak_flops(tcfg) -> float | None:
    if tcfg.peak_tflops:
        return tcfg.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tf in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tf * 1e12
    return None


class TrainingStopped(Exception):
    """Training stopped early by a signal, after saving a checkpoint at ``step``."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name} at step {step}; checkpoint saved")
        self.step, self.signum = step, signum


class _Stop:
    """SIGTERM / SIGINT -> finish the current step, save, exit. With several processes, JAX's preemption
    notifier keeps SIGTERM and the processes agree on a step at which all of them save and stop
    (``reached_preemption_sync_point``), whichever of them received it; SIGINT is left alone there."""

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGTERM  # with several processes only SIGTERM stops a run
        self.several = jax.process_count() > 1
        signals = () if self.several else (signal.SIGTERM, signal.SIGINT)
        self._old = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        self.requested, self.signum = True, signum

    def now(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (every process gets the same answer)."""
        if self.several:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def step_memory_bytes(compiled) -> int | None:
    """Device memory the compiled step needs per device (XLA's buffer assignment: arguments,
    outputs not aliased to them, temporaries), or None where the backend does not say."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                   + m.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - an optional statistic
        return None


def out_of_memory(error: BaseException, tcfg, what: str) -> ConfigError | None:
    """A ConfigError naming the settings that lower the step's memory, when ``error`` is XLA's
    out-of-memory error (``what``: "compiling" | "running"); else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
        return None
    first = text.strip().splitlines()[0][:300]
    return ConfigError(
        f"out of device memory while {what} the training step ({first}). Less memory per device: raise "
        f"train.grad_accum (now {tcfg.grad_accum}; activations scale with data.global_batch / grad_accum)"
        + ("" if tcfg.remat else ", set train.remat=true")
        + ", lower data.seq_len or data.global_batch, or spread the model over more devices (mesh.fsdp, "
          "mesh.expert)")


@contextlib.contextmanager
def _explain_oom(tcfg, what: str):
    """Re-raise XLA's out-of-memory error as ``out_of_memory``'s ConfigError; other errors pass."""
    try:
        yield
    except Exception as e:
        oom = out_of_memory(e, tcfg, what)
        if oom is None:
            raise
        raise oom from e


def _check_same_model(saved: dict, cfg: Config):
    now = cfg.to_dict()
    diff = sorted(k for k in set(saved.get("model", {})) | set(now["model"])
                  if k not in RUNTIME_KEYS and saved.get("model", {}).get(k) != now["model"].get(k))
    if diff:
        raise ConfigError(f"the checkpoint was written for a different model; differing model keys: {diff}")


def _truncate_metrics(path: Path, last_step: int):
    """Keep the rows of steps up to the restored checkpoint's (a resumed run writes the later ones again);
    a row cut short by the interruption is dropped. Rewritten atomically."""
    if path.is_file():
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
                keep.append(line + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def _builder(cfg: Config):
    tcfg = cfg.train
    return lambda: Transformer(cfg.model, mode=tcfg.mode, rngs=nnx.Rngs(tcfg.seed),
                               fp4_expert_qat=tcfg.fp4_expert_qat, fp8_weight_qat=tcfg.fp8_weight_qat)


def _state_specs(model: Transformer, cfg: Config, mesh):
    """(graphdef, optimizer, the training state as ``ShapeDtypeStruct``s with their shardings):
    ``{"params", "buffers", "opt_state", "step", "rng"}``. ``model`` may be abstract."""
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    p_shard = sharding.param_shardings(params_state, mesh)
    rep = sharding.replicated(mesh)

    def spec(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    params = jax.tree_util.tree_map(spec, nnx.to_pure_dict(params_state), p_shard)
    tx = build_optimizer(cfg.optimizer, params)
    opt = jax.eval_shape(tx.init, params)
    state = {"params": params, "buffers": jax.tree_util.tree_map(lambda x: spec(x, rep), nnx.to_pure_dict(rest)),
             "opt_state": jax.tree_util.tree_map(spec, opt, sharding.follow_params(opt, params, p_shard, mesh)),
             "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
             "rng": spec(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))), rep)}
    return graphdef, tx, state


def _jit_step(graphdef, cfg: Config, tx, state_shardings, mesh):
    step = make_train_step(graphdef, cfg.model, cfg.train, tx, learning_rate_schedule(cfg.optimizer))
    return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def tpu_devices(topology: str):
    """The devices of a TPU slice such as ``v5p:2x2x1`` or ``v6e:4x4``, described by libtpu on any machine
    (no TPU needed), for compiling ahead of time."""
    # this process only compiles: it needs no exclusive hold on TPU chips (libtpu's lockfile), so
    # several such processes may run at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    shape = topology.partition(":")[2].split("x")
    kw = {}
    if all(d.isdigit() for d in shape) and math.prod(int(d) for d in shape) < 4:
        # fewer chips than a TPU host holds (v5p:1x1x1): one host of that shape
        kw["chips_per_host_bounds"] = ([int(d) for d in shape] + [1, 1])[:3]
    try:
        from jax.experimental import topologies
        return topologies.get_topology_desc(platform="tpu", topology_name=topology, **kw).devices
    except Exception as e:  # noqa: BLE001 - libtpu missing or a bad name: both are the user's to fix
        first = str(e).strip().splitlines()[0][:300]
        raise ConfigError(f"cannot describe the TPU topology {topology!r} ({first}); it needs libtpu "
                          f"(pip install 'jax[tpu]') and a name like v5p:2x2x1, v5e:2x2, v6e:4x4 or v4:2x2x1") from e


def compile_for_tpu(cfg: Config, topology: str) -> dict:
    """Compile the training step ahead of time for the TPU slice ``topology`` from this machine (no
    TPU, no data): the Pallas kernels go through Mosaic and the step through XLA's TPU compiler,
    which refuses a step whose temporaries alone exceed a chip's memory. Returns the per-device
    memory (GiB: the total, to compare with a chip's HBM, and its parts) and the compile time."""
    devices = tpu_devices(topology)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_batch(cfg.data.global_batch, mesh.shape, cfg.train.grad_accum)
    sharding.check_experts(cfg.model.n_routed_experts, mesh.shape)
    with pallas_kernels.target_platform("tpu"):
        graphdef, tx, state = _state_specs(nnx.eval_shape(_builder(cfg)), cfg, mesh)
        step_fn = _jit_step(graphdef, cfg, tx, jax.tree_util.tree_map(lambda x: x.sharding, state), mesh)
        batch = jax.ShapeDtypeStruct((cfg.data.global_batch, cfg.data.seq_len + 1), jnp.int32,
                                     sharding=sharding.batch_sharding(mesh))
        t = time.perf_counter()
        with jax.set_mesh(mesh), _explain_oom(cfg.train, "compiling"):
            compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    m = compiled.memory_analysis()
    return {"topology": topology, "device_kind": devices[0].device_kind, "devices": len(devices),
            "mesh": dict(mesh.shape), "compile_s": compile_s, "arguments_gib": m.argument_size_in_bytes / 2**30,
            "temporaries_gib": m.temp_size_in_bytes / 2**30, "step_memory_gib": step_memory_bytes(compiled) / 2**30}


def _initial_model(cfg: Config, mesh, *, from_checkpoint: bool, progress: bool) -> tuple[Transformer, str | None]:
    """(the model to train, where its weights came from): randomly initialised (None), or for a fresh
    run with ``train.init_from`` filled with that checkpoint's weights, each tensor loaded straight to its
    shards."""
    tcfg = cfg.train
    build = _builder(cfg)
    if not from_checkpoint:
        return sharding.init_sharded(build, mesh), None
    model = nnx.eval_shape(build)
    try:
        return model, init_weights(model, tcfg.init_from, mesh=mesh, progress=progress)
    except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"train.init_from: {e}") from e


def train(cfg: Config, workdir: str | os.PathLike, *, progress: bool = True) -> list[dict]:
    """Run (or resume) training; returns the metrics logged by this invocation. A run stopped by
    SIGTERM / SIGINT saves a checkpoint and raises ``TrainingStopped``."""
    maybe_initialize_distributed()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tcfg, mcfg = cfg.train, cfg.model
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.data.global_batch, mesh.shape, tcfg.grad_accum)
    sharding.check_experts(cfg.model.n_routed_experts, mesh.shape)
    is_main = jax.process_index() == 0
    try:  # first, so that a bad data path or file fails before the model is built
        data_iter = make_iterator(cfg.data, process_index=jax.process_index(), process_count=jax.process_count())
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data: {e}") from e

    ckpt = TrainCheckpointer(workdir / "checkpoints", cfg.checkpoint)
    start = ckpt.latest_step()
    if start is not None and start >= tcfg.steps:
        ckpt.close()
        if start > tcfg.steps:
            raise ConfigError(f"{workdir}: the newest checkpoint is at step {start}, past train.steps="
                              f"{tcfg.steps} (raise train.steps to go on, or use another workdir)")
        if is_main:
            print(f"{workdir} is already at train.steps={start}: nothing to train (raise train.steps to go on)")
        return []

    metrics_path = workdir / "metrics.jsonl"
    try:
        if start is not None:  # the state is restored straight onto its shards: no initial state beside it
            _check_same_model(ckpt.saved_config(start), cfg)
            graphdef, tx, state = _state_specs(nnx.eval_shape(_builder(cfg)), cfg, mesh)
            state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
            state = ckpt.restore(start, state, data_iter)
            if is_main:
                _truncate_metrics(metrics_path, start)
                print(f"resumed from step {start} ({ckpt.directory / str(start)})")
        else:
            model, source = _initial_model(cfg, mesh, from_checkpoint=bool(tcfg.init_from),
                                           progress=progress and is_main)
            if source and is_main:
                print(f"initial weights: {source}")
            graphdef, tx, specs = _state_specs(model, cfg, mesh)
            state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, specs)
            _, params_state, rest = nnx.split(model, nnx.Param, ...)
            params = jax.device_put(nnx.to_pure_dict(params_state), state_shardings["params"])
            state = {"params": params,
                     "buffers": jax.device_put(nnx.to_pure_dict(rest), state_shardings["buffers"]),
                     "opt_state": jax.jit(tx.init, out_shardings=state_shardings["opt_state"])(params),
                     "step": jax.device_put(jnp.zeros((), jnp.int32), state_shardings["step"]),
                     "rng": jax.device_put(jax.random.key_data(jax.random.key(tcfg.seed)), state_shardings["rng"])}
            start = 0
    except BaseException:
        ckpt.close()
        raise
    if is_main:
        write_json_atomic(workdir / "config.json", cfg.to_dict())

    step_fn = _jit_step(graphdef, cfg, tx, state_shardings, mesh)
    tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
    flops_per_token = train_flops_per_token(mcfg, cfg.data.seq_len, mtp=tcfg.mtp_loss_weight > 0)
    peak = _peak_flops(tcfg)
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(workdir / "tb"))

    stop = _Stop()
    logged = []
    bar = tqdm(total=tcfg.steps, initial=start, desc="train", unit="step", disable=not (progress and is_main))
    compiled, compile_s = None, None
    step = start
    try:
        while step < tcfg.steps:
            local = next(data_iter)["tokens"]
            if local.size and local.max() >= mcfg.vocab_size:  # the embedding / loss would read nothing
                raise ConfigError(f"data: token id {int(local.max())} at step {step + 1} is not below the "
                                  f"model's vocab_size={mcfg.vocab_size} (another tokenizer than the model's?)")
            batch = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), local)
            with jax.set_mesh(mesh):  # the model reads it (expert parallelism: moe.Experts)
                if compiled is None:  # compiled apart, so that step times and MFU exclude it
                    if progress and is_main:
                        tqdm.write("compiling the training step ...")
                    t = time.perf_counter()
                    with _explain_oom(tcfg, "compiling"):
                        compiled = step_fn.lower(state, batch).compile()
                    compile_s = time.perf_counter() - t
                    step_mem = step_memory_bytes(compiled)
                    if progress and is_main:
                        mem = f", {step_mem / 2**30:.2f} GiB of device memory per device" if step_mem else ""
                        tqdm.write(f"compiled the training step in {compile_s:.1f} s{mem}")
                    t_last, steps_since = time.perf_counter(), 0
                    bar.unpause()  # its rate excludes the compilation too
                with _explain_oom(tcfg, "running"):
                    state, metrics = compiled(state, batch)
            step += 1
            steps_since += 1
            bar.update(1)
            stopping = stop.now(step)  # read once: a signal may arrive while this step is logged
            last = step == tcfg.steps or stopping
            if step % tcfg.log_every == 0 or last:
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                dt = (now - t_last) / steps_since
                t_last, steps_since = now, 0
                row = {"step": step, **{k: float(v) for k, v in metrics.items()},
                       "step_time_s": dt, "tokens_per_s": tokens_per_step / dt}
                row["mfu"] = flops_per_token * row["tokens_per_s"] / (peak * jax.device_count()) if peak else None
                if compile_s is not None:  # the first logged row of this process
                    row["compile_s"], compile_s = compile_s, None
                    row["step_memory_gib"] = step_mem / 2**30 if step_mem else None
                logged.append(row)
                if is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    for k, v in row.items():
                        if k != "step" and v is not None:
                            writer.add_scalar(k, v, step)
                    writer.flush()
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
            if step % cfg.checkpoint.every == 0 or last:
                ckpt.save(step, state, data_iter, cfg.to_dict(), wait=last)
            if stopping:
                break
    finally:
        bar.close()
        stop.restore()
        ckpt.close()
        if writer is not None:
            writer.close()
    if step < tcfg.steps:
        raise TrainingStopped(step, stop.signum)
    return logged
