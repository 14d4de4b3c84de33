"""``fracgpu sim``: the simulated GPU, to run CUDA programs without a GPU."""

from __future__ import annotations

from typing import Any

import click

from fracgpu import sim, units
from fracgpu.cli.common import CommandRunner, SizeParam, exec_command


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
                     help="Memory each CUDA context reserves on its device. [default: 1/256 of --memory]"),
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


@sim_group.command("run", cls=CommandRunner, context_settings={"allow_interspersed_args": False})
@_sim_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND [ARGS]...")
@click.pass_context
def sim_run(ctx: click.Context, command: tuple[str, ...], **options: Any) -> None:
    """Run COMMAND on the simulated GPU, in place of this process.

    Exits as COMMAND does; 125 when it is not started (a bad option), 127 when
    it is not found, 126 when it cannot be executed.
    """
    if not command:
        raise click.UsageError("missing the command to run: fracgpu sim run [OPTIONS] -- COMMAND [ARGS]...", ctx)
    _, env = _sim_environment(ctx, options)
    exec_command(command, env)
