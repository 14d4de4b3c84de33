"""What every command shares: parameter types, the errors a command exits with, the console."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import click

from fracgpu import units


class SizeParam(click.ParamType):
    """A size as people write it ("4GiB", "512MiB", "4GB", "1048576")."""

    name = "SIZE"

    def __init__(self, allow_zero: bool = False):
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return units.parse_size(value, allow_zero=self.allow_zero)
        except (TypeError, ValueError) as e:
            self.fail(str(e), param, ctx)


def checked_by(check: Any) -> Any:
    """An option callback: the value stays as written, but ``check(value)`` must accept it
    (its ValueError is a usage error naming the option)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            try:
                check(value)
            except (TypeError, ValueError) as e:
                raise click.BadParameter(str(e), ctx=ctx, param=param) from None
        return value

    return callback


def converted_by(convert: Any) -> Any:
    """An option callback: the value becomes ``convert(value)`` (its ValueError is a usage error
    naming the option)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return convert(value)
        except (TypeError, ValueError) as e:
            raise click.BadParameter(str(e), ctx=ctx, param=param) from None

    return callback


def quota_options(memory_help: str, compute_help: str) -> Any:
    """``--memory SIZE``, ``--compute SHARE`` and ``--cap``, the options that make a quota and a share;
    the library parses them (``option_errors`` makes its refusals usage errors on them)."""
    options = [click.option("--memory", metavar="SIZE", help=memory_help),
               click.option("--compute", metavar="SHARE", help=compute_help),
               click.option("--cap", is_flag=True, help="Make the --compute share a ceiling, even on an idle GPU.")]

    def decorate(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def complete_priorities(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of a priority class."""
    return [klass for klass in units.PRIORITIES if klass.startswith(incomplete)]


