"""python -m pallax.train: train the Gemini-style decoder on the shipped corpus.

On a CPU-only machine the default mesh is 8 simulated CPU devices
(data=2, fsdp=2, tensor=2). ``--processes N`` runs N local jax.distributed
processes (coordinator on 127.0.0.1, gloo collectives) that share the mesh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

_DEVICES = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m pallax.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="tiny", help="model preset: tiny, small, nano1, nano2")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences per step)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--microbatches", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument(
        "--mesh",
        default=None,
        help="mesh axes, e.g. data=2,fsdp=2,tensor=2 (default: that on 8 CPU devices, "
        "else fsdp over all devices)",
    )
    p.add_argument(
        "--implementation",
        default=None,
        help="kernel implementation for every op (default: best for the platform)",
    )
    p.add_argument(
        "--tensor-parallel-collectives",
        action="store_true",
        help="run the MLP as overlapped ring collective matmuls over 'tensor'",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run N local jax.distributed processes (gloo on 127.0.0.1)",
    )
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="persistent checkpoints (Orbax); resumes from the newest one there",
    )
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between saves")
    p.add_argument(
        "--sdc-check",
        action="store_true",
        help="fingerprint the data-parallel replicas after every step; on a mismatch "
        "replay the step from the in-memory snapshot and name the bad replica",
    )
    p.add_argument(
        "--inject",
        action="append",
        default=[],
        help="failure injection, e.g. bitflip:replica=1,step=20 (needs --sdc-check)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-tokens", type=int, default=64, help="tokens to generate at the end")
    p.add_argument("--json", metavar="PATH", help="write the run's summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _launch(args, argv) -> int:
    """Starts args.processes copies of this command as jax.distributed processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(args.processes):
        env = {
            **os.environ,
            "PALLAX_COORDINATOR": f"127.0.0.1:{port}",
            "PALLAX_NUM_PROCESSES": str(args.processes),
            "PALLAX_PROCESS_ID": str(pid),
            "JAX_PLATFORMS": "cpu",
        }
        child = [a for a in argv if not a.startswith("--processes")]
        if "--processes" in argv:
            i = argv.index("--processes")
            child = argv[:i] + argv[i + 2 :]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pallax.train", *child],
                env=env,
                stdout=None if pid == 0 else subprocess.DEVNULL,
            )
        )
    codes = [p.wait() for p in procs]
    return max(codes)


