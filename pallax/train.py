"""python -m pallax.train: train the Gemini-style decoder on the shipped corpus.

On a CPU-only machine the default mesh is 8 simulated CPU devices
(data=2, fsdp=2, tensor=2). ``--processes N`` runs N local jax.distributed
processes (coordinator on 127.0.0.1, gloo collectives) that share the mesh.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time

from pallax._launch import launch, supervise

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
        help="failure injection (repeatable): bitflip:replica=R,step=S or "
        "bitflip:worker=W,step=S (needs --sdc-check), kill:worker=W,step=S, "
        "hang:worker=W,step=S and corrupt-persistent:step=S (need --fault-tolerant)",
    )
    ft = p.add_argument_group("fault tolerance (with --processes N >= 2 and 2 data replicas)")
    ft.add_argument(
        "--fault-tolerant",
        action="store_true",
        help="run the workers under a supervisor: state replicated to each worker's "
        "in-memory tier every step, restart + recovery from an intact replica on a lost worker",
    )
    ft.add_argument(
        "--ft-dir",
        default=None,
        help="run directory (default: a new one under /dev/shm, removed after a successful run)",
    )
    ft.add_argument(
        "--memory-every", type=int, default=1, help="steps between in-memory tier saves"
    )
    ft.add_argument(
        "--hot-standby",
        action="store_true",
        help="keep warm worker processes (imports done) ready to replace lost ones",
    )
    ft.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=120.0,
        help="seconds without a heartbeat after which a worker counts as lost",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-tokens", type=int, default=64, help="tokens to generate at the end")
    p.add_argument("--json", metavar="PATH", help="write the run's summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _setup_jax():
    """8 CPU devices in all, spread over the processes; joins jax.distributed when launched
    by ``--processes`` (a caller that initialised jax.distributed itself sets only
    PALLAX_NUM_PROCESSES)."""
    import jax

    num = int(os.environ.get("PALLAX_NUM_PROCESSES", "1"))
    with contextlib.suppress(RuntimeError):  # the backend may already be up (tests)
        jax.config.update("jax_num_cpu_devices", _DEVICES // num)
    if "PALLAX_FT_DIR" in os.environ:  # a restarted job reuses the first one's executables
        jax.config.update(
            "jax_compilation_cache_dir", os.path.join(os.environ["PALLAX_FT_DIR"], "jax_cache")
        )
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
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
    from pallax.fault.inject import parse_injection

    try:
        injections = [parse_injection(t) for t in args.inject]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if any(i.kind == "bitflip" for i in injections) and not args.sdc_check:
        raise SystemExit("--inject bitflip:... needs --sdc-check")
    if any(i.kind != "bitflip" for i in injections) and not args.fault_tolerant:
        raise SystemExit("--inject kill:/hang:/corrupt-persistent: need --fault-tolerant")
    if args.fault_tolerant and args.processes < 2:
        raise SystemExit("--fault-tolerant needs --processes N >= 2 (N even: 2 data replicas)")
    if args.processes > 1 and "PALLAX_PROCESS_ID" not in os.environ:
        if args.fault_tolerant:
            return supervise(args, injections)
        return launch(args, argv)
    marks = {"main": time.time()}  # start-up phases, reported by a fault-tolerant worker
    jax = _setup_jax()
    marks["distributed"] = time.time()
    import numpy as np
    from jax.experimental import multihost_utils

    from pallax.bench import device_peaks
    from pallax.fault import runtime as fault_runtime
    from pallax.fault.guard import PersistentSdcError
    from pallax.fault.supervisor import EXIT_SDC
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
    marks["state"] = time.time()
    iterator = data.DataIterator(data.PackedRows.build(args.seq_len), args.batch, seed=args.seed)
    sharding = batch_sharding(mesh)
    checkpointer, first_step, ft = None, 0, None
    if fault_runtime.active():
        persistent = args.checkpoint_dir or os.path.join(
            os.environ[fault_runtime.ENV_DIR], "persistent"
        )
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        ft = fault_runtime.WorkerRuntime.from_env(
            mesh,
            abstract,
            persistent_dir=persistent,
            persistent_every=args.checkpoint_every,
            injections=injections,
            marks=marks,
        )
        state, first_step = ft.restore(mesh, state)
        iterator.restore({"position": first_step, "seed": args.seed})
    elif args.checkpoint_dir:
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
    history, tokens_seen, step_times, iteration_times = [], 0, [], []
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
        from pallax.fault import SdcGuard

        guard = SdcGuard(
            mesh,
            state_shardings(config, tc, mesh),
            injections=injections,
            previous_state=ft.previous_state if ft and args.memory_every == 1 else None,
        )
        guard.start(first_step, state)
    for step in range(first_step, args.steps):
        if ft is not None:
            ft.before_step(step)
        t0 = iteration_begin = time.perf_counter()
        batch = put(next(iterator))
        state, metrics = train_step(state, batch)
        if guard is not None:
            replay_begin = time.perf_counter()
            events = len(guard.events)
            try:
                state = guard.check(step, state, lambda prev, b=batch: train_step(prev, b)[0])
            except PersistentSdcError as e:
                print(e, flush=True)
                os._exit(EXIT_SDC if jax.process_index() in e.workers else 1)
            if len(guard.events) > events and ft is not None:  # the replay is not productive
                ft.tracker.seconds["replay"] += time.perf_counter() - replay_begin
                t0 += time.perf_counter() - replay_begin
        metrics = jax.device_get(metrics)
        dt = time.perf_counter() - t0
        if ft is not None:
            ft.after_step(step, state, dt, compiled=step > first_step)
        if step > first_step:  # the first step compiles
            step_times.append(dt)
        if checkpointer is not None and (
            (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps
        ):
            checkpointer.save(step + 1, state, iterator.state())
        if step > first_step:  # with the saves: what fault tolerance adds shows here
            iteration_times.append(time.perf_counter() - iteration_begin)
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
    ft_report = ft.finish({"steps": args.steps}) if ft is not None else None
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
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.ascontiguousarray(leaf).tobytes())
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
        "median_iteration_s": float(np.median(iteration_times)) if iteration_times else None,
        "mean_iteration_s": float(np.mean(iteration_times)) if iteration_times else None,
        "tokens_per_s": args.batch * args.seq_len / median,
        "mfu": flops / median / peaks.flops_per_s,
        "peak_flops_per_s": peaks.flops_per_s,
        "peak_source": peaks.source,
        "wall_s": time.perf_counter() - start,
        "param_checksum": checksum,
        "param_digest": digest.hexdigest(),
        "fault_tolerance_worker": ft_report,
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
        print(f"params sha256 {summary['param_digest'][:16]}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
