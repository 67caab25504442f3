"""Benchmark our server against docker-registry in proxy mode on one upstream.

Run it with `make bench` (or `.venv/bin/python tests/bench/bench.py --help`).
Both servers pull from the same docker-registry upstream on 127.0.0.1, each
from a fresh cache, pinned to one core; this process, the load generator,
runs on the other core. Every scenario is bounded in seconds; each is run
`--repeat` times and the table shows medians, the ratio ours / anchor and
whether the target of issue 7 is met.
"""

from __future__ import annotations

# gevent must patch sockets before urllib3 and the test support import them.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS.parent
sys.path[0:1] = [str(TESTS), str(REPO_ROOT)]

from bench import report, scenarios  # noqa: E402
from bench.imageset import ImageSet, make_image_set, push_image_set  # noqa: E402
from bench.scenarios import Subject  # noqa: E402
from bench.servers import (  # noqa: E402
    OurServer,
    QuietRegistry,
    start_anchor,
    start_upstream,
)
from bench.startup import time_startup, write_cache  # noqa: E402

GROUPS = ("cold", "herd", "warm", "manifest", "blob", "startup")
Samples = dict[str, list[float]]


@dataclass(frozen=True)
class Sizes:
    """How big and how long: the full run, or a smoke run of a few seconds."""

    small: int = 200
    multi_arch: int = 3
    multi_layer: int = 1 << 20
    big: int = 512 << 20
    cold_clients: int = 8
    warm_clients: int = 16
    warm_seconds: float = 10.0
    rate_clients: int = 16
    rate_seconds: float = 5.0
    herd_clients: int = 20
    big_warm_gets: int = 3
    big_parallel_clients: int = 10
    startup_manifests: int = 10_000