def _setup_jax():
    """8 CPU devices in all, spread over the processes; joins jax.distributed when launched
    by ``--processes`` (a caller that initialised jax.distributed itself sets only
    PALLAX_NUM_PROCESSES)."""
    import jax

    num = int(os.environ.get("PALLAX_NUM_PROCESSES", "1"))
    with contextlib.suppress(RuntimeError):  # the backend may already be up (tests)
        jax.config.update("jax_num_cpu_devices", _DEVICES // num)
    if "PALLAX_COORDINATOR" in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["PALLAX_COORDINATOR"],
            num_processes=num,
            process_id=int(os.environ["PALLAX_PROCESS_ID"]),
        )
    return jax


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.processes > 1 and "PALLAX_PROCESS_ID" not in os.environ:
        return _launch(args, argv)
    jax = _setup_jax()
    import numpy as np
    from jax.experimental import multihost_utils

    from pallax.bench import device_peaks
    from pallax.model import PRESETS, data, generate
    from pallax.model.train import (
        TrainConfig,
        batch_sharding,
        init_state,
        make_train_step,
        state_shardings,
        step_flops,
    )
    from pallax.sharding import MeshConfig, make_mesh

    if args.preset not in PRESETS:
        raise SystemExit(f"unknown --preset {args.preset!r}; choose from {sorted(PRESETS)}")
    config = PRESETS[args.preset].replace(
        max_seq_len=max(PRESETS[args.preset].max_seq_len, args.seq_len + args.sample_tokens + 8),
        implementation=args.implementation,
        tensor_parallel_collectives=args.tensor_parallel_collectives,
    )
    devices = jax.devices()
    if args.mesh:
        mesh_config = MeshConfig.parse(args.mesh)
    elif devices[0].platform == "cpu" and len(devices) == _DEVICES:
        mesh_config = MeshConfig(data=2, fsdp=2, tensor=2)
    else:
        mesh_config = MeshConfig()
    mesh = make_mesh(mesh_config)
    tc = TrainConfig(
        learning_rate=args.lr,
        total_steps=args.steps,
        warmup_steps=min(20, args.steps // 10),
        microbatches=args.microbatches,
        seed=args.seed,
    )
    lead = jax.process_index() == 0
    peaks = device_peaks()
    start = time.perf_counter()
    state = init_state(config, tc, mesh, jax.random.key(args.seed))
    train_step = make_train_step(config, tc, mesh)
    iterator = data.DataIterator(data.PackedRows.build(args.seq_len), args.batch, seed=args.seed)
    sharding = batch_sharding(mesh)
    checkpointer, first_step = None, 0
    if args.checkpoint_dir:
        from pallax.model.checkpoint import Checkpointer

        checkpointer = Checkpointer(args.checkpoint_dir)
        latest = checkpointer.latest_step()
        if latest is not None:
            state, data_state = checkpointer.restore(
                latest, state_shardings(config, tc, mesh), state
            )
            iterator.restore(data_state)
            first_step = latest
            if lead:
                print(f"resumed from step {latest} in {args.checkpoint_dir}")

    def put(batch):
        return {
            k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()
        }

    flops = step_flops(config, args.batch * args.seq_len)
    history, tokens_seen, step_times = [], 0, []
    progress = None
    if lead and not args.quiet:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
        )
        progress.start()
        task = progress.add_task(
            "train", total=args.steps, status="compiling", completed=first_step
        )
    guard = None
    if args.sdc_check:
        from pallax.fault import SdcGuard, parse_injection

        guard = SdcGuard(
            mesh,
            state_shardings(config, tc, mesh),
            injections=dict(parse_injection(t) for t in args.inject),
        )
        guard.start(first_step, state)
    elif args.inject:
        raise SystemExit("--inject needs --sdc-check")
    for step in range(first_step, args.steps):
        t0 = time.perf_counter()
        batch = put(next(iterator))
        state, metrics = train_step(state, batch)
        if guard is not None:
            state = guard.check(step, state, lambda previous, b=batch: train_step(previous, b)[0])
        metrics = jax.device_get(metrics)
        dt = time.perf_counter() - t0
        if step > first_step:  # the first step compiles
            step_times.append(dt)
        if checkpointer is not None and (
            (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps
        ):
            checkpointer.save(step + 1, state, iterator.state())
        tokens_seen += int(metrics["tokens"])
        history.append(float(metrics["loss"]))
        if progress is not None:
            tps = args.batch * args.seq_len / dt
            mfu = flops / dt / peaks.flops_per_s
            progress.update(
                task,
                advance=1,
                status=(
                    f"loss {metrics['loss']:.3f}  {tps:,.0f} tok/s  MFU {100 * mfu:.1f}%  "
                    f"lr {metrics['learning_rate']:.2e}"
                ),
            )
    if progress is not None:
        progress.stop()
    if checkpointer is not None:
        checkpointer.wait()
    params = (
        multihost_utils.process_allgather(state.params, tiled=True)
        if (jax.process_count() > 1)
        else jax.device_get(state.params)
    )
    prompt = data.encode("Hacker: ")[None]
    local = jax.local_devices()[0]
    with jax.default_device(local):
        sample = generate(jax.device_put(params, local), config, prompt, args.sample_tokens)
    median = float(np.median(step_times)) if step_times else float("nan")
    checksum = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(params)))
    summary = {
        "preset": args.preset,
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "mesh": dict(mesh.shape),
        "processes": jax.process_count(),
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "first_step": first_step,
        "first_loss": history[0] if history else None,
        "final_loss": history[-1] if history else None,
        "loss_history": history,
        "tokens": tokens_seen,
        "median_step_s": median,
        "tokens_per_s": args.batch * args.seq_len / median,
        "mfu": flops / median / peaks.flops_per_s,
        "peak_flops_per_s": peaks.flops_per_s,
        "peak_source": peaks.source,
        "wall_s": time.perf_counter() - start,
        "param_checksum": checksum,
        "sdc_events": [] if guard is None else guard.events,
        "data_state": iterator.state(),
        "sample": data.decode(sample[0]),
    }
    if lead:
        if history:
            print(
                f"loss {history[0]:.3f} -> {history[-1]:.3f} over steps {first_step}.."
                f"{args.steps}; {summary['tokens_per_s']:,.0f} tokens/s; "
                f"MFU {100 * summary['mfu']:.1f}% of {peaks.flops_per_s / 1e12:.2f} TFLOP/s "
                f"({peaks.source})"
            )
        print(f"sample: Hacker: {summary['sample']!r}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
