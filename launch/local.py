#!/usr/bin/env python3
"""Runs N copies of a command on this machine as one jax.distributed job.

    python launch/local.py --nproc 2 --devices-per-proc 4 -- vdiff train --workdir /tmp/w

Each child gets ``JAX_COORDINATOR_ADDRESS`` (a free localhost port),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; with ``--devices-per-proc`` it also gets
that many fake CPU devices (``--xla_force_host_platform_device_count``). Output lines
are prefixed with the child's rank. If a child fails, the others are stopped (SIGTERM,
then SIGKILL after ``--grace`` seconds). SIGTERM/SIGINT sent to the launcher are
passed on to every child, which then save a checkpoint and exit 0.

Exit code: 0 when every child exits 0; otherwise the code of the first child that
failed on its own (128 + N for death by signal N), which is the root cause (the
children stopped by the launcher afterwards do not mask it).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port free on localhost right now (the coordinator binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(
    rank: int, nproc: int, port: int, devices_per_proc: int, base: dict | None = None
) -> dict:
    """The environment of child ``rank``: JAX's distributed variables (+ fake devices)."""
    env = dict(os.environ if base is None else base)
    env.update(
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES=str(nproc),
        JAX_PROCESS_ID=str(rank),
        PYTHONUNBUFFERED="1",
    )
    if devices_per_proc:
        flags = env.get("XLA_FLAGS", "").split()
        flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
        flags.append(f"--xla_force_host_platform_device_count={devices_per_proc}")
        env["XLA_FLAGS"] = " ".join(flags)
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _pump(rank: int, stream, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        text = line.decode(errors="replace").rstrip("\n")
        with lock:
            print(f"[{rank}] {text}", flush=True)
    stream.close()


def launch(
    cmd: list[str], nproc: int, *, devices_per_proc: int = 0, grace: float = 5.0, port: int = 0
) -> int:
    """Starts ``nproc`` children of ``cmd``, waits for all; returns the job's exit code."""
    port = port or free_port()
    lock = threading.Lock()
    procs, pumps = [], []
    for rank in range(nproc):
        p = subprocess.Popen(
            cmd,
            env=child_env(rank, nproc, port, devices_per_proc),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # signals reach children only through the launcher
        )
        procs.append(p)
        t = threading.Thread(target=_pump, args=(rank, p.stdout, lock), daemon=True)
        t.start()
        pumps.append(t)

    def forward(signum, frame):
        print(f"[launch] signal {signum}: passing it to every process", flush=True)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    first_failure: tuple[int, int] | None = None
    try:
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                code = p.poll()
                if code not in (None, 0) and first_failure is None:
                    first_failure = (rank, _exit_code(code))
                    print(
                        f"[launch] process {rank} exited with {first_failure[1]}; "
                        "stopping the others",
                        flush=True,
                    )
                    _stop_all(procs, grace)
            time.sleep(0.05)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for t in pumps:
        t.join(timeout=5)
    codes = [_exit_code(p.returncode) for p in procs]
    if first_failure is None and any(codes):  # failures seen only after the loop ended
        first_failure = next((r, c) for r, c in enumerate(codes) if c)
    print(f"[launch] exit codes: {codes}", flush=True)
    return first_failure[1] if first_failure else 0


def _stop_all(procs: list[subprocess.Popen], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + grace
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [--nproc N] [--devices-per-proc D] [--grace S] -- COMMAND ...",
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes to start (default 2)")
    parser.add_argument(
        "--devices-per-proc",
        type=int,
        default=0,
        help="fake CPU devices per process (0: leave the platform's devices)",
    )
    parser.add_argument(
        "--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL"
    )
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: free)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("give the command to run after --, e.g. -- vdiff train --workdir W")
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    return launch(
        cmd,
        args.nproc,
        devices_per_proc=args.devices_per_proc,
        grace=args.grace,
        port=args.port,
    )


if __name__ == "__main__":
    sys.exit(main())
