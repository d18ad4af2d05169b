"""Terminal output for the presentation side (cli, batch status): rich on a terminal, plain lines without.

Without a TTY (CI, log files, `ray job logs`) tables are aligned plain text with no box characters and
no colour, so they stay readable in a log and greppable in tests.
"""

from __future__ import annotations

import re
import sys
from typing import IO, Any, Sequence


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def table_text(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str]],
               *, right: Sequence[str] = ()) -> str:
    """Plain aligned table: a title line, a header, one line per row (columns in `right` right-aligned)."""
    widths = [max([len(c)] + [len(str(r[i])) for r in rows]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(v).rjust(w) if columns[i] in right else str(v).ljust(w)
                 for i, (v, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out.append(line(columns))
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str]],
                *, right: Sequence[str] = (), stream: IO[str] | None = None) -> None:
    """A rich table on a terminal, `table_text` otherwise."""
    stream = stream or sys.stdout
    if not is_terminal(stream):
        print(table_text(title, columns, rows, right=right), file=stream, flush=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        table.add_column(c, justify="right" if c in right else "left")
    for r in rows:
        table.add_row(*[str(v) for v in r])
    Console(file=stream).print(table)


class RunProgress:
    """The `run` command's display: a live rich bar on a terminal (trials done/total, ETA, best point so
    far, workers busy) with the step lines printed above it; without a TTY, the plain lines only.

    Use as a context manager; `line` and `trial` are the driver's `progress` and `on_trial` callbacks.
    """

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream or sys.stdout
        self.live = is_terminal(self.stream)
        self._bar = None
        self._task = None

    def __enter__(self) -> RunProgress:
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("trials"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[best]}"),
                                 TextColumn("{task.fields[busy]}"), console=Console(file=self.stream),
                                 transient=True)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def trial(self, update: object) -> None:
        """A driver TrialUpdate: the plain line, and on a terminal the bar moves."""
        self.line(update.line())  # type: ignore[attr-defined]
        if self._bar is None:
            return
        u = update
        best = "" if u.best is None else f"best {u.best[0]}/{u.n_bad} at KL {u.best[1]:.3g} (#{u.best[2]})"
        busy = "" if u.workers is None else f"workers busy {u.busy_workers}/{u.workers}"
        if getattr(u, "pending_workers", None):
            busy += f" (+{u.pending_workers} pending)"
        if self._task is None:
            self._task = self._bar.add_task("trials", total=u.n_trials, best=best, busy=busy)
        self._bar.update(self._task, completed=u.done, best=best, busy=busy)


def workers_line(pool: dict[str, Any]) -> str:
    """run_info.json's "pool" (the driver's last record): ready workers per node, and pending ones."""
    by_node: dict[str, list[str]] = {}
    for worker, node in pool.get("ready", {}).items():
        by_node.setdefault(node[:12] or "?", []).append(worker)
    nodes = "; ".join(f"node {node}: {', '.join(workers)}" for node, workers in sorted(by_node.items()))
    pending = list(pool.get("pending", []))
    return (f"workers: {sum(map(len, by_node.values()))} ready" + (f" ({nodes})" if nodes else "")
            + f", {len(pending)} pending" + (f" ({', '.join(pending)})" if pending else "")
            + f" (recorded {pool.get('updated', '?')})")


def print_front(front: list[dict[str, Any]], base_refusals: Any, n_bad: Any,
                evaluation: list[dict[str, Any]] | None = None) -> None:
    """The Pareto front table (search/front.py's one front) that run and status print; with an
    evaluation (evaluation.parquet's latest rows), its judged refusals as one more column."""
    from .search.front import front_table

    cells = front_table(front)
    columns = ["trial", "refusals", "KL", "scope", "index"]
    rows = [[c["trial"], c["refusals"], c["KL"], c["scope"], c["index"]] for c in cells]
    if evaluation:
        from .evaluation.rows import evaluated_refusals

        judged = {str(r["trial"]): evaluated_refusals(r) for r in evaluation}
        columns.append(f"evaluated refusals ({evaluation[0]['judge']}, {evaluation[0]['max_response_length']} tokens)")
        rows = [row + [judged.get(row[0], "-")] for row in rows]
    print_table(f"Pareto front (base model: {base_refusals}/{n_bad} refusals, KL 0)", columns, rows,
                right=["trial", "refusals", "KL", *columns[5:]])


