"""What the benchmark tools share (`infer/bench.py`, `checkpoints/bench.py`): measures, records, the tool itself.

A tool registers cases (one measurement each, run in a fresh process so
that its peak memory is its own) and tables (rows built from cases, printed
as markdown and appended to a JSON result file for benchmarks/results/).
Every table names the card it ran on; ratios are taken against limits
measured in the same run, never against a data sheet.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

CASE_COMMAND = "_case"
# Where this library was imported from: a child puts it first on its path, so it measures the same code.
LIBRARY_ROOT = Path(__file__).resolve().parents[1]


def library_environment(xla_flags: str | None = None) -> dict[str, str]:
    """This process's environment for a child that must run this library (and extra XLA flags, if given)."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LIBRARY_ROOT), env.get("PYTHONPATH")]))
    if xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    return env


# --- timing and rates ---------------------------------------------------------------------------------------


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls of `fn`, after one call that compiles and touches everything."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth_test_bytes() -> int:
    """Size of a bandwidth test: many times a GPU's L2 cache; small on a CPU, where the number means nothing."""
    import jax

    return 1 << 31 if jax.default_backend() == "gpu" else 1 << 26


def measure_copy_bandwidth() -> float:
    """Bytes read plus written per second by a large device-to-device elementwise pass through JAX."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((bandwidth_test_bytes() // 2,), jnp.bfloat16)
    scale = jax.jit(lambda v: v * 2)
    return 2 * x.nbytes / median_time(lambda: scale(x).block_until_ready(), 20)


def measure_torch_copy_bandwidth() -> float | None:
    """Bytes read plus written per second by PyTorch's device-to-device copy, or None without a CUDA torch."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.empty(bandwidth_test_bytes(), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)

    def copy():
        b.copy_(a)
        torch.cuda.synchronize()

    return 2 * a.numel() / median_time(copy, 20)