def complete_partitions(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of a partition name: those of the state folder, each with its GPU; none when
    the state cannot be read (completion never prints an error into the shell)."""
    from click.shell_completion import CompletionItem

    from fracgpu import state

    try:
        found = state.partition_names()
    except (state.StateError, OSError):
        return []
    return [CompletionItem(name, help=gpu) for name, gpu in found if name.startswith(incomplete)]


def complete_devices(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of a GPU index, as CUDA numbers them here, each with its GPU's name."""
    from click.shell_completion import CompletionItem

    from fracgpu import devices

    try:
        found = devices.probe()
    except devices.DeviceError:
        return []
    return [CompletionItem(str(d.index), help=d.name) for d in found if str(d.index).startswith(incomplete)]


def device_option(help_text: str, **kwargs: Any) -> Any:
    """``--device N``: a GPU by the CUDA index a job started here would use (completed from the driver)."""
    return click.option("--device", "device_index", type=click.IntRange(min=0), metavar="N", help=help_text,
                        shell_complete=complete_devices, **kwargs)


def log_format_option(from_environment: bool = True) -> Any:
    """``--log-format text|json`` for a service: how its messages on stderr are written (``fracgpu.log``).
    Without it, ``FRACGPU_LOG_FORMAT`` decides, or (``from_environment`` False: a command that runs in a
    user's environment and takes nothing from it, such as the Slurm prolog) text."""
    from fracgpu import log

    def choose(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        log.set_format(value if value is not None or from_environment else "text")
        try:
            log.current_format()
        except ValueError as e:
            raise click.BadParameter(str(e), ctx=ctx, param=param) from None
        return value

    default = "$FRACGPU_LOG_FORMAT, else text" if from_environment else "text"
    return click.option("--log-format", type=click.Choice(log.FORMATS), callback=choose, expose_value=False,
                        is_eager=True, help="How messages on stderr are written: text, or json (one object a "
                                            f"line). [default: {default}]")


def priority_option(help_text: str) -> Any:
    """``--priority high|normal|low``; the library parses it (a bad value is a usage error naming the
    accepted ones)."""
    return click.option("--priority", metavar="[high|normal|low]", help=help_text, shell_complete=complete_priorities)


PRIORITY_HELP = ("Priority class at the launch gate: high (served first, its queued neighbours kept one kernel "
                 "deep; a --compute share holds it back only while others are busy), normal, or low (only what "
                 "the others leave). [default: normal]")


def overcommit_option(what: str) -> Any:
    """``--overcommit``: accept a memory limit or compute share that does not fit beside what the GPU
    has promised; ``what`` says whose."""
    return click.option("--overcommit", is_flag=True,
                        help=f"Accept {what} even when it does not fit beside the limits the GPU has promised "
                             "already; it is then best effort: a ceiling, not a promise.")


CAP_WITHOUT_SHARE = "--cap needs --compute SHARE (the share to cap at)"


@contextlib.contextmanager
def option_errors(ctx: click.Context) -> Iterator[None]:
    """The library's refusal of an option's value (``jobs.OptionError``) as a usage error on that
    option, and a cap without a share as the usage error that says so."""
    from fracgpu import jobs

    try:
        yield
    except jobs.OptionError as e:
        param = next((p for p in ctx.command.params if p.name == e.field), None)
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    except jobs.CapWithoutShare:
        raise click.UsageError(CAP_WITHOUT_SHARE, ctx) from None


def job_spec(ctx: click.Context, **options: Any) -> Any:
    """The job's options (``memory``, ``compute``, ``cap``, ``priority``, ``partition``, ``oom_wait``) parsed once
    into a ``jobs.JobSpec``; a bad value is a usage error on its option."""
    from fracgpu import jobs

    try:
        with option_errors(ctx):
            return jobs.JobSpec.parse(**options)
    except jobs.ConflictingChoice:
        if options.get("priority") is not None and options.get("partition") is not None:
            raise click.UsageError(f"a job in partition '{options['partition']}' runs at that partition's "
                                   "priority: change it with `fracgpu partition set "
                                   f"{options['partition']} --priority {options['priority']}`, or drop "
                                   "--partition (a private partition)", ctx) from None
        raise click.UsageError("give --memory SIZE, --compute SHARE [--cap] and/or --priority CLASS (a private "
                               "partition), or --partition NAME (an existing one), not both", ctx) from None


class CommandFailed(click.ClickException):
    """The command to run could not be started: status 127 when it was not
    found and 126 when it could not be executed, as env(1) and the shells do."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class InputError(click.ClickException):
    """Bad input, or a state that must not be used: one line on stderr and exit status 2,
    as for usage errors (125 from a command that runs another: ``CommandRunner``)."""

    exit_code = 2


# What a command that runs another exits with when it refuses or fails before that command
# starts, as env(1), timeout(1) and docker run do: not a status the command itself could
# have given (2 is a usage error of the command's own, 126 and 127 are the shells').
REFUSED = 125


class CommandRunner(click.Command):
    """A command that runs another (``fracgpu run``, ``fracgpu sim run``): every refusal of its own,
    click's usage errors (an unknown option, a bad value) included, exits ``REFUSED``, so a
    scheduler can tell it from the command's own status; ``CommandFailed`` keeps 126 and 127."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with refused_before_start():   # the options are parsed here
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with refused_before_start():
            return super().invoke(ctx)


@contextlib.contextmanager
def refused_before_start() -> Iterator[None]:
    """Every ``click.ClickException`` but ``CommandFailed`` leaves with status ``REFUSED``."""
    try:
        yield
    except CommandFailed:
        raise
    except click.ClickException as e:
        e.exit_code = REFUSED
        raise


def needs_kubernetes_extra(command: str) -> None:
    """InputError saying what to install when ``fracgpu COMMAND`` lacks the kubernetes extra (gRPC, the
    kubernetes client), rather than a traceback from an import deep inside it."""
    try:
        import grpc  # noqa: F401
        import kubernetes  # noqa: F401
    except ImportError as e:
        raise InputError(f"fracgpu {command} needs the kubernetes extra ({e.name} is not installed): "
                         "pip install 'fracgpu[kubernetes]'") from None


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """The library's refusals (a bad value, an unsafe or damaged state, no GPU, fracgpu not
    fully installed) as InputError: the message, no traceback."""
    from fracgpu.devices import DeviceError
    from fracgpu.state import StateError

    try:
        yield
    except (ValueError, StateError, DeviceError, FileNotFoundError, PermissionError) as e:
        raise InputError(str(e)) from None


def console(stderr: bool = False) -> Any:
    """A rich console for tables; when not on a terminal and no COLUMNS is set, wide enough
    that rows of a usual view stay on one line for scripts."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    return Console(width=width, stderr=stderr)


def tables(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[str]], width: int,
           styles: Sequence[str | None] | None = None, title: str | None = None) -> list[Any]:
    """``rows`` under ``columns`` (header, justify) as one rich table, or, when that table would be
    wider than ``width``, as several narrower ones, each repeating the first column (the row's name),
    so that at 80 columns a cell is never folded over lines (only a name is: one too long for any
    width, or one wider than half of it, such as a job's command line, which is wrapped in a third
    of the width when that leaves the other columns fewer tables)."""
    from rich.cells import cell_len
    from rich.table import Table

    def needs(i: int) -> int:   # a column's width: its header or its widest cell, and the border and padding
        return 3 + max(cell_len(line) for text in [columns[i][0], *(row[i] for row in rows)]
                       for line in text.splitlines() or [""])

    rest = list(range(1, len(columns)))

    def split(lead: int) -> list[list[int]]:
        """As few tables as fit beside a first column ``lead`` wide, the columns in order; of the ways to
        cut them into that many, the one whose widest table is narrowest (so that memory and compute
        columns part, rather than leave one alone)."""
        def table_width(group: Sequence[int]) -> int:
            return 1 + lead + sum(needs(i) for i in group)

        for count in range(1, len(rest) + 1):
            cuts = [[rest[a:b] for a, b in zip((0, *points), (*points, len(rest)))]
                    for points in itertools.combinations(range(1, len(rest)), count - 1)]
            fitting = [c for c in cuts if all(table_width(g) <= width for g in c)]
            if fitting or count == len(rest):
                return min(fitting or cuts, key=lambda c: max(table_width(g) for g in c))
        return [rest]

    lead, best = needs(0), split(needs(0))
    narrow = max(20, width // 3)
    if lead > width // 2 and len(split(narrow)) < len(best):
        lead, best = narrow, split(narrow)
    out = []
    for group in ([0, *group] for group in best):
        table = Table(title=title if not out else None)
        for i in group:
            header, justify = columns[i]
            # Only the name folds (a name wider than its column); numbers and sizes stay whole.
            table.add_column(header, justify=justify, overflow="fold", no_wrap=i != 0,
                             max_width=lead - 3 if i == 0 and lead < needs(0) else None)
        for n, row in enumerate(rows):
            table.add_row(*(row[i] for i in group), style=styles[n] if styles else None)
        out.append(table)
    return out


NAME_WIDTH = 20   # what a name (a job's, a command line) keeps at least when a table must be narrowed


def fit(columns: Sequence[tuple[str, str, int]], rows: Sequence[Sequence[str]], width: int) -> Any:
    """``rows`` as one borderless table at most ``width`` wide, one line per row. ``columns`` are
    (header, justify, rank). Names (left-justified columns after the first, such as a job's name or a
    command line) count as at most ``NAME_WIDTH`` wide; then the least essential columns (highest rank,
    the rightmost first) are left out until the table fits, and what room is left goes back to the
    names, which are cut with an ellipsis only past it. Figures are never cut; only when the rank-0
    columns alone are too wide does the terminal cut the line."""
    from rich.cells import cell_len
    from rich.table import Table

    def needs(i: int) -> int:
        return max(cell_len(text) for text in [columns[i][0], *(row[i] for row in rows)])

    def shrinkable(i: int) -> bool:
        return i > 0 and columns[i][1] == "left"

    def least(i: int) -> int:
        return min(needs(i), max(cell_len(columns[i][0]), NAME_WIDTH)) if shrinkable(i) else needs(i)

    def total(kept: list[int]) -> int:
        return sum(least(i) for i in kept) + 2 * (len(kept) - 1)

    kept = list(range(len(columns)))
    while total(kept) > width:
        droppable = [i for i in kept if columns[i][2] > 0]
        if not droppable:
            break
        kept.remove(max(droppable, key=lambda i: (columns[i][2], i)))
    room, widths = max(0, width - total(kept)), {}
    for i in kept:
        widths[i] = least(i)
        if shrinkable(i):
            grow = min(room, needs(i) - widths[i])
            widths[i], room = widths[i] + grow, room - grow
    # No borders: a header line and one line per row, so a terminal of 24 lines holds a busy GPU.
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    for i in kept:
        header, justify, _ = columns[i]
        table.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis", width=widths[i])
    for row in rows:
        table.add_row(*(row[i] for i in kept))
    return table


def share_text(partition: Any) -> str:
    """A partition's compute share as the tables show it: "25%", "25% cap", "25% best effort"
    (overcommitted: weighed within what the promised shares leave), or "-"."""
    if not partition.compute_share:
        return "-"
    return units.format_share(partition.compute_share) + (" cap" if partition.compute_cap else "") + \
        (" best effort" if partition.compute_best_effort else "")


def drift_text(drift: int | None, unknown: int = 0) -> str:
    """A drift (what the device reports less the books) as the tables show it: "+4MiB" (memory the
    books missed), "-2MiB" (the books ahead), "0", "-" (not measured yet); "?" where the device
    does not list a process, after the known part when there is one ("+4MiB ?")."""
    if drift is None or (drift == 0 and unknown):
        return "?" if unknown else "-"
    text = "0" if drift == 0 else ("+" if drift > 0 else "-") + units.format_size(abs(drift))
    return text + " ?" if unknown else text


def partition_label(partition: Any) -> str:
    """A partition's name as the tables show it, with what sets it apart: "team", "run-42 (private)",
    "serve (high)", "run-43 (private, low)" (normal priority goes without saying)."""
    tags = (["private"] if partition.ephemeral else []) + \
        ([partition.priority] if partition.priority != "normal" else [])
    return partition.name + (f" ({', '.join(tags)})" if tags else "")


def limit_text(partition: Any) -> str:
    """A partition's memory limit as the tables show it: "4GiB", "4GiB best effort" (overcommitted:
    a ceiling, not a promise), or "unlimited"."""
    if not partition.memory_limit:
        return "unlimited"
    return units.format_size(partition.memory_limit) + (" best effort" if partition.best_effort else "")


PROBING = "fracgpu: probing the GPU (this can take a minute on first use)..."


@contextlib.contextmanager
def probe_status() -> Iterator[None]:
    """While the device probe runs: a spinner on stderr when stderr is a terminal (cleared when it
    ends), nothing otherwise, and never anything on stdout, which scripts read."""
    if not sys.stderr.isatty():
        yield
        return
    with console(stderr=True).status(PROBING):
        yield


def exec_command(command: tuple[str, ...], env: dict[str, str | None]) -> None:
    """Run ``command`` in place of this process (so it keeps this pid), with ``env`` set in its
    environment (None: unset); CommandFailed when it cannot start."""
    sys.stdout.flush()
    sys.stderr.flush()
    environment = {name: value for name, value in {**os.environ, **env}.items() if value is not None}
    try:
        os.execvpe(command[0], list(command), environment)
    except FileNotFoundError:
        raise CommandFailed(f"command not found: {command[0]}", 127) from None
    except OSError as e:
        raise CommandFailed(f"cannot run {command[0]}: {e.strerror}", 126) from None