def print_geometry(rows: list[dict[str, Any]]) -> None:
    from .research.geometry import COLUMNS

    print_table("Residual geometry per layer (g, b: means; g*, b*: geometric medians; r = b - g)",
                ["layer", *COLUMNS], [[r["layer"], *(f"{r[c]:.4f}" for c in COLUMNS)] for r in rows],
                right=["layer", *COLUMNS])


def print_evaluation(rows: list[dict[str, Any]]) -> None:
    from .evaluation.rows import table_cells

    headers, cells = table_cells(rows)
    title = "Evaluation of the candidates"
    if rows:
        r = rows[0]
        kl = f", KL over {r['kl_tokens']} tokens" if r.get("kl_tokens") else ""
        title += f" (judge {r['judge']}, {r['max_response_length']}-token replies{kl})"
    print_table(title, headers, cells, right=headers[1:])


RAY_ERROR_THREAD = "ray_listen_error_messages"  # Ray's driver thread that prints cluster errors
RAYLET_PREFIX = re.compile(r"(\x1b\[\d+m)?\(raylet\)(\x1b\[0m)? ")  # how Ray starts the messages it prints


class RayErrorFilter:
    """A stream wrapper for sys.stdout/sys.stderr: what Ray's error-listener thread prints (a lost
    node's "Raylet is terminated ... Last 20 lines of the Raylet logs", other nodes' errors) becomes one
    line each, "(ray) ..."; everything else passes unchanged. Ray prints those from its own thread,
    whatever log_to_driver says, straight into the user's terminal."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self._last = ""
        self._said: set[str] = set()
        self._after_ray = False  # the newline print() writes after a message of Ray's is Ray's too

    def write(self, text: str) -> int:
        import threading

        # Ray's log deduplicator holds some messages back and prints them at ray.shutdown(), from the
        # caller's thread: those are known by their "(raylet)" prefix
        from_listener = threading.current_thread().name == RAY_ERROR_THREAD
        if not from_listener and not RAYLET_PREFIX.match(text):
            if text == "\n" and self._after_ray:
                self._after_ray = False
                return len(text)
            self._after_ray = False
            return self.stream.write(text)
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        self._after_ray = bool(first)
        if not first:
            return len(text)
        first = first.replace("\x1b[33m", "").replace("\x1b[0m", "")
        if "Raylet is terminated" in first:
            first = "a node's raylet ended unexpectedly: that node is lost (its workers are replaced)"
        dead = re.search(r"node id: (\w+) and address: (\S+) .*has been marked dead because (.*?)\.", first)
        if dead:
            first = f"node {dead.group(1)[:12]} ({dead.group(2)}) was marked dead: {dead.group(3)}"
        line = f"(ray) {first.removeprefix('(raylet) ')[:300]}\n"
        # Ray says a node loss twice (raylet and GCS): once is enough; what its deduplicator held back
        # and prints at shutdown was said already when it happened
        if line != self._last and (from_listener or line not in self._said):
            self.stream.write(line)
        self._last = line
        self._said.add(line)
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def filter_ray_errors() -> None:
    """Install RayErrorFilter on sys.stdout and sys.stderr (the CLI calls this once)."""
    if not isinstance(sys.stdout, RayErrorFilter):
        sys.stdout = RayErrorFilter(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, RayErrorFilter):
        sys.stderr = RayErrorFilter(sys.stderr)  # type: ignore[assignment]