SMOKE = Sizes(
    small=4,
    multi_arch=1,
    multi_layer=64 << 10,
    big=4 << 20,
    warm_seconds=1.0,
    rate_seconds=1.0,
    rate_clients=4,
    herd_clients=5,
    big_warm_gets=1,
    big_parallel_clients=2,
    startup_manifests=100,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs per scenario")
    parser.add_argument(
        "--only", default="", help=f"comma-separated groups of {','.join(GROUPS)}"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny set, one run")
    parser.add_argument("--json", default="bench-results.json", help="results file")
    parser.add_argument("--workers", type=int, default=1, help="our `workers`")
    parser.add_argument("--servers", default="anchor,ours", help="which to measure")
    parser.add_argument("--server-cpus", default="0", help="taskset list, servers")
    parser.add_argument("--client-cpus", default="1", help="taskset list, this")
    parser.add_argument(
        "--ours-command",
        default=str(REPO_ROOT / "bin" / "ociregistry"),
        help="how to run our server (e.g. 'python -m ociregistry')",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="niceness of this run and every process it starts (needs root "
        "below 0), to keep other work on the machine from skewing figures",
    )
    parser.add_argument("--workdir", default="", help="keep files here")
    parser.add_argument("--profile", default="", help="py-spy raw profiles to DIR")
    args = parser.parse_args(argv)
    args.groups = set(args.only.split(",")) if args.only else set(GROUPS)
    unknown = args.groups - set(GROUPS)
    if unknown:
        parser.error(f"unknown groups: {', '.join(sorted(unknown))}")
    if args.smoke:
        args.repeat = 1
    return args


def pin_self(cpus: str, niceness: int) -> None:
    """Run this process (and the tools it starts) on the client CPUs.

    The niceness is inherited by every server started here, anchor and ours
    alike.
    """
    if cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
    if niceness:
        try:
            os.nice(niceness)
        except PermissionError:
            say(f"cannot set niceness {niceness}: running at the default")


AUTOGROUP = Path("/proc/self/autogroup")


def set_autogroup_nice(niceness: int) -> int | None:
    """Weigh this session's scheduling group; return the previous niceness.

    With autogroup scheduling, CPU is shared between sessions first, so a
    process's own niceness barely counts against other sessions' work.
    """
    try:
        previous = int(AUTOGROUP.read_text().split()[-1])
        AUTOGROUP.write_text(str(niceness))
    except (OSError, ValueError, IndexError):
        return None
    return previous


class Bench:
    """One benchmark run: the upstream, the image set, the servers, the figures."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.sizes = SMOKE if args.smoke else Sizes()
        self.workdir = workdir
        self.samples: dict[str, Samples] = {
            "anchor": defaultdict(list),
            "ours": defaultdict(list),
        }
        self.images = ImageSet()
        self.upstream: QuietRegistry | None = None

    def prepare(self) -> None:
        """Start the upstream and push the image set to it."""
        sizes = self.sizes
        started = time.monotonic()
        self.images = make_image_set(
            sizes.small,
            sizes.multi_arch,
            self.args.repeat,
            sizes.big,
            sizes.multi_layer,
        )
        self.drop_unused_images()
        self.upstream = start_upstream(self.workdir / "upstream")
        push_image_set(self.upstream.url, self.images)
        say(f"upstream {self.upstream.url} ready in {time.monotonic() - started:.1f}s")

    def drop_unused_images(self) -> None:
        """Push only what the chosen scenario groups pull."""
        groups = self.args.groups
        if not groups & {"cold", "warm", "manifest"}:
            self.images.small.clear()
        if "cold" not in groups:
            self.images.multi_arch.clear()
        if "herd" not in groups:
            self.images.herd.clear()
        if "blob" not in groups:
            self.images.big = None

    def run(self) -> None:
        """Run every repetition: the anchor's round, then ours."""
        servers = self.args.servers.split(",")
        for repetition in range(self.args.repeat):
            if "anchor" in servers:
                self.record("anchor", self.anchor_round(repetition))
            if "ours" in servers:
                self.record("ours", self.our_round(repetition))
                if "startup" in self.args.groups:
                    self.record("ours", self.startup_round(repetition))

    def record(self, server: str, figures: dict[str, float]) -> None:
        """Add one round's figures to the samples."""
        for key, value in figures.items():
            self.samples[server][key].append(value)

    def anchor_round(self, repetition: int) -> dict[str, float]:
        """Start a fresh anchor, run the scenarios, stop it."""
        assert self.upstream is not None
        workdir = self.workdir / f"anchor-{repetition}"
        anchor = start_anchor(workdir, self.upstream, self.args.server_cpus)
        try:
            subject = Subject(
                "anchor",
                anchor.target(),
                anchor.pid,
                scenarios.anchor_blob_file(anchor.storage_path),
            )
            return self.scenarios(subject, repetition)
        finally:
            anchor.stop()
            scenarios.remove_tree(workdir)

    def our_round(self, repetition: int) -> dict[str, float]:
        """Start our server on a fresh cache, run the scenarios, stop it."""
        workdir = self.workdir / f"ours-{repetition}"
        server = self.our_server(workdir, workdir / "cache").start()
        try:
            subject = Subject(
                "ours",
                server.target(),
                server.pid,
                scenarios.our_blob_file(server.image_path),
            )
            return self.scenarios(subject, repetition)
        finally:
            server.stop()
            scenarios.remove_tree(workdir)

    def our_server(self, workdir: Path, image_path: Path) -> OurServer:
        """Describe our server with the run's command, CPUs and workers."""
        assert self.upstream is not None
        command = shlex.split(self.args.ours_command)
        if "/" in command[0]:
            command[0] = os.path.abspath(command[0])
        return OurServer(
            command,
            workdir,
            image_path,
            self.upstream,
            cpus=self.args.server_cpus,
            workers=self.args.workers,
        )

    def startup_round(self, repetition: int) -> dict[str, float]:
        """Time our start-up on a cache of many manifests written beforehand."""
        assert self.upstream is not None
        workdir = self.workdir / f"startup-{repetition}"
        root = workdir / "cache"
        count = self.sizes.startup_manifests
        path = write_cache(root, self.upstream.host_port, count)
        try:
            seconds = time_startup(self.our_server(workdir, root), path)
        finally:
            scenarios.remove_tree(workdir)
        say(f"ours: start-up with {count} manifests: {seconds:.2f}s")
        return {"startup_s": seconds}

    def scenarios(self, subject: Subject, repetition: int) -> dict[str, float]:
        """Run the chosen scenario groups against one fresh server."""
        groups, sizes, images = self.args.groups, self.sizes, self.images
        target = subject.target
        figures: dict[str, float] = {}

        if "cold" in groups:
            seconds = scenarios.pull_all(target, images.cold_set, sizes.cold_clients)
            figures["cold_set_s"] = seconds
            self.show(subject, "cold set", f"{seconds:.2f}s")
        elif groups & {"warm", "manifest"}:
            scenarios.pull_all(target, list(images.small), sizes.cold_clients)

        if "herd" in groups:
            assert self.upstream is not None
            name = list(images.herd)[repetition]
            figures.update(
                scenarios.herd(target, self.upstream, name, sizes.herd_clients)
            )
            self.show(subject, "herd", figures["herd_upstream_gets_per_blob"])

        if "warm" in groups:
            with self.profiling(subject, "warm", sizes.warm_seconds):
                figures.update(
                    scenarios.warm_pulls(
                        subject,
                        list(images.small),
                        sizes.warm_clients,
                        sizes.warm_seconds,
                    )
                )
            self.show(subject, "warm", _pick(figures, "warm_"))

        if "manifest" in groups:
            name, index = next(iter(images.small.items()))
            with self.profiling(subject, "manifest", 4 * sizes.rate_seconds):
                figures.update(
                    scenarios.manifest_rates(
                        target,
                        name,
                        index.digest,
                        sizes.rate_clients,
                        sizes.rate_seconds,
                        self.args.client_cpus,
                    )
                )
            self.show(subject, "manifests", _pick(figures, "manifest_"))

        if "blob" in groups and images.big is not None:
            with self.profiling(subject, "blob-cold", 20):
                figures.update(scenarios.big_cold(subject, images.big))
            with self.profiling(subject, "blob-warm", 20):
                figures.update(
                    scenarios.big_warm(target, images.big, sizes.big_warm_gets)
                )
            figures.update(
                scenarios.big_parallel(subject, images.big, sizes.big_parallel_clients)
            )
            self.show(subject, "big blob", _pick(figures, "big_"))
        return figures

    def show(self, subject: Subject, what: str, value: Any) -> None:
        """Print progress."""
        say(f"{subject.name}: {what}: {value}")

    def profiling(self, subject: Subject, name: str, seconds: float) -> Any:
        """Record a py-spy profile of our server during a scenario, if asked."""
        return Profiler(self.args.profile, subject, name, seconds)

    def report(self) -> dict[str, Any]:
        """Return medians, the table rows and the raw samples."""
        anchor = report.medians(self.samples["anchor"])
        ours = report.medians(self.samples["ours"])
        return {
            "settings": {
                "repeat": self.args.repeat,
                "smoke": self.args.smoke,
                "workers": self.args.workers,
                "server_cpus": self.args.server_cpus,
                "client_cpus": self.args.client_cpus,
                "nice": self.args.nice,
                "sizes": self.sizes.__dict__,
            },
            "rows": report.rows(anchor, ours),
            "medians": {"anchor": anchor, "ours": ours},
            "samples": {name: dict(values) for name, values in self.samples.items()},
        }

    def close(self) -> None:
        """Stop the upstream."""
        if self.upstream is not None:
            self.upstream.stop()
            self.upstream = None


class Profiler:
    """A context manager running `py-spy record` on our server, when asked."""

    def __init__(self, directory: str, subject: Subject, name: str, seconds: float):
        self.directory = directory if subject.name == "ours" else ""
        self.subject = subject
        self.name = name
        self.seconds = seconds
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        if self.directory:
            Path(self.directory).mkdir(parents=True, exist_ok=True)
            output = Path(self.directory) / f"{self.name}.txt"
            self.process = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--nonblocking",
                    "-f",
                    "raw",
                    "-r",
                    "100",
                    "-o",
                    str(output),
                    "-p",
                    str(self.subject.pid),
                    "-d",
                    str(int(self.seconds) + 5),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _pick(figures: dict[str, float], prefix: str) -> str:
    return ", ".join(
        f"{key[len(prefix) :]}={value:.3g}"
        for key, value in figures.items()
        if key.startswith(prefix)
    )


def say(message: str) -> None:
    """Print a progress line on stderr."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    """Run the benchmark; print the table; write the JSON."""
    args = parse_args(argv)
    pin_self(args.client_cpus, args.nice)
    previous_nice = set_autogroup_nice(args.nice) if args.nice else None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="ociregistry-bench-"))
    bench = Bench(args, workdir)
    try:
        bench.prepare()
        bench.run()
    finally:
        bench.close()
        if previous_nice is not None:
            set_autogroup_nice(previous_nice)
        if not args.workdir:
            scenarios.remove_tree(workdir)
    results = bench.report()
    print(report.format_table(results["rows"]))
    report.write_json(Path(args.json), results)
    say(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