def measure_bandwidths() -> dict[str, float]:
    """Memory bandwidth in bytes/s measured four ways, and `best`, the one a memory-bound limit is taken from.

    `copy`: an elementwise pass through JAX; `xla_copy`: XLA's plain copy;
    `read`: row sums of a large matrix, a read-only stream like one-row
    products; `torch_copy` where PyTorch sees a GPU. They disagree by card
    and by process, and a real workload can beat the slower ones, so only
    the best is a physical limit.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.ones((bandwidth_test_bytes() // 4 >> 13, 1 << 13), jnp.float32)
    copy = jax.jit(jnp.copy)
    row_sums = jax.jit(lambda v: v.sum(-1))
    found = {
        "copy": measure_copy_bandwidth(),
        "xla_copy": 2 * x.nbytes / median_time(lambda: copy(x).block_until_ready(), 20),
        "read": x.nbytes / median_time(lambda: row_sums(x).block_until_ready(), 20),
    }
    torch_copy = measure_torch_copy_bandwidth()
    if torch_copy:
        found["torch_copy"] = torch_copy
    return {**found, "best": max(found.values())}


def measure_matmul_rate(n: int | None = None) -> float:
    """FLOP/s of a square bfloat16 matmul of side `n`: the compute limit a model-FLOP utilisation is taken against.

    `n` defaults to 8192 on a GPU, and to 512 elsewhere, where the number only shows the plumbing works.
    """
    import jax
    import jax.numpy as jnp

    n = n or (8192 if jax.default_backend() == "gpu" else 512)
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
    mm = jax.jit(jnp.matmul)
    return 2 * n**3 / median_time(lambda: mm(a, b).block_until_ready(), 10)


# --- GPU kernels from a profiler trace ----------------------------------------------------------------------


def kernel_family(name: str) -> str:
    """A kernel's name without XLA's numbering: "all_reduce_43_0_fusion_1" -> "all_reduce_fusion"."""
    return re.sub(r"[_.]\d+(?=[_.]|$)", "", name)


def idle_before(events: list[tuple[float, float, str]]) -> tuple[dict[str, float], dict[str, int]]:
    """The time no kernel ran, by the family of the kernel that ended each wait: ({family: ns}, {family: waits}).

    `events` are (start, end, name) in ns; kernels that overlap (launched
    early, programmatic dependent launch) leave no wait between them.
    """
    times, counts = defaultdict(float), defaultdict(int)
    running_until = None
    for start, end, name in sorted(events):
        if running_until is not None and start > running_until:
            times[kernel_family(name)] += start - running_until
            counts[kernel_family(name)] += 1
        running_until = end if running_until is None else max(running_until, end)
    return times, counts


def profile_kernels(fn: Callable[[], object], steps: int, top: int = 25) -> dict:
    """Trace one call of `fn` (already compiled) and sum the GPU kernels it ran, per step.

    Returns the wall time per step, the span from the first kernel's start to
    the last one's end, the summed kernel time and kernel count per step, the
    `top` kernels by time, every kernel family (`kernel_family`: differently
    numbered copies of one kernel are one family) by time, and the time no
    kernel ran, in all and by the family of the kernel that ended each wait
    (`idle_before`).
    """
    import glob
    import tempfile

    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            wall = time.perf_counter() - start
        data = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    totals, counts = defaultdict(float), defaultdict(int)
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU:0"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                totals[event.name] += event.duration_ns
                counts[event.name] += 1
                events.append((event.start_ns, event.start_ns + event.duration_ns, event.name))
    first, last = (min(events)[0], max(end for _, end, _ in events)) if events else (0.0, 0.0)
    idle_times, idle_counts = idle_before(events)
    family_totals, family_counts = defaultdict(float), defaultdict(int)
    for name in totals:
        family_totals[kernel_family(name)] += totals[name]
        family_counts[kernel_family(name)] += counts[name]

    def ranking(times, calls, limit=None):
        return [{"kernel": name[:120], "calls_per_step": calls[name] / steps, "us_per_step": times[name] / steps / 1e3}
                for name in sorted(times, key=times.get, reverse=True)[:limit]]

    return {
        "wall_us_per_step": wall / steps * 1e6, "gpu_span_us_per_step": max(last - first, 0) / steps / 1e3,
        "kernel_us_per_step": sum(totals.values()) / steps / 1e3, "kernels_per_step": sum(counts.values()) / steps,
        "top": ranking(totals, counts, top), "families": ranking(family_totals, family_counts),
        "idle_us_per_step": sum(idle_times.values()) / steps / 1e3,
        "idle_before": ranking(idle_times, idle_counts, 10),
    }


# --- models and memory --------------------------------------------------------------------------------------


def random_device_model(model: str, dtype: str, layout: str = "per_layer", mesh: str | None = None,
                        weights: str = "float", vocab: str = "replicated", attention: str = "auto"):
    """(config, params): random parameters of preset `model` made on the device(s), on a mesh if one is named.

    Made leaf by leaf, one small random program per distinct leaf shape:
    quick to compile, and the peak memory is the model itself. Speed does
    not depend on the values; `layout` is "per_layer" or "stacked"
    (`pangu_jax.layouts`), `weights` "float" or "int8", `vocab` whether the
    embedding and head are "replicated" or "split" on a mesh.
    """
    import jax
    import jax.numpy as jnp

    from .config import PanguConfig
    from .layouts import per_layer
    from .model import abstract_params
    from .sharding import RULES, RULES_SPLIT_VOCAB, make_mesh, shardings_like

    config = PanguConfig.preset(model, param_dtype=dtype, dtype=dtype, weights=weights, attention=attention,
                                decode_attention=attention)
    rules = {"split": RULES_SPLIT_VOCAB, "replicated": RULES}[vocab]
    shapes = abstract_params(config)
    if layout == "per_layer":
        shapes = jax.eval_shape(per_layer, shapes)
    shardings = (jax.tree.map(lambda _: None, shapes) if mesh is None
                 else shardings_like(config, make_mesh(mesh), shapes, rules))

    @functools.cache
    def maker(shape, dtype, sharding):
        def make(key):
            if jnp.issubdtype(dtype, jnp.integer):
                return jax.random.randint(key, shape, -127, 128, dtype)
            return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        return jax.jit(make, out_shardings=sharding)

    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(shapes))))
    params = jax.tree.map(lambda a, s: maker(a.shape, a.dtype, s)(next(keys)), shapes, shardings,
                          is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    jax.block_until_ready(params)
    return config, params


def tree_bytes(tree) -> int:
    """Bytes of all arrays (or shapes) in a pytree."""
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def device_peaks(devices=None) -> list[int]:
    """Peak bytes in use on each device (0 where the backend keeps no statistics, as on a CPU)."""
    import jax

    return [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in (devices or jax.local_devices())]


def peak_device_bytes() -> int:
    """The largest peak bytes in use over this process's devices."""
    return max(device_peaks())


@dataclasses.dataclass(frozen=True)
class HostRun:
    """A command run to its end: seconds, and its peak memory on the host."""

    returncode: int
    seconds: float
    peak_anonymous_bytes: int  # what the process allocated (RssAnon, sampled)
    peak_rss_bytes: int  # its peak resident set, which also counts clean pages of files it mapped


