"""The ``fracgpu`` command line: a thin layer over the library.

Commands only parse options, call ``fracgpu`` modules and print; every rule
(units, ranges, environment variables) lives in the library, so the CLI and
the Python API cannot disagree.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import click

from fracgpu import __version__, sim, units


class LazyGroup(click.Group):
    """A group whose commands are imported when used, so ``fracgpu --help`` and
    each command load only what they need. Commands are ``"module:attribute"``."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands:
            module, _, attribute = self.lazy_commands[name].partition(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)


# One row per top-level command; a new command is a module and a row here.
COMMANDS = {
    "demo": "fracgpu.demo:demo",
    "exporter": "fracgpu.metrics:exporter",
    "partition": "fracgpu.cli.partition:partition_group",
    "report": "fracgpu.cli.report:report",
    "run": "fracgpu.cli.run:run",
    "slurm-prolog": "fracgpu.slurm:slurm_prolog",
    "sim": "fracgpu.cli:sim_group",
    "top": "fracgpu.cli.top:top",
}


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="fracgpu")
def main() -> None:
    """Share one NVIDIA GPU between jobs: memory quotas, compute shares, accounting."""


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


class CommandFailed(click.ClickException):
    """The command to run could not be started: status 127 when it was not
    found and 126 when it could not be executed, as env(1) and the shells do."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class InputError(click.ClickException):
    """Bad input, or a state that must not be used: one line on stderr and exit status 2,
    the status of every refusal to start (as for usage errors)."""

    exit_code = 2


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


@click.group("sim")
def sim_group() -> None:
    """The simulated GPU: run CUDA programs without a GPU."""


def _sim_options(command: Any) -> Any:
    defaults = sim.SimConfig()
    options = [
        click.option("--memory", type=SizeParam(),
                     help=f"Memory of each device, like 16GiB. [default: {units.format_size(defaults.memory)}]"),
        click.option("--sms", type=int, help=f"Streaming multiprocessors per device. [default: {defaults.sms}]"),
        click.option("--devices", type=int, help=f"Number of devices. [default: {defaults.devices}]"),
        click.option("--name", help=f"Device name. [default: {defaults.name}]"),
        click.option("--context-memory", type=SizeParam(allow_zero=True),
                     help="Memory each CUDA context reserves on its device. [default: 0]"),
        click.option("--dir", "state_dir", type=click.Path(file_okay=False),
                     help="Folder of the file that processes share the simulated GPU through "
                          "(like $FRACGPU_SIM_DIR); each folder is a separate GPU."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _sim_environment(ctx: click.Context, options: dict[str, Any]) -> tuple[sim.SimConfig, dict[str, str]]:
    """The config from the options given (defaults for the rest) and its environment.

    The library's range errors become usage errors on the option they came from."""
    config = sim.SimConfig(**{name: value for name, value in options.items() if value is not None})
    try:
        return config, sim.environment(config)
    except sim.ConfigError as e:
        param = next((p for p in ctx.command.params if p.name == e.field), None)
        raise click.BadParameter(e.problem, ctx=ctx, param=param) from None
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None


@sim_group.command("env")
@_sim_options
@click.pass_context
def sim_env(ctx: click.Context, **options: Any) -> None:
    """Print shell commands that select the simulated GPU.

    Use it as: eval "$(fracgpu sim env --memory 8GiB)"
    """
    config, _ = _sim_environment(ctx, options)  # validates, and finds the library
    click.echo(sim.shell_exports(config), nl=False)


@sim_group.command("run", context_settings={"allow_interspersed_args": False})
@_sim_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND [ARGS]...")
@click.pass_context
def sim_run(ctx: click.Context, command: tuple[str, ...], **options: Any) -> None:
    """Run COMMAND on the simulated GPU, in place of this process."""
    if not command:
        raise click.UsageError("missing the command to run: fracgpu sim run [OPTIONS] -- COMMAND [ARGS]...", ctx)
    _, env = _sim_environment(ctx, options)
    exec_command(command, env)


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