def anonymous_bytes(pid: int) -> int:
    """Anonymous resident bytes of a process (RssAnon): what it allocated, not the file pages it mapped."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measuring_host_memory(command: list[str], interval: float = 0.05) -> HostRun:
    """Run `command` (with `library_environment`), sampling its anonymous memory every `interval` seconds.

    Linux only (/proc and wait4): the peak resident set is the child's own,
    not the largest of every child this process ever waited for.
    """
    start = time.perf_counter()
    child = subprocess.Popen(command, env=library_environment())
    anonymous = 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        anonymous = max(anonymous, anonymous_bytes(child.pid))
        time.sleep(interval)
    child.returncode = os.waitstatus_to_exitcode(status)
    return HostRun(child.returncode, time.perf_counter() - start, anonymous, usage.ru_maxrss * 1024)


# --- where it ran -------------------------------------------------------------------------------------------


def card_name() -> str:
    """The accelerator: its kind, how many, and JAX's version ("NVIDIA H200 x1 (jax 0.11.2)")."""
    import jax

    d = jax.devices()[0]
    return f"{getattr(d, 'device_kind', d.platform)} x{jax.device_count()} (jax {jax.__version__})"


def host_name() -> str:
    """The host, for measures of the CPU and its memory ("CPU host (2 cores, 24 GiB)")."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"CPU host ({cores} cores, {memory / 2**30:.0f} GiB)"


# --- tables and records -------------------------------------------------------------------------------------


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    """`rows` as a markdown table under a `## title` line; floats to 3 significant digits, missing cells empty."""
    print(f"\n## {title}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (row.get(c, "") for c in columns)]
        print("| " + " | ".join(cells) + " |")


def append_record(path: str | os.PathLike, command: str, card: str, rows: list[dict], **extra) -> None:
    """Add one run (date, card, `extra`, command, rows) to the JSON list in `path`."""
    path = Path(path)
    record = {"date": time.strftime("%Y-%m-%d"), "card": card, **extra, "command": command, "rows": rows}
    existing = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(existing + [record], indent=1))


@dataclasses.dataclass(frozen=True)
class Table:
    """What a table function returns: its rows, and the columns printed (the JSON record keeps every key)."""

    rows: list[dict]
    columns: list[str]


def failure(stderr: str) -> str:
    """The line of a failed case's stderr that says what failed: its last exception line, else its last line."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Interrupt|Exit)\b", line)]
    return (raised or lines or ["failed"])[-1]


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """A registered table: the function that builds it, and the one that names where it ran."""

    build: Callable[[argparse.Namespace], Table]
    card: Callable[[], str]


class BenchTool:
    """A benchmark command line: `python SCRIPT TABLE [options] [--json PATH]`.

    Cases (`@tool.case`) are functions of JSON-able keyword arguments that
    return one row; `tool.run_case` runs one in a fresh process of the
    script. Tables (`@tool.table(name)`) build their rows from cases and say
    which columns to print.
    """

    def __init__(self, script: str | os.PathLike, description: str) -> None:
        self.script = Path(script).resolve()
        self.description = description
        self.cases: dict[str, Callable[..., dict]] = {}
        self.tables: dict[str, TableSpec] = {}

    def case(self, fn: Callable[..., dict]) -> Callable[..., dict]:
        """Register `fn` as a case, named by its function name without `case_`."""
        self.cases[fn.__name__.removeprefix("case_")] = fn
        return fn

    def table(self, name: str, card: Callable[[], str] = card_name):
        """Register a function of the parsed arguments returning a `Table`; `card` names where it ran."""
        def register(build: Callable[[argparse.Namespace], Table]):
            self.tables[name] = TableSpec(build, card)
            return build
        return register

    def parser(self) -> argparse.ArgumentParser:
        """The tool's parser: the table's name and --json; a tool adds its own options."""
        p = argparse.ArgumentParser(description=self.description, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("table", choices=list(self.tables))
        p.add_argument("--json", help="append the rows to this JSON file (benchmarks/results/)")
        return p

    def run_case(self, name: str, xla_flags: str | None = None, **kwargs) -> dict:
        """Case `name` in a fresh process (extra XLA flags if given): its row, or the row's arguments and an error."""
        if name not in self.cases:
            raise ValueError(f"no case {name!r}; cases: {', '.join(self.cases)}")
        done = subprocess.run([sys.executable, str(self.script), CASE_COMMAND, name, json.dumps(kwargs)],
                              capture_output=True, text=True, env=library_environment(xla_flags))
        if done.returncode:
            return {"case": name, **kwargs, "error": failure(done.stderr)}
        return json.loads(done.stdout.strip().splitlines()[-1])

    def main(self, argv: list[str] | None, parse_args: Callable[[list[str]], argparse.Namespace]) -> None:
        """Run one case (as `run_case` calls it) or build, print and record one table."""
        argv = sys.argv[1:] if argv is None else list(argv)
        if argv[:1] == [CASE_COMMAND]:
            print(json.dumps(self.cases[argv[1]](**json.loads(argv[2]))))
            return
        args = parse_args(argv)
        spec = self.tables[args.table]
        card = spec.card()
        table = spec.build(args)
        print_table(f"{args.table} on {card}, {time.strftime('%Y-%m-%d')}", table.rows, table.columns)
        if args.json:
            command = f"python {self.script.parent.name}/{self.script.name} " + " ".join(argv)
            append_record(args.json, command, card, table.rows, table=args.table)
